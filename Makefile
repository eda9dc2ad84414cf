# Two entry points on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
PYTEST_FLAGS ?=

.PHONY: install demo test lint typecheck unit stress bench bench-report bench-compare bench-peers \
	bench-postgres bench-peers-postgres clean

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
	$(BIN)/ruff format --check actorflow tests benchmarks
	$(BIN)/lint-imports

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

# The multi-node chaos run: 3 node processes, 5,000 instances, a node killed every ~2 s
# for 60 s, and the same workload without failures (docs/failover.md).
.PHONY: chaos
chaos: $(STAMP)
	$(BIN)/pytest tests/test_chaos.py -m chaos -s -p no:randomly $(PYTEST_FLAGS)

# The suites again with every runtime on PostgreSQL: a real server the run starts itself
# (actorflow/testkit/postgres.py); tests of a data directory's own files are skipped.
.PHONY: test-postgres
test-postgres: $(STAMP)
	ACTORFLOW_REQUIRE_POSTGRES=1 $(BIN)/pytest -m "not slow" --backend=postgres $(PYTEST_FLAGS)

# Step bodies on Ray and Dask: the executor suite on real clusters (docs/executors.md).
EXECUTORS_STAMP := $(VENV)/.installed-executors
$(EXECUTORS_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[test,ray,dask]'
	touch $@

.PHONY: executors
executors: $(EXECUTORS_STAMP)
	$(BIN)/pytest -m executors -p no:randomly tests/test_executors.py tests/test_executor_multinode.py $(PYTEST_FLAGS)

# Losing the database under the nodes (tests/test_pg_failover.py): the primary SIGKILLed and
# its synchronous standby promoted, the server down for 10 s (and a node killed meanwhile),
# and the chaos workload on PostgreSQL (docs/failover.md).
.PHONY: pg-chaos
pg-chaos: $(STAMP)
	$(BIN)/pytest tests/test_pg_failover.py -m "postgres and chaos" -s -p no:randomly $(PYTEST_FLAGS)

# Keyed flow control at the size of its figure: 10,000 queued over 100 keys, 5,000 on one
# hot key capped at 2; the other keys finish first (docs/flow-control.md). About 2 minutes.
.PHONY: flow-keys
flow-keys: $(STAMP)
	$(BIN)/pytest -m slow tests/test_flow_keys.py -p no:randomly $(PYTEST_FLAGS)

# Long runs at scale, outside the default test run: the targets of the flow-control issue.
stress: $(STAMP)
	$(BIN)/python -m actorflow.bench recovery --size 10000 --repeat 1
	$(BIN)/python -m actorflow.bench concurrency --size 50000 --hold 30 --repeat 1
	$(BIN)/python -m actorflow.bench queue --size 2000000 --repeat 1
	$(BIN)/python -m actorflow.bench sleepers --size 1000000 --repeat 1

bench: $(STAMP)
	$(BIN)/pytest benchmarks -o python_files='bench_*.py' --benchmark-only --benchmark-autosave \
		--benchmark-columns=median,iqr,ops $(PYTEST_FLAGS)

# Compares a new run with the last one saved by `make bench`; fails on a large regression.
bench-compare: $(STAMP)
	$(BIN)/pytest benchmarks -o python_files='bench_*.py' --benchmark-only --benchmark-compare \
		--benchmark-compare-fail=median:50% --benchmark-columns=median,iqr,ops $(PYTEST_FLAGS)

bench-report: $(STAMP)
	$(BIN)/python -m actorflow.bench --profile cloudflare-v2

# The scenarios that run on PostgreSQL, on a throwaway local server (Debian's postgresql), beside LMDB.
bench-postgres: $(STAMP)
	$(BIN)/python -m actorflow.bench steps create latency --store lmdb --store postgres

# DBOS (PyPI dbos, SQLite system database) in its own environment, side by side with actorflow.
# dbos brings psycopg (binary) itself: bench-peers-postgres needs nothing more in that environment.
PEERS := benchmarks/peers/.venv
$(PEERS)/.installed:
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q 'dbos>=3.4,<4'
	touch $@

bench-peers: $(STAMP) $(PEERS)/.installed
	$(BIN)/python -m actorflow.bench peers --peer-python $(PEERS)/bin/python

# DBOS and actorflow on one throwaway local PostgreSQL server, actorflow on LMDB beside them.
bench-peers-postgres: $(STAMP) $(PEERS)/.installed
	$(BIN)/python -m actorflow.bench peers --peer-python $(PEERS)/bin/python --store postgres

clean:
	rm -rf $(VENV) $(PEERS) actorflow-data .benchmarks
