"""The graded exercises: otter assign builds them, the grader scores them as the issue promises.

One session build (``exercises.build``, which itself grades every reference solution and refuses
one short of full marks) serves every test. One session ``grade`` scores the student notebooks
unmodified (zero), with every answer but the last one filled in from the master (strictly
between), and broken submissions among them (a reason each, the batch goes on); a loop is
stopped at a short time limit. Each grading is an ``otter run`` in its own process, about ten
seconds of CPU, most of it starting otter, a kernel and torch: two run at once on two cores.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest

from ragbook import cli, exercises

MASTERS = exercises.masters()
NAMES = [m.stem for m in MASTERS]
STUDENT = exercises.EXERCISES / "student"
LOOP_TIMEOUT = 30  # seconds: a kernel reaches a notebook's first cell in 5, on a busy machine 15


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """``build`` into a temporary directory: (autograder dir, student dir, records)."""
    root = tmp_path_factory.mktemp("exercises")
    records = exercises.build(root / "dist", student_dir=root / "student", jobs=2)  # 2 cores
    return root / "dist", root / "student", records


def solution_cells(master: Path) -> list[str]:
    """The master's solution cells, markers removed: the reference answer of each answer cell."""
    cells, inside = [], False
    for cell in nbformat.read(master, as_version=4).cells:
        marker = cell.source.strip() if cell.cell_type == "raw" else ""
        if marker in ("# BEGIN SOLUTION", "# END SOLUTION"):
            inside = marker == "# BEGIN SOLUTION"
        elif inside:
            cells.append("\n".join(line for line in cell.source.splitlines()
                                   if line.strip() not in ("# BEGIN SOLUTION", "# END SOLUTION")))
    return cells


def filled(name: str, answers: int | None, tmp_path: Path) -> Path:
    """The student notebook with its first ``answers`` answer cells given the reference answer."""
    nb = nbformat.read(STUDENT / f"{name}.ipynb", as_version=4)
    answer_cells = [c for c in nb.cells if "otter_answer_cell" in c.metadata.get("tags", [])]
    solutions = solution_cells(exercises.EXERCISES / "source" / f"{name}.ipynb")
    assert len(answer_cells) == len(solutions)
    for cell, solution in list(zip(answer_cells, solutions))[:answers]:
        cell.source = solution
    path = tmp_path / f"submission-{name}-{answers}.ipynb"  # the file name says nothing
    nbformat.write(nb, path)
    return path


def totals(rows) -> dict[str, exercises.Score]:
    return {r.submission: r for r in rows if r.question == "total"}


def test_build_grades_every_reference_full_marks(built):
    _, _, records = built
    assert [r["assignment"] for r in records] == NAMES
    assert all(r["points"] > 0 and r["questions"] >= 2 for r in records)


def from_title(path: Path) -> tuple[list, dict]:
    """A student notebook's cells from its title on, and its otter metadata: what the build
    writes (cells put before the title, such as a Colab setup cell, are not the build's)."""
    nb = nbformat.read(path, as_version=4)
    title = next(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown"
                 and c.source.startswith("# Exercise"))
    return [(c.cell_type, c.source) for c in nb.cells[title:]], nb.metadata["otter"]


def test_committed_student_notebooks_are_the_build(built):
    _, student, _ = built
    for name in NAMES:
        assert from_title(STUDENT / f"{name}.ipynb") == from_title(student / f"{name}.ipynb"), \
            f"exercises/student/{name}.ipynb is stale: run `ragbook exercises build`"
        cells = nbformat.read(student / f"{name}.ipynb", as_version=4).cells
        assert cells[0].cell_type == "markdown" and "otter.Notebook(" in cells[1].source


def test_student_release_has_no_solution_and_no_hidden_test():
    for master in MASTERS:
        nb = nbformat.read(master, as_version=4)
        solutions = "\n".join(solution_cells(master)).splitlines()
        public = "\n".join(c.source for c in nb.cells if c.cell_type == "code"
                           and c.source not in solution_cells(master))
        hidden = re.findall(r"# HIDDEN\ndef (\w+)", public)
        assert hidden, f"{master.name} has no hidden test"
        student = (STUDENT / master.name).read_text()
        code = "\n".join(c.source for c in nbformat.reads(student, as_version=4).cells
                         if c.cell_type == "code")
        leaked = [line.strip() for line in solutions if len(line.strip()) > 12
                  and line.strip() not in public and line.strip() in code]
        assert not leaked, f"{master.name}: solution code in the student notebook: {leaked}"
        assert not [h for h in hidden if h in student], f"{master.name}: a hidden test leaked"
        assert "# HIDDEN" not in student


@pytest.fixture(scope="session")
def graded(built, tmp_path_factory):
    """One ``grade`` of every unmodified student notebook, a partial solution of each (every
    answer but the last) and three broken submissions, two at once: (rows, paths by role)."""
    dist, _, _ = built
    tmp = tmp_path_factory.mktemp("graded")
    raising = filled("07_evaluation", None, tmp)  # the full reference, then broken
    nb = nbformat.read(raising, as_version=4)
    answers = [c for c in nb.cells if "otter_answer_cell" in c.metadata.get("tags", [])]
    answers[1].source = "import no_such_module_for_ragbook\n" + answers[1].source
    answers[2].source = "raise RuntimeError('my bug')\n" + answers[2].source
    nbformat.write(nb, raising)
    essay = tmp / "essay.ipynb"
    essay.write_text("Dear grader, here is my essay.")
    unknown = tmp / "unknown.ipynb"
    nb.metadata["otter"]["assignment_name"] = "99_no_such_assignment"
    nbformat.write(nb, unknown)
    paths = {"stubs": [STUDENT / f"{n}.ipynb" for n in NAMES],
             "partial": [filled(n, -1, tmp) for n in NAMES],
             "raising": raising, "essay": essay, "unknown": unknown}
    rows = exercises.grade([*paths["stubs"], essay, *paths["partial"], unknown, raising], dist,
                           tmp / "scores.csv", progress=False, jobs=2)  # two cores: two at once
    return rows, paths, tmp


