"""Graded exercises: build the student notebooks and the autograders, grade submissions.

One master notebook per assignment, ``exercises/source/NN_name.ipynb``, in otter's assign format
(solutions, public tests), and beside it ``NN_name.py``, its hidden tests. :func:`build` runs
``otter assign`` for the student notebook (no solution; the public tests travel in its init cell,
:func:`unpack_tests`; the Colab badge and setup cell on top) and writes the autograder,
``NN_name-autograder.zip``: the questions, their points and public tests, and the hidden tests.

:func:`grade` scores a submission against tests it cannot reach. Its notebook runs in a sandbox
(:mod:`ragbook.sandbox`: no network, its own filesystem view, limits, its process tree killed
at the end), where :mod:`ragbook.grading` executes its cells and calls its functions on the
inputs the grader sends — public tests' and hidden ones', drawn at grading time from a seed
per submission. The values come back as data; the grader compares them with the reference it
computes in its own process, so nothing the submission does to its own process can raise its
score. Public tests are worth :data:`PUBLIC_SHARE` of a question's points, hidden ones the rest.
A submission that reaches for the grader's machinery is scored the same way and flagged.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import os
import re
import sys
import tempfile
import time
import types
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .artifacts import atomic_write_bytes
from .gradebook import Feedback, Score, write
from .grading import (
    PACKAGE,
    UNAVAILABLE,
    Case,
    cell_code,
    compare,
    decode,
    encode,
    expect,
    probe,
    public_case,
    public_tests,
)

__all__ = ["build", "grade", "grade_one", "expect", "unpack_tests", "ExerciseError", "Score"]

EXERCISES = Path(__file__).resolve().parent.parent / "exercises"
TIMEOUT = 300.0  # seconds per submission: every assignment grades in well under it on 2 cores
PUBLIC_SHARE = 0.2  # of each question's points: the rest is the hidden tests'
ASSIGNMENT_NAME = re.compile(r"\d\d_[a-z0-9_]{1,60}")
MAX_NOTEBOOK = 20 * 2**20  # bytes: a larger submission is not graded
INIT_CELL = '''\
# Initialize Otter. The public tests travel inside this cell, so grader.check("q1") works wherever
# the notebook is opened: Jupyter, or Colab straight from the repository (no tests/ folder needed).
import otter
from ragbook.exercises import unpack_tests

grader = otter.Notebook(tests_dir=unpack_tests({tests}))'''


class ExerciseError(ValueError):
    """Bad input to ``ragbook exercises``: the CLI prints it as one line."""


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


def questions_of(master: Path) -> list[dict]:
    """Each question of a master notebook: name, points, and its public tests (the ``expect``
    calls of its test cells, as (function, args, expected, tol))."""
    import nbformat

    questions = []
    for cell in nbformat.read(master, as_version=4).cells:
        text = cell.source.strip()
        if cell.cell_type == "raw" and text.startswith("# BEGIN QUESTION"):
            config = dict(line.split(":", 1) for line in text.splitlines()[1:] if ":" in line)
            questions.append({"name": config["name"].strip(),
                              "points": float(config["points"]), "public": []})
        elif cell.cell_type == "code" and questions and "expect(" in cell.source:
            questions[-1]["public"] += public_tests(cell.source)
    for q in questions:
        if len(q["public"]) < 2:
            raise ExerciseError(f"{master.name} {q['name']}: give at least two public cases "
                                "(expect(...) calls) in its test cell")
    return questions


def student_notebook(otter_student: Path) -> bytes:
    """otter's student notebook with its init cell replaced by one carrying the public tests,
    placed after the title cell, and the Colab badge and setup cell on top (``make colab``)."""
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
    nb.cells = _colab_cells(nb, f"exercises/student/{otter_student.name}") + nb.cells
    return nbformat.writes(nb).encode() + b"\n"


def _colab_cells(nb, path: str) -> list:
    """The Colab badge and setup cell that ``notebooks/colab.py`` (``make colab``) writes."""
    import importlib.util

    script = EXERCISES.parent / "notebooks" / "colab.py"
    if not script.exists():
        return []
    spec = importlib.util.spec_from_file_location("ragbook_colab", script)
    colab = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(colab)
    return colab.generated_cells(nb, path)


def build(out: str | Path, source: str | Path = EXERCISES / "source",
          student_dir: str | Path | None = EXERCISES / "student",
          timeout: float = TIMEOUT, jobs: int = 1) -> list[dict]:
    """Build every assignment: ``out/NN_name-autograder.zip`` and ``student_dir/NN_name.ipynb``,
    once the reference solution has scored full marks through :func:`grade_one`, as a
    submission would; refuses otherwise. Returns one record per assignment: name, total
    points, number of questions, seconds."""
    from otter.assign import main as otter_assign

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    with tempfile.TemporaryDirectory(prefix="ragbook-assign-") as tmp:
        built = []  # (master, autograder zip, reference notebook, student notebook, seconds)
        for master in masters(source):
            start = time.perf_counter()
            hidden = master.with_suffix(".py")
            if not hidden.exists():
                raise ExerciseError(f"{master.name}: no hidden tests {hidden.name} beside it")
            result = Path(tmp) / master.stem
            try:
                otter_assign(str(master), str(result), no_run_tests=True)
            except Exception as e:  # otter's message: a format error in the master notebook
                raise ExerciseError(f"{master.name}: otter assign failed: {e}") from e
            zipped = result / f"{master.stem}-autograder.zip"
            with zipfile.ZipFile(zipped, "w") as z:
                z.writestr("assignment.json", json.dumps(
                    {"name": master.stem, "questions": questions_of(master)}, indent=1))
                z.writestr("hidden.py", hidden.read_text())
            built.append((master, zipped, result / "autograder" / master.name,
                          result / "student" / master.name, time.perf_counter() - start))

        def reference(job: tuple) -> tuple[list[Score], float]:
            master, zipped, notebook, _, _ = job
            start = time.perf_counter()
            rows, _ = grade_one(notebook, {master.stem: load(zipped)}, seed=0,
                                timeout=timeout, threads=_share(jobs))
            return rows, time.perf_counter() - start

        for (master, zipped, _, student, assigning), (rows, grading) in zip(
                built, _pool(reference, built, jobs)):
            total = rows[-1]
            if total.points != total.max_points or total.flag:
                failed = "; ".join(f"{r.question}: {r.reason or r.flag}" for r in rows
                                   if r.points != r.max_points or r.flag)
                raise ExerciseError(f"{master.name}: the reference solution scores "
                                    f"{total.points:g}/{total.max_points:g} ({failed}); fix "
                                    "the master notebook or its hidden tests")
            atomic_write_bytes(out / zipped.name, zipped.read_bytes())
            if student_dir is not None:
                atomic_write_bytes(Path(student_dir) / master.name, student_notebook(student))
            records.append({"assignment": master.stem, "points": total.max_points,
                            "questions": len(rows) - 1,
                            "seconds": round(assigning + grading, 1)})
    return records


# --------------------------------------------------------------------------- the autograder


@dataclass
class Assignment:
    """An autograder, loaded: its questions (points, public tests) and hidden tests."""

    name: str
    questions: list[dict]
    hidden: types.ModuleType

    def cases(self, question: dict, seed: int) -> tuple[list[Case], list[Case]]:
        """A question's public cases and its hidden ones, drawn with ``seed``."""
        public = [public_case(*p) for p in question["public"]]
        hidden = getattr(self.hidden, question["name"])(seed)
        return public, hidden


