"""Export into the ecosystem's formats, each part loaded by its own library and checked against
ragbook's numbers, and import of a transformers RAG checkpoint. Tiny models: the DPR-shaped
paper preset of ``tiny_paper`` (conftest.py) and a MiniLM-shaped one (a tiny BERT, mean pooling,
normalised, temperature 20) over the same passages."""

import json

import datasets
import faiss
import numpy as np
import pytest
import torch
from test_hf_parity import answers_of, max_rel_err
from transformers import (
    AutoTokenizer,
    BartForConditionalGeneration,
    BertConfig,
    BertModel,
    BertTokenizerFast,
    DPRQuestionEncoder,
    RagRetriever,
    RagSequenceForGeneration,
    RagTokenForGeneration,
)

from ragbook import data
from ragbook import export as X
from ragbook.config import get_preset
from ragbook.generator import encode_targets, load_generator, token_logprobs
from ragbook.pipeline import RagModel
from ragbook.retriever import Encoder

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
RAG = {"sequence": RagSequenceForGeneration, "token": RagTokenForGeneration}


@pytest.fixture(scope="module")
def models(tiny_paper, tmp_path_factory):
    """(examples, {"dpr": RagModel, "minilm": RagModel}) over the tiny wiki_dpr passages."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGBOOK_CACHE", str(tmp_path_factory.mktemp("cache")))
        passages = data.load_wiki_dpr(tiny_paper.corpus)
        paper = get_preset("paper", query_encoder=tiny_paper.query_encoder,
                           doc_encoder=tiny_paper.doc_encoder, generator=tiny_paper.generator,
                           **tiny_paper.sizes)
        bert = tmp_path_factory.mktemp("bert")  # a plain BERT of the DPR encoder's sizes
        sizes = DPRQuestionEncoder.config_class.from_pretrained(tiny_paper.query_encoder)
        torch.manual_seed(0)
        BertModel(BertConfig(**{k: getattr(sizes, k) for k in (
            "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "intermediate_size", "max_position_embeddings", "initializer_range")})
        ).save_pretrained(bert)
        BertTokenizerFast.from_pretrained(tiny_paper.query_encoder).save_pretrained(bert)
        minilm = get_preset("tiny", query_encoder=str(bert), doc_encoder=str(bert),
                            generator=tiny_paper.generator, **tiny_paper.sizes)
        built = {name: RagModel.from_preset(p, passages=passages).eval()
                 for name, p in (("dpr", paper), ("minilm", minilm))}
        yield data.load_nq_open("train", tiny_paper.nq_open), built


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """Each model exported once per marginalization it is checked with."""
    _, built = models
    out = {}
    for name, m in (("dpr", "sequence"), ("dpr", "token"), ("minilm", "token")):
        path = tmp_path_factory.mktemp(f"export-{name}-{m}") / "out"
        notes = X.export_rag(built[name], path, m, about={
            "trained": {"task": "nq_open (tiny)", "steps": 0},
            "results": {"exact match": "0.5 (a figure the test hands over)"}})
        out[name, m] = path, notes
    return out


def _questions(examples):
    return [e.question for e in examples]


def test_the_generator_loads_as_bart_with_ragbook_token_logprobs(models, exported):
    examples, built = models
    path, _ = exported["dpr", "token"]
    model = built["dpr"]
    theirs = BartForConditionalGeneration.from_pretrained(path / "generator").eval()
    tokenizer = AutoTokenizer.from_pretrained(path / "generator")
    found = model.retrieve(_questions(examples))
    inputs = model.generator_inputs(_questions(examples), found.passages)
    targets = encode_targets(tokenizer, [e.answers[0] for e in examples], 6)
    assert torch.equal(targets["labels"], encode_targets(
        model.tokenizer, [e.answers[0] for e in examples], 6)["labels"])
    with torch.no_grad():
        ours = token_logprobs(model.generator, inputs["input_ids"], inputs["attention_mask"],
                              targets["labels"])
        peer = token_logprobs(theirs, inputs["input_ids"], inputs["attention_mask"],
                              targets["labels"])
    torch.testing.assert_close(peer, ours, rtol=1e-5, atol=1e-5)


def test_the_minilm_shaped_query_encoder_is_a_sentence_transformer(models, exported):
    from sentence_transformers import SentenceTransformer

    examples, built = models
    path, notes = exported["minilm", "token"]
    peer = SentenceTransformer(str(path / "query_encoder"), device="cpu")
    with torch.no_grad():
        ours = built["minilm"].query_encoder(_questions(examples)).numpy()
    np.testing.assert_allclose(peer.encode(_questions(examples)), ours, atol=1e-5)
    assert np.linalg.norm(ours, axis=1) == pytest.approx(1, abs=1e-5)  # Normalize included
    # no transformers RAG for it, and the reasons are said: pooling, normalisation, temperature
    assert not (path / "rag").exists() and len(notes) == 1
    for reason in ("mean", "normalises", "score_scale 20"):
        assert reason in notes[0]
    card = (path / "README.md").read_text()
    assert "temperature 20" in card and notes[0] in card


def test_the_dpr_query_encoder_and_passages_load_in_their_libraries(models, exported):
    examples, built = models
    path, notes = exported["dpr", "token"]
    model = built["dpr"]
    assert notes == []
    peer = DPRQuestionEncoder.from_pretrained(path / "query_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(path / "query_encoder")
    with torch.no_grad():
        q = peer(**tokenizer(_questions(examples), return_tensors="pt",
                             padding=True)).pooler_output
        torch.testing.assert_close(q, model.query_encoder(_questions(examples)),
                                   rtol=1e-5, atol=1e-5)
    passages = datasets.load_from_disk(str(path / "passages"))
    assert passages["id"] == [p.id for p in model.index.passages]
    np.testing.assert_array_equal(np.array(passages["embeddings"], dtype=np.float32),
                                  model.doc_vectors.numpy())
    index = faiss.read_index(str(path / "passages.faiss"))
    _, ids = index.search(q.numpy(), 3)
    np.testing.assert_array_equal(ids, model.index.search(q.numpy(), 3).indices)


def _transformers_rag(path, marginalization):
    retriever = RagRetriever.from_pretrained(path / "rag")
    model = RAG[marginalization].from_pretrained(path / "rag", retriever=retriever).eval()
    return model, retriever


@pytest.mark.parametrize("marginalization", ["sequence", "token"])
def test_transformers_rag_gives_ragbook_losses_through_its_own_retriever(models, exported,
                                                                         marginalization):
    """The exported RAG checkpoint, loaded by transformers, retrieves with its RagRetriever
    over the exported passages and index, and its loss is ragbook's Eq. 1 / Eq. 2 (every
    target here has ≥ 2 tokens with its end token: test_hf_parity's caveat does not apply)."""
    examples, built = models
    model = built["dpr"]
    path, _ = exported["dpr", marginalization]
    peer, retriever = _transformers_rag(path, marginalization)
    batch = retriever.question_encoder_tokenizer(_questions(examples), return_tensors="pt",
                                                 padding=True)
    targets = encode_targets(model.tokenizer, [e.answers[0] for e in examples], 6)
    assert (targets["target_mask"].sum(1) >= 2).all()
    start = model.generator.config.decoder_start_token_id
    hf_labels = torch.cat([torch.full((len(examples), 1), start), targets["labels"]], dim=1)
    with torch.no_grad():
        theirs = peer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      labels=hf_labels, reduce_loss=False).loss
        ours = model.loss(examples, marginalization, train_retriever=False)
    assert theirs.shape == ours.shape == (len(examples),)
    assert max_rel_err(ours, theirs) < 1e-5


