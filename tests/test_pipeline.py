"""RagModel, joint training (train_rag) and the evaluation experiments, on a toy RAG.

Every part is tiny, random and built here: a 2-layer BERT (BERT_q = BERT_d) saved with
``save_pretrained``, a 1-layer BART with a BPE vocabulary trained on the toy corpus, and a flat
DenseIndex over 20 passages of 10 invented towns. No MiniLM, no built-in corpus, no shipped
weights. The CUDA variants skip without a GPU.
"""

import copy
import dataclasses
import json
import math
import os
import re
import signal
import sys
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch
from transformers import BartForConditionalGeneration, BertConfig, BertModel, BertTokenizer

from ragbook import pipeline, rag
from ragbook import train as T
from ragbook.config import Preset
from ragbook.data import Example, Passage
from ragbook.evaluate import (
    edit_facts,
    edit_spans,
    edited_corpus,
    evaluate_rag,
    extract_span,
    extracted_answers,
    f1_score,
    hot_swap,
    k_sweep,
    span_edited_corpus,
)
from ragbook.generator import encode_inputs, encode_targets, tiny_config, token_logprobs
from ragbook.generator import train_tokenizer as train_bpe
from ragbook.index import DenseIndex
from ragbook.pipeline import Prediction, RagModel, exact_match
from ragbook.retriever import BM25Retriever, Encoder

TOWNS = ["Alpha", "Bravo", "Charlie", "Delta", "Echo", "Foxtrot", "Golf", "Hotel", "India",
         "Juliet"]
COLOURS = ["red", "blue", "green", "white", "black", "grey", "pink", "gold", "brown", "violet"]
ANIMALS = ["fox", "owl", "frog", "swan", "bear", "wolf", "crab", "lion", "mole", "hare"]
RIVERS = ["Nile", "Rhine", "Volga", "Seine", "Po", "Ebro", "Tagus", "Oder", "Elbe", "Loire"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
K = 3  # documents per question in most tests
SCALE = 20.0


def _world() -> tuple[list[Passage], list[Example]]:
    """Two passages per town, one question per passage, answered by the town's name."""
    passages, examples = [], []
    for i, town in enumerate(TOWNS):
        facts = [f"the {COLOURS[i]} {ANIMALS[i]}", f"the river {RIVERS[i]}"]
        for j, fact in enumerate(facts):
            passages.append(Passage(f"{town}::{j}", town, f"{town} is the home of {fact}."))
            examples.append(Example(f"Which town is the home of {fact}?", [town], town))
    return passages, examples


CORPUS, EXAMPLES = _world()
# reading-QA questions about the toy world: an article's description, then the blanked clue
READING = [Example(f"A town: the home of the _____ {ANIMALS[i]}.", [COLOURS[i]], town)
           for i, town in enumerate(TOWNS)]
KEYS = {e.question: e.question.split("home of ")[1][:-1] for e in EXAMPLES}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    bert = tmp_path_factory.mktemp("toy-bert")
    texts = [p.text for p in CORPUS] + [e.question for e in EXAMPLES]
    words = sorted({w.strip(".?").lower() for t in texts for w in t.split()})
    (bert / "vocab.txt").write_text("\n".join(SPECIAL + words + [".", "?"]) + "\n")
    BertTokenizer(vocab=str(bert / "vocab.txt")).save_pretrained(bert)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(SPECIAL) + len(words) + 2, hidden_size=16,
                                 num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                                 max_position_embeddings=64))
    with torch.no_grad():  # let the words, not their positions, decide q(x) and d(z)
        model.embeddings.position_embeddings.weight.zero_()
        model.embeddings.token_type_embeddings.weight.zero_()
        for layer in model.encoder.layer:
            layer.attention.output.dense.weight.mul_(0.1)
            layer.output.dense.weight.mul_(0.1)
    model.save_pretrained(bert)
    preset = Preset(name="toy", query_encoder=str(bert), doc_encoder=str(bert),
                    generator="toy-bart", pooling="mean", normalize=True, score_scale=SCALE,
                    max_query_length=16, max_passage_length=24, max_source_length=40,
                    max_target_length=8, n_docs=K)
    encoder = Encoder(str(bert), pooling="mean", normalize=True, max_length=16)
    doc_encoder = Encoder(str(bert), pooling="mean", normalize=True, max_length=24)
    vectors = doc_encoder.encode_passages(CORPUS, progress=False)
    index = DenseIndex.build(vectors, CORPUS, metadata={"encoder": str(bert), "pooling": "mean",
                                                        "normalize": True}, progress=False)
    tokenizer = train_bpe(texts + TOWNS, vocab_size=400)
    config = tiny_config(tokenizer, d_model=32, layers=1)
    config.init_std = 0.3  # at BART's 0.02 a random generator ignores its input document
    torch.manual_seed(0)
    generator = BartForConditionalGeneration(config)
    return SimpleNamespace(preset=preset, encoder=encoder, doc_encoder=doc_encoder,
                           vectors=vectors, index=index, tokenizer=tokenizer,
                           generator=generator, bm25=BM25Retriever(CORPUS))


def _model(toy, retriever: str = "dense", dropout: float = 0.1) -> RagModel:
    """A fresh RagModel with the same initial weights every time."""
    generator, query_encoder = copy.deepcopy(toy.generator), copy.deepcopy(toy.encoder)
    for module in [*generator.modules(), *query_encoder.modules()]:
        if isinstance(module, torch.nn.Dropout):  # BERT
            module.p = dropout
        for name in ("dropout", "activation_dropout"):  # BART keeps its rates as floats
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, dropout)
    if retriever == "bm25":
        return RagModel(toy.preset, query_encoder, generator, toy.tokenizer, None,
                        bm25=toy.bm25)
    return RagModel(toy.preset, query_encoder, generator, toy.tokenizer, toy.index, toy.vectors,
                    bm25=toy.bm25 if retriever == "hybrid" else None)


def _cfg(**overrides) -> T.RagTrainConfig:
    base = dict(n_docs=K, steps=8, batch_size=4, lr=3e-3, query_lr=1e-3, warmup=2,
                checkpoint_every=3, seed=0)
    return T.RagTrainConfig(**{**base, **overrides})


