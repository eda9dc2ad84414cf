"""Where the benchmark scenarios keep their state: LMDB directories or PostgreSQL databases.

``actorflow bench --store SPEC`` takes one of:

* ``lmdb`` (the default): a fresh data directory per run under ``--data-dir``
  or a temporary directory;
* a directory: the same, under that directory;
* ``postgresql://...`` (or ``postgres://...``): a server to run on; each run
  gets a fresh database on it (``CREATE DATABASE``, so the URL's role needs
  ``CREATEDB``), dropped after the run;
* ``postgres``: the same on a throwaway local server started for the whole
  command with :class:`actorflow.testkit.postgres.PostgresServer`.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from actorflow.core.storage import is_database_url

__all__ = [
    "POSTGRES_SCENARIOS",
    "Store",
    "StoreError",
    "fresh_database",
    "open_store",
    "parse_store",
    "serial_commits",
    "with_database",
]

#: The scenarios that run on a PostgreSQL store (the others look at a data directory).
POSTGRES_SCENARIOS = ("physical", "create", "steps", "latency", "objects")
#: What every database a run makes is called, before a random suffix.
DATABASE_PREFIX = "af_bench_"


class StoreError(ValueError):
    """A ``--store`` value that names no usable store (the message says why and what to give)."""


@dataclass(frozen=True)
class Store:
    """One parsed ``--store`` value.

    Attributes:
        backend: ``"lmdb"`` or ``"postgresql"``.
        spec: The value as given on the command line.
        directory: LMDB: where the run's data directories go (None: a temporary one).
        url: PostgreSQL: the server's URL (None with ``postgres`` until the server runs).
        local: PostgreSQL: a throwaway local server is started for the command.
    """

    backend: str
    spec: str
    directory: str | None = None
    url: str | None = None
    local: bool = False

    @property
    def label(self) -> str:
        """How tables and JSON name this store's backend."""
        return "lmdb" if self.backend == "lmdb" else "postgres"


def parse_store(spec: str, data_dir: str | None = None) -> Store:
    """Parses one ``--store`` value (see the module's docstring).

    Raises:
        StoreError: A URL of another kind of database, a path that is a file, or an empty value.
    """
    if spec == "lmdb":
        return Store("lmdb", spec, directory=data_dir)
    if spec == "postgres":
        return Store("postgresql", spec, local=True)
    if is_database_url(spec):
        parts = urlsplit(spec)
        if not parts.netloc and "host=" not in parts.query:
            raise StoreError(
                f"--store {spec}: the URL names no server (postgresql://USER@HOST:PORT/DB)"
            )
        return Store("postgresql", spec, url=spec)
    if not spec or "://" in spec:
        raise StoreError(
            f"--store {spec!r}: give lmdb, a directory, postgres (a throwaway local server) "
            "or a postgresql://USER@HOST:PORT/DB URL"
        )
    if os.path.exists(spec) and not os.path.isdir(spec):
        raise StoreError(f"--store {spec}: not a directory")
    return Store("lmdb", spec, directory=spec)


@contextlib.contextmanager
def open_store(store: Store) -> Iterator[Store]:
    """Makes ``store`` usable for the whole command: starts its local server, checks its URL.

    Raises:
        StoreError: The server cannot be started or reached, or the role cannot make databases.
    """
    if store.backend == "lmdb":
        yield store
        return
    if not store.local:
        assert store.url is not None
        with fresh_database(store.url):  # fails now, with a clear message, rather than mid-run
            pass
        yield store
        return
    from actorflow.testkit.postgres import PostgresServer, PostgresServerError, available

    reason = available()
    if reason is not None:
        raise StoreError(f"--store postgres: cannot run a local server: {reason}")
    try:
        server = PostgresServer()
        server.__enter__()
    except PostgresServerError as exc:
        raise StoreError(f"--store postgres: the local server did not start: {exc}") from exc
    try:
        yield Store("postgresql", store.spec, url=server.url, local=True)
    finally:
        server.__exit__(None, None, None)


def with_database(url: str, database: str) -> str:
    """``url`` naming ``database`` instead of its own (hosts, user and query kept)."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + database))


@contextlib.contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server of ``server_url``; dropped afterwards. Yields its URL.

    Raises:
        StoreError: The server cannot be reached, or the URL's role may not create databases.
    """
    import psycopg  # the postgres extra; only a PostgreSQL store needs it

    name = f"{DATABASE_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.Error as exc:
        raise StoreError(
            f"--store {_safe(server_url)}: cannot create a database for the run "
            f"(the role needs CREATEDB): {str(exc).strip()}"
        ) from exc
    try:
        yield with_database(server_url, name)
    finally:
        with (
            contextlib.suppress(psycopg.Error),
            psycopg.connect(server_url, autocommit=True, connect_timeout=10) as conn,
        ):
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def serial_commits(url: str, seconds: float = 1.0) -> dict[str, float]:
    """The server's rate of one-row commits made one at a time (``synchronous_commit`` as set).

    The PostgreSQL counterpart of the ``physical`` scenario's ``fsync``'d
    commits: what one client waiting for each commit gets, the unit against
    which group commit is read.
    """
    import time

    import psycopg

    with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS af_bench_commits (k bigint PRIMARY KEY, v bytea)")
        sync = str(conn.execute("SHOW synchronous_commit").fetchone()[0])  # type: ignore[index]
        n = 0
        t = time.perf_counter()
        while (dt := time.perf_counter() - t) < seconds:
            conn.execute("INSERT INTO af_bench_commits VALUES (%s, %s)", (n, b"x" * 64))
            n += 1
    return {
        "pg_commits_per_s": n / dt,
        "pg_commit_ms": dt * 1000 / n,
        "pg_synchronous_commit_on": float(sync == "on"),
    }


def _safe(url: str) -> str:
    """``url`` without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def describe(store: Store, root: Path | None = None) -> str:
    """One line for the report's header: the backend and where it is."""
    if store.backend == "lmdb":
        return f"lmdb in {store.directory or root or 'a temporary directory'}"
    where = "a throwaway local server" if store.local else "the server"
    return f"postgres on {where} {_safe(store.url or '')}"
