"""The ``actorflow`` command: reads, changes on a closed directory, refusal on an open one."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
import types
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

import actorflow as af
from actorflow.cli import cli, main
from actorflow.testing import FakeClock


class Order(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        journal: Any = self.env

        def charge(ctx: af.StepContext) -> str:
            journal.add(("charge", event.instance_id))
            if ctx.attempt == 1 and event.payload == "flaky":
                raise RuntimeError("card declined")
            return "charged"

        step.do("charge", charge, retries={"limit": 2, "delay": 1, "backoff": "constant"})
        ev = step.wait_for_event("approval", "approved", timeout="1 hour")
        step.do("ship", lambda: journal.add(("ship", event.instance_id)))
        return ev.payload


def run_cli(data: str | Path, *args: str, code: int = 0) -> Result:
    result = CliRunner().invoke(cli, ["--data", str(data), *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    return result


@pytest.fixture
def data(location: str, journal: Any) -> str:
    """A closed location with three instances waiting for their approval."""
    path = location
    with af.Runtime(path) as rt:
        wf = rt.register(Order, name="order", env=journal)
        for i, p in enumerate(["flaky", "ok", "ok"]):
            wf.create(id=f"o{i}", params=p)
            time.sleep(0.003)  # "newest first" orders by creation time, in whole ms
        for i in range(3):
            wf.get(f"o{i}").wait_for_status("waiting")
    return path


def reopen(path: str | Path, journal: Any) -> tuple[af.Runtime, af.WorkflowBinding]:
    rt = af.Runtime(path)
    return rt, rt.register(Order, name="order", env=journal)


# -- reads -------------------------------------------------------------------------------


def test_list_status_history_steps(data: str) -> None:
    out = run_cli(data, "list").output
    assert out.splitlines()[0].split() == ["workflow", "id", "status", "created"]
    assert [line.split()[1] for line in out.splitlines()[2:]] == ["o2", "o1", "o0"]
    rows = json.loads(run_cli(data, "--json", "list", "--status", "waiting").output)
    assert [r["id"] for r in rows["instances"]] == ["o2", "o1", "o0"]
    assert json.loads(run_cli(data, "--json", "list", "--status", "complete").output) == {
        "instances": [],
        "cursor": None,
    }
    st = json.loads(run_cli(data, "--json", "status", "order", "o0").output)
    assert (st["status"], st["error"]) == ("waiting", None)
    assert "waiting" in run_cli(data, "status", "order", "o0").output
    hist = json.loads(run_cli(data, "--json", "history", "order", "o0").output)
    types_ = [e["type"] for e in hist]
    assert types_[:3] == ["WORKFLOW_QUEUED", "WORKFLOW_START", "STEP_START"]
    assert "ATTEMPT_FAILURE" in types_ and types_[-1] == "WAIT_START"
    assert "ATTEMPT_FAILURE" in run_cli(data, "history", "order", "o0").output
    steps = json.loads(run_cli(data, "--json", "steps", "order", "o0").output)
    charge = steps[0]
    assert (charge["name"], charge["status"], len(charge["attempts"])) == ("charge", "complete", 2)
    assert charge["attempts"][0]["error"] == {"name": "RuntimeError", "message": "card declined"}
    assert charge["attempts"][0]["retry_delay_ms"] == 1
    table = run_cli(data, "steps", "order", "o0").output
    assert "charge" in table and "approval" in table and "waitForEvent" in table
    err = run_cli(data, "status", "order", "nope", code=1).output
    assert "no instance 'nope'" in err


def test_list_pages_with_a_cursor(data: str) -> None:
    seen: list[str] = []
    cursor = None
    for _ in range(5):
        args = ["--json", "list", "--limit", "2"] + (["--cursor", cursor] if cursor else [])
        page = json.loads(run_cli(data, *args).output)
        seen += [r["id"] for r in page["instances"]]
        cursor = page["cursor"]
        if cursor is None:
            break
    assert seen == ["o2", "o1", "o0"]
    assert "--cursor" in run_cli(data, "list", "--limit", "1").output
    run_cli(data, "list", "--cursor", "!!", code=2)


def test_metrics_command(data: str) -> None:
    m = json.loads(run_cli(data, "--json", "metrics").output)
    assert m["workflows"]["order"]["counts"] == {"waiting": 3}
    assert m["timer_backlog"] == 3  # the approvals' timeouts
    assert "waiting=3" in run_cli(data, "metrics").output


# -- changes on a closed directory: the next runtime continues them ---------------------------


def test_send_event_is_taken_by_the_next_runtime(data: str, journal: Any) -> None:
    run_cli(data, "send-event", "order", "o1", "approved", "--payload", '{"by": "ann"}')
    assert json.loads(run_cli(data, "--json", "status", "order", "o1").output)["status"] == "queued"
    rt, wf = reopen(data, journal)
    with rt:
        assert wf.get("o1").wait(timeout=10).output == {"by": "ann"}
        assert wf.get("o2").status().status == "waiting"
    assert journal.count(("ship", "o1")) == 1
    run_cli(data, "send-event", "order", "o1", "approved", "--payload", "{not json", code=2)


def test_pause_then_resume_offline(data: str, journal: Any) -> None:
    run_cli(data, "pause", "order", "o2")
    run_cli(data, "send-event", "order", "o2", "approved", "--payload", '"late"')
    rt, wf = reopen(data, journal)
    with rt:
        assert rt.wait_until_idle()
        assert wf.get("o2").status().status == "paused"  # the event waits in its buffer
    run_cli(data, "resume", "order", "o2")
    rt, wf = reopen(data, journal)
    with rt:
        assert wf.get("o2").wait(timeout=10).output == "late"


def test_terminate_offline_is_final(data: str, journal: Any) -> None:
    run_cli(data, "terminate", "order", "o0")
    rt, wf = reopen(data, journal)
    with rt:
        assert wf.get("o0").status().status == "terminated"
        with pytest.raises(af.InvalidInstanceState, match="terminated"):
            wf.get("o0").send_event("approved")
    assert journal.count(("ship", "o0")) == 0
    out = run_cli(data, "terminate", "order", "o0", code=1).output
    assert "InvalidInstanceState" in out


def test_restart_from_step_offline(data: str, journal: Any) -> None:
    rt, wf = reopen(data, journal)
    with rt:
        wf.get("o1").send_event("approved", 1)
        assert wf.get("o1").wait(timeout=10).output == 1
    charges = journal.count(("charge", "o1"))
    run_cli(data, "restart", "order", "o1", "--from-step", "ship")
    assert json.loads(run_cli(data, "--json", "status", "order", "o1").output)["status"] == "queued"
    rt, wf = reopen(data, journal)
    with rt:
        assert wf.get("o1").wait(timeout=10).output == 1  # the approval is kept too
    assert journal.count(("charge", "o1")) == charges  # kept: before the restart point
    assert journal.count(("ship", "o1")) == 2
    run_cli(data, "restart", "order", "o1", "--from-step", "nope", code=1)


def test_delete_offline_removes_instances_and_frees_their_ids(data: str, journal: Any) -> None:
    doc = json.loads(run_cli(data, "--json", "delete", "order", "o0", "o2").output)
    assert doc == {"ok": True, "done": ["o0", "o2"], "refused": {}}
    rows = json.loads(run_cli(data, "--json", "list").output)["instances"]
    assert [r["id"] for r in rows] == ["o1"]
    err = run_cli(data, "status", "order", "o0", code=1).output
    assert "workflow 'order' has no instance 'o0'" in err
    assert run_cli(data, "delete", "order", "o1").output == "delete: order/o1\n"
    assert json.loads(run_cli(data, "--json", "list").output)["instances"] == []
    rt, wf = reopen(data, journal)
    with rt:
        for iid in ("o0", "o1", "o2"):
            with pytest.raises(af.InstanceNotFound):
                wf.get(iid)
        assert journal.count(("charge", "o1")) == 1
        again = wf.create(id="o1", params="ok")  # the id is free again: a new instance
        again.wait_for_status("waiting")
        assert [e.type for e in again.history()].count("WORKFLOW_QUEUED") == 1
        assert journal.count(("charge", "o1")) == 2


def test_fork_and_diff_offline(data: str, journal: Any) -> None:
    rt, wf = reopen(data, journal)
    with rt:
        wf.get("o1").send_event("approved", {"by": "ann"})
        assert wf.get("o1").wait(timeout=10).output == {"by": "ann"}
    out = run_cli(
        data, "--json", "fork", "order", "o1", "ship", "--id", "f1", "--override",
        'approval={"by": "cli"}',
    ).output  # fmt: skip
    origin = {"workflow": "order", "instance": "o1", "at_step": {"name": "ship", "count": 1}}
    assert json.loads(out) == {
        "id": "f1",
        "workflow": "order",
        "status": "queued",
        "forked_from": origin,
    }
    table = run_cli(data, "fork", "order", "o1", "approval", "--id", "f2").output
    assert table == "fork: order/o1 at step 'approval' -> order/f2\n"
    assert (
        json.loads(run_cli(data, "--json", "describe", "order", "f1").output)["forked_from"]
        == origin
    )
    rt, wf = reopen(data, journal)
    with rt:
        assert wf.get("f1").wait(timeout=10).output == {"by": "cli"}
        wf.get("f2").wait_for_status("waiting")
    assert journal.count(("charge", "f1")) == 0 and journal.count(("ship", "f1")) == 1
    # diff: the approval differs; charge and ship are the same.
    r = run_cli(data, "--json", "diff", "order", "o1", "f1", code=1)
    doc = json.loads(r.output)
    assert [(d["name"], d["count"]) for d in doc["differ"]] == [("approval", 1)]
    assert doc["differ"][0]["a"]["output"] == {"by": "ann"}
    assert doc["differ"][0]["b"]["output"] == {"by": "cli"}
    assert (doc["only_a"], doc["only_b"], doc["same"]) == ([], [], 2)
    assert (doc["workflow"], doc["a"], doc["b"]) == ("order", "o1", "f1")
    table = run_cli(data, "diff", "order", "o1", "f1", code=1).output
    assert "approval" in table and "differs" in table and '{"by": "cli"}' in table
    assert "charge" not in table
    # f2 waits for its approval: that step differs (waiting), ship is only in o1.
    doc = json.loads(run_cli(data, "--json", "diff", "order", "o1", "f2", code=1).output)
    assert [d["name"] for d in doc["differ"]] == ["approval"]
    assert doc["differ"][0]["b"]["status"] == "waiting"
    assert [(d["name"], d["count"]) for d in doc["only_a"]] == [("ship", 1)]
    assert "only in o1" in run_cli(data, "diff", "order", "o1", "f2", code=1).output
    same = run_cli(data, "diff", "order", "o1", "o1").output
    assert same == "order/o1 and order/o1: the same 3 steps\n"
    assert "no instance 'nope'" in run_cli(data, "diff", "order", "o1", "nope", code=2).output


def test_fork_errors_offline(data: str) -> None:
    out = run_cli(data, "fork", "order", "o1", "nope", code=1).output
    assert "InvalidInstanceState" in out and "'order'" in out and "'nope'" in out
    out = run_cli(data, "fork", "order", "o1", "approval", "--id", "o2", code=1).output
    assert "InstanceAlreadyExists" in out
    out = run_cli(data, "fork", "order", "o1", "approval", "--id", "a b", code=1).output
    assert "InvalidInstanceId" in out
    out = run_cli(data, "fork", "order", "o1", "approval", "--override", "ship=1", code=1).output
    assert "'ship'" in out and "not one of its steps" in out
    out = run_cli(data, "fork", "order", "ghost", "approval", code=1).output
    assert "InstanceNotFound" in out
    run_cli(data, "fork", "order", "o1", "approval", "--override", "charge", code=2)
    run_cli(data, "fork", "order", "o1", "approval", "--override", "charge=nope", code=2)
    run_cli(data, "fork", "order", "o1", "approval", "--params", "{", code=2)
    run_cli(data, "fork", "order", "o1", "approval", "--count", "0", code=2)
    out = run_cli(data, "fork", "order", "o1", "charge", "--count", "2", code=1).output
    assert "occurrence 2" in out
    ids = [r["id"] for r in json.loads(run_cli(data, "--json", "list").output)["instances"]]
    assert sorted(ids) == ["o0", "o1", "o2"]  # nothing was made


def test_delete_of_an_unknown_instance_names_it(data: str, journal: Any) -> None:
    result = run_cli(data, "delete", "order", "nope", code=1)
    assert "InstanceNotFound" in result.output
    assert "workflow 'order'" in result.output and "no instance 'nope'" in result.output
    # Several ids: the others are deleted; each refused one is named on stderr.
    result = CliRunner().invoke(cli, ["--data", data, "--json", "delete", "order", "o1", "nope"])
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["done"] == ["o1"]
    assert list(doc["refused"]) == ["nope"]
    assert doc["refused"]["nope"].startswith("InstanceNotFound: ")
    assert "no instance 'nope'" in doc["refused"]["nope"]
    assert "order/nope: InstanceNotFound: " in result.stderr
    table = run_cli(data, "delete", "order", "o0", "gone", code=1).output
    assert "delete: 1 of 2 instances of order" in table
    rt, wf = reopen(data, journal)
    with rt:
        assert wf.get("o2").status().status == "waiting"
        for iid in ("o0", "o1"):
            with pytest.raises(af.InstanceNotFound):
                wf.get(iid)
    usage = run_cli(data, "delete", "order", code=2).output
    assert "IDs or --status" in usage
    run_cli(data, "delete", "order", "o2", "--status", "waiting", code=2)
    run_cli(data, "delete", "order", "--status", "bogus", code=2)


def test_delete_by_status_goes_in_batches_of_100(
    location: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with af.Runtime(location) as rt:  # nothing registered: they stay queued
        bulk = rt.unregistered("bulk")
        bulk.create_batch([{"id": f"b{n:03}"} for n in range(250)])
        bulk.get("b007").terminate()
        rt.unregistered("other").create(id="b000")
    batches: list[int] = []
    real = af.WorkflowBinding.delete_batch

    def spy(self: af.WorkflowBinding, ids: Any) -> dict[str, list[Any]]:
        batches.append(len(ids))
        return real(self, ids)

    monkeypatch.setattr(af.WorkflowBinding, "delete_batch", spy)
    result = run_cli(location, "--json", "delete", "bulk", "--status", "queued")
    doc = json.loads(result.stdout)
    assert doc["ok"] is True and doc["refused"] == {}
    assert sorted(doc["done"]) == [f"b{n:03}" for n in range(250) if n != 7]
    assert batches == [100, 100, 49]
    assert "delete: 249/249" in result.stderr.splitlines()
    assert "delete: 0 of 0" in run_cli(location, "delete", "bulk", "--status", "queued").output
    with af.Runtime(location) as rt:
        assert [i.id for i in rt.unregistered("bulk").list(limit=None)] == ["b007"]
        assert rt.unregistered("bulk").get("b007").status().status == "terminated"
        assert rt.unregistered("other").get("b000").status().status == "queued"


# -- a directory a runtime holds open -----------------------------------------------------------

_OWNER = """
import sys, time, actorflow as af
class Order(af.Workflow):
    def run(self, event, step):
        return step.wait_for_event("approval", "approved", timeout="1 hour").payload