def _ctrl_c_at_step(model, step: int):
    """``model`` whose loss raises KeyboardInterrupt in the forward pass of ``step``."""
    loss, calls = model.loss, []

    def interrupted_loss(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt
        return loss(*args, **kwargs)

    model.loss = interrupted_loss
    return model


def _snapshot(module) -> dict:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _eval_loss(model, marginalization: str = "token") -> float:
    with torch.no_grad():
        return model.eval().loss(EXAMPLES, marginalization, K, train_retriever=False).mean().item()


# --------------------------------------------------------------------------- retrieval and loss


def test_doc_scores_are_the_scaled_inner_products_of_the_stored_vectors(toy):
    model = _model(toy).eval()
    questions = [e.question for e in EXAMPLES[:5]]
    found = model.retrieve(questions, K, grad=True)
    q = toy.encoder(questions).detach().numpy()
    search = toy.index.search(q, K)
    assert [[p.id for p in row] for row in found.passages] == search.ids
    expected = SCALE * torch.einsum("bd,bkd->bk", torch.from_numpy(q),
                                    torch.from_numpy(toy.vectors[search.indices]))
    torch.testing.assert_close(found.doc_scores.detach(), expected)
    torch.testing.assert_close(found.doc_scores.detach(), SCALE * torch.from_numpy(search.scores))
    assert found.doc_scores.shape == (5, K) and found.doc_scores.requires_grad
    assert (found.doc_scores.diff(dim=1) <= 1e-5).all()  # best first
    assert not model.retrieve(questions, K).doc_scores.requires_grad


@pytest.mark.parametrize("marginalization", ["token", "sequence"])
def test_loss_equals_the_hand_assembled_computation(toy, marginalization):
    model = _model(toy).eval()
    batch = EXAMPLES[:4]
    questions = [e.question for e in batch]
    q = toy.encoder(questions)  # retrieve → doc_scores from the stored d(z)
    found = toy.index.search(q.detach().numpy(), K)
    doc_scores = SCALE * torch.einsum("bd,bkd->bk", q, torch.from_numpy(toy.vectors[found.indices]))
    inputs = encode_inputs(toy.tokenizer, [p for row in found.passages for p in row],
                           [x for x in questions for _ in range(K)], 40)
    targets = encode_targets(toy.tokenizer, [e.answers[0] for e in batch], 8)
    logprobs = token_logprobs(model.generator, inputs["input_ids"], inputs["attention_mask"],
                              targets["labels"])
    marginalize = {"token": rag.rag_token_loss, "sequence": rag.rag_sequence_loss}[marginalization]
    expected = marginalize(logprobs, targets["target_mask"], doc_scores)

    got = model.loss(batch, marginalization, n_docs=K)
    assert got.shape == (4,) and (got > 0).all()
    torch.testing.assert_close(got, expected)
    other = "sequence" if marginalization == "token" else "token"
    assert not torch.allclose(got, model.loss(batch, other, n_docs=K))  # the switch matters


def test_the_gold_table_is_what_both_losses_are_computed_from(toy):
    model = _model(toy).eval()
    with torch.no_grad():
        table = model.gold_table(EXAMPLES[:4], n_docs=K)
        seq, tok = table.losses()
        assert table.token_logprobs.shape[:2] == (4, K) and len(table.passages) == 4
        torch.testing.assert_close(seq, model.loss(EXAMPLES[:4], "sequence", n_docs=K))
        torch.testing.assert_close(tok, model.loss(EXAMPLES[:4], "token", n_docs=K))


def test_a_uniform_prior_keeps_the_passages_and_empties_only_the_missing_slots(toy):
    model = _model(toy).eval()
    questions = [e.question for e in EXAMPLES[:3]]
    ranked = model.generate(questions, "token", n_docs=K)
    uniform = model.generate(questions, "token", n_docs=K, uniform_prior=True)
    for a, b in zip(ranked, uniform):
        assert [p.id for p in a.passages] == [p.id for p in b.passages]
        assert (b.doc_scores == 0).all() and not (a.doc_scores == 0).all()
    answers = model.answer(questions, n_docs=K)  # `answer` is `generate` with provenance
    assert [p.prediction for p in answers] == [g.answer.text for g in ranked]


def test_gradients_reach_the_query_encoder_only_when_the_retriever_trains(toy):
    for train_retriever in (True, False):
        model = _model(toy).eval()
        model.loss(EXAMPLES[:4], n_docs=K, train_retriever=train_retriever).sum().backward()
        grads = [p.grad for p in model.query_encoder.parameters()]
        if train_retriever:
            assert any(g is not None and g.abs().sum() > 0 for g in grads)
        else:
            assert all(g is None for g in grads)
        assert model.generator.lm_head.weight.grad.abs().sum() > 0
        assert not model.doc_vectors.requires_grad  # d(z) stays frozen


# --------------------------------------------------------------------------- joint training


@pytest.fixture(scope="module")
def reference(toy, tmp_path_factory):
    """One uninterrupted, checkpointed run of 8 steps: what every other run is compared to."""
    path = tmp_path_factory.mktemp("reference") / "rag.pt"
    model = _model(toy)
    before = _eval_loss(_model(toy))
    state = T.train_rag(model, EXAMPLES, _cfg(), checkpoint=path, progress=False)
    return SimpleNamespace(state=state, path=path, model=model, before=before,
                           generator=_snapshot(model.generator),
                           query_encoder=_snapshot(model.query_encoder))


def test_train_rag_learns_and_returns_its_history(toy, reference):
    history = reference.state["history"]
    assert [s for s, _ in history] == list(range(1, 9)) and reference.state["step"] == 8
    assert all(math.isfinite(loss) for _, loss in history)
    assert _eval_loss(reference.model) < 0.8 * reference.before  # memorising the toy task
    assert not reference.model.training  # left in eval mode
    assert not _same(reference.query_encoder, _snapshot(toy.encoder))  # BERT_q was trained


def test_train_rag_is_deterministic_on_cpu(toy, reference):
    model = _model(toy)
    state = T.train_rag(model, EXAMPLES, _cfg(), progress=False)
    assert state["history"] == reference.state["history"]
    assert _same(_snapshot(model.generator), reference.generator)
    assert _same(_snapshot(model.query_encoder), reference.query_encoder)
    other = T.train_rag(_model(toy), EXAMPLES, _cfg(seed=1, steps=2), progress=False)
    assert other["history"] != reference.state["history"][:2]  # the seed picks the batches


def _files(path) -> list[str]:
    return sorted(os.listdir(path.parent))


def test_an_interrupted_run_resumes_to_the_same_parameters(toy, reference, tmp_path,
                                                           monkeypatch):
    path = tmp_path / "rag.pt"
    model = _ctrl_c_at_step(_model(toy), 6)
    with pytest.raises(KeyboardInterrupt):
        T.train_rag(model, EXAMPLES, _cfg(), checkpoint=path, progress=False)
    saved = torch.load(path, weights_only=True)
    assert saved["state"]["step"] == 5  # written on interrupt, not only every 3 steps
    assert saved["state"]["history"] == reference.state["history"][:5]
    assert set(saved) == {"generator", "query_encoder", "optimizer", "scheduler", "state"}
    assert _files(path) == ["rag.pt"]

    # a crash while writing the next checkpoint leaves the last one whole, and no temp file
    def full_disk(fd):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full_disk)
        with pytest.raises(OSError, match="No space"):
            T.train_rag(_model(toy), EXAMPLES, _cfg(), checkpoint=path, progress=False)
    assert torch.load(path, weights_only=True)["state"]["step"] == 5
    assert _files(path) == ["rag.pt"]

    resumed = _model(toy)  # a new process: fresh weights, everything else from the checkpoint
    state = T.train_rag(resumed, EXAMPLES, _cfg(), checkpoint=path, progress=False)
    assert state["history"] == reference.state["history"]
    assert _same(_snapshot(resumed.generator), reference.generator)
    assert _same(_snapshot(resumed.query_encoder), reference.query_encoder)
    assert _files(path) == ["rag.pt"]


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_ctrl_c_after_the_optimizer_step_still_resumes_exactly(toy, reference, tmp_path,
                                                               monkeypatch):
    """Ctrl-C can land anywhere in a step, e.g. after ``optimizer.step()``, when the weights
    already hold step t+1 while ``state["step"]`` says t. The loop holds the interrupt until
    the step ends, so the checkpoint never pairs them and the resumed run matches."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("SIGINT is handled elsewhere (a test runner's worker?)")
    path = tmp_path / "rag.pt"
    step, calls = torch.optim.AdamW.step, []

    def step_then_sigint(self, *args, **kwargs):
        out = step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 6:
            os.kill(os.getpid(), signal.SIGINT)  # the user presses Ctrl-C
        return out

    with monkeypatch.context() as m:
        m.setattr(torch.optim.AdamW, "step", step_then_sigint)
        with pytest.raises(KeyboardInterrupt):
            T.train_rag(_model(toy), EXAMPLES, _cfg(), checkpoint=path, progress=False)
    resumed = _model(toy)
    state = T.train_rag(resumed, EXAMPLES, _cfg(), checkpoint=path, progress=False)
    assert state["history"] == reference.state["history"]
    assert _same(_snapshot(resumed.generator), reference.generator)


def test_a_finished_run_loads_from_its_checkpoint_without_training(toy, reference):
    model = _model(toy)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run must not train again")

    model.loss = no_training
    state = T.train_rag(model, EXAMPLES, _cfg(), checkpoint=reference.path, progress=False)
    assert state["history"] == reference.state["history"]
    assert _same(_snapshot(model.generator), reference.generator)
    assert _same(_snapshot(model.query_encoder), reference.query_encoder)


def test_a_frozen_retriever_stays_bit_identical_while_the_generator_learns(toy):
    model = _model(toy)
    state = T.train_rag(model, EXAMPLES, _cfg(steps=3, freeze_retriever=True), progress=False)
    assert len(state["history"]) == 3
    assert _same(_snapshot(model.query_encoder), _snapshot(toy.encoder))
    assert not _same(_snapshot(model.generator), _snapshot(toy.generator))


def test_bm25_training_leaves_the_query_encoder_untouched(toy):
    model = _model(toy, retriever="bm25")
    found = model.retrieve([e.question for e in EXAMPLES], K)
    assert found.doc_scores.shape == (len(EXAMPLES), K) and not found.doc_scores.requires_grad
    assert [row[0] for row in found.passages] == CORPUS  # BM25 finds the passage of each fact
    state = T.train_rag(model, EXAMPLES, _cfg(steps=3), progress=False)
    assert all(math.isfinite(loss) for _, loss in state["history"])
    assert _same(_snapshot(model.query_encoder), _snapshot(toy.encoder))
    assert not _same(_snapshot(model.generator), _snapshot(toy.generator))


def test_hybrid_prior_is_the_product_of_the_dense_and_bm25_experts(toy):
    """doc_scores = scale·d(z)ᵀq(x) + w·BM25(x, z), top-k over the whole (toy) corpus."""
    model = _model(toy, retriever="hybrid")
    questions = [e.question for e in EXAMPLES]
    found = model.retrieve(questions, K, grad=True)
    q = model.query_encoder(questions).detach()
    full = SCALE * q @ torch.from_numpy(toy.vectors).T + model.bm25_weight * torch.from_numpy(
        toy.bm25.scores(questions))  # (questions, corpus): every passage scored
    best = full.topk(K, dim=1)
    torch.testing.assert_close(found.doc_scores.detach(), best.values)
    assert [[CORPUS.index(p) for p in row] for row in found.passages] == best.indices.tolist()
    assert not toy.bm25.scores(["the of and"]).any()  # stop words only: BM25 has no opinion
    assert len(model.retrieve(["the of and"], K).passages[0]) == K
    everything = model.retrieve(questions, 50)  # k beyond the corpus: each passage once
    assert all(sorted(p.id for p in row) == sorted(p.id for p in CORPUS)
               for row in everything.passages)
    model.history = [(1, 2.5)]
    dense = model.with_bm25(None)  # the same weights, the dense expert alone
    assert dense.query_encoder is model.query_encoder and dense.generator is model.generator
    assert dense.history == model.history and dense.training == model.training
    assert dense.retrieve(questions, K).passages == _model(toy).retrieve(questions, K).passages
    assert dense.with_bm25(toy.bm25).retrieve(questions, K).passages == found.passages
    found.doc_scores.sum().backward()  # the dense expert still trains BERT_q
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for p in model.query_encoder.parameters())


def test_a_new_prior_leaves_an_evaluated_model_in_evaluation_mode(toy):
    """The wrapper answers in eval mode and restores *its* mode after: an evaluated model's
    parts (shared with the wrapper) must not come back with dropout on."""
    model = _model(toy).eval()
    model.with_bm25(toy.bm25).answer([EXAMPLES[0].question])
    assert not model.query_encoder.training and not model.generator.training


def test_hybrid_training_updates_both_halves_of_the_model(toy):
    model = _model(toy, retriever="hybrid")
    state = T.train_rag(model, EXAMPLES, _cfg(steps=3), progress=False)
    assert all(math.isfinite(loss) for _, loss in state["history"])
    assert not _same(_snapshot(model.query_encoder), _snapshot(toy.encoder))
    assert not _same(_snapshot(model.generator), _snapshot(toy.generator))


def test_the_hybrid_prior_needs_bm25_over_the_index_passages_in_order(toy):
    """``_hybrid`` reads BM25's row j as the index's passage j: any other corpus is refused."""
    model = _model(toy)
    assert model.with_bm25(BM25Retriever(list(CORPUS))).bm25 is not None  # same ids, same order
    for other in (CORPUS[::-1], CORPUS[:-1], [dataclasses.replace(CORPUS[0], id="x"),
                                                *CORPUS[1:]]):
        with pytest.raises(ValueError, match="not the index's passages in the same order"):
            model.with_bm25(BM25Retriever(other))
        with pytest.raises(ValueError, match="not the index's passages in the same order"):
            RagModel(toy.preset, toy.encoder, toy.generator, toy.tokenizer, toy.index,
                     toy.vectors, bm25=BM25Retriever(other))


# --------------------------------------------------------------------------- an approximate index


class _FindsFewer:
    """The toy index, except that question 0 of every search finds one passage fewer: its last
    slot comes back as an approximate FAISS index pads it, id −1 and score −inf."""

    def __init__(self, index):
        self.index, self.passages = index, index.passages

    def search(self, query_vectors, k):
        found = self.index.search(query_vectors, k)
        indices, scores = found.indices.copy(), found.scores.copy()
        indices[0, -1], scores[0, -1] = -1, -np.inf
        return dataclasses.replace(found, indices=indices, scores=scores,
                                   ids=[found.ids[0][:-1], *found.ids[1:]],
                                   passages=[found.passages[0][:-1], *found.passages[1:]])


def test_a_passage_the_index_did_not_find_weighs_nothing(toy):
    """Its slot gets doc score −inf (p_η(z|x) = 0) and no passage: the loss, its gradient and
    both decoders are those of the passages that were found."""
    model = _model(toy).eval()
    fewer = RagModel(toy.preset, model.query_encoder, model.generator, toy.tokenizer,
                     _FindsFewer(toy.index), toy.vectors)
    batch = EXAMPLES[:3]
    questions = [e.question for e in batch]
    found = fewer.retrieve(questions, K)
    assert [len(row) for row in found.passages] == [K - 1, K, K]
    assert found.doc_scores[0, -1] == -torch.inf
    assert torch.isfinite(found.doc_scores[0, :-1]).all()
    assert torch.isfinite(found.doc_scores[1:]).all()
    for marginalization in ("token", "sequence"):
        loss = fewer.loss(batch, marginalization, K)
        torch.testing.assert_close(loss[:1], model.loss(batch[:1], marginalization, K - 1))
        torch.testing.assert_close(loss[1:], model.loss(batch[1:], marginalization, K))
        loss.sum().backward()
        grads = [p.grad for p in fewer.query_encoder.parameters() if p.grad is not None]
        assert grads and all(torch.isfinite(g).all() for g in grads)
    for marginalization, decoding in (("token", "thorough"), ("sequence", "thorough"),
                                      ("sequence", "fast")):
        got = fewer.answer(questions[:1], marginalization=marginalization, n_docs=K,
                           num_beams=2, decoding=decoding)[0]
        alone = model.answer(questions[:1], marginalization=marginalization, n_docs=K - 1,
                             num_beams=2, decoding=decoding)[0]
        assert got.prediction == alone.prediction
        assert [x["id"] for x in got.provenance] == [x["id"] for x in alone.provenance]
        assert [x["posterior"] for x in got.provenance] == pytest.approx(
            [x["posterior"] for x in alone.provenance], abs=1e-5)
    with pytest.raises(ValueError, match="found no passage for a question"):
        fewer.retrieve(questions, 1)


def test_an_ivf_index_searching_one_cell_finds_fewer_than_k(toy):
    """A real approximate index: IVF with 5 cells over the 20 toy passages, searching the
    question's nearest cell only (nprobe = 1), returns −1 for what that cell lacks."""
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(toy.vectors.shape[1]), toy.vectors.shape[1], 5,
                             faiss.METRIC_INNER_PRODUCT)
    ivf.train(toy.vectors)
    ivf.add(toy.vectors)
    ivf.nprobe = 1
    model = RagModel(toy.preset, copy.deepcopy(toy.encoder), toy.generator, toy.tokenizer,
                     DenseIndex(ivf, CORPUS, dict(toy.index.metadata)), toy.vectors).eval()
    n_docs, questions = 6, [e.question for e in EXAMPLES]
    found = model.retrieve(questions, n_docs)
    lengths = [len(row) for row in found.passages]
    assert min(lengths) < n_docs  # the precondition: some slots are missing
    assert found.doc_scores.shape == (len(EXAMPLES), max(lengths))
    for row, scores in zip(found.passages, found.doc_scores):
        assert torch.isfinite(scores[:len(row)]).all() and (scores[len(row):] == -torch.inf).all()
    loss = model.loss(EXAMPLES, "sequence", n_docs)
    assert torch.isfinite(loss).all()
    loss.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.query_encoder.parameters()
               if p.grad is not None)
    for p, row in zip(model.answer(questions, n_docs=n_docs), found.passages):
        assert [x["id"] for x in p.provenance] == [z.id for z in row]
        assert sum(x["posterior"] for x in p.provenance) == pytest.approx(1)


