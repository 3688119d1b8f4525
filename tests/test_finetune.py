"""`ragbook finetune`, `answer` and `ask --model` on a tiny own corpus (30 built-in passages,
real MiniLM, the shipped BART): every questions format trains, a resumed run equals an
unbroken one, a model refuses a foreign index unless swapped on purpose, `answer` + `eval`
round-trip, and each bad input is one line before any training. The foreign-index test
rebuilds the reference model's index, so it runs after the tests that train over it."""

import json
import shutil

import pytest
from safetensors.torch import load_file

from ragbook import cli, data
from ragbook import finetune as F
from ragbook.generator import SHIPPED

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
TINY = ["--steps", "1", "--batch-size", "2", "--n-docs", "2", "--max-source-length", "64",
        "--lr", "3e-4"]
CFG = dict(steps=3, batch_size=2, n_docs=2, max_source_length=64, eval_every=2)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _squad(path, passages, questions, impossible=()):
    qas = {p.id: [] for p in passages}
    for i, q in enumerate(questions):
        qas[f"{q.article}::0"].append({"id": str(i), "question": q.question,
                                       "answers": [{"text": a, "answer_start": 0}
                                                   for a in q.answers]})
    for q in impossible:
        qas[passages[0].id].append({"id": q, "question": q, "answers": [],
                                    "is_impossible": True})
    path.write_text(json.dumps({"version": "v2.0" if impossible else "1.1", "data": [
        {"title": p.title, "paragraphs": [{"context": p.text, "qas": qas[p.id]}]}
        for p in passages]}))
    return path


@pytest.fixture(scope="module")
def own(tmp_path_factory):
    """An index over 30 built-in passages, cloze questions from them in every format, and one
    model fine-tuned 3 steps (the reference the resumed run must equal)."""
    tmp = tmp_path_factory.mktemp("own")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAGBOOK_CACHE", str(tmp / "cache"))
        passages = [p for p in data.load_corpus()[:60] if p.id.endswith("::0")][:30]
        questions = F.cloze_questions(passages)
        train, dev = questions[:-4], questions[-4:]
        corpus = _jsonl(tmp / "corpus.jsonl", [vars(p) for p in passages])
        assert cli.main(["index", "--corpus", str(corpus), "--out", str(tmp / "ix")]) == 0
        files = {"jsonl": _jsonl(tmp / "train.jsonl", [
                     {"question": q.question, "answers": q.answers} for q in train]),
                 "squad1": _squad(tmp / "train1.json", passages, train),
                 "squad2": _squad(tmp / "train2.json", passages, train, ["Unanswerable?"])}
        data._as_dataset(train).save_to_disk(str(tmp / "train_ds"))
        files["dataset"] = tmp / "train_ds"
        dev_file = _jsonl(tmp / "dev.jsonl", [{"question": q.question, "answers": q.answers}
                                              for q in dev])
        shutil.copytree(tmp / "ix", tmp / "ix_model")
        settings = F.finetune(tmp / "ix_model", train, tmp / "model", dev,
                              F.FinetuneConfig(**CFG), progress=False)
        yield {"tmp": tmp, "passages": passages, "train": train, "dev": dev, "files": files,
               "dev_file": dev_file, "settings": settings, "mp": mp}


def _weights(model_dir):
    return {**load_file(model_dir / "generator" / "model.safetensors"),
            **{f"q.{k}": v for k, v in
               load_file(model_dir / "query_encoder" / "model.safetensors").items()}}