def load(autograder: str | Path) -> Assignment:
    """Read ``NN_name-autograder.zip``; its hidden tests are the instructor's code and run in
    the grader's process."""
    with zipfile.ZipFile(autograder) as z:
        meta = json.loads(z.read("assignment.json"))
        source = z.read("hidden.py").decode()
    return Assignment(meta["name"], meta["questions"], hidden_tests(source, meta["name"]))


def hidden_tests(source: str, name: str) -> types.ModuleType:
    """An assignment's hidden tests (``NN_name.py``), as a module: ``FORBID``, the references
    guarded while the submission runs, and ``q1(seed)``, ``q2(seed)``, … drawing its cases."""
    module = types.ModuleType(f"ragbook_hidden_{name}")
    module.__file__ = f"{name}-autograder.zip/hidden.py"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def autograders_in(directory: str | Path) -> dict[str, Assignment]:
    """Every autograder in ``directory``, by assignment name."""
    found = sorted(Path(directory).glob("*-autograder.zip"))
    if not found:
        raise ExerciseError(f"{directory}: no autograder zips; build them first with "
                            f"`ragbook exercises build --out {directory}`")
    return {a.name: a for a in map(load, found)}


# --------------------------------------------------------------------------- one submission


def submissions_in(paths: list[str | Path]) -> list[Path]:
    """Files as given, and every ``*.ipynb`` under a directory — not the resource forks macOS
    zips add (``__MACOSX/``, ``._name``) nor Jupyter's checkpoints."""
    found = []
    for p in map(Path, paths):
        if p.is_dir():
            found += sorted(q for q in p.rglob("*.ipynb") if not q.name.startswith("._")
                            and not {"__MACOSX", ".ipynb_checkpoints"} & set(q.parts))
        elif p.is_file():
            found.append(p)
        else:
            raise ExerciseError(f"{p}: no such file or directory")
    return found


