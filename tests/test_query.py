"""The read-only query module: ``Instance.describe()``, counts, listings, and the faces on it."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import Journal
from starlette.testclient import TestClient

import actorflow as af
from actorflow.cli import cli
from actorflow.http import create_app
from actorflow.testing import FakeClock
from actorflow.workflows.definition import STATUSES
from actorflow.workflows.query import Query, document

START = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


class Probe(af.Workflow):
    """What it does is its params: the status it ends up in."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        journal: Journal = self.env
        kind = event.payload["kind"]
        step.do("first", lambda: 1)
        if kind == "running":
            step.do("gate", lambda: journal.block(event.instance_id))
        elif kind == "errored":

            def boom() -> None:
                raise RuntimeError("card declined")

            step.do("boom", boom, retries={"limit": 0})
        elif kind == "waiting":
            step.wait_for_event("approval", "approved", timeout="1 hour")
        return {"kind": kind}


@pytest.fixture
def clock() -> Any:
    c = FakeClock(START)
    yield c
    c.close()


def _make(rt: af.Runtime, clock: FakeClock, journal: Journal) -> dict[str, af.Instance]:
    """One instance in each status, created one second apart (``q`` is of a workflow
    not registered here, so it stays queued)."""
    wf = rt.register(Probe, name="probe", env=journal)
    out: dict[str, af.Instance] = {}
    for kind in ("complete", "errored", "waiting", "paused", "terminated"):
        inst = wf.create(
            id=kind, params={"kind": "waiting" if kind in ("paused", "terminated") else kind}
        )
        inst.wait_for_status(
            "complete" if kind == "complete" else "errored" if kind == "errored" else "waiting"
        )
        out[kind] = inst
        clock.advance(1000)
    out["paused"].pause()
    out["paused"].wait_for_status("paused")
    out["terminated"].terminate()
    out["queued"] = rt.unregistered("later").create(id="q", params={"kind": "queued"})
    out["running"] = wf.create(id="running", params={"kind": "running"})
    out["running"].wait_for_step("first")
    return out


def test_describe_each_status(rt: af.Runtime, clock: FakeClock, journal: Journal) -> None:
    made = _make(rt, clock, journal)
    ds = {kind: inst.describe() for kind, inst in made.items()}
    for kind, d in ds.items():
        assert isinstance(d, af.InstanceDescription)
        assert d.status == kind, (kind, d)
        assert d.status == made[kind].status().status
        assert d.created.tzinfo is not None
        assert d.epoch == (2 if kind == "terminated" else 1) and d.owner is None
        assert d.params == {"kind": kind} or kind in ("paused", "terminated")
    assert ds["complete"].created == START
    assert ds["errored"].created == START + timedelta(seconds=1)
    assert ds["running"].created == START + timedelta(seconds=5)

    done = ds["complete"]
    assert (done.output, done.error, done.waiting_for) == ({"kind": "complete"}, None, ())
    assert (done.steps, done.steps_complete, done.steps_failed) == (1, 1, 0)
    assert done.started == START and done.ended == START

    err = ds["errored"]
    assert err.output is None and err.error == {"name": "RuntimeError", "message": "card declined"}
    assert (err.steps, err.steps_complete, err.steps_failed) == (2, 1, 1)
    assert err.ended == START + timedelta(seconds=1)

    waiting = ds["waiting"]
    assert waiting.waiting_for == ("approved",) and waiting.ended is None
    assert (waiting.steps, waiting.steps_complete) == (2, 1)
    assert waiting.started == START + timedelta(seconds=2)

    paused = ds["paused"]
    assert paused.params == {"kind": "waiting"} and paused.ended is None
    assert paused.waiting_for == ()

    term = ds["terminated"]
    assert term.ended == START + timedelta(seconds=5)  # terminated after the last advance
    assert term.output is None and term.error is None

    queued = ds["queued"]
    assert (queued.workflow, queued.started, queued.ended, queued.steps) == ("later", None, None, 0)

    running = ds["running"]
    assert running.started == START + timedelta(seconds=5) and running.ended is None
    # "gate" is in flight: a step is written when it ends (one write per step)
    assert (running.steps, running.steps_complete) == (1, 1)

    with pytest.raises(af.InstanceNotFound):
        af.Instance(rt.workflow("probe"), "nope").describe()


