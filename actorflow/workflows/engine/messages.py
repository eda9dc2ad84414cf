"""The messages an :class:`~actorflow.workflows.engine.instance.InstanceActor` handles.

Each is a small frozen value, one class per operation, sent with pykka's
``tell`` (the supervisor) or ``ask`` (a control call through
:class:`~actorflow.workflows.handles.Instance`). The actor finds the handler
by the message's class (see ``InstanceActor.on_receive``), so a message the
actor does not know is refused by name, never looked up by string.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "Delete",
    "Event",
    "Fail",
    "InstanceMessage",
    "Pause",
    "Restart",
    "Resume",
    "Start",
    "StopRun",
    "Terminate",
    "Timer",
]


class InstanceMessage:
    """Base class of the instance actor's messages."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Start(InstanceMessage):
    """The supervisor gave the instance a slot.

    Attributes:
        reason: Why it starts: ``"new"``, ``"wake"``, ``"recover"``, ``"crash"``.
    """

    reason: str


@dataclass(frozen=True, slots=True)
class Pause(InstanceMessage):
    """``Instance.pause``."""


@dataclass(frozen=True, slots=True)
class Resume(InstanceMessage):
    """``Instance.resume``."""


@dataclass(frozen=True, slots=True)
class Terminate(InstanceMessage):
    """``Instance.terminate``.

    Attributes:
        rollback: Run the rollback handlers of the completed steps first.
    """

    rollback: bool = False


@dataclass(frozen=True, slots=True)
class Delete(InstanceMessage):
    """``Instance.delete``: stop the run (no rollbacks) and remove every record."""


@dataclass(frozen=True, slots=True)
class Restart(InstanceMessage):
    """``Instance.restart``.

    Attributes:
        from_step: The ``step.do`` to restart from; None: from the start.
    """

    from_step: str | None = None


@dataclass(frozen=True, slots=True)
class Event(InstanceMessage):
    """``Instance.send_event``: an event to store and hand to the run.

    Attributes:
        type: The event type.
        data: The payload, already serialized.
        ts: When it was sent (epoch ms).
    """

    type: str
    data: bytes
    ts: int


@dataclass(frozen=True, slots=True)
class Timer(InstanceMessage):
    """A timer of the instance is due.

    Attributes:
        key: Its key in the timer index.
        deadline: Its deadline (epoch ms).
    """

    key: bytes
    deadline: int


@dataclass(frozen=True, slots=True)
class Fail(InstanceMessage):
    """The supervisor gave up restarting the instance: it is errored.

    Attributes:
        message: Why (the error's message).
    """

    message: str


@dataclass(frozen=True, slots=True)
class StopRun(InstanceMessage):
    """Shutdown: stop the run without writing anything."""