def read_submission(path: Path) -> tuple[dict, bytes, str]:
    """(notebook, its bytes, its assignment name), or ``ValueError`` saying why it cannot be
    graded. The name comes from the metadata (never the file name) and must look like one."""
    raw = path.read_bytes()
    if len(raw) > MAX_NOTEBOOK:
        raise ValueError(f"too large to be a notebook ({len(raw) / 2**20:.0f} MiB)")
    try:
        nb = json.loads(raw.decode("utf-8"))
        name = nb["metadata"]["otter"]["assignment_name"]
        cells = nb["cells"]
    except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise ValueError(f"not an exercise notebook ({type(e).__name__})") from None
    if not isinstance(name, str) or not ASSIGNMENT_NAME.fullmatch(name):
        raise ValueError(f"not an exercise notebook (assignment name {str(name)[:40]!r})")
    if not isinstance(cells, list):
        raise ValueError("not an exercise notebook (no cells)")
    return nb, raw, name


def code_cells(nb: dict) -> list[str]:
    """The code cells' sources, in order (whatever kernel the metadata names: grading runs
    Python)."""
    sources = []
    for c in nb["cells"]:
        if isinstance(c, dict) and c.get("cell_type") == "code":
            source = c.get("source", "")
            sources.append("".join(source) if isinstance(source, list) else str(source))
    return sources


def student_of(path: Path, nb: dict, source: str = "file") -> str:
    """Who submitted: the file name up to its first ``_`` (Canvas names downloads
    ``student_12345_67890_name.ipynb``), or with ``source="metadata"`` the notebook's
    ``metadata.ragbook.student`` (which the student can set: trust it only from a platform
    that writes it)."""
    if source == "metadata":
        found = (nb.get("metadata", {}).get("ragbook") or {}).get("student")
        if isinstance(found, str) and found.strip():
            return found.strip()[:100]
    return path.stem.split("_")[0] or path.stem


def seed_for(base: int, raw: bytes) -> int:
    """The seed a submission's hidden inputs are drawn with: from the grading's ``base`` seed
    and the submission's bytes (the same file and base draw the same inputs again)."""
    return int(hashlib.sha256(f"{base}:".encode() + raw).hexdigest()[:12], 16)


# names a submission has no business touching: otter's machinery, the grader's, the interpreter's
SUSPECT = {
    "_ragbook_guard": "the reference guard", "addaudithook": "audit hooks",
    "_getframe": "interpreter frames", "settrace": "a tracer", "setprofile": "a profiler",
    "get_referrers": "the garbage collector's references", "reload": "re-importing a module",
    "__code__": "a function's code object", "ctypes": "ctypes", "Checker": "otter's checker",
    "GradingResults": "otter's results",
}


def tampering(cells: list[str]) -> list[str]:
    """What in a submission's code reaches for the grading machinery (one line each): otter
    beyond ``otter.Notebook``, ragbook's grading modules, the names in :data:`SUSPECT`,
    assignments to the ``grader`` object."""
    found = []
    for i, source in enumerate(cells):
        try:
            tree = ast.parse(cell_code(source))
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            what = None
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) \
                    else [node.module or ""]
                for m in modules:
                    if m.startswith(("otter.", "ragbook.grading", "ragbook.sandbox")):
                        what = f"imports {m}"
                    if isinstance(node, ast.ImportFrom) and m in ("otter", "ragbook.exercises") \
                            and any(a.name not in ("Notebook", "unpack_tests", "expect")
                                    for a in node.names):
                        what = f"imports {', '.join(a.name for a in node.names)} from {m}"
            elif isinstance(node, ast.Attribute):
                if isinstance(node.value, ast.Name) and node.value.id == "otter" \
                        and node.attr != "Notebook":
                    what = f"otter.{node.attr}"
                elif node.attr in SUSPECT:
                    what = SUSPECT[node.attr]
                elif isinstance(node.ctx, ast.Store) and isinstance(node.value, ast.Name) \
                        and node.value.id in ("grader", "otter"):
                    what = f"rewrites {node.value.id}.{node.attr}"
            elif isinstance(node, ast.Name) and node.id in SUSPECT:
                what = SUSPECT[node.id]
            if what and f"cell {i}: {what}" not in found:
                found.append(f"cell {i}: {what}")
    return found


