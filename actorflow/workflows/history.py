"""An instance's history, in Cloudflare's event vocabulary, and its step records.

Step-level events are not stored one by one: each step keeps one record with
its attempts (start, end, error, retry delay), and :func:`build_history`
turns those records, plus the few stored instance-level events, into the
event log. This keeps the hot path at one write per step.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from actorflow.core.clock import to_datetime
from actorflow.core.storage import Storage
from actorflow.workflows.matching import PATCH_KIND, Divergence
from actorflow.workflows.records import (
    HIST,
    STEPS,
    fork_origin,
    hist_prefix,
    hist_seq,
    load,
    steps_prefix,
)
from actorflow.workflows.step_options import SENSITIVE_OUTPUT

__all__ = [
    "REDACTED",
    "SENSITIVE_OUTPUT",
    "Attempt",
    "HistoryEvent",
    "Source",
    "StepRecord",
    "build_history",
    "build_numbered_steps",
    "build_sourced_history",
    "build_steps",
    "read_history",
    "read_steps",
]

EVENT_TYPES = (
    "WORKFLOW_QUEUED",
    "WORKFLOW_START",
    "WORKFLOW_SUCCESS",
    "WORKFLOW_FAILURE",
    "WORKFLOW_TERMINATED",
    "STEP_START",
    "STEP_SUCCESS",
    "STEP_FAILURE",
    "SLEEP_START",
    "SLEEP_COMPLETE",
    "ATTEMPT_START",
    "ATTEMPT_SUCCESS",
    "ATTEMPT_FAILURE",
    "WAIT_START",
    "WAIT_COMPLETE",
    "WAIT_TIMED_OUT",
    "WORKFLOW_PAUSED",
    "WORKFLOW_RESUMED",
    "WORKFLOW_RESTARTED",
    "INSTANCE_RECOVERED",
    "ROLLBACK_START",
    "ROLLBACK_STEP_START",
    "ROLLBACK_STEP_SUCCESS",
    "ROLLBACK_STEP_FAILURE",
    "ROLLBACK_COMPLETE",
    "ROLLBACK_FAILED",
)


#: The executor name of an attempt run in the runtime's own process (its record
#: says nothing of where it ran).
INPROCESS = "inprocess"


@dataclass(frozen=True)
class HistoryEvent:
    """One entry of ``inst.history()``."""

    type: str
    timestamp: datetime
    step: str | None = None
    attempt: int | None = None
    data: dict[str, Any] = field(default_factory=dict)
    #: Where the event is in the instance's history, as ``inst.subscribe``
    #: gives it (an opaque str to pass back as ``subscribe(cursor=...)``);
    #: None in ``inst.history()``.
    cursor: str | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Attempt:
    """One attempt of a step: when and where it ran, and how it ended.

    ``ran_on`` says where: ``{"executor": "inprocess"}`` in the runtime's own
    process; for a remote executor its name and, as far as it knows them, the
    ``node``, ``worker``, ``host`` and ``pid`` (``{"executor": "ray", "node":
    ..., "worker": ..., ...}``). An attempt whose worker was lost may know only
    the executor.
    """

    attempt: int
    start: datetime
    end: datetime | None
    error: dict[str, str] | None = None
    retry_delay_ms: int | None = None
    ran_on: dict[str, str] = field(default_factory=lambda: {"executor": INPROCESS})


@dataclass(frozen=True)
class StepRecord:
    """One entry of ``inst.steps()``.

    ``kind`` ``"patch"`` is the answer of ``step.patched(name)`` (``output``
    True or False; see ``docs/versioning.md``). ``divergence`` is set on a step
    that a replay met at another position than the recorded one:
    ``{"position", "expected", "found", "concurrent"}`` (see
    :class:`~actorflow.workflows.matching.Divergence`).
    """

    name: str
    count: int
    kind: str  # "do", "sleep", "wait_for_event", "rollback" (a do step's handler) or "patch"
    status: str  # running, retrying, sleeping, waiting, complete or errored
    start: datetime | None
    end: datetime | None
    attempts: list[Attempt]
    output: Any = None
    error: dict[str, str] | None = None
    config: dict[str, Any] | None = None
    deadline: datetime | None = None
    divergence: dict[str, Any] | None = None
    #: True in a fork (``inst.fork``) for a step kept from its origin: it ran
    #: there, at these times, and the fork's run replays it.
    forked: bool = False


_RANK = {
    "WORKFLOW_QUEUED": 0,
    "WORKFLOW_RESTARTED": 0,
    "WORKFLOW_START": 1,
    "WORKFLOW_RESUMED": 1,
    "INSTANCE_RECOVERED": 1,
    # A chain of rollbacks goes after the step that failed (same ms or not) and
    # before the instance's end: its start, its handlers' attempts (rank
    # _ROLLBACK_STEP in the step stream), its end.
    "ROLLBACK_START": 2.25,
    "ROLLBACK_COMPLETE": 2.75,
    "ROLLBACK_FAILED": 2.75,
    "WORKFLOW_PAUSED": 3,
    "WORKFLOW_SUCCESS": 4,
    "WORKFLOW_FAILURE": 4,
    "WORKFLOW_TERMINATED": 4,
}


#: What history, steps, the CLI, the HTTP API and the dashboard show instead of the
#: output of a step run with ``config={"redact": True}``. Replay still uses the real value.
REDACTED = "[redacted]"


_ROLLBACK_STEP = 2.5
_FORKED = 0.5  # after WORKFLOW_QUEUED, before WORKFLOW_START (see build_sourced_history)


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else to_datetime(ms / 1000.0)


def build_steps(records: list[dict[str, Any]], loads: Any) -> list[StepRecord]:
    """Turns raw step records (in start order) into :class:`StepRecord` s."""
    return [s for _seq, s in build_numbered_steps(records, loads)]


def build_numbered_steps(records: list[dict[str, Any]], loads: Any) -> list[tuple[int, StepRecord]]:
    """Like :func:`build_steps`, each :class:`StepRecord` with its record's ``seq``."""
    out = []
    for r in sorted(records, key=lambda r: r["seq"]):
        attempts = [
            Attempt(
                i + 1,
                to_datetime(a[0] / 1000.0),
                _dt(a[1]),
                a[2],
                a[3],
                dict(a[4]) if len(a) > 4 else {"executor": INPROCESS},
            )
            for i, a in enumerate(r.get("att", ()))
        ]
        output: Any = None
        if r["s"] == "complete":
            if r["k"] == "do" and r.get("r") is not None:
                cfg = r.get("cfg") or {}
                if cfg.get("sensitive") == "output":
                    output = SENSITIVE_OUTPUT
                elif cfg.get("redact"):
                    output = REDACTED
                else:
                    output = loads(r["r"])
            elif r["k"] == "wait_for_event" and r.get("ev") is not None:
                output = loads(r["ev"][0])
            elif r["k"] == PATCH_KIND:
                output = bool(r.get("pa"))
        dv = r.get("dv")
        out.append(
            (
                r["seq"],
                StepRecord(
                    name=r["n"],
                    count=r["c"],
                    kind=r["k"],
                    status=r["s"],
                    start=_dt(r.get("t0")),
                    end=_dt(r.get("t1")),
                    attempts=attempts,
                    output=output,
                    error=r.get("ed"),
                    config=r.get("cfg"),
                    deadline=_dt(r.get("dl")),
                    divergence=Divergence.from_record(dv).document() if dv else None,
                    forked=bool(r.get("fk")),
                ),
            )
        )
    return out


