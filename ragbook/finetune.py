"""RAG on your own corpus and questions: fine-tune, save, load, answer.

The paper offers RAG as "a general-purpose fine-tuning recipe" (§1): given any index of
passages and any question–answer pairs (x, y), minimise −Σ_j log p(y_j|x_j) under Eq. 1 or
Eq. 2, updating the query encoder BERT_q and the generator while the document encoder and the
index stay frozen (§2.4). This module applies :func:`ragbook.train.train_rag` — the loop
``reproduce`` uses — to an index written by ``ragbook index`` and to questions in any format
:func:`ragbook.data.load_examples` reads, and writes a *model directory*:

- ``generator/`` and ``query_encoder/`` (``save_pretrained``; BERT_q keeps the name of the
  encoder it was fine-tuned from, so the index still accepts it);
- ``ragbook_model.json``: the format, settings, the index it belongs to (its corpus
  fingerprint) and the measured dev results;
- ``README.md``: a model card with those results.

The directory is written all or nothing (``artifacts.atomic_directory``), and the run is
resumable: its checkpoint lives in ``<out>-work/`` until the model is written.
:func:`load_model` reads a model directory back and refuses an index other than the one it was
trained with, unless one is given on purpose — the paper's index hot-swap (§4.5).

:func:`cloze_questions` derives a question set whose answers are spans of the passages (a
sentence with a date, number or name blanked out), the offline stand-in for a user's own
extractive questions; ``benchmarks/finetune_cloze.py`` measures RAG against closed-book BART on
it.
"""

from __future__ import annotations

import hashlib
import json
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from . import __version__
from .artifacts import atomic_directory, atomic_write_bytes
from .config import Preset, get_preset, quiet_loading
from .data import (
    BLANK,
    DataError,
    Example,
    Passage,
    article_split,
    load_corpus,
    load_examples,
    salient_spans,
)
from .evaluate import ClosedBook, evaluate_rag, retrieval_recall, save_predictions
from .pipeline import Prediction, RagModel, normalize_answer
from .train import RagTrainConfig, train_rag

MODEL_FORMAT = 1
SETTINGS_FILE = "ragbook_model.json"
RETRAIN = "fine-tune it again with `ragbook finetune`"


@dataclass
class FinetuneConfig:
    """``ragbook finetune``'s settings; the joint step is ``train.RagTrainConfig``'s.

    ``max_source_length`` is longer than the tiny preset's 48 tokens: a user's answer is a
    span of a passage, and the generator can only copy what fits in "title / text // x".
    """

    marginalization: str = "token"  # "token" (Eq. 2) or "sequence" (Eq. 1)
    n_docs: int = 5
    steps: int = 250
    batch_size: int = 16
    lr: float = 3e-4
    seed: int = 0
    max_source_length: int = 256  # the tiny BART's 256 positions: a 100-word passage and x
    eval_every: int = 50
    checkpoint_every: int = 50
    closed_book: bool = False  # the paper's BART baseline: the generator alone, no retrieval
    generator: str | None = None  # None: the index's preset's; "smol" or a directory

    def train_config(self) -> RagTrainConfig:
        return RagTrainConfig(marginalization=self.marginalization, n_docs=self.n_docs,
                              steps=self.steps, batch_size=self.batch_size, lr=self.lr,
                              seed=self.seed, checkpoint_every=self.checkpoint_every)


def _say(message: str) -> None:
    from tqdm.auto import tqdm

    tqdm.write(message, file=sys.stderr)


# --------------------------------------------------------------------------- questions


def load_questions(source: str | Path, split: str = "train") -> list[Example]:
    """Questions from a file or saved dataset (:func:`ragbook.data.load_examples`), or
    ``NAME[:SPLIT]`` of a Hugging Face hub dataset (where the hub is reachable)."""
    path = Path(source)
    if path.exists() or path.suffix in (".json", ".jsonl") or str(source).startswith((".", "/")):
        return load_examples(path)
    import datasets

    name, _, chosen = str(source).partition(":")
    try:
        dataset = datasets.load_dataset(name, split=chosen or split)
    except Exception as e:  # offline, or no such dataset: the hub says which in many ways
        raise DataError(f"{source}: no such file, and no Hugging Face dataset of that name "
                        f"could be loaded ({type(e).__name__}); give a JSONL or SQuAD file, a "
                        "save_to_disk directory, or NAME[:SPLIT] with the hub in reach") from None
    return load_examples(dataset)