# --------------------------------------------------------------------------- answers


@pytest.mark.parametrize("marginalization", ["token", "sequence"])
def test_an_answer_is_never_longer_than_a_training_target(toy, marginalization, monkeypatch):
    """The decoders get the length ``loss`` cuts targets to (``max_target_length``, the end
    token included): with the end token out of reach every answer runs to that limit, and
    ends with the end token there, as the longest training target does."""
    model = _model(toy).eval()
    with torch.no_grad():
        model.generator.final_logits_bias[0, toy.tokenizer.eos_token_id] = -30.0
    decoder = {"token": "rag_token_generate", "sequence": "rag_sequence_generate"}[marginalization]
    answers, decode = [], getattr(rag, decoder)

    def spy(*args, **kwargs):
        out = decode(*args, **kwargs)
        answers.extend(out)
        return out

    monkeypatch.setattr(rag, decoder, spy)
    predictions = model.answer([e.question for e in EXAMPLES[:2]],
                               marginalization=marginalization, n_docs=K, num_beams=2)
    longest = encode_targets(toy.tokenizer, ["Alpha " * 50], toy.preset.max_target_length)
    for a, p in zip(answers, predictions):
        assert len(a.token_ids) == longest["labels"].shape[1] == toy.preset.max_target_length
        assert a.token_ids[-1] == toy.tokenizer.eos_token_id and a.text == p.prediction


