"""The release a Colab workshop installs: the wheel, its install outside the checkout, the
notebooks' setup cell on a simulated Colab, the badges, and the device every model runs on.

One wheel is built per session (a few seconds of CPU). Its install reuses the test
interpreter's packages (torch and the rest) through symlinks, so it downloads nothing; ragbook
itself comes only from the wheel, and the checkout is never on the path.
"""

import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path

import nbformat
import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import ragbook
from ragbook import cli
from ragbook.config import check_device, default_device

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("colab", ROOT / "notebooks" / "colab.py")
colab = importlib.util.module_from_spec(_spec)  # the generator behind `make colab`
_spec.loader.exec_module(colab)

# What a Colab runtime has before the first cell: its own torch, the kernel, pip.
COLAB_PREINSTALLED = ("torch", "ipython", "pip")


def clean_env(**extra: str) -> dict:
    """The environment of a process that must see nothing of the checkout or of pip's settings
    here: no PYTHONPATH, no PIP_* (index, find-links), no config files, no index."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith(("PIP_", "RAGBOOK_DEVICE"))}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PYTHONNOUSERSITE": "1", **extra}


@pytest.fixture(scope="session")
def built(tmp_path_factory) -> tuple[Path, str]:
    """The wheel `make dist` builds (from a copy of the sources, so no stale build/ directory
    of the checkout leaks in) and the build's output."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "ragbook", src / "ragbook",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = tmp_path_factory.mktemp("dist")
    run = subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation",
                          "--outdir", str(out), str(src)], capture_output=True, text=True,
                         env=clean_env())
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    return next(out.glob("*.whl")), run.stdout + run.stderr


def test_the_wheel_holds_the_package_and_the_shipped_generator_only(built):
    wheel, log = built
    assert wheel.name == colab.wheel(ragbook.__version__)  # the file the setup cell installs
    names = zipfile.ZipFile(wheel).namelist()
    info = f"ragbook-{ragbook.__version__}.dist-info/"
    assert all(n.startswith(("ragbook/", info)) for n in names), names
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "ragbook").glob("*.py")}
    weights = {p.relative_to(ROOT).as_posix()
               for p in (ROOT / "ragbook" / "weights" / "tiny-bart").iterdir()}
    assert "ragbook/weights/tiny-bart/model.safetensors" in weights
    assert {n for n in names if not n.startswith(info)} == modules | weights
    meta = zipfile.ZipFile(wheel).read(info + "METADATA").decode()
    assert f"Version: {ragbook.__version__}" in meta
    assert f"Project-URL: Repository, {colab.project()['urls']['Repository']}" in meta
    # the build says nothing a learner installing from source would have to wade through
    assert not re.search(r"SetuptoolsDeprecationWarning|Package would be ignored|^\s*!!\s*$",
                         log, re.MULTILINE), log[-3000:]


# ----------------------------------------------------------------------- a simulated Colab


def requirement_closure(requirements: list[str]) -> set[str]:
    """The installed distributions that ``requirements`` need, recursively (extras and
    environment markers followed), as canonical names."""
    found: set[str] = set()
    done: set[tuple] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if (name, *sorted(req.extras)) in done:
            continue
        done.add((name, *sorted(req.extras)))
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue  # not installed here, so the simulated runtime lacks it too
        found.add(name)
        for r in map(Requirement, dist.requires or []):
            if r.marker is None or any(r.marker.evaluate({"extra": e})
                                       for e in ("", *req.extras)):
                todo.append(r)
    return found


def link_distributions(names: set[str], into: Path) -> None:
    """Symlink every top-level file and folder of the named installed distributions (their
    packages, modules, bundled libraries and metadata) into ``into``."""
    into.mkdir()
    for name in names:
        dist = metadata.distribution(name)
        site = Path(dist.locate_file(""))
        for top in {Path(str(f)).parts[0] for f in dist.files or []} - {".."}:
            if (site / top).exists() and not (into / top).exists():
                (into / top).symlink_to(site / top)


