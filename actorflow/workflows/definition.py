"""Defining workflows: the base class, the event it receives, statuses and ids."""

from __future__ import annotations

import re
import types
from collections.abc import Callable, KeysView, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, get_args

from actorflow.core.errors import InstanceNotFound, InvalidFlowControl, InvalidInstanceId

__all__ = [
    "ACTIVE",
    "FINISHED",
    "STARTABLE",
    "STATUSES",
    "UNFINISHED",
    "InstanceStatus",
    "Status",
    "StatusName",
    "Workflow",
    "WorkflowEntrypoint",
    "WorkflowEvent",
    "WorkflowStepEvent",
    "instance_not_found",
    "validate_event_type",
    "validate_instance_id",
    "validate_step_name",
    "validate_workflow_name",
]

#: The type of an instance's status: one of :data:`STATUSES`.
StatusName = Literal[
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


class Status:
    """Every status an instance can report, exactly as Cloudflare spells them.

    Plain ``str`` constants rather than an ``enum.StrEnum``: records, JSON
    and :class:`InstanceStatus` keep plain strings with no conversion at
    their boundaries, and the engine compares statuses on every commit,
    where comparing a ``str`` to a ``StrEnum`` member costs four times a
    comparison of two ``str``.
    """

    __slots__ = ()

    QUEUED: Final = "queued"
    RUNNING: Final = "running"
    PAUSED: Final = "paused"
    ERRORED: Final = "errored"
    TERMINATED: Final = "terminated"
    COMPLETE: Final = "complete"
    WAITING: Final = "waiting"
    WAITING_FOR_PAUSE: Final = "waitingForPause"
    UNKNOWN: Final = "unknown"


#: Every status an instance can report, exactly as Cloudflare spells them.
STATUSES: tuple[str, ...] = get_args(StatusName)
#: Statuses an instance never leaves (except by ``restart``).
FINISHED: frozenset[str] = frozenset({Status.COMPLETE, Status.ERRORED, Status.TERMINATED})
#: Statuses of an instance that has a run to do (or to go on with).
UNFINISHED: frozenset[str] = frozenset(
    {Status.QUEUED, Status.RUNNING, Status.WAITING, Status.WAITING_FOR_PAUSE}
)
#: Statuses of an instance whose run is going on (or was, when its node stopped).
ACTIVE: frozenset[str] = frozenset({Status.RUNNING, Status.WAITING_FOR_PAUSE})
#: Statuses an instance can start a run from at once (no pause pending).
STARTABLE: frozenset[str] = frozenset({Status.QUEUED, Status.RUNNING, Status.WAITING})

_ID_RE = re.compile(r"^[a-zA-Z0-9_][a-zA-Z0-9\-_]*$")
MAX_INSTANCE_ID = 100
MAX_WORKFLOW_NAME = 64
MAX_EVENT_TYPE = 100
MAX_STEP_NAME = 256


@dataclass(frozen=True)
class WorkflowEvent:
    """What ``run`` receives: the instance's params and where it came from.

    ``schedule`` is ``{"cron": expression, "scheduled_time": aware datetime}``
    for an instance a cron schedule created (see docs/schedules.md), else
    None. ``event[key]`` reads the event as Cloudflare's dict, as a
    Cloudflare Python workflow does: ``event["payload"]``,
    ``event["timestamp"]``, ``event["instanceId"]``, ``event["workflowName"]``
    and ``event["schedule"]`` (see :data:`EVENT_KEYS`); ``get``, ``keys`` and
    ``in`` work as on a dict.
    """

    payload: Any
    timestamp: datetime
    instance_id: str
    workflow_name: str
    schedule: dict[str, Any] | None = None

    def __getitem__(self, key: str) -> Any:
        """Cloudflare's dict form of the event: ``event["payload"]``, ...

        Raises:
            KeyError: ``key`` is not one of :data:`EVENT_KEYS`.
        """
        read = EVENT_KEYS.get(key)
        if read is None:
            raise KeyError(key)
        return read(self)

    def get(self, key: str, default: Any = None) -> Any:
        """``event[key]``, or ``default`` for a key the event does not have."""
        read = EVENT_KEYS.get(key)
        return default if read is None else read(self)

    def keys(self) -> KeysView[str]:
        """The keys of the dict form (so ``dict(event)`` is Cloudflare's event)."""
        return EVENT_KEYS.keys()

    def __contains__(self, key: object) -> bool:
        return key in EVENT_KEYS


def _cloudflare_schedule(event: WorkflowEvent) -> dict[str, Any] | None:
    """``event["schedule"]``: Cloudflare's ``{"cron", "scheduledTime"}`` (epoch ms), or None."""
    if event.schedule is None:
        return None
    when: datetime = event.schedule["scheduled_time"]
    return {"cron": event.schedule["cron"], "scheduledTime": round(when.timestamp() * 1000)}


#: The keys of ``event[...]``, in Cloudflare's spelling, and how each is read.
#: ``timestamp`` is the aware UTC datetime (Cloudflare's Python SDK turns the
#: JavaScript ``Date`` into a datetime too).
EVENT_KEYS: Mapping[str, Callable[[WorkflowEvent], Any]] = types.MappingProxyType(
    {
        "payload": lambda event: event.payload,
        "timestamp": lambda event: event.timestamp,
        "instanceId": lambda event: event.instance_id,
        "workflowName": lambda event: event.workflow_name,
        "schedule": _cloudflare_schedule,
    }
)


@dataclass(frozen=True)
class WorkflowStepEvent:
    """An event delivered to ``step.wait_for_event``."""

    type: str
    payload: Any
    timestamp: datetime


@dataclass(frozen=True)
class InstanceStatus:
    """An instance's status string, its output when complete, its error when errored.

    ``rollback`` is None when no saga rollback ran, else ``{"outcome":
    "running" | "complete" | "failed", "error": {name, message} | None}``
    (see docs/rollbacks.md).
    """

    status: str
    output: Any = None
    error: dict[str, str] | None = None
    rollback: dict[str, Any] | None = None


class Workflow:
    """Base class of workflows. Override ``run(event, step)``, sync or ``async def``.

    ``run`` is executed again from the top on every wake-up; completed steps
    return their stored results without running. Code outside steps may run
    more than once, so it must be deterministic and free of side effects.

    Attributes:
        env: Whatever was passed as ``env`` to :meth:`actorflow.Runtime.register`.
    """

    def __init__(self, env: Any = None) -> None:
        self.env = env

    def run(self, event: WorkflowEvent, step: Any) -> Any:
        """The workflow's body. Returns the instance's output."""
        raise NotImplementedError(f"{type(self).__name__} must define run(event, step)")


#: Cloudflare's name for :class:`Workflow`.
WorkflowEntrypoint = Workflow


def validate_instance_id(instance_id: object, workflow: str = "") -> str:
    """Returns ``instance_id`` if valid, else raises :class:`InvalidInstanceId`."""
    if (
        not isinstance(instance_id, str)
        or len(instance_id) > MAX_INSTANCE_ID
        or not _ID_RE.match(instance_id)
    ):
        raise InvalidInstanceId(
            f"workflow {workflow!r}: invalid instance id {instance_id!r}: use at most "
            f"{MAX_INSTANCE_ID} characters from [a-zA-Z0-9_-], not starting with '-'",
            workflow=workflow,
            instance=instance_id,
        )
    return instance_id


#: The longest flow-control key (``create(key=)``), in characters.
MAX_FLOW_KEY = 100
#: The range of ``create(priority=)`` (a signed 32-bit int); lower starts first.
MIN_PRIORITY = -(2**31)
MAX_PRIORITY = 2**31 - 1


def validate_flow(
    key: object, priority: object, workflow: str, instance: str
) -> tuple[str | None, int]:
    """Returns ``(key, priority)`` of a creation (priority None: 0).

    Raises:
        InvalidFlowControl: A bad key or priority, naming the workflow and the instance.
    """
    where = f"workflow {workflow!r}, instance {instance!r}: create"
    if key is not None and (not isinstance(key, str) or not key or len(key) > MAX_FLOW_KEY):
        raise InvalidFlowControl(
            f"{where}: key must be a non-empty str of at most {MAX_FLOW_KEY} characters, "
            f"not {type(key).__name__} {_clip(key)}",
            workflow=workflow,
            instance=instance,
        )
    if priority is None:
        return key, 0
    if isinstance(priority, bool) or not isinstance(priority, int):
        raise InvalidFlowControl(
            f"{where}: priority must be an int, not {type(priority).__name__} {priority!r}",
            workflow=workflow,
            instance=instance,
        )
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise InvalidFlowControl(
            f"{where}: priority must be from {MIN_PRIORITY} to {MAX_PRIORITY}, not {priority}",
            workflow=workflow,
            instance=instance,
        )
    return key, priority


def _clip(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_workflow_name(name: object) -> str:
    """Returns ``name`` if it is a valid workflow name, else raises ValueError."""
    if not isinstance(name, str) or len(name) > MAX_WORKFLOW_NAME or not _ID_RE.match(name):
        raise ValueError(
            f"invalid workflow name {name!r}: use at most {MAX_WORKFLOW_NAME} characters "
            "from [a-zA-Z0-9_-], not starting with '-'"
        )
    return name


def validate_event_type(event_type: object, where: str) -> str:
    """Returns ``event_type`` if valid, else raises ValueError naming ``where``."""
    if (
        not isinstance(event_type, str)
        or len(event_type) > MAX_EVENT_TYPE
        or not _ID_RE.match(event_type)
    ):
        raise ValueError(
            f"{where}: invalid event type {event_type!r}: use at most {MAX_EVENT_TYPE} "
            "characters matching ^[a-zA-Z0-9_][a-zA-Z0-9-_]*$"
        )
    return event_type


def validate_step_name(name: object, where: str) -> str:
    """Returns ``name`` if it is a valid step name, else raises ValueError naming ``where``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}: a step name must be a non-empty str, got {name!r}")
    if len(name) > MAX_STEP_NAME:
        raise ValueError(f"{where}: step name {name[:40]!r}... is longer than {MAX_STEP_NAME}")
    if any(ord(c) < 0x20 for c in name):
        raise ValueError(f"{where}: step name {name!r} contains control characters")
    return name


def instance_not_found(workflow: str, iid: str) -> InstanceNotFound:
    """The error for an instance id that workflow ``workflow`` does not have (or no longer has)."""
    return InstanceNotFound(
        f"(instance.not_found) workflow {workflow!r}: no instance {iid!r}",
        workflow=workflow,
        instance=iid,
    )
