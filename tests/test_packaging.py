"""The setup files agree with each other, and the CLI and cache behave."""

import re
from pathlib import Path

import tomllib
import yaml

from ragbook import artifacts, cli

ROOT = Path(__file__).resolve().parents[1]
CONDA_NAMES = {"pytorch": "torch"}


def names(requirements):
    return {re.split(r"[<>=!~ \[]", r)[0].strip().lower() for r in requirements}


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    wanted = names(project["dependencies"]) | set().union(*(names(extras[e]) for e in extras))
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = set()
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            listed |= names(d for d in dep["pip"] if not d.startswith("-"))
        else:
            listed |= {CONDA_NAMES.get(n, n) for n in names([dep])}
    listed -= {"python", "pip"}
    assert listed == wanted
    course = {"jupyterlab", "torch", "transformers", "faiss-cpu", "datasets", "matplotlib",
              "nbval", "pytest"}
    assert course <= wanted


def test_cached_builds_once_and_an_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("RAGBOOK_CACHE", str(tmp_path))
    calls = []

    def build(d):
        calls.append(d)
        (d / "x.txt").write_text("done")

    a = artifacts.cached("demo", {"n": 1}, build)
    assert artifacts.cached("demo", {"n": 1}, build) == a and len(calls) == 1
    assert (a / "x.txt").read_text() == "done"

    def crash(d):
        (d / "half.txt").write_text("half")
        raise KeyboardInterrupt

    try:
        artifacts.cached("demo", {"n": 2}, crash)
    except KeyboardInterrupt:
        pass
    assert not artifacts.artifact_path("demo", {"n": 2}).exists()
    assert list((tmp_path / "demo").iterdir()) == [a]


def test_reproduce_prints_the_statistics(capsys):
    assert cli.main(["reproduce", "--data-only"]) == 0
    out = capsys.readouterr().out
    assert "| articles | 10,033 |" in out
    for task in ("entity-qa", "qgen", "verify"):
        assert f"| {task} |" in out


def test_results_table_puts_ours_beside_the_paper_in_percent():
    from ragbook.reproduce import PAPER, results_table

    rec = {"recall@1": 0.5, "recall@5": 0.8, "recall@20": 0.9}
    results = {
        "entity_qa": {"closed_book": {"em": 0.01}, "rag_sequence": {"em": 0.4},
                      "rag_token": {"em": 0.45}},
        "baselines": {"top1_title_em": 0.38, "top1_title_em_finetuned": 0.45},
        "qgen": {"bart": {"bleu1": 0.1}, "rag_token": {"bleu1": 0.2}},
        "verify": {"bart": {"accuracy": 0.5}, "rag": {"accuracy": 0.6}},
        "retrieval": {"bm25": rec, "frozen": rec, "finetuned": rec},
        "hot_swap": {"facts": 10, "followed": 0.9},
        "k_sweep": {"k": [1, 5], "em": [0.3, 0.45], "recall": [0.5, 0.8]},
        "seconds": 12.0,
    }
    table = results_table(results)
    assert f"| | RAG-Token (dense prior) | 45.0 | {PAPER['rag_token']} |" in table
    assert "| 50.0 / 80.0 / 90.0 |" in table and "k=5: 45.0" in table
    assert "dense prior with RAG-Token's BERT_q (no generator) | 45.0 |" in table  # beside RAG's EM
    assert "hybrid" not in table

    # trained with the paper's dense prior, read with the product of experts
    results["config"] = {"training_prior": "dense", "retriever": "hybrid"}
    results["retrieval"]["hybrid"] = {"recall@1": 0.6, "recall@5": 0.85, "recall@20": 0.95}
    results["recall_questions"] = 976
    table = results_table(results)
    assert ("| | RAG-Sequence (trained with the dense prior, read with the hybrid one) | 40.0 |"
            in table)
    assert ("(Figure 3, centre, 976 test questions) | hybrid (dense × BM25), BERT_q trained "
            "jointly with the dense prior | 60.0 / 85.0 / 95.0 |") in table


def test_eval_command_scores_a_predictions_file(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "q", "prediction": "The Beatles", "answers": ["Beatles"]}\n'
                    '{"question": "r", "prediction": "x", "answers": ["y"]}\n')
    assert cli.main(["eval", str(path)]) == 0
    assert '"em": 0.5' in capsys.readouterr().out
    path.write_text('{"question": "q"}\n')
    assert cli.main(["eval", str(path)]) == 2