def test_transformers_rag_token_greedy_answers_are_ragbook_s(models, exported):
    examples, built = models
    model = built["dpr"]
    path, _ = exported["dpr", "token"]
    peer, retriever = _transformers_rag(path, "token")
    questions = _questions(examples)
    batch = retriever.question_encoder_tokenizer(questions, return_tensors="pt", padding=True)
    eos, max_length = model.generator.config.eos_token_id, model.preset.max_target_length
    with torch.no_grad():
        sequences = peer.generate(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"], num_beams=1,
                                  max_length=max_length + 1, forced_eos_token_id=eos)
    ours = model.answer(questions, marginalization="token", num_beams=1)
    theirs = [model.tokenizer.decode(y, skip_special_tokens=True).strip()
              for y in answers_of(sequences)]
    assert [p.prediction for p in ours] == theirs
    assert len(set(theirs)) > 1  # not one answer for every question


def test_the_model_card_states_what_it_was_given_and_nothing_else(exported):
    path, _ = exported["dpr", "sequence"]
    card = (path / "README.md").read_text()
    facts = json.loads((path / "ragbook_export.json").read_text())
    assert "RAG-Sequence" in card and "Eq. 1" in card
    assert "exact match: 0.5 (a figure the test hands over)" in card
    assert "- task: nq_open (tiny)" in card and "RagSequenceForGeneration" in card
    assert facts["transformers_rag"] and facts["passages"] == 12
    assert facts["preset"]["pooling"] == "cls"
    bare = X.model_card({**facts, "trained": None, "results": None})
    assert "No evaluation was recorded" in bare and "exact match" not in bare


