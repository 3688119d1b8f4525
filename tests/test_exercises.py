"""The graded exercises, tried as an instructor and as a student who wants the points without the
work.

One session build (``exercises.build``, which grades every reference solution and refuses one
short of full marks) serves every test. One session ``grade`` scores a mixed batch: the student
notebooks unmodified (zero); for each assignment with a package reference, the reference
solution with that reference imported in place of the answers it can replace (one of them with
an R kernel's metadata and a formula for a file name); one that rewrites otter's checker; one
that reaches for the network, other files, the instructor's environment and the machine's
memory and leaves a process behind; files that are not gradable. Each graded submission runs
in its own sandbox (bubblewrap): about ten seconds of CPU, most of it starting Python and torch.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import nbformat
import pytest

from ragbook import cli, exercises, gradebook, grading, sandbox

MASTERS = exercises.masters()
NAMES = [m.stem for m in MASTERS]
STUDENT = exercises.EXERCISES / "student"
LOOP_TIMEOUT = 20  # seconds: a sandbox reaches a notebook's first cell in 5, on a busy machine 15
ISOLATED = not sandbox.isolation()
needs_bwrap = pytest.mark.skipif(not ISOLATED, reason="bubblewrap cannot isolate here: "
                                 f"{', '.join(sandbox.isolation())} off (`make sysdeps`)")
# the package's reference for each question that has one, imported in place of the answer
IMPORTED = {
    "01_dense_retrieval": {
        "q1": "from ragbook.retriever import dpr_loss as in_batch_negative_loss",
        "q3": "from ragbook.retriever import dpr_loss\n\n"
              "def hard_negative_loss(q, d, hard, scale=1.0):\n"
              "    return dpr_loss(q, d, scale, hard_negatives=hard)"},
    "03_generator": {"q1": "from ragbook.generator import format_input as generator_input"},
    "04_rag_sequence": {
        "q1": "from ragbook.rag import rag_sequence_loss\n\n"
              "def rag_sequence_logprob(lp, mask, scores):\n"
              "    return -rag_sequence_loss(lp, mask, scores)"},
    "05_rag_token": {
        "q1": "from ragbook.rag import rag_token_loss\n\n"
              "def rag_token_logprob(lp, mask, scores):\n"
              "    return -rag_token_loss(lp, mask, scores)",
        "q2": "from ragbook.rag import doc_posterior\n\n"
              "def token_posterior(lp, mask, scores):\n"
              "    return doc_posterior(lp, mask, scores, per_token=True)"},
    "06_joint_finetuning": {
        "q2": "import ragbook.rag\n\n"
              "def doc_score_gradient(lp, mask, scores):\n"
              "    return scores.softmax(-1) - ragbook.rag.doc_posterior(lp, mask, scores)"},
    "07_evaluation": {
        "q1": "from ragbook.pipeline import normalize_answer as normalize",
        "q2": "from ragbook.pipeline import exact_match",
        "q3": "from ragbook.evaluate import f1_score as f1"},
}
# questions whose reference solution calls an answer above, so that the import costs them too
DEPENDENT = {"05_rag_token": {"q3"}, "07_evaluation": {"q4"}}


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """``build`` into a temporary directory: (autograder dir, student dir, records)."""
    root = tmp_path_factory.mktemp("exercises")
    # two at once on two cores; a generous time limit, for a machine that others share
    records = exercises.build(root / "dist", student_dir=root / "student", jobs=2, timeout=900)
    return root / "dist", root / "student", records


def solution_cells(master: Path) -> list[str]:
    """The master's solution cells, markers removed: the reference answer of each answer cell."""
    cells, inside = [], False
    for cell in nbformat.read(master, as_version=4).cells:
        marker = cell.source.strip() if cell.cell_type == "raw" else ""
        if marker in ("# BEGIN SOLUTION", "# END SOLUTION"):
            inside = marker == "# BEGIN SOLUTION"
        elif inside:
            cells.append("\n".join(line.replace("  # SOLUTION", "")
                                   for line in cell.source.splitlines()
                                   if line.strip() not in ("# BEGIN SOLUTION", "# END SOLUTION")))
    return cells


