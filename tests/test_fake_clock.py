"""The FakeClock: time moves only on advance, and everything due fires first."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import parse_source

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


def test_set_jumps_forward_only_and_fires_what_became_due(tmp_path: Path) -> None:
    import datetime as dt

    start = dt.datetime(2030, 1, 1, tzinfo=dt.UTC)
    clock = FakeClock(start=start)
    with af.Runtime(tmp_path / "d", clock=clock) as rt:
        inst = rt.register(Nap).create(id="n")
        assert rt.wait_until_idle()
        clock.set(start - dt.timedelta(days=1))  # never backwards
        assert clock.datetime == start
        clock.set(start + dt.timedelta(hours=3))
        assert inst.status().output == "rested"
        assert clock.now() == start.timestamp() + 3 * 3600


class Reminder(af.DurableObject):
    def arm(self, when_ms: int) -> None:
        self.ctx.storage.set_alarm(when_ms)

    def alarm(self, info: af.AlarmInfo) -> None:
        self.ctx.storage.put("fired", info.retry_count)

    def fired(self) -> int | None:
        value: int | None = self.ctx.storage.get("fired")
        return value


def test_due_alarm_of_an_unregistered_namespace_does_not_stall_advance(tmp_path: Path) -> None:

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


class Quick(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> str:
        return step.do("go", lambda: event.instance_id)


def test_advance_releases_rate_limited_starts_window_by_window(tmp_path: Path) -> None:
    clock = FakeClock()
    limits = af.Limits(max_creation_rate=2, burst=1)  # one start every 500 ms
    with af.Runtime(tmp_path / "d", clock=clock, limits=limits) as rt:
        wf = rt.register(Quick)
        insts = [wf.create(id=f"q{i}") for i in range(8)]
        assert rt.wait_until_idle()
        done = lambda: sum(i.status().status == "complete" for i in insts)  # noqa: E731
        assert done() == 1  # the burst
        clock.advance(499)
        assert done() == 1
        clock.advance(1)
        assert done() == 2
        # 2 s hold four windows: four more starts, as in real time (not just a burst's worth).
        clock.advance("2 seconds")
        assert done() == 6
        clock.advance("1 hour")  # the queue drains; the clock does not spin on an empty bucket
        assert done() == 8


class Everything(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> list[str]:
        out = []

        def flaky(ctx: af.StepContext) -> str:
            if ctx.attempt == 1:
                raise RuntimeError("first attempt fails")
            return "retried"

        out.append(step.do("flaky", flaky, retries={"limit": 1, "delay": "10 minutes"}))
        step.sleep("nap", "1 hour")
        out.append("slept")
        try:
            step.wait_for_event("approval", "approved", timeout="1 day")
        except af.EventTimeoutError:
            out.append("event timed out")
        return out


def test_one_advance_fires_retry_delays_sleeps_event_timeouts_and_alarms(tmp_path: Path) -> None:
    clock = FakeClock()
    with af.Runtime(tmp_path / "d", clock=clock) as rt:
        inst = rt.register(Everything).create(id="e")
        stub = rt.durable_objects(Reminder, name="r").get_by_name("x")
        stub.arm(int((clock.now() + 20 * 3600) * 1000))  # an alarm in 20 hours
        assert rt.wait_until_idle()
        assert inst.status().status == "waiting" and stub.fired() is None
        clock.advance("1 day")  # short of the event timeout
        assert inst.status().status == "waiting"
        assert stub.fired() == 0
        clock.advance("2 hours")  # 10 min + 1 h + 1 day < 26 h: everything is due
        assert inst.status().output == ["retried", "slept", "event timed out"]


def test_wall_time_reads_are_banned_outside_the_clock() -> None:
    """ruff's banned-api (TID251) rejects every wall-time read outside clock.py."""
    import tomllib

    banned = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["ruff"]["lint"][
        "flake8-tidy-imports"
    ]["banned-api"]
    for name in (
        "time.time",
        "time.time_ns",
        "datetime.datetime.now",
        "datetime.datetime.utcnow",
        "datetime.datetime.today",
        "datetime.date.today",
    ):
        assert name in banned, name


