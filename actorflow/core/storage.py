"""Durable storage: the contract every backend keeps, and its group commit.

A :class:`Storage` is a set of named keyspaces of byte keys and byte values,
ordered bytewise. Two backends implement it: the embedded LMDB data directory
(:mod:`actorflow.core.lmdb_backend`, the default) and a PostgreSQL database
(:mod:`actorflow.core.pg_backend`); :func:`open_storage` picks one from a
location. The contract, method by method:

* :meth:`Storage.get`, :meth:`Storage.get_many`, :meth:`Storage.scan`,
  :meth:`Storage.scan_prefixes` (several keyspaces, one snapshot) and
  :meth:`Storage.count` read the last committed state. They never see a write
  that is not yet durable, and they never block writers.
* :meth:`Storage.submit` queues a :class:`WriteBatch`. The batch is applied
  atomically (all of its operations or none), in submission order relative to
  every other batch, and its callback runs only once the batch is durable or
  has definitely failed. Many batches share one transaction and one commit:
  this is the group commit, run by one writer thread per storage.
* A batch may carry *guards*: ``(keyspace, key, expected)`` triples checked
  inside the write transaction. If one does not hold, none of the batch is
  applied and the callback gets :class:`ConflictError`. The engine uses this
  for ownership fencing (an instance's epoch).
* A batch may belong to a :class:`Chain`: a sequence of batches that must
  land as a prefix. Once one batch of a chain fails, every later batch of it
  fails too (with :class:`StorageError`) and nothing of them is written. This
  lets a writer pipeline batches (submit the next before the previous is
  durable) without risking a later batch landing on top of a lost one.
* :meth:`Storage.write` is :meth:`submit` plus a wait.
* Values are bytes here. :class:`Serializer` turns Python values into bytes;
  serialization happens in the caller's thread, so an unserializable value
  raises :class:`~actorflow.core.errors.SerializationError` before anything is
  queued, and nothing is written.

The layers above never build a backend's own structures (LMDB databases, SQL):
they speak in keyspaces, keys, batches and scans, and one test suite runs
against both backends.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from typing import Any

from actorflow.core.errors import LimitExceeded, StorageError
from actorflow.core.serializers import JsonSerializer, PickleSerializer, Serializer

# The serializers live in their own module; they are exported here too,
# beside the Storage that takes them.
__all__ = [
    "DELETE",
    "DELETE_PREFIX",
    "MAX_KEY_BYTES",
    "PUT",
    "Chain",
    "ConflictError",
    "JsonSerializer",
    "PickleSerializer",
    "Serializer",
    "Storage",
    "WriteBatch",
    "is_database_url",
    "join_key",
    "open_storage",
    "prefix_end",
]

log = logging.getLogger("actorflow.storage")

STOP = object()
Callback = Callable[[BaseException | None], None]
Item = tuple["WriteBatch", Callback | None]
#: observer(items, results, seconds, txn_id) of a group commit (writer thread).
CommitObserver = Callable[[list[Item], list[BaseException | None], float, int], None]


# -- write batches: the unit of an atomic, durable write ------------------------------
#
# A WriteBatch collects puts, deletes and guards; a Chain ties batches into a
# sequence that lands as a prefix. Keys are checked when they are added, in the
# caller's thread, so that a bad key fails its caller and not the group commit
# it would have joined.

#: LMDB's compiled-in key size limit, kept by every backend so that data moves
#: between them unchanged.
MAX_KEY_BYTES = 511
#: Operation codes of WriteBatch.ops.
PUT, DELETE, DELETE_PREFIX = 0, 1, 2


def _check_key(key: bytes) -> None:
    # LMDB rejects these inside the write transaction, which would fail every
    # batch of the group; refuse them here, in the caller's thread, instead.
    if len(key) > MAX_KEY_BYTES:
        raise LimitExceeded(f"storage key of {len(key)} bytes exceeds {MAX_KEY_BYTES} bytes")
    if not key:
        raise ValueError("storage keys must not be empty")


class Chain:
    """Ties batches into a sequence that lands as a prefix (see the module doc).

    Once :attr:`failed` is set (by the writer thread, when a batch of the
    chain fails), every later batch of the chain fails without being applied.
    A chain never recovers: start a new one.
    """

    __slots__ = ("error", "failed")

    def __init__(self) -> None:
        self.failed = False
        self.error: BaseException | None = None


class WriteBatch:
    """Writes to apply atomically, with optional guards.

    Operations are applied in the order they were added.
    """

    __slots__ = ("chain", "guards", "notes", "ops")

    def __init__(self, chain: Chain | None = None) -> None:
        self.ops: list[tuple[int, str, bytes, bytes | None]] = []
        self.guards: list[tuple[str, bytes, bytes | None]] = []
        self.chain = chain
        # What the batch means, told by its writer, for commit observers
        # (metrics): storage ignores them, and observers need parse no key.
        self.notes: list[object] | None = None

    def note(self, what: object) -> WriteBatch:
        """Attaches ``what`` for the commit observers; storage does not read it."""
        if self.notes is None:
            self.notes = [what]
        else:
            self.notes.append(what)
        return self

    def put(self, keyspace: str, key: bytes, value: bytes) -> WriteBatch:
        """Sets ``key`` to ``value`` in ``keyspace``.

        Raises:
            LimitExceeded: The key is longer than :data:`MAX_KEY_BYTES`.
            ValueError: The key is empty.
        """
        if not key or len(key) > MAX_KEY_BYTES:  # the common case skips a call
            _check_key(key)
        self.ops.append((PUT, keyspace, key, value))
        return self

    def delete(self, keyspace: str, key: bytes) -> WriteBatch:
        """Removes ``key`` (a no-op if it is absent)."""
        if not key or len(key) > MAX_KEY_BYTES:
            _check_key(key)
        self.ops.append((DELETE, keyspace, key, None))
        return self

    def delete_prefix(self, keyspace: str, prefix: bytes) -> WriteBatch:
        """Removes every key that starts with ``prefix``."""
        self.ops.append((DELETE_PREFIX, keyspace, prefix, None))
        return self

    def guard(self, keyspace: str, key: bytes, expected: bytes | None) -> WriteBatch:
        """Applies the batch only if ``key`` holds ``expected`` (None: absent)."""
        self.guards.append((keyspace, key, expected))
        return self

    def extend(self, other: WriteBatch) -> WriteBatch:
        """Appends the operations, guards and notes of ``other``."""
        self.ops.extend(other.ops)
        self.guards.extend(other.guards)
        if other.notes:
            for what in other.notes:
                self.note(what)
        return self

    def __len__(self) -> int:
        return len(self.ops)


class ConflictError(StorageError):
    """A guard of a write batch did not hold; nothing of the batch was written."""


def join_key(*parts: str) -> bytes:
    """Builds a key from parts separated by NUL, so that prefixes never collide."""
    return "\x00".join(parts).encode()


def prefix_end(prefix: bytes) -> bytes | None:
    """Returns the smallest key greater than every key with ``prefix``."""
    p = bytearray(prefix)
    while p:
        if p[-1] < 0xFF:
            p[-1] += 1
            return bytes(p)
        p.pop()
    return None


class Control:
    """Work for the writer thread between two group commits (no transaction open).

    A backend queues one to do what must not race a commit; ``done`` is set
    once it ran, or once the storage closed without running it.
    """

    __slots__ = ("call", "done", "error")

    def __init__(self, call: Callable[[], None]) -> None:
        self.call = call
        self.done = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        """Runs ``call`` on the writer thread, keeping what it raised for the waiter."""
        try:
            self.call()
        except BaseException as exc:
            self.error = exc
        finally:
            self.done.set()


class Storage(ABC):
    """Named keyspaces with group-committed, guarded write batches (see the module doc).

    This class owns the writer thread, its queue and its hooks; a backend
    implements the reads, :meth:`_transact` (one group in one transaction)
    and :meth:`_close_backend`.

    Args:
        location: Where the data lives (a directory or a database URL), for messages.
        max_batch: The most write batches folded into one transaction.
        serializer: The default value serializer for layers above.
    """

    #: The backend's name, for messages and metrics: ``"lmdb"`` or ``"postgresql"``.
    backend = ""

    def __init__(
        self,
        location: str,
        *,
        max_batch: int = 4096,
        serializer: Serializer | None = None,
    ) -> None:
        self.path = location
        self.serializer: Serializer = serializer or PickleSerializer()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._max_batch = max_batch
        self._after_batch: list[Callable[[], None]] = []
        self._observers: list[CommitObserver] = []
        self._fault: Callable[[WriteBatch], None] | None = None
        self._latency = 0.0
        self._closed = False
        self.commits = 0
        self.batches = 0
        self.commit_seconds = 0.0
        self._writer = threading.Thread(target=self._run, name="actorflow-writer", daemon=True)

    def _start_writer(self) -> None:
        """Starts the writer thread; a backend calls it once it is open."""
        self._writer.start()

    # -- reads: each backend's own ------------------------------------------

    @abstractmethod
    def get(self, keyspace: str, key: bytes) -> bytes | None:
        """Returns the committed value of ``key``, or None."""

    @abstractmethod
    def get_many(self, keyspace: str, keys: Iterable[bytes]) -> dict[bytes, bytes]:
        """Returns the committed values of ``keys`` that exist, in one snapshot."""

    @abstractmethod
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
        """Returns ``(key, value)`` pairs in key order from one snapshot.

        Args:
            prefix: Only keys starting with it.
            start: The first key (inclusive).
            start_after: Keys strictly after it (not with ``start``).
            end: Keys strictly before it.
            reverse: Descending order; the bounds keep their meaning.
            limit: The most pairs to return.
            keys_only: Return empty values (cheaper).
        """

    @abstractmethod
    def scan_prefixes(self, wanted: list[tuple[str, bytes]]) -> list[list[tuple[bytes, bytes]]]:
        """Returns the pairs under each ``(keyspace, prefix)`` of ``wanted``, from one snapshot."""

    @abstractmethod
    def visit_keys(self, keyspace: str, visit: Callable[[bytes], None]) -> int:
        """Calls ``visit(key)`` for every key, in one snapshot; returns its commit id.

        Group commits of this storage reported with a larger id are not in the
        snapshot.
        """

    def first(self, keyspace: str, *, after: bytes | None = None) -> tuple[bytes, bytes] | None:
        """Returns the first pair (strictly after ``after`` if given), or None."""
        rows = self.scan(keyspace, start_after=after, limit=1)
        return rows[0] if rows else None

    @abstractmethod
    def count(self, keyspace: str, prefix: bytes = b"") -> int:
        """Returns how many keys start with ``prefix``."""

    @abstractmethod
    def count_prefixes(
        self, keyspace: str, prefixes: list[bytes], probe: Iterable[bytes] = ()
    ) -> tuple[list[int], set[bytes]]:
        """Counts the keys under each of ``prefixes`` and tells which ``probe`` keys exist.

        All in one snapshot, so that a key moving from one prefix to another
        meanwhile is counted exactly once.
        """

    @abstractmethod
    def verify(self) -> None:
        """Checks the stored data for damage; raises what is damaged.

        Raises:
            StorageCorrupted: Naming the location and the first problems found.
        """

    def reader_check(self) -> int:
        """Frees what processes that died with the storage open still hold.

        Returns how many were freed (0 where the backend needs no such care).
        """
        return 0

    # -- writes ---------------------------------------------------------------

    def _check_open(self) -> None:
        """Raises :class:`StorageError` if the storage cannot be used here."""
        if self._closed:
            raise StorageError(f"storage at {self.path} is closed")

    def _prepare(self, batch: WriteBatch) -> None:
        """Readies the backend for ``batch`` in the caller's thread, before it is queued."""
        return  # nothing to ready by default

    def submit(self, batch: WriteBatch, callback: Callback | None = None) -> None:
        """Queues ``batch`` for the next group commit.

        ``callback(error)`` runs on the writer thread once the batch is durable
        (``error`` is None) or has failed (nothing of it was applied). It must
        be quick and must not block.
        """
        self._check_open()
        self._prepare(batch)
        self._queue.put((batch, callback))

    def write(self, batch: WriteBatch, timeout: float | None = None) -> None:
        """Applies ``batch`` durably and returns, or raises what failed it."""
        # A bare lock, held until the callback releases it: cheaper to make,
        # set and wait on than an Event (no Condition), which matters when
        # many threads each write one small batch.
        done = threading.Lock()
        done.acquire()
        result: list[BaseException | None] = [None]

        def cb(err: BaseException | None) -> None:
            result[0] = err
            done.release()

        self.submit(batch, cb)
        if not done.acquire(timeout=-1 if timeout is None else timeout):
            # The batch stays queued and may still land: say so.
            raise StorageError(
                f"write to {self.path} not confirmed within {timeout} s", pending=True
            )
        if result[0] is not None:
            raise result[0]

    def _on_writer(self, call: Callable[[], None]) -> None:
        """Runs ``call`` on the writer thread between two group commits and waits for it.

        Raises what ``call`` raised. Runs it here if the writer is not running.
        """
        if threading.current_thread() is self._writer or not self._writer.is_alive():
            call()
            return
        control = Control(call)
        self._queue.put(control)
        control.done.wait()
        if control.error is not None:
            raise control.error

    def idle(self) -> bool:
        """True when no submitted batch is waiting for the writer."""
        return self._queue.empty()

    def add_commit_observer(self, observer: CommitObserver) -> None:
        """Registers ``observer(items, results, seconds, txn_id)``, called on the
        writer thread after every group commit, before the callbacks run."""
        self._observers.append(observer)

    def add_after_batch(self, hook: Callable[[], None]) -> None:
        """Registers ``hook`` to run on the writer thread after every group commit."""
        self._after_batch.append(hook)

    def set_fault(self, fault: Callable[[WriteBatch], None] | None) -> None:
        """Installs a fault hook, called for each batch before it is applied.

        If it raises, that batch fails with the error and nothing of it is
        written; it may also sleep to make writes slow. Used by
        :mod:`actorflow.testing`.
        """
        self._fault = fault

    def set_latency(self, seconds: float) -> None:
        """Makes every group commit take ``seconds`` longer, as a slow disk's fsync would.

        Callers wait that much longer for their writes; nothing else changes.
        ``0`` removes the latency. Used by :mod:`actorflow.testing`.
        """
        self._latency = max(0.0, float(seconds))

    # -- the writer thread ----------------------------------------------------

    def _run(self) -> None:
        q = self._queue
        while True:
            item = q.get()
            if item is STOP:
                return
            if isinstance(item, Control):
                item.run()
                continue
            items = [item]
            stop = False
            # Let threads whose writes just landed (woken by the callbacks of
            # the previous group) submit their next batch before this group
            # closes: yielding the GIL once keeps them in one commit instead of
            # splitting every round of writers over two.
            time.sleep(0)
            try:
                while len(items) < self._max_batch:
                    nxt = q.get_nowait()
                    if nxt is STOP:
                        stop = True
                        break
                    if isinstance(nxt, Control):
                        nxt.run()  # no transaction is open yet
                        continue
                    items.append(nxt)
            except queue.Empty:
                pass
            self._commit(items)
            if stop:
                return

    def _commit(self, items: list[Item]) -> None:
        t0 = time.perf_counter()  # measuring commit latency is not reading the clock
        results, txn_id = self._transact(items)
        if self._latency:
            time.sleep(self._latency)  # an injected slow disk (set_latency)
        for (batch, _cb), err in zip(items, results, strict=True):
            chain = batch.chain
            if err is not None and chain is not None and not chain.failed:
                chain.error = err
                chain.failed = True
        elapsed = time.perf_counter() - t0
        self.commit_seconds += elapsed
        self.batches += 1
        self.commits += len(items)
        self._report(items, results, elapsed, txn_id)

    @abstractmethod
    def _transact(self, items: list[Item]) -> tuple[list[BaseException | None], int]:
        """Applies ``items`` in one transaction and commits it (writer thread).

        Returns each batch's error (None if it landed) and a commit id that
        grows with every group commit. A batch refused by its chain, the fault
        hook (see :meth:`_refused`) or a guard fails alone; a failure of the
        transaction itself fails every batch of the group.
        """

    def _refused(self, batch: WriteBatch, broken: set[int]) -> BaseException | None:
        """The error that fails ``batch`` before its guards are read, or None.

        ``broken`` holds the ids of chains failed earlier in this transaction.
        """
        return self._chain_refused(batch, broken) or self._faulted(batch)

    def _chain_refused(self, batch: WriteBatch, broken: set[int]) -> BaseException | None:
        """The error of a batch whose chain failed earlier, or None."""
        chain = batch.chain
        if chain is not None and (chain.failed or id(chain) in broken):
            return StorageError(
                f"write to {self.path} rejected: an earlier write it depends on failed"
            )
        return None

    def _faulted(self, batch: WriteBatch) -> BaseException | None:
        """What the fault hook (:meth:`set_fault`) fails ``batch`` with, or None."""
        if self._fault is not None:
            try:
                self._fault(batch)
            except Exception as exc:
                return exc if isinstance(exc, StorageError) else StorageError(str(exc))
        return None

    def _report(
        self,
        items: list[Item],
        results: list[BaseException | None],
        elapsed: float,
        txn_id: int,
    ) -> None:
        """Tells the commit observers, then each batch's callback, then the
        after-batch hooks; one that raises is logged and the others still run."""
        for obs in self._observers:
            try:
                obs(items, results, elapsed, txn_id)
            except Exception:
                log.exception("commit observer failed")
        for (_batch, cb), err in zip(items, results, strict=True):
            if cb is not None:
                try:
                    cb(err)
                except Exception:
                    log.exception("write callback failed")
        for hook in self._after_batch:
            try:
                hook()
            except Exception:
                log.exception("after-batch hook failed")

    # -- closing ----------------------------------------------------------------

    def _stop_writer(self) -> None:
        """Flushes queued batches and stops the writer; fails what came too late."""
        self._queue.put(STOP)
        if self._writer.is_alive():
            self._writer.join()
        self._closed = True
        # A batch submitted while the writer was stopping never ran: fail it
        # rather than leave its waiter hanging.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Control):
                item.run()  # the backend is still open
            elif item is not STOP and item[1] is not None:
                try:
                    item[1](StorageError(f"storage at {self.path} was closed before the write"))
                except Exception:
                    log.exception("write callback failed")

    def close(self) -> None:
        """Flushes queued batches, stops the writer and closes the backend."""
        if self._closed:
            return
        self._stop_writer()
        self._close_backend()

    @abstractmethod
    def _close_backend(self) -> None:
        """Releases the backend's files or connections (the writer has stopped)."""


def is_database_url(location: str | os.PathLike[str]) -> bool:
    """True if ``location`` names a PostgreSQL database rather than a directory."""
    return isinstance(location, str) and location.startswith(("postgresql://", "postgres://"))


def open_storage(location: str | os.PathLike[str], **options: Any) -> Storage:
    """Opens the storage at ``location``: a PostgreSQL URL, else an LMDB data directory.

    ``options`` go to the backend's constructor (``sync``, ``map_size`` and
    ``max_batch`` for LMDB; ``max_batch`` and ``pool_size`` for PostgreSQL;
    ``serializer`` for both).
    """
    if is_database_url(location):
        from actorflow.core.pg_backend import PostgresStorage

        options.pop("sync", None)  # PostgreSQL keeps synchronous_commit on
        options.pop("map_size", None)
        return PostgresStorage(str(location), **options)
    from actorflow.core.lmdb_backend import LmdbStorage

    return LmdbStorage(location, **options)