def grade_one(submission: Path, assignments: dict[str, Assignment], seed: int = 0,
              timeout: float = TIMEOUT, threads: int | None = None,
              require_sandbox: bool = False,
              student_from: str = "file") -> tuple[list[Score], Feedback | None]:
    """Grade one submission: a row per question of its assignment, then its total, and the
    student's feedback (None when it is not a gradable notebook)."""
    from . import sandbox

    label = str(submission)
    try:
        nb, raw, name = read_submission(submission)
    except (OSError, ValueError) as e:
        return [Score(label, submission.stem, "", "total", 0.0, 0.0, str(e))], None
    student = student_of(submission, nb, student_from)
    if name not in assignments:
        return [Score(label, student, name, "total", 0.0, 0.0,
                      f"unknown assignment {name!r}: no {name}-autograder.zip")], None
    assignment = assignments[name]
    drawn = seed_for(seed, raw)
    cells = code_cells(nb)
    flags = tampering(cells)
    plan = []  # (question, public?, case)
    for q in assignment.questions:
        public, hidden = assignment.cases(q, drawn)
        plan += [(q, True, c) for c in public] + [(q, False, c) for c in hidden]
    calls = [{"function": c.function, "args": encode(c.args), "grad": list(c.grad)}
             for _, _, c in plan]
    expected = [probe(c.reference, c.args, c.grad) if c.reference else None for _, _, c in plan]
    # the submission's cache is its own (relative: inside its working directory), never the
    # instructor's: what it builds there cannot reach another grading
    env = {"OMP_NUM_THREADS": str(threads or 1), "MKL_NUM_THREADS": str(threads or 1),
           "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "MPLBACKEND": "Agg", "PYTHONDONTWRITEBYTECODE": "1",
           "RAGBOOK_CACHE": "ragbook-cache"}
    request = {"cells": cells, "forbid": list(getattr(assignment.hidden, "FORBID", [])),
               "calls": calls}
    outcome = sandbox.run([sys.executable, "-m", "ragbook.grading"],
                          json.dumps(request).encode(), sandbox.Limits(seconds=timeout),
                          [PACKAGE], env, require=require_sandbox)
    results, why = _response(outcome, timeout, len(plan))
    if why.startswith("tampered"):
        flags.append(why)
    feedback = Feedback(student, name)
    if results is None:
        feedback.notes.append(f"not graded: {why}")
    else:
        feedback.notes += [f"{e}" for e in results["cells"][:5]]
    rows = []
    for q in assignment.questions:
        mine = [(i, public, case) for i, (qq, public, case) in enumerate(plan) if qq is q]
        points, reason, lines = _judge(q, mine, results, expected, assignment)
        rows.append(Score(label, student, name, q["name"], points, q["points"],
                          why if results is None else reason, "", str(drawn)))
        feedback.questions.append({"question": q["name"], "points": points,
                                   "max_points": q["points"], "lines": lines})
    top = sum(q["points"] for q in assignment.questions)
    total = min(round(sum(r.points for r in rows), 2), top)
    if flags:
        feedback.notes.append("flagged for the instructor: " + "; ".join(flags))
    rows.append(Score(label, student, name, "total", total, top, why, "; ".join(flags)[:500],
                      str(drawn), ", ".join(outcome.off)))
    return rows, feedback


def _response(outcome, timeout: float, calls: int) -> tuple[dict | None, str]:
    """The sandbox's response, checked; or None and why there is none."""
    if outcome.timed_out:
        return None, f"timed out after {timeout:g} s"
    if not outcome.stdout:
        lines = [line for line in outcome.stderr.splitlines() if line.strip()]
        last = lines[-1].strip()[:200] if lines else f"exit status {outcome.returncode}"
        return None, f"stopped before it was graded: {last}"
    try:
        response = json.loads(outcome.stdout)
        assert isinstance(response["cells"], list) and len(response["calls"]) == calls
        assert all(isinstance(c, dict) and ("value" in c or "error" in c)
                   for c in response["calls"])
    except (ValueError, KeyError, TypeError, AssertionError):
        return None, "tampered: its output was not the grader's response"
    return response, ""


