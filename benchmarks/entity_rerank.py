"""Does the generator re-rank? Entity QA, RAG against the top-1 title of its own retriever.

An entity-QA answer is an article's title, so a retriever alone answers with the title of its
top-1 passage. RAG earns its generator on this task only where Eq. 1 / Eq. 2 prefer a
lower-ranked passage's title. RAG-Sequence and RAG-Token as `ragbook ask` and `export` use them
(`reproduce.rag_model`: ``ReproduceConfig.entity_steps`` joint steps, the paper's dense prior,
cached), read greedily (RAG-Sequence Thorough) on the same test questions; per question, the
EM of each and of its own BERT_q's top-1 title, and the paired differences. Then RAG-Sequence
again with its prior flattened at test time (the scores d(z)ᵀq(x) scaled by ``--flatten``; 0 is
a uniform prior over the same top 5): the less the prior weighs, the more the generator's own
p_θ(y|x, z) chooses the passage, so EM against the scale says whether the generator ranks the
titles better or worse than the retriever does.

    python benchmarks/entity_rerank.py                  # every entity-QA test question
    python benchmarks/entity_rerank.py --questions 400

Each run appends one record (scores, paired differences, seconds, the machine) to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
from bench_rag import append_runs, cpu_name  # a sibling script: benchmarks/ is on sys.path

from ragbook import evaluate as ev
from ragbook.reproduce import ReproduceConfig, rag_model, test_examples

TASK = "entity-qa"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=None, help="default: the whole test split")
    ap.add_argument("--flatten", type=float, nargs="*", default=[0.5, 0.25, 0.0])
    ap.add_argument("--out", default="benchmarks/results/entity_rerank.json")
    args = ap.parse_args()
    cfg = ReproduceConfig()
    qa = test_examples(TASK, args.questions, cfg.seed)
    decoding = ev.DECODING[TASK]
    record: dict = {"settings": vars(args), "n": len(qa), "entity_steps": cfg.entity_steps,
                    "cpu": cpu_name(), "date": time.strftime("%F"), "models": {}}
    start = time.time()

    def read(model, marginalization):
        return ev.evaluate_rag(model, qa, marginalization, num_beams=decoding.num_beams,
                               decoding=decoding.method)[1]

    for marginalization in ("sequence", "token"):
        model = rag_model(cfg, TASK, marginalization, progress=False)
        predictions = read(model, marginalization)
        rag = np.array([p.em for p in predictions], dtype=float)
        # the top-1 title baseline, from the passages these answers were read from
        title = np.array([ev.exact_match(p.provenance[0]["title"], p.answers)
                          for p in predictions], dtype=float)
        # where RAG answered with a retrieved title other than the top-1's: the generator re-ranked
        moved = [not ev.exact_match(p.prediction, [p.provenance[0]["title"]]) and
                 ev.exact_match(p.prediction, [z["title"] for z in p.provenance[1:]])
                 for p in predictions]
        d, se = ev.paired_difference(rag, title)
        record["models"][f"rag_{marginalization}"] = {
            "em": float(rag.mean()), "top1_title_em": float(title.mean()),
            "minus_top1_title": {"mean": d, "se": se},
            "answers_another_retrieved_title": float(np.mean(moved)),
            "right_where_top1_wrong": int(((rag == 1) & (title == 0)).sum()),
            "wrong_where_top1_right": int(((rag == 0) & (title == 1)).sum())}
        print(f"RAG-{marginalization}", json.dumps(record["models"][f"rag_{marginalization}"]),
              flush=True)
        if marginalization == "sequence":
            preset, flat = model.preset, {}
            for factor in args.flatten:
                model.preset = dataclasses.replace(preset, score_scale=factor * preset.score_scale)
                em = [p.em for p in read(model, "sequence")]
                d, se = ev.paired_difference(em, title)
                flat[str(factor)] = {"em": float(np.mean(em)), "minus_top1_title": {"mean": d,
                                                                                   "se": se}}
                print(f"  prior scale × {factor}", json.dumps(flat[str(factor)]), flush=True)
            model.preset = preset
            record["models"]["rag_sequence"]["flattened_prior"] = flat
    record["seconds"] = round(time.time() - start, 1)
    append_runs(args.out, [record])


if __name__ == "__main__":
    main()