@pytest.mark.parametrize("fmt", ["jsonl", "squad1", "squad2", "dataset"])
def test_each_questions_format_trains(own, capsys, fmt):
    tmp = own["tmp"]
    out = tmp / f"m-{fmt}"
    dev = own["dev_file"] if fmt == "jsonl" else None
    argv = ["finetune", "--index", str(tmp / "ix"), "--train", str(own["files"][fmt]),
            "--out", str(out), *TINY] + (["--dev", str(dev)] if dev else [])
    assert cli.main(argv) == 0, capsys.readouterr().err
    settings = json.loads((out / F.SETTINGS_FILE).read_text())
    assert settings["train"]["questions"] == len(own["train"])
    assert len(settings["history"]) == 1 and settings["history"][0][1] > 0
    assert settings["index"]["fingerprint"] == data.corpus_fingerprint(own["passages"])
    shipped = load_file(SHIPPED / "model.safetensors")
    trained = load_file(out / "generator" / "model.safetensors")
    assert any((trained[k] != v).any() for k, v in shipped.items())  # it learned something
    card = (out / "README.md").read_text()
    assert settings["index"]["fingerprint"][:16] in card
    if dev:
        results = settings["dev"]["results"]
        assert f"F1 {results['f1']:.3f}" in card and results["n"] == len(own["dev"])
    assert not (tmp / f"m-{fmt}-work").exists()  # the checkpoint goes once the model is written


def test_a_resumed_run_equals_an_unbroken_one(own, monkeypatch):
    tmp, out = own["tmp"], own["tmp"] / "resumed"
    real = F.evaluate_model
    monkeypatch.setattr(F, "evaluate_model", lambda *a, **k: (_ for _ in ()).throw(
        KeyboardInterrupt))  # Ctrl-C at step 2, where the dev evaluation runs
    with pytest.raises(KeyboardInterrupt):
        F.finetune(tmp / "ix_model", own["train"], out, own["dev"], F.FinetuneConfig(**CFG),
                   progress=False)
    assert (tmp / "resumed-work" / "checkpoint.pt").exists() and not out.exists()
    monkeypatch.setattr(F, "evaluate_model", real)
    with pytest.raises(data.DataError, match="unfinished run; continue it with --resume"):
        F.finetune(tmp / "ix_model", own["train"], out, own["dev"], F.FinetuneConfig(**CFG))
    with pytest.raises(data.DataError, match="other settings, index or questions"):
        F.finetune(tmp / "ix_model", own["train"][1:], out, own["dev"],
                   F.FinetuneConfig(**CFG), resume=True)
    settings = F.finetune(tmp / "ix_model", own["train"], out, own["dev"],
                          F.FinetuneConfig(**CFG), resume=True, progress=False)
    assert settings["history"] == own["settings"]["history"]
    reference, resumed = _weights(tmp / "model"), _weights(out)
    assert reference.keys() == resumed.keys()
    assert all((reference[k] == resumed[k]).all() for k in reference)


