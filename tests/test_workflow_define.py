"""Defining workflows: sync and async ``run``, the event, and every kind of step."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, timedelta
from typing import Any

import pytest
from conftest import Journal

import actorflow as af
from actorflow.testing import FakeClock


class EchoSync(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return {
            "payload": event.payload,
            "timestamp": event.timestamp,
            "instance_id": event.instance_id,
            "workflow_name": event.workflow_name,
            "doubled": step.do("double", lambda: event.payload["n"] * 2),
        }


class EchoAsync(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        async def triple() -> int:
            await asyncio.sleep(0)
            return int(event.payload["n"] * 3)

        return {
            "payload": event.payload,
            "timestamp": event.timestamp,
            "instance_id": event.instance_id,
            "workflow_name": event.workflow_name,
            "tripled": await step.do("triple", triple),
            "sync_in_async": await step.do("sync body", lambda: "ok"),
        }


@pytest.mark.parametrize("cls", [EchoSync, EchoAsync])
def test_run_sync_and_async_get_the_event(rt: af.Runtime, clock: FakeClock, cls: type) -> None:
    wf = rt.register(cls, name="echo")
    created_at = clock.datetime
    clock.advance("5 seconds")  # the run starts later than the creation
    inst = wf.create(id="e1", params={"n": 7})
    s = inst.wait(timeout=10)
    assert s.status == "complete", s
    out = s.output
    assert out["payload"] == {"n": 7}
    assert out["instance_id"] == "e1"
    assert out["workflow_name"] == "echo"
    ts = out["timestamp"]
    assert ts.tzinfo is not None and ts.utcoffset() == timedelta(0)
    assert ts == created_at + timedelta(seconds=5)
    if cls is EchoSync:
        assert out["doubled"] == 14
    else:
        assert (out["tripled"], out["sync_in_async"]) == (21, "ok")


class Decorated(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        @step.do("fetch", retries={"limit": 0, "delay": 0})
        def fetch() -> dict[str, int]:
            j.add("fetch ran")
            return {"x": 1}

        j.add("decorated, not run yet")

        @step.do("use")
        def use(ctx: af.StepContext) -> tuple[str, int, int]:
            return (ctx.step.name, ctx.step.count, ctx.attempt)

        return [fetch()["x"], use()]


class DecoratedAsync(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        @step.do("fetch")
        async def fetch() -> dict[str, int]:
            await asyncio.sleep(0)
            return {"x": 2}

        @step.do("use")
        def use(ctx: af.StepContext) -> str:
            return ctx.step.name

        return [(await fetch())["x"], await use()]


def test_step_do_as_decorator_sync(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Decorated, name="deco", env=journal)
    s = wf.create(id="d").wait(timeout=10)
    assert s.output == [1, ("use", 1, 1)]
    # Decorating does not run the step; calling does.
    assert journal.entries == ["decorated, not run yet", "fetch ran"]


def test_step_do_as_decorator_async(rt: af.Runtime) -> None:
    wf = rt.register(DecoratedAsync, name="decoa")
    assert wf.create(id="d").wait(timeout=10).output == [2, "use"]


class CtxFlow(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        def body(ctx: af.StepContext) -> dict[str, Any]:
            if ctx.attempt < 3:
                raise RuntimeError(f"flaky {ctx.attempt}")
            return {
                "attempt": ctx.attempt,
                "name": ctx.step.name,
                "count": ctx.step.count,
                "config": ctx.config,
            }

        first = step.do(
            "flaky",
            body,
            retries={"limit": 4, "delay": 0, "backoff": "constant"},
            timeout="1 minute",
        )
        second = step.do("flaky", body, config={"retries": {"limit": 2, "delay": 0}})
        return [first, second]


def test_callable_taking_ctx(rt: af.Runtime) -> None:
    wf = rt.register(CtxFlow, name="ctx")
    s = wf.create(id="c").wait(timeout=10)
    assert s.status == "complete", s
    first, second = s.output
    assert first == {
        "attempt": 3,
        "name": "flaky",
        "count": 1,
        "config": {"retries": {"limit": 4, "delay": 0, "backoff": "constant"}, "timeout": 60_000},
    }
    assert second["count"] == 2 and second["attempt"] == 3
    assert second["config"] == {
        "retries": {"limit": 2, "delay": 0, "backoff": "exponential"},
        "timeout": 600_000,
    }


class Sleeper(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        kind, value = event.payload
        if kind == "sleep":
            step.sleep("nap", value)
        else:
            step.sleep_until("alarm", value)
        return step.do("after", lambda: "woke")


@pytest.mark.parametrize(
    ("kind", "value", "total_ms"),
    [
        ("sleep", 1500, 1500),  # a number is milliseconds
        ("sleep", "10 seconds", 10_000),
        ("sleep", "1 minute", 60_000),
        ("sleep", "2 hours", 7_200_000),
        ("sleep", timedelta(minutes=3), 180_000),
    ],
)
def test_sleep_durations(
    rt: af.Runtime, clock: FakeClock, kind: str, value: Any, total_ms: int
) -> None:
    inst = rt.register(Sleeper, name="sleeper").create(params=(kind, value))
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"
    clock.advance(total_ms - 1)
    assert inst.status().status == "waiting"
    clock.advance(1)
    assert inst.wait(timeout=10).output == "woke"
    (nap,) = [s for s in inst.steps() if s.kind == "sleep"]
    assert nap.deadline is not None and nap.start is not None
    assert (nap.deadline - nap.start) == timedelta(milliseconds=total_ms)


@pytest.mark.parametrize("as_ms", [False, True])
def test_sleep_until_datetime_and_epoch_ms(rt: af.Runtime, clock: FakeClock, as_ms: bool) -> None:
    when = clock.datetime + timedelta(hours=1)
    value: Any = int(when.timestamp() * 1000) if as_ms else when
    inst = rt.register(Sleeper, name="sleeper").create(params=("until", value))
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"
    clock.advance("59 minutes")
    assert inst.status().status == "waiting"
    clock.advance("1 minute")
    assert inst.wait(timeout=10).output == "woke"


def test_sleep_until_a_naive_datetime_is_rejected(rt: af.Runtime, clock: FakeClock) -> None:
    naive = clock.datetime.replace(tzinfo=None)
    inst = rt.register(Sleeper, name="sleeper").create(id="naive", params=("until", naive))
    s = inst.wait(timeout=10)
    assert s.status == "errored"
    assert s.error is not None and "aware" in s.error["message"]
    assert "'alarm'" in s.error["message"] and "'naive'" in s.error["message"]


class Waiter(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        ev = await step.wait_for_event("approval", "approved", timeout="1 hour")
        assert isinstance(ev, af.WorkflowStepEvent)
        return {"type": ev.type, "payload": ev.payload, "ts": ev.timestamp}


def test_wait_for_event_returns_a_step_event(rt: af.Runtime, clock: FakeClock) -> None:
    inst = rt.register(Waiter, name="waiter").create(id="w")
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"
    clock.advance("10 minutes")
    sent_at = clock.datetime
    inst.send_event("approved", {"user": "ann"})
    out = inst.wait(timeout=10).output
    assert out == {"type": "approved", "payload": {"user": "ann"}, "ts": sent_at}
    assert out["ts"].tzinfo is UTC or out["ts"].utcoffset() == timedelta(0)


class Mapper(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        live = [0]
        lock = threading.Lock()

        def square(x: int) -> int:
            with lock:
                live[0] += 1
                j.add(("live", live[0]))
            time.sleep(0.03)
            with lock:
                live[0] -= 1
            return x * x

        return step.map("sq", square, [3, 1, 4, 1, 5], max_concurrency=event.payload)


@pytest.mark.parametrize("limit", [2, None])
def test_map_names_order_and_max_concurrency(
    rt: af.Runtime, journal: Journal, limit: int | None
) -> None:
    inst = rt.register(Mapper, name="mapper", env=journal).create(params=limit)
    assert inst.wait(timeout=10).output == [9, 1, 16, 1, 25]
    names = sorted((s.name, s.count) for s in inst.steps())
    assert names == [(f"sq[{i}]", 1) for i in range(5)]
    peak = max(n for _, n in journal.entries)
    if limit is None:
        assert peak >= 3  # truly concurrent
    else:
        assert peak == limit


class AsyncMapper(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        async def halve(x: int) -> float:
            await asyncio.sleep(0.001 * x)
            return x / 2

        return await step.map("half", halve, [8, 2, 6])


def test_map_async_callable(rt: af.Runtime) -> None:
    inst = rt.register(AsyncMapper, name="amap").create()
    assert inst.wait(timeout=10).output == [4.0, 1.0, 3.0]


class Parallel(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return step.parallel(("a", lambda: "A"), ("b", lambda: "B"), ("c", lambda: "C"))


def test_parallel(rt: af.Runtime) -> None:
    inst = rt.register(Parallel, name="par").create()
    assert inst.wait(timeout=10).output == ["A", "B", "C"]
    assert sorted(s.name for s in inst.steps()) == ["a", "b", "c"]


class Gather(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body(name: str) -> Any:
            async def run() -> str:
                j.add(("start", name))
                await asyncio.sleep(0.05)
                j.add(("end", name))
                return name

            return run

        return await asyncio.gather(*(step.do(n, body(n)) for n in ("x", "y", "z")))


def test_gather_over_step_do_runs_concurrently(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Gather, name="gather", env=journal).create()
    assert inst.wait(timeout=10).output == ["x", "y", "z"]
    kinds = [k for k, _ in journal.entries]
    # Every body started before any finished: they overlapped.
    assert kinds == ["start"] * 3 + ["end"] * 3


class BadDuration(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        kind = event.payload
        if kind == "sleep":
            step.sleep("bad nap", "ten parsecs")
        elif kind == "negative":
            step.sleep("bad nap", -5)
        elif kind == "delay":
            step.do("bad step", lambda: 1, retries={"limit": 1, "delay": "soon"})
        elif kind == "timeout":
            step.do("bad step", lambda: 1, timeout=0)
        elif kind == "backoff":
            step.do("bad step", lambda: 1, retries={"limit": 1, "delay": 1, "backoff": "random"})
        elif kind == "unknown key":
            step.do("bad step", lambda: 1, config={"retries": {"limit": 1}, "sensitive": "x"})
        elif kind == "wait timeout":
            step.wait_for_event("bad wait", "go", timeout="forever")
        return "unreachable"


@pytest.mark.parametrize(
    ("kind", "step_name"),
    [
        ("sleep", "bad nap"),
        ("negative", "bad nap"),
        ("delay", "bad step"),
        ("timeout", "bad step"),
        ("backoff", "bad step"),
        ("unknown key", "bad step"),
        ("wait timeout", "bad wait"),
    ],
)
def test_invalid_durations_and_configs_name_the_step(
    rt: af.Runtime, kind: str, step_name: str
) -> None:
    inst = rt.register(BadDuration, name="baddur").create(id="inst-1", params=kind)
    s = inst.wait(timeout=10)
    assert s.status == "errored", s
    assert s.error is not None and s.error["name"] == "ValueError"
    msg = s.error["message"]
    assert f"'{step_name}'" in msg and "'baddur'" in msg and "'inst-1'" in msg


class CatchBadDuration(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        try:
            step.sleep("bad nap", "3 fortnights")
        except ValueError as e:
            return str(e)
        return "no error"


def test_invalid_duration_is_raised_into_run(rt: af.Runtime) -> None:
    s = rt.register(CatchBadDuration, name="catchdur").create(id="i").wait(timeout=10)
    assert s.status == "complete"
    assert "'bad nap'" in s.output and "fortnights" in s.output


class MapOneFails(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def item(x: str) -> str:
            if x == "fail":
                raise ValueError("fast failure")
            j.block("slow")  # still running when run() returns
            j.add("slow done")
            return x

        try:
            step.map("m", item, ["slow", "fail"], retries={"limit": 0, "delay": 0})
        except ValueError:
            return "caught"
        return "no error"


class GatherOneFails(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        async def slow() -> int:
            while not j.gate("slow").is_set():
                await asyncio.sleep(0.005)
            j.add("slow done")
            return 1

        async def fail() -> None:
            raise ValueError("fast")

        try:
            await asyncio.gather(
                step.do("slow", slow), step.do("fail", fail, retries={"limit": 0, "delay": 0})
            )
        except ValueError:
            return "caught"
        return "no error"


@pytest.mark.parametrize("cls", [MapOneFails, GatherOneFails])
def test_a_sibling_ending_after_run_returned_changes_nothing(
    rt: af.Runtime, journal: Journal, cls: type
) -> None:
    inst = rt.register(cls, name="straggler", env=journal).create()
    assert inst.wait(timeout=10) == af.InstanceStatus("complete", "caught", None)
    journal.gate("slow").set()
    deadline = time.monotonic() + 5
    while journal.count("slow done") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert journal.count("slow done") == 1
    assert rt.wait_until_idle()
    assert inst.status() == af.InstanceStatus("complete", "caught", None)
    assert [(s.status, s.error is not None) for s in inst.steps()] == [("errored", True)]
    assert rt.metrics().running == 0


class LongHaul(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        async def fetch() -> str:  # an async callable in a sync run
            await asyncio.sleep(0)
            return "fetched"

        def flaky(ctx: af.StepContext) -> int:
            if ctx.attempt < 3:
                raise RuntimeError("not yet")
            return ctx.attempt

        got = step.do("fetch", fetch)
        step.sleep("a year", "1 year")
        attempt = step.do("flaky", flaky, retries={"limit": 5, "delay": "1 day"})
        try:
            step.wait_for_event("never", "never", timeout="2 days")
        except af.EventTimeoutError:
            pass
        return [got, attempt]


def test_autojump_clock_runs_a_year_long_workflow(tmp_path: Any) -> None:
    clock = FakeClock(autojump=True)
    started = clock.now()
    try:
        with af.Runtime(tmp_path / "data", clock=clock) as rt:
            inst = rt.register(LongHaul, name="long").create()
            assert inst.wait(timeout=10).output == ["fetched", 3]
            # a year, retry waits of 1 and 2 days, then the 2-day event timeout
            assert clock.now() - started == pytest.approx((365 + 1 + 2 + 2) * 86_400, abs=1)
    finally:
        clock.close()


class LongName(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("n" * 256, lambda: 1)  # the longest name allowed
        return step.do("n" * 257, lambda: 1)


def test_step_name_longer_than_256_is_rejected(rt: af.Runtime) -> None:
    s = rt.register(LongName, name="longname").create(id="ln").wait(timeout=10)
    assert s.status == "errored"
    assert s.error is not None and "longer than 256" in s.error["message"]
    assert "'ln'" in s.error["message"]
