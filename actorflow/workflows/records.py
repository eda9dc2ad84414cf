"""How workflow instances are laid out in storage.

Keyspaces (LMDB named databases) and their keys. ``ik`` is ``wf \\0 id``, the
instance's name; ``rk`` is ``wf \\0 n``, where ``n`` (8 bytes) is a number the
instance gets at creation, increasing in creation order:

=========  ===================================  ========================================
keyspace   key                                  value
=========  ===================================  ========================================
ids        ik                                   ``n``: where the instance's records are
numbers    ``next``                             the first record number not yet reserved
inst       rk                                   the instance record (a dict)
fence      rk                                   the instance's epoch (8 bytes), the
                                                fencing token every engine write guards
idx        wf \\0 status \\0 created \\0 id     empty: lists instances by status, newest
                                                first, and finds unfinished ones
steps      rk \\0 kind sha1(name) count         one step record (a dict)
events     rk \\0 type \\0 seq                  a buffered event, FIFO per type
hist       rk \\0 seq                           an instance-level history event
queue:wf   band [priority] seq                  an instance id waiting for a slot (band
                                                ``\\x02``: the id, then ``\\0`` and its key)
kqueue     wf \\0 len key band priority seq       keyed instances only: the same entry, by key
owner      ik                                   multi-node: the owner's node id
owned      node \\0 ik                          multi-node: empty, the instances of a node
nodes      node                                 multi-node: the node registry (see
                                                :mod:`actorflow.cluster.lease`)
sched      wf \\0 digest                        a cron schedule's record: its expression,
                                                the last tick handled, the next one and
                                                its timer (see :class:`ScheduleRecord`)
=========  ===================================  ========================================

Why two keys: ids are often random (uuid4), and a B-tree updated at random
keys dirties a page per update. Keyed by ``rk``, the records of instances
created together sit together, and so do their later writes when those
follow creation order (a million sleepers woken in deadline order, a queue
drained in order): a group commit then dirties a few pages, not one per
instance per keyspace. Only ``ids`` is updated at random, and only once.

Engine records (instance, step, event, history and node records) are
dicts of builtins encoded with MessagePack, a format that describes data
only: decoding one cannot run code, whoever wrote the directory. User
values inside them (params, results, payloads, errors) are bytes from the
runtime's serializer, decoded only where they are used (see "Trust boundary
of a data directory" in docs/operations.md).

Records written before that are pickles (protocol 5); they are still read
if every opcode of the pickle only builds plain values (dicts, lists,
tuples, strings, bytes, numbers), then by an unpickler that refuses every
global; a record that would name or call anything is refused with
:class:`RecordFormatError`, and nothing of it runs.
"""

from __future__ import annotations

import functools
import hashlib
import struct
from collections.abc import Callable, Collection, Iterable
from typing import TYPE_CHECKING, Any, Final, Literal, NamedTuple, TypedDict, cast

from actorflow.core.codec import load
from actorflow.core.errors import ActorflowError, RecordFormatError
from actorflow.core.storage import Storage, WriteBatch
from actorflow.core.timers import TimerService, armed_keys, parse_timer_key, timer_key
from actorflow.workflows.definition import MAX_PRIORITY, MIN_PRIORITY

