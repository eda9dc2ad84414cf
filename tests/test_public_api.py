"""Pins the public surface: names users and outside test suites depend on."""

from __future__ import annotations

import ast
import os
import pickle
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import parse_source

import actorflow as af

EXPECTED = {
    "ActorflowError",
    "AlarmInfo",
    "Attempt",
    "DataDirectoryLocked",
    "DeliveryError",
    "DurableObject",
    "DurableObjectId",
    "DurableObjectNamespace",
    "DurableObjectState",
    "DurableObjectStub",
    "EventTimeoutError",
    "HistoryEvent",
    "Instance",
    "InstanceAlreadyExists",
    "InstanceDescription",
    "InstanceNotFound",
    "InstanceStatus",
    "InvalidInstanceId",
    "InvalidInstanceState",
    "InvalidCursor",
    "InvalidFlowControl",
    "InvalidSchedule",
    "JsonSerializer",
    "LeaseLost",
    "LimitExceeded",
    "Limits",
    "NonRetryableDelayError",
    "NonRetryableError",
    "PickleSerializer",
    "RateLimitError",
    "RecordFormatError",
    "RetryPolicy",
    "Runtime",
    "SerializationError",
    "StepContext",
    "StepDependencyError",
    "StepRecord",
    "StepTimeoutError",
    "StorageCorrupted",
    "StorageError",
    "StorageFull",
    "Workflow",
    "WorkflowBinding",
    "WorkflowEntrypoint",
    "WorkflowEvent",
    "WorkflowStep",
    "WorkflowStepEvent",
}
ERRORS = [
    "InvalidInstanceId",
    "InstanceNotFound",
    "InstanceAlreadyExists",
    "InvalidInstanceState",
    "InvalidSchedule",
    "InvalidCursor",
    "InvalidFlowControl",
    "RateLimitError",
    "EventTimeoutError",
    "StepTimeoutError",
    "StepDependencyError",
    "NonRetryableDelayError",
    "NonRetryableError",
    "SerializationError",
    "LimitExceeded",
    "DeliveryError",
    "LeaseLost",
    "RecordFormatError",
    "DataDirectoryLocked",
    "StorageCorrupted",
    "StorageFull",
]
PACKAGE = Path(af.__file__).parent
ROOT = PACKAGE.parent


def test_exports_are_pinned() -> None:
    assert set(af.__all__) == EXPECTED
    for name in af.__all__:
        assert hasattr(af, name), name


def test_executors_are_pinned() -> None:
    assert set(af.executors.__all__) == {
        "DaskExecutor",
        "ExecutorError",
        "InProcessExecutor",
        "RanOn",
        "RayExecutor",
        "StepCall",
        "StepExecutor",
    }
    for name in af.executors.__all__:
        assert getattr(af.executors, name) is not None
    # Ray and Dask are imported only when their executor opens.
    code = "import sys, actorflow; print('ray' in sys.modules, 'distributed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    err = af.executors.ExecutorError("x", executor="ray")
    assert pickle.loads(pickle.dumps(err)).executor == "ray"


def test_node_failure_tools_are_in_testing() -> None:
    import actorflow.testing as t

    assert {"NodeProcess", "NodeProcessError"} <= set(t.__all__)
    assert issubclass(t.NodeProcessError, af.ActorflowError)
    assert {"node_id", "lease_timeout"} <= set(af.Runtime.__init__.__code__.co_varnames)


def test_workflow_entrypoint_is_an_alias() -> None:
    assert af.WorkflowEntrypoint is af.Workflow


def test_errors_derive_from_base_build_from_message_and_pickle() -> None:
    for name in ERRORS:
        cls = getattr(af, name)
        assert issubclass(cls, af.ActorflowError)
        err = cls(
            "workflow 'w', instance 'i', step 's': boom", workflow="w", instance="i", step="s"
        )
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is cls
        assert str(back) == str(err)
        assert (back.workflow, back.instance, back.step) == ("w", "i", "s")
        assert str(cls("only a message")) == "only a message"


def test_limits_presets() -> None:
    v1, v2 = af.Limits.cloudflare_v1(), af.Limits.cloudflare_v2()
    assert (v1.max_concurrent, v1.max_creation_rate, v1.max_queued) == (4_500, 100, 1_000_000)
    assert (v2.max_concurrent, v2.max_creation_rate, v2.max_queued) == (50_000, 300, 2_000_000)


def test_engine_reads_time_only_through_the_clock() -> None:
    """Only clock.py (and the fake clock's origin) may call time.time / datetime.now."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "clock.py":
            continue
        tree = parse_source(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                owner = node.func.value
                name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
                call = f"{name}.{node.func.attr}"
                if call in ("time.time", "datetime.now", "datetime.utcnow", "date.today"):
                    line = path.read_text().splitlines()[node.lineno - 1]
                    if "noqa: TID251" not in line:
                        offenders.append(f"{path.relative_to(PACKAGE)}:{node.lineno}: {call}")
    assert not offenders, offenders


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Runs import-linter with the project's contract on the package under ``root``."""
    exe = Path(sys.executable).with_name("lint-imports")
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [str(exe), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_layers_contract_holds() -> None:
    """core <- objects | cluster <- workflows <- observe <- runtime <- faces (docs/design.md)."""
    res = _lint_imports(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "2 kept, 0 broken" in res.stdout


def test_the_layers_contract_can_fail(tmp_path: Path) -> None:
    shutil.copytree(PACKAGE, tmp_path / "actorflow", ignore=shutil.ignore_patterns("__pycache__"))
    clock = tmp_path / "actorflow" / "core" / "clock.py"
    clock.write_text(clock.read_text() + "\nfrom actorflow.workflows import step  # noqa\n")
    res = _lint_imports(tmp_path)
    assert res.returncode == 1
    assert "actorflow.core is not allowed to import actorflow.workflows" in res.stdout


def test_the_faces_contract_can_fail(tmp_path: Path) -> None:
    """A face that parses records itself, not through workflows/query.py, breaks the build."""
    shutil.copytree(PACKAGE, tmp_path / "actorflow", ignore=shutil.ignore_patterns("__pycache__"))
    views = tmp_path / "actorflow" / "http" / "views.py"
    views.write_text(views.read_text() + "\nfrom actorflow.workflows.records import load  # noqa\n")
    res = _lint_imports(tmp_path)
    assert res.returncode == 1
    assert "actorflow.http is not allowed to import actorflow.workflows.records" in res.stdout
    assert "1 kept, 1 broken" in res.stdout


def test_the_lint_config_keeps_its_house_rules() -> None:
    """Private access (SLF), complexity (C90) and implicit packages (INP) stay checked."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    lint = config["tool"]["ruff"]["lint"]
    assert {"SLF", "C90", "INP"} <= set(lint["select"])
    assert not {"SLF001", "C901", "INP001"} & set(lint.get("ignore", []))
    assert lint["mccabe"]["max-complexity"] <= 15
