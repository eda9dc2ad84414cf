"""Tools for testing workflows: a fake clock, modifiers and failure simulation.

:class:`FakeClock` replaces the runtime's clock. Time moves only when a test
calls :meth:`FakeClock.advance` (or, with ``autojump=True``, whenever every
instance is idle), and everything that became due fires before ``advance``
returns: sleeps, retry delays, event timeouts, alarms, rate-limit windows.

Step modifiers come from ``binding.modify(instance_id)``; crash injection is
``binding.modify(id).crash_at(step, point)``; ``inst.wait_for_step(name)`` and
``inst.wait_for_status(status)`` wait for what a test wants to see.
:class:`Faults` makes storage writes fail or slow and loses or duplicates
calls to Durable Objects. :class:`NodeProcess` runs a runtime in a child
process that a test can SIGKILL. The pytest fixtures over all of these are in
:mod:`actorflow.pytest_plugin`.
"""

from __future__ import annotations

import datetime as _dt
import threading
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from actorflow.core.clock import _Subscribers, parse_duration_ms, to_datetime
from actorflow.testkit.faults import Faults
from actorflow.testkit.node import NodeProcess, NodeProcessError
from actorflow.workflows.handles import WorkflowModifier
from actorflow.workflows.replay import Histories, ReplayReport, load_histories, replay_check

if TYPE_CHECKING:
    from actorflow.runtime import Runtime
    from actorflow.workflows.definition import Workflow

__all__ = [
    "FakeClock",
    "Faults",
    "NodeProcess",
    "NodeProcessError",
    "ReplayReport",
    "WorkflowModifier",
    "assert_replays",
    "load_histories",
    "replay_check",
]


def assert_replays(
    workflow_cls: type[Workflow],
    histories: Histories,
) -> list[ReplayReport]:
    """Fails (``AssertionError``) if the code diverges from any of ``histories``.

    The pytest form of :func:`replay_check`: keep exported instances
    (``inst.export()``) as JSON fixtures and check every change of the
    workflow against them. The message lists each instance that diverges and
    where.

    Returns:
        The reports, all ok.
    """
    reports = replay_check(workflow_cls, histories)
    bad = [r for r in reports if not r.ok]
    if bad:
        raise AssertionError(
            f"{len(bad)} of {len(reports)} recorded instances diverge from "
            f"{workflow_cls.__qualname__}:\n" + "\n".join(f"  {r}" for r in bad)
        )
    return reports


class FakeClock:
    """A clock that moves only when told to.

    Args:
        start: The initial time: an aware datetime or epoch seconds (default:
            the real time when the clock is made, whole seconds).
        autojump: Jump to the next timer whenever every instance is idle.
    """

    def __init__(self, start: _dt.datetime | float | None = None, autojump: bool = False) -> None:
        if start is None:
            start = float(int(time.time()))  # noqa: TID251 - the fake clock's own origin
        elif isinstance(start, _dt.datetime):
            start = start.timestamp()
        self._now = float(start)
        self._lock = threading.Lock()
        self._subs = _Subscribers()
        self._runtimes: weakref.WeakSet[Runtime] = weakref.WeakSet()
        self._autojump = autojump
        self._stop = threading.Event()
        self._jumper: threading.Thread | None = None
        if autojump:
            self._jumper = threading.Thread(
                target=self._autojump_loop, daemon=True, name="actorflow-autojump"
            )
            self._jumper.start()

    # -- the Clock protocol --------------------------------------------------------

    def now(self) -> float:
        return self._now

    def real_timeout(self, deadline: float) -> float | None:
        return 0.0 if deadline <= self._now else None

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._subs.add(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        self._subs.remove(callback)

    # -- test controls ---------------------------------------------------------------

    def attach(self, runtime: Runtime) -> None:
        """Called by the runtime: lets ``advance`` wait for it to settle."""
        self._runtimes.add(runtime)

    @property
    def datetime(self) -> _dt.datetime:
        """The current fake time as an aware datetime."""
        return to_datetime(self._now)

    def advance(self, duration: Any, *, settle_timeout: float = 10.0) -> None:
        """Moves time forward by ``duration`` and fires everything due on the way.

        Time moves timer by timer, so that what a fired timer schedules
        within the window fires too, in order.
        """
        target = self._now + parse_duration_ms(duration, what="FakeClock.advance") / 1000.0
        self._settle(settle_timeout)
        while True:
            nxt = self._next_deadline()
            step_to = target if nxt is None or nxt > target else max(nxt, self._now)
            with self._lock:
                self._now = max(self._now, step_to)
            self._subs.notify()
            self._settle(settle_timeout)
            if step_to >= target:
                nxt = self._next_deadline()
                if nxt is None or nxt > self._now:
                    return

    def set(self, when: _dt.datetime | float) -> None:
        """Jumps to ``when`` (not backwards), firing what became due."""
        ts = when.timestamp() if isinstance(when, _dt.datetime) else float(when)
        if ts > self._now:
            self.advance((ts - self._now) * 1000.0)

    def _live(self) -> list[Runtime]:
        # A runtime that was closed drops out: the clock may outlive it (reopen tests).
        return [rt for rt in list(self._runtimes) if not rt.closed]

    def _next_deadline(self) -> float | None:
        # Timers already due were offered while settling; one still armed has no
        # taker (its workflow or namespace is not registered) and must not stall us.
        best = None
        now_ms = int(self._now * 1000)
        for rt in self._live():
            ms = rt.timers.next_deadline_ms(after_ms=now_ms)
            if ms is not None and (best is None or ms < best):
                best = ms
        nxt = None if best is None else best / 1000.0
        token = self._next_token()
        if token is not None and (nxt is None or token < nxt):
            nxt = token
        return nxt

    def _next_token(self) -> float | None:
        """When the next start is released to a queue held back by ``max_creation_rate``.

        A rate-limit window is a deadline like a timer's: stepping to each
        token in turn starts as many instances as real time would have.
        """
        best = None
        for rt in self._live():
            for name in rt.workflows:
                router = rt.workflow(name).parts.engine.router
                bucket = router.bucket
                if bucket is None or not router.throttled:
                    continue
                wait = bucket.wait_s()
                if wait > 0:
                    # At least a millisecond: float rounding must not stall the clock.
                    when = self._now + max(wait, 0.001)
                    best = when if best is None else min(best, when)
        return best

    def _settle(self, timeout: float) -> None:
        for rt in self._live():
            rt.wait_until_idle(timeout)

    def _autojump_loop(self) -> None:
        while not self._stop.wait(0.005):
            rts = self._live()
            if not rts or any(not rt.is_idle() for rt in rts):
                continue
            nxt = self._next_deadline()
            if nxt is not None and nxt > self._now:
                with self._lock:
                    self._now = nxt
                self._subs.notify()

    def close(self) -> None:
        """Stops the autojump thread."""
        self._stop.set()
