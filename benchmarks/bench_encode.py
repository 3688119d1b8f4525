"""Benchmark corpus encoding: ``ragbook.retriever.Encoder.encode`` vs sentence-transformers.

Both encode the *same* passages ("title [SEP] text" of the built-in corpus, a fixed random
sample) with the *same* checkpoint (all-MiniLM-L6-v2), mean pooling, L2 normalisation, batch
size and maximum length. ragbook runs twice: in fp32, and with bf16 matrix products where the
CPU has them natively (``config.autocast``, as ``passage_embeddings`` encodes the corpus).
Rounds rotate the order, so that a change in the machine's load hits every contestant; the
report gives each one's best round and the median of the per-round throughput ratios against
sentence-transformers (target for fp32: ≥ 0.95). The vectors are compared too: fp32 must agree
with sentence-transformers to 1e-4, bf16 must keep every vector's direction to cosine 0.9999.

    nice -n 5 python benchmarks/bench_encode.py --n 1024 --rounds 3 --out results.json

Timings depend on the machine and on its load: compare rows of the same run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import numpy as np
import torch

from ragbook.config import MINILM, autocast, bf16_supported, resolve_model
from ragbook.data import load_corpus
from ragbook.retriever import Encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1024, help="passages per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from sentence_transformers import SentenceTransformer

    ours = Encoder(MINILM, pooling="mean", normalize=True, max_length=args.max_length)
    peer = SentenceTransformer(resolve_model(MINILM), device="cpu")
    peer.max_seq_length = args.max_length
    corpus = load_corpus()
    texts = ours.passage_texts(random.Random(args.seed).sample(corpus, min(args.n, len(corpus))))

    def run_ours(bf16: bool):
        def run() -> np.ndarray:  # bf16: as Encoder.encode_passages encodes the corpus
            with autocast("cpu", enabled=bf16):
                return ours.encode(texts, batch_size=args.batch_size, progress=False)
        return run

    def run_peer() -> np.ndarray:
        return peer.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                           normalize_embeddings=False, show_progress_bar=False)

    contestants = [("ragbook fp32", run_ours(False)), ("sentence-transformers", run_peer)]
    if bf16_supported("cpu"):
        contestants.insert(1, ("ragbook bf16", run_ours(True)))
    for _, fn in contestants:  # warm-up: allocator, thread pool, oneDNN kernels
        fn()
    rounds = []
    for r in range(args.rounds):
        row, vectors = {}, {}
        shift = r % len(contestants)  # who goes first rotates
        for name, fn in contestants[shift:] + contestants[:shift]:
            start = time.perf_counter()
            vectors[name] = fn()
            row[name] = len(texts) / (time.perf_counter() - start)
        peer_vectors = vectors["sentence-transformers"]
        row["fp32 max_abs_diff"] = float(np.abs(vectors["ragbook fp32"] - peer_vectors).max())
        if "ragbook bf16" in vectors:
            row["bf16 min_cosine"] = float(np.sum(vectors["ragbook bf16"] * peer_vectors,
                                                  axis=1).min())
        rounds.append(row)
        print(f"round {r}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()), flush=True)

    names = [name for name, _ in contestants]
    ratios = {name: [x[name] / x["sentence-transformers"] for x in rounds]
              for name in names if name != "sentence-transformers"}
    result = {
        "model": MINILM, "passages": len(texts), "batch_size": args.batch_size,
        "max_length": args.max_length, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "best_passages_per_s": {k: max(x[k] for x in rounds) for k in names},
        "median_ratio_to_sentence_transformers": {k: statistics.median(v)
                                                  for k, v in ratios.items()},
        "ratios": ratios,
        "fp32_max_abs_diff": max(x["fp32 max_abs_diff"] for x in rounds),
        "bf16_min_cosine": min((x["bf16 min_cosine"] for x in rounds if "bf16 min_cosine" in x),
                               default=None),
    }
    best, median = result["best_passages_per_s"], result["median_ratio_to_sentence_transformers"]
    print(f"\n| encoder | passages/s (best of {args.rounds}) | median ratio to "
          "sentence-transformers |\n|---|---|---|")
    for name in names:
        print(f"| {name} | {best[name]:.1f} | {median.get(name, 1.0):.2f} |")
    print(f"\nfp32 vectors agree with sentence-transformers to {result['fp32_max_abs_diff']:.1e}"
          + ("" if result["bf16_min_cosine"] is None else
             f"; bf16 vectors' least cosine to them: {result['bf16_min_cosine']:.6f}"))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    assert result["fp32_max_abs_diff"] < 1e-4, "ragbook's fp32 vectors differ from the peer's"
    assert result["bf16_min_cosine"] is None or result["bf16_min_cosine"] > 0.9999, \
        "bf16 turned some vector"


if __name__ == "__main__":
    main()
