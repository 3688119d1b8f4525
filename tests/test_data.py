"""The built-in corpus and tasks, and every own-data format with its errors."""

import json
import random

import pytest

from ragbook import data
from ragbook.data import DataError, Example, Passage


def test_corpus_size_and_passage_length():
    articles = data.load_articles()
    corpus = data.load_corpus()
    assert len(articles) == 10_033
    assert len(corpus) > len(articles)  # long extracts split into several passages
    assert max(len(p.text.split()) for p in corpus) <= data.PASSAGE_WORDS
    assert len({p.id for p in corpus}) == len(corpus)
    assert {p.title for p in corpus} == {a["title"] for a in articles}


def test_split_passages_keeps_every_word_with_stable_ids():
    text = " ".join(f"w{i}" for i in range(250))
    parts = data.split_passages("T", text)
    assert [len(p.text.split()) for p in parts] == [84, 84, 82]
    assert " ".join(p.text for p in parts) == text
    assert [p.id for p in parts] == ["T::0", "T::1", "T::2"]
    assert data.split_passages("T", text) == parts


@pytest.mark.parametrize("task", data.TASKS)
def test_splits_are_disjoint_by_article_and_deterministic(task):
    splits = {s: data.load_task(task, s) for s in data.SPLITS}
    articles = {s: {e.article for e in ex} for s, ex in splits.items()}
    assert not articles["train"] & articles["dev"]
    assert not articles["train"] & articles["test"]
    assert not articles["dev"] & articles["test"]
    assert len(splits["train"]) > 5 * len(splits["test"]) > 0
    assert data.load_task(task, "dev") == splits["dev"]
    assert data.load_task(task, "dev", seed=1) != splits["dev"]


def test_entity_qa_never_gives_the_answer_away():
    for e in data.load_task("entity-qa", "train"):
        assert e.answers == [e.article]
        assert e.article.lower() not in e.question.lower()


def test_a_reading_question_keeps_a_window_around_the_blank_and_hides_the_title():
    passage = Passage("Mount Everest::0", "Mount Everest",
                      "Mount Everest is Earth's highest mountain above sea level. Its elevation "
                      "of 8,849 metres was most recently established in 2020 by the Chinese "
                      "and Nepali authorities.")
    drawn = [data.reading_question(passage, "mountain in Asia", random.Random(seed), window=3)
             for seed in range(40)]
    assert {e.article for e in drawn} == {"Mount Everest"}
    assert {(e.question, e.answers[0]) for e in drawn} == {
        ("mountain in Asia: it is _____'s highest mountain", "Earth"),  # the title → "it"
        ("mountain in Asia: Its elevation of _____ metres was most", "8,849"),
        ("mountain in Asia: recently established in _____ by the Chinese", "2020"),
        ("mountain in Asia: 2020 by the _____ and Nepali authorities.", "Chinese"),
        ("mountain in Asia: the Chinese and _____ authorities.", "Nepali"),
    }
    titled = Passage("Mount Everest::1", "Mount Everest",
                     "The first people known to climb Mount Everest were Edmund Hillary and "
                     "Tenzing Norgay in 1953.")
    for seed in range(20):
        q = data.reading_question(titled, "mountain in Asia", random.Random(seed), window=4)
        assert "Everest" not in q.question and q.answers[0] in titled.text
    bare = Passage("x::0", "x", "no capital letters or numbers in this sentence at all here.")
    assert data.reading_question(bare, "anything", random.Random(0)) is None


def test_reading_qa_answers_are_spans_of_their_article_read_through_a_short_clue():
    passages: dict[str, list[str]] = {}
    for p in data.load_corpus():
        passages.setdefault(p.title, []).append(p.text)
    described = {a["title"]: a["description"] for a in data.load_articles()}
    examples = data.load_task("reading-qa", "test")
    verbatim = 0
    for e in examples:
        description, clue = e.question.split(": ", 1) if e.question.startswith(
            described[e.article] + ": ") else (None, None)
        assert description == described[e.article]
        assert clue.count(data.BLANK) == 1 and e.article.lower() not in clue.lower()
        assert e.answers[0].lower() not in description.lower()
        assert len(clue.split()) <= 2 * data.READING_WINDOW + 1 + clue.count(data.BLANK) * 4
        assert any(e.answers[0] in text for text in passages[e.article])
        verbatim += any(clue.replace(data.BLANK, e.answers[0]) in text
                        for text in passages[e.article])
    assert verbatim > 0.8 * len(examples)  # the rest had the title replaced by "it"
    assert len({e.article for e in examples}) > 0.5 * len(examples)  # not one article's