def shared_questions(train: Sequence[Example], dev: Sequence[Example]) -> int:
    """How many dev questions also appear (normalised) among the training questions."""
    seen = {normalize_answer(e.question) for e in train}
    return sum(normalize_answer(e.question) in seen for e in dev)


# --------------------------------------------------------------------------- the index


def _open_dense_index(directory: str | Path):
    """(DenseIndex, its vectors d(z), its preset) of a dense index made by ``ragbook index``."""
    from .index import META_FILE, DenseIndex, _index_directory, _read_meta

    directory = _index_directory(directory)
    if not (directory / META_FILE).is_file():
        raise DataError(f"{directory}: not an index directory (no {META_FILE}); build one with "
                        "`ragbook index --corpus FILE --out DIR`")
    retriever = _read_meta(directory).get("retriever", "dense")
    if retriever != "dense":
        raise DataError(f"{directory}: a {retriever} index; RAG fine-tunes a dense retriever, "
                        "so build one with `ragbook index --retriever dense`")
    index = DenseIndex.load(directory)
    try:  # flat and HNSW indexes hold the vectors themselves
        vectors = index.index.reconstruct_n(0, len(index))
    except RuntimeError:  # IVF-PQ keeps only codes: the (cached) encoding of the passages
        from .retriever import passage_embeddings

        vectors = passage_embeddings(get_preset(index.metadata.get("preset") or "tiny"),
                                     index.passages)
    return index, vectors


def index_identity(index, directory: str | Path) -> dict:
    """What names an index: its passages' fingerprint (and where it was)."""
    meta = index.metadata
    return {"fingerprint": meta["fingerprint"], "passages": meta["count"], "kind": meta["kind"],
            "encoder": meta.get("encoder"), "path": str(Path(directory).resolve())}


# --------------------------------------------------------------------------- fine-tuning


def evaluate_model(model, examples: Sequence[Example], marginalization: str = "token",
                   n_docs: int | None = None, progress: bool = False) -> dict:
    """Dev EM / F1 (SQuAD normalisation) and, for a RAG model, recall@k of its retriever."""
    scores, _ = evaluate_rag(model, examples, marginalization, n_docs, progress=progress)
    if not isinstance(model, ClosedBook):
        k = n_docs or model.preset.n_docs
        scores[f"recall@{k}"] = retrieval_recall(model, examples, (k,))[k]
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}


def _run_record(cfg: FinetuneConfig, preset: Preset, identity: dict,
                train: Sequence[Example]) -> dict:
    """Everything a resumed run must share with the run it continues."""
    questions = json.dumps([(e.question, e.answers) for e in train]).encode()
    return {"config": asdict(cfg), "preset": preset.to_dict(), "index": identity["fingerprint"],
            "train": hashlib.sha256(questions).hexdigest()}


def untrained_model(index_dir: str | Path, cfg: FinetuneConfig | None = None,
                    device: str = "cpu") -> tuple[RagModel, dict]:
    """``(model, index identity)``: the RAG model that fine-tuning starts from — the index's
    own query encoder and the preset's generator — over the dense index at ``index_dir``."""
    from .causal import load_generator
    from .retriever import Encoder

    cfg = cfg or FinetuneConfig()
    index, vectors = _open_dense_index(index_dir)
    chosen = {"generator": cfg.generator} if cfg.generator else {}
    preset = get_preset(index.metadata.get("preset") or "tiny", n_docs=cfg.n_docs,
                        seed=cfg.seed, max_source_length=cfg.max_source_length, **chosen)
    generator, tokenizer = load_generator(preset.generator, device)
    positions = generator.config.max_position_embeddings
    if cfg.max_source_length > positions:
        raise DataError(f"--max-source-length {cfg.max_source_length}: the generator has "
                        f"{positions} positions; give at most {positions}")
    query_encoder = Encoder(index.metadata.get("query_encoder") or index.encoder,
                            preset.pooling, preset.normalize, preset.max_query_length)
    index.check_encoder(query_encoder, where=f"the index at {index_dir}")
    model = RagModel(preset, query_encoder.to(device), generator, tokenizer, index, vectors)
    return model.eval(), index_identity(index, index_dir)


