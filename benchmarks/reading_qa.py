"""Reading QA, the course's Table 1: does RAG's generator read, and does k matter?

On test-article questions of the built-in ``reading-qa`` task (an article's description and a
short window of one of its sentences around a blanked date, number or name; the answer is the
span), with the paper's dense prior p_η(z|x) ∝ exp(d(z)ᵀq(x)) and frozen MiniLM encoders:

- the generator as a *reader*, given the gold passage (an upper bound for RAG);
- RAG-Sequence (Thorough) and RAG-Token over the top k = 5, and "read only the top-1 passage"
  (the same generator, k = 1);
- closed-book BART: the generator fine-tuned on the train questions alone (the paper's BART);
- optionally (``--rag-steps``) RAG-Token and RAG-Sequence after joint fine-tuning on the train
  questions, with k = 5 and k = 1;
- the index hot-swap (§4.5) as the paper means it (``--hot-swap N``): N facts RAG-Token answers
  right get another span in their passage (``evaluate.hot_swap(task="reading-qa")``); the share
  answered with the new span after the swap, and with the old one once the index is back.

Every comparison is paired (the same questions), with the standard error of the per-question
F1 difference. Decoding is greedy, as the paper decodes open-domain QA (Appendix A).

    python benchmarks/reading_qa.py --questions 400 --closed-book-steps 300 --rag-steps 0

Each run appends one record (settings, scores, seconds, the machine) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from bench_rag import append_runs, cpu_name  # a sibling script: benchmarks/ is on sys.path

from ragbook import evaluate as ev
from ragbook.config import get_preset
from ragbook.pipeline import RagModel
from ragbook.reproduce import test_examples
from ragbook.train import RagTrainConfig, trained_closed_book, trained_rag


def f1s(predictions) -> list[float]:
    return [ev.f1_score(p.prediction, p.answers) for p in predictions]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--generator", default="tiny", help="the generator (default: the shipped)")
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--source-length", type=int, default=256)
    ap.add_argument("--closed-book-steps", type=int, default=300)
    ap.add_argument("--rag-steps", type=int, default=0)
    ap.add_argument("--hot-swap", type=int, default=0, help="facts to edit (0: no hot-swap)")
    ap.add_argument("--out", default="benchmarks/results/reading_qa.json")
    args = ap.parse_args()

    t0 = time.time()
    preset = get_preset("tiny", generator=args.generator, max_source_length=args.source_length)
    test = test_examples("reading-qa", args.questions, preset.seed)
    model = RagModel.from_preset(preset).eval()
    record: dict = {"settings": vars(args), "n": len(test), "cpu": cpu_name()}
    recall = ev.retrieval_hits(model, test, (1, 5, 20))
    record["recall"] = {f"@{k}": float(h.mean()) for k, h in recall.items()}
    scores: dict[str, list[float]] = {}
    predictions = {}

    scores["reader, gold passage"] = f1s(ev.gold_passage_answers(model, test))
    for k in (1, 5):
        for name, marginalization in (("RAG-Sequence", "sequence"), ("RAG-Token", "token")):
            if k == 1 and name == "RAG-Sequence":
                continue  # one document: the two marginalizations coincide
            label = f"{name} k={k}" if k > 1 else "top-1 passage only (k=1)"
            predictions[label] = ev.evaluate_rag(model, test, marginalization, n_docs=k)[1]
            scores[label] = f1s(predictions[label])
            print(label, round(float(np.mean(scores[label])), 3), flush=True)
    if args.hot_swap:
        swap = ev.hot_swap(model, test, args.hot_swap, preset.seed, marginalization="token",
                           predictions=predictions["RAG-Token k=5"], task="reading-qa")
        record["hot_swap"] = {k: swap[k] for k in ("facts", "followed", "kept", "examples")}
        record["hot_swap"]["misses"] = dict(ev.miss_kinds(swap))
        print("hot-swap", {k: swap[k] for k in ("facts", "followed", "kept")}, flush=True)
    if args.closed_book_steps:
        book = ev.ClosedBook(preset, *trained_closed_book(preset, "reading-qa",
                                                          args.closed_book_steps))
        scores["closed-book BART"] = f1s(ev.evaluate_rag(book, test)[1])
    for marginalization in ("token", "sequence") if args.rag_steps else ():
        tuned = trained_rag(preset, "reading-qa", RagTrainConfig(
            marginalization=marginalization, steps=args.rag_steps, n_docs=preset.n_docs,
            seed=preset.seed))
        name = {"token": "RAG-Token", "sequence": "RAG-Sequence"}[marginalization]
        for k in (1, 5):
            scores[f"{name} fine-tuned k={k}"] = f1s(
                ev.evaluate_rag(tuned, test, marginalization, n_docs=k)[1])

    record["f1"] = {name: float(np.mean(s)) for name, s in scores.items()}
    base = "top-1 passage only (k=1)"
    record["paired_vs_top1"] = {name: dict(zip(("diff", "se"), ev.paired_difference(s, scores[
        base]))) for name, s in scores.items() if name != base}
    record["seconds"] = round(time.time() - t0, 1)
    record["per_question_f1"] = scores
    append_runs(args.out, [record])
    for name, f1 in record["f1"].items():
        print(f"{name:32s} F1 {f1:.3f}")
    print(json.dumps({k: record[k] for k in ("recall", "paired_vs_top1", "seconds")}, indent=1))


if __name__ == "__main__":
    main()
