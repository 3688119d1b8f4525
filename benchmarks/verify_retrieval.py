"""Which article a fact-verification claim retrieves: the claimed one, or the one its
description was taken from.

A claim is "<title>: <description>"; for a REFUTES claim the description is another article's
(its *owner*). Counted over reproduce's test claims with the untrained query encoder, for the
dense prior and the hybrid one (dense × BM25): how often the claimed article and, for REFUTES,
the owner are at rank 1 and among the top 5.

    python benchmarks/verify_retrieval.py [--claims 400] [--out results/verify_retrieval.json]
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from ragbook.config import get_preset
from ragbook.data import load_articles
from ragbook.evaluate import retrieved_passages
from ragbook.pipeline import RagModel
from ragbook.reproduce import test_examples

RESULTS = Path(__file__).parent / "results"


def counts(model, claims, owner: dict[str, str]) -> dict[str, int]:
    stats: Counter = Counter()
    for e, passages in zip(claims, retrieved_passages(model, claims, 5)):
        titles = [p.title for p in passages]
        label = e.answers[0]
        stats[f"{label} claims"] += 1
        stats[f"{label}: claimed article at rank 1"] += titles[0] == e.article
        stats[f"{label}: claimed article in top 5"] += e.article in titles
        if label == "REFUTES":
            other = owner[e.question[len(e.article) + 2:]]
            stats["REFUTES: description's owner at rank 1"] += titles[0] == other
            stats["REFUTES: description's owner in top 5"] += other in titles
    return dict(sorted(stats.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--claims", type=int, default=400)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "verify_retrieval.json")
    args = p.parse_args()
    owner: dict[str, str] = {}
    for a in load_articles():
        owner.setdefault(a["description"], a["title"])
    claims = test_examples("verify", args.claims, args.seed)
    hybrid = RagModel.from_preset(get_preset("tiny", seed=args.seed), retriever="hybrid")
    record = {"date": time.strftime("%Y-%m-%d"), "claims": len(claims),
              "query_encoder": "untrained MiniLM",
              "dense": counts(hybrid.with_bm25(None), claims, owner),
              f"hybrid, w = {hybrid.bm25_weight:g}": counts(hybrid, claims, owner)}
    print(json.dumps(record, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
