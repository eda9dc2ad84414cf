"""``inst.fork``: a new instance that replays the origin's steps before ``at_step``.

The origin is checked against storage itself: every record it has (its id,
record, fence, index entry, steps, events and history) is the same, byte for
byte, after it was forked, whatever the fork did. Runs on LMDB and, with
``--backend=postgres``, on PostgreSQL.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from conftest import Journal, instance_records

import actorflow as af
from actorflow.cluster.lease import OWNER
from actorflow.core.storage import open_storage
from actorflow.testing import FakeClock, Faults
from actorflow.workflows.records import (
    EVENTS,
    FENCE,
    HIST,
    IDS,
    IDX,
    INST,
    STEPS,
    events_prefix,
    hist_prefix,
    idx_iid,
    idx_prefix,
    ikey,
    rkey,
    steps_prefix,
)


class Pipeline(af.Workflow):
    """fetch, a nap, an approval, then price and ship: the journal counts each body."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        iid = event.instance_id

        def body(name: str, fn: Any) -> Any:
            def run() -> Any:
                j.add((name, iid))
                return fn()

            return run

        a = step.do("fetch", body("fetch", lambda: event.payload["x"]))
        step.sleep("nap", "1 minute")
        ok = step.wait_for_event("approve", "approval", timeout="1 day")
        b = step.do("price", body("price", lambda: a * 10 + ok.payload))
        c = step.do("ship", body("ship", lambda: f"shipped {b}"))
        return {"a": a, "b": b, "c": c}


class Looping(af.Workflow):
    """The same step name three times, then a last step."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        iid = event.instance_id
        total = 0
        for n in range(3):

            def item(n: int = n) -> int:
                j.add(("item", iid, n))
                return n + 1

            total += step.do("item", item)
        return step.do("sum", lambda: j.add(("sum", iid)) or total)


class Risky(af.Workflow):
    """A step that fails for good, caught by the workflow, then one more."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("first", lambda: 1)
        try:
            step.do("risky", lambda: 1 / 0, retries={"limit": 0})
        except Exception:
            pass
        return step.do("after", lambda: "after")


def _origin_records(rt: af.Runtime, wf: str, iid: str) -> dict[str, Any]:
    """Every record of instance ``iid`` (its keys and their bytes)."""
    st = rt.storage
    n = st.get(IDS, ikey(wf, iid))
    assert n is not None
    rk = rkey(wf, n)
    return {
        "ids": n,
        "inst": st.get(INST, rk),
        "fence": st.get(FENCE, rk),
        "idx": [k for k, _ in st.scan(IDX, prefix=idx_prefix(wf)) if idx_iid(k) == iid],
        "steps": st.scan(STEPS, prefix=steps_prefix(rk)),
        "events": st.scan(EVENTS, prefix=events_prefix(rk)),
        "hist": st.scan(HIST, prefix=hist_prefix(rk)),
    }


def _completed(rt: af.Runtime, clock: FakeClock, wf: af.WorkflowBinding, iid: str) -> af.Instance:
    """An origin run to the end: x=4, approval 2 -> {a: 4, b: 42, c: "shipped 42"}."""
    inst = wf.create(id=iid, params={"x": 4})
    assert rt.wait_until_idle()
    clock.advance("2 minutes")
    assert inst.wait_for_status("waiting").status == "waiting"
    inst.send_event("approval", 2)
    assert inst.wait(timeout=10).output == {"a": 4, "b": 42, "c": "shipped 42"}
    return inst