def filled(name: str, answers: int | None, path: Path, replace: dict | None = None) -> Path:
    """The student notebook with its first ``answers`` answer cells given the reference answer,
    and the answer cells of the questions in ``replace`` ({"q1": source}) given that source."""
    nb = nbformat.read(STUDENT / f"{name}.ipynb", as_version=4)
    answer_cells = [c for c in nb.cells if "otter_answer_cell" in c.metadata.get("tags", [])]
    solutions = solution_cells(exercises.EXERCISES / "source" / f"{name}.ipynb")
    assert len(answer_cells) == len(solutions)
    for cell, solution in list(zip(answer_cells, solutions))[:answers]:
        cell.source = solution
    for question, source in (replace or {}).items():
        answer_cells[int(question[1:]) - 1].source = source
    nbformat.write(nb, path)
    return path


def totals(rows) -> dict[str, gradebook.Score]:
    return {r.submission: r for r in rows if r.question == "total"}


def by_question(rows, path: Path) -> dict[str, gradebook.Score]:
    return {r.question: r for r in rows if r.submission == str(path)}


# --------------------------------------------------------------------------- build


def test_build_grades_every_reference_full_marks(built):
    _, _, records = built
    assert [r["assignment"] for r in records] == NAMES
    assert all(r["points"] > 0 and r["questions"] >= 2 for r in records)


def test_committed_student_notebooks_are_the_build_with_their_colab_cells(built):
    _, student, _ = built
    for name in NAMES:
        committed = nbformat.read(STUDENT / f"{name}.ipynb", as_version=4)
        fresh = nbformat.read(student / f"{name}.ipynb", as_version=4)
        assert [(c.cell_type, c.source) for c in committed.cells] == \
            [(c.cell_type, c.source) for c in fresh.cells], \
            f"exercises/student/{name}.ipynb is stale: run `ragbook exercises build`"
        assert "ragbook-colab" in fresh.cells[0].metadata.get("tags", [])
        assert "otter-grader==" in fresh.cells[1].source  # the pinned otter, installed on Colab
        assert any("otter.Notebook(" in c.source for c in fresh.cells[2:5])


def test_student_release_has_no_solution_and_titles_name_no_reference():
    for master in MASTERS:
        solutions = "\n".join(solution_cells(master)).splitlines()
        nb = nbformat.read(master, as_version=4)
        public = "\n".join(c.source for c in nb.cells if c.cell_type == "code"
                           and c.source not in solution_cells(master))
        student = nbformat.read(STUDENT / master.name, as_version=4)
        code = "\n".join(c.source for c in student.cells if c.cell_type == "code")
        leaked = [line.strip() for line in solutions if len(line.strip()) > 12
                  and line.strip() not in public and line.strip() in code]
        assert not leaked, f"{master.name}: solution code in the student notebook: {leaked}"
        prose = "\n".join(c.source for c in student.cells if c.cell_type == "markdown")
        named = set(re.findall(r"ragbook\.\w+\.\w+", prose))
        hidden = exercises.hidden_tests(master.with_suffix(".py").read_text(), master.stem)
        assert not named & set(hidden.FORBID), f"{master.name} names a reference: {named}"


def test_every_question_has_public_cases_and_hidden_tests(built):
    dist, _, _ = built
    for name, assignment in exercises.autograders_in(dist).items():
        for q in assignment.questions:
            public, hidden = assignment.cases(q, 1)
            assert len(public) >= 2 and len(hidden) >= 2, (name, q["name"])


# --------------------------------------------------------------------------- hidden inputs


