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
  ``M=32`` links per node, ``efConstruction=80`` and ``efSearch=128`` candidates, the smallest
  ``efSearch`` that meets recall@10 ≥ 0.95 of exact search at 1M vectors (benchmarks/README.md).
  Larger ef = better recall, slower.
- ``ivfpq``: an inverted file of ``nlist`` k-means cells (≈ 4·√n), each vector stored as a
  product-quantization code of ``pq_m`` bytes (d/8 sub-vectors of 8 bits): 32× smaller than
  flat at d = 384. ``nprobe`` cells are visited per question. With ``rerank=True`` an
  ``IndexRefineFlat`` keeps the raw vectors too and re-scores the best ``k_factor``·k
  candidates exactly: near-exact recall at IVF-PQ's speed, but flat's memory again — unless
  the saved index is opened with ``DenseIndex.load(dir, mmap=True)``: FAISS then maps the file
  instead of reading it (``IO_FLAG_MMAP_IFC``), and only the pages a search touches (the cells
  it visits, the k_factor·k vectors it re-scores) are read from disk.

An index on disk is a directory: ``index.faiss`` (FAISS's own format, ``faiss.write_index``),
``meta.json`` (encoder, pooling, dimension, metric, kind, sizes and checksums),
``passages.jsonl`` and ``passages.offsets.npy`` (where each passage's line starts). Opened with
``mmap=True`` the passages stay on disk too (:class:`PassageFile`): an index of any size opens
with no resident memory per passage. No pickle: every file can be read by other tools. The
paper's BM25 baseline saves the same way (:func:`save_bm25`, bm25s's own arrays in ``bm25/``),
and a *fusion* directory holds one of each, ``dense/`` and ``bm25/``, whose rankings are fused
at search time (``retriever.FusionRetriever``). :func:`build_index` writes any of the three and
:func:`open_index` reads any of them back as a retriever: ``ragbook index`` and ``ragbook
search`` are these two functions.

Last, :func:`corpus_index` is the course's recipe for the built-in corpus: encoded with a
preset's BERT_d, indexed, and cached (``ragbook.artifacts``), so that any notebook starts cold.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap as _mmap
import os
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import faiss
import numpy as np
from tqdm.auto import tqdm

from .config import native_output_silenced
from .data import DataError, Passage, SearchResult, corpus_fingerprint

if TYPE_CHECKING:
    from .config import Preset
    from .retriever import BM25Retriever, DenseRetriever, FusionRetriever

KINDS = ("flat", "hnsw", "ivfpq")
# What an index directory holds: dense (FAISS), bm25, or fusion (one of each, fused by RRF).
INDEX_RETRIEVERS = ("dense", "bm25", "fusion")
METRIC = "inner_product"
FORMAT = 1
INDEX_FILE, META_FILE, PASSAGES_FILE = "index.faiss", "meta.json", "passages.jsonl"
OFFSETS_FILE = "passages.offsets.npy"
REBUILD = "rebuild it with `ragbook index`"

# HNSW: links per node, candidate-list sizes while building and while searching.
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 80, 128
# IVF-PQ: bits per PQ code, cells visited per query, re-ranked candidates per result.
PQ_NBITS, IVF_NPROBE, REFINE_K_FACTOR = 8, 32, 8


class QueryEncoder(Protocol):
    """What the index needs to know of a query encoder (e.g. ``ragbook.retriever.Encoder``)."""

    name: str
    dim: int


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def _index_directory(directory: str | Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: no such index directory; check the path, or build "
                        "one with `ragbook index`")
    return directory


def _read_meta(directory: Path) -> dict:
    try:
        meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not isinstance(meta, dict):
        raise DataError(f"{directory / META_FILE}: unreadable metadata; {REBUILD}")
    return meta


def _write_passages(directory: Path, passages: Sequence[Passage], offsets: bool = True) -> None:
    """``passages.jsonl``, one JSON object a line, and (``offsets``, what a mapped dense index
    reads them through) ``passages.offsets.npy``: the n + 1 byte offsets at which the lines
    start, the last one the file's size."""
    starts = np.empty(len(passages) + 1, dtype=np.int64)
    starts[0] = 0
    with open(directory / PASSAGES_FILE, "wb") as f:
        for i, p in enumerate(passages, start=1):
            f.write(json.dumps(asdict(p), ensure_ascii=False).encode() + b"\n")
            starts[i] = f.tell()
    if offsets:
        np.save(directory / OFFSETS_FILE, starts)


class PassageFile(Sequence[Passage]):
    """The passages of a saved index, read from disk when asked for: ``passages.jsonl`` and its
    line offsets are memory-mapped, so opening costs no resident memory per passage and a
    search decodes only the k lines it returns (what a memory-mapped FAISS index does for
    vectors, :meth:`DenseIndex.load` with ``mmap=True``)."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        self.offsets = np.load(directory / OFFSETS_FILE, mmap_mode="r")
        with open(directory / PASSAGES_FILE, "rb") as f:
            self._data = _mmap.mmap(f.fileno(), 0, access=_mmap.ACCESS_READ) \
                if self.offsets[-1] else b""

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        n = len(self)
        j = int(i) + n if int(i) < 0 else int(i)
        if not 0 <= j < n:
            raise IndexError(f"passage {i} of {n}")
        return Passage(**json.loads(self._data[self.offsets[j]:self.offsets[j + 1]]))


def _read_passages(directory: Path, meta: dict, lazy: bool = False) -> Sequence[Passage]:
    """The passages saved beside an index (left on disk if ``lazy``, :class:`PassageFile`),
    refused unless they are those it was built on."""
    if lazy:
        passages: Sequence[Passage] = PassageFile(directory)
    else:
        with open(directory / PASSAGES_FILE, encoding="utf-8") as f:
            passages = [Passage(**json.loads(line)) for line in f if line.strip()]
    if len(passages) != meta.get("count") \
            or corpus_fingerprint(passages) != meta.get("fingerprint"):
        raise DataError(f"{directory}: the passages do not match the index; {REBUILD}")
    return passages


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


def training_rows(n: int, params: dict, seed: int = 0) -> np.ndarray:
    """The sorted rows of ``n`` vectors that IVF-PQ's k-means trains on: 40 per cell and per
    PQ centroid, drawn from ``seed``."""
    n_train = min(n, max(40 * params["nlist"], 40 * 2 ** params["nbits"]))
    return np.sort(np.random.default_rng(seed).choice(n, n_train, replace=False))


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

    def __init__(self, index: faiss.Index, passages: Sequence[Passage],
                 metadata: dict[str, Any], rerank_vectors: np.ndarray | None = None):
        if index.ntotal != len(passages):
            raise ValueError(f"the index holds {index.ntotal} vectors but {len(passages)} "
                             "passages were given; they must be aligned")
        self.index = index
        # a PassageFile (a mapped index's passages, left on disk) as it is, anything else copied
        self.passages = passages if isinstance(passages, PassageFile) else list(passages)
        self.metadata = metadata
        # d(z) kept outside FAISS (a streamed build's vectors.npy, ragbook.shards), often
        # memory-mapped: the best k_factor·k IVF-PQ candidates are re-scored exactly on them,
        # as IndexRefineFlat would on its own copy
        self.rerank_vectors = rerank_vectors
        # In memory, an object array makes the lookup of n·k results one C loop instead of
        # n·k Python steps; a PassageFile decodes just the n·k lines.
        self._passage_array = None
        if not isinstance(self.passages, PassageFile):
            self._passage_array = np.empty(len(self.passages), dtype=object)
            self._passage_array[:] = self.passages

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
            index.train(vectors[training_rows(n, chosen, seed)])
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
        if self.rerank_vectors is None:
            scores, indices = self.index.search(q, k)
        else:
            scores, indices = self._reranked_search(q, k)
        if indices.size and indices.min() < 0:  # fewer than k found: drop the -1 padding
            scores[indices < 0] = -np.inf
            passages = [self._lookup(row[row >= 0]) for row in indices]
        else:
            passages = self._lookup(indices)
        ids = [[p.id for p in row] for row in passages]
        return SearchResult(ids=ids, passages=passages, scores=scores, indices=indices)

    def _lookup(self, rows: np.ndarray) -> list:
        """The passages at ``rows`` (any shape), as nested lists of that shape."""
        if self._passage_array is not None:
            return self._passage_array[rows].tolist()
        return [self.passages[j] for j in rows.tolist()] if rows.ndim == 1 else \
            [self._lookup(row) for row in rows]

    def _reranked_search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        depth = min(self.index.ntotal, self.metadata["params"]["k_factor"] * k)
        _, candidates = self.index.search(q, depth)
        rows = np.maximum(candidates, 0)
        order = np.argsort(rows, axis=None)  # read the (memory-mapped) rows in file order
        d = np.empty((rows.size, q.shape[1]), np.float32)
        d[order] = self.rerank_vectors[rows.reshape(-1)[order]]
        exact = np.einsum("bd,bkd->bk", q, d.reshape(*rows.shape, -1))
        exact[candidates < 0] = -np.inf
        top = np.argsort(-exact, axis=1, kind="stable")[:, :k]
        return np.take_along_axis(exact, top, 1), np.take_along_axis(candidates, top, 1)

    def set_search_params(self, *, efSearch: int | None = None, nprobe: int | None = None,
                          k_factor: int | None = None) -> None:
        """Trade recall for speed after building: HNSW's ``efSearch``, IVF's ``nprobe``,
        and the re-ranking depth ``k_factor``."""
        params = self.metadata["params"]
        if efSearch is not None and self.kind == "hnsw":
            faiss.downcast_index(self.index).hnsw.efSearch = params["efSearch"] = efSearch
        if nprobe is not None and self.kind == "ivfpq":
            faiss.extract_index_ivf(self.index).nprobe = params["nprobe"] = nprobe
        if k_factor is not None and self.rerank_vectors is not None:
            params["k_factor"] = k_factor
        elif k_factor is not None and self.metadata.get("rerank"):
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

        The paper swaps its main index (the December 2018 Wikipedia dump) for one built from
        the December 2016 dump, without retraining (§4.5): only the non-parametric memory
        changes, BERT_q and the generator stay. ``other`` is a
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
        directory without it is incomplete and a changed file is detected on load. A streamed
        build's ``sidecars`` (its on-disk inverted lists and re-ranking vectors,
        :mod:`ragbook.shards`) are recorded too and must already be in ``directory``.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)
        tmp = directory / f".{INDEX_FILE}.tmp"
        faiss.write_index(self.index, str(tmp))
        os.replace(tmp, directory / INDEX_FILE)
        _write_passages(directory, self.passages)
        sidecars = self.metadata.get("sidecars", [])
        missing = [name for name in sidecars if not (directory / name).is_file()]
        if missing:
            raise DataError(f"{directory}: {', '.join(missing)} missing; an index built from "
                            "shards is saved where it was built (ragbook.shards)")
        files = {name: {"bytes": (directory / name).stat().st_size,
                        "sha256": _file_sha256(directory / name)}
                 for name in (INDEX_FILE, PASSAGES_FILE, OFFSETS_FILE, *sidecars)}
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
        directory = _index_directory(directory)
        for name in (META_FILE, INDEX_FILE, PASSAGES_FILE):
            if not (directory / name).is_file():
                raise DataError(f"{directory}: {name} is missing, so the index is incomplete "
                                f"(an interrupted save?); {REBUILD}")
        meta = _read_meta(directory)
        files = meta.pop("files", None)
        if meta.get("format") != FORMAT:
            raise DataError(f"{directory}: index format {meta.get('format')!r}, this ragbook "
                            f"reads format {FORMAT}; {REBUILD}")
        if not isinstance(files, dict) or not {INDEX_FILE, PASSAGES_FILE} <= files.keys():
            raise DataError(f"{directory / META_FILE}: unreadable metadata; {REBUILD}")
        for name in files:
            path, want = directory / name, files[name]
            if not path.is_file():
                raise DataError(f"{path} is missing, so the index is incomplete; {REBUILD}")
            size = path.stat().st_size
            if size != want["bytes"]:
                raise DataError(f"{path}: {size:,} bytes but {want['bytes']:,} were written "
                                f"(truncated or replaced); {REBUILD}")
            if _file_sha256(path) != want["sha256"]:
                raise DataError(f"{path}: checksum mismatch, the file is corrupted; {REBUILD}")
        # a streamed build's inverted lists are on disk beside the file, always mapped
        streamed = bool(meta.get("shard_size"))
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if streamed else \
            faiss.IO_FLAG_MMAP_IFC if mmap else 0
        mmap = mmap or streamed
        with native_output_silenced():
            index = faiss.read_index(str(directory / INDEX_FILE), flags)
        # mapped: the passages stay on disk too (an index saved before the offsets: read)
        passages = _read_passages(directory, meta, lazy=mmap and OFFSETS_FILE in files)
        if index.ntotal != meta["count"]:
            raise DataError(f"{directory}: the passages do not match the index; {REBUILD}")
        rerank = meta.get("rerank_vectors")
        vectors = None if rerank is None else \
            np.load(directory / rerank, mmap_mode="r" if mmap else None)
        loaded = cls(index, passages, meta, vectors)
        if encoder is not None:
            loaded.check_encoder(encoder, where=f"the index at {directory}")
        return loaded


# ---------------------------------------------------------------------- BM25 on disk


def save_bm25(retriever: BM25Retriever, directory: str | Path) -> Path:
    """Save a :class:`~ragbook.retriever.BM25Retriever`: bm25s's own files (numpy arrays and
    JSON, no pickle) in ``bm25/``, ``passages.jsonl``, and last ``meta.json`` with the
    passages' fingerprint, so that :func:`load_bm25` can check they belong together."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / META_FILE).unlink(missing_ok=True)
    retriever.model.save(str(directory / "bm25"), show_progress=False)
    _write_passages(directory, retriever.passages, offsets=False)  # read whole
    meta = {"format": FORMAT, "retriever": "bm25", "kind": "bm25",
            "count": len(retriever.passages), "fingerprint": corpus_fingerprint(retriever.passages)}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_bm25(directory: str | Path) -> BM25Retriever:
    """Read a BM25 index saved by :func:`save_bm25` (no re-indexing)."""
    import bm25s

    from .retriever import BM25Retriever

    directory = _index_directory(directory)
    if not all((directory / f).is_file() for f in (META_FILE, PASSAGES_FILE)) \
            or not (directory / "bm25").is_dir():
        raise DataError(f"{directory}: the BM25 index is incomplete; {REBUILD}")
    passages = _read_passages(directory, _read_meta(directory))
    return BM25Retriever(passages, bm25s.BM25.load(str(directory / "bm25"),
                                                   show_progress=False))