@pytest.mark.parametrize("marginalization", ["token", "sequence"])
def test_answer_gives_one_prediction_per_question_with_provenance(toy, marginalization):
    model = _model(toy).train()
    batch = EXAMPLES[:3]
    questions = [e.question for e in batch]
    predictions = model.answer(questions, [e.answers for e in batch], marginalization,
                               n_docs=K, num_beams=2, batch_size=2)  # two batches
    assert model.training  # the mode it came in
    retrieved = model.eval().retrieve(questions, K).passages
    assert len(predictions) == 3
    for p, e, row in zip(predictions, batch, retrieved):
        assert isinstance(p, Prediction) and isinstance(p.prediction, str)
        assert p.question == e.question and p.answers == e.answers
        assert [x["id"] for x in p.provenance] == [z.id for z in row]
        assert [x["title"] for x in p.provenance] == [z.title for z in row]
        posteriors = [x["posterior"] for x in p.provenance]
        assert all(0 <= w <= 1 for w in posteriors) and sum(posteriors) == pytest.approx(1)
    assert all(p.answers == [] for p in model.answer(questions[:1], n_docs=1))


def test_evaluate_rag_scores_the_answers(toy):
    scores, predictions = evaluate_rag(_model(toy), EXAMPLES[:4], "sequence", n_docs=2)
    assert scores["n"] == 4 and len(predictions) == 4
    assert all(len(p.provenance) == 2 for p in predictions)
    assert scores["em"] == pytest.approx(sum(exact_match(p.prediction, p.answers)
                                             for p in predictions) / 4)
    assert scores["f1"] == pytest.approx(sum(f1_score(p.prediction, p.answers)
                                             for p in predictions) / 4)


# --------------------------------------------------------------------------- experiments


def test_k_sweep_reports_em_f1_their_errors_and_recall_for_every_k(toy):
    model = _model(toy)
    result = k_sweep(model, EXAMPLES[:4], ks=(1, 3, 50), marginalization="sequence")
    assert set(result) == {"k", "em", "em_se", "f1", "f1_se", "recall"}
    assert result["k"] == [1, 3, 50] and all(len(v) == 3 for v in result.values())
    assert all(0 <= v <= 1 for v in result["em"] + result["f1"] + result["recall"])
    assert result["recall"] == sorted(result["recall"])
    predictions = evaluate_rag(model, EXAMPLES[:4], "sequence", n_docs=3)[1]
    f1 = [f1_score(p.prediction, p.answers) for p in predictions]
    assert result["f1"][1] == pytest.approx(np.mean(f1))  # the standard error of that mean
    assert result["f1_se"][1] == pytest.approx(np.std(f1, ddof=1) / 2)
    assert result["recall"][-1] == 1.0  # k beyond the corpus: every passage is retrieved


def test_edited_corpus_changes_exactly_the_chosen_facts():
    edits = edit_facts(EXAMPLES, 3, seed=0)
    assert edits == edit_facts(EXAMPLES, 3, seed=0) != edit_facts(EXAMPLES, 3, seed=1)
    assert len(edits) == 3 and set(edits) <= set(TOWNS)
    assert set(edits.values()) == set(edits)  # the chosen names pass round a cycle
    assert all(new != old for old, new in edits.items())
    assert edit_facts(EXAMPLES[:1], 3) == {}  # one article has no other name to take
    edited = edited_corpus(CORPUS, edits)
    assert [p.id for p in edited] == [p.id for p in CORPUS]
    for old, new in zip(CORPUS, edited):
        if old.title in edits:
            assert new.title == edits[old.title]
            assert new.text == old.text.replace(old.title, edits[old.title])
            assert new.text != old.text and old.title not in new.text
        else:
            assert new is old
    assert CORPUS == _world()[0]  # the original is not touched