def finetune(index_dir: str | Path, train: Sequence[Example], out: str | Path,
             dev: Sequence[Example] | None = None, cfg: FinetuneConfig | None = None,
             device: str = "cpu", resume: bool = False, progress: bool = True,
             sources: dict | None = None) -> dict:
    """Fine-tune RAG (or, with ``cfg.closed_book``, BART alone) on ``train`` over the index at
    ``index_dir`` and write the model directory ``out``; returns its settings record.

    Every ``cfg.eval_every`` steps and at the end the model answers ``dev`` (greedy, as the
    paper decodes open-domain QA) and its EM / F1 are reported. ``resume`` continues the run
    whose checkpoint is in ``<out>-work/``; without it, such a checkpoint is refused.
    """
    from .causal import names_causal_lm
    from .generator import finetune_closed_book

    cfg = cfg or FinetuneConfig()
    out = Path(out)
    work = out.parent / f"{out.name}-work"
    checkpoint = work / "checkpoint.pt"
    if cfg.closed_book and cfg.generator and names_causal_lm(cfg.generator):
        raise DataError("--closed-book fine-tunes a BART generator alone; drop --generator, "
                        "or fine-tune the LM with retrieval (without --closed-book)")
    model, identity = untrained_model(index_dir, cfg, device)
    preset, generator, tokenizer = model.preset, model.generator, model.tokenizer
    record = _run_record(cfg, preset, identity, train)
    if checkpoint.exists() and not resume:
        raise DataError(f"{work} holds an unfinished run; continue it with --resume, or delete "
                        "that directory to start afresh")
    if resume and not checkpoint.exists():
        raise DataError(f"nothing to resume: no checkpoint in {work}; run without --resume")
    if resume and json.loads((work / "run.json").read_text()) != record:
        raise DataError(f"{work} holds a run with other settings, index or questions; resume "
                        "with the same ones, or delete that directory to start afresh")
    dev = list(dev or [])
    t0 = time.perf_counter()
    if cfg.closed_book:
        history = finetune_closed_book(generator, tokenizer, list(train), cfg.steps,
                                       cfg.batch_size, cfg.lr, cfg.max_source_length,
                                       preset.max_target_length, cfg.seed, progress)
        model = ClosedBook(preset, generator, tokenizer)
        state = {"history": list(enumerate(history, 1)), "dev": []}
    else:
        work.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(work / "run.json", json.dumps(record).encode())

        def after_step(state: dict) -> None:
            step = state["step"]
            if dev and step % cfg.eval_every == 0 and step < cfg.steps:
                scores = evaluate_model(model, dev, cfg.marginalization)
                state.setdefault("dev", []).append((step, scores["em"], scores["f1"]))
                _say(f"step {step}: dev EM {scores['em']:.3f}  F1 {scores['f1']:.3f}")

        state = train_rag(model, list(train), cfg.train_config(), checkpoint, progress,
                          after_step)
    seconds = round(time.perf_counter() - t0, 1)
    results = evaluate_model(model, dev, cfg.marginalization) if dev else None
    if results:
        _say(f"step {cfg.steps}: dev EM {results['em']:.3f}  F1 {results['f1']:.3f}")
    settings = {
        "format": MODEL_FORMAT, "ragbook": __version__,
        "kind": "closed-book" if cfg.closed_book else "rag", "config": asdict(cfg),
        "preset": preset.to_dict(), "device": str(device), "index": identity,
        "train": {**(sources or {}).get("train", {}), "questions": len(train)},
        "dev": {**(sources or {}).get("dev", {}), "questions": len(dev),
                "shared_with_train": shared_questions(train, dev), "results": results},
        "history": state["history"], "dev_history": state.get("dev", []),
        "seconds": seconds,
    }
    with atomic_directory(out) as tmp, quiet_loading():
        generator.save_pretrained(tmp / "generator")
        tokenizer.save_pretrained(tmp / "generator")
        if not cfg.closed_book:
            model.query_encoder.save_pretrained(tmp / "query_encoder")
        (tmp / SETTINGS_FILE).write_text(json.dumps(settings, indent=2, ensure_ascii=False))
        (tmp / "README.md").write_text(model_card(settings))
    if work.exists():
        import shutil

        shutil.rmtree(work)  # the model is written: the checkpoint's optimizer state can go
    return settings


