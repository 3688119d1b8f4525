"""Choosing w in the hybrid prior p_η(z|x) ∝ exp(s·d(z)ᵀq(x) + w·BM25(x, z)), on dev questions.

Two sweeps of the BM25 weight w, on the entity-QA dev split; test questions are never used to
pick w.

- default: retrieval recall@1/5/20 of the untrained MiniLM query encoder (the prior RAG starts
  from) beside BM25 alone; w = 0 is the dense retriever.
- ``--trained``: the two entity-QA RAG models of `ragbook ask` (dense prior, 250 steps,
  loaded from the cache or trained once) read with each w: Exact Match of both on 400 sampled
  dev questions, the recall of RAG-Token's prior, and the index hot-swap of RAG-Token on the
  same questions (``evaluate.hot_swap``: the share of edited facts answered with the new name).

    python benchmarks/hybrid_prior.py [--weights 0 0.25 0.5 1 2 4] [--out results/...json]
    python benchmarks/hybrid_prior.py --trained --weights 0.5 1 2 4 8
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from ragbook import evaluate as ev
from ragbook.config import get_preset
from ragbook.data import article_topics, load_corpus, load_task
from ragbook.pipeline import RagModel
from ragbook.reproduce import ReproduceConfig, rag_model
from ragbook.retriever import BM25Retriever

KS = (1, 5, 20)
RESULTS = Path(__file__).parent / "results"


def untrained(dev: list, weights: list[float]) -> dict:
    preset = get_preset("tiny")
    model = RagModel.from_preset(preset, retriever="hybrid")
    bm25 = RagModel(preset, model.query_encoder, model.generator, model.tokenizer, None,
                    bm25=model.bm25)
    rows = [{"retriever": "bm25", "recall": ev.retrieval_recall(bm25, dev, KS)}]
    for w in weights:
        start = time.time()
        model.bm25_weight = w
        rows.append({"retriever": "hybrid", "w": w,
                     "recall": ev.retrieval_recall(model, dev, KS),
                     "seconds": round(time.time() - start, 1)})
    for row in rows:
        label = "BM25 alone" if row["retriever"] == "bm25" else f"w = {row['w']:g}"
        print(f"{label:12}" + "".join(f"  R@{k} {row['recall'][k]:.3f}" for k in KS))
    return {"questions": len(dev), "split": "dev",
            "query_encoder": "all-MiniLM-L6-v2 (untrained)", "rows": rows}


def trained(dev: list, weights: list[float], questions: int, facts: int) -> dict:
    cfg = ReproduceConfig(retriever="hybrid")  # the dense prior in training, hybrid at test
    sample = random.Random(f"dev/{cfg.seed}").sample(dev, questions)
    bm25 = BM25Retriever(load_corpus())  # one BM25 index for both models
    models = {m: rag_model(cfg, "entity-qa", m, bm25=bm25) for m in ("token", "sequence")}
    rows = []
    for w in weights:
        for model in models.values():
            model.bm25_weight = w
        row = {"w": w, **{f"em_rag_{m}": ev.evaluate_rag(model, sample, m)[0]["em"]
                          for m, model in models.items()},
               "recall_rag_token": ev.retrieval_recall(models["token"], dev, KS)}
        swap = ev.hot_swap(models["token"], sample, facts, cfg.seed, kinds=article_topics())
        row.update(hot_swap_followed=swap["followed"], hot_swap_facts=swap["facts"],
                   hot_swap_kept=swap["kept"])
        rows.append(row)
        print(f"w = {w:<4g} EM RAG-Token {row['em_rag_token']:.3f}  RAG-Sequence "
              f"{row['em_rag_sequence']:.3f}  hot-swap followed {swap['followed']:.2f}  "
              + "  ".join(f"R@{k} {row['recall_rag_token'][k]:.3f}" for k in KS), flush=True)
    return {"split": "dev", "em_questions": len(sample), "recall_questions": len(dev),
            "hot_swap_facts": facts, "models": "the entity-QA RAG-Token and RAG-Sequence "
            f"({cfg.entity_steps} steps, trained with the {cfg.training_prior} prior)",
            "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, nargs="+", default=[0, 0.25, 0.5, 1, 2, 4])
    parser.add_argument("--trained", action="store_true",
                        help="sweep w for reproduce's jointly trained models (EM, hot-swap)")
    parser.add_argument("--questions", type=int, default=400, help="dev questions for EM")
    parser.add_argument("--facts", type=int, default=ReproduceConfig.hot_swap_facts)
    parser.add_argument("--out", help="default results/hybrid_prior[_trained].json")
    args = parser.parse_args()
    dev = load_task("entity-qa", "dev", ReproduceConfig.seed)
    if args.trained:
        result = trained(dev, args.weights, args.questions, args.facts)
    else:
        result = untrained(dev, args.weights)
    out = args.out or RESULTS / f"hybrid_prior{'_trained' if args.trained else ''}.json"
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
