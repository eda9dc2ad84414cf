"""Read-only queries of workflow instances: status, description, listings and counts.

One module answers every read a user or a tool makes of the instances: the
handles (:meth:`Instance.status <actorflow.Instance.status>`,
:meth:`Instance.describe <actorflow.Instance.describe>`,
:meth:`WorkflowBinding.list <actorflow.WorkflowBinding.list>`), the
``actorflow`` command over a data directory and the HTTP API. It only reads:
nothing here writes a record. It knows the record layout through
:mod:`actorflow.workflows.records`, so the faces above it know none.

A :class:`Query` reads a runtime's storage. Given the supervisor's live
actors, it also shows the states an instance has only in memory (started and
not yet checkpointed, pausing, woken and waiting for a slot), as
``Instance.status()`` always has. Over a data directory opened with
:meth:`Query.open` there are no live actors: it shows what is durable.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from actorflow.cluster.lease import OWNER
from actorflow.core.clock import to_datetime
from actorflow.core.errors import InstanceNotFound
from actorflow.core.storage import Storage, is_database_url, open_storage
from actorflow.core.timers import count_armed
from actorflow.workflows.definition import FINISHED, STATUSES, InstanceStatus, instance_not_found
from actorflow.workflows.history import (
    Attempt,
    HistoryEvent,
    StepRecord,
    read_history,
    read_steps,
)
from actorflow.workflows.matching import PATCH_KIND
from actorflow.workflows.records import (
    EVENTS,
    IDS,
    IDX,
    INST,
    STEPS,
    events_prefix,
    fork_origin,
    idx_iid,
    idx_key,
    idx_order,
    idx_parts,
    idx_prefix,
    idx_workflow_after,
    ikey,
    load,
    queue_db,
    queued_by_key,
    rkey,
    split_idx_key,
    steps_prefix,
)
from actorflow.workflows.replay import export_document
from actorflow.workflows.rollbacks import ROLLBACK_KIND, rollback_status
from actorflow.workflows.schedules import ScheduleSummary, list_schedules

if TYPE_CHECKING:
    from actorflow.workflows.engine.instance import InstanceActor

__all__ = [
    "LISTED_STATUSES",
    "STATUS_FIELDS",
    "InstanceDescription",
    "InstanceSummary",
    "Page",
    "Query",
    "document",
    "event_document",
    "history_document",
    "jsonable",
    "schedule_document",
    "step_document",
    "summary_document",
]

#: The fields of an instance's status document (:meth:`Query.status_document`).
STATUS_FIELDS = (
    "id",
    "workflow",
    "status",
    "params",
    "output",
    "error",
    "rollback",
    "queued",
    "start",
    "success",
)

#: The statuses an instance can be listed and counted in.
LISTED_STATUSES = tuple(s for s in STATUSES if s != "unknown")
_ENDS = ("WORKFLOW_SUCCESS", "WORKFLOW_FAILURE", "WORKFLOW_TERMINATED")
#: Step records that a description does not count as steps.
_NOT_STEPS = (ROLLBACK_KIND, PATCH_KIND)
_MAX_DEPTH = 64


@dataclass(frozen=True)
class InstanceDescription:
    """Everything about one instance at a glance (Temporal's ``handle.describe()``).

    Attributes:
        workflow: The workflow's name.
        id: The instance id.
        status: As :meth:`Instance.status <actorflow.Instance.status>` gives it.
        created: When it was created (queued).
        started: When its first run started; None while it never ran.
        ended: When it completed, errored or was terminated; None before.
        output: The run's return value, once complete.
        error: ``{name, message}`` of the error, once errored.
        params: The params it was created with.
        waiting_for: The event types it waits for, while ``waiting`` for events.
        steps: How many steps it has (every ``step.do``, sleep and wait).
        steps_complete: How many of them have a result.
        steps_failed: How many of them failed for good.
        epoch: Its fencing epoch: 1 at creation, one more each time the engine
            fences off earlier runs (a restart, a termination, a recovery after
            a crash, a takeover by another node).
        owner: Multi-node: the id of the node that runs it (None on one node).
        rollback: Its saga rollback, as ``InstanceStatus.rollback`` (None: none ran).
        forked_from: For a fork (``inst.fork``), its origin: ``{"workflow",
            "instance", "at_step": {"name", "count"}}``; None for any other.
        key: Its flow-control key (``create(key=)``); None: none.
        priority: Its priority (``create(priority=)``; 0 by default).
    """

    workflow: str
    id: str
    status: str
    created: datetime
    started: datetime | None
    ended: datetime | None
    output: Any
    error: dict[str, str] | None
    params: Any
    waiting_for: tuple[str, ...]
    steps: int
    steps_complete: int
    steps_failed: int
    epoch: int
    owner: str | None
    rollback: dict[str, Any] | None = None
    forked_from: dict[str, Any] | None = None
    key: str | None = None
    priority: int = 0


@dataclass(frozen=True)
class InstanceSummary:
    """One row of an instance listing."""

    workflow: str
    id: str
    status: str
    created: datetime
    started: datetime | None
    error: dict[str, str] | None


@dataclass(frozen=True)
class Page:
    """A page of a listing, and the token of the next one (None on the last)."""

    rows: list[InstanceSummary]
    next: str | None


def _created_ms(rest: bytes) -> int:
    """The creation time (epoch ms) in the tail of a status-index key."""
    return 2**63 - int.from_bytes(rest[:8], "big")


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else to_datetime(ms / 1000.0)


class Query:
    """The read-only queries over one storage (see the module's docstring).

    Args:
        storage: The storage of a runtime, or of a data directory opened to read.
        live: The supervisor's live actors by instance key, to show in-memory
            states; None reads only what is durable.
    """

    def __init__(self, storage: Storage, live: Mapping[bytes, InstanceActor] | None = None) -> None:
        self.storage = storage
        self._live = live

    @classmethod
    @contextmanager
    def open(cls, path: str | os.PathLike[str]) -> Iterator[Query]:
        """Opens data directory ``path`` to read it, without a runtime; closes it after.

        LMDB readers never block a writer, so this is safe while a runtime in
        another process has the directory open (one process opens a directory
        once: in the runtime's own process, use its handles).

        Raises:
            FileNotFoundError: ``path`` holds no actorflow data directory.
        """
        if not is_database_url(path) and not os.path.exists(os.path.join(path, "data.mdb")):
            raise FileNotFoundError(f"no actorflow data directory at {os.fspath(path)}")
        storage = open_storage(path)
        try:
            yield cls(storage)
        finally:
            storage.close()

    # -- one instance -------------------------------------------------------------

    def _not_found(self, workflow: str, iid: str) -> InstanceNotFound:
        return instance_not_found(workflow, iid)

    def record_key(self, workflow: str, iid: str) -> bytes:
        """The key of the instance's records.

        Raises:
            InstanceNotFound: There is no such instance.
        """
        n = self.storage.get(IDS, ikey(workflow, iid))
        if n is None:
            raise self._not_found(workflow, iid)
        return rkey(workflow, n)

    def _stored(self, workflow: str, iid: str, rk: bytes) -> dict[str, Any]:
        raw = self.storage.get(INST, rk)
        if raw is None:
            raise self._not_found(workflow, iid)
        return load(raw)

    def _current(self, workflow: str, iid: str, rk: bytes) -> tuple[str, dict[str, Any]]:
        """The status users see and the record it goes with: the live actor's, else stored."""
        live = self._live
        actor = live.get(ikey(workflow, iid)) if live is not None else None
        view = actor.live_view() if actor is not None else None
        if view is not None:
            status, rec = view
        else:
            rec = self._stored(workflow, iid, rk)
            status = rec["s"]
        return (status if status in STATUSES else "unknown"), rec

    def status(self, workflow: str, iid: str, rk: bytes | None = None) -> InstanceStatus:
        """The status, the output (when complete) and the error (when errored).

        Args:
            rk: The instance's record key if the caller has it (saves a read).

        Raises:
            InstanceNotFound: There is no such instance.
        """
        # The hot path of wait(): _current() inlined.
        live = self._live
        actor = live.get(ikey(workflow, iid)) if live is not None else None
        view = actor.live_view() if actor is not None else None
        if view is not None:
            status, rec = view
        else:
            raw = self.storage.get(INST, rk or self.record_key(workflow, iid))
            if raw is None:
                raise self._not_found(workflow, iid)
            rec = load(raw)
            status = rec["s"]
        if status not in STATUSES:
            status = "unknown"
        output = None
        if status == "complete" and rec.get("output") is not None:
            output = self.storage.serializer.loads(rec["output"])
        error = rec.get("error") if status == "errored" else None
        rb = rec.get("rb")
        return InstanceStatus(status, output, error, None if rb is None else rollback_status(rb))

    def status_document(self, workflow: str, iid: str, rk: bytes | None = None) -> dict[str, Any]:
        """The instance's status document (:data:`STATUS_FIELDS`), from its record alone.

        What ``actorflow status --json`` prints and the HTTP API's instance
        view starts with. It reads neither steps nor history, so a damaged
        step record does not hide the status.

        Raises:
            InstanceNotFound: There is no such instance.
        """
        status, rec = self._current(workflow, iid, rk or self.record_key(workflow, iid))
        loads = self.storage.serializer.loads
        output = rec.get("output") if status == "complete" else None
        return {
            "id": iid,
            "workflow": workflow,
            "status": status,
            "params": jsonable(loads(rec["params"]) if rec.get("params") else None),
            "output": jsonable(None if output is None else loads(output)),
            "error": jsonable(rec.get("error") if status == "errored" else None),
            "rollback": jsonable(rollback_status(rec.get("rb"))),
            "queued": iso(to_datetime(rec["created"] / 1000.0)),
            "start": iso(_dt(rec.get("started"))),
            "success": (status == "complete") if status in FINISHED else None,
        }

    def summary(self, workflow: str, iid: str, rk: bytes | None = None) -> InstanceSummary:
        """The row of the instance in a listing: status, times and error.

        Raises:
            InstanceNotFound: There is no such instance.
        """
        status, rec = self._current(workflow, iid, rk or self.record_key(workflow, iid))
        return InstanceSummary(
            workflow,
            iid,
            status,
            to_datetime(rec["created"] / 1000.0),
            _dt(rec.get("started")),
            rec.get("error") if status == "errored" else None,
        )

    def describe(
        self,
        workflow: str,
        iid: str,
        rk: bytes | None = None,
        *,
        steps: list[StepRecord] | None = None,
    ) -> InstanceDescription:
        """Everything about the instance: see :class:`InstanceDescription`.

        Args:
            rk: The instance's record key if the caller has it (saves a read).
            steps: Its step records if the caller has just read them (a view
                that shows them too, and counts the same ones).

        Raises:
            InstanceNotFound: There is no such instance.
        """
        rk = rk or self.record_key(workflow, iid)
        status, rec = self._current(workflow, iid, rk)
        loads = self.storage.serializer.loads
        if steps is None:
            steps = read_steps(self.storage, rk)
        ended = None
        if status in FINISHED:
            ends = [
                e.timestamp
                for e in read_history(self.storage, rk, self._stored(workflow, iid, rk), steps)
                if e.type in _ENDS
            ]
            ended = ends[-1] if ends else None
        owner = self.storage.get(OWNER, ikey(workflow, iid))
        return InstanceDescription(
            workflow=workflow,
            id=iid,
            status=status,
            created=to_datetime(rec["created"] / 1000.0),
            started=_dt(rec.get("started")),
            ended=ended,
            output=(
                loads(rec["output"])
                if status == "complete" and rec.get("output") is not None
                else None
            ),
            error=rec.get("error") if status == "errored" else None,
            params=loads(rec["params"]) if rec.get("params") else None,
            waiting_for=tuple(rec.get("waits") or ()) if status == "waiting" else (),
            steps=sum(1 for s in steps if s.kind not in _NOT_STEPS),
            steps_complete=sum(
                1 for s in steps if s.status == "complete" and s.kind not in _NOT_STEPS
            ),
            steps_failed=sum(
                1 for s in steps if s.status == "errored" and s.kind not in _NOT_STEPS
            ),
            epoch=int(rec.get("epoch", 1)),
            owner=owner.decode() if owner is not None else None,
            rollback=rollback_status(rec.get("rb")),
            forked_from=fork_origin(rec),
            key=rec.get("ky"),
            priority=int(rec.get("pr", 0)),
        )

    def history(self, workflow: str, iid: str, rk: bytes | None = None) -> list[HistoryEvent]:
        """The instance's event log, oldest first.

        Raises:
            InstanceNotFound: There is no such instance.
        """
        rk = rk or self.record_key(workflow, iid)
        return read_history(self.storage, rk, self._stored(workflow, iid, rk))

    def steps(self, workflow: str, iid: str, rk: bytes | None = None) -> list[StepRecord]:
        """The instance's step records, in start order.

        Raises:
            InstanceNotFound: There is no such instance.
        """
        rk = rk or self.record_key(workflow, iid)
        self._stored(workflow, iid, rk)
        return read_steps(self.storage, rk)

    def export(
        self, workflow: str, iid: str, rk: bytes | None = None, *, include_sensitive: bool = False
    ) -> dict[str, Any]:
        """The instance as a JSON document for ``replay_check`` (see ``Instance.export``).

        Raises:
            InstanceNotFound: There is no such instance.
        """
        rk = rk or self.record_key(workflow, iid)
        status, _rec = self._current(workflow, iid, rk)
        stored = self._stored(workflow, iid, rk)
        steps, events = self.storage.scan_prefixes(
            [(STEPS, steps_prefix(rk)), (EVENTS, events_prefix(rk))]
        )
        return export_document(
            workflow,
            iid,
            status,
            stored,
            [load(v) for _k, v in steps],
            [load(v) for _k, v in events],
            history_document(read_history(self.storage, rk, stored)),
            self.storage.serializer.loads,
            include_sensitive=include_sensitive,
        )

    # -- listings -----------------------------------------------------------------

    def _index(self, workflow: str | None, status: str | None) -> list[tuple[bytes, str, str]]:
        """``(order, workflow, status)`` of the indexed instances, newest first.

        ``order`` is the tail of the index key (inverted creation time, id):
        with the workflow's name it orders instances across workflows.
        """
        prefix = idx_prefix(workflow, status) if workflow is not None else b""
        rows = []
        for key, _ in self.storage.scan(IDX, prefix=prefix, keys_only=True):
            wf, st, rest = idx_parts(key)
            if status is not None and st != status:
                continue
            rows.append((rest, wf, st))
        if status is not None and workflow is not None:
            rows = self._overlay_live(workflow, status, rows)
        rows.sort(key=lambda r: (r[0], r[1]))
        return rows

    def _overlay_live(
        self, workflow: str, status: str, rows: list[tuple[bytes, str, str]]
    ) -> list[tuple[bytes, str, str]]:
        """Corrects the index rows of one status with the live status of active instances.

        The index holds the last written status; a live instance may be ahead of
        it (started and not yet checkpointed, pausing, woken and waiting for a slot).
        """
        if not self._live:
            return rows
        live: dict[str, InstanceActor | None] = {
            a.iid: a
            for a in list(self._live.values())
            if a.wfe.name == workflow and not a.actor_stopped.is_set()
        }
        if not live:
            return rows
        out = []
        for row in rows:
            found = live.pop(idx_iid(row[0]), None)
            if found is None or found.public_status() == status:
                out.append(row)
        for iid, actor in live.items():
            if actor is not None and actor.public_status() == status:
                out.append((idx_order(actor.record["created"], iid), workflow, status))
        return out

    def ids(
        self,
        workflow: str,
        status: str | None = None,
        *,
        limit: int | None = 100,
        cursor: str | None = None,
        created_after: datetime | int | None = None,
    ) -> list[str]:
        """The ids of a workflow's instances, newest first (``WorkflowBinding.list``).

        Args:
            status: Only instances in this status (live statuses included).
            limit: The most ids to return (None: all).
            cursor: The id of the last instance of the previous page; the
                page starts after it, also if its status changed meanwhile.
                An id that names no instance is ignored.
            created_after: Only instances created strictly after this
                (an aware datetime, or epoch milliseconds).

        Raises:
            ValueError: ``status`` is not a status name.
        """
        if status is not None and status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; use one of {STATUSES}")
        rows = self._index(workflow, status)
        if created_after is not None:
            after = (
                created_after
                if isinstance(created_after, int)
                else round(created_after.timestamp() * 1000)
            )
            rows = [r for r in rows if _created_ms(r[0]) > after]
        if cursor is not None:
            n = self.storage.get(IDS, ikey(workflow, cursor))
            raw = self.storage.get(INST, rkey(workflow, n)) if n is not None else None
            if raw is not None:  # the page starts after the cursor's place in the order
                mark = idx_order(load(raw)["created"], cursor)
                rows = [r for r in rows if r[0] > mark]
        ids = [idx_iid(r[0]) for r in rows]
        return ids if limit is None else ids[:limit]

    def page(
        self,
        workflow: str | None = None,
        status: str | None = None,
        *,
        limit: int = 50,
        token: str | None = None,
    ) -> Page:
        """A page of instances of one workflow or of all, newest first.

        Args:
            workflow: Only this workflow's instances (None: every workflow's).
            status: Only instances in this status.
            limit: The most rows.
            token: The ``next`` of the previous page.

        Raises:
            ValueError: ``token`` is not one a page gave.
        """
        rows = self._index(workflow, status)
        if token:
            tail, _, name = base64.urlsafe_b64decode(token.encode()).rpartition(b"\x00")
            if not tail:
                raise ValueError(f"not a page token: {token!r}")
            mark = (tail, name.decode())
            rows = [r for r in rows if (r[0], r[1]) > mark]
        chosen = rows[:limit]
        out = []
        for rest, wf, st in chosen:
            iid = idx_iid(rest)
            rec = self._stored(wf, iid, self.record_key(wf, iid))
            out.append(
                InstanceSummary(
                    wf,
                    iid,
                    st,
                    to_datetime(rec["created"] / 1000.0),
                    _dt(rec.get("started")),
                    rec.get("error"),
                )
            )
        nxt = None
        if len(rows) > limit and chosen:
            rest, wf, _ = chosen[-1]
            nxt = base64.urlsafe_b64encode(rest + b"\x00" + wf.encode()).decode()
        return Page(out, nxt)

    # -- counts ---------------------------------------------------------------------

    def workflows(self) -> list[str]:
        """The names of the workflows with instances, sorted (one read per workflow)."""
        names: list[str] = []
        after: bytes | None = None
        while True:
            found = self.storage.first(IDX, after=after)
            if found is None:
                return names
            wf = split_idx_key(found[0])[0]
            names.append(wf)
            after = idx_workflow_after(wf)

    def counts(self, workflow: str) -> dict[str, int]:
        """How many of a workflow's instances are in each status (zeros included).

        Counted in the status index, one prefix per status: O(statuses)
        reads, no record is loaded. With live actors, an instance whose live
        status is ahead of its last write counts in its live status.
        """
        live = (
            []
            if not self._live
            else [
                a
                for a in list(self._live.values())
                if a.wfe.name == workflow and not a.actor_stopped.is_set()
            ]
        )
        # Where each live instance is indexed, read in the same snapshot as the
        # counts: an instance that moves meanwhile is counted once.
        probes = {
            idx_key(workflow, s, a.record["created"], a.iid): (a, s)
            for a in live
            for s in LISTED_STATUSES
        }
        counts, present = self.storage.count_prefixes(
            IDX, [idx_prefix(workflow, s) for s in LISTED_STATUSES], probes
        )
        out = dict(zip(LISTED_STATUSES, counts, strict=True))
        for key in present:
            actor, indexed = probes[key]
            shown = actor.public_status()
            if shown != indexed and shown in out and out[indexed] > 0:
                out[indexed] -= 1
                out[shown] += 1
        return out

    def queue_depth(self, workflow: str) -> int:
        """How many of a workflow's instances wait in its queue for a slot."""
        return self.storage.count(queue_db(workflow))

    def queued_by_key(self, workflow: str, top: int = 10) -> tuple[dict[str, int], int]:
        """The flow-control keys with most queued instances (at most ``top``), and how
        many keys have some; O(keyed instances queued)."""
        return queued_by_key(self.storage, workflow, top)

    def timer_backlog(self) -> int:
        """How many timers are pending (sleeps, event timeouts, retries, alarms)."""
        return count_armed(self.storage)

    # -- schedules ------------------------------------------------------------------

    def schedules(self, workflow: str | None = None) -> list[ScheduleSummary]:
        """The stored cron schedules (of ``workflow``, if given), with their next tick."""
        return list_schedules(self.storage, workflow)


# -- JSON ---------------------------------------------------------------------------------


def iso(when: datetime | None) -> str | None:
    """Returns an ISO 8601 string with milliseconds, or None."""
    return None if when is None else when.isoformat(timespec="milliseconds")


def jsonable(value: Any, _depth: int = 0) -> Any:
    """Returns ``value`` as plain JSON data: datetimes as ISO strings, others as repr.

    Stored values (params, outputs, step results, payloads) are arbitrary
    Python values: a read shows them as JSON where it can, and as their
    ``repr`` where it cannot, so that it never fails on an odd value.
    """
    if _depth > _MAX_DEPTH:
        return repr(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v, _depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: jsonable(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value)
        }
    return repr(value)


def document(description: InstanceDescription) -> dict[str, Any]:
    """The JSON document of a description: what ``actorflow describe`` prints and the
    HTTP API returns under ``description``."""
    out: dict[str, Any] = jsonable(description)
    return out


# The documents below are the one JSON shape of each answer: the HTTP API returns
# them, and the ``actorflow`` command prints them with ``--json``, on a directory and
# through ``--url`` alike.

_KINDS = {"do": "step", "sleep": "sleep", "wait_for_event": "waitForEvent"}


def summary_document(s: InstanceSummary) -> dict[str, Any]:
    """One row of an instance listing."""
    return {
        "id": s.id,
        "workflow": s.workflow,
        "status": s.status,
        "created_on": iso(s.created),
        "started_on": iso(s.started),
        "error": jsonable(s.error),
    }


def _attempt_document(a: Attempt) -> dict[str, Any]:
    return {
        "attempt": a.attempt,
        "start": iso(a.start),
        "end": iso(a.end),
        "success": None if a.end is None else a.error is None,
        "error": jsonable(a.error),
        "retry_delay_ms": a.retry_delay_ms,
        "ran_on": a.ran_on,
    }


def step_document(s: StepRecord) -> dict[str, Any]:
    """One step, in the shape of Cloudflare's instance details, with its attempts."""
    finished = s.status in ("complete", "errored")
    return {
        "type": _KINDS.get(s.kind, s.kind),
        "name": s.name,
        "count": s.count,
        "status": s.status,
        "start": iso(s.start),
        "end": iso(s.end),
        "deadline": iso(s.deadline),
        "finished": finished,
        "success": (s.status == "complete") if finished else None,
        "config": jsonable(s.config),
        "attempts": [_attempt_document(a) for a in s.attempts],
        "output": jsonable(s.output),
        "error": jsonable(s.error),
        "divergence": s.divergence,
    }


def event_document(e: HistoryEvent) -> dict[str, Any]:
    """One event of the log (with its ``cursor`` when it comes from a subscription)."""
    out = {
        "type": e.type,
        "timestamp": iso(e.timestamp),
        "step": e.step,
        "attempt": e.attempt,
        "data": jsonable(e.data),
    }
    if e.cursor is not None:
        out["cursor"] = e.cursor
    return out


def history_document(events: list[HistoryEvent]) -> list[dict[str, Any]]:
    """The event log, oldest first."""
    return [event_document(e) for e in events]


def schedule_document(s: ScheduleSummary) -> dict[str, Any]:
    """A cron schedule with its next and last ticks."""
    return {
        "workflow": s.workflow,
        "cron": s.cron,
        "next": iso(s.next),
        "last": iso(s.last),
        "last_instance": s.last_instance,
    }