__all__ = [
    "EVENTS",
    "FENCE",
    "HIST",
    "IDS",
    "IDX",
    "INST",
    "KQUEUE",
    "MAX_PRIORITY",
    "MIN_PRIORITY",
    "NUMBERS",
    "PRIO_KEYED",
    "STEPS",
    "Attempt",
    "EventRecord",
    "HistoryRecord",
    "InstanceRecord",
    "RecordFormatError",
    "ScheduleRecord",
    "StatusMove",
    "StepCheckpoint",
    "StepStatus",
    "StepStatusName",
    "delete_instance_ops",
    "dump",
    "epoch_bytes",
    "event_key",
    "exists_guard",
    "fork_origin",
    "hist_key",
    "hist_prefix",
    "hist_seq",
    "idx_key",
    "idx_order",
    "idx_parts",
    "idx_workflow_after",
    "ikey",
    "instance_pokes",
    "is_poke",
    "key_queue_key",
    "key_queue_prefix",
    "load",
    "load_event",
    "load_instance",
    "load_step",
    "new_queue_key",
    "orphan_timer_batch",
    "parse_queue_entry",
    "poke_key",
    "poke_target",
    "queue_db",
    "queue_entry",
    "queue_key_before",
    "queue_ops",
    "queue_order",
    "queued_by_key",
    "record_number",
    "rkey",
    "rkey_of",
    "split_idx_key",
    "split_key_queue_key",
    "step_key",
    "step_key_of",
    "step_target",
    "steps_prefix",
    "target_rkey",
    "written_rkey",
]

IDS = "ids"
NUMBERS = "numbers"
INST = "inst"
FENCE = "fence"
IDX = "idx"
STEPS = "steps"
EVENTS = "events"
HIST = "hist"

#: The type of a step record's status (its ``s``): one of :class:`StepStatus`.
StepStatusName = Literal["complete", "errored", "running", "retrying", "sleeping", "waiting"]


class StepStatus:
    """The statuses of a step record (plain ``str``, for the reasons of ``Status``)."""

    __slots__ = ()

    DONE: Final = "complete"  # its result (or event) is stored: replay returns it
    FAILED: Final = "errored"  # failed for good: replay raises its error
    RUNNING: Final = "running"  # an attempt may be going on
    RETRYING: Final = "retrying"  # an attempt failed; the next one is due at ``dl``
    SLEEPING: Final = "sleeping"  # a sleep until ``dl``
    WAITING: Final = "waiting"  # a wait for an event of type ``ty``, until ``dl``


# The earlier names of the step statuses, for the tools that read records.
DONE: Final = StepStatus.DONE
FAILED: Final = StepStatus.FAILED
RUNNING: Final = StepStatus.RUNNING
RETRYING: Final = StepStatus.RETRYING
SLEEPING: Final = StepStatus.SLEEPING
WAITING: Final = StepStatus.WAITING


# -- the records -----------------------------------------------------------------
# Their keys are short because they are on disk, once per record: a million
# step records carry them a million times. They are kept exactly as they are.


class InstanceRecord(TypedDict, total=False):
    """The instance record (``inst``), one per instance."""

    s: str  # its status: one of definition.Status (never "unknown")
    created: int  # when it was created (epoch ms); also in its idx key
    params: bytes  # the params of run, from the runtime's serializer
    epoch: int  # its fencing token, as in ``fence`` (moved by terminate, restart, recovery)
    qk: bytes | None  # its queue entry while queued (``queue_key``), else None
    ky: str  # its flow-control key (``create(key=)``); absent: none
    pr: int  # its priority (``create(priority=)``); absent: 0
    tp: str  # the creator's W3C traceparent, if it was traced
    sch: dict[str, Any]  # made by a schedule: ``{"c": cron expression, "t": tick (epoch ms)}``
    started: int | None  # when its first run began (epoch ms); None: not yet
    waits: list[str]  # the event types it hibernated waiting for
    output: bytes | None  # run's return value (serialized) once complete
    error: dict[str, str] | None  # ``{name, message}`` once errored
    # Its saga rollback, once one started (None or absent: none ran): ``o`` the
    # outcome ("running", "complete", "failed"), ``ed`` the ``{name, message}``
    # of the handler that failed for good; while running also ``t`` (asked by
    # ``terminate(rollback=True)``), ``go`` (ROLLBACK_START is written), ``fe``
    # and ``fx`` (the error that failed the instance: its dict, and serialized).
    rb: dict[str, Any] | None
    # Made by ``inst.fork``: the origin, ``{"w": workflow, "i": instance id,
    # "n": at_step's name, "c": its count}``. Absent on every other instance.
    fk: dict[str, Any]


