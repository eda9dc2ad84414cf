# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_FLAGS ?=

.PHONY: install demo test lint typecheck unit stress bench bench-report clean

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

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/pytest -m "not slow" $(PYTEST_FLAGS)

test: lint typecheck unit

# Browser tests of the dashboard in Debian's headless Chromium (/usr/bin/chromium, never downloaded).
E2E_STAMP := $(VENV)/.installed-e2e
$(E2E_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test,serve,e2e]'
	touch $@

.PHONY: e2e
e2e: $(E2E_STAMP)
	$(BIN)/pytest -m e2e tests/e2e $(PYTEST_FLAGS)

# Long runs at scale, outside the default test run.
stress: $(STAMP)
	$(BIN)/python benchmarks/scale.py recovery --n 10000
	$(BIN)/python benchmarks/scale.py concurrency --n 50000
	$(BIN)/python benchmarks/scale.py queue --n 2000000

bench: $(STAMP)
	$(BIN)/pytest benchmarks -o python_files='bench_*.py' --benchmark-only --benchmark-autosave \
		--benchmark-columns=median,iqr,ops $(PYTEST_FLAGS)

bench-report: $(STAMP)
	$(BIN)/actorflow bench --profile cloudflare-v2

clean:
	rm -rf $(VENV) actorflow-data .benchmarks
