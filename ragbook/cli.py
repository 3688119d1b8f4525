"""The ``ragbook`` command: the course's pipeline from a terminal.

Run ``ragbook --help`` for the subcommands and ``ragbook SUBCOMMAND --help`` for each one.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from . import data
from .config import RETRIEVERS


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
    from .reproduce import ReproduceConfig, results_table, run

    print("Preparing the built-in data (Wikipedia vital articles, CC BY-SA)…", file=sys.stderr)
    print(_stats_table())
    if args.data_only:
        return 0
    cfg = ReproduceConfig(rag_steps=args.rag_steps, eval_questions=args.eval_questions,
                          training_prior=args.training_prior, retriever=args.retriever,
                          seed=args.seed)
    results = run(cfg, runs_dir=args.runs_dir)
    print()
    print(results_table(results))
    print(f"Run directory: {results['run_dir']} (also {args.runs_dir}/latest)")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from .reproduce import ReproduceConfig, rag_model

    print("Loading the jointly trained RAG model (trained and cached on first use)…",
          file=sys.stderr)
    cfg = ReproduceConfig(preset=args.preset, rag_steps=args.steps,
                          training_prior=args.training_prior, retriever=args.retriever)
    model = rag_model(cfg, "entity-qa", args.model)
    prediction = model.answer([args.question], marginalization=args.model, n_docs=args.k,
                              num_beams=args.beams)[0]
    print(f"answer: {prediction.prediction}")
    print(f"supporting passages, p(z | x, y) under RAG-{args.model.capitalize()}:")
    for doc in sorted(prediction.provenance, key=lambda d: -d["posterior"]):
        print(f"  {doc['posterior']:.3f}  {doc['title']}  [{doc['id']}]")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import load_predictions, score_predictions

    scores = score_predictions(load_predictions(args.predictions))
    print(json.dumps(scores, indent=2))
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from .train import PretrainConfig, pretrain

    given = {f.name: getattr(args, f.name, None) for f in fields(PretrainConfig)}
    cfg = PretrainConfig(**{k: v for k, v in given.items() if v is not None})
    meta = pretrain(args.out, cfg, work=args.work, device=args.device)
    print(f"step {meta['step']}: held-out denoising loss {meta['heldout_loss']:.3f} "
          f"-> {args.out}")
    return 0


# --------------------------------------------------------------------------- index and search


def _load_corpus_arg(corpus: str) -> list[data.Passage]:
    """Passages from ``--corpus``: "builtin", JSONL / plain text, or SQuAD-format JSON."""
    if corpus == "builtin":
        return data.load_corpus()
    path = Path(corpus)
    if path.suffix == ".json" and path.is_file():
        try:
            blob = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            blob = None  # perhaps JSONL under a .json name: load_passages reports its errors
        if isinstance(blob, dict) and "data" in blob:
            if not isinstance(blob["data"], list):
                raise data.DataError(f"{path}: not SQuAD format; \"data\" must be a list")
            try:
                passages = data.passages_from_squad(path)
            except (KeyError, TypeError, AttributeError):
                raise data.DataError(f"{path}: malformed SQuAD file; each article needs "
                                     "\"paragraphs\" with a \"context\"") from None
            if not passages:
                raise data.DataError(f"{path}: no paragraphs found in this SQuAD file")
            return passages
    return data.load_passages(path)


def _save_bm25(retriever, passages: list[data.Passage], out: Path) -> None:
    """bm25s's own files (numpy arrays and JSON, no pickle) plus the passages and a meta.json
    with their fingerprint, so that `ragbook search` can check they belong together."""
    from .index import META_FILE, PASSAGES_FILE, corpus_fingerprint

    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    retriever.model.save(str(out / "bm25"), show_progress=False)
    with open(out / PASSAGES_FILE, "w", encoding="utf-8") as f:
        for p in passages:
            f.write(json.dumps({"id": p.id, "title": p.title, "text": p.text},
                               ensure_ascii=False) + "\n")
    meta = {"format": 1, "retriever": "bm25", "kind": "bm25", "count": len(passages),
            "fingerprint": corpus_fingerprint(passages)}
    (out / META_FILE).write_text(json.dumps(meta, indent=2))


def _load_bm25(directory: Path, meta: dict):
    import bm25s

    from .index import PASSAGES_FILE, corpus_fingerprint
    from .retriever import BM25Retriever

    hint = "rebuild it with `ragbook index --retriever bm25`"
    path = directory / PASSAGES_FILE
    if not path.is_file() or not (directory / "bm25").is_dir():
        raise data.DataError(f"{directory}: the BM25 index is incomplete; {hint}")
    with open(path, encoding="utf-8") as f:
        passages = [data.Passage(**json.loads(line)) for line in f if line.strip()]
    if len(passages) != meta.get("count") or corpus_fingerprint(passages) != meta.get(
            "fingerprint"):
        raise data.DataError(f"{path}: the passages do not match the BM25 index; {hint}")
    retriever = BM25Retriever.__new__(BM25Retriever)  # load, don't re-index
    retriever.passages = passages
    retriever.model = bm25s.BM25.load(str(directory / "bm25"), show_progress=False)
    return retriever


def _build_dense(passages: list[data.Passage], args: argparse.Namespace, out: Path) -> str:
    from .config import get_preset
    from .index import DenseIndex
    from .retriever import passage_embeddings

    preset = get_preset(args.preset)
    vectors = passage_embeddings(preset, passages)  # cached per (encoder, corpus)
    meta = {"encoder": preset.doc_encoder, "query_encoder": preset.query_encoder,
            "pooling": preset.pooling, "normalize": preset.normalize, "preset": preset.name,
            "max_query_length": preset.max_query_length, "corpus": args.corpus,
            "retriever": "dense"}
    index = DenseIndex.build(vectors, passages, kind=args.index_type, metadata=meta)
    index.save(out)
    return f"{index.kind} index ({index.dim} dims, encoder {index.encoder})"


def cmd_index(args: argparse.Namespace) -> int:
    from .retriever import BM25Retriever

    passages = _load_corpus_arg(args.corpus)
    out = Path(args.out)
    print(f"{len(passages):,} passages from {args.corpus}", file=sys.stderr)
    if args.retriever == "bm25":
        _save_bm25(BM25Retriever(passages), passages, out)
        built = "BM25 index"
    elif args.retriever == "dense":
        built = _build_dense(passages, args, out)
    else:  # hybrid: both, side by side, fused at search time
        from .index import META_FILE

        out.mkdir(parents=True, exist_ok=True)
        (out / META_FILE).unlink(missing_ok=True)
        built = _build_dense(passages, args, out / "dense") + " + BM25 index, fused by RRF"
        _save_bm25(BM25Retriever(passages), passages, out / "bm25")
        (out / META_FILE).write_text(json.dumps({"format": 1, "retriever": "hybrid",
                                                 "parts": ["dense", "bm25"]}, indent=2))
    print(f"{built} of {len(passages):,} passages -> {out}")
    return 0


def _open_retriever(directory: Path):
    """A retriever with ``.search(questions, k)`` for an index directory (dense, BM25, or
    both fused by reciprocal rank fusion)."""
    from .index import META_FILE, DenseIndex

    meta_path = directory / META_FILE
    meta = {}
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise data.DataError(f"{meta_path}: unreadable metadata; rebuild the index with "
                                 "`ragbook index`") from None
    if meta.get("retriever") == "bm25":
        return _load_bm25(directory, meta)
    if meta.get("retriever") == "hybrid":
        from .retriever import HybridRetriever

        return HybridRetriever([_open_retriever(directory / part) for part in meta["parts"]])
    from .retriever import DenseRetriever, Encoder

    index = DenseIndex.load(directory)
    name = index.metadata.get("query_encoder") or index.encoder
    if name is None:
        raise data.DataError(f"{directory}: the index does not name its encoder; rebuild it "
                             "with `ragbook index`")
    encoder = Encoder(name, index.metadata.get("pooling") or "mean",
                      bool(index.metadata.get("normalize")),
                      index.metadata.get("max_query_length") or 64)
    index.check_encoder(encoder, where=f"the index at {directory}")
    return DenseRetriever(encoder, index)


def cmd_search(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    if args.questions:
        examples = data.load_examples(args.questions)
    elif args.question:
        examples = [data.Example(question=" ".join(args.question))]
    else:
        raise data.DataError("give a question, or a file of questions with --questions FILE")
    if args.k < 1:
        raise data.DataError(f"-k must be at least 1, got {args.k}")
    retriever = _open_retriever(Path(args.index))
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


def _prior_options(p: argparse.ArgumentParser, defaults) -> None:
    p.add_argument("--retriever", choices=RETRIEVERS, default=defaults.retriever,
                   help="RAG's prior p(z|x) at test time: dense (the paper), BM25, or their "
                   f"product (default {defaults.retriever})")
    p.add_argument("--training-prior", choices=RETRIEVERS, default=defaults.training_prior,
                   help="the prior during joint fine-tuning (default "
                   f"{defaults.training_prior}, the paper's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ragbook",
        description="Retrieval-Augmented Generation (Lewis et al. 2020), rebuilt step by step. "
        "A question x is encoded, the top-k passages z are retrieved from a dense index, and "
        "a BART generator answers from each; RAG marginalizes over z.",
        epilog="Start with `ragbook reproduce`; the notebooks explain each step.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .reproduce import ReproduceConfig

    defaults = ReproduceConfig()  # reproduce's sizes; `ask` loads reproduce's cached model

    p = sub.add_parser(
        "reproduce", help="run the course's whole pipeline in the tiny preset (CPU, offline)",
        description="Data, retriever, index, the shipped generator, closed-book BART and both "
        "RAG models (trained once, then cached under $RAGBOOK_CACHE), and every experiment: "
        "the paper's Tables 1, 2 and 6 and Figure 3 at course scale, and index hot-swapping. "
        "Writes runs/<timestamp>/ (results.md, results.json, figures, predictions) and prints "
        "the results table.")
    p.add_argument("--data-only", action="store_true",
                   help="only prepare the data and print its statistics")
    p.add_argument("--rag-steps", type=int, default=defaults.rag_steps,
                   help="joint fine-tuning steps")
    p.add_argument("--eval-questions", type=int, default=defaults.eval_questions,
                   help="test questions per task")
    p.add_argument("--runs-dir", default="runs", help="where run directories are written")
    _prior_options(p, defaults)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser(
        "ask", help="answer a question with RAG, showing the supporting passages",
        description="Retrieve the top-k passages for the question, generate an answer with the "
        "jointly fine-tuned RAG model (entity QA; trained and cached on first use) and print "
        "each passage's posterior p(z | x, y): the answer's provenance.")
    p.add_argument("question", help="the question (quote it)")
    p.add_argument("--model", choices=("token", "sequence"), default="token",
                   help="RAG-Token (Eq. 2) or RAG-Sequence (Eq. 1)")
    p.add_argument("-k", type=int, default=5, help="passages retrieved (default 5)")
    p.add_argument("--beams", type=int, default=4, help="beam size (1: greedy)")
    p.add_argument("--steps", type=int, default=defaults.rag_steps,
                   help="joint fine-tuning steps (reproduce's model by default)")
    p.add_argument("--preset", default="tiny")
    _prior_options(p, defaults)
    p.set_defaults(func=cmd_ask)

    p = sub.add_parser(
        "eval", help="score a predictions file (Exact Match and F1)",
        description="Score a JSONL file of predictions {\"question\", \"prediction\", "
        "\"answers\"} (as `ragbook reproduce` writes them) with SQuAD-normalised Exact Match "
        "and F1, the max over the gold answers.")
    p.add_argument("predictions", help="a predictions JSONL file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser(
        "pretrain", help="pre-train the tiny BART generator by denoising (hours on a CPU)",
        description="BART's denoising pre-training (text infilling + sentence permutation) "
        "on the train articles of the built-in corpus. Resumable: run the same command again "
        "after an interruption.")
    p.add_argument("--out", required=True, help="directory for the exported generator")
    p.add_argument("--work", help="directory for the tokenizer and the resumable checkpoint")
    recipe = "(default: the shipped generator's, train.PretrainConfig)"
    for flag, kind in (("--steps", int), ("--batch-size", int), ("--seq-len", int),
                       ("--lr", float), ("--warmup", int), ("--seed", int)):
        p.add_argument(flag, type=kind, help=recipe)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction,
                   help="bf16 matrix products where the device has them (a GPU, or a CPU with "
                   "AVX512-BF16 or AMX; ~1.7x faster steps there), fp32 elsewhere " + recipe)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser(
        "index", help="index a corpus (built-in or your own) for retrieval",
        description="Encode every passage with the preset's document encoder BERT_d and store "
        "the vectors in a FAISS index for maximum inner product search (or build a BM25 "
        "index). Corpus formats: JSONL lines {\"id\", \"title\", \"text\"}, plain text "
        "(paragraphs split on blank lines), SQuAD-format JSON (its contexts), or `builtin`.")
    p.add_argument("--corpus", required=True, help="FILE (.jsonl, .txt, SQuAD .json) or builtin")
    p.add_argument("--out", required=True, help="directory to write the index into")
    p.add_argument("--retriever", choices=("dense", "bm25", "hybrid"), default="dense",
                   help="hybrid: a dense and a BM25 index, rankings fused by reciprocal rank "
                   "fusion at search time")
    p.add_argument("--index-type", choices=("flat", "hnsw", "ivfpq"), default="flat",
                   help="flat: exact; hnsw: fast approximate graph; ivfpq: compressed")
    p.add_argument("--preset", default="tiny", help="tiny (offline) or paper")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser(
        "search", help="retrieve the top passages for questions from an index",
        description="Print the top-k passages and their scores for a question, or with "
        "--questions FILE (JSONL {\"question\", \"answers\"} or SQuAD JSON) and --json, one "
        "JSON object per line: question, gold answers, passages (id, title, text, score).")
    p.add_argument("--index", required=True, help="a directory written by `ragbook index`")
    p.add_argument("question", nargs="*", help="a question (quote it)")
    p.add_argument("--questions", help="a file of questions (JSONL or SQuAD JSON)")
    p.add_argument("-k", type=int, default=5, help="passages per question (default 5)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=64, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_search)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "training_prior" in args:  # reproduce and ask: can one model serve both priors?
        from .reproduce import ReproduceConfig, check_priors

        try:
            check_priors(ReproduceConfig(training_prior=args.training_prior,
                                         retriever=args.retriever))
        except ValueError as e:
            parser.error(str(e))
    try:
        return args.func(args)
    except data.DataError as e:
        print(f"ragbook: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
