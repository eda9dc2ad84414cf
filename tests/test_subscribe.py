"""``Instance.subscribe``: the history, then live events, resumable by cursor; and over SSE."""

from __future__ import annotations

import asyncio
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from conftest import Journal, wait_for
from starlette.testclient import TestClient

import actorflow as af
from actorflow.http import create_app
from actorflow.testing import FakeClock
from actorflow.workflows import subscribe as subscribe_module


class Gated(af.Workflow):
    """Two steps, a wait for an event, a step held by a gate, then the end."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        journal: Journal = self.env
        a = step.do("a", lambda: 1)
        ev = step.wait_for_event("go", "go", timeout="1 hour")
        b = step.do("b", lambda: journal.block("b") or a + ev.payload)
        return step.do("c", lambda: b * 10)


class Parallel(af.Workflow):
    """Two steps in parallel: the one that starts first ends last."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        journal: Journal = self.env

        def slow() -> str:
            journal.block("slow")
            return "slow"

        def fast(ctx: af.StepContext) -> str:
            if ctx.attempt == 1:
                raise RuntimeError("once more")
            journal.block("fast")
            return "fast"

        out = step.parallel(
            ("slow", slow), ("fast", fast), retries={"limit": 2, "delay": 0, "backoff": "constant"}
        )
        return step.do("after", lambda: out)


