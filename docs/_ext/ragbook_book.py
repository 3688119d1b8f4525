"""What the course's book needs beyond Jupyter Book's defaults (`make book`).

- The repository, branch and Colab links come from pyproject.toml's ``[project.urls] Repository``
  and ``ragbook.__version__``: the same source as the notebooks' Colab badges (notebooks/colab.py).
- Nothing is loaded from another host when a page is read: the Colab badge image in each
  notebook's first cell is swapped for a local copy (the link stays), and MathJax is copied from
  the ``django-static-mathjax`` wheel into ``_static/mathjax``.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
from pathlib import Path

import tomllib
from sphinx.application import Sphinx

COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"
LOCAL_BADGE = "/docs/_static/colab-badge.svg"  # relative to the book's source folder


def _project(srcdir: Path) -> tuple[str, str]:
    """The repository URL and the release tag the notebooks' badges open."""
    with open(srcdir / "pyproject.toml", "rb") as f:
        url = tomllib.load(f)["project"]["urls"]["Repository"]
    init = (srcdir / "ragbook" / "__init__.py").read_text()
    version = re.search(r'__version__\s*=\s*"([^"]+)"', init).group(1)
    return url.rstrip("/"), f"v{version}"


def _config_inited(app: Sphinx, config) -> None:
    url, tag = _project(Path(app.srcdir))
    config.html_static_path = [*config.html_static_path, str(Path(app.srcdir) / "docs" / "_static")]
    opts = config.html_theme_options
    opts["repository_url"] = url
    opts["repository_branch"] = tag  # the Colab button opens the release, as the badge does
    opts["path_to_docs"] = ""
    opts["use_source_button"] = True  # each page links its file in the repository
    opts["use_download_button"] = True  # and the source itself (.ipynb / .md), from the site
    # pydata-sphinx-theme reads it from the context; "" makes it log an error in every console
    config.html_context = {**(config.html_context or {}), "default_mode": "light"}
    launch = opts.setdefault("launch_buttons", {})
    launch["colab_url"] = "https://colab.research.google.com"


def _local_images(app: Sphinx, doctree) -> None:
    """The Colab badge is an image on Google's host: show a local copy, keep the link."""
    from docutils import nodes

    for image in doctree.findall(nodes.image):
        if image.get("uri") == COLAB_BADGE:
            image["uri"] = LOCAL_BADGE


# "|x|" in a docstring is an absolute value or a set's size, never an rST substitution.
_SUBSTITUTION = re.compile(r"(?<![\w\\`])\|(?=[^\s|][^|`]*\|)")


def _plain_bars(app: Sphinx, what, name, obj, options, lines: list[str]) -> None:
    for i, line in enumerate(lines):
        if "|" in line and not line.lstrip().startswith(("|", "+")):
            parts = line.split("``")  # outside ``literals`` only
            parts[::2] = [_SUBSTITUTION.sub(r"\\|", part) for part in parts[::2]]
            lines[i] = "``".join(parts)


def _no_thebe(app: Sphinx, pagename, templatename, context, doctree) -> None:
    """Jupyter Book always loads sphinx-thebe, which would fetch thebe from a CDN when a reader
    presses "run"; the book runs nothing (Colab does), so its scripts are left out of every page
    (sphinx-thebe 0.3.1 also declares its config twice on some pages: a console error)."""
    context["script_files"] = [
        js for js in context.get("script_files", [])
        if "thebe" not in (getattr(js, "filename", None) or "")
        and "THEBE_JS_URL" not in (getattr(js, "attributes", {}).get("body") or "")]


def _copy_mathjax(app: Sphinx, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    spec = importlib.util.find_spec("mathjax")  # the django-static-mathjax wheel (no Django)
    if spec is None or spec.origin is None:
        raise RuntimeError("MathJax is served from the site: pip install django-static-mathjax "
                           "(ragbook's `book` extra)")
    es5 = Path(spec.origin).parent / "static" / "mathjax" / "es5"
    target = Path(app.outdir) / "_static" / "mathjax"
    shutil.rmtree(target, ignore_errors=True)
    # tex-chtml.js and what it loads on demand (fonts, the menu, TeX extensions); not the
    # speech rule engine (sre/), which the pages never ask for.
    shutil.copytree(es5, target, ignore=shutil.ignore_patterns("sre", "*speech*", "*-svg*",
                                                               "mml-*", "tex-mml-*"))


def setup(app: Sphinx) -> dict:
    app.add_css_file("ragbook.css")
    app.connect("config-inited", _config_inited)
    app.connect("doctree-read", _local_images, priority=100)  # before Sphinx collects images
    app.connect("html-page-context", _no_thebe, priority=900)
    app.connect("build-finished", _copy_mathjax)
    app.connect("autodoc-process-docstring", _plain_bars)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
