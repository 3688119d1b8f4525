"""Benchmark ragbook.rag against transformers' RAG, and Fast vs Thorough decoding.

Measured side by side in one run, on the same generator object and the same inputs:

1. training step: ragbook's loss forward + backward (``generator.token_logprobs`` and
   ``rag_sequence_loss`` / ``rag_token_loss``) vs ``RagSequenceForGeneration`` /
   ``RagTokenForGeneration`` forward + backward with ``labels`` (target: ragbook ≥ 1.0× as
   fast). Both run the same generator; rounds are interleaved so both see the same machine
   load, and the ratio is the median of the per-round ratios.
2. decoding: RAG-Sequence Fast vs Thorough (time, how often they give the same answer) and
   RAG-Token greedy or beam search, each next to transformers' ``generate`` where it has one
   (``RagSequenceForGeneration.generate`` is Thorough only; ``RagTokenForGeneration.generate``),
   which runs ragbook's search (``rag.transformers_search``) — checked, see ``bench_decoding``.
   Time is wall-clock and process CPU time, the ratio the median of the per-round ratios.
   The generator's encoder pass, which both sides run once per chunk, is timed alone beside
   them: transformers' time over it is the most any RAG-Token decoder could gain (a decoder of
   no cost).

The generator is the shipped tiny BART when ``ragbook/weights/tiny-bart`` exists, with real
inputs — each entity-QA dev question with its own article's passage and k−1 others, the right
one scored highest — and otherwise a random BART of the tiny preset's size on random tokens.
``--generator DIR`` loads another saved generator instead (long answers, the decoders' worst
case: the denoising-only generator shipped before 017e3ac, whose answers run to the limit).

    nice -n 5 python benchmarks/bench_rag.py --out bench_rag.json
    # the course's setting: a fine-tuned generator, greedy, RAG-Token only
    nice -n 5 python benchmarks/bench_rag.py --parts decoding --finetune-steps 60 \
        --num-beams 1 --max-length 16 --families token

Timings depend on the machine and on its load: compare rows of the same run only.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import BartConfig, BartForConditionalGeneration
from transformers.utils import logging as hf_logging

from ragbook import rag
from ragbook.config import get_preset
from ragbook.generator import SHIPPED, encode_inputs, encode_targets, token_logprobs


class IdsTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def load_or_random_generator(path: str | None = None):
    """The shipped tiny BART, or the generator saved at ``path`` (e.g. an earlier shipped one,
    ``git archive <commit> ragbook/weights/tiny-bart | tar -x -C DIR``), or a random BART."""
    if path or (SHIPPED / "config.json").exists():
        from ragbook.generator import load_generator

        model, tokenizer = load_generator(path or "tiny")
        return model, tokenizer, f"generator at {path}" if path else "shipped tiny BART"
    config = BartConfig(vocab_size=8192, d_model=256, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_position_embeddings=128,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                        forced_eos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    return BartForConditionalGeneration(config), None, "random BART of the tiny preset's size"


def real_inputs(tokenizer, n: int, k: int, preset, seed: int = 0, split: str = "dev"):
    """n entity-QA questions, each with its article's first passage and k−1 random ones."""
    from ragbook import data

    rng = random.Random(seed)
    corpus = data.load_corpus()
    first = {}
    for p in corpus:
        first.setdefault(p.title, p)
    examples = [e for e in data.load_task("entity-qa", split) if e.article in first][:n]
    passages, questions, scores = [], [], []
    for e in examples:
        docs = [first[e.article]] + rng.sample(corpus, k - 1)
        order = list(range(k))
        rng.shuffle(order)
        passages += [docs[i] for i in order]
        questions += [e.question] * k
        scores.append([2.0 if i == 0 else rng.gauss(0.0, 1.0) for i in order])
    enc = encode_inputs(tokenizer, passages, questions, preset.max_source_length)
    tgt = encode_targets(tokenizer, [e.answers[0] for e in examples], preset.max_target_length)
    return enc["input_ids"], enc["attention_mask"], torch.tensor(scores), tgt


