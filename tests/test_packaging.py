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
    wanted = names(project["dependencies"]) | names(project["optional-dependencies"]["dev"])
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