def test_a_transformers_rag_checkpoint_imports_into_ragbook(models, exported, tiny_paper,
                                                            tmp_path, monkeypatch):
    """The exported rag/ directory is RagSequenceForGeneration.save_pretrained's format, that
    of facebook/rag-sequence-nq: its question encoder, generator and settings come back."""
    examples, built = models
    path, _ = exported["dpr", "sequence"]
    lengths = {k: v for k, v in tiny_paper.sizes.items()  # n_docs, source: the checkpoint's
               if k in ("max_query_length", "max_passage_length", "max_target_length")}
    preset, marginalization = X.import_rag(path / "rag", tmp_path / "imported",
                                           doc_encoder=tiny_paper.doc_encoder, **lengths)
    assert marginalization == "sequence"
    assert (preset.name, preset.n_docs, preset.max_source_length) == ("paper", 3, 64)
    rag = RagSequenceForGeneration.from_pretrained(path / "rag").eval()
    encoder = Encoder(preset.query_encoder, preset.pooling, preset.normalize,
                      preset.max_query_length)
    generator, tokenizer = load_generator(preset.generator)
    questions = _questions(examples)
    with torch.no_grad():
        torch.testing.assert_close(encoder(questions), rag.question_encoder(
            **encoder.tokenize(questions)).pooler_output)
        ids = tokenizer(questions, return_tensors="pt", padding=True)
        dec = torch.full((len(questions), 1), generator.config.decoder_start_token_id)
        torch.testing.assert_close(generator(**ids, decoder_input_ids=dec).logits,
                                   rag.generator(**ids, decoder_input_ids=dec).logits)
    monkeypatch.setenv("RAGBOOK_CACHE", str(tmp_path / "cache"))
    imported = RagModel.from_preset(preset, passages=data.load_wiki_dpr(tiny_paper.corpus))
    with torch.no_grad():
        torch.testing.assert_close(imported.loss(examples, "sequence"),
                                   built["dpr"].loss(examples, "sequence"))


def test_the_export_command_refuses_a_bad_checkpoint_in_one_line(tmp_path, capsys):
    from ragbook import cli

    (tmp_path / "run" / "generator").mkdir(parents=True)
    code = cli.main(["export", "--checkpoint", str(tmp_path / "run"),
                     "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "no query_encoder directory" in err[0]
    assert not (tmp_path / "out").exists()
