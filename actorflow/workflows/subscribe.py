"""``Instance.subscribe``: an instance's history, then its live events, by cursor.

The history is not stored event by event: it is derived from the instance's
stored events and its step records (see :mod:`actorflow.workflows.history`),
and a step record is written when an attempt ends, so an event can become
visible after later-timed ones (two steps run in parallel: the one that
started first may end last). A position in the sorted log would then miss
it. A cursor says instead which events have been delivered, by where each
comes from (its :data:`~actorflow.workflows.history.Source`):

- ``h``: every stored instance event up to this sequence number (they are
  written in increasing order), and the creation (``WORKFLOW_QUEUED``);
- ``s``: every event of each step record whose ``seq`` is below this, all of
  them final (complete or errored: such a record never changes again);
- ``p``: for the step records from ``s`` on, how many of their events (a
  record's events only grow at the end).

In a workflow run step after step, ``p`` holds the step in progress, if any;
with steps in parallel, one entry per step in flight. Every event carries the
cursor that covers it and everything delivered before it.

A restart deletes step records (all of them, or those from a step on) and the
new run writes records of the same ``seq`` again: once a ``WORKFLOW_RESTARTED``
the cursor does not cover is read, the cursor's counts hold only for the step
records that existed before it (those that started before the restart).

Live events: a :class:`CommitWatch` is told of every group commit of the
runtime's storage and wakes the subscribers of the instances it wrote. A
commit made by another process (another node on the same data directory) is
seen within ``poll`` seconds, the longest a subscriber waits between reads.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import threading
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from actorflow.core.errors import InvalidCursor
from actorflow.core.storage import Item, Storage
from actorflow.workflows.definition import FINISHED, instance_not_found
from actorflow.workflows.history import (
    EVENT_TYPES,
    HistoryEvent,
    Source,
    build_numbered_steps,
    build_sourced_history,
)
from actorflow.workflows.records import (
    HIST,
    INST,
    STEPS,
    hist_prefix,
    hist_seq,
    load,
    steps_prefix,
    written_rkey,
)

__all__ = ["DEFAULT_POLL_S", "CommitWatch", "Position", "Subscription", "check_types"]

#: The longest a subscriber waits without reading storage: how soon it sees a
#: commit made by another process on the same data directory.
DEFAULT_POLL_S = 1.0
_VERSION = 1
_WATCHED = frozenset((INST, STEPS, HIST))
_FINAL_STEP = frozenset(("complete", "errored"))


class CommitWatch:
    """Wakes the threads following an instance when a commit writes its records.

    Thread: :meth:`observe` runs on the storage's writer thread, after each
    group commit; the others on the subscribers' threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subs: dict[bytes, list[_Wake]] = {}

    def observe(self, items: list[Item], results: list[BaseException | None], *_: Any) -> None:
        """A commit observer (``Storage.add_commit_observer``): wakes whom it concerns."""
        subs = self._subs
        if not subs:  # read without the lock: the hot path when nobody subscribes
            return
        hit: set[bytes] = set()
        for (batch, _cb), err in zip(items, results, strict=True):
            if err is not None:
                continue
            for op in batch.ops:
                if op[1] in _WATCHED:
                    rk = written_rkey(op[2])
                    if rk in subs:
                        hit.add(rk)
        if not hit:
            return
        with self._lock:
            woken = [ev for rk in hit for ev in self._subs.get(rk, ())]
        for ev in woken:
            ev.set()

    def watch(self, rk: bytes, ev: _Wake) -> None:
        """Sets ``ev`` after every commit that writes records of ``rk``."""
        with self._lock:
            self._subs.setdefault(rk, []).append(ev)

    def unwatch(self, rk: bytes, ev: _Wake) -> None:
        """Forgets an event given to :meth:`watch`."""
        with self._lock:
            lst = self._subs.get(rk)
            if lst and ev in lst:
                lst.remove(ev)
                if not lst:
                    del self._subs[rk]


def _tag(workflow: str, iid: str, created: int) -> str:
    """Names the instance a cursor belongs to (a re-created id is another instance)."""
    return hashlib.sha1(f"{workflow}\x00{iid}\x00{created}".encode()).hexdigest()[:10]


