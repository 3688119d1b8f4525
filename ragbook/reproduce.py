"""`ragbook reproduce`: the whole pipeline in the tiny preset, the paper's findings at course scale.

Data → retriever → index → generator → closed-book and both RAG models → every experiment of
``evaluate``, each task decoded as the paper's Appendix A says (``evaluate.DECODING``: greedy
for QA, four beams for question generation), the closed-book baseline exactly as the RAG models
it is compared with, and fact verification classified by the likelier label. Every trained
model is a cached artifact, so a second run only evaluates. The run directory
``runs/<timestamp>/`` (``runs/latest`` points at the newest) holds ``results.md`` (the paper's
number beside ours where it has one), ``results.json`` (with the decoding settings of each
task), the figures as PNG and the predictions as JSONL.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import evaluate as ev
from .artifacts import atomic_write_bytes
from .config import RETRIEVERS, get_preset
from .data import LABELS, article_topics, load_corpus, load_task

# Lewis et al. (2020), Tables 1 and 2 (NQ exact match; Jeopardy B-1, plain BLEU-1 like ours;
# FEVER-2 label accuracy: the built-in verification task has two labels, as FEVER-2 has).
PAPER = {"closed_book": "34.5 (T5-11B)", "rag_sequence": "44.5", "rag_token": "44.1",
         "qgen_bart": "15.1", "qgen_rag": "17.3", "verify_bart": "81.1", "verify_rag": "89.5"}


@dataclass
class ReproduceConfig:
    """Sizes of one run; from an empty cache the defaults take 13–15 minutes on 2 CPU cores with
    AVX512-BF16 or AMX, ~25 or more on 2 cores without (README, "Results")."""

    preset: str = "tiny"
    rag_steps: int = 250
    closed_book_steps: int = 300
    qgen_steps: int = 40  # question generation, RAG-Token and closed-book BART
    verify_steps: int = 200  # fact verification, RAG and closed-book BART (benchmarks/README.md)
    eval_questions: int = 400  # test questions per task (None: the whole split)
    sweep_questions: int = 100
    sweep_ks: tuple[int, ...] = (1, 2, 5, 10, 20, 50)
    hot_swap_facts: int = 100  # fewer swing by several points between draws (benchmarks/README.md)
    recall_questions: int | None = None  # test questions for recall@k (None: the whole split)
    # RAG's prior p_η(z|x). Joint training uses the paper's dense prior (§2.4): BERT_q learns
    # from the generator's signal alone, and its recall is compared with MiniLM's. At test
    # time the prior multiplies in BM25 ("hybrid", pipeline.py) — a new prior needs no
    # retraining (notebook 07) — which at this scale ranks better than either expert alone.
    training_prior: str = "dense"
    retriever: str = "hybrid"
    # Fact verification reads with the prior it was trained with (None) unless set: a claim
    # "<title>: <description>" whose description is another article's (REFUTES) has BM25 match
    # that other article, the evidence *for* the description (benchmarks/README.md, "Fact
    # verification").
    verify_prior: str | None = None
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
    preset = get_preset(cfg.preset, seed=cfg.seed)
    out = Path(runs_dir) / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)

    def test(task):
        return test_examples(task, cfg.eval_questions, cfg.seed)

    def rag(task, marginalization, steps):
        return rag_model(cfg, task, marginalization, steps, bm25=bm25.bm25, progress=progress)

    def closed_book(task, steps):  # the paper's BART baseline, answering as RagModel does
        return ev.ClosedBook(preset, *trained_closed_book(preset, task, steps, progress=progress))

    def decode(model, task, examples, marginalization="token"):
        d = ev.DECODING[task]
        return ev.evaluate_rag(model, examples, marginalization, num_beams=d.num_beams,
                               decoding=d.method, progress=progress)

    results: dict = {"config": asdict(cfg), "seconds_by_step": {},
                     "decoding": {**{t: asdict(d) for t, d in ev.DECODING.items()},
                                  "verify": {"scored_labels": list(LABELS)}}}
    clock = [time.time()]

    def lap(step: str) -> None:  # where the time goes, for the README and the curious
        now = time.time()
        results["seconds_by_step"][step] = round(now - clock[0], 1)
        clock[0] = now

    qa = test("entity-qa")
    recall_qa = test_examples("entity-qa", cfg.recall_questions, cfg.seed)

    # recall@k (Figure 3's centre-panel metric) of the retrievers Table 6 ablates: frozen
    # MiniLM, BM25 — and below, after joint training.
    frozen = RagModel.from_preset(preset)
    bm25 = RagModel.from_preset(preset, retriever="bm25", generator=frozen.generator,
                                tokenizer=frozen.tokenizer, query_encoder=frozen.query_encoder)
    hybrid_frozen = frozen.with_bm25(bm25.bm25)  # the same BM25 index, not a second one
    hits: dict = {"em": {}}  # per question, for the paired comparisons of `findings`
    recall_hits = {name: ev.retrieval_hits(model, recall_qa)
                   for name, model in (("frozen", frozen), ("bm25", bm25),
                                       ("hybrid_frozen", hybrid_frozen))}
    results["recall_questions"] = len(recall_qa)
    hits["em"]["top1_title"] = ev.top1_title_hits(frozen, qa)
    results["baselines"] = {"top1_title_em": float(hits["em"]["top1_title"].mean())}

    lap("corpus encoding, index, retrieval baselines")

    # Table 1: closed-book BART vs RAG-Sequence vs RAG-Token on entity QA.
    entity, models, predictions = {}, {}, {}
    entity["closed_book"], predictions["closed_book"] = decode(
        closed_book("entity-qa", cfg.closed_book_steps), "entity-qa", qa)
    lap("closed-book BART")
    for name, marginalization in (("rag_sequence", "sequence"), ("rag_token", "token")):
        models[name] = rag("entity-qa", marginalization, cfg.rag_steps)
        entity[name], predictions[name] = decode(models[name], "entity-qa", qa, marginalization)
        lap(f"{name}: training and evaluation")
    results["entity_qa"] = entity
    hits["em"].update({name: [p.em for p in preds] for name, preds in predictions.items()})
    trained = models["rag_token"]
    if trained.index is not None:  # a trained BERT_q: alone, and beside BM25
        for name, sparse in (("finetuned", None), ("hybrid", bm25.bm25)):
            recall_hits[name] = ev.retrieval_hits(trained.with_bm25(sparse), recall_qa)
    hits["em"]["top1_title_finetuned"] = ev.top1_title_hits(trained, qa)
    results["baselines"]["top1_title_em_finetuned"] = float(
        hits["em"]["top1_title_finetuned"].mean())
    results["retrieval"] = {name: _recall({k: float(h.mean()) for k, h in by_k.items()})
                            for name, by_k in recall_hits.items()}
    for k in (1, 5):
        hits[f"recall@{k}"] = {name: by_k[k] for name, by_k in recall_hits.items()}

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
    lap("fact verification")

    # Figure 3: EM and recall@k as k grows; index hot-swap.
    sweep = ev.k_sweep(models["rag_token"], qa[: cfg.sweep_questions], cfg.sweep_ks)
    results["k_sweep"] = sweep
    results["hot_swap"] = ev.hot_swap(models["rag_token"], qa, cfg.hot_swap_facts, cfg.seed,
                                      progress=progress, kinds=article_topics(),
                                      predictions=predictions["rag_token"])
    lap("k sweep and index hot-swap")
    results["seconds"] = round(time.time() - start, 1)
    results["hits"] = _as_lists(hits)

    plot_k_sweep(sweep).savefig(out / "k_sweep.png", dpi=120, bbox_inches="tight")
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


def check_priors(cfg: ReproduceConfig) -> None:
    """Reject a pair of priors that one trained model cannot serve, saying what would."""
    for name in ("training_prior", "retriever", "verify_prior"):
        if getattr(cfg, name) not in (*RETRIEVERS, *([None] if name == "verify_prior" else [])):
            raise ValueError(f"unknown {name} {getattr(cfg, name)!r}; choose one of {RETRIEVERS}")
    for read in (cfg.retriever, cfg.verify_prior or cfg.training_prior):
        if cfg.training_prior != read and "bm25" in (cfg.training_prior, read):
            raise ValueError(f"a model trained with the {cfg.training_prior} prior cannot be "
                             f"read with the {read} prior: BM25 alone uses no query encoder, "
                             "so use bm25 for both, or dense or hybrid for each")


def rag_model(cfg: ReproduceConfig, task: str = "entity-qa", marginalization: str = "token",
              steps: int | None = None, bm25=None, progress: bool = True,
              prior: str | None = None):
    """The RAG model ``reproduce`` uses for ``task``: jointly fine-tuned ``steps`` steps (default
    ``cfg.rag_steps``) with ``cfg.training_prior`` (trained once, then cached) and read with
    ``prior`` (default ``cfg.retriever``). ``bm25``: a BM25Retriever over the corpus to share."""
    from .retriever import BM25Retriever
    from .train import RagTrainConfig, trained_rag

    check_priors(cfg)
    preset = get_preset(cfg.preset, seed=cfg.seed)
    train = RagTrainConfig(marginalization=marginalization, steps=steps or cfg.rag_steps,
                           n_docs=preset.n_docs, seed=cfg.seed)
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
    """Per-question scores as JSON lists of 0/1."""
    return {key: _as_lists(value) if isinstance(value, dict) else [int(x) for x in value]
            for key, value in hits.items()}


def _recall(r: dict[int, float]) -> dict[str, float]:
    return {f"recall@{k}": v for k, v in r.items()}


def results_table(r: dict) -> str:
    """The run's results as Markdown, the paper's figure beside ours."""
    e, ret = r["entity_qa"], r["retrieval"]
    config = r.get("config", {})
    prior = config.get("retriever", "dense")  # the prior RAG reads with at test time
    trained_with = config.get("training_prior", prior)
    # runs recorded before verify_prior existed read verification with `retriever` too
    verify_prior = (config.get("verify_prior") or trained_with) if "verify_prior" in config \
        else prior
    model = (f"{prior} prior" if trained_with == prior
             else f"trained with the {trained_with} prior, read with the {prior} one")

    def pct(x: float) -> str:  # the paper reports percentages
        return f"{100 * x:.1f}"

    rows = [
        "| experiment | model | ours | paper |", "|---|---|---|---|",
        f"| entity QA, EM (Table 1) | closed-book BART | {pct(e['closed_book']['em'])} "
        f"| {PAPER['closed_book']} |",
        f"| | RAG-Sequence ({model}) | {pct(e['rag_sequence']['em'])} "
        f"| {PAPER['rag_sequence']} |",
        f"| | RAG-Token ({model}) | {pct(e['rag_token']['em'])} "
        f"| {PAPER['rag_token']} |",
        f"| | top-1 passage title, untrained dense retriever (no generator) | "
        f"{pct(r['baselines']['top1_title_em'])} | |",
        f"| | top-1 passage title, {prior} prior with RAG-Token's BERT_q (no generator) | "
        f"{pct(r['baselines']['top1_title_em_finetuned'])} | |",
        f"| question generation, BLEU-1 (Table 2) | BART | {pct(r['qgen']['bart']['bleu1'])} "
        f"| {PAPER['qgen_bart']} |",
        f"| | RAG-Token | {pct(r['qgen']['rag_token']['bleu1'])} | {PAPER['qgen_rag']} |",
        f"| fact verification, accuracy (Table 2) | BART | "
        f"{pct(r['verify']['bart']['accuracy'])} | {PAPER['verify_bart']} |",
        f"| | RAG ({verify_prior} prior) | "
        f"{pct(r['verify']['rag']['accuracy'])} | {PAPER['verify_rag']} |",
    ]
    tuned = f"BERT_q trained jointly with the {trained_with} prior"
    n = r.get("recall_questions")
    questions = f", {n} test questions" if n else ""
    for name, label in (("bm25", "BM25"), ("frozen", "dense, frozen BERT_q"),
                        ("finetuned", f"dense, {tuned}"),
                        ("hybrid_frozen", "hybrid (dense × BM25), frozen BERT_q"),
                        ("hybrid", f"hybrid (dense × BM25), {tuned}")):
        if name not in ret:
            continue
        rec = ret[name]
        rows.append(f"| retrieval recall@1/5/20 (Figure 3, centre{questions}) | {label} | "
                    + " / ".join(pct(rec[f"recall@{k}"]) for k in (1, 5, 20)) + " | |")
    hs = r["hot_swap"]
    rows.append(f"| index hot-swap ({hs['facts']} edited facts) | RAG-Token follows the new "
                f"index | {pct(hs['followed'])} | |")
    sweep = r["k_sweep"]
    rows.append("| EM by k at test time (Figure 3) | RAG-Token | " + ", ".join(
        f"k={k}: {pct(em)}" for k, em in zip(sweep["k"], sweep["em"])) + " | |")
    paper_note = ("\nAll figures in percent. The paper's are for NQ (EM), Jeopardy (B-1) "
                  "and FEVER-2 at full scale; ours are the tiny preset on the built-in tasks' "
                  "test articles.\n")
    shown = ("\n## What this run shows\n\n" + "".join(f"- {line}\n" for line in findings(r))
             if "hits" in r else "")
    return ("\n".join(rows) + f"\n\nTotal time: {r['seconds']:.0f} s.\n" + paper_note
            + decoding_note(r.get("decoding")) + shown)


def decoding_note(decoding: dict | None) -> str:
    """How the run decoded, in one line (runs recorded before it was a setting: nothing)."""
    if not decoding:
        return ""

    def beams(task: str) -> str:
        d = decoding[task]
        return ("greedy" if d["num_beams"] == 1 else f"{d['num_beams']} beams") + \
            f", RAG-Sequence {d['method'].capitalize()}"

    return (f"\nDecoding (the paper's Appendix A): entity QA {beams('entity-qa')}; question "
            f"generation {beams('qgen')}; closed-book BART decoded as the RAG models beside it. "
            f"Fact verification decodes nothing: the likelier of "
            f"{' / '.join(decoding['verify']['scored_labels'])} under each model.\n")


def findings(r: dict) -> list[str]:
    """What a run shows, finding by finding, beside the paper's (Markdown, one line each).

    ``r`` is shaped like ``results.json``; its ``hits`` hold the per-question scores (0/1) that
    make each comparison paired. A difference counts only beyond twice its paired standard
    error (:func:`ragbook.evaluate.compare`): ✔ the paper's finding shows, ✘ the run shows the
    opposite, ≈ inside the noise, whichever way it points. Lines whose results are absent
    (a run without the frozen-retriever ablation, say) are left out.
    """
    hits, e = r["hits"], r["entity_qa"]
    em = hits["em"]
    n = len(em["rag_token"])

    def pct(x: float) -> str:
        return f"{100 * x:.1f}"

    def diff(a: str, b: str, table: dict = em) -> str:
        d, se = ev.paired_difference(table[a], table[b])
        return f"{100 * d:+.1f} ± {100 * se:.1f}"

    def mark(a: str, b: str, table: dict = em) -> str:  # the paper expects a > b
        return {">": "✔", "<": "✘", "≈": "≈"}[ev.compare(table[a], table[b])]

    best = max(("rag_sequence", "rag_token"), key=lambda m: e[m]["em"])
    top1 = "top1_title_finetuned" if "top1_title_finetuned" in em else "top1_title"
    name = {"rag_sequence": "RAG-Sequence", "rag_token": "RAG-Token"}
    out = [
        f"{mark(best, 'closed_book')} **Retrieval vs parametric memory** (Table 1): {name[best]} "
        f"EM {pct(e[best]['em'])} against closed-book BART's {pct(e['closed_book']['em'])} "
        f"({diff(best, 'closed_book')}, paired, {n} questions about articles no model trained "
        f"on); the paper: {PAPER['rag_sequence']} / {PAPER['rag_token']} against "
        f"{PAPER['closed_book']}.",
        # the strongest retriever-only baseline decides: the test-time prior's own top-1 title
        f"{mark(best, top1)} **The generator against copying the top-1 title** (no "
        f"generator): {pct(r['baselines']['top1_title_em'])} with the untrained dense retriever "
        f"({name[best]} {diff(best, 'top1_title')})"
        + (f"; {pct(r['baselines']['top1_title_em_finetuned'])} with RAG-Token's BERT_q and the "
           f"test-time prior ({diff(best, 'top1_title_finetuned')})"
           if "top1_title_finetuned" in em else "")
        + ". Every answer here is a title, so a retriever alone is a strong system.",
        f"{'✔' if ev.compare(em['rag_sequence'], em['rag_token']) == '≈' else '≈'} "
        f"**RAG-Sequence vs RAG-Token**: {pct(e['rag_sequence']['em'])} vs "
        f"{pct(e['rag_token']['em'])} ({diff('rag_sequence', 'rag_token')}); the paper finds "
        f"them within a point on NQ ({PAPER['rag_sequence']} vs {PAPER['rag_token']}).",
    ]
    if "rag_token_frozen_retriever" in em:
        out.append(
            f"{mark('rag_token', 'rag_token_frozen_retriever')} **Joint training vs a frozen "
            f"BERT_q** (Table 6), EM: {pct(e['rag_token']['em'])} against "
            f"{pct(e['rag_token_frozen_retriever']['em'])} "
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
    sweep = r.get("k_sweep")
    if sweep:
        best_k = sweep["k"][max(range(len(sweep["em"])), key=sweep["em"].__getitem__)]
        out.append(f"**Figure 3**: recall rises from {pct(sweep['recall'][0])} (k = "
                   f"{sweep['k'][0]}) to {pct(sweep['recall'][-1])} (k = {sweep['k'][-1]}); "
                   f"RAG-Token's EM is highest at k = {best_k} ({pct(max(sweep['em']))}; the "
                   "paper: RAG-Token peaks at k = 10, RAG-Sequence rises with k).")
    hs = r.get("hot_swap")
    if hs:
        out.append(f"{'✔' if hs['followed'] > 0.5 else '✘'} **Index hot-swap** (§4.5): "
                   f"{pct(hs['followed'])}% of {hs['facts']} edited facts answered with the "
                   f"swapped index's name, {pct(hs['kept'])}% back to the old answer with the old "
                   "index (the paper: 70% / 68% right with the matching index, 4–12% with the "
                   "mismatched one).")
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
    return out