# ---------------------------------------------------------------------- any index directory


def _dense_metadata(preset: Preset) -> dict[str, Any]:
    """What :func:`open_index` needs to rebuild BERT_q for an index of ``preset``'s BERT_d."""
    return {"encoder": preset.doc_encoder, "query_encoder": preset.query_encoder,
            "pooling": preset.pooling, "normalize": preset.normalize, "preset": preset.name,
            "max_query_length": preset.max_query_length, "retriever": "dense"}


def build_index(passages: Sequence[Passage], directory: str | Path, retriever: str = "dense",
                preset: Preset | str = "tiny", kind: str = "flat",
                progress: bool = True) -> str:
    """Index ``passages`` into ``directory`` for :func:`open_index`; returns what was built.

    ``retriever``: ``"dense"`` encodes every passage with ``preset``'s BERT_d (cached per
    encoder and corpus, ``retriever.passage_embeddings``) into a FAISS index of ``kind``;
    ``"bm25"`` builds the sparse baseline; ``"fusion"`` both, in ``dense/`` and ``bm25/``.
    """
    from .config import get_preset
    from .retriever import BM25Retriever, passage_embeddings

    if retriever not in INDEX_RETRIEVERS:
        raise ValueError(f"unknown retriever {retriever!r}; choose one of {INDEX_RETRIEVERS}")
    directory = Path(directory)
    if retriever == "bm25":
        save_bm25(BM25Retriever(passages), directory)
        return "BM25 index"
    preset = get_preset(preset) if isinstance(preset, str) else preset
    if retriever == "fusion":
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)
        dense = build_index(passages, directory / "dense", "dense", preset, kind, progress)
        save_bm25(BM25Retriever(passages), directory / "bm25")
        (directory / META_FILE).write_text(json.dumps(
            {"format": FORMAT, "retriever": "fusion", "parts": ["dense", "bm25"]}, indent=2))
        return f"{dense} + BM25 index, rankings fused by reciprocal rank fusion"
    vectors = passage_embeddings(preset, passages, progress=progress)
    index = DenseIndex.build(vectors, list(passages), kind=kind, progress=progress,
                             metadata=_dense_metadata(preset))
    index.save(directory)
    return f"{index.kind} index ({index.dim} dims, encoder {index.encoder})"