def test_hidden_inputs_are_drawn_per_seed(built):
    """Two gradings with different seeds draw different inputs; the same seed the same ones."""
    dist, _, _ = built
    raw = (STUDENT / "05_rag_token.ipynb").read_bytes()
    for name, assignment in exercises.autograders_in(dist).items():
        q = assignment.questions[0]

        def drawn(base, assignment=assignment, q=q):
            cases = assignment.cases(q, exercises.seed_for(base, raw))[1]
            return json.dumps([grading.encode(c.args) for c in cases])

        assert drawn(1) == drawn(1), name
        assert drawn(1) != drawn(2), name


def test_values_cross_as_data_and_compare_with_what_differs():
    import numpy as np
    import torch

    value = {"a": (torch.arange(6).reshape(2, 3), np.ones(2)), "b": [1.5, float("nan"), "x"]}
    back = grading.decode(json.loads(json.dumps(grading.encode(value))))
    assert grading.compare(back, value) is None
    assert grading.compare(torch.tensor(0.5), torch.tensor(1.0)) == "expected tensor(1), got " \
        "tensor(0.5)"
    assert "shape" in grading.compare(torch.zeros(2), torch.zeros(3))
    for hostile in ({"t": "tensor", "dtype": "object", "shape": [1], "v": [1]},
                    {"t": "pickle", "v": []}, [1, 2]):
        with pytest.raises(ValueError):
            grading.decode(hostile)


def test_a_public_test_says_what_was_expected_and_what_came():
    def normalize(text):
        return text.lower()

    with pytest.raises(AssertionError, match=r"expected 'eiffel tower', got 'the eiffel tower!'"):
        exercises.expect(normalize, "'The Eiffel Tower!'", "'eiffel tower'")


# --------------------------------------------------------------------------- one mixed batch


HOSTILE = '''
import os, socket, subprocess, sys
LEAKS = []
for host in ("127.0.0.1", {host_ip!r}):
    try:
        socket.create_connection((host, {port}), timeout=2).close()
        LEAKS.append("network " + host)
    except OSError:
        pass
try:
    subprocess.run(["curl", "-s", "-m", "2", "http://{host_ip}:{port}/"], check=True)
    LEAKS.append("curl")
except Exception:
    pass
for path in {paths!r}:
    try:
        open(path, "rb").read(1)
        LEAKS.append(path)
    except OSError:
        pass
if "RAGBOOK_TEST_SECRET" in os.environ:
    LEAKS.append("environment")
try:
    open("/tmp/ragbook-big", "wb").write(b"0" * (1 << 30))  # 1 GiB: over the file-size limit
    LEAKS.append("a 1 GiB file")
except OSError:
    pass
subprocess.Popen([sys.executable, "-c", "import os, time\\nif os.fork() == 0:\\n    os.setsid()"
                  "\\n    time.sleep(1000)", {marker!r}], start_new_session=True)
try:
    hog = bytearray(10 * 2**30)  # 10 GiB
    LEAKS.append("10 GiB of memory")
except MemoryError:
    pass
'''


def _host_ip() -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: it picks the outgoing address
            return s.getsockname()[0]
        except OSError:
            return "127.0.0.1"


@pytest.fixture(scope="session")
def listener():
    """A TCP server on the grading machine that counts the connections it gets."""
    server = socket.create_server(("0.0.0.0", 0))
    connections = []

    def accept():
        while True:
            try:
                connections.append(server.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], connections
    server.close()


