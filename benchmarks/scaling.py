"""Beyond one machine's memory and one process: a streamed index build and data-parallel training.

``build``: a streamed on-disk IVF-PQ build (``ragbook.shards.build_streamed``) of ``--n``
synthetic vectors structured like sentence embeddings (``shards.synthetic_embeddings``, each shard a
fresh draw from the same mixture), in this process, then

- the resident memory the build adds to the process, beside the target: 1.5 × the
  compressed index (``index.faiss`` + ``index.ivfdata``) plus one shard of float32 vectors.
  The process's resident memory before the build (Python, NumPy, FAISS and ragbook imported)
  is the baseline, reported and subtracted: the build's memory is its peak minus the
  baseline. The peak is the kernel's exact high-water mark (``VmHWM``, reset at the start of
  each phase that ``ragbook.shards`` logs: encode, train, add, merge, vectors), its
  anonymous and file-backed parts (memory-mapped pages count as resident) sampled every few
  milliseconds;
- recall@10 after re-ranking against exact search (a streamed scan of ``vectors.npy``);
- the resident memory that opening the index (``DenseIndex.load(dir, mmap=True)``: codes,
  re-ranking vectors and passages all left on disk) and then running those searches add to a
  fresh process, anonymous and file-backed (from ``/proc/self/status``): what each rank of a
  data-parallel run pays. ``n`` synthetic passages ("p0", "p1", …) are saved with the index.

``train``: tokens/s of ``train.train_rag`` on the tiny preset with 1 and with 2 processes
(torchrun, gloo on CPU), the same global batch.

    python benchmarks/scaling.py build --n 1000000 --out benchmarks/results/scaling_build.json
    # on a busy machine, in runs of 5 minutes: the same line with --work DIR, repeated
    python benchmarks/scaling.py train --steps 6 --out benchmarks/results/scaling_train.json

Timings depend on the machine and its load: compare rows of one run only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from ragbook import shards
from ragbook.data import Passage
from ragbook.index import DenseIndex, default_params
from ragbook.shards import synthetic_embeddings as synthetic

K = 10


def rss_mb(keys=("VmRSS", "RssAnon", "RssFile")) -> dict[str, float]:
    """Resident memory now (MiB): anonymous (the process's own) and file-backed (mapped
    pages); ``VmHWM`` is the peak since the last :func:`reset_peak`."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text()
                  .splitlines() if ":" in line)
    return {k: int(status[k].split()[0]) / 1024 for k in keys}


def reset_peak() -> None:
    """Set the kernel's high-water mark (``VmHWM``) to the resident memory now (Linux ≥ 4.0)."""
    Path("/proc/self/clear_refs").write_text("5")


class PhaseMemory(logging.Handler):
    """Each phase's resident memory, delimited by the records ``ragbook.shards`` logs: the
    exact peak (``VmHWM``) and what it adds to ``baseline`` (MiB), the largest anonymous and
    file-backed parts (sampled every ``interval`` s by a thread), the resident memory at its
    start and its seconds. Saved to ``path`` after every record, so that a build resumed by
    another run (``--work``) adds its phases to those measured before."""

    def __init__(self, baseline: float, path: Path, interval: float = 0.005):
        super().__init__()
        self.baseline, self.path = baseline, path
        saved = json.loads(path.read_text()) if path.exists() else {"runs": 0, "phases": {}}
        self.runs, self.phases = saved["runs"] + 1, saved["phases"]
        self.current, self.started, self.stop = None, 0.0, threading.Event()
        self.anon = self.file = 0.0
        self.sampler = threading.Thread(target=self._sample, args=(interval,), daemon=True)
        self.sampler.start()

    def _sample(self, interval: float) -> None:
        while not self.stop.wait(interval):
            now = rss_mb()
            self.anon, self.file = max(self.anon, now["RssAnon"]), max(self.file, now["RssFile"])

    def _end_phase(self) -> None:
        if self.current is None:
            return
        now = rss_mb(("VmHWM", "RssAnon", "RssFile"))
        row = self.phases[self.current]
        row["peak_mb"] = max(row["peak_mb"], now["VmHWM"])
        row["anon_mb"] = max(row["anon_mb"], self.anon, now["RssAnon"])
        row["file_mb"] = max(row["file_mb"], self.file, now["RssFile"])
        row["seconds"] += time.perf_counter() - self.started
        row["added_mb"] = max(row["added_mb"], now["VmHWM"] - self.baseline)
        self.path.write_text(json.dumps({"runs": self.runs, "phases": self.phases}))

    def emit(self, record: logging.LogRecord) -> None:
        self._end_phase()
        self.current = record.args[0]
        if self.current not in self.phases:
            self.phases[self.current] = {"start_mb": rss_mb()["VmRSS"],
                                         "peak_mb": 0.0, "added_mb": 0.0, "anon_mb": 0.0,
                                         "file_mb": 0.0, "seconds": 0.0}
        reset_peak()
        now = rss_mb()
        self.anon, self.file, self.started = now["RssAnon"], now["RssFile"], time.perf_counter()

    def close(self) -> None:
        self._end_phase()
        self.current = None
        self.stop.set()
        self.sampler.join()
        super().close()


