"""Benchmark ragbook.index.DenseIndex against raw FAISS, and Flat vs HNSW vs IVF-PQ.

Measured side by side in one run, for each size n (default 100k and 1M vectors of dim 384):

1. wrapper overhead: ``DenseIndex.search`` vs ``faiss_index.search`` on the *same* index and
   queries, in paired back-to-back trials (target: throughput ratio ≥ 0.9), and the wrapper's
   own cost per call, timed around a stand-in index that answers instantly;
2. each index kind with ragbook's defaults: build time, bytes per vector, and for a sweep of
   its search parameter (HNSW efSearch, IVF-PQ nprobe and re-ranking depth k_factor)
   queries per second and recall@10 against exact search.

The vectors are synthetic but structured like sentence embeddings (the built-in corpus has only
~12k passages): a mixture of ``--clusters`` Gaussian clusters whose spread lives in a
``--latent``-dimensional subspace, plus a little isotropic noise, L2-normalised. Queries are
fresh draws from the same mixture. The defaults put the clusters just far enough apart that an
IVF index visiting 1–5% of its cells finds 0.92–0.96 of the exact top-10 at 100k, roughly as on
real text embeddings; heavily overlapping clusters (``--centre-scale 0.6 --latent 48``) are far
harder for every approximate index, well-separated ones (``--centre-scale 1.2``) far easier.

    nice -n 5 python benchmarks/bench_index.py --sizes 100000 1000000 --out results.json

Timings depend on the machine and on its load: compare rows of the same run only. On a shared
machine use ``--threads 1``: when other processes hold the cores, FAISS's OpenMP threads wait on
each other at every barrier (an IVF-PQ build of 3,000 vectors took 20 s with 2 threads and
1.6 s with 1 on the loaded 2-core machine where this was written).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import time
from functools import partial

import faiss
import numpy as np

from ragbook.data import Passage
from ragbook.index import DenseIndex
from ragbook.shards import synthetic_embeddings as synthetic

K = 10


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(e)) / len(e) for f, e in zip(found, exact)]))


def overhead(dense: DenseIndex, queries: np.ndarray, trials: int) -> dict:
    """Throughput of the wrapper / raw FAISS on the same index, batched and one at a time.

    Each trial times raw FAISS and DenseIndex back to back, in alternating order, on the same
    queries; the ratio reported is the median over trials of raw time / wrapper time, so that
    the machine's load, which drifts slowly, cancels out of each pair.
    """
    raw = dense.index
    batch, few = queries[:100], queries[:20]
    jobs = {
        "batched": (lambda: raw.search(batch, K), lambda: dense.search(batch, K)),
        "single": (lambda: [raw.search(q[None], K) for q in few],
                   lambda: [dense.search(q[None], K) for q in few]),
    }
    out = {}
    for name, (run_raw, run_dense) in jobs.items():
        ratios, raw_times = [], []
        for trial in range(trials):
            first, second = (run_raw, run_dense) if trial % 2 == 0 else (run_dense, run_raw)
            t1, t2 = best_time(first, 1), best_time(second, 1)
            t_raw, t_dense = (t1, t2) if trial % 2 == 0 else (t2, t1)
            ratios.append(t_raw / t_dense)
            raw_times.append(t_raw)
        out[f"{name}_ratio"] = float(np.median(ratios))
        calls = 1 if name == "batched" else len(few)
        out[f"{name}_raw_ms_per_call"] = float(np.median(raw_times)) / calls * 1e3
    return out


class _InstantIndex:
    """A stand-in FAISS index that answers instantly with fixed results: timing
    ``DenseIndex.search`` on it measures the wrapper's own work alone."""

    def __init__(self, n: int, dim: int, batch: int, k: int):
        self.d, self.ntotal = dim, n
        rng = np.random.default_rng(0)
        self.result = (rng.random((batch, k), dtype=np.float32),
                       rng.integers(0, n, (batch, k)).astype(np.int64))

    def search(self, q, k):
        return self.result


def _repeat(fn, q, k, reps):
    for _ in range(reps):
        fn(q, k)


