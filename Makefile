# Two commands do all set-up: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev,plot,profile,predict]'
	touch $(STAMP)

.PHONY: demo test lint bench
demo: $(STAMP)  ## compare the baseline policies on the embedded default workload
	$(BIN)/llmsched demo

test: $(STAMP)  ## lint, then run the test suite
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks

bench: $(STAMP)  ## simulator speed benchmark (needs ../shared/data)
	$(BIN)/python benchmarks/bench_simulator.py