def random_inputs(config, n: int, k: int, preset, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    length = preset.max_source_length
    ids = torch.randint(3, config.vocab_size, (n * k, length), generator=g)
    mask = torch.ones_like(ids)
    cut = torch.randint(length // 2, length + 1, (n * k,), generator=g)
    mask[torch.arange(length) >= cut[:, None]] = 0
    ids[mask == 0] = config.pad_token_id
    t_len = torch.randint(2, 13, (n,), generator=g)
    labels = torch.randint(3, config.vocab_size, (n, 12), generator=g)
    labels[torch.arange(n), t_len - 1] = config.eos_token_id
    target_mask = torch.arange(12) < t_len[:, None]
    labels[~target_mask] = config.pad_token_id
    return ids, mask, torch.randn(n, k, generator=g), {"labels": labels,
                                                       "target_mask": target_mask}


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_training(generator, hf_models, ids, mask, scores, tgt, rounds: int) -> dict:
    labels, target_mask = tgt["labels"], tgt["target_mask"]
    start = torch.full((labels.shape[0], 1), generator.config.decoder_start_token_id)
    hf_labels = torch.cat([start, labels], dim=1)
    out = {}
    for name, ours, hf in (("sequence", rag.rag_sequence_loss, hf_models[0]),
                           ("token", rag.rag_token_loss, hf_models[1])):
        def ragbook_step(ours=ours):
            generator.zero_grad(set_to_none=True)
            s = scores.clone().requires_grad_()
            ours(token_logprobs(generator, ids, mask, labels), target_mask, s).sum().backward()

        def hf_step(hf=hf):
            generator.zero_grad(set_to_none=True)
            s = scores.clone().requires_grad_()
            hf(context_input_ids=ids, context_attention_mask=mask, doc_scores=s,
               labels=hf_labels, reduce_loss=False).loss.sum().backward()

        generator.eval()  # first check that both compute the same numbers
        with torch.no_grad():
            a = ours(token_logprobs(generator, ids, mask, labels), target_mask, scores)
            b = hf(context_input_ids=ids, context_attention_mask=mask, doc_scores=scores,
                   labels=hf_labels).loss
        generator.train()
        ragbook_step(), hf_step()  # warm-up
        times = {"ragbook": [], "transformers": []}
        for _ in range(rounds):
            times["ragbook"].append(timed(ragbook_step))
            times["transformers"].append(timed(hf_step))
        ratios = [h / r for h, r in zip(times["transformers"], times["ragbook"])]
        out[name] = {
            "max_rel_err": ((a - b).abs() / b.abs()).max().item(),
            "ragbook_s_median": statistics.median(times["ragbook"]),
            "transformers_s_median": statistics.median(times["transformers"]),
            "speedup_median_of_rounds": statistics.median(ratios),
        }
        print(f"train RAG-{name:8s} ragbook {out[name]['ragbook_s_median']:.3f}s  "
              f"transformers {out[name]['transformers_s_median']:.3f}s  "
              f"ragbook is {out[name]['speedup_median_of_rounds']:.2f}x as fast  "
              f"(max rel err {out[name]['max_rel_err']:.1e})", flush=True)
    generator.eval()
    return out


class PeerWarnings(logging.Handler):
    """Collects what transformers logs while the peer decodes: its "generation flags are not
    valid and may be ignored" means the peer would not run the search asked of it."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def bench_decoding(generator, tokenizer, hf_models, ids, mask, scores, num_beams: int,
                   max_length: int, chunk: int, rounds: int, families: list[str]) -> dict:
    """Decode every question with ragbook's and transformers' decoders, chunk by chunk, all
    decoders interleaved within a chunk (so all see the same machine load), ``rounds`` times.

    The peer runs ragbook's search (``rag.transformers_search``: its flags strictly validated),
    and the run checks that it did: transformers must log no ignored flag, and with beams, on
    the first chunk (untimed) its beam score of each answer both give must be ragbook's Eq. 2
    log p(y|x). Without that check passing, no agreement is reported.
    """
    tok = tokenizer or IdsTokenizer()
    k, n = scores.shape[1], scores.shape[0]
    eos = generator.config.eos_token_id
    search = rag.transformers_search(num_beams, max_length, eos)
    kw = {"num_beams": num_beams, "max_length": max_length}

    def ours(fn, **extra):
        return lambda i, m, s: [a.token_ids for a in fn(generator, tok, i, m, s, **kw, **extra)]

    def theirs(model):
        def run(i, m, s):
            rows = model.generate(context_input_ids=i, context_attention_mask=m, doc_scores=s,
                                  **search)
            return [y[: y.index(eos) + 1] if eos in y else y
                    for y in (r[1:] for r in rows.tolist())]
        return run

    decoders = {}
    if "sequence" in families:
        decoders |= {"rag-sequence fast": ours(rag.rag_sequence_generate, method="fast"),
                     "rag-sequence thorough": ours(rag.rag_sequence_generate, method="thorough"),
                     "transformers rag-sequence": theirs(hf_models[0])}
    if "token" in families:
        decoders |= {"rag-token": ours(rag.rag_token_generate),
                     "transformers rag-token": theirs(hf_models[1])}

    def encoder_alone(i, m, s):
        """The generator's encoder pass that both sides run before decoding, timed alone:
        transformers' time over it is the speed-up ragbook would reach with a free decoder."""
        with torch.no_grad():
            rag._encode(generator, i, m)
        return []

    decoders["encoder alone"] = encoder_alone
    warnings = PeerWarnings()
    hf_logging.get_logger().addHandler(warnings)

    score_gap = None  # the same search: the peer's beam score is ragbook's Eq. 2 score
    if "token" in families and num_beams > 1:
        rows, qs = slice(0, chunk * k), slice(0, chunk)
        out = hf_models[1].generate(context_input_ids=ids[rows], context_attention_mask=mask[rows],
                                    doc_scores=scores[qs], return_dict_in_generate=True,
                                    output_scores=True, **search)
        answers = rag.rag_token_generate(generator, tok, ids[rows], mask[rows], scores[qs], **kw)
        same = [a.token_ids == y for a, y in zip(answers, theirs(hf_models[1])(
            ids[rows], mask[rows], scores[qs]))]
        gaps = [abs(a.score - s) for a, s, e in zip(answers, out.sequences_scores.tolist(), same)
                if e]
        score_gap = max(gaps) if gaps else float("inf")

    for fn in decoders.values():  # warm-up, untimed: first calls pay for lazy set-up
        fn(ids[:k], mask[:k], scores[:1])
    results = {name: [] for name in decoders}
    wall = {name: [0.0] * rounds for name in decoders}
    cpu = {name: [0.0] * rounds for name in decoders}
    for r in range(rounds):
        for s in range(0, n, chunk):
            rows = slice(s * k, (s + chunk) * k)
            for name, fn in decoders.items():
                t0, c0 = time.perf_counter(), time.process_time()
                answers = fn(ids[rows], mask[rows], scores[s:s + chunk])
                wall[name][r] += time.perf_counter() - t0
                cpu[name][r] += time.process_time() - c0
                if r == 0:
                    results[name] += answers
        print(f"round {r + 1}/{rounds}: " + ", ".join(
            f"{name} {wall[name][r]:.2f}s" for name in decoders), flush=True)
    hf_logging.get_logger().removeHandler(warnings)
    ignored = [m for m in warnings.messages if "may be ignored" in m]
    checked = not ignored and (score_gap is None or score_gap < 1e-3)
    if not checked:
        print(f"THE PEER DID NOT RUN THE SAME SEARCH (ignored flags: {ignored}, beam score gap "
              f"{score_gap}): no answer agreement is reported", flush=True)

    def agree(a, b):
        if a not in results or b not in results:
            return None
        return sum(x == y for x, y in zip(results[a], results[b])) / n

    def ratio(times, slow, fast):
        if slow not in times or fast not in times:
            return None
        return statistics.median(times[slow][r] / times[fast][r] for r in range(rounds))

    pairs = {"rag-token": ("transformers rag-token", "rag-token"),
             "rag-sequence thorough": ("transformers rag-sequence", "rag-sequence thorough"),
             "thorough over fast": ("rag-sequence thorough", "rag-sequence fast"),
             "rag-token with a free decoder": ("transformers rag-token", "encoder alone")}
    summary = {
        "seconds_wall_median": {name: statistics.median(t) for name, t in wall.items()},
        "seconds_cpu_median": {name: statistics.median(t) for name, t in cpu.items()},
        "ratio_wall_median_of_rounds": {p: ratio(wall, *ab) for p, ab in pairs.items()},
        "ratio_cpu_median_of_rounds": {p: ratio(cpu, *ab) for p, ab in pairs.items()},
        "answer_lengths_mean": {name: statistics.mean(map(len, ys))
                                for name, ys in results.items() if ys},
        "peer_search_checked": checked,
        "peer_ignored_flags": ignored,
        "peer_beam_score_gap": score_gap,
        "agreement": {p: agree(*ab) if checked or p == "thorough over fast" else None
                      for p, ab in pairs.items() if "free" not in p},
        "note": "transformers' RAG-Sequence generate runs the generator with attention_mask=None,"
                " so on padded inputs its answers may differ from Thorough's by design",
    }
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("seconds")},
                     indent=2), flush=True)
    return summary