def test_counts_are_the_statuses_of_the_instances(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    made = _make(rt, clock, journal)
    wf = rt.workflow("probe")
    q = wf.parts.query
    want = dict.fromkeys((s for s in STATUSES if s != "unknown"), 0)
    for inst in wf.list(limit=None):
        want[inst.status().status] += 1
    assert q.counts("probe") == want
    assert want["running"] == 1 and sum(want.values()) == 6
    assert q.counts("later")["queued"] == 1
    assert q.workflows() == ["later", "probe"]
    journal.open_all()
    made["running"].wait(5)
    assert q.counts("probe")["complete"] == 2 and q.counts("probe")["running"] == 0


def test_list_pages_with_a_cursor(rt: af.Runtime, clock: FakeClock) -> None:
    wf = rt.unregistered("paged")
    for i in range(7):
        wf.create(id=f"i{i}")
        clock.advance(1)
    pages: list[list[str]] = []
    cursor = None
    while True:
        page = [i.id for i in wf.list(limit=3, cursor=cursor)]
        if not page:
            break
        pages.append(page)
        cursor = page[-1]
    assert pages == [["i6", "i5", "i4"], ["i3", "i2", "i1"], ["i0"]]
    # The token pages of the query module (the CLI's) walk the same order.
    q = wf.parts.query
    tokens: list[list[str]] = []
    token = None
    while True:
        p = q.page("paged", limit=3, token=token)
        tokens.append([r.id for r in p.rows])
        token = p.next
        if token is None:
            break
    assert tokens == pages
    with pytest.raises(ValueError):
        q.page(token="!!")
    after = START + timedelta(milliseconds=3)
    assert [i.id for i in wf.list(created_after=after)] == ["i6", "i5", "i4"]


def test_cli_and_http_give_the_same_description(
    tmp_path: Path, clock: FakeClock, journal: Journal
) -> None:
    data = tmp_path / "data"
    with af.Runtime(data, clock=clock) as rt:
        made = _make(rt, clock, journal)
        app = create_app(rt, token="t")
        with TestClient(app, headers={"Authorization": "Bearer t"}) as http:
            served = {}
            for kind, inst in made.items():
                wf = "later" if kind == "queued" else "probe"
                body = http.get(f"/api/workflows/{wf}/instances/{inst.id}").json()["result"]
                served[kind] = body
                assert body["description"] == document(inst.describe())
                # The fields the view had before agree with the description.
                d = body["description"]
                assert (body["status"], body["queued"], body["start"], body["end"]) == (
                    d["status"],
                    d["created"],
                    d["started"],
                    d["ended"],
                )
                assert len(body["steps"]) == d["steps"]
        journal.open_all()
        made["running"].wait(5)
        served["running"] = {"description": document(made["running"].describe())}
    for kind, inst in made.items():
        wf = "later" if kind == "queued" else "probe"
        res = CliRunner().invoke(
            cli, ["--data", str(data), "--json", "describe", wf, inst.id], catch_exceptions=False
        )
        assert res.exit_code == 0, res.output
        assert json.loads(res.output) == served[kind]["description"], kind
        st = json.loads(
            CliRunner().invoke(cli, ["--data", str(data), "--json", "status", wf, inst.id]).output
        )
        d = served[kind]["description"]
        assert (st["status"], st["queued"], st["error"]) == (d["status"], d["created"], d["error"])
    text = CliRunner().invoke(cli, ["--data", str(data), "describe", "probe", "waiting"]).output
    assert "waiting_for" in text and "approved" in text
    res = CliRunner().invoke(cli, ["--data", str(data), "describe", "probe", "nope"])
    assert res.exit_code == 1 and "no instance 'nope'" in res.output


def test_a_directory_is_read_without_a_runtime(tmp_path: Path, clock: FakeClock) -> None:
    with af.Runtime(tmp_path / "data", clock=clock) as rt:
        rt.unregistered("w").create(id="a", params=[1, 2])
    with Query.open(tmp_path / "data") as q:
        assert q.describe("w", "a").params == [1, 2]
        assert q.counts("w")["queued"] == 1
        assert q.status("w", "a") == af.InstanceStatus("queued")
        assert [r.id for r in q.page().rows] == ["a"]
    with pytest.raises(FileNotFoundError), Query.open(tmp_path / "nowhere"):
        pass
