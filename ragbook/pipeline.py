"""The whole RAG model: query encoder + index (p_η) glued to the generator (p_θ).

``RagModel`` is what training, evaluation and ``ragbook ask`` share. It retrieves the top-k
passages for a batch of questions, scores them as in the paper — ``doc_scores`` = d(z)ᵀq(x)
recomputed from the stored (frozen) document vectors so that gradients reach the query encoder
— feeds each "title / text // question" to the generator, and marginalizes with Eq. 1
(RAG-Sequence) or Eq. 2 (RAG-Token). With ``retriever="bm25"`` (the paper's Table 6 ablation)
the passages and their scores come from BM25 and the query encoder plays no part. With
``retriever="hybrid"`` the prior is a product of the two experts,

    p_η(z|x) ∝ exp(scale · d(z)ᵀq(x)) · exp(w · BM25(x, z)),

so the logits simply add; the top-k is taken over the union of each expert's top candidates and
gradients still reach the query encoder through the dense term.

Each answer comes back as a :class:`Prediction`: the answer, the gold answers and its provenance
(the retrieved passages with p(z | x, y)), judged by Exact Match under SQuAD's answer
normalisation, which lives here with it; ``evaluate`` builds its metrics on top.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from . import causal, generator, rag
from .config import RETRIEVERS, Preset, default_device
from .data import Example, Passage

MARGINALIZATIONS = {"sequence": rag.rag_sequence_loss, "token": rag.rag_token_loss}
# w in the hybrid prior, chosen on dev questions for the jointly trained RAG models
# (benchmarks/hybrid_prior.py --trained; benchmarks/README.md, "w for the trained models"):
# Exact Match falls slowly as w grows while the share of index edits followed rises, since BM25
# reads the edited text as it is and the dense vector moves with a renamed title. w is the most
# updatable of the weights whose Exact Match is within a standard error of the best.
BM25_WEIGHT = 6.0
HYBRID_DEPTH = 20  # candidates taken from each expert before the product re-ranks them
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised gold answer, else 0.0."""
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


@dataclass
class Prediction:
    """One answer with its provenance: the passages it was generated from and p(z | x, y)."""

    question: str
    prediction: str
    answers: list[str]
    provenance: list[dict] = field(default_factory=list)  # {id, title, posterior}

    @property
    def em(self) -> float:
        return exact_match(self.prediction, self.answers)


@dataclass
class Retrieved:
    """The top-k passages of each question and their retrieval logits (batch, k), best first.

    An approximate index (HNSW, IVF-PQ) may find fewer than k passages for a question: its
    row of ``passages`` is then shorter and the missing slots, last, have ``doc_scores`` −inf,
    so p_η(z|x) = 0 there and they add nothing to Eq. 1 or Eq. 2.
    """

    passages: list[list[Passage]]
    doc_scores: Tensor


@dataclass
class GoldTable:
    """The inputs of Eq. 1 / Eq. 2 for a batch of gold answers (:meth:`RagModel.gold_table`):
    ``token_logprobs`` (batch, k, T), ``target_mask`` (batch, T), ``doc_scores`` (batch, k)
    and the retrieved ``passages``."""

    token_logprobs: Tensor
    target_mask: Tensor
    doc_scores: Tensor
    passages: list[list[Passage]]

    def losses(self) -> tuple[Tensor, Tensor]:
        """−log p(y|x) under Eq. 1 and under Eq. 2, on this one table."""
        args = (self.token_logprobs, self.target_mask, self.doc_scores)
        return rag.rag_sequence_loss(*args), rag.rag_token_loss(*args)


@dataclass
class Generated:
    """One decoded answer (:class:`ragbook.rag.Answer`: text, score, token ids, posteriors)
    beside what it was generated from: the question, the retrieved passages and their
    retrieval logits ``doc_scores`` (k,), softmax of which is the prior p_η(z|x)."""

    question: str
    passages: list[Passage]
    doc_scores: Tensor
    answer: rag.Answer