ROOT = Path(__file__).resolve().parent.parent
#: Modules of the engine: they time workflow semantics (sleeps, retry delays,
#: event timeouts, alarms, rate windows) through the runtime's clock only.
ENGINE = ["workflows", "objects", "core/timers.py", "runtime.py"]
#: Calls that measure or wait for real time.
REAL_TIME = {
    "time.monotonic",
    "time.perf_counter",
    "time.sleep",
    "asyncio.sleep",
    "loop.time",
    "loop.call_later",
    "loop.call_at",
}
#: Where the engine uses real time on purpose, and why. Anything else is a bug:
#: a FakeClock would not move it.
REAL_TIME_ALLOWED = {
    "workflows/engine/context.py:Watchdog.arm": "step attempt timeouts run in real time (documented)",
    "workflows/engine/context.py:Watchdog._check": "step attempt timeouts run in real time (documented)",
    "workflows/engine/context.py:EngineContext._shutdown": "close()'s grace period",
    "workflows/supervisor/slots.py:Slots.pump": "re-checks a throttled queue (advance kicks it too)",
    "workflows/supervisor/restarts.py:Restarts.crashed": "crash-loop window and restart backoff",
    "workflows/supervisor/restarts.py:Restarts._restart_in": "restart backoff",
    "workflows/engine/instance.py:InstanceActor._fail_later": "retries a write storage refused",
    "objects/namespace.py:_ObjectActor.__init__": "idle eviction frees memory in real time",
    "objects/namespace.py:_ObjectActor._handle_envelope": "idle eviction frees memory in real time",
    "objects/namespace.py:DurableObjectNamespace.evict_idle": "idle eviction frees memory in real time",
    "objects/namespace.py:DurableObjectNamespace.shutdown": "close()'s grace period",
    "workflows/handles.py:Instance.wait": "the caller's timeout",
    "workflows/handles.py:Instance.wait_for_status": "the caller's timeout",
    "workflows/handles.py:Instance.wait_for_step": "the caller's timeout",
    "workflows/handles.py:Instance.wait_async": "the caller's timeout",
    "workflows/subscribe.py:Subscription.__aiter__": "a follower's poll for events from other nodes",
    "runtime.py:Runtime.wait_until_idle": "the caller's timeout",
    "core/timers.py:TimerService._pass": "the periodic full re-read of the index (sync() forces one)",
}


def _real_time_calls(path: Path) -> list[tuple[str, int, str]]:
    """Returns (enclosing function, line, call) for each real-time call in ``path``."""
    import ast

    found: list[tuple[str, int, str]] = []

    def visit(node: ast.AST, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                visit(child, [*scope, child.name])
                continue
            if isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute):
                owner = child.func.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                call = f"{name.lstrip('_')}.{child.func.attr}"
                if call in REAL_TIME:
                    found.append((".".join(scope), child.lineno, call))
            visit(child, scope)

    visit(parse_source(path), [])
    return found


def test_engine_code_waits_on_real_time_only_where_allowed() -> None:
    """Engine code times workflow semantics through the clock; real time only on the list."""
    package = ROOT / "actorflow"
    offenders, seen = [], set()
    for entry in ENGINE:
        paths = (
            sorted((package / entry).rglob("*.py"))
            if not entry.endswith(".py")
            else [package / entry]
        )
        for path in paths:
            rel = path.relative_to(package).as_posix()
            for func, line, call in _real_time_calls(path):
                where = f"{rel}:{func}"
                if where in REAL_TIME_ALLOWED:
                    seen.add(where)
                else:
                    offenders.append(f"{rel}:{line} ({func}): {call}")
    assert not offenders, (
        "read time through the runtime's clock, or add the function to REAL_TIME_ALLOWED "
        f"with the reason: {offenders}"
    )
    assert seen, "the scan found nothing: is ENGINE out of date?"


def test_the_real_time_rule_can_fail(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "import asyncio, time\n\nclass A:\n    async def f(self):\n"
        "        await asyncio.sleep(1)\n        return time.monotonic()\n"
    )
    assert _real_time_calls(path) == [("A.f", 5, "asyncio.sleep"), ("A.f", 6, "time.monotonic")]


class Ticks(af.Workflow):
    """The 255th occurrence of a name is the one whose timer key ends like a poke's."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        for _ in range(event.payload):
            step.sleep("tick", "1 second")
        return event.payload


# 260 wake-ups, each a replay of all the ticks before it and a commit: seconds
# on a quiet machine, minutes when other suites fsync on the same disk. The
# test fails on a lack of progress, not on time (see below).
@pytest.mark.timeout(900)
def test_a_step_name_used_hundreds_of_times_wakes_every_time(tmp_path: Path) -> None:
    clock = FakeClock()
    with af.Runtime(tmp_path / "d", clock=clock) as rt:
        inst = rt.register(Ticks).create(id="t", params=260)
        # A stuck sleep never completes: fail when 20 advances in a row bring no
        # new step (progress, not a real-time budget, so that a loaded machine
        # is slow but not failed).
        done, idle_rounds = 0, 0
        while inst.status().status != "complete":
            rt.wait_until_idle(timeout=1)
            clock.advance("1 second")
            now = len(inst.steps())
            idle_rounds = idle_rounds + 1 if now == done else 0
            done = now
            assert idle_rounds < 20, f"stuck after {done} sleeps"
        assert inst.status().output == 260
        assert sum(s.name == "tick" for s in inst.steps()) == 260
