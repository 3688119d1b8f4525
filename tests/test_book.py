"""The course as a book (`make book`), built offline and read in a real headless browser.

One build (about a minute on 2 cores), then: every internal link and anchor resolves; in
Chromium the equations are typeset by the site's own MathJax, every image loads, the search
finds "marginalization", no request leaves the machine and no page logs a console error.
Screenshots of the overview and of one notebook page go to build/book/screenshots/.
Where Jupyter Book, Playwright or a Chromium binary is missing, the browser part skips and says
how to get it (`make sysdeps` installs Debian's chromium; CI runs it).
"""

from __future__ import annotations

import functools
import http.server
import shutil
import subprocess
import sys
import threading
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "build" / "book"
HTML = OUT / "_build" / "html"
BROWSERS = ("chromium", "chromium-browser", "google-chrome")

# Pages read in the browser: the front page, the overview, a notebook heavy in equations, the
# API reference (equations from the docs), the results chapter and a guide.
PAGES = ["index.html", "notebooks/00_overview.html", "notebooks/05_rag_token.html",
         "docs/api.html", "benchmarks/README.html", "docs/practitioner.html"]


@pytest.fixture(scope="module")
def site() -> Path:
    pytest.importorskip("jupyter_book", reason="no book extra: pip install -e '.[book]'")
    jb = Path(sys.executable).parent / "jupyter-book"
    cmd = [str(jb), "build", ".", "--config", "docs/_config.yml", "--toc", "docs/_toc.yml",
           "--path-output", str(OUT), "-W", "--keep-going"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-4000:] or run.stdout[-4000:]
    assert "warning" not in run.stderr.lower(), run.stderr[-4000:]
    return HTML


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids: set[str] = set()
        self.refs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id"):
            self.ids.add(a["id"])
        if tag == "a" and a.get("name"):
            self.ids.add(a["name"])
        for key in ("href", "src"):
            if a.get(key) and tag in ("a", "img", "script", "link", "iframe", "source"):
                self.refs.append((tag, a[key]))


@functools.cache
def _parse(path: Path) -> _Refs:
    p = _Refs()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    return p


def test_the_site_has_every_chapter_and_mathjax_is_local(site):
    for page in ["index.html", "docs/api.html", "docs/instructor.html", "docs/practitioner.html",
                 "docs/engineering.html", "benchmarks/README.html", "exercises/README.html",
                 "exercises/student/01_dense_retrieval.html", "search.html"]:
        assert (site / page).is_file(), page
    assert sorted(p.name for p in (site / "notebooks").glob("[0-9]*.html")) == [
        f.with_suffix(".html").name for f in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb"))]
    assert not (site / "exercises" / "source").exists()  # the solutions are never published
    assert (site / "_static" / "mathjax" / "tex-chtml.js").is_file()
    api = (site / "docs" / "api.html").read_text()
    assert "rag_sequence_loss" in api and "DenseIndex" in api  # the docstrings are there


def test_every_page_links_its_source_and_the_notebooks_colab():
    pytest.importorskip("jupyter_book")
    for nb in sorted((ROOT / "notebooks").glob("[0-9]*.ipynb")):
        page = (HTML / "notebooks" / nb.with_suffix(".html").name).read_text()
        assert "blob/v" in page and f"notebooks/{nb.name}" in page  # the source on GitHub
        assert "colab.research.google.com/github/" in page  # the badge's link, and the button
        assert 'src="../_images/colab-badge.svg"' in page  # the badge image is the site's own
        assert "assets/colab-badge.svg" not in page


def test_no_internal_link_is_broken(site):
    broken = []
    for page in sorted(site.rglob("*.html")):
        if page.relative_to(site).parts[0] == "_static":  # the theme's template fragments
            continue
        for tag, ref in _parse(page).refs:
            url = urlsplit(ref)
            if url.scheme or ref.startswith(("//", "mailto:", "javascript:", "data:")):
                continue
            target = page if not url.path else (page.parent / unquote(url.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file():
                broken.append(f"{page.relative_to(site)}: {ref}")
            elif url.fragment and tag == "a" and target.suffix == ".html":
                if unquote(url.fragment) not in _parse(target).ids:
                    broken.append(f"{page.relative_to(site)}: {ref} (no such anchor)")
    assert not broken, "\n".join(broken[:40])


def _browser() -> str:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    pytest.skip("no Chromium here: `make sysdeps` (Debian, as root) or "
                "`apt-get install chromium` installs it; CI does")


@pytest.fixture(scope="module")
def server(site):
    handler = functools.partial(_QuietHandler, directory=str(site))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def browser(server):
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is missing: pip install -e '.[book]'")
    executable = _browser()
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, server, path):
    """Open a page; return it with what it asked for off the machine and what it logged."""
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    # generous: on a loaded 2-core machine a page with MathJax took over 30 s to load
    page.set_default_timeout(180_000)
    page.set_default_navigation_timeout(180_000)
    outside, errors = [], []

    def route(r):
        if r.request.url.startswith(server) or r.request.url.startswith(("data:", "blob:")):
            r.continue_()
        else:
            outside.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: m.type == "error" and errors.append(f"console: {m.text}"))
    page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: r.url.startswith(server)
            and errors.append(f"failed: {r.url}"))
    page.on("response", lambda r: r.status >= 400 and errors.append(f"{r.status}: {r.url}"))
    page.goto(f"{server}/{path}", wait_until="load")
    page.wait_for_load_state("networkidle")
    return page, outside, errors


