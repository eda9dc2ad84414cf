"""step.patched across code versions, and the divergence warning of a replay."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from conftest import Journal, wait_for

import actorflow as af
from actorflow.testing import FakeClock


class OrderV1(af.Workflow):
    """Version 1: a, wait go, b, wait go2, c."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j = self.env
        step.do("a", lambda: j.add((event.instance_id, "a")))
        step.wait_for_event("go", "go")
        step.do("b", lambda: j.add((event.instance_id, "b")))
        step.wait_for_event("go2", "go2")
        step.do("c", lambda: j.add((event.instance_id, "c")))
        return "v1"


class OrderV2(af.Workflow):
    """Version 2: a step "x" after "a", behind a patch."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j = self.env
        step.do("a", lambda: j.add((event.instance_id, "a")))
        new = step.patched("add-x")
        if new:
            step.do("x", lambda: j.add((event.instance_id, "x")))
        step.wait_for_event("go", "go")
        step.do("b", lambda: j.add((event.instance_id, "b")))
        again = step.patched("add-x")  # the same id: the same answer
        step.wait_for_event("go2", "go2")
        step.do("c", lambda: j.add((event.instance_id, "c")))
        return {"new": new, "again": again}


class OrderV2Async(af.Workflow):
    """Version 2 as an ``async def run``: patched is called without await."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j = self.env
        await step.do("a", lambda: j.add((event.instance_id, "a")))
        new = step.patched("add-x")
        if new:
            await step.do("x", lambda: j.add((event.instance_id, "x")))
        await step.wait_for_event("go", "go")
        await step.do("b", lambda: j.add((event.instance_id, "b")))
        again = step.patched("add-x")
        await step.wait_for_event("go2", "go2")
        await step.do("c", lambda: j.add((event.instance_id, "c")))
        return {"new": new, "again": again}


@pytest.mark.parametrize("v2", [OrderV2, OrderV2Async])
def test_an_old_instance_keeps_the_old_path_and_a_new_one_takes_the_new(
    make_runtime: Any, journal: Journal, v2: type[af.Workflow]
) -> None:
    rt1 = make_runtime()
    rt1.register(OrderV1, name="order", env=journal).create(id="old").wait_for_status("waiting")
    rt1.close()  # mid-run: waiting for "go"

    rt2 = make_runtime()
    wf = rt2.register(v2, name="order", env=journal)
    new = wf.create(id="new")
    new.wait_for_status("waiting")
    old = wf.get("old")
    old.send_event("go", None)
    new.send_event("go", None)
    for inst in (old, new):
        inst.wait_for_step("b")
        inst.wait_for_status("waiting")
    rt2.close()  # both waiting for "go2", their answers recorded

    rt3 = make_runtime()
    wf = rt3.register(v2, name="order", env=journal)
    old, new = wf.get("old"), wf.get("new")
    old.send_event("go2", None)
    new.send_event("go2", None)
    assert old.wait(timeout=10).output == {"new": False, "again": False}
    assert new.wait(timeout=10).output == {"new": True, "again": True}
    counts = journal.counts()
    assert counts[("old", "x")] == 0
    assert counts[("new", "x")] == 1
    assert counts[("old", "a")] == counts[("new", "c")] == 1
    patches = {i.id: [s for s in i.steps() if s.kind == "patch"] for i in (old, new)}
    assert [(s.name, s.count, s.status, s.output) for s in patches["old"]] == [
        ("add-x", 1, "complete", False)
    ]
    assert [s.output for s in patches["new"]] == [True]
    # Patches are not steps: no history event, not counted.
    assert all(e.step != "add-x-1" for e in new.history())
    assert new.describe().steps == 6  # a, x, go, b, go2, c
    # No replay diverged: the patch keeps the old path of the old instance.
    assert all(s.divergence is None for i in (old, new) for s in i.steps())


