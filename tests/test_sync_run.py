"""A plain ``def run`` runs as a greenlet on the engine loop, and moves to a thread if it blocks it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any

import pytest
from conftest import Journal, wait_for

import actorflow as af
from actorflow.core.threadcalls import STUCK_S, ThreadCalls

# Longer than the engine's limit for a slice of a run on the loop (0.25 s).
BLOCK_S = 0.4


class Gathered(af.Workflow):
    """Each instance's one step blocks on a gate until the test opens it."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> str:
        def body() -> str:
            self.env.add(("in", event.instance_id))
            self.env.block("go")
            return event.instance_id

        return str(step.do("held", body))


def test_a_def_run_waiting_for_its_step_holds_no_thread(
    make_runtime: Any, journal: Journal
) -> None:
    # Two run threads: runs held in threads would let only two bodies in at once.
    rt = make_runtime(run_threads=2)
    wf = rt.register(Gathered, env=journal)
    insts = [wf.create() for _ in range(20)]
    wait_for(lambda: sum(1 for e in journal.entries if e[0] == "in") == 20, timeout=20)
    journal.gate("go").set()
    for inst in insts:
        assert inst.wait(20).output == inst.id


class Blocking(af.Workflow):
    """Blocks outside its steps for ``payload["sleep"]`` s, or on the gate ``payload["gate"]``."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        iid = event.instance_id
        journal = self.env

        def first() -> int:
            journal.add(("a", iid))
            return 1

        total = int(step.do("a", first))
        if event.payload.get("sleep"):
            time.sleep(event.payload["sleep"])
        if event.payload.get("gate"):
            journal.block(event.payload["gate"])
        journal.add(("after", iid, threading.current_thread().name))
        return total + int(step.do("b", lambda: 2))


class Quick(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        return int(step.do("one", lambda: 1))


def test_a_def_run_that_blocks_the_loop_is_named_and_moved_to_a_thread(
    rt: af.Runtime, journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="actorflow.engine")
    wf = rt.register(Blocking, name="blocking", env=journal)
    quick = rt.register(Quick, name="quick")
    first = wf.create(params={"sleep": BLOCK_S})
    assert first.wait(20).output == 3
    held = [r for r in caplog.records if "has held the engine loop" in r.getMessage()]
    moved = [
        r
        for r in caplog.records
        if "starts again from its checkpoint on a thread" in r.getMessage()
    ]
    assert held and moved, caplog.text
    for record in held + moved:
        assert "workflow 'blocking'" in record.getMessage()
        assert f"instance '{first.id}'" in record.getMessage()
    # It ran again from its checkpoint on a thread: its committed step did not.
    assert journal.count(("a", first.id)) == 1
    after = [e for e in journal.entries if e[0] == "after" and e[1] == first.id]
    assert after and after[-1][2].startswith("actorflow-run")

    # The workflow's later runs take threads: one blocked outside its steps holds no one else.
    stuck = wf.create(params={"gate": "stuck"})
    wait_for(lambda: journal.count(("a", stuck.id)) == 1, timeout=20)
    assert quick.create().wait(20).output == 1
    assert stuck.status().status == "running"
    journal.gate("stuck").set()
    assert stuck.wait(20).output == 3
    assert journal.count(("a", stuck.id)) == 1


class Loopless(af.Workflow):
    """Code in run sees no running loop, as in a thread; it may run one of its own."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> list[Any]:
        try:
            asyncio.get_running_loop()
            seen = "a running loop"
        except RuntimeError:
            seen = "no running loop"

        async def twice(x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

        doubled = asyncio.run(twice(int(step.do("x", lambda: 21))))
        return [seen, doubled]


def test_code_in_a_def_run_sees_no_running_loop(rt: af.Runtime) -> None:
    wf = rt.register(Loopless)
    assert wf.create().wait(20).output == ["no running loop", 42]


class Child(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return step.wait_for_event("go", "go", timeout="1 hour").payload


class Parent(af.Workflow):
    """Calls another instance's handle in run itself, outside its steps."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        child_id = step.do("make", lambda: self.env.create(id=f"{event.instance_id}-child").id)
        child = self.env.get(child_id)
        if child.status().status != "complete":
            child.send_event("go", event.payload)
        return child.wait(20).output


def test_handles_called_in_a_def_run_outside_its_steps(rt: af.Runtime) -> None:
    child = rt.register(Child, name="child")
    parent = rt.register(Parent, name="parent", env=child)
    insts = [parent.create(params=i) for i in range(10)]
    assert [inst.wait(30).output for inst in insts] == list(range(10))


class Starter(af.DurableObject):
    """Starts a child instance and waits for it, on the object's own thread."""

    def start_and_wait(self, child_id: str, payload: Any) -> Any:
        child = self.env.create(id=child_id)
        child.send_event("go", payload)
        return child.wait(20).output


class ViaObject(af.Workflow):
    """Calls a Durable Object in run itself, outside its steps, both ways."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> list[Any]:
        stub = self.env.get_by_name(event.instance_id)
        first = stub.start_and_wait(f"{event.instance_id}-a", 1)
        second = stub.start_and_wait.future(f"{event.instance_id}-b", 2).get(timeout=20)
        return [first, second, step.do("done", lambda: 3)]


def test_durable_objects_called_in_a_def_run_outside_its_steps(rt: af.Runtime) -> None:
    child = rt.register(Child, name="child")
    starters = rt.durable_objects(Starter, name="starters", env=child)
    wf = rt.register(ViaObject, name="via", env=starters)
    insts = [wf.create() for _ in range(5)]
    assert [inst.wait(30).output for inst in insts] == [[1, 2, 3]] * 5


class Threads(af.Workflow):
    """Calls steps from threads it starts, and blocks outside its steps until they end."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> list[int]:
        iid = event.instance_id
        journal = self.env

        def call(i: int) -> int:
            def body() -> int:
                journal.add(("t", iid, i))
                return i

            return int(step.do(f"t{i}", body))

        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            return list(pool.map(call, range(3)))


def test_a_def_run_waiting_on_the_loop_for_its_own_threads_moves_to_a_thread(
    rt: af.Runtime, journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="actorflow.engine")
    wf = rt.register(Threads, env=journal)
    inst = wf.create()
    assert inst.wait(30).output == [0, 1, 2]
    assert "starts again from its checkpoint on a thread" in caplog.text
    assert sorted(journal.entries) == [("t", inst.id, i) for i in range(3)]
    assert wf.create().wait(30).output == [0, 1, 2]


# -- ThreadCalls, where sync step bodies run ------------------------------------------


@pytest.fixture
def loop() -> Any:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def test_thread_calls_run_short_calls_beside_a_stuck_one(loop: asyncio.AbstractEventLoop) -> None:
    calls = ThreadCalls(4, loop, "test-calls")
    gate = threading.Event()

    async def main() -> list[Any]:
        stuck = calls.call(lambda: gate.wait(10) and "stuck")
        quick = [calls.call(lambda i=i: (i, threading.current_thread().name)) for i in range(50)]
        done = await asyncio.wait_for(asyncio.gather(*quick), 5)
        assert not stuck.done()
        gate.set()
        return [await stuck, *done]

    try:
        out = loop.run_until_complete(main())
    finally:
        calls.close()
    assert out[0] == "stuck"
    assert [i for i, _ in out[1:]] == list(range(50))
    assert {name for _, name in out[1:]} <= {"test-calls"}


def test_thread_calls_use_at_most_their_threads(loop: asyncio.AbstractEventLoop) -> None:
    calls = ThreadCalls(3, loop, "test-calls")
    lock = threading.Lock()
    running = [0, 0]  # now, most at once

    def slow() -> None:
        with lock:
            running[0] += 1
            running[1] = max(running)
        time.sleep(10 * STUCK_S)
        with lock:
            running[0] -= 1

    async def main() -> None:
        await asyncio.gather(*(calls.call(slow) for _ in range(12)))

    try:
        loop.run_until_complete(main())
    finally:
        calls.close()
    assert running[1] == 3


def test_thread_calls_hand_back_errors_and_skip_calls_given_up(
    loop: asyncio.AbstractEventLoop,
) -> None:
    calls = ThreadCalls(1, loop, "test-calls")
    gate = threading.Event()
    ran: list[str] = []

    async def main() -> None:
        first = calls.call(lambda: gate.wait(10))
        given_up = calls.call(lambda: ran.append("given up"))
        failing = calls.call(lambda: 1 // 0)
        given_up.cancel()
        gate.set()
        await first
        with pytest.raises(ZeroDivisionError):
            await failing

    try:
        loop.run_until_complete(main())
    finally:
        calls.close()
    assert ran == []
    with pytest.raises(RuntimeError, match="closed"):
        calls.call(lambda: None)
