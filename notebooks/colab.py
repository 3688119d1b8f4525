"""Give every notebook its "Open in Colab" badge and its setup cell (``make colab``).

Both are generated from the one place that says where the course lives and which release it
is: ``[project.urls] Repository`` in pyproject.toml and ``ragbook.__version__``. A fork changes
the URL there and runs::

    python notebooks/colab.py            # rewrite the generated cells where they are out of date
    python notebooks/colab.py --check    # write nothing; fail if any notebook is out of date

It covers notebooks/*.ipynb and exercises/student/*.ipynb. The two generated cells open each
notebook and carry the cell tag ``ragbook-colab``; no other cell, and no output of another
cell, is touched, and a second run changes nothing. The badge opens the notebook at the release
tag ``v<version>`` on GitHub; the setup cell, on Colab only, installs that release's wheel (the
asset ``make dist`` builds) unless ``RAGBOOK_SOURCE`` names another build, keeping Colab's own
torch, and then prints the version and the device (``ragbook.config.default_device``).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from pathlib import Path

import nbformat
import tomllib

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("notebooks/*.ipynb", "exercises/student/*.ipynb")
TAG = "ragbook-colab"
PLACEHOLDER = "YOUR-GITHUB-USER"  # pyproject.toml's Repository until the course has a home
BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
# modules a notebook may import beyond ragbook's own dependencies: the requirement, by name, is
# read from pyproject.toml's dev extra (exercise notebooks grade themselves with otter-grader)
EXTRA_MODULES = {"otter": "otter-grader"}

SETUP = '''\
# Setup, written by `make colab` (change pyproject.toml, not this cell). On Google Colab it
# installs ragbook {version}, the release this notebook was written for, and keeps Colab's own
# torch; RAGBOOK_SOURCE=<a wheel's path or URL, or git+URL@branch> installs another build.
# Elsewhere it installs nothing.
import importlib
import os
import subprocess
import sys
import tempfile
from importlib.metadata import version

if "google.colab" in sys.modules:
    release = "{release}"
    source = os.environ.get("RAGBOOK_SOURCE", f"{{release}}/{wheel}")
    keep = os.path.join(tempfile.gettempdir(), "ragbook-keep-torch.txt")
    with open(keep, "w") as f:
        f.write(f"torch=={{version('torch')}}\\n")  # pip may not replace Colab's CUDA build
    print(f"Installing ragbook from {{source}} (about a minute)...")
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "-c", keep, source{extras}]
    if subprocess.run(pip).returncode:
        raise SystemExit("ragbook did not install: read pip's message above, then the README, "
                         "'Workshops (Colab)'")
    importlib.invalidate_caches()  # so that this kernel sees the package just installed

import ragbook
from ragbook.config import default_device

print(f"ragbook {{ragbook.__version__}} on {{default_device()}}")'''


def project() -> dict:
    """pyproject.toml's ``[project]`` table."""
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def release() -> str:
    """The package version, read from ragbook/__init__.py without importing ragbook."""
    tree = ast.parse((ROOT / "ragbook" / "__init__.py").read_text())
    return next(node.value.value for node in tree.body if isinstance(node, ast.Assign)
                and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["__version__"])


def repository() -> tuple[str, str]:
    """(owner, name) of the GitHub repository in ``[project.urls] Repository``."""
    url = project()["urls"]["Repository"]
    found = re.fullmatch(r"https://github\.com/([\w.-]+)/([\w.-]+?)(?:\.git)?/?", url)
    if not found:
        raise SystemExit(f"pyproject.toml: Repository = {url!r}: Colab opens notebooks from "
                         "GitHub; give https://github.com/OWNER/NAME")
    return found[1], found[2]


def wheel(version: str) -> str:
    """The release's wheel, as ``make dist`` names it."""
    return f"ragbook-{version}-py3-none-any.whl"


