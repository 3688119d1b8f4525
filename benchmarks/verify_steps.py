"""Fact verification: label accuracy against training steps, RAG beside closed-book BART.

For each number of steps N, a fresh RAG-Token is jointly fine-tuned N steps on the verify
task's train claims exactly as `ragbook reproduce` trains it (the dense prior, 16 claims × k
passages a step) and read with the dense prior and with the hybrid one (reproduce's default);
a fresh closed-book BART is fine-tuned M steps
(32 claims a step). Each labels sampled dev and test claims with the likelier label under the
model (``evaluate.evaluate_labels``: log p(y|x) = −loss for y in SUPPORTS / REFUTES). Seconds
are wall seconds of the training steps and the CPU seconds of this process (on a loaded machine
the second is the steadier figure). Steps are chosen on dev; reproduce reports test.

    python benchmarks/verify_steps.py --rag-steps 40 120 250 --bart-steps 40 300 \\
        [--claims 400] [--n-docs 5] [--max-source-length 48] [--out results/….json]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import replace
from pathlib import Path

from ragbook import evaluate as ev
from ragbook.config import get_preset
from ragbook.data import LABELS, load_corpus, load_task
from ragbook.generator import finetune_closed_book, load_generator
from ragbook.pipeline import RagModel
from ragbook.reproduce import ReproduceConfig, test_examples
from ragbook.retriever import BM25Retriever
from ragbook.train import RagTrainConfig, train_rag

RESULTS = Path(__file__).parent / "results"


def sample(split: str, n: int, seed: int) -> list:
    """``n`` claims of a split, drawn as reproduce draws its test sample."""
    if split == "test":
        return test_examples("verify", n, seed)
    claims = load_task("verify", split, seed)
    return random.Random(f"verify/{split}/{seed}").sample(claims, min(n, len(claims)))


def scored(model, claims: dict[str, list]) -> dict:
    """Label accuracy on each split, the share of claims labelled SUPPORTS (a model that
    says one label whatever the claim scores the share of that label), and the seconds it
    took to score them."""
    out = {}
    for split, examples in claims.items():
        start = time.time()
        scores, predictions = ev.evaluate_labels(model, examples, LABELS)
        out[split] = scores["accuracy"]
        out[f"{split}_supports"] = sum(p.prediction == LABELS[0]
                                       for p in predictions) / len(predictions)
        out[f"{split}_scoring_seconds"] = round(time.time() - start, 1)
    return out


def timed(train, *args, **kwargs) -> tuple[object, dict]:
    """``train(*args, **kwargs)`` and its wall and CPU seconds."""
    wall, cpu = time.time(), time.process_time()
    result = train(*args, **kwargs)
    return result, {"wall_seconds": round(time.time() - wall, 1),
                    "cpu_seconds": round(time.process_time() - cpu, 1)}


def rag_rows(steps: list[int], claims: dict, n_docs: int, source_length: int,
             seed: int) -> list[dict]:
    cfg = ReproduceConfig(seed=seed)
    preset = replace(get_preset(cfg.preset, seed=seed), max_source_length=source_length)
    bm25 = BM25Retriever(load_corpus())
    train = load_task("verify", "train", seed)
    rows = []
    for n in steps:
        model = RagModel.from_preset(preset, retriever=cfg.training_prior)
        state, cost = timed(train_rag, model, train, RagTrainConfig(
            marginalization="token", steps=n, n_docs=n_docs, seed=seed), progress=False)
        priors = {"dense": model.with_bm25(None), "hybrid": model.with_bm25(bm25)}
        rows.append({"model": "rag_token", "steps": n, "n_docs": n_docs,
                     "max_source_length": source_length, **cost,
                     "seconds_per_step": round(cost["wall_seconds"] / n, 2),
                     "cpu_seconds_per_step": round(cost["cpu_seconds"] / n, 2),
                     "final_loss": state["history"][-1][1],
                     "training_prior": cfg.training_prior,
                     **{prior: scored(read, claims) for prior, read in priors.items()}})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def bart_rows(steps: list[int], claims: dict, seed: int) -> list[dict]:
    preset = get_preset("tiny", seed=seed)
    train = load_task("verify", "train", seed)
    rows = []
    for n in steps:
        generator, tokenizer = load_generator(preset.generator)
        _, cost = timed(finetune_closed_book, generator, tokenizer, train, steps=n,
                        batch_size=32, max_source_length=preset.max_source_length,
                        max_target_length=preset.max_target_length, seed=seed, progress=False)
        rows.append({"model": "closed_book", "steps": n, **cost,
                     "seconds_per_step": round(cost["wall_seconds"] / n, 2),
                     "cpu_seconds_per_step": round(cost["cpu_seconds"] / n, 2),
                     **scored(ev.ClosedBook(preset, generator, tokenizer), claims)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rag-steps", type=int, nargs="*", default=[40, 120, 250])
    p.add_argument("--bart-steps", type=int, nargs="*", default=[40, 300])
    p.add_argument("--claims", type=int, default=400, help="claims per split")
    p.add_argument("--splits", nargs="+", default=["dev", "test"])
    p.add_argument("--n-docs", type=int, default=get_preset("tiny").n_docs)
    p.add_argument("--max-source-length", type=int,
                   default=get_preset("tiny").max_source_length,
                   help="RAG's generator input \"title / text // claim\", in tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "verify_steps.json")
    args = p.parse_args()
    claims = {split: sample(split, args.claims, args.seed) for split in args.splits}
    rows = bart_rows(args.bart_steps, claims, args.seed) + \
        rag_rows(args.rag_steps, claims, args.n_docs, args.max_source_length, args.seed)
    record = {"date": time.strftime("%Y-%m-%d"), "claims": args.claims,
              "labels": list(LABELS), "rows": rows}
    previous = json.loads(args.out.read_text()) if args.out.exists() else {"runs": []}
    previous["runs"].append(record)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(previous, indent=2) + "\n")


if __name__ == "__main__":
    main()
