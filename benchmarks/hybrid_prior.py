"""Choosing w in the hybrid prior p_η(z|x) ∝ exp(s·d(z)ᵀq(x) + w·BM25(x, z)), on dev questions.

Sweeps the BM25 weight w for the untrained MiniLM query encoder (the prior RAG starts from) and
reports retrieval recall@1/5/20 on the entity-QA dev split, beside BM25 alone. w = 0 is the
dense retriever. Test questions are never used to pick w.

    python benchmarks/hybrid_prior.py [--weights 0 0.25 0.5 1 2 4] [--out results/...json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ragbook import evaluate as ev
from ragbook.config import get_preset
from ragbook.data import load_task
from ragbook.pipeline import RagModel

KS = (1, 5, 20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 1, 2, 4])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "hybrid_prior.json"))
    args = parser.parse_args()
    preset = get_preset("tiny")
    dev = load_task("entity-qa", "dev", preset.seed)
    model = RagModel.from_preset(preset, retriever="hybrid")
    bm25 = RagModel(preset, model.query_encoder, model.generator, model.tokenizer, None,
                    bm25=model.bm25)
    rows = [{"retriever": "bm25", "recall": ev.retrieval_recall(bm25, dev, KS)}]
    for w in args.weights:
        start = time.time()
        model.bm25_weight = w
        rows.append({"retriever": "hybrid", "w": w,
                     "recall": ev.retrieval_recall(model, dev, KS),
                     "seconds": round(time.time() - start, 1)})
    for row in rows:
        label = "BM25 alone" if row["retriever"] == "bm25" else f"w = {row['w']:g}"
        print(f"{label:12}" + "".join(f"  R@{k} {row['recall'][k]:.3f}" for k in KS))
    Path(args.out).write_text(json.dumps({"questions": len(dev), "split": "dev",
                                          "query_encoder": "all-MiniLM-L6-v2 (untrained)",
                                          "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