@pytest.fixture(scope="session")
def graded(built, tmp_path_factory, listener):
    """One ``grade`` of a mixed batch, two at once: (rows, paths by role, output dir)."""
    dist, _, _ = built
    tmp = tmp_path_factory.mktemp("graded")
    batch = tmp / "submissions"
    batch.mkdir()
    port, _ = listener
    paths = {"stubs": [STUDENT / f"{n}.ipynb" for n in NAMES],
             "imported": {n: filled(n, None, batch / f"importer{i}_{n}.ipynb", replace)
                          for i, (n, replace) in enumerate(IMPORTED.items())}}
    paths["tamper"] = filled("07_evaluation", None, batch / "tamper_1.ipynb", {"q3": '''\
def f1(prediction, answers):
    return 2.0  # never right: its honest points are none

import otter.execute.checker as checker
real = checker.Checker.check
def inflated(*args, **kwargs):
    result = real(*args, **kwargs)
    result.grade = 100
    return result
checker.Checker.check = inflated
grader.check = lambda *a, **k: None'''})
    marker = f"ragbook-test-orphan-{os.getpid()}"
    secrets = [str(paths["tamper"]), str(dist / "07_evaluation-autograder.zip"),
               str(exercises.EXERCISES / "source" / "07_evaluation.py"), "/root/.bash_history"]
    hostile = filled("07_evaluation", None, batch / "hostile_2.ipynb")
    nb = nbformat.read(hostile, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(HOSTILE.format(
        host_ip=_host_ip(), port=port, paths=secrets, marker=marker)))
    nb.cells.append(nbformat.v4.new_code_cell(  # what leaked costs every question its points
        "if LEAKS:\n    normalize = exact_match = f1 = lambda *a: 'leaked: ' + ', '.join(LEAKS)"))
    nbformat.write(nb, hostile)
    paths["hostile"], paths["marker"] = hostile, marker
    kernel = paths["imported"]["04_rag_sequence"].rename(batch / "=cmd_04.ipynb")  # a formula
    nb = nbformat.read(kernel, as_version=4)
    nb.metadata["kernelspec"] = {"name": "ir", "display_name": "R", "language": "R"}
    nbformat.write(nb, kernel)
    paths["imported"]["04_rag_sequence"] = paths["kernel"] = kernel
    # partial work: the reference imported for some questions, tampering with one
    paths["partial"] = [paths["imported"]["04_rag_sequence"], paths["tamper"]]
    essay = batch / "essay.ipynb"
    essay.write_text("Dear grader, here is my essay.")
    traversal = batch / "traversal.ipynb"
    nb.metadata["otter"]["assignment_name"] = "../../tmp/x"
    nbformat.write(nb, traversal)
    unknown = batch / "unknown.ipynb"
    nb.metadata["otter"]["assignment_name"] = "99_no_such_assignment"
    nbformat.write(nb, unknown)
    (batch / "__MACOSX").mkdir()
    (batch / "__MACOSX" / "._hostile_2.ipynb").write_bytes(b"\x00\x05\x16\x07 resource fork")
    (batch / "._essay.ipynb").write_bytes(b"\x00\x05\x16\x07")
    paths |= {"essay": essay, "traversal": traversal, "unknown": unknown}
    os.environ["RAGBOOK_TEST_SECRET"] = "the instructor's"
    try:
        rows = exercises.grade([*paths["stubs"], batch], dist, tmp / "scores.csv", timeout=900,
                               progress=False, jobs=2, require_sandbox=ISOLATED)
    finally:
        del os.environ["RAGBOOK_TEST_SECRET"]
    return rows, paths, tmp


def test_unmodified_zero_and_partial_strictly_between(graded):
    rows, paths, _ = graded
    total = totals(rows)
    for path in paths["stubs"]:
        assert total[str(path)].points == 0 and total[str(path)].max_points > 0, total[str(path)]
        first = by_question(rows, path)["q1"]
        assert "got None" in first.reason and "hidden: 0 of" in first.reason  # and why
    for path in paths["partial"]:
        assert 0 < total[str(path)].points < total[str(path)].max_points, total[str(path)]


