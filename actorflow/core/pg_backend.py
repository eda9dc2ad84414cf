"""The PostgreSQL backend: every keyspace in one table of a PostgreSQL database.

Several runtimes, on any number of hosts, share one database as nodes; the
database is the only thing they share. What the storage contract asks, and how
it is kept here:

* **Durable before return.** A batch's callback runs after the ``COMMIT`` of
  its group returned. The server's ``synchronous_commit`` is left as the
  database has it (``on`` by default; with a synchronous standby, a commit
  returns once the standby has it too).
* **Group commit.** The writer thread folds every queued batch into one
  transaction: one advisory lock, one read of every guarded key, one statement
  that applies the net writes, one commit.
* **Guards and order.** Group transactions of all nodes serialize on one
  transaction-level advisory lock, as LMDB's writers do on its write lock, so a
  guard read after taking it sees every commit before it and nothing can
  change the key until this commit. A frozen node cannot hold it for long: its
  session has ``idle_in_transaction_session_timeout`` set, and the server ends
  the transaction of a session that stopped talking.
* **Keys in bytewise order.** Keys are ``bytea``, which compares bytewise, so
  prefix scans and ordered scans work as in LMDB.
* **A lost connection** (the server restarting, a failover to a standby) is
  waited out: the writer reconnects with a log line every few seconds and
  retries the group. A commit whose answer was lost is looked up: each group
  also writes this storage's commit number in ``actorflow_writers``, and after
  reconnecting the writer reads it back, so a group that landed is reported
  landed, never applied twice or reported lost. Serialization failures and
  deadlocks are retried the same way. Reads retry for :attr:`read_patience`
  seconds, then raise :class:`~actorflow.core.errors.StorageError`.

The schema (``actorflow_meta``, ``actorflow_kv``, ``actorflow_writers``) is
created on first use. A schema written by a newer actorflow is refused, and
nothing is changed.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from actorflow.core.errors import (
    DataDirectoryLocked,
    LimitExceeded,
    StorageCorrupted,
    StorageError,
)
from actorflow.core.serializers import Serializer
from actorflow.core.storage import (
    DELETE,
    PUT,
    ConflictError,
    Item,
    Storage,
    WriteBatch,
    prefix_end,
)

try:
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg_pool import ConnectionPool
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "a postgresql:// location needs psycopg 3 with its pool: pip install 'actorflow[postgres]'"
    ) from exc

__all__ = ["MAX_VALUE_BYTES", "SCHEMA_VERSION", "PostgresStorage"]

log = logging.getLogger("actorflow.storage")

#: The schema this version writes, and the newest it reads.
SCHEMA_VERSION = 1
#: PostgreSQL's limit on one ``bytea`` value is 1 GiB less its header.
MAX_VALUE_BYTES = (1 << 30) - 64
#: Advisory lock keys (the first of two int4 keys): "af" in ASCII.
_LOCK_SPACE = 0x6166
_WRITE_LOCK, _SCHEMA_LOCK, _LONE_LOCK = 1, 2, 3
_NODE_LOCK_SPACE = 0x6167
#: Seconds a session may sit inside a transaction without a word; then the
#: server ends it and frees the write lock (a frozen or dead node).
IDLE_IN_TRANSACTION = 5
#: Attempts at a group that meets serialization failures or deadlocks.
_MAX_RETRIES = 50
#: Seconds between two log lines while the database cannot be reached.
_LOG_EVERY = 5.0
_CONNECT: dict[str, Any] = {
    "connect_timeout": 5,
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 3,
    "tcp_user_timeout": 10000,
}

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS actorflow_kv ("
    ' ks text COLLATE "C" NOT NULL, k bytea NOT NULL, v bytea NOT NULL,'
    " PRIMARY KEY (ks, k))",
    "CREATE TABLE IF NOT EXISTS actorflow_writers ("
    " token uuid PRIMARY KEY, seq bigint NOT NULL, at timestamptz NOT NULL DEFAULT now())",
)
_GUARDS = (
    "SELECT kv.ks, kv.k, kv.v FROM actorflow_kv kv"
    " JOIN unnest(%s::text[], %s::bytea[]) AS g(ks, k) ON kv.ks = g.ks AND kv.k = g.k"
)
#: The net writes of a group and its commit number, in one statement: the
#: deleted and the written keys are disjoint (one value per key).
_APPLY = (
    "WITH d AS (DELETE FROM actorflow_kv kv USING unnest(%s::text[], %s::bytea[]) AS x(ks, k)"
    " WHERE kv.ks = x.ks AND kv.k = x.k),"
    " u AS (INSERT INTO actorflow_kv (ks, k, v)"
    " SELECT * FROM unnest(%s::text[], %s::bytea[], %s::bytea[])"
    " ON CONFLICT (ks, k) DO UPDATE SET v = EXCLUDED.v)"
    " INSERT INTO actorflow_writers (token, seq) VALUES (%s, %s)"
    " ON CONFLICT (token) DO UPDATE SET seq = EXCLUDED.seq, at = now()"
)
_RETRY = (pg_errors.SerializationFailure, pg_errors.DeadlockDetected)
#: Errors of the connection rather than of the statement: wait, reconnect, retry.
_LOST = (psycopg.OperationalError, psycopg.InterfaceError, pg_errors.AdminShutdown)


def safe_url(url: str) -> str:
    """``url`` without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)


