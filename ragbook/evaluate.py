"""Evaluation: the paper's metrics, with every prediction kept beside its provenance.

- Exact Match and F1 with SQuAD's answer normalisation, max over the gold answers (Table 1);
- retrieval recall@k: the gold article, or a gold answer string, among the top k (Figure 3,
  centre panel; the paper's Table 6 reports the ablated retrievers' task scores, not recall);
- BLEU-1 for question generation, from sacrebleu (Table 2, Jeopardy generation);
- label accuracy for fact verification, the likelier label under the model (Table 2, FEVER),
  and the ROC AUC of the two labels' margin (scikit-learn): is there a signal at all.

The experiment runners below decode each task as the paper's Appendix A says (``DECODING``),
and decode the closed-book baseline exactly as the RAG models (:class:`ClosedBook`).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from .data import BLANK, SALIENT_SPANS, Example, Passage, gold_passages, salient_spans
from .pipeline import Prediction, RagModel, Retrieved, exact_match, normalize_answer


def f1_score(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD's token-overlap F1, the max over the gold answers."""
    pred = normalize_answer(prediction).split()

    def f1(gold: str) -> float:
        gold_tokens = normalize_answer(gold).split()
        common = sum((Counter(pred) & Counter(gold_tokens)).values())
        if not pred or not gold_tokens:
            return float(pred == gold_tokens)
        if common == 0:
            return 0.0
        precision, recall = common / len(pred), common / len(gold_tokens)
        return 2 * precision * recall / (precision + recall)

    return max(f1(a) for a in answers)


def is_hit(passage: Passage, example: Example) -> bool:
    """A retrieved passage supports ``example`` if it comes from the gold article or, when the
    article is unknown, contains a gold answer string."""
    if example.article is not None:
        return passage.title == example.article
    text = normalize_answer(passage.text)
    return any(normalize_answer(a) and normalize_answer(a) in text for a in example.answers)


def hits_at_k(retrieved: Sequence[Sequence[Passage]], examples: Sequence[Example],
              ks: Sequence[int] = (1, 5, 20)) -> dict[int, np.ndarray]:
    """For each k, one boolean per question: a supporting passage among its top k (recall@k
    is their mean; per question, two retrievers compare on the same questions, paired)."""
    first_hit = np.array([next((r for r, p in enumerate(passages) if is_hit(p, example)),
                               len(passages) + max(ks))
                          for passages, example in zip(retrieved, examples, strict=True)])
    return {k: first_hit < k for k in ks}


def recall_at_k(retrieved: Sequence[Sequence[Passage]], examples: Sequence[Example],
                ks: Sequence[int] = (1, 5, 20)) -> dict[int, float]:
    """Fraction of questions with a supporting passage among the top k, for each k."""
    return {k: float(h.mean()) if len(h) else 0.0
            for k, h in hits_at_k(retrieved, examples, ks).items()}


def standard_error(p: float, n: int) -> float:
    """The standard error of a proportion ``p`` measured on ``n`` questions, √(p(1−p)/n)."""
    return math.sqrt(p * (1 - p) / max(1, n))


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean of a − b over the same questions (per-question scores, e.g. 0/1 hits) and the
    standard error of that mean. Paired, it is narrower than two proportions' errors: both
    systems answer the same questions, and most questions are easy or hard for both."""
    d = np.asarray(a, float) - np.asarray(b, float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else 0.0


def compare(a: Sequence[float], b: Sequence[float]) -> str:
    """">" or "<" when a and b differ by more than twice the paired standard error of their
    difference (:func:`paired_difference`), "≈" inside it — the line between a finding and
    noise used throughout the course."""
    d, se = paired_difference(a, b)
    return "≈" if abs(d) <= 2 * se else (">" if d > 0 else "<")


def bleu1(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU-1 (unigram precision with brevity penalty) in [0, 1], via sacrebleu."""
    from sacrebleu.metrics import BLEU

    refs = [list(r) for r in references]
    width = max(len(r) for r in refs)
    streams = [[r[i] if i < len(r) else r[0] for r in refs] for i in range(width)]
    return BLEU(max_ngram_order=1, effective_order=True).corpus_score(
        list(predictions), streams).score / 100