def test_importing_the_reference_scores_nothing_for_that_question(graded):
    rows, paths, _ = graded
    for name, replaced in IMPORTED.items():
        questions = by_question(rows, paths["imported"][name])
        for q, row in questions.items():
            if q in replaced or q in DEPENDENT.get(name, ()):
                assert row.points == 0 if q in replaced else row.points < row.max_points, row
                assert "is not available while your answer is graded" in row.reason, row
            elif q != "total":
                assert row.points == row.max_points, (name, q, row)


def test_tampering_is_flagged_and_scores_no_more_than_its_honest_points(graded):
    rows, paths, _ = graded
    questions = by_question(rows, paths["tamper"])
    total = questions["total"]
    assert "otter.execute.checker" in total.flag and "rewrites grader.check" in total.flag
    assert questions["q3"].points == 0  # its f1 is wrong: no otter result counts
    honest = sum(questions[q].max_points for q in ("q1", "q2", "q4"))
    assert total.points == honest
    assert all(r.points <= r.max_points for r in rows)


@needs_bwrap
def test_a_hostile_submission_is_contained_scored_and_leaves_nothing_running(graded, listener):
    """No network (the grading machine's server never hears from it), no file outside its
    sandbox (other submissions, the autograder, the hidden tests), no instructor's environment,
    no 1 GiB file, no 10 GiB of memory: so its answers stay right and it scores full marks. The
    grandchild it detached into a session of its own is gone."""
    rows, paths, _ = graded
    questions = by_question(rows, paths["hostile"])
    assert questions["total"].points == questions["total"].max_points, questions
    _, connections = listener
    assert connections == []
    time.sleep(1)
    alive = [pid for pid in os.listdir("/proc") if pid.isdigit() and paths["marker"].encode()
             in Path(f"/proc/{pid}/cmdline").read_bytes()]
    assert alive == [], "a submission's process outlived its grading"


def test_bad_files_are_reported_skipped_or_graded_whatever_the_kernel(graded):
    rows, paths, tmp = graded
    total = totals(rows)
    assert by_question(rows, paths["kernel"])["q2"].points == 3  # an R kernel's metadata
    assert total[str(paths["kernel"])].reason == ""
    assert "not an exercise notebook" in total[str(paths["essay"])].reason
    assert "assignment name '../../tmp/x'" in total[str(paths["traversal"])].reason
    assert "unknown assignment '99_no_such_assignment'" in total[str(paths["unknown"])].reason
    assert not [s for s in total if "__MACOSX" in s or "/._" in s]
    assert not (tmp / "x").exists() and not Path("/tmp/x-autograder.zip").exists()


def test_score_sheet_gradebook_and_feedback(graded):
    rows, paths, tmp = graded
    sheet = json.loads((tmp / "scores.json").read_text())
    assert len(sheet) == len(rows) == len((tmp / "scores.csv").read_text().splitlines()) - 1
    csv_text = (tmp / "scores.csv").read_text()
    assert "'=cmd" in csv_text and ",=cmd" not in csv_text  # a formula, escaped
    seeds = {r.submission: r.seed for r in rows if r.question == "total" and r.seed}
    raw = paths["kernel"].read_bytes()
    assert seeds[str(paths["kernel"])] == str(exercises.seed_for(0, raw))  # recorded, reproducible
    canvas = (tmp / "scores-gradebook.csv").read_text().splitlines()
    assert canvas[0] == "Student,SIS User ID," + ",".join(NAMES)
    assert canvas[1].startswith("Points Possible,,")
    gradescope = (tmp / "scores-gradescope.csv").read_text().splitlines()
    assert gradescope[0].startswith("Name,SID,") and len(gradescope) == len(canvas) - 1
    tamper = next(line for line in canvas if line.startswith("tamper,"))
    assert tamper.split(",")[2 + NAMES.index("07_evaluation")] == \
        f"{totals(rows)[str(paths['tamper'])].points}"
    feedback = (tmp / "scores-feedback" / "tamper" / "07_evaluation.md").read_text()
    assert "## q3: 0 / 3" in feedback and "expected 0.666667, got 2" in feedback
    assert "hidden: 0 of 10 cases passed" in feedback and "flagged" in feedback
    assert (tmp / "scores-feedback" / "_cmd" / "04_rag_sequence.md").exists()  # a safe name


