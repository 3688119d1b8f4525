"""DenseIndex: exact and approximate MIPS, save/load, every refusal, hot-swap."""

import json
from dataclasses import dataclass

import numpy as np
import pytest

from ragbook.data import DataError, Passage, SearchResult, corpus_fingerprint
from ragbook.index import DenseIndex, PassageFile, default_params

DIM, N, K = 32, 3000, 10
META = {"encoder": "enc-a", "pooling": "mean", "normalize": True}


@dataclass
class FakeEncoder:
    name: str
    dim: int
    pooling: str = "mean"


def clustered(n: int, seed: int, dim: int = DIM) -> np.ndarray:
    """Unit vectors around 30 centres: structured like real embeddings, unlike pure noise."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).standard_normal((30, dim))
    x = centres[rng.integers(0, 30, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def corpus(n: int, prefix: str = "p") -> list[Passage]:
    return [Passage(id=f"{prefix}{i}", title=f"T{i // 3}", text=f"text {prefix} {i}")
            for i in range(n)]


@pytest.fixture(scope="module", autouse=True)
def one_faiss_thread():
    """FAISS's OpenMP threads stall each other on a loaded machine (benchmarks/README.md);
    these tests are small, so one thread it is."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def vectors():
    return clustered(N, 0)


@pytest.fixture(scope="module")
def queries():
    return clustered(50, 1)


@pytest.fixture(scope="module")
def exact(vectors, queries):
    return np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :K]


@pytest.fixture(scope="module")
def flat(vectors):
    return DenseIndex.build(vectors, corpus(N), kind="flat", metadata=META, progress=False)


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def test_flat_equals_brute_force_numpy(flat, vectors, queries, exact):
    result = flat.search(queries, K)
    assert isinstance(result, SearchResult)
    assert result.scores.shape == result.indices.shape == (50, K)
    assert result.scores.dtype == np.float32 and result.indices.dtype == np.int64
    assert recall(result.indices, exact) == 1.0
    np.testing.assert_allclose(result.scores, np.take_along_axis(queries @ vectors.T,
                                                                  result.indices, 1), rtol=1e-5)
    assert result.ids[0] == [f"p{j}" for j in result.indices[0]]
    assert [p.id for p in result.passages[3]] == result.ids[3]
    assert np.all(np.diff(result.scores, axis=1) <= 1e-6)  # best first
    one = flat.search(queries[0], 3)  # a single query vector works too
    assert one.indices.shape == (1, 3) and list(one.indices[0]) == list(exact[0, :3])


@pytest.mark.parametrize("kind,rerank,minimum", [("hnsw", True, 0.95), ("ivfpq", False, 0.3),
                                                 ("ivfpq", True, 0.9)])
def test_approximate_indexes_reach_sensible_recall(vectors, queries, exact, kind, rerank,
                                                   minimum):
    index = DenseIndex.build(vectors, corpus(N), kind=kind, rerank=rerank, metadata=META,
                             progress=False)
    assert recall(index.search(queries, K).indices, exact) >= minimum
    if kind == "ivfpq":
        assert index.metadata["rerank"] is rerank
        flat_bytes = DenseIndex.build(vectors, corpus(N), progress=False).nbytes()
        assert index.nbytes(rerank_vectors=False) < flat_bytes / 3
        assert (index.nbytes() > flat_bytes) is rerank  # re-ranking keeps the raw vectors


def test_reranking_beats_pq_alone_and_search_params_tune_recall(vectors, queries, exact):
    index = DenseIndex.build(vectors, corpus(N), kind="ivfpq", rerank=True, progress=False)
    index.set_search_params(nprobe=1, k_factor=1)
    low = recall(index.search(queries, K).indices, exact)
    index.set_search_params(nprobe=index.metadata["params"]["nlist"], k_factor=16)
    high = recall(index.search(queries, K).indices, exact)
    assert high > low and high >= 0.95


def test_default_params_are_sane():
    p = default_params("ivfpq", 1_000_000, 384)
    assert p["pq_m"] == 48 and p["nbits"] == 8 and 1000 <= p["nlist"] <= 8000
    small = default_params("ivfpq", 500, 30)
    assert small["nlist"] * 39 <= 500 and 30 % small["pq_m"] == 0 and 2 ** small["nbits"] <= 500
    with pytest.raises(ValueError, match="unknown index kind"):
        default_params("lsh", 10, 8)


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
def test_save_load_round_trip_gives_identical_results(tmp_path, vectors, queries, kind):
    index = DenseIndex.build(vectors[:1000], corpus(1000), kind=kind, metadata=META,
                             progress=False)
    index.save(tmp_path / "ix")
    meta = json.loads((tmp_path / "ix" / "meta.json").read_text())
    assert meta["encoder"] == "enc-a" and meta["dim"] == DIM and meta["kind"] == kind
    assert meta["metric"] == "inner_product" and meta["count"] == 1000
    assert meta["fingerprint"] == corpus_fingerprint(corpus(1000))
    a = index.search(queries, K)
    for mmap in (False, True):  # read into memory, or mapped from disk: the same answers
        loaded = DenseIndex.load(tmp_path / "ix", encoder=FakeEncoder("enc-a", DIM), mmap=mmap)
        b = loaded.search(queries, K)
        np.testing.assert_array_equal(a.indices, b.indices)
        np.testing.assert_array_equal(a.scores, b.scores)
        assert a.ids == b.ids and list(loaded.passages) == index.passages
        assert isinstance(loaded.passages, PassageFile) == mmap  # mapped: left on disk