def finetune(generator, tokenizer, preset, k: int, steps: int, batch: int = 16) -> None:
    """The course's setting: the shipped generator fine-tuned for entity QA with the RAG-Token
    loss (Eq. 2), AdamW at lr 3e-4, batch 16 train questions, each with its own article's
    passage among k — after a few dozen steps it answers with short titles that end."""
    ids, mask, scores, tgt = real_inputs(tokenizer, steps * batch, k, preset, split="train")
    optimizer = torch.optim.AdamW(generator.parameters(), lr=3e-4)
    generator.train()
    for step in range(steps):
        rows, qs = slice(step * batch * k, (step + 1) * batch * k), slice(step * batch,
                                                                        (step + 1) * batch)
        loss = rag.rag_token_loss(token_logprobs(generator, ids[rows], mask[rows],
                                                 tgt["labels"][qs]),
                                  tgt["target_mask"][qs], scores[qs]).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"fine-tuned {steps} steps, last loss {loss.item():.2f}", flush=True)
    generator.eval()


def append_runs(path: str | Path, records: list[dict]) -> None:
    """Append ``records`` to the JSON list of runs at ``path`` (created if absent), atomically."""
    from ragbook.artifacts import atomic_write_bytes

    path = Path(path)
    runs = json.loads(path.read_text()) if path.exists() else []
    atomic_write_bytes(path, json.dumps(runs + records, indent=1).encode())


