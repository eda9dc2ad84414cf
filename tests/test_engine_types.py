"""The engine's types: the instance actor's messages, statuses, records and timers."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from typing import Any

import pytest
from conftest import parse_source

import actorflow as af
from actorflow.workflows.engine import messages
from actorflow.workflows.engine.instance import HANDLERS, InstanceActor
from actorflow.workflows.engine.messages import InstanceMessage


class Sleeper(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.sleep("nap", "1 hour")
        return step.do("after", lambda: "done")


def _message_classes() -> set[type[InstanceMessage]]:
    return {
        cls
        for _, cls in inspect.getmembers(messages, inspect.isclass)
        if issubclass(cls, InstanceMessage) and cls is not InstanceMessage
    }


def test_every_message_class_has_a_handler_of_the_actor() -> None:
    assert _message_classes() == set(HANDLERS)
    for cls, handler in HANDLERS.items():
        # The handler is the actor's own method, taking the message itself.
        assert getattr(InstanceActor, handler.__name__) is handler, cls
        assert list(inspect.signature(handler).parameters) == ["self", "msg"], cls


def test_messages_are_frozen_values() -> None:
    msg = messages.Event("go", b"x", 1)
    assert msg == messages.Event("go", b"x", 1)
    with pytest.raises(AttributeError):
        msg.type = "other"  # type: ignore[misc]
    assert not hasattr(msg, "__dict__")


@pytest.mark.parametrize("message", [("pause",), "pause", object()])
def test_an_unknown_message_is_refused_by_name(rt: af.Runtime, message: Any) -> None:
    inst = rt.register(Sleeper, name="sleeper").create(id="s1")
    assert rt.wait_until_idle()
    binding = rt.workflow("sleeper")
    with pytest.raises(af.ActorflowError, match=r"'s1'.*unknown message") as info:
        binding.parts.call(inst.id, message)
    assert "Pause" in str(info.value) and "Timer" in str(info.value)
    # Nothing was lost: the instance still sleeps, and the actor still works.
    assert inst.status().status == "waiting"
    inst.pause()
    assert inst.status().status == "paused"


CONTRACT_STATUSES = [
    "queued",
    "running",
    "paused",
    "errored",
    "terminated",
    "complete",
    "waiting",
    "waitingForPause",
    "unknown",
]


def test_status_names_are_the_contract_strings() -> None:
    from actorflow.workflows.definition import FINISHED, STATUSES, Status

    names = {n: getattr(Status, n) for n in dir(Status) if n.isupper()}
    assert sorted(names.values()) == sorted(CONTRACT_STATUSES)
    assert list(STATUSES) == CONTRACT_STATUSES
    # Plain strings: records, JSON and InstanceStatus carry no other type.
    assert all(type(v) is str for v in names.values())
    assert {"complete", "errored", "terminated"} == FINISHED


def test_step_statuses_are_plain_strings_of_one_type() -> None:
    from typing import get_args

    from actorflow.workflows.records import StepStatus, StepStatusName

    values = [getattr(StepStatus, n) for n in dir(StepStatus) if n.isupper()]
    assert sorted(values) == sorted(get_args(StepStatusName))
    assert all(type(v) is str for v in values)


ENGINE = Path(af.__file__).parent


def _engine_sources() -> list[Path]:
    return [*sorted((ENGINE / "workflows").rglob("*.py")), ENGINE / "runtime.py"]


def test_only_the_timer_service_touches_the_timer_index() -> None:
    # One way to arm and disarm a timer (TimerService.arm, arm_key, disarm),
    # and one way to read a timer key (parse_timer_key).
    offenders = []
    for path in _engine_sources():
        tree = parse_source(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Name | ast.alias) and "TIMERS" in (
                getattr(node, "id", None),
                getattr(node, "name", None),
            ):
                offenders.append(f"{path.relative_to(ENGINE)}:{getattr(node, 'lineno', '?')}")
            elif (
                isinstance(node, ast.Subscript)
                and isinstance(node.slice, ast.Slice)
                and isinstance(node.slice.lower, ast.Constant)
                and node.slice.lower.value in (8, 9)
            ):
                offenders.append(f"{path.relative_to(ENGINE)}:{node.lineno} (a timer key by hand)")
    assert offenders == []
