"""Cloudflare's test modifiers: mocked results, errors, timeouts, sleeps and events."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Journal, history_types, wait_for

import actorflow as af
from actorflow.testing import FakeClock


class Pipeline(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def fetch(ctx: af.StepContext) -> str:
            j.add(("fetch", ctx.attempt))
            return "real"

        data = step.do(
            "fetch", fetch, retries={"limit": 3, "delay": "1 minute", "backoff": "constant"}
        )
        step.sleep("nap", "1 day")
        try:
            ev = step.wait_for_event("approval", "approved", timeout="1 hour").payload
        except af.EventTimeoutError:
            ev = "timed out"
        return [data, ev]


def test_mock_step_result(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    wf.modify("m").mock_step_result("fetch", {"mocked": True}).disable_sleeps().mock_event(
        "approved", "yes"
    )
    inst = wf.create(id="m")
    assert inst.wait(timeout=10).output == [{"mocked": True}, "yes"]
    assert journal.entries == []  # the body never ran


def test_mock_step_error_times(rt: af.Runtime, clock: FakeClock, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    wf.modify("e").mock_step_error("fetch", ConnectionError("mocked"), times=2).disable_sleeps()
    inst = wf.create(id="e")
    assert rt.wait_until_idle()
    clock.advance("1 minute")
    clock.advance("1 minute")
    assert rt.wait_until_idle()
    assert journal.entries == [("fetch", 3)]  # attempts 1 and 2 failed by the mock
    (rec, *_) = inst.steps()
    assert [a.error["message"] if a.error else None for a in rec.attempts] == [
        "mocked",
        "mocked",
        None,
    ]
    inst.send_event("approved", "ok")
    assert inst.wait(timeout=10).output == ["real", "ok"]


def test_mock_step_error_always(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    wf.modify("a").mock_step_error("fetch", af.NonRetryableError("never works"))
    s = wf.create(id="a").wait(timeout=10)
    assert s.error == {"name": "NonRetryableError", "message": "never works"}
    assert journal.entries == []


def test_force_step_timeout_and_disable_retry_delays(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    wf.modify("t").force_step_timeout("fetch").disable_retry_delays()
    inst = wf.create(id="t")
    s = inst.wait(timeout=10)
    assert s.status == "errored"
    assert s.error is not None and s.error["name"] == "StepTimeoutError"
    (rec,) = inst.steps()
    assert len(rec.attempts) == 4  # limit 3, no waiting in between
    assert all(a.retry_delay_ms in (0, None) for a in rec.attempts)


def test_disable_sleeps(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    wf.modify("s").disable_sleeps()
    inst = wf.create(id="s")
    assert rt.wait_until_idle()
    assert [(s.name, s.status) for s in inst.steps()][:2] == [
        ("fetch", "complete"),
        ("nap", "complete"),
    ]
    assert inst.status().status == "waiting"  # now in the event wait


def test_force_event_timeout(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    wf.modify("f").disable_sleeps().force_event_timeout("approval")
    inst = wf.create(id="f")
    assert inst.wait(timeout=10).output == ["real", "timed out"]
    assert "WAIT_TIMED_OUT" in history_types(inst)


def test_modifiers_do_not_leak_to_other_instances(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    wf.modify("mocked").mock_step_result("fetch", "fake").disable_sleeps()
    plain = wf.create(id="plain")
    assert rt.wait_until_idle()
    assert plain.status().status == "waiting"
    assert journal.entries == [("fetch", 1)]
    clock.advance("1 day")
    plain.send_event("approved", 1)
    assert plain.wait(timeout=10).output == ["real", 1]


def test_wait_for_step_returns_results_as_they_land(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    inst = wf.create(id="w")
    assert inst.wait_for_step("fetch") == "real"
    with pytest.raises(TimeoutError, match="'nap'"):
        inst.wait_for_step("nap", timeout=0.2)  # it sleeps a day: no result in real time
    clock.advance("1 day")
    assert inst.wait_for_step("nap") is None
    inst.send_event("approved", {"user": "ann"})
    assert inst.wait_for_step("approval") == {"user": "ann"}
    assert inst.wait(timeout=10).output == ["real", {"user": "ann"}]


def test_wait_for_step_raises_the_steps_error(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    wf.modify("x").mock_step_error("fetch", ConnectionError("down")).disable_retry_delays()
    inst = wf.create(id="x")
    with pytest.raises(ConnectionError, match="down"):
        inst.wait_for_step("fetch")
    wf.modify("t").disable_sleeps().force_event_timeout("approval")
    with pytest.raises(af.EventTimeoutError):
        wf.create(id="t").wait_for_step("approval")


def test_wait_for_step_fails_fast_when_the_instance_ends_without_it(
    rt: af.Runtime, journal: Journal
) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    wf.modify("m").disable_sleeps().mock_event("approved", 1)
    inst = wf.create(id="m")
    with pytest.raises(af.InvalidInstanceState, match="without a result for step 'nope'"):
        inst.wait_for_step("nope", timeout=10)
    assert inst.wait_for_step("fetch", count=1) == "real"
    with pytest.raises(af.InvalidInstanceState):
        inst.wait_for_step("fetch", count=2, timeout=10)  # only one occurrence


def test_wait_for_status(rt: af.Runtime, clock: FakeClock, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipe", env=journal)
    inst = wf.create(id="s")
    assert inst.wait_for_status("waiting").status == "waiting"  # in the day-long nap
    inst.pause()
    assert inst.wait_for_status("paused") == af.InstanceStatus("paused", None, None)
    with pytest.raises(TimeoutError, match="still paused"):
        inst.wait_for_status("complete", timeout=0.1)
    with pytest.raises(ValueError, match="unknown status"):
        inst.wait_for_status("done")
    inst.terminate()
    with pytest.raises(af.InvalidInstanceState, match="ended terminated"):
        inst.wait_for_status("complete", timeout=10)


class Gated(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        first = step.do("first", lambda: j.block("first") or "first")
        return [first, step.do("second", lambda: "real second")]


def test_modifiers_made_while_the_instance_runs_apply_to_its_next_steps(
    rt: af.Runtime, journal: Journal
) -> None:
    wf = rt.register(Gated, env=journal)
    inst = wf.create(id="g")
    wait_for(lambda: inst.status().status == "running")
    wf.modify("g").mock_step_result("second", "mocked second")
    journal.gate("first").set()
    assert inst.wait(timeout=10).output == ["first", "mocked second"]
