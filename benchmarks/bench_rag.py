"""Benchmark ragbook.rag against transformers' RAG, and Fast vs Thorough decoding.

Measured side by side in one run, on the same generator object and the same inputs:

1. training step: ragbook's loss forward + backward (``generator.token_logprobs`` and
   ``rag_sequence_loss`` / ``rag_token_loss``) vs ``RagSequenceForGeneration`` /
   ``RagTokenForGeneration`` forward + backward with ``labels`` (target: ragbook ≥ 1.0× as
   fast). Both run the same generator; rounds are interleaved so both see the same machine
   load, and the ratio is the median of the per-round ratios.
2. decoding: RAG-Sequence Fast vs Thorough (time, how often they give the same answer) and
   RAG-Token beam search, each next to transformers' ``generate`` where it has one
   (``RagSequenceForGeneration.generate`` is Thorough only; ``RagTokenForGeneration.generate``).

The generator is the shipped tiny BART when ``ragbook/weights/tiny-bart`` exists, with real
inputs — each entity-QA dev question with its own article's passage and k−1 others, the right
one scored highest — and otherwise a random BART of the tiny preset's size on random tokens.

    nice -n 5 python benchmarks/bench_rag.py --out bench_rag.json

Timings depend on the machine and on its load: compare rows of the same run only.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch
from transformers import BartConfig, BartForConditionalGeneration

from ragbook import rag
from ragbook.config import get_preset
from ragbook.generator import SHIPPED, encode_inputs, encode_targets, token_logprobs


class IdsTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return " ".join(map(str, ids))


def load_or_random_generator():
    if (SHIPPED / "config.json").exists():
        from ragbook.generator import load_generator

        model, tokenizer = load_generator("tiny")
        return model, tokenizer, "shipped tiny BART"
    config = BartConfig(vocab_size=8192, d_model=256, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=4, decoder_attention_heads=4,
                        encoder_ffn_dim=1024, decoder_ffn_dim=1024, max_position_embeddings=128,
                        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                        forced_eos_token_id=None, tie_word_embeddings=True)
    torch.manual_seed(0)
    return BartForConditionalGeneration(config), None, "random BART of the tiny preset's size"


def real_inputs(tokenizer, n: int, k: int, preset, seed: int = 0):
    """n entity-QA dev questions, each with its article's first passage and k−1 random ones."""
    from ragbook import data

    rng = random.Random(seed)
    corpus = data.load_corpus()
    first = {}
    for p in corpus:
        first.setdefault(p.title, p)
    examples = [e for e in data.load_task("entity-qa", "dev") if e.article in first][:n]
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


def bench_decoding(generator, tokenizer, hf_models, ids, mask, scores, num_beams: int,
                   max_length: int, chunk: int) -> dict:
    tok = tokenizer or IdsTokenizer()
    k, n = scores.shape[1], scores.shape[0]
    eos = generator.config.eos_token_id
    # transformers' canonical beam search, counting the start token; like ragbook's decoders,
    # an answer that reaches the length limit ends with the end token there
    flags = {"num_beams": num_beams, "max_length": max_length + 1, "length_penalty": 0.0,
             "early_stopping": "never", "forced_eos_token_id": eos}
    kw = {"num_beams": num_beams, "max_length": max_length}

    def ours(fn, **extra):
        return lambda i, m, s: [a.token_ids for a in fn(generator, tok, i, m, s, **kw, **extra)]

    def theirs(model):
        def run(i, m, s):
            rows = model.generate(context_input_ids=i, context_attention_mask=m, doc_scores=s,
                                  **flags)
            return [y[: y.index(eos) + 1] if eos in y else y
                    for y in (r[1:] for r in rows.tolist())]
        return run

    decoders = {
        "rag-sequence fast": ours(rag.rag_sequence_generate, method="fast"),
        "rag-sequence thorough": ours(rag.rag_sequence_generate, method="thorough"),
        "rag-token": ours(rag.rag_token_generate),
        "transformers rag-sequence": theirs(hf_models[0]),
        "transformers rag-token": theirs(hf_models[1]),
    }
    results = {name: [] for name in decoders}
    times = dict.fromkeys(decoders, 0.0)
    for s in range(0, n, chunk):  # interleaved chunk by chunk: all see the same machine load
        rows = slice(s * k, (s + chunk) * k)
        for name, fn in decoders.items():
            t0 = time.perf_counter()
            results[name] += fn(ids[rows], mask[rows], scores[s:s + chunk])
            times[name] += time.perf_counter() - t0
        print(f"decoded {min(s + chunk, n)}/{n} questions", flush=True)
    for name, t in times.items():
        print(f"decode {name:28s} {t:7.2f}s for {n} questions", flush=True)

    def agree(a, b):
        return sum(x == y for x, y in zip(results[a], results[b])) / n

    summary = {
        "seconds": times,
        "answer_lengths_mean": statistics.mean(len(y) for y in results["rag-token"]),
        "fast_vs_thorough_agreement": agree("rag-sequence fast", "rag-sequence thorough"),
        "thorough_over_fast_time": times["rag-sequence thorough"] / times["rag-sequence fast"],
        "ragbook_vs_transformers_rag_token_agreement": agree("rag-token",
                                                             "transformers rag-token"),
        "transformers_over_ragbook_rag_token_time": (times["transformers rag-token"]
                                                     / times["rag-token"]),
        "transformers_rag_sequence_over_thorough_time": (times["transformers rag-sequence"]
                                                         / times["rag-sequence thorough"]),
        "thorough_vs_transformers_rag_sequence_agreement": agree(
            "rag-sequence thorough", "transformers rag-sequence"),
        "note": "transformers' RAG-Sequence generate runs the generator with attention_mask=None,"
                " so on padded inputs its answers may differ from Thorough's by design",
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "seconds"}, indent=2))
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=16, help="training batch (questions)")
    parser.add_argument("--n-docs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--decode-questions", type=int, default=64)
    parser.add_argument("--num-beams", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset("tiny")
    generator, tokenizer, which = load_or_random_generator()
    print(f"generator: {which}; k = {args.n_docs}; torch threads {args.threads}", flush=True)
    hf_models = (rag.transformers_rag(generator, args.n_docs, "sequence"),
                 rag.transformers_rag(generator, args.n_docs, "token"))
    make = ((lambda n: real_inputs(tokenizer, n, args.n_docs, preset)) if tokenizer else
            (lambda n: random_inputs(generator.config, n, args.n_docs, preset)))

    ids, mask, scores, tgt = make(args.questions)
    training = bench_training(generator, hf_models, ids, mask, scores, tgt, args.rounds)
    ids, mask, scores, _ = make(args.decode_questions)
    decoding = bench_decoding(generator, tokenizer, hf_models, ids, mask, scores,
                              args.num_beams, preset.max_target_length, chunk=16)
    report = {"generator": which, "machine": platform.processor() or platform.machine(),
              "torch_threads": args.threads, "questions": args.questions,
              "n_docs": args.n_docs, "source_length": int(mask.sum(1).max()),
              "num_beams": args.num_beams, "max_length": preset.max_target_length,
              "training": training, "decoding": decoding}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