#: One attempt of a ``step.do``: ``(start ms, end ms, {name, message} or None,
#: retry delay ms or None)``, plus, for an attempt a remote executor ran, where
#: it ran (``{executor, node, worker, host, pid}``, see
#: :data:`actorflow.executors.base.RanOn`; absent: in the runtime's process).
#: MessagePack reads the tuple back as a list.
Attempt = (
    tuple[int, int, dict[str, str] | None, int | None]
    | tuple[int, int, dict[str, str] | None, int | None, dict[str, str]]
    | list[Any]
)


class StepCheckpoint(TypedDict, total=False):
    """A step record (``steps``): one occurrence of a step, what replay returns."""

    k: str  # kind: "do", "sleep", "wait_for_event", "rollback" (a do step's handler), "patch"
    n: str  # the step's name
    c: int  # occurrence of the name in the run (1, 2, ...)
    seq: int  # order of the step in the run (0, 1, ...)
    s: str  # its status: one of StepStatus
    t0: int  # when it started (epoch ms)
    t1: int  # when it ended (epoch ms)
    dl: int  # deadline (epoch ms) of a sleep, an event wait or the next retry
    tk: bytes  # the timer key armed for ``dl``, while blocked on it
    cfg: dict[str, Any]  # do: the resolved config (retries, timeout)
    att: list[Attempt]  # do: the attempts so far
    r: bytes  # do: the result, serialized
    ed: dict[str, str]  # failed: ``{name, message}`` of the error
    e: bytes | None  # failed: the error itself, serialized (None if it cannot be)
    ty: str  # wait_for_event: the event type
    ev: tuple[bytes, int] | list[Any]  # wait_for_event: the event's (payload, ts)
    pa: bool  # patch: the answer of step.patched
    # Where a replay met this step at another position than the recorded one
    # (see matching.Divergence.record): the first divergence of the run.
    dv: dict[str, Any]
    fk: bool  # a fork's: kept from its origin (absent on every other record)


class EventRecord(TypedDict):
    """A buffered event (``events``), until a ``wait_for_event`` consumes it."""

    type: str  # the event type
    p: bytes  # the payload, serialized
    ts: int  # when it was sent (epoch ms)


class HistoryRecord(TypedDict):
    """An instance-level history event (``hist``)."""

    type: str  # WORKFLOW_START, WORKFLOW_PAUSED, INSTANCE_RECOVERED, ...
    ts: int  # epoch ms
    data: dict[str, Any]


if TYPE_CHECKING:

    def dump(
        record: InstanceRecord
        | StepCheckpoint
        | EventRecord
        | HistoryRecord
        | ScheduleRecord
        | dict[str, Any],
    ) -> bytes:
        """Encodes an engine record (see :func:`actorflow.core.codec.dump`)."""
        ...

else:
    from actorflow.core.codec import dump


def load_instance(raw: bytes) -> InstanceRecord:
    """Decodes an instance record."""
    return cast(InstanceRecord, load(raw))


def load_step(raw: bytes) -> StepCheckpoint:
    """Decodes a step record."""
    return cast(StepCheckpoint, load(raw))


def load_event(raw: bytes) -> EventRecord:
    """Decodes a buffered event."""
    return cast(EventRecord, load(raw))


def stored_error(
    decode: Callable[[], object] | None, details: dict[str, Any] | None, fallback: str
) -> BaseException:
    """The exception a record kept: itself, or an ``ActorflowError`` that names it.

    Args:
        decode: Loads the pickled exception (None: the record kept none). A
            pickle that no longer loads (its class moved or went) falls back
            to ``details``.
        details: The record's ``{"name": ..., "message": ...}`` of the error.
        fallback: The message when the record has neither.
    """
    if decode is not None:
        try:
            err = decode()
        except Exception:
            err = None
        if isinstance(err, BaseException):
            return err
    ed = details or {"name": "Error", "message": fallback}
    return ActorflowError(f"{ed['name']}: {ed['message']}")


