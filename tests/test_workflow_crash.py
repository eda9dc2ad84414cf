"""Injected crashes: the supervisor restarts the instance from its last checkpoint."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Journal, history_types

import actorflow as af
from actorflow.testing import FakeClock


class Steps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        return [step.do(n, lambda n=n: j.add(n) or n.upper()) for n in ("a", "b", "c")]


class AsyncSteps(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        out = []
        for n in ("a", "b", "c"):
            out.append(await step.do(n, lambda n=n: j.add(n) or n.upper()))
        return out


@pytest.mark.parametrize("cls", [Steps, AsyncSteps])
@pytest.mark.parametrize(
    ("point", "b_runs"),
    [("before", 1), ("after_body", 2), ("after_commit", 1)],
)
def test_crash_restarts_from_the_checkpoint(
    rt: af.Runtime, journal: Journal, cls: type, point: str, b_runs: int
) -> None:
    wf = rt.register(cls, name="steps", env=journal)
    wf.modify("c1").crash_at("b", point)
    inst = wf.create(id="c1")
    assert inst.wait(timeout=10).output == ["A", "B", "C"]
    counts = journal.counts()
    assert counts["a"] == 1  # committed before the crash: never again
    assert counts["b"] == b_runs  # re-run only if its result was not yet committed
    assert counts["c"] == 1
    types = history_types(inst)
    assert types.count("INSTANCE_RECOVERED") == 1
    assert types.count("WORKFLOW_START") == 1
    assert types[-1] == "WORKFLOW_SUCCESS"
    assert [s.name for s in inst.steps()] == ["a", "b", "c"]
    assert rt.metrics().running == 0


def test_crash_at_is_per_instance(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Steps, name="steps", env=journal)
    wf.modify("crashy").crash_at("a", "after_body")
    crashy, calm = wf.create(id="crashy"), wf.create(id="calm")
    assert crashy.wait(timeout=10).status == calm.wait(timeout=10).status == "complete"
    assert "INSTANCE_RECOVERED" not in history_types(calm)
    assert journal.count("a") == 3  # twice for "crashy", once for "calm"


def test_repeated_crashes_end_in_errored(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(max_crashes=2)
    wf = rt.register(Steps, name="steps", env=journal)
    wf.modify("doomed").crash_at("b", "after_body", times=None)
    inst = wf.create(id="doomed")
    s = inst.wait(timeout=10)
    assert s.status == "errored"
    assert s.error is not None
    msg = s.error["message"]
    assert "3 times" in msg and "giving up" in msg and "'doomed'" in msg and "'b'" in msg
    assert journal.count("a") == 1
    assert journal.count("b") == 3  # the first run and two restarts
    assert history_types(inst)[-1] == "WORKFLOW_FAILURE"
    assert rt.wait_until_idle()
    assert rt.metrics().running == 0 and rt.metrics().live_instances == 0


def test_crash_before_the_first_attempt_then_retries(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    class Flaky(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            j: Journal = self.env

            def body(ctx: af.StepContext) -> int:
                j.add(ctx.attempt)
                if ctx.attempt < 3:
                    raise RuntimeError("flaky")
                return ctx.attempt

            return step.do(
                "flaky", body, retries={"limit": 5, "delay": "1 second", "backoff": "constant"}
            )

    wf = rt.register(Flaky, name="flaky", env=journal)
    wf.modify("f").crash_at("flaky", "before", times=1)
    inst = wf.create(id="f")
    assert rt.wait_until_idle()  # waits for the crash restart too
    assert journal.entries == [1]  # crashed before attempt 1, restarted, attempt 1 failed
    assert inst.status().status == "waiting"
    clock.advance("1 second")
    assert journal.entries == [1, 2]
    clock.advance("1 second")
    assert inst.wait(timeout=10).output == 3
    (rec,) = inst.steps()
    assert [a.attempt for a in rec.attempts] == [1, 2, 3]
    assert journal.entries == [1, 2, 3]


class SleepThenStep(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        step.do("a", lambda: j.add("a"))
        step.sleep("nap", "1 minute")
        return step.do("b", lambda: j.add("b") or "done")


def test_crash_after_a_wake_up(rt: af.Runtime, clock: FakeClock, journal: Journal) -> None:
    wf = rt.register(SleepThenStep, name="sts", env=journal)
    wf.modify("w").crash_at("b", "after_body")
    inst = wf.create(id="w")
    assert rt.wait_until_idle()
    clock.advance("1 minute")
    assert inst.wait(timeout=10).output == "done"
    assert journal.counts() == {"a": 1, "b": 2}
