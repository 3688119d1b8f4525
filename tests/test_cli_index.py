"""`ragbook index` and `ragbook search` on a tiny own corpus: dense (real MiniLM), BM25 and
their rank fusion."""

import json

import pytest

from ragbook import cli

PASSAGES = [
    ("paris", "Paris", "Paris is the capital and largest city of France, on the Seine."),
    ("berlin", "Berlin", "Berlin is the capital of Germany and its largest city."),
    ("everest", "Mount Everest", "Mount Everest is Earth's highest mountain above sea level."),
    ("photo", "Photosynthesis", "Plants use sunlight, water and carbon dioxide to make sugar."),
    ("jupiter", "Jupiter", "Jupiter is the fifth planet from the Sun and the largest one."),
    ("violin", "Violin", "The violin is a wooden string instrument played with a bow."),
    ("python", "Python", "Python is a programming language known for its readability."),
    ("nile", "Nile", "The Nile is a major river in Africa, flowing into the Mediterranean."),
]
QUESTIONS = [("What is the highest mountain on Earth?", "everest"),
             ("Which string instrument is played with a bow?", "violin")]


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGBOOK_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "title": t, "text": x}) + "\n"
                              for i, t, x in PASSAGES))
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": q, "answers": [a]}) + "\n"
                                 for q, a in QUESTIONS))
    return tmp_path, corpus, questions


def _search_json(capsys, index, questions, k=3):
    capsys.readouterr()
    assert cli.main(["search", "--index", str(index), "--questions", str(questions),
                     "-k", str(k), "--json"]) == 0
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_dense_index_then_search_json(files, capsys):
    tmp, corpus, questions = files
    assert cli.main(["index", "--corpus", str(corpus), "--out", str(tmp / "ix"),
                     "--index-type", "hnsw"]) == 0
    meta = json.loads((tmp / "ix" / "meta.json").read_text())
    assert meta["kind"] == "hnsw" and meta["count"] == len(PASSAGES) and meta["dim"] == 384
    records = _search_json(capsys, tmp / "ix", questions)
    assert [r["question"] for r in records] == [q for q, _ in QUESTIONS]
    for record, (_, gold) in zip(records, QUESTIONS):
        assert record["answers"] == [gold]
        assert len(record["passages"]) == 3
        assert set(record["passages"][0]) == {"id", "title", "text", "score"}
        assert record["passages"][0]["id"] == gold
        scores = [p["score"] for p in record["passages"]]
        assert scores == sorted(scores, reverse=True)
    assert cli.main(["search", "--index", str(tmp / "ix"), "largest", "planet", "-k", "1"]) == 0
    assert "[Jupiter]" in capsys.readouterr().out


def test_bm25_index_then_search_json(files, capsys):
    tmp, corpus, questions = files
    assert cli.main(["index", "--corpus", str(corpus), "--out", str(tmp / "bm"),
                     "--retriever", "bm25"]) == 0
    records = _search_json(capsys, tmp / "bm", questions, k=2)
    assert [r["passages"][0]["id"] for r in records] == [a for _, a in QUESTIONS]


def test_fusion_index_fuses_the_dense_and_bm25_rankings(files, capsys):
    from ragbook.index import open_index
    from ragbook.retriever import reciprocal_rank_fusion

    tmp, corpus, questions = files
    assert cli.main(["index", "--corpus", str(corpus), "--out", str(tmp / "fu"),
                     "--retriever", "fusion"]) == 0
    assert json.loads((tmp / "fu" / "meta.json").read_text())["retriever"] == "fusion"
    records = _search_json(capsys, tmp / "fu", questions, k=4)
    assert [r["passages"][0]["id"] for r in records] == [a for _, a in QUESTIONS]
    # the fused ranking is RRF over what the two halves of the index find on their own
    parts = [open_index(tmp / "fu" / part) for part in ("dense", "bm25")]
    qs = [q for q, _ in QUESTIONS]
    fused = reciprocal_rank_fusion([r.search(qs, len(PASSAGES)) for r in parts], 4)
    assert [[p["id"] for p in r["passages"]] for r in records] == fused.ids