def accuracy(predictions: Sequence[str], examples: Sequence[Example]) -> float:
    """Label accuracy: the generated word equals the gold label (case-insensitive)."""
    hits = [p.strip().upper() == e.answers[0].strip().upper()
            for p, e in zip(predictions, examples, strict=True)]
    return sum(hits) / max(1, len(hits))


def save_predictions(predictions: Sequence[Prediction], path: str | Path) -> None:
    """Write predictions as JSONL, one object per line."""
    from .artifacts import atomic_write_bytes

    lines = "".join(json.dumps(asdict(p)) + "\n" for p in predictions)
    atomic_write_bytes(path, lines.encode())


def load_predictions(path: str | Path) -> list[Prediction]:
    """Read a predictions JSONL file written by :func:`save_predictions`."""
    from .data import DataError, read_jsonl

    out = []
    for n, obj in read_jsonl(path):
        try:
            out.append(Prediction(question=obj["question"], prediction=obj["prediction"],
                                  answers=list(obj["answers"]),
                                  provenance=obj.get("provenance", [])))
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}:{n}: not a prediction (missing {e}); each line needs "
                            '{"question", "prediction", "answers"}') from None
    return out


def score_predictions(predictions: Sequence[Prediction]) -> dict[str, float]:
    """EM and F1 averaged over predictions."""
    n = max(1, len(predictions))
    return {"em": sum(p.em for p in predictions) / n,
            "f1": sum(f1_score(p.prediction, p.answers) for p in predictions) / n,
            "n": len(predictions)}


# --------------------------------------------------------------------------- experiments
# Each runner is shared by notebook 07 and `ragbook reproduce`.


@dataclass(frozen=True)
class Decoding:
    """How one task's answers are decoded: ``num_beams`` (1: greedy) and RAG-Sequence's
    ``method`` (§2.5: "thorough" scores every hypothesis under every document, "fast" takes
    p_θ(y|x,z) ≈ 0 where y is not in z's beam). RAG-Token's decoding is beam search either way.
    """

    num_beams: int
    method: str


# Lewis et al. (2020), Appendix A: "For Open-domain QA [...] For RAG-Sequence models [...] we use
# the Thorough Decoding approach since answers are generally short. We use greedy decoding for
# QA as we did not find beam search improved results. For Open-MSMarco and Jeopardy question
# generation [...] We use a beam size of four, and use the Fast Decoding approach for
# RAG-Sequence models, as Thorough Decoding did not improve performance." Entity QA and reading
# QA are the course's open-domain QA, qgen its Jeopardy question generation; fact verification
# decodes nothing (:func:`evaluate_labels`).
DECODING = {"entity-qa": Decoding(num_beams=1, method="thorough"),
            "reading-qa": Decoding(num_beams=1, method="thorough"),
            "qgen": Decoding(num_beams=4, method="fast")}


class ClosedBook(RagModel):
    """The paper's closed-book BART baseline as a RAG model with nothing to retrieve.

    Each question has one "document" of prior 1 and the generator reads the question alone
    (``generator.format_input(None, x)``, as :func:`~ragbook.generator.finetune_closed_book`
    trained it), so p(y|x) = p_θ(y|x) under Eq. 1 and Eq. 2 alike. ``answer`` and ``loss`` are
    RagModel's own: the baseline is decoded with the same beam search, beams and answer length
    as the RAG models it is compared with, and a comparison differs only in retrieval.
    """

    NO_PASSAGE = Passage("closed-book", "", "")  # provenance: the only "document"

    def __init__(self, preset, generator, tokenizer):
        super().__init__(preset, None, generator, tokenizer, None)

    def retrieve(self, questions: Sequence[str], n_docs: int | None = None,
                 grad: bool = False) -> Retrieved:
        return Retrieved([[self.NO_PASSAGE] for _ in questions],
                         torch.zeros(len(questions), 1, device=self.device))

    def generator_inputs(self, questions: Sequence[str], passages):
        return super().generator_inputs(questions, [[None] for _ in passages])


def evaluate_rag(model, examples: Sequence[Example], marginalization: str = "token",
                 n_docs: int | None = None, num_beams: int = DECODING["entity-qa"].num_beams,
                 decoding: str = DECODING["entity-qa"].method,
                 progress: bool = False) -> tuple[dict[str, float], list[Prediction]]:
    """EM / F1 of a :class:`~ragbook.pipeline.RagModel` (or :class:`ClosedBook`) with
    provenance for each answer; decoded by default as the paper decodes open-domain QA."""
    predictions = model.answer([e.question for e in examples], [e.answers for e in examples],
                               marginalization=marginalization, n_docs=n_docs,
                               num_beams=num_beams, decoding=decoding, progress=progress)
    return score_predictions(predictions), predictions


