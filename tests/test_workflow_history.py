"""History in Cloudflare's vocabulary, oldest first, and one step record per step."""

from __future__ import annotations

from typing import Any

from conftest import history_types

import actorflow as af
from actorflow.testing import FakeClock
from actorflow.workflows.history import EVENT_TYPES


class Full(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        def flaky(ctx: af.StepContext) -> str:
            if ctx.attempt == 1:
                raise RuntimeError("first try fails")
            return "charged"

        charge = step.do(
            "charge", flaky, retries={"limit": 2, "delay": "1 second", "backoff": "constant"}
        )
        step.sleep("cool down", "1 minute")
        ok = step.wait_for_event("approval", "approved", timeout="1 hour")
        try:
            step.wait_for_event("late", "never", timeout="1 second")
        except af.EventTimeoutError:
            pass
        return [charge, ok.payload]


def test_history_names_and_order(rt: af.Runtime, clock: FakeClock) -> None:
    inst = rt.register(Full, name="full").create(id="h", params={"p": 1})
    assert rt.wait_until_idle()
    clock.advance("1 second")  # the retry
    clock.advance("1 minute")  # the sleep
    inst.send_event("approved", "ann")
    assert rt.wait_until_idle()
    clock.advance("1 second")  # the second wait times out
    assert inst.wait(timeout=10).output == ["charged", "ann"]
    hist = inst.history()
    assert [e.type for e in hist] == [
        "WORKFLOW_QUEUED",
        "WORKFLOW_START",
        "STEP_START",
        "ATTEMPT_START",
        "ATTEMPT_FAILURE",
        "ATTEMPT_START",
        "ATTEMPT_SUCCESS",
        "STEP_SUCCESS",
        "SLEEP_START",
        "SLEEP_COMPLETE",
        "WAIT_START",
        "WAIT_COMPLETE",
        "WAIT_START",
        "WAIT_TIMED_OUT",
        "WORKFLOW_SUCCESS",
    ]
    stamps = [e.timestamp for e in hist]
    assert stamps == sorted(stamps)
    assert all(ts.utcoffset() is not None for ts in stamps)
    by_type = {e.type: e for e in hist}
    assert by_type["STEP_START"].step == "charge-1"
    assert by_type["STEP_START"].data["config"]["retries"]["limit"] == 2
    fail = by_type["ATTEMPT_FAILURE"]
    assert (fail.attempt, fail.data["retryDelayMs"]) == (1, 1000)
    assert fail.data["error"] == {"name": "RuntimeError", "message": "first try fails"}
    assert by_type["ATTEMPT_SUCCESS"].attempt == 2
    assert by_type["STEP_SUCCESS"].data["result"] == "charged"
    assert by_type["SLEEP_START"].data["durationMs"] == 60_000
    assert (
        by_type["SLEEP_COMPLETE"].timestamp - by_type["SLEEP_START"].timestamp
    ).total_seconds() == 60
    assert by_type["WAIT_COMPLETE"].data["payload"] == "ann"
    assert by_type["WAIT_TIMED_OUT"].step == "late-1"


def test_step_records(rt: af.Runtime, clock: FakeClock) -> None:
    inst = rt.register(Full, name="full").create(id="h")
    assert rt.wait_until_idle()
    clock.advance("1 second")
    clock.advance("1 minute")
    inst.send_event("approved", "ann")
    assert rt.wait_until_idle()
    clock.advance("1 second")
    inst.wait(timeout=10)
    steps = inst.steps()
    assert [(s.name, s.count, s.kind, s.status) for s in steps] == [
        ("charge", 1, "do", "complete"),
        ("cool down", 1, "sleep", "complete"),
        ("approval", 1, "wait_for_event", "complete"),
        ("late", 1, "wait_for_event", "errored"),
    ]
    charge = steps[0]
    assert isinstance(charge, af.StepRecord)
    assert [a.attempt for a in charge.attempts] == [1, 2]
    assert charge.attempts[0].error == {"name": "RuntimeError", "message": "first try fails"}
    assert charge.attempts[1].error is None
    assert all(a.start is not None and a.end is not None for a in charge.attempts)
    assert charge.output == "charged" and charge.error is None
    assert steps[2].output == "ann"
    assert steps[3].error is not None and steps[3].error["name"] == "EventTimeoutError"


class Fails(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("boom", lambda: 1 / 0, retries={"limit": 0, "delay": 0})


def test_failure_history(rt: af.Runtime) -> None:
    inst = rt.register(Fails, name="fails").create()
    inst.wait(timeout=10)
    hist = inst.history()
    assert [e.type for e in hist][-4:] == [
        "ATTEMPT_START",
        "ATTEMPT_FAILURE",
        "STEP_FAILURE",
        "WORKFLOW_FAILURE",
    ]
    assert hist[-1].data["error"]["name"] == "ZeroDivisionError"
    assert "retryDelayMs" not in hist[-3].data  # no retry follows


class Sleeps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.sleep("nap", "1 hour")
        return "done"


def test_lifecycle_events(rt: af.Runtime, clock: FakeClock) -> None:
    wf = rt.register(Sleeps, name="sleeps")
    inst = wf.create(id="l")
    assert rt.wait_until_idle()
    inst.pause()
    inst.resume()
    assert rt.wait_until_idle()
    inst.restart()
    assert rt.wait_until_idle()
    inst.terminate()
    types = history_types(inst, "WORKFLOW_")
    assert types == [
        "WORKFLOW_QUEUED",
        "WORKFLOW_START",
        "WORKFLOW_PAUSED",
        "WORKFLOW_RESUMED",
        "WORKFLOW_RESTARTED",
        "WORKFLOW_START",
        "WORKFLOW_TERMINATED",
    ]
    assert set(history_types(inst)) <= set(EVENT_TYPES)


def test_history_of_unknown_instance_raises(rt: af.Runtime) -> None:
    inst = af.Instance(rt.register(Sleeps, name="sleeps"), "ghost")
    for call in (inst.history, inst.steps, inst.status):
        try:
            call()
        except af.InstanceNotFound:
            continue
        raise AssertionError(f"{call.__name__} did not raise")


class Secret(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> str:
        token = step.do("fetch token", lambda: "s3cr3t", config={"redact": True})
        shown = step.do("public", lambda: "hello")
        step.sleep("nap", "1 second")
        return f"{token[:2]}-{shown}"  # replay after the sleep still has the real value


def test_a_redacted_step_shows_no_output_but_replays_it(rt: af.Runtime, clock: FakeClock) -> None:
    inst = rt.register(Secret).create(id="r")
    assert rt.wait_until_idle()
    clock.advance("2 seconds")
    assert inst.wait(timeout=10).output == "s3-hello"
    steps = {s.name: s for s in inst.steps()}
    assert steps["fetch token"].output == "[redacted]"
    assert steps["fetch token"].config["redact"] is True
    assert steps["public"].output == "hello"
    results = [e.data.get("result") for e in inst.history() if e.type == "STEP_SUCCESS"]
    assert results == ["[redacted]", "hello"]
    assert "s3cr3t" not in repr(inst.history()) + repr(inst.steps())


def test_redact_must_be_a_bool(rt: af.Runtime) -> None:
    class Bad(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> None:
            step.do("x", lambda: 1, config={"redact": "yes"})

    st = rt.register(Bad).create(id="b").wait(timeout=10)
    assert st.status == "errored" and "redact must be True or False" in st.error["message"]
