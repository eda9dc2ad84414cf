"""``inst.delete()`` and ``binding.delete_batch``: every record gone, the id reusable.

"Every record" is checked against storage itself: a snapshot of every
keyspace an instance can write to, taken before the instance existed, must
be what is left after it is deleted, while other instances stay where they are.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from conftest import Journal, history_types, instance_records, wait_for

import actorflow as af
from actorflow.testing import FakeClock
from actorflow.workflows.records import (
    KQUEUE,
    queue_db,
)


class Napper(af.Workflow):
    """One step, a long sleep, then an event."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        a = step.do("a", lambda: j.add(("a", event.instance_id)) or 1)
        step.sleep("nap", "1 hour")
        got = step.wait_for_event("go", "go", timeout="1 day").payload
        j.add(("end", event.instance_id))
        return [a, got]


class Gated(af.Workflow):
    """Step "body" blocks on the gate of its instance; "after" follows it."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body() -> str:
            j.add(("start", event.instance_id))
            j.block(event.instance_id)
            j.add(("body done", event.instance_id))
            return "done"

        step.do("body", body)
        step.do("after", lambda: j.add(("after", event.instance_id)))
        return "ok"


def test_a_deleted_instance_leaves_nothing_and_its_id_is_reusable(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    wf = rt.register(Napper, name="napper", env=journal)
    other = wf.create(id="neighbour")
    assert rt.wait_until_idle()
    before = instance_records(rt, "napper")
    inst = wf.create(id="x", params={"k": 1})
    assert rt.wait_until_idle()
    inst.send_event("unrelated", 1)  # a buffered event, never consumed
    assert inst.status().status == "waiting"
    assert instance_records(rt, "napper") != before
    inst.delete()
    assert instance_records(rt, "napper") == before
    with pytest.raises(af.InstanceNotFound, match="'x'"):
        wf.get("x")
    for call in (inst.status, inst.history, inst.steps, inst.pause, inst.delete):
        with pytest.raises(af.InstanceNotFound):
            call()
    with pytest.raises(af.InstanceNotFound):
        inst.send_event("go", 1)
    assert [i.id for i in wf.list()] == ["neighbour"]
    assert {k: v for k, v in wf.parts.query.counts("napper").items() if v} == {"waiting": 1}
    # Its sleep's deadline passes: nothing wakes, the runtime goes on.
    clock.advance("2 hours")
    assert rt.wait_until_idle()
    assert journal.count(("a", "x")) == 1
    again = wf.create(id="x")
    assert rt.wait_until_idle()
    assert journal.count(("a", "x")) == 2  # a new instance: its steps run again
    assert history_types(again).count("WORKFLOW_START") == 1
    clock.advance("2 hours")
    assert rt.wait_until_idle()
    for i in (again, other):
        i.send_event("go", 7)
        assert i.wait(timeout=10).output == [1, 7]


def test_deleting_a_running_instance_stops_it_and_its_step_never_lands(
    rt: af.Runtime, journal: Journal
) -> None:
    wf = rt.register(Gated, name="gated", env=journal)
    before = instance_records(rt, "gated")
    inst = wf.create(id="live")
    wait_for(lambda: journal.count(("start", "live")) == 1)
    assert inst.status().status == "running"
    inst.delete()
    assert instance_records(rt, "gated") == before
    journal.gate("live").set()  # the body returns after the delete
    wait_for(lambda: journal.count(("body done", "live")) == 1)
    assert rt.wait_until_idle()
    assert instance_records(rt, "gated") == before  # its result was refused, not written
    assert journal.count(("after", "live")) == 0
    assert wf.parts.supervisor.crash_count == 0
    assert wf.list() == []


def test_deleting_a_queued_instance_removes_its_queue_entry(
    make_runtime: Any, journal: Journal
) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=1))
    wf = rt.register(Gated, name="gated", env=journal)
    first = wf.create(id="first")
    wait_for(lambda: journal.count(("start", "first")) == 1)
    before = instance_records(rt, "gated")
    queued = wf.create(id="queued", key="tenant-1", priority=5)
    assert queued.status().status == "queued"
    assert rt.storage.scan(KQUEUE) != []  # a keyed instance is queued by its key too
    assert any(v.startswith(b"queued") for _, v in rt.storage.scan(queue_db("gated")))
    queued.delete()
    assert not any(v.startswith(b"queued") for _, v in rt.storage.scan(queue_db("gated")))
    assert instance_records(rt, "gated") == before
    journal.gate("first").set()
    assert first.wait(timeout=10).status == "complete"
    assert rt.wait_until_idle()
    assert journal.count(("start", "queued")) == 0
    assert [i.id for i in wf.list()] == ["first"]


@pytest.mark.parametrize("end", ["complete", "errored", "terminated", "paused"])
def test_any_status_can_be_deleted(rt: af.Runtime, clock: FakeClock, end: str) -> None:
    class Ends(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            if event.payload == "fail":
                step.do("boom", lambda: 1 / 0, retries={"limit": 0})
            step.sleep("nap", "1 hour")
            return 1

    wf = rt.register(Ends, name="ends")
    before = instance_records(rt, "ends")
    inst = wf.create(id="e", params="fail" if end == "errored" else None)
    assert rt.wait_until_idle()
    if end == "complete":
        clock.advance("2 hours")
        assert rt.wait_until_idle()
    elif end == "terminated":
        inst.terminate()
    elif end == "paused":
        inst.pause()
    assert inst.status().status == end
    inst.delete()
    assert instance_records(rt, "ends") == before
    clock.advance("2 hours")
    assert rt.wait_until_idle()
    assert instance_records(rt, "ends") == before


def test_delete_batch_reports_each_id(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Napper, name="napper", env=journal)
    made = [i.id for i in wf.create_batch([{"id": f"i{n}"} for n in range(5)])]
    assert rt.wait_until_idle()
    out = wf.delete_batch(["i0", "missing", "i1", "no spaces!", "i1", "i2"])
    assert out["deleted"] == ["i0", "i1", "i2"]
    assert [(e["id"], e["name"]) for e in out["errors"]] == [
        ("missing", "InstanceNotFound"),
        ("no spaces!", "InvalidInstanceId"),
    ]
    assert all("napper" in e["message"] for e in out["errors"])
    assert sorted(i.id for i in wf.list()) == made[3:]
    with pytest.raises(af.LimitExceeded, match=r"napper.*at most 100") as info:
        wf.delete_batch([f"i{n}" for n in range(101)])
    assert info.value.workflow == "napper"
    assert sorted(i.id for i in wf.list()) == made[3:]  # nothing was deleted
    assert wf.delete_batch(made[3:]) == {"deleted": made[3:], "errors": []}
    assert wf.list() == []


def test_delete_async(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Napper, name="napper", env=journal)

    async def main() -> dict[str, Any]:
        inst = await wf.create_async(id="a")
        await asyncio.to_thread(rt.wait_until_idle)
        await inst.delete_async()
        with pytest.raises(af.InstanceNotFound):
            await inst.status_async()
        await wf.create_async(id="b")
        return await wf.delete_batch_async(["b", "a"])

    out = asyncio.run(main())
    assert out["deleted"] == ["b"]
    assert [e["id"] for e in out["errors"]] == ["a"]


def test_deletes_racing_events_timers_and_runs_leave_nothing_half_deleted(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    wf = rt.register(Napper, name="napper", env=journal)
    keep = wf.create(id="keep")
    assert rt.wait_until_idle()
    before = instance_records(rt, "napper")
    ids = [f"r{n}" for n in range(60)]
    wf.create_batch([{"id": i} for i in ids])
    errors: list[BaseException] = []
    stop = threading.Event()

    def send() -> None:
        # Events for every instance, while they are being deleted: each is
        # buffered (the instance still exists) or refused as not found.
        while not stop.is_set():
            for i in ids:
                try:
                    wf.get(i).send_event("go", i)
                except af.InstanceNotFound:
                    pass
                except BaseException as e:  # anything else is a failure
                    errors.append(e)

    def tick() -> None:
        while not stop.is_set():
            clock.advance("10 minutes")  # sleeps falling due meanwhile

    threads = [threading.Thread(target=send), threading.Thread(target=tick)]
    for t in threads:
        t.start()
    try:
        for n in range(0, len(ids), 10):
            out = wf.delete_batch(ids[n : n + 10])
            assert out == {"deleted": ids[n : n + 10], "errors": []}
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert errors == []
    assert rt.wait_until_idle()
    assert instance_records(rt, "napper") == before
    assert [i.id for i in wf.list()] == ["keep"]
    clock.advance("2 hours")
    assert rt.wait_until_idle()
    keep.send_event("go", 1)
    assert keep.wait(timeout=10).output == [1, 1]
    assert wf.parts.supervisor.crash_count == 0
