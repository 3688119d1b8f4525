"""The ``ragbook`` command: the course's pipeline from a terminal.

Run ``ragbook --help`` for the subcommands and ``ragbook SUBCOMMAND --help`` for each one.
The work is the library's (``index.build_index`` and ``index.open_index`` behind ``index`` and
``search``, ``reproduce``, ``train.pretrain``); this module checks the input first and turns a
refusal into one line, ``ragbook: error: ...`` with exit status 2, and Ctrl-C into exit status
130 once the training loops have saved their checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from collections import Counter
from pathlib import Path
from typing import NoReturn

from . import data
from .config import PRESETS, RETRIEVERS, SMOL, SMOL_INSTALL, check_device, default_device
from .index import INDEX_RETRIEVERS, KINDS

RAG_PRESETS = ("paper", "tiny")  # the presets reproduce trains end to end (smol: --generator)


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


# --------------------------------------------------------------------------- checks
# Every option is checked before any long work starts (training, encoding): bad input ends in
# one line that says what to do (main), never in a traceback minutes later.


def _at_least(low: int):
    """An argparse type: a whole number ≥ ``low``."""
    def whole_number(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return whole_number


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def _device(text: str) -> str:
    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _writable_dir(path: str, flag: str) -> Path:
    """A directory to write into: refuse an existing file before the work that would fill it."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise data.DataError(f"{flag} {out}: a file is in the way; give a directory path")
    return out


def _reproduce_config(args: argparse.Namespace, **sizes):
    """reproduce's config for ``ask`` and ``reproduce``; refuses priors one model cannot serve."""
    from .reproduce import ReproduceConfig, check_priors

    ablation = getattr(args, "ablation_prior", None)  # reproduce's option; "none": no ablation
    cfg = ReproduceConfig(training_prior=args.training_prior, retriever=args.retriever,
                          ablation_prior=None if ablation == "none" else ablation, **sizes)
    try:
        check_priors(cfg)
    except ValueError as e:
        raise data.DataError(str(e)) from None
    return cfg


# --------------------------------------------------------------------------- the commands


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import results_table, run

    cfg = _reproduce_config(args, rag_steps=args.rag_steps, eval_questions=args.eval_questions,
                            seed=args.seed)
    _writable_dir(args.runs_dir, "--runs-dir")
    print("Preparing the built-in data (Wikipedia vital articles, CC BY-SA)…", file=sys.stderr)
    print(_stats_table())
    if args.data_only:
        return 0
    results = run(cfg, runs_dir=args.runs_dir)
    print()
    print(results_table(results))
    print(f"Run directory: {results['run_dir']} (also {args.runs_dir}/latest)")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from .reproduce import rag_model

    question = " ".join(args.question.split())
    if not question:
        raise data.DataError("the question is empty; ask one, in quotes")
    if args.model not in ("token", "sequence"):  # a model directory from `ragbook finetune`
        from .finetune import answer_questions, load_model

        if not Path(args.model).is_dir():
            raise data.DataError(f"--model {args.model}: give token, sequence, or a model "
                                 "directory written by `ragbook finetune`")
        model, settings, note = load_model(args.model, args.index)
        if note:
            print(note, file=sys.stderr)
        prediction = answer_questions(model, settings, [data.Example(question)], n_docs=args.k,
                                      num_beams=args.beams, progress=False)[0]
        return _print_answer(prediction, settings["config"]["marginalization"])
    if args.index:
        raise data.DataError("--index goes with --model DIR (a model from `ragbook finetune`)")
    if args.generator:
        return _ask_zero_shot(args, question)
    cfg = _reproduce_config(args, preset=args.preset, entity_steps=args.steps)
    print("Loading the jointly trained RAG model (trained and cached on first use)…",
          file=sys.stderr)
    model = rag_model(cfg, "entity-qa", args.model)
    prediction = model.answer([question], marginalization=args.model, n_docs=args.k or 5,
                              num_beams=args.beams)[0]
    return _print_answer(prediction, args.model)


