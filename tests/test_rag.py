"""Eq. 1 and Eq. 2, the document posterior and both decoders, on hand-made numbers."""

import copy
import itertools
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import BartConfig, BartForConditionalGeneration

from ragbook import rag

BOS, PAD, EOS = 0, 1, 2
A, B, C, D = 3, 4, 5, 6  # four answer tokens


def random_case(batch=3, k=4, T=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logprobs = torch.rand(batch, k, T, generator=g, dtype=dtype).log()  # log p ∈ (−∞, 0)
    lengths = torch.tensor([T, 1, max(T - 2, 1)])[:batch]
    mask = torch.arange(T) < lengths[:, None]
    doc_scores = torch.randn(batch, k, generator=g, dtype=dtype)
    return logprobs, mask, doc_scores


# --------------------------------------------------------------------------- marginalizations


def test_the_two_losses_coincide_for_one_document():
    logprobs, mask, _ = random_case(k=1)
    scores = torch.randn(3, 1, dtype=torch.float64)
    expected = -(logprobs[:, 0] * mask).sum(-1)  # p_η(z|x) = 1: plain −log p_θ(y|x,z)
    torch.testing.assert_close(rag.rag_sequence_loss(logprobs, mask, scores), expected)
    torch.testing.assert_close(rag.rag_token_loss(logprobs, mask, scores), expected)


def test_the_two_losses_coincide_for_a_one_token_target():
    logprobs, _, scores = random_case(T=1)
    mask = torch.ones(3, 1, dtype=torch.bool)
    torch.testing.assert_close(rag.rag_sequence_loss(logprobs, mask, scores),
                               rag.rag_token_loss(logprobs, mask, scores))


def brute_force(logprobs, mask, doc_scores):
    """Eq. 1 and Eq. 2 with probabilities and loops. RAG-Token as a latent document per token:
    Π_i Σ_z p(z) p_i(z) = Σ over all k^T choices (z_1 … z_T) of Π_i p(z_i) p_i(z_i)."""
    seq, tok = [], []
    for lp, m, s in zip(logprobs.tolist(), mask.tolist(), doc_scores.tolist()):
        prior = [math.exp(v) / sum(math.exp(u) for u in s) for v in s]
        positions = [i for i, keep in enumerate(m) if keep]
        p_seq = sum(prior[z] * math.prod(math.exp(lp[z][i]) for i in positions)
                    for z in range(len(s)))
        p_tok = sum(math.prod(prior[z] * math.exp(lp[z][i]) for z, i in zip(zs, positions))
                    for zs in itertools.product(range(len(s)), repeat=len(positions)))
        seq.append(-math.log(p_seq))
        tok.append(-math.log(p_tok))
    return torch.tensor(seq, dtype=torch.float64), torch.tensor(tok, dtype=torch.float64)


def test_losses_equal_a_brute_force_enumeration():
    logprobs, mask, scores = random_case(k=3, T=4)
    seq, tok = brute_force(logprobs, mask, scores)
    torch.testing.assert_close(rag.rag_sequence_loss(logprobs, mask, scores), seq)
    torch.testing.assert_close(rag.rag_token_loss(logprobs, mask, scores), tok)


def test_padding_changes_nothing():
    logprobs, mask, scores = random_case(dtype=torch.float32)
    logprobs.requires_grad_()
    extra = torch.tensor([float("-inf"), 3.0, -1e30]).expand(3, 4, 3)  # garbage where masked
    padded = torch.cat([logprobs, extra], dim=-1)
    padded_mask = torch.cat([mask, torch.zeros(3, 3, dtype=torch.bool)], dim=-1)
    for loss in (rag.rag_sequence_loss, rag.rag_token_loss):
        torch.testing.assert_close(loss(padded, padded_mask, scores), loss(logprobs, mask, scores))
    torch.testing.assert_close(rag.doc_posterior(padded, padded_mask, scores),
                               rag.doc_posterior(logprobs, mask, scores))
    torch.testing.assert_close(rag.doc_posterior(padded, padded_mask, scores, per_token=True)
                               [..., :5], rag.doc_posterior(logprobs, mask, scores, True))
    padded.retain_grad()
    (rag.rag_sequence_loss(padded, padded_mask, scores).sum()
     + rag.rag_token_loss(padded, padded_mask, scores).sum()).backward()
    assert torch.isfinite(padded.grad).all()
    assert (padded.grad[~padded_mask[:, None].expand_as(padded)] == 0).all()


def test_log_space_survives_what_probabilities_cannot():
    """Per-token log p = −400 under every document: Π_i p underflows float32 to 0 at once."""
    T, k = 6, 5
    logprobs = torch.full((1, k, T), -400.0)
    mask = torch.ones(1, T, dtype=torch.bool)
    scores = torch.randn(1, k)
    assert logprobs.exp().prod(-1).sum() == 0  # the naive computation gives log 0
    for loss in (rag.rag_sequence_loss, rag.rag_token_loss):
        torch.testing.assert_close(loss(logprobs, mask, scores), torch.tensor([400.0 * T]))


def test_posteriors_sum_to_one_and_follow_bayes():
    logprobs, mask, scores = random_case()
    seq = rag.doc_posterior(logprobs, mask, scores)
    tok = rag.doc_posterior(logprobs, mask, scores, per_token=True)
    assert seq.shape == (3, 4) and tok.shape == (3, 4, 5)
    torch.testing.assert_close(seq.sum(1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(tok.sum(1), torch.ones(3, 5, dtype=torch.float64))
    prior = scores.softmax(-1)
    likelihood = (logprobs * mask[:, None]).sum(-1).exp()  # p_θ(y|x,z)
    torch.testing.assert_close(seq, prior * likelihood / (prior * likelihood).sum(1, keepdim=True))
    joint = prior[..., None] * logprobs.exp()
    bayes = joint / joint.sum(1, keepdim=True)
    torch.testing.assert_close(tok[mask[:, None].expand_as(tok)],
                               bayes[mask[:, None].expand_as(tok)])
    torch.testing.assert_close(tok[1, :, 1:], prior[1, :, None].expand(4, 4))  # padding: prior


def test_posterior_departure_is_the_total_variation_from_the_prior():
    doc_scores = torch.tensor([0.0, 0.0])  # prior ½, ½
    posterior = torch.tensor([[0.5, 1.0, 0.0], [0.5, 0.0, 1.0]])  # (k, T)
    assert rag.posterior_departure(posterior, doc_scores).tolist() == [0.0, 0.5, 0.5]
    logprobs, mask, scores = random_case(batch=1, k=4, T=5)
    per_token = rag.doc_posterior(logprobs, mask, scores, per_token=True)[0]
    moved = rag.posterior_departure(per_token, scores[0])
    assert ((moved >= 0) & (moved <= 1)).all() and moved[-1] > 0


def test_gradients_reach_doc_scores_and_token_logprobs():
    logprobs, mask, scores = random_case(dtype=torch.float32)
    for loss in (rag.rag_sequence_loss, rag.rag_token_loss):
        lp, s = logprobs.clone().requires_grad_(), scores.clone().requires_grad_()
        loss(lp, mask, s).sum().backward()
        assert s.grad.abs().sum() > 0 and lp.grad[mask[:, None].expand_as(lp)].abs().min() > 0
        torch.testing.assert_close(s.grad.sum(-1), torch.zeros(3))  # softmax: shifts cancel
    # RAG-Sequence: ∂loss/∂doc_scores = prior − posterior (the retriever learns the posterior)
    s = scores.clone().requires_grad_()
    rag.rag_sequence_loss(logprobs, mask, s).sum().backward()
    torch.testing.assert_close(s.grad, scores.softmax(-1) - rag.doc_posterior(logprobs, mask,
                                                                              scores))


# --------------------------------------------------------------------------- decoding


class IdsTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(i) for i in ids if not (skip_special_tokens and i in (BOS, PAD, EOS)))


class FirstTokenGenerator(torch.nn.Module):
    """A hand-made generator: under document z the first answer token is drawn from row z of
    ``first`` (probabilities), then the answer surely ends. Its "encoder" reads the document's
    number from the first input token. It speaks the seq2seq interface the decoders use."""

    def __init__(self, first: list[list[float]], vocab: int = 8):
        super().__init__()
        table = torch.full((len(first), vocab), 1e-9)
        table[:, A:A + len(first[0])] = torch.tensor(first)
        self.first = (table / table.sum(-1, keepdim=True)).log()
        self.end = torch.full((vocab,), -1e4).index_fill(0, torch.tensor(EOS), 0.0)
        self.config = SimpleNamespace(decoder_start_token_id=EOS, eos_token_id=EOS,
                                      pad_token_id=PAD, is_encoder_decoder=True)

    def get_encoder(self):
        return lambda input_ids, attention_mask: SimpleNamespace(
            last_hidden_state=input_ids[:, :, None].float())

    def forward(self, encoder_outputs, attention_mask, decoder_input_ids, cache=None,
                use_cache=False):
        doc = encoder_outputs.last_hidden_state[:, 0, 0].long()
        start = getattr(cache, "length", 0)  # the decoders start with an empty cache
        n, t = decoder_input_ids.shape
        position = torch.arange(start, start + t)[None, :, None]
        logits = torch.where(position == 0, self.first[doc][:, None], self.end)
        keep = SimpleNamespace(reorder_cache=lambda i: None)  # a cache of nothing
        cache = SimpleNamespace(length=start + t, self_attention_cache=keep,
                                cross_attention_cache=keep)
        return SimpleNamespace(logits=logits, cache=cache)


def docs(n):
    ids = torch.arange(n).view(n, 1)
    return ids, torch.ones_like(ids)


# Two equally likely documents. Under z1 the answer is A (0.45) or B (0.29) or C (0.25); under
# z2 it is C (0.44) or D (0.35) or A (0.20). Marginally (Eq. 1 = Eq. 2 for one token):
# p(A) = 0.325, p(B) = 0.15, p(C) = 0.345, p(D) = 0.18.
TABLE = [[0.45, 0.29, 0.25, 0.01], [0.20, 0.01, 0.44, 0.35]]
EQUAL = torch.zeros(1, 2)


def test_fast_and_thorough_disagree_when_beams_miss_hypotheses():
    """Two beams per document: C is in z2's beam but not z1's, and Fast counts its probability
    under z1 as 0. Fast: p(A) ≈ 0.5·0.45 = 0.225 > p(C) ≈ 0.5·0.44 = 0.22. Thorough scores A
    and C under both documents and finds C (0.345 > 0.325)."""
    model = FirstTokenGenerator(TABLE)
    ids, mask = docs(2)
    fast, = rag.rag_sequence_generate(model, IdsTokenizer(), ids, mask, EQUAL, num_beams=2,
                                      method="fast")
    thorough, = rag.rag_sequence_generate(model, IdsTokenizer(), ids, mask, EQUAL, num_beams=2,
                                          method="thorough")
    assert fast.token_ids == [A, EOS] and thorough.token_ids == [C, EOS]
    assert fast.score == pytest.approx(math.log(0.5 * 0.45), abs=1e-5)
    assert thorough.score == pytest.approx(math.log(0.345), abs=1e-5)
    torch.testing.assert_close(fast.doc_posterior, torch.tensor([1.0, 0.0]))  # seen only by z1
    torch.testing.assert_close(thorough.doc_posterior, torch.tensor([0.25, 0.44]) / 0.69)
    assert thorough.text == str(C) and thorough.token_posterior is None


def test_fast_and_thorough_agree_when_every_beam_holds_every_hypothesis():
    model = FirstTokenGenerator(TABLE)
    ids, mask = docs(2)
    fast, thorough = (rag.rag_sequence_generate(model, IdsTokenizer(), ids, mask, EQUAL,
                                                num_beams=4, method=m)[0]
                      for m in ("fast", "thorough"))
    assert fast.token_ids == thorough.token_ids == [C, EOS]
    assert fast.score == pytest.approx(thorough.score, abs=1e-6)
    torch.testing.assert_close(fast.doc_posterior, thorough.doc_posterior)


def test_rag_token_decodes_the_marginal_and_explains_each_token():
    model = FirstTokenGenerator(TABLE)
    ids, mask = docs(2)
    for beams in (1, 3):
        answer, = rag.rag_token_generate(model, IdsTokenizer(), ids, mask, EQUAL,
                                         num_beams=beams)
        assert answer.token_ids == [C, EOS]
        assert answer.score == pytest.approx(math.log(0.345), abs=1e-5)
        torch.testing.assert_close(answer.token_posterior[:, 0], torch.tensor([0.25, 0.44]) / 0.69)
        torch.testing.assert_close(answer.token_posterior[:, 1], torch.tensor([0.5, 0.5]))
        torch.testing.assert_close(answer.doc_posterior, answer.token_posterior.mean(-1))


def test_the_prior_decides_between_documents():
    """A retriever sure of z1 makes both models answer from z1 alone."""
    model = FirstTokenGenerator(TABLE)
    ids, mask = docs(2)
    sure = torch.tensor([[10.0, -10.0]])
    token, = rag.rag_token_generate(model, IdsTokenizer(), ids, mask, sure, num_beams=1)
    sequence, = rag.rag_sequence_generate(model, IdsTokenizer(), ids, mask, sure, num_beams=1)
    assert token.token_ids == sequence.token_ids == [A, EOS]


def test_bad_decoding_arguments_are_refused():
    ids, mask = docs(2)
    with pytest.raises(ValueError, match="thorough"):
        rag.rag_sequence_generate(FirstTokenGenerator(TABLE), IdsTokenizer(), ids, mask, EQUAL,
                                  method="exhaustive")
    with pytest.raises(ValueError, match="max_length"):
        rag.rag_token_generate(FirstTokenGenerator(TABLE), IdsTokenizer(), ids, mask, EQUAL,
                               max_length=0)


@pytest.fixture(scope="module")
def bart():
    torch.manual_seed(0)
    config = BartConfig(vocab_size=48, d_model=32, encoder_layers=1, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
                        decoder_start_token_id=EOS, forced_eos_token_id=None, init_std=0.2)
    model = BartForConditionalGeneration(config)
    model.final_logits_bias[0, EOS] = 1.0
    return model


def bart_inputs(batch, k, seed=0, same_docs=False):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 48, (batch, 1 if same_docs else k, 8), generator=g)
    ids = ids.expand(batch, k, 8).reshape(batch * k, 8)
    mask = torch.ones_like(ids)
    ids, mask = ids.clone(), mask.clone()
    ids[1, 6:], mask[1, 6:] = PAD, 0
    return ids, mask, torch.randn(batch, k, generator=g)


def test_fast_is_a_lower_bound_on_thorough(bart):
    ids, mask, scores = bart_inputs(4, 3)
    fast = rag.rag_sequence_generate(bart, IdsTokenizer(), ids, mask, scores, num_beams=2,
                                     max_length=6, method="fast")
    thorough = rag.rag_sequence_generate(bart, IdsTokenizer(), ids, mask, scores, num_beams=2,
                                         max_length=6, method="thorough")
    for f, t in zip(fast, thorough):
        assert f.score <= t.score + 1e-5
        assert f.doc_posterior.sum().item() == pytest.approx(1.0, abs=1e-5)
        assert t.doc_posterior.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_scoring_in_passes_cut_to_their_labels_changes_nothing(bart, monkeypatch):
    """rag._score in passes of one label each, cut to its own length, gives the log-probs of
    one full-width teacher-forced pass (generator.token_logprobs) wherever a label has a token."""
    from ragbook.generator import token_logprobs

    ids, mask, _ = bart_inputs(3, 2)
    labels = torch.tensor([[5, 6, 7, EOS], [8, EOS, PAD, PAD], [9, 10, EOS, PAD]])
    target_mask = labels != PAD
    rows = torch.arange(6).view(3, 2)
    with torch.no_grad(), rag._eval_mode(bart):
        hidden = rag._encode(bart, ids, mask)
        monkeypatch.setattr(rag, "SCORE_TOKENS", 1)
        one_by_one = rag._score(bart, hidden, mask, rows, labels, target_mask)
        full = token_logprobs(bart, ids, mask, labels)
    torch.testing.assert_close(one_by_one[target_mask[:, None].expand_as(full)],
                               full[target_mask[:, None].expand_as(full)], atol=1e-5, rtol=0)
    assert (one_by_one[~target_mask[:, None].expand_as(full)] == 0).all()


def test_fast_equals_thorough_when_all_documents_are_the_same(bart):
    ids, mask, scores = bart_inputs(3, 3, same_docs=True)
    mask[1], ids[1] = mask[0], ids[0]
    fast, thorough = (rag.rag_sequence_generate(bart, IdsTokenizer(), ids, mask, scores,
                                                num_beams=3, max_length=6, method=m)
                      for m in ("fast", "thorough"))
    for f, t in zip(fast, thorough):
        assert f.token_ids == t.token_ids
        assert f.score == pytest.approx(t.score, abs=1e-4)


def test_one_document_is_plain_beam_search_and_the_mode_is_restored(bart):
    """k = 1: RAG-Token, RAG-Sequence and BART's own generate give the same answers."""
    ids, mask, _ = bart_inputs(4, 1, seed=3)
    scores = torch.zeros(4, 1)
    for beams in (1, 3):
        bart.eval()
        rows = bart.generate(input_ids=ids, attention_mask=mask,
                             **rag.transformers_search(beams, 6, EOS)).tolist()
        theirs = [y[: y.index(EOS) + 1] for y in (r[1:] for r in rows)]
        bart.train()
        token = rag.rag_token_generate(bart, IdsTokenizer(), ids, mask, scores, num_beams=beams,
                                       max_length=6)
        sequence = rag.rag_sequence_generate(bart, IdsTokenizer(), ids, mask, scores,
                                             num_beams=beams, max_length=6)
        assert bart.training
        ours = [a.token_ids for a in token]
        assert ours == [a.token_ids for a in sequence]
        assert ours == theirs
        assert {len(y) == 6 for y in ours} == {True, False}  # some cut at max_length, some not
        for t, s in zip(token, sequence):
            assert t.score == pytest.approx(s.score, abs=1e-5)


def no_end_token(model):
    """A copy of ``model`` that never chooses to end an answer."""
    model = copy.deepcopy(model)
    model.final_logits_bias[0, EOS] = -30.0
    return model


@pytest.mark.parametrize("max_length", [1, 5])
def test_an_answer_at_max_length_ends_with_the_end_token(bart, max_length):
    """``max_length`` counts the end token, as ``generator.encode_targets`` counts a training
    target's: an answer cut there is y_1 … y_{max_length−1} </s>, the longest target training
    makes, and its score includes log p(</s>)."""
    model = no_end_token(bart)
    ids, mask, scores = bart_inputs(2, 3)
    for beams in (1, 3):
        token = rag.rag_token_generate(model, IdsTokenizer(), ids, mask, scores,
                                       num_beams=beams, max_length=max_length)
        answers = token + [a for method in ("thorough", "fast") for a in rag.rag_sequence_generate(
            model, IdsTokenizer(), ids, mask, scores, num_beams=beams, max_length=max_length,
            method=method)]
        assert all(len(a.token_ids) == max_length and a.token_ids[-1] == EOS for a in answers)
        assert all(a.score < -25.0 for a in answers)  # the forced </s> is paid for


def test_a_document_of_score_minus_infinity_weighs_nothing(bart):
    """A slot with no passage (an approximate index found fewer than k) has doc score −inf:
    both decoders then answer as if it were not there, and give it posterior 0."""
    ids, mask, scores = bart_inputs(1, 3, seed=1)
    missing = scores.clone()
    missing[0, 2] = -torch.inf
    decoders = [(rag.rag_token_generate, {}), (rag.rag_sequence_generate, {"method": "thorough"}),
                (rag.rag_sequence_generate, {"method": "fast"})]
    for decode, kw in decoders:
        with_slot, = decode(bart, IdsTokenizer(), ids, mask, missing, num_beams=2, max_length=6,
                            **kw)
        without, = decode(bart, IdsTokenizer(), ids[:2], mask[:2], scores[:, :2], num_beams=2,
                          max_length=6, **kw)
        assert with_slot.token_ids == without.token_ids
        assert with_slot.score == pytest.approx(without.score, abs=1e-5)
        assert with_slot.doc_posterior[2] == 0
        torch.testing.assert_close(with_slot.doc_posterior[:2], without.doc_posterior)


def test_decoding_raises_no_deprecation_warning(bart):
    """The decoders hand transformers a Cache object under the keyword its forward takes:
    no FutureWarning (``past_key_values`` is deprecated in transformers 5) nor
    DeprecationWarning."""
    ids, mask, scores = bart_inputs(2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rag.rag_token_generate(bart, IdsTokenizer(), ids, mask, scores, num_beams=2,
                               max_length=4)
        for method in ("thorough", "fast"):
            rag.rag_sequence_generate(bart, IdsTokenizer(), ids, mask, scores, num_beams=2,
                                      max_length=4, method=method)
    assert not [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]


class OldCacheKeyword(FirstTokenGenerator):
    """The same generator under the cache keyword of transformers before 5: ``past_key_values``
    (had the decoders passed ``cache``, this forward would have refused it)."""

    def forward(self, encoder_outputs, attention_mask, decoder_input_ids, past_key_values=None,
                use_cache=False):
        out = super().forward(encoder_outputs, attention_mask, decoder_input_ids,
                              past_key_values, use_cache)
        return SimpleNamespace(logits=out.logits, past_key_values=out.cache)


def test_the_cache_keyword_is_the_one_the_generator_takes():
    ids, mask = docs(2)
    for decode in (rag.rag_token_generate, rag.rag_sequence_generate):
        new, old = (decode(model, IdsTokenizer(), ids, mask, EQUAL, num_beams=2)[0]
                    for model in (FirstTokenGenerator(TABLE), OldCacheKeyword(TABLE)))
        assert new.token_ids == old.token_ids and new.score == pytest.approx(old.score)


@pytest.mark.parametrize("beams", [1, 3])
def test_a_batch_decodes_as_its_questions_alone(bart, beams):
    """Questions leave the batch as they finish: every question gets the answer it gets
    alone."""
    ids, mask, scores = bart_inputs(4, 3, seed=2)
    alone = [rag.rag_token_generate(bart, IdsTokenizer(), ids[3 * q:3 * q + 3],
                                    mask[3 * q:3 * q + 3], scores[q:q + 1], num_beams=beams,
                                    max_length=6)[0].token_ids for q in range(4)]
    batch = rag.rag_token_generate(bart, IdsTokenizer(), ids, mask, scores, num_beams=beams,
                                   max_length=6)
    assert [a.token_ids for a in batch] == alone
    assert len({len(y) for y in alone}) > 1  # they finish at different steps


@pytest.mark.parametrize("beams", [1, 3])
def test_the_last_questions_of_a_batch_may_finish_first(bart, beams):
    """Longest answer first, shortest last: every question that finishes is then the last one
    still in the batch, and the rows that remain are a prefix of the batch's. The caches must
    still follow them (greedy decoding once took that prefix for "nothing moved", kept the
    finished rows in the self-attention cache and fed 3 rows against 6 at the next step)."""
    n = 6
    ids, mask, scores = bart_inputs(n, 3, seed=2)
    alone = [rag.rag_token_generate(bart, IdsTokenizer(), ids[3 * q:3 * q + 3],
                                    mask[3 * q:3 * q + 3], scores[q:q + 1], num_beams=beams,
                                    max_length=6)[0].token_ids for q in range(n)]
    order = sorted(range(n), key=lambda q: -len(alone[q]))
    assert len(alone[order[0]]) > len(alone[order[-1]])  # the last one finishes first
    rows = torch.tensor([3 * q + r for q in order for r in range(3)])
    batch = rag.rag_token_generate(bart, IdsTokenizer(), ids[rows], mask[rows], scores[order],
                                   num_beams=beams, max_length=6)
    assert [a.token_ids for a in batch] == [alone[q] for q in order]