#: ``rollback``: the record of the rollback handler of the ``do`` step of the same
#: name and count (see :mod:`actorflow.workflows.rollbacks`).
#: ``patch``: the answer of ``step.patched(patch_id)`` (name: the patch id, count 1;
#: see :mod:`actorflow.workflows.matching`).
KIND_CODES = {"do": b"d", "sleep": b"s", "wait_for_event": b"w", "rollback": b"r", "patch": b"p"}
WAKE_KIND = "W"  # timer kind for instance deadlines
PRIO_WAKE = b"\x00"  # queue entries of instances to resume: served first
PRIO_NEW = b"\x01"  # queue entries of new (or restarted) instances
# Queue entries of new instances with a key or a priority other than 0: band,
# priority (4 bytes, biased so that bytes sort as ints), seq. Default instances
# keep the shorter PRIO_NEW keys, read as priority 0.
PRIO_KEYED = b"\x02"

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")


def ikey(wf: str, iid: str) -> bytes:
    """Returns the key of an instance."""
    return f"{wf}\x00{iid}".encode()


def rkey(wf: str, n: bytes) -> bytes:
    """Returns the key of an instance's records from its ``ids`` entry ``n``."""
    return wf.encode() + b"\x00" + n


def rkey_of(ik: bytes, n: bytes) -> bytes:
    """Returns the key of the records of instance ``ik`` from its ``ids`` entry ``n``."""
    return ik[: ik.index(b"\x00") + 1] + n


def record_number(n: int) -> bytes:
    """Encodes an instance's record number (its ``ids`` value)."""
    return _U64.pack(n)


def split_ikey(ik: bytes) -> tuple[str, str]:
    """Returns ``(workflow, instance id)`` of an instance key."""
    wf, iid = ik.split(b"\x00", 2)[:2]
    return wf.decode(), iid.decode()


def epoch_bytes(epoch: int) -> bytes:
    """Encodes an epoch for the fence keyspace."""
    return _U64.pack(epoch)


@functools.lru_cache(maxsize=8192)
def _name_digest(kind: str, name: str) -> bytes:
    return KIND_CODES[kind] + hashlib.sha1(name.encode()).digest()[:12]


def step_key(rk: bytes, kind: str, name: str, count: int) -> bytes:
    """Returns the key of occurrence ``count`` of step ``name`` of ``kind``."""
    return rk + b"\x00" + _name_digest(kind, name) + _U32.pack(count)


def step_key_of(rk: bytes, record: StepCheckpoint | dict[str, Any]) -> bytes:
    """Returns the key of step ``record`` among the steps of the instance keyed ``rk``.

    A fork stores the steps it keeps from its origin under its own ``rk``
    with this: the key depends only on the record's kind, name and count.
    """
    return step_key(rk, record["k"], record["n"], record["c"])


def fork_origin(record: InstanceRecord | dict[str, Any]) -> dict[str, Any] | None:
    """Where a fork comes from: ``{"workflow", "instance", "at_step": {"name", "count"}}``.

    None for an instance that is not a fork (see ``inst.fork``).
    """
    fk = record.get("fk")
    if not fk:
        return None
    return {
        "workflow": fk["w"],
        "instance": fk["i"],
        "at_step": {"name": fk["n"], "count": fk["c"]},
    }


def steps_prefix(rk: bytes) -> bytes:
    """Returns the prefix of every step key of an instance."""
    return rk + b"\x00"


def step_target(ik: bytes, rk: bytes, key: bytes) -> bytes:
    """Returns the timer target of step ``key``: ``ik \\0 n \\0 step``.

    ``ik`` says whose deadline it is; ``n`` lets the wake-up find the
    instance's records without reading ``ids``.
    """
    return ik + key[rk.index(b"\x00") :]


