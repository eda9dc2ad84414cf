"""Bad configuration is refused where it is written, with errors that name what is wrong.

Retry policies and limits are checked when they are made; durations and
instants the engine could not store or show are refused at the step that gives
them; a step function that cannot be called as one fails its step at once; a
Durable Object name that is not a ``str`` is refused. Each time, nothing is
half-written and the runtime keeps working.
"""

from __future__ import annotations

import functools
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from starlette.testclient import TestClient

import actorflow as af
from actorflow.cli import cli
from actorflow.core import clock as clock_module
from actorflow.core.clock import parse_duration_ms, to_datetime, to_epoch_ms
from actorflow.core.lmdb_backend import LmdbStorage
from actorflow.core.storage import WriteBatch
from actorflow.http import create_app
from actorflow.testing import FakeClock
from actorflow.workflows.records import STEPS, dump, load
from actorflow.workflows.step import resolve_config, retry_delay_ms

#: The longest duration (100 years of 365 days) and the latest instant (9999-12-31T23:59:59.999Z).
MAX_DURATION_MS = 100 * 365 * 86_400_000
MAX_EPOCH_MS = 253_402_300_799_999

# -- RetryPolicy and Limits: checked when made ---------------------------------------------


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"limit": -1}, "limit must be an int from 0 to 10000"),
        ({"limit": 10_001}, "limit must be an int from 0 to 10000"),
        ({"limit": 2.5}, "limit must be an int from 0 to 10000"),
        ({"limit": True}, "limit must be an int from 0 to 10000"),
        ({"delay": "soon"}, "invalid duration 'soon'"),
        ({"delay": -5}, "invalid duration -5"),
        ({"delay": "500 years"}, "too long"),
        ({"backoff": "random"}, "backoff must be one of"),
    ],
)
def test_a_bad_retry_policy_is_refused_when_made(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message) as made:
        af.RetryPolicy(**fields)
    assert str(made.value).startswith("RetryPolicy: ")
    # the same rule, and the same kind of error, as the dict form given to step.do
    with pytest.raises(ValueError, match=message):
        resolve_config("workflow 'w', instance 'i', step 's'", retries=fields)


def test_a_good_retry_policy_is_still_accepted_everywhere() -> None:
    policy = af.RetryPolicy(limit=0, delay=timedelta(seconds=3), backoff="constant")
    cfg = resolve_config("step 's'", retries=policy)
    assert cfg["retries"] == {"limit": 0, "delay": 3000, "backoff": "constant"}
    assert af.RetryPolicy() == af.RetryPolicy(5, "10 seconds", "exponential")


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"max_concurrent": 2.5}, "max_concurrent"),
        ({"max_concurrent": True}, "max_concurrent"),
        ({"max_queued": "10"}, "max_queued"),
        ({"max_steps": 1.0}, "max_steps"),
        ({"max_step_result_bytes": 0}, "max_step_result_bytes"),
        ({"max_event_payload_bytes": -1}, "max_event_payload_bytes"),
        ({"max_creation_rate": float("nan")}, "max_creation_rate"),
        ({"max_creation_rate": float("inf")}, "max_creation_rate"),
        ({"max_creation_rate": "fast"}, "max_creation_rate"),
        ({"burst": 0}, "burst"),
        ({"burst": -3}, "burst"),
        ({"per_workflow": {"w": {"max_concurrent": -1}}}, r"per_workflow\['w'\]: .*max_concurrent"),
        ({"per_workflow": {"w": {"max_event_payload_bytes": 0}}}, r"per_workflow\['w'\]"),
        ({"per_workflow": {"w": 5}}, "per_workflow"),
    ],
)
def test_bad_limits_are_refused_when_made(fields: dict[str, Any], name: str) -> None:
    with pytest.raises(ValueError, match=rf"Limits\.{name}"):
        af.Limits(**fields)


def test_good_limits_are_still_accepted() -> None:
    af.Limits(max_queued=0, max_creation_rate=2, burst=1)
    af.Limits.cloudflare_v2(per_workflow={"w": {"max_concurrent": 1, "max_creation_rate": 0.5}})