def open_index(directory: str | Path) -> DenseRetriever | BM25Retriever | FusionRetriever:
    """The retriever, with ``.search(questions, k)``, for a directory :func:`build_index`
    wrote: BERT_q and MIPS over a dense index, BM25, or both fused by rank fusion."""
    from .retriever import DenseRetriever, Encoder, FusionRetriever

    directory = _index_directory(directory)
    meta = _read_meta(directory) if (directory / META_FILE).is_file() else {}
    retriever = meta.get("retriever", "dense")
    if retriever == "hybrid":  # rank fusion's former name, now that of a RAG prior (pipeline)
        raise DataError(f"{directory}: a rank-fusion index from an older ragbook (\"hybrid\"); "
                        "rebuild it with `ragbook index --retriever fusion`")
    if retriever not in INDEX_RETRIEVERS:
        raise DataError(f"{directory}: unknown retriever {retriever!r} in {META_FILE}; "
                        f"{REBUILD}")
    if retriever == "bm25":
        return load_bm25(directory)
    if retriever == "fusion":
        return FusionRetriever([open_index(directory / part) for part in meta["parts"]])
    index = DenseIndex.load(directory)
    name = index.metadata.get("query_encoder") or index.encoder
    if name is None:
        raise DataError(f"{directory}: the index does not name its encoder; {REBUILD}")
    encoder = Encoder(name, index.metadata.get("pooling") or "mean",
                      bool(index.metadata.get("normalize")),
                      index.metadata.get("max_query_length") or 64)
    index.check_encoder(encoder, where=f"the index at {directory}")
    return DenseRetriever(encoder, index)


