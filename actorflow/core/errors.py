"""The error classes of actorflow.

Every error derives from :class:`ActorflowError`, can be built from a message
alone, may carry extra fields (workflow, instance, step), and survives a pickle
round trip, so it crosses actor, thread and process boundaries unchanged.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "ActorflowError",
    "DataDirectoryLocked",
    "EventTimeoutError",
    "ExecutorError",
    "InstanceAlreadyExists",
    "InstanceNotFound",
    "InvalidCursor",
    "InvalidFlowControl",
    "InvalidInstanceId",
    "InvalidInstanceState",
    "InvalidSchedule",
    "LeaseLost",
    "LimitExceeded",
    "NonRetryableDelayError",
    "NonRetryableError",
    "RateLimitError",
    "RecordFormatError",
    "SerializationError",
    "StepDependencyError",
    "StepTimeoutError",
    "StorageCorrupted",
    "StorageError",
    "StorageFull",
]


class ActorflowError(Exception):
    """Base class of every actorflow error.

    Args:
        message: A human-readable message. It should name the workflow, the
            instance and the step concerned.
        **fields: Optional structured context, such as ``workflow``,
            ``instance`` and ``step``. They are kept as attributes.
    """

    def __init__(self, message: str = "", **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = dict(fields)
        for key, value in fields.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword fields are not part of ``args``; rebuild through a helper so
        # that pickling keeps them.
        return (_rebuild, (type(self), self.message, self.fields))

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r})"


def _rebuild(cls: type[ActorflowError], message: str, fields: dict[str, Any]) -> ActorflowError:
    err = cls.__new__(cls)
    ActorflowError.__init__(err, message, **fields)
    return err


class InvalidInstanceId(ActorflowError, ValueError):
    """An instance id is empty, too long, or has characters outside ``[a-zA-Z0-9_-]``."""


class InstanceNotFound(ActorflowError, LookupError):
    """No instance with that id exists in the workflow."""


class InstanceAlreadyExists(ActorflowError):
    """``create`` was given an id that already exists."""


class InvalidInstanceState(ActorflowError):
    """The operation is not allowed in the instance's current status."""


class InvalidSchedule(ActorflowError, ValueError):
    """A cron schedule given to ``register`` is not a valid 5-field cron expression.

    Fields: ``workflow`` and ``schedule`` (the expression as given).
    """


class InvalidCursor(ActorflowError, ValueError):
    """A ``subscribe`` cursor is malformed, or belongs to another instance.

    Fields: ``workflow`` and ``instance`` (the instance subscribed to).
    """


class InvalidFlowControl(ActorflowError, ValueError):
    """A ``create`` was given a bad flow-control ``key`` or ``priority``.

    The key must be a non-empty ``str`` of at most 100 characters; the
    priority an ``int`` (not a ``bool``) from ``-2**31`` to ``2**31 - 1``.
    Fields: ``workflow`` and ``instance`` (the id being created).
    """


class RateLimitError(ActorflowError):
    """The workflow's queue is full, or a reject-mode limit was exceeded."""


class EventTimeoutError(ActorflowError):
    """``step.wait_for_event`` reached its timeout before a matching event arrived."""


class StepDependencyError(ActorflowError, TypeError):
    """A ``@step.do`` function has a parameter that names no step declared before it ran.

    Cloudflare's Python Workflows raise ``TypeError`` there, and so does this
    (it is one): a parameter of a decorated step function is ``ctx`` or the
    name of a step declared earlier in the run, and a legacy ``depends=[...]``
    list matches the parameters other than ``ctx``, one for one. Raised into
    ``run`` when the step is called, before anything of it is recorded.
    Fields: ``step`` and ``parameter`` (None when the whole list is at fault).
    """


class StepTimeoutError(ActorflowError):
    """A step attempt ran longer than its timeout."""


class NonRetryableError(ActorflowError):
    """Raised inside a step to fail it at once, without further attempts."""


class NonRetryableDelayError(NonRetryableError):
    """A step's retry delay function raised, timed out or gave no valid duration.

    The step then fails at once, without further attempts, as Cloudflare's
    ``NonRetryableDelayError``. The exception the function raised, if any, is
    the ``__cause__``; the error of the attempt that failed is kept in the
    step's record.
    """


class SerializationError(ActorflowError, TypeError):
    """A value could not be serialized (or deserialized) for durable storage."""


class ExecutorError(ActorflowError):
    """The executor that runs step bodies (Ray, Dask) could not run one.

    At start (``Runtime(executor=...)``): the cluster is unreachable, or its
    package is not installed. During a run: the worker or node running an
    attempt was lost, or the cluster went away; that attempt fails with this
    error and is retried by the step's policy.
    """


class LimitExceeded(ActorflowError):
    """A configured limit was exceeded (step count, result size, payload size, ...)."""


class StorageError(ActorflowError):
    """A durable write failed (for example a full disk); nothing of it was applied."""


class LeaseLost(ActorflowError):
    """This node's lease was taken over: other nodes run its instances now.

    A node that was frozen or slow past its lease timeout is presumed dead
    and adopted. Whatever it is asked afterwards (a create, a control call)
    is refused with this error and nothing of it is written: the caller
    retries through another node, or through a new runtime of this one.
    """


class RecordFormatError(ActorflowError):
    """An engine record in a data directory is not one actorflow wrote.

    The directory is damaged, or was crafted: a pickle that would build an
    object or call a function is refused here, never run.
    """


class DataDirectoryLocked(ActorflowError):
    """Another runtime has the data directory open, so this one may not open it.

    A runtime without a ``node_id`` needs its data directory to itself; nodes
    share one only with other nodes, each node id once. Fields: ``path``, and
    ``pid`` (the process holding it) when it is known.
    """


class StorageCorrupted(StorageError):
    """The data directory's files are damaged (truncated, missing or overwritten).

    Raised when opening such a directory, and by reads and writes that meet a
    damaged page. Field: ``path``.
    """


class StorageFull(StorageError):
    """The disk holding the data directory is full; nothing of the write was applied."""
