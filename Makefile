# `make serve` and `make test` work on a fresh machine: they create .venv and install what they need.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: install install-test serve test test-fast lint

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch: keep one that is already importable (a GPU build); otherwise pin the CPU wheel (2.13.0).
install: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .

install-test: $(BIN)/python
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[test]"

serve: install
	$(BIN)/dsv32 serve

test: install-test
	$(BIN)/python -m ruff check dsv32 tests benchmarks
	$(BIN)/python -m pytest -q -x tests

# The unit tier: every test but those marked e2e (they start servers, engine or worker processes, a browser).
test-fast: install-test
	$(BIN)/python -m ruff check dsv32 tests benchmarks
	$(BIN)/python -m pytest -q -x -m "not e2e" tests

lint: install-test
	$(BIN)/python -m ruff check dsv32 tests benchmarks
