"""Cron schedules: one instance per due tick, over a fake week, across restarts and nodes."""

from __future__ import annotations

import json
import pickle
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner

import actorflow as af
from actorflow.cli import cli
from actorflow.testing import FakeClock, NodeProcess
from actorflow.workflows.query import Query
from actorflow.workflows.schedules import parse_schedules

APP = "apps.sched_app:factory"
MONDAY = datetime(2026, 1, 5, 0, 0, 30, tzinfo=UTC)  # a Monday, 30 s past midnight


class Tick(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return {
            "id": event.instance_id,
            "schedule": event.schedule,
            "cf": event["schedule"],
        }


def ms(when: datetime) -> int:
    return round(when.timestamp() * 1000)


def tick_id(cron: str, when: datetime) -> str:
    [sched] = parse_schedules("tick", [cron])
    return sched.tick_id(ms(when))


def outputs(b: af.WorkflowBinding) -> list[dict[str, Any]]:
    out = []
    for inst in b.list(limit=None):
        st = inst.wait(timeout=30)
        assert st.status == "complete", st
        out.append(st.output)
    return out


# -- register -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "why"),
    [
        ("* * * *", "5 fields"),
        ("*/5 * * * * *", "5 fields"),
        ("61 * * * *", "Bad minute"),
        ("0 25 * * *", "Bad hour"),
        ("0 0 30 2 *", "day-of-month"),
        ("@hourly", "5 fields"),
        ("* * */20 * 1L", "never fires"),
        ("0 " * 200, "longer than 256"),
        (5, "is a str"),
        ({"cron": "0 * * * *", "tz": "CET"}, "cron str"),
    ],
)
def test_an_invalid_schedule_is_refused_at_register(rt: af.Runtime, given: Any, why: str) -> None:
    with pytest.raises(af.InvalidSchedule, match=why) as err:
        rt.register(Tick, name="bad", schedules=["0 * * * *", given])
    assert "workflow 'bad'" in str(err.value)
    assert repr(given)[:30] in str(err.value)
    assert err.value.workflow == "bad"  # type: ignore[attr-defined]
    assert isinstance(err.value, ValueError)
    again = pickle.loads(pickle.dumps(err.value))
    assert again.schedule == given and again.workflow == "bad"
    assert "bad" not in rt.workflows  # nothing was registered
    assert rt.schedules() == []


def test_a_single_str_or_a_repeated_schedule_is_refused(rt: af.Runtime) -> None:
    with pytest.raises(af.InvalidSchedule, match="list of cron expressions"):
        rt.register(Tick, name="t", schedules="0 * * * *")  # type: ignore[arg-type]
    with pytest.raises(af.InvalidSchedule, match="listed twice"):
        rt.register(Tick, name="t", schedules=["0 * * * *", "0  *  * * *"])


# -- a fake week ----------------------------------------------------------------------


def test_a_fake_week_makes_one_instance_per_tick(make_runtime: Any) -> None:
    clock = FakeClock(MONDAY)
    try:
        rt = make_runtime(clock=clock)
        crons = ["0 * * * *", "30 9 * * MON-FRI", "0 0 * * SUN"]
        b = rt.register(Tick, name="tick", schedules=crons)
        clock.advance("7 days")
        got = Counter((o["cf"]["cron"], o["cf"]["scheduledTime"]) for o in outputs(b))
        midnight = MONDAY.replace(second=0)
        expected = Counter(
            [("0 * * * *", ms(midnight + timedelta(hours=h))) for h in range(1, 169)]
            + [
                ("30 9 * * MON-FRI", ms(midnight + timedelta(days=d, hours=9, minutes=30)))
                for d in range(5)
            ]
            + [("0 0 * * SUN", ms(midnight + timedelta(days=6)))]
        )
        assert got == expected  # every tick once, none twice, none off the schedule
        assert sum(got.values()) == 174
        [hourly] = [s for s in rt.schedules("tick") if s.cron == "0 * * * *"]
        assert hourly.last == midnight + timedelta(days=7)
        assert hourly.next == midnight + timedelta(days=7, hours=1)
        assert hourly.last_instance == tick_id("0 * * * *", hourly.last)
    finally:
        clock.close()


