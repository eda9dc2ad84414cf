"""A NodeProcess app with a cron-scheduled workflow, on a clock the test sets.

``SCHED_NOW`` (ISO 8601): a fake clock frozen at that time. ``SCHED_T0``,
``SCHED_R0`` and ``SCHED_SPEED``: a clock at fake time ``T0`` at real time
``R0`` (epoch seconds) that runs ``SPEED`` times faster than real time, so
that several node processes share one fast clock. ``SCHED_CRONS``: the
schedules, separated by ``;`` (default hourly).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import actorflow as af
from actorflow.testing import FakeClock


class Tick(af.Workflow):
    """Returns what its event says about the schedule that made it."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        cf = event["schedule"]
        return {"cron": cf["cron"], "scheduled": cf["scheduledTime"], "pid": os.getpid()}


class FastClock:
    """Real time, moved to ``t0`` at real time ``r0`` and sped up ``speed`` times."""

    def __init__(self, t0: float, r0: float, speed: float) -> None:
        self.t0, self.r0, self.speed = t0, r0, speed

    def now(self) -> float:
        return self.t0 + (time.time() - self.r0) * self.speed

    def real_timeout(self, deadline: float) -> float | None:
        return max(0.0, (deadline - self.now()) / self.speed)

    def subscribe(self, callback: Callable[[], None]) -> None:
        pass

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        pass


def factory(data_dir: str) -> af.Runtime:
    """Builds the node's runtime on the clock its environment describes."""
    clock: Any
    if os.environ.get("SCHED_NOW"):
        clock = FakeClock(datetime.fromisoformat(os.environ["SCHED_NOW"]))
    else:
        clock = FastClock(
            float(os.environ["SCHED_T0"]),
            float(os.environ["SCHED_R0"]),
            float(os.environ["SCHED_SPEED"]),
        )
    rt = af.Runtime(data_dir, clock=clock)
    crons = os.environ.get("SCHED_CRONS", "0 * * * *").split(";")
    rt.register(Tick, name="tick", schedules=crons)
    return rt