# -- durations and instants: what the engine can store and show ------------------------------


def test_durations_are_capped_at_100_years() -> None:
    assert clock_module.MAX_DURATION_MS == MAX_DURATION_MS
    assert clock_module.MAX_EPOCH_MS == MAX_EPOCH_MS
    assert parse_duration_ms("100 years") == MAX_DURATION_MS
    assert parse_duration_ms(MAX_DURATION_MS) == MAX_DURATION_MS
    for too_long in (
        "101 years",
        "5000 years",
        MAX_DURATION_MS + 1,
        10**400,
        timedelta.max,
        "1" + "0" * 400 + " years",
    ):
        with pytest.raises(ValueError, match=r"step 'nap': duration .* is too long"):
            parse_duration_ms(too_long, what="step 'nap'")


def test_instants_must_be_from_1970_to_9999() -> None:
    assert to_epoch_ms(0) == 0
    assert to_epoch_ms(MAX_EPOCH_MS) == MAX_EPOCH_MS
    assert to_datetime(MAX_EPOCH_MS / 1000).year == 9999
    for bad in (
        -1,
        MAX_EPOCH_MS + 1,
        10**30,
        float("inf"),
        float("nan"),
        datetime(1969, 12, 31, tzinfo=UTC),
    ):
        with pytest.raises(ValueError, match="set_alarm: "):
            to_epoch_ms(bad, what="set_alarm")


def test_retry_delays_stay_within_the_longest_duration() -> None:
    cfg = resolve_config("s", retries={"limit": 10_000, "delay": "1 day"})
    assert retry_delay_ms(cfg, 3) == 4 * 86_400_000
    assert retry_delay_ms(cfg, 10_000) == MAX_DURATION_MS


class Far(af.Workflow):
    """Does what its params say with a duration or instant, and reports the error it gets."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        kind, value = event.payload["kind"], event.payload["value"]
        try:
            if kind == "sleep":
                step.sleep("nap", value)
            elif kind == "sleep_until":
                step.sleep_until("nap", value)
            elif kind == "wait":
                step.wait_for_event("nap", "go", timeout=value)
            elif kind == "timeout":
                step.do("nap", lambda: 1, timeout=value)
            else:
                step.do("nap", lambda: 1, retries={"limit": 1, "delay": value})
        except ValueError as e:
            if event.payload.get("catch"):
                return f"caught: {e}"
            raise
        return "no error"


FAR = [
    ("sleep", "5000 years"),
    ("sleep", "20000 years"),
    ("sleep", 10**22),
    ("sleep_until", 10**20),
    ("sleep_until", -1),
    ("sleep_until", 1e300),
    ("wait", "5000 years"),
    ("timeout", "5000 years"),
    ("delay", "5000 years"),
]


@pytest.mark.parametrize(("kind", "value"), FAR, ids=[f"{k}-{v}" for k, v in FAR])
def test_a_far_duration_fails_its_step_and_leaves_the_instance_readable(
    rt: af.Runtime, clock: FakeClock, kind: str, value: Any
) -> None:
    wf = rt.register(Far, name="far")
    caught = wf.create(id="caught", params={"kind": kind, "value": value, "catch": True})
    failed = wf.create(id="failed", params={"kind": kind, "value": value})
    rt.wait_until_idle()
    st = caught.status()
    assert st.status == "complete", st
    assert st.output.startswith("caught: workflow 'far', instance 'caught', step 'nap': ")
    assert "out of range" in st.output or "too long" in st.output
    st = failed.status()
    assert st.status == "errored" and st.error is not None
    assert st.error["name"] == "ValueError"
    assert "workflow 'far', instance 'failed', step 'nap'" in st.error["message"]
    for inst in (caught, failed):
        inst.steps()
        inst.history()
    _readable_over_http(rt, "far", "failed")
    # and the runtime goes on
    ok = wf.create(id="ok", params={"kind": "sleep", "value": "1 year", "catch": True})
    rt.wait_until_idle()
    assert ok.status().status == "waiting"
    clock.advance("1 year")
    rt.wait_until_idle()
    assert ok.status().output == "no error"
    rt.close()
    _readable_by_the_cli(rt.data_dir, "far", "failed")


def _readable_over_http(rt: af.Runtime, wf: str, iid: str) -> None:
    """The HTTP API shows ``wf/iid``, its steps and its history."""
    with TestClient(create_app(rt, token=None), base_url="http://localhost") as c:
        base = f"/api/workflows/{wf}/instances/{iid}"
        for path in (base, base + "/history", f"/api/workflows/{wf}/instances"):
            resp = c.get(path)
            assert resp.status_code == 200, resp.text


def _readable_by_the_cli(data: Path, wf: str, iid: str) -> None:
    """``actorflow status|steps|history`` show ``wf/iid`` (on a closed directory)."""
    for command in ("status", "steps", "history"):
        for fmt in (["--json"], []):
            r = CliRunner().invoke(
                cli, ["--data", str(data), *fmt, command, wf, iid], catch_exceptions=False
            )
            assert r.exit_code == 0, r.output
            if fmt:
                json.loads(r.stdout)


class Nap(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.sleep("nap", "1 day")
        return "awake"


def test_a_deadline_written_out_of_range_earlier_is_still_readable(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A record written by a version that took such durations: every reader still shows it."""
    data = tmp_path / "data"
    with af.Runtime(data, clock=clock) as rt:
        rt.register(Nap, name="nap").create(id="n1").wait_for_status("waiting")
    store = LmdbStorage(data)
    try:
        [(key, raw)] = store.scan(STEPS)
        rec = load(raw)
        rec["dl"] = 20_000 * 365 * 86_400_000  # year 21970
        batch = WriteBatch()
        batch.put(STEPS, key, dump(rec))
        store.write(batch)
    finally:
        store.close()
    _readable_by_the_cli(data, "nap", "n1")
    with af.Runtime(data, clock=clock) as rt:
        inst = rt.register(Nap, name="nap").get("n1")
        [nap] = inst.steps()
        assert nap.deadline == datetime.max.replace(tzinfo=UTC)
        assert any(e.type == "SLEEP_START" for e in inst.history())
        _readable_over_http(rt, "nap", "n1")