def _ask_zero_shot(args: argparse.Namespace, question: str) -> int:
    """``ask --generator G``: RAG over the built-in index with generator G as it is."""
    from .config import get_preset
    from .finetune import FinetuneConfig
    from .pipeline import RagModel

    preset = (get_preset(SMOL) if args.generator == SMOL else get_preset(
        args.preset, generator=args.generator,
        max_source_length=FinetuneConfig.max_source_length))
    model = RagModel.from_preset(preset, retriever=args.retriever)
    prediction = model.answer([question], marginalization=args.model, n_docs=args.k,
                              num_beams=args.beams)[0]
    return _print_answer(prediction, args.model)


def _print_answer(prediction, marginalization: str) -> int:
    print(f"answer: {prediction.prediction}")
    print(f"supporting passages, p(z | x, y) under RAG-{marginalization.capitalize()}:")
    for doc in sorted(prediction.provenance, key=lambda d: -d["posterior"]):
        print(f"  {doc['posterior']:.3f}  {doc['title']}  [{doc['id']}]")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from .finetune import FinetuneConfig, finetune, load_questions, shared_questions

    out = _writable_dir(args.out, "--out")
    train = load_questions(args.train)
    dev = load_questions(args.dev, split="validation") if args.dev else []
    shared = shared_questions(train, dev)
    if shared:
        print(f"ragbook: warning: {shared} of {len(dev)} dev questions are also in --train "
              f"{args.train}; their dev scores are not held-out", file=sys.stderr)
    cfg = FinetuneConfig(marginalization=args.model, n_docs=args.n_docs, steps=args.steps,
                         batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                         eval_every=args.eval_every,
                         max_source_length=args.max_source_length, closed_book=args.closed_book,
                         generator=args.generator)
    settings = finetune(args.index, train, out, dev, cfg, args.device or str(default_device()),
                        args.resume,
                        sources={"train": {"source": args.train}, "dev": {"source": args.dev}})
    results = settings["dev"]["results"]
    print(f"{settings['kind']} model, {cfg.steps} steps"
          + (f", dev EM {results['em']:.3f} F1 {results['f1']:.3f}" if results else "")
          + f" -> {out} (model card: {out / 'README.md'})")
    return 0


