"""What moves entity-QA Exact Match: a sweep over joint-training settings.

Each setting trains a fresh RAG model on the entity-QA train split (`train.train_rag`) and
reports, on a seeded sample of dev questions: EM with greedy RAG-Token and RAG-Sequence (Fast)
decoding, the retriever's recall@k, the "title of the top-1 passage" baseline of the *trained*
retriever, and — with ``--probe`` — EM at test time for k = 1 and 5 and sharper priors
(doc scores × 2, × 4), with the share of answers that are exactly one retrieved title ("copy").

    python benchmarks/sweep_rag.py '[{"name": "default"}, {"name": "qlr1e-4", "query_lr": 1e-4}]'

A setting is a JSON object of `RagTrainConfig` fields plus ``name``, ``scale`` (the preset's
score_scale) and ``dpr`` (``{"steps", "lr", "hard_negatives"}``: start from a query encoder
first trained with DPR's loss, as the paper starts from DPR). A GPU makes a setting take
under a minute; on 2 CPU cores it takes ~10.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time

import torch

from ragbook import evaluate as ev
from ragbook.config import get_preset
from ragbook.data import load_task
from ragbook.pipeline import RagModel
from ragbook.retriever import trained_query_encoder
from ragbook.train import RagTrainConfig, train_rag


def probe(model: RagModel, dev: list) -> dict:
    """EM (and the share of answers that copy a retrieved title) by test-time prior and k."""
    out, preset = {}, model.preset
    for factor in (1, 2, 4):
        model.preset = dataclasses.replace(preset, score_scale=factor * preset.score_scale)
        for k, marginalization in ((1, "token"), (5, "token"), (5, "sequence")):
            predictions = ev.evaluate_rag(model, dev, marginalization, n_docs=k)[1]
            copy = [any(ev.exact_match(p.prediction, [d["title"]]) for d in p.provenance)
                    for p in predictions]
            out[f"scores×{factor}/k{k}/{marginalization}"] = {
                "em": sum(p.em for p in predictions) / len(predictions),
                "copy": sum(copy) / len(copy)}
    model.preset = preset
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", help="JSON list of settings (see the module docstring)")
    parser.add_argument("--dev-questions", type=int, default=400)
    parser.add_argument("--probe", action="store_true", help="test-time k and prior sweep")
    parser.add_argument("--out", help="append one JSON line per setting here")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    train = load_task("entity-qa", "train", 0)
    dev = random.Random(0).sample(load_task("entity-qa", "dev", 0), args.dev_questions)
    for setting in json.loads(args.settings):
        setting = dict(setting)
        name, scale, dpr = setting.pop("name"), setting.pop("scale", None), setting.pop("dpr", None)
        preset = get_preset("tiny")
        if scale is not None:
            preset = dataclasses.replace(preset, score_scale=scale)
        query_encoder = trained_query_encoder(preset, progress=False, **dpr) if dpr else None
        model = RagModel.from_preset(preset, query_encoder=query_encoder).to(device)
        start = time.time()
        state = train_rag(model, train, RagTrainConfig(**setting), progress=False)
        tail = [loss for _, loss in state["history"][-25:]]
        row = {"name": name, "setting": setting, "scale": preset.score_scale, "dpr": dpr,
               "device": device, "train_seconds": round(time.time() - start, 1),
               "final_loss": sum(tail) / len(tail),
               "em": {m: ev.evaluate_rag(model, dev, m)[0]["em"] for m in ("token", "sequence")},
               "recall": ev.retrieval_recall(model, dev),
               "top1_title_em": ev.top1_title_baseline(model, dev)}
        if args.probe:
            row["probe"] = probe(model, dev)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
