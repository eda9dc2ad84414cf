"""inst.export(), af.testing.replay_check and the ``actorflow replay-check`` command."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

import actorflow as af
from actorflow.cli import main
from actorflow.testing import assert_replays, load_histories, replay_check

# Two versions of one workflow, as files a user would have: the tests import them
# from tmp_path, and the command loads them by MODULE:CLASS.
V1 = """
import datetime
import actorflow as af

class Order(af.Workflow):
    def run(self, event, step):
        charge = step.do("charge", lambda: {"amount": event.payload["amount"], "at": (1, 2)})
        step.wait_for_event("approval", "approved")
        ship = step.do("ship", lambda: "shipped")
        return [charge, ship]
"""

VERSIONS = {
    # Compatible: a new step behind a patch.
    "compatible": """
import actorflow as af

class Order(af.Workflow):
    def run(self, event, step):
        charge = step.do("charge", lambda: None)
        assert charge["at"] == (1, 2)  # recorded values come back as they were
        if step.patched("notify"):
            step.do("notify", lambda: None)
        ev = step.wait_for_event("approval", "approved")
        assert ev.payload == {"by": "ann"}
        ship = step.do("ship", lambda: None)
        return [charge, ship]
""",
    "renamed": """
import actorflow as af

class Order(af.Workflow):
    def run(self, event, step):
        step.do("charge card", lambda: None)
        step.wait_for_event("approval", "approved")
        return step.do("ship", lambda: None)
""",
    "reordered": """
import actorflow as af

class Order(af.Workflow):
    def run(self, event, step):
        step.wait_for_event("approval", "approved")
        step.do("charge", lambda: None)
        return step.do("ship", lambda: None)
""",
    "kind": """
import actorflow as af

class Order(af.Workflow):
    def run(self, event, step):
        step.do("charge", lambda: None)
        step.sleep("approval", "1 hour")
        return step.do("ship", lambda: None)
""",
    "unpatched": """
import actorflow as af

class Order(af.Workflow):
    def run(self, event, step):
        step.do("charge", lambda: None)
        step.do("notify", lambda: None)
        step.wait_for_event("approval", "approved")
        return step.do("ship", lambda: None)
""",
}


def _load(tmp_path: Path, name: str, source: str) -> type[af.Workflow]:
    path = tmp_path / "mods" / f"{name}.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(source))
    namespace: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    cls: type[af.Workflow] = namespace["Order"]
    return cls


@pytest.fixture
def recorded(rt: af.Runtime, tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Exports of version 1: one instance waiting for approval, one complete."""
    wf = rt.register(_load(tmp_path, "order_v1", V1), name="order")
    waiting = wf.create(id="waiting", params={"amount": 3})
    done = wf.create(id="done", params={"amount": 5})
    waiting.wait_for_status("waiting")
    done.wait_for_status("waiting")
    done.send_event("approved", {"by": "ann"})
    assert done.wait(timeout=10).status == "complete"
    return {"waiting": waiting.export(), "done": done.export()}


def test_export_is_json_and_round_trips(recorded: dict[str, dict[str, Any]]) -> None:
    doc = recorded["done"]
    back = json.loads(json.dumps(doc))
    assert back == doc
    assert doc["format"] == "actorflow.instance/1"
    assert (doc["workflow"], doc["id"], doc["status"]) == ("order", "done", "complete")
    assert doc["params"] == {"amount": 5}
    kinds = [(s["kind"], s["name"], s["count"], s["seq"], s["status"]) for s in doc["steps"]]
    assert kinds == [
        ("do", "charge", 1, 0, "complete"),
        ("wait_for_event", "approval", 1, 1, "complete"),
        ("do", "ship", 1, 2, "complete"),
    ]
    # A tuple is not JSON: it is kept pickled, and comes back a tuple.
    assert set(doc["steps"][0]["output"]) == {"$pickle"}
    assert doc["steps"][1]["event"]["payload"] == {"by": "ann"}
    assert doc["history"][0]["type"] == "WORKFLOW_QUEUED"
    assert doc["history"][-1]["type"] == "WORKFLOW_SUCCESS"
    assert recorded["waiting"]["steps"][-1]["status"] == "waiting"


