# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_FLAGS ?=

.PHONY: install demo test lint typecheck unit stress bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m actorflow.demo

lint: $(STAMP)
	$(BIN)/ruff check actorflow tests benchmarks
	$(BIN)/ruff format --check actorflow

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not slow" $(PYTEST_FLAGS)

test: lint typecheck unit

stress: $(STAMP)
	$(BIN)/pytest -m slow $(PYTEST_FLAGS)

bench: $(STAMP)
	$(BIN)/pytest benchmarks --benchmark-only --benchmark-autosave -p no:randomly $(PYTEST_FLAGS)

clean:
	rm -rf $(VENV) actorflow-data .benchmarks
