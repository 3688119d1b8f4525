"""`ragbook reproduce`: the whole pipeline in the tiny preset, the paper's findings at course scale.

Data → retriever → index → generator → closed-book and both RAG models → every experiment of
``evaluate``: Table 1 on reading QA (span answers, as NQ's are) with the paper's dense prior,
beside reading the top-1 passage alone, retrieve-and-extract and the hybrid prior as an
ablation; Table 2; Figure 3; the index hot-swap. Each task is decoded as the paper's Appendix
A says (``evaluate.DECODING``: greedy for QA, four beams for question generation), the
closed-book baseline exactly as the RAG models it is compared with, and fact verification
classified by the likelier label. Every trained model is a cached artifact, so a second run
only evaluates. The run directory ``runs/<timestamp>/`` (``runs/latest`` points at the newest)
holds ``results.md`` (the paper's number beside ours where it has one), ``results.json`` (with
the decoding settings of each task), the figures as PNG and the predictions as JSONL.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import evaluate as ev
from .artifacts import atomic_write_bytes
from .config import RETRIEVERS, get_preset
from .data import LABELS, load_corpus, load_task
from .generator import SHIPPED

# Lewis et al. (2020), Tables 1 and 2 (NQ exact match; Jeopardy B-1, plain BLEU-1 like ours;
# FEVER-2 label accuracy: the built-in verification task has two labels, as FEVER-2 has).
PAPER = {"closed_book": "34.5 (T5-11B)", "rag_sequence": "44.5", "rag_token": "44.1",
         "extract": "41.5 (DPR)",
         "qgen_bart": "15.1", "qgen_rag": "17.3", "verify_bart": "81.1", "verify_rag": "89.5"}
READING = "reading-qa"  # Table 1's task: span answers read from a passage, as NQ's are
# The results.json of a cold run of the defaults on the shipped generator (README, "Results"),
# shipped beside it: notebook 07 reads it where training the reading-QA models would not fit
RECORDED = SHIPPED / "reproduce.json"


@dataclass
class ReproduceConfig:
    """Sizes of one run; from an empty cache the defaults take about 13 minutes on 2 CPU cores
    with AVX512-BF16 or AMX (README, "Results")."""

    preset: str = "tiny"
    # Table 1: joint fine-tuning on reading QA, each RAG model; 100 steps scored the same within
    # noise and cost 5 more minutes (benchmarks/README.md, "ragbook reproduce")
    rag_steps: int = 40
    reading_source_length: int = 256  # "title / text // question" for a 100-word passage
    closed_book_steps: int = 300
    qgen_steps: int = 40  # question generation, RAG-Token and closed-book BART
    verify_steps: int = 200  # fact verification, RAG and closed-book BART (benchmarks/README.md)
    eval_questions: int = 400  # test questions per task (None: the whole split)
    sweep_questions: int = 100
    sweep_ks: tuple[int, ...] = (1, 2, 5, 10)
    hot_swap_facts: int = 100  # fewer swing by several points between draws (benchmarks/README.md)
    recall_questions: int | None = None  # test questions for recall@k (None: the whole split)
    # RAG's prior p_η(z|x): the paper's dense prior (§2.4) in training and at test time. The
    # ablation reads the same trained models with the product of experts dense × BM25
    # ("hybrid", pipeline.py): a new prior needs no retraining (notebook 07).
    training_prior: str = "dense"
    retriever: str = "dense"
    ablation_prior: str | None = "hybrid"
    # Fact verification reads with the prior it was trained with (None) unless set: a claim
    # "<title>: <description>" whose description is another article's (REFUTES) has BM25 match
    # that other article, the evidence *for* the description (benchmarks/README.md, "Fact
    # verification").
    verify_prior: str | None = None
    entity_steps: int = 250  # `ragbook ask` and `export`: RAG trained on entity QA
    seed: int = 0


def run(cfg: ReproduceConfig | None = None, runs_dir: str | Path = "runs",
        progress: bool = True) -> dict:
    """Run every experiment and write the run directory; returns ``results.json``'s content."""
    from .pipeline import RagModel
    from .plots import plot_k_sweep, plot_training
    from .train import trained_closed_book

    cfg = cfg or ReproduceConfig()
    check_priors(cfg)
    start = time.time()
    preset = task_preset(cfg, READING)
    out = Path(runs_dir) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    def test(task):
        return test_examples(task, cfg.eval_questions, cfg.seed)

    def rag(task, marginalization, steps):
        return rag_model(cfg, task, marginalization, steps, bm25=bm25.bm25, progress=progress)

    def closed_book(task, steps):  # the paper's BART baseline, answering as RagModel does
        task_cfg = task_preset(cfg, task)
        return ev.ClosedBook(task_cfg, *trained_closed_book(task_cfg, task, steps,
                                                             progress=progress))

    def decode(model, task, examples, marginalization="token", n_docs=None):
        d = ev.DECODING[task]
        return ev.evaluate_rag(model, examples, marginalization, n_docs=n_docs,
                               num_beams=d.num_beams, decoding=d.method, progress=progress)

    results: dict = {"config": asdict(cfg), "seconds_by_step": {},
                     "decoding": {**{t: asdict(d) for t, d in ev.DECODING.items()},
                                  "verify": {"scored_labels": list(LABELS)}}}
    clock = [time.time()]

    def lap(step: str) -> None:  # where the time goes, for the README and the curious
        now = time.time()
        results["seconds_by_step"][step] = round(now - clock[0], 1)
        clock[0] = now

    qa = test(READING)
    recall_qa = test_examples(READING, cfg.recall_questions, cfg.seed)

    # recall@k (Figure 3's centre-panel metric) of the retrievers Table 6 ablates: frozen
    # MiniLM, BM25 — and below, after joint training.
    frozen = RagModel.from_preset(preset)
    bm25 = RagModel.from_preset(preset, retriever="bm25", generator=frozen.generator,
                                tokenizer=frozen.tokenizer, query_encoder=frozen.query_encoder)
    hybrid_frozen = frozen.with_bm25(bm25.bm25)  # the same BM25 index, not a second one
    recall_hits = {name: ev.retrieval_hits(model, recall_qa)
                   for name, model in (("frozen", frozen), ("bm25", bm25),
                                       ("hybrid_frozen", hybrid_frozen))}
    results["recall_questions"], results["n_docs"] = len(recall_qa), preset.n_docs
    lap("corpus encoding, index, retrieval baselines")

    # Table 1: closed-book BART, RAG-Sequence and RAG-Token on reading QA; beside them the same
    # RAG-Token reading only its top-1 passage (k = 1), retrieve-and-extract over the same
    # passages, and RAG-Token's generator given the gold passage.
    table, models, predictions = {}, {}, {}
    table["closed_book"], predictions["closed_book"] = decode(
        closed_book(READING, cfg.closed_book_steps), READING, qa)
    lap("closed-book BART")
    for name, marginalization in (("rag_sequence", "sequence"), ("rag_token", "token")):
        models[name] = rag(READING, marginalization, cfg.rag_steps)
        table[name], predictions[name] = decode(models[name], READING, qa, marginalization)
        lap(f"{name}: training and evaluation")
    trained = models["rag_token"]
    for name, model, marginalization in (("top1_only", trained, "token"),
                                         ("top1_only_sequence", models["rag_sequence"],
                                          "sequence")):
        table[name], predictions[name] = decode(model, READING, qa, marginalization, n_docs=1)
    predictions["extract"] = ev.extracted_answers(trained, qa, preset.n_docs)
    table["extract"] = ev.score_predictions(predictions["extract"])
    if cfg.ablation_prior and cfg.ablation_prior != cfg.retriever:
        ablation = trained.with_bm25(bm25.bm25 if cfg.ablation_prior == "hybrid" else None)
        table["rag_token_ablation"], predictions["rag_token_ablation"] = decode(
            ablation, READING, qa)
    predictions["reader_gold"] = ev.gold_passage_answers(trained, qa)
    table["reader_gold"] = ev.score_predictions(predictions["reader_gold"])
    results["reading_qa"] = table
    hits: dict = {metric: {name: [score(p) for p in preds]
                           for name, preds in predictions.items()}
                  for metric, score in (("em", lambda p: p.em),
                                        ("f1", lambda p: ev.f1_score(p.prediction, p.answers)))}
    if trained.index is not None:  # a trained BERT_q: alone, and beside BM25
        for name, sparse in (("finetuned", None), ("hybrid", bm25.bm25)):
            recall_hits[name] = ev.retrieval_hits(trained.with_bm25(sparse), recall_qa)
    results["retrieval"] = {name: _recall({k: float(h.mean()) for k, h in by_k.items()})
                            for name, by_k in recall_hits.items()}
    for k in (1, 5):
        hits[f"recall@{k}"] = {name: by_k[k] for name, by_k in recall_hits.items()}
    lap("top-1 reading, the prior's ablation, the gold-passage reader, recall")

    # Table 2: question generation (BLEU-1) and fact verification (label accuracy).
    qgen = test("qgen")
    references = [e.answers for e in qgen]
    results["qgen"] = {
        name: {"bleu1": ev.bleu1([p.prediction for p in decode(model, "qgen", qgen)[1]],
                                 references)}
        for name, model in (("bart", closed_book("qgen", cfg.qgen_steps)),
                            ("rag_token", rag("qgen", "token", cfg.qgen_steps)))}
    lap("question generation")
    claims = test("verify")
    verifier = rag_model(cfg, "verify", "token", cfg.verify_steps, bm25=bm25.bm25,
                         progress=progress,
                         prior=cfg.verify_prior or cfg.training_prior)
    results["verify"], hits["verify"] = {}, {}
    for name, model in (("bart", closed_book("verify", cfg.verify_steps)), ("rag", verifier)):
        results["verify"][name], labelled = ev.evaluate_labels(model, claims, LABELS)
        hits["verify"][name] = [p.em for p in labelled]
        results["verify"][name]["predicted"] = dict(Counter(p.prediction for p in labelled))
    lap("fact verification")

    # Figure 3: F1 and recall@k as k grows, both marginalizations; the index hot-swap (§4.5):
    # the answer spans edited in their passages, the same questions asked.
    sweep_qa = qa[: cfg.sweep_questions]
    results["k_sweep"] = {name: ev.k_sweep(models[name], sweep_qa, cfg.sweep_ks, marginalization)
                          for name, marginalization in (("rag_token", "token"),
                                                        ("rag_sequence", "sequence"))}
    results["hot_swap"] = ev.hot_swap(trained, qa, cfg.hot_swap_facts, cfg.seed,
                                      progress=progress, task=READING,
                                      predictions=predictions["rag_token"])
    lap("k sweep and index hot-swap")
    results["seconds"] = round(time.time() - start, 1)
    results["hits"] = _as_lists(hits)

    sweeps = results["k_sweep"]
    label = {"rag_token": "F1, RAG-Token", "rag_sequence": "F1, RAG-Sequence"}
    plot_k_sweep(sweeps["rag_token"], em={label[n]: s["f1"] for n, s in sweeps.items()},
                 errors={label[n]: s["f1_se"] for n, s in sweeps.items()},
                 title="reading QA: more documents, recall and F1", ylabel="recall@k / F1"
                 ).savefig(out / "k_sweep.png", dpi=120, bbox_inches="tight")
    plot_training({n: m.history for n, m in models.items()}).savefig(
        out / "training.png", dpi=120, bbox_inches="tight")
    for name, preds in predictions.items():
        ev.save_predictions(preds, out / f"predictions_{name}.jsonl")
    atomic_write_bytes(out / "results.json", json.dumps(results, indent=2).encode())
    atomic_write_bytes(out / "results.md", results_table(results).encode())
    latest = Path(runs_dir) / "latest"
    latest.unlink(missing_ok=True)
    latest.symlink_to(out.name)
    results["run_dir"] = str(out)
    return results


