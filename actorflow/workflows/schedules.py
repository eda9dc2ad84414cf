"""Cron schedules: ``rt.register(cls, schedules=["*/5 * * * *", ...])``.

Each schedule of a workflow has one durable record (see
:data:`~actorflow.workflows.records.SCHED`): the last tick it handled, the
next one, and the timer armed for that next tick in the runtime's timer index.
When the timer is due, whichever runtime fires it writes one batch that
creates the tick's instance, moves the record on to the following tick, and
swaps the timer. The instance id is made from the schedule and the tick
(:meth:`CronSchedule.tick_id`), and the batch is guarded both on that id not
existing and on the record being the one read: a second runtime (another
node on the same data directory or database, or the same node again after a
crash) that fires the same tick is refused as a duplicate and creates
nothing. So every due tick makes exactly one instance.

Ticks missed while no runtime ran leave their timer due in the index: the
next runtime that registers the workflow fires it once, for the latest tick
that is due (one catch-up instance per schedule), and goes on from the next.
Time is the runtime's clock, so a :class:`~actorflow.testing.FakeClock`
moves schedules tick by tick like every other timer.

Expressions are standard 5-field cron (minute, hour, day of month, month,
day of week), in UTC, parsed by ``cronsim`` (Debian cron's semantics, plus
``L``, ``W`` and ``#``, as Cloudflare's cron triggers accept).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from cronsim import CronSim, CronSimError

from actorflow.core.clock import to_datetime
from actorflow.core.errors import InvalidSchedule, RateLimitError
from actorflow.core.storage import ConflictError, Storage, WriteBatch
from actorflow.core.timers import TimerService
from actorflow.workflows.engine.creation import RecordNumbers, new_instance_batch
from actorflow.workflows.records import (
    PRIO_NEW,
    ScheduleRecord,
    drop_schedule,
    put_schedule,
    queue_key,
    read_schedule,
    read_schedules,
    schedule_timer_key,
    split_schedule_key,
)

if TYPE_CHECKING:
    from actorflow.workflows.handles import WorkflowBinding

__all__ = [
    "MAX_CRON_LENGTH",
    "CronSchedule",
    "ScheduleSummary",
    "Scheduler",
    "list_schedules",
    "parse_schedules",
]

log = logging.getLogger("actorflow.schedules")

#: The longest cron expression accepted (Cloudflare's limit).
MAX_CRON_LENGTH = 256
_FIELDS = 5
_ID_PREFIX = "cron-"


@dataclass(frozen=True)
class CronSchedule:
    """One cron schedule of a workflow.

    Attributes:
        workflow: The workflow's name.
        cron: The expression, its fields separated by single spaces.
        digest: Names the schedule in its record key and its instances' ids.
    """

    workflow: str
    cron: str
    digest: str

    def _iter(self, after_ms: int, reverse: bool = False) -> Any:
        return CronSim(self.cron, to_datetime(after_ms / 1000), reverse=reverse)

    def next_after(self, ms: int) -> int | None:
        """The first tick strictly after ``ms`` (epoch ms); None if it never fires again."""
        try:
            when: datetime = next(self._iter(ms))
        except StopIteration:  # no tick within cronsim's horizon (50 years)
            return None
        return round(when.timestamp() * 1000)

    def latest_at_or_before(self, ms: int) -> int | None:
        """The last tick at or before ``ms`` (epoch ms); None if there is none in 50 years."""
        try:
            when: datetime = next(self._iter(ms + 1, reverse=True))
        except StopIteration:
            return None
        return round(when.timestamp() * 1000)

    def tick_id(self, tick_ms: int) -> str:
        """The id of the instance this schedule creates for the tick at ``tick_ms``.

        Made from the schedule and the tick alone, so that every runtime that
        fires the tick names the same instance and only the first creates it.
        """
        return f"{_ID_PREFIX}{self.digest}-{tick_ms}"


def _digest(cron: str) -> str:
    return hashlib.sha1(cron.encode()).hexdigest()[:12]


def _refuse(workflow: str, given: object, why: str) -> InvalidSchedule:
    return InvalidSchedule(
        f"workflow {workflow!r}: invalid schedule {given!r}: {why}",
        workflow=workflow,
        schedule=given,
    )


def parse_schedules(workflow: str, schedules: Iterable[Any] | None) -> tuple[CronSchedule, ...]:
    """Checks the ``schedules`` given to ``register``; returns them parsed.

    Each is a cron expression (a str), or Cloudflare's ``{"cron": expr}``
    form (wrangler's ``schedules`` entries).

    Raises:
        InvalidSchedule: One is not a valid 5-field cron expression, never
            fires, is longer than :data:`MAX_CRON_LENGTH`, or is listed twice;
            or ``schedules`` is a single str rather than a list of them.
    """
    if schedules is None:
        return ()
    if isinstance(schedules, str | bytes):
        raise _refuse(workflow, schedules, "schedules is a list of cron expressions, not one str")
    out: list[CronSchedule] = []
    for given in schedules:
        expr = given.get("cron") if isinstance(given, Mapping) else given
        if isinstance(given, Mapping) and set(given) != {"cron"}:
            raise _refuse(workflow, given, 'a schedule is a cron str or {"cron": str}')
        if not isinstance(expr, str):
            raise _refuse(workflow, given, "a cron expression is a str")
        if len(expr) > MAX_CRON_LENGTH:
            raise _refuse(workflow, expr, f"longer than {MAX_CRON_LENGTH} characters")
        fields = expr.split()
        if len(fields) != _FIELDS:
            raise _refuse(
                workflow,
                expr,
                f"a cron expression has 5 fields (minute hour day-of-month month "
                f"day-of-week), this one has {len(fields)}",
            )
        cron = " ".join(fields)
        try:
            it = CronSim(cron, datetime(2000, 1, 1, tzinfo=UTC))
        except CronSimError as e:
            raise _refuse(workflow, expr, str(e)) from None
        try:
            next(it)
        except StopIteration:
            raise _refuse(workflow, expr, "it never fires") from None
        sched = CronSchedule(workflow, cron, _digest(cron))
        if any(s.digest == sched.digest for s in out):
            raise _refuse(workflow, expr, "it is listed twice")
        out.append(sched)
    return tuple(out)


@dataclass(frozen=True)
class ScheduleSummary:
    """A schedule as stored (what ``actorflow schedules`` and the HTTP API show).

    Attributes:
        workflow: The workflow's name.
        cron: The cron expression (UTC).
        next: The next tick; a tick in the past is one no runtime has fired yet
            (its catch-up instance is made when one registers the workflow).
        last: The last tick handled (None: none yet).
        last_instance: The id of the instance made for ``last``.
    """

    workflow: str
    cron: str
    next: datetime
    last: datetime | None
    last_instance: str | None


def list_schedules(storage: Storage, workflow: str | None = None) -> list[ScheduleSummary]:
    """The stored schedules (of ``workflow``, if given), by workflow then expression."""
    out = [
        ScheduleSummary(
            wf,
            rec["c"],
            to_datetime(rec["next"] / 1000),
            _dt(rec.get("last")),
            rec.get("iid"),
        )
        for wf, _digest, rec in read_schedules(storage, workflow)
    ]
    return sorted(out, key=lambda s: (s.workflow, s.cron))


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else to_datetime(ms / 1000)


class Scheduler:
    """The schedules of one runtime: registers them and fires their ticks.

    Its :meth:`on_timer` is the timer service's handler of kind
    :data:`~actorflow.workflows.records.SCHEDULE_KIND`.
    """

    def __init__(self, storage: Storage, timers: TimerService) -> None:
        self._storage = storage
        self._timers = timers
        self._lock = threading.Lock()
        self._entries: dict[tuple[str, str], tuple[CronSchedule, WorkflowBinding]] = {}
        self._numbers = RecordNumbers(storage)
        self._warned: set[bytes] = set()  # timer keys refused for a full queue, logged once

    def of(self, workflow: str) -> tuple[CronSchedule, ...]:
        """The schedules registered here for ``workflow``."""
        with self._lock:
            return tuple(s for (wf, _), (s, _b) in self._entries.items() if wf == workflow)

    def add(self, binding: WorkflowBinding, schedules: tuple[CronSchedule, ...]) -> None:
        """Registers a workflow's schedules; stores and arms those not stored yet.

        A schedule already stored keeps its record and its armed timer (due
        at once if ticks were missed meanwhile: that is the catch-up). The
        stored schedules of the workflow that are no longer listed are
        removed with their timers.
        """
        wf = binding.name
        now = binding.parts.ctx.now_ms()
        for sched in schedules:
            self._store(sched, now)
        keep = {s.digest for s in schedules}
        for name, digest, _rec in read_schedules(self._storage, wf):
            if name == wf and digest not in keep:
                self._drop(wf, digest)
        with self._lock:
            for name, digest in [k for k in self._entries if k[0] == wf]:
                del self._entries[(name, digest)]
            for sched in schedules:
                self._entries[(wf, sched.digest)] = (sched, binding)
        self._timers.kick()

    def _store(self, sched: CronSchedule, now: int) -> None:
        while True:
            _raw, rec = read_schedule(self._storage, sched.workflow, sched.digest)
            if rec is not None:
                return
            nxt = sched.next_after(now)
            if nxt is None:
                return  # checked at parse time; nothing left to fire
            new: ScheduleRecord = {
                "c": sched.cron,
                "last": None,
                "iid": None,
                "next": nxt,
                "tk": schedule_timer_key(nxt, sched.workflow, sched.digest),
            }
            batch = WriteBatch()
            put_schedule(batch, sched.workflow, sched.digest, new, None)
            TimerService.arm_key(batch, new["tk"])
            try:
                self._storage.write(batch)
                return
            except ConflictError:
                continue  # another runtime stored it first: read theirs

    def _drop(self, wf: str, digest: str) -> None:
        raw, rec = read_schedule(self._storage, wf, digest)
        if raw is None or rec is None:
            return
        batch = WriteBatch()
        drop_schedule(batch, wf, digest, raw)
        TimerService.disarm(batch, rec["tk"])
        try:
            self._storage.write(batch)
        except ConflictError:
            pass  # changed meanwhile by a runtime that still lists it

    # -- firing ---------------------------------------------------------------------

    def on_timer(self, target: bytes, key: bytes, deadline: int) -> bool:
        """Timer handler: makes the instance of a due tick; False: not now (or not ours)."""
        with self._lock:
            entry = self._entries.get(split_schedule_key(target))
        if entry is None:
            return False  # a workflow (or schedule) another runtime registers
        sched, binding = entry
        try:
            handled = self._fire(sched, binding, key, deadline)
        except Exception:
            log.exception(
                "workflow %r, schedule %r: the tick due at %s failed; it is tried again",
                sched.workflow,
                sched.cron,
                to_datetime(deadline / 1000).isoformat(),
            )
            return False
        if handled:
            self._timers.done(key, consumed=True)
            self._timers.kick()
        return handled

    def _fire(self, sched: CronSchedule, binding: WorkflowBinding, key: bytes, due: int) -> bool:
        """Creates the tick's instance and moves the schedule on, in one batch.

        Returns:
            True once the tick is handled (here or elsewhere) and ``key`` is
            gone; False to be offered the timer again on a later pass.
        """
        parts = binding.parts
        wf, storage = sched.workflow, self._storage
        raw, rec = read_schedule(storage, wf, sched.digest)
        if rec is None or rec["tk"] != key:
            # Another runtime handled this tick (its batch deleted the key), or
            # the key is a stray: drop it, in case it is still armed.
            batch = WriteBatch()
            TimerService.disarm(batch, key)
            storage.write(batch)
            return True
        node = parts.supervisor.node
        if node is not None and node.lost:
            return False  # adopted: the live nodes fire it
        ctx = parts.ctx
        now = ctx.now_ms()
        # The latest tick due: the timer's own, or a later one if ticks were
        # missed (the one catch-up instance for all of them).
        tick = max(due, sched.latest_at_or_before(now) or due)
        nxt = sched.next_after(max(tick, now))
        iid = sched.tick_id(tick)

        def advance(batch: WriteBatch, expected: bytes | None) -> None:
            TimerService.disarm(batch, key)
            if nxt is None:
                drop_schedule(batch, wf, sched.digest, expected or b"")
                return
            new: ScheduleRecord = {
                "c": sched.cron,
                "last": tick,
                "iid": iid,
                "next": nxt,
                "tk": schedule_timer_key(nxt, wf, sched.digest),
            }
            put_schedule(batch, wf, sched.digest, new, expected)
            TimerService.arm_key(batch, new["tk"])

        where = (
            f"workflow {wf!r}, schedule {sched.cron!r}, tick "
            f"{to_datetime(tick / 1000).isoformat()}: create instance {iid!r}"
        )
        wfe = parts.engine
        seq = ctx.next_seq()
        obs = ctx.observer
        batch = new_instance_batch(
            wfe,
            iid,
            self._numbers.take(),
            parts.encode(None, where),
            now,
            seq,
            obs.traceparent() if obs is not None else None,
            schedule=(sched.cron, tick),
        )
        advance(batch, raw)
        try:
            wfe.router.reserve(1, where)
        except RateLimitError as e:
            if key not in self._warned:
                self._warned.add(key)
                log.warning("%s; tried again until the queue has room", e)
            return False
        self._warned.discard(key)
        try:
            storage.write(batch)
            wfe.router.enqueued(queue_key(PRIO_NEW, seq))
            created = True
        except ConflictError:
            created = False
        finally:
            wfe.router.unreserve(1)
        if created:
            parts.supervisor.kick_for(wfe)
            return True
        # Refused: another runtime handled the tick meanwhile, or an instance
        # with the tick's id exists already, or this node was adopted.
        raw, rec = read_schedule(storage, wf, sched.digest)
        if rec is None or rec["tk"] != key:
            return True
        if node is not None and not node.confirm_live():
            return False
        if wfe.rk(iid) is None:
            return False  # neither: try again on a later pass
        batch = WriteBatch()
        advance(batch, raw)  # the tick's instance exists: move on without another
        try:
            storage.write(batch)
        except ConflictError:
            return False
        return True
