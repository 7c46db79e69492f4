# Two commands for a fresh machine: `make demo` and `make test`.
# Each creates .venv when missing and installs torch 2.13.0 (CPU build) first, then
# preftune with its dev extras: a plain `torch` requirement would pull CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.preftune-installed

.PHONY: demo test test-slow lint install clean bench

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/preftune demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy src

test: lint
	$(VENV)/bin/pytest

test-slow: $(STAMP)  # the full experiments, 6–7 minutes
	$(VENV)/bin/pytest -m slow

bench: $(STAMP)  # preftune's layouts against TRL's trainers (the quick suite: a few minutes)
	$(PY) bench/train_vs_trl.py

clean:
	rm -rf $(VENV) demo-output .pytest_cache .mypy_cache .ruff_cache