def draw(n: int, dim: int, seed: int) -> np.ndarray:
    return synthetic(n, dim, clusters=1000, latent=32, seed=seed, chunk=10_000)


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 50_000):
    """Exact top-k inner products, scanning the (memory-mapped) vectors chunk by chunk."""
    best = np.full((len(queries), k), -np.inf, np.float32)
    ids = np.zeros((len(queries), k), np.int64)
    for s in range(0, len(vectors), chunk):
        scores = queries @ np.asarray(vectors[s:s + chunk]).T
        both = np.concatenate([best, scores], axis=1)
        cand = np.concatenate([ids, np.broadcast_to(np.arange(s, s + scores.shape[1]),
                                                     scores.shape)], axis=1)
        top = np.argpartition(-both, k - 1, axis=1)[:, :k]
        best, ids = np.take_along_axis(both, top, 1), np.take_along_axis(cand, top, 1)
    return ids


def build(args) -> dict:
    faiss.omp_set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="ragbook-scaling-", dir=args.tmp))
    work.mkdir(parents=True, exist_ok=True)
    params = {**default_params("ivfpq", args.n, args.dim), "nlist": args.nlist}
    logger = logging.getLogger(shards.__name__)
    logger.setLevel(logging.INFO)
    before = rss_mb()  # the baseline: Python, NumPy, FAISS, ragbook imported
    memory = PhaseMemory(before["VmRSS"], work / "memory.json")
    logger.addHandler(memory)
    try:
        shards.build_streamed(lambda s, e: draw(e - s, args.dim, seed=1 + s // args.shard_size),
                              args.n, args.dim, work, args.shard_size, params, progress=True)
    finally:
        logger.removeHandler(memory)
        memory.close()
    seconds = sum(row["seconds"] for row in memory.phases.values())
    peak = max(row["peak_mb"] for row in memory.phases.values())
    compressed = sum((work / f).stat().st_size for f in ("index.faiss", shards.IVFDATA_FILE))
    shard = args.shard_size * args.dim * 4
    target = (1.5 * compressed + shard) / 2**20
    added = max(row["added_mb"] for row in memory.phases.values())

    shards.save_streamed(work, params, [Passage(f"p{i}", "", "") for i in range(args.n)],
                         args.dim, args.shard_size)
    queries = draw(args.queries, args.dim, seed=10**6)
    np.save(work / "queries.npy", queries)
    subprocess.run([sys.executable, __file__, "open-worker", "--work", str(work),
                    "--threads", str(args.threads)], check=True, timeout=1800)
    opening = json.loads((work / "opening.json").read_text())
    vectors = np.load(work / shards.VECTORS_FILE, mmap_mode="r")
    exact = exact_top(vectors, queries, K)
    for row in opening["search"]:
        row["recall@10"] = float(np.mean([len(set(f) & set(e)) / K
                                          for f, e in zip(row.pop("found"), exact)]))
    shutil.rmtree(work)
    mb = 2**20
    return {"n": args.n, "dim": args.dim, "shard_size": args.shard_size, "params": params,
            "build_seconds": round(seconds, 1), "peak_rss_mb": round(peak, 1),
            "rss_before_build_mb": before, "compressed_index_mb": round(compressed / mb, 1),
            "one_shard_mb": round(shard / mb, 1), "target_mb": round(target, 1),
            "build_added_mb": round(added, 1), "added_over_target": round(added / target, 3),
            "phases": {name: {k: round(v, 1) for k, v in row.items()}
                       for name, row in memory.phases.items()}, "build_runs": memory.runs,
            "flat_vectors_mb": round(args.n * args.dim * 4 / mb, 1),
            **opening,
            "threads": args.threads, "machine": platform.platform(),
            "cpus": os.cpu_count(), "faiss": faiss.__version__}


def open_worker(args) -> None:
    """A fresh process opens the saved index mapped and searches it: what it adds to memory."""
    faiss.omp_set_num_threads(args.threads)
    work = Path(args.work)
    queries = np.load(work / "queries.npy")
    loaded = rss_mb()
    dense = DenseIndex.load(work, mmap=True)
    opened = rss_mb()
    rows = []
    for k_factor in (1, 8):
        dense.set_search_params(k_factor=k_factor)
        t = time.perf_counter()
        found = dense.search(queries, K).indices
        rows.append({"k_factor": k_factor, "nprobe": dense.metadata["params"]["nprobe"],
                     "found": found.tolist(),
                     "qps": round(len(queries) / (time.perf_counter() - t), 1),
                     "rss_mb": rss_mb()})
    (work / "opening.json").write_text(json.dumps(
        {"rss_before_open_mb": loaded, "rss_opened_mb": opened, "search": rows}))


def train_worker(args) -> None:
    """One rank: ``--steps`` of train_rag on the tiny preset; rank 0 writes the timing."""
    import torch

    from ragbook import train
    from ragbook.config import get_preset
    from ragbook.data import load_task
    from ragbook.pipeline import RagModel

    torch.set_num_threads(1)
    preset = get_preset("tiny")
    model = RagModel.from_preset(preset, mmap=True)
    examples = load_task("entity-qa", "train", preset.seed)
    cfg = train.RagTrainConfig(n_docs=preset.n_docs, steps=args.steps,
                               batch_size=args.batch_size, warmup=1)
    sample = examples[:args.batch_size]  # tokens a step feeds the generator: batch·k inputs
    found = model.retrieve([e.question for e in sample], preset.n_docs)
    tokens = int(model.generator_inputs([e.question for e in sample], found.passages)
                 ["attention_mask"].sum())
    state = train.train_rag(model, examples, cfg, progress=False)
    if int(os.environ.get("RANK", "0")) == 0:
        steps = state["seconds"]  # the steps alone, not loading or retrieval set-up
        Path(args.result).write_text(json.dumps({
            "processes": int(os.environ.get("WORLD_SIZE", "1")), "steps": args.steps,
            "batch_size": args.batch_size, "seconds": round(steps, 2),
            "tokens_per_step": tokens, "tokens_per_s": round(tokens * args.steps / steps, 1),
            "examples_per_s": round(args.batch_size * args.steps / steps, 2),
            "history": state["history"]}))


def train_bench(args) -> dict:
    import socket

    runs = []
    for processes in (1, 2):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        result = Path(tempfile.mkstemp(suffix=".json")[1])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
        launcher = [sys.executable] if processes == 1 else [  # one: no launcher at all
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
            "--master_addr", "127.0.0.1", "--master_port", str(port)]
        try:
            subprocess.run([*launcher, __file__, "train-worker", "--steps", str(args.steps),
                            "--batch-size", str(args.batch_size), "--result", str(result)],
                           env=env, check=True, timeout=900)
            runs.append(json.loads(result.read_text()))
        finally:
            result.unlink()
        print(runs[-1])
    return {"runs": runs, "speedup": round(runs[1]["tokens_per_s"] / runs[0]["tokens_per_s"], 3),
            "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "machine": platform.platform()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--shard-size", type=int, default=50_000)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tmp", default=None, help="where the build's files go (default: /tmp)")
    p.add_argument("--work", help="build here and keep it if interrupted: the next run with "
                                  "the same arguments resumes it (default: a new folder)")
    p.add_argument("--out")
    p = sub.add_parser("open-worker")
    p.add_argument("--work", required=True)
    p.add_argument("--threads", type=int, default=1)
    for name in ("train", "train-worker"):
        p = sub.add_parser(name)
        p.add_argument("--steps", type=int, default=6)
        p.add_argument("--batch-size", type=int, default=8)
        p.add_argument("--result")
        p.add_argument("--out")
    args = parser.parse_args()
    if args.command in ("train-worker", "open-worker"):
        return (train_worker if args.command == "train-worker" else open_worker)(args)
    result = build(args) if args.command == "build" else train_bench(args)
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