def target_rkey(target: bytes) -> bytes | None:
    """Returns the record key in a timer target made by :func:`step_target` (else None)."""
    parts = target.split(b"\x00", 2)
    if len(parts) < 3 or len(parts[2]) <= 8:
        return None
    return parts[0] + b"\x00" + parts[2][:8]


def event_key(rk: bytes, event_type: str, seq: int) -> bytes:
    """Returns the key of a buffered event."""
    return rk + b"\x00" + event_type.encode() + b"\x00" + _U64.pack(seq)


def events_prefix(rk: bytes, event_type: str | None = None) -> bytes:
    """Returns the prefix of an instance's buffered events (of one type, if given)."""
    if event_type is None:
        return rk + b"\x00"
    return rk + b"\x00" + event_type.encode() + b"\x00"


def hist_prefix(rk: bytes) -> bytes:
    """Returns the prefix of an instance's history events."""
    return rk + b"\x00"


def hist_key(rk: bytes, seq: int) -> bytes:
    """Returns the key of an instance-level history event."""
    return rk + b"\x00" + _U64.pack(seq)


def hist_seq(key: bytes) -> int:
    """Returns the sequence number in a key made by :func:`hist_key`."""
    return int(_U64.unpack(key[-8:])[0])


def written_rkey(key: bytes) -> bytes:
    """Returns the record key an ``inst``, ``steps`` or ``hist`` key belongs to.

    Each of them starts with ``rk`` (``wf \\0 n``, ``n`` 8 bytes); the name
    has no NUL, so ``rk`` ends 8 bytes after the first one.
    """
    return key[: key.index(b"\x00") + 9]


class StatusMove(NamedTuple):
    """An instance's move in the status index, noted on the batch that makes it.

    ``old`` is None for a creation, ``new`` None for a deletion. Commit
    observers (the runtime's counts by status) add these up instead of
    parsing the index keys of a batch.
    """

    workflow: str
    old: str | None
    new: str | None


def split_idx_key(key: bytes) -> tuple[str, str]:
    """``(workflow, status)`` of a status-index key."""
    wf, status, _ = key.split(b"\x00", 2)
    return wf.decode(), status.decode()


def idx_parts(key: bytes) -> tuple[str, str, bytes]:
    """``(workflow, status, order)`` of a status-index key.

    ``order`` (the inverted creation time, then the id) sorts the instances
    of any status newest first.
    """
    wf, status, order = key.split(b"\x00", 2)
    return wf.decode(), status.decode(), order


def idx_order(created_ms: int, iid: str) -> bytes:
    """The ``order`` part of an instance's status-index keys (see :func:`idx_parts`)."""
    return _U64.pack(2**63 - created_ms) + b"\x00" + iid.encode()


def idx_workflow_after(wf: str) -> bytes:
    """A key past every status-index key of workflow ``wf``."""
    return wf.encode() + b"\x01"


def idx_key(wf: str, status: str, created_ms: int, iid: str) -> bytes:
    """Returns the status-index key of an instance (newest first within a status)."""
    return f"{wf}\x00{status}\x00".encode() + idx_order(created_ms, iid)


def idx_prefix(wf: str, status: str | None = None) -> bytes:
    """Returns the prefix of a workflow's status index (of one status, if given)."""
    return f"{wf}\x00{status}\x00".encode() if status else f"{wf}\x00".encode()


def idx_iid(key: bytes) -> str:
    """Returns the instance id of a status-index key."""
    return key.rsplit(b"\x00", 1)[1].decode()


def queue_db(wf: str) -> str:
    """Returns the keyspace of a workflow's queue."""
    return f"queue:{wf}"


def queue_key(priority: bytes, seq: int) -> bytes:
    """Returns a queue key; lower priority bytes are served first."""
    return priority + _U64.pack(seq)


