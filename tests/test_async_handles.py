"""Async handles: create, create_batch, status, send_event and wait from a coroutine."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from conftest import Journal, wait_for

import actorflow as af
from actorflow.testing import Faults


class Approve(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("charge", lambda: "ch")
        return step.wait_for_event("approval", "approved", timeout="1 hour").payload


def test_a_thousand_coroutines_share_group_commits(rt: af.Runtime) -> None:
    wf = rt.register(Approve)
    commits: list[int] = []
    wf.parts.storage.add_after_batch(lambda: commits.append(1))

    async def main() -> list[af.Instance]:
        return await asyncio.gather(*(wf.create_async(id=f"a{n}", params=n) for n in range(1000)))

    made = asyncio.run(main())
    assert [i.id for i in made] == [f"a{n}" for n in range(1000)]
    assert {i.id for i in wf.list(limit=None)} == {f"a{n}" for n in range(1000)}
    # 1,000 creations in far fewer commits: they were grouped, not written one by one.
    assert len(commits) < 100, len(commits)
    for inst in made[:5]:
        inst.wait_for_status("waiting")


def test_the_loop_runs_on_while_a_creation_commits(rt: af.Runtime) -> None:
    wf = rt.register(Approve)
    ticks = 0

    async def ticker(stop: asyncio.Event) -> None:
        nonlocal ticks
        while not stop.is_set():
            ticks += 1
            await asyncio.sleep(0.005)

    async def main() -> af.Instance:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        with Faults(rt).slow_writes(300):
            inst = await wf.create_async(id="slow")
        stop.set()
        await tick
        return inst

    inst = asyncio.run(main())
    assert ticks >= 10  # the ticker ran while the commit took 300 ms
    assert inst.status().status in ("queued", "running", "waiting")


def test_wait_send_event_and_status_async(rt: af.Runtime) -> None:
    wf = rt.register(Approve)

    async def main() -> tuple[str, af.InstanceStatus, af.InstanceStatus]:
        inst = await wf.create_async(id="o1")
        with pytest.raises(TimeoutError):
            await inst.wait_async(timeout=0.2)
        while (await inst.status_async()).status != "waiting":
            await asyncio.sleep(0.01)
        waiting = await inst.status_async()
        waiter = asyncio.create_task(inst.wait_async(timeout=10))
        await inst.send_event_async("approved", {"by": "ann"})
        return waiting.status, await waiter, await inst.status_async()

    waiting, done, again = asyncio.run(main())
    assert waiting == "waiting"
    assert done == again == af.InstanceStatus("complete", {"by": "ann"}, None)


def test_async_creation_errors_name_the_workflow_and_write_nothing(rt: af.Runtime) -> None:
    wf = rt.register(Approve, name="approve")
    wf.create(id="taken")

    async def main() -> None:
        with pytest.raises(af.InstanceAlreadyExists, match=r"'approve'.*'taken'"):
            await wf.create_async(id="taken")
        with pytest.raises(af.InvalidInstanceId):
            await wf.create_async(id="not ok/")
        with pytest.raises(af.SerializationError, match="'approve'"):
            await wf.create_async(id="bad-params", params=threading.Lock())
        made = await wf.create_batch_async([{"id": "b1"}, {"id": "taken"}, {"id": "b2"}])
        assert [i.id for i in made] == ["b1", "b2"]
        with pytest.raises(af.InstanceNotFound):
            await wf.get("nope").status_async()

    asyncio.run(main())
    with pytest.raises(af.InstanceNotFound):
        wf.get("bad-params")
    assert wf.create(id="after").id == "after"  # the runtime works on


def test_a_cancelled_creation_still_starts_once_committed(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Approve)
    wf.create(id="first")  # reserves a block of record numbers: the next ones need no write

    async def main() -> None:
        with Faults(rt).slow_writes(200):
            task = asyncio.create_task(wf.create_async(id="c1"))
            await asyncio.sleep(0.05)  # the batch is in the writer's hands
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(main())
    # The write was already submitted: once it lands, the instance runs like any other.
    wait_for(lambda: "c1" in {i.id for i in wf.list()})
    assert wf.get("c1").wait_for_status("waiting").status == "waiting"
