"""RAG's two marginalizations, the document posterior, and both decoders.

Lewis et al. (2020) §2.1 give two ways to turn the retriever's top-k distribution
p_η(z|x) ∝ exp(d(z)ᵀq(x)) and the generator's p_θ(y_i | x, z, y_<i) into p(y|x). The paper leaves
the equations unnumbered; this course calls them Eq. 1 and Eq. 2:

    Eq. 1  RAG-Sequence:  p(y|x) ≈ Σ_z p_η(z|x) Π_i p_θ(y_i | x, z, y_<i)
    Eq. 2  RAG-Token:     p(y|x) ≈ Π_i Σ_z p_η(z|x) p_θ(y_i | x, z, y_<i)

RAG-Sequence picks one document for the whole answer; RAG-Token may switch documents at every
token. With k = 1, or a one-token target, the two are the same number.

Every function here works in log space on the (batch, k, T) tensor of
``generator.token_logprobs`` and never multiplies probabilities: a product of T token
probabilities underflows long before T is large, and a sum over documents of tiny numbers is
``logsumexp``. Positions where ``target_mask`` is false (padding) contribute nothing.

Decoding (§2.5): RAG-Token is ordinary beam search over the marginal next-token distribution
log Σ_z p_η(z|x) p_θ(y_i | x, z, y_<i). RAG-Sequence's likelihood does not factor over tokens, so
the paper runs beam search once per document and then either scores every hypothesis under
every document (*Thorough* decoding) or takes a hypothesis missing from a document's beam to
have probability ≈ 0 there (*Fast* decoding, no extra forward passes). Both decoders run the
encoder once per batch and the decoder with its key/value cache; greedy decoding is
``num_beams=1``. Beam scores are total log-probabilities (no length normalisation), so the
score of an answer is exactly its log p(y|x) under Eq. 1 or Eq. 2. ``max_length`` counts the
answer's tokens with its end token, as ``generator.encode_targets`` counts a training target's:
an answer that reaches it ends there with the end token, scored by its own probability — so every
answer is a target that training could have scored. (transformers' ``generate`` forces the end
token too when the generator's config sets ``forced_eos_token_id``, as BART's does, but adds
nothing for it to the beam score: :func:`transformers_search` configures the peer to run this
very search instead.)
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence
from transformers import (
    DynamicCache,
    EncoderDecoderCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
)
from transformers.modeling_outputs import BaseModelOutput

from . import causal
from .config import Preset
from .generator import cache_keyword, gold_logprobs, pad, shift_right

# ---------------------------------------------------------------------------------------------
# The marginalizations


def log_prior(doc_scores: Tensor) -> Tensor:
    """log p_η(z|x) over the k retrieved documents: ``log_softmax`` of d(z)ᵀq(x), (batch, k).

    The softmax runs over the top k only: the paper's "top-k approximation" of p_η.
    """
    return doc_scores.log_softmax(dim=-1)


def _masked(token_logprobs: Tensor, target_mask: Tensor) -> Tensor:
    """Padding as a token of probability 1 under every document: log p = 0 changes no sum,
    no product and no posterior (and never carries a −inf or NaN from beyond the target)."""
    return torch.where(target_mask.bool().unsqueeze(1), token_logprobs, 0.0)


def sequence_logprobs(token_logprobs: Tensor, target_mask: Tensor) -> Tensor:
    """log p_θ(y | x, z) = Σ_i log p_θ(y_i | x, z, y_<i) over unmasked positions, (batch, k)."""
    return _masked(token_logprobs, target_mask).sum(dim=-1)


def rag_sequence_loss(token_logprobs: Tensor, target_mask: Tensor, doc_scores: Tensor) -> Tensor:
    """RAG-Sequence negative log-likelihood (Eq. 1), one value per example.

        −log p(y|x) = −log Σ_z p_η(z|x) Π_i p_θ(y_i | x, z, y_<i)
                    = −logsumexp_z [ log p_η(z|x) + Σ_i log p_θ(y_i | x, z, y_<i) ]

    ``token_logprobs`` (batch, k, T), ``target_mask`` (batch, T) true on scored tokens,
    ``doc_scores`` (batch, k) unnormalised d(z)ᵀq(x). Returns (batch,).
    """
    return -torch.logsumexp(log_prior(doc_scores) + sequence_logprobs(token_logprobs, target_mask),
                            dim=-1)


def rag_token_loss(token_logprobs: Tensor, target_mask: Tensor, doc_scores: Tensor) -> Tensor:
    """RAG-Token negative log-likelihood (Eq. 2), one value per example.

        −log p(y|x) = −Σ_i log Σ_z p_η(z|x) p_θ(y_i | x, z, y_<i)
                    = −Σ_i logsumexp_z [ log p_η(z|x) + log p_θ(y_i | x, z, y_<i) ]

    Same arguments as :func:`rag_sequence_loss`. Returns (batch,). (A padded position adds
    −log Σ_z p_η(z|x) · 1 = 0.)
    """
    joint = log_prior(doc_scores).unsqueeze(-1) + _masked(token_logprobs, target_mask)
    return -torch.logsumexp(joint, dim=1).sum(dim=-1)


def doc_posterior(token_logprobs: Tensor, target_mask: Tensor, doc_scores: Tensor,
                  per_token: bool = False) -> Tensor:
    """Which documents support the answer: the posterior over the k retrieved documents.

    RAG-Sequence (``per_token=False``), Bayes' rule on the whole answer, (batch, k):

        p(z | x, y) ∝ p_η(z|x) Π_i p_θ(y_i | x, z, y_<i)

    RAG-Token (``per_token=True``), one posterior per target token, (batch, k, T) — the paper's
    Figure 2:

        p(z | x, y_i, y_<i) ∝ p_η(z|x) p_θ(y_i | x, z, y_<i)

    At masked positions (padding) there is no evidence and the per-token posterior is the prior.
    Both sum to one over dim 1 (the documents).
    """
    prior = log_prior(doc_scores)
    if per_token:
        return (prior.unsqueeze(-1) + _masked(token_logprobs, target_mask)).softmax(dim=1)
    return (prior + sequence_logprobs(token_logprobs, target_mask)).softmax(dim=-1)


def posterior_departure(token_posterior: Tensor, doc_scores: Tensor) -> Tensor:
    """How far each token's posterior p(z | x, y_i, y_<i) (k, T) has moved from the prior
    p_η(z|x) (from ``doc_scores``, (k,)): the total variation ½ Σ_z |posterior − prior|, one
    value per token, in [0, 1] (notebook 05: which answer tokens were decided by a document)."""
    prior = log_prior(doc_scores).exp().to(token_posterior)
    return 0.5 * (token_posterior - prior[:, None]).abs().sum(0)


# ---------------------------------------------------------------------------------------------
# Decoding


@dataclass
class Answer:
    """A decoded answer with its score and provenance.

    ``score`` is log p(y|x) under the decoder's model (Eq. 1 or Eq. 2; for Fast decoding, Fast's
    estimate of Eq. 1). ``token_ids`` are y_1 … y_T, the last one the end token.
    ``doc_posterior`` (k,) says which of the k retrieved documents support the answer:
    p(z | x, y) for RAG-Sequence; for RAG-Token, the per-token posteriors averaged over the
    answer's tokens. ``token_posterior`` (k, T) is RAG-Token's p(z | x, y_i, y_<i) for
    every generated token (the paper's Figure 2); None for RAG-Sequence.
    """

    text: str
    score: float
    token_ids: list[int]
    doc_posterior: Tensor
    token_posterior: Tensor | None = None


@contextlib.contextmanager
def _eval_mode(model):
    """Decode without dropout, then give the model back in the mode it came in."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _encode(model, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The generator's encoder, run once for all batch·k inputs: (batch·k, S, d)."""
    return model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


SCORE_TOKENS = 2048  # decoder positions per pass of _score (the tiny BART: 64 MiB of logits)


def _score(model, encoder_hidden: Tensor, encoder_mask: Tensor, rows: Tensor,
           labels: Tensor, target_mask: Tensor) -> Tensor:
    """Teacher-forced log p_θ(y_i | x, z, y_<i) reusing the encoder's output.

    ``labels`` (n, T) with ``target_mask`` is scored under the encoder rows ``rows`` (n, k);
    returns (n, k, T), 0 at padding. This is ``generator.token_logprobs`` without running the
    encoder again. Thorough decoding at large k scores |Y|·k rows: the labels go longest first,
    in passes of at most ``SCORE_TOKENS`` decoder positions, each cut to its own longest label
    (the decoder is causal: a label's log-probs do not depend on the padding after it).
    """
    n, k = rows.shape
    cfg = model.config
    out = encoder_hidden.new_zeros((n, k, labels.shape[1]), dtype=torch.float32)
    lengths = target_mask.sum(-1)
    per_pass = max(1, SCORE_TOKENS // (labels.shape[1] * k))
    for chunk in lengths.argsort(descending=True, stable=True).split(per_pass):
        t = int(lengths[chunk].max())
        labels_k = labels[chunk, :t].repeat_interleave(k, dim=0)
        flat = rows[chunk].reshape(-1)
        logits = model(encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden[flat]),
                       attention_mask=encoder_mask[flat],
                       decoder_input_ids=shift_right(labels_k, cfg.decoder_start_token_id,
                                                     cfg.pad_token_id),
                       use_cache=False).logits
        out[chunk, :, :t] = gold_logprobs(logits, labels_k).view(len(chunk), k, t)
    return out


class Seq2SeqSteps:
    """BART's decoder one step at a time for :func:`_beam_search`, over (batch·k) inputs.

    The encoder runs once over all rows and its states stay apart from the decoder's: the
    self-attention cache follows the beams (:meth:`reorder`), while the cross-attention cache
    and the encoder states, the same for every beam of a row, are only copied or dropped with
    the rows (:meth:`keep`). (``causal.CausalSteps`` is the same interface for a decoder-only
    LM, whose one cache holds prompt and answer alike.)
    """

    def __init__(self, model, input_ids: Tensor, attention_mask: Tensor):
        cfg = model.config
        self.model, self.eos_token_id, self.pad_token_id = model, cfg.eos_token_id, cfg.pad_token_id
        self.encoded = self.hidden = _encode(model, input_ids, attention_mask)
        self.encoded_mask = self.mask = attention_mask
        self.keyword = cache_keyword(model)
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())  # self-, cross-attention

    def __call__(self, tokens: Tensor | None) -> Tensor:
        """Logits of the next token (rows, vocab) after ``tokens`` (rows,); None: the first,
        from the decoder start token."""
        if tokens is None:
            tokens = torch.full((len(self.hidden),), self.model.config.decoder_start_token_id,
                                device=self.hidden.device)
        out = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=self.hidden),
                         attention_mask=self.mask, use_cache=True, **{self.keyword: self.cache},
                         decoder_input_ids=tokens.view(-1, 1))
        self.cache = getattr(out, self.keyword)
        return out.logits[:, -1]

    def reorder(self, order: Tensor) -> None:
        """The beams moved: the self-attention cache follows rows ``order``."""
        self.cache.self_attention_cache.reorder_cache(order)

    def keep(self, rows: Tensor) -> None:
        """Rows copied (one per beam) or dropped (finished groups): the encoder's side."""
        self.cache.cross_attention_cache.reorder_cache(rows)
        self.hidden, self.mask = self.hidden[rows], self.mask[rows]

    def score(self, rows: Tensor, labels: Tensor, target_mask: Tensor) -> Tensor:
        """Teacher-forced log p_θ(y_i | x, z, y_<i) of ``labels`` (n, T) under the inputs
        ``rows`` (n, k), from the encoder's states of the search: :func:`_score`."""
        return _score(self.model, self.encoded, self.encoded_mask, rows, labels, target_mask)