def test_a_fact_whose_question_names_its_answer_is_never_edited():
    seeds = range(12)
    assert any("Alpha" in edit_facts(EXAMPLES, 4, seed) for seed in seeds)  # it can be drawn
    named = [*EXAMPLES, Example("Which town is twinned with ALPHA?", ["Alpha"], "Alpha")]
    for seed in seeds:  # one question of Alpha's names it: none of Alpha's facts is edited
        edits = edit_facts(named, 4, seed)
        assert len(edits) == 4 and "Alpha" not in edits and "Alpha" not in edits.values()


def test_edits_cycle_within_a_kind_when_kinds_are_given():
    kinds = {t: "vowel" if t[0] in "AEIOU" else "consonant" for t in TOWNS}
    edits = edit_facts(EXAMPLES, 10, seed=0, kinds=kinds)  # 3 vowels, 7 consonants
    assert len(edits) == 10 and set(edits.values()) == set(edits)
    assert all(kinds[old] == kinds[new] for old, new in edits.items())
    few = edit_facts(EXAMPLES, 6, seed=0, kinds=kinds)
    assert sorted(few) == sorted(edit_facts(EXAMPLES, 6, seed=0))  # the same facts chosen
    assert sum(kinds[old] != kinds[new] for old, new in few.items()) <= 2  # one lone kind
    alone = {t: t for t in TOWNS}  # every article its own kind: one mixed cycle, as before
    assert edit_facts(EXAMPLES, 6, seed=0, kinds=alone) == edit_facts(EXAMPLES, 6, seed=0)


def test_an_edit_renames_every_prose_mention_of_the_entity():
    corpus = [Passage("s::0", "Sail", "A sail is a sail. Sailing ships carry sails."),
              Passage("g::0", "Georgia (country)", "Georgia is a country. GEORGIA!"),
              Passage("x::0", "Other", "A sail near Georgia.")]
    edited = edited_corpus(corpus, {"Sail": "Georgia (country)", "Georgia (country)": "Sail"})
    assert [p.title for p in edited] == ["Georgia (country)", "Sail", "Other"]
    assert edited[0].text == "A Georgia is a Georgia. Sailing ships carry sails."
    assert edited[1].text == "Sail is a country. Sail!"
    assert edited[2] is corpus[2]  # other articles keep what they say


def test_hot_swap_serves_the_edited_index_then_restores_the_original(toy, monkeypatch):
    """With a reader that answers with the title of the passage stating the asked fact, the
    outcome depends only on which index is served: every edit is followed, then undone."""
    model = _model(toy)
    index, vectors = model.index, model.doc_vectors
    served = []

    def reader(questions, answers=None, **kwargs):
        served.append((model.index, model.doc_vectors.clone()))
        found = model.retrieve(questions, len(CORPUS)).passages
        return [Prediction(q, next(p.title for p in row if KEYS[q] in p.text), list(a))
                for q, a, row in zip(questions, answers, found)]

    monkeypatch.setattr(model, "answer", reader)
    edits = edit_facts(EXAMPLES, 3, seed=0)  # hot_swap's choice: every fact is known
    result = hot_swap(model, EXAMPLES, n_facts=3, seed=0)
    facts = [e for e in EXAMPLES if e.article in edits]
    assert result["facts"] == len(facts) > 0
    assert result["followed"] == 1.0 and result["kept"] == 1.0
    assert [x["old"] for x in result["examples"]] == [e.answers[0] for e in facts]
    assert [x["new"] for x in result["examples"]] == [edits[e.article] for e in facts]
    assert [x["answer_after_swap"] for x in result["examples"]] == [x["new"] for x in
                                                                    result["examples"]]
    assert model.index is index and model.doc_vectors is vectors  # swapped back
    assert result["misses"] == []

    assert len(served) == 3  # before the swap, with the edited index, after swapping back
    swapped_index, swapped_vectors = served[1]
    assert served[0][0] is index and swapped_index is not index and served[2][0] is index
    edited = edited_corpus(CORPUS, edits)
    assert swapped_index.passages == edited
    changed = [i for i, p in enumerate(CORPUS) if p.title in edits]
    unchanged = [i for i in range(len(CORPUS)) if i not in changed]
    assert torch.equal(swapped_vectors[unchanged], vectors[unchanged])
    expected = toy.doc_encoder.encode_passages([edited[i] for i in changed], progress=False)
    torch.testing.assert_close(swapped_vectors[changed], torch.from_numpy(expected))
    assert not torch.allclose(swapped_vectors[changed], vectors[changed])


def test_span_edits_keep_the_kind_and_shape_of_their_span_and_change_only_their_article():
    facts = [Example("founded in _____ by", ["1990"], "A"), Example("born in _____", ["1802"], "B"),
             Example("a height of _____ metres", ["8,849"], "C"),
             Example("about _____ people", ["0.2"], "D"),
             Example("led by _____", ["Ada King"], "E"),
             Example("won by _____", ["Tom Lee"], "F"),
             Example("named _____ after Max", ["Zoe"], "G"),
             Example("again in _____", ["1990"], "A")]
    edits = edit_spans(facts, 10, seed=0)
    assert edits == edit_spans(facts, 10, seed=0) != edit_spans(facts, 10, seed=1)
    assert set(edits) == {e.question for e in facts[:4]}  # one fact per article; no names
    old = {e.question: e.answers[0] for e in facts}
    for question in ("founded in _____ by", "born in _____"):  # a year for a nearby year
        assert 0 < abs(int(edits[question]) - int(old[question])) <= 30
    for question in ("a height of _____ metres", "about _____ people"):  # one digit changed
        new, was = edits[question], old[question]
        assert len(new) == len(was) and sum(a != b for a, b in zip(new, was)) == 1
        assert new[0] != "0" or was[0] == "0"
        assert [c for c in new if not c.isdigit()] == [c for c in was if not c.isdigit()]
    # a name becomes the most similar name of as many words, never one its question holds
    vectors = {"Ada King": [1, 0], "Tom Lee": [0, 1], "Zoe": [1, 1], "Ada Lovelace": [0.9, 0.1],
               "Tom Hanks": [0.1, 0.9], "Max": [1, 0.9]}
    named = edit_spans(facts, 10, 0, names=["Ada Lovelace", "Tom Hanks", "Max"],
                       encode=lambda texts: np.array([vectors[t] for t in texts], dtype=float))
    assert named["led by _____"] == "Ada Lovelace" and named["won by _____"] == "Tom Hanks"
    assert "named _____ after Max" not in named and named["born in _____"] == edits["born in _____"]
    corpus = [Passage("A::0", "A", "A was founded in 1990 by B; 19901 is a number."),
              Passage("B::0", "B", "B was born in 1802 and 1990.")]
    edited = span_edited_corpus(corpus, facts[:2], edits)
    assert edited[0].text == f"A was founded in {edits['founded in _____ by']} by B; 19901 is a " \
        "number."
    assert edited[1].text == f"B was born in {edits['born in _____']} and 1990."  # its own span
    assert edited[0].id == "A::0" and span_edited_corpus(corpus, [], {}) == corpus