def release_url(version: str) -> str:
    """Where the GitHub release ``v<version>`` keeps its files (the wheel among them)."""
    owner, name = repository()
    return f"https://github.com/{owner}/{name}/releases/download/v{version}"


def badge_url(path: str, version: str) -> str:
    """Colab's address of the notebook at ``path`` (relative to the repository) at the
    release tag."""
    owner, name = repository()
    return f"https://colab.research.google.com/github/{owner}/{name}/blob/v{version}/{path}"


def imported_modules(nb) -> set[str]:
    """The top-level modules the notebook's code cells import (magics skipped)."""
    found = set()
    for cell in nb.cells:
        if cell.cell_type != "code" or TAG in cell.metadata.get("tags", []):
            continue
        code = "\n".join(line for line in cell.source.splitlines()
                         if not line.lstrip().startswith(("%", "!")))
        for node in ast.walk(ast.parse(code)):
            if isinstance(node, ast.Import):
                found |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                found.add(node.module.split(".")[0])
    return found


def extra_requirements(nb) -> list[str]:
    """What the setup cell installs beside ragbook for this notebook's own imports."""
    dev = project()["optional-dependencies"]["dev"]
    wanted = [EXTRA_MODULES[m] for m in sorted(imported_modules(nb) & EXTRA_MODULES.keys())]
    return [next(r for r in dev if re.split(r"[<>=!~ \[;]", r)[0] == w) for w in wanted]


def generated_cells(nb, path: str) -> list:
    """The badge (markdown) and the setup (code) cell for the notebook at ``path``."""
    version = release()
    extras = "".join(f", {json.dumps(r)}" for r in extra_requirements(nb))
    link = f"[![Open In Colab]({BADGE})]({badge_url(path, version)})"
    badge = nbformat.v4.new_markdown_cell(link, id="colab-badge", metadata={"tags": [TAG]})
    setup = nbformat.v4.new_code_cell(SETUP.format(version=version, release=release_url(version),
                                                   wheel=wheel(version), extras=extras),
                                      id="colab-setup", metadata={"tags": [TAG]})
    return [badge, setup]


def repo_path(path: Path) -> str:
    """The notebook's path in the repository, as GitHub (and so Colab) names it."""
    return path.resolve().relative_to(ROOT).as_posix()


def update(path: Path, check: bool = False) -> bool:
    """Bring one notebook's generated cells up to date; returns whether they were not."""
    nb = nbformat.read(path, as_version=4)
    wanted = generated_cells(nb, repo_path(path))
    ours = [c for c in nb.cells if TAG in c.metadata.get("tags", [])]
    if nb.cells[:len(ours)] == ours and [(c.cell_type, c.source) for c in ours] == [
            (c.cell_type, c.source) for c in wanted]:
        return False  # up to date: the cells, their outputs and metadata stay as they are
    if not check:
        nb.cells = wanted + [c for c in nb.cells if TAG not in c.metadata.get("tags", [])]
        tmp = path.with_name(f".{path.name}.tmp")
        nbformat.write(nb, tmp)
        tmp.replace(path)  # atomic: an interrupted run never leaves half a notebook
    return True


def notebooks() -> list[Path]:
    return sorted(p for pattern in NOTEBOOKS for p in ROOT.glob(pattern))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; fail if any notebook's generated cells are stale")
    args = parser.parse_args(argv)
    stale = [p for p in notebooks() if update(p, args.check)]
    for p in stale:
        print(f"{p.relative_to(ROOT)}: {'out of date' if args.check else 'updated'}")
    if PLACEHOLDER in project()["urls"]["Repository"]:
        print(f"note: pyproject.toml's Repository is still the placeholder ({PLACEHOLDER}): "
              "set it to the course's GitHub repository, then run `make colab`", file=sys.stderr)
    if args.check and stale:
        print(f"{len(stale)} notebook(s) out of date with pyproject.toml: run `make colab`",
              file=sys.stderr)
        return 1
    print(f"{len(notebooks())} notebook(s): badge and setup cell up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
