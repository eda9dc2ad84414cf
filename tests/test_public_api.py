"""Pins the public surface: names users and outside test suites depend on."""

from __future__ import annotations

import ast
import pickle
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
    "InstanceNotFound",
    "InstanceStatus",
    "InvalidInstanceId",
    "InvalidInstanceState",
    "JsonSerializer",
    "LeaseLost",
    "LimitExceeded",
    "Limits",
    "NonRetryableError",
    "PickleSerializer",
    "RateLimitError",
    "RecordFormatError",
    "RetryPolicy",
    "Runtime",
    "SerializationError",
    "StepContext",
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
    "RateLimitError",
    "EventTimeoutError",
    "StepTimeoutError",
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


def test_exports_are_pinned() -> None:
    assert set(af.__all__) == EXPECTED
    for name in af.__all__:
        assert hasattr(af, name), name


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


def test_layers_do_not_import_upwards() -> None:
    """storage <- objects <- workflows <- runtime <- cli."""
    order = {
        "storage": 0,
        "batch": 0,
        "serializers": 0,
        "clock": 0,
        "errors": 0,
        "limits": 0,
        "timers": 0,
        "actors": 0,
        "objects": 1,
        "object_storage": 1,
        "workflow": 2,
        "step": 2,
        "history": 2,
        "engine": 2,
        "router": 2,
        "supervisor": 2,
        "binding": 2,
        "metrics": 2,
        "tracing": 2,
        "logs": 0,
        "lease": 2,
        "runtime": 3,
        "testing": 3,
        "faults": 3,
        "pytest_plugin": 4,
        "node": 3,
        "demo": 4,
        "cli": 4,
        "http": 4,
        "bench": 4,
    }
    bad = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE).parts
        mod = rel[0].removesuffix(".py")
        if mod not in order:
            continue
        for node in ast.walk(parse_source(path)):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("actorflow.")
            ):
                target = node.module.split(".")[1]
                if target in order and order[target] > order[mod] and not _type_only(node):
                    bad.append(f"{'/'.join(rel)} imports {node.module}")
    assert not bad, bad


def _type_only(node: ast.ImportFrom) -> bool:
    return getattr(node, "_type_checking", False)