class RagModel(torch.nn.Module):
    """p(y|x) = marginal over the top-k passages z of p_η(z|x) · p_θ(y|x,z)."""

    def __init__(self, preset: Preset, query_encoder, generator, tokenizer, index,
                 doc_vectors: np.ndarray | None = None, bm25=None,
                 bm25_weight: float = BM25_WEIGHT):
        super().__init__()
        self.preset = preset
        self.bm25_weight = bm25_weight
        self.query_encoder = query_encoder
        self.generator = generator
        self.tokenizer = tokenizer
        self.index = index
        self.bm25 = bm25
        if bm25 is not None and index is not None and (
                [p.id for p in bm25.passages] != [p.id for p in index.passages]):
            raise ValueError("the BM25 passages are not the index's passages in the same order; "
                             "build the hybrid prior's half as BM25Retriever(index.passages)")
        self.history: list = []  # (step, loss) of the joint training behind it (trained_rag)
        # the mode of the parts it wraps: a wrapper made for evaluation must not switch them to
        # training (dropout) when `answer` restores its own mode
        self.training = generator.training
        vectors = doc_vectors if doc_vectors is not None else np.zeros((0, 0), np.float32)
        if isinstance(vectors, np.memmap):  # mapped d(z) stay on the CPU, shared by processes:
            self.doc_vectors = torch.from_numpy(vectors)  # only the top-k rows go to the device
        else:
            self.register_buffer("doc_vectors", torch.from_numpy(np.ascontiguousarray(vectors)),
                                 persistent=False)

    @classmethod
    def from_preset(cls, preset: Preset, retriever: str = "dense", query_encoder=None,
                    generator=None, tokenizer=None, index_kind: str = "flat",
                    passages: Sequence[Passage] | None = None,
                    mmap: bool = False) -> RagModel:
        """Assemble the model from cached artifacts (built on first use) over ``passages``
        (default: the built-in corpus; e.g. ``data.load_wiki_dpr(...)`` for the paper's), on
        :func:`~ragbook.config.default_device`. ``mmap`` maps the index and the document
        vectors instead of reading them (the ranks of a data-parallel run on one machine then
        share one copy, ``train.train_rag``)."""
        from .causal import load_generator
        from .data import load_corpus
        from .index import corpus_index
        from .retriever import BM25Retriever, load_encoders, passage_embeddings

        passages = load_corpus() if passages is None else list(passages)
        if query_encoder is None:
            query_encoder = load_encoders(preset)[0]
        if generator is None:
            generator, tokenizer = load_generator(preset.generator)
        if retriever not in RETRIEVERS:
            raise ValueError(f"unknown retriever {retriever!r}; choose one of {RETRIEVERS}")
        bm25 = None if retriever == "dense" else BM25Retriever(passages)
        if retriever == "bm25":
            model = cls(preset, query_encoder, generator, tokenizer, None, bm25=bm25)
        else:
            model = cls(preset, query_encoder, generator, tokenizer,
                        corpus_index(preset, kind=index_kind, passages=passages, mmap=mmap),
                        passage_embeddings(preset, passages, mmap=mmap), bm25=bm25)
        return model.to(default_device())

    def with_bm25(self, bm25) -> RagModel:
        """This model with another sparse half — a BM25Retriever for the hybrid prior, None for
        the dense retriever alone — sharing its encoders, generator, index and history: a new
        prior at test time, no retraining."""
        model = RagModel(self.preset, self.query_encoder, self.generator, self.tokenizer,
                         self.index, self.doc_vectors.cpu().numpy(), bm25=bm25,
                         bm25_weight=self.bm25_weight)
        model.history = self.history
        return model

    @property
    def device(self) -> torch.device:
        return next(self.generator.parameters()).device

    def retrieve(self, questions: Sequence[str], n_docs: int | None = None,
                 grad: bool = False) -> Retrieved:
        """Top-k passages and ``doc_scores`` = scale · d(z)ᵀq(x) (+ w · BM25(x, z) for the
        hybrid prior); differentiable in q if ``grad`` (joint training), the document vectors
        staying frozen as in the paper."""
        k = n_docs or self.preset.n_docs
        if self.index is None:
            found = self.bm25.search(list(questions), k)
            scores = torch.as_tensor(found.scores, dtype=torch.float32, device=self.device)
            return Retrieved(found.passages, scores)
        with torch.set_grad_enabled(grad):
            q = self.query_encoder(list(questions)).to(self.device)
        if self.bm25 is None:
            found = self.index.search(q.detach().float().cpu().numpy(), k)
            if (found.indices < 0).all(axis=1).any():
                raise ValueError("the index found no passage for a question; widen its search "
                                 "(index.set_search_params: nprobe for IVF, efSearch for HNSW)")
            width = max(len(row) for row in found.passages)  # no question filled the rest
            return Retrieved(found.passages, self._dense_scores(q, found.indices[:, :width]))
        return self._hybrid(questions, q, k)

    def _dense_scores(self, q: Tensor, indices: np.ndarray) -> Tensor:
        """scale · d(z)ᵀq(x) for the passages ``indices`` (batch, n) of each question; −inf
        where the index is −1 (an approximate index's padding: nothing found)."""
        d = self.doc_vectors[torch.as_tensor(np.maximum(indices, 0))].to(self.device)
        scores = self.preset.score_scale * torch.einsum("bd,bkd->bk", q.float(), d)
        return scores.masked_fill(torch.as_tensor(indices < 0, device=self.device), -torch.inf)

    def _hybrid(self, questions: Sequence[str], q: Tensor, k: int) -> Retrieved:
        """Top-k under the product of the dense and BM25 experts (the module docstring)."""
        bm25 = self.bm25.scores(questions)  # (batch, corpus)
        depth = min(max(k, HYBRID_DEPTH), bm25.shape[1])
        k = min(k, depth)
        dense = self.index.search(q.detach().float().cpu().numpy(), depth).indices
        sparse = np.argpartition(-bm25, depth - 1, axis=1)[:, :depth]
        candidates = np.concatenate([dense, sparse], axis=1)
        repeated = np.ones(candidates.shape, dtype=bool)  # a passage both experts found
        for row, ids in zip(repeated, candidates):
            row[np.unique(ids, return_index=True)[1]] = False
        # −inf where the index found nothing (−1); the sparse expert's `depth` are all real
        scores = self._dense_scores(q, candidates) + self.bm25_weight * torch.as_tensor(
            np.take_along_axis(bm25, np.maximum(candidates, 0), axis=1), device=self.device)
        scores = scores.masked_fill(torch.as_tensor(repeated, device=self.device), -torch.inf)
        top = scores.detach().topk(k, dim=1).indices
        chosen = np.take_along_axis(candidates, top.cpu().numpy(), axis=1)
        passages = [[self.index.passages[j] for j in row] for row in chosen]
        return Retrieved(passages, scores.gather(1, top))

    @property
    def _reads(self):
        """The module that makes the generator's inputs and targets and scores them: BART's
        ``generator``, or ``causal`` for a decoder-only LM (the same three functions)."""
        return causal if causal.is_causal(self.generator) else generator

    def generator_inputs(self, questions: Sequence[str],
                         passages: Sequence[Sequence[Passage]]) -> dict[str, Tensor]:
        """The (batch·k, S) inputs "title / text // question" (a causal LM: its prompt), k
        consecutive per question.

        k is the longest row; a shorter row (an approximate index found fewer passages) fills
        its missing slots with the question alone, whose p_η(z|x) is 0 (:class:`Retrieved`).
        """
        k = max(len(row) for row in passages)
        flat = [p for row in passages for p in [*row, *[None] * (k - len(row))]]
        repeated = [q for q in questions for _ in range(k)]
        batch = self._reads.encode_inputs(self.tokenizer, flat, repeated,
                                          self.preset.max_source_length)
        return {k: v.to(self.device) for k, v in batch.items()}

    def gold_table(self, examples: Sequence[Example], n_docs: int | None = None,
                   train_retriever: bool = False) -> GoldTable:
        """What Eq. 1 and Eq. 2 are computed from, for each example's first gold answer: the
        (batch, k, T) table of log p_θ(y_i | x, z, y_<i) over the top-k passages, the answer
        tokens' mask and the retrieval logits. Gradients reach the generator, and the query
        encoder if ``train_retriever`` (joint training)."""
        questions = [e.question for e in examples]
        found = self.retrieve(questions, n_docs, grad=train_retriever)
        inputs = self.generator_inputs(questions, found.passages)
        targets = self._reads.encode_targets(self.tokenizer, [e.answers[0] for e in examples],
                                             self.preset.max_target_length)
        logprobs = self._reads.token_logprobs(self.generator, inputs["input_ids"],
                                              inputs["attention_mask"],
                                              targets["labels"].to(self.device))
        return GoldTable(logprobs, targets["target_mask"].to(self.device), found.doc_scores,
                         found.passages)

    def loss(self, examples: Sequence[Example], marginalization: str = "token",
             n_docs: int | None = None, train_retriever: bool = True) -> Tensor:
        """−log p(y|x) for each example (batch,), Eq. 1 or Eq. 2 over the top-k passages."""
        if marginalization not in MARGINALIZATIONS:
            raise ValueError(f"unknown marginalization {marginalization!r}; "
                             f"choose one of {sorted(MARGINALIZATIONS)}")
        table = self.gold_table(examples, n_docs, train_retriever)
        return MARGINALIZATIONS[marginalization](table.token_logprobs, table.target_mask,
                                                 table.doc_scores)

    @torch.no_grad()
    def generate(self, questions: Sequence[str], marginalization: str = "token",
                 n_docs: int | None = None, num_beams: int = 1, decoding: str = "thorough",
                 batch_size: int = 16, uniform_prior: bool = False,
                 progress: bool = False) -> list[Generated]:
        """Decode an answer for each question, batch by batch: retrieve, format, then RAG-Token
        beam search (Eq. 2) or RAG-Sequence's Thorough / Fast decoding (Eq. 1), at most
        ``max_target_length`` tokens, as ``loss`` cuts a target. ``uniform_prior``: the same
        passages with p_η(z|x) = 1/k (what the retrieval scores add, notebook 04)."""
        from tqdm.auto import tqdm

        if marginalization not in MARGINALIZATIONS:
            raise ValueError(f"unknown marginalization {marginalization!r}; "
                             f"choose one of {sorted(MARGINALIZATIONS)}")
        was_training = self.training
        self.eval()
        out = []
        for start in tqdm(range(0, len(questions), batch_size), disable=not progress,
                          desc=f"RAG-{marginalization.capitalize()}"):
            qs = list(questions[start:start + batch_size])
            found = self.retrieve(qs, n_docs)
            scores = found.doc_scores
            if uniform_prior:  # slots with no passage (−inf) stay empty
                scores = torch.where(scores.isfinite(), 0.0, -torch.inf)
            inputs = self.generator_inputs(qs, found.passages)
            args = (self.generator, self.tokenizer, inputs["input_ids"],
                    inputs["attention_mask"], scores)
            limits = {"num_beams": num_beams, "max_length": self.preset.max_target_length}
            results = (rag.rag_token_generate(*args, **limits) if marginalization == "token"
                       else rag.rag_sequence_generate(*args, **limits, method=decoding))
            out += [Generated(q, ps, s.cpu(), a)
                    for q, ps, s, a in zip(qs, found.passages, scores, results)]
        self.train(was_training)
        return out

    def answer(self, questions: Sequence[str], answers: Sequence[Sequence[str]] | None = None,
               marginalization: str = "token", n_docs: int | None = None, num_beams: int = 1,
               decoding: str = "thorough", batch_size: int = 16,
               progress: bool = False) -> list[Prediction]:
        """Generate an answer for each question (:meth:`generate`), with its provenance: the
        retrieved passages and their posterior p(z | x, y) under the generated answer."""
        generated = self.generate(questions, marginalization, n_docs, num_beams, decoding,
                                  batch_size, progress=progress)
        return [Prediction(g.question, g.answer.text,
                           list(answers[i]) if answers is not None else [],
                           [{"id": p.id, "title": p.title, "posterior": float(w)}
                            for p, w in zip(g.passages, g.answer.doc_posterior)])
                for i, g in enumerate(generated)]
