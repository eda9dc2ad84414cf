"""Private control-flow signals of the engine, and the loop notifier.

The signals derive from :class:`BaseException` so that a user's
``except Exception`` inside ``run`` can never swallow them.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from actorflow.core.errors import ActorflowError

__all__ = [
    "EngineFault",
    "Fatal",
    "InjectedCrash",
    "LoopNotifier",
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


class LoopNotifier:
    """Resolves asyncio futures from the storage writer thread, one loop wake-up per group commit.

    ``callback(fut)`` gives the function to pass to ``Storage.submit``;
    ``flush`` is registered as the storage's after-batch hook.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[Any], BaseException | None]] = []

    def callback(self, fut: asyncio.Future[Any]) -> Any:
        def done(err: BaseException | None) -> None:
            with self._lock:
                self._ready.append((fut, err))

        return done

    def flush(self) -> None:
        with self._lock:
            if not self._ready:
                return
            items, self._ready = self._ready, []
        try:
            self._loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


def _resolve(items: list[tuple[asyncio.Future[Any], BaseException | None]]) -> None:
    for fut, err in items:
        if fut.done():
            continue
        if err is None:
            fut.set_result(None)
        else:
            fut.set_exception(err)
