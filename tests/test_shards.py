"""Streamed shard builds (ragbook.shards): the same search as a one-shot IVF-PQ, resumable."""

import weakref

import numpy as np
import pytest
from test_index import DIM, META, K, clustered, corpus  # the same structured toy vectors

from ragbook import shards
from ragbook.data import DataError
from ragbook.index import DenseIndex, PassageFile, default_params

N, SHARD = 3000, 700  # five shards, the last one short


@pytest.fixture(scope="module")
def vectors():
    return clustered(N, 0)


@pytest.fixture(scope="module")
def queries():
    return clustered(50, 1)


def _source(vectors, calls=None, fail_at=None):
    given = []  # weak references to the shards handed to the build

    def shard_vectors(start, end):
        # one shard in memory at a time: the build has let go of the last one
        assert all(ref() is None for ref in given), "the previous shard is still held"
        if calls is not None:
            calls.append(start)
        if start == fail_at:
            raise KeyboardInterrupt  # the build is stopped while encoding this shard
        shard = vectors[start:end]
        given.append(weakref.ref(shard))
        return shard
    return shard_vectors


@pytest.fixture(scope="module")
def streamed(vectors, tmp_path_factory):
    directory = tmp_path_factory.mktemp("streamed")
    return directory, shards.streamed_index(_source(vectors), corpus(N), DIM, directory, SHARD,
                                            META, progress=False)


def test_a_streamed_build_searches_like_a_one_shot_ivfpq(vectors, queries, streamed):
    directory, index = streamed
    one_shot = DenseIndex.build(vectors, corpus(N), kind="ivfpq", metadata=META, rerank=True,
                                progress=False)
    assert index.metadata["params"] == one_shot.metadata["params"]
    assert index.metadata["params"] == {**default_params("ivfpq", N, DIM)}
    want, got = one_shot.search(queries, K), index.search(queries, K)
    assert (got.indices == want.indices).mean() >= 0.99  # the same codes, re-ranked the same
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-5)
    assert got.ids[0] == [f"p{i}" for i in got.indices[0]]
    assert sorted(p.name for p in directory.iterdir()) == [
        "index.faiss", "index.ivfdata", "meta.json", "passages.jsonl", "passages.offsets.npy",
        "vectors.npy"]
    reopened = DenseIndex.load(directory)  # opened again: the same results
    assert (reopened.search(queries, K).indices == got.indices).all()
    assert isinstance(index.rerank_vectors, np.memmap)
    # built to outgrow memory, so opened mapped: the vectors and the passages stay on disk
    assert isinstance(reopened.rerank_vectors, np.memmap)
    assert isinstance(reopened.passages, PassageFile)
    reopened.set_search_params(k_factor=1)  # no re-ranking depth: PQ's order, lower scores
    assert reopened.search(queries, K).scores.sum() < got.scores.sum()


def test_an_interrupted_build_resumes_from_the_last_finished_shard(vectors, queries, streamed,
                                                                    tmp_path):
    calls = []
    with pytest.raises(KeyboardInterrupt):
        shards.streamed_index(_source(vectors, calls, fail_at=2 * SHARD), corpus(N), DIM,
                              tmp_path, SHARD, META, progress=False)
    assert calls == [0, SHARD, 2 * SHARD]
    assert not (tmp_path / "meta.json").exists()  # not an index yet
    with pytest.raises(DataError, match="other settings"):
        shards.streamed_index(_source(vectors), corpus(N), DIM, tmp_path, SHARD + 1, META,
                              progress=False)
    calls.clear()
    index = shards.streamed_index(_source(vectors, calls), corpus(N), DIM, tmp_path, SHARD,
                                  META, progress=False)
    assert calls == [2 * SHARD, 3 * SHARD, 4 * SHARD]  # the finished shards are not redone
    assert (index.search(queries, K).indices == streamed[1].search(queries, K).indices).all()


def test_a_changed_sidecar_is_detected(streamed, tmp_path):
    import shutil

    copy = shutil.copytree(streamed[0], tmp_path / "copy")
    with open(copy / "vectors.npy", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\0\0\0")
    with pytest.raises(DataError, match="checksum"):
        DenseIndex.load(copy)
