"""send_event: buffering, FIFO per type, waking hibernated instances, timeouts."""

from __future__ import annotations

from typing import Any

import pytest
from conftest import Journal, history_types

import actorflow as af
from actorflow.testing import FakeClock


class SleepThenWait(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.sleep("nap", "1 hour")
        a = step.wait_for_event("first", "item", timeout="1 hour")
        b = step.wait_for_event("second", "item", timeout="1 hour")
        c = step.wait_for_event("other", "other-type", timeout="1 hour")
        return [a.payload, b.payload, c.payload]


def test_events_sent_before_the_wait_are_buffered_fifo(rt: af.Runtime, clock: FakeClock) -> None:
    inst = rt.register(SleepThenWait, name="buffered").create(id="b")
    assert rt.wait_until_idle()
    inst.send_event("other-type", "O")
    inst.send_event("item", 1)
    inst.send_event("item", 2)
    inst.send_event("item", 3)  # left over
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"  # events do not end a sleep
    clock.advance("1 hour")
    assert inst.wait(timeout=10).output == [1, 2, "O"]


class Wait(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        j.add("run")
        ev = step.wait_for_event("approval", "approved", timeout="1 day")
        return ev.payload


def test_event_wakes_a_hibernated_instance(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Wait, name="wait", env=journal).create(id="h")
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"
    assert rt.metrics().live_instances == 0  # hibernated: no live actor
    inst.send_event("approved", {"by": "ann"})
    assert inst.wait(timeout=10).output == {"by": "ann"}
    assert journal.count("run") == 2


def test_event_of_another_type_does_not_wake(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Wait, name="wait", env=journal).create(id="h")
    assert rt.wait_until_idle()
    inst.send_event("rejected", 1)
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"
    assert journal.count("run") == 1  # not even replayed
    inst.send_event("approved", 2)
    assert inst.wait(timeout=10).output == 2


class ThreeWaits(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        out = []
        for name in ("w1", "w2", "w3"):
            try:
                out.append(step.wait_for_event(name, "tick", timeout="10 minutes").payload)
            except af.EventTimeoutError as e:
                out.append(f"timeout: {e}")
        return out


def test_timed_out_wait_does_not_take_later_events(rt: af.Runtime, clock: FakeClock) -> None:
    inst = rt.register(ThreeWaits, name="three").create(id="t")
    assert rt.wait_until_idle()
    inst.send_event("tick", "one")
    assert rt.wait_until_idle()
    clock.advance("10 minutes")  # w2 times out
    assert inst.status().status == "waiting"
    inst.send_event("tick", "three")
    out = inst.wait(timeout=10).output
    assert out[0] == "one" and out[2] == "three"
    assert out[1].startswith("timeout:") and "'w2'" in out[1] and "'t'" in out[1]
    types = history_types(inst, "WAIT_")
    assert types.count("WAIT_COMPLETE") == 2 and types.count("WAIT_TIMED_OUT") == 1
    assert [(s.name, s.status) for s in inst.steps()] == [
        ("w1", "complete"),
        ("w2", "errored"),
        ("w3", "complete"),
    ]


def test_wait_timeout_uncaught_errors_the_instance(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    inst = rt.register(Wait, name="wait", env=journal).create(id="late")
    assert rt.wait_until_idle()
    clock.advance("23 hours")
    assert inst.status().status == "waiting"
    clock.advance("1 hour")
    s = inst.wait(timeout=10)
    assert s.status == "errored"
    assert s.error is not None and s.error["name"] == "EventTimeoutError"
    assert "'approval'" in s.error["message"]
    # An event arriving after the timeout is refused: the instance is finished.
    with pytest.raises(af.InvalidInstanceState):
        inst.send_event("approved", 1)


class Finished(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        if event.payload == "fail":
            raise RuntimeError("x")
        return "ok"


@pytest.mark.parametrize("params", ["ok", "fail", "terminate"])
def test_send_to_a_finished_instance_raises(rt: af.Runtime, params: str) -> None:
    wf = rt.register(Finished, name="fin")
    if params == "terminate":
        inst = rt.register(Wait, name="wait", env=Journal()).create(id="x")
        assert rt.wait_until_idle()
        inst.terminate()
    else:
        inst = wf.create(id="x", params=params)
        inst.wait(timeout=10)
    with pytest.raises(af.InvalidInstanceState) as info:
        inst.send_event("anything", 1)
    assert "'x'" in str(info.value)


def test_send_event_validates_type_and_payload(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_event_payload_bytes=100))
    inst = rt.register(Wait, name="wait", env=journal).create(id="v")
    with pytest.raises(ValueError, match="invalid event type"):
        inst.send_event("has.dot", 1)
    with pytest.raises(ValueError, match="invalid event type"):
        inst.send_event("x" * 101, 1)
    with pytest.raises(af.LimitExceeded, match="'v'"):
        inst.send_event("approved", "x" * 200)
    with pytest.raises(af.InstanceNotFound):
        af.Instance(rt.workflow("wait"), "ghost").send_event("approved", 1)
    inst.send_event("approved", "small")
    assert inst.wait(timeout=10).output == "small"


class WaitBadType(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.wait_for_event("w", "bad.type")


def test_wait_for_event_rejects_a_bad_type(rt: af.Runtime) -> None:
    s = rt.register(WaitBadType, name="badtype").create(id="b").wait(timeout=10)
    assert s.status == "errored"
    assert s.error is not None and "invalid event type" in s.error["message"]
    assert "'w'" in s.error["message"]


class AsyncWaits(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        first = await step.wait_for_event("a", "a-type", timeout="1 hour")
        second = await step.wait_for_event("b", "b-type", timeout="1 hour")
        return [first.payload, second.payload]


def test_sequential_events_of_different_types(rt: af.Runtime) -> None:
    inst = rt.register(AsyncWaits, name="seq").create()
    assert rt.wait_until_idle()
    inst.send_event("b-type", "B")  # buffered until the second wait
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"
    inst.send_event("a-type", "A")
    assert inst.wait(timeout=10).output == ["A", "B"]


class ParallelWaits(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        import asyncio

        evs = await asyncio.gather(
            step.wait_for_event("x", "same", timeout="1 hour"),
            step.wait_for_event("y", "same", timeout="1 hour"),
        )
        return sorted(e.payload for e in evs)


def test_each_event_satisfies_one_waiter(rt: af.Runtime) -> None:
    inst = rt.register(ParallelWaits, name="pw").create()
    assert rt.wait_until_idle()
    inst.send_event("same", 1)
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"  # one waiter still open
    inst.send_event("same", 2)
    assert inst.wait(timeout=10).output == [1, 2]


def test_event_sent_to_a_queued_instance_is_kept(
    make_runtime: Any, clock: FakeClock, journal: Journal
) -> None:
    rt = make_runtime(limits=af.Limits(max_creation_rate=1, burst=1))
    wf = rt.register(Wait, name="wait", env=journal)
    first, second = wf.create(id="first"), wf.create(id="second")
    assert rt.wait_until_idle()
    assert second.status().status == "queued"  # throttled: not started yet
    second.send_event("approved", "early bird")
    first.send_event("approved", "on time")
    clock.advance("1 second")
    assert second.wait(timeout=10).output == "early bird"
    assert first.wait(timeout=10).output == "on time"
