"""Index hot-swap: how often each RAG model follows the edited index, and where it misses.

Runs `evaluate.hot_swap` on the two entity-QA RAG models of `ragbook ask` (250 joint steps,
loaded from the cache, or trained once), each decoded with its own marginalization, on 400
sampled entity-QA test questions, for several draws of renamed articles (reading QA's span
hot-swap is `ragbook reproduce`'s). A miss is read from the provenance of the
wrong answer: the edited passage not retrieved at all, retrieved but outranked by another
passage, or ranked first and miscopied.

    python benchmarks/hot_swap.py [--facts 100] [--seeds 0 1] [--out results/...json]
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

from ragbook import evaluate as ev
from ragbook.config import RETRIEVERS
from ragbook.data import article_topics
from ragbook.reproduce import ReproduceConfig, rag_model, test_examples


def where(rank: int | None) -> str:
    return {None: "not retrieved", 1: "first, miscopied"}.get(rank, "retrieved, outranked")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--facts", type=int, default=ReproduceConfig.hot_swap_facts)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "hot_swap.json"))
    parser.add_argument("--training-prior", choices=RETRIEVERS,
                        default=ReproduceConfig.training_prior)
    parser.add_argument("--retriever", choices=RETRIEVERS, default=ReproduceConfig.retriever)
    args = parser.parse_args()
    cfg = ReproduceConfig(training_prior=args.training_prior, retriever=args.retriever)
    qa = test_examples("entity-qa", cfg.eval_questions, cfg.seed)
    rows = []
    for marginalization in ("token", "sequence"):
        model = rag_model(cfg, "entity-qa", marginalization)
        for seed in args.seeds:
            r = ev.hot_swap(model, qa, args.facts, seed, kinds=article_topics(),
                            marginalization=marginalization)
            misses = Counter(where(m["edited_rank"]) for m in r["misses"])
            rows.append({"model": f"rag_{marginalization}", "training_prior": cfg.training_prior,
                         "retriever": cfg.retriever, "seed": seed, "facts": r["facts"],
                         "followed": r["followed"], "kept": r["kept"], **misses,
                         "misses": r["misses"]})
            print({k: v for k, v in rows[-1].items() if k != "misses"}, flush=True)
    Path(args.out).write_text(json.dumps(rows, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
