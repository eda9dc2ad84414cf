"""Flow control: the concurrency cap, the queue bound, the creation rate, wake priority."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from conftest import Journal, wait_for

import actorflow as af
from actorflow.testing import FakeClock


def statuses(insts: list[af.Instance]) -> list[str]:
    return [i.status().status for i in insts]


class Blocking(af.Workflow):
    """Its first step blocks on the gate named after the instance (or "all")."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def body() -> str:
            j.add(("start", event.instance_id))
            j.block("all")
            return event.instance_id

        return step.do("work", body)


class AsyncBlocking(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        import asyncio

        j: Journal = self.env

        async def body() -> str:
            j.add(("start", event.instance_id))
            while not j.gate("all").is_set():
                await asyncio.sleep(0.005)
            return event.instance_id

        return await step.do("work", body)


@pytest.mark.parametrize("cls", [Blocking, AsyncBlocking])
def test_concurrency_cap(make_runtime: Any, journal: Journal, cls: type) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=2))
    wf = rt.register(cls, name="blocking", env=journal)
    insts = [wf.create(id=f"i{n}") for n in range(5)]
    wait_for(lambda: len(journal.entries) == 2)
    assert rt.wait_until_idle(0.2) is False  # two steps in flight
    assert sorted(statuses(insts)) == ["queued"] * 3 + ["running"] * 2
    assert rt.metrics().running == 2
    assert len(journal.entries) == 2
    assert sorted(i.id for i in wf.list(status="queued")) == sorted(
        i.id for i in insts if i.status().status == "queued"
    )
    journal.gate("all").set()
    assert [i.wait(timeout=10).status for i in insts] == ["complete"] * 5
    assert rt.metrics().running == 0
    started = [iid for _, iid in journal.entries]
    assert sorted(started[:2]) == ["i0", "i1"]
    assert started[2:] == ["i2", "i3", "i4"]  # FIFO


def test_full_queue_rejects_and_writes_nothing(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=1, max_queued=3))
    wf = rt.register(Blocking, name="blocking", env=journal)
    first = wf.create(id="first")
    wait_for(lambda: len(journal.entries) == 1)  # running: not in the queue any more
    queued = [wf.create(id=f"q{n}") for n in range(3)]
    assert statuses(queued) == ["queued"] * 3
    with pytest.raises(af.RateLimitError) as info:
        wf.create(id="rejected")
    assert "'blocking'" in str(info.value)
    with pytest.raises(af.InstanceNotFound):
        wf.get("rejected")
    with pytest.raises(af.RateLimitError):
        wf.create_batch([{"id": "b1"}, {"id": "b2"}])
    with pytest.raises(af.InstanceNotFound):
        wf.get("b1")
    assert len(wf.list()) == 4
    journal.gate("all").set()
    assert [i.wait(timeout=10).status for i in [first, *queued]] == ["complete"] * 4
    wf.create(id="room-again").wait(timeout=10)


def test_full_queue_counts_only_queued_not_started(make_runtime: Any, journal: Journal) -> None:
    """A started instance whose first step is still running is not in the queue."""
    rt = make_runtime(limits=af.Limits(max_concurrent=2, max_queued=1))
    wf = rt.register(Blocking, name="blocking", env=journal)
    for n, iid in enumerate(("a", "b"), start=1):
        wf.create(id=iid)
        wait_for(lambda n=n: len(journal.entries) == n)  # started: left the queue
    wf.create(id="c")  # the queue holds one
    with pytest.raises(af.RateLimitError):
        wf.create(id="d")


class Quick(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        return step.do("go", lambda: j.add(event.instance_id) or event.instance_id)


def test_creation_rate_spaces_starts(make_runtime: Any, clock: FakeClock, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_creation_rate=2, burst=2))
    wf = rt.register(Quick, name="quick", env=journal)
    insts = [wf.create(id=f"r{n}") for n in range(5)]  # all accepted
    assert rt.wait_until_idle()
    assert statuses(insts) == ["complete"] * 2 + ["queued"] * 3
    clock.advance(500)  # one token
    assert statuses(insts) == ["complete"] * 3 + ["queued"] * 2
    clock.advance("1 second")
    assert statuses(insts) == ["complete"] * 5
    assert journal.entries == [f"r{n}" for n in range(5)]


def test_reject_overflow_mode(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=1, overflow="reject"))
    wf = rt.register(Blocking, name="blocking", env=journal)
    first = wf.create(id="first")
    with pytest.raises(af.RateLimitError):
        wf.create(id="second")  # at once: before the first even started
    with pytest.raises(af.InstanceNotFound):
        wf.get("second")
    wait_for(lambda: len(journal.entries) == 1)
    with pytest.raises(af.RateLimitError):
        wf.create(id="third")
    journal.gate("all").set()
    first.wait(timeout=10)
    assert rt.wait_until_idle()
    wf.create(id="fourth").wait(timeout=10)


def test_reject_overflow_on_rate(make_runtime: Any, clock: FakeClock, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_creation_rate=1, burst=2, overflow="reject"))
    wf = rt.register(Quick, name="quick", env=journal)
    wf.create(id="a")
    wf.create(id="b")
    with pytest.raises(af.RateLimitError, match="per second"):
        wf.create(id="c")
    clock.advance("1 second")
    wf.create(id="c").wait(timeout=10)