def test_the_extracting_reader_reads_the_span_between_the_words_around_the_blank():
    p = Passage("H::0", "Hagia Sophia", "Hagia Sophia is a mosque. It was a church (360–1453) "
                "and a museum. Power was seized in 1933, through an appointment.")
    assert extract_span(p, "Mosque: It was a church (_____–1453) and a") == "360"
    assert extract_span(p, "Mosque: was seized in _____, through an") == "1933"
    assert extract_span(p, "Mosque: it is a _____.") == "mosque"  # "it" stands for the title
    assert extract_span(p, "Mosque: a museum in _____ and") is None


def test_retrieve_and_extract_answers_from_the_first_passage_that_fits(toy):
    model = _model(toy)
    predictions = extracted_answers(model, READING, len(CORPUS))  # every passage: each fits once
    assert [p.prediction for p in predictions] == COLOURS
    assert [p.provenance[0]["title"] for p in predictions] == TOWNS
    assert extracted_answers(model, [Example("A town: the _____ unicorn.", ["x"])], 3)[0] \
        .prediction == ""


def test_a_reading_hot_swap_serves_passages_stating_other_spans(toy, monkeypatch):
    """With a reader that copies the word before the asked animal from the passage naming it,
    the answer follows the served index: each edited colour is read after the swap, and the
    old one once the original index is back."""
    model = _model(toy)
    index = model.index
    reading = [Example(f"the _____ {ANIMALS[i]}", [COLOURS[i]], town)
               for i, town in enumerate(TOWNS)]

    def reader(questions, answers=None, **kwargs):
        found = model.retrieve(questions, len(CORPUS)).passages
        out = []
        for q, a, row in zip(questions, answers, found):
            animal = f" {q.split()[-1]}."
            text = next(p.text for p in row if animal in p.text)
            out.append(Prediction(q, text.split(animal)[0].split()[-1], list(a)))
        return out

    monkeypatch.setattr(model, "answer", reader)
    result = hot_swap(model, reading, n_facts=4, seed=0, task="reading-qa")
    assert result["facts"] == 4
    assert result["followed"] == 1.0 and result["kept"] == 1.0 and result["misses"] == []
    # each colour (to edit_spans, a name) became another chosen colour or a name of the towns'
    # passages (their rivers), the one the doc encoder finds most similar
    assert all(x["new"] in COLOURS + RIVERS and x["new"] != x["old"] for x in result["examples"])
    assert model.index is index and model.index.passages == CORPUS


def test_hot_swap_restores_the_index_when_evaluation_fails(toy, monkeypatch):
    model = _model(toy)
    index, vectors = model.index, model.doc_vectors
    calls = []

    def reader(questions, answers=None, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return [Prediction(q, a[0], list(a)) for q, a in zip(questions, answers)]

    monkeypatch.setattr(model, "answer", reader)
    with pytest.raises(RuntimeError):
        hot_swap(model, EXAMPLES, n_facts=2)
    assert model.index is index and model.doc_vectors is vectors


def test_hot_swap_picks_the_known_facts_from_answers_already_made(toy, monkeypatch):
    model = _model(toy)
    asked = []

    def reader(questions, answers=None, **kwargs):
        asked.append(list(questions))
        return [Prediction(q, a[0], list(a)) for q, a in zip(questions, answers)]

    monkeypatch.setattr(model, "answer", reader)
    known = EXAMPLES[:6]  # the model "knew" only these: the edits come from them alone
    made = [Prediction(e.question, e.answers[0] if e in known else "?", e.answers)
            for e in EXAMPLES]
    result = hot_swap(model, EXAMPLES, n_facts=3, predictions=made)
    edits = edit_facts(known, 3, seed=0)
    assert result["facts"] == sum(e.article in edits for e in known) > 0
    assert len(asked) == 2  # after the swap and after swapping back: no first pass
    assert {q for batch in asked for q in batch} <= {e.question for e in known}
    with pytest.raises(ValueError, match="2 predictions for 20 examples"):
        hot_swap(model, EXAMPLES, n_facts=3, predictions=made[:2])


def test_hot_swap_of_a_hybrid_model_swaps_its_bm25_half_too(toy, monkeypatch):
    model = _model(toy, retriever="hybrid")
    bm25, served = model.bm25, []

    def reader(questions, answers=None, **kwargs):
        served.append(model.bm25)
        return [Prediction(q, a[0], list(a)) for q, a in zip(questions, answers)]

    monkeypatch.setattr(model, "answer", reader)
    edits = edit_facts(EXAMPLES, 3, seed=0)
    hot_swap(model, EXAMPLES, n_facts=3, seed=0)
    assert served[0] is bm25 and served[2] is bm25 and model.bm25 is bm25
    assert served[1].passages == edited_corpus(CORPUS, edits)


def test_hot_swap_says_where_the_edited_passage_stood_for_each_miss(toy, monkeypatch):
    model = _model(toy)
    edits = edit_facts(EXAMPLES, 3, seed=0)
    calls, marginalizations = [], []

    def reader(questions, answers=None, marginalization="token", **kwargs):
        calls.append(1)
        marginalizations.append(marginalization)
        right = [Prediction(q, a[0], list(a)) for q, a in zip(questions, answers)]
        if len(calls) != 2:
            return right
        # after the swap: two misses, the edited passage second, then not retrieved at all
        new, other = answers[0][0], {"title": "a neighbour", "posterior": 0.7}
        return [Prediction(questions[0], "a neighbour", list(answers[0]),
                           [other, {"title": new, "posterior": 0.3}]),
                Prediction(questions[1], "a neighbour", list(answers[1]), [other]),
                *right[2:]]

    monkeypatch.setattr(model, "answer", reader)
    result = hot_swap(model, EXAMPLES, n_facts=3, seed=0, marginalization="sequence")
    facts = [e for e in EXAMPLES if e.article in edits]
    assert result["facts"] == len(facts) > 2
    assert result["followed"] == pytest.approx(1 - 2 / len(facts))
    assert [m["edited_rank"] for m in result["misses"]] == [2, None]
    assert [m["answer"] for m in result["misses"]] == ["a neighbour"] * 2
    assert marginalizations == ["sequence"] * 3


def test_hot_swap_on_the_toy_model_reports_its_counts(toy):
    result = hot_swap(_model(toy), EXAMPLES[:4], n_facts=2)
    assert set(result) == {"facts", "followed", "kept", "examples", "misses"}
    assert len(result["misses"]) == round((1 - result["followed"]) * result["facts"])
    assert 0 <= result["facts"] <= 4 and len(result["examples"]) == min(10, result["facts"])
    assert 0 <= result["followed"] <= 1 and 0 <= result["kept"] <= 1


def test_reproduce_runs_every_experiment_and_writes_its_run_directory(toy, monkeypatch,
                                                                     tmp_path):
    """`ragbook reproduce`'s orchestration end to end on the toy world: the models stand in
    for trained ones (no training here), every experiment and file of the run is real."""
    from ragbook import reproduce

    def from_preset(preset, retriever="dense", **parts):
        return _model(toy, retriever).eval()

    def trained_rag(preset, task, cfg, retriever, progress):
        model = from_preset(preset, retriever)
        model.history = [(1, 2.0), (2, 1.0)]
        return model

    monkeypatch.setattr(reproduce, "get_preset", lambda name, seed=0, **sizes: toy.preset)
    monkeypatch.setattr(reproduce, "load_task", lambda task, split, seed=0:
                        READING if task == "reading-qa" else EXAMPLES)
    monkeypatch.setattr(RagModel, "from_preset", staticmethod(from_preset))
    monkeypatch.setattr(T, "trained_rag", trained_rag)
    monkeypatch.setattr(T, "trained_closed_book",
                        lambda preset, task, steps, progress: (toy.generator, toy.tokenizer))
    cfg = reproduce.ReproduceConfig(eval_questions=6, sweep_questions=4, sweep_ks=(1, 2),
                                    hot_swap_facts=2, retriever="hybrid", ablation_prior="dense")
    results = reproduce.run(cfg, runs_dir=tmp_path, progress=False)

    assert results["recall_questions"] == len(READING)  # recall: the whole split
    for key in ("frozen", "finetuned", "bm25", "hybrid_frozen", "hybrid"):
        assert set(results["retrieval"][key]) == {"recall@1", "recall@5", "recall@20"}
    assert all(0 <= results["reading_qa"][m][score] <= 1 for score in ("em", "f1")
               for m in ("closed_book", "rag_sequence", "rag_token", "top1_only",
                         "top1_only_sequence", "extract", "rag_token_ablation", "reader_gold"))
    assert results["reading_qa"]["extract"]["f1"] > 0  # the rule reads the toy colours
    assert {"bleu1"} == set(results["qgen"]["rag_token"]) and "accuracy" in results["verify"]["rag"]
    for sweep in results["k_sweep"].values():
        assert sweep["k"] == [1, 2] and len(sweep["f1_se"]) == 2
    assert "followed" in results["hot_swap"]
    run = tmp_path / "latest"
    assert (run / "results.json").exists() and (run / "k_sweep.png").exists()
    table = (run / "results.md").read_text()
    assert "trained with the dense prior, read with the hybrid one" in table
    assert len((run / "predictions_rag_token.jsonl").read_text().splitlines()) == 6


# --------------------------------------------------------------------------- bad input


def test_bad_input_gets_a_clear_error(toy, tmp_path):
    model = _model(toy)
    with pytest.raises(ValueError, match="unknown marginalization 'bogus'"):
        model.loss(EXAMPLES[:2], "bogus")
    with pytest.raises(ValueError, match="at least one training example"):
        T.train_rag(model, [], _cfg())
    with pytest.raises(ValueError, match="unknown marginalization 'bogus'"):
        T.train_rag(model, EXAMPLES, _cfg(marginalization="bogus"), checkpoint=tmp_path / "c.pt",
                    progress=False)
    assert not (tmp_path / "c.pt").exists()  # nothing to resume from a run that never stepped


def test_a_checkpoint_from_other_settings_is_refused(toy, tmp_path):
    """Resuming under another number of steps would follow another learning-rate schedule."""
    T.train_rag(_model(toy), EXAMPLES, _cfg(steps=2), checkpoint=tmp_path / "c.pt",
                progress=False)
    with pytest.raises(ValueError, match=r"other settings \(steps: 2 → 3\)"):
        T.train_rag(_model(toy), EXAMPLES, _cfg(steps=3), checkpoint=tmp_path / "c.pt",
                    progress=False)


def test_answer_refuses_an_unknown_marginalization(toy):
    with pytest.raises(ValueError, match="unknown marginalization"):
        _model(toy).answer([EXAMPLES[0].question], marginalization="bogus", n_docs=1)


# --------------------------------------------------------------------------- devices

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))]


