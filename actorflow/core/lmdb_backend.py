"""The embedded backend: one LMDB environment per data directory.

Commits are fsync'd when ``sync=True``; many batches share one LMDB write
transaction and one fsync (the group commit of :class:`~actorflow.core.storage.Storage`).
When the memory map is full it is doubled and the group retried; callers never
see ``MapFullError``.

A :class:`LmdbStorage` must not be used in a process forked from the one that
opened it (LMDB forbids it); doing so raises :class:`StorageError`.

Damage and a full disk get named errors (see :mod:`actorflow.core.datadir` for the
checks made before LMDB maps the files):

* Opening refuses a data directory whose data file is truncated, whose meta
  pages are damaged, or which held data and lost its data file
  (:class:`~actorflow.core.errors.StorageCorrupted`), and one on a full disk
  (:class:`~actorflow.core.errors.StorageFull`), instead of the process dying of
  SIGBUS or opening empty.
* A read or a write that meets a page LMDB finds damaged raises (or fails its
  batch with) :class:`~actorflow.core.errors.StorageCorrupted`; a write that finds
  the disk full fails with :class:`~actorflow.core.errors.StorageFull`.
* :meth:`LmdbStorage.verify` checks the whole file.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import lmdb

from actorflow.core import datadir
from actorflow.core.errors import DataDirectoryLocked, StorageCorrupted, StorageError, StorageFull
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

__all__ = ["MAX_READERS", "LmdbStorage"]

log = logging.getLogger("actorflow.storage")

#: LMDB's errors that mean the data file is damaged. A transaction that met a
#: damaged page is left invalid, so BadTxnError comes after one of the others.
_DAMAGED: tuple[type[BaseException], ...] = (
    lmdb.CorruptedError,
    lmdb.PageNotFoundError,
    lmdb.InvalidError,
    lmdb.PanicError,
    lmdb.BadTxnError,
)
#: The most readers at once; the lock file is preallocated for them.
MAX_READERS = 2048


class _ReadGate:
    """Keeps readers out while the map is resized, without a lock per read.

    Each reading thread owns a one-element list, its *slot*, set while it
    reads. A reader raises its slot, then checks the ``closed`` flag; the
    resizer sets the flag, then waits until every slot is down. Under the
    GIL these plain loads and stores are sequentially consistent, so either
    the reader sees the flag (and backs off) or the resizer sees the slot
    (and waits). Resizing is rare; reads are the hot path.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._slots: list[list[bool]] = []
        self._cond = threading.Condition()
        self.closed = False

    def enter(self) -> list[bool]:
        """Waits until reads are allowed; returns the slot to lower when done."""
        try:
            slot: list[bool] = self._local.slot
        except AttributeError:
            slot = self._local.slot = [False]
            with self._cond:
                self._slots.append(slot)
        while True:
            slot[0] = True
            if not self.closed:
                return slot
            slot[0] = False
            with self._cond:
                while self.closed:
                    self._cond.wait()

    def close(self) -> None:
        """Stops new reads and waits for those in progress to end."""
        with self._cond:
            self.closed = True
            slots = list(self._slots)
        delay = 0.0001
        while any(s[0] for s in slots):
            time.sleep(delay)
            delay = min(delay * 2, 0.01)

    def open(self) -> None:
        """Lets reads in again."""
        with self._cond:
            self.closed = False
            self._cond.notify_all()


