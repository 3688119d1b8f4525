"""Indexes larger than memory: built from streamed shards, merged into one on-disk index.

The paper's index covers 21M passages: 21M × 768 float32 vectors are ≈ 64 GB, more than most
machines hold. :func:`build_streamed` never holds them all at once. It

1. encodes the corpus shard by shard, writing each shard's d(z) to disk as it is made;
2. trains IVF-PQ (the coarse k-means cells and the PQ codebooks) on a sample of the rows
   (:func:`ragbook.index.training_rows`, the sample a one-shot ``DenseIndex.build`` draws);
3. adds the shards one at a time, each to its own copy of the trained, empty index, written
   to disk;
4. merges their inverted lists into one file with FAISS's ``merge_ondisk``
   (``OnDiskInvertedLists``): ``index.faiss`` holds only the quantizers, ``index.ivfdata``
   the codes, read through the page cache at search time;
5. streams the shards' vectors into ``vectors.npy``, on which the best ``k_factor``·k
   candidates are re-scored exactly (the re-ranking of ``IndexRefineFlat``, memory-mapped).

Every step writes its result atomically and is skipped when found, so an interrupted build
continues from the last finished shard. The result is an ordinary index directory:
``DenseIndex.load(directory, mmap=True)`` and ``index.open_index`` read it, and its search
returns what a one-shot IVF-PQ build with the same parameters returns.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import faiss.contrib.ondisk
import numpy as np
from tqdm.auto import tqdm

from .artifacts import atomic_write_bytes
from .config import LIBC, native_output_silenced
from .data import DataError, Passage, corpus_fingerprint
from .index import (
    FORMAT,
    INDEX_FILE,
    METRIC,
    DenseIndex,
    _dense_metadata,
    _make_faiss_index,
    default_params,
    training_rows,
)

if TYPE_CHECKING:
    from .config import Preset

IVFDATA_FILE, VECTORS_FILE, WORK_DIR = "index.ivfdata", "vectors.npy", ".shards"
CHUNK_ROWS = 8_192  # rows of a shard file read (and handed to FAISS's add) at a time
# build_streamed logs the start of each phase at INFO, the phase's name first (benchmarks
# measure each phase's memory from these records)
PHASES = ("encode", "train", "add", "merge", "vectors")
log = logging.getLogger(__name__)


def _write_index(index: faiss.Index, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def _release_freed_memory() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere
    nothing). glibc keeps freed blocks of up to tens of MB resident for reuse, so without it a
    phase's temporaries (a shard, FAISS's residuals) would stay resident into the next phase."""
    trim = getattr(LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def _gather(rows: np.ndarray, bounds: list[tuple[int, int]], shard_files: list[Path],
            dim: int) -> np.ndarray:
    """The vectors of ``rows`` (sorted), read from the shard files a chunk at a time."""
    sample = np.empty((len(rows), dim), np.float32)
    for (s, _), f in zip(bounds, shard_files):
        for at, block in _read_chunks(f):
            lo, hi = np.searchsorted(rows, (s + at, s + at + len(block)))
            sample[lo:hi] = block[rows[lo:hi] - s - at]
    return sample


def _read_header(f) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of the ``.npy`` file open in ``f``, which is left at its first byte of
    data."""
    version = np.lib.format.read_magic(f)
    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
            else np.lib.format.read_array_header_2_0)
    shape, _, dtype = read(f)
    return shape, dtype


def _read_chunks(path: Path, rows: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """A shard file's rows ``rows`` at a time, as (first row, rows), read into one reused
    buffer: only the buffer is resident, where a memory map would keep every page it touched
    resident until unmapped. Each yielded array is overwritten by the next."""
    with open(path, "rb") as f:
        (n, dim), dtype = _read_header(f)
        buffer = np.empty((min(rows, n), dim), dtype)
        for start in range(0, n, rows):
            block = buffer[:min(rows, n - start)]
            if f.readinto(memoryview(block).cast("B")) != block.nbytes:
                raise DataError(f"{path} is truncated; delete it and rerun the build")
            yield start, block


def _save_npy(array: np.ndarray, path: Path) -> None:
    """``np.save`` all or nothing (a temporary file renamed), without a copy in memory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.save(f, array)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def build_streamed(shard_vectors: Callable[[int, int], np.ndarray], n: int, dim: int,
                   directory: str | Path, shard_size: int, params: dict | None = None,
                   seed: int = 0, progress: bool = True) -> dict:
    """Write an on-disk IVF-PQ index of ``n`` vectors into ``directory``, one shard at a time.

    ``shard_vectors(start, end)`` returns d(z) for rows ``start:end`` (float32, (end-start,
    dim)); it is called once per shard, and never again for a shard already on disk, and the
    build lets go of each shard before it asks for the next. Shard files are read back a
    chunk at a time into one buffer, never memory-mapped whole, so the peak memory is the
    largest of: one shard with the encoder's temporaries; the training sample with FAISS's
    residuals of it; the merge's pages of the shards' codes and of ``index.ivfdata``.
    ``params`` override :func:`~ragbook.index.default_params` for ``ivfpq``. Resumable: the
    work lives in ``directory/.shards`` until the merge; a build started with other settings
    is refused. Returns the parameters used.
    """
    if shard_size < 1:
        raise ValueError(f"shard size must be at least 1, not {shard_size}")
    directory, chosen = Path(directory), {**default_params("ivfpq", n, dim), **(params or {})}
    work = directory / WORK_DIR
    work.mkdir(parents=True, exist_ok=True)
    plan = {"n": n, "dim": dim, "shard_size": shard_size, "params": chosen, "seed": seed}
    plan_file = work / "plan.json"
    if plan_file.exists() and json.loads(plan_file.read_text()) != plan:
        raise DataError(f"{work} holds an unfinished build with other settings "
                        f"({plan_file.read_text().strip()}); rerun with those, or delete {work}")
    atomic_write_bytes(plan_file, json.dumps(plan).encode())
    bounds = [(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    shard_files = [work / f"vectors-{i:05d}.npy" for i in range(len(bounds))]
    block_files = [work / f"block-{i:05d}.faiss" for i in range(len(bounds))]
    quiet = not progress

    for i, ((start, end), f) in enumerate(zip(tqdm(bounds, desc="encoding shards",
                                                   unit="shard", disable=quiet), shard_files)):
        if f.exists():
            continue
        log.info("%s: shard %d of %d, rows %d:%d", "encode", i + 1, len(bounds), start, end)
        v = np.ascontiguousarray(shard_vectors(start, end), dtype=np.float32)
        if v.shape != (end - start, dim) or not all(
                np.isfinite(v[at:at + CHUNK_ROWS]).all() for at in range(0, len(v), CHUNK_ROWS)):
            raise DataError(f"shard {start}:{end}: expected {(end - start, dim)} finite "
                            f"vectors, got {v.shape}; check the encoder")
        _save_npy(v, f)
        del v
        _release_freed_memory()

    trained = work / "trained.faiss"
    if not trained.exists():  # k-means on the sample, read shard by shard into one array
        rows = training_rows(n, chosen, seed)  # sorted
        log.info("%s: IVF-PQ on %d sampled rows", "train", len(rows))
        sample = _gather(rows, bounds, shard_files, dim)
        index = _make_faiss_index("ivfpq", dim, chosen, rerank=False)
        index.train(sample)  # FAISS adds its residuals of the sample: twice its size at most
        del sample
        _write_index(index, trained)
        del index
        _release_freed_memory()

    for i, ((start, _), shard, block) in enumerate(zip(
            tqdm(bounds, desc="adding shards", unit="shard", disable=quiet), shard_files,
            block_files)):
        if block.exists():
            continue
        log.info("%s: shard %d of %d", "add", i + 1, len(bounds))
        index = faiss.read_index(str(trained))
        for at, rows in _read_chunks(shard):  # FAISS's buffers: one chunk, not a shard
            index.add_with_ids(rows, np.arange(start + at, start + at + len(rows)))
        _write_index(index, block)
        del index, rows
        _release_freed_memory()

    log.info("%s: %d shards' inverted lists into %s", "merge", len(bounds), IVFDATA_FILE)
    index = faiss.read_index(str(trained))  # the merge: codes into one on-disk file
    (directory / IVFDATA_FILE).unlink(missing_ok=True)
    # merge_ondisk maps the blocks (their codes are read through the page cache) and never
    # unmaps them: their pages stay resident, and their disk space used, until the process ends
    with native_output_silenced():
        faiss.contrib.ondisk.merge_ondisk(index, [str(b) for b in block_files],
                                          str(directory / IVFDATA_FILE))
    _write_index(index, directory / INDEX_FILE)
    del index
    _release_freed_memory()

    log.info("%s: %d shards into %s", "vectors", len(bounds), VECTORS_FILE)
    tmp = directory / f".{VECTORS_FILE}.tmp"  # the raw vectors, streamed, for re-ranking
    with open(tmp, "wb") as out:
        np.lib.format.write_array_header_1_0(
            out, {"descr": "<f4", "fortran_order": False, "shape": (n, dim)})
        for f in shard_files:
            with open(f, "rb") as shard:
                _read_header(shard)
                shutil.copyfileobj(shard, out)  # file to file, a buffer at a time
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, directory / VECTORS_FILE)
    shutil.rmtree(work)
    return chosen


def streamed_index(shard_vectors: Callable[[int, int], np.ndarray], passages: Sequence[Passage],
                   dim: int, directory: str | Path, shard_size: int,
                   metadata: dict | None = None, params: dict | None = None, seed: int = 0,
                   progress: bool = True) -> DenseIndex:
    """:func:`build_streamed` over ``passages`` (``shard_vectors(start, end)`` = d(z) of
    ``passages[start:end]``), saved with the passages and ``metadata`` (what
    ``DenseIndex.build`` takes) as an index directory; returned memory-mapped."""
    if len(passages) == 0:
        raise DataError("cannot build an index over an empty corpus; give at least one passage")
    chosen = build_streamed(shard_vectors, len(passages), dim, directory, shard_size, params,
                            seed, progress)
    return save_streamed(directory, chosen, passages, dim, shard_size, metadata)


def save_streamed(directory: str | Path, params: dict, passages: Sequence[Passage], dim: int,
                  shard_size: int, metadata: dict | None = None) -> DenseIndex:
    """Make the files :func:`build_streamed` wrote in ``directory`` (with its chosen
    ``params``) an index directory: ``passages`` and ``meta.json`` beside them. Returned
    memory-mapped, passages included (``index.PassageFile``)."""
    directory = Path(directory)
    meta = {"format": FORMAT, "encoder": None, "query_encoder": None, "pooling": None,
            "normalize": None, **(metadata or {}), "dim": dim, "metric": METRIC,
            "kind": "ivfpq", "rerank": True, "params": params, "count": len(passages),
            "fingerprint": corpus_fingerprint(passages), "faiss_version": faiss.__version__,
            "shard_size": shard_size, "sidecars": [IVFDATA_FILE, VECTORS_FILE],
            "rerank_vectors": VECTORS_FILE}
    with native_output_silenced():
        index = faiss.read_index(str(directory / INDEX_FILE), faiss.IO_FLAG_ONDISK_SAME_DIR)
    vectors = np.load(directory / VECTORS_FILE, mmap_mode="r")
    DenseIndex(index, list(passages), meta, vectors).save(directory)
    return DenseIndex.load(directory, mmap=True)


def build_sharded_index(passages: Sequence[Passage], directory: str | Path, shard_size: int,
                        preset: Preset | str = "tiny", progress: bool = True) -> DenseIndex:
    """``ragbook index --shard-size N``: :func:`streamed_index` of ``passages`` encoded by
    the preset's BERT_d, ``shard_size`` passages at a time; ``open_index`` reads the result."""
    from .config import get_preset
    from .retriever import Encoder

    preset = get_preset(preset) if isinstance(preset, str) else preset
    encoder = Encoder(preset.doc_encoder, preset.pooling, preset.normalize,
                      preset.max_passage_length)  # on config.default_device()
    return streamed_index(lambda s, e: encoder.encode_passages(passages[s:e], progress=False),
                          passages, encoder.dim, directory, shard_size,
                          _dense_metadata(preset), seed=preset.seed, progress=progress)


def synthetic_embeddings(n: int, dim: int, clusters: int, latent: int, seed: int,
                         centre_scale: float = 0.9, noise: float = 0.25,
                         chunk: int = 100_000) -> np.ndarray:
    """Stand-ins for sentence embeddings beyond a real corpus (benchmarks, notebook 09): unit
    vectors from a Gaussian mixture with low-rank within-cluster spread:
    ``centre_scale``·c + z·B + ``noise``·ε, with c, z, ε standard normal and B a fixed random
    (latent × dim) map with unit-variance output, then L2-normalised."""
    structure = np.random.default_rng(12345)  # the same mixture for corpus and queries
    centres = structure.standard_normal((clusters, dim)).astype(np.float32)
    basis = (structure.standard_normal((latent, dim)) / np.sqrt(latent)).astype(np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, chunk):  # in place in ``out``, one (chunk, dim) temporary at a time
        m = min(chunk, n - s)
        x = out[s:s + m]
        labels = rng.integers(0, clusters, m)
        np.matmul(rng.standard_normal((m, latent), dtype=np.float32), basis, out=x)
        part = centres[labels]
        x += np.multiply(part, centre_scale, out=part)
        del part
        part = rng.standard_normal((m, dim), dtype=np.float32)
        x += np.multiply(part, noise, out=part)
        del part
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    return out
