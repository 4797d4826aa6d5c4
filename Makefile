# llavakit: `make demo` trains a tiny LLaVA end to end on a CPU; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.llavakit-installed

.PHONY: install demo test test-fast lint clean

install: $(STAMP)

# The venv sees the system's site-packages, so a torch already installed there (e.g. a CUDA build)
# is used as it is; torch==2.13.0 is installed only when no torch is importable. DeepSpeed (a dev extra)
# installs without compiling its ops (DS_BUILD_OPS=0); it compiles what it needs on first use. The web
# extra (Gradio, for `llavakit web`) is installed too: the tests drive its page in a browser.
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PY) -m pip install -q -e ".[dev,web]"
	touch $(STAMP)

demo: install
	$(VENV)/bin/llavakit demo --output demo-output

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

lint: install
	$(VENV)/bin/ruff check llavakit tests benchmarks

clean:
	rm -rf $(VENV) demo-output .pytest_cache