class Sleeper(af.Workflow):
    """A step, a sleep of an hour, a step."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("before", lambda: 1)
        step.sleep("nap", "1 hour")
        return step.do("after", lambda: 2)


def _key(e: af.HistoryEvent) -> tuple[Any, ...]:
    return (
        e.type,
        e.step,
        e.attempt,
        e.timestamp,
        json.dumps(e.data, sort_keys=True, default=repr),
    )


class Follower:
    """Follows a subscription in a thread, keeping what it received."""

    def __init__(self, it: Iterator[af.HistoryEvent], stop: Callable[[af.HistoryEvent], bool]):
        self.events: list[af.HistoryEvent] = []
        self.error: BaseException | None = None
        self.done = threading.Event()
        self._it = it
        self._stop = stop
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            for e in self._it:
                self.events.append(e)
                if self._stop(e):
                    break
        except BaseException as e:
            self.error = e
        finally:
            self.done.set()

    def join(self, timeout: float = 10.0) -> list[af.HistoryEvent]:
        assert self.done.wait(timeout), f"still following after {timeout} s: {self.types()}"
        assert self.error is None, self.error
        return self.events

    def types(self) -> list[str]:
        return [e.type for e in self.events]


def test_history_then_live_events_until_the_end(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Gated, name="gated", env=journal)
    inst = wf.create("one")
    inst.wait_for_status("waiting")
    f = Follower(inst.subscribe(), lambda e: False)
    wait_for(lambda: "WAIT_START" in f.types())  # the history so far
    assert not f.done.is_set()
    inst.send_event("go", 2)
    wait_for(lambda: "WAIT_COMPLETE" in f.types())  # live: then "b" runs, held
    assert not f.done.is_set()
    journal.gate("b").set()
    events = f.join()  # ends by itself once the instance is complete
    assert inst.status().status == "complete"
    assert [_key(e) for e in events] == [_key(e) for e in inst.history()]
    assert events[-1].type == "WORKFLOW_SUCCESS"
    assert all(isinstance(e.cursor, str) and e.cursor for e in events)
    assert len({e.cursor for e in events}) == len(events)
    # A finished instance: the whole history, then the end.
    assert [_key(e) for e in inst.subscribe()] == [_key(e) for e in events]


def test_types_filter(rt: af.Runtime, journal: Journal) -> None:
    journal.open_all()
    wf = rt.register(Gated, name="gated", env=journal)
    inst = wf.create("one")
    inst.wait_for_status("waiting")
    f = Follower(inst.subscribe(types=["STEP_SUCCESS", "WORKFLOW_SUCCESS"]), lambda e: False)
    inst.send_event("go", 2)
    events = f.join()
    assert [(e.type, e.step) for e in events] == [
        ("STEP_SUCCESS", "a-1"),
        ("STEP_SUCCESS", "b-1"),
        ("STEP_SUCCESS", "c-1"),
        ("WORKFLOW_SUCCESS", None),
    ]
    assert [e.data["result"] for e in events[:3]] == [1, 3, 30]
    one = [e.type for e in inst.subscribe(types="WAIT_COMPLETE")]
    assert one == ["WAIT_COMPLETE"]
    # The cursor of a filtered event counts those skipped before it.
    after = list(inst.subscribe(cursor=events[1].cursor))
    assert [(e.type, e.step) for e in after][:2] == [
        ("STEP_START", "c-1"),
        ("ATTEMPT_START", "c-1"),
    ]


def _resume_until(
    inst: af.Instance, cursor: str | None, stop: Callable[[af.HistoryEvent], bool]
) -> tuple[list[af.HistoryEvent], Follower]:
    f = Follower(inst.subscribe(cursor=cursor), stop)
    return f.events, f


def test_a_subscriber_that_reconnects_sees_every_event_once(
    rt: af.Runtime, journal: Journal
) -> None:
    wf = rt.register(Gated, name="gated", env=journal)
    inst = wf.create("one")
    # First connection: stops after the first step's success.
    first = Follower(inst.subscribe(), lambda e: e.type == "STEP_SUCCESS").join()
    assert first[-1].type == "STEP_SUCCESS"
    inst.wait_for_status("waiting")
    inst.send_event("go", 2)
    # Second: from its cursor, while "b" is held; stops at the event's arrival.
    second = Follower(
        inst.subscribe(cursor=first[-1].cursor), lambda e: e.type == "WAIT_COMPLETE"
    ).join()
    assert second[0].type != "WORKFLOW_QUEUED"
    journal.gate("b").set()
    inst.wait(10)
    third = list(inst.subscribe(cursor=second[-1].cursor))
    got = first + second + third
    assert [_key(e) for e in got] == [_key(e) for e in inst.history()]


def test_parallel_steps_that_end_out_of_order_are_each_given_once(
    rt: af.Runtime, journal: Journal
) -> None:
    wf = rt.register(Parallel, name="parallel", env=journal)
    inst = wf.create("one")
    received: list[af.HistoryEvent] = []
    cursor = None

    def take(stop: Callable[[af.HistoryEvent], bool]) -> None:
        nonlocal cursor
        part = Follower(inst.subscribe(cursor=cursor), stop).join()
        received.extend(part)
        cursor = part[-1].cursor

    # "fast" failed once (its record is written), "slow" runs: reconnect there.
    take(lambda e: e.type == "ATTEMPT_FAILURE")
    journal.gate("fast").set()
    wait_for(lambda: any(s.name == "fast" and s.status == "complete" for s in inst.steps()))
    take(lambda e: e.type == "STEP_SUCCESS" and e.step == "fast-1")
    # "slow" started first: its STEP_START sorts before events already given.
    journal.gate("slow").set()
    inst.wait(10)
    take(lambda e: False)
    history = inst.history()
    assert Counter(_key(e) for e in received) == Counter(_key(e) for e in history)
    assert len(received) == len(history)
    assert received[-1].type == "WORKFLOW_SUCCESS"


def test_resume_across_a_restart_of_the_runtime(
    make_runtime: Callable[..., af.Runtime], clock: FakeClock
) -> None:
    rt = make_runtime()
    inst = rt.register(Sleeper, name="sleeper").create("one")
    first = Follower(inst.subscribe(), lambda e: e.type == "SLEEP_START").join()
    saved = first[-1].cursor
    assert saved is not None
    rt.close()
    again = make_runtime()
    inst = again.register(Sleeper, name="sleeper").get("one")
    f = Follower(inst.subscribe(cursor=saved), lambda e: False)
    clock.advance("1 hour")
    rest = f.join()
    assert rest[0].type == "SLEEP_COMPLETE"
    assert [_key(e) for e in first + rest] == [_key(e) for e in inst.history()]


def test_live_events_come_from_commits_not_from_polling(
    rt: af.Runtime, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    # With a poll interval longer than the test's patience, only the commit
    # hook can deliver the live events in time.
    monkeypatch.setattr(subscribe_module, "DEFAULT_POLL_S", 60.0)
    journal.open_all()
    wf = rt.register(Gated, name="gated", env=journal)
    inst = wf.create("one")
    inst.wait_for_status("waiting")
    f = Follower(inst.subscribe(), lambda e: False)
    wait_for(lambda: "WAIT_START" in f.types())
    inst.send_event("go", 2)
    assert f.join(timeout=10)[-1].type == "WORKFLOW_SUCCESS"


def test_a_terminated_or_restarted_instance(rt: af.Runtime, journal: Journal) -> None:
    wf = rt.register(Gated, name="gated", env=journal)
    inst = wf.create("one")
    inst.wait_for_status("waiting")
    f = Follower(inst.subscribe(), lambda e: False)
    wait_for(lambda: "WAIT_START" in f.types())
    before = f.events[-1].cursor
    inst.restart()  # deletes the step records; the new run writes them again
    inst.wait_for_status("waiting")
    inst.terminate()
    events = f.join()
    assert events[-1].type == "WORKFLOW_TERMINATED"
    assert "WORKFLOW_RESTARTED" in f.types()
    # After the restart, "a" ran again: its events are given again (new ones).
    assert f.types().count("STEP_SUCCESS") == 2
    resumed = list(inst.subscribe(cursor=before))
    assert [e.type for e in resumed] == [e.type for e in events[len(events) - len(resumed) :]]


def test_bad_cursors_and_types_are_refused_naming_the_instance(rt: af.Runtime) -> None:
    wf = rt.register(Sleeper, name="sleeper")
    one, two = wf.create("one"), wf.create("two")
    wait_for(lambda: one.status().status == "waiting" and two.status().status == "waiting")
    theirs = next(iter(two.subscribe())).cursor
    for bad in ["", "nonsense", "eyJ4IjoxfQ", "a" * 500, theirs, 42]:
        with pytest.raises(af.InvalidCursor) as info:
            one.subscribe(cursor=bad)  # type: ignore[arg-type]
        assert isinstance(info.value, ValueError)
        assert info.value.workflow == "sleeper" and info.value.instance == "one"
        assert "'sleeper'" in str(info.value) and "'one'" in str(info.value)
    with pytest.raises(ValueError, match="unknown event type 'STEP_DONE'"):
        one.subscribe(types=["STEP_DONE"])
    with pytest.raises(TypeError):
        one.subscribe(types=[1])  # type: ignore[list-item]
    with pytest.raises(af.InstanceNotFound):
        wf.get("nobody")
    # A deleted-and-created-again id is another instance: its cursors do not carry over.
    import pickle

    err = pickle.loads(pickle.dumps(af.InvalidCursor("m", workflow="w", instance="i")))
    assert (err.workflow, err.instance) == ("w", "i")


def test_subscribe_async(rt: af.Runtime, journal: Journal) -> None:
    journal.open_all()
    wf = rt.register(Gated, name="gated", env=journal)
    inst = wf.create("one")
    inst.wait_for_status("waiting")

    async def follow() -> list[af.HistoryEvent]:
        out = []
        async for e in inst.subscribe_async():
            out.append(e)
            if e.type == "WAIT_START":
                await asyncio.to_thread(inst.send_event, "go", 2)
        return out

    events = asyncio.run(asyncio.wait_for(follow(), 20))
    assert [_key(e) for e in events] == [_key(e) for e in inst.history()]
    with pytest.raises(af.InvalidCursor):
        inst.subscribe_async(cursor="nonsense")


# -- Server-Sent Events ------------------------------------------------------------------


def _sse(lines: Iterator[str]) -> list[dict[str, str]]:
    """Parses an SSE stream into its messages (``id``, ``event``, ``data``)."""
    out: list[dict[str, str]] = []
    msg: dict[str, str] = {}
    for line in lines:
        if not line:
            if msg:
                out.append(msg)
                msg = {}
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        msg[name] = value[1:] if value.startswith(" ") else value
    if msg:
        out.append(msg)
    return out


def test_the_stream_over_http(rt: af.Runtime, journal: Journal) -> None:
    journal.open_all()
    wf = rt.register(Gated, name="gated", env=journal)
    inst = wf.create("one")
    inst.wait_for_status("waiting")
    app = create_app(rt)
    url = "/api/workflows/gated/instances/one/history/stream"
    auth = {"Authorization": f"Bearer {app.state.token}"}
    with TestClient(app) as c:
        assert c.get(url).status_code == 401
        threading.Timer(0.2, inst.send_event, ("go", 2)).start()
        with c.stream("GET", url, headers=auth) as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            msgs = _sse(r.iter_lines())
        history = inst.history()
        assert [m["event"] for m in msgs] == [e.type for e in history]
        datas = [json.loads(m["data"]) for m in msgs]
        assert datas[-1]["type"] == "WORKFLOW_SUCCESS"
        assert [d["step"] for d in datas] == [e.step for e in history]
        assert all(d["cursor"] == m["id"] for d, m in zip(datas, msgs, strict=True))
        # Resume with Last-Event-ID, as a browser's EventSource reconnects.
        mid = 5
        with c.stream("GET", url, headers={**auth, "Last-Event-ID": msgs[mid]["id"]}) as r:
            rest = _sse(r.iter_lines())
        assert rest == msgs[mid + 1 :]
        # Or with ?cursor=, and only some types.
        r = c.get(url, params={"cursor": msgs[mid]["id"], "types": "STEP_SUCCESS"}, headers=auth)
        assert [m["event"] for m in _sse(iter(r.text.splitlines()))] == ["STEP_SUCCESS"] * 2
        r = c.get(url, params={"cursor": "nonsense"}, headers=auth)
        assert r.status_code == 400
        assert r.json()["errors"][0]["message"].startswith("workflow 'gated', instance 'one'")
        assert c.get(url, params={"types": "NOPE"}, headers=auth).status_code == 400
        missing = "/api/workflows/gated/instances/nobody/history/stream"
        assert c.get(missing, headers=auth).status_code == 404