def task_preset(cfg: ReproduceConfig, task: str):
    """The preset a task is trained and read with: reading QA's inputs hold a whole passage
    and its question (``cfg.reading_source_length`` tokens), the other tasks' the preset's."""
    if task == READING:
        return get_preset(cfg.preset, seed=cfg.seed,
                          max_source_length=cfg.reading_source_length)
    return get_preset(cfg.preset, seed=cfg.seed)


def check_priors(cfg: ReproduceConfig) -> None:
    """Reject a pair of priors that one trained model cannot serve, saying what would."""
    optional = ("verify_prior", "ablation_prior")
    for name in ("training_prior", "retriever", *optional):
        if getattr(cfg, name) not in (*RETRIEVERS, *([None] if name in optional else [])):
            raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; choose one of {RETRIEVERS}")
    for read in (cfg.retriever, cfg.verify_prior or cfg.training_prior,
                 cfg.ablation_prior or cfg.retriever):
        if cfg.training_prior != read and "bm25" in (cfg.training_prior, read):
            raise ValueError(f"a model trained with the {cfg.training_prior} prior cannot be "
                             f"read with the {read} prior: BM25 alone uses no query encoder, "
                             "so use bm25 for both, or dense or hybrid for each")


def rag_model(cfg: ReproduceConfig, task: str = "entity-qa", marginalization: str = "token",
              steps: int | None = None, bm25=None, progress: bool = True,
              prior: str | None = None, freeze_retriever: bool = False):
    """The RAG model ``reproduce`` uses for ``task``: jointly fine-tuned ``steps`` steps
    (default ``cfg.rag_steps`` for reading QA, ``cfg.entity_steps`` for entity QA) with
    ``cfg.training_prior`` (trained once, then cached) and read with ``prior`` (default
    ``cfg.retriever``). ``bm25``: a BM25Retriever over the corpus to share;
    ``freeze_retriever``: Table 6's ablation, BERT_q frozen in training."""
    from .retriever import BM25Retriever
    from .train import RagTrainConfig, trained_rag

    check_priors(cfg)
    preset = task_preset(cfg, task)
    steps = steps or (cfg.rag_steps if task == READING else cfg.entity_steps)
    train = RagTrainConfig(marginalization=marginalization, steps=steps,
                           n_docs=preset.n_docs, seed=cfg.seed,
                           freeze_retriever=freeze_retriever)
    model = trained_rag(preset, task, train, retriever=cfg.training_prior, progress=progress)
    prior = prior or cfg.retriever
    if prior == cfg.training_prior:
        return model
    if prior == "hybrid" and bm25 is None:
        bm25 = BM25Retriever(load_corpus())
    return model.with_bm25(bm25 if prior == "hybrid" else None)


