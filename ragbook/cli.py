"""The ``ragbook`` command: the course's pipeline from a terminal.

Run ``ragbook --help`` for the subcommands and ``ragbook SUBCOMMAND --help`` for each one.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

from . import data


def _stats_table() -> str:
    """Corpus and task statistics as a Markdown table."""
    articles = data.load_articles()
    corpus = data.load_corpus()
    words = sorted(len(p.text.split()) for p in corpus)
    lines = [
        "| corpus | value |", "|---|---|",
        f"| articles | {len(articles):,} |",
        f"| passages (≤ {data.PASSAGE_WORDS} words) | {len(corpus):,} |",
        f"| words per passage (median / max) | {words[len(words) // 2]} / {words[-1]} |",
        f"| topics | {len(Counter(a['topic'] for a in articles))} |",
        "", "| task | train | dev | test |", "|---|---|---|---|",
    ]
    for task in data.TASKS:
        sizes = [len(data.load_task(task, split)) for split in data.SPLITS]
        lines.append(f"| {task} | " + " | ".join(f"{n:,}" for n in sizes) + " |")
    return "\n".join(lines)


def cmd_reproduce(args: argparse.Namespace) -> int:
    print("Preparing the built-in data (Wikipedia vital articles, CC BY-SA)…", file=sys.stderr)
    print(_stats_table())
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from .train import PretrainConfig, pretrain

    cfg = PretrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                         lr=args.lr, warmup=args.warmup, seed=args.seed)
    meta = pretrain(args.out, cfg, work=args.work, device=args.device)
    print(f"step {meta['step']}: held-out denoising loss {meta['heldout_loss']:.3f} "
          f"-> {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragbook",
        description="Retrieval-Augmented Generation (Lewis et al. 2020), rebuilt step by step. "
        "A question x is encoded, the top-k passages z are retrieved from a dense index, and "
        "a BART generator answers from each; RAG marginalizes over z.",
        epilog="Start with `ragbook reproduce`; the notebooks explain each step.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("reproduce", help="run the course's pipeline in the tiny preset",
                       description="Prepare the built-in data and print its statistics.")
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "pretrain", help="pre-train the tiny BART generator by denoising (hours on a CPU)",
        description="BART's denoising pre-training (text infilling + sentence permutation) "
        "on the train articles of the built-in corpus. Resumable: run the same command again "
        "after an interruption.")
    p.add_argument("--out", required=True, help="directory for the exported generator")
    p.add_argument("--work", help="directory for the tokenizer and the resumable checkpoint")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=7e-4)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.set_defaults(func=cmd_pretrain)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except data.DataError as e:
        print(f"ragbook: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