def _steps(model, tokenizer, input_ids: Tensor, attention_mask: Tensor):
    """The generator's decoding steps: BART's, or a decoder-only LM's (``causal.py``)."""
    if causal.is_causal(model):
        return causal.CausalSteps(model, input_ids, attention_mask,
                                  causal.end_token_id(tokenizer), tokenizer.pad_token_id)
    return Seq2SeqSteps(model, input_ids, attention_mask)


class Hypothesis(NamedTuple):
    """A finished answer of :func:`_beam_search`: ``token_ids`` y_1 … y_T (the last one the end
    token), ``score`` Σ_i log Σ_r p(r) p_θ(y_i | r, y_<i), and ``row_logprobs`` (T, R), the
    log p_θ(y_i | r, y_<i) of every token under each of its group's R rows, recorded as the
    search chose the token (RAG-Token's score and provenance need no second pass)."""

    token_ids: list[int]
    score: float
    row_logprobs: Tensor


def _beam_search(steps, log_prior: Tensor, num_beams: int,
                 max_length: int) -> list[list[Hypothesis]]:
    """Beam search for G independent groups, each over log Σ_r p(r) p_θ(y_i | r, y_<i).

    ``steps`` runs the generator one token at a time (:class:`Seq2SeqSteps`,
    ``causal.CausalSteps``). Group g owns its R consecutive rows g·R … g·R+R−1 with log-weights
    ``log_prior[g]``
    (G, R). RAG-Token: a group is a question and its rows are its k documents, and the sum is
    Eq. 2's marginal over documents. RAG-Sequence: a group is one (question, document) pair,
    R = 1, log-weight 0 — the generator alone.

    Canonical beam search with total log-probabilities: each step expands the ``num_beams``
    live hypotheses, keeps the best 2·num_beams continuations, moves those ending with the end
    token (if among the best num_beams) to the finished pool, and continues with the best
    num_beams others. The ``max_length``-th token can only be the end token. A group
    stops once its num_beams finished hypotheses all score at least its best live one (log
    probabilities only fall as a hypothesis grows), and leaves the batch. Returns, per group,
    up to num_beams hypotheses, best first.
    """
    if num_beams < 1 or max_length < 1:
        raise ValueError(f"need num_beams ≥ 1 and max_length ≥ 1, got {num_beams}, {max_length}")
    n_groups, n_rows = log_prior.shape
    beams, device, eos = num_beams, log_prior.device, steps.eos_token_id
    all_beams = torch.arange(beams, device=device)

    def rows_of(groups: Tensor, beam: Tensor) -> Tensor:
        """Batch rows of (group, beam, document), in that order, for each group's beams, in
        the batch of ``width`` beams a group."""
        return ((groups.view(-1, 1, 1) * width + beam.unsqueeze(-1)) * n_rows
                + torch.arange(n_rows, device=device)).view(-1)

    # The first step runs each group's rows once: every beam starts from the same start token,
    # and the beams (and their copies of the cross-attention cache) are born from its choices.
    active, width = torch.arange(n_groups, device=device), 1  # groups searching, beams in batch
    log_weights = log_prior.float()
    weights = log_weights.exp()[:, None, None, :]  # p(r), shaped to weigh (groups, beams, R, V)
    tokens = torch.zeros((n_groups, 1, 1), dtype=torch.long, device=device)  # a placeholder:
    # the first step starts from the generator's own start (BART's decoder start token, the
    # end of a causal LM's prompt)
    history = torch.zeros((n_groups, 1, 0, n_rows), device=device)  # row log-probs so far
    scores = torch.zeros((n_groups, 1), device=device)
    finished: list[list[Hypothesis]] = [[] for _ in range(n_groups)]
    for step in range(max_length):
        logits = steps(tokens[:, :, -1].repeat_interleave(n_rows) if step else None)
        # log p_θ(y | r, y_<i) for every row r and token y: (groups, beams, R, V)
        row_logprobs = logits.float().log_softmax(-1)
        row_logprobs = row_logprobs.view(len(active), width, n_rows, -1)
        end_logprobs = row_logprobs[..., eos]
        vocab = row_logprobs.shape[-1]
        last = step == max_length - 1
        if last:  # the answer ends here, with the end token, as a cut training target does
            logprobs = row_logprobs.new_full((len(active), width, vocab), float("-inf"))
            logprobs[..., eos] = torch.logsumexp(end_logprobs + log_weights[active, None], -1)
        elif n_rows == 1:  # the generator alone
            logprobs = row_logprobs[:, :, 0]
        else:  # Σ_r p(r) p_θ(y | r, y_<i) for every y: one (1 × R)·(R × V) product per beam
            logprobs = (weights[active] @ row_logprobs.exp()).squeeze(2).log()
        cand, index = (scores.unsqueeze(-1) + logprobs).view(len(active), -1).topk(2 * beams)

        keep, going = [], []  # the best continuations that did not end, (beam, token, score)
        for a, (g, c_scores, c_index) in enumerate(
                zip(active.tolist(), cand.tolist(), index.tolist())):
            kept = []
            for rank, (s, i) in enumerate(zip(c_scores, c_index)):
                b, y = divmod(i, vocab)
                if y != eos:
                    if len(kept) < beams:
                        kept.append((b, y, s))
                elif rank < beams and s > float("-inf"):  # −inf: no probability at all
                    finished[g].append(Hypothesis(
                        tokens[a, b, 1:].tolist() + [y], s,
                        torch.cat([history[a, b], end_logprobs[a, b, None]])))
            best = sorted((h.score for h in finished[g]), reverse=True)[:beams]
            if not last and (len(best) < beams or kept[0][2] > best[-1]):
                keep.append(kept)
                going.append(a)
        if not going:
            break
        going = torch.tensor(going, device=device)
        keep_beam = torch.tensor([[b for b, _, _ in kept] for kept in keep], device=device)
        keep_token = torch.tensor([[y for _, y, _ in kept] for kept in keep], device=device)
        survivors = going[:, None], keep_beam
        tokens = torch.cat([tokens[survivors], keep_token.unsqueeze(-1)], dim=-1)
        history = torch.cat([history[survivors],
                             row_logprobs[going[:, None], keep_beam, :, keep_token].unsqueeze(2)],
                            dim=2)
        scores = torch.tensor([[s for _, _, s in kept] for kept in keep], device=device)
        # Beams move within their group and keep their document: the self-attention cache
        # follows the surviving beams (nothing moves in greedy decoding while every group
        # searches on); the cross-attention cache and the encoder states are copied once per
        # beam after the first step, and later only lose the rows of groups that have finished.
        order = rows_of(going, keep_beam)  # compared with the rows in the batch now
        if not torch.equal(order, torch.arange(len(active) * width * n_rows, device=device)):
            steps.reorder(order)
        if width < beams or len(going) < len(active):
            steps.keep(rows_of(going, all_beams.clamp(max=width - 1).expand(len(going), beams)))
        active, width = active[going], beams
    return [sorted(f, key=lambda h: -h.score)[:beams] for f in finished]