def test_a_rank_fusion_index_saved_as_hybrid_asks_for_a_rebuild(files, capsys):
    tmp, corpus, _ = files
    assert cli.main(["index", "--corpus", str(corpus), "--out", str(tmp / "old"),
                     "--retriever", "bm25"]) == 0
    (tmp / "old" / "meta.json").write_text(json.dumps({"format": 1, "retriever": "hybrid",
                                                       "parts": ["dense", "bm25"]}))
    capsys.readouterr()
    assert cli.main(["search", "--index", str(tmp / "old"), "capital"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "ragbook index --retriever fusion" in err


def test_squad_and_plain_text_corpora_are_read(tmp_path, capsys):
    squad = tmp_path / "squad.json"
    squad.write_text(json.dumps({"data": [{"title": "Nile", "paragraphs": [
        {"context": "The Nile flows north into the Mediterranean.", "qas": []}]}]}))
    text = tmp_path / "notes.txt"
    text.write_text("First paragraph about violins.\n\nSecond paragraph about rivers.\n")
    for corpus, n in ((squad, 1), (text, 2)):
        out = tmp_path / corpus.stem
        assert cli.main(["index", "--corpus", str(corpus), "--out", str(out),
                         "--retriever", "bm25"]) == 0
        assert json.loads((out / "meta.json").read_text())["count"] == n


@pytest.mark.parametrize("argv,message", [
    (["index", "--corpus", "{tmp}/missing.jsonl", "--out", "{tmp}/o"], "no such file"),
    (["index", "--corpus", "{tmp}/bad.json", "--out", "{tmp}/o"], "not SQuAD format"),
    (["search", "--index", "{tmp}/nowhere", "a question"], "no such index directory"),
    (["search", "--index", "{tmp}", "--json"], "give a question"),
    (["search", "--index", "{tmp}", "a question", "--questions", "{tmp}/q.jsonl"], "not both"),
    (["search", "--index", "{tmp}", "--questions", "{tmp}/v2.json"], "all 2 questions are "
     "unanswerable"),
    (["index", "--corpus", "{tmp}/latin1.txt", "--out", "{tmp}/o"], "not UTF-8"),
    (["index", "--corpus", "{tmp}/bad.json", "--out", "{tmp}/bad.json"], "a file is in the way"),
])
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, argv, message):
    (tmp_path / "bad.json").write_text(json.dumps({"data": {"not": "a list"}}))
    unanswerable = [{"id": str(i), "question": f"Why {i}?", "answers": [], "is_impossible": True}
                    for i in range(2)]
    (tmp_path / "v2.json").write_text(json.dumps({"version": "v2.0", "data": [
        {"title": "T", "paragraphs": [{"context": "Some text.", "qas": unanswerable}]}]}))
    (tmp_path / "latin1.txt").write_bytes("Café au lait, crème brûlée.".encode("latin-1"))
    assert cli.main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ragbook: error: ") and err.count("\n") == 1  # one line
    assert message in err


def test_search_refuses_a_corrupted_index(files, capsys):
    tmp, corpus, questions = files
    assert cli.main(["index", "--corpus", str(corpus), "--out", str(tmp / "bm"),
                     "--retriever", "bm25"]) == 0
    passages = tmp / "bm" / "passages.jsonl"
    passages.write_text(passages.read_text().replace("Paris", "Lyon"))
    assert cli.main(["search", "--index", str(tmp / "bm"), "capital"]) == 2
    assert "do not match" in capsys.readouterr().err


def test_index_from_streamed_shards_then_search(files, capsys):
    tmp, corpus, questions = files
    assert cli.main(["index", "--corpus", str(corpus), "--out", str(tmp / "ix"),
                     "--shard-size", "3"]) == 2  # flat cannot be built from shards
    assert "--index-type ivfpq" in capsys.readouterr().err
    assert cli.main(["index", "--corpus", str(corpus), "--out", str(tmp / "ix"),
                     "--index-type", "ivfpq", "--shard-size", "3"]) == 0
    meta = json.loads((tmp / "ix" / "meta.json").read_text())
    assert meta["shard_size"] == 3 and meta["count"] == len(PASSAGES)
    assert (tmp / "ix" / "index.ivfdata").is_file()
    records = _search_json(capsys, tmp / "ix", questions)
    assert [r["passages"][0]["id"] for r in records] == [gold for _, gold in QUESTIONS]
