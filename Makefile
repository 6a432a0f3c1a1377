# Fresh-machine entry points. `make train` sets up and runs the main job (Fast-BAT on the embedded
# MNIST digits, offline); `make test` sets up and runs the test suite (what CI runs).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of PyTorch first, so no dependency resolution pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0
# setuptools warns on every editable install that same-named folders in the working directory may shadow the
# package (they are the package here): keep that banner out of make train / make test.
QUIET_EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: train test lint docs hyperopt datacleaning clean

$(VENV)/.apps: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(QUIET_EDITABLE) $(PIP) install -q -e ".[apps]"
	touch $@

$(VENV)/.dev: $(VENV)/.apps
	$(QUIET_EDITABLE) $(PIP) install -q -e ".[dev,docs]"
	# betty-ml 0.2.1 declares Requires-Python < 3.11 but runs on 3.11 with torch and numpy only
	$(PIP) install -q --no-deps --ignore-requires-python betty-ml==0.2.1
	touch $@

train: $(VENV)/.apps
	$(VENV)/bin/bilevel-train $(ARGS)

hyperopt: $(VENV)/.apps
	$(VENV)/bin/bilevel-hyperopt

datacleaning: $(VENV)/.apps
	$(PY) -m applications.datacleaning $(ARGS)

test: $(VENV)/.dev
	$(PY) -m ruff check .
	$(PY) -m pytest

# MathJax for the site, cached in .cache/ with the npm client (the build hook vendors it into site/).
MATHJAX := .cache/mathjax-3.2.2/es5/tex-chtml.js
$(MATHJAX):
	$(PYTHON) docs/_ext/mathjax_hook.py --fetch

docs: $(VENV)/.dev $(MATHJAX)
	$(VENV)/bin/mkdocs build --strict

clean:
	rm -rf $(VENV) site runs .cache