def _labels(hypotheses: list[list[int]], pad_id: int, device) -> tuple[Tensor, Tensor]:
    batch = pad(hypotheses, pad_id)
    return batch["input_ids"].to(device), batch["attention_mask"].bool().to(device)


def _text(tokenizer, token_ids: list[int]) -> str:
    return tokenizer.decode(token_ids, skip_special_tokens=True).strip()


def rag_token_generate(model, tokenizer, input_ids: Tensor, attention_mask: Tensor,
                       doc_scores: Tensor, num_beams: int = 4,
                       max_length: int = Preset.max_target_length) -> list[Answer]:
    """RAG-Token decoding: beam search over log Σ_z p_η(z|x) p_θ(y_i | x, z, y_<i) (Eq. 2).

    ``input_ids``/``attention_mask`` (batch·k, S) hold each question's k generator inputs
    consecutively (as ``generator.encode_inputs`` gives them); ``doc_scores`` (batch, k).
    ``num_beams=1`` is greedy decoding; answers have at most ``max_length`` tokens and end with
    the end token, exactly as ``generator.encode_targets(…, max_length)`` cuts a training target
    (pass the same number: the preset's ``max_target_length``). Returns the best answer per
    question, with the per-token posterior p(z | x, y_i, y_<i) over the k documents as
    provenance (see :class:`Answer`). A document of ``doc_scores`` −inf (no passage in its
    slot) has prior 0 and weighs nothing.
    """
    # batches made on the CPU (generator.encode_inputs) go to the generator's device
    device = getattr(model, "device", input_ids.device)
    input_ids, attention_mask, doc_scores = (
        t.to(device) for t in (input_ids, attention_mask, doc_scores))
    with _eval_mode(model):
        steps = _steps(model, tokenizer, input_ids, attention_mask)
        best = [group[0] for group in _beam_search(steps, log_prior(doc_scores), num_beams,
                                                   max_length)]
    # Eq. 2 on each answer from the log p_θ(y_i | x, z, y_<i) the search recorded: (batch, k, T)
    logprobs = pad_sequence([h.row_logprobs for h in best], batch_first=True).transpose(1, 2)
    target_mask = pad_sequence([torch.ones(len(h.token_ids), dtype=torch.bool) for h in best],
                               batch_first=True)
    logprobs, doc_scores = logprobs.cpu(), doc_scores.detach().float().cpu()
    scores = -rag_token_loss(logprobs, target_mask, doc_scores)
    posterior = doc_posterior(logprobs, target_mask, doc_scores, per_token=True)
    return [Answer(_text(tokenizer, h.token_ids), scores[i].item(), h.token_ids,
                   doc_posterior=posterior[i, :, : len(h.token_ids)].mean(-1),
                   token_posterior=posterior[i, :, : len(h.token_ids)])
            for i, h in enumerate(best)]


