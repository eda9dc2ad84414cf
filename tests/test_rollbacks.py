"""Saga rollbacks: ``step.do(..., rollback=fn, rollback_config=...)`` and ``terminate(rollback=True)``."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import Journal, history_types, wait_for
from starlette.testclient import TestClient

import actorflow as af
from actorflow.cli import cli
from actorflow.http import create_app
from actorflow.testing import FakeClock, NodeProcess

APP = "tests.apps.rollback_app:build"


class Booking(af.Workflow):
    """Three steps with rollbacks, a step without one, then a failure (or not)."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        fail = event.payload.get("fail", True)

        def undo(what: str) -> Any:
            def handler(output: Any, error: BaseException, step_name: str) -> None:
                j.add(("undo", what, output, type(error).__name__, str(error), step_name))

            return handler

        step.do("reserve seat", lambda: "seat-7", rollback=undo("seat"))
        step.do("plain", lambda: "no undo")
        step.do("charge", lambda: {"charge": 42}, rollback=undo("charge"))
        step.do("ticket", lambda: "T-1", rollback=undo("ticket"))
        if fail:
            step.do(
                "email",
                lambda: (_ for _ in ()).throw(RuntimeError("smtp down")),
                retries={"limit": 0},
            )
        return "booked"


def test_lifo_with_output_error_and_step_name(rt: af.Runtime, journal: Journal) -> None:
    b = rt.register(Booking, name="booking", env=journal)
    inst = b.create(id="b1", params={})
    st = inst.wait(10)
    assert st.status == "errored"
    assert st.error == {"name": "RuntimeError", "message": "smtp down"}
    assert st.rollback == {"outcome": "complete", "error": None}
    undos = [e for e in journal.entries if e[0] == "undo"]
    assert undos == [
        ("undo", "ticket", "T-1", "RuntimeError", "smtp down", "ticket-1"),
        ("undo", "charge", {"charge": 42}, "RuntimeError", "smtp down", "charge-1"),
        ("undo", "seat", "seat-7", "RuntimeError", "smtp down", "reserve seat-1"),
    ]
    types = history_types(inst)
    start = types.index("ROLLBACK_START")
    assert types.index("STEP_FAILURE") < start
    assert types[start:] == [
        "ROLLBACK_START",
        *["ROLLBACK_STEP_START", "ROLLBACK_STEP_SUCCESS"] * 3,
        "ROLLBACK_COMPLETE",
        "WORKFLOW_FAILURE",
    ]
    rb_events = [e for e in inst.history() if e.type.startswith("ROLLBACK_STEP")]
    assert [e.step for e in rb_events[::2]] == ["ticket-1", "charge-1", "reserve seat-1"]
    steps = [s for s in inst.steps() if s.kind == "rollback"]
    assert [(s.name, s.status, len(s.attempts)) for s in steps] == [
        ("ticket", "complete", 1),
        ("charge", "complete", 1),
        ("reserve seat", "complete", 1),
    ]
    assert inst.describe().rollback == st.rollback
    assert inst.describe().steps == 5  # the rollbacks are not counted as steps


def test_no_rollback_on_success(rt: af.Runtime, journal: Journal) -> None:
    b = rt.register(Booking, name="booking", env=journal)
    st = b.create(id="ok", params={"fail": False}).wait(10)
    assert st.status == "complete" and st.rollback is None
    assert not [e for e in journal.entries if e[0] == "undo"]
    assert not history_types(b.get("ok"), "ROLLBACK")


class Caught(af.Workflow):
    """A failure ``run`` catches is no failure of the instance: nothing is rolled back."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        step.do("a", lambda: 1, rollback=lambda: j.add("undo a"))
        try:
            step.do("b", lambda: 1 / 0, retries={"limit": 0})
        except ZeroDivisionError:
            pass
        return "fine"


def test_caught_error_runs_no_rollback(rt: af.Runtime, journal: Journal) -> None:
    st = rt.register(Caught, name="caught", env=journal).create(id="c").wait(10)
    assert st.status == "complete" and st.rollback is None
    assert journal.count("undo a") == 0


class AsyncSaga(af.Workflow):
    """An async run, async handlers, one taking ctx; steps started concurrently."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        async def undo(ctx: af.StepContext, output: Any) -> None:
            await asyncio.sleep(0)
            j.add(
                ("undo", ctx.step.name, ctx.step.count, ctx.attempt, ctx.config["timeout"], output)
            )

        async def flaky(ctx: af.StepContext) -> str:
            if ctx.attempt < 2:
                raise RuntimeError("once")
            return "second"

        await step.do("first", lambda: "one", rollback=undo, timeout="1 minute")
        await step.do(
            "flaky",
            flaky,
            rollback=undo,
            retries={"limit": 2, "delay": 0, "backoff": "constant"},
        )
        await step.do("first", lambda: "again", rollback=undo)  # occurrence 2
        raise af.NonRetryableError("give up")