def _unambiguous(model, n: int = 4) -> list[Example]:
    """The n questions whose top K+1 doc_scores lie furthest apart, so that bf16 rounding of
    q(x) cannot change which passages they retrieve, nor in what order."""
    found = model.retrieve([e.question for e in EXAMPLES], K + 1)
    gaps = -found.doc_scores.diff(dim=1).min(dim=1).values
    return [EXAMPLES[i] for i in gaps.argsort(descending=True)[:n].tolist()]


def _trained(toy, reference) -> RagModel:
    """The reference run's weights: a random generator's near-ties would make greedy decoding
    differ between devices, a trained one's peaked distributions do not."""
    model = _model(toy)
    model.generator.load_state_dict(reference.generator)
    model.query_encoder.load_state_dict(reference.query_encoder)
    return model.eval()


@pytest.fixture(scope="module")
def cpu_baseline(toy, reference):
    """Dropout off, so that a GPU run can be compared with the CPU one."""
    model = _model(toy, dropout=0.0).eval()
    examples = _unambiguous(model)
    with torch.no_grad():
        loss = model.loss(examples, n_docs=K)
    state = T.train_rag(_model(toy, dropout=0.0), examples, _cfg(steps=3), progress=False)
    trained = _trained(toy, reference)
    questions = [e.question for e in _unambiguous(trained)]
    answers = {m: trained.answer(questions, marginalization=m, n_docs=K)
               for m in ("token", "sequence")}
    return SimpleNamespace(examples=examples, loss=loss, history=state["history"],
                           questions=questions, answers=answers)


@pytest.mark.parametrize("device", DEVICES)
def test_loss_on_the_device_matches_the_cpu(toy, cpu_baseline, device):
    model = _model(toy, dropout=0.0).to(device).eval()
    assert model.device.type == device and model.doc_vectors.device.type == device
    assert model.query_encoder.device.type == device
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        loss = model.loss(cpu_baseline.examples, n_docs=K)
    assert loss.device.type == device
    tolerance = {"rtol": 5e-2, "atol": 5e-2} if device == "cuda" else {}
    torch.testing.assert_close(loss.detach().float().cpu(), cpu_baseline.loss, **tolerance)
    loss.sum().backward()
    grads = [p.grad for p in model.query_encoder.parameters() if p.grad is not None]
    assert grads and all(g.device.type == device for g in grads)


@pytest.mark.parametrize("device", DEVICES)
def test_train_rag_on_the_device(toy, cpu_baseline, device, monkeypatch, tmp_path):
    monkeypatch.setenv("RAGBOOK_BF16", "1")  # the default; conftest turns it off for tests
    autocast = []

    def spy(*args, **kwargs):  # what the generator's forward pass runs under
        enabled = torch.is_autocast_enabled("cuda")
        autocast.append(torch.get_autocast_dtype("cuda") if enabled else None)
        return token_logprobs(*args, **kwargs)

    monkeypatch.setattr(pipeline.generator, "token_logprobs", spy)  # BART: generator.py
    model = _model(toy, dropout=0.0).to(device)
    state = T.train_rag(model, cpu_baseline.examples, _cfg(steps=3), progress=False)
    assert autocast == [torch.bfloat16 if device == "cuda" else None] * 3
    history = [loss for _, loss in state["history"]]
    assert len(history) == 3 and all(math.isfinite(v) for v in history)
    assert history[0] == pytest.approx(cpu_baseline.history[0][1],
                                       rel=5e-2 if device == "cuda" else 1e-6)
    assert all(p.device.type == device for p in model.parameters())
    assert not _same(_snapshot(model.generator), _snapshot(toy.generator))
    assert not _same(_snapshot(model.query_encoder), _snapshot(toy.encoder))

    # resuming on the device: the CPU-mapped checkpoint goes back onto the device's weights
    path = tmp_path / "rag.pt"
    first = _ctrl_c_at_step(_model(toy, dropout=0.0).to(device), 3)
    with pytest.raises(KeyboardInterrupt):
        T.train_rag(first, cpu_baseline.examples, _cfg(steps=3), checkpoint=path,
                    progress=False)
    resumed = _model(toy, dropout=0.0).to(device)
    again = T.train_rag(resumed, cpu_baseline.examples, _cfg(steps=3), checkpoint=path,
                        progress=False)
    assert [s for s, _ in again["history"]] == [1, 2, 3]
    assert all(p.device.type == device for p in resumed.parameters())