@dataclass
class Position:
    """What a subscriber has delivered (see the module's docstring)."""

    h: int = -1
    s: int = 0
    p: dict[int, int] = field(default_factory=dict)

    def encode(self, tag: str) -> str:
        """The cursor string of this position for the instance ``tag`` names."""
        flat = [x for kv in sorted(self.p.items()) for x in kv]
        raw = json.dumps([_VERSION, tag, self.h, self.s, flat], separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, cursor: object, tag: str, where: str, workflow: str, iid: str) -> Position:
        """Reads a cursor :meth:`encode` made for the instance ``tag`` names.

        Raises:
            InvalidCursor: It is not such a cursor, or it is another instance's.
        """

        def bad(why: str) -> InvalidCursor:
            return InvalidCursor(f"{where}: {why}", workflow=workflow, instance=iid)

        if not isinstance(cursor, str) or not cursor:
            raise bad(f"a cursor is a non-empty str from a subscribed event, not {cursor!r}")
        try:
            raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
            version, their, h, s, flat = raw
            ok = (
                version == _VERSION
                and isinstance(their, str)
                and all(type(x) is int and x >= -1 for x in (h, s, *flat))
                and len(flat) % 2 == 0
            )
        except (ValueError, TypeError):
            ok = False
        if not ok:
            shown = cursor if len(cursor) <= 80 else cursor[:77] + "..."
            raise bad(f"not a subscribe cursor: {shown!r}")
        if their != tag:
            raise bad("the cursor belongs to another instance")
        return cls(h, s, dict(zip(flat[::2], flat[1::2], strict=True)))


def check_types(types: Iterable[str] | str | None, where: str) -> frozenset[str] | None:
    """The event types to keep (None: all).

    Raises:
        TypeError: ``types`` is not a str or an iterable of str.
        ValueError: It names a type that is not a history event type.
    """
    if types is None:
        return None
    chosen = [types] if isinstance(types, str) else list(types)
    for t in chosen:
        if not isinstance(t, str):
            raise TypeError(f"{where}: types are event type names (str), not {t!r}")
        if t not in EVENT_TYPES:
            raise ValueError(f"{where}: unknown event type {t!r}; use names among {EVENT_TYPES}")
    return frozenset(chosen)


class _Advance:
    """One read of the history: which of its events the position does not cover.

    Args:
        pos: The position, updated in place as events are taken.
        stored: The stored instance events with their sequence numbers.
        steps: The step records with their ``seq``, and their ``t0``.
        totals: How many events each step record gives, and whether it is final.
    """

    def __init__(
        self,
        pos: Position,
        stored: list[tuple[int, dict[str, Any]]],
        steps: dict[int, int],
        totals: dict[int, tuple[int, bool]],
    ) -> None:
        self.pos = pos
        self.totals = totals
        # A restart the position does not cover: the records written after it
        # are new ones, though their seq may be one the cursor counted.
        restarts = [e for seq, e in stored if seq > pos.h and e["type"] == "WORKFLOW_RESTARTED"]
        last = restarts[-1] if restarts else None
        full = last is not None and not (last.get("data") or {}).get("from_step")
        self.done: dict[int, int] = {}
        for seq, t0 in steps.items():
            if last is not None and (full or t0 >= last["ts"]):
                self.done[seq] = 0
            elif seq < pos.s:
                self.done[seq] = totals[seq][0]  # every event of a final record
            else:
                self.done[seq] = pos.p.get(seq, 0)
        # Counted again from the records there are: a restart may have deleted some.
        pos.s = 0
        pos.p = {}
        self._compact()
        pos.p = {k: v for k, v in self.done.items() if k >= pos.s and v}

    def _compact(self) -> None:
        pos, totals, done = self.pos, self.totals, self.done
        while True:
            n, final = totals.get(pos.s, (0, False))
            if not final or done.get(pos.s, 0) < n:
                return
            pos.p.pop(pos.s, None)
            pos.s += 1

    def fresh(self, src: Source) -> bool:
        """True if the event from ``src`` is not covered yet."""
        kind, a, b = src
        if kind == "q":
            return self.pos.h < -1
        if kind == "h":
            return a > self.pos.h
        return b >= self.done.get(a, 0)

    def take(self, src: Source) -> None:
        """Counts the event from ``src`` as delivered."""
        kind, a, b = src
        pos = self.pos
        if kind == "q":
            pos.h = max(pos.h, -1)
        elif kind == "h":
            pos.h = max(pos.h, a)
        else:
            self.done[a] = max(self.done.get(a, 0), b + 1)
            if a >= pos.s:
                pos.p[a] = self.done[a]
                self._compact()


def _read(storage: Storage, rk: bytes) -> tuple[dict[str, Any] | None, Any, Any]:
    """The instance record, then its stored events and step records, from one snapshot.

    The record is read first: once it is final, the events read after it
    include the final one (they are written together).
    """
    raw = storage.get(INST, rk)
    if raw is None:
        return None, [], []
    hist, steps = storage.scan_prefixes([(HIST, hist_prefix(rk)), (STEPS, steps_prefix(rk))])
    return load(raw), hist, steps


def _log(
    storage: Storage, rec: dict[str, Any], hist: Any, steps: Any, pos: Position
) -> tuple[list[tuple[Source, HistoryEvent]], _Advance]:
    """The log of one read, and what of it ``pos`` covers."""
    stored = [(hist_seq(k), load(v)) for k, v in hist]
    raws = [load(v) for _k, v in steps]
    numbered = build_numbered_steps(raws, storage.serializer.loads)
    log = build_sourced_history(rec, stored, numbered)
    counts: dict[int, int] = {}
    for src, _e in log:
        if src[0] == "s":
            counts[src[1]] = counts.get(src[1], 0) + 1
    totals = {seq: (counts.get(seq, 0), s.status in _FINAL_STEP) for seq, s in numbered}
    t0 = {r["seq"]: int(r.get("t0") or 0) for r in raws}
    return log, _Advance(pos, stored, t0, totals)


