"""Closing a runtime with work in flight, and reopening it: everything resumes."""

from __future__ import annotations

import time
from typing import Any

from conftest import Journal, history_types, wait_for

import actorflow as af
from actorflow.testing import FakeClock


class Work(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        iid, kind = event.instance_id, event.payload

        def body(name: str) -> Any:
            def run() -> str:
                j.add((iid, name))
                if kind == "block" and name == "b":
                    j.block("b", timeout=30)
                return name

            return run

        out = [step.do("a", body("a"))]
        if kind == "sleep":
            step.sleep("nap", "1 hour")
        out.append(step.do("b", body("b")))
        out.append(step.do("c", body("c")))
        return out


def test_close_with_work_in_flight_then_reopen(
    make_runtime: Any, clock: FakeClock, journal: Journal
) -> None:
    rt1 = make_runtime(limits=af.Limits(max_concurrent=1))
    wf = rt1.register(Work, name="work", env=journal)
    sleeper = wf.create(id="sleeper", params="sleep")
    assert rt1.wait_until_idle()
    blocked = wf.create(id="blocked", params="block")
    wait_for(lambda: journal.count(("blocked", "b")) == 1)
    queued = wf.create(id="queued", params="plain")
    assert queued.status().status == "queued"
    started = time.monotonic()
    rt1.close()  # step "b" of "blocked" is still running
    assert time.monotonic() - started < 3
    journal.gate("b").set()  # the old body ends; its result is never written

    rt2 = make_runtime(limits=af.Limits(max_concurrent=1))
    wf = rt2.register(Work, name="work", env=journal)
    blocked, queued = wf.get("blocked"), wf.get("queued")
    assert blocked.wait(timeout=10).output == ["a", "b", "c"]
    assert queued.wait(timeout=10).output == ["a", "b", "c"]
    sleeper = wf.get("sleeper")
    assert sleeper.status().status == "waiting"
    clock.advance("1 hour")
    assert sleeper.wait(timeout=10).output == ["a", "b", "c"]
    counts = journal.counts()
    assert counts[("blocked", "a")] == 1  # committed before the close
    assert counts[("blocked", "b")] == 2  # in flight at the close: runs again
    assert counts[("sleeper", "a")] == counts[("queued", "a")] == 1
    assert "INSTANCE_RECOVERED" in history_types(blocked)
    assert history_types(blocked).count("WORKFLOW_START") == 1


def test_close_is_clean_with_many_instances_running(
    make_runtime: Any, clock: FakeClock, journal: Journal
) -> None:
    rt1 = make_runtime()
    wf = rt1.register(Work, name="work", env=journal)
    insts = wf.create_batch([{"id": f"i{n}", "params": "plain"} for n in range(50)])
    rt1.close()  # some done, some mid-flight, some not started
    rt2 = make_runtime()
    wf = rt2.register(Work, name="work", env=journal)
    for inst in insts:
        assert wf.get(inst.id).wait(timeout=10).output == ["a", "b", "c"]
    counts = journal.counts()
    # At most one extra run of a step whose result was not yet written.
    assert all(1 <= counts[(i.id, n)] <= 2 for i in insts for n in ("a", "b", "c"))


def test_unregistered_workflow_waits_until_registered(
    make_runtime: Any, clock: FakeClock, journal: Journal
) -> None:
    rt1 = make_runtime()
    rt1.register(Work, name="work", env=journal).create(id="s", params="sleep")
    assert rt1.wait_until_idle()
    rt1.close()
    rt2 = make_runtime()
    # Due, but nobody registered "work" yet: the timer is parked until it is, and a
    # parked timer does not keep the runtime busy (advance returns at once).
    import time

    t0 = time.monotonic()
    clock.advance("2 hours")
    assert time.monotonic() - t0 < 5
    assert rt2.is_idle()
    assert journal.count(("s", "b")) == 0
    inst = rt2.register(Work, name="work", env=journal).get("s")
    assert inst.wait(timeout=10).output == ["a", "b", "c"]
