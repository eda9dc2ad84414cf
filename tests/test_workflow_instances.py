"""Instances: register, create (ids), create_batch, get, list, status and wait."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from conftest import Journal

import actorflow as af
from actorflow.testing import FakeClock


class Echo(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return event.payload


class Blocks(af.Workflow):
    """Waits for an event named by the params; so it stays ``waiting``."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return step.wait_for_event("wait", "go", timeout="1 day").payload


class Fails(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        raise LookupError("no such order")


def test_register_and_lookup(rt: af.Runtime) -> None:
    wf = rt.register(Echo, name="echo")
    assert rt.workflow("echo") is wf
    assert rt.register(Echo, name="echo") is wf  # idempotent
    assert rt.register(Echo) is rt.workflow("Echo")  # defaults to the class name
    assert set(rt.workflows) == {"echo", "Echo"}
    with pytest.raises(ValueError, match="another class"):
        rt.register(Blocks, name="echo")
    with pytest.raises(KeyError, match="nope"):
        rt.workflow("nope")
    with pytest.raises(ValueError, match="invalid workflow name"):
        rt.register(Echo, name="bad name!")


@pytest.mark.parametrize("bad", ["", "-lead", "has space", "dot.ted", "x" * 101, "é"])
def test_invalid_ids_are_rejected(rt: af.Runtime, bad: str) -> None:
    wf = rt.register(Echo, name="echo")
    with pytest.raises(af.InvalidInstanceId) as info:
        wf.create(id=bad)
    assert "'echo'" in str(info.value)
    assert wf.list() == []


def test_valid_ids(rt: af.Runtime) -> None:
    wf = rt.register(Echo, name="echo")
    for good in ("a", "_x", "A-b_9", "9" * 100):
        assert wf.create(id=good, params=good).wait(timeout=10).output == good


def test_duplicate_id_raises(rt: af.Runtime) -> None:
    wf = rt.register(Echo, name="echo")
    wf.create(id="dup", params=1).wait(timeout=10)
    with pytest.raises(af.InstanceAlreadyExists) as info:
        wf.create(id="dup", params=2)
    assert "'dup'" in str(info.value) and "'echo'" in str(info.value)
    assert wf.get("dup").status().output == 1  # untouched


def test_create_without_id_makes_a_uuid(rt: af.Runtime) -> None:
    wf = rt.register(Echo, name="echo")
    a, b = wf.create(params=1), wf.create(params=2)
    assert a.id != b.id
    assert str(uuid.UUID(a.id)) == a.id and uuid.UUID(a.id).version == 4
    # Ids come from a pool refilled every 256: across refills they stay valid and unique.
    ids = [i.id for i in wf.create_batch([{"params": n} for n in range(600)])]
    assert len(set(ids) | {a.id, b.id}) == 602
    for i in ids:
        u = uuid.UUID(i)
        assert (str(u), u.version, u.variant) == (i, 4, uuid.RFC_4122)


def test_create_batch_skips_existing_ids(rt: af.Runtime) -> None:
    wf = rt.register(Echo, name="echo")
    wf.create(id="b", params="old").wait(timeout=10)
    made = wf.create_batch(
        [
            {"id": "a", "params": 1},
            {"id": "b", "params": 2},
            {"params": 3},
            {"id": "a", "params": 4},
        ]
    )
    assert [i.id for i in made][:1] == ["a"]
    assert len(made) == 2 and "b" not in [i.id for i in made]
    assert [i.wait(timeout=10).output for i in made] == [1, 3]
    assert wf.get("b").status().output == "old"
    with pytest.raises(ValueError, match="at least one"):
        wf.create_batch([])


def test_get_unknown_raises(rt: af.Runtime) -> None:
    wf = rt.register(Echo, name="echo")
    with pytest.raises(af.InstanceNotFound) as info:
        wf.get("ghost")
    assert "'ghost'" in str(info.value) and "'echo'" in str(info.value)
    with pytest.raises(af.InvalidInstanceId):
        wf.get("not valid")


def test_instances_of_other_workflows_are_not_visible(rt: af.Runtime) -> None:
    a, b = rt.register(Echo, name="a"), rt.register(Echo, name="b")
    a.create(id="only-in-a").wait(timeout=10)
    with pytest.raises(af.InstanceNotFound):
        b.get("only-in-a")
    assert b.list() == []


def test_list_filters_orders_and_pages(rt: af.Runtime, clock: FakeClock) -> None:
    echo = rt.register(Echo, name="mixed")
    ids = [f"i{n}" for n in range(6)]
    for iid in ids:
        echo.create(id=iid).wait(timeout=10)
        clock.advance(1)  # distinct creation times
    newest_first = list(reversed(ids))
    assert [i.id for i in echo.list()] == newest_first
    assert [i.id for i in echo.list(status="complete")] == newest_first
    assert echo.list(status="running") == []
    page1 = echo.list(limit=4)
    assert [i.id for i in page1] == newest_first[:4]
    page2 = echo.list(limit=4, cursor=page1[-1].id)
    assert [i.id for i in page2] == newest_first[4:]
    with pytest.raises(ValueError, match="unknown status"):
        echo.list(status="done")


def test_list_by_status(rt: af.Runtime, clock: FakeClock) -> None:
    wf = rt.register(Blocks, name="blocks")
    w = wf.create(id="w")
    clock.advance(1)
    t = wf.create(id="t")
    clock.advance(1)
    c = wf.create(id="c")
    assert rt.wait_until_idle()
    t.terminate()
    c.send_event("go", "x")
    assert c.wait(timeout=10).status == "complete"
    assert [i.id for i in wf.list(status="waiting")] == [w.id]
    assert [i.id for i in wf.list(status="terminated")] == [t.id]
    assert [i.id for i in wf.list(status="complete")] == [c.id]
    assert [i.id for i in wf.list()] == ["c", "t", "w"]


def test_status_strings_and_fields(rt: af.Runtime) -> None:
    ok = rt.register(Echo, name="echo").create(params={"a": [1, 2]})
    bad = rt.register(Fails, name="fails").create()
    blocked = rt.register(Blocks, name="blocks").create()
    assert ok.wait(timeout=10) == af.InstanceStatus("complete", {"a": [1, 2]}, None)
    assert bad.wait(timeout=10) == af.InstanceStatus(
        "errored", None, {"name": "LookupError", "message": "no such order"}
    )
    assert rt.wait_until_idle()
    assert blocked.status() == af.InstanceStatus("waiting", None, None)
    blocked.terminate()
    assert blocked.status() == af.InstanceStatus("terminated", None, None)


def test_wait_times_out_on_an_unfinished_instance(rt: af.Runtime) -> None:
    inst = rt.register(Blocks, name="blocks").create(id="slow")
    with pytest.raises(TimeoutError, match=r"waiting|running|queued"):
        inst.wait(timeout=0.2)


def test_instance_handles_compare_by_workflow_and_id(rt: af.Runtime) -> None:
    wf = rt.register(Echo, name="echo")
    inst = wf.create(id="same")
    assert wf.get("same") == inst and hash(wf.get("same")) == hash(inst)
    assert inst != rt.register(Echo, name="other").create(id="same")
    assert "echo/same" in repr(inst)


def test_params_too_large_are_rejected(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_event_payload_bytes=1000))
    wf = rt.register(Echo, name="echo")
    with pytest.raises(af.LimitExceeded, match="'big'"):
        wf.create(id="big", params="x" * 2000)
    with pytest.raises(af.InstanceNotFound):
        wf.get("big")


def test_concurrent_creates_from_many_threads_all_run(rt: af.Runtime) -> None:
    """Queue keys commit out of order across threads; none may be skipped."""
    import threading

    wf = rt.register(Echo, name="echo")
    made: list[af.Instance] = []
    lock = threading.Lock()

    def creator(k: int) -> None:
        for n in range(40):
            # Params of varied size: batches take varied time to build and commit.
            inst = wf.create(id=f"t{k}-{n}", params="x" * (n * 317 % 4000))
            with lock:
                made.append(inst)
        batch = wf.create_batch([{"id": f"b{k}-{n}", "params": n} for n in range(10)])
        with lock:
            made.extend(batch)

    threads = [threading.Thread(target=creator, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 6 * 50
    assert rt.wait_until_idle()
    stuck = [i.id for i in made if i.status().status != "complete"]
    assert stuck == []