def new_queue_key(seq: int, priority: int = 0, key: str | None = None) -> bytes:
    """The queue key of a new instance: the short default form, or band ``PRIO_KEYED``."""
    if key is None and not priority:
        return PRIO_NEW + _U64.pack(seq)
    return PRIO_KEYED + _U32.pack(priority - MIN_PRIORITY) + _U64.pack(seq)


def queue_order(qk: bytes) -> tuple[int, int]:
    """``(priority, seq)`` of a new instance's queue key: lower is served first."""
    if qk[:1] == PRIO_KEYED:
        return _U32.unpack(qk[1:5])[0] + MIN_PRIORITY, _U64.unpack(qk[5:13])[0]
    return 0, _U64.unpack(qk[1:9])[0]


def queue_key_before(qk: bytes) -> bytes:
    """The queue key just before ``qk`` in its band (the band's keys have one length)."""
    return (int.from_bytes(qk, "big") - 1).to_bytes(len(qk), "big")


def queue_entry(iid: str, key: str | None) -> bytes:
    """The value of a queue entry: the instance id (and ``\\0`` key, if it has one)."""
    if key is None:
        return iid.encode()
    return iid.encode() + b"\x00" + key.encode()


def parse_queue_entry(value: bytes) -> tuple[bytes, str | None]:
    """``(instance id bytes, key or None)`` of a queue entry's value."""
    i = value.find(b"\x00")
    if i < 0:
        return value, None
    return value[:i], value[i + 1 :].decode()


KQUEUE = "kqueue"


def key_queue_prefix(wf: str, key: str | None = None) -> bytes:
    """The prefix of a workflow's entries in the keyed queue (of one ``key``, if given).

    The key is length-prefixed, so that any string can be one.
    """
    if key is None:
        return wf.encode() + b"\x00"
    kb = key.encode()
    return wf.encode() + b"\x00" + _U16.pack(len(kb)) + kb


def key_queue_key(wf: str, key: str, qk: bytes) -> bytes:
    """The keyed-queue key of queue entry ``qk`` of an instance with ``key``."""
    return key_queue_prefix(wf, key) + qk


def split_key_queue_key(wf: str, kqk: bytes) -> tuple[str, bytes]:
    """``(key, queue key)`` of a keyed-queue key of workflow ``wf``."""
    i = len(wf.encode()) + 1
    n = _U16.unpack(kqk[i : i + 2])[0]
    return kqk[i + 2 : i + 2 + n].decode(), kqk[i + 2 + n :]


def queue_ops(
    batch: WriteBatch, wf: str, qk: bytes, iid: str, key: str | None, *, put: bool
) -> None:
    """Adds the write (``put``) or removal of queue entry ``qk`` to ``batch``.

    An entry of band ``PRIO_KEYED`` of a keyed instance is also in the keyed
    queue; wake-up entries are not (see the router).
    """
    keyed = key is not None and qk[:1] == PRIO_KEYED
    if put:
        batch.put(queue_db(wf), qk, queue_entry(iid, key if keyed else None))
        if keyed:
            batch.put(KQUEUE, key_queue_key(wf, cast(str, key), qk), iid.encode())
    else:
        batch.delete(queue_db(wf), qk)
        if keyed:
            batch.delete(KQUEUE, key_queue_key(wf, cast(str, key), qk))


def queued_by_key(
    storage: Storage,
    wf: str,
    top: int = 10,
    started: Callable[[], Collection[bytes]] | None = None,
) -> tuple[dict[str, int], int]:
    """The keys with most queued instances (at most ``top``) and how many keys have some.

    ``started`` gives the queue keys of instances already started whose
    entries are still stored (the router's handed entries); it is called
    only if the workflow has keyed entries. Reads every key of the keyed
    queue (keys only): O(keyed instances queued).
    """
    rows = storage.scan(KQUEUE, prefix=key_queue_prefix(wf), keys_only=True)
    if not rows:
        return {}, 0
    handed = started() if started is not None else ()
    counts: dict[str, int] = {}
    for kqk, _ in rows:
        k, qk = split_key_queue_key(wf, kqk)
        if qk not in handed:
            counts[k] = counts.get(k, 0) + 1
    best = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top]
    return dict(best), len(counts)