class _Wake:
    """What :class:`CommitWatch` sets: a thread's event, and an event loop's once bound."""

    def __init__(self) -> None:
        self.thread = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async: asyncio.Event | None = None

    def bind(self) -> asyncio.Event:
        """An asyncio event of the running loop, set with the thread's event."""
        if self._async is None:
            self._async = asyncio.Event()
            self._loop = asyncio.get_running_loop()
            if self.thread.is_set():
                self._async.set()
        return self._async

    def set(self) -> None:
        self.thread.set()
        loop, aev = self._loop, self._async
        if loop is not None and aev is not None:
            try:
                loop.call_soon_threadsafe(aev.set)
            except RuntimeError:
                pass  # the loop is closed: nobody waits any more

    def clear(self) -> None:
        self.thread.clear()
        if self._async is not None:
            self._async.clear()


class Subscription:
    """The instance's history after a cursor, then its live events, until it ends.

    Iterate it (``for``, or ``async for``) once. It ends once it has given
    every event of an instance whose stored status is final (complete,
    errored or terminated), or when the instance is deleted; :meth:`close`
    (or leaving the loop) stops it.

    Raises:
        InstanceNotFound: There is no such instance.
        InvalidCursor: ``cursor`` is malformed or another instance's.
        TypeError, ValueError: ``types`` names no event type.
    """

    def __init__(
        self,
        storage: Storage,
        watch: CommitWatch | None,
        workflow: str,
        iid: str,
        rk: bytes,
        *,
        cursor: str | None = None,
        types: Iterable[str] | str | None = None,
        poll: float | None = None,
    ) -> None:
        self.ended = False
        self._wake: _Wake | None = None
        where = f"workflow {workflow!r}, instance {iid!r}: subscribe"
        self._types = check_types(types, where)
        self._storage = storage
        self._watch = watch
        self._rk = rk
        self._poll = DEFAULT_POLL_S if poll is None else poll
        # Watched before the first read: a commit just after it wakes the follower.
        if watch is not None:
            self._wake = _Wake()
            watch.watch(rk, self._wake)
        try:
            first = _read(storage, rk)
            if first[0] is None:
                raise instance_not_found(workflow, iid)
            self._tag = _tag(workflow, iid, first[0]["created"])
            self._pos = (
                Position.decode(cursor, self._tag, where, workflow, iid)
                if cursor is not None
                else Position(h=-2)
            )
        except BaseException:
            self.close()
            raise
        self._first: tuple[dict[str, Any] | None, Any, Any] | None = first

    def close(self) -> None:
        """Stops following the instance (idempotent)."""
        self.ended = True
        wake, self._wake = self._wake, None
        if wake is not None and self._watch is not None:
            self._watch.unwatch(self._rk, wake)

    def __del__(self) -> None:
        if hasattr(self, "_watch"):
            self.close()

    def read(self) -> list[HistoryEvent]:
        """The events committed since the last read (the first: since the cursor).

        It does not wait. After the read that finds the instance final (or
        gone), :attr:`ended` is True and the subscription is closed.
        """
        if self.ended:
            return []
        first, self._first = self._first, None
        if self._wake is not None:
            self._wake.clear()  # before the read: a commit after it sets it again
        rec, hist, steps = first if first is not None else _read(self._storage, self._rk)
        if rec is None:
            self.close()  # deleted: nothing more will come
            return []
        log, adv = _log(self._storage, rec, hist, steps, self._pos)
        out = []
        types = self._types
        for src, e in log:
            if not adv.fresh(src):
                continue
            adv.take(src)
            if types is None or e.type in types:
                out.append(dataclasses.replace(e, cursor=self._pos.encode(self._tag)))
        if rec["s"] in FINISHED:
            self.close()
        return out

    def __iter__(self) -> Iterator[HistoryEvent]:
        try:
            while True:
                yield from self.read()
                if self.ended:
                    return
                wake = self._wake
                if wake is not None:
                    wake.thread.wait(self._poll)
                else:
                    threading.Event().wait(self._poll)
        finally:
            self.close()

    async def __aiter__(self) -> AsyncIterator[HistoryEvent]:
        try:
            while True:
                # A read is short, but it is storage I/O: off the event loop.
                for e in await asyncio.to_thread(self.read):
                    yield e
                if self.ended:
                    return
                wake = self._wake
                if wake is None:
                    await asyncio.sleep(self._poll)
                    continue
                try:
                    await asyncio.wait_for(wake.bind().wait(), self._poll)
                except TimeoutError:
                    pass
        finally:
            self.close()
