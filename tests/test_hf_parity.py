"""ragbook's RAG against transformers' (the peer), on tiny random models built from configs.

The same generator (``rag_model.generator``), the same generator inputs and the same doc scores
go to both. transformers takes ``labels`` unshifted as the decoder input and scores labels
shifted left, so its labels are ragbook's with the decoder start token in front; it masks
target positions equal to ``pad_token_id``, as ragbook's ``target_mask`` does.
"""

import math
from pathlib import Path

import pytest
import tomllib
import torch
import transformers
import yaml
from packaging.requirements import Requirement
from transformers import (
    BartConfig,
    DPRConfig,
    GenerationConfig,
    RagConfig,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from ragbook import rag
from ragbook.generator import token_logprobs

VOCAB, K, BOS, PAD, EOS = 64, 3, 0, 1, 2
START = EOS  # BART's decoder start token is </s>


class IdsTokenizer:
    """Just enough tokenizer for the decoders: answers as space-separated ids."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def rag_config(n_docs: int = K) -> RagConfig:
    question_encoder = DPRConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, projection_dim=0)
    generator = BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64, pad_token_id=PAD, bos_token_id=BOS,
        eos_token_id=EOS, decoder_start_token_id=START, forced_eos_token_id=None,
        init_std=0.2)  # large enough that the k documents lead to different outputs
    config = RagConfig.from_question_encoder_generator_configs(
        question_encoder, generator, n_docs=n_docs, retrieval_vector_size=16)
    for name in ("bos_token_id", "pad_token_id", "eos_token_id", "decoder_start_token_id"):
        setattr(config, name, getattr(generator, name))  # generate reads them on the RagConfig
    config.vocab_size = VOCAB
    assert config.label_smoothing == 0.0
    return config


def build(cls, seed: int = 0):
    torch.manual_seed(seed)
    return cls(rag_config()).eval()


def contexts(batch: int, length: int = 9, padded: bool = True, seed: int = 0):
    """context_input_ids (batch·K, length) and their mask; some rows right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch * K, length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for row, n in [(1, 5), (K, 7), (batch * K - 1, 3)]:
            ids[row, n:], mask[row, n:] = PAD, 0
    return ids, mask


def targets(rows: list[list[int]]):
    """ragbook's labels (y_1 … y_T, padded) with target_mask, and transformers' labels."""
    width = max(map(len, rows))
    labels = torch.tensor([r + [PAD] * (width - len(r)) for r in rows])
    hf_labels = torch.cat([torch.full((len(rows), 1), START), labels], dim=1)
    return labels, labels != PAD, hf_labels


def max_rel_err(a, b) -> float:
    return ((a - b).abs() / b.abs()).max().item()


ROWS = [[5, 6, 7, 8, 9, EOS], [10, 11, EOS], [12, 13, 14, 15, EOS], [7, EOS]]


@pytest.mark.parametrize("cls, ours", [(RagSequenceForGeneration, rag.rag_sequence_loss),
                                       (RagTokenForGeneration, rag.rag_token_loss)])
def test_losses_and_gradients_match_transformers(cls, ours):
    model = build(cls)
    ids, mask = contexts(len(ROWS))
    labels, target_mask, hf_labels = targets(ROWS)
    doc_scores = (3 * torch.randn(len(ROWS), K, generator=torch.Generator().manual_seed(1)))

    theirs_scores = doc_scores.clone().requires_grad_()
    theirs = model(context_input_ids=ids, context_attention_mask=mask, doc_scores=theirs_scores,
                   labels=hf_labels, reduce_loss=False).loss
    our_scores = doc_scores.clone().requires_grad_()
    mine = ours(token_logprobs(model.generator, ids, mask, labels), target_mask, our_scores)

    assert theirs.shape == mine.shape == (len(ROWS),)
    assert max_rel_err(mine, theirs) < 1e-5
    theirs.sum().backward()
    mine.sum().backward()
    torch.testing.assert_close(our_scores.grad, theirs_scores.grad, rtol=1e-5, atol=1e-6)


def test_the_documents_matter_in_these_tiny_models():
    """Parity is not vacuous: with k > 1 the two peers' marginalizations disagree here."""
    ids, mask = contexts(len(ROWS))
    _, _, hf_labels = targets(ROWS)
    doc_scores = torch.randn(len(ROWS), K)
    seq, tok = (build(cls)(context_input_ids=ids, context_attention_mask=mask,
                           doc_scores=doc_scores, labels=hf_labels).loss
                for cls in (RagSequenceForGeneration, RagTokenForGeneration))
    assert (seq - tok).abs().min() > 1e-4


@pytest.mark.parametrize("first", [BOS, START])
def test_transformers_rag_sequence_drops_the_prior_for_a_one_token_target(first):
    """transformers' RAG-Sequence adds log p(z|x) at target position 1 only.

    For labels ``[BOS, EOS]`` the one scored token is at position 0, so the document prior is
    never added: the loss is −log Σ_z p_θ(EOS | x, z), the same whatever the doc scores (and not
    a likelihood: the k terms are summed without weights). ragbook's Eq. 1 keeps the prior.
    With ``[BOS, 7, EOS]`` the prior lands on position 1 and both agree again.
    """
    model = build(RagSequenceForGeneration)
    ids, mask = contexts(2, padded=False)
    low, high = torch.tensor([[4.0, 0.0, -4.0]] * 2), torch.tensor([[-4.0, 0.0, 4.0]] * 2)

    def hf_loss(labels, doc_scores):
        return model(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores,
                     labels=labels).loss

    one = torch.tensor([[first, EOS]] * 2)
    torch.testing.assert_close(hf_loss(one, low), hf_loss(one, high))

    labels, target_mask = torch.tensor([[EOS]] * 2), torch.ones(2, 1, dtype=torch.bool)
    lp = token_logprobs(model.generator, ids, mask, labels)
    ours_low, ours_high = (rag.rag_sequence_loss(lp, target_mask, s) for s in (low, high))
    assert (ours_low - ours_high).abs().min() > 1e-3
    if first == START:  # same decoder input as ragbook's: transformers' sum has no prior at all
        uniform = rag.rag_sequence_loss(lp, target_mask, torch.zeros(2, K))
        torch.testing.assert_close(hf_loss(one, low), uniform - math.log(K))

    two = torch.tensor([[first, 7, EOS]] * 2)
    assert (hf_loss(two, low) - hf_loss(two, high)).abs().min() > 1e-3
    if first == START:
        labels, target_mask, hf_labels = targets([[7, EOS]] * 2)
        lp = token_logprobs(model.generator, ids, mask, labels)
        for s in (low, high):
            assert max_rel_err(rag.rag_sequence_loss(lp, target_mask, s), hf_loss(two, s)) < 1e-5


def answers_of(sequences: torch.Tensor) -> list[list[int]]:
    """transformers' generated rows ``[start, y_1 …, EOS, PAD …]`` as ragbook's y_1 … EOS."""
    out = []
    for row in sequences.tolist():
        y = row[1:]
        out.append(y[: y.index(EOS) + 1] if EOS in y else y)
    return out


def rag_token_loglik(model, ids, mask, doc_scores, answers: list[list[int]]) -> torch.Tensor:
    """log p(y|x) of each answer under transformers' own RAG-Token loss (Eq. 2)."""
    _, _, hf_labels = targets(answers)
    return -model(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores,
                  labels=hf_labels, reduce_loss=False).loss


def rag_token_case():
    """A tiny RAG-Token whose answers end at varied lengths, some cut at ``max_length``."""
    model = build(RagTokenForGeneration, seed=3)
    model.generator.final_logits_bias[0, EOS] = 1.0  # answers of varied length
    ids, mask = contexts(4, seed=2)
    doc_scores = 2 * torch.randn(4, K, generator=torch.Generator().manual_seed(5))
    return model, ids, mask, doc_scores


@pytest.mark.parametrize("num_beams", [1, 2, 4])
def test_rag_token_decoding_matches_transformers_generate(num_beams):
    """Greedy (num_beams=1) and beam search over the marginal next-token distribution, the
    same search on both sides (``rag.transformers_search``): the same answers, those cut at
    ``max_length`` included, and transformers' beam score is ragbook's, which is exactly the
    answer's log-likelihood under transformers' own RAG-Token loss (Eq. 2).
    """
    model, ids, mask, doc_scores = rag_token_case()
    max_length = 8
    theirs = model.generate(context_input_ids=ids, context_attention_mask=mask,
                            doc_scores=doc_scores, return_dict_in_generate=True,
                            output_scores=True,
                            **rag.transformers_search(num_beams, max_length, EOS))
    ours = rag.rag_token_generate(model.generator, IdsTokenizer(), ids, mask, doc_scores,
                                  num_beams=num_beams, max_length=max_length)
    mine = [a.token_ids for a in ours]
    assert {len(y) == max_length for y in mine} == {True, False}  # some ended early, some not
    assert all(y[-1] == EOS for y in mine)
    assert mine == answers_of(theirs.sequences)
    loglik = rag_token_loglik(model, ids, mask, doc_scores, mine)
    torch.testing.assert_close(torch.tensor([a.score for a in ours]), loglik,
                               rtol=1e-5, atol=1e-5)
    if num_beams > 1:
        torch.testing.assert_close(theirs.sequences_scores, loglik, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("other", [{"length_penalty": 1.0},
                                   {"forced_eos_token_id": EOS, "logits_processor": None}])
def test_the_parity_case_tells_another_search_apart(other):
    """The case above fails the parity test if the peer runs another search: transformers'
    default length normalisation (``length_penalty=1.0``: score / length), or its own forced end
    token, which counts log 1 at ``max_length``, changes the winner of at least one question."""
    model, ids, mask, doc_scores = rag_token_case()
    theirs = model.generate(context_input_ids=ids, context_attention_mask=mask,
                            doc_scores=doc_scores, **rag.transformers_search(4, 8, EOS) | other)
    ours = rag.rag_token_generate(model.generator, IdsTokenizer(), ids, mask, doc_scores,
                                  num_beams=4, max_length=8)
    assert [a.token_ids for a in ours] != answers_of(theirs)


@pytest.mark.parametrize("num_beams", [1, 2])
def test_thorough_decoding_matches_transformers_rag_sequence_generate(num_beams):
    """Thorough decoding against ``RagSequenceForGeneration.generate`` (which has no Fast).

    transformers generates each document's beam with ``attention_mask=None``, so the inputs
    here are unpadded and of equal length. It scores the candidates with its own RAG-Sequence
    loss, whose prior sits at target position 1, and drops the first token's score when every
    candidate starts with BOS: no BOS and no early end (both biased away) keep every candidate
    ``max_length`` tokens long, the last one the end token that both put there
    (``rag.transformers_search``), where its loss is Eq. 1.
    """
    model = build(RagSequenceForGeneration, seed=4)
    model.generator.final_logits_bias[0, BOS] = -1e4
    model.generator.final_logits_bias[0, EOS] = -8.0  # never chosen, yet forced at the end
    ids, mask = contexts(3, padded=False, seed=6)
    doc_scores = torch.randn(3, K, generator=torch.Generator().manual_seed(7))
    max_length = 5
    theirs = model.generate(context_input_ids=ids, context_attention_mask=mask,
                            doc_scores=doc_scores,
                            **rag.transformers_search(num_beams, max_length, EOS))
    ours = rag.rag_sequence_generate(model.generator, IdsTokenizer(), ids, mask, doc_scores,
                                     num_beams=num_beams, max_length=max_length)
    assert [a.token_ids for a in ours] == answers_of(theirs)
    assert all(len(a.token_ids) == max_length and a.token_ids[-1] == EOS for a in ours)
    # and its score is Eq. 1 as transformers computes it (both at their best hypothesis)
    labels, target_mask, hf_labels = targets([a.token_ids for a in ours])
    hf_loss = model(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores,
                    labels=hf_labels).loss
    torch.testing.assert_close(torch.tensor([a.score for a in ours]), -hf_loss,
                               rtol=1e-5, atol=1e-5)


def test_the_course_helper_wraps_the_same_generator():
    """``rag.transformers_rag`` (used by the notebooks and the benchmark) builds the peer
    around ragbook's own generator object."""
    generator = build(RagTokenForGeneration).generator
    ids, mask = contexts(len(ROWS))
    labels, target_mask, hf_labels = targets(ROWS)
    doc_scores = torch.randn(len(ROWS), K)
    lp = token_logprobs(generator, ids, mask, labels)
    for name, ours in (("sequence", rag.rag_sequence_loss), ("token", rag.rag_token_loss)):
        peer = rag.transformers_rag(generator, K, name)
        assert peer.generator is generator and not peer.training
        theirs = peer(context_input_ids=ids, context_attention_mask=mask, doc_scores=doc_scores,
                      labels=hf_labels).loss
        assert max_rel_err(ours(lp, target_mask, doc_scores), theirs) < 1e-5


def test_transformers_is_a_version_these_tests_ran_against():
    """The peer's generation flags change between transformers releases (5.25 began to ignore
    ``length_penalty`` and ``early_stopping`` wherever they do not apply): pyproject.toml and
    environment.yml pin the range the parity tests above were run against, upper bound
    included, and the installed version must be inside it."""
    root = Path(__file__).resolve().parents[1]
    pins = [r for r in tomllib.loads((root / "pyproject.toml").read_text())["project"][
        "dependencies"] if Requirement(r).name == "transformers"]
    conda = [d for d in yaml.safe_load((root / "environment.yml").read_text())["dependencies"]
             if isinstance(d, str) and Requirement(d).name == "transformers"]
    assert len(pins) == 1 and conda == pins
    spec = Requirement(pins[0]).specifier
    assert any(s.operator in ("<", "<=", "==", "~=") for s in spec)  # an upper bound
    assert spec.contains(transformers.__version__), (transformers.__version__, str(spec))


def test_the_peer_search_is_checked_strictly():
    """``rag.transformers_search`` validates its flags strictly: a flag that the installed
    transformers would ignore raises instead of warning ("not valid and may be ignored").
    This version's strict check does refuse the beam-only flags in greedy search."""
    for num_beams in (1, 4):
        flags = rag.transformers_search(num_beams, 8, EOS)
        assert flags["num_beams"] == num_beams and flags["max_length"] == 9
        assert ("length_penalty" in flags) == (num_beams > 1)
    with pytest.raises(ValueError, match="length_penalty"):
        GenerationConfig(num_beams=1, length_penalty=0.0).validate(strict=True)