def rag_sequence_generate(model, tokenizer, input_ids: Tensor, attention_mask: Tensor,
                          doc_scores: Tensor, num_beams: int = 4,
                          max_length: int = Preset.max_target_length,
                          method: str = "thorough") -> list[Answer]:
    """RAG-Sequence decoding (Eq. 1): beam search per document, then marginalize.

    1. Run beam search under each retrieved document z alone, giving up to ``num_beams``
       hypotheses per document with their log p_θ(y | x, z); the candidates Y are their union.
    2. ``method="thorough"``: score every y ∈ Y under every document with one teacher-forced
       pass, then p(y|x) = Σ_z p_η(z|x) p_θ(y | x, z) exactly.
       ``method="fast"``: no extra pass; p_θ(y | x, z) ≈ 0 when y is not in z's beam, so
       p(y|x) ≈ Σ_{z : y ∈ beam(z)} p_η(z|x) p_θ(y | x, z) — a lower bound on Thorough's value.
    3. Return the y with the highest p(y|x), with p(z | x, y) over the k documents.

    Arguments as in :func:`rag_token_generate`; ``num_beams=1`` is greedy per document. A
    document of ``doc_scores`` −inf (no passage in its slot) adds no candidates and no weight.
    """
    if method not in ("thorough", "fast"):
        raise ValueError(f"method must be 'thorough' or 'fast', not {method!r}")
    # batches made on the CPU (generator.encode_inputs) go to the generator's device
    device = getattr(model, "device", input_ids.device)
    input_ids, attention_mask, doc_scores = (
        t.to(device) for t in (input_ids, attention_mask, doc_scores))
    batch, k = doc_scores.shape
    with _eval_mode(model):
        steps = _steps(model, tokenizer, input_ids, attention_mask)
        per_doc = _beam_search(steps, doc_scores.new_zeros(batch * k, 1), num_beams, max_length)
        # candidates[q]: distinct hypotheses of question q; beam_logprobs[q]: (|Y|, k)
        candidates, beam_logprobs = [], []
        absent = torch.isneginf(doc_scores).tolist()  # slots with no passage: p_η(z|x) = 0
        for q in range(batch):
            found: dict[tuple[int, ...], Tensor] = {}
            for z in (z for z in range(k) if not absent[q][z]):
                for h in per_doc[q * k + z]:
                    y = tuple(h.token_ids)
                    found.setdefault(y, torch.full((k,), float("-inf")))[z] = h.score
            candidates.append([list(y) for y in found])
            beam_logprobs.append(torch.stack(list(found.values())))

        if method == "thorough":
            device = input_ids.device
            flat = [y for ys in candidates for y in ys]
            owner = torch.tensor([q for q, ys in enumerate(candidates) for _ in ys], device=device)
            labels, target_mask = _labels(flat, steps.pad_token_id, device)
            rows = owner.view(-1, 1) * k + torch.arange(k, device=device)
            seq_logprobs = sequence_logprobs(steps.score(rows, labels, target_mask), target_mask)
            beam_logprobs = list(seq_logprobs.cpu().split([len(ys) for ys in candidates]))

    answers = []
    priors = log_prior(doc_scores.detach().float().cpu())
    for q, (ys, logp) in enumerate(zip(candidates, beam_logprobs)):
        joint = priors[q] + logp  # (|Y|, k): log p_η(z|x) p_θ(y|x,z)
        marginal = torch.logsumexp(joint, dim=-1)
        best = int(marginal.argmax())
        answers.append(Answer(_text(tokenizer, ys[best]), marginal[best].item(), ys[best],
                              joint[best].softmax(-1)))
    return answers