# -- step functions that cannot be called as one -------------------------------------------------


class Account:
    def charge(self, amount: int) -> int:
        return amount

    def fine(self, ctx: af.StepContext) -> int:
        return ctx.attempt


def two(x: Any, y: Any) -> int:
    return 1


BAD_BODIES: dict[str, Any] = {
    "two-params": lambda x, y: 1,
    "one-param-not-ctx": lambda item: 1,
    "ctx-and-more": lambda ctx, y: 1,
    "keyword-only-ctx": lambda *, ctx: 1,
    "ctx-not-first": lambda x=1, ctx=None: 1,
    "method-with-a-param": Account().charge,
    "partial-missing-one": functools.partial(two, 1),
    "wrapped": functools.wraps(two)(lambda *a, **k: two(*a, **k)),
}


class Arity(af.Workflow):
    """Runs the step function its env names; catches the error when told to."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        fn = self.env[event.payload["fn"]]
        try:
            return step.do("bad", fn, retries={"limit": 5, "delay": "1 minute"})
        except af.NonRetryableError as e:
            if event.payload.get("catch"):
                return f"caught: {e}"
            raise


@pytest.mark.parametrize("fn", sorted(BAD_BODIES))
def test_a_step_function_of_the_wrong_shape_fails_at_once(rt: af.Runtime, fn: str) -> None:
    wf = rt.register(Arity, name="arity", env=BAD_BODIES)
    caught = wf.create(id="caught", params={"fn": fn, "catch": True})
    failed = wf.create(id="failed", params={"fn": fn})
    rt.wait_until_idle()  # the fake clock never moves: a retry delay would leave it waiting
    st = caught.status()
    assert st.status == "complete", st
    assert st.output.startswith("caught: workflow 'arity', instance 'caught', step 'bad': ")
    assert "a step function takes no parameter, or one parameter named ctx" in st.output
    st = failed.status()
    assert st.status == "errored" and st.error is not None
    assert st.error["name"] == "NonRetryableError"
    assert "workflow 'arity', instance 'failed', step 'bad'" in st.error["message"]
    [step] = failed.steps()
    assert step.status == "errored" and len(step.attempts) == 1
    assert [e.type for e in failed.history() if e.type.startswith("ATTEMPT")] == [
        "ATTEMPT_START",
        "ATTEMPT_FAILURE",
    ]


GOOD_BODIES: dict[str, Any] = {
    "none": lambda: 1,
    "ctx": lambda ctx: ctx.attempt,
    "ctx-default": lambda ctx=None: 1,
    "defaults": lambda a=1, b=2: a + b,
    "varargs": lambda *a, **k: 1,
    "method": Account().fine,
    "partial": functools.partial(two, 1, 2),
    "builtin": dict,
}


class Good(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return [step.do(name, self.env[name]) for name in sorted(self.env)]


def test_step_functions_of_every_good_shape_still_run(rt: af.Runtime) -> None:
    inst = rt.register(Good, name="good", env=GOOD_BODIES).create()
    rt.wait_until_idle()
    assert inst.status().output == [{}, 1, 1, 3, 1, 1, 1, 1]


class Shapes(af.Workflow):
    """The other ways of giving a step function: map, parallel, the decorator, async."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        out = []
        try:
            await step.map("each", lambda: 1, [1, 2])
        except af.NonRetryableError as e:
            out.append(str(e))
        try:
            await step.parallel(("left", lambda: 1), ("right", lambda x: x))
        except af.NonRetryableError as e:
            out.append(str(e))

        @step.do("decorated")
        async def decorated(item: Any) -> Any:
            return item

        try:
            await decorated()  # ``item`` names no earlier step (Cloudflare's TypeError)
        except af.StepDependencyError as e:
            out.append(str(e))
        out.append(await step.map("fine", lambda x: x * 2, [1, 2]))
        return out