class SleepsThenWorks(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        iid = event.instance_id
        if event.payload == "sleep":
            step.sleep("nap", "1 hour")
        elif event.payload == "event":
            step.wait_for_event("wait", "go", timeout="1 day")
        elif event.payload == "block":
            step.do("hold", lambda: j.block("hold"))
        return step.do("work", lambda: j.add(iid) or iid)


@pytest.mark.parametrize("how", ["sleep", "event"])
def test_waking_instance_goes_before_new_ones(
    make_runtime: Any, clock: FakeClock, journal: Journal, how: str
) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=1))
    wf = rt.register(SleepsThenWorks, name="prio", env=journal)
    sleeper = wf.create(id="sleeper", params=how)
    assert rt.wait_until_idle()
    assert sleeper.status().status == "waiting"
    holder = wf.create(id="holder", params="block")
    wait_for(lambda: holder.status().status == "running")
    newer = [wf.create(id=f"new{n}", params=None) for n in range(2)]
    if how == "sleep":
        clock.advance("1 hour", settle_timeout=0.3)  # "holder" stays in flight
    else:
        sleeper.send_event("go")
    assert rt.wait_until_idle(0.2) is False
    assert sleeper.status().status == "queued"  # woken, but the cap is full
    journal.gate("hold").set()
    for inst in (holder, sleeper, *newer):
        assert inst.wait(timeout=10).status == "complete"
    assert journal.entries == ["holder", "sleeper", "new0", "new1"]


def test_resumed_instance_goes_before_new_ones(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=1))
    wf = rt.register(SleepsThenWorks, name="prio", env=journal)
    paused = wf.create(id="paused", params="sleep")
    assert rt.wait_until_idle()
    paused.pause()
    holder = wf.create(id="holder", params="block")
    wait_for(lambda: holder.status().status == "running")
    newer = wf.create(id="new", params=None)
    paused.resume()
    assert paused.status().status == "queued"
    assert [i.id for i in wf.list(status="queued")] == ["new", "paused"]
    journal.gate("hold").set()
    for inst in (holder, newer):
        assert inst.wait(timeout=10).status == "complete"
    assert rt.wait_until_idle()
    assert paused.status().status == "waiting"  # back in its sleep, ahead of "new"


def test_waiting_and_paused_do_not_hold_slots(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=1))
    wf = rt.register(SleepsThenWorks, name="slots", env=journal)
    sleepers = [wf.create(id=f"s{n}", params="sleep") for n in range(3)]
    assert rt.wait_until_idle()
    assert statuses(sleepers) == ["waiting"] * 3
    sleepers[0].pause()
    assert wf.create(id="runs", params=None).wait(timeout=10).status == "complete"


def test_presets_and_per_workflow_overrides(make_runtime: Any, journal: Journal) -> None:
    v1, v2 = af.Limits.cloudflare_v1(), af.Limits.cloudflare_v2()
    assert (v1.max_concurrent, v1.max_creation_rate, v1.max_queued) == (4_500, 100, 1_000_000)
    assert (v2.max_concurrent, v2.max_creation_rate, v2.max_queued) == (50_000, 300, 2_000_000)
    assert af.Limits.cloudflare_v2(max_concurrent=7).max_concurrent == 7
    with pytest.raises(ValueError, match="unknown fields"):
        af.Limits(per_workflow={"x": {"max_speed": 1}})

    rt = make_runtime(
        limits=af.Limits(max_concurrent=10, per_workflow={"narrow": {"max_concurrent": 1}})
    )
    narrow = rt.register(Blocking, name="narrow", env=journal)
    wide = rt.register(AsyncBlocking, name="wide", env=journal)
    n = [narrow.create(id=f"n{i}") for i in range(3)]
    w = [wide.create(id=f"w{i}") for i in range(3)]
    wait_for(lambda: len(journal.entries) == 4)
    assert rt.wait_until_idle(0.2) is False
    assert sorted(statuses(n)) == ["queued", "queued", "running"]
    assert statuses(w) == ["running"] * 3
    journal.gate("all").set()
    assert [i.wait(timeout=10).status for i in n + w] == ["complete"] * 6


def test_global_cap_across_workflows(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=2))
    a = rt.register(Blocking, name="a", env=journal)
    b = rt.register(AsyncBlocking, name="b", env=journal)
    insts = [a.create(id="a0"), b.create(id="b0"), a.create(id="a1"), b.create(id="b1")]
    wait_for(lambda: len(journal.entries) == 2)
    assert rt.wait_until_idle(0.2) is False
    assert sorted(statuses(insts)) == ["queued", "queued", "running", "running"]
    journal.gate("all").set()
    assert [i.wait(timeout=10).status for i in insts] == ["complete"] * 4


def test_reject_overflow_counts_an_instance_while_it_is_being_started(
    make_runtime: Any, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Between taking an instance off the queue and counting it as running, the
    # supervisor reads its record (a round trip on PostgreSQL). A create in
    # that window must still see it.
    from actorflow.workflows.supervisor.live import LiveTable

    popped, go = threading.Event(), threading.Event()
    real = LiveTable.actor

    def slow_actor(self: LiveTable, wfe: Any, iid: str) -> Any:
        if iid == "first":
            popped.set()
            go.wait(10)
        return real(self, wfe, iid)

    monkeypatch.setattr(LiveTable, "actor", slow_actor)
    rt = make_runtime(limits=af.Limits(max_concurrent=1, overflow="reject"))
    wf = rt.register(Blocking, name="blocking", env=journal)
    first = wf.create(id="first")
    assert popped.wait(10)
    try:
        with pytest.raises(af.RateLimitError):
            wf.create(id="second")
    finally:
        go.set()
    wait_for(lambda: len(journal.entries) == 1)
    journal.gate("all").set()
    first.wait(timeout=10)
    assert rt.wait_until_idle()
    wf.create(id="third").wait(timeout=10)
