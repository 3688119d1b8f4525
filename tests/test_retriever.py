"""The DPR bi-encoder, its loss and training, and the BM25 / rank-fusion baselines.

Everything runs on tiny random BERT and DPR checkpoints saved with ``save_pretrained`` in a
temporary directory (the paper preset's loading path); one test loads the real MiniLM.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from transformers import BertConfig, BertModel, BertTokenizer, DPRConfig

from ragbook import config as C
from ragbook import retriever as R
from ragbook.config import MINILM, get_preset, resolve_model
from ragbook.data import Example, Passage, SearchResult

N = 12  # toy articles
WORDS = [f"{c}{i}" for c in "abct" for i in range(N)] + "the cat sat on mat dog ran".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEXTS = ["the cat", "the cat sat on the mat", "dog", "the dog ran on the mat the cat sat", "mat"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _tokenizer(path) -> BertTokenizer:
    (path / "vocab.txt").write_text("\n".join(SPECIAL + WORDS) + "\n")
    tokenizer = BertTokenizer(vocab=str(path / "vocab.txt"))
    assert tokenizer.tokenize("the cat a0") == ["the", "cat", "a0"]  # a real vocabulary
    tokenizer.save_pretrained(path)
    return tokenizer


def _sizes() -> dict:
    return dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=16, num_hidden_layers=2,
                num_attention_heads=2, intermediate_size=32, max_position_embeddings=64)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tiny-bert")
    _tokenizer(path)
    torch.manual_seed(0)
    BertModel(BertConfig(**_sizes())).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_dpr(tmp_path_factory) -> dict[str, str]:
    """A DPRQuestionEncoder ([CLS] = pooler_output) and a DPRContextEncoder with a projection."""
    from transformers import DPRContextEncoder, DPRQuestionEncoder

    paths = {}
    for kind, cls, projection in (("question", DPRQuestionEncoder, 0),
                                  ("ctx", DPRContextEncoder, 8)):
        path = tmp_path_factory.mktemp(f"tiny-dpr-{kind}")
        _tokenizer(path)
        torch.manual_seed(0)
        cls(DPRConfig(**_sizes(), projection_dim=projection)).save_pretrained(path)
        paths[kind] = str(path)
    return paths


def _toy_task() -> tuple[list[Example], list[Passage]]:
    passages = [Passage(id=f"t{i}::0", title=f"t{i}", text=f"a{i} b{i} c{i}") for i in range(N)]
    passages += [Passage(id=f"t{i}::1", title=f"t{i}", text=f"c{i} the mat") for i in range(N)]
    examples = [Example(question=f"a{i} b{i}", answers=[f"t{i}"], article=f"t{i}")
                for i in range(N)]
    return examples, passages


# --------------------------------------------------------------------------- pooling, loading


def test_mean_and_cls_pooling_match_a_hand_computation(tiny_bert):
    mean = R.Encoder(tiny_bert, pooling="mean")
    cls = R.Encoder(tiny_bert, pooling="cls")
    assert (mean.dim, mean.name, mean.pooling, mean.normalize) == (16, tiny_bert, "mean", False)
    with torch.no_grad():
        v_mean, v_cls = mean(TEXTS), cls(TEXTS)
        for i, text in enumerate(TEXTS):  # each text alone: no padding at all
            ids = mean.tokenizer(text, return_tensors="pt")
            hidden = mean.model(**ids).last_hidden_state[0]
            torch.testing.assert_close(v_mean[i], hidden.mean(0), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(v_cls[i], hidden[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(v_mean, v_cls, atol=1e-3)


def test_normalize_gives_unit_vectors_and_bad_pooling_is_refused(tiny_bert):
    enc = R.Encoder(tiny_bert, pooling="cls", normalize=True)
    with torch.no_grad():
        norms = enc(TEXTS).norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(len(TEXTS)))
    with pytest.raises(ValueError, match="pooling"):
        R.Encoder(tiny_bert, pooling="max")


def test_dpr_checkpoints_load_through_encoder(tiny_dpr):
    from transformers import DPRContextEncoder, DPRQuestionEncoder

    q = R.Encoder(tiny_dpr["question"], pooling="cls")
    d = R.Encoder(tiny_dpr["ctx"], pooling="cls")
    assert isinstance(q.model, DPRQuestionEncoder) and isinstance(d.model, DPRContextEncoder)
    assert (q.dim, d.dim) == (16, 8)  # the context encoder projects to projection_dim
    with torch.no_grad():
        batch = q.tokenize(TEXTS)
        torch.testing.assert_close(q(TEXTS), q.model(**batch).pooler_output)
        torch.testing.assert_close(d(TEXTS), d.model(**d.tokenize(TEXTS)).pooler_output)
        # DPR's pooler_output without projection is the raw [CLS] state, as in the paper
        hidden = q.model.question_encoder.bert_model(**batch).last_hidden_state
        torch.testing.assert_close(q(TEXTS), hidden[:, 0])
        assert R.Encoder(tiny_dpr["question"], pooling="mean")(TEXTS).shape == (5, 16)


def test_encode_equals_forward_in_the_original_order(tiny_bert):
    enc = R.Encoder(tiny_bert, pooling="mean", normalize=True)
    assert not enc.training and not enc.model.training
    with torch.no_grad():
        expected = enc(TEXTS).numpy()
    got = enc.encode(TEXTS, batch_size=2, progress=False)  # sorted by length, 3 batches
    assert got.dtype == np.float32 and got.shape == (5, 16)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    assert enc.encode([], progress=False).shape == (0, 16)
    with torch.no_grad():  # encode() leaves the encoder as it found it: dropout off
        torch.testing.assert_close(enc(TEXTS).numpy(), expected)


def test_passages_are_read_as_title_sep_text(tiny_bert):
    enc = R.Encoder(tiny_bert)
    texts = enc.passage_texts([Passage("x::0", "dog", "the cat"), Passage("y", "", "mat")])
    assert texts == ["dog [SEP] the cat", "mat"]
    ids = enc.tokenizer(texts[0])["input_ids"]
    assert enc.tokenizer.convert_ids_to_tokens(ids) == ["[CLS]", "dog", "[SEP]", "the", "cat",
                                                        "[SEP]"]


def test_minilm_mean_pooling_equals_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    enc = R.Encoder(MINILM, pooling="mean", normalize=True, max_length=128)
    peer = SentenceTransformer(resolve_model(MINILM), device="cpu")
    peer.max_seq_length = 128
    expected = peer.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(enc.encode(TEXTS, progress=False), expected, atol=1e-5)


needs_bf16 = pytest.mark.skipif(not C.bf16_supported("cpu"),
                                reason="this CPU has no native bf16 (AVX512-BF16 or AMX)")


def test_bf16_is_off_when_asked_and_where_the_hardware_lacks_it(monkeypatch):
    monkeypatch.setenv("RAGBOOK_BF16", "0")
    assert not C.bf16_supported("cpu") and not C.autocast("cpu")._enabled
    monkeypatch.setenv("RAGBOOK_BF16", "1")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert not C.bf16_supported("cpu") and not C.autocast("cpu")._enabled
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    assert C.bf16_supported("cpu") and C.autocast("cpu").fast_dtype == torch.bfloat16


@needs_bf16
def test_passages_are_encoded_in_bf16_with_minilm_vectors_equal_to_fp32(monkeypatch):
    """bf16 products with fp32 accumulation: the same directions, to cosine 0.9999; questions
    stay in fp32."""
    enc = R.Encoder(MINILM, pooling="mean", normalize=True, max_length=128)
    passages = [Passage(f"p{i}", "", t) for i, t in enumerate(TEXTS)]  # read as the text alone
    exact = enc.encode(TEXTS, progress=False)
    np.testing.assert_array_equal(enc.encode_passages(passages, progress=False), exact)
    monkeypatch.setenv("RAGBOOK_BF16", "1")
    with torch.inference_mode(), C.autocast("cpu"):
        assert enc(TEXTS[:1]).dtype == torch.float32  # layer norms and pooling in fp32
        assert enc.backbone(**enc.tokenize(TEXTS[:1])).pooler_output.dtype == torch.bfloat16
    fast = enc.encode_passages(passages, progress=False)  # BERT_d: bf16 where native
    assert fast.dtype == np.float32 and not np.array_equal(fast, exact)
    assert (np.sum(fast * exact, axis=1) > 0.9999).all()
    np.testing.assert_array_equal(enc.encode(TEXTS, progress=False), exact)  # questions: fp32


# --------------------------------------------------------------------------- scores and loss


def test_doc_scores_shapes_and_scale():
    torch.manual_seed(0)
    q, d = torch.randn(3, 4), torch.randn(5, 4)
    s = R.doc_scores(q, d, scale=2.0)
    assert s.shape == (3, 5)
    torch.testing.assert_close(s[1, 2], 2.0 * (q[1] * d[2]).sum())
    per_question = d[:2].expand(3, 2, 4)  # each question's own k=2 passages
    torch.testing.assert_close(R.doc_scores(q, per_question, 2.0), s[:, :2])


def test_dpr_loss_equals_a_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    d = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    # scores = q dᵀ = [[2, 1], [0, 1]]; row 0's positive is column 0, row 1's column 1
    expected = -(np.log(np.exp(2) / (np.exp(2) + np.exp(1))) + np.log(np.exp(1) / (1 + np.exp(1))))
    assert R.dpr_loss(q, d).item() == pytest.approx(expected / 2, rel=1e-6)
    h = torch.tensor([[0.0, 3.0]])  # a hard negative: one more column for every question
    with_h = -(np.log(np.exp(2) / (np.exp(2) + np.exp(1) + 1))
               + np.log(np.exp(1) / (1 + np.exp(1) + np.exp(3))))
    assert R.dpr_loss(q, d, hard_negatives=h).item() == pytest.approx(with_h / 2, rel=1e-6)
    assert R.dpr_loss(q, d, scale=3.0).item() == pytest.approx(
        F.cross_entropy(3.0 * q @ d.T, torch.arange(2)).item())


def test_dpr_loss_is_minimised_by_aligned_pairs():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(8, 16), dim=-1)
    aligned = R.dpr_loss(q, q, scale=20.0)
    shuffled = R.dpr_loss(q, q[torch.randperm(8)], scale=20.0)
    assert aligned < 0.1 < shuffled


# --------------------------------------------------------------------------- training


def test_training_reduces_the_loss_and_is_deterministic(tiny_bert):
    examples, passages = _toy_task()

    def run(seed, **kw):
        torch.manual_seed(123)  # the starting point must not depend on the training seed
        q = R.Encoder(tiny_bert, pooling="mean", normalize=True)
        vectors = R.Encoder(tiny_bert, pooling="mean", normalize=True).encode_passages(
            passages, progress=False)
        history = R.train_query_encoder(q, examples, passages, steps=40, batch_size=6, lr=3e-3,
                                        scale=10.0, passage_vectors=vectors, seed=seed,
                                        progress=False, **kw)
        return history, q

    history, q = run(0)
    assert len(history) == 40
    assert np.mean(history[-5:]) < 0.5 * np.mean(history[:5])
    assert not q.training
    history_again, q_again = run(0)
    assert history_again == history
    for a, b in zip(q.parameters(), q_again.parameters()):
        assert torch.equal(a, b)
    assert run(1)[0] != history


def test_training_both_encoders_with_hard_negatives(tiny_bert):
    examples, passages = _toy_task()
    q = R.Encoder(tiny_bert, pooling="cls", normalize=True)
    d = R.Encoder(tiny_bert, pooling="cls", normalize=True)
    before = [p.clone() for p in d.parameters()]
    history = R.train_query_encoder(q, examples, passages, steps=30, batch_size=4, lr=3e-3,
                                    scale=10.0, doc_encoder=d, hard_negatives=True,
                                    progress=False)
    assert np.mean(history[-5:]) < np.mean(history[:5])
    assert any(not torch.equal(a, b) for a, b in zip(before, d.parameters()))  # d trained too
    with pytest.raises(ValueError, match="passage_vectors"):
        R.train_query_encoder(q, examples, passages, steps=1, batch_size=2, progress=False)


def test_bm25_hard_negatives_are_never_from_the_gold_article():
    examples, passages = _toy_task()
    pairs = R._positive_passages(examples, passages)
    assert pairs[3] == ("a3 b3", 3)  # the first passage of article t3
    negatives = R._bm25_hard_negatives(pairs, passages)
    assert all(passages[n].title != passages[p].title for (_, p), n in zip(pairs, negatives))


def test_dense_hard_negatives_skip_every_passage_of_the_gold_article():
    vectors = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.8, 0.2], [0.0, 1.0]])
    article_of = torch.tensor([0, 0, 1, 2])  # passages 0 and 1 belong to the same article
    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # question 0 (gold: passage 0) would rank passage 1 next, but it is the same article
    assert R._dense_hard_negatives(q, [0, 3], vectors, article_of) == [2, 2]


def test_training_with_dense_hard_negatives_runs_and_checks_its_arguments(tiny_bert):
    examples, passages = _toy_task()
    q = R.Encoder(tiny_bert, pooling="mean", normalize=True)
    vectors = q.encode_passages(passages, progress=False)
    history = R.train_query_encoder(q, examples, passages, steps=3, batch_size=4, lr=1e-3,
                                    scale=10.0, passage_vectors=vectors,
                                    hard_negatives="dense", progress=False)
    assert len(history) == 3 and history[0] > 0
    with pytest.raises(ValueError, match="hard_negatives"):
        R.train_query_encoder(q, examples, passages, steps=1, batch_size=2,
                              passage_vectors=vectors, hard_negatives="random", progress=False)
    with pytest.raises(ValueError, match="passage_vectors"):  # dense mining needs the index
        R.train_query_encoder(q, examples, passages, steps=1, batch_size=2, doc_encoder=q,
                              hard_negatives="dense", progress=False)


# --------------------------------------------------------------------------- caching


def test_passage_embeddings_are_cached_per_corpus(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGBOOK_CACHE", str(tmp_path))
    preset = get_preset(query_encoder=tiny_bert, doc_encoder=tiny_bert, max_passage_length=32)
    _, passages = _toy_task()
    vectors = R.passage_embeddings(preset, passages, progress=False)
    assert vectors.shape == (len(passages), 16)
    expected = R.Encoder(tiny_bert, "mean", True).encode_passages(passages, progress=False)
    np.testing.assert_allclose(vectors, expected, atol=1e-5)

    def fail(*args, **kwargs):
        raise AssertionError("rebuilt a cached artifact")

    monkeypatch.setattr(R.Encoder, "encode_passages", fail)
    np.testing.assert_array_equal(R.passage_embeddings(preset, passages), vectors)
    changed = passages[:-1] + [Passage(passages[-1].id, passages[-1].title, "a0 changed")]
    assert R.corpus_fingerprint(changed) != R.corpus_fingerprint(passages)
    with pytest.raises(AssertionError, match="rebuilt"):
        R.passage_embeddings(preset, changed)
    monkeypatch.setenv("RAGBOOK_BF16", "1")  # bf16 vectors are another artifact
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)
    with pytest.raises(AssertionError, match="rebuilt"):
        R.passage_embeddings(preset, passages)


def test_trained_query_encoder_is_a_cached_recipe(tiny_bert, tmp_path, monkeypatch):
    monkeypatch.setenv("RAGBOOK_CACHE", str(tmp_path))
    examples, passages = _toy_task()
    monkeypatch.setattr(R, "load_corpus", lambda: passages)
    monkeypatch.setattr(R, "load_task", lambda task, split, seed: examples)
    preset = get_preset(query_encoder=tiny_bert, doc_encoder=tiny_bert, max_passage_length=32,
                        score_scale=10.0)
    trained = R.trained_query_encoder(preset, steps=20, batch_size=4, lr=3e-3, progress=False)
    assert trained.name.startswith(str(tmp_path)) and trained.pooling == "mean"
    start = R.Encoder(tiny_bert, "mean", True)
    assert not torch.equal(trained.model.embeddings.word_embeddings.weight,
                           start.model.embeddings.word_embeddings.weight)
    monkeypatch.setattr(R, "train_query_encoder", lambda *a, **k: pytest.fail("retrained"))
    again = R.trained_query_encoder(preset, steps=20, batch_size=4, lr=3e-3, progress=False)
    assert again.name == trained.name

    # the fine-tuned BERT_q still belongs to the index built with the encoder it started from
    from ragbook.data import DataError
    from ragbook.index import DenseIndex

    assert trained.trained_from == [tiny_bert]
    index = DenseIndex.build(start.encode_passages(passages, progress=False), passages,
                             metadata={"encoder": tiny_bert, "pooling": "mean"}, progress=False)
    index.check_encoder(trained)
    other = DenseIndex.build(start.encode_passages(passages, progress=False), passages,
                             metadata={"encoder": "another-model", "pooling": "mean"},
                             progress=False)
    with pytest.raises(DataError, match="meaningless"):
        other.check_encoder(trained)


# --------------------------------------------------------------------------- BM25 and rank fusion


def test_bm25_finds_the_passage_with_the_exact_term():
    passages = [Passage("0", "Cats", "The cat sat on the mat."),
                Passage("1", "Paris", "Paris is the capital and largest city of France."),
                Passage("2", "Zebra", "Zebras are African equines with black and white stripes."),
                Passage("3", "Dogs", "The dog is a domesticated descendant of the wolf.")]
    result = R.BM25Retriever(passages).search(["striped african equines", "capital of France"],
                                              k=2)
    assert isinstance(result, SearchResult)
    assert [row[0] for row in result.ids] == ["2", "1"]
    assert result.indices.tolist()[0][0] == 2 and result.passages[1][0].title == "Paris"
    assert result.scores.shape == (2, 2) and result.scores[0, 0] > result.scores[0, 1]
    assert R.BM25Retriever(passages).search(["cat"], k=10).indices.shape == (1, 4)


def _ranking(passages, rows) -> SearchResult:
    return SearchResult(ids=[[passages[j].id for j in r] for r in rows],
                        passages=[[passages[j] for j in r] for r in rows],
                        scores=np.zeros((len(rows), len(rows[0])), np.float32),
                        indices=np.array(rows))


def test_reciprocal_rank_fusion_on_a_hand_example():
    passages = [Passage(str(i), f"T{i}", f"text {i}") for i in range(5)]
    dense = _ranking(passages, [[0, 1, 2]])
    sparse = _ranking(passages, [[2, 3, 0]])
    fused = R.reciprocal_rank_fusion([dense, sparse], k=4, rrf_k=1.0)
    # 0: 1/2 + 1/4 = .75;  2: 1/4 + 1/2 = .75;  1: 1/3;  3: 1/3; ties keep first appearance
    assert fused.indices.tolist() == [[0, 2, 1, 3]]
    np.testing.assert_allclose(fused.scores, [[0.75, 0.75, 1 / 3, 1 / 3]], rtol=1e-6)
    assert fused.ids == [["0", "2", "1", "3"]] and fused.passages[0][1] is passages[2]
    fused60 = R.reciprocal_rank_fusion([dense, _ranking(passages, [[4, 2, 3]])], k=2)
    assert fused60.indices.tolist() == [[2, 0]]  # in both lists beats first in one
    padded = _ranking(passages, [[1, -1, -1]])  # an index with too few vectors pads with -1
    assert R.reciprocal_rank_fusion([padded], k=1).indices.tolist() == [[1]]


class _ExactIndex:
    """Brute-force MIPS with ragbook's result type (the index chapter's flat index)."""

    def __init__(self, vectors, passages):
        self.vectors, self.passages = vectors, passages

    def search(self, q, k):
        scores = q @ self.vectors.T
        idx = np.argsort(-scores, axis=1)[:, :k]
        return SearchResult.from_indices(self.passages, idx, np.take_along_axis(scores, idx, 1))


def test_dense_and_fusion_retrievers_share_the_result_type(tiny_bert):
    examples, passages = _toy_task()
    q = R.Encoder(tiny_bert, "mean", True)
    vectors = q.encode_passages(passages, progress=False)
    dense = R.DenseRetriever(q, _ExactIndex(vectors, passages))
    questions = [e.question for e in examples[:3]]
    d = dense.search(questions, k=4)
    q_vectors = q.encode(questions, progress=False)
    np.testing.assert_allclose(d.scores[1], vectors[d.indices[1]] @ q_vectors[1], atol=1e-5)
    assert d.indices.shape == (3, 4) and np.all(np.diff(d.scores, axis=1) <= 1e-6)
    fusion = R.FusionRetriever([dense, R.BM25Retriever(passages)], depth=10)
    h = fusion.search(questions, k=3)
    assert isinstance(h, SearchResult) and h.indices.shape == (3, 3)
    # BM25 matches "a3 b3" exactly, so the fusion puts the gold passage first
    assert [row[0] for row in h.ids] == ["t0::0", "t1::0", "t2::0"]