# ---------------------------------------------------------------------------------------------
# The peer


class EndAtMaxLength(LogitsProcessor):
    """ragbook's rule for an answer that reaches its last allowed token, for transformers'
    ``generate`` (once what it has generated from, start token or prompt, is ``max_length``
    tokens long): that token can only be the end token, scored by its own log-probability.

    transformers' own ``forced_eos_token_id`` makes the end token certain there (log 1), so its
    beam search would keep the answer cut at the limit that Eq. 2 finds less likely. In beam
    search the processors see log-probabilities; in greedy search any score of the one allowed
    token wins.
    """

    def __init__(self, max_length: int, eos_token_id: int):
        self.max_length, self.eos_token_id = max_length, eos_token_id

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if input_ids.shape[-1] < self.max_length:  # the decoder start token and y_<max_length
            return scores
        ended = torch.full_like(scores, float("-inf"))
        ended[:, self.eos_token_id] = scores[:, self.eos_token_id]
        return ended


def transformers_search(num_beams: int, max_length: int, eos_token_id: int,
                        prompt_length: int = 1) -> dict:
    """Keyword arguments that make transformers' ``generate`` run ragbook's search.

    ragbook's beam search scores a hypothesis by its total log-probability (no length
    normalisation: ``length_penalty=0.0``), stops a question only when no live beam can beat its
    finished ones (``early_stopping="never"``), counts ``max_length`` in answer tokens
    (transformers counts the ``prompt_length`` tokens before them too: a seq2seq decoder's
    start token, or a causal LM's left-padded prompt) and ends an answer cut there as
    :class:`EndAtMaxLength` does. A loud stop: the flags are validated strictly, so a
    transformers version that would ignore one of them (it warns "not valid and may be
    ignored") raises here instead.
    """
    flags = {"num_beams": num_beams, "do_sample": False,
             "max_length": prompt_length + max_length, "forced_eos_token_id": None}
    if num_beams > 1:  # beam-only flags: greedy search has no length penalty to switch off
        flags |= {"length_penalty": 0.0, "early_stopping": "never"}
    GenerationConfig(**flags).validate(strict=True)
    processors = LogitsProcessorList([EndAtMaxLength(prompt_length + max_length - 1,
                                                     eos_token_id)])
    return {**flags, "logits_processor": processors}


def transformers_rag(generator, n_docs: int, marginalization: str = "sequence"):
    """transformers' ``RagSequenceForGeneration`` / ``RagTokenForGeneration`` around the very
    same ``generator`` object, to check ragbook's numbers against.

    Call it with ``context_input_ids``/``context_attention_mask`` (batch·n_docs, S),
    ``doc_scores`` (batch, n_docs) and ``labels`` = ragbook's labels with the decoder start token
    in front (transformers feeds labels to the decoder unshifted and scores them shifted left).
    Its question encoder, a one-layer stand-in, is never used when doc scores are given.
    """
    from transformers import DPRConfig, RagConfig, RagSequenceForGeneration, RagTokenForGeneration

    classes = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}
    question_encoder = DPRConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1,
                                 num_attention_heads=1, intermediate_size=8, projection_dim=0)
    config = RagConfig.from_question_encoder_generator_configs(
        question_encoder, generator.config, n_docs=n_docs, retrieval_vector_size=8)
    for name in ("bos_token_id", "pad_token_id", "eos_token_id", "decoder_start_token_id",
                 "vocab_size"):
        setattr(config, name, getattr(generator.config, name))  # generate reads them here
    return classes[marginalization](config, generator=generator).train(generator.training)