def notebook_code(path: Path) -> tuple[str, str, str]:
    """A notebook's setup cell, its parameters cell (if any), and every import its other cells
    make."""
    nb = nbformat.read(path, as_version=4)
    setup = next(c.source for c in nb.cells if c.cell_type == "code"
                 and colab.TAG in c.metadata.get("tags", []))
    params = next((c.source for c in nb.cells if "parameters" in c.metadata.get("tags", [])),
                  "")  # a student exercise has none: its settings are the assignment's
    imports = []
    for cell in nb.cells:
        if cell.cell_type == "code" and cell.source not in (setup, params):
            code = "\n".join(line for line in cell.source.splitlines()
                             if not line.lstrip().startswith(("%", "!")))
            imports += [ast.unparse(n) for n in ast.walk(ast.parse(code))
                        if isinstance(n, ast.Import | ast.ImportFrom)]
    return setup, params, "\n".join(dict.fromkeys(imports))


def test_the_wheel_installs_on_a_simulated_colab_and_runs_the_notebooks_imports(built,
                                                                             tmp_path):
    """A fresh virtual environment holding only what Colab has (torch, IPython, pip) and what
    the wheel and the setup cells declare. Each setup cell, with ``google.colab`` present and
    RAGBOOK_SOURCE = the built wheel, must install ragbook without touching torch; then every
    notebook's imports and parameters cell must run, the shipped generator load and
    ``ragbook reproduce --data-only`` work — all from the wheel, the checkout nowhere."""
    wheel = built[0]
    declared = [r for r in metadata.Distribution.at(_unpacked_info(wheel, tmp_path)).requires
                if "extra ==" not in r]
    notebooks = colab.notebooks()
    extras = [r for p in notebooks for r in colab.extra_requirements(nbformat.read(p, 4))]
    base = tmp_path / "colab-base"
    link_distributions(requirement_closure([*COLAB_PREINSTALLED, *declared, *extras]), base)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path("
                                "'purelib'))"], capture_output=True, text=True,
                               check=True).stdout.strip())
    (site / "colab-base.pth").write_text(f"{base}\n")  # Colab's own packages, pre-installed

    # a module with a spec, as Colab's is: accelerate (which transformers imports) looks
    # google.colab up with importlib.util.find_spec, which refuses a module without one
    script = ["import sys, importlib.machinery, importlib.util",
              "sys.modules['google.colab'] = importlib.util.module_from_spec("
              "importlib.machinery.ModuleSpec('google.colab', None))"]
    setups = set()
    for path in notebooks:
        setup, params, imports = notebook_code(path)
        assert re.search(r'f"\{release\}/(\S+)"', setup)[1] == wheel.name  # the pin
        script += [f"print('== {path.name}')", "" if setup in setups else setup, params,
                   imports]
        setups.add(setup)
    script += ["import ragbook, torch",
               "from ragbook.cli import main",
               "from ragbook.generator import load_generator",
               "print('ragbook at', ragbook.__file__)", "print('torch at', torch.__file__)",
               "print('generator', sum(p.numel() for p in load_generator()[0].parameters()))",
               "assert main(['reproduce', '--data-only']) == 0"]
    run = subprocess.run([python, "-c", "\n".join(script)], cwd=tmp_path, capture_output=True,
                         text=True, env=clean_env(RAGBOOK_SOURCE=str(wheel), MPLBACKEND="Agg"))
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    out = run.stdout
    assert out.count("== ") == len(notebooks)
    assert f"ragbook {ragbook.__version__} on cpu" in out
    assert Path(re.search(r"ragbook at (.+)", out)[1]).is_relative_to(site)  # from the wheel
    assert Path(re.search(r"torch at (.+)", out)[1]).is_relative_to(base)  # Colab's, kept
    from ragbook.generator import load_generator

    shipped = sum(p.numel() for p in load_generator("tiny")[0].parameters())
    assert f"generator {shipped}" in out
    assert "| articles | 10,033 |" in out
    assert (venv / "bin" / "ragbook").is_file()  # the command, for a terminal


