"""What grading hands the instructor: the score sheet, the gradebook and each student's feedback.

- ``scores.csv`` (and the same rows as ``scores.json``): one row per submission and question,
  then its total: points, maximum, why points were lost, integrity flags, the seed its hidden
  inputs were drawn with, and the protections that were off while it ran.
- ``scores-gradebook.csv``: wide, one row per student and one column per assignment, with
  Canvas's "Points Possible" row; ``scores-gradescope.csv``: the same without it, the student in
  a ``SID`` column, as Gradescope's grade upload reads it.
- ``scores-feedback/<student>/<assignment>.md``: per question, the points, the public tests'
  messages (what was expected, what came) and how many hidden cases passed — never a hidden input.

Spreadsheets execute a cell that starts with ``= + - @`` (CSV injection): every text cell that
does is written with a leading apostrophe (:func:`cell`).
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .artifacts import atomic_write_bytes


@dataclass
class Score:
    """One row of the score sheet: a submission's points on one question, or its total."""

    submission: str
    student: str
    assignment: str
    question: str
    points: float
    max_points: float
    reason: str = ""
    flag: str = ""
    seed: str = ""
    protections_off: str = ""


@dataclass
class Feedback:
    """What a student is told about one submission."""

    student: str
    assignment: str
    questions: list[dict] = field(default_factory=list)  # question, points, max, lines
    notes: list[str] = field(default_factory=list)


def cell(value: object) -> object:
    """A CSV cell a spreadsheet will not execute: text starting with ``= + - @`` (or a tab or
    carriage return) gets a leading apostrophe; numbers stay numbers."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _csv(header: list[str], rows: list[list]) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([cell(h) for h in header])
    writer.writerows([[cell(v) for v in row] for row in rows])
    return buffer.getvalue().encode()


def safe_name(text: str) -> str:
    """``text`` as one file name: letters, digits, ``. _ -``; never ``..`` or hidden."""
    name = re.sub(r"[^\w.-]", "_", text).lstrip(".") or "_"
    return name[:100]


def write(rows: list[Score], feedback: list[Feedback], out_csv: Path) -> list[Path]:
    """Write the score sheet, its JSON, both gradebooks and the feedback files; returns the
    paths written."""
    out_csv = Path(out_csv)
    fields = list(Score.__dataclass_fields__)
    written = [out_csv, out_csv.with_suffix(".json"),
               out_csv.with_name(out_csv.stem + "-gradebook.csv"),
               out_csv.with_name(out_csv.stem + "-gradescope.csv")]
    atomic_write_bytes(written[0], _csv(fields, [[getattr(r, f) for f in fields]
                                                 for r in rows]))
    atomic_write_bytes(written[1], json.dumps([asdict(r) for r in rows], indent=1).encode())
    canvas, gradescope = gradebooks(rows)
    atomic_write_bytes(written[2], canvas)
    atomic_write_bytes(written[3], gradescope)
    folder = out_csv.with_name(out_csv.stem + "-feedback")
    for one in feedback:
        path = folder / safe_name(one.student) / f"{safe_name(one.assignment)}.md"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, markdown(one).encode())
        written.append(path)
    return written


def gradebooks(rows: list[Score]) -> tuple[bytes, bytes]:
    """The wide gradebook (student × assignment, totals), as Canvas and as Gradescope import it.
    A student with two submissions of one assignment keeps the better; a file that was not
    graded (not a notebook, an unknown assignment) has no column."""
    totals = [r for r in rows if r.question == "total" and r.max_points > 0]
    assignments = sorted({r.assignment for r in totals})
    possible = {a: max(r.max_points for r in totals if r.assignment == a) for a in assignments}
    best: dict[str, dict[str, float]] = {}
    for r in totals:
        mine = best.setdefault(r.student, {})
        mine[r.assignment] = max(mine.get(r.assignment, 0.0), r.points)
    students = sorted(best)
    table = [[s, s, *(best[s].get(a, "") for a in assignments)] for s in students]
    canvas = _csv(["Student", "SIS User ID", *assignments],
                  [["Points Possible", "", *(possible[a] for a in assignments)], *table])
    gradescope = _csv(["Name", "SID", *assignments], table)
    return canvas, gradescope


def markdown(one: Feedback) -> str:
    """One submission's feedback, for the student."""
    total = sum(q["points"] for q in one.questions)
    top = sum(q["max_points"] for q in one.questions)
    lines = [f"# {one.assignment}: {total:g} / {top:g}", ""]
    lines += [f"- {note}" for note in one.notes]
    for q in one.questions:
        lines += ["", f"## {q['question']}: {q['points']:g} / {q['max_points']:g}", ""]
        lines += [f"- {line}" for line in q["lines"]]
    return "\n".join(lines) + "\n"
