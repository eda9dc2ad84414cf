"""Shared fixtures: a fake clock, a runtime on a fresh location, a journal, PostgreSQL.

The location is a fresh data directory, or with ``--backend=postgres`` a fresh
database on a PostgreSQL server the run starts itself: the same
suites run on both backends. Tests that look at a data directory's own files
are marked ``lmdb_only``.

Workflows under test get their journal through ``env`` (``rt.register(cls,
env=journal)``), so step bodies can record that they ran without any
module-level mutable state.
"""

from __future__ import annotations

import ast
import gc
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import actorflow as af
from actorflow.cluster.lease import OWNED, OWNER
from actorflow.core.timers import TIMERS
from actorflow.testing import FakeClock, NodeProcess
from actorflow.testkit.postgres import PostgresServer, available, temporary_database
from actorflow.workflows.records import (
    EVENTS,
    FENCE,
    HIST,
    IDS,
    IDX,
    INST,
    KQUEUE,
    STEPS,
    queue_db,
)


class Journal:
    """A thread-safe, append-only record of what step bodies did.

    Besides entries, it holds named ``threading.Event`` gates that step
    bodies can block on until the test opens them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[Any] = []
        self._gates: dict[str, threading.Event] = {}
        self._all_open = False
        self.data: dict[str, Any] = {}

    def add(self, entry: Any) -> None:
        with self._lock:
            self._entries.append(entry)

    @property
    def entries(self) -> list[Any]:
        with self._lock:
            return list(self._entries)

    def count(self, entry: Any) -> int:
        with self._lock:
            return self._entries.count(entry)

    def counts(self) -> Counter[Any]:
        with self._lock:
            return Counter(self._entries)

    def gate(self, name: str) -> threading.Event:
        """Returns the gate ``name`` (made closed on first use, open after ``open_all``)."""
        with self._lock:
            gate = self._gates.get(name)
            if gate is None:
                gate = self._gates[name] = threading.Event()
                if self._all_open:
                    gate.set()
            return gate

    def open_all(self) -> None:
        """Opens every gate, and those made later, so that no step body stays blocked."""
        with self._lock:
            self._all_open = True
            gates = list(self._gates.values())
        for g in gates:
            g.set()

    def block(self, name: str, timeout: float = 10.0) -> None:
        """Blocks until gate ``name`` opens; fails loudly if it never does."""
        if not self.gate(name).wait(timeout):
            raise RuntimeError(f"gate {name!r} never opened")


def wait_for(cond: Any, timeout: float = 5.0) -> None:
    """Polls ``cond`` (in real time) until it holds; fails the test if it never does."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail("condition never held")
        time.sleep(0.002)


def parse_source(path: Path) -> Any:
    """``ast.parse`` of a file, with the cyclic collector held off meanwhile.

    CPython 3.11 can fail an ``ast.parse`` with "AST constructor recursion
    depth mismatch" when a collection runs finalizers in the middle of it
    (python/cpython#106905); earlier tests leave such garbage behind.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        return ast.parse(path.read_text())
    finally:
        if enabled:
            gc.enable()


def history_types(inst: af.Instance, prefix: str = "") -> list[str]:
    """The history event types of ``inst``, optionally only those starting with ``prefix``."""
    return [e.type for e in inst.history() if e.type.startswith(prefix)]


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    """A fake clock; time moves only on ``clock.advance``."""
    c = FakeClock()
    yield c
    c.close()


@pytest.fixture
def journal() -> Iterator[Journal]:
    """A fresh journal; every gate is opened at teardown so no thread stays blocked."""
    j = Journal()
    yield j
    j.open_all()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--backend",
        choices=["lmdb", "postgres"],
        default="lmdb",
        help="the storage backend of the location fixture (default lmdb)",
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--backend") != "postgres":
        return
    skip = pytest.mark.skip(reason="looks at a data directory's own files (LMDB backend only)")
    for item in items:
        if item.get_closest_marker("lmdb_only"):
            item.add_marker(skip)


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The storage backend under test: ``lmdb`` or ``postgres``."""
    return str(request.config.getoption("--backend"))


@pytest.fixture
def location(request: pytest.FixtureRequest, tmp_path: Path, backend: str) -> Iterator[str]:
    """Where a test's runtime keeps its state: a fresh directory, or a fresh database schema."""
    if backend == "lmdb":
        yield str(tmp_path / "data")
        return
    yield request.getfixturevalue("pg_url")


@pytest.fixture
def rt(location: str, clock: FakeClock, journal: Journal) -> Iterator[af.Runtime]:
    """A runtime on the ``location`` fixture driven by the ``clock`` fixture; closed after the test."""
    runtime = af.Runtime(location, clock=clock)
    yield runtime
    journal.open_all()
    runtime.close()


@pytest.fixture
def make_runtime(location: str, clock: FakeClock, journal: Journal) -> Iterator[Any]:
    """Builds runtimes (on the ``location`` fixture by default); all are closed after the test."""
    made: list[af.Runtime] = []

    def make(**kwargs: Any) -> af.Runtime:
        kwargs.setdefault("clock", clock)
        runtime = af.Runtime(kwargs.pop("data_dir", location), **kwargs)
        made.append(runtime)
        return runtime

    yield make
    journal.open_all()
    for runtime in made:
        runtime.close()


def postgres_or_skip() -> None:
    """Skips the test unless a PostgreSQL server can run here (fails if one is required)."""
    reason = available()
    if reason is None:
        return
    if os.environ.get("ACTORFLOW_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"ACTORFLOW_REQUIRE_POSTGRES=1, but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL server for the session (skipped if none can run here)."""
    postgres_or_skip()
    with PostgresServer() as server:
        yield server


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """The URL of a fresh database on ``pg_server``, dropped after the test."""
    with temporary_database(pg_server) as url:
        yield url


#: The app of the ``nodes`` fixture's node processes, unless a test names another.
NODE_APP = "apps.node_app:factory"


@pytest.fixture
def nodes(location: str) -> Iterator[Callable[..., NodeProcess]]:
    """Starts node processes on the ``location`` fixture; each is killed after the test.

    ``nodes(node_id, app=NODE_APP, **env)`` starts one (a 1 s lease) and
    returns it; ``env`` is added to its environment. A node left frozen
    (SIGSTOP) is continued before it is killed.
    """
    made: list[NodeProcess] = []

    def make(node_id: str, app: str = NODE_APP, **env: str) -> NodeProcess:
        node = NodeProcess(location, app, node_id=node_id, lease_timeout=1.0, env=env)
        made.append(node)
        return node.start()

    yield make
    for node in made:
        if node.alive:
            node.send_signal(signal.SIGCONT)
        node.kill()  # also reaps one that exited by itself, and closes its pipes


def instance_records(rt: af.Runtime, *workflows: str) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every pair of every keyspace the instances of ``workflows`` can write to.

    Taken before and after an operation, it shows whether anything of any
    instance was written, left behind or removed.
    """
    spaces = [IDS, INST, FENCE, IDX, STEPS, EVENTS, HIST, TIMERS, OWNER, OWNED, KQUEUE]
    spaces += [queue_db(wf) for wf in workflows]
    return {ks: rt.storage.scan(ks) for ks in spaces}