def test_async_handlers_get_the_original_ctx(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(AsyncSaga, name="async-saga", env=journal).create(id="a1")
    st = inst.wait(10)
    assert st.status == "errored" and st.error is not None
    assert st.error["name"] == "NonRetryableError"
    assert st.rollback == {"outcome": "complete", "error": None}
    assert [e for e in journal.entries if e[0] == "undo"] == [
        ("undo", "first", 2, 1, 600_000, "again"),
        ("undo", "flaky", 1, 2, 600_000, "second"),
        ("undo", "first", 1, 1, 60_000, "one"),
    ]


class Retried(af.Workflow):
    """A handler that fails twice before it succeeds, with its own retry policy."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def undo() -> None:
            j.add("try")
            if j.count("try") < 3:
                raise RuntimeError(f"refund failed #{j.count('try')}")

        step.do(
            "charge",
            lambda: 1,
            rollback=undo,
            rollback_config={
                "retries": {"limit": 3, "delay": "10 seconds", "backoff": "constant"},
                "timeout": "5 seconds",
            },
        )
        raise ValueError("later failure")


def test_handler_is_retried_by_its_rollback_config(
    rt: af.Runtime, journal: Journal, clock: FakeClock
) -> None:
    inst = rt.register(Retried, name="retried", env=journal).create(id="r1")
    wait_for(lambda: journal.count("try") == 1)
    wait_for(lambda: inst.status().status == "waiting")  # hibernated in its retry delay
    assert inst.status().rollback == {"outcome": "running", "error": None}
    clock.advance("10 seconds")
    wait_for(lambda: journal.count("try") == 2)
    wait_for(lambda: inst.status().status == "waiting")
    clock.advance("10 seconds")
    st = inst.wait(10)
    assert journal.count("try") == 3
    assert st.status == "errored" and st.rollback == {"outcome": "complete", "error": None}
    (rec,) = [s for s in inst.steps() if s.kind == "rollback"]
    assert rec.config is not None and rec.config["timeout"] == 5_000
    assert [a.error is None for a in rec.attempts] == [False, False, True]
    assert [a.retry_delay_ms for a in rec.attempts[:2]] == [10_000, 10_000]
    assert history_types(inst, "ROLLBACK") == [
        "ROLLBACK_START",
        "ROLLBACK_STEP_START",
        "ROLLBACK_STEP_FAILURE",
        "ROLLBACK_STEP_START",
        "ROLLBACK_STEP_FAILURE",
        "ROLLBACK_STEP_START",
        "ROLLBACK_STEP_SUCCESS",
        "ROLLBACK_COMPLETE",
    ]


class Stops(af.Workflow):
    """The second handler of the chain fails for good: the third never runs."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def broken() -> None:
            j.add("b")
            raise RuntimeError("cannot undo b")

        step.do("a", lambda: 1, rollback=lambda: j.add("a"))
        step.do(
            "b", lambda: 2, rollback=broken, rollback_config={"retries": {"limit": 1, "delay": 0}}
        )
        step.do("c", lambda: 3, rollback=lambda: j.add("c"))
        raise RuntimeError("boom")


def test_chain_stops_at_first_permanent_failure(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Stops, name="stops", env=journal).create(id="s1")
    st = inst.wait(10)
    assert st.status == "errored"
    assert st.error == {"name": "RuntimeError", "message": "boom"}
    assert st.rollback == {
        "outcome": "failed",
        "error": {"name": "RuntimeError", "message": "cannot undo b"},
    }
    assert journal.entries == ["c", "b", "b"]  # two attempts of b; a never runs
    assert history_types(inst, "ROLLBACK")[-1] == "ROLLBACK_FAILED"
    (failed,) = [e for e in inst.history() if e.type == "ROLLBACK_FAILED"]
    assert failed.data["error"]["message"] == "cannot undo b"


class Waits(af.Workflow):
    """Steps done, then a wait for an event: terminated meanwhile."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        def undo(step_name: str, error: BaseException) -> None:
            j.add(("undo", step_name, type(error).__name__))

        step.do("one", lambda: j.add("did one") or 1, rollback=undo)
        step.do("two", lambda: j.add("did two") or 2, rollback=undo)
        step.wait_for_event("approval", "approved", timeout="1 hour")
        step.do("three", lambda: j.add("did three") or 3, rollback=undo)
        return "done"


def test_terminate_with_rollback(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Waits, name="waits", env=journal).create(id="w1")
    inst.wait_for_status("waiting")
    inst.terminate(rollback=True)
    st = inst.wait(10)
    assert st.status == "terminated"
    assert st.rollback == {"outcome": "complete", "error": None}
    undos = [e for e in journal.entries if e[0] == "undo"]
    assert undos == [
        ("undo", "two-1", "InvalidInstanceState"),
        ("undo", "one-1", "InvalidInstanceState"),
    ]
    assert journal.count("did one") == journal.count("did two") == 1
    assert journal.count("did three") == 0
    types = history_types(inst)
    assert types[-1] == "WORKFLOW_TERMINATED"
    assert types.index("ROLLBACK_START") < types.index("ROLLBACK_COMPLETE") < len(types) - 1
    with pytest.raises(af.InvalidInstanceState):
        inst.terminate(rollback=True)


def test_plain_terminate_runs_no_rollback(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Waits, name="waits", env=journal).create(id="w2")
    inst.wait_for_status("waiting")
    inst.terminate()
    st = inst.wait(10)
    assert st.status == "terminated" and st.rollback is None
    assert not [e for e in journal.entries if e[0] == "undo"]
    assert not history_types(inst, "ROLLBACK")


def test_terminate_with_rollback_of_a_paused_instance(rt: af.Runtime, journal: Journal) -> None:
    inst = rt.register(Waits, name="waits", env=journal).create(id="w3")
    inst.wait_for_status("waiting")
    inst.pause()
    inst.wait_for_status("paused")
    inst.terminate(rollback=True)
    st = inst.wait(10)
    assert st.status == "terminated" and st.rollback == {"outcome": "complete", "error": None}
    assert len([e for e in journal.entries if e[0] == "undo"]) == 2


class NothingToUndo(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("a", lambda: 1)
        step.sleep("nap", "1 hour")
        raise RuntimeError("never")


def test_terminate_with_rollback_but_no_handler(rt: af.Runtime) -> None:
    inst = rt.register(NothingToUndo, name="nothing").create(id="n1")
    inst.wait_for_status("waiting")
    inst.terminate(rollback=True)
    st = inst.wait(10)
    assert st.status == "terminated" and st.rollback is None
    assert not history_types(inst, "ROLLBACK")


class Bad(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        how = event.payload
        if how == "not callable":
            step.do("s", lambda: 1, rollback="refund")
        elif how == "unknown key":
            step.do("s", lambda: 1, rollback=lambda: None, rollback_config={"sensitive": "output"})
        elif how == "config alone":
            step.do("s", lambda: 1, rollback_config={"timeout": "1 minute"})
        elif how == "bad signature":
            step.do("s", lambda: 1, rollback=lambda amount: None)
        elif how == "bad timeout":
            step.do("s", lambda: 1, rollback=lambda: None, rollback_config={"timeout": 0})
        return "unreachable"


@pytest.mark.parametrize(
    ("how", "name", "message"),
    [
        ("not callable", "TypeError", "rollback must be a callable"),
        ("unknown key", "ValueError", "unknown rollback_config keys ['sensitive']"),
        ("config alone", "ValueError", "rollback_config is given without a rollback"),
        ("bad signature", "ValueError", "cannot be called with the keyword arguments"),
        ("bad timeout", "ValueError", "timeout must be greater than 0"),
    ],
)
def test_bad_rollback_input_fails_the_run_naming_the_step(
    rt: af.Runtime, how: str, name: str, message: str
) -> None:
    inst = rt.register(Bad, name="bad").create(id="x", params=how)
    st = inst.wait(10)
    assert st.status == "errored" and st.error is not None
    assert st.error["name"] == name
    assert message in st.error["message"]
    assert "workflow 'bad', instance 'x', step 's'" in st.error["message"]
    assert st.rollback is None
    assert [s.name for s in inst.steps()] == []  # refused before the step ran


def test_restart_after_a_rollback_clears_it(rt: af.Runtime, journal: Journal) -> None:
    b = rt.register(Booking, name="booking", env=journal)
    inst = b.create(id="b2", params={})
    assert inst.wait(10).rollback == {"outcome": "complete", "error": None}
    inst.restart()
    wait_for(lambda: len([e for e in journal.entries if e[0] == "undo"]) == 6)
    st = inst.wait(10)
    assert st.status == "errored" and st.rollback == {"outcome": "complete", "error": None}
    # History keeps the run before the restart; the step records are those of the new run.
    assert history_types(inst, "ROLLBACK").count("ROLLBACK_START") == 2
    assert len([s for s in inst.steps() if s.kind == "rollback"]) == 3


def test_rollbacks_survive_a_reopen_in_a_retry_delay(
    make_runtime: Any, journal: Journal, clock: FakeClock
) -> None:
    """A chain hibernated in a handler's retry delay goes on after the runtime reopens."""
    rt = make_runtime()
    inst = rt.register(Retried, name="retried", env=journal).create(id="r2")
    wait_for(lambda: journal.count("try") == 1)
    wait_for(lambda: inst.status().status == "waiting")
    rt.close()
    rt2 = make_runtime()
    inst = rt2.register(Retried, name="retried", env=journal).get("r2")
    clock.advance("10 seconds")
    wait_for(lambda: journal.count("try") == 2)
    wait_for(lambda: inst.status().status == "waiting")
    clock.advance("10 seconds")
    st = inst.wait(10)
    assert st.status == "errored" and st.rollback == {"outcome": "complete", "error": None}
    assert journal.count("try") == 3
    assert history_types(inst, "ROLLBACK").count("ROLLBACK_START") == 1


# -- the faces: the CLI and the HTTP API -----------------------------------------------


@pytest.mark.lmdb_only
def test_cli_and_http_show_the_rollback(tmp_path: Path, clock: FakeClock, journal: Journal) -> None:
    data = str(tmp_path / "data")
    with af.Runtime(data, clock=clock) as rt:
        b = rt.register(Stops, name="stops", env=journal)
        b.create(id="s2").wait(10)
        app = create_app(rt)
        client = TestClient(app, headers={"Authorization": f"Bearer {app.state.token}"})
        view = client.get("/api/workflows/stops/instances/s2").json()["result"]
        assert view["rollback"]["outcome"] == "failed"
        assert "rollback" in {s["type"] for s in view["steps"]}
        hist = client.get("/api/workflows/stops/instances/s2/history").json()["result"]
        assert "ROLLBACK_FAILED" in [e["type"] for e in hist]
        w = rt.register(Waits, name="waits", env=journal)
        w.create(id="w9").wait_for_status("waiting")
        bad = client.patch(
            "/api/workflows/waits/instances/w9/status", json={"status": "pause", "rollback": True}
        )
        assert bad.status_code == 400
        ok = client.patch(
            "/api/workflows/waits/instances/w9/status",
            json={"status": "terminate", "rollback": True},
        )
        assert ok.status_code == 200, ok.text
        st = w.get("w9").wait(10)
        assert st.status == "terminated" and st.rollback is not None
    runner = CliRunner()
    out = runner.invoke(cli, ["--data", data, "--json", "status", "stops", "s2"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["rollback"]["outcome"] == "failed"
    out = runner.invoke(cli, ["--data", data, "--json", "history", "stops", "s2"])
    assert out.exit_code == 0, out.output
    assert "ROLLBACK_STEP_FAILURE" in out.output
    out = runner.invoke(cli, ["--data", data, "--json", "steps", "stops", "s2"])
    assert out.exit_code == 0, out.output
    assert '"rollback"' in out.output


# -- a SIGKILL in the middle of the chain ----------------------------------------------


def _journal(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


def test_sigkill_during_the_chain_resumes_it(tmp_path: Path) -> None:
    """A real child process is killed while the second handler of three blocks.

    Every handler appends its name to a journal (O_APPEND) when it starts and
    ``done:<name>`` when it returns. The first handler completed (its record
    was committed) before the kill and never runs again; the second had
    started, not committed: it may run again (here it does, once the gate
    opens); the third runs once, after the restart.
    """
    data = tmp_path / "data"
    journal = tmp_path / "journal.txt"
    gate = tmp_path / "gate"
    env = {"ROLLBACK_JOURNAL": str(journal), "ROLLBACK_GATE": str(gate)}
    node = NodeProcess(str(data), app=APP, env=env)
    node.start()
    try:
        node.create("saga", "k1")
        deadline = time.monotonic() + 30
        while _journal(journal) != ["undo-c", "done:undo-c", "undo-b"]:
            assert time.monotonic() < deadline, _journal(journal)
            time.sleep(0.01)
        node.kill()
    finally:
        node.kill()
    assert _journal(journal) == ["undo-c", "done:undo-c", "undo-b"]
    gate.touch()
    node = NodeProcess(str(data), app=APP, env=env)
    node.start()
    try:
        st = node.wait_for_status("saga", "k1")
    finally:
        node.terminate()
    assert st["status"] == "errored"
    assert st["rollback"] == {"outcome": "complete", "error": None}
    entries = _journal(journal)
    done = [e for e in entries if e.startswith("done:")]
    assert done == ["done:undo-c", "done:undo-b", "done:undo-a"]  # each completed once
    assert entries.count("undo-c") == 1  # completed before the kill: never ran again
    assert entries.count("undo-a") == 1
    assert entries.count("undo-b") == 2  # started before the kill, not committed
