"""Does the generator read, and does it hedge where the passage does not answer?

For each generator directory given, on the first ``--questions`` reading-QA dev questions,
greedy, at most 256 source tokens:

- the reader's F1 / EM with the gold passage (``data.gold_passages``), and with only the
  sentence the question was cut from (``train.focused``, no neighbours);
- with the gold passage and with a near miss (``train.distractor``: of 64 corpus passages of
  other articles, the one sharing most words with the question), the entropy of the first
  answer token and the mean log-probability of the greedy answer.

Eq. 1 and Eq. 2 weigh each passage's answer by p(z|x) and by the generator's probability of it,
so a generator as sure of an answer read from a near miss as from the gold passage follows the
retriever's first choice, and more passages cannot help it.

    python benchmarks/hedging.py ragbook/weights/tiny-bart OLD_GENERATOR_DIR

Each run appends one record per generator (scores, seconds, the machine) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from bench_rag import append_runs, cpu_name  # a sibling script: benchmarks/ is on sys.path
from transformers import AutoTokenizer, BartForConditionalGeneration

from ragbook import evaluate as ev
from ragbook.data import gold_passages, load_corpus, load_task
from ragbook.generator import encode_inputs, generate_answers
from ragbook.train import distractor, focused


@torch.no_grad()
def confidence(model, tokenizer, questions, passages, batch_size=50) -> dict[str, float]:
    """Mean first-token entropy (nats) and mean log-probability of the greedy answer."""
    entropies, logps = [], []
    for i in range(0, len(questions), batch_size):
        x = encode_inputs(tokenizer, passages[i:i + batch_size], questions[i:i + batch_size], 256)
        out = model.generate(**x, max_new_tokens=16, num_beams=1, do_sample=False,
                             output_scores=True, return_dict_in_generate=True)
        logp = torch.stack(out.scores, 1).log_softmax(-1)  # (batch, T, vocabulary)
        first = logp[:, 0]
        entropies += (-(first.exp() * first).nan_to_num().sum(-1)).tolist()
        written = out.sequences[:, 1:]
        chosen = logp.gather(-1, written.unsqueeze(-1)).squeeze(-1)
        logps += torch.where(written != tokenizer.pad_token_id, chosen, 0.0).sum(-1).tolist()
    return {"first_token_entropy": float(np.mean(entropies)),
            "answer_logprob": float(np.mean(logps))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("generators", nargs="+", help="generator directories (save_pretrained)")
    ap.add_argument("--questions", type=int, default=400)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/hedging.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    dev = load_task("reading-qa", "dev")[:args.questions]
    corpus = load_corpus()
    questions = [e.question for e in dev]
    gold = gold_passages(dev, corpus)
    sentence = [focused(p, e.question, e.answers[0], 0) for p, e in zip(gold, dev)]
    rng, pool = random.Random(0), [(p, "") for p in corpus]
    near = [distractor(pool, e.question, p.title, 64, rng) for e, p in zip(dev, gold)]
    records = []
    for path in args.generators:
        start = time.time()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = BartForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
        record = {"generator": path, "step": json.loads(
            (Path(path) / "pretrain.json").read_text()).get("step"), "questions": len(dev)}
        for name, passages in (("gold", gold), ("sentence", sentence)):
            answers = generate_answers(model, tokenizer, questions, passages, num_beams=1,
                                       max_source_length=256)
            record[f"f1_{name}"] = float(np.mean([ev.f1_score(a, e.answers)
                                                  for a, e in zip(answers, dev)]))
            record[f"em_{name}"] = float(np.mean([ev.exact_match(a, e.answers)
                                                  for a, e in zip(answers, dev)]))
        for name, passages in (("gold", gold), ("near_miss", near)):
            record[name] = confidence(model, tokenizer, questions, passages)
        record |= {"seconds": round(time.time() - start, 1), "cpu": cpu_name(),
                   "threads": args.threads, "date": time.strftime("%F")}
        print(json.dumps(record, indent=1), flush=True)
        records.append(record)
    append_runs(args.out, records)


if __name__ == "__main__":
    main()