#: Step statuses that hold a timer (``tk``) until they end.
BLOCKED = frozenset({StepStatus.SLEEPING, StepStatus.WAITING, StepStatus.RETRYING})


def step_timers(steps: Iterable[StepCheckpoint]) -> list[bytes]:
    """Returns the timer keys of the steps still blocked on a deadline."""
    return [r["tk"] for r in steps if r.get("tk") and r["s"] in BLOCKED]


def error_dict(exc: BaseException) -> dict[str, str]:
    """Returns Cloudflare's ``{name, message}`` form of an exception."""
    return {"name": type(exc).__name__, "message": str(exc)}


_POKE = b"\x00\xff"


def poke_target(ik: bytes) -> bytes:
    """The target of a poke: a timer (of kind ``WAKE_KIND``, due now) that tells
    the owner of ``ik`` to read its events again."""
    return ik + _POKE


def poke_key(now_ms: int, ik: bytes) -> bytes:
    """The key of a poke of ``ik`` due at ``now_ms`` (see :func:`poke_target`)."""
    return timer_key(now_ms, WAKE_KIND, poke_target(ik))


def is_poke(key: bytes) -> bool:
    """True if timer ``key`` is a poke (see :func:`poke_target`).

    Its target is ``wf \\0 id \\0 \\xff``; a step's target has more after
    the id (see :func:`~actorflow.workflows.records.step_target`), which may end
    in the same two bytes (a count of 255).
    """
    return key.endswith(_POKE) and parse_timer_key(key)[2].split(b"\x00", 2)[2:] == [b"\xff"]


def delete_instance_ops(
    batch: WriteBatch,
    wf: str,
    iid: str,
    rk: bytes,
    record: InstanceRecord | dict[str, Any],
    timers: Iterable[bytes],
) -> None:
    """Adds the removal of every record of an instance to ``batch``.

    Its id, record, fence, status-index entry, steps, buffered events,
    history, queue entry (``qk``) and ``timers``. The caller guards the batch
    on the instance's epoch: whatever a stale run writes afterwards is then
    refused, because the fence it guards on is gone.
    """
    ik = ikey(wf, iid)
    exists_guard(batch, ik, rk)
    batch.delete(IDS, ik)
    batch.delete(INST, rk)
    batch.delete(FENCE, rk)
    batch.delete(IDX, idx_key(wf, record["s"], record["created"], iid))
    batch.note(StatusMove(wf, record["s"], None))
    batch.delete_prefix(STEPS, steps_prefix(rk))
    batch.delete_prefix(EVENTS, events_prefix(rk))
    batch.delete_prefix(HIST, hist_prefix(rk))
    qk = record.get("qk")
    if qk:
        queue_ops(batch, wf, qk, iid, record.get("ky"), put=False)
    for tk in timers:
        TimerService.disarm(batch, tk)


def exists_guard(batch: WriteBatch, ik: bytes, rk: bytes) -> None:
    """Guards ``batch`` on instance ``ik`` still having its records at ``rk``.

    For writes not guarded on the epoch (an event stored through a node that
    does not own the instance): refused once the instance has been deleted,
    even if an instance of the same id was created since.
    """
    batch.guard(IDS, ik, rk[rk.index(b"\x00") + 1 :])


