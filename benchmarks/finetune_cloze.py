"""RAG fine-tuned on "your own" questions against closed-book BART: cloze questions whose
answers are spans of the passages, scored on articles that no training step saw.

The built-in passages of ``--articles`` sampled articles (0: the whole corpus) are indexed as a
user's corpus (``index.build_index``, what ``ragbook index`` runs). Each passage gives at most
one cloze question (``finetune.cloze_question``: a sentence with a date, number or name
blanked out); a quarter of the sampled articles are held out (the whole corpus: the built-in
train / test article split, ``--test`` sampled test questions). RAG is fine-tuned on the other
articles' questions with ``finetune.finetune`` (what ``ragbook finetune`` runs), optionally
closed-book BART on the same questions, steps and batch, and the models answer the held-out
questions (greedy, EM / F1 with SQuAD normalisation, recall@k of the retriever).

    python benchmarks/finetune_cloze.py --articles 400 --steps 150 --lr 1e-3 --closed-book

Every run appends one record (settings, question counts, seconds, scores, the machine's load
average) to ``--out``; the README's figures are read from there. Times are wall-clock seconds
on whatever shares the machine.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import random
import re
import shutil
import tempfile
import time
from pathlib import Path

import torch

from ragbook import finetune as F
from ragbook.data import Example, load_corpus
from ragbook.generator import SHIPPED
from ragbook.index import build_index

# how the blank of a cloze question reaches the generator: the package's own rendering, or the
# package's "_____" of earlier runs (5 tokens the denoising-pretrained BART never saw)
BLANKS = {"package": None, "underscores": ("_____", "_____"), "mask": ("_____", "<mask>"),
          "mask-joined": (" ?_____", "<mask>")}


def split_questions(articles: int, seed: int, test: int) -> tuple[list, list, list]:
    """(passages to index, training questions, held-out questions)."""
    corpus = load_corpus()
    if articles == 0:
        test_questions = F.cloze_task("test", seed)
        return corpus, F.cloze_task("train", seed), random.Random(1).sample(
            test_questions, min(test, len(test_questions)))
    titles = sorted({p.title for p in corpus})
    chosen = set(random.Random(seed).sample(titles, articles))
    held_out = set(random.Random(seed).sample(sorted(chosen), articles // 4))
    passages = [p for p in corpus if p.title in chosen]
    questions = F.cloze_questions(passages, seed)
    return (passages, [e for e in questions if e.article not in held_out],
            [e for e in questions if e.article in held_out][:test])


def rendered(examples: list[Example], blank: str) -> list[Example]:
    """The questions with their blank written as ``BLANKS[blank]``."""
    if BLANKS[blank] is None:
        return examples
    pattern, text = BLANKS[blank]
    return [Example(re.sub(pattern, text, e.question), e.answers, e.article) for e in examples]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--articles", type=int, default=400, help="0: the whole corpus")
    parser.add_argument("--test", type=int, default=150, help="held-out questions, at most")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-docs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=F.FinetuneConfig.lr)
    parser.add_argument("--max-source-length", type=int,
                        default=F.FinetuneConfig.max_source_length)
    parser.add_argument("--model", choices=("token", "sequence"), default="token")
    parser.add_argument("--blank", choices=sorted(BLANKS), default="package")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="score the held-out questions every N steps too (a learning curve)")
    parser.add_argument("--closed-book", action="store_true",
                        help="also closed-book BART on the same questions, steps and batch")
    parser.add_argument("--untrained", action="store_true", help="also the untrained model")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--work", default=str(Path(tempfile.gettempdir()) / "ragbook-cloze"))
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "finetune_cloze.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    passages, train, test = split_questions(args.articles, args.seed, args.test)
    train, test = rendered(train, args.blank), rendered(test, args.blank)
    work = Path(args.work)
    index = work / f"index-{args.articles}-{args.seed}"
    if not (index / "meta.json").exists():
        build_index(passages, index, progress=False)
    cfg = F.FinetuneConfig(marginalization=args.model, n_docs=args.n_docs, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                           max_source_length=args.max_source_length,
                           eval_every=args.eval_every or args.steps)
    shipped = json.loads((SHIPPED / "pretrain.json").read_text())  # which generator
    record = {"settings": {k: v for k, v in vars(args).items() if k not in ("work", "out")},
              "generator": {"seq_len": shipped["config"]["seq_len"],
                            "heldout_loss": round(shipped["heldout_loss"], 3)},
              "questions": {"train": len(train), "test": len(test), "passages": len(passages)},
              "example": {"question": test[0].question, "answers": test[0].answers},
              "load_before": [round(x, 1) for x in os.getloadavg()]}

    runs = [("rag", False)] + ([("closed_book", True)] if args.closed_book else [])
    for name, closed in runs:
        out = work / f"model-{os.getpid()}-{name}"
        t0 = time.perf_counter()
        settings = F.finetune(index, train, out, test, F.FinetuneConfig(
            **{**vars(cfg), "closed_book": closed}), progress=False)
        losses = [loss for _, loss in settings["history"]]
        record[name] = {**settings["dev"]["results"], "train_seconds": settings["seconds"],
                        "seconds_per_step": round(settings["seconds"] / args.steps, 3),
                        "other_seconds": round(time.perf_counter() - t0  # load, save, score
                                                    - settings["seconds"], 1),
                        "final_loss": round(sum(losses[-10:]) / len(losses[-10:]), 3),
                        "curve": settings["dev_history"]}
        print(name, json.dumps(record[name]), flush=True)
        shutil.rmtree(out)
    if args.untrained:
        t0 = time.perf_counter()
        scores = F.evaluate_model(F.untrained_model(index, cfg)[0], test, args.model, args.n_docs)
        record["untrained"] = {**scores, "evaluation_seconds": round(time.perf_counter() - t0, 1)}
        print("untrained", json.dumps(record["untrained"]), flush=True)
    record["load_after"] = [round(x, 1) for x in os.getloadavg()]
    out_file = Path(args.out)
    with open(work / "results.lock", "w") as lock:  # runs side by side append safely
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(out_file.read_text()) if out_file.exists() else []
        out_file.write_text(json.dumps(results + [record], indent=1) + "\n")
    print(f"-> {out_file}")


if __name__ == "__main__":
    main()
