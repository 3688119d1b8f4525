"""Table 6 on reading QA: RAG fine-tuned with a trainable vs a frozen query encoder BERT_q.

The paper's Table 6 ablation ("Frozen" retriever vs learned) at `ragbook reproduce`'s sizes:
RAG-Sequence and RAG-Token as `reproduce.rag_model` trains them (``ReproduceConfig.rag_steps``
steps, the dense prior), once with BERT_q trained jointly (the models `reproduce` caches) and
once frozen (``freeze_retriever``), then read greedily (RAG-Sequence Thorough) on the same
test questions. Reports F1 / EM, dense recall@1/5 of each model's BERT_q, and the paired F1
difference with its standard error.

    python benchmarks/joint_vs_frozen.py                 # all 701 reading-QA test questions
    python benchmarks/joint_vs_frozen.py --questions 400  # reproduce's seeded sample

Each run appends one record (settings, scores, seconds, the machine) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from bench_rag import append_runs, cpu_name  # a sibling script: benchmarks/ is on sys.path

from ragbook import evaluate as ev
from ragbook.reproduce import READING, ReproduceConfig, rag_model, test_examples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--out", default="benchmarks/results/joint_vs_frozen.json")
    args = ap.parse_args()
    cfg = ReproduceConfig()
    qa = test_examples(READING, args.questions, cfg.seed)
    decoding = ev.DECODING[READING]
    record: dict = {"settings": vars(args), "n": len(qa), "rag_steps": cfg.rag_steps,
                    "cpu": cpu_name(), "date": time.strftime("%F"), "models": {}}
    start = time.time()
    for marginalization in ("sequence", "token"):
        f1 = {}
        for frozen in (False, True):
            model = rag_model(cfg, READING, marginalization, progress=False,
                              freeze_retriever=frozen)
            scores, predictions = ev.evaluate_rag(model, qa, marginalization,
                                                  num_beams=decoding.num_beams,
                                                  decoding=decoding.method, progress=False)
            f1[frozen] = [ev.f1_score(p.prediction, p.answers) for p in predictions]
            recall = ev.retrieval_hits(model, qa, (1, 5))
            name = f"rag_{marginalization}_{'frozen' if frozen else 'joint'}"
            record["models"][name] = {"f1": float(np.mean(f1[frozen])), "em": scores["em"],
                                      **{f"recall@{k}": float(h.mean())
                                         for k, h in recall.items()}}
            print(name, json.dumps(record["models"][name]), flush=True)
        d, se = ev.paired_difference(f1[False], f1[True])
        record[f"{marginalization}_joint_minus_frozen_f1"] = {"mean": d, "se": se}
        print(f"RAG-{marginalization}: joint − frozen F1 {100 * d:+.1f} ± {100 * se:.1f}",
              flush=True)
    record["seconds"] = round(time.time() - start, 1)
    append_runs(args.out, [record])


if __name__ == "__main__":
    main()