def evaluate_labels(model, examples: Sequence[Example], labels: Sequence[str],
                    marginalization: str = "token",
                    batch_size: int = 32) -> tuple[dict[str, float], list[Prediction]]:
    """Label accuracy of a classifier that scores each label y under the model (Table 2,
    FEVER): the prediction is argmax_y log p(y|x), with log p(y|x) = −``model.loss`` for the
    example (x, y) — Eq. 1 or Eq. 2 over the retrieved passages for a RAG model, p_θ(y|x) for
    :class:`ClosedBook`. No gradient; the retriever is read, not trained.

    The paper "map[s] FEVER class labels [...] to single output tokens and directly train[s]
    with claim-class pairs" (§3.4), where RAG-Sequence and RAG-Token coincide (§2.1); its
    Appendix E classifies from BART's final hidden state, marginalized across documents.
    Here the labels are words the generator writes in several tokens: scored as whole
    sequences they are chosen between, never misspelt, and the first token, where the two
    labels part, carries the decision.

    With two labels the scores also hold ``auc``: the ROC AUC of the margin
    log p(labels[0]|x) − log p(labels[1]|x), whether the model separates the classes at any
    threshold (0.5: no signal; accuracy reads only the threshold 0).
    """
    from sklearn.metrics import roc_auc_score

    was_training = model.training
    model.eval()
    with torch.no_grad():
        logp = torch.stack([torch.cat([
            -model.loss([Example(e.question, [label]) for e in examples[i:i + batch_size]],
                        marginalization, train_retriever=False).float().cpu()
            for i in range(0, len(examples), batch_size)]) for label in labels], dim=1)
    model.train(was_training)
    predictions = [Prediction(e.question, labels[j], list(e.answers))
                   for e, j in zip(examples, logp.argmax(dim=1).tolist())]
    scores = {"accuracy": accuracy([p.prediction for p in predictions], examples),
              "n": len(examples)}
    first = [e.answers[0] == labels[0] for e in examples]
    if len(labels) == 2 and 0 < sum(first) < len(first):  # both classes among the gold labels
        scores["auc"] = float(roc_auc_score(first, (logp[:, 0] - logp[:, 1]).numpy()))
    return scores, predictions


def concatenated_answers(model: RagModel, examples: Sequence[Example], passages:
                         Sequence[Sequence[Passage]], batch_size: int = 8,
                         progress: bool = False) -> list[Prediction]:
    """Answers of a causal-LM generator from ONE prompt per question holding all of its
    ``passages`` in the order given (``causal.encode_concatenated``): what most RAG systems
    do today, beside Eq. 1 and Eq. 2's one prompt per passage (notebook 10). Greedy, at most
    the preset's ``max_target_length`` tokens; no posterior over passages to report."""
    from tqdm.auto import tqdm

    from . import causal, rag

    if not causal.is_causal(model.generator):
        raise ValueError("concatenation puts k passages in one prompt: it needs a causal LM "
                         "generator (e.g. the smol preset)")
    limit = model.preset.max_source_length * max(len(row) for row in passages)
    out = []
    for i in tqdm(range(0, len(examples), batch_size), disable=not progress,
                  desc="concatenated"):
        batch = examples[i:i + batch_size]
        enc = causal.encode_concatenated(model.tokenizer, list(passages[i:i + batch_size]),
                                         [e.question for e in batch], limit)
        answers = rag.rag_token_generate(model.generator, model.tokenizer, enc["input_ids"],
                                         enc["attention_mask"], torch.zeros(len(batch), 1),
                                         num_beams=1,
                                         max_length=model.preset.max_target_length)
        out += [Prediction(e.question, a.text, list(e.answers)) for e, a in zip(batch, answers)]
    return out