#: Where an event of the log comes from: ``("q", 0, 0)`` the instance's
#: creation, ``("h", seq, 0)`` the stored instance event of that sequence
#: number, ``("s", seq, i)`` the ``i``-th event (0-based) derived from the step
#: record of that ``seq``. A step record only grows (attempts, then its end),
#: so ``i`` names the same event in every later read of it.
Source = tuple[str, int, int]


def build_history(
    instance: dict[str, Any],
    stored: list[tuple[int, dict[str, Any]]],
    steps: list[StepRecord],
) -> list[HistoryEvent]:
    """Merges stored instance events and step records into one log, oldest first.

    Stored events keep their write order (a restart and the run after it may
    share a millisecond); step events are ordered by time. Where the two
    streams tie on a millisecond, lifecycle starts go before step events and
    lifecycle ends after them.
    """
    return [e for _src, e in build_sourced_history(instance, stored, list(enumerate(steps)))]


def build_sourced_history(
    instance: dict[str, Any],
    stored: list[tuple[int, dict[str, Any]]],
    steps: list[tuple[int, StepRecord]],
) -> list[tuple[Source, HistoryEvent]]:
    """:func:`build_history`, each event with its :data:`Source`.

    ``stored`` pairs each stored event with its sequence number, ``steps``
    each step record with its ``seq``, both in that order.
    """
    origin = fork_origin(instance)  # a fork's creation names where it comes from
    lifecycle: list[tuple[float, float, int, Source, HistoryEvent]] = [
        (
            instance["created"],
            0,
            0,
            ("q", 0, 0),
            HistoryEvent(
                "WORKFLOW_QUEUED",
                to_datetime(instance["created"] / 1000),
                data={"forked_from": origin} if origin is not None else {},
            ),
        )
    ]
    for i, (seq, e) in enumerate(stored):
        lifecycle.append(
            (
                e["ts"],
                _RANK.get(e["type"], 2),
                i + 1,
                ("h", seq, 0),
                HistoryEvent(e["type"], to_datetime(e["ts"] / 1000), data=e.get("data", {})),
            )
        )
    events: list[tuple[float, float, int, Source, HistoryEvent]] = []
    order = 0
    for seq, s in _logged(steps):
        for index, (ms, rank, ev) in enumerate(_step_events(s, instance["created"])):
            if s.forked:
                # A step a fork kept from its origin ran there, before the fork
                # existed: its events come right after the fork's creation, in
                # the order they had, with their own times.
                ms, rank = instance["created"], _FORKED
            order += 1
            events.append((ms, rank, order, ("s", seq, index), ev))
    events.sort(key=lambda t: (t[0], t[1], t[2]))
    # A merge, not a sort: it keeps the order within each stream.
    merged = heapq.merge(lifecycle, events, key=lambda t: (t[0], t[1]))
    return [(src, e) for *_, src, e in merged]


