"""The FakeClock: time moves only on advance, and everything due fires first."""

from __future__ import annotations

from pathlib import Path

import actorflow as af
from actorflow.testing import FakeClock


class Nap(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> str:
        step.sleep("first", "1 hour")
        step.sleep("second", "1 hour")  # scheduled by the first's wake-up, inside one advance
        return "rested"


def test_advance_fires_chained_timers_within_the_window(tmp_path: Path) -> None:
    clock = FakeClock()
    with af.Runtime(tmp_path / "d", clock=clock) as rt:
        inst = rt.register(Nap).create(id="n")
        assert rt.wait_until_idle()
        clock.advance("59 minutes")
        assert inst.status().status == "waiting"
        clock.advance("2 hours")
        assert inst.status().output == "rested"


def test_clock_outlives_a_closed_runtime(tmp_path: Path) -> None:
    clock = FakeClock()
    with af.Runtime(tmp_path / "d", clock=clock) as rt:
        rt.register(Nap).create(id="n")
        assert rt.wait_until_idle()
        clock.advance("30 minutes")
    with af.Runtime(tmp_path / "d", clock=clock) as rt:
        inst = rt.register(Nap).get("n")
        clock.advance("30 minutes")  # the first hour is over: the deadline was durable
        assert [s.status for s in inst.steps()][:1] == ["complete"]
        clock.advance("1 hour")
        assert inst.status().output == "rested"


def test_autojump_moves_time_when_everything_is_idle(tmp_path: Path) -> None:
    clock = FakeClock(autojump=True)
    try:
        with af.Runtime(tmp_path / "d", clock=clock) as rt:
            start = clock.now()
            inst = rt.register(Nap).create(id="n")
            assert inst.wait(timeout=20).output == "rested"
            assert clock.now() - start >= 2 * 3600
    finally:
        clock.close()


class Reminder(af.DurableObject):
    def arm(self, when_ms: int) -> None:
        self.ctx.storage.set_alarm(when_ms)

    def alarm(self, info: af.AlarmInfo) -> None:
        self.ctx.storage.put("fired", info.retry_count)

    def fired(self) -> int | None:
        value: int | None = self.ctx.storage.get("fired")
        return value


def test_due_alarm_of_an_unregistered_namespace_does_not_stall_advance(tmp_path: Path) -> None:
    import time

    clock = FakeClock()
    with af.Runtime(tmp_path / "d", clock=clock) as rt:
        rt.durable_objects(Reminder, name="r").get_by_name("x").arm(int(clock.now() * 1000) + 1000)
    with af.Runtime(tmp_path / "d", clock=clock) as rt:
        t0 = time.monotonic()
        clock.advance("1 hour")  # the alarm is due but its namespace is not registered yet
        assert time.monotonic() - t0 < 5
        stub = rt.durable_objects(Reminder, name="r").get_by_name("x")
        clock.advance("1 second")
        assert stub.fired() == 0