def gold_at(retrieved: Sequence[Passage], gold: Passage, position: int) -> list[Passage]:
    """The retrieved passages with the gold one moved to ``position`` (it takes the place of
    the last other passage if retrieval missed it): where in a long prompt the answer sits
    ("lost in the middle", notebook 10)."""
    others = [p for p in retrieved if p.id != gold.id][:len(retrieved) - 1]
    return others[:position] + [gold] + others[position:]


def retrieved_passages(model, examples: Sequence[Example], k: int,
                       batch_size: int = 64) -> list[list[Passage]]:
    """The top-k passages of every question, retrieved in batches."""
    return [ps for i in range(0, len(examples), batch_size)
            for ps in model.retrieve([e.question for e in examples[i:i + batch_size]],
                                     k).passages]


def retrieval_hits(model, examples: Sequence[Example], ks: Sequence[int] = (1, 5, 20),
                   batch_size: int = 64) -> dict[int, np.ndarray]:
    """Per question and k: is a supporting passage in the model's top k (:func:`hits_at_k`)?"""
    return hits_at_k(retrieved_passages(model, examples, max(ks), batch_size), examples, ks)


def retrieval_recall(model, examples: Sequence[Example], ks: Sequence[int] = (1, 5, 20),
                     batch_size: int = 64) -> dict[int, float]:
    """recall@k of a model's retriever (dense with its current query encoder, or BM25)."""
    return recall_at_k(retrieved_passages(model, examples, max(ks), batch_size), examples, ks)


def gold_passage_answers(model: RagModel, examples: Sequence[Example]) -> list[Prediction]:
    """The generator as a reader, no retrieval: each reading-QA question answered from its gold
    passage in the model's corpus (:func:`ragbook.data.gold_passages`), decoded as open-domain
    QA is — the bound on what RAG's answers can reach with this generator."""
    from .generator import generate_answers

    gold = gold_passages(examples, model.index.passages)
    answers = generate_answers(model.generator, model.tokenizer, [e.question for e in examples],
                               gold, num_beams=DECODING["reading-qa"].num_beams,
                               max_length=model.preset.max_target_length,
                               max_source_length=model.preset.max_source_length)
    return [Prediction(e.question, a, list(e.answers), [{"id": p.id, "title": p.title}])
            for e, a, p in zip(examples, answers, gold)]


def extract_span(passage: Passage, question: str, max_words: int = 6) -> str | None:
    """A reader by rule, for retrieve-and-extract: the span of ``passage`` between the words a
    reading question keeps around its blank (:func:`ragbook.data.reading_question`), matched
    with the nearest 3, then 2, then 1 word on each side (the question says "it" where the
    passage names its title). At most ``max_words`` words; None if no place fits."""
    left, _, right = question.split(": ", 1)[-1].partition(BLANK)
    before, after = left.split(), right.split()
    for n in (3, 2, 1):
        pattern = (r"\s+".join(map(re.escape, before[-n:])) + r"\s*"
                   + rf"(\S+(?:\s+\S+){{0,{max_words - 1}}}?)"
                   + (r"\s*" + r"\s+".join(map(re.escape, after[:n])) if after else r"[.;]?$"))
        found = re.search(pattern, passage.text)
        if found:
            return found.group(1)
    return None


def extracted_answers(model, examples: Sequence[Example], k: int) -> list[Prediction]:
    """Retrieve-and-extract, the paper's other open-book family (REALM, DPR: Table 1): the
    answer is a span read out of the first of the top ``k`` passages where
    :func:`extract_span` finds one ("" where none does); the provenance is that passage."""
    predictions = []
    for passages, e in zip(retrieved_passages(model, examples, k), examples):
        found = next(((p, span) for p in passages
                      if (span := extract_span(p, e.question)) is not None), None)
        predictions.append(Prediction(e.question, found[1] if found else "", list(e.answers),
                                      [{"id": found[0].id, "title": found[0].title}]
                                      if found else []))
    return predictions


def top1_title_hits(model, examples: Sequence[Example]) -> np.ndarray:
    """Per question, the EM of answering with the title of the top-1 passage."""
    return np.array([exact_match(ps[0].title, e.answers)
                     for ps, e in zip(retrieved_passages(model, examples, 1), examples)])


def top1_title_baseline(model, examples: Sequence[Example]) -> float:
    """EM of answering with the title of the top-1 passage: what RAG must beat."""
    return float(top1_title_hits(model, examples).mean())


