"""Benchmark corpus encoding: ``ragbook.retriever.Encoder.encode`` vs sentence-transformers.

Both encode the *same* passages ("title [SEP] text" of the built-in corpus, a fixed random
sample) with the *same* checkpoint (all-MiniLM-L6-v2), mean pooling, L2 normalisation, batch
size and maximum length. Rounds alternate between the two, so that a change in the machine's
load hits both; the report gives each one's best round and the median of the per-round
throughput ratios (target: ragbook / sentence-transformers ≥ 0.95). The vectors are also
compared: they must agree to 1e-4.

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

from ragbook.config import MINILM, resolve_model
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

    def run_ours() -> np.ndarray:
        return ours.encode(texts, batch_size=args.batch_size, progress=False)

    def run_peer() -> np.ndarray:
        return peer.encode(texts, batch_size=args.batch_size, convert_to_numpy=True,
                           normalize_embeddings=False, show_progress_bar=False)

    ours.encode(texts[:args.batch_size], progress=False)  # warm-up: allocator, thread pool
    peer.encode(texts[:args.batch_size], show_progress_bar=False)
    rounds = []
    for r in range(args.rounds):
        row = {}
        pair = [("ragbook", run_ours), ("sentence-transformers", run_peer)]
        for name, fn in pair if r % 2 == 0 else pair[::-1]:  # who goes first alternates
            start = time.perf_counter()
            vectors = fn()
            row[name] = len(texts) / (time.perf_counter() - start)
            row[f"{name} vectors"] = vectors
        diff = float(np.abs(row["ragbook vectors"] - row["sentence-transformers vectors"]).max())
        rounds.append({"ragbook": row["ragbook"], "sentence-transformers":
                       row["sentence-transformers"], "max_abs_diff": diff})
        print(f"round {r}: ragbook {row['ragbook']:.1f} passages/s, sentence-transformers "
              f"{row['sentence-transformers']:.1f} passages/s, max |Δ| {diff:.1e}", flush=True)

    ratios = [x["ragbook"] / x["sentence-transformers"] for x in rounds]
    result = {
        "model": MINILM, "passages": len(texts), "batch_size": args.batch_size,
        "max_length": args.max_length, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
        "best_passages_per_s": {k: max(x[k] for x in rounds)
                                for k in ("ragbook", "sentence-transformers")},
        "median_ratio": statistics.median(ratios), "ratios": ratios,
        "max_abs_diff": max(x["max_abs_diff"] for x in rounds),
    }
    best = result["best_passages_per_s"]
    print(f"\n| encoder | passages/s (best of {args.rounds}) |\n|---|---|\n"
          f"| ragbook Encoder.encode | {best['ragbook']:.1f} |\n"
          f"| SentenceTransformer.encode | {best['sentence-transformers']:.1f} |\n\n"
          f"ratio ragbook / sentence-transformers: median {result['median_ratio']:.2f} "
          f"(rounds: {', '.join(f'{x:.2f}' for x in ratios)}); "
          f"vectors agree to {result['max_abs_diff']:.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    assert result["max_abs_diff"] < 1e-4, "the two encoders disagree"


if __name__ == "__main__":
    main()