# ---------------------------------------------------------------------- the course's corpus


def corpus_index(preset: Preset | str = "tiny", kind: str = "flat", rerank: bool = True,
                 progress: bool = True, passages: Sequence[Passage] | None = None,
                 mmap: bool = False, **params: int) -> DenseIndex:
    """The index of ``passages`` (default: the built-in corpus, ``data.load_corpus()``) for
    ``preset``: a cached recipe (``ragbook.artifacts``), built on first use from
    ``retriever.passage_embeddings(preset, passages)``, then loaded (memory-mapped with
    ``mmap``: processes on one machine, say the ranks of a data-parallel run, share its
    pages)."""
    from . import artifacts, data, retriever
    from .config import get_preset

    preset = get_preset(preset) if isinstance(preset, str) else preset
    passages = data.load_corpus() if passages is None else list(passages)
    recipe = {"doc_encoder": preset.doc_encoder, "query_encoder": preset.query_encoder,
              "pooling": preset.pooling, "normalize": preset.normalize,
              "max_passage_length": preset.max_passage_length,
              "passage_format": retriever.PASSAGE_FORMAT,
              "corpus": corpus_fingerprint(passages), "seed": preset.seed,
              "kind": kind, "rerank": rerank and kind == "ivfpq", "params": params,
              "format": FORMAT}

    def build(tmp: Path) -> None:
        vectors = retriever.passage_embeddings(preset, passages, progress=progress)
        DenseIndex.build(vectors, passages, kind=kind, metadata=_dense_metadata(preset),
                         rerank=rerank, progress=progress, seed=preset.seed, **params).save(tmp)

    return DenseIndex.load(artifacts.cached("corpus_index", recipe, build), mmap=mmap)