# --------------------------------------------------------------------------- limits and isolation


def test_isolation_can_be_required_and_says_what_is_off(built, tmp_path, monkeypatch):
    dist, _, _ = built
    monkeypatch.setattr(sandbox, "isolation", lambda: ["network namespace"])
    with pytest.raises(exercises.ExerciseError, match="network namespace"):
        exercises.grade([STUDENT / "07_evaluation.ipynb"], dist, tmp_path / "s.csv",
                        progress=False, require_sandbox=True)
    status = cli.main(["exercises", "grade", str(STUDENT / "07_evaluation.ipynb"),
                       "--autograders", str(dist), "--out", str(tmp_path / "s.csv")])
    assert status == 0
    rows = json.loads((tmp_path / "s.json").read_text())
    assert rows[-1]["points"] == 0 and "network namespace" in rows[-1]["protections_off"]
    assert rows[-1]["reason"] == "" and "got None" in rows[0]["reason"]  # it ran, unisolated


def test_a_loop_is_stopped_at_the_time_limit_and_the_batch_goes_on(built, tmp_path, capsys):
    dist, _, _ = built
    nb = nbformat.read(STUDENT / "07_evaluation.ipynb", as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell("while True:\n    pass"))
    looping = tmp_path / "looping.ipynb"
    nbformat.write(nb, looping)
    essay = tmp_path / "essay.txt"
    essay.write_text("Dear grader, here is my essay.")
    start = time.perf_counter()
    status = cli.main(["exercises", "grade", str(looping), str(essay), "--autograders",
                       str(dist), "--out", str(tmp_path / "s.csv"), "--timeout",
                       str(LOOP_TIMEOUT)])
    seconds = time.perf_counter() - start
    assert status == 0
    rows = [gradebook.Score(**r) for r in json.loads((tmp_path / "s.json").read_text())]
    total = totals(rows)
    assert total[str(looping)].points == 0 and "timed out" in total[str(looping)].reason
    assert "not an exercise notebook" in total[str(essay)].reason
    assert LOOP_TIMEOUT <= seconds < LOOP_TIMEOUT + 30
    assert str(essay) in capsys.readouterr().out


def test_a_terminated_grade_leaves_no_grading_running(built, tmp_path):
    """SIGTERM stops ``ragbook exercises grade`` as Ctrl-C does, and the sandbox under way dies
    with it instead of living on."""
    dist, _, _ = built
    nb = nbformat.read(STUDENT / "07_evaluation.ipynb", as_version=4)
    marker = f"ragbook-test-terminated-{os.getpid()}"
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        f"import subprocess, sys\nsubprocess.Popen([sys.executable, '-c', "
        f"'import time; time.sleep(1000)', {marker!r}])\nwhile True:\n    pass"))
    looping = tmp_path / "looping.ipynb"
    nbformat.write(nb, looping)
    proc = subprocess.Popen([sys.executable, "-m", "ragbook.cli", "exercises", "grade",
                             str(looping), "--autograders", str(dist), "--out",
                             str(tmp_path / "s.csv"), "--timeout", "120"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def running() -> list[str]:
        return [pid for pid in os.listdir("/proc") if pid.isdigit() and _cmdline(pid, marker)]

    deadline = time.monotonic() + 90
    while not running() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert running(), "the submission never started"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err.decode()
    time.sleep(1)
    assert running() == [], "the grading outlived the command"


def _cmdline(pid: str, marker: str) -> bool:
    try:
        return marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


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
    env["normalize"] = str.lower
    assert "expected 'eiffel tower'" in str(env["grader"].check("q1", env))
    assert not (tmp_path / "tests").exists()  # the tests came from the cell, not a folder