def test_patched_at_the_frontier_is_true_and_the_answer_survives_a_reopen(
    make_runtime: Any, journal: Journal
) -> None:
    """An instance whose recording ends right before the call takes the new path."""

    class OnlyA(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            step.do("a", lambda: 1)
            step.wait_for_event("go", "go")
            return None

    class Patched(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            step.do("a", lambda: 1)
            step.wait_for_event("go", "go")
            return step.patched("after-go")

    rt1 = make_runtime()
    inst = rt1.register(OnlyA, name="w").create(id="i")
    inst.wait_for_status("waiting")
    rt1.close()
    rt2 = make_runtime()
    inst = rt2.register(Patched, name="w").get("i")
    inst.send_event("go", None)
    assert inst.wait(timeout=10).output is True


@pytest.mark.parametrize(
    ("patch_id", "error", "text"),
    [
        (42, "TypeError", "patch id that is a str, got int 42"),
        ("", "ValueError", "a step name must be a non-empty str"),
        ("bad\nname", "ValueError", "control characters"),
    ],
)
def test_a_bad_patch_id_fails_the_instance_naming_it(
    rt: af.Runtime, patch_id: Any, error: str, text: str
) -> None:
    class Bad(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            return step.patched(event.payload)

    inst = rt.register(Bad, name="bad").create(id="b1", params=patch_id)
    st = inst.wait(timeout=10)
    assert st.status == "errored"
    assert st.error is not None
    assert st.error["name"] == error
    assert text in st.error["message"]
    assert "workflow 'bad', instance 'b1'" in st.error["message"]
    # The runtime goes on.
    assert (
        rt.register(OrderV2, name="fine", env=Journal()).create(id="f").wait_for_status("waiting")
    )


# -- the divergence warning --------------------------------------------------------


class Steps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("a", lambda: 1)
        step.do("b", lambda: 2)
        step.wait_for_event("go", "go")
        return step.do("c", lambda: 3)


class Swapped(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("b", lambda: 2)
        step.do("a", lambda: 1)
        step.wait_for_event("go", "go")
        return step.do("c", lambda: 3)


def test_a_replay_that_meets_another_step_warns_and_records_it(
    make_runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rt1 = make_runtime()
    rt1.register(Steps, name="steps").create(id="s1").wait_for_status("waiting")
    rt1.close()
    caplog.set_level(logging.WARNING, logger="actorflow.engine")
    rt2 = make_runtime()
    inst = rt2.register(Swapped, name="steps").get("s1")
    inst.send_event("go", None)
    assert inst.wait(timeout=10).output == 3
    warnings = [
        r for r in caplog.records if r.name == "actorflow.engine" and "diverged" in r.getMessage()
    ]
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    assert "workflow 'steps', instance 's1'" in msg
    assert "position 0: expected do 'a' (1), found do 'b' (1)" in msg
    by_name = {s.name: s for s in inst.steps()}
    assert by_name["b"].divergence == {
        "position": 0,
        "expected": {"kind": "do", "name": "a", "count": 1},
        "found": {"kind": "do", "name": "b", "count": 1},
        "concurrent": False,
    }
    assert by_name["a"].divergence is None
    assert by_name["c"].divergence is None


def test_a_step_of_another_kind_is_a_divergence(
    make_runtime: Any, caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    class Kind(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            step.do("a", lambda: 1)
            step.sleep("b", 1)
            step.wait_for_event("go", "go")
            return step.do("c", lambda: 3)

    rt1 = make_runtime()
    rt1.register(Steps, name="steps").create(id="k1").wait_for_status("waiting")
    rt1.close()
    caplog.set_level(logging.WARNING, logger="actorflow.engine")
    rt2 = make_runtime()
    inst = rt2.register(Kind, name="steps").get("k1")
    inst.send_event("go", None)

    def done() -> bool:
        clock.advance(1)  # the new sleep "b"
        return inst.status().status == "complete"

    wait_for(done, timeout=10)
    sleep = next(s for s in inst.steps() if s.kind == "sleep")
    assert sleep.divergence is not None
    assert sleep.divergence["expected"] == {"kind": "do", "name": "b", "count": 1}
    assert any("found sleep 'b' (1)" in r.getMessage() for r in caplog.records)


class Fanout(af.Workflow):
    """Concurrent steps that end in another order than they start, live and on replay."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        async def slow() -> int:
            await asyncio.sleep(0.05)
            return 1

        async def branch_a() -> list[Any]:
            return [await step.do("a1", slow), await step.do("a2", lambda: 2)]

        async def branch_b() -> list[Any]:
            return [await step.do("b1", lambda: 3), await step.do("b2", lambda: 4)]

        both = await asyncio.gather(branch_a(), branch_b())
        sizes = await step.map("m", _reverse_delay, [3, 2, 1, 0])
        await step.wait_for_event("go", "go")
        return [both, sizes, await step.do("end", lambda: 5)]


async def _reverse_delay(i: int) -> int:
    await asyncio.sleep(0.01 * i)
    return i


class SyncFanout(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        first = step.do("first", lambda: 0)
        sizes = step.map("m", _reverse_delay, [3, 2, 1, 0])
        pair = step.parallel(("p", lambda: 1), ("q", lambda: 2))
        step.wait_for_event("go", "go")
        return [first, sizes, pair, step.do("end", lambda: 5)]


@pytest.mark.parametrize("cls", [Fanout, SyncFanout])
def test_no_divergence_for_concurrent_steps(
    make_runtime: Any, caplog: pytest.LogCaptureFixture, cls: type[af.Workflow]
) -> None:
    caplog.set_level(logging.WARNING, logger="actorflow.engine")
    rt1 = make_runtime()
    rt1.register(cls, name="fan").create(id="f1").wait_for_status("waiting")
    rt1.close()
    rt2 = make_runtime()
    inst = rt2.register(cls, name="fan").get("f1")
    inst.send_event("go", None)
    assert inst.wait(timeout=10).status == "complete"
    assert not [r for r in caplog.records if "diverged" in r.getMessage()]
    assert all(s.divergence is None for s in inst.steps())


def test_a_changed_set_of_concurrent_steps_is_a_divergence(
    make_runtime: Any, caplog: pytest.LogCaptureFixture
) -> None:
    class Three(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            step.map("m", lambda i: i, [1, 2, 3])
            step.wait_for_event("go", "go")
            return step.do("end", lambda: 1)

    class Other(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            step.parallel(("m[0]", lambda: 1), ("m[1]", lambda: 2), ("n", lambda: 3))
            step.wait_for_event("go", "go")
            return step.do("end", lambda: 1)

    rt1 = make_runtime()
    rt1.register(Three, name="three").create(id="t1").wait_for_status("waiting")
    rt1.close()
    caplog.set_level(logging.WARNING, logger="actorflow.engine")
    rt2 = make_runtime()
    inst = rt2.register(Other, name="three").get("t1")
    inst.send_event("go", None)
    assert inst.wait(timeout=10).status == "complete"
    dv = next(s.divergence for s in inst.steps() if s.divergence is not None)
    assert dv["concurrent"] is True
    assert dv["position"] == 0
    assert {d["name"] for d in dv["expected"]} == {"m[0]", "m[1]", "m[2]"}
    assert {d["name"] for d in dv["found"]} == {"m[0]", "m[1]", "n"}
    assert any("diverged" in r.getMessage() for r in caplog.records)