def test_event_schedule_values(rt: af.Runtime, clock: FakeClock) -> None:
    b = rt.register(Tick, name="tick", schedules=["*/15 * * * *"])
    plain = b.create(id="by-hand")
    assert plain.wait(timeout=10).output == {"id": "by-hand", "schedule": None, "cf": None}
    start = clock.datetime
    clock.advance("15 minutes")
    [inst] = [i for i in b.list() if i.id != "by-hand"]
    out = inst.wait(timeout=10).output
    tick = start.replace(minute=start.minute // 15 * 15, second=0) + timedelta(minutes=15)
    assert out["schedule"] == {"cron": "*/15 * * * *", "scheduled_time": tick}
    assert out["schedule"]["scheduled_time"].tzinfo is not None
    assert out["cf"] == {"cron": "*/15 * * * *", "scheduledTime": ms(tick)}
    assert inst.id == tick_id("*/15 * * * *", tick)
    event = af.WorkflowEvent(None, clock.datetime, "x", "tick")
    with pytest.raises(KeyError):
        event["nope"]


def test_restart_of_a_scheduled_instance_keeps_its_schedule(
    rt: af.Runtime, clock: FakeClock
) -> None:
    b = rt.register(Tick, name="tick", schedules=["0 * * * *"])
    clock.advance("1 hour")
    [inst] = b.list()
    first = inst.wait(timeout=10).output
    inst.restart()
    assert inst.wait(timeout=10).output == first


# -- restarts ---------------------------------------------------------------------------


def test_a_restart_makes_no_duplicate_and_one_catch_up(make_runtime: Any) -> None:
    clock = FakeClock(datetime(2026, 1, 5, 10, 30, tzinfo=UTC))
    try:
        rt = make_runtime(clock=clock)
        b = rt.register(Tick, name="tick", schedules=["0 * * * *"])
        clock.advance("1 hour")  # 11:00
        assert [i.id for i in b.list()] == [
            tick_id("0 * * * *", datetime(2026, 1, 5, 11, tzinfo=UTC))
        ]
        rt.close()

        rt = make_runtime(clock=clock)  # the same time again: nothing new
        b = rt.register(Tick, name="tick", schedules=["0 * * * *"])
        assert rt.wait_until_idle(10)
        assert len(b.list()) == 1
        rt.close()

        clock.set(datetime(2026, 1, 5, 15, 30, tzinfo=UTC))  # 12:00 to 15:00 missed
        rt = make_runtime(clock=clock)
        before = rt.schedules()
        assert before[0].next == datetime(2026, 1, 5, 12, tzinfo=UTC)  # due, not fired yet
        b = rt.register(Tick, name="tick", schedules=["0 * * * *"])
        assert rt.wait_until_idle(10)
        ticks = sorted(o["cf"]["scheduledTime"] for o in outputs(b))
        assert ticks == [
            ms(datetime(2026, 1, 5, 11, tzinfo=UTC)),
            ms(datetime(2026, 1, 5, 15, tzinfo=UTC)),  # the one catch-up, the latest tick
        ]
        clock.advance("30 minutes")  # 16:00: back on schedule
        assert len(outputs(b)) == 3
        [s] = rt.schedules()
        assert (s.last, s.next) == (
            datetime(2026, 1, 5, 16, tzinfo=UTC),
            datetime(2026, 1, 5, 17, tzinfo=UTC),
        )
    finally:
        clock.close()


def test_schedules_not_listed_any_more_are_removed(make_runtime: Any, clock: FakeClock) -> None:
    rt = make_runtime()
    b = rt.register(Tick, name="tick", schedules=["0 * * * *", "*/30 * * * *"])
    assert [s.cron for s in rt.schedules()] == ["*/30 * * * *", "0 * * * *"]
    rt.close()
    rt = make_runtime()
    b = rt.register(Tick, name="tick")  # not given: left alone, not fired here
    assert len(rt.schedules()) == 2
    clock.advance("1 hour")
    assert b.list() == []
    rt.close()
    rt = make_runtime()
    b = rt.register(Tick, name="tick", schedules=["*/30 * * * *"])
    assert [s.cron for s in rt.schedules()] == ["*/30 * * * *"]
    assert rt.wait_until_idle(10)
    assert len(b.list()) == 1  # the catch-up of the half-hourly one only
    with pytest.raises(ValueError, match="other schedules"):
        rt.register(Tick, name="tick", schedules=["0 * * * *"])
    assert rt.register(Tick, name="tick", schedules=["*/30 * * * *"]) is b


def test_sigkilled_runtimes_make_one_catch_up_and_no_duplicate(
    location: str, tmp_path: Any
) -> None:
    """Real processes killed with SIGKILL, each started on a frozen clock of its own."""
    hourly = "0 * * * *"

    def run(now: str) -> NodeProcess:
        node = NodeProcess(
            location, APP, node_id="n", env={"SCHED_NOW": now}, log_path=tmp_path / "node.log"
        )
        return node.start()

    def finished(node: NodeProcess, iid: str) -> dict[str, Any]:
        deadline = time.monotonic() + 30
        while True:  # it may not exist yet: the timer thread makes it
            try:
                return node.wait_for_status("tick", iid)
            except af.InstanceNotFound:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)

    def total(node: NodeProcess) -> int:
        return sum(node.counts("tick").values())

    node = run("2026-01-05T10:30:00+00:00")
    assert node.wait_until_idle() and total(node) == 0
    node.kill()
    node = run("2026-01-05T11:00:00+00:00")  # the 11:00 tick is due as it starts
    st = finished(node, tick_id(hourly, datetime(2026, 1, 5, 11, tzinfo=UTC)))
    assert st["output"]["scheduled"] == ms(datetime(2026, 1, 5, 11, tzinfo=UTC))
    node.kill()
    node = run("2026-01-05T13:30:00+00:00")  # 12:00 and 13:00 missed: one catch-up
    finished(node, tick_id(hourly, datetime(2026, 1, 5, 13, tzinfo=UTC)))
    assert node.wait_until_idle() and total(node) == 2
    node.kill()
    node = run("2026-01-05T13:30:00+00:00")  # again: nothing new
    assert node.wait_until_idle() and total(node) == 2
    with pytest.raises(af.InstanceNotFound):
        node.status("tick", tick_id(hourly, datetime(2026, 1, 5, 12, tzinfo=UTC)))
    node.kill()


