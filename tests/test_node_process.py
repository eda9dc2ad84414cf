"""NodeProcess: a runtime in a child process, started, driven, killed and restarted."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

import actorflow as af
from actorflow.testing import NodeProcess, NodeProcessError

APP = "apps.node_app:factory"


def test_start_create_event_and_complete(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "data", app=APP) as node:
        assert node.alive and node.pid == node.ping()["pid"]
        iid = node.create("greeter", id="g1", params={"name": "ann"})
        assert iid == "g1"
        ids = node.create_batch("greeter", [{"id": "g2", "params": {"name": "bob"}}])
        assert ids == ["g2"]
        assert node.wait_until_idle(timeout=30)
        assert node.status("greeter", "g1")["status"] == "waiting"
        for i in ("g1", "g2"):
            node.send_event("greeter", i, "ok", {"by": "test"})
        st = node.wait_for_status("greeter", "g1", "complete")
        assert st["output"]["hello"] == "hello ann"
        assert st["output"]["ok"] == {"by": "test"}
        assert st["output"]["pid"] == node.pid
        node.wait_for_status("greeter", "g2", "complete")
        assert node.counts("greeter") == {"complete": 2}
        assert node.call("counter", "c", "add", 2) == 2
    assert not node.alive
    assert node.returncode == 0


def test_errors_come_back_as_actorflow_errors(tmp_path: Path) -> None:
    with NodeProcess(tmp_path / "data", app=APP) as node:
        with pytest.raises(af.InstanceNotFound):
            node.status("greeter", "missing")
        node.create("greeter", id="g1", params={"name": "ann"})
        with pytest.raises(af.InstanceAlreadyExists):
            node.create("greeter", id="g1", params={"name": "ann"})
        with pytest.raises(NodeProcessError, match="KeyError"):
            node.status("nope", "g1")


def test_sigkill_then_restart_resumes(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", app=APP)
    node.start()
    try:
        node.create("greeter", id="g1", params={"name": "ann"})
        assert node.wait_until_idle(timeout=30)
        first_pid = node.pid
        node.kill()
        assert not node.alive
        assert node.returncode == -signal.SIGKILL
        with pytest.raises(NodeProcessError):
            node.status("greeter", "g1")
        node.start()  # the same node comes back
        assert node.pid != first_pid
        assert node.status("greeter", "g1")["status"] == "waiting"
        node.send_event("greeter", "g1", "ok", 1)
        st = node.wait_for_status("greeter", "g1", "complete")
        assert st["output"]["pid"] == node.pid
    finally:
        node.kill()


def test_terminate_closes_cleanly(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", app=APP).start()
    node.create("greeter", id="g1", params={"name": "ann"})
    assert node.terminate() == 0
    assert not node.alive
    with af.Runtime(tmp_path / "data") as rt:  # the data directory is free again
        assert rt.storage.get("ids", b"greeter\x00g1") is not None


def test_a_broken_factory_fails_start_with_its_traceback(tmp_path: Path) -> None:
    node = NodeProcess(tmp_path / "data", app="apps.node_app:broken")
    with pytest.raises(NodeProcessError, match="broken on purpose"):
        node.start()
    assert not node.alive


def test_app_must_name_a_factory(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        NodeProcess(tmp_path, app="tests.apps.node_app")
