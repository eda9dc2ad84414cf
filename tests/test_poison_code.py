"""Workflow code that raises or swallows what Python means as "stop".

A step body that calls ``sys.exit``, raises ``KeyboardInterrupt``,
``GeneratorExit`` or a ``CancelledError`` nobody asked for fails its step; it
never ends the engine loop, and the instance never loops through restarts.
User code that catches ``BaseException`` around a step cannot make the
engine report an end that was never written.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import Journal, history_types

import actorflow as af
from actorflow.testing import FakeClock


class Quick(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return step.do("one", lambda: 1) + 1


def _raise(exc: BaseException) -> Any:
    raise exc


_SIGNALS = {
    "sys.exit": lambda: sys.exit(3),
    "KeyboardInterrupt": lambda: _raise(KeyboardInterrupt()),
    "GeneratorExit": lambda: _raise(GeneratorExit()),
    "CancelledError": lambda: _raise(asyncio.CancelledError()),
}


class SyncPoison(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        step.do("before", lambda: j.add("before") or 1)

        def body() -> Any:
            j.add("poison")
            return _SIGNALS[event.payload]()

        return step.do("poison", body, retries={"limit": 3, "delay": 0})


class AsyncPoison(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        async def body() -> Any:
            j.add("poison")
            return _SIGNALS[event.payload]()

        sibling = step.do("sibling", lambda: j.add("sibling") or 2)
        return await asyncio.gather(sibling, step.do("poison", body, retries={"limit": 3}))


class AsyncRunSyncPoison(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body() -> Any:  # a sync body, in a step thread, under an async run
            j.add("poison")
            return _SIGNALS[event.payload]()

        sibling = step.do("sibling", lambda: j.add("sibling") or 2)
        return await asyncio.gather(sibling, step.do("poison", body, retries={"limit": 3}))


@pytest.mark.parametrize("cls", [SyncPoison, AsyncPoison, AsyncRunSyncPoison])
@pytest.mark.parametrize("signal", sorted(_SIGNALS))
def test_a_step_body_that_raises_a_stop_signal_fails_its_step_and_the_engine_goes_on(
    make_runtime: Any, journal: Journal, cls: type[af.Workflow], signal: str
) -> None:
    rt = make_runtime()
    wf = rt.register(cls, env=journal)
    inst = wf.create(id="p", params=signal)
    s = inst.wait(timeout=10)
    assert s.status == "errored"
    assert s.error is not None
    expected = "SystemExit" if signal == "sys.exit" else signal
    assert expected in s.error["message"]
    assert "'poison'" in s.error["message"]  # names the step
    assert journal.count("poison") == 1  # no retries: it means "stop", not "try again"
    (poison,) = [r for r in inst.steps() if r.name == "poison"]
    assert poison.status == "errored"
    # The runtime keeps working: the loop is alive and another instance completes.
    ok = rt.register(Quick).create(id="after")
    assert ok.wait(timeout=10).output == 2
    rt.close()
    # A reopen does not replay into the same exit: the instance stays errored.
    rt2 = make_runtime()
    rt2.register(cls, env=journal)
    assert rt2.wait_until_idle()
    assert rt2.workflow(cls.__name__).get("p").status().status == "errored"
    assert journal.count("poison") == 1


class ExitsInRun(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("a", lambda: 1)
        sys.exit("bye")


class AsyncCancelsItself(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        await step.do("a", lambda: 1)
        raise asyncio.CancelledError()


@pytest.mark.parametrize("cls", [ExitsInRun, AsyncCancelsItself])
def test_run_raising_a_stop_signal_outside_steps_errors_the_instance(
    rt: af.Runtime, cls: type[af.Workflow]
) -> None:
    inst = rt.register(cls).create(id="x")
    s = inst.wait(timeout=10)
    assert s.status == "errored", s
    assert s.error is not None and "run raised" in s.error["message"]
    assert "crashed" not in s.error["message"]
    assert rt.register(Quick).create().wait(timeout=10).output == 2


class SwallowsSleep(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        try:
            step.sleep("nap", "1 hour")
        except BaseException:  # the mistake under test
            j.add("swallowed")
            return "never written"
        return step.do("after", lambda: j.add("after") or "woke")


class SwallowsWaitAsync(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        try:
            ev = await step.wait_for_event("go", "go", timeout="1 hour")
        except:  # noqa: E722 - the mistake under test
            j.add("swallowed")
            return "never written"
        return await step.do("after", lambda: j.add("after") or ev.payload)


class SwallowsAndGoesOn(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        try:
            step.sleep("nap", "1 hour")
        except BaseException:  # the mistake under test
            j.add("swallowed")
        # A body here could never be checkpointed: it must not run while hibernated.
        return step.do("side effect", lambda: j.add("side effect") or "done")


@pytest.mark.parametrize("cls", [SwallowsSleep, SwallowsWaitAsync, SwallowsAndGoesOn])
def test_catching_base_exception_around_a_step_never_reports_an_unwritten_end(
    rt: af.Runtime, clock: FakeClock, journal: Journal, cls: type[af.Workflow]
) -> None:
    inst = rt.register(cls, env=journal).create(id="s")
    inst.wait_for_status("waiting")
    assert rt.wait_until_idle()
    assert journal.count("swallowed") == 1
    assert journal.count("side effect") == 0
    s = inst.status()
    assert s.status == "waiting" and s.output is None
    assert "WORKFLOW_SUCCESS" not in history_types(inst)
    if cls is SwallowsWaitAsync:
        inst.send_event("go", "woke")
    else:
        clock.advance("1 hour")
    s = inst.wait(timeout=10)
    assert s.status == "complete"
    assert s.output in ("woke", "done")
    assert history_types(inst).count("WORKFLOW_SUCCESS") == 1
    assert "INSTANCE_RECOVERED" not in history_types(inst)  # no crash on the way
    assert journal.count("side effect") <= 1


class Unserializable(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return step.do("lock", lambda: __import__("threading").Lock())


def test_a_step_result_that_cannot_be_serialized_leaves_a_failed_step_record(
    rt: af.Runtime,
) -> None:
    inst = rt.register(Unserializable).create(id="u")
    s = inst.wait(timeout=10)
    assert s.status == "errored" and s.error is not None
    assert s.error["name"] == "SerializationError" and "'lock'" in s.error["message"]
    (rec,) = inst.steps()
    assert rec.name == "lock" and rec.status == "errored"
    assert rec.error is not None and "not serializable" in rec.error["message"]
    assert len(rec.attempts) == 1


class KeepsStep(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        self.env.data["step"] = step
        return step.do("a", lambda: 1)


def test_a_step_called_after_run_ended_raises_a_named_error(
    rt: af.Runtime, journal: Journal
) -> None:
    inst = rt.register(KeepsStep, env=journal).create(id="k")
    assert inst.wait(timeout=10).output == 1
    with pytest.raises(af.InvalidInstanceState, match=r"'k'.*after run ended"):
        journal.data["step"].do("late", lambda: 2)
    assert [r.name for r in inst.steps()] == ["a"]


class Waits(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return step.wait_for_event("go", "go", timeout="1 hour").payload


def test_resume_of_a_finished_instance_raises(rt: af.Runtime) -> None:
    wf = rt.register(Waits)
    inst = wf.create(id="t")
    inst.wait_for_status("waiting")
    inst.terminate()
    with pytest.raises(af.InvalidInstanceState, match=r"cannot resume.*terminated"):
        inst.resume()
    done = wf.create(id="c")
    done.send_event("go", 1)
    assert done.wait(timeout=10).status == "complete"
    done.resume()  # no effect on a complete instance, as in Cloudflare
    assert done.status().status == "complete"
    running = wf.create(id="r")
    running.wait_for_status("waiting")
    running.resume()  # no effect while it waits
    assert running.status().status == "waiting"


def test_the_engine_loop_survives_a_stop_signal_from_a_task(tmp_path: Path) -> None:
    # The last line of defence: SystemExit escaping any task of the loop.
    with af.Runtime(tmp_path / "d") as rt:
        loop = rt._engine.loop  # noqa: SLF001 - runs a task on the engine loop itself

        async def escapes() -> None:
            raise SystemExit(9)

        loop.call_soon_threadsafe(lambda: loop.create_task(escapes()))
        assert rt.register(Quick).create().wait(timeout=10).output == 2