@pytest.mark.parametrize("device", DEVICES)
def test_answer_on_the_device(toy, reference, cpu_baseline, device):
    model = _trained(toy, reference).to(device)
    for marginalization, expected in cpu_baseline.answers.items():
        got = model.answer(cpu_baseline.questions, marginalization=marginalization, n_docs=K)
        assert [p.prediction for p in got] == [p.prediction for p in expected]
        for p, e in zip(got, expected):
            assert [x["id"] for x in p.provenance] == [x["id"] for x in e.provenance]
            assert [x["posterior"] for x in p.provenance] == pytest.approx(
                [x["posterior"] for x in e.provenance], abs=1e-3)


# --------------------------------------------------------------------------- data-parallel


def _saved_toy(toy, directory) -> None:
    """What a fresh process needs to rebuild the toy RAG: the generator, the vectors, the
    preset (BERT_q is the toy BERT's directory already)."""
    toy.generator.save_pretrained(directory / "generator")
    toy.tokenizer.save_pretrained(directory / "generator")
    np.save(directory / "vectors.npy", toy.vectors)
    (directory / "preset.json").write_text(json.dumps(toy.preset.to_dict()))


def _loaded_toy(directory) -> SimpleNamespace:
    from transformers import AutoTokenizer

    preset = Preset(**json.loads((directory / "preset.json").read_text()))
    vectors = np.load(directory / "vectors.npy")
    return SimpleNamespace(
        preset=preset, vectors=vectors, bm25=None,
        encoder=Encoder(preset.query_encoder, pooling="mean", normalize=True, max_length=16),
        generator=BartForConditionalGeneration.from_pretrained(directory / "generator"),
        tokenizer=AutoTokenizer.from_pretrained(directory / "generator"),
        index=DenseIndex.build(vectors, CORPUS, progress=False))


def _data_parallel_worker(directory) -> None:
    """One rank of ``torchrun --nproc_per_node 2 tests/test_pipeline.py DIR``: 3 steps."""
    torch.set_num_threads(1)
    model = _model(_loaded_toy(directory), dropout=0.0)
    state = T.train_rag(model, EXAMPLES, _cfg(steps=3), checkpoint=directory / "rag.pt",
                        progress=False)
    if int(os.environ["RANK"]) == 0:
        torch.save({"generator": _snapshot(model.generator), "history": state["history"],
                    "query_encoder": _snapshot(model.query_encoder)}, directory / "out.pt")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


ROOT = Path(__file__).resolve().parents[1]
DP_TOLERANCE = 1e-5  # the same update, gradients summed in another order (fp32)
# The attention keys' bias adds one constant to every score of a query, which the softmax
# cancels: its gradient is 0 in exact arithmetic, and Adam turns the float noise left in its
# place into steps of ±lr whose sign the summation order decides. Every other weight matches.
KEY_BIAS = re.compile(r"(k_proj|attention\.self\.key)\.bias$")


def test_two_processes_train_as_one_on_the_same_global_batch(toy, tmp_path):
    """``accelerate launch`` with 2 CPU processes (gloo): each rank trains on half of the
    global batch, the gradients are averaged, and after 3 steps the weights equal a
    1-process run's within DP_TOLERANCE; the main rank's checkpoint resumes in one process."""
    import subprocess

    _saved_toy(toy, tmp_path)
    single = _model(_loaded_toy(tmp_path), dropout=0.0)
    expected = T.train_rag(single, EXAMPLES, _cfg(steps=3), progress=False)
    # torchrun, which `accelerate launch --multi_gpu` runs on GPUs; on CPUs Accelerate's own
    # launcher wants MPI. ACCELERATE_USE_CPU: gloo, as `accelerate launch --cpu` sets.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
              "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__,
              str(tmp_path)]
    run = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=True)
    assert [s for s, _ in got["history"]] == [1, 2, 3]
    assert [loss for _, loss in got["history"]] == pytest.approx(
        [loss for _, loss in expected["history"]], abs=1e-4)
    for name in ("generator", "query_encoder"):
        mine, theirs = got[name], _snapshot(getattr(single, name))
        assert mine.keys() == theirs.keys()
        worst = max((mine[k] - theirs[k]).abs().max().item() for k in mine
                    if not KEY_BIAS.search(k))
        assert worst <= DP_TOLERANCE, f"{name}: {worst:.2e}"
    moved = max((got["generator"][k] - _snapshot(toy.generator)[k]).abs().max().item()
                for k in got["generator"])
    assert moved > 100 * DP_TOLERANCE  # the runs did train: the tolerance is not vacuous
    assert sorted(p.name for p in tmp_path.glob("rag.pt*")) == ["rag.pt"]  # one writer
    resumed = _model(_loaded_toy(tmp_path), dropout=0.0)
    state = T.train_rag(resumed, EXAMPLES, _cfg(steps=3), checkpoint=tmp_path / "rag.pt",
                        progress=False)
    assert state["history"] == got["history"]  # finished: loaded, not retrained
    assert _same(_snapshot(resumed.generator), got["generator"])


if __name__ == "__main__":  # a rank of the data-parallel test above
    _data_parallel_worker(Path(sys.argv[1]))


def test_encoder_fingerprint_follows_the_weights_of_a_saved_query_encoder(tmp_path):
    """trained_rag(query_encoder=...) keys its cache by the starting BERT_q's weights: another
    fine-tuned encoder is another run; a hub checkpoint is keyed by its name."""
    (tmp_path / "model.safetensors").write_bytes(b"weights, one run")
    first = T.encoder_fingerprint(str(tmp_path))
    assert first == T.encoder_fingerprint(str(tmp_path))
    (tmp_path / "model.safetensors").write_bytes(b"weights, another run")
    assert T.encoder_fingerprint(str(tmp_path)) != first
    assert T.encoder_fingerprint("sentence-transformers/all-MiniLM-L6-v2") == (
        "sentence-transformers/all-MiniLM-L6-v2")


def test_trained_rag_deletes_its_checkpoint_once_the_model_is_cached(tmp_path, monkeypatch):
    """A finished run leaves only the cached model: the checkpoint (with AdamW's moments, twice
    the model's size) exists only while the training can still be interrupted."""
    from ragbook import data
    from ragbook.config import get_preset

    cache = tmp_path / "cache"
    monkeypatch.setenv("RAGBOOK_CACHE", str(cache))
    passages = [p for p in data.load_corpus()[:60] if p.id.endswith("::0")][:20]
    monkeypatch.setattr(data, "load_corpus", lambda: passages)
    saved = []
    real_loop = T.resumable_loop

    def loop(step_fn, stateful, steps, checkpoint_path, *args, **kwargs):
        state = real_loop(step_fn, stateful, steps, checkpoint_path, *args, **kwargs)
        saved.append(Path(checkpoint_path).exists())
        return state

    monkeypatch.setattr(T, "resumable_loop", loop)
    cfg = T.RagTrainConfig(n_docs=2, steps=1, batch_size=2, checkpoint_every=1)
    model = T.trained_rag(get_preset("tiny"), "entity-qa", cfg, progress=False)
    assert saved == [True]  # the run wrote its checkpoint ...
    assert not any((cache / "rag-run").iterdir())  # ... which is gone once the model is cached
    assert len(list((cache / "rag-model").iterdir())) == 1 and len(model.history) == 1