def model_card(settings: dict) -> str:
    """The model directory's README.md: what it is, what it was trained on, how well it did."""
    cfg, index, dev = settings["config"], settings["index"], settings["dev"]
    rag, n = settings["kind"] == "rag", settings["train"]["questions"]
    name = (f"RAG-{cfg['marginalization'].capitalize()}" if rag else "closed-book BART")
    lines = [f"# {name}, fine-tuned with ragbook {settings['ragbook']}", "",
             (f"Retrieval-augmented generation (Lewis et al. 2020): the query encoder and the "
              f"generator fine-tuned jointly for {cfg['steps']} steps on {n:,} questions, "
              f"marginalizing over the top {cfg['n_docs']} passages "
              f"of its index." if rag else
              f"The paper's BART baseline: the generator alone fine-tuned for {cfg['steps']} "
              f"steps on {n:,} questions, answering from its "
              "parameters, with no retrieval."), "",
             "| setting | value |", "|---|---|",
             f"| index | {index['passages']:,} passages, fingerprint `{index['fingerprint'][:16]}`"
             f", {index['kind']}, encoder {index['encoder']} |",
             f"| training questions | {n:,} "
             f"{settings['train'].get('source', '')} |",
             f"| steps × batch | {cfg['steps']} × {cfg['batch_size']}, lr {cfg['lr']} |",
             f"| generator input | {cfg['max_source_length']} tokens |",
             f"| seed, device | {cfg['seed']}, {settings['device']} |",
             f"| training time | {settings['seconds']:.0f} s |", ""]
    if dev["results"]:
        r = dev["results"]
        recall = "".join(f", {k} {v:.3f}" for k, v in r.items() if k.startswith("recall"))
        lines += ["## Measured on the dev questions", "",
                  f"{dev['questions']:,} questions {dev.get('source', '')}: Exact Match "
                  f"{r['em']:.3f}, F1 {r['f1']:.3f}{recall} (SQuAD normalisation, greedy "
                  "decoding)." + (f" {dev['shared_with_train']} of them are also training "
                                  "questions." if dev["shared_with_train"] else ""), ""]
    else:
        lines += ["No dev questions were given: this model is unmeasured.", ""]
    lines += ["## Use", "", "```", 'ragbook ask --model THIS_DIR "your question"',
              "ragbook answer --model THIS_DIR --questions FILE --out predictions.jsonl",
              "ragbook eval predictions.jsonl", "```", "",
              ("The model answers from the index whose fingerprint is above; `--index DIR` "
               "swaps in another index of the same encoder on purpose, without retraining."
               if rag else "It reads no index: what it knows is in its parameters."), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- using a model


def read_settings(model_dir: str | Path) -> dict:
    """A model directory's settings, refused if it is not one or comes from another format."""
    path = Path(model_dir) / SETTINGS_FILE
    if not Path(model_dir).is_dir():
        raise DataError(f"{model_dir}: no such model directory; make one with `ragbook finetune`")
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"{model_dir}: not a ragbook model directory (no readable "
                        f"{SETTINGS_FILE}); make one with `ragbook finetune`") from None
    if not isinstance(settings, dict) or settings.get("format") != MODEL_FORMAT:
        found = settings.get("format") if isinstance(settings, dict) else None
        raise DataError(f"{model_dir}: model format {found!r} (ragbook "
                        f"{settings.get('ragbook', '?') if isinstance(settings, dict) else '?'})"
                        f", this ragbook {__version__} reads format {MODEL_FORMAT}; {RETRAIN}")
    return settings