def test_two_nodes_make_exactly_one_instance_per_tick(location: str, tmp_path: Any) -> None:
    """Two node processes on one location share a clock 60 times faster than real time:
    both fire every minutely tick at the same moment, and only one instance is made."""
    t0 = datetime(2026, 1, 5, 10, 55, tzinfo=UTC).timestamp()
    env = {
        "SCHED_T0": str(t0),
        "SCHED_R0": str(time.time()),
        "SCHED_SPEED": "60",
        "SCHED_CRONS": "* * * * *",
    }
    nodes = [
        NodeProcess(
            location, APP, node_id=n, env=env, log_path=tmp_path / f"{n}.log", lease_timeout=30
        )
        for n in ("a", "b")
    ]
    try:
        for node in nodes:
            node.start()
        deadline = time.monotonic() + 60
        while sum(nodes[0].counts("tick").values()) < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        for node in nodes:
            node.wait_until_idle()
    finally:
        for node in nodes:
            node.kill()
    with Query.open(location) as q:
        ids = q.ids("tick", None, limit=None)
        docs = [q.describe("tick", i) for i in ids]
    assert len(docs) >= 8
    ticks = Counter(d.output["scheduled"] for d in docs if d.output is not None)
    assert all(n == 1 for n in ticks.values()), ticks
    for d in docs:
        assert d.id == tick_id(
            "* * * * *", datetime.fromtimestamp(d.output["scheduled"] / 1000, UTC)
        )
    minutes = sorted(ticks)
    # Every minute from the first to the last, none skipped.
    assert minutes == list(range(minutes[0], minutes[-1] + 1, 60_000))


# -- faces ------------------------------------------------------------------------------


def test_the_cli_lists_the_schedules(location: str, clock: FakeClock) -> None:
    with af.Runtime(location, clock=clock) as rt:
        rt.register(Tick, name="tick", schedules=["0 9 * * *"])
        clock.advance("1 day")
    out = CliRunner().invoke(cli, ["--data", location, "schedules"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    assert "0 9 * * *" in out.output and "tick" in out.output and "cron-" in out.output
    out = CliRunner().invoke(cli, ["--data", location, "--json", "schedules", "-w", "tick"])
    [row] = json.loads(out.output)
    assert row["cron"] == "0 9 * * *" and row["next"].endswith("T09:00:00.000+00:00")
    assert row["last_instance"].startswith("cron-")
    out = CliRunner().invoke(cli, ["--data", location, "--json", "schedules", "-w", "other"])
    assert json.loads(out.output) == []


def test_the_http_api_lists_the_schedules(rt: af.Runtime, clock: FakeClock) -> None:
    from starlette.testclient import TestClient

    from actorflow.http.app import create_app

    rt.register(Tick, name="tick", schedules=["*/5 * * * *"])
    client = TestClient(create_app(rt, token="t"), base_url="http://127.0.0.1")
    headers = {"Authorization": "Bearer t"}
    [row] = client.get("/api/schedules", headers=headers).json()["result"]
    assert row["workflow"] == "tick" and row["cron"] == "*/5 * * * *"
    assert row["last"] is None and row["last_instance"] is None
    nxt = datetime.fromisoformat(row["next"])
    assert timedelta(0) < nxt - clock.datetime <= timedelta(minutes=5)
    assert client.get("/api/schedules?workflow=x", headers=headers).json()["result"] == []
    assert "/api/schedules" in client.get("/openapi.json").json()["paths"]
    assert client.get("/api/schedules").status_code == 401
