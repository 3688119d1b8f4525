"""Graded exercises on otter-grader: build the student and autograder versions, grade submissions.

One master notebook per assignment, ``exercises/source/NN_name.ipynb``, in otter's assign format
(solutions, public tests, hidden tests). :func:`build` runs ``otter assign`` on each: the
autograder zip (every test, checked against the reference solution) goes to ``--out``; the
student notebook (no solution, no hidden test) is written to ``exercises/student/``, where a
learner or a Colab badge opens it. :func:`grade` runs ``otter run`` on each submission in its own
process and temporary directory, with a time limit and no network, and turns what comes back,
or what went wrong, into one row per submission and question.

The public tests travel inside the student notebook's first code cell (:func:`unpack_tests`):
otter reads tests from a notebook's metadata only where it can find the notebook file, which
Colab never gives it ("Tests directory ./tests does not exist"), so the cell writes them to a
temporary tests directory and points ``otter.Notebook`` at it, in Jupyter and on Colab alike.
"""

from __future__ import annotations

import ast
import contextlib
import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from .artifacts import atomic_write_bytes

EXERCISES = Path(__file__).resolve().parent.parent / "exercises"
TIMEOUT = 300.0  # seconds per submission: every assignment grades in well under it on 2 cores
INIT_CELL = '''\
# Initialize Otter. The public tests travel inside this cell, so grader.check("q1") works wherever
# the notebook is opened: Jupyter, or Colab straight from the repository (no tests/ folder needed).
import otter
from ragbook.exercises import unpack_tests

grader = otter.Notebook(tests_dir=unpack_tests({tests}))'''
# Loaded by every Python process of a grading run (sitecustomize): no connection leaves the
# machine. The kernel's own channels (ZeroMQ on 127.0.0.1) are unaffected.
NO_NETWORK = '''\
import ipaddress, socket

_connect = socket.socket.connect


def _local_only(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and host != "localhost":
        try:
            local = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            local = False
        if not local:
            raise OSError(f"grading runs offline: connection to {host} refused")
    return _connect(self, address)


socket.socket.connect = _local_only
'''
# Also there: jsonschema (under nbformat, under otter, imported by otter and again by the kernel)
# compiles some 35 Earley parsers for its "iri" formats at import when rfc3987-syntax is
# installed (jupyterlab brings it): seconds of every grading, for formats no notebook schema uses
# (python-jsonschema/jsonschema#1428). Marked absent, jsonschema leaves those formats unchecked.
SKIP_SLOW_IMPORTS = '''
import sys

sys.modules.setdefault("rfc3987_syntax", None)
'''


class ExerciseError(ValueError):
    """Bad input to ``ragbook exercises``: the CLI prints it as one line."""


@dataclass
class Score:
    """One row of the grade sheet: a submission's points on one question (or its total)."""

    submission: str
    assignment: str
    question: str
    points: float
    max_points: float
    reason: str = ""


# --------------------------------------------------------------------------- the learner's side


def unpack_tests(tests: dict[str, str]) -> str:
    """Write otter test files ``{question: source}`` to a fresh directory; return its path."""
    directory = Path(tempfile.mkdtemp(prefix="ragbook-otter-tests-"))
    for question, source in tests.items():
        (directory / f"{question}.py").write_text(source)
    return str(directory)


# --------------------------------------------------------------------------- build


def masters(source: str | Path = EXERCISES / "source") -> list[Path]:
    """The master notebooks, in course order."""
    found = sorted(Path(source).glob("[0-9][0-9]_*.ipynb"))
    if not found:
        raise ExerciseError(f"{source}: no master notebooks NN_name.ipynb; run from a clone of "
                            "the ragbook repository or give --source DIR")
    return found


def student_notebook(otter_student: Path) -> bytes:
    """otter's student notebook with its init cell replaced by one carrying the public tests,
    placed after the title cell (the first cell stays the notebook's Markdown title)."""
    import nbformat

    nb = nbformat.read(otter_student, as_version=4)
    meta = nb.metadata["otter"]
    meta.pop("OK_FORMAT")  # otter reads the two together; the tests now live in the init cell
    tests = meta.pop("tests")
    init = next(c for c in nb.cells if c.cell_type == "code" and "otter.Notebook(" in c.source)
    nb.cells.remove(init)
    init.source = INIT_CELL.format(tests=json.dumps(tests, indent=1))
    title = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown")
    nb.cells.insert(title + 1, init)
    return nbformat.writes(nb).encode() + b"\n"


