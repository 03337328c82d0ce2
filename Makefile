# secure_fedvlp: two commands on a fresh machine: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.installed
# GPU users: make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128 (see README).
TORCH_INDEX ?=
PYTEST_ARGS ?=

.PHONY: venv demo test test-slow test-all lint bench clean-runs help

help:
	@echo "make demo       create/reuse $(VENV), install, run configs/demo.toml"
	@echo "make test       create/reuse $(VENV), install, run the default test suite"
	@echo "make test-slow  tests marked slow (minutes)"
	@echo "make lint       ruff (lint and format check) and the import-linter contracts"
	@echo "make bench      benchmarks (timings and memory, printed)"

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found (Python 3.11 is required)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	@if [ -n "$(TORCH_INDEX)" ]; then $(PIP) install --quiet torch==2.13.0 --index-url $(TORCH_INDEX); fi
	$(PIP) install --quiet -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/secure-fedvlp run configs/demo.toml

test: $(STAMP)
	$(PY) -m pytest -q -n auto --dist loadfile $(PYTEST_ARGS)

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -m "slow or not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

bench: $(STAMP)
	$(PY) benchmarks/bench_training.py
	$(PY) benchmarks/bench_dp.py
	$(PY) benchmarks/bench_ckks.py
	$(PY) benchmarks/bench_encrypted_round.py

clean-runs:
	rm -rf runs