def cmd_answer(args: argparse.Namespace) -> int:
    from .finetune import answer_file

    scores = answer_file(args.model, args.questions, args.out, args.index, n_docs=args.k,
                         batch_size=args.batch_size, num_beams=args.beams)
    print(f"{scores['n']:,} predictions with provenance -> {args.out} (against the file's "
          f"answers: EM {scores['em']:.3f}, F1 {scores['f1']:.3f}; `ragbook eval {args.out}`)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import load_predictions, score_predictions

    predictions = load_predictions(args.predictions)
    if not predictions:
        raise data.DataError(f"{args.predictions}: no predictions in the file; give the JSONL "
                             "that `ragbook reproduce` writes (runs/latest/predictions_*.jsonl)")
    print(json.dumps(score_predictions(predictions), indent=2))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    import inspect
    from dataclasses import fields

    from .generator import tiny_config
    from .train import PretrainConfig, pretrain

    out = _writable_dir(args.out, "--out")
    work = _writable_dir(args.work, "--work") if args.work else None
    positions = inspect.signature(tiny_config).parameters["max_positions"].default
    if args.seq_len is not None and args.seq_len > positions:
        raise data.DataError(f"--seq-len {args.seq_len}: the tiny BART has {positions} "
                             f"positions; give at most {positions}")
    given = {f.name: getattr(args, f.name, None) for f in fields(PretrainConfig)}
    cfg = PretrainConfig(**{k: v for k, v in given.items() if v is not None})
    try:
        meta = pretrain(out, cfg, work=work, device=args.device)
    except ValueError as e:  # a checkpoint in --work written with other settings
        raise data.DataError(f"{e} (--work DIR)") from None
    reading = (f", reading loss {meta['heldout_read_loss']:.3f}" if "heldout_read_loss" in meta
               else "")
    print(f"step {meta['step']}: held-out denoising loss {meta['heldout_loss']:.3f}{reading} "
          f"-> {out}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    from .config import get_preset
    from .index import build_index

    out = _writable_dir(args.out, "--out")
    if args.shard_size is not None and (args.shard_size < 1 or args.index_type != "ivfpq"
                                        or args.retriever != "dense"):
        raise data.DataError("--shard-size N (N ≥ 1) builds a dense ivfpq index: add "
                             "--index-type ivfpq (and no --retriever bm25/fusion)")
    preset = get_preset(args.preset)  # its checkpoints, checked before the corpus is read
    passages = data.load_corpus() if args.corpus == "builtin" else data.load_passages(args.corpus)
    print(f"{len(passages):,} passages from {args.corpus}", file=sys.stderr)
    if args.shard_size is not None:  # streamed: shards on disk, merged into one IVF-PQ
        from .shards import build_sharded_index

        index = build_sharded_index(passages, out, args.shard_size, preset)
        built = f"on-disk ivfpq index from shards of {args.shard_size:,} ({index.dim} dims)"
    else:
        built = build_index(passages, out, args.retriever, preset, args.index_type)
    print(f"{built} of {len(passages):,} passages -> {out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from .index import open_index

    if args.questions and args.question:
        raise data.DataError("give a question or --questions FILE, not both")
    if args.questions:
        examples = data.load_examples(args.questions)
    elif args.question:
        examples = [data.Example(question=" ".join(args.question))]
    else:
        raise data.DataError("give a question, or a file of questions with --questions FILE")
    retriever = open_index(args.index)
    batches = range(0, len(examples), args.batch_size)
    for start in tqdm(batches, desc="search", unit="batch", file=sys.stderr,
                      disable=len(batches) < 2):
        batch = examples[start:start + args.batch_size]
        found = retriever.search([e.question for e in batch], args.k)
        for e, passages, scores in zip(batch, found.passages, found.scores.tolist()):
            hits = [{"id": p.id, "title": p.title, "text": p.text, "score": round(s, 4)}
                    for p, s in zip(passages, scores)]
            if args.json:
                record = {"question": e.question}
                if e.answers:
                    record["answers"] = e.answers
                record["passages"] = hits
                print(json.dumps(record, ensure_ascii=False))
                continue
            print(f"Q: {e.question}" + (f"   (answers: {e.answers})" if e.answers else ""))
            for rank, h in enumerate(hits, 1):
                text = h["text"] if len(h["text"]) <= 160 else h["text"][:157] + "..."
                print(f"  {rank:>2}. {h['score']:8.4f}  [{h['title']}] {text}")
            print()
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .config import get_preset
    from .export import checkpoint_model, export_rag, reproduced_model

    out = _writable_dir(args.out, "--out")
    if args.checkpoint:
        model, about = checkpoint_model(args.checkpoint, get_preset(args.preset))
    else:
        get_preset(args.preset)  # its checkpoints, checked before any training
        print("Loading the jointly trained entity-QA model (trained and cached on first use)…",
              file=sys.stderr)
        model, about = reproduced_model(args.model, args.preset, args.steps)
    notes = export_rag(model, out, args.model, about)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    parts = ["generator/", "query_encoder/", "passages/", "passages.faiss",
             *(["rag/"] if not notes else []), "README.md"]
    print(f"RAG-{args.model.capitalize()} exported -> {out}: {', '.join(parts)}")
    return 0


def cmd_exercises(args: argparse.Namespace) -> int:
    from . import exercises

    def interrupted(signum, frame):  # `kill`, `timeout`, a scheduler: stop as Ctrl-C does
        raise KeyboardInterrupt

    # the running sandboxes are killed on the way out (exercises._pool), not left orphaned
    previous = signal.signal(signal.SIGTERM, interrupted)
    try:
        return _exercises(args, exercises)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _exercises(args: argparse.Namespace, exercises) -> int:
    try:
        if args.action == "build":
            _writable_dir(args.out, "--out")
            for r in exercises.build(args.out, timeout=args.timeout, jobs=args.jobs):
                print(f"{r['assignment']}: {r['questions']} questions, {r['points']:g} points, "
                      f"reference full marks ({r['seconds']:.0f} s)")
            print(f"autograders -> {args.out}; student notebooks -> "
                  f"{exercises.EXERCISES / 'student'}")
            return 0
        rows = exercises.grade(args.submissions, args.autograders, args.out, args.timeout,
                               jobs=args.jobs, seed=args.seed,
                               require_sandbox=args.require_sandbox,
                               student_from=args.student_from)
    except exercises.ExerciseError as e:
        raise data.DataError(str(e)) from None
    off = set()
    for r in rows:
        if r.question == "total":
            why = f"  ({r.reason})" if r.reason else ""
            flag = f"  FLAGGED: {r.flag}" if r.flag else ""
            print(f"{r.points:g}/{r.max_points:g}  {r.submission}{why}{flag}")
            off |= set(filter(None, r.protections_off.split(", ")))
    if off:
        print(f"warning: graded without {', '.join(sorted(off))} (install bubblewrap: "
              "`make sysdeps`; --require-sandbox refuses to grade without)", file=sys.stderr)
    out = Path(args.out)
    print(f"scores: {out} and {out.with_suffix('.json')}; gradebook: "
          f"{out.with_name(out.stem + '-gradebook.csv')} (Canvas), "
          f"{out.with_name(out.stem + '-gradescope.csv')} (Gradescope); feedback: "
          f"{out.with_name(out.stem + '-feedback')}/ (seed {args.seed})")
    return 0


def _prior_options(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--retriever", choices=RETRIEVERS, default=defaults.retriever,
                   help="RAG's prior p(z|x) at test time: dense (the paper), BM25, or hybrid, "
                   f"their product (default {defaults.retriever})")
    p.add_argument("--training-prior", choices=RETRIEVERS, default=defaults.training_prior,
                   help="the prior during joint fine-tuning (default "
                   f"{defaults.training_prior}, the paper's)")


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line pointing to --help, not a usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"ragbook: error: {message} (see `{self.prog} --help`)\n")


RESUME = "run the same command again to resume from the checkpoint it saved"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ragbook",
        description="Retrieval-Augmented Generation (Lewis et al. 2020), rebuilt step by step. "
        "A question x is encoded, the top-k passages z are retrieved from a dense index, and "
        "a BART generator answers from each; RAG marginalizes over z.",
        epilog="Start with `ragbook reproduce`; the notebooks explain each step.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .reproduce import ReproduceConfig

    defaults = ReproduceConfig()  # reproduce's sizes; `ask` loads reproduce's cached model
    count = _at_least(1)

    p = sub.add_parser(
        "reproduce", help="run the course's whole pipeline in the tiny preset (CPU, offline)",
        description="Data, retriever, index, the shipped generator, closed-book BART and both "
        "RAG models (trained once, then cached under $RAGBOOK_CACHE), and every experiment: "
        "the paper's Tables 1, 2 and 6 and Figure 3 at course scale, and index hot-swapping. "
        "Writes runs/<timestamp>/ (results.md, results.json, figures, predictions) and prints "
        "the results table.")
    p.add_argument("--data-only", action="store_true",
                   help="only prepare the data and print its statistics")
    p.add_argument("--rag-steps", type=count, default=defaults.rag_steps,
                   help="joint fine-tuning steps")
    p.add_argument("--eval-questions", type=count, default=defaults.eval_questions,
                   help="test questions per task")
    p.add_argument("--runs-dir", default="runs", help="where run directories are written")
    _prior_options(p, defaults)
    p.add_argument("--ablation-prior", choices=(*RETRIEVERS, "none"),
                   default=defaults.ablation_prior, help="Table 1's ablation: RAG-Token read "
                   f"with this prior, no retraining (default {defaults.ablation_prior})")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_reproduce, on_interrupt=f"models already trained stay cached; {RESUME}")

    p = sub.add_parser(
        "ask", help="answer a question with RAG, showing the supporting passages",
        description="Retrieve the top-k passages for the question, generate an answer with the "
        "jointly fine-tuned RAG model (entity QA; trained and cached on first use) and print "
        "each passage's posterior p(z | x, y): the answer's provenance.")
    p.add_argument("question", help="the question (quote it)")
    p.add_argument("--model", default="token", metavar="{token,sequence,DIR}",
                   help="RAG-Token (Eq. 2) or RAG-Sequence (Eq. 1) trained on entity QA, or "
                   "a model directory written by `ragbook finetune`")
    p.add_argument("--index", help="with --model DIR: answer from this index instead of the "
                   "one the model was trained with (a hot-swap)")
    p.add_argument("-k", type=count, default=None, help="passages retrieved (default 5, or "
                   "the fine-tuned model's)")
    p.add_argument("--beams", type=count, default=1, help="beam size (default 1: greedy, as "
                   "reproduce and the paper decode open-domain QA)")
    p.add_argument("--steps", type=count, default=defaults.entity_steps,
                   help="joint fine-tuning steps on entity QA")
    p.add_argument("--preset", choices=RAG_PRESETS, default="tiny",
                   help="tiny (offline, CPU) or paper (hub checkpoints, GPU)")
    p.add_argument("--generator", help="answer zero-shot (no joint training) with this "
                   f"generator instead: {SMOL} (SmolLM2-135M-Instruct, a decoder-only LM; "
                   f"install: {SMOL_INSTALL}) or a directory (BART or a causal LM)")
    _prior_options(p, defaults)
    p.set_defaults(func=cmd_ask, on_interrupt=RESUME)

    p = sub.add_parser(
        "eval", help="score a predictions file (Exact Match and F1)",
        description="Score a JSONL file of predictions {\"question\", \"prediction\", "
        "\"answers\"} (as `ragbook reproduce` writes them) with SQuAD-normalised Exact Match "
        "and F1, the max over the gold answers.")
    p.add_argument("predictions", help="a predictions JSONL file")
    p.set_defaults(func=cmd_eval, on_interrupt="nothing was written")

    p = sub.add_parser(
        "pretrain", help="pre-train the tiny BART generator: denoising, reading, focus (hours "
        "on a CPU)",
        description="BART's denoising pre-training (text infilling + sentence permutation), "
        "then a reading stage (salient-span questions answered from the passage in the input), "
        "then a focus stage (the same questions, the passage often narrowed to the question's "
        "sentence and its neighbours), "
        "on the train articles of the built-in corpus. Resumable: run the same command again "
        "after an interruption.")
    p.add_argument("--out", required=True, help="directory for the exported generator")
    p.add_argument("--work", help="directory for the tokenizer and the resumable checkpoint")
    recipe = "(default: the shipped generator's, train.PretrainConfig)"
    for flag, kind in (("--steps", count), ("--batch-size", count), ("--seq-len", _at_least(3)),
                       ("--lr", _positive_float), ("--warmup", _at_least(0)), ("--seed", int),
                       ("--read-steps", _at_least(0)), ("--focus-steps", _at_least(0))):
        p.add_argument(flag, type=kind, help=recipe)
    p.add_argument("--device", type=_device,
                   help="cpu or cuda (default: $RAGBOOK_DEVICE, else CUDA when there is a GPU)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 matrix products where the device has them (a GPU, or a CPU with "
                   "AVX512-BF16 or AMX; faster steps there), fp32 elsewhere " + recipe)
    p.set_defaults(func=cmd_pretrain, on_interrupt=RESUME)

    p = sub.add_parser(
        "index", help="index a corpus (built-in or your own) for retrieval",
        description="Encode every passage with the preset's document encoder BERT_d and store "
        "the vectors in a FAISS index for maximum inner product search (or build a BM25 "
        "index, or both for rank fusion). Corpus formats: JSONL lines {\"id\", \"title\", "
        "\"text\"}, plain text (paragraphs split on blank lines), SQuAD-format JSON (its "
        "contexts), a Hugging Face dataset saved with save_to_disk (columns id, title, text), "
        "or `builtin`.")
    p.add_argument("--corpus", required=True,
                   help="FILE (.jsonl, .txt, SQuAD .json), a saved dataset DIR, or builtin")
    p.add_argument("--out", required=True, help="directory to write the index into")
    p.add_argument("--retriever", choices=INDEX_RETRIEVERS, default="dense",
                   help="fusion: a dense and a BM25 index, their rankings merged by reciprocal "
                   "rank fusion at search time")
    p.add_argument("--index-type", choices=KINDS, default="flat",
                   help="flat: exact; hnsw: fast approximate graph; ivfpq: compressed")
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny",
                   help="tiny (offline) or paper (the DPR encoders, from the hub)")
    p.add_argument("--shard-size", type=int, metavar="N",
                   help="ivfpq only: encode N passages at a time to disk and merge the shards "
                   "into one on-disk index, searched memory-mapped (corpora larger than RAM); "
                   "an interrupted build resumes from the last finished shard")
    p.set_defaults(func=cmd_index, on_interrupt="the index was not completed; run it again "
                   "(a finished corpus encoding stays cached)")

    p = sub.add_parser(
        "search", help="retrieve the top passages for questions from an index",
        description="Print the top-k passages and their scores for a question, or with "
        "--questions FILE (JSONL {\"question\", \"answers\"}, SQuAD JSON, or a saved Hugging "
        "Face dataset) and --json, one JSON object per line: question, gold answers, passages "
        "(id, title, text, score).")
    p.add_argument("--index", required=True, help="a directory written by `ragbook index`")
    p.add_argument("question", nargs="*", help="a question (quote it)")
    p.add_argument("--questions", help="a file of questions (JSONL, SQuAD JSON, dataset DIR)")
    p.add_argument("-k", type=count, default=5, help="passages per question (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=count, default=64, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_search, on_interrupt="stopped")

    p = sub.add_parser(
        "export", help="write a trained RAG model in the formats the ecosystem loads",
        description="Write the generator (a BART checkpoint), the query encoder "
        "(sentence-transformers for MiniLM, DPRQuestionEncoder for DPR), the passages (a "
        "datasets dataset and a FAISS index), for DPR-shaped models a transformers RAG "
        "checkpoint with its RagRetriever, and a model card (README.md).")
    p.add_argument("--model", choices=("token", "sequence"), default="token",
                   help="RAG-Token (Eq. 2) or RAG-Sequence (Eq. 1)")
    p.add_argument("--out", required=True, help="directory to write the export into")
    p.add_argument("--checkpoint", help="a directory with generator/ and query_encoder/ "
                   "(default: the jointly trained entity-QA model of `ragbook ask`)")
    p.add_argument("--preset", choices=RAG_PRESETS, default="tiny",
                   help="the preset the model was trained with")
    p.add_argument("--steps", type=count, default=defaults.entity_steps,
                   help="joint fine-tuning steps on entity QA")
    p.set_defaults(func=cmd_export, on_interrupt=f"nothing was exported; {RESUME}")

    p = sub.add_parser(
        "finetune", help="fine-tune RAG on your own questions over your own index",
        description="Joint RAG fine-tuning (the paper's §2.4, as `reproduce` trains): the "
        "query encoder and the generator learn from your question-answer pairs, the index "
        "stays frozen. Questions: JSONL {\"question\", \"answers\"}, SQuAD v1.1/v2.0 JSON, "
        "a saved Hugging Face dataset DIR, or a hub dataset NAME[:SPLIT] when online. Writes a "
        "model directory (generator, query encoder, settings, the index's fingerprint, a "
        "model card with the dev results) for `ask --model` and `answer`.")
    p.add_argument("--index", required=True, help="a dense index written by `ragbook index`")
    p.add_argument("--train", required=True, help="training questions (FILE, DIR or NAME)")
    p.add_argument("--dev", help="dev questions, scored every --eval-every steps and at the end")
    p.add_argument("--out", required=True, help="the model directory to write")
    p.add_argument("--model", choices=("token", "sequence"), default="token",
                   help="RAG-Token (Eq. 2) or RAG-Sequence (Eq. 1)")
    p.add_argument("--closed-book", action="store_true",
                   help="the paper's BART baseline instead: the generator alone, no retrieval")
    p.add_argument("--generator", help="the generator to fine-tune (default: the index's "
                   f"preset's): {SMOL} (SmolLM2-135M-Instruct; install: {SMOL_INSTALL}) or a "
                   "directory (BART or a causal LM)")
    p.add_argument("--steps", type=count, default=250, help="training steps (default 250)")
    p.add_argument("--batch-size", type=count, default=16, help="questions per step")
    p.add_argument("--lr", type=_positive_float, default=3e-4,
                   help="the generator's learning rate (default 3e-4)")
    p.add_argument("--n-docs", type=count, default=5, help="passages k marginalized over")
    p.add_argument("--max-source-length", type=_at_least(8), default=256,
                   help="generator input tokens, passage and question (default 256)")
    p.add_argument("--eval-every", type=count, default=50, help="dev evaluation interval")
    p.add_argument("--device", type=_device,
                   help="cpu or cuda (default: $RAGBOOK_DEVICE, else CUDA when there is a GPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run whose checkpoint is in OUT-work/")
    p.set_defaults(func=cmd_finetune, on_interrupt="the checkpoint is saved; run the same "
                   "command with --resume to continue")

    p = sub.add_parser(
        "answer", help="answer a file of questions with a fine-tuned model",
        description="Answer every question of a file (JSONL, SQuAD JSON or a saved dataset) "
        "with a model from `ragbook finetune`, in batches, and write one JSON line per "
        "question: question, prediction, gold answers and provenance (the passages with "
        "p(z | x, y)), which `ragbook eval` scores.")
    p.add_argument("--model", required=True, help="a model directory from `ragbook finetune`")
    p.add_argument("--questions", required=True, help="the questions (FILE, DIR or NAME)")
    p.add_argument("--out", required=True, help="the predictions JSONL to write")
    p.add_argument("--index", help="answer from this index instead of the model's own "
                   "(a hot-swap)")
    p.add_argument("-k", type=count, default=None, help="passages (default: the model's)")
    p.add_argument("--beams", type=count, default=1, help="beam size (default 1: greedy)")
    p.add_argument("--batch-size", type=count, default=16, help="questions per batch")
    p.set_defaults(func=cmd_answer, on_interrupt="nothing was written")

    p = sub.add_parser(
        "exercises", help="graded exercises (otter-grader): build the autograders, grade",
        description="The instructor's side of exercises/ (see exercises/README.md).")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser(
        "build", help="otter assign on every assignment",
        description="Run otter assign on every exercises/source notebook: the autograder zips go "
        "to --out, once each reference solution has scored full marks through the grader; the "
        "student notebooks (no solutions, no hidden tests) go to exercises/student.")
    p.add_argument("--out", default="exercises/dist", help="directory for the autograder zips "
                   "(default exercises/dist)")
    p.add_argument("--timeout", type=_positive_float, default=300.0,
                   help="seconds allowed to grade each reference solution (default 300)")
    p.add_argument("--jobs", type=count, default=1,
                   help="reference solutions graded at once (default 1; one per CPU core)")
    p.set_defaults(func=cmd_exercises, on_interrupt="autograders already built stay")
    p = actions.add_parser(
        "grade", help="grade submitted notebooks",
        description="Grade notebooks (files, or directories of *.ipynb); each runs in a sandbox "
        "(bubblewrap: no network, its own view of the files, limits, its processes killed at "
        "the end) and only computes; the grader draws the hidden inputs (from --seed and the "
        "file) and compares with its own reference. The assignment comes from the notebook's "
        "metadata. Writes one row per submission and question (points, max points, reason, "
        "integrity flags, seed) plus a total to --out (CSV) and as JSON beside it, a wide "
        "gradebook for Canvas and one for Gradescope, and a feedback file per student.")
    p.add_argument("submissions", nargs="+", help="notebooks or directories of them")
    p.add_argument("--out", required=True, help="the CSV to write (e.g. scores.csv)")
    p.add_argument("--autograders", default="exercises/dist",
                   help="the directory `ragbook exercises build` filled (default exercises/dist)")
    p.add_argument("--timeout", type=_positive_float, default=300.0,
                   help="seconds allowed to each submission (default 300)")
    p.add_argument("--jobs", type=count, default=1,
                   help="submissions graded at once, each in its own process (default 1; at "
                   "most one per CPU core helps)")
    p.add_argument("--seed", type=int, default=0,
                   help="base seed of the hidden inputs (default 0); each submission's own seed "
                   "is drawn from it and its file, and recorded: the same seed grades alike")
    p.add_argument("--require-sandbox", action="store_true",
                   help="refuse to grade where bubblewrap cannot isolate the submissions")
    p.add_argument("--student-from", choices=("file", "metadata"), default="file",
                   help="the student's id: the file name up to its first '_' (default; "
                   "Canvas's downloads), or the notebook's metadata.ragbook.student")
    p.set_defaults(func=cmd_exercises, on_interrupt="grades already written stay")
    return parser


def _error(message: object) -> int:
    print("ragbook: error: " + " ".join(str(message).split()), file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    """Run ``ragbook``; returns the exit status: 0, 2 for bad input (one line on stderr, what
    to do), 130 for Ctrl-C."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed in one line
        return e.code if isinstance(e.code, int) else 0
    try:
        default_device()  # a bad RAGBOOK_DEVICE ends here, before any long work
    except ValueError as e:
        return _error(e)
    try:
        return args.func(args)
    except data.DataError as e:
        return _error(e)
    except KeyboardInterrupt:  # the training loops save their checkpoint before this
        print(f"ragbook: interrupted; {args.on_interrupt}", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `ragbook search ... | head` closed the pipe: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # the machine's side: a path not writable, a hub out of reach
        return _error(e)


if __name__ == "__main__":
    sys.exit(main())