class PostgresStorage(Storage):
    """Keyspaces in a PostgreSQL database, under the group commit of :class:`Storage`.

    Args:
        url: A ``postgresql://`` URL (libpq's: several ``host:port`` pairs and
            ``target_session_attrs=read-write`` reach whichever is the primary).
        max_batch: The most write batches folded into one transaction.
        serializer: The default value serializer for layers above.
        pool_size: The most connections used for reads at once.
        read_patience: Seconds a read waits for an unreachable database
            before it raises :class:`StorageError`.

    Raises:
        StorageError: The database cannot be reached or refused the
            connection, or holds a schema from a newer actorflow.
    """

    backend = "postgresql"

    def __init__(
        self,
        url: str,
        *,
        max_batch: int = 4096,
        serializer: Serializer | None = None,
        pool_size: int = 8,
        read_patience: float = 60.0,
    ) -> None:
        super().__init__(safe_url(url), max_batch=max_batch, serializer=serializer)
        self.url = url
        self.read_patience = read_patience
        self._pid = os.getpid()
        self._token = uuid.uuid4()
        self._seq = 0
        # Held by the writer around a commit and its number, and by a reader
        # taking a snapshot whose commit number it reports (visit_keys).
        self._commit_lock = threading.Lock()
        self._conn = self._connect_first()
        try:
            self._ensure_schema(self._conn)
            self._pool = ConnectionPool(
                url,
                min_size=1,
                max_size=max(1, pool_size),
                kwargs={**_CONNECT, "autocommit": True},
                open=True,
                name="actorflow-read",
            )
        except BaseException:
            self._conn.close()
            raise
        self._claim_conn: psycopg.Connection[Any] | None = None
        # Set by close(): a writer waiting for an unreachable database gives up.
        self._stop_requested = False
        # The results of the group being committed, for when its answer is lost.
        self._sent: list[BaseException | None] = []
        self._start_writer()

    # -- connections ------------------------------------------------------------

    def _new_connection(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.url, autocommit=True, **_CONNECT)
        conn.execute(f"SET idle_in_transaction_session_timeout = '{IDLE_IN_TRANSACTION}s'")
        conn.autocommit = False
        return conn

    def _connect_first(self) -> psycopg.Connection[Any]:
        try:
            return self._new_connection()
        except psycopg.Error as exc:
            raise StorageError(
                f"cannot reach the PostgreSQL database {self.path}: {_first_line(exc)}",
                path=self.path,
            ) from None

    def _ensure_schema(self, conn: psycopg.Connection[Any]) -> None:
        """Creates the schema on first use; refuses one from a newer actorflow."""
        try:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_SPACE, _SCHEMA_LOCK))
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS actorflow_meta"
                    " (name text PRIMARY KEY, value text NOT NULL)"
                )
                row = conn.execute(
                    "SELECT value FROM actorflow_meta WHERE name = 'schema'"
                ).fetchone()
                if row is None:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(
                        "INSERT INTO actorflow_meta VALUES ('schema', %s)", (str(SCHEMA_VERSION),)
                    )
                    version = SCHEMA_VERSION
                else:
                    version = int(row[0])
                if version > SCHEMA_VERSION:
                    raise StorageError(
                        f"the PostgreSQL database {self.path} holds actorflow schema version "
                        f"{version}, written by a newer actorflow; this one reads up to "
                        f"version {SCHEMA_VERSION}. Upgrade actorflow; nothing was changed",
                        path=self.path,
                    )
            conn.commit()
        except psycopg.Error as exc:
            raise StorageError(
                f"cannot use the PostgreSQL database {self.path}: {_first_line(exc)}",
                path=self.path,
            ) from None

    def _reconnect(self, why: BaseException) -> psycopg.Connection[Any]:
        """Replaces the writer's connection, waiting as long as it takes (writer thread).

        Raises:
            StorageError: The storage was closed meanwhile.
        """
        try:
            self._conn.close()
        except Exception:
            pass
        t0 = time.monotonic()
        told = 0.0
        delay = 0.05
        log.warning(
            "the PostgreSQL database %s cannot be reached (%s): writes wait and retry",
            self.path,
            _first_line(why),
        )
        while True:
            if self._stop_requested:
                raise StorageError(f"storage at {self.path} was closed before the write")
            try:
                self._conn = self._new_connection()
                log.warning(
                    "the PostgreSQL database %s is back after %.1f s; retrying the writes",
                    self.path,
                    time.monotonic() - t0,
                )
                return self._conn
            except psycopg.Error as exc:
                waited = time.monotonic() - t0
                if waited - told >= _LOG_EVERY:
                    told = waited
                    log.warning(
                        "the PostgreSQL database %s is still unreachable after %.0f s (%s); "
                        "writes keep waiting",
                        self.path,
                        waited,
                        _first_line(exc),
                    )
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _check_open(self) -> None:
        if os.getpid() != self._pid:
            raise StorageError(
                f"storage at {self.path} was opened in process {self._pid} and cannot be "
                "used after fork() (its connections are the parent's); open a new Runtime "
                "in the child"
            )
        super()._check_open()

    # -- reads ------------------------------------------------------------------------

    def _read(self, run: Callable[[psycopg.Connection[Any]], Any], what: str) -> Any:
        """Runs ``run(connection)`` on a pooled connection, retrying a lost one."""
        self._check_open()
        deadline = time.monotonic() + self.read_patience
        delay = 0.05
        while True:
            try:
                with self._pool.connection(timeout=self.read_patience) as conn:
                    return run(conn)
            except _LOST as exc:
                if time.monotonic() >= deadline or self._closed:
                    raise StorageError(
                        f"reading {what} from the PostgreSQL database {self.path} failed: "
                        f"{_first_line(exc)}",
                        path=self.path,
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
            except pg_errors.DataCorrupted as exc:
                raise StorageCorrupted(
                    f"the PostgreSQL database {self.path} reports damaged data ({what}): "
                    f"{_first_line(exc)}",
                    path=self.path,
                ) from None

    def get(self, keyspace: str, key: bytes) -> bytes | None:
        """Returns the committed value of ``key``, or None."""

        def run(conn: psycopg.Connection[Any]) -> bytes | None:
            row = conn.execute(
                "SELECT v FROM actorflow_kv WHERE ks = %s AND k = %s", (keyspace, key), binary=True
            ).fetchone()
            return None if row is None else bytes(row[0])

        value: bytes | None = self._read(run, f"keyspace {keyspace!r}")
        return value

    def get_many(self, keyspace: str, keys: Iterable[bytes]) -> dict[bytes, bytes]:
        """Returns the committed values of ``keys`` that exist, in one snapshot."""
        wanted = list(keys)
        if not wanted:
            return {}

        def run(conn: psycopg.Connection[Any]) -> dict[bytes, bytes]:
            rows = conn.execute(
                "SELECT k, v FROM actorflow_kv WHERE ks = %s AND k = ANY(%s::bytea[])",
                (keyspace, wanted),
                binary=True,
            ).fetchall()
            return {bytes(k): bytes(v) for k, v in rows}

        out: dict[bytes, bytes] = self._read(run, f"keyspace {keyspace!r}")
        return out

    def scan(
        self,
        keyspace: str,
        *,
        prefix: bytes = b"",
        start: bytes | None = None,
        start_after: bytes | None = None,
        end: bytes | None = None,
        reverse: bool = False,
        limit: int | None = None,
        keys_only: bool = False,
    ) -> list[tuple[bytes, bytes]]:
        """Returns ``(key, value)`` pairs in key order from one snapshot (see :class:`Storage`)."""
        if limit is not None and limit <= 0:
            return []
        where, params = _range(keyspace, prefix, start, start_after, end)
        sql = (
            f"SELECT k, {'NULL' if keys_only else 'v'} FROM actorflow_kv WHERE {where}"
            f" ORDER BY k {'DESC' if reverse else 'ASC'}"
        )
        if limit is not None:
            sql += " LIMIT %s"
            params.append(limit)

        def run(conn: psycopg.Connection[Any]) -> list[tuple[bytes, bytes]]:
            rows = conn.execute(sql, params, binary=True).fetchall()
            return [(bytes(k), b"" if v is None else bytes(v)) for k, v in rows]

        out: list[tuple[bytes, bytes]] = self._read(run, f"keyspace {keyspace!r}")
        return out

    def scan_prefixes(self, wanted: list[tuple[str, bytes]]) -> list[list[tuple[bytes, bytes]]]:
        """Returns the pairs under each ``(keyspace, prefix)`` of ``wanted``, from one snapshot."""
        if not wanted:
            return []
        parts = []
        params: list[Any] = []
        for i, (keyspace, prefix) in enumerate(wanted):
            where, more = _range(keyspace, prefix, None, None, None)
            parts.append(f"SELECT {i}, k, v FROM actorflow_kv WHERE {where}")
            params.extend(more)
        # One statement: one snapshot for every part.
        sql = " UNION ALL ".join(f"({p})" for p in parts) + " ORDER BY 1, 2"

        def run(conn: psycopg.Connection[Any]) -> list[list[tuple[bytes, bytes]]]:
            out: list[list[tuple[bytes, bytes]]] = [[] for _ in wanted]
            for i, k, v in conn.execute(sql, params, binary=True):
                out[i].append((bytes(k), bytes(v)))
            return out

        result: list[list[tuple[bytes, bytes]]] = self._read(run, "several keyspaces")
        return result

    def visit_keys(self, keyspace: str, visit: Callable[[bytes], None]) -> int:
        """Calls ``visit(key)`` for every key, in one snapshot; returns its commit number."""

        def run(conn: psycopg.Connection[Any]) -> int:
            with conn.transaction():
                conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                # The snapshot is taken by the first query; no commit of this
                # storage's writer may fall between it and the number read.
                with self._commit_lock:
                    conn.execute("SELECT 1")
                    seq = self._seq
                with conn.cursor(name=f"visit_{uuid.uuid4().hex}", binary=True) as cur:
                    cur.itersize = 10000
                    cur.execute("SELECT k FROM actorflow_kv WHERE ks = %s ORDER BY k", (keyspace,))
                    for (k,) in cur:
                        visit(bytes(k))
            return seq

        seq: int = self._read(run, f"keyspace {keyspace!r}")
        return seq

    def count(self, keyspace: str, prefix: bytes = b"") -> int:
        """Returns how many keys start with ``prefix``."""
        where, params = _range(keyspace, prefix, None, None, None)

        def run(conn: psycopg.Connection[Any]) -> int:
            sql = f"SELECT count(*) FROM actorflow_kv WHERE {where}"
            row = conn.execute(sql, params).fetchone()
            return int(row[0]) if row else 0

        n: int = self._read(run, f"keyspace {keyspace!r}")
        return n

    def count_prefixes(
        self, keyspace: str, prefixes: list[bytes], probe: Iterable[bytes] = ()
    ) -> tuple[list[int], set[bytes]]:
        """Counts the keys under each of ``prefixes`` and tells which ``probe`` keys exist."""
        probes = list(probe)
        cols = []
        params: list[Any] = []
        for prefix in prefixes:
            where, more = _range(keyspace, prefix, None, None, None)
            cols.append(f"(SELECT count(*) FROM actorflow_kv WHERE {where})")
            params.extend(more)
        cols.append("ARRAY(SELECT k FROM actorflow_kv WHERE ks = %s AND k = ANY(%s::bytea[]))")
        params.extend([keyspace, probes])
        sql = "SELECT " + ", ".join(cols)  # one statement: one snapshot

        def run(conn: psycopg.Connection[Any]) -> tuple[list[int], set[bytes]]:
            row = conn.execute(sql, params, binary=True).fetchone()
            assert row is not None
            return [int(n) for n in row[:-1]], {bytes(k) for k in row[-1]}

        out: tuple[list[int], set[bytes]] = self._read(run, f"keyspace {keyspace!r}")
        return out

    def verify(self) -> None:
        """Reads every row and index entry; raises what the server reports damaged.

        Raises:
            StorageCorrupted: The server met a damaged page (with data checksums
                on, or a broken index).
        """

        def run(conn: psycopg.Connection[Any]) -> None:
            conn.execute("SELECT count(*), sum(length(v)) FROM actorflow_kv").fetchone()
            conn.execute(
                "SELECT count(*) FROM (SELECT ks, k FROM actorflow_kv ORDER BY ks, k) t"
            ).fetchone()

        self._read(run, "every keyspace")

    # -- writes ----------------------------------------------------------------------

    def _prepare(self, batch: WriteBatch) -> None:
        for op in batch.ops:
            value = op[3]
            if value is not None and len(value) > MAX_VALUE_BYTES:
                raise LimitExceeded(
                    f"value of {len(value)} bytes for key {op[2]!r} in keyspace {op[1]!r} "
                    f"exceeds PostgreSQL's limit of {MAX_VALUE_BYTES} bytes; nothing was written"
                )

    def _transact(self, items: list[Item]) -> tuple[list[BaseException | None], int]:
        """Applies ``items`` in one transaction and commits it (see the module doc)."""
        seq = self._seq + 1
        for attempt in itertools.count(1):
            conn = self._conn
            self._sent = []
            try:
                results = self._attempt(conn, items, seq)
            except _RETRY as exc:
                self._rollback(conn)
                if attempt >= _MAX_RETRIES:
                    err = StorageError(
                        f"durable write to {self.path} failed: {attempt} attempts met "
                        f"{type(exc).__name__}; nothing of it was applied",
                        path=self.path,
                    )
                    return [err] * len(items), self._seq
                log.info("group commit retried after %s (attempt %d)", type(exc).__name__, attempt)
                time.sleep(min(0.001 * attempt, 0.05))
                continue
            except _LOST as exc:
                try:
                    conn = self._reconnect(exc)
                    if self._sent and self._landed(conn, seq):
                        results = self._sent  # it committed; only its answer was lost
                        break
                except (StorageError, psycopg.Error) as closed:
                    if not isinstance(closed, StorageError):
                        continue  # lost again while looking: reconnect again
                    return [closed] * len(items), self._seq
                continue
            except psycopg.Error as exc:
                self._rollback(conn)
                log.error("group commit of %d batches failed: %s", len(items), exc)
                err = StorageError(
                    f"durable write to {self.path} failed: {_first_line(exc)}", path=self.path
                )
                return [err] * len(items), self._seq
            break
        with self._commit_lock:
            self._seq = seq
        return results, seq

    def _attempt(
        self, conn: psycopg.Connection[Any], items: list[Item], seq: int
    ) -> list[BaseException | None]:
        # The fault hook may sleep (a slow disk): never while holding the lock.
        faults = [self._faulted(batch) for batch, _cb in items]
        guard_ks: list[str] = []
        guard_keys: list[bytes] = []
        for batch, _cb in items:
            for ks, key, _expected in batch.guards:
                guard_ks.append(ks)
                guard_keys.append(key)
        with conn.pipeline():
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (_LOCK_SPACE, _WRITE_LOCK))
            cur = conn.execute(_GUARDS, (guard_ks, guard_keys), binary=True) if guard_keys else None
        current: dict[tuple[str, bytes], bytes] = {}
        if cur is not None:
            current = {(ks, bytes(k)): bytes(v) for ks, k, v in cur.fetchall()}
        writes: dict[tuple[str, bytes], bytes | None] = {}
        dropped: list[tuple[str, bytes]] = []
        results = self._evaluate(items, faults, current, writes, dropped)
        self._sent = results
        dels = [key for key, value in writes.items() if value is None]
        puts = [(key, value) for key, value in writes.items() if value is not None]
        with conn.pipeline():
            for ks, prefix in dropped:
                where, params = _range(ks, prefix, None, None, None)
                conn.execute(f"DELETE FROM actorflow_kv WHERE {where}", params)
            with self._commit_lock:
                conn.execute(
                    _APPLY,
                    (
                        [ks for ks, _ in dels],
                        [k for _, k in dels],
                        [ks for (ks, _), _ in puts],
                        [k for (_, k), _ in puts],
                        [v for _, v in puts],
                        self._token,
                        seq,
                    ),
                )
                conn.commit()
        return results

    def _evaluate(
        self,
        items: list[Item],
        faults: list[BaseException | None],
        current: dict[tuple[str, bytes], bytes],
        writes: dict[tuple[str, bytes], bytes | None],
        dropped: list[tuple[str, bytes]],
    ) -> list[BaseException | None]:
        """Checks each batch in order against what the group wrote before it.

        Fills ``writes`` (the net value of each key, None: deleted) and
        ``dropped`` (deleted prefixes).
        """
        results: list[BaseException | None] = [None] * len(items)
        broken: set[int] = set()
        for i, (batch, _cb) in enumerate(items):
            err = self._chain_refused(batch, broken) or faults[i]
            if err is None:
                for ks, key, expected in batch.guards:
                    k = (ks, key)
                    if k in writes:
                        now = writes[k]
                    elif any(ks == d and key.startswith(p) for d, p in dropped):
                        now = None
                    else:
                        now = current.get(k)
                    if now != expected:
                        err = ConflictError(f"write rejected: guard on {key!r} did not hold")
                        break
            if err is not None:
                results[i] = err
                if batch.chain is not None:
                    broken.add(id(batch.chain))
                continue
            for kind, ks, key, value in batch.ops:
                if kind in (PUT, DELETE):
                    writes[(ks, key)] = value
                else:
                    for k in [k for k in writes if k[0] == ks and k[1].startswith(key)]:
                        del writes[k]
                    dropped.append((ks, key))
        return results

    def _landed(self, conn: psycopg.Connection[Any], seq: int) -> bool:
        """True if this storage's group ``seq`` committed (its answer was lost)."""
        row = conn.execute(
            "SELECT seq FROM actorflow_writers WHERE token = %s", (self._token,)
        ).fetchone()
        conn.rollback()
        return row is not None and int(row[0]) >= seq

    def _rollback(self, conn: psycopg.Connection[Any]) -> None:
        try:
            conn.rollback()
        except psycopg.Error:
            pass

    # -- claims: who may open the database ----------------------------------------------

    def claim(self, node_id: str | None) -> None:
        """Claims the database for a lone runtime, or as node ``node_id``, for this storage's life.

        Session advisory locks on a connection of their own, the database's
        counterpart of a data directory's lock files: a lone runtime holds the
        database alone, nodes share it, each node id once.

        Raises:
            DataDirectoryLocked: Another runtime holds it.
        """
        conn = psycopg.connect(self.url, autocommit=True, **_CONNECT)
        try:
            if node_id is None:
                ok = conn.execute(
                    "SELECT pg_try_advisory_lock(%s, %s)", (_LOCK_SPACE, _LONE_LOCK)
                ).fetchone()
                taken = "another runtime (or a node) has it open"
            else:
                ok = conn.execute(
                    "SELECT pg_try_advisory_lock_shared(%s, %s)"
                    " AND pg_try_advisory_lock(%s, hashtext(%s))",
                    (_LOCK_SPACE, _LONE_LOCK, _NODE_LOCK_SPACE, node_id),
                ).fetchone()
                taken = f"a runtime without a node id, or node {node_id!r}, has it open"
            if not (ok and ok[0]):
                raise DataDirectoryLocked(
                    f"the PostgreSQL database {self.path} is in use: {taken}. Close that "
                    "runtime first; to run several runtimes on one database, give each its "
                    "own node_id",
                    path=self.path,
                )
        except BaseException:
            conn.close()
            raise
        self._claim_conn = conn

    # -- closing ---------------------------------------------------------------------------

    def close(self) -> None:
        """Flushes queued batches, stops the writer and closes the connections."""
        if self._closed:
            return
        if os.getpid() != self._pid:
            self._closed = True  # the parent's connections: never touch them here
            return
        # With the database up the writer commits what is queued as usual; one
        # waiting for an unreachable database gives up, failing those writes.
        self._stop_requested = True
        super().close()

    def _close_backend(self) -> None:
        for conn in (self._conn, self._claim_conn):
            if conn is not None:
                try:
                    conn.close()
                except Exception:
                    pass
        self._pool.close()


def _range(
    keyspace: str,
    prefix: bytes,
    start: bytes | None,
    start_after: bytes | None,
    end: bytes | None,
) -> tuple[str, list[Any]]:
    """The ``WHERE`` clause and parameters of a key range in ``keyspace``."""
    where = ["ks = %s"]
    params: list[Any] = [keyspace]
    lo = max(prefix, start) if start is not None else prefix
    if lo:
        where.append("k >= %s")
        params.append(lo)
    if start_after is not None:
        where.append("k > %s")
        params.append(start_after)
    upper = prefix_end(prefix) if prefix else None
    if end is not None and (upper is None or end < upper):
        upper = end
    if upper is not None:
        where.append("k < %s")
        params.append(upper)
    return " AND ".join(where), params


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