def _unpacked_info(wheel: Path, tmp: Path) -> Path:
    """The wheel's .dist-info directory, extracted (its METADATA names the dependencies)."""
    with zipfile.ZipFile(wheel) as z:
        names = [n for n in z.namelist() if ".dist-info/" in n]
        z.extractall(tmp / "wheel-info", names)
    return tmp / "wheel-info" / names[0].split("/")[0]


# ----------------------------------------------------------------------- badges and cells


def test_every_notebook_opens_with_a_badge_to_itself_and_the_current_setup_cell():
    notebooks = colab.notebooks()
    assert {p.parent.name for p in notebooks} >= {"notebooks"} and len(notebooks) >= 8
    owner, name = colab.repository()
    for path in notebooks:
        nb = nbformat.read(path, as_version=4)
        first = nb.cells[0]
        assert first.cell_type == "markdown" and colab.TAG in first.metadata["tags"]
        link = re.fullmatch(r"\[!\[Open In Colab\]\((.+?)\)\]\((.+?)\)", first.source)
        assert link and link[1] == colab.BADGE, first.source
        relative = path.relative_to(ROOT).as_posix()
        assert link[2] == (f"https://colab.research.google.com/github/{owner}/{name}/blob/"
                           f"v{ragbook.__version__}/{relative}")
    assert colab.main(["--check"]) == 0  # every setup cell as pyproject.toml makes it


def test_make_colab_touches_only_its_own_cells_and_a_second_run_nothing(tmp_path, monkeypatch):
    nb = nbformat.read(ROOT / "notebooks" / "02_index.ipynb", as_version=4)
    nb.cells = [c for c in nb.cells if colab.TAG not in c.metadata.get("tags", [])]
    nb.cells[0].outputs = [nbformat.v4.new_output("stream", text="kept\n")]
    (tmp_path / "notebooks").mkdir()
    path = tmp_path / "notebooks" / "02_index.ipynb"
    nbformat.write(nb, path)
    monkeypatch.setattr(colab, "repo_path", lambda p: "notebooks/02_index.ipynb")
    assert colab.update(path, check=True) and colab.update(path)
    after = nbformat.read(path, as_version=4)
    assert [c.id for c in after.cells[:2]] == ["colab-badge", "colab-setup"]
    assert after.cells[2:] == nb.cells  # every other cell, outputs included, as it was
    written = path.read_bytes()
    assert not colab.update(path) and path.read_bytes() == written
    # an exercise notebook that grades itself also installs the autograder, at its pinned version
    nb.cells.append(nbformat.v4.new_code_cell("import otter\ngrader = otter.Notebook()"))
    setup = colab.generated_cells(nb, "exercises/student/x.ipynb")[1].source
    assert '"otter-grader==7.0.0"]' in setup


# ----------------------------------------------------------------------- the device


def test_the_device_is_cuda_when_there_is_one_and_ragbook_device_overrides(monkeypatch):
    monkeypatch.delenv("RAGBOOK_DEVICE", raising=False)
    assert default_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    monkeypatch.setenv("RAGBOOK_DEVICE", "cpu")
    assert default_device() == torch.device("cpu")
    from ragbook.generator import load_generator

    assert next(load_generator("tiny")[0].parameters()).device == torch.device("cpu")
    monkeypatch.setenv("RAGBOOK_DEVICE", "gpu")
    with pytest.raises(ValueError, match="^RAGBOOK_DEVICE='gpu' is not a device; use cpu or cuda$"):
        default_device()
    assert check_device("cpu:0") == torch.device("cpu", 0)


def test_a_bad_ragbook_device_is_one_line_before_any_work(monkeypatch, capsys):
    monkeypatch.setenv("RAGBOOK_DEVICE", "tpu9")
    assert cli.main(["reproduce", "--data-only"]) == 2
    err = capsys.readouterr()
    assert err.out == "" and err.err.count("\n") == 1 and "RAGBOOK_DEVICE='tpu9'" in err.err