def test_verify_labels_are_balanced_and_refutations_come_from_the_same_topic():
    examples = data.load_task("verify", "train")
    labels = [e.answers[0] for e in examples]
    assert set(labels) == set(data.LABELS)
    assert 0.45 < labels.count("SUPPORTS") / len(labels) < 0.55
    described = {a["title"]: a["description"] for a in data.load_articles()}
    for e in examples[:200]:
        claimed = e.question.split(": ", 1)[1] if ": " in e.question else None
        assert (claimed == described[e.article]) == (e.answers == ["SUPPORTS"])


def test_unknown_task_or_split():
    with pytest.raises(ValueError, match="unknown task"):
        data.load_task("nq", "train")
    with pytest.raises(ValueError, match="unknown split"):
        data.load_task("qgen", "validation")


# ----------------------------------------------------------------- own data


def write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_passages_and_questions(tmp_path):
    p = write(tmp_path / "c.jsonl", [json.dumps({"id": 1, "title": "A", "text": "alpha"}),
                                     "", json.dumps({"id": "b", "text": "beta"})])
    assert data.load_passages(p) == [Passage("1", "A", "alpha"), Passage("b", "", "beta")]
    q = write(tmp_path / "q.jsonl", [json.dumps({"question": "what?", "answers": ["x", "y"]}),
                                     json.dumps({"question": "who?", "answer": "z"})])
    assert data.load_examples(q) == [Example("what?", ["x", "y"]), Example("who?", ["z"])]


def test_plain_text_corpus(tmp_path):
    p = tmp_path / "notes.txt"
    p.write_text("first paragraph here\n\n" + " ".join(["word"] * 150), encoding="utf-8")
    passages = data.load_passages(p)
    assert [len(x.text.split()) for x in passages] == [3, 75, 75]
    assert len({x.id for x in passages}) == 3 and passages[0].title == "notes"


def squad(version_2: bool):
    qas = [{"id": "1", "question": "Who?", "answers": [{"text": "Ada", "answer_start": 0},
                                                       {"text": "Ada", "answer_start": 0}]}]
    if version_2:
        qas.append({"id": "2", "question": "Why?", "answers": [], "is_impossible": True})
    return {"version": "v2.0" if version_2 else "1.1",
            "data": [{"title": "Ada", "paragraphs": [{"context": "Ada wrote.", "qas": qas}]}]}


@pytest.mark.parametrize("version_2", [False, True])
def test_squad(tmp_path, version_2):
    p = tmp_path / "squad.json"
    p.write_text(json.dumps(squad(version_2)), encoding="utf-8")
    examples, skipped = data.load_squad(p)
    assert examples == [Example("Who?", ["Ada"], article="Ada")]
    assert skipped == (1 if version_2 else 0)
    assert data.load_examples(p) == examples
    assert data.passages_from_squad(p) == [Passage("Ada::0.0", "Ada", "Ada wrote.")]


@pytest.mark.parametrize("name, lines, message", [
    ("c.jsonl", ['{"id": 1, "text": "a"}', '{"id": 2, "text": '], r"c\.jsonl:2: malformed JSON"),
    ("c.jsonl", ['{"id": 1, "text": "a"}', '{"id": 2, "text": " "}'],
     r":2: passage '2' has empty"),
    ("c.jsonl", ['{"id": 1, "text": "a"}', '{"id": 1, "text": "b"}'], r":2: duplicate id '1'"),
    ("c.jsonl", ['{"title": "x", "text": "a"}'], r":1: missing field\(s\) \['id'\]"),
    ("c.jsonl", [""], r"no passages found"),
])
def test_bad_passages(tmp_path, name, lines, message):
    with pytest.raises(DataError, match=message):
        data.load_passages(write(tmp_path / name, lines))