with af.Runtime(sys.argv[1]) as rt:
    rt.register(Order, name="order")
    print("ready", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def owned(data: str) -> Iterator[Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _OWNER, str(data)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        yield data
    finally:
        proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def test_changes_are_refused_while_a_runtime_owns_the_directory(owned: Path) -> None:
    for args in (
        ["pause", "order", "o1"],
        ["terminate", "order", "o1"],
        ["restart", "order", "o1"],
        ["send-event", "order", "o1", "approved"],
        ["resume", "order", "o1"],
        ["delete", "order", "o1"],
        ["delete", "order", "--status", "waiting"],
    ):
        out = run_cli(owned, *args, code=1).output
        assert "running process" in out and "--url" in out
    # Reads work meanwhile, and nothing was changed.
    st = json.loads(run_cli(owned, "--json", "status", "order", "o1").output)
    assert st["status"] == "waiting"
    assert len(json.loads(run_cli(owned, "--json", "list").output)["instances"]) == 3
    metrics = json.loads(run_cli(owned, "--json", "metrics").output)
    assert metrics["workflows"]["order"]["counts"] == {"waiting": 3}


def test_the_lock_is_released_when_the_runtime_closes(data: str, journal: Any) -> None:
    rt, _ = reopen(data, journal)
    run_cli(data, "pause", "order", "o1", code=1)  # held by this process's runtime
    rt.close()
    run_cli(data, "pause", "order", "o1")


# -- a running service through its HTTP API --------------------------------------------------------


class _Stub(BaseHTTPRequestHandler):
    calls: list[tuple[str, str, Any, str | None]]

    def _reply(self, code: int, result: Any, errors: list[Any] | None = None) -> None:
        body = json.dumps(
            {"success": code < 400, "errors": errors or [], "messages": [], "result": result}
        ).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _handle(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(n)) if n else None
        self.calls.append((self.command, self.path, body, self.headers.get("Authorization")))
        if self.path.startswith("/api/workflows/order/instances/missing"):
            self._reply(
                404,
                None,
                [{"code": 404, "name": "InstanceNotFound", "message": "no instance 'missing'"}],
            )
        elif self.path == "/api/workflows":
            self._reply(200, [{"name": "order"}])
        elif self.path.startswith("/api/workflows/order/instances?"):
            self._reply(
                200,
                [{"id": "a", "workflow": "order", "status": "running", "created_on": "2026-01-01"}],
            )
        elif self.path == "/api/workflows/order/instances/a":
            self._reply(
                200,
                {
                    "id": "a",
                    "status": "paused",
                    "steps": [
                        {
                            "name": "s",
                            "count": 1,
                            "type": "step",
                            "status": "complete",
                            "attempts": [],
                        }
                    ],
                },
            )
        else:
            self._reply(200, None)

    do_GET = do_POST = do_PATCH = do_DELETE = _handle

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def service() -> Iterator[tuple[str, list[Any]]]:
    calls: list[Any] = []
    handler = type("Handler", (_Stub,), {"calls": calls})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", calls
    server.shutdown()
    server.server_close()


def test_url_mode_uses_the_http_api(service: tuple[str, list[Any]]) -> None:
    url, calls = service
    r = CliRunner().invoke(
        cli, ["--url", url, "--token", "s3cret", "--json", "list", "-w", "order", "-s", "running"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["instances"][0]["id"] == "a"
    assert calls[-1][:2] == ("GET", "/api/workflows/order/instances?status=running&limit=50")
    assert calls[-1][3] == "Bearer s3cret"
    r = CliRunner().invoke(cli, ["--url", url, "status", "order", "a"])
    assert r.exit_code == 0 and "paused" in r.output
    r = CliRunner().invoke(cli, ["--url", url, "steps", "order", "a"])
    assert r.exit_code == 0 and "complete" in r.output
    CliRunner().invoke(cli, ["--url", url, "restart", "order", "a", "--from-step", "s"])
    assert calls[-1][:3] == (
        "PATCH",
        "/api/workflows/order/instances/a/status",
        {"status": "restart", "from_step": "s"},
    )
    CliRunner().invoke(
        cli, ["--url", url, "terminate", "order", "a"], env={"ACTORFLOW_TOKEN": "from-env"}
    )
    assert calls[-1][2:] == ({"status": "terminate"}, "Bearer from-env")
    CliRunner().invoke(cli, ["--url", url, "send-event", "order", "a", "go", "--payload", "[1]"])
    assert calls[-1][:3] == ("POST", "/api/workflows/order/instances/a/events/go", [1])
    r = CliRunner().invoke(cli, ["--url", url, "pause", "order", "missing"])
    assert r.exit_code == 1 and "InstanceNotFound: no instance 'missing'" in r.output
    r = CliRunner().invoke(cli, ["--url", url, "--json", "delete", "order", "a"])
    assert r.exit_code == 0 and json.loads(r.stdout) == {"ok": True, "done": ["a"], "refused": {}}
    assert calls[-1] == ("DELETE", "/api/workflows/order/instances/a", None, None)
    r = CliRunner().invoke(cli, ["--url", url, "delete", "order", "missing"])
    assert r.exit_code == 1 and "InstanceNotFound: no instance 'missing'" in r.output
    r = CliRunner().invoke(cli, ["--url", url, "--json", "list"])
    assert r.exit_code == 0 and calls[-2][1] == "/api/workflows"


# -- the token: from the environment or a file, never quietly from argv -----------------------------


def test_a_token_on_the_command_line_warns_that_ps_shows_it(service: tuple[str, list[Any]]) -> None:
    url, calls = service
    r = CliRunner().invoke(
        cli,
        ["--url", url, "--token", "s3cret", "--json", "list", "-w", "order"],
        env={"ACTORFLOW_TOKEN": None},
    )
    assert r.exit_code == 0, r.output  # it still works: scripts that pass it keep running
    assert calls[-1][3] == "Bearer s3cret"
    assert "--token puts the token on the command line" in r.stderr
    assert "ps" in r.stderr and "ACTORFLOW_TOKEN" in r.stderr and "--token-file" in r.stderr
    assert "s3cret" not in r.stderr
    json.loads(r.stdout)
    r = CliRunner().invoke(
        cli, ["--url", url, "--json", "list", "-w", "order"], env={"ACTORFLOW_TOKEN": "from-env"}
    )
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert calls[-1][3] == "Bearer from-env"


def test_the_token_can_come_from_a_file(service: tuple[str, list[Any]], tmp_path: Path) -> None:
    url, calls = service
    path = tmp_path / "token"
    path.write_text("  from-file\n")
    r = CliRunner().invoke(
        cli,
        ["--url", url, "--token-file", str(path), "--json", "list", "-w", "order"],
        env={"ACTORFLOW_TOKEN": "from-env"},
    )
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert calls[-1][3] == "Bearer from-file"  # the file wins over the environment
    n = len(calls)
    both = CliRunner().invoke(
        cli, ["--url", url, "--token-file", str(path), "--token", "x", "list"]
    )
    assert both.exit_code == 2 and "not both" in both.output
    path.write_text("\n")
    empty = CliRunner().invoke(cli, ["--url", url, "--token-file", str(path), "list"])
    assert empty.exit_code == 2 and "is empty" in empty.output
    missing = CliRunner().invoke(cli, ["--url", url, "--token-file", str(tmp_path / "no"), "list"])
    assert missing.exit_code == 2 and "cannot read" in missing.output
    assert len(calls) == n  # nothing was sent without the token meant


def test_serve_takes_its_token_from_a_file_and_warns_about_argv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    got: list[str | None] = []
    fake = types.ModuleType("actorflow.http")

    def serve(rt: af.Runtime, host: str, port: int, token: str | None) -> None:
        got.append(token)

    fake.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "actorflow.http", fake)
    monkeypatch.delenv("ACTORFLOW_TOKEN", raising=False)
    path = tmp_path / "token"
    path.write_text("served-token\n")
    data = str(tmp_path / "d")
    assert main(["--data", data, "serve", "--token-file", str(path)]) == 0
    assert main(["--data", data, "--token-file", str(path), "serve"]) == 0
    assert "--token puts" not in capsys.readouterr().err
    assert main(["--data", data, "serve", "--token", "argv-token"]) == 0
    assert "--token puts the token on the command line" in capsys.readouterr().err
    assert got == ["served-token", "served-token", "argv-token"]


# -- serve and bench -------------------------------------------------------------------------------


def test_serve_calls_the_http_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    got: dict[str, Any] = {}
    fake = types.ModuleType("actorflow.http")

    def serve(rt: af.Runtime, host: str, port: int, token: str | None) -> None:
        got.update(data=rt.data_dir, host=host, port=port, token=token)

    fake.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "actorflow.http", fake)
    monkeypatch.setenv("ACTORFLOW_TOKEN", "tok")
    assert main(["--data", str(tmp_path / "d"), "serve", "--host", "0.0.0.0", "--port", "9"]) == 0
    assert got == {"data": str(tmp_path / "d"), "host": "0.0.0.0", "port": 9, "token": "tok"}


def test_serve_without_an_app_controls_the_directory(
    data: Path, journal: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    got: dict[str, Any] = {}
    fake = types.ModuleType("actorflow.http")

    def serve(rt: af.Runtime, host: str, port: int, token: str | None) -> None:
        got["workflows"] = rt.workflows
        inst = rt.workflow("order").get("o1")  # what the HTTP API does
        got["status"] = inst.status().status
        inst.pause()

    fake.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "actorflow.http", fake)
    assert main(["--data", str(data), "serve"]) == 0
    assert got == {"workflows": ["order"], "status": "waiting"}
    rt, wf = reopen(data, journal)
    with rt:
        assert wf.get("o1").status().status == "paused"
        assert wf.get("o2").status().status == "waiting"


def test_serve_with_an_app_builds_the_runtime_on_the_data_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    got: dict[str, Any] = {}
    fake = types.ModuleType("actorflow.http")

    def serve(rt: af.Runtime, host: str, port: int, token: str | None) -> None:
        got.update(data=rt.data_dir, workflows=rt.workflows)

    fake.serve = serve  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "actorflow.http", fake)
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert main(["--data", str(tmp_path / "d"), "serve", "--app", "apps.crash_app:factory"]) == 0
    assert got == {"data": str(tmp_path / "d"), "workflows": ["crashflow"]}


def test_bench_arguments_pass_through(monkeypatch: pytest.MonkeyPatch) -> None:
    import actorflow.bench

    got: list[list[str]] = []
    monkeypatch.setattr(actorflow.bench, "main", lambda argv: got.append(argv) or 3)
    assert main(["bench", "--profile", "cloudflare-v2", "--repeat", "1", "--help"]) == 3
    assert got == [["--profile", "cloudflare-v2", "--repeat", "1", "--help"]]


# -- binding.list ----------------------------------------------------------------------------------


def test_binding_list_pages_filters_and_keeps_its_place(rt: af.Runtime, clock: FakeClock) -> None:
    wf = rt.unregistered("queued-only")  # nothing runs: they stay queued
    for i in range(5):
        wf.create(id=f"i{i}")
        clock.advance(10)
    ids = [i.id for i in wf.list()]
    assert ids == ["i4", "i3", "i2", "i1", "i0"]
    first = wf.list(limit=2)
    assert [i.id for i in first] == ["i4", "i3"]
    first[-1].terminate()  # its status changes: the next page still starts after it
    assert [i.id for i in wf.list(limit=2, cursor="i3")] == ["i2", "i1"]
    after = [i.id for i in wf.list(created_after=round(rt.clock.now() * 1000) - 25)]
    assert after == ["i4", "i3"]
    assert [i.id for i in wf.list(status="queued", limit=10)] == ["i4", "i2", "i1", "i0"]


def test_url_mode_against_the_real_http_api(rt: af.Runtime, journal: Any, clock: FakeClock) -> None:
    http = pytest.importorskip("actorflow.http")
    wf = rt.register(Order, name="order", env=journal)
    for i in range(3):
        wf.create(id=f"o{i}", params="ok")
        clock.advance(1)
    for i in range(3):
        wf.get(f"o{i}").wait_for_status("waiting")
    with http.serving(rt, token="s3cret") as url:

        def cli_(*args: str, code: int = 0, token: str | None = "s3cret") -> str:
            r = CliRunner().invoke(cli, ["--url", url, *args], env={"ACTORFLOW_TOKEN": token})
            assert r.exit_code == code, r.output
            return r.output

        page = json.loads(cli_("--json", "list", "-w", "order", "--limit", "2"))
        assert [r["id"] for r in page["instances"]] == ["o2", "o1"]
        page2 = json.loads(cli_("--json", "list", "-w", "order", "--cursor", page["cursor"]))
        assert [r["id"] for r in page2["instances"]] == ["o0"]
        assert len(json.loads(cli_("--json", "list"))["instances"]) == 3
        assert "waiting" in cli_("status", "order", "o1")
        assert "charge" in cli_("steps", "order", "o1")
        assert "WAIT_START" in cli_("history", "order", "o1")
        assert "order" in cli_("metrics")
        out = cli_("pause", "order", "o1", code=1, token="wrong")
        assert "Unauthorized: a valid bearer token is required" in out
        assert wf.get("o1").status().status == "waiting"
        cli_("pause", "order", "o1")
        assert wf.get("o1").status().status == "paused"
        cli_("resume", "order", "o1")
        cli_("send-event", "order", "o1", "approved", "--payload", '{"by": "bo"}')
        assert wf.get("o1").wait(timeout=10).output == {"by": "bo"}
        cli_("terminate", "order", "o0")
        assert wf.get("o0").status().status == "terminated"
        cli_("restart", "order", "o0")
        wf.get("o0").wait_for_status("waiting")
        assert "InstanceNotFound" in cli_("status", "order", "nope", code=1)
        assert wf.get("o2").status().status == "waiting"
        out = cli_("delete", "order", "o2", code=1, token="wrong")
        assert "Unauthorized" in out
        assert wf.get("o2").status().status == "waiting"
        assert cli_("delete", "order", "o2") == "delete: order/o2\n"
        with pytest.raises(af.InstanceNotFound):
            wf.get("o2")
        out = cli_("delete", "order", "o2", code=1)
        assert "InstanceNotFound" in out and "'order'" in out and "no instance 'o2'" in out
        made = json.loads(
            cli_("--json", "fork", "order", "o1", "ship", "--id", "f", "--params", "1")
        )
        assert made["id"] == "f" and made["forked_from"]["instance"] == "o1"
        assert wf.get("f").wait(timeout=10).output == {"by": "bo"}
        assert wf.get("f").describe().params == 1
        assert "InvalidInstanceState" in cli_("fork", "order", "o1", "nope", code=1)
        assert json.loads(cli_("--json", "diff", "order", "o1", "f"))["same"] == 3
        assert "InstanceNotFound" in cli_("diff", "order", "o1", "nope", code=2)
        wf.get("f").delete()
        doc = json.loads(cli_("--json", "delete", "order", "--status", "waiting"))
        assert doc == {"ok": True, "done": ["o0"], "refused": {}}
        assert [r["id"] for r in json.loads(cli_("--json", "list"))["instances"]] == ["o1"]
        wf.create(id="o2", params="ok").wait_for_status("waiting")  # the id is free again


def _documented_commands(page: str, heading: str) -> set[str]:
    """The command names of the synopsis block under ``heading`` in docs/``page``."""
    text = (Path(__file__).resolve().parent.parent / "docs" / page).read_text()
    after = text[text.index(heading) :]
    start = after.index("```")
    block = after[after.index("\n", start) + 1 : after.index("```", start + 3)]
    names: set[str] = set()
    for line in block.splitlines()[1:]:  # the first line is the usage line
        for part in re.split(r"\s{2,}|\|", line.split("#", 1)[0]):
            word = part.strip().split(" ", 1)[0]
            if re.fullmatch(r"[a-z][a-z-]*", word):
                names.add(word)
    return names


@pytest.mark.parametrize(
    ("page", "heading"),
    [
        ("observability.md", "## The `actorflow` command"),
        ("contract.md", "### The `actorflow` command"),
    ],
)
def test_the_documented_command_list_matches_the_cli(page: str, heading: str) -> None:
    assert _documented_commands(page, heading) == set(cli.commands)


def test_one_document_over_a_directory_a_url_and_the_http_api(
    rt: af.Runtime, location: str, journal: Any, clock: FakeClock
) -> None:
    http = pytest.importorskip("actorflow.http")
    from actorflow.workflows.query import STATUS_FIELDS

    wf = rt.register(Order, name="order", env=journal)
    for i, p in enumerate(["flaky", "ok"]):
        wf.create(id=f"o{i}", params=p)
        clock.advance(1)
    for i in range(2):
        wf.get(f"o{i}").wait_for_status("waiting")
    wf.get("o1").send_event("approved", {"by": "ann"})
    wf.get("o1").wait(timeout=10)
    assert rt.wait_until_idle()
    with http.serving(rt, token="t") as url:

        def api(path: str) -> Any:
            req = urllib.request.Request(url + path, headers={"Authorization": "Bearer t"})
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read())["result"]

        def both(*args: str, within: bool = False) -> Any:
            # In another process, as a user runs it beside the service (this process has
            # the directory open); --json after the command, as typed on second thought.
            outs = []
            for mode in (["--data", location], ["--url", url]):
                r = subprocess.run(
                    [sys.executable, "-m", "actorflow.cli", *mode, *args, "--json"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    env={**os.environ, "ACTORFLOW_TOKEN": "t"},
                )
                assert r.returncode == 0, (mode, r.stderr)
                outs.append(json.loads(r.stdout))
            if within:  # the directory's figures, a part of what the runtime knows
                assert _within(outs[0], outs[1]), (outs, args)
            else:
                assert outs[0] == outs[1], args
            return outs[0]

        base = "/api/workflows/order/instances"
        assert both("list", "-w", "order")["instances"] == api(base)
        assert [r["id"] for r in both("list")["instances"]] == ["o1", "o0"]
        for iid in ("o0", "o1"):
            view = api(f"{base}/{iid}")
            assert both("status", "order", iid) == {k: view[k] for k in STATUS_FIELDS}
            assert both("describe", "order", iid) == view["description"]
            assert both("steps", "order", iid) == view["steps"]
            assert both("history", "order", iid) == api(f"{base}/{iid}/history")
        assert both("schedules") == api("/api/schedules") == []
        m = both("metrics", within=True)
        assert m["workflows"]["order"]["counts"] == {"complete": 1, "waiting": 1}
        # The runtime's own metrics over --url print as a table, a figure per line.
        r = CliRunner().invoke(cli, ["--url", url, "metrics"], env={"ACTORFLOW_TOKEN": "t"})
        lines = r.output.splitlines()
        assert r.exit_code == 0 and max(len(line) for line in lines) < 100, r.output
        assert any(line.startswith("steps_per_s") for line in lines)


def _within(part: Any, whole: Any) -> bool:
    """True if every field of ``part`` is in ``whole`` with the same value, recursively."""
    if isinstance(part, dict) and isinstance(whole, dict):
        return all(k in whole and _within(v, whole[k]) for k, v in part.items())
    return bool(part == whole)


def test_history_and_steps_show_whole_values_with_full(data: str, journal: Any) -> None:
    long = "x" * 200
    with af.Runtime(data) as rt:
        inst = rt.register(Order, name="order", env=journal).get("o1")
        inst.send_event("approved", {"note": long})
        assert inst.wait(timeout=10).output == {"note": long}
    cut = run_cli(data, "history", "order", "o1").output
    assert long not in cut and "..." in cut
    assert long in run_cli(data, "history", "order", "o1", "--full").output


def _cli_process(*args: str) -> subprocess.CompletedProcess[str]:
    """The command in its own process, its stderr a pipe (not a terminal)."""
    return subprocess.run(
        [sys.executable, "-m", "actorflow.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "ACTORFLOW_TOKEN": "t"},
    )


def test_many_instances_listed_and_terminated_with_progress(location: str) -> None:
    with af.Runtime(location) as rt:  # nothing registered: they stay queued
        made = rt.unregistered("bulk").create_batch([{"id": f"b{n:04}"} for n in range(2500)])
        assert len(made) == 2500
        rt.unregistered("other").create(id="x")
    res = _cli_process("--data", location, "list", "--all", "-w", "bulk", "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["instances"]
    assert sorted(r["id"] for r in rows) == [f"b{n:04}" for n in range(2500)]
    assert "list: 2,500/2,500" in res.stderr.splitlines()
    assert (
        len(
            json.loads(_cli_process("--data", location, "list", "--all", "--json").stdout)[
                "instances"
            ]
        )
        == 2501
    )
    res = _cli_process("--data", location, "terminate", "bulk", "--status", "queued")
    assert res.returncode == 0, res.stderr
    assert "terminate: 2,500 of 2,500 instances of bulk" in res.stdout
    lines = [line for line in res.stderr.splitlines() if line.startswith("terminate: ")]
    assert lines[0] == "terminate: 250/2,500" and lines[-1] == "terminate: 2,500/2,500"
    with af.Runtime(location) as rt:
        assert len(rt.unregistered("bulk").list(status="terminated", limit=None)) == 2500
        assert rt.unregistered("other").get("x").status().status == "queued"
    res = _cli_process("--data", location, "pause", "bulk", "b0001", "nope", "b0002")
    assert res.returncode == 1
    assert "bulk/b0001: InvalidInstanceState" in res.stderr and "bulk/nope" in res.stderr
    assert "pause: 0 of 3 instances of bulk" in res.stdout
    usage = _cli_process("--data", location, "pause", "bulk")
    assert usage.returncode == 2 and "IDs or --status" in usage.stderr


def test_many_instances_over_the_http_api(rt: af.Runtime) -> None:
    http = pytest.importorskip("actorflow.http")
    rt.unregistered("bulk", listed=True)
    binding = rt.workflow("bulk")
    binding.create_batch([{"id": f"b{n:04}"} for n in range(1200)])
    with http.serving(rt, token="t") as url:
        res = _cli_process("--url", url, "list", "--all", "--json")
        assert res.returncode == 0, res.stderr
        assert len(json.loads(res.stdout)["instances"]) == 1200
        assert "list: 1,200/1,200" in res.stderr.splitlines()
        res = _cli_process("--url", url, "terminate", "bulk", "--status", "queued", "--json")
        assert res.returncode == 0, res.stderr
        doc = json.loads(res.stdout)
        assert len(doc["done"]) == 1200 and doc["refused"] == {}
        assert "terminate: 1,200/1,200" in res.stderr.splitlines()
    assert len(binding.list(status="terminated", limit=None)) == 1200