def test_map_parallel_decorator_and_async_check_their_functions(rt: af.Runtime) -> None:
    inst = rt.register(Shapes, name="shapes").create(id="s")
    rt.wait_until_idle()
    st = inst.status()
    assert st.status == "complete", st
    each, right, decorated, fine = st.output
    assert each.startswith("workflow 'shapes', instance 's', step 'each[")
    assert "cannot be called with one item" in each
    assert right.startswith("workflow 'shapes', instance 's', step 'right': ")
    assert decorated.startswith("workflow 'shapes', instance 's', step 'decorated': ")
    assert "parameter 'item'" in decorated
    assert fine == [2, 4]
    attempts = {(s.name, len(s.attempts)) for s in inst.steps()}
    assert {("each[0]", 1), ("each[1]", 1), ("right", 1)} <= attempts
    # Refused before the step started, as in Cloudflare's SDK: nothing of it is recorded.
    assert "decorated" not in {s.name for s in inst.steps()}


# -- Durable Object ids --------------------------------------------------------------------------


class Counter(af.DurableObject):
    def increment(self) -> int:
        n: int = self.ctx.storage.get("n", 0) + 1
        self.ctx.storage.put("n", n)
        return n

    def alarm_at(self, when: Any) -> None:
        self.ctx.storage.set_alarm(when)


@pytest.mark.parametrize("name", [5, None, b"alice", 1.5])
def test_a_durable_object_name_must_be_a_str(rt: af.Runtime, name: Any) -> None:
    ns = rt.durable_objects(Counter, name="counter")
    for call in (ns.id_from_name, ns.get_by_name, ns.id_from_string):
        with pytest.raises(TypeError, match="namespace 'counter': "):
            call(name)
    assert ns.get_by_name("5").increment() == 1  # the namespace keeps working
    assert ns.id_from_string(str(ns.id_from_name("5"))) == ns.id_from_name("5")


def test_an_alarm_out_of_range_is_refused_at_set_alarm(rt: af.Runtime) -> None:
    stub = rt.durable_objects(Counter, name="counter").get_by_name("a")
    for when in (10**20, -1):
        with pytest.raises(ValueError, match=r"set_alarm: time .* is out of range"):
            stub.alarm_at(when)
    assert stub.increment() == 1
