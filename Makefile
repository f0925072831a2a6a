# Every target sets up what it needs: a fresh machine runs `make example` or `make test` directly.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup example test bench clean

setup: $(STAMP)

# The CPU build of torch first, where none is installed: a bare `torch` requirement could pull a
# multi-GB CUDA build.
$(STAMP): setup.cfg pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0" || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[test,examples]"
	touch $(STAMP)

example: $(STAMP)
	$(PY) examples/train.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m lightning_dpkfac.bench

clean:
	rm -rf $(VENV) lightning_logs outputs multirun .pytest_cache
