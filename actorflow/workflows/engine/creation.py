"""Creating instances: their ids, the writes that queue one, and batch bookkeeping.

Used by :class:`~actorflow.workflows.handles.WorkflowBinding`'s ``create`` and
``create_batch``; see the router for what happens to a queued instance.
"""

from __future__ import annotations

import os
import threading
from typing import Any

from actorflow.core.storage import ConflictError, Storage, WriteBatch
from actorflow.workflows.definition import Status
from actorflow.workflows.engine.context import WorkflowEngine
from actorflow.workflows.records import (
    FENCE,
    IDS,
    IDX,
    INST,
    NUMBERS,
    InstanceRecord,
    StatusMove,
    dump,
    epoch_bytes,
    idx_key,
    new_queue_key,
    queue_db,
    queue_ops,
    record_number,
    rkey,
)

__all__ = ["SLICE", "Countdown", "RandomIds", "RecordNumbers", "new_instance_batch"]

_NEXT_KEY = b"next"  # in NUMBERS: the first record number not yet reserved


class RandomIds:
    """Makes uuid4 strings from one ``urandom`` read per 256 ids.

    ``uuid.uuid4()`` reads 16 bytes per id: a system call, during which
    other threads take the GIL (a thread switch when many threads create).
    The pool is shared by threads (``list.pop`` is atomic). A forked child
    would repeat the parent's pool, but it cannot write: storage refuses
    writes after ``fork()``.
    """

    _BATCH = 256

    def __init__(self) -> None:
        self._pool: list[str] = []

    def next(self) -> str:
        while True:
            try:
                return self._pool.pop()
            except IndexError:
                self._pool.extend(self._make())

    def _make(self) -> list[str]:
        h = os.urandom(16 * self._BATCH).hex()
        out = []
        for i in range(0, len(h), 32):
            # version 4 in the 13th hex digit, variant 10xx in the 17th (RFC 4122)
            out.append(
                f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
                f"{'89ab'[int(h[i + 16], 16) & 3]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
            )
        return out


class RecordNumbers:
    """Hands out record numbers (see :mod:`~actorflow.workflows.records`), unique in a data dir.

    Numbers are reserved in blocks by a guarded write of the next free one,
    so processes that share a data directory never hand out the same number,
    and within a process they increase in creation order. Taking one is a
    ``next()`` on a range iterator (atomic under the GIL, shared by threads);
    a block of 65,536 lasts about a second of ``create_batch`` at full speed.
    Numbers left in a block when the process ends are never used.
    """

    BLOCK = 65_536

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._lock = threading.Lock()
        self._it: Any = iter(())

    def take_nowait(self) -> int | None:
        """The next number if one is reserved already, else None (never writes)."""
        try:
            return next(self._it)
        except StopIteration:
            return None

    def take(self) -> int:
        while True:
            try:
                return next(self._it)
            except StopIteration:
                with self._lock:
                    try:
                        return next(self._it)
                    except StopIteration:
                        self._it = iter(self._reserve())

    def _reserve(self) -> range:
        while True:
            raw = self._storage.get(NUMBERS, _NEXT_KEY)
            first = int.from_bytes(raw, "big") if raw is not None else 1
            end = first + self.BLOCK
            batch = WriteBatch().guard(NUMBERS, _NEXT_KEY, raw)
            batch.put(NUMBERS, _NEXT_KEY, record_number(end))
            try:
                self._storage.write(batch)
            except ConflictError:
                continue  # another process took this block first
            return range(first, end)


# Instances per slice of create_batch (see WorkflowBinding._write_all).
SLICE = 1024


class Countdown:
    """Collects the results of one slice of writes and signals when all are in."""

    __slots__ = ("base", "done", "left", "lock", "results")

    def __init__(self, results: list[BaseException | None], base: int, n: int) -> None:
        self.results = results
        self.base = base
        self.left = n
        self.lock = threading.Lock()
        self.done = threading.Event()

    def set(self, i: int, err: BaseException | None) -> None:
        """Storage callback (writer thread): the write of item ``i`` ended."""
        self.results[i] = err
        with self.lock:
            self.left -= 1
            if self.left == 0:
                self.done.set()


def new_instance_batch(
    wfe: WorkflowEngine,
    iid: str,
    n: int,
    params: bytes,
    now_ms: int,
    seq: int,
    traceparent: str | None = None,
    schedule: tuple[str, int] | None = None,
    origin: dict[str, Any] | None = None,
    key: str | None = None,
    priority: int = 0,
) -> WriteBatch:
    """Returns the writes that create a queued instance (guarded: it must not exist).

    The record holds only what a queued instance has: fields that come later
    (``started``, ``output``, ``error``, ``waits``) are absent until then, and
    readers use ``.get``. The record is then about 90 bytes instead of 185,
    and a queued instance takes about 410 bytes of pages across its five
    keyspaces (the memory map that holds two million of them shrinks alike).
    ``traceparent`` (W3C) is the creator's trace context, kept for tracing.
    ``n`` is the instance's record number (:class:`RecordNumbers`).
    ``schedule`` is ``(cron expression, tick in epoch ms)`` for an instance
    a cron schedule creates (:mod:`actorflow.workflows.schedules`).
    ``origin`` is the ``fk`` of a fork (see :mod:`~actorflow.workflows.engine.forking`).
    ``key`` and ``priority`` (checked by the caller) are its flow control:
    kept in the record (``ky``, ``pr``) only when given, and in its queue key.
    """
    ik = wfe.ik(iid)
    nb = record_number(n)
    rk = rkey(wfe.name, nb)
    qk = new_queue_key(seq, priority, key)
    rec: InstanceRecord = {
        "s": Status.QUEUED,
        "created": now_ms,
        "params": params,
        "epoch": 1,
        "qk": qk,
    }
    if traceparent:
        rec["tp"] = traceparent
    if schedule is not None:
        rec["sch"] = {"c": schedule[0], "t": schedule[1]}
    if origin is not None:
        rec["fk"] = origin
    if key is not None:
        rec["ky"] = key
    if priority:
        rec["pr"] = priority
    batch = WriteBatch()
    # The guard matches the first put: it is one insert (Storage._apply).
    batch.guard(IDS, ik, None)
    batch.put(IDS, ik, nb)
    batch.put(INST, rk, dump(rec))
    batch.put(FENCE, rk, epoch_bytes(1))
    batch.put(IDX, idx_key(wfe.name, Status.QUEUED, now_ms, iid), b"")
    batch.note(StatusMove(wfe.name, None, Status.QUEUED))
    if key is None:
        batch.put(queue_db(wfe.name), qk, iid.encode())
    else:
        queue_ops(batch, wfe.name, qk, iid, key, put=True)
    node = wfe.ctx.supervisor.node
    if node is not None:
        node.claim(batch, ik, None)
    return batch