def build(out: str | Path, source: str | Path = EXERCISES / "source",
          student_dir: str | Path | None = EXERCISES / "student",
          timeout: float = TIMEOUT, jobs: int = 1) -> list[dict]:
    """Run ``otter assign`` on every master notebook.

    Writes ``out/NN_name-autograder.zip`` (all tests) and ``student_dir/NN_name.ipynb``, once
    the reference solution (otter's autograder notebook) has scored full marks through
    :func:`grade_one`, as a submission would; refuses otherwise. ``jobs`` references are graded
    at once, as in :func:`grade`. Returns one record per assignment: name, total points, number
    of questions, seconds (otter assign and the grading of its reference).
    """
    from otter.assign import main as otter_assign

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="ragbook-assign-") as tmp:
        assigned = []  # (master, autograder zip, seconds otter assign took)
        for master in masters(source):
            start = time.perf_counter()
            result = Path(tmp) / master.stem
            try:  # otter's own check of the reference runs in-process, without a time limit:
                otter_assign(str(master), str(result), no_run_tests=True)  # grade_one runs it
            except Exception as e:  # otter's message: a format error in the master notebook
                raise ExerciseError(f"{master.name}: otter assign failed: {e}") from e
            assigned.append((master, next((result / "autograder").glob("*-autograder_*.zip")),
                             time.perf_counter() - start))

        def reference(job: tuple[Path, Path, float]) -> tuple[list[Score], float]:
            master, zipped, _ = job
            start = time.perf_counter()
            rows = grade_one(zipped.parent / master.name, zipped.parent, timeout, zipped,
                             _share(jobs))
            return rows, time.perf_counter() - start

        for (master, zipped, assigning), (rows, grading) in zip(
                assigned, _pool(reference, assigned, jobs)):
            if rows[-1].points != rows[-1].max_points:
                failed = "; ".join(f"{r.question}: {r.reason}" for r in rows[:-1]
                                   if r.points != r.max_points)
                raise ExerciseError(f"{master.name}: the reference solution scores "
                                    f"{rows[-1].points:g}/{rows[-1].max_points:g} "
                                    f"({failed}); fix the master notebook")
            atomic_write_bytes(out / f"{master.stem}-autograder.zip", zipped.read_bytes())
            if student_dir is not None:
                atomic_write_bytes(Path(student_dir) / master.name, student_notebook(
                    zipped.parent.parent / "student" / master.name))
            records.append({"assignment": master.stem, "points": rows[-1].max_points,
                            "questions": len(rows) - 1,
                            "seconds": round(assigning + grading, 1)})
    return records


_RUNNING: set[int] = set()  # process groups of the otter runs under way


def _pool(work: Callable, items: list, jobs: int) -> Iterator:
    """``work`` over ``items``, ``jobs`` at once, results in order: threads, each waiting on
    the grading process it started (one per CPU core is the most that helps). Stopped early,
    what has not started is cancelled and what has is killed, so that no otter run outlives
    the command."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        yield from pool.map(work, items)
    except BaseException:  # Ctrl-C, SIGTERM (``ragbook`` turns it into Ctrl-C), an error
        for group in list(_RUNNING):  # the gradings under way die with the batch
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGKILL)
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def _share(jobs: int) -> int:
    """Each of ``jobs`` gradings' share of the CPU cores: with more threads than cores, torch's
    thread barriers make every one of them slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, jobs))


# --------------------------------------------------------------------------- grade


def max_points(autograder: str | Path) -> dict[str, float]:
    """``{question: points}`` read off an autograder zip's otter test files."""
    import zipfile

    points = {}
    with zipfile.ZipFile(autograder) as z:
        for name in sorted(z.namelist()):
            if name.startswith("tests/") and name.endswith(".py"):
                tree = ast.parse(z.read(name))
                value = next(ast.literal_eval(n.value) for n in tree.body
                             if isinstance(n, ast.Assign) and n.targets[0].id == "points")
                points[Path(name).stem] = float(value)
    return points


def assignment_of(path: Path) -> str:
    """The assignment a submission is for, from its notebook metadata (never its file name).

    Raises ``ValueError`` with the reason when the file is not a notebook or names none.
    """
    try:
        nb = json.loads(path.read_text(encoding="utf-8"))
        name = nb["metadata"]["otter"]["assignment_name"]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError, IndexError) as e:
        raise ValueError(f"not an exercise notebook ({type(e).__name__}: {e})") from None
    if not isinstance(name, str):
        raise ValueError("not an exercise notebook (no assignment name in its metadata)")
    return name


