"""Private control-flow signals of the engine.

The signals derive from :class:`BaseException` so that a user's
``except Exception`` inside ``run`` can never swallow them.
"""

from __future__ import annotations

from actorflow.core.errors import ActorflowError

__all__ = [
    "EngineFault",
    "Fatal",
    "InjectedCrash",
    "Rehome",
    "Stop",
    "StorageFault",
    "Suspend",
    "Unwind",
]


class Suspend(BaseException):
    """Unwinds ``run`` when the instance hibernates (waiting or paused)."""

    def __init__(
        self,
        message: str = "the run hibernates (it is replayed when woken); "
        "code in run must let this exception pass",
    ) -> None:
        super().__init__(message)


class Stop(BaseException):
    """Unwinds ``run`` after terminate or restart, or when the instance's fence moved."""

    def __init__(
        self,
        message: str = "the run was stopped (terminated, restarted, taken "
        "over by another node, or the runtime closed)",
    ) -> None:
        super().__init__(message)


class Unwind(BaseException):
    """Unwinds ``run`` where its replay reaches a step not yet done, for
    ``terminate(rollback=True)``: the handlers of the steps done so far are then
    known, and run."""

    def __init__(
        self,
        message: str = "the instance is being terminated with its rollbacks; "
        "code in run must let this exception pass",
    ) -> None:
        super().__init__(message)


class Fatal(BaseException):
    """Fails the instance at once, without retries (step limit, oversized result)."""

    def __init__(self, error: ActorflowError) -> None:
        super().__init__(str(error))
        self.error = error


class EngineFault(BaseException):
    """A failure of the engine, not of the workflow: the supervisor restarts the
    instance from its last checkpoint."""


class StorageFault(EngineFault):
    """A commit of the run failed in storage (a full disk, an I/O error).

    The supervisor restarts the instance from its last checkpoint as after a
    crash, with backoff, but does not count it against ``max_crashes``: a
    storage fault that passes costs a delay, not the instance.
    """


class Rehome(EngineFault):
    """Unwinds a plain ``def run`` that blocked the engine loop: it starts again
    from its checkpoint on a run thread (not counted as a crash)."""

    def __init__(
        self,
        message: str = "the run blocked the engine loop and moves to a thread "
        "(it is replayed there); code in run must let this exception pass",
    ) -> None:
        super().__init__(message)


class InjectedCrash(EngineFault):
    """A crash injected by :mod:`actorflow.testing` at a step boundary."""
