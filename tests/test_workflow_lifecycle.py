"""pause, resume, terminate, restart, and what a hibernated instance holds."""

from __future__ import annotations

import time
from typing import Any

import pytest
from conftest import Journal, history_types, wait_for

import actorflow as af
from actorflow.testing import FakeClock


class Gated(af.Workflow):
    """Step "a" blocks until the gate "a" opens; then "b" and "c" run."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body(name: str) -> Any:
            def run() -> str:
                j.add(("start", name))
                if name == "a":
                    j.block(f"{event.instance_id}:a")
                j.add(("end", name))
                return name.upper()

            return run

        return [step.do(n, body(n)) for n in ("a", "b", "c")]


def test_pause_waits_for_the_step_in_flight(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Gated, name="gated", env=journal).create(id="p")
    wait_for(lambda: journal.count(("start", "a")) == 1)
    assert inst.status().status == "running"
    inst.pause()
    assert inst.status().status == "waitingForPause"
    journal.gate("p:a").set()
    assert rt.wait_until_idle()
    assert inst.status().status == "paused"
    assert journal.entries == [("start", "a"), ("end", "a")]  # "b" never started
    types = history_types(inst)
    assert types.count("STEP_SUCCESS") == 1 and types[-1] == "WORKFLOW_PAUSED"
    inst.resume()
    assert inst.wait(timeout=10).output == ["A", "B", "C"]
    assert journal.count(("start", "a")) == 1
    assert "WORKFLOW_RESUMED" in history_types(inst)


def test_pause_then_resume_before_the_step_ends(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Gated, name="gated", env=journal).create(id="p")
    wait_for(lambda: journal.count(("start", "a")) == 1)
    inst.pause()
    assert inst.status().status == "waitingForPause"
    inst.resume()
    assert inst.status().status == "running"
    journal.gate("p:a").set()
    assert inst.wait(timeout=10).output == ["A", "B", "C"]
    assert "WORKFLOW_PAUSED" not in history_types(inst)


class TwoInFlight(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        import asyncio

        j: Journal = self.env

        def body(name: str) -> Any:
            def run() -> str:
                j.add(("start", name))
                j.block(name)
                return name

            return run

        both = await asyncio.gather(step.do("x", body("x")), step.do("y", body("y")))
        after = await step.do("after", lambda: j.add("after") or "after")
        return [*both, after]


def test_pause_lets_every_step_in_flight_finish(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(TwoInFlight, name="two", env=journal).create()
    wait_for(lambda: len(journal.entries) == 2)
    inst.pause()
    journal.gate("x").set()
    wait_for(lambda: [st.status for st in inst.steps() if st.name == "x"] == ["complete"])
    assert inst.status().status == "waitingForPause"  # "y" is still in flight
    journal.gate("y").set()
    assert rt.wait_until_idle()
    assert inst.status().status == "paused"
    assert history_types(inst).count("STEP_SUCCESS") == 2
    assert journal.count("after") == 0
    inst.resume()
    assert inst.wait(timeout=10).output == ["x", "y", "after"]


class SleepOrWait(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        j.add("run")
        if event.payload == "sleep":
            step.sleep("nap", "1 hour")
            return "slept"
        return step.wait_for_event("wait", "go", timeout="1 day").payload


def test_pause_during_sleep_is_immediate(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    inst = rt.register(SleepOrWait, name="sw", env=journal).create(params="sleep")
    assert rt.wait_until_idle()
    inst.pause()
    assert inst.status().status == "paused"
    clock.advance("2 hours")  # a paused instance does not wake
    assert inst.status().status == "paused"
    assert journal.count("run") == 1
    inst.resume()
    assert inst.wait(timeout=10).output == "slept"


def test_resume_before_the_sleep_ends_keeps_the_deadline(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    inst = rt.register(SleepOrWait, name="sw", env=journal).create(params="sleep")
    assert rt.wait_until_idle()
    clock.advance("10 minutes")
    inst.pause()
    assert inst.status().status == "paused"
    inst.resume()
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"
    clock.advance("50 minutes")
    assert inst.wait(timeout=10).output == "slept"


@pytest.mark.parametrize("send_while_paused", [False, True])
def test_pause_during_wait_for_event(
    rt: af.Runtime, journal: Journal, send_while_paused: bool
) -> None:
    inst = rt.register(SleepOrWait, name="sw", env=journal).create(params="wait")
    assert rt.wait_until_idle()
    inst.pause()
    assert inst.status().status == "paused"
    if send_while_paused:
        inst.send_event("go", "early")
        assert rt.wait_until_idle()
        assert inst.status().status == "paused"  # the event is buffered, not consumed
    inst.resume()
    if not send_while_paused:
        assert rt.wait_until_idle()
        assert inst.status().status == "waiting"
        inst.send_event("go", "late")
    assert inst.wait(timeout=10).output == ("early" if send_while_paused else "late")


def test_pause_and_resume_are_idempotent_and_checked(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(SleepOrWait, name="sw", env=journal).create(params="wait")
    assert rt.wait_until_idle()
    inst.resume()  # not paused: no effect
    assert inst.status().status == "waiting"
    inst.pause()
    inst.pause()
    assert inst.status().status == "paused"
    assert history_types(inst).count("WORKFLOW_PAUSED") == 1
    inst.terminate()
    with pytest.raises(af.InvalidInstanceState):
        inst.pause()


def test_paused_instance_survives_a_restart(
    make_runtime: Any, clock: FakeClock, journal: Journal
) -> None:
    rt1 = make_runtime()
    inst = rt1.register(SleepOrWait, name="sw", env=journal).create(id="pz", params="sleep")
    assert rt1.wait_until_idle()
    inst.pause()
    rt1.close()
    rt2 = make_runtime()
    inst = rt2.register(SleepOrWait, name="sw", env=journal).get("pz")
    clock.advance("2 hours")
    assert inst.status().status == "paused"
    inst.resume()
    assert inst.wait(timeout=10).output == "slept"


# -- terminate -------------------------------------------------------------------------


@pytest.mark.parametrize("params", ["ok", "fail", "terminated"])
def test_terminate_on_a_finished_instance_raises(
    rt: af.Runtime, journal: Journal, params: str
) -> None:
    class Quick(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            if event.payload == "fail":
                raise RuntimeError("boom")
            if event.payload == "terminated":
                step.sleep("nap", "1 hour")
            return "ok"

    inst = rt.register(Quick, name="quick").create(id="q", params=params)
    if params == "terminated":
        assert rt.wait_until_idle()
        inst.terminate()
    else:
        inst.wait(timeout=10)
    before = inst.status()
    with pytest.raises(af.InvalidInstanceState) as info:
        inst.terminate()
    assert "'q'" in str(info.value)
    assert inst.status() == before


def test_terminate_a_running_instance(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Gated, name="gated", env=journal).create(id="t")
    wait_for(lambda: journal.count(("start", "a")) == 1)
    inst.terminate()
    assert inst.status() == af.InstanceStatus("terminated", None, None)
    journal.gate("t:a").set()
    assert rt.wait_until_idle()
    assert inst.status().status == "terminated"
    assert journal.count(("start", "b")) == 0  # nothing ran after
    assert history_types(inst)[-1] == "WORKFLOW_TERMINATED"
    assert inst.wait(timeout=1).status == "terminated"


def test_terminate_a_waiting_instance(rt: af.Runtime, clock: FakeClock, journal: Journal) -> None:
    inst = rt.register(SleepOrWait, name="sw", env=journal).create(params="sleep")
    assert rt.wait_until_idle()
    inst.terminate()
    assert inst.status().status == "terminated"
    clock.advance("2 hours")
    assert inst.status().status == "terminated"
    assert journal.count("run") == 1
    assert rt.storage.count("timers") == 0  # its timer went with it


def test_terminate_a_queued_instance(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=1))
    wf = rt.register(Gated, name="gated", env=journal)
    first = wf.create(id="first")
    second = wf.create(id="second")
    wait_for(lambda: journal.count(("start", "a")) == 1)
    assert second.status().status == "queued"
    second.terminate()
    assert second.status().status == "terminated"
    journal.gate("first:a").set()
    assert first.wait(timeout=10).status == "complete"
    assert rt.wait_until_idle()
    assert second.status().status == "terminated"
    assert journal.count(("start", "a")) == 1  # the terminated one never started


# -- restart -------------------------------------------------------------------------


class Restartable(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        mode = j.data.get(event.instance_id, "ok")
        first = step.do("first", lambda: j.add("first") or "F")
        if mode == "fail":
            raise RuntimeError("failing on purpose")
        if mode == "block":
            step.do("blocked", lambda: j.block(event.instance_id))
        if mode == "sleep":
            step.sleep("nap", "1 hour")
        second = step.do("second", lambda: j.add("second") or "S")
        return [first, second, event.payload]


@pytest.mark.parametrize("state", ["complete", "errored", "terminated", "running", "paused"])
def test_restart_from_any_status(rt: af.Runtime, journal: Journal, state: str) -> None:
    wf = rt.register(Restartable, name="restart", env=journal)
    iid = f"r-{state}"
    journal.data[iid] = {
        "complete": "ok",
        "errored": "fail",
        "terminated": "sleep",
        "running": "block",
        "paused": "sleep",
    }[state]
    inst = wf.create(id=iid, params="P")
    if state == "running":
        # "first" committed (the run is started for good), "blocked" in flight.
        wait_for(
            lambda: (
                [st.status for st in inst.steps()] == ["complete"]
                and journal.count("first") == 1
                and inst.status().status == "running"
            )
        )
    else:
        assert rt.wait_until_idle()
    if state == "terminated":
        inst.terminate()
    elif state == "paused":
        inst.pause()
    if state in ("complete", "errored", "terminated", "paused"):
        assert inst.status().status == state
    journal.data[iid] = "ok"  # the new run goes straight through
    inst.restart()
    s = inst.wait(timeout=10)
    assert s == af.InstanceStatus("complete", ["F", "S", "P"], None)
    assert journal.count("first") == 2  # the steps ran again
    types = history_types(inst)
    assert types.count("WORKFLOW_START") == 2
    assert "WORKFLOW_RESTARTED" in types
    assert types[-1] == "WORKFLOW_SUCCESS"
    assert [(st.name, st.status) for st in inst.steps()] == [
        ("first", "complete"),
        ("second", "complete"),
    ]


class Checkpoints(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body(name: str) -> Any:
            def run() -> str:
                j.add(name)
                return f"{name}#{j.count(name)}"

            return run

        return [step.do(n, body(n)) for n in ("a", "checkpoint", "c")]


def test_restart_from_step_keeps_earlier_steps(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Checkpoints, name="cp", env=journal).create(id="cp")
    assert inst.wait(timeout=10).output == ["a#1", "checkpoint#1", "c#1"]
    inst.restart(from_step="checkpoint")
    assert inst.wait(timeout=10).output == ["a#1", "checkpoint#2", "c#2"]
    assert journal.counts() == {"a": 1, "checkpoint": 2, "c": 2}
    assert history_types(inst).count("WORKFLOW_START") == 2


def test_restart_from_an_unknown_step_raises(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Checkpoints, name="cp", env=journal).create(id="cp")
    inst.wait(timeout=10)
    with pytest.raises(af.InvalidInstanceState, match="not found"):
        inst.restart(from_step="nope")
    assert inst.status().status == "complete"


def test_restart_forgets_buffered_events(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(SleepOrWait, name="sw", env=journal).create(params="sleep")
    assert rt.wait_until_idle()
    inst.send_event("go", "stale")
    inst.restart()
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"
    assert rt.storage.count("events") == 0


# -- hibernation ----------------------------------------------------------------------


class Hibernates(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        j.add("enter")
        try:
            kind = event.payload
            if kind == "sleep":
                step.sleep("nap", "1 hour")
            elif kind == "retry":

                def flaky(ctx: af.StepContext) -> str:
                    if ctx.attempt == 1:
                        raise RuntimeError("once")
                    return "ok"

                step.do("flaky", flaky, retries={"limit": 1, "delay": "1 hour"})
            else:
                step.wait_for_event("wait", "go", timeout="1 hour")
            return kind
        finally:
            j.add("exit")


@pytest.mark.parametrize("kind", ["sleep", "retry", "wait"])
def test_waiting_instance_holds_no_actor_and_no_thread(
    rt: af.Runtime, clock: FakeClock, journal: Journal, kind: str
) -> None:
    inst = rt.register(Hibernates, name="hib", env=journal).create(id="h", params=kind)
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"
    assert rt.metrics().live_instances == 0
    assert rt.metrics().running == 0
    # The run thread left ``run`` (unwound), so it holds no thread.
    assert journal.entries == ["enter", "exit"]
    if kind == "wait":
        inst.send_event("go")
    else:
        clock.advance("1 hour")
    assert inst.wait(timeout=10).output == kind
    assert journal.entries == ["enter", "exit", "enter", "exit"]


def test_pause_a_queued_instance(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=1))
    wf = rt.register(Gated, name="gated", env=journal)
    first, second = wf.create(id="first"), wf.create(id="second")
    wait_for(lambda: journal.count(("start", "a")) == 1)
    second.pause()
    assert second.status().status == "paused"
    journal.gate("first:a").set()
    journal.gate("second:a").set()
    assert first.wait(timeout=10).status == "complete"
    assert rt.wait_until_idle()
    assert second.status().status == "paused"  # the free slot did not start it
    assert journal.count(("start", "a")) == 1
    second.resume()
    assert second.wait(timeout=10).output == ["A", "B", "C"]


class LastStepGated(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        step.do("a", lambda: "a")

        def last() -> str:
            j.add("last started")
            j.block("last")
            return "done"

        return step.do("last", last)


def hold_final_write(rt: af.Runtime) -> tuple[Any, Any]:
    """Holds the batch that writes "complete" in the storage writer until released."""
    import threading

    from actorflow.workflows.records import INST, load

    holding, release = threading.Event(), threading.Event()

    def fault(batch: Any) -> None:
        for _kind, ks, _key, value in batch.ops:
            if ks == INST and value and load(value)["s"] == "complete":
                holding.set()
                release.wait(5)

    rt.storage.set_fault(fault)
    return holding, release


@pytest.mark.parametrize("call", ["pause", "resume"])
def test_pause_or_resume_while_the_end_is_written(
    rt: af.Runtime, journal: Journal, call: str
) -> None:
    """A pause or resume that arrives once run() returned must not outlive the end."""
    import threading

    inst = rt.register(LastStepGated, name="gated_end", env=journal).create(id="e")
    wait_for(lambda: journal.count("last started") == 1)  # "last" is in flight
    if call == "resume":
        inst.pause()  # "last" is in flight: waitingForPause
        assert inst.status().status == "waitingForPause"
    holding, release = hold_final_write(rt)
    journal.gate("last").set()  # the run returns; its end is being written
    assert holding.wait(5)
    caller = threading.Thread(target=getattr(inst, call))
    caller.start()
    time.sleep(0.2)  # the call reaches the instance while the end is held
    release.set()
    caller.join(5)
    rt.storage.set_fault(None)
    assert inst.wait(timeout=10) == af.InstanceStatus("complete", "done", None)
    assert rt.wait_until_idle()
    assert inst.status() == af.InstanceStatus("complete", "done", None)
    assert history_types(inst)[-1] == "WORKFLOW_SUCCESS"