def test_a_compatible_change_replays(recorded: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    cls = _load(tmp_path, "compatible", VERSIONS["compatible"])
    reports = replay_check(cls, [json.loads(json.dumps(d)) for d in recorded.values()])
    assert [(r.instance, r.ok, r.outcome) for r in reports] == [
        ("waiting", True, "end of recording"),
        ("done", True, "returned"),
    ]
    assert reports[1].steps == 3
    assert reports[1].divergence is None


@pytest.mark.parametrize(
    ("version", "position", "expected", "found"),
    [
        ("renamed", 0, ("do", "charge", 1), ("do", "charge card", 1)),
        ("reordered", 0, ("do", "charge", 1), ("wait_for_event", "approval", 1)),
        ("kind", 1, ("wait_for_event", "approval", 1), ("sleep", "approval", 1)),
        ("unpatched", 1, ("wait_for_event", "approval", 1), ("do", "notify", 1)),
    ],
)
def test_an_incompatible_change_is_reported_with_the_step(
    recorded: dict[str, dict[str, Any]],
    tmp_path: Path,
    version: str,
    position: int,
    expected: tuple[str, str, int],
    found: tuple[str, str, int],
) -> None:
    cls = _load(tmp_path, version, VERSIONS[version])
    for report in replay_check(cls, list(recorded.values())):
        assert not report.ok
        assert report.outcome == "diverged"
        assert report.divergence is not None
        assert report.divergence.position == position
        assert report.divergence.expected == expected
        assert report.divergence.found == found
        assert report.step == found[1]
        assert f"found {found[0]} {found[1]!r}" in str(report)


def test_a_removed_step_at_the_end_is_a_divergence(
    recorded: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    cls = _load(
        tmp_path,
        "shorter",
        """
import actorflow as af

class Order(af.Workflow):
    def run(self, event, step):
        step.do("charge", lambda: None)
        step.wait_for_event("approval", "approved")
        return "no ship"
""",
    )
    report = replay_check(cls, recorded["done"])[0]
    assert not report.ok
    assert report.divergence is not None
    assert report.divergence.expected == ("do", "ship", 1)
    assert report.divergence.found is None
    assert report.step is None


def test_no_step_body_runs(recorded: dict[str, dict[str, Any]]) -> None:
    ran: list[str] = []

    class Watch(af.Workflow):
        async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            await step.do("charge", lambda: ran.append("charge"))
            await step.wait_for_event("approval", "approved")
            return await step.do("ship", lambda: ran.append("ship"))

    assert all(r.ok for r in replay_check(Watch, list(recorded.values())))
    assert ran == []


def test_fixtures_on_disk_and_the_assertion_helper(
    recorded: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    folder = tmp_path / "histories"
    folder.mkdir()
    for name, doc in recorded.items():
        (folder / f"{name}.json").write_text(json.dumps(doc))
    docs = load_histories(folder)
    assert sorted(d["id"] for d in docs) == ["done", "waiting"]
    assert len(assert_replays(_load(tmp_path, "ok", VERSIONS["compatible"]), folder)) == 2
    with pytest.raises(
        AssertionError, match=r"(?s)2 of 2 recorded instances diverge.*'charge card'"
    ):
        assert_replays(_load(tmp_path, "bad", VERSIONS["renamed"]), [folder / "done.json", docs[1]])
    (folder / "junk.json").write_text('{"not": "an export"}')
    with pytest.raises(ValueError, match="not an exported instance"):
        load_histories(folder)


def test_replay_check_refuses_what_is_not_a_workflow(
    recorded: dict[str, dict[str, Any]],
) -> None:
    with pytest.raises(TypeError, match="subclass of actorflow\\.Workflow"):
        replay_check(dict, [recorded["done"]])  # type: ignore[arg-type]


# -- the command ------------------------------------------------------------------------


def _data_with_v1(location: str, tmp_path: Path) -> None:
    """Version 1's instances in ``location``; the modules are importable by name."""
    mods = tmp_path / "mods"
    mods.mkdir(exist_ok=True)
    (mods / "order_v1.py").write_text(V1)
    for name, src in VERSIONS.items():
        (mods / f"order_{name}.py").write_text(src)
    with af.Runtime(location) as rt:
        wf = rt.register(_load(tmp_path, "order_v1", V1), name="order")
        a = wf.create(id="a", params={"amount": 1})
        b = wf.create(id="b", params={"amount": 2})
        a.wait_for_status("waiting")
        b.wait_for_status("waiting")
        b.send_event("approved", {"by": "ann"})
        assert b.wait(timeout=10).status == "complete"


def test_the_command_exits_0_1_and_2(
    location: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    _data_with_v1(location, tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "mods"))
    args = ["--workflow", "order", "--data", location]
    assert main(["replay-check", "order_compatible:Order", *args]) == 0
    out = capsys.readouterr().out
    assert "2 ok, 0 diverged" in out
    assert main(["replay-check", "order_renamed:Order", *args, "--json"]) == 1
    doc = json.loads(capsys.readouterr().out)
    assert doc["workflow"] == "order"
    assert [r["ok"] for r in doc["reports"]] == [False, False]
    assert {r["step"] for r in doc["reports"]} == {"charge card"}
    assert main(["replay-check", "order_renamed:Order", *args, "--limit", "1"]) == 1
    assert "0 ok, 1 diverged" in capsys.readouterr().out
    # The group's --data works too.
    assert main(["--data", location, "replay-check", "order_kind:Order", "-w", "order"]) == 1
    capsys.readouterr()
    # A directory without that workflow (the class's name is "Order"), a bad class.
    assert main(["replay-check", "order_compatible:Order", "--data", location]) == 2
    assert "has no instance of workflow 'Order'" in capsys.readouterr().err
    assert main(["replay-check", "order_compatible:Nope", *args]) == 2
    assert main(["replay-check", "no_such_module:Order", *args]) == 2
    assert main(["replay-check", "order_compatible", *args]) == 2


@pytest.mark.lmdb_only
def test_the_command_reads_a_directory_a_runtime_has_open(tmp_path: Path) -> None:
    data = str(tmp_path / "data")
    _data_with_v1(data, tmp_path)
    with af.Runtime(data) as rt:
        rt.register(_load(tmp_path, "order_v1", V1), name="order")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "actorflow.cli",
                "replay-check",
                "order_unpatched:Order",
                "--data",
                data,
                "--workflow",
                "order",
            ],
            cwd=tmp_path / "mods",
            capture_output=True,
            text=True,
            timeout=60,
            env={**_env(), "PYTHONPATH": f"{tmp_path / 'mods'}:{_root()}"},
        )
    assert r.returncode == 1, r.stderr
    assert "DIVERGED" in r.stdout
    assert "found do 'notify' (1)" in r.stdout


def _root() -> str:
    return str(Path(__file__).resolve().parent.parent)


def _env() -> dict[str, str]:
    import os

    return dict(os.environ)