def test_a_mapped_index_reads_its_passages_from_disk_as_asked(tmp_path, vectors):
    passages = corpus(20) + [Passage("ü", "Zürich — “quoted”", "line\nbreak\ttab")]
    DenseIndex.build(vectors[:21], passages, metadata=META, progress=False).save(tmp_path)
    on_disk = DenseIndex.load(tmp_path, mmap=True).passages
    assert len(on_disk) == 21 and on_disk[-1] == passages[-1] == on_disk[20]
    assert on_disk[3:6] == passages[3:6] and on_disk[-2] == passages[19]
    with pytest.raises(IndexError):
        on_disk[21]
    (tmp_path / "passages.offsets.npy").write_bytes(b"")  # the offsets are checksummed too
    with pytest.raises(DataError, match="passages.offsets.npy.*truncated or replaced"):
        DenseIndex.load(tmp_path, mmap=True)
    # an index saved before the offsets file existed still opens, its passages read whole
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["files"]["passages.offsets.npy"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    (tmp_path / "passages.offsets.npy").unlink()
    older = DenseIndex.load(tmp_path, mmap=True)
    assert isinstance(older.passages, list) and older.passages == passages


@pytest.fixture
def saved(tmp_path, vectors):
    DenseIndex.build(vectors[:200], corpus(200), metadata=META, progress=False).save(tmp_path)
    return tmp_path


def test_load_refuses_a_query_encoder_with_another_name(saved):
    with pytest.raises(DataError, match="built with encoder 'enc-a'.*query encoder is 'enc-b'"):
        DenseIndex.load(saved, encoder=FakeEncoder("enc-b", DIM))


def test_load_refuses_a_query_encoder_with_another_dimension(saved):
    with pytest.raises(DataError, match="gives 768-dimensional vectors.*rebuild"):
        DenseIndex.load(saved, encoder=FakeEncoder("enc-a", 768))


def test_load_accepts_the_declared_query_encoder(tmp_path, vectors):
    meta = {**META, "query_encoder": "question-enc"}
    DenseIndex.build(vectors[:100], corpus(100), metadata=meta, progress=False).save(tmp_path)
    DenseIndex.load(tmp_path, encoder=FakeEncoder("question-enc", DIM))


def test_load_refuses_a_truncated_index_file(saved):
    path = saved / "index.faiss"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataError, match="truncated"):
        DenseIndex.load(saved)


def test_load_refuses_corrupted_bytes(saved):
    path = saved / "index.faiss"
    blob = bytearray(path.read_bytes())
    blob[50:60] = b"\xff" * 10
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="checksum mismatch, the file is corrupted"):
        DenseIndex.load(saved)


def test_load_refuses_edited_passages(saved):
    path = saved / "passages.jsonl"
    path.write_text(path.read_text().replace("text p 7", "text p 8"))
    with pytest.raises(DataError, match="corrupted"):
        DenseIndex.load(saved)


@pytest.mark.parametrize("name", ["meta.json", "index.faiss", "passages.jsonl"])
def test_load_refuses_a_missing_file(saved, name):
    (saved / name).unlink()
    with pytest.raises(DataError, match=f"{name} is missing"):
        DenseIndex.load(saved)
    with pytest.raises(DataError, match="no such index directory"):
        DenseIndex.load(saved / "nowhere")


def test_build_refuses_an_empty_corpus_and_misaligned_vectors(vectors):
    with pytest.raises(DataError, match="empty corpus"):
        DenseIndex.build(np.zeros((0, DIM), np.float32), [], progress=False)
    with pytest.raises(ValueError, match="one vector per passage"):
        DenseIndex.build(vectors[:10], corpus(9), progress=False)
    with pytest.raises(ValueError, match="unknown index kind"):
        DenseIndex.build(vectors[:10], corpus(10), kind="annoy", progress=False)


def test_search_refuses_queries_of_the_wrong_dimension(flat):
    with pytest.raises(ValueError, match=r"shape \(n, 32\)"):
        flat.search(np.zeros((2, 16), np.float32), 3)


