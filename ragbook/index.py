"""The index: maximum inner product search (MIPS) over the document vectors d(z).

RAG's retriever scores a passage z for a question x by p_η(z|x) ∝ exp(d(z)ᵀq(x)) (Lewis et al.
2020, §2.2). d(z) is computed once, by the frozen document encoder BERT_d, and stored in an
index; at question time the top-k passages are those with the largest inner product with q(x):
a *maximum inner product search*. The paper searches 21M Wikipedia passages with a FAISS
"Hierarchical Navigable Small World" (HNSW) index, and notes that the index can be swapped
without retraining — its 2016 vs 2018 Wikipedia experiment (§4.5, "index hot-swapping").

Three FAISS index kinds, all with the inner-product metric:

- ``flat``: exact search, n·d multiply-adds per question; 4·d bytes per vector.
- ``hnsw``: a graph of "small world" neighbours searched greedily (Malkov & Yashunin 2018):
  approximate, far faster, and larger than flat (the graph adds ~2·M links per vector).
  ``M=32`` links per node, ``efConstruction=80`` and ``efSearch=128`` candidates: recall@10 above
  0.95 of exact on 1M vectors (see benchmarks/README.md). Larger ef = better recall, slower.
- ``ivfpq``: an inverted file of ``nlist`` k-means cells (≈ 4·√n), each vector stored as a
  product-quantization code of ``pq_m`` bytes (d/8 sub-vectors of 8 bits): 32× smaller than
  flat at d = 384. ``nprobe`` cells are visited per question. With ``rerank=True`` an
  ``IndexRefineFlat`` keeps the raw vectors too and re-scores the best ``k_factor``·k
  candidates exactly: near-exact recall at IVF-PQ's speed, but flat's memory again — unless
  the saved index is opened with ``DenseIndex.load(dir, mmap=True)``: FAISS then maps the file
  instead of reading it (``IO_FLAG_MMAP_IFC``), and only the pages a search touches (the cells
  it visits, the k_factor·k vectors it re-scores) are read from disk.

An index on disk is a directory: ``index.faiss`` (FAISS's own format, ``faiss.write_index``),
``meta.json`` (encoder, pooling, dimension, metric, kind, sizes and checksums) and
``passages.jsonl``. No pickle: every file can be read by other tools.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import faiss
import numpy as np
from tqdm.auto import tqdm

from .data import DataError, Passage

KINDS = ("flat", "hnsw", "ivfpq")
METRIC = "inner_product"
FORMAT = 1
INDEX_FILE, META_FILE, PASSAGES_FILE = "index.faiss", "meta.json", "passages.jsonl"

# HNSW: links per node, candidate-list sizes while building and while searching.
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
# IVF-PQ: bits per PQ code, cells visited per query, re-ranked candidates per result.
PQ_NBITS, IVF_NPROBE, REFINE_K_FACTOR = 8, 32, 8


class QueryEncoder(Protocol):
    """What the index needs to know of a query encoder (e.g. ``ragbook.retriever.Encoder``)."""

    name: str
    dim: int


@dataclass
class SearchResult:
    """Top-k passages for each of n queries, best first.

    ``scores[i, j]`` is the inner product d(z)ᵀq(x) of query i with its j-th passage (the
    retriever's logit), ``indices[i, j]`` that passage's position in the corpus list. An
    approximate index may find fewer than k passages for a query: the missing slots have index
    -1 and score -inf, and are left out of ``ids`` and ``passages``.
    """

    ids: list[list[str]]
    passages: list[list[Passage]]
    scores: np.ndarray  # (n, k) float32
    indices: np.ndarray  # (n, k) int64


def corpus_fingerprint(passages: list[Passage]) -> str:
    """SHA-256 of every passage's id, title and text, in order: the corpus's identity."""
    h = hashlib.sha256()
    for p in passages:
        h.update(f"{p.id}\x1f{p.title}\x1f{p.text}\x1e".encode())
    return h.hexdigest()


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def default_params(kind: str, n: int, dim: int) -> dict[str, int]:
    """Sensible FAISS parameters for ``n`` vectors of ``dim`` dimensions (see module docs)."""
    if kind == "flat":
        return {}
    if kind == "hnsw":
        return {"M": HNSW_M, "efConstruction": HNSW_EF_CONSTRUCTION, "efSearch": HNSW_EF_SEARCH}
    if kind == "ivfpq":
        # ≥ 39 training points per cell (FAISS's minimum), ≈ 4·√n cells.
        nlist = max(1, min(round(4 * math.sqrt(n)), n // 39))
        # 8 dimensions per sub-quantizer, the largest divisor of dim not above dim/8.
        pq_m = max(m for m in range(1, max(1, dim // 8) + 1) if dim % m == 0)
        # 2^nbits centroids per sub-quantizer need ≥ 39 training points each.
        nbits = max(1, min(PQ_NBITS, int(math.log2(max(2, n // 39)))))
        return {"nlist": nlist, "pq_m": pq_m, "nbits": nbits,
                "nprobe": min(nlist, IVF_NPROBE), "k_factor": REFINE_K_FACTOR}
    raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")


def _make_faiss_index(kind: str, dim: int, params: dict, rerank: bool) -> faiss.Index:
    ip = faiss.METRIC_INNER_PRODUCT
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params["M"], ip)
        index.hnsw.efConstruction = params["efConstruction"]
        index.hnsw.efSearch = params["efSearch"]
        return index
    # "np" = no polysemous training, which FAISS would otherwise run (slowly) for PQ.
    spec = f"IVF{params['nlist']},PQ{params['pq_m']}x{params['nbits']}np"
    index = faiss.index_factory(dim, spec, ip)
    index.nprobe = params["nprobe"]
    if rerank:  # must wrap the base before any vector is added: it keeps its own copy
        index = faiss.IndexRefineFlat(index)
        index.k_factor = params["k_factor"]
    return index


class DenseIndex:
    """A FAISS index over d(z) together with its passages and what built it.

    Build with :meth:`build`, query with :meth:`search`, persist with :meth:`save` /
    :meth:`load`, and replace the corpus at run time with :meth:`swap`.
    """

    def __init__(self, index: faiss.Index, passages: list[Passage], metadata: dict[str, Any]):
        if index.ntotal != len(passages):
            raise ValueError(f"the index holds {index.ntotal} vectors but {len(passages)} "
                             "passages were given; they must be aligned")
        self.index = index
        self.passages = list(passages)
        self.metadata = metadata
        # Object arrays make the lookup of n·k results one C loop instead of n·k Python steps.
        self._passage_array = np.empty(len(self.passages), dtype=object)
        self._passage_array[:] = self.passages
        self._id_array = np.array([p.id for p in self.passages], dtype=object)

    # ------------------------------------------------------------------ properties

    @property
    def dim(self) -> int:
        return self.index.d

    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def encoder(self) -> str | None:
        """Name of the document encoder whose vectors the index holds."""
        return self.metadata.get("encoder")

    def __len__(self) -> int:
        return self.index.ntotal

    def __repr__(self) -> str:
        return (f"DenseIndex(kind={self.kind!r}, passages={len(self):,}, dim={self.dim}, "
                f"encoder={self.encoder!r})")

    def nbytes(self, rerank_vectors: bool = True) -> int:
        """Size of the FAISS index in bytes (its serialized form: vectors, codes, graph).

        ``rerank_vectors=False`` leaves out the raw vectors that an IVF-PQ index with
        re-ranking keeps beside its codes: the size of the compressed index alone.
        """
        index = self.index
        if not rerank_vectors and self.metadata.get("rerank"):
            index = faiss.downcast_index(index).base_index
        return int(faiss.serialize_index(index).size)

    # ------------------------------------------------------------------ build and search

    @classmethod
    def build(cls, vectors: np.ndarray, passages: list[Passage], kind: str = "flat",
              metadata: dict[str, Any] | None = None, rerank: bool = True,
              progress: bool = True, batch_size: int = 65_536, seed: int = 0,
              **params: int) -> DenseIndex:
        """Index ``vectors[i]`` = d(passages[i]) for maximum inner product search.

        ``metadata`` records what made the vectors — ``encoder`` (BERT_d's name), optionally
        ``query_encoder`` (BERT_q's, when it differs), ``pooling`` and ``normalize`` — so that
        :meth:`load` can refuse a query encoder from another vector space. ``params`` override
        :func:`default_params` (``M``, ``efConstruction``, ``efSearch``; ``nlist``, ``pq_m``,
        ``nbits``, ``nprobe``, ``k_factor``). ``rerank`` applies to ``ivfpq`` only.
        """
        if kind not in KINDS:
            raise ValueError(f"unknown index kind {kind!r}; choose one of {KINDS}")
        if len(passages) == 0:
            raise DataError("cannot build an index over an empty corpus; "
                            "give at least one passage")
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[0] != len(passages):
            raise ValueError(f"expected one vector per passage, shape ({len(passages)}, dim); "
                             f"got {vectors.shape}")
        if not np.isfinite(vectors).all():
            raise DataError("the passage vectors contain NaN or infinity; re-encode the corpus")
        n, dim = vectors.shape
        chosen = {**default_params(kind, n, dim), **params}
        index = _make_faiss_index(kind, dim, chosen, rerank)
        if not index.is_trained:  # IVF-PQ: k-means for the cells and the PQ codebooks
            rng = np.random.default_rng(seed)
            n_train = min(n, max(40 * chosen["nlist"], 40 * 2 ** chosen["nbits"]))
            index.train(vectors[np.sort(rng.choice(n, n_train, replace=False))])
        with tqdm(total=n, unit="vec", desc=f"indexing ({kind})", disable=not progress) as bar:
            for start in range(0, n, batch_size):
                index.add(vectors[start:start + batch_size])
                bar.update(min(batch_size, n - start))
        meta_rerank = bool(rerank and kind == "ivfpq")
        meta = {
            "format": FORMAT,
            "encoder": None, "query_encoder": None, "pooling": None, "normalize": None,
            **(metadata or {}),
            "dim": dim, "metric": METRIC, "kind": kind,
            "rerank": meta_rerank,
            "params": {k: v for k, v in chosen.items() if k != "k_factor" or meta_rerank},
            "count": n, "fingerprint": corpus_fingerprint(passages),
            "faiss_version": faiss.__version__,
        }
        return cls(index, passages, meta)

    def search(self, query_vectors: np.ndarray, k: int = 5) -> SearchResult:
        """The top-k passages by inner product d(z)ᵀq(x) for each row of ``query_vectors``."""
        q = np.ascontiguousarray(query_vectors, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.index.d:
            raise ValueError(f"query vectors must have shape (n, {self.dim}); got {q.shape}. "
                             "Encode the questions with the encoder the index was built for.")
        k = max(1, min(int(k), self.index.ntotal))
        scores, indices = self.index.search(q, k)
        if indices.size and indices.min() < 0:  # fewer than k found: drop the -1 padding
            scores[indices < 0] = -np.inf
            rows = [row[row >= 0] for row in indices]
            passages = [self._passage_array[row].tolist() for row in rows]
            ids = [self._id_array[row].tolist() for row in rows]
        else:
            passages = self._passage_array[indices].tolist()
            ids = self._id_array[indices].tolist()
        return SearchResult(ids=ids, passages=passages, scores=scores, indices=indices)

    def set_search_params(self, *, efSearch: int | None = None, nprobe: int | None = None,
                          k_factor: int | None = None) -> None:
        """Trade recall for speed after building: HNSW's ``efSearch``, IVF's ``nprobe``,
        and the re-ranking depth ``k_factor``."""
        params = self.metadata["params"]
        if efSearch is not None and self.kind == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = params["efSearch"] = efSearch
        if nprobe is not None and self.kind == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = params["nprobe"] = nprobe
        if k_factor is not None and self.metadata.get("rerank"):
            faiss.downcast_index(self.index).k_factor = params["k_factor"] = k_factor

    # ------------------------------------------------------------------ encoders and swap

    def check_encoder(self, encoder: QueryEncoder, where: str = "this index") -> None:
        """Refuse a query encoder that does not live in the index's vector space."""
        meta = self.metadata
        accepted = {meta.get("encoder"), meta.get("query_encoder")} - {None}
        name, dim = getattr(encoder, "name", None), getattr(encoder, "dim", None)
        built = (f"{meta.get('encoder')!r} ({meta['dim']} dims, "
                 f"{meta.get('pooling') or 'unknown'} pooling)")
        if dim is not None and dim != meta["dim"]:
            raise DataError(f"{where} was built with encoder {built}, but the query encoder "
                            f"{name!r} gives {dim}-dimensional vectors; use the encoder the index "
                            "was built with, or rebuild the index with this one "
                            "(ragbook index ...)")
        lineage = {name, *getattr(encoder, "trained_from", [])}  # fine-tuned from one?
        if accepted and name is not None and not lineage & accepted:
            raise DataError(f"{where} was built with encoder {built}, but the query encoder is "
                            f"{name!r}: their inner products are meaningless. Load the encoder "
                            "the index was built with, or rebuild the index (ragbook index ...)")
        pooling = getattr(encoder, "pooling", None)
        if pooling and meta.get("pooling") and pooling != meta["pooling"]:
            raise DataError(f"{where} was built with {meta['pooling']} pooling, but the query "
                            f"encoder uses {pooling} pooling; use {meta['pooling']} pooling")

    def swap(self, other: DenseIndex | str | Path) -> DenseIndex:
        """Hot-swap: the index to serve instead of this one, after checking that it lives in
        the same vector space (same dimension, metric, encoder, pooling, normalisation).

        The paper swaps its 2016 Wikipedia index for the 2018 one without retraining (§4.5):
        only the non-parametric memory changes, BERT_q and the generator stay. ``other`` is a
        DenseIndex or a saved index directory. ``self`` is left unchanged, so the caller can
        swap back: ``retriever.index = retriever.index.swap(new_index)``.
        """
        if not isinstance(other, DenseIndex):
            other = DenseIndex.load(other)
        mine, theirs = self.metadata, other.metadata
        for key in ("dim", "metric", "encoder", "pooling", "normalize"):
            if mine.get(key) is not None and theirs.get(key) is not None \
                    and mine[key] != theirs[key]:
                raise DataError(f"cannot swap: the new index has {key} {theirs[key]!r} but the "
                                f"current one has {mine[key]!r}; the query encoder would no "
                                "longer match. Build the new index with the same encoder.")
        merged = {**theirs, **{k: mine[k] for k in ("encoder", "query_encoder", "pooling",
                                                     "normalize") if theirs.get(k) is None}}
        return DenseIndex(other.index, other.passages, merged)

    # ------------------------------------------------------------------ save and load

    def save(self, directory: str | Path) -> Path:
        """Write ``index.faiss``, ``passages.jsonl`` and ``meta.json`` into ``directory``.

        ``meta.json`` is written last and records the other files' sizes and checksums, so a
        directory without it is incomplete and a changed file is detected on load.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)
        tmp = directory / f".{INDEX_FILE}.tmp"
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, directory / INDEX_FILE)
        with open(directory / PASSAGES_FILE, "w", encoding="utf-8") as f:
            for p in self.passages:
                f.write(json.dumps(asdict(p), ensure_ascii=False) + "\n")
        files = {name: {"bytes": (directory / name).stat().st_size,
                        "sha256": _file_sha256(directory / name)}
                 for name in (INDEX_FILE, PASSAGES_FILE)}
        meta = {**self.metadata, "files": files}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2, ensure_ascii=False))
        return directory

    @classmethod
    def load(cls, directory: str | Path, encoder: QueryEncoder | None = None,
             mmap: bool = False) -> DenseIndex:
        """Read an index saved by :meth:`save`, verifying every file before FAISS sees it.

        With ``encoder``, also refuse a query encoder whose name or dimension differs from the
        one that built the index. ``mmap=True`` maps the FAISS file into memory instead of
        reading it: a corpus larger than RAM stays searchable, at the cost of disk reads.
        """
        directory = Path(directory)
        hint = "rebuild it with `ragbook index` (or DenseIndex.build(...).save(dir))"
        if not directory.is_dir():
            raise DataError(f"{directory}: no such index directory; check the path, or build "
                            "one with `ragbook index`")
        for name in (META_FILE, INDEX_FILE, PASSAGES_FILE):
            if not (directory / name).is_file():
                raise DataError(f"{directory}: {name} is missing, so the index is incomplete "
                                f"(an interrupted save?); {hint}")
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            files = meta["files"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise DataError(f"{directory / META_FILE}: unreadable metadata; {hint}") from None
        if meta.get("format") != FORMAT:
            raise DataError(f"{directory}: index format {meta.get('format')!r}, this ragbook "
                            f"reads format {FORMAT}; {hint}")
        for name in (INDEX_FILE, PASSAGES_FILE):
            path, want = directory / name, files[name]
            size = path.stat().st_size
            if size != want["bytes"]:
                raise DataError(f"{path}: {size:,} bytes but {want['bytes']:,} were written "
                                f"(truncated or replaced); {hint}")
            if _file_sha256(path) != want["sha256"]:
                raise DataError(f"{path}: checksum mismatch, the file is corrupted; {hint}")
        index = faiss.read_index(str(directory / INDEX_FILE),
                                 faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        with open(directory / PASSAGES_FILE, encoding="utf-8") as f:
            passages = [Passage(**json.loads(line)) for line in f if line.strip()]
        meta.pop("files")
        if len(passages) != meta["count"] or index.ntotal != meta["count"] \
                or corpus_fingerprint(passages) != meta["fingerprint"]:
            raise DataError(f"{directory}: the passages do not match the index; {hint}")
        loaded = cls(index, passages, meta)
        if encoder is not None:
            loaded.check_encoder(encoder, where=f"the index at {directory}")
        return loaded


# ---------------------------------------------------------------------- the course's corpus


def corpus_index(preset: Any = "tiny", kind: str = "flat", rerank: bool = True,
                 progress: bool = True, **params: int) -> DenseIndex:
    """The built-in corpus's index for ``preset``: built on first use, then loaded from the
    cache (``ragbook.artifacts``). Vectors come from ``retriever.passage_embeddings(preset)``,
    aligned with ``data.load_corpus()``."""
    from . import artifacts, data, retriever
    from .config import Preset, get_preset

    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    recipe = {"doc_encoder": preset.doc_encoder, "query_encoder": preset.query_encoder,
              "pooling": preset.pooling, "normalize": preset.normalize,
              "max_passage_length": preset.max_passage_length,
              "passage_format": retriever.PASSAGE_FORMAT,
              "corpus": corpus_fingerprint(data.load_corpus()), "seed": preset.seed,
              "kind": kind, "rerank": rerank and kind == "ivfpq", "params": params,
              "format": FORMAT}

    def build(tmp: Path) -> None:
        vectors = retriever.passage_embeddings(preset)
        meta = {"encoder": preset.doc_encoder, "query_encoder": preset.query_encoder,
                "pooling": preset.pooling, "normalize": preset.normalize, "preset": preset.name,
                "max_query_length": preset.max_query_length, "retriever": "dense"}
        DenseIndex.build(vectors, data.load_corpus(), kind=kind, metadata=meta, rerank=rerank,
                         progress=progress, seed=preset.seed, **params).save(tmp)

    return DenseIndex.load(artifacts.cached("corpus_index", recipe, build))