def _logged(steps: list[tuple[int, StepRecord]]) -> list[tuple[int, StepRecord]]:
    """The steps with events in the log: a patch is the answer of step.patched, not a step."""
    return [p for p in steps if p[1].kind != PATCH_KIND]


def _step_events(s: StepRecord, created: int) -> list[tuple[float, float, HistoryEvent]]:
    """The events of one step record: ``(ms, rank, event)``, in their order."""
    out: list[tuple[float, float, HistoryEvent]] = []

    def add(ms: float, ev: HistoryEvent, rank: float = 2) -> None:
        out.append((ms, rank, ev))

    label = f"{s.name}-{s.count}"
    t0 = s.start.timestamp() * 1000 if s.start else created
    if s.kind == "rollback":
        for ms, ev in _rollback_events(s, label):
            add(ms, ev, _ROLLBACK_STEP)
    elif s.kind == "do":
        add(
            t0,
            HistoryEvent(
                "STEP_START",
                s.start or to_datetime(t0 / 1000),
                label,
                data={"config": s.config},
            ),
        )
        for a in s.attempts:
            for ms, ev in _attempt_events(a, label):
                add(ms, ev)
        if s.status == "complete" and s.end:
            add(
                s.end.timestamp() * 1000,
                HistoryEvent("STEP_SUCCESS", s.end, label, data={"result": s.output}),
            )
        elif s.status == "errored" and s.end:
            add(
                s.end.timestamp() * 1000,
                HistoryEvent("STEP_FAILURE", s.end, label, data={"error": s.error}),
            )
    elif s.kind == "sleep":
        dur = (s.deadline.timestamp() * 1000 - t0) if s.deadline else 0
        add(
            t0,
            HistoryEvent(
                "SLEEP_START",
                s.start or to_datetime(t0 / 1000),
                label,
                data={"durationMs": max(0, int(dur))},
            ),
        )
        if s.status == "complete" and s.end:
            add(s.end.timestamp() * 1000, HistoryEvent("SLEEP_COMPLETE", s.end, label))
    else:
        add(t0, HistoryEvent("WAIT_START", s.start or to_datetime(t0 / 1000), label))
        if s.status == "complete" and s.end:
            add(
                s.end.timestamp() * 1000,
                HistoryEvent("WAIT_COMPLETE", s.end, label, data={"payload": s.output}),
            )
        elif s.status == "errored" and s.end:
            add(
                s.end.timestamp() * 1000,
                HistoryEvent("WAIT_TIMED_OUT", s.end, label, data={"error": s.error}),
            )
    return out