def cpu_name() -> str:
    """The CPU's model name and the matrix extensions that decide bf16/fp32 speed."""
    info = Path("/proc/cpuinfo")
    if not info.exists():
        return platform.processor() or platform.machine()
    text = info.read_text()
    name = re.search(r"model name\s*:\s*(.*)", text)
    flags = set(re.search(r"flags\s*:\s*(.*)", text).group(1).split())
    extras = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{name.group(1) if name else platform.machine()} ({', '.join(extras) or 'no bf16'})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="+", default=["training", "decoding"],
                        choices=["training", "decoding"])
    parser.add_argument("--questions", type=int, default=16, help="training batch (questions)")
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7, help="training-step rounds")
    parser.add_argument("--decode-questions", type=int, default=64)
    parser.add_argument("--decode-rounds", type=int, default=3)
    parser.add_argument("--families", nargs="+", default=["token", "sequence"],
                        choices=["token", "sequence"], help="decoders to time")
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=None,
                        help="answer tokens with the end token (default: the preset's)")
    parser.add_argument("--finetune-steps", type=int, default=0,
                        help="fine-tune the shipped generator first (the course's setting)")
    parser.add_argument("--generator", default=None,
                        help="a saved generator's directory instead of the shipped one (same "
                             "tokenizer): the worst case of long answers is the denoising-only "
                             "generator shipped before 017e3ac")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset("tiny")
    max_length = args.max_length or preset.max_target_length
    load_before = os.getloadavg()
    generator, tokenizer, which = load_or_random_generator(args.generator)
    print(f"generator: {which}; k = {args.n_docs}; torch threads {args.threads}; "
          f"transformers {transformers.__version__}; {cpu_name()}", flush=True)
    hf_models = (rag.transformers_rag(generator, args.n_docs, "sequence"),
                 rag.transformers_rag(generator, args.n_docs, "token"))
    make = ((lambda n: real_inputs(tokenizer, n, args.n_docs, preset)) if tokenizer else
            (lambda n: random_inputs(generator.config, n, args.n_docs, preset)))

    report = {"generator": which, "cpu": cpu_name(), "transformers": transformers.__version__,
              "torch": torch.__version__, "torch_threads": args.threads,
              "n_docs": args.n_docs}
    if "training" in args.parts:
        ids, mask, scores, tgt = make(args.questions)
        report["training"] = bench_training(generator, hf_models, ids, mask, scores, tgt,
                                            args.rounds)
    if "decoding" in args.parts:
        if args.finetune_steps:
            if tokenizer is None:
                raise SystemExit("--finetune-steps needs the shipped generator")
            finetune(generator, tokenizer, preset, args.n_docs, args.finetune_steps)
            report["generator"] += f", fine-tuned {args.finetune_steps} steps of Eq. 2"
        ids, mask, scores, _ = make(args.decode_questions)
        report["decoding"] = bench_decoding(
            generator, tokenizer, hf_models, ids, mask, scores, args.num_beams, max_length,
            chunk=16, rounds=args.decode_rounds, families=args.families)
        report |= {"decode_questions": args.decode_questions, "num_beams": args.num_beams,
                   "max_length": max_length, "source_length": int(mask.sum(1).max())}
    report["command"] = " ".join(sys.argv[1:])
    report["load_average_before_after"] = [load_before[0], os.getloadavg()[0]]
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