def test_examples(task: str, n: int | None, seed: int = 0) -> list:
    """``n`` test examples of ``task``, a seeded sample (the split lists its articles in
    alphabetical order, so its first n would not be representative); None: all of them."""
    import random

    examples = load_task(task, "test", seed)
    return examples if n is None or n >= len(examples) else \
        random.Random(f"{task}/{seed}").sample(examples, n)


def _as_lists(hits: dict) -> dict:
    """Per-question scores as JSON lists: 0/1 hits as integers, F1 to four decimals."""
    return {key: _as_lists(value) if isinstance(value, dict) else
            [int(x) if float(x).is_integer() else round(float(x), 4) for x in value]
            for key, value in hits.items()}


def _recall(r: dict[int, float]) -> dict[str, float]:
    return {f"recall@{k}": v for k, v in r.items()}


def results_table(r: dict) -> str:
    """The run's results as Markdown, the paper's figure beside ours."""
    t, ret, config = r["reading_qa"], r["retrieval"], r["config"]
    prior, trained_with = config["retriever"], config["training_prior"]
    verify_prior = config["verify_prior"] or trained_with
    model = (f"{prior} prior" if trained_with == prior
             else f"trained with the {trained_with} prior, read with the {prior} one")

    def pct(x: float) -> str:  # the paper reports percentages
        return f"{100 * x:.1f}"

    def scores(name: str) -> str:
        return f"{pct(t[name]['f1'])} / {pct(t[name]['em'])}"

    def row(*cells: str) -> str:  # a Markdown row; an empty cell is "| |"
        return "|" + "|".join(f" {c} " if c else " " for c in cells) + "|"

    rows = [
        "| experiment | model | ours | paper |", "|---|---|---|---|",
        f"| reading QA, F1 / EM (Table 1; the paper: NQ EM) | closed-book BART | "
        f"{scores('closed_book')} | {PAPER['closed_book']} |",
        f"| | RAG-Sequence ({model}) | {scores('rag_sequence')} | {PAPER['rag_sequence']} |",
        f"| | RAG-Token ({model}) | {scores('rag_token')} | {PAPER['rag_token']} |",
        f"| | RAG-Token reading only its top-1 passage (k = 1) | {scores('top1_only')} | |",
    ]
    if "top1_only_sequence" in t:
        rows.append(f"| | RAG-Sequence reading only its top-1 passage (k = 1) | "
                    f"{scores('top1_only_sequence')} | |")
    if "rag_token_ablation" in t:
        rows.append(f"| | RAG-Token read with the {config['ablation_prior']} prior (ablation, "
                    f"no retraining) | {scores('rag_token_ablation')} | |")
    rows += [
        f"| | retrieve-and-extract: RAG-Token's top {r['n_docs']} passages, the span between the "
        f"question's words (a rule, no generator) | {scores('extract')} | {PAPER['extract']} |",
        f"| | RAG-Token's generator given the gold passage (no retrieval: the reader's "
        f"bound) | {scores('reader_gold')} | |",
        f"| question generation, BLEU-1 (Table 2) | BART | {pct(r['qgen']['bart']['bleu1'])} "
        f"| {PAPER['qgen_bart']} |",
        f"| | RAG-Token | {pct(r['qgen']['rag_token']['bleu1'])} | {PAPER['qgen_rag']} |",
    ]
    for name, label, paper in (("bart", "BART", PAPER["verify_bart"]),
                               ("rag", f"RAG ({verify_prior} prior)", PAPER["verify_rag"])):
        v = r["verify"][name]
        said = ", ".join(f"{pct(n / v['n'])}% {y}" for y, n in v["predicted"].items())
        auc = f"; AUC {v['auc']:.2f}" if "auc" in v else ""
        rows.append(row("fact verification, accuracy (Table 2)" if name == "bart" else "",
                        label, f"{pct(v['accuracy'])} (said: {said}{auc})", paper))
    tuned = f"BERT_q trained jointly with the {trained_with} prior"
    questions = f", {r['recall_questions']} test questions"
    for name, label in (("bm25", "BM25"), ("frozen", "dense, frozen BERT_q"),
                        ("finetuned", f"dense, {tuned}"),
                        ("hybrid_frozen", "hybrid (dense × BM25), frozen BERT_q"),
                        ("hybrid", f"hybrid (dense × BM25), {tuned}")):
        if name in ret:
            rows.append(f"| retrieval recall@1/5/20 (Figure 3, centre{questions}) | {label} | "
                        + " / ".join(pct(ret[name][f"recall@{k}"]) for k in (1, 5, 20))
                        + " | |")
    hs = r["hot_swap"]
    rows.append(f"| index hot-swap ({hs['facts']} edited spans) | RAG-Token follows the new "
                f"index / returns with the old | {pct(hs['followed'])} / {pct(hs['kept'])} | |")
    for name, label in (("rag_token", "RAG-Token"), ("rag_sequence", "RAG-Sequence")):
        sweep = r["k_sweep"][name]
        rows.append(row("F1 by k at test time (Figure 3)" if name == "rag_token" else "", label,
                        ", ".join(f"k={k}: {pct(f)} ± {pct(se)}" for k, f, se in
                                  zip(sweep["k"], sweep["f1"], sweep["f1_se"])), ""))
    paper_note = ("\nAll figures in percent. The paper's are for NQ (EM), Jeopardy (B-1) "
                  "and FEVER-2 at full scale; ours are the tiny preset on the built-in tasks' "
                  "test articles.\n")
    shown = "\n## What this run shows\n\n" + "".join(f"- {line}\n" for line in findings(r))
    return ("\n".join(rows) + f"\n\nTotal time: {r['seconds']:.0f} s.\n" + paper_note
            + decoding_note(r["decoding"]) + shown)