@pytest.mark.parametrize("lines, message", [
    (['{"question": "q", "answers": []}'], r"q\.jsonl:1: question without answers"),
    (['{"question": "q"}'], r"q\.jsonl:1: question without answers"),
    (['{"question": "q", "answers": ["a"]}', "[1, 2]"], r":2: expected a JSON object"),
    (['{"answers": ["a"]}'], r":1: missing or empty 'question'"),
])
def test_bad_questions(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        data.load_examples(write(tmp_path / "q.jsonl", lines))


def test_missing_file_and_bad_squad(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file"):
        data.load_passages(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="a directory, not a file; give a file, or a directory "
                       "written by datasets' save_to_disk"):
        data.load_examples(tmp_path)
    bad = tmp_path / "s.json"
    bad.write_text('{"data": [', encoding="utf-8")
    with pytest.raises(DataError, match=r"s\.json:1: malformed JSON"):
        data.load_examples(bad)
    bad.write_text('{"rows": []}', encoding="utf-8")
    with pytest.raises(DataError, match="not SQuAD format"):
        data.load_examples(bad)


def test_squad_questions_all_unanswerable_or_malformed(tmp_path):
    p = tmp_path / "v2.json"
    blob = squad(version_2=True)
    blob["data"][0]["paragraphs"][0]["qas"] = blob["data"][0]["paragraphs"][0]["qas"][1:]
    p.write_text(json.dumps(blob), encoding="utf-8")
    assert data.load_squad(p) == ([], 1)
    with pytest.raises(DataError, match=r"all 1 questions are unanswerable"):
        data.load_examples(p)
    no_question = {"id": "3", "answers": [{"text": "Ada", "answer_start": 0}]}
    p.write_text(json.dumps({"data": [{"title": "A", "paragraphs": [{"qas": [no_question]}]}]}))
    with pytest.raises(DataError, match="malformed SQuAD file"):
        data.load_examples(p)
    with pytest.raises(DataError, match="malformed SQuAD file"):
        data.load_passages(p)  # a paragraph without its "context"


def test_a_squad_file_is_a_corpus_too(tmp_path):
    p = tmp_path / "squad.json"
    p.write_text(json.dumps(squad(False)), encoding="utf-8")
    assert data.load_passages(p) == [Passage("Ada::0.0", "Ada", "Ada wrote.")]
    p.write_text(json.dumps({"data": {"not": "a list"}}), encoding="utf-8")
    with pytest.raises(DataError, match="not SQuAD format"):
        data.load_passages(p)
    p.write_text(json.dumps({"id": "a", "text": "JSONL under a .json name"}) + "\n")
    assert data.load_passages(p) == [Passage("a", "", "JSONL under a .json name")]


@pytest.mark.parametrize("name, loader", [("c.jsonl", data.load_passages),
                                          ("notes.txt", data.load_passages),
                                          ("c.json", data.load_passages),
                                          ("q.jsonl", data.load_examples),
                                          ("squad.json", data.load_examples)])
def test_a_file_that_is_not_utf8_is_refused_by_name(tmp_path, name, loader):
    p = tmp_path / name
    p.write_bytes(json.dumps({"id": "1", "text": "Café", "question": "Où?",
                              "answers": ["là"]}, ensure_ascii=False).encode("latin-1"))
    with pytest.raises(DataError, match=rf"{name}: not UTF-8 text; convert it first"):
        loader(p)


# ----------------------------------------------------------------- Hugging Face datasets


def test_built_in_data_as_datasets_round_trip(tmp_path):
    corpus = data.corpus_dataset()
    assert corpus.column_names == ["id", "title", "text"]
    assert corpus.num_rows == len(data.load_corpus())
    assert data.load_passages(corpus.select(range(50))) == data.load_corpus()[:50]
    task = data.task_dataset("verify", "test")
    assert task.column_names == ["question", "answers", "article"]
    task.save_to_disk(str(tmp_path / "verify"))
    assert data.load_examples(tmp_path / "verify") == data.load_task("verify", "test")


def test_a_users_datasets_load_as_examples_and_passages(tmp_path):
    import datasets

    nq_open = datasets.Dataset.from_dict({"question": ["who wrote hamlet"],
                                          "answer": [["Shakespeare", "William Shakespeare"]]})
    nq_open.save_to_disk(str(tmp_path / "nq"))
    assert data.load_examples(tmp_path / "nq") == [
        Example("who wrote hamlet", ["Shakespeare", "William Shakespeare"])]
    squad_hf = datasets.Dataset.from_dict({"question": ["Who?"], "answers": [
        {"text": ["Ada", "Ada"], "answer_start": [0, 0]}]})
    trivia = datasets.Dataset.from_dict({"question": ["Capital of France?"], "answer": [
        {"value": "Paris", "aliases": ["Paris", "City of Light"]}]})
    assert data.load_examples(squad_hf) == [Example("Who?", ["Ada"])]
    assert data.load_examples(trivia) == [Example("Capital of France?",
                                                  ["Paris", "City of Light"])]

    wiki = datasets.Dataset.from_dict({"id": ["1", "2"], "title": ["A", "B"],
                                       "text": ["alpha", "beta"]})
    wiki.save_to_disk(str(tmp_path / "wiki"))
    assert data.load_passages(tmp_path / "wiki") == [Passage("1", "A", "alpha"),
                                                      Passage("2", "B", "beta")]

    datasets.DatasetDict({"train": wiki}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(DataError, match=r"DatasetDict with splits \['train'\]; give one"):
        data.load_passages(tmp_path / "dict")
    no_text = datasets.Dataset.from_dict({"id": ["1"], "body": ["alpha"]})
    with pytest.raises(DataError, match=r"row 0: missing field\(s\) \['text'\]"):
        data.load_passages(no_text)
    with pytest.raises(DataError, match=r"row 0: question without answers"):
        data.load_examples(datasets.Dataset.from_dict({"question": ["q"], "answer": [[]]}))