def orphan_timer_batch(storage: Storage, ik: bytes, key: bytes) -> WriteBatch | None:
    """The write that removes timer ``key`` of instance ``ik`` if its instance is gone.

    A deletion removes the timers it knows of; one armed meanwhile by another
    node (a poke) is found when it fires. None if the instance the timer
    belongs to still has its record (it may just be unreadable).
    """
    current = storage.get(IDS, ik)
    rk = target_rkey(parse_timer_key(key)[2])
    if rk is None and current is not None:
        rk = rkey_of(ik, current)
    if rk is not None and storage.get(INST, rk) is not None:
        return None
    batch = WriteBatch()
    batch.guard(IDS, ik, current)  # no instance of that id came (back) meanwhile
    TimerService.disarm(batch, key)
    return batch


def instance_pokes(storage: Storage, ik: bytes, before_ms: int) -> list[bytes]:
    """The pokes of instance ``ik`` due before ``before_ms`` (see :func:`poke_target`)."""
    target = poke_target(ik)
    return [
        key
        for key in armed_keys(storage, before_ms)
        if parse_timer_key(key)[2] == target and is_poke(key)
    ]


# -- cron schedules ------------------------------------------------------------------
# One record per (workflow, schedule), keyed by a digest of the schedule's
# expression: the last tick it handled, the next one and the timer armed for
# it. The record and the timer change in the batch that creates the tick's
# instance, so a tick is handled exactly once whoever fires it.

SCHED = "sched"
SCHEDULE_KIND = "C"  # timer kind of schedule ticks; the target is the record's key


class ScheduleRecord(TypedDict):
    """A cron schedule of a workflow (``sched``)."""

    c: str  # the cron expression (normalized: single spaces)
    last: int | None  # the last tick handled (epoch ms); None: none yet
    iid: str | None  # the id of the instance that tick created (None: none yet)
    next: int  # the next tick (epoch ms), when its timer is due
    tk: bytes  # the timer key armed for ``next``


def schedule_key(wf: str, digest: str) -> bytes:
    """The key of a schedule's record (also its timers' target)."""
    return f"{wf}\x00{digest}".encode()


def split_schedule_key(key: bytes) -> tuple[str, str]:
    """``(workflow, digest)`` of a schedule's record key (or timer target)."""
    wf, digest = key.split(b"\x00", 1)
    return wf.decode(), digest.decode()


def schedule_timer_key(deadline_ms: int, wf: str, digest: str) -> bytes:
    """The key of the timer of a schedule's tick due at ``deadline_ms``."""
    return timer_key(deadline_ms, SCHEDULE_KIND, schedule_key(wf, digest))


def read_schedule(
    storage: Storage, wf: str, digest: str
) -> tuple[bytes | None, ScheduleRecord | None]:
    """A schedule's stored bytes (to guard a write on) and its record (None: none)."""
    raw = storage.get(SCHED, schedule_key(wf, digest))
    return raw, (cast(ScheduleRecord, load(raw)) if raw is not None else None)


def read_schedules(
    storage: Storage, wf: str | None = None
) -> list[tuple[str, str, ScheduleRecord]]:
    """Every stored schedule (of workflow ``wf``, if given): ``(workflow, digest, record)``."""
    prefix = f"{wf}\x00".encode() if wf is not None else b""
    out = []
    for key, raw in storage.scan(SCHED, prefix=prefix):
        name, digest = split_schedule_key(key)
        out.append((name, digest, cast(ScheduleRecord, load(raw))))
    return out


def put_schedule(
    batch: WriteBatch, wf: str, digest: str, rec: ScheduleRecord, expected: bytes | None
) -> None:
    """Adds the write of a schedule's record to ``batch``, guarded on its stored bytes."""
    key = schedule_key(wf, digest)
    batch.guard(SCHED, key, expected)
    batch.put(SCHED, key, dump(rec))


def drop_schedule(batch: WriteBatch, wf: str, digest: str, expected: bytes) -> None:
    """Adds the removal of a schedule's record to ``batch``, guarded on its stored bytes."""
    key = schedule_key(wf, digest)
    batch.guard(SCHED, key, expected)
    batch.delete(SCHED, key)
