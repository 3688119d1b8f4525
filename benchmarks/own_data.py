"""RAG on "your own" questions: cloze questions whose answers are spans of the passages.

The built-in passages, indexed as a user's corpus would be (`index.build_index`, what
`ragbook index` runs); questions derived from them (`finetune.cloze_task`: a sentence with a
date, number or name blanked out), split by article. RAG is fine-tuned on train-article
questions (`finetune.finetune`, what `ragbook finetune` runs), closed-book BART on the same
questions for the same steps and batch, and both, with the untrained RAG model, answer
questions of test articles that no training step saw.

    python benchmarks/own_data.py [--steps 100] [--test 150] [--work DIR] [--out FILE]

Resumable: each model's figures are written to ``--out`` as soon as they are measured and a
rerun with the same sizes skips them; a training cut short resumes from its checkpoint in
``--work``. Times are wall-clock seconds on whatever shares the machine: the README says how
loaded it was.
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch

from ragbook import finetune as F
from ragbook.data import load_corpus
from ragbook.index import build_index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--n-docs", type=int, default=3)
    parser.add_argument("--test", type=int, default=150, help="test-article questions")
    parser.add_argument("--dev", type=int, default=40, help="dev-article questions")
    parser.add_argument("--work", help="index, models and checkpoints (default: a temporary "
                        "directory)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "own_data.json"))
    args = parser.parse_args()
    out_file = Path(args.out)
    cfg = F.FinetuneConfig(steps=args.steps, batch_size=args.batch_size, n_docs=args.n_docs,
                           eval_every=args.steps)
    train = F.cloze_task("train")
    dev = random.Random(0).sample(F.cloze_task("dev"), args.dev)
    test = random.Random(1).sample(F.cloze_task("test"), args.test)
    work = Path(args.work or tempfile.mkdtemp(prefix="own-data-"))
    sizes = {k: v for k, v in vars(args).items() if k not in ("work", "out")}
    results = json.loads(out_file.read_text()) if out_file.exists() else {}
    if results.get("config") != sizes:  # measured with other sizes: start over
        results = {}
    results.update({"config": sizes, "threads": torch.get_num_threads(),
                    "questions": {"train": len(train), "dev": len(dev), "test": len(test)}})
    if not (work / "index" / "meta.json").exists():
        t0 = time.perf_counter()
        build_index(load_corpus(), work / "index", progress=False)
        results["index_seconds"] = round(time.perf_counter() - t0, 1)

    def score(name: str, model, settings=None) -> None:
        t0 = time.perf_counter()
        marginalization = cfg.marginalization
        scores = F.evaluate_model(model, test, marginalization, cfg.n_docs, progress=True)
        results[name] = {**scores, "answer_seconds": round(time.perf_counter() - t0, 1),
                         **({"train_seconds": settings["seconds"],
                             "dev": settings["dev"]["results"]} if settings else {})}
        print(name, json.dumps(results[name]), flush=True)
        out_file.write_text(json.dumps(results, indent=2))

    if "untrained RAG" not in results:
        score("untrained RAG", F.untrained_model(work / "index", cfg)[0])
    for name, closed in (("RAG fine-tuned", False), ("closed-book BART", True)):
        if name in results:
            continue
        out = work / name.replace(" ", "-")
        run = F.FinetuneConfig(**{**vars(cfg), "closed_book": closed})
        resume = (out.parent / f"{out.name}-work" / "checkpoint.pt").exists()
        settings = F.finetune(work / "index", train, out, dev, run, resume=resume)
        score(name, F.load_model(out)[0], settings)
    print(f"-> {out_file}")


if __name__ == "__main__":
    main()