def test_swap_changes_what_is_found(tmp_path, vectors, queries):
    old = DenseIndex.build(vectors[:500], corpus(500, "old"), metadata=META, progress=False)
    new = clustered(500, 7)
    new[:50] = queries  # the new corpus holds passages right on top of each question
    DenseIndex.build(new, corpus(500, "new"), metadata=META, progress=False).save(tmp_path)
    assert old.search(queries, 1).ids[0][0].startswith("old")
    swapped = old.swap(tmp_path)
    result = swapped.search(queries, 1)
    assert [ids[0] for ids in result.ids] == [f"new{i}" for i in range(50)]
    assert swapped.passages[0].id == "new0" and swapped.encoder == "enc-a"
    assert old.search(queries, 1).ids[0][0].startswith("old")  # the old index can come back


def test_swap_refuses_another_vector_space(flat, vectors):
    other = DenseIndex.build(vectors[:100], corpus(100), metadata={**META, "encoder": "enc-b"},
                             progress=False)
    with pytest.raises(DataError, match="cannot swap.*encoder"):
        flat.swap(other)
    wide = DenseIndex.build(np.ones((5, 8), np.float32), corpus(5), metadata=META,
                            progress=False)
    with pytest.raises(DataError, match="cannot swap.*dim"):
        flat.swap(wide)
    assert len(flat) == N and flat.encoder == "enc-a"  # unchanged after a refusal


@pytest.mark.parametrize("mmap", [False, True])
def test_fewer_than_k_found_leaves_padding_out_of_ids_and_passages(vectors, queries, mmap,
                                                                  tmp_path):
    index = DenseIndex.build(vectors, corpus(N), kind="ivfpq", rerank=False, progress=False)
    if mmap:  # the passages looked up on disk
        index = DenseIndex.load(index.save(tmp_path), mmap=True)
    index.set_search_params(nprobe=1)  # one cell holds fewer than k = 500 vectors
    result = index.search(queries[:5], 500)
    missing = result.indices < 0
    assert missing.any() and np.isneginf(result.scores[missing]).all()
    for row, ids, passages in zip(result.indices, result.ids, result.passages):
        assert ids == [f"p{j}" for j in row if j >= 0] == [p.id for p in passages]


def test_corpus_index_is_built_once_then_loaded(tmp_path, monkeypatch):
    from ragbook import data, retriever
    from ragbook.index import corpus_index

    n_passages = len(data.load_corpus())
    calls = []

    def fake_embeddings(preset, passages=None, progress=True):
        calls.append(preset.name)
        return clustered(n_passages, 5)

    monkeypatch.setenv("RAGBOOK_CACHE", str(tmp_path))
    monkeypatch.setattr(retriever, "passage_embeddings", fake_embeddings)
    first = corpus_index("tiny", kind="flat", progress=False)
    second = corpus_index("tiny", kind="flat", progress=False)
    assert calls == ["tiny"] and len(first) == len(second) == n_passages
    assert first.metadata["encoder"] == second.metadata["encoder"] == "all-MiniLM-L6-v2"
    assert second.search(clustered(3, 9), 4).ids == first.search(clustered(3, 9), 4).ids


def test_bm25_saves_and_loads_without_re_indexing(tmp_path, monkeypatch):
    from ragbook.index import load_bm25, open_index, save_bm25
    from ragbook.retriever import BM25Retriever

    passages = [Passage(f"p{i}", f"T{i}", f"text about topic{i} and word{i % 3}")
                for i in range(30)]
    bm25 = BM25Retriever(passages)
    save_bm25(bm25, tmp_path / "bm")
    questions = ["topic7", "word2 topic11"]
    monkeypatch.setattr("bm25s.BM25.index", lambda *a, **k: pytest.fail("re-indexed"))
    for loaded in (load_bm25(tmp_path / "bm"), open_index(tmp_path / "bm")):
        assert isinstance(loaded, BM25Retriever) and loaded.passages == passages
        again, first = loaded.search(questions, 5), bm25.search(questions, 5)
        assert again.ids == first.ids and again.ids[0][0] == "p7"
        np.testing.assert_allclose(again.scores, first.scores)
    path = tmp_path / "bm" / "passages.jsonl"
    path.write_text(path.read_text().replace("topic7", "topic8"))
    with pytest.raises(DataError, match="do not match the index; rebuild"):
        load_bm25(tmp_path / "bm")
    (tmp_path / "bm" / "meta.json").unlink()
    with pytest.raises(DataError, match="BM25 index is incomplete"):
        load_bm25(tmp_path / "bm")


def test_open_index_refuses_what_it_cannot_read(tmp_path):
    from ragbook.index import open_index

    with pytest.raises(DataError, match="no such index directory"):
        open_index(tmp_path / "nowhere")
    for meta, message in (({"retriever": "hybrid"}, "--retriever fusion"),
                          ({"retriever": "sparse"}, "unknown retriever 'sparse'"),
                          ([1, 2], "unreadable metadata")):
        (tmp_path / "meta.json").write_text(json.dumps(meta))
        with pytest.raises(DataError, match=message):
            open_index(tmp_path)