def wrapper_cost(dim: int, k: int = K, calls: int = 2000) -> dict:
    """Microseconds DenseIndex.search adds per call, around an index that costs nothing."""
    out = {}
    for batch in (1, 1000):
        n = 100_000
        dense = DenseIndex(_InstantIndex(n, dim, batch, k),
                           [Passage(id=str(i), title="", text="") for i in range(n)],
                           {"kind": "flat"})
        q = np.zeros((batch, dim), dtype=np.float32)
        reps = max(1, calls // batch)
        secs = best_time(partial(_repeat, dense.search, q, k, reps), 5)
        out[f"batch_{batch}_us_per_call"] = secs / reps * 1e6
    return out


_LOAD = """
import json, sys, time
import faiss
import numpy as np
from ragbook.index import INDEX_FILE, DenseIndex

def anon():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))

directory, mmap, k = sys.argv[1], sys.argv[2] == "1", int(sys.argv[3])
queries = np.load(directory + "/queries.npy")
before = anon()  # the FAISS index alone (DenseIndex also holds the passages' text)
faiss_index = faiss.read_index(f"{directory}/index/{INDEX_FILE}",
                               faiss.IO_FLAG_MMAP_IFC if mmap else 0)
resident = (anon() - before) / faiss_index.ntotal
index = DenseIndex.load(directory + "/index", mmap=mmap)
index.search(queries, k)  # first touch: the mapped pages come in from disk
start = time.perf_counter()
found = index.search(queries, k).indices
qps = len(queries) / (time.perf_counter() - start)
print(json.dumps({"resident": resident, "qps": qps, "found": found.tolist()}))
"""


def mapped(dense: DenseIndex, queries: np.ndarray, exact: np.ndarray) -> dict:
    """Save the index, then load it in a fresh process, read into memory or memory-mapped
    (``mmap=True``): the anonymous resident bytes per vector each load adds (Linux; the file
    pages of a mapped index are page cache, which the kernel can drop), QPS and recall@10."""
    import subprocess
    import sys
    import tempfile

    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        dense.save(f"{tmp}/index")
        np.save(f"{tmp}/queries.npy", queries)
        for mmap in (False, True):
            run = subprocess.run([sys.executable, "-c", _LOAD, tmp, str(int(mmap)), str(K)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(run.stdout)
            out["mmap" if mmap else "read"] = {
                "resident_bytes_per_vector": r["resident"], "qps": r["qps"],
                "recall@10": recall_at_k(np.array(r["found"]), exact)}
    return out


def run_size(n: int, args) -> dict:
    print(f"\n=== n = {n:,} ===", flush=True)
    shape = (args.dim, args.clusters, args.latent)
    vectors = synthetic(n, *shape, seed=1, centre_scale=args.centre_scale, noise=args.noise)
    queries = synthetic(args.queries, *shape, seed=2, centre_scale=args.centre_scale,
                        noise=args.noise)
    passages = [Passage(id=str(i), title="", text="") for i in range(n)]
    result = {"n": n, "kinds": {}}
    exact = None
    for kind in args.kinds:
        gc.collect()
        t = time.perf_counter()
        dense = DenseIndex.build(vectors, passages, kind=kind, rerank=True, progress=False)
        build_s = time.perf_counter() - t
        row = {"build_s": build_s, "params": dict(dense.metadata["params"]),
               "bytes_per_vector": dense.nbytes() / n}
        if kind == "ivfpq":
            base = faiss.downcast_index(dense.index).base_index
            row["codes_bytes_per_vector"] = faiss.serialize_index(base).size / n
        if exact is None:
            exact = dense.index.search(queries, K)[1]
        row["overhead"] = overhead(dense, queries, args.trials)
        sweep = []
        if kind == "flat":
            settings = [{}]
        elif kind == "hnsw":
            settings = [{"efSearch": e} for e in (16, 32, 64, 128, 256)]
        else:
            nlist = dense.metadata["params"]["nlist"]
            settings = [{"nprobe": p, "k_factor": kf} for p in (4, 16, 64, 256)
                        if p <= nlist for kf in (1, 4, 16)]
        for setting in settings:
            dense.set_search_params(**setting)
            found = dense.index.search(queries, K)[1]
            secs = best_time(partial(dense.search, queries, K), args.repeats)
            sweep.append({**setting, "qps": len(queries) / secs,
                          "recall@10": recall_at_k(found, exact)})
            print(f"{kind:6} {setting} qps {sweep[-1]['qps']:9.0f} "
                  f"recall@10 {sweep[-1]['recall@10']:.3f}", flush=True)
        row["sweep"] = sweep
        if kind == "ivfpq":
            dense.set_search_params(**{k: v for k, v in row["params"].items()
                                       if k in ("nprobe", "k_factor")})
            row["loaded"] = mapped(dense, queries, exact)
            for how, m in row["loaded"].items():
                print(f"ivfpq  loaded ({how}): {m['resident_bytes_per_vector']:.0f} resident "
                      f"B/vector, qps {m['qps']:.0f}, recall@10 {m['recall@10']:.3f}", flush=True)
        print(f"{kind:6} build {build_s:6.1f}s  {row['bytes_per_vector']:.0f} B/vector  "
              f"overhead batched {row['overhead']['batched_ratio']:.3f}x "
              f"single {row['overhead']['single_ratio']:.3f}x", flush=True)
        result["kinds"][kind] = row
        del dense
    return result


def markdown(results: list[dict]) -> str:
    lines = ["| n | index | build (s) | bytes / vector | setting | QPS | × exact QPS | "
             "recall@10 |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        flat_qps = r["kinds"]["flat"]["sweep"][0]["qps"]
        for kind, row in r["kinds"].items():
            size = f"{row['bytes_per_vector']:.0f}"
            if "codes_bytes_per_vector" in row:
                size += f" ({row['codes_bytes_per_vector']:.0f} without re-ranking vectors)"
            for s in row["sweep"]:
                setting = ", ".join(f"{k}={v}" for k, v in s.items()
                                    if k not in ("qps", "recall@10")) or "exact"
                lines.append(f"| {r['n']:,} | {kind} | {row['build_s']:.1f} | {size} | "
                             f"{setting} | {s['qps']:,.0f} | {s['qps'] / flat_qps:.1f} | "
                             f"{s['recall@10']:.3f} |")
    lines += ["", "| n | index | DenseIndex / raw FAISS: 100 queries batched | "
              "raw FAISS per batch (ms) | 1 query per call | raw FAISS per call (ms) |",
              "|---|---|---|---|---|---|"]
    for r in results:
        for kind, row in r["kinds"].items():
            o = row["overhead"]
            lines.append(f"| {r['n']:,} | {kind} | {o['batched_ratio']:.3f} | "
                         f"{o['batched_raw_ms_per_call']:.1f} | {o['single_ratio']:.3f} | "
                         f"{o['single_raw_ms_per_call']:.2f} |")
    lines += ["", "| n | IVF-PQ loaded | resident bytes / vector | QPS | recall@10 |",
              "|---|---|---|---|---|"]
    for r in results:
        for how, m in r["kinds"].get("ivfpq", {}).get("loaded", {}).items():
            lines.append(f"| {r['n']:,} | {how} | {m['resident_bytes_per_vector']:.0f} | "
                         f"{m['qps']:,.0f} | {m['recall@10']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000],
                        help="vector counts; none: only the wrapper's own cost")
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivfpq"],
                        choices=["flat", "hnsw", "ivfpq"], help="flat first: it is the reference")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--latent", type=int, default=32)
    parser.add_argument("--centre-scale", type=float, default=0.9)
    parser.add_argument("--noise", type=float, default=0.25)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=21)
    parser.add_argument("--threads", type=int, default=0,
                        help="FAISS (OpenMP) threads; 0: FAISS's default, one per core")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    env = {"faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(),
           "machine": platform.machine(), "python": platform.python_version()}
    print(env)
    cost = wrapper_cost(args.dim)
    print("DenseIndex.search's own cost per call (µs):",
          {k: round(v, 1) for k, v in cost.items()}, flush=True)
    results = []
    for n in args.sizes:
        results.append(run_size(n, args))
        if args.out:  # after every size, so a long run leaves its finished part behind
            with open(args.out, "w") as f:
                json.dump({"env": env, "args": vars(args), "wrapper_cost": cost,
                           "results": results}, f, indent=2)
    if results:
        print("\n" + markdown(results))


if __name__ == "__main__":
    main()