def load_model(model_dir: str | Path, index_dir: str | Path | None = None,
               device: str = "cpu") -> tuple[RagModel, dict, str | None]:
    """``(model, settings, note)`` for a directory :func:`finetune` wrote.

    The model answers from the index it was trained with (its recorded path), refused if that
    index now holds other passages. ``index_dir`` swaps in another index on purpose: accepted
    if its vectors come from the same encoder, and ``note`` says that the index was swapped.
    """
    from .causal import load_generator
    from .retriever import Encoder

    model_dir = Path(model_dir)
    settings = read_settings(model_dir)
    preset = Preset(**settings["preset"])
    generator, tokenizer = load_generator(str(model_dir / "generator"), device)
    if settings["kind"] == "closed-book":
        return ClosedBook(preset, generator, tokenizer).eval(), settings, None
    trained = settings["index"]
    given = index_dir is not None
    index_dir = Path(index_dir if given else trained["path"])
    if not given and not index_dir.is_dir():
        raise DataError(f"the index this model was trained with, {index_dir}, is gone; give "
                        "--index DIR (the same passages, or others on purpose: a hot-swap)")
    index, vectors = _open_dense_index(index_dir)
    note = None
    if index.metadata["fingerprint"] != trained["fingerprint"]:
        if not given:
            raise DataError(
                f"{index_dir} now holds other passages (fingerprint "
                f"{index.metadata['fingerprint'][:16]}, {len(index):,} passages) than the index "
                f"this model was trained with ({trained['fingerprint'][:16]}, "
                f"{trained['passages']:,}); rebuild that index, or pass --index {index_dir} to "
                "use this one on purpose (a hot-swap)")
        note = (f"hot-swap: answering from {index_dir} ({len(index):,} passages, fingerprint "
                f"{index.metadata['fingerprint'][:16]}) instead of the index the model was "
                f"trained with ({trained['passages']:,} passages, "
                f"{trained['fingerprint'][:16]}); no retraining, as in the paper's §4.5")
    query_encoder = Encoder(str(model_dir / "query_encoder"), preset.pooling, preset.normalize,
                            preset.max_query_length)
    index.check_encoder(query_encoder, where=f"the index at {index_dir}")
    model = RagModel(preset, query_encoder.to(device), generator, tokenizer, index, vectors)
    return model.eval(), settings, note


def answer_questions(model: RagModel, settings: dict, examples: Sequence[Example],
                     n_docs: int | None = None, batch_size: int = 16, num_beams: int = 1,
                     progress: bool = True) -> list[Prediction]:
    """Answers with provenance for many questions, in batches, with the model's own
    marginalization (greedy by default, as the paper decodes open-domain QA)."""
    return model.answer([e.question for e in examples], [e.answers for e in examples],
                        marginalization=settings["config"]["marginalization"],
                        n_docs=n_docs or settings["config"]["n_docs"], num_beams=num_beams,
                        batch_size=batch_size, progress=progress)


def answer_file(model_dir: str | Path, questions: str | Path, out: str | Path,
                index_dir: str | Path | None = None, **kwargs) -> dict:
    """``ragbook answer``: answer every question of a file into a predictions JSONL (what
    ``ragbook eval`` scores); returns the scores against the file's gold answers."""
    from .evaluate import score_predictions

    examples = load_questions(questions)
    model, settings, note = load_model(model_dir, index_dir)
    if note:
        _say(note)
    predictions = answer_questions(model, settings, examples, **kwargs)
    save_predictions(predictions, out)
    return score_predictions(predictions)


# --------------------------------------------------------------------------- cloze questions

def cloze_question(passage: Passage, seed: int = 0, words: tuple[int, int] = (8, 40)
                   ) -> Example | None:
    """One cloze question from a passage: a sentence of ``words`` words with one date, number or
    name replaced by ``_____``; the answer is the blanked span. The kind, then the span, are
    drawn with a generator seeded by (seed, passage id): the same passage always gives the same
    question. None if the passage has no such sentence."""
    found = salient_spans(passage, words)
    if not found:
        return None
    rng = random.Random(f"cloze/{seed}/{passage.id}")
    sentence, m = rng.choice(found[rng.choice(sorted(found))])
    return Example(sentence[:m.start()] + BLANK + sentence[m.end():], [m.group()],
                   article=passage.title)


def cloze_questions(passages: Sequence[Passage], seed: int = 0) -> list[Example]:
    """At most one cloze question per passage (:func:`cloze_question`), in passage order."""
    return [e for p in passages if (e := cloze_question(p, seed)) is not None]


def cloze_task(split: str, seed: int = 0) -> list[Example]:
    """Cloze questions from the built-in passages of one split's articles
    (:func:`ragbook.data.article_split`): train, dev and test share no article."""
    assignment = article_split(seed)
    return cloze_questions([p for p in load_corpus() if assignment[p.title] == split], seed)