class LmdbStorage(Storage):
    """One LMDB environment with named keyspaces, under the group commit of :class:`Storage`.

    Args:
        path: The data directory (created if missing).
        sync: fsync every commit. Turning it off trades durability for speed.
        map_size: The initial size of the memory map; it doubles when full.
        max_batch: The most write batches folded into one transaction.
        serializer: The default value serializer for layers above.
    """

    backend = "lmdb"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: bool = True,
        map_size: int = 1 << 30,
        max_batch: int = 4096,
        serializer: Serializer | None = None,
    ) -> None:
        super().__init__(os.fspath(path), max_batch=max_batch, serializer=serializer)
        try:
            os.makedirs(self.path, exist_ok=True)
        except OSError as exc:
            raise datadir.disk_error(self.path, "creating the directory", exc) from exc
        self._pid = os.getpid()
        # Set in a forked child: cheaper than a getpid() system call per read.
        self._forked = False
        self._damage_logged = False
        self._env = self._open(map_size, sync)
        os.register_at_fork(
            after_in_child=functools.partial(_call_alive, weakref.WeakMethod(self._mark_forked))
        )
        self._dbs: dict[str, Any] = {}
        self._db_lock = threading.Lock()
        self._gate = _ReadGate()
        self._start_writer()

    def _open(self, map_size: int, sync: bool) -> Any:
        """Opens the LMDB environment, after the checks LMDB does not make itself."""
        new = datadir.check_data_file(self.path)
        datadir.preallocate_lock_file(self.path, MAX_READERS)
        try:
            env = lmdb.open(
                self.path,
                map_size=map_size,
                max_dbs=256,
                max_readers=MAX_READERS,
                sync=sync,
                metasync=sync,
                readahead=False,
            )
        except lmdb.Error as exc:
            if "already open in this process" in str(exc):
                raise DataDirectoryLocked(
                    f"data directory {self.path} is already open in this process (pid "
                    f"{os.getpid()}): close the Runtime or Storage that has it open first; "
                    "one process opens a data directory once (nodes sharing a directory run "
                    "in separate processes)",
                    path=self.path,
                    pid=os.getpid(),
                ) from None
            if new:
                # A data file LMDB began (a full disk, say) holds nothing: without
                # it, the next open starts afresh instead of finding it damaged.
                try:
                    os.unlink(os.path.join(self.path, datadir.DATA_FILE))
                except OSError:
                    pass
            raise self._failure(exc, "opening the data file") from exc
        if not os.path.exists(os.path.join(self.path, datadir.MARKER)):
            try:
                env.sync(True)  # the data file's meta pages are durable before the marker
                datadir.mark(self.path)
            except BaseException as exc:
                env.close()
                if isinstance(exc, lmdb.Error):
                    raise self._failure(exc, "opening the data file") from exc
                raise
        return env

    def _failure(self, exc: BaseException, doing: str) -> StorageError:
        """The named error for an LMDB error met while ``doing`` something."""
        if isinstance(exc, _DAMAGED):
            err: StorageError = StorageCorrupted(
                f"the data file of {self.path} is damaged ({doing}: {exc}). Stop the "
                "process, check it with Storage.verify() and restore the directory from a "
                "backup",
                path=self.path,
            )
            if not self._logged_damage():
                log.error("%s", err)
            return err
        if isinstance(exc, lmdb.DiskError):
            return StorageFull(
                f"the disk holding data directory {self.path} is full ({doing}: {exc}); "
                "nothing was written. Free some space and retry",
                path=self.path,
            )
        return StorageError(f"data directory {self.path}: {doing} failed: {exc}", path=self.path)

    def _logged_damage(self) -> bool:
        """True if damage was logged already (once per storage is enough); marks it logged."""
        seen, self._damage_logged = self._damage_logged, True
        return seen

    def verify(self) -> None:
        """Checks every page of the data file; raises what is damaged.

        Uses py-lmdb's structural verifier (``lmdb.verify``, py-lmdb 3.0 or
        later), which reads the file without mapping it: damage is an error,
        never a crash. It runs on the writer thread inside a write transaction
        that writes nothing, so that no commit, of this process or another,
        changes the file meanwhile: writes wait for it (about a second per
        300 MB of data file).

        Raises:
            StorageCorrupted: Naming the directory and the first problems found.
            StorageError: py-lmdb is older than 3.0.
        """
        self._check_pid()
        self._on_writer(self._verify_now)

    def _verify_now(self) -> None:
        try:
            from lmdb import verify as lmdb_verify
        except ImportError:
            raise StorageError(
                f"cannot verify {self.path}: Storage.verify() needs py-lmdb 3.0 or later "
                f"(installed: {lmdb.__version__})",
                path=self.path,
            ) from None
        try:
            txn = self._env.begin(write=True)
            try:
                problems = lmdb_verify.verify(self.path)
            except lmdb_verify.VerifyError as exc:
                problems = [str(exc)]
            finally:
                txn.abort()
        except lmdb.Error as exc:
            raise self._failure(exc, "verifying it") from exc
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            err = StorageCorrupted(
                f"the data file of {self.path} is damaged: {'; '.join(problems[:5])}{more}. "
                "Restore the directory from a backup",
                path=self.path,
                problems=problems,
            )
            if not self._logged_damage():
                log.error("%s", err)
            raise err

    # -- keyspaces ---------------------------------------------------------

    def _db(self, name: str) -> Any:
        db = self._dbs.get(name)
        if db is not None:
            return db
        # Opening a named database takes LMDB's write lock, and py-lmdb waits
        # for it holding the GIL: from any thread but the writer, that
        # deadlocks against a group commit in progress. The writer opens it
        # between two transactions instead.
        self._on_writer(functools.partial(self._open_db, name))
        db = self._dbs.get(name)
        if db is None:  # close() released us: the writer had stopped
            raise StorageError(f"storage at {self.path} is closed")
        return db

    def _mark_forked(self) -> None:
        # In a child process after fork(): the environment is the parent's.
        self._forked = True

    def _open_db(self, name: str) -> Any:
        with self._db_lock:
            db = self._dbs.get(name)
            if db is None:
                try:
                    db = self._env.open_db(name.encode())
                except lmdb.Error as exc:  # creating it is a commit: the disk may be full
                    raise self._failure(exc, f"opening keyspace {name!r}") from exc
                self._dbs[name] = db
        return db

    # -- reads ---------------------------------------------------------------

    def _check_pid(self) -> None:
        if not (self._forked or self._closed):
            return
        if self._forked:
            raise StorageError(
                f"storage at {self.path} was opened in process {self._pid} and cannot be "
                "used after fork(); open a new Runtime in the child"
            )
        if self._closed:
            raise StorageError(f"storage at {self.path} is closed")

    def _enter(self, keyspace: str) -> tuple[Any, list[bool]]:
        """Checks the storage is usable here; returns the keyspace's db and a read slot.

        The caller must set ``slot[0] = False`` when its read transaction ends.
        """
        self._check_pid()
        db = self._dbs.get(keyspace)
        if db is None:
            db = self._db(keyspace)
        return db, self._gate.enter()

    @contextmanager
    def _read(self, keyspace: str) -> Iterator[Any]:
        db, slot = self._enter(keyspace)
        try:
            with self._env.begin(db=db, buffers=False) as txn:
                yield txn
        except _DAMAGED as exc:
            raise self._failure(exc, f"reading keyspace {keyspace!r}") from exc
        finally:
            slot[0] = False

    def get(self, keyspace: str, key: bytes) -> bytes | None:
        """Returns the committed value of ``key``, or None."""
        # The hottest read: _read() inlined, without its generator.
        db, slot = self._enter(keyspace)
        try:
            with self._env.begin(db=db, buffers=False) as txn:
                value: bytes | None = txn.get(key)
                return value
        except _DAMAGED as exc:
            raise self._failure(exc, f"reading keyspace {keyspace!r}") from exc
        finally:
            slot[0] = False

    def get_many(self, keyspace: str, keys: Iterable[bytes]) -> dict[bytes, bytes]:
        """Returns the committed values of ``keys`` that exist, in one snapshot."""
        out: dict[bytes, bytes] = {}
        with self._read(keyspace) as txn:
            for key in keys:
                value = txn.get(key)
                if value is not None:
                    out[key] = value
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
        lo = max(prefix, start) if start is not None else prefix
        out: list[tuple[bytes, bytes]] = []
        if limit is not None and limit <= 0:
            return out
        # _read() inlined: its generator costs more than the scan of a short prefix.
        db, slot = self._enter(keyspace)
        try:
            with self._env.begin(db=db, buffers=False) as txn:
                cur = txn.cursor()
                if not reverse:
                    ok = cur.set_range(lo)
                    if start_after is not None and start_after >= lo:
                        ok = cur.set_range(start_after)
                        if ok and cur.key() == start_after:
                            ok = cur.next()
                    while ok:
                        k = cur.key()
                        if (end is not None and k >= end) or not k.startswith(prefix):
                            break
                        out.append((k, b"" if keys_only else cur.value()))
                        if limit is not None and len(out) >= limit:
                            break
                        ok = cur.next()
                else:
                    upper = end
                    pend = prefix_end(prefix) if prefix else None
                    if pend is not None and (upper is None or pend < upper):
                        upper = pend
                    if upper is None:
                        ok = cur.last()
                    else:
                        ok = cur.prev() if cur.set_range(upper) else cur.last()
                    while ok:
                        k = cur.key()
                        if k < lo or (start_after is not None and k <= start_after):
                            break
                        out.append((k, b"" if keys_only else cur.value()))
                        if limit is not None and len(out) >= limit:
                            break
                        ok = cur.prev()
        except _DAMAGED as exc:
            raise self._failure(exc, f"reading keyspace {keyspace!r}") from exc
        finally:
            slot[0] = False
        return out

    def scan_prefixes(self, wanted: list[tuple[str, bytes]]) -> list[list[tuple[bytes, bytes]]]:
        """Returns the pairs under each ``(keyspace, prefix)`` of ``wanted``, from one snapshot."""
        self._check_pid()
        dbs = [self._dbs.get(ks) or self._db(ks) for ks, _ in wanted]
        slot = self._gate.enter()
        try:
            with self._env.begin(buffers=False) as txn:
                out: list[list[tuple[bytes, bytes]]] = []
                for db, (_, prefix) in zip(dbs, wanted, strict=True):
                    rows: list[tuple[bytes, bytes]] = []
                    cur = txn.cursor(db=db)
                    if cur.set_range(prefix):
                        for k, v in cur.iternext():
                            if not k.startswith(prefix):
                                break
                            rows.append((k, v))
                    out.append(rows)
                return out
        except _DAMAGED as exc:
            names = sorted({ks for ks, _ in wanted})
            raise self._failure(exc, f"reading keyspaces {names}") from exc
        finally:
            slot[0] = False

    def visit_keys(self, keyspace: str, visit: Callable[[bytes], None]) -> int:
        """Calls ``visit(key)`` for every key, in one snapshot; returns its transaction id.

        Commits with a larger id are not in the snapshot.
        """
        with self._read(keyspace) as txn:
            for key in txn.cursor().iternext(keys=True, values=False):
                visit(key)
            txn_id: int = txn.id()
            return txn_id

    def first(self, keyspace: str, *, after: bytes | None = None) -> tuple[bytes, bytes] | None:
        """Returns the first pair (strictly after ``after`` if given), or None."""
        with self._read(keyspace) as txn:
            cur = txn.cursor()
            ok = cur.set_range(after) if after is not None else cur.first()
            if ok and after is not None and cur.key() == after:
                ok = cur.next()
            return (cur.key(), cur.value()) if ok else None

    def count(self, keyspace: str, prefix: bytes = b"") -> int:
        """Returns how many keys start with ``prefix``."""
        if not prefix:
            with self._read(keyspace) as txn:
                entries: int = txn.stat(self._db(keyspace))["entries"]
                return entries
        n = 0
        with self._read(keyspace) as txn:
            cur = txn.cursor()
            ok = cur.set_range(prefix)
            while ok and cur.key().startswith(prefix):
                n += 1
                ok = cur.next()
        return n

    def count_prefixes(
        self, keyspace: str, prefixes: list[bytes], probe: Iterable[bytes] = ()
    ) -> tuple[list[int], set[bytes]]:
        """Counts the keys under each of ``prefixes`` and tells which ``probe`` keys exist.

        All in one snapshot, so that a key moving from one prefix to another
        meanwhile is counted exactly once.
        """
        counts: list[int] = []
        with self._read(keyspace) as txn:
            cur = txn.cursor()
            for prefix in prefixes:
                n = 0
                ok = cur.set_range(prefix)
                while ok and cur.key().startswith(prefix):
                    n += 1
                    ok = cur.next()
                counts.append(n)
            present = {key for key in probe if txn.get(key) is not None}
        return counts, present

    # -- writes --------------------------------------------------------------

    def _check_open(self) -> None:
        self._check_pid()

    def _prepare(self, batch: WriteBatch) -> None:
        # Every keyspace must be open before the writer applies the batch;
        # they nearly always are, so test the dict inline instead of calling.
        dbs = self._dbs
        for op in batch.ops:
            if op[1] not in dbs:
                self._db(op[1])
        for guard in batch.guards:
            if guard[0] not in dbs:
                self._db(guard[0])

    def reader_check(self) -> int:
        """Frees the reader slots of processes that died with the environment open.

        Several processes may share a data directory; one that was killed
        leaves its slots taken (and its snapshots pinned) until this runs.
        Returns how many slots were freed.
        """
        self._check_pid()
        return int(self._env.reader_check())

    def _transact(self, items: list[Item]) -> tuple[list[BaseException | None], int]:
        """Applies ``items`` in one write transaction and commits it.

        Returns each batch's error (None if it landed) and the transaction's
        id. A full map is grown and the whole group retried; any other failure
        of the transaction fails every batch of the group.
        """
        txn_id = 0
        while True:
            results: list[BaseException | None] = [None] * len(items)
            # Chains broken in this attempt; applied to the chains only once the
            # attempt is final, so that a retry after MapFullError starts clean.
            broken: set[int] = set()
            try:
                with self._env.begin(write=True) as txn:
                    txn_id = txn.id()
                    for i, (batch, _cb) in enumerate(items):
                        results[i] = err = self._apply(txn, batch, broken)
                        if err is not None and batch.chain is not None:
                            broken.add(id(batch.chain))
                return results, txn_id
            except lmdb.MapFullError:
                self._grow()
            except Exception as exc:  # disk full, I/O error: the whole group failed
                log.error("group commit of %d batches failed: %s", len(items), exc)
                err = (
                    self._failure(exc, "a durable write")
                    if isinstance(exc, (*_DAMAGED, lmdb.DiskError))
                    else StorageError(f"durable write to {self.path} failed: {exc}")
                )
                return [err] * len(items), txn_id

    def _apply(self, txn: Any, batch: WriteBatch, broken: set[int]) -> BaseException | None:
        refused = self._refused(batch, broken)
        if refused is not None:
            return refused
        guards = batch.guards
        ops = batch.ops
        if (
            len(guards) == 1
            and guards[0][2] is None
            and ops
            and ops[0][0] == PUT
            and ops[0][1] == guards[0][0]
            and ops[0][2] == guards[0][1]
        ):
            # "Absent, then put": one insert that refuses an existing key does
            # both, and nothing else of the batch has been applied if it refuses.
            # Creations take this path: a lookup less, and py-lmdb releases the
            # GIL around each call, which costs a thread switch when busy.
            if not txn.put(ops[0][2], ops[0][3], db=self._dbs[ops[0][1]], overwrite=False):
                return ConflictError(f"write rejected: guard on {ops[0][2]!r} did not hold")
            ops = ops[1:]
        else:
            for ks, key, expected in guards:
                if txn.get(key, db=self._dbs[ks]) != expected:
                    return ConflictError(f"write rejected: guard on {key!r} did not hold")
        for kind, ks, key, value in ops:
            db = self._dbs[ks]
            if kind == PUT:
                txn.put(key, value, db=db)
            elif kind == DELETE:
                txn.delete(key, db=db)
            else:
                cur = txn.cursor(db=db)
                ok = cur.set_range(key)
                while ok and cur.key().startswith(key):
                    ok = cur.delete()
        return None

    def _grow(self) -> None:
        # LMDB remaps the file: no read transaction may be open meanwhile.
        self._gate.close()
        try:
            new_size = self._env.info()["map_size"] * 2
            self._env.set_mapsize(new_size)
            log.debug("grew the LMDB map of %s to %d MiB", self.path, new_size >> 20)
        finally:
            self._gate.open()

    @property
    def map_size(self) -> int:
        """The current size of the memory map in bytes."""
        size: int = self._env.info()["map_size"]
        return size

    def close(self) -> None:
        """Flushes queued batches, stops the writer and closes the environment."""
        if self._closed:
            return
        if self._forked:
            self._closed = True  # the parent owns the environment; never touch it here
            return
        super().close()

    def _close_backend(self) -> None:
        self._env.close()


def _call_alive(ref: weakref.WeakMethod[Callable[[], None]]) -> None:
    """Calls the method ``ref`` names if its object still exists."""
    method = ref()
    if method is not None:
        method()