def k_sweep(model, examples: Sequence[Example], ks: Sequence[int] = (1, 2, 5, 10, 20, 50),
            marginalization: str = "token", progress: bool = False) -> dict[str, list[float]]:
    """The paper's Figure 3: EM, F1 and recall@k as the number of documents at test time grows.
    ``em_se`` and ``f1_se`` are each point's standard error over the questions (error bars)."""
    sweep: dict[str, list[float]] = {"k": list(ks), "em": [], "em_se": [], "f1": [], "f1_se": []}
    for k in ks:
        predictions = evaluate_rag(model, examples, marginalization, n_docs=k,
                                   progress=progress)[1]
        for metric, scores in (("em", [float(p.em) for p in predictions]),
                               ("f1", [f1_score(p.prediction, p.answers) for p in predictions])):
            sweep[metric].append(float(np.mean(scores)))
            sweep[f"{metric}_se"].append(float(np.std(scores, ddof=1) / math.sqrt(len(scores)))
                                         if len(scores) > 1 else 0.0)
    recall = retrieval_recall(model, examples, ks)
    return {**sweep, "recall": [recall[k] for k in ks]}


def edit_facts(examples: Sequence[Example], n: int, seed: int = 0,
               kinds: Mapping[str, str] | None = None) -> dict[str, str]:
    """Pick ``n`` entity-QA facts and give each a new answer: the chosen articles' titles are
    passed round a cycle (A's article now names B, B's names C, …, the last names A), as the
    holders of offices change between two Wikipedia dumps. Every new answer is a real name the
    old index gives to another article, so only the index can tell which is right.

    ``kinds`` (article → kind, e.g. the built-in corpus's topics from
    :func:`ragbook.data.article_topics`) keeps each cycle within one kind, as the paper's
    leaders were replaced by other leaders: a country is renamed after another country, not
    after a theorem. Articles alone of their kind among the chosen share one mixed cycle.

    A fact whose question shares a word with its answer ("Spinning toy": Spinning top) is never
    edited. Its question half-names the old answer, and after the rename the words it shares are
    gone from the edited passage but still in the neighbours' ("Spinning", "Hand spinning"), so
    both experts of the prior are drawn back to the old name by the question itself; the paper's
    questions ("Who is the President of Peru?") name neither leader.
    """
    import random

    from .retriever import bm25_terms

    named = {e.article for e, q, a in zip(examples, bm25_terms([e.question for e in examples]),
                                          bm25_terms([e.article for e in examples]))
             if set(q) & set(a)}
    articles = sorted({e.article for e in examples} - named)
    chosen = random.Random(f"hot-swap/{seed}").sample(articles, min(n, len(articles)))
    groups: dict[str, list[str]] = {}
    for a in chosen:
        groups.setdefault(kinds.get(a, "") if kinds else "", []).append(a)
    cycles = [g for g in groups.values() if len(g) > 1]
    alone = [g[0] for g in groups.values() if len(g) == 1]
    if len(alone) > 1:
        cycles.append(alone)
    elif alone and cycles:
        cycles[0].append(alone[0])
    return {a: b for cycle in cycles for a, b in zip(cycle, cycle[1:] + cycle[:1])}


def _bare(title: str) -> str:
    """A title without its disambiguation: "Georgia (country)" → "Georgia"."""
    return re.sub(r"\s*\([^)]*\)$", "", title)


def edited_corpus(corpus: Sequence[Passage], edits: dict[str, str]) -> list[Passage]:
    """A copy of ``corpus`` where each edited article is renamed, in its title and its text:
    the course's analogue of swapping the 2016 Wikipedia index for the 2018 one. The text
    names the entity as prose does — in any case ("A sail is …"), without the title's
    disambiguation — and every such mention takes the new name, so no edited passage still
    states the old one."""
    out = []
    for p in corpus:
        new = edits.get(p.title)
        if new is None:
            out.append(p)
            continue
        names = sorted({p.title, _bare(p.title)}, key=len, reverse=True)
        mention = re.compile("|".join(rf"(?<!\w){re.escape(n)}(?!\w)" for n in names),
                             re.IGNORECASE)
        name = _bare(new).replace("\\", r"\\")  # a literal replacement, not a template
        out.append(Passage(p.id, new, mention.sub(name, p.text)))
    return out


