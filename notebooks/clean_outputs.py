"""Make executed notebooks fit to commit, or say loudly why they are not.

Run after re-executing the notebooks in place::

    jupyter nbconvert --to notebook --execute --inplace notebooks/0*.ipynb
    python notebooks/clean_outputs.py            # every notebook beside this script
    python notebooks/clean_outputs.py notebooks/03_generator.ipynb --check

It removes what renders badly on GitHub: the saved widget state (the notebook's ``widgets``
metadata) and every output whose data is a widget view (``application/vnd.jupyter.widget-
view+json``: a tqdm bar, whose saved text is its first frame, "0%|          | 0/40"). Then it
fails — exit status 1, one line per problem naming the notebook and the cell — on an output a
reader should never see:

- an error (a cell that raised);
- a FutureWarning or DeprecationWarning, or a library saying something "is deprecated";
- transformers' "Loading weights" progress bar (silence it with
  ``transformers.utils.logging.disable_progress_bar()``);
- a path of the machine that ran it (/tmp/, /root/, /home/<user>/, /Users/<user>/, /work/).

The problems are looked for before the widget outputs are dropped, so a "Loading weights" bar
saved as a widget is reported, not hidden. ``--check`` writes nothing and also fails if there
is widget state to remove (for CI). The rules are those of the project's notebook hygiene check.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import nbformat

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
TEXT_TYPES = ("text/plain", "text/markdown", "text/html", "text/latex")
PROBLEMS = {
    "an error output": None,  # found by output type, below
    "a deprecation warning": re.compile(r"FutureWarning|DeprecationWarning|\bis deprecated\b"
                                        r"|\bare deprecated\b", re.IGNORECASE),
    "a transformers 'Loading weights' bar": re.compile(r"Loading weights"),
    "a path of the machine": re.compile(r"/tmp/|/root/|/home/\w+/|/Users/\w+/|/work/"),
}


def output_text(output) -> str:
    """The human-readable text of one output: stream text, text data, an error's traceback."""
    if output.get("output_type") == "stream":
        return "".join(output.get("text", ""))
    if output.get("output_type") == "error":
        return "\n".join([output.get("ename", ""), output.get("evalue", ""),
                          *output.get("traceback", [])])
    data = output.get("data", {})
    return "\n".join("".join(data[kind]) for kind in TEXT_TYPES if kind in data)


def problems(nb) -> list[str]:
    """One line per offending output: the cell (its index and id) and what is wrong."""
    found = []
    for i, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            text = output_text(output)
            what = [name for name, pattern in PROBLEMS.items()
                    if (pattern is None and output.get("output_type") == "error")
                    or (pattern is not None and pattern.search(text))]
            for name in what:
                first = next((line for line in text.splitlines()
                              if PROBLEMS[name] is None or PROBLEMS[name].search(line)), "")
                found.append(f"cell {i} (id {cell.get('id', '?')}): {name}: "
                             f"{first.strip()[:120]!r}")
    return found


def strip_widgets(nb) -> int:
    """Drop the saved widget state and every widget-view output; returns how many went."""
    removed = int("widgets" in nb.metadata)
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = [o for o in cell.outputs if WIDGET_VIEW not in o.get("data", {})]
        removed += len(cell.outputs) - len(kept)
        cell.outputs = kept
    return removed


def clean(path: Path, check: bool = False) -> list[str]:
    """Clean one notebook in place (unless ``check``); returns its problems, path first."""
    nb = nbformat.read(path, as_version=4)
    found = problems(nb)
    removed = strip_widgets(nb)
    if check and removed:
        found.append(f"{removed} widget output(s) or widget state to remove "
                     "(run notebooks/clean_outputs.py without --check)")
    elif removed:
        tmp = path.with_name(f".{path.name}.tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)  # atomic: an interrupted run never leaves half a notebook
    return [f"{path}: {line}" for line in found]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="notebooks to clean (default: every *.ipynb beside this script)")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; fail if anything would be removed or is wrong")
    args = parser.parse_args(argv)
    paths = args.notebooks or sorted(Path(__file__).resolve().parent.glob("*.ipynb"))
    found = [line for path in paths for line in clean(path, args.check)]
    for line in found:
        print(line, file=sys.stderr)
    if found:
        print(f"{len(found)} problem(s): fix the notebook's code, re-execute it, and run this "
              "again", file=sys.stderr)
        return 1
    print(f"{len(paths)} notebook(s) clean")
    return 0


if __name__ == "__main__":
    sys.exit(main())
