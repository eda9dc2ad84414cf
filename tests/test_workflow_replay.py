"""Replay: completed steps never run again, failures re-raise, deadlines and events are durable."""

from __future__ import annotations

from typing import Any

from conftest import Journal, history_types

import actorflow as af
from actorflow.testing import FakeClock


class ThreeSteps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        j.add("run")
        a = step.do("a", lambda: j.add("a") or "A")
        step.sleep("nap", "1 hour")
        b = step.do("b", lambda: j.add("b") or "B")
        ev = step.wait_for_event("go", "go", timeout="1 day")
        c = step.do("c", lambda: j.add("c") or "C")
        return [a, b, ev.payload, c]


def test_completed_steps_never_run_again(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    inst = rt.register(ThreeSteps, name="three", env=journal).create(id="r")
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"
    clock.advance("1 hour")
    assert inst.status().status == "waiting"
    inst.send_event("go", 42)
    assert inst.wait(timeout=10).output == ["A", "B", 42, "C"]
    counts = journal.counts()
    assert (counts["a"], counts["b"], counts["c"]) == (1, 1, 1)
    assert counts["run"] == 3  # replayed from the top on every wake-up


class FailsThenSleeps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def bad() -> None:
            j.add("bad")
            raise KeyError("boom")

        try:
            step.do("bad", bad, retries={"limit": 0, "delay": 0})
        except KeyError as e:
            caught = f"{type(e).__name__}:{e.args[0]}"
        j.add(("caught", caught))
        step.sleep("nap", "1 minute")
        return caught


def test_failed_step_reraises_its_stored_error_on_replay(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    inst = rt.register(FailsThenSleeps, name="fails", env=journal).create(id="f")
    assert rt.wait_until_idle()
    clock.advance("1 minute")
    assert inst.wait(timeout=10).output == "KeyError:boom"
    assert journal.count("bad") == 1
    # The replay caught the stored error, with the same type and message.
    assert journal.count(("caught", "KeyError:boom")) == 2
    (bad,) = [s for s in inst.steps() if s.name == "bad"]
    assert bad.status == "errored" and len(bad.attempts) == 1


class LongSleep(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        step.do("before", lambda: j.add("before"))
        step.sleep("nap", "1 hour")
        return step.do("after", lambda: j.add("after") or "done")


def test_sleep_deadline_survives_a_restart(
    make_runtime: Any, clock: FakeClock, journal: Journal
) -> None:
    rt1 = make_runtime()
    inst = rt1.register(LongSleep, name="long", env=journal).create(id="s")
    assert rt1.wait_until_idle()
    clock.advance("20 minutes")
    rt1.close()

    rt2 = make_runtime()
    inst = rt2.register(LongSleep, name="long", env=journal).get("s")
    assert rt2.wait_until_idle()
    assert inst.status().status == "waiting"
    clock.advance("39 minutes")  # 59 minutes in all: not yet
    assert inst.status().status == "waiting"
    assert journal.count("after") == 0
    clock.advance("1 minute")  # only the time left was waited
    assert inst.wait(timeout=10).output == "done"
    assert (journal.count("before"), journal.count("after")) == (1, 1)


def test_sleep_already_due_at_reopen_fires(
    make_runtime: Any, clock: FakeClock, journal: Journal
) -> None:
    rt1 = make_runtime()
    rt1.register(LongSleep, name="long", env=journal).create(id="s")
    assert rt1.wait_until_idle()
    rt1.close()
    clock.advance("2 hours")  # time passes while no runtime is up
    rt2 = make_runtime()
    inst = rt2.register(LongSleep, name="long", env=journal).get("s")
    assert inst.wait(timeout=10).output == "done"
    assert journal.count("before") == 1


class TwoWaits(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        first = step.wait_for_event("first", "go", timeout="1 hour")
        step.sleep("between", "10 minutes")
        try:
            second = step.wait_for_event("second", "go", timeout="1 hour").payload
        except af.EventTimeoutError:
            second = "timed out"
        return [first.payload, second]


def test_consumed_event_is_not_delivered_again_after_reopen(
    make_runtime: Any, clock: FakeClock, journal: Journal
) -> None:
    rt1 = make_runtime()
    inst = rt1.register(TwoWaits, name="twowaits").create(id="e")
    assert rt1.wait_until_idle()
    inst.send_event("go", "only one")
    assert rt1.wait_until_idle()
    assert inst.status().status == "waiting"  # in the sleep
    rt1.close()

    rt2 = make_runtime()
    inst = rt2.register(TwoWaits, name="twowaits").get("e")
    clock.advance("10 minutes")
    assert inst.status().status == "waiting"  # the second wait got nothing
    clock.advance("1 hour")
    assert inst.wait(timeout=10).output == ["only one", "timed out"]
    assert history_types(inst, "WAIT_") == [
        "WAIT_START",
        "WAIT_COMPLETE",
        "WAIT_START",
        "WAIT_TIMED_OUT",
    ]


class ConfigFromEnv(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body(ctx: af.StepContext) -> str:
            j.add(("attempt", ctx.attempt, ctx.config["retries"]["limit"]))
            if ctx.attempt < 3:
                raise RuntimeError("not yet")
            return "ok"

        limit = j.data["limit"]  # read on every replay: what the code says now
        return step.do(
            "cfg", body, retries={"limit": limit, "delay": "1 minute", "backoff": "constant"}
        )


def test_config_resolved_on_first_attempt_is_reused(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    journal.data["limit"] = 5
    inst = rt.register(ConfigFromEnv, name="cfg", env=journal).create(id="c")
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"  # in a retry delay
    journal.data["limit"] = 0  # the code now asks for no retries: the stored config wins
    clock.advance("1 minute")
    clock.advance("1 minute")
    assert inst.wait(timeout=10).output == "ok"
    assert journal.entries == [("attempt", 1, 5), ("attempt", 2, 5), ("attempt", 3, 5)]
    (rec,) = inst.steps()
    assert rec.config is not None and rec.config["retries"]["limit"] == 5


class Restarted(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return step.do("only", lambda: "x")


def test_reopen_keeps_finished_status_and_history(make_runtime: Any, clock: FakeClock) -> None:
    rt1 = make_runtime()
    rt1.register(Restarted, name="fin").create(id="done").wait(timeout=10)
    rt1.close()
    rt2 = make_runtime()
    inst = rt2.register(Restarted, name="fin").get("done")
    assert inst.status() == af.InstanceStatus("complete", "x", None)
    assert history_types(inst, "WORKFLOW_") == [
        "WORKFLOW_QUEUED",
        "WORKFLOW_START",
        "WORKFLOW_SUCCESS",
    ]