def test_unmodified_zero_and_partial_strictly_between(graded):
    rows, paths, tmp = graded
    total = totals(rows)
    for path in paths["stubs"]:
        assert total[str(path)].points == 0, total[str(path)]
        assert total[str(path)].max_points > 0
    for path in paths["partial"]:
        assert 0 < total[str(path)].points < total[str(path)].max_points, total[str(path)]
    first = str(paths["partial"][0])
    per_question = [r for r in rows if r.question != "total" and r.submission == first]
    assert per_question[-1].points == 0 and per_question[-1].reason  # the unanswered one, why
    sheet = json.loads((tmp / "scores.json").read_text())
    assert len(sheet) == len(rows) == len((tmp / "scores.csv").read_text().splitlines()) - 1


def test_broken_submissions_graded_with_a_reason_batch_goes_on(graded):
    rows, paths, _ = graded
    total = totals(rows)
    assert len(total) == 2 * len(NAMES) + 3  # every submission, in the batch's order
    assert list(total)[len(NAMES)] == str(paths["essay"])
    assert "not an exercise notebook" in total[str(paths["essay"])].reason
    assert "unknown assignment '99_no_such_assignment'" in total[str(paths["unknown"])].reason
    graded = {r.question: r for r in rows if r.submission == str(paths["raising"])}
    assert graded["q1"].points == graded["q1"].max_points  # what ran still counts
    for question in ("q2", "q3"):  # their cells stopped before the function was defined
        assert graded[question].points == 0 and "Error" in graded[question].reason


def test_a_loop_is_stopped_at_the_time_limit_and_the_batch_goes_on(built, tmp_path, capsys):
    """The loop is the first cell: the time limit kills it running (it left a mark), not a
    kernel still starting, and the submission after it is graded."""
    dist, _, _ = built
    reached = tmp_path / "loop-reached"
    nb = nbformat.read(STUDENT / "07_evaluation.ipynb", as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"open({str(reached)!r}, 'w').close()\nwhile True:\n    pass"))
    looping = tmp_path / "looping.ipynb"
    nbformat.write(nb, looping)
    essay = tmp_path / "essay.txt"
    essay.write_text("Dear grader, here is my essay.")
    timeout = LOOP_TIMEOUT
    start = time.perf_counter()
    status = cli.main(["exercises", "grade", str(looping), str(essay), "--autograders",
                       str(dist), "--out", str(tmp_path / "s.csv"), "--timeout", str(timeout)])
    seconds = time.perf_counter() - start
    assert status == 0
    rows = [exercises.Score(**r) for r in json.loads((tmp_path / "s.json").read_text())]
    total = totals(rows)
    assert total[str(looping)].points == 0 and "timed out" in total[str(looping)].reason
    assert reached.exists()  # the loop itself was running when the limit struck
    assert "not an exercise notebook" in total[str(essay)].reason
    assert timeout <= seconds < timeout + 30  # stopped at its limit, the next one graded at once
    assert str(essay) in capsys.readouterr().out


def test_a_terminated_grade_leaves_no_grading_running(built, tmp_path):
    """SIGTERM (``kill``, ``timeout``) stops ``ragbook exercises grade`` as Ctrl-C does, and the
    otter run under way — in a session of its own — dies with it instead of living on."""
    dist, _, _ = built
    reached = tmp_path / "kernel-pid"
    nb = nbformat.read(STUDENT / "07_evaluation.ipynb", as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import os\nopen({str(reached)!r}, 'w').write(str(os.getpid()))\nwhile True:\n"
        "    pass"))
    looping = tmp_path / "looping.ipynb"
    nbformat.write(nb, looping)
    proc = subprocess.Popen([sys.executable, "-m", "ragbook.cli", "exercises", "grade",
                             str(looping), "--autograders", str(dist), "--out",
                             str(tmp_path / "s.csv"), "--timeout", "120"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    while not (reached.exists() and reached.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert reached.exists(), "the submission's kernel never started"
    kernel = int(reached.read_text())
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err.decode()
    # the kernel has a session of its own too; it exits within a second or so of its parent,
    # the otter run that was killed (ipykernel's parent poller)
    for _ in range(150):
        try:
            os.kill(kernel, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the grading kernel {kernel} outlived the command")


def test_public_tests_run_on_colab_without_a_tests_folder(tmp_path, monkeypatch):
    """On Colab otter finds no notebook file and no tests/ folder: the init cell brings them."""
    from otter.check.utils import IPythonInterpreter

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(IPythonInterpreter.COLAB.value, "running", lambda: True)
    nb = nbformat.read(STUDENT / "07_evaluation.ipynb", as_version=4)
    env = {}
    init = next(c for c in nb.cells if "otter.Notebook(" in c.source)
    exec(init.source, env)
    exec(nb.cells[nb.cells.index(init) + 1].source, env)  # the imports
    exec(solution_cells(exercises.EXERCISES / "source" / "07_evaluation.ipynb")[0], env)
    assert env["grader"].check("q1", env).grade == 1.0
    assert not (tmp_path / "tests").exists()  # the tests came from the cell, not a folder
