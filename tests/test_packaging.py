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
    models = ("closed_book", "rag_sequence", "rag_token", "top1_only", "extract", "reader_gold")
    f1 = dict(zip(models, (0.05, 0.4, 0.45, 0.42, 0.7, 0.6)))
    hits = {name: [1.0] * round(100 * v) + [0.0] * (100 - round(100 * v))
            for name, v in f1.items()}
    sweep = {"k": [1, 5], "f1": [0.3, 0.45], "f1_se": [0.04, 0.05], "recall": [0.5, 0.8]}
    results = {
        "config": {"training_prior": "dense", "retriever": "dense", "verify_prior": None,
                   "ablation_prior": None},
        "reading_qa": {name: {"f1": v, "em": v} for name, v in f1.items()},
        "qgen": {"bart": {"bleu1": 0.1}, "rag_token": {"bleu1": 0.2}},
        "verify": {name: {"accuracy": 0.5, "n": 4, "predicted": {"SUPPORTS": 3, "REFUTES": 1}}
                   for name in ("bart", "rag")},
        "retrieval": {"bm25": rec, "frozen": rec, "finetuned": rec}, "recall_questions": 701,
        "n_docs": 5, "hot_swap": {"facts": 10, "followed": 0.9, "kept": 1.0},
        "k_sweep": {"rag_token": sweep, "rag_sequence": sweep}, "seconds": 12.0,
        "decoding": {"reading-qa": {"num_beams": 1, "method": "thorough"},
                     "qgen": {"num_beams": 4, "method": "fast"},
                     "verify": {"scored_labels": ["SUPPORTS", "REFUTES"]}},
        "hits": {"em": hits, "f1": hits},
    }
    table = results_table(results)
    assert f"| | RAG-Token (dense prior) | 45.0 / 45.0 | {PAPER['rag_token']} |" in table
    assert f"| 70.0 / 70.0 | {PAPER['extract']} |" in table  # retrieve-and-extract
    assert "| 50.0 / 80.0 / 90.0 |" in table and "k=5: 45.0 ± 5.0" in table
    assert "| 50.0 (said: 75.0% SUPPORTS, 25.0% REFUTES) | 81.1 |" in table
    assert "| 90.0 / 100.0 |" in table  # hot-swap: followed / back with the old index
    assert "hybrid" not in table and "ablation" not in table  # no ablation prior asked for

    # the ablation: the same RAG-Token read with the product of experts
    results["config"]["ablation_prior"] = "hybrid"
    results["reading_qa"]["rag_token_ablation"] = {"f1": 0.5, "em": 0.48}
    results["hits"]["f1"]["rag_token_ablation"] = [1.0] * 50 + [0.0] * 50
    table = results_table(results)
    assert "| | RAG-Token read with the hybrid prior (ablation, no retraining) | 50.0 / 48.0 |" \
        in table
    assert "**The prior, ablated**" in table


def test_eval_command_scores_a_predictions_file(tmp_path, capsys):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "q", "prediction": "The Beatles", "answers": ["Beatles"]}\n'
                    '{"question": "r", "prediction": "x", "answers": ["y"]}\n')
    assert cli.main(["eval", str(path)]) == 0
    assert '"em": 0.5' in capsys.readouterr().out
    path.write_text('{"question": "q"}\n')
    assert cli.main(["eval", str(path)]) == 2