def span_kind(span: str) -> str:
    """A salient span's kind (:data:`ragbook.data.SALIENT_SPANS`): date, number or name."""
    for kind in ("date", "number"):
        if SALIENT_SPANS[kind].fullmatch(span):
            return kind
    return "name"


def edit_spans(examples: Sequence[Example], n: int, seed: int = 0, names: Sequence[str] = (),
               encode: Callable[[list[str]], np.ndarray] | None = None) -> dict[str, str]:
    """Pick ``n`` reading-QA facts, one per article, and give each a new answer of the old
    one's kind and shape, as a newer Wikipedia states a newer figure: a year moves by 1 to 30
    years, a number gets another leading digit (its last, when it leads with 0), and a name
    becomes the name most like it (the cosine of ``encode``'s vectors) of as many words among
    ``names`` and the chosen facts' own names — "Los Angeles" a city, not a fund — and never one
    the question holds. Every new answer fits the sentence it goes into, so only the passage
    can tell which is right. Returns question → new span; without ``encode`` names are not
    edited."""
    import random

    first = {}
    for e in examples:
        first.setdefault(e.article, e)
    rng = random.Random(f"span-swap/{seed}")
    chosen = [first[a] for a in rng.sample(sorted(first), min(n, len(first)))]
    edits, named = {}, []
    for e in chosen:
        span, kind = e.answers[0], span_kind(e.answers[0])
        if kind == "date":
            year = int(span)
            edits[e.question] = str(year + rng.choice(
                [d for d in range(-30, 31) if d and 1000 <= year + d <= 2099]))
        elif kind == "number":
            digits = [i for i, c in enumerate(span) if c.isdigit()]
            at = digits[0] if span[digits[0]] != "0" else digits[-1]
            other = rng.choice([d for d in ("123456789" if at == digits[0] and len(digits) > 1
                                            else "0123456789") if d != span[at]])
            edits[e.question] = span[:at] + other + span[at + 1:]
        else:
            named.append(e)
    if not (named and encode):
        return edits
    pool = list(dict.fromkeys([*names, *(e.answers[0] for e in named)]))
    vectors = encode(pool)
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
    row = {name: i for i, name in enumerate(pool)}
    normal = [normalize_answer(name) for name in pool]
    for e in named:
        old, question = e.answers[0], f" {normalize_answer(e.question)} "
        fits = [i for i, name in enumerate(pool) if len(name.split()) == len(old.split())
                and normal[i] not in (normal[row[old]], "") and f" {normal[i]} " not in question]
        if fits:
            similarity = vectors[fits] @ vectors[row[old]]
            edits[e.question] = pool[fits[int(similarity.argmax())]]
    return edits


def span_edited_corpus(corpus: Sequence[Passage], facts: Sequence[Example],
                       edits: dict[str, str]) -> list[Passage]:
    """A copy of ``corpus`` where each edited fact's article states its new span: every
    whole-word mention of the old span in that article's passages is replaced."""
    changes: dict[str, list[tuple[re.Pattern, str]]] = {}
    for e in facts:
        old = re.compile(rf"(?<!\w){re.escape(e.answers[0])}(?!\w)")
        changes.setdefault(e.article, []).append((old, edits[e.question].replace("\\", r"\\")))
    out = []
    for p in corpus:
        text = p.text
        for old, new in changes.get(p.title, ()):
            text = old.sub(new, text)
        out.append(p if text == p.text else Passage(p.id, p.title, text))
    return out