def _judge(q: dict, mine: list, results: dict | None, expected: list,
           assignment: Assignment) -> tuple[float, str, list[str]]:
    """A question's points, the reason it lost any, and the student's feedback lines."""
    passed = {True: 0, False: 0}
    count = {True: 0, False: 0}
    lines, hidden_failures = [], []
    for i, public, case in mine:
        count[public] += 1
        why = "not run" if results is None else _verdict(results["calls"][i], case,
                                                          expected[i], assignment)
        passed[public] += why is None
        if public:
            lines.append(f"public `{case.label}`: " + ("passed" if why is None else why))
        elif why is not None:
            hidden_failures.append(why)
    if count[False]:
        kinds = sorted(set(hidden_failures))
        lines.append(f"hidden: {passed[False]} of {count[False]} cases passed"
                     + (f" ({'; '.join(kinds)})" if kinds else ""))
    share = PUBLIC_SHARE if count[True] and count[False] else 1.0 if count[True] else 0.0
    fraction = (share * passed[True] / count[True] if count[True] else 0.0) + \
        ((1 - share) * passed[False] / count[False] if count[False] else 0.0)
    points = min(round(q["points"] * fraction, 2), q["points"])
    failing = [line for line in lines if line.startswith("public")
               and not line.endswith(": passed")][:1]
    reason = "" if points == q["points"] else "; ".join(
        failing + [line for line in lines if line.startswith("hidden")])
    return points, reason[:300], lines


def _verdict(result: dict, case: Case, expected, assignment: Assignment) -> str | None:
    """``None`` when the submission's value for ``case`` is right, else what is wrong — for a
    hidden case, without its inputs."""
    hidden_case = not case.label
    if "error" in result:
        error = str(result["error"])
        kind = re.match(r"\w{1,40}", error)
        kind = kind.group(0) if kind else "an error"
        forbidden = getattr(assignment.hidden, "FORBID", [])
        if kind == "ReferenceUnavailable":
            named = [f for f in forbidden if error.startswith(f"{kind}: {f} ")]
            return f"called {named[0]}, which {UNAVAILABLE}" if named else \
                "called a reference that is not available"
        if kind == "NameError" and "no function" in error:
            return f"no function {case.function}()"
        return f"raised {kind}" if hidden_case else f"raised {error[:200]}"
    try:
        got = decode(result["value"])
    except (ValueError, TypeError, OverflowError):
        return "returned a value the grader could not read"
    why = case.check(got) if case.check else compare(got, expected, case.tol)
    if why is None:
        return None
    return "differs from the reference" if hidden_case and not case.check else why[:200]


# --------------------------------------------------------------------------- a batch


def _pool(work: Callable, items: list, jobs: int) -> Iterator:
    """``work`` over ``items``, ``jobs`` at once, results in order: threads, each waiting on
    the sandbox it started. Stopped early, what has not started is cancelled and every
    sandbox still running is killed, so that no grading outlives the command."""
    from concurrent.futures import ThreadPoolExecutor

    from .sandbox import kill_all

    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        yield from pool.map(work, items)
    except BaseException:  # Ctrl-C, SIGTERM (``ragbook`` turns it into Ctrl-C), an error
        kill_all()
        raise
    finally:
        pool.shutdown(cancel_futures=True)


def _share(jobs: int) -> int:
    """Each of ``jobs`` gradings' share of the CPU cores: with more threads than cores, torch's
    thread barriers make every one of them slower."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, jobs))


def grade(submissions: list[str | Path], autograders: str | Path, out_csv: str | Path,
          timeout: float = TIMEOUT, progress: bool = True, jobs: int = 1, seed: int = 0,
          require_sandbox: bool = False, student_from: str = "file") -> list[Score]:
    """Grade every submission (files, or directories of ``*.ipynb``) against the autograders
    in ``autograders``; write the score sheet, gradebooks and feedback (:mod:`ragbook.gradebook`)
    beside ``out_csv``, in the order of the submissions. A submission that fails in any way
    scores zero where it did not run and says why; the batch always goes on. ``seed``: the
    base of every submission's hidden inputs (recorded per submission)."""
    from tqdm.auto import tqdm

    from .sandbox import SandboxUnavailable, isolation

    assignments = autograders_in(autograders)
    files = submissions_in(submissions)
    if not files:
        raise ExerciseError("no submissions found; give notebooks or directories of them")
    if require_sandbox and isolation():
        raise ExerciseError(f"--require-sandbox: off on this machine: {', '.join(isolation())}; "
                            "install bubblewrap (`make sysdeps`) or grade on Linux")
    rows: list[Score] = []
    feedback: list[Feedback] = []
    threads = _share(jobs)

    def one(path: Path):
        return grade_one(path, assignments, seed, timeout, threads, require_sandbox,
                         student_from)

    try:
        for graded, notes in tqdm(_pool(one, files, jobs), total=len(files), desc="grading",
                                  unit="submission", disable=not progress):
            rows += graded
            if notes is not None:
                feedback.append(notes)
    except SandboxUnavailable as e:
        raise ExerciseError(str(e)) from None
    with contextlib.suppress(FileExistsError):
        Path(out_csv).parent.mkdir(parents=True, exist_ok=True)
    write(rows, feedback, Path(out_csv))
    return rows
