"""The workflows and Durable Objects the benchmark scenarios run."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Awaitable, Callable

import actorflow as af

__all__ = [
    "Counter",
    "EventResume",
    "Gauge",
    "HeldStep",
    "HeldStepSync",
    "Journaled",
    "KeyGauge",
    "KeyedStep",
    "OneStep",
    "Sleeper",
    "SleeperSync",
    "StampFirst",
    "TrivialSteps",
    "TrivialStepsSync",
]


class TrivialSteps(af.Workflow):
    """``payload`` trivial async steps, each checkpointed."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        async def one() -> int:
            return 1

        total = 0
        for i in range(event.payload):
            total += await step.do(f"s{i}", one)
        return total


class TrivialStepsSync(af.Workflow):
    """:class:`TrivialSteps` as a ``def run`` with plain function bodies (the README's style)."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        def one() -> int:
            return 1

        total = 0
        for i in range(event.payload):
            total += step.do(f"s{i}", one)
        return total


class OneStep(af.Workflow):
    """One trivial step: the unit of queue and scaling runs."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        async def one() -> int:
            return 1

        return int(await step.do("one", one))


class StampFirst(af.Workflow):
    """Its first step returns ``time.perf_counter()`` when its body starts."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> float:
        async def stamp() -> float:
            return time.perf_counter()

        return float(await step.do("first", stamp))


class EventResume(af.Workflow):
    """Waits for a ``go`` event, then a step returns ``time.perf_counter()``."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> float:
        await step.wait_for_event("go", "go", timeout="1 hour")

        async def stamp() -> float:
            return time.perf_counter()

        return float(await step.do("after", stamp))


class Sleeper(af.Workflow):
    """Sleeps until the epoch milliseconds in its payload, then ends."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        await step.sleep_until("nap", event.payload)
        return 1


class SleeperSync(af.Workflow):
    """:class:`Sleeper` as a ``def run``."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        step.sleep_until("nap", event.payload)
        return 1


class Gauge:
    """Counts step bodies in flight and remembers the most at once (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.done = 0

    def enter(self) -> None:
        """Marks a body as started."""
        with self._lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def leave(self) -> None:
        """Marks a body as finished."""
        with self._lock:
            self.now -= 1
            self.done += 1


class HeldStep(af.Workflow):
    """One async step that awaits ``asyncio.sleep(payload)`` seconds (I/O, no thread).

    ``env`` is a :class:`Gauge` counting the steps awaiting at once.
    """

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        return int(await step.do("hold", _holding(self.env, event.payload)))


class HeldStepSync(af.Workflow):
    """:class:`HeldStep` as a ``def run`` (the body stays async: only ``run`` changes)."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        return int(step.do("hold", _holding(self.env, event.payload)))


def _holding(gauge: Gauge, seconds: float) -> Callable[[], Awaitable[int]]:
    """The body of the held steps: awaits ``seconds``, counted by ``gauge`` meanwhile."""

    async def hold() -> int:
        gauge.enter()
        try:
            await asyncio.sleep(seconds)
        finally:
            gauge.leave()
        return 1

    return hold


class KeyGauge:
    """Counts the starts and ends of hot- and cold-key steps (``keys`` scenario)."""

    def __init__(self, cold: int) -> None:
        self.lock = threading.Lock()
        self.cold = cold
        self.cold_done = 0
        self.hot_started = 0
        self.hot_started_when_cold_done = -1
        self.t_cold_done = 0.0

    def start(self, hot: bool) -> None:
        if hot:
            with self.lock:
                self.hot_started += 1

    def end(self, hot: bool) -> None:
        if hot:
            return
        with self.lock:
            self.cold_done += 1
            if self.cold_done == self.cold:
                self.hot_started_when_cold_done = self.hot_started
                self.t_cold_done = time.perf_counter()


class KeyedStep(af.Workflow):
    """One step of a few milliseconds (``payload`` ms of ``asyncio.sleep``) on a keyed instance."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> None:
        gauge: KeyGauge = self.env
        hot = event.payload["hot"]

        async def body() -> None:
            gauge.start(hot)
            await asyncio.sleep(event.payload["ms"] / 1000)
            gauge.end(hot)

        await step.do("work", body)


class Journaled(af.Workflow):
    """Four steps; each body appends one line to the file named by ``env``."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        path: str = self.env
        iid = event.instance_id
        for name in ("s1", "s2", "s3", "s4"):

            async def body(name: str = name) -> str:
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, f"{iid},{name}\n".encode())  # one O_APPEND write: atomic
                finally:
                    os.close(fd)
                return name

            await step.do(name, body)
        return 4


class Counter(af.DurableObject):
    """A durable counter."""

    def increment(self, by: int = 1) -> int:
        """Adds ``by`` and returns the new value (one durable write)."""
        n: int = self.ctx.storage.get("n", 0) + by
        self.ctx.storage.put("n", n)
        return n

    def ping(self) -> str:
        """Writes nothing: the cost of reaching the object and back."""
        return "pong"