def _attempt_events(a: Attempt, label: str) -> list[tuple[float, HistoryEvent]]:
    """The events of one attempt of step ``label``, with their times in ms."""
    out = [(a.start.timestamp() * 1000, HistoryEvent("ATTEMPT_START", a.start, label, a.attempt))]
    if a.end is None:
        return out
    # Where it ran, for an attempt that ran elsewhere than this process.
    remote = a.ran_on if a.ran_on.get("executor") != INPROCESS else None
    if a.error is None:
        data: dict[str, Any] = {"ranOn": remote} if remote else {}
        ev = HistoryEvent("ATTEMPT_SUCCESS", a.end, label, a.attempt, data)
        out.append((a.end.timestamp() * 1000, ev))
        return out
    data = {"error": a.error}
    if a.retry_delay_ms is not None:
        data["retryDelayMs"] = a.retry_delay_ms
    if remote:
        data["ranOn"] = remote
    out.append(
        (a.end.timestamp() * 1000, HistoryEvent("ATTEMPT_FAILURE", a.end, label, a.attempt, data))
    )
    return out


def _rollback_events(s: StepRecord, label: str) -> list[tuple[float, HistoryEvent]]:
    """One ROLLBACK_STEP_START and its SUCCESS or FAILURE per attempt of a rollback handler."""
    out: list[tuple[float, HistoryEvent]] = []
    for a in s.attempts:
        out.append(
            (
                a.start.timestamp() * 1000,
                HistoryEvent("ROLLBACK_STEP_START", a.start, label, a.attempt),
            )
        )
        if a.end is None:
            continue
        if a.error is None:
            ev = HistoryEvent("ROLLBACK_STEP_SUCCESS", a.end, label, a.attempt)
        else:
            data: dict[str, Any] = {"error": a.error}
            if a.retry_delay_ms is not None:
                data["retryDelayMs"] = a.retry_delay_ms
            ev = HistoryEvent("ROLLBACK_STEP_FAILURE", a.end, label, a.attempt, data)
        out.append((a.end.timestamp() * 1000, ev))
    return out


def read_steps(storage: Storage, rk: bytes) -> list[StepRecord]:
    """Reads the step records of the instance whose records are keyed ``rk``.

    See :mod:`actorflow.workflows.records` for the key.
    """
    raw = [load(v) for _k, v in storage.scan(STEPS, prefix=steps_prefix(rk))]
    return build_steps(raw, storage.serializer.loads)


def read_history(
    storage: Storage, rk: bytes, instance: dict[str, Any], steps: list[StepRecord] | None = None
) -> list[HistoryEvent]:
    """Reads the event log of the instance keyed ``rk`` whose record is ``instance``."""
    stored = [(hist_seq(k), load(v)) for k, v in storage.scan(HIST, prefix=hist_prefix(rk))]
    return build_history(instance, stored, read_steps(storage, rk) if steps is None else steps)