@pytest.mark.parametrize("path", PAGES)
def test_pages_in_the_browser(browser, server, path):
    page, outside, errors = _open(browser, server, path)
    n_math = page.locator(".math").count()
    if n_math:  # every equation typeset by MathJax, none left as TeX or as an error
        page.wait_for_function("window.MathJax && MathJax.startup && MathJax.startup.promise")
        page.evaluate("MathJax.startup.promise")
        assert page.locator("mjx-container").count() >= n_math
        assert page.locator("mjx-merror").count() == 0
    images = page.evaluate("""() => [...document.images].map(i => [i.src, i.complete,
                                                                   i.naturalWidth])""")
    assert images or path != "notebooks/05_rag_token.html"
    bad = [src for src, done, width in images if not done or width == 0]
    assert not bad, bad
    assert not outside, f"requests off the machine: {outside}"
    assert not errors, errors
    if path in ("notebooks/00_overview.html", "notebooks/05_rag_token.html"):
        shots = OUT / "screenshots"
        shots.mkdir(parents=True, exist_ok=True)
        if path != "notebooks/00_overview.html":  # the notebook at its first equation
            page.locator("mjx-container").first.scroll_into_view_if_needed()
        page.screenshot(path=str(shots / (Path(path).stem + ".png")))
    page.close()


def test_equations_render_where_the_paper_is_derived(browser, server):
    page, _, _ = _open(browser, server, "notebooks/05_rag_token.html")
    assert page.locator(".math").count() > 0
    page.close()


def test_the_search_finds_marginalization(browser, server):
    page, outside, errors = _open(browser, server, "search.html?q=marginalization")
    page.wait_for_selector("#search-results ul.search li", timeout=30_000)
    hits = page.locator("#search-results ul.search li a").all_inner_texts()
    assert hits, "no search result"
    assert not outside and not errors, (outside, errors)
    page.close()


def test_the_readme_is_a_front_door():
    """At most 12 KB, and every `make TARGET` it gives is a target of the Makefile."""
    import re

    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 12 * 1024
    targets = set(re.findall(r"^([a-z][\w.-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = set(re.findall(r"\bmake ((?:[a-z]+ ?)+)", readme))
    assert named, "the README gives no make command"
    for command in named:
        for target in command.split():
            assert target in targets, f"README: `make {command.strip()}`: no target {target!r}"
    for chapter in re.findall(r"\]\(((?:docs|benchmarks|exercises|notebooks)/[^)#]+)", readme):
        assert (ROOT / chapter).is_file(), chapter