def hot_swap(model, examples: Sequence[Example], n_facts: int = 50, seed: int = 0,
             progress: bool = False, kinds: Mapping[str, str] | None = None,
             marginalization: str = "token",
             predictions: Sequence[Prediction] | None = None, task: str = "entity-qa") -> dict:
    """Swap the index for one built over an edited corpus, without retraining.

    ``task`` says what an edit is: for entity QA an article is renamed (:func:`edit_facts`,
    :func:`edited_corpus`), for reading QA the answer span is changed in its article's text
    (:func:`edit_spans`, :func:`span_edited_corpus`) — the paper's case, where the newer index
    states another fact and the question stays the same.

    Among facts the model answers correctly with the original index (and whose question does
    not name its answer: :func:`edit_facts`), ``followed`` is the share answered with the *new*
    answer after the swap, and ``kept`` the share still answered with the old one once the
    original index is swapped back. Each of the ``misses`` says where the edited passage stood
    among the retrieved ones, ranked by p(z|x,y) for the answer given (``edited_rank``; None:
    not retrieved). ``kinds``: see
    :func:`edit_facts`; ``marginalization``: the decoder, Eq. 2 ("token") or Eq. 1;
    ``predictions``: the model's answers to ``examples`` with the original index, if already
    made with this decoder (they pick the facts it knows).
    """
    from .retriever import BM25Retriever, load_encoders

    def answer(facts):
        return evaluate_rag(model, facts, marginalization, progress=progress)[1]

    if predictions is None:
        predictions = answer(examples)
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples: pass "
                         "the model's answers to exactly these examples, or none")
    known = [e for e, p in zip(examples, predictions) if p.em]
    original_index, original_vectors, original_bm25 = model.index, model.doc_vectors, model.bm25
    doc_encoder = load_encoders(model.preset)[1]
    if task == "reading-qa":  # a name may become another name of the facts' articles
        articles = {e.article for e in known}
        names = sorted({m.group() for p in original_index.passages if p.title in articles
                        for _, m in salient_spans(p).get("name", [])})
        edits = edit_spans(known, n_facts, seed, names,
                           lambda texts: doc_encoder.encode(texts, progress=False))
        facts = [e for e in known if e.question in edits]
        corpus = span_edited_corpus(original_index.passages, facts, edits)
        swapped = [Example(e.question, [edits[e.question]], e.article) for e in facts]
    else:
        edits = edit_facts(known, n_facts, seed, kinds)
        facts = [e for e in known if e.article in edits]
        corpus = edited_corpus(original_index.passages, edits)
        swapped = [Example(e.question, [edits[e.article]], edits[e.article]) for e in facts]
    changed = [i for i, (old, new) in enumerate(zip(original_index.passages, corpus))
               if new is not old]
    vectors = original_vectors.cpu().numpy().copy()  # only the edited passages are re-encoded
    if changed:
        vectors[changed] = doc_encoder.encode_passages([corpus[i] for i in changed],
                                                       progress=False)
    new_index = type(original_index).build(vectors, corpus, kind=original_index.kind,
                                           metadata=dict(original_index.metadata),
                                           progress=False)
    try:
        model.index = original_index.swap(new_index)
        model.doc_vectors = torch_from(vectors, original_vectors)
        if original_bm25 is not None:  # a hybrid prior: its BM25 half reads the new text too
            model.bm25 = BM25Retriever(corpus)
        after = answer(swapped)
    finally:
        model.index, model.doc_vectors = original_index, original_vectors
        model.bm25 = original_bm25
    before = answer(facts)
    return {"facts": len(facts),
            "followed": sum(p.em for p in after) / max(1, len(facts)),
            "kept": sum(p.em for p in before) / max(1, len(facts)),
            "examples": [{"question": e.question, "old": e.answers[0], "new": s.answers[0],
                          "answer_after_swap": a.prediction}
                         for e, s, a in zip(facts[:10], swapped, after)],
            "misses": [{"question": s.question, "new": s.answers[0], "answer": a.prediction,
                        "edited_rank": _rank(s.article, a.provenance)}
                       for s, a in zip(swapped, after) if not a.em]}


def miss_kinds(hot_swap_result: dict) -> Counter:
    """Why the facts a hot-swap did not follow were missed, by where the edited passage stood
    (:func:`hot_swap`'s ``misses``): "not retrieved" (a retrieval miss), "first, but the answer
    miscopied" (the generator's), or "retrieved, outranked" (the posterior preferred another)."""
    return Counter("not retrieved" if m["edited_rank"] is None else
                   "first, but the answer miscopied" if m["edited_rank"] == 1 else
                   "retrieved, outranked" for m in hot_swap_result["misses"])


def _rank(title: str, provenance: list[dict]) -> int | None:
    """1-based rank of the (edited) passage titled ``title`` by posterior; None if not
    retrieved."""
    titles = [d["title"] for d in sorted(provenance, key=lambda d: -d["posterior"])]
    return titles.index(title) + 1 if title in titles else None


def torch_from(vectors, like):
    """``vectors`` as a tensor on the device and dtype of ``like``."""
    return torch.as_tensor(vectors).to(like.device, like.dtype)
