"""Hidden tests of exercise 02, run by the grader (keep this file private for a graded class).

Vectors and queries are drawn from the submission's seed.
"""

import numpy as np

from ragbook.data import Passage
from ragbook.grading import Case
from ragbook.index import DenseIndex

FORBID = []  # the package has no exact_top_k or recall_vs_exact: FAISS is the reference


def _exact(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    index = DenseIndex.build(vectors, [Passage(str(i), "", "") for i in range(len(vectors))],
                             kind="flat", progress=False)
    return index.search(queries, k).indices


def _data(rng: np.random.Generator, m: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    vectors = rng.standard_normal((m, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries = vectors[rng.choice(m, 20, replace=False)]
    return vectors, (queries + 0.3 * rng.standard_normal(queries.shape)).astype(np.float32)


def q1(seed: int) -> list[Case]:
    rng = np.random.default_rng(seed)
    return [Case("exact_top_k", (*_data(rng, int(rng.integers(30, 400)),
                                        int(rng.integers(4, 33))), int(rng.integers(1, 20))),
                 _exact) for _ in range(4)]


def _recall(approx: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(e)) / len(e) for a, e in zip(approx, exact)]))


def q2(seed: int) -> list[Case]:
    rng = np.random.default_rng(seed + 2)
    cases = []
    for _ in range(4):
        n, k = int(rng.integers(1, 30)), int(rng.integers(1, 12))
        exact = np.stack([rng.choice(60, k, replace=False) for _ in range(n)])
        approx = np.where(rng.random((n, k)) < rng.random(), exact,
                          rng.integers(60, 90, (n, k)))
        cases.append(Case("recall_vs_exact", (rng.permuted(approx, axis=1), exact), _recall))
    return cases


def _index_recall(vectors: np.ndarray, queries: np.ndarray, kind: str) -> float:
    passages = [Passage(str(i), "", "") for i in range(len(vectors))]
    index = DenseIndex.build(vectors, passages, kind=kind, rerank=False, progress=False)
    return _recall(index.search(queries, 10).indices, _exact(vectors, queries, 10))


def q3(seed: int) -> list[Case]:
    rng = np.random.default_rng(seed + 3)
    vectors, queries = _data(rng, 1500, 32)
    # HNSW builds in parallel threads: a measurement, compared within 0.05
    return [Case("index_recall", (vectors, queries, kind), _index_recall, tol=0.05)
            for kind in ("hnsw", "ivfpq")]


def _mips_vs_cosine(vectors: np.ndarray, queries: np.ndarray) -> float:
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return float(np.mean((queries @ vectors.T).argmax(1) != (queries @ unit.T).argmax(1)))


def q4(seed: int) -> list[Case]:
    rng = np.random.default_rng(seed + 4)
    cases = []
    for _ in range(4):
        m, dim = int(rng.integers(5, 200)), int(rng.integers(2, 16))
        norms = rng.lognormal(0.0, float(rng.uniform(0.1, 1.5)), (m, 1))
        vectors = rng.standard_normal((m, dim)) * norms
        cases.append(Case("mips_differs_from_cosine",
                          (vectors, rng.standard_normal((int(rng.integers(1, 40)), dim))),
                          _mips_vs_cosine))
    return cases
