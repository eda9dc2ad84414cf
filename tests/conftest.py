"""Shared fixtures: a fake clock, a runtime on a fresh data directory, a journal, PostgreSQL.

Workflows under test get their journal through ``env`` (``rt.register(cls,
env=journal)``), so step bodies can record that they ran without any
module-level mutable state.
"""

from __future__ import annotations

import ast
import gc
import os
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import actorflow as af
from actorflow.testing import FakeClock
from actorflow.testkit.postgres import PostgresServer, available, temporary_database


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


@pytest.fixture
def rt(tmp_path: Path, clock: FakeClock, journal: Journal) -> Iterator[af.Runtime]:
    """A runtime on ``tmp_path / "data"`` driven by the ``clock`` fixture; closed after the test."""
    runtime = af.Runtime(tmp_path / "data", clock=clock)
    yield runtime
    journal.open_all()
    runtime.close()


@pytest.fixture
def make_runtime(tmp_path: Path, clock: FakeClock, journal: Journal) -> Iterator[Any]:
    """Builds runtimes (on ``tmp_path / "data"`` by default); all are closed after the test."""
    made: list[af.Runtime] = []

    def make(**kwargs: Any) -> af.Runtime:
        kwargs.setdefault("clock", clock)
        runtime = af.Runtime(kwargs.pop("data_dir", tmp_path / "data"), **kwargs)
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