def test_answer_then_eval_round_trip_with_provenance(own, capsys):
    tmp = own["tmp"]
    preds = tmp / "predictions.jsonl"
    assert cli.main(["answer", "--model", str(tmp / "model"), "--questions",
                     str(own["dev_file"]), "--out", str(preds)]) == 0
    printed = capsys.readouterr().out
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["question"] for r in rows] == [q.question for q in own["dev"]]
    ids = {p.id for p in own["passages"]}
    for r in rows:
        assert len(r["provenance"]) == 2 and {d["id"] for d in r["provenance"]} <= ids
        assert abs(sum(d["posterior"] for d in r["provenance"]) - 1) < 1e-4
    assert cli.main(["eval", str(preds)]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["n"] == len(rows) and f"F1 {scores['f1']:.3f}" in printed
    # the same model answers one question from the command line, with its passages
    assert cli.main(["ask", "--model", str(tmp / "model"), own["dev"][0].question]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"answer: {rows[0]['prediction']}\n")
    assert "under RAG-Token" in out and rows[0]["provenance"][0]["id"] in out


def test_a_model_refuses_a_foreign_index_unless_swapped_on_purpose(own, capsys):
    tmp = own["tmp"]
    others = [p for p in data.load_corpus()[60:200] if p.id.endswith("::0")][:10]
    shutil.rmtree(tmp / "ix_model")  # its directory now holds other passages
    assert cli.main(["index", "--corpus", str(_jsonl(tmp / "other.jsonl", map(vars, others))),
                     "--out", str(tmp / "ix_model")]) == 0
    capsys.readouterr()
    argv = ["answer", "--model", str(tmp / "model"), "--questions", str(own["dev_file"]),
            "--out", str(tmp / "p.jsonl")]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "now holds other passages" in err and own["settings"]["index"]["fingerprint"][:16] \
        in err and f"--index {tmp / 'ix_model'}" in err and err.count("\n") == 1
    assert cli.main([*argv, "--index", str(tmp / "ix_model")]) == 0
    assert "hot-swap: answering from" in capsys.readouterr().err
    assert {d["id"] for r in map(json.loads, (tmp / "p.jsonl").read_text().splitlines())
            for d in r["provenance"]} <= {p.id for p in others}


@pytest.fixture
def bad(own, tmp_path, monkeypatch):
    """Files for the bad-input cases; training or loading a model fails the test."""
    def fail(*args, **kwargs):
        raise AssertionError("the command started working before checking its input")

    monkeypatch.setattr(F, "train_rag", fail)
    unanswerable = _squad(tmp_path / "none.json", own["passages"][:1], [], ["A?", "B?"])
    empty = _jsonl(tmp_path / "empty.jsonl", [{"question": "Who?", "answers": []}])
    old = tmp_path / "old-model"
    old.mkdir()
    (old / F.SETTINGS_FILE).write_text(json.dumps({"format": 0, "ragbook": "0.0.1"}))
    (tmp_path / "not-an-index").mkdir()
    return {"unanswerable": unanswerable, "empty": empty, "old": old,
            "ix": own["tmp"] / "ix", "train": own["files"]["jsonl"],
            "not_index": tmp_path / "not-an-index", "out": tmp_path / "m"}


@pytest.mark.parametrize("argv, message", [
    (["finetune", "--index", "{ix}", "--train", "{unanswerable}", "--out", "{out}"],
     "all 2 questions are unanswerable"),
    (["finetune", "--index", "{ix}", "--train", "{empty}", "--out", "{out}"],
     "empty.jsonl:1: question without answers"),
    (["finetune", "--index", "{not_index}", "--train", "{train}", "--out", "{out}"],
     "not an index directory (no meta.json); build one with `ragbook index"),
    (["finetune", "--index", "{ix}", "--train", "{train}", "--out", "{out}", "--steps", "0"],
     "argument --steps: must be at least 1, got 0"),
    (["finetune", "--index", "{ix}", "--train", "{train}", "--out", "{out}",
      "--max-source-length", "512"], "the generator has 256 positions; give at most 256"),
    (["finetune", "--index", "{ix}", "--train", "{train}", "--out", "{out}", "--resume"],
     "nothing to resume: no checkpoint"),
    (["answer", "--model", "{old}", "--questions", "{train}", "--out", "{out}"],
     "model format 0 (ragbook 0.0.1), this ragbook 0.1.0 reads format 1; fine-tune it again"),
    (["ask", "--model", "{old}", "Who?"], "model format 0"),
    (["ask", "--model", "tokn", "Who?"], "give token, sequence, or a model directory"),
])
def test_bad_input_is_one_line_before_training(bad, capsys, argv, message):
    assert cli.main([a.format(**bad) for a in argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("ragbook: error: ") and message in captured.err
    assert not bad["out"].exists()


def test_dev_questions_shared_with_train_are_warned_and_counted(own, capsys, tmp_path):
    shared = _jsonl(tmp_path / "dev.jsonl", [{"question": q.question, "answers": q.answers}
                                             for q in own["train"][:2] + own["dev"][:1]])
    argv = ["finetune", "--index", str(own["tmp"] / "ix"), "--train",
            str(own["files"]["jsonl"]), "--dev", str(shared), "--out", str(tmp_path / "m"),
            *TINY]
    assert cli.main(argv) == 0
    assert "warning: 2 of 3 dev questions are also in --train" in capsys.readouterr().err
    assert json.loads((tmp_path / "m" / F.SETTINGS_FILE).read_text())["dev"][
        "shared_with_train"] == 2


def test_cloze_questions_are_deterministic_spans_of_their_passage():
    passages = data.load_corpus()[:200]
    questions = F.cloze_questions(passages)
    assert questions == F.cloze_questions(passages) and len(questions) > 100
    for q in questions:
        assert q.question.count(F.BLANK) == 1
        sentence = q.question.replace(F.BLANK, q.answers[0])
        assert any(sentence in p.text for p in passages if p.title == q.article)
    assert F.cloze_questions(passages, seed=1) != questions