def test_a_fork_with_an_override_reaches_another_result_and_the_origin_is_untouched(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    wf = rt.register(Pipeline, name="pipeline", env=journal)
    origin = _completed(rt, clock, wf, "o")
    before = _origin_records(rt, "pipeline", "o")
    history, steps = origin.history(), origin.steps()
    fork = origin.fork("price", id="f", overrides={"fetch": 7})
    assert fork.id == "f" and fork == wf.get("f")
    assert fork.wait(timeout=10).output == {"a": 7, "b": 72, "c": "shipped 72"}
    # Steps before at_step did not run again; at_step and later did.
    assert journal.count(("fetch", "f")) == 0
    assert journal.count(("price", "f")) == 1
    assert journal.count(("ship", "f")) == 1
    assert journal.count(("fetch", "o")) == 1  # the origin's bodies ran once, before
    # The origin: the same records, byte for byte, and the same views.
    assert _origin_records(rt, "pipeline", "o") == before
    assert origin.history() == history and origin.steps() == steps
    assert origin.status().output == {"a": 4, "b": 42, "c": "shipped 42"}
    assert origin.describe().forked_from is None
    # The fork names its origin, in describe() and in its history.
    where = {"workflow": "pipeline", "instance": "o", "at_step": {"name": "price", "count": 1}}
    assert fork.describe().forked_from == where
    first = fork.history()[0]
    assert (first.type, first.data) == ("WORKFLOW_QUEUED", {"forked_from": where})
    assert (origin.history()[0].type, origin.history()[0].data) == ("WORKFLOW_QUEUED", {})
    kept = [(s.name, s.forked, s.output) for s in fork.steps()]
    assert kept == [
        ("fetch", True, 7),
        ("nap", True, None),
        ("approve", True, 2),
        ("price", False, 72),
        ("ship", False, "shipped 72"),
    ]
    # Its kept steps come right after its creation, then its own run.
    types = [(e.type, e.step) for e in fork.history()]
    assert types.index(("STEP_SUCCESS", "fetch-1")) < types.index(("WORKFLOW_START", None))
    assert types.index(("WORKFLOW_START", None)) < types.index(("STEP_START", "price-1"))
    assert fork.describe().params == {"x": 4}  # the origin's params by default


def test_at_step_and_every_later_step_run_anew(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    wf = rt.register(Pipeline, name="pipeline", env=journal)
    origin = _completed(rt, clock, wf, "o")
    last = origin.fork({"name": "ship", "count": 1}, id="last")
    assert last.wait(timeout=10).output == {"a": 4, "b": 42, "c": "shipped 42"}
    assert [journal.count((s, "last")) for s in ("fetch", "price", "ship")] == [0, 0, 1]
    # From the first step: nothing is kept, the fork runs like a new instance.
    whole = origin.fork("fetch", id="whole")
    assert rt.wait_until_idle()
    assert [s.name for s in whole.steps()] == ["fetch", "nap"]
    assert not any(s.forked for s in whole.steps())
    clock.advance("2 minutes")
    whole.wait_for_status("waiting")
    whole.send_event("approval", 5)
    assert whole.wait(timeout=10).output == {"a": 4, "b": 45, "c": "shipped 45"}
    assert [journal.count((s, "whole")) for s in ("fetch", "price", "ship")] == [1, 1, 1]
    # At the event wait: the fork waits for an event of its own.
    again = origin.fork("approve", id="again", overrides={"fetch": 1})
    again.wait_for_status("waiting")
    again.send_event("approval", 9)
    assert again.wait(timeout=10).output == {"a": 1, "b": 19, "c": "shipped 19"}


def test_a_fork_of_a_fork_and_an_occurrence_of_a_repeated_step(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    wf = rt.register(Pipeline, name="pipeline", env=journal)
    origin = _completed(rt, clock, wf, "o")
    first = origin.fork("price", id="f1", overrides={"fetch": 7})
    assert first.wait(timeout=10).output["b"] == 72
    before = _origin_records(rt, "pipeline", "f1")
    second = first.fork("ship", id="f2", overrides={"price": 1000})
    assert second.wait(timeout=10).output == {"a": 7, "b": 1000, "c": "shipped 1000"}
    assert _origin_records(rt, "pipeline", "f1") == before
    assert second.describe().forked_from == {
        "workflow": "pipeline",
        "instance": "f1",
        "at_step": {"name": "ship", "count": 1},
    }
    assert [journal.count((s, "f2")) for s in ("fetch", "price", "ship")] == [0, 0, 1]

    loops = rt.register(Looping, name="looping", env=journal)
    run = loops.create(id="l")
    assert run.wait(timeout=10).output == 6
    third = run.fork({"name": "item", "count": 3}, id="l3", overrides={"item": 10})
    assert third.wait(timeout=10).output == 10 + 2 + 3  # the first occurrence overridden
    assert [e for e in journal.entries if e[1] == "l3"] == [("item", "l3", 2), ("sum", "l3")]
    assert [(s.name, s.count, s.forked) for s in third.steps()][:3] == [
        ("item", 1, True),
        ("item", 2, True),
        ("item", 3, False),
    ]


def test_a_fork_with_new_params(rt: af.Runtime, clock: FakeClock, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipeline", env=journal)
    origin = _completed(rt, clock, wf, "o")
    fork = origin.fork("fetch", id="p", params={"x": 3})
    assert fork.describe().params == {"x": 3}
    assert rt.wait_until_idle()
    clock.advance("2 minutes")
    fork.wait_for_status("waiting")
    fork.send_event("approval", 0)
    assert fork.wait(timeout=10).output == {"a": 3, "b": 30, "c": "shipped 30"}
    # Kept steps keep their outputs whatever the new params say.
    kept = origin.fork("price", id="q", params={"x": 100})
    assert kept.wait(timeout=10).output["a"] == 4
    assert origin.describe().params == {"x": 4}


def test_a_fork_of_an_instance_that_is_still_running(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    wf = rt.register(Pipeline, name="pipeline", env=journal)
    origin = wf.create(id="o", params={"x": 2})
    assert rt.wait_until_idle()
    clock.advance("2 minutes")
    origin.wait_for_status("waiting")
    before = _origin_records(rt, "pipeline", "o")
    fork = origin.fork("approve", id="w")  # at the wait in progress: it is not kept
    fork.wait_for_status("waiting")
    with pytest.raises(af.InvalidInstanceState, match="'price'"):
        origin.fork("price")  # not reached yet
    fork.send_event("approval", 1)
    assert fork.wait(timeout=10).output == {"a": 2, "b": 21, "c": "shipped 21"}
    assert _origin_records(rt, "pipeline", "o") == before
    assert origin.status().status == "waiting"  # the fork's event was not the origin's
    origin.send_event("approval", 3)
    assert origin.wait(timeout=10).output["b"] == 23
    assert journal.count(("fetch", "w")) == 0


class Ends(af.Workflow):
    """A first step, a step that fails with params "fail", a long nap, a last step."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("first", lambda: 1)
        if event.payload == "fail":
            step.do("boom", lambda: 1 / 0, retries={"limit": 0})
        step.sleep("nap", "1 hour")
        return step.do("last", lambda: "last")


@pytest.mark.parametrize("status", ["waiting", "paused", "terminated", "errored"])
def test_a_fork_of_an_instance_in_any_status(rt: af.Runtime, clock: FakeClock, status: str) -> None:
    wf = rt.register(Ends, name="ends")
    origin = wf.create(id="o", params="fail" if status == "errored" else None)
    assert rt.wait_until_idle()
    if status == "paused":
        origin.pause()
    elif status == "terminated":
        origin.terminate()
    assert origin.status().status == status
    before = _origin_records(rt, "ends", "o")
    # An errored origin: the fork, with other params, does not fail at "boom".
    fork = origin.fork("boom" if status == "errored" else "nap", id="f", params="ok")
    assert rt.wait_until_idle()
    assert fork.status().status == "waiting"
    assert _origin_records(rt, "ends", "o") == before
    clock.advance("2 hours")
    assert fork.wait(timeout=10).output == "last"
    assert [s.name for s in fork.steps() if s.forked] == ["first"]
    if status == "waiting":  # its own nap ended too
        assert origin.wait(timeout=10).output == "last"
    else:
        assert _origin_records(rt, "ends", "o") == before


def test_a_step_before_at_step_that_failed_cannot_be_kept(rt: af.Runtime) -> None:
    wf = rt.register(Risky, name="risky")
    origin = wf.create(id="o")
    assert origin.wait(timeout=10).output == "after"
    with pytest.raises(af.InvalidInstanceState, match=r"'risky'.*errored") as info:
        origin.fork("after", id="nope")
    assert (info.value.workflow, info.value.instance, info.value.step) == ("risky", "o", "risky")
    assert "risky" in str(info.value) and "'o'" in str(info.value)
    with pytest.raises(af.InstanceNotFound):
        wf.get("nope")
    fork = origin.fork("risky", id="yes")  # at the failed step: it runs again
    assert fork.wait(timeout=10).output == "after"
    assert [s.name for s in fork.steps() if s.forked] == ["first"]


def test_bad_input_gets_a_named_error_and_writes_nothing(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    wf = rt.register(Pipeline, name="pipeline", env=journal)
    origin = _completed(rt, clock, wf, "o")
    wf.create(id="taken", params={"x": 1})
    assert rt.wait_until_idle()
    before = instance_records(rt, "pipeline")

    def refused(cls: type[BaseException], match: str, *args: Any, **kw: Any) -> BaseException:
        with pytest.raises(cls, match=match) as info:
            origin.fork(*args, **kw)
        assert instance_records(rt, "pipeline") == before
        return info.value

    err = refused(af.InvalidInstanceState, r"'pipeline'.*'o'.*'nope'", "nope", id="n1")
    assert isinstance(err, af.InvalidInstanceState)
    assert (err.workflow, err.instance, err.step) == ("pipeline", "o", "nope")
    assert "fetch" in str(err)  # it lists the steps there are
    refused(af.InvalidInstanceState, "occurrence 2", {"name": "fetch", "count": 2})
    err = refused(
        af.InvalidInstanceState,
        "'missing'.*not one of its steps",
        "price",
        overrides={"missing": 1},
    )
    assert err.step == "missing"  # type: ignore[attr-defined]
    err = refused(
        af.InvalidInstanceState, "'ship'.*not before step 'price'", "price", overrides={"ship": 1}
    )
    assert err.step == "ship"  # type: ignore[attr-defined]
    refused(af.InvalidInstanceState, "'price'.*not before", "price", overrides={"price": 1})
    refused(af.InvalidInstanceState, "sleep has no output", "price", overrides={"nap": 1})
    err = refused(
        af.SerializationError,
        r"'pipeline'.*'o'.*'fetch'",
        "price",
        overrides={"fetch": threading.Lock()},
    )
    assert err.step == "fetch"  # type: ignore[attr-defined]
    refused(af.SerializationError, "'pipeline'", "price", params=threading.Lock())
    err = refused(af.InstanceAlreadyExists, "'taken'.*already exists", "price", id="taken")
    assert (err.workflow, err.instance) == ("pipeline", "taken")  # type: ignore[attr-defined]
    refused(af.InstanceAlreadyExists, "'o'", "price", id="o")
    refused(af.InvalidInstanceId, "pipeline", "price", id="no spaces!")
    refused(af.InvalidInstanceId, "pipeline", "price", id="x" * 101)
    refused(ValueError, "at_step", {"name": "price", "count": 0})
    refused(ValueError, "at_step", {"step": "price"})
    refused(ValueError, "empty", "")
    refused(TypeError, "at_step", 3)
    refused(TypeError, "overrides", "price", overrides=[("fetch", 1)])
    too_big = "x" * (rt.limits.for_workflow("pipeline").max_step_result_bytes + 1)
    refused(af.LimitExceeded, "'fetch'", "price", overrides={"fetch": too_big})
    ghost = wf.create(id="ghost", params={"x": 1})
    ghost.delete()
    with pytest.raises(af.InstanceNotFound, match="ghost"):
        ghost.fork("price")
    # The runtime keeps working after all that.
    fine = origin.fork("price", id="fine")
    assert fine.wait(timeout=10).output["b"] == 42


def test_a_failed_write_leaves_no_fork(rt: af.Runtime, clock: FakeClock, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipeline", env=journal)
    origin = _completed(rt, clock, wf, "o")
    before = instance_records(rt, "pipeline")
    with Faults(rt).fail_writes(times=1), pytest.raises(af.StorageError):
        origin.fork("price", id="f")
    assert instance_records(rt, "pipeline") == before
    fork = origin.fork("price", id="f")  # the same id: nothing of the first try was left
    assert fork.wait(timeout=10).output["b"] == 42


def test_a_fork_across_a_restart_of_the_runtime(make_runtime: Any, journal: Journal) -> None:
    clock = FakeClock()
    try:
        first = make_runtime(clock=clock)
        origin = _completed(
            first, clock, first.register(Pipeline, name="pipeline", env=journal), "o"
        )
        assert origin.status().status == "complete"
        first.close()
        # Forked where nothing runs the workflow: the fork waits, queued.
        tool = make_runtime(clock=clock)
        fork = tool.unregistered("pipeline").get("o").fork("price", id="f", overrides={"fetch": 5})
        assert fork.status().status == "queued"
        tool.close()
        third = make_runtime(clock=clock)
        wf = third.register(Pipeline, name="pipeline", env=journal)
        assert wf.get("f").wait(timeout=10).output == {"a": 5, "b": 52, "c": "shipped 52"}
        assert [journal.count((s, "f")) for s in ("fetch", "price", "ship")] == [0, 1, 1]
        assert wf.get("f").describe().forked_from["instance"] == "o"  # type: ignore[index]
    finally:
        clock.close()


def test_fork_async(rt: af.Runtime, clock: FakeClock, journal: Journal) -> None:
    wf = rt.register(Pipeline, name="pipeline", env=journal)
    origin = _completed(rt, clock, wf, "o")

    async def main() -> Any:
        fork = await origin.fork_async("ship", id="a", overrides={"price": 1})
        return (await fork.wait_async(timeout=10)).output

    assert asyncio.run(main()) == {"a": 4, "b": 1, "c": "shipped 1"}


def test_a_fork_on_several_nodes_is_owned_by_the_node_that_makes_it(
    nodes: Any, location: str
) -> None:
    a, b = nodes("a"), nodes("b")
    a.create("greeter", id="g", params={"name": "ann"})
    a.wait_for_status("greeter", "g", "waiting")
    a.send_event("greeter", "g", "ok", 1)
    done = a.wait_for_status("greeter", "g", "complete")["output"]
    assert done["pid"] == a.pid and done["ok"] == 1
    # Through b, which does not own the origin: b owns the fork and runs it.
    assert b.fork("greeter", "g", "pid", new_id="gf", overrides={"hello": "hi"}) == "gf"
    out = b.wait_for_status("greeter", "gf", "complete")["output"]
    assert out == {"hello": "hi", "ok": 1, "pid": b.pid}
    store = open_storage(location)
    try:
        assert store.get(OWNER, ikey("greeter", "gf")) == b"b"
        assert store.get(OWNER, ikey("greeter", "g")) == b"a"
    finally:
        store.close()


class Patched(af.Workflow):
    """The new path behind step.patched("v2"), then a step to fork at."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        path = "new" if step.patched("v2") else "old"
        first = step.do(f"{path} first", lambda: j.add((path, event.instance_id)) or path)
        last = step.do("last", lambda: f"{first} last")
        step.wait_for_event("done", "done", timeout="1 day")
        return last


def test_a_fork_keeps_the_answers_of_patched_before_at_step(
    rt: af.Runtime, journal: Journal
) -> None:
    # The origin took the new path; its fork replays the kept step of that
    # path. Decided again, patched would see the kept step past the call and
    # answer False: the fork would then run the old path's step instead.
    wf = rt.register(Patched, name="patched", env=journal)
    origin = wf.create(id="o")
    assert rt.wait_until_idle()
    fork = origin.fork("last", id="f")
    assert rt.wait_until_idle()
    for inst in (origin, fork):
        inst.send_event("done")
        assert inst.wait(timeout=10).output == "new last"
    assert journal.entries == [("new", "o")]  # the fork ran no first step of either path
    assert [(s.kind, s.name) for s in fork.steps()][:2] == [("patch", "v2"), ("do", "new first")]


def test_a_fork_keeps_the_flow_control_of_its_origin(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=4, max_concurrent_per_key=1))
    wf = rt.register(Pipeline, name="pipeline", env=journal)
    origin = wf.create(id="o", params={"x": 1}, key="tenant-a", priority=3)
    assert rt.wait_until_idle()
    fork = origin.fork("nap", id="f")
    d = fork.describe()
    assert (d.key, d.priority) == ("tenant-a", 3)
    assert d.forked_from is not None and d.forked_from["instance"] == "o"