def decoding_note(decoding: dict) -> str:
    """How the run decoded, in one line."""

    def beams(task: str) -> str:
        d = decoding[task]
        return ("greedy" if d["num_beams"] == 1 else f"{d['num_beams']} beams") + \
            f", RAG-Sequence {d['method'].capitalize()}"

    return (f"\nDecoding (the paper's Appendix A): reading QA {beams(READING)}; question "
            f"generation {beams('qgen')}; closed-book BART decoded as the RAG models beside it. "
            f"Fact verification decodes nothing: the likelier of "
            f"{' / '.join(decoding['verify']['scored_labels'])} under each model.\n")


def findings(r: dict) -> list[str]:
    """What a run shows, finding by finding, beside the paper's (Markdown, one line each).

    ``r`` is shaped like ``results.json``: Table 1 on reading QA (``reading_qa``, scored by F1,
    as ``reproduce`` runs it) or on entity QA (``entity_qa``, by EM, as notebook 07 runs it).
    Its ``hits`` hold the per-question scores that make each comparison paired. A difference
    counts only beyond twice its paired standard error (:func:`ragbook.evaluate.compare`):
    ✔ the paper's finding shows, ✘ the run shows the opposite, ≈ inside the noise, whichever
    way it points. Lines whose results are absent (a run without the frozen-retriever
    ablation, say) are left out.
    """
    hits = r["hits"]
    reading = "reading_qa" in r
    table, metric = (r["reading_qa"], "f1") if reading else (r["entity_qa"], "em")
    scores, name_of = hits[metric], metric.upper()
    n = len(scores["rag_token"])

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    def diff(a: str, b: str, by: dict = scores) -> str:
        d, se = ev.paired_difference(by[a], by[b])
        return f"{100 * d:+.1f} ± {100 * se:.1f}"

    def mark(a: str, b: str, by: dict = scores) -> str:  # the paper expects a > b
        return {">": "✔", "<": "✘", "≈": "≈"}[ev.compare(by[a], by[b])]

    def score(model: str) -> str:
        return pct(table[model][metric])

    best = max(("rag_sequence", "rag_token"), key=lambda m: table[m][metric])
    name = {"rag_sequence": "RAG-Sequence", "rag_token": "RAG-Token"}
    out = [
        f"{mark(best, 'closed_book')} **Retrieval vs parametric memory** (Table 1): {name[best]} "
        f"{name_of} {score(best)} against closed-book BART's {score('closed_book')} "
        f"({diff(best, 'closed_book')}, paired, {n} questions about articles no model trained "
        f"on); the paper: EM {PAPER['rag_sequence']} / {PAPER['rag_token']} against "
        f"{PAPER['closed_book']}."]
    if reading:
        for model, top1, label in (("rag_sequence", "top1_only_sequence", "RAG-Sequence"),
                                   ("rag_token", "top1_only", "RAG-Token")):
            if top1 in scores:
                out.append(
                    f"{mark(model, top1)} **More than the top passage**: {label} over "
                    f"k = {r['n_docs']} passages F1 {score(model)} against the same model "
                    f"reading only its top-1 passage, {score(top1)} ({diff(model, top1)}); the "
                    "paper (Figure 3, left): NQ EM rises from k = 1 to k = 10 for both models.")
        if "rag_token_ablation" in scores:
            said = {">": "above", "<": "below", "≈": "level with"}[
                ev.compare(scores["rag_token_ablation"], scores["rag_token"])]
            out.append(
                f"**The prior, ablated**: the same RAG-Token read with the "
                f"{r['config']['ablation_prior']} prior, no retraining, F1 "
                f"{score('rag_token_ablation')}: {said} the dense prior's "
                f"({diff('rag_token_ablation', 'rag_token')}).")
        out.append(
            f"{mark('rag_token', 'extract')} **Generating vs extracting** (Table 1): RAG-Token "
            f"F1 {score('rag_token')} against retrieve-and-extract's {score('extract')} over the "
            f"same passages ({diff('rag_token', 'extract')}); the paper: RAG-Sequence "
            f"{PAPER['rag_sequence']} against an extractive reader's {PAPER['extract']} EM "
            "on NQ.")
        recall5 = hits.get("recall@5", {}).get("finetuned")
        out.append(f"**The reader's bound**: RAG-Token's generator given each question's gold "
                   f"passage scores F1 {score('reader_gold')}"
                   + (f"; RAG-Token reaches {score('rag_token')} with retrieval (recall@5 "
                      f"{pct(float(np.mean(recall5)))} with its BERT_q)."
                      if recall5 is not None else "."))
    else:  # entity QA: every answer is a title, so copying the top-1 one is a strong system
        top1 = "top1_title_finetuned" if "top1_title_finetuned" in scores else "top1_title"
        out.append(
            f"{mark(best, top1)} **The generator against copying the top-1 title** (no "
            f"generator): {pct(r['baselines']['top1_title_em'])} with the untrained dense "
            f"retriever ({name[best]} {diff(best, 'top1_title')})"
            + (f"; {pct(r['baselines']['top1_title_em_finetuned'])} with RAG-Token's BERT_q and "
               f"the test-time prior ({diff(best, 'top1_title_finetuned')})"
               if "top1_title_finetuned" in scores else "")
            + ". Every answer here is a title, so a retriever alone is a strong system.")
    out.append(
        f"{'✔' if ev.compare(scores['rag_sequence'], scores['rag_token']) == '≈' else '≈'} "
        f"**RAG-Sequence vs RAG-Token**: {score('rag_sequence')} vs {score('rag_token')} "
        f"({diff('rag_sequence', 'rag_token')}); the paper finds them within a point on NQ "
        f"({PAPER['rag_sequence']} vs {PAPER['rag_token']}).")
    if "rag_token_frozen_retriever" in scores:
        out.append(
            f"{mark('rag_token', 'rag_token_frozen_retriever')} **Joint training vs a frozen "
            f"BERT_q** (Table 6), {name_of}: {score('rag_token')} against "
            f"{score('rag_token_frozen_retriever')} "
            f"({diff('rag_token', 'rag_token_frozen_retriever')}); the paper: learned retrieval "
            "better on every task (NQ dev: RAG-Token 43.5 vs 37.8 frozen).")
    rec = {k: hits.get(f"recall@{k}", {}) for k in (1, 5)}

    def recalls(a: str, b: str) -> str:  # "R@1 50.9 vs 38.8 (+12.1 ± 1.8), R@5 …"
        return ", ".join(f"R@{k} {pct(float(np.mean(rec[k][a])))} vs "
                         f"{pct(float(np.mean(rec[k][b])))} ({diff(a, b, rec[k])})" for k in rec)

    if all({"bm25", "frozen"} <= rec[k].keys() for k in rec):
        ahead = {">": "BM25 ahead", "<": "dense ahead", "≈": "within noise"}
        out.append(f"**BM25 vs dense retrieval**, recall@k (Figure 3's centre-panel metric): "
                   f"{recalls('bm25', 'frozen')} — at "
                   f"rank 1 {ahead[ev.compare(rec[1]['bm25'], rec[1]['frozen'])]}, at rank 5 "
                   f"{ahead[ev.compare(rec[5]['bm25'], rec[5]['frozen'])]}; the paper finds "
                   "dense retrieval better on NQ and BM25 best on entity-centric FEVER.")
    if all({"finetuned", "frozen"} <= rec[k].keys() for k in rec):
        out.append(f"{mark('finetuned', 'frozen', rec[1])} **Joint training and the query "
                   f"encoder**, dense recall after joint training vs the frozen BERT_q: "
                   f"{recalls('finetuned', 'frozen')} on {len(rec[1]['frozen'])} questions, with "
                   "no retrieval label — the generator's signal alone.")
    sweeps = r.get("k_sweep")
    if sweeps:
        sweeps = {"rag_token": sweeps} if "k" in sweeps else sweeps  # notebook 07: one curve
        for model, sweep in sweeps.items():
            best_k = sweep["k"][max(range(len(sweep[metric])), key=sweep[metric].__getitem__)]
            out.append(f"**Figure 3**, {name[model]}: recall rises from "
                       f"{pct(sweep['recall'][0])} (k = {sweep['k'][0]}) to "
                       f"{pct(sweep['recall'][-1])} (k = {sweep['k'][-1]}); {name_of} is highest "
                       f"at k = {best_k} ({pct(max(sweep[metric]))}; the paper: RAG-Token peaks "
                       "at k = 10, RAG-Sequence rises with k).")
    hs = r.get("hot_swap")
    if hs:
        edited = "span" if reading else "name"
        out.append(f"{'✔' if hs['followed'] > 0.5 else '✘'} **Index hot-swap** (§4.5): "
                   f"{pct(hs['followed'])}% of {hs['facts']} edited facts answered with the "
                   f"swapped index's {edited}, {pct(hs['kept'])}% back to the old answer with "
                   "the old index (the paper: 70% / 68% right with the matching index, 4–12% "
                   "with the mismatched one).")
    q = r.get("qgen")
    if q:
        gen, bart = q["rag_token"]["bleu1"], q["bart"]["bleu1"]
        out.append(f"{'✔' if gen > bart else '✘'} **Question generation** (Table 2): "
                   f"RAG-Token BLEU-1 {pct(gen)} vs BART {pct(bart)} (corpus BLEU, no "
                   f"per-question error; the paper, B-1: {PAPER['qgen_rag']} vs "
                   f"{PAPER['qgen_bart']}).")
    v = hits.get("verify")
    if v:
        acc = r["verify"]
        out.append(f"{mark('rag', 'bart', v)} **Fact verification** (Table 2): RAG "
                   f"{pct(acc['rag']['accuracy'])} vs BART {pct(acc['bart']['accuracy'])} label "
                   f"accuracy ({diff('rag', 'bart', v)}, {len(v['rag'])} claims, chance 50 on "
                   f"balanced labels; the paper: {PAPER['verify_rag']} vs "
                   f"{PAPER['verify_bart']}).")
        if all("auc" in acc[m] for m in ("rag", "bart")):  # threshold-free: any signal at all?
            out[-1] += (f" ROC AUC of the label margin: RAG {acc['rag']['auc']:.2f}, BART "
                        f"{acc['bart']['auc']:.2f} (0.5: no signal, where saying one label "
                        "for every claim is as good as any threshold).")
    return out
