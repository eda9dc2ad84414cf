"""Step retries, timeouts, non-retryable errors, result limits and the step limit."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from conftest import Journal, history_types

import actorflow as af
from actorflow.testing import FakeClock


class Defaults(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        kw = event.payload or {}
        return step.do("cfg", lambda ctx: ctx.config, **kw)


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            None,
            {
                "retries": {"limit": 5, "delay": 10_000, "backoff": "exponential"},
                "timeout": 600_000,
            },
        ),
        (
            {"retries": {"limit": 3, "delay": 500}},
            {"retries": {"limit": 3, "delay": 500, "backoff": "exponential"}, "timeout": 600_000},
        ),
        (
            {"retries": {"backoff": "linear"}, "timeout": "30 seconds"},
            {"retries": {"limit": 5, "delay": 10_000, "backoff": "linear"}, "timeout": 30_000},
        ),
        (
            {"config": {"timeout": 1234}},
            {"retries": {"limit": 5, "delay": 10_000, "backoff": "exponential"}, "timeout": 1234},
        ),
        (
            {"retries": af.RetryPolicy(2, "1 minute", "constant")},
            {"retries": {"limit": 2, "delay": 60_000, "backoff": "constant"}, "timeout": 600_000},
        ),
    ],
)
def test_config_defaults_and_partial_merge(rt: af.Runtime, kwargs: Any, expected: Any) -> None:
    s = rt.register(Defaults, name="defaults").create(params=kwargs).wait(timeout=10)
    assert s.output == expected


class AlwaysFails(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body(ctx: af.StepContext) -> None:
            j.add(ctx.attempt)
            raise RuntimeError(f"fail {ctx.attempt}")

        try:
            step.do("flaky", body, retries=event.payload)
        except RuntimeError as e:
            return str(e)
        return "no error"


@pytest.mark.parametrize(
    ("backoff", "waits"),
    [
        ("constant", [1000, 1000, 1000]),
        ("linear", [1000, 2000, 3000]),
        ("exponential", [1000, 2000, 4000]),
    ],
)
def test_retry_waits_follow_backoff(
    rt: af.Runtime, clock: FakeClock, journal: Journal, backoff: str, waits: list[int]
) -> None:
    wf = rt.register(AlwaysFails, name="fails", env=journal)
    inst = wf.create(params={"limit": 3, "delay": "1 second", "backoff": backoff})
    for n, wait in enumerate(waits, start=1):
        assert rt.wait_until_idle()
        assert inst.status().status == "waiting"  # a retry delay hibernates
        assert journal.entries == list(range(1, n + 1))
        clock.advance(wait - 1)
        assert journal.entries == list(range(1, n + 1))  # not a millisecond early
        clock.advance(1)
    assert inst.wait(timeout=10).output == "fail 4"
    assert journal.entries == [1, 2, 3, 4]
    failures = [e for e in inst.history() if e.type == "ATTEMPT_FAILURE"]
    assert [e.attempt for e in failures] == [1, 2, 3, 4]
    assert [e.data.get("retryDelayMs") for e in failures] == [*waits, None]
    assert failures[0].data["error"] == {"name": "RuntimeError", "message": "fail 1"}
    (rec,) = inst.steps()
    assert [a.retry_delay_ms for a in rec.attempts] == [*waits, None]


def test_attempts_are_numbered_from_one(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(AlwaysFails, name="fails", env=journal)
    s = wf.create(params={"limit": 2, "delay": 0}).wait(timeout=10)
    assert s.output == "fail 3"
    assert journal.entries == [1, 2, 3]


def test_default_retries_exhaust_after_six_attempts(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    inst = rt.register(AlwaysFails, name="fails", env=journal).create(params=None)
    assert rt.wait_until_idle()
    for wait_s in (10, 20, 40, 80, 160):
        clock.advance(f"{wait_s} seconds")
    assert inst.wait(timeout=10).output == "fail 6"
    assert journal.entries == [1, 2, 3, 4, 5, 6]


class NonRetryable(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body() -> None:
            j.add("attempt")
            raise af.NonRetryableError("card declined for good")

        return step.do("charge", body, retries={"limit": 5, "delay": 0})


def test_non_retryable_error_gives_one_attempt(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(NonRetryable, name="nonretry", env=journal).create()
    s = inst.wait(timeout=10)
    assert s.status == "errored"
    assert s.error == {"name": "NonRetryableError", "message": "card declined for good"}
    assert journal.count("attempt") == 1
    types = history_types(inst)
    assert types.count("ATTEMPT_START") == 1
    assert types[-3:] == ["ATTEMPT_FAILURE", "STEP_FAILURE", "WORKFLOW_FAILURE"]


class CaughtLimitZero(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        def body() -> None:
            raise ValueError("nope")

        try:
            step.do("once", body, retries={"limit": 0, "delay": "1 hour"})
        except ValueError:
            pass
        return step.do("next", lambda: "went on")


def test_limit_zero_failure_caught_lets_workflow_complete(rt: af.Runtime) -> None:
    inst = rt.register(CaughtLimitZero, name="limit0").create()
    assert inst.wait(timeout=10).output == "went on"
    types = history_types(inst)
    assert types.count("ATTEMPT_FAILURE") == 1
    assert types[-1] == "WORKFLOW_SUCCESS"


class Timeouts(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        async def slow_async() -> str:
            await asyncio.sleep(1)
            return "late"

        def slow_sync() -> str:
            time.sleep(0.3)
            j.add("sync body finished")
            return "late"

        body = slow_async if event.payload == "async" else slow_sync
        started = time.monotonic()
        try:
            await step.do("slow", body, retries={"limit": 1, "delay": 0}, timeout=50)
        except af.StepTimeoutError as e:
            j.add(("elapsed", time.monotonic() - started))
            return str(e)
        return "no timeout"


@pytest.mark.parametrize("kind", ["async", "sync"])
def test_timeout_fails_the_attempt(rt: af.Runtime, journal: Journal, kind: str) -> None:
    inst = rt.register(Timeouts, name="timeouts", env=journal).create(id="t", params=kind)
    s = inst.wait(timeout=10)
    assert s.status == "complete"
    assert "'slow'" in s.output and "'t'" in s.output and "timed out" in s.output
    (rec,) = inst.steps()
    assert [a.error["name"] for a in rec.attempts if a.error] == ["StepTimeoutError"] * 2
    (elapsed,) = [e[1] for e in journal.entries if isinstance(e, tuple)]
    assert elapsed < 0.55  # two attempts of 50 ms, not the bodies' full length
    if kind == "sync":
        # Documented: a sync body cannot be preempted; it keeps running to its end.
        deadline = time.monotonic() + 5
        while journal.count("sync body finished") < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert journal.count("sync body finished") == 2


class Exhausted(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body() -> None:
            j.add("try")
            raise ConnectionError("down")

        try:
            step.do("call", body, retries={"limit": 1, "delay": 0})
        except ConnectionError as e:
            return f"caught {e}"
        return "unreachable"


def test_exhausted_step_raises_its_last_error_into_run(rt: af.Runtime, journal: Journal) -> None:
    s = rt.register(Exhausted, name="exhausted", env=journal).create().wait(timeout=10)
    assert s.output == "caught down"
    assert journal.count("try") == 2


class BigResult(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        size = event.payload

        def body() -> bytes:
            j.add("body")
            return b"x" * size

        out = step.do("big", body, retries={"limit": 3, "delay": 0})
        return len(out)


def test_200kb_result_is_fine(rt: af.Runtime, journal: Journal) -> None:
    s = rt.register(BigResult, name="big", env=journal).create(params=200_000).wait(timeout=10)
    assert s == af.InstanceStatus("complete", 200_000, None)


def test_oversized_result_fails_without_retry(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(BigResult, name="big", env=journal).create(id="huge", params=(1 << 20) + 1)
    s = inst.wait(timeout=10)
    assert s.status == "errored"
    assert s.error is not None and s.error["name"] == "LimitExceeded"
    assert "'big'" in s.error["message"] and "'huge'" in s.error["message"]
    assert journal.count("body") == 1


class Unserializable(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body() -> Any:
            j.add("body")
            return threading.Lock()

        return step.do("lock it", body, retries={"limit": 3, "delay": 0})


def test_unserializable_result_fails_without_retry(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Unserializable, name="unser", env=journal).create(id="u")
    s = inst.wait(timeout=10)
    assert s.status == "errored"
    assert s.error is not None and s.error["name"] == "SerializationError"
    assert "'lock it'" in s.error["message"] and "'unser'" in s.error["message"]
    assert journal.count("body") == 1


class ManySteps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        for i in range(event.payload):
            step.do(f"s{i}", lambda i=i: j.add(i))
        return "done"


def test_step_limit(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_steps=3))
    wf = rt.register(ManySteps, name="many", env=journal)
    assert wf.create(id="three", params=3).wait(timeout=10).output == "done"
    s = wf.create(id="four", params=4).wait(timeout=10)
    assert s.status == "errored"
    assert s.error is not None and s.error["name"] == "LimitExceeded"
    assert "3 steps" in s.error["message"] and "'four'" in s.error["message"]
    assert journal.entries == [0, 1, 2, 0, 1, 2]  # exactly N steps ran


class MutateConfig(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body(ctx: af.StepContext) -> None:
            j.add(ctx.config["retries"]["limit"])
            ctx.config["retries"]["limit"] = 0
            ctx.config["timeout"] = 1
            raise RuntimeError("again")

        try:
            step.do("mut", body, retries={"limit": 2, "delay": 0})
        except RuntimeError:
            return "exhausted"
        return "no"


def test_mutating_ctx_config_changes_nothing(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(MutateConfig, name="mutate", env=journal).create()
    assert inst.wait(timeout=10).output == "exhausted"
    assert journal.entries == [2, 2, 2]
    (rec,) = inst.steps()
    assert rec.config == {
        "retries": {"limit": 2, "delay": 0, "backoff": "exponential"},
        "timeout": 600_000,
    }


class SameName(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return [
            step.do("same", lambda ctx: ctx.step.count),
            step.do("same", lambda ctx: ctx.step.count),
            step.do("other", lambda ctx: ctx.step.count),
        ]


def test_same_step_name_twice_counts_one_and_two(rt: af.Runtime) -> None:
    inst = rt.register(SameName, name="same").create()
    assert inst.wait(timeout=10).output == [1, 2, 1]
    assert [(s.name, s.count) for s in inst.steps()] == [("same", 1), ("same", 2), ("other", 1)]