def submissions_in(paths: list[str | Path]) -> list[Path]:
    """Files as given, and every ``*.ipynb`` under a directory."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.ipynb") if ".ipynb_checkpoints" not in q.parts)
        elif p.is_file():
            found.append(p)
        else:
            raise ExerciseError(f"{p}: no such file or directory")
    return found


def _run_otter(submission: Path, autograder: Path, timeout: float,
               threads: int | None = None) -> tuple[dict | None, str]:
    """``otter run`` in its own process and temporary directory: (results.json or None, why).
    ``threads``: its share of the CPU cores (OpenMP threads), unless OMP_NUM_THREADS is set."""
    with tempfile.TemporaryDirectory(prefix="ragbook-grade-") as tmp:
        work = Path(tmp)
        (work / "guard").mkdir()
        (work / "guard" / "sitecustomize.py").write_text(NO_NETWORK + SKIP_SLOW_IMPORTS)
        shutil.copy(autograder, work / "autograder.zip")
        shutil.copy(submission, work / "submission.ipynb")
        env = dict(os.environ, TMPDIR=str(work), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", MPLBACKEND="Agg",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(work / "guard"),
                                                            os.environ.get("PYTHONPATH")])))
        if threads and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(threads)
        cmd = [sys.executable, "-m", "otter", "run", "--no-logo", "-a", "autograder.zip",
               "-o", "results", "submission.ipynb"]
        (work / "results").mkdir()
        proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                start_new_session=True)
        _RUNNING.add(proc.pid)
        try:
            log, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # otter, its kernel, anything they started
            proc.communicate()
            return None, f"timed out after {timeout:g} s"
        finally:
            _RUNNING.discard(proc.pid)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
        results = work / "results" / "results.json"
        if results.exists():
            return json.loads(results.read_text()), ""
        lines = [line for line in log.decode(errors="replace").splitlines() if line.strip()]
        last = lines[-1] if lines else f"exit status {proc.returncode}"
        return None, f"otter run failed: {last}"


def _reason(output: str) -> str:
    """The first line of a failed test's report that says what went wrong."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "assert" in line.lower()]
    return (errors[-1] if errors else lines[-1] if lines else "failed")[:200]


def grade_one(submission: Path, autograders: Path, timeout: float = TIMEOUT,
              autograder: Path | None = None, threads: int | None = None) -> list[Score]:
    """Grade one submission: a row per question of its assignment, then its total.

    The autograder is ``autograders/NAME-autograder.zip`` for the assignment NAME the
    notebook's metadata gives, unless ``autograder`` is given. ``threads``: as in
    :func:`_run_otter`."""
    try:
        name = assignment_of(submission)
    except ValueError as e:
        return [Score(str(submission), "", "total", 0.0, 0.0, str(e))]
    autograder = autograder or autograders / f"{name}-autograder.zip"
    if not autograder.exists():
        return [Score(str(submission), name, "total", 0.0, 0.0,
                      f"unknown assignment {name!r}: no {autograder.name} in {autograders}")]
    possible = max_points(autograder)
    results, why = _run_otter(submission, autograder, timeout, threads)
    got = {t["name"]: t for t in (results or {}).get("tests", []) if t["name"] in possible}
    rows = []
    for question, top in possible.items():
        test = got.get(question)
        points = float(test.get("score") or 0.0) if test else 0.0
        reason = why or ("" if points == top else _reason(test.get("output", "")) if test
                         else "not graded")
        rows.append(Score(str(submission), name, question, points, top, reason))
    rows.append(Score(str(submission), name, "total", sum(r.points for r in rows),
                      sum(possible.values()), why))
    return rows


def grade(submissions: list[str | Path], autograders: str | Path, out_csv: str | Path,
          timeout: float = TIMEOUT, progress: bool = True, jobs: int = 1) -> list[Score]:
    """Grade every submission (files, or directories of ``*.ipynb``) against the autograder
    zips in ``autograders``; write ``out_csv`` and the same rows as JSON beside it
    (``.json``), in the order of the submissions. A submission that fails in any way scores
    zero where it did not run and says why; the batch always goes on. ``jobs`` submissions
    are graded at once, each still in its own process (one per CPU core is the most that
    helps)."""
    from tqdm.auto import tqdm

    autograders = Path(autograders)
    if not sorted(autograders.glob("*-autograder.zip")):
        raise ExerciseError(f"{autograders}: no autograder zips; build them first with "
                            f"`ragbook exercises build --out {autograders}`")
    files = submissions_in(submissions)
    if not files:
        raise ExerciseError("no submissions found; give notebooks or directories of them")
    rows: list[Score] = []
    threads = _share(jobs)
    graded = _pool(lambda path: grade_one(path, autograders, timeout, threads=threads), files,
                   jobs)
    for one in tqdm(graded, total=len(files), desc="grading", unit="submission",
                    disable=not progress):
        rows += one
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(Score.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(asdict(r) for r in rows)
    out_csv = Path(out_csv)
    atomic_write_bytes(out_csv, buffer.getvalue().encode())
    atomic_write_bytes(out_csv.with_suffix(".json"),
                       json.dumps([asdict(r) for r in rows], indent=1).encode())
    return rows
