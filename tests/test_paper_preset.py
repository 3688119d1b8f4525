"""The paper preset's path (DPR encoders, BART, nq_open, wiki_dpr passages), offline, on tiny
checkpoints saved locally (``tiny_paper`` in conftest.py), through the functions the notebooks
call; and the one-line failure when the hub is out of reach and nothing is local."""

import pytest
import torch

from ragbook import cli, data, rag
from ragbook import config as C
from ragbook.pipeline import RagModel
from ragbook.retriever import Encoder
from ragbook.train import RagTrainConfig, train_rag

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def paper(tiny_paper, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGBOOK_CACHE", str(tmp_path_factory.mktemp("cache")))
        preset = C.get_preset("paper", query_encoder=tiny_paper.query_encoder,
                              doc_encoder=tiny_paper.doc_encoder,
                              generator=tiny_paper.generator, **tiny_paper.sizes)
        passages = data.load_wiki_dpr(tiny_paper.corpus, n_passages=10)
        model = RagModel.from_preset(preset, passages=passages).eval()
        yield preset, passages, model


def test_the_paper_data_loads_from_local_copies(tiny_paper, tmp_path):
    passages = data.load_wiki_dpr(tiny_paper.corpus, n_passages=10)
    assert len(passages) == 10 and passages[0] == data.Passage(
        "1", "alpha", "alpha is the home of the red fox")
    tsv = tmp_path / "psgs_w100.tsv"  # DPR's own file, from which wiki_dpr is built
    tsv.write_text('id\ttext\ttitle\n1\t"the ""red"" fox"\talpha\n2\tthe owl\tbravo\n')
    assert data.load_wiki_dpr(tsv, n_passages=1) == [data.Passage("1", "alpha", 'the "red" fox')]
    train = data.load_nq_open("train", tiny_paper.nq_open)
    assert len(train) == 6 and train[0].answers == ["alpha"]
    assert len(data.load_nq_open("validation", tiny_paper.nq_open)) == 3
    with pytest.raises(data.DataError, match="no split 'test'"):
        data.load_nq_open("test", tiny_paper.nq_open)


def test_dpr_retrieval_scores_are_the_cls_inner_products(paper, tiny_paper):
    """doc_scores = d(z)ᵀq(x) with DPR's pooler_output ([CLS]) for both encoders, score_scale 1."""
    from transformers import DPRContextEncoder, DPRQuestionEncoder

    preset, passages, model = paper
    assert isinstance(model.query_encoder.model, DPRQuestionEncoder)
    questions = [e.question for e in data.load_nq_open("train", tiny_paper.nq_open)][:4]
    found = model.retrieve(questions)
    ctx = Encoder(preset.doc_encoder, "cls", max_length=preset.max_passage_length)
    assert isinstance(ctx.model, DPRContextEncoder)
    with torch.no_grad():
        q = model.query_encoder.model(**model.query_encoder.tokenize(questions)).pooler_output
        for i, row in enumerate(found.passages):
            batch = ctx.tokenize(ctx.passage_texts(row))
            d = ctx.model(**batch).pooler_output
            torch.testing.assert_close(found.doc_scores[i], d @ q[i], rtol=1e-5, atol=1e-5)
    assert found.doc_scores.shape == (4, preset.n_docs)
    assert (found.doc_scores[:, :-1] >= found.doc_scores[:, 1:]).all()  # best first


def test_both_losses_decoding_and_joint_training_run_on_the_paper_path(paper, tiny_paper):
    preset, passages, model = paper
    examples = data.load_nq_open("train", tiny_paper.nq_open)
    seq, tok = (model.loss(examples, m, train_retriever=False).detach() for m in
                ("sequence", "token"))
    assert seq.shape == tok.shape == (6,) and torch.isfinite(seq).all() and (seq > 0).all()
    assert (seq - tok).abs().max() > 1e-4  # k = 3 documents: Eq. 1 and Eq. 2 differ
    one = [model.loss(examples, m, n_docs=1, train_retriever=False).detach()
           for m in ("sequence", "token")]
    torch.testing.assert_close(*one)  # k = 1: the two models are one

    for m in ("sequence", "token"):
        predictions = model.answer([e.question for e in examples[:2]], marginalization=m,
                                   num_beams=2)
        assert len(predictions) == 2
        for p in predictions:
            assert len(p.provenance) == preset.n_docs
            assert sum(d["posterior"] for d in p.provenance) == pytest.approx(1, abs=1e-5)

    before = {n: t.clone() for n, t in model.query_encoder.named_parameters()}
    g_before = next(model.generator.parameters()).clone()
    state = train_rag(model, examples, RagTrainConfig(steps=3, batch_size=4, n_docs=3,
                                                      warmup=1), progress=False)
    assert [s for s, _ in state["history"]] == [1, 2, 3]
    moved = [n for n, t in model.query_encoder.named_parameters()
             if not torch.equal(t, before[n])]
    assert moved, "the DPR question encoder was not updated by joint training"
    assert not torch.equal(next(model.generator.parameters()), g_before)
    assert rag.log_prior(model.retrieve(["which town"]).doc_scores).exp().sum().item() == \
        pytest.approx(1, abs=1e-5)


@pytest.fixture
def no_hub(tmp_path, monkeypatch):
    """No network and an empty hub cache."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_without_hub_or_local_copy_the_paper_preset_fails_in_one_line(no_hub, tmp_path, capsys):
    """Checked before any work: transformers alone would retry the hub for minutes."""
    with pytest.raises(C.HubUnavailable) as err:
        C.get_preset("paper")
    message = str(err.value)
    for needed in ("facebook/dpr-question_encoder-single-nq-base",
                   "facebook/dpr-ctx_encoder-single-nq-base", "facebook/bart-large",
                   "HF_HUB_OFFLINE", "local directories", "save_pretrained"):
        assert needed in message
    with pytest.raises(C.HubUnavailable, match="facebook/bart-large"):
        Encoder("facebook/bart-large")  # the loading boundary checks too
    with pytest.raises(C.HubUnavailable, match="save_to_disk"):
        data.load_nq_open()
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"id": "1", "title": "t", "text": "some text"}\n')
    code = cli.main(["index", "--preset", "paper", "--corpus", str(corpus),
                     "--out", str(tmp_path / "index")])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err_lines) == 1 and err_lines[0].startswith("ragbook: error: ")
    assert not (tmp_path / "index").exists()


def test_a_missing_local_directory_is_not_mistaken_for_a_hub_id(no_hub, tmp_path):
    with pytest.raises(C.HubUnavailable, match="nowhere"):
        C.get_preset("paper", query_encoder=str(tmp_path / "nowhere"))
