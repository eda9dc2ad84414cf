"""Crash restarts: an instance whose run crashed restarts from its checkpoint, or gives up.

Thread: the engine loop.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from actorflow.core.errors import StorageError
from actorflow.workflows.engine.messages import Fail
from actorflow.workflows.engine.signals import Rehome, StorageFault

if TYPE_CHECKING:
    from actorflow.workflows.engine.context import EngineContext
    from actorflow.workflows.engine.instance import InstanceActor
    from actorflow.workflows.supervisor.slots import Slots

__all__ = ["Restarts"]

log = logging.getLogger("actorflow.supervisor")

#: Seconds between restarts of an instance while storage refuses its writes.
_STORAGE_BACKOFF_MAX = 2.0


class Restarts:
    """Restarts crashed instances with backoff; more than ``max_crashes`` mark them errored.

    Args:
        ctx: The engine context.
        slots: Where a restart queues its instance as a wake-up.
        max_crashes: Crashes tolerated within ``crash_window`` seconds before
            the instance is marked ``errored``.
        crash_window: The window, in seconds.
    """

    def __init__(
        self, ctx: EngineContext, slots: Slots, max_crashes: int, crash_window: float
    ) -> None:
        self.ctx = ctx
        self.slots = slots
        self.max_crashes = max_crashes
        self.crash_window = crash_window
        self.crash_count = 0
        # Restarts (and retried "errored" writes) waiting for their backoff to
        # pass: pending work, so the runtime is not idle meanwhile.
        self.pending = 0

    def crashed(self, actor: InstanceActor, exc: BaseException) -> None:
        """Restarts a crashed instance from its checkpoint, with backoff, or gives up.

        A storage fault (a commit refused by a full disk, an I/O error) is
        not the instance's fault: it restarts with backoff (at most
        ``_STORAGE_BACKOFF_MAX`` s apart) for as long as the fault lasts,
        and never counts against ``max_crashes``. A run moved off the loop
        (:class:`Rehome`) starts again at once, on a run thread.
        """
        if isinstance(exc, Rehome):
            if not self.slots.closing:
                self._restart_in(actor, 0.0)
            return
        self.crash_count += 1
        now = time.monotonic()
        if isinstance(exc, StorageFault | StorageError):
            actor.storage_faults += 1
            if self.slots.closing:
                return
            delay = min(0.05 * 2 ** (actor.storage_faults - 1), _STORAGE_BACKOFF_MAX)
            if actor.storage_faults == 1 or delay >= _STORAGE_BACKOFF_MAX:
                log.warning(
                    "%s: storage refused a write (%s); retrying from the last checkpoint in %.2f s",
                    actor.where,
                    exc,
                    delay,
                    extra={"workflow": actor.wfe.name, "instance": actor.iid},
                )
            self._restart_in(actor, delay)
            return
        actor.crashes = [t for t in actor.crashes if now - t < self.crash_window] + [now]
        n = len(actor.crashes)
        if n > self.max_crashes:
            msg = (
                f"{actor.where} crashed {n} times within {self.crash_window:.0f} s; "
                f"giving up. Last crash: {type(exc).__name__}: {exc}"
            )
            log.error(msg, extra={"workflow": actor.wfe.name, "instance": actor.iid})
            actor.actor_ref.tell(Fail(msg))
            return
        if self.slots.closing:
            return
        delay = min(0.05 * 2 ** (n - 1), 5.0)
        log.warning(
            "%s crashed (%s: %s); restarting in %.2f s",
            actor.where,
            type(exc).__name__,
            exc,
            delay,
            extra={"workflow": actor.wfe.name, "instance": actor.iid},
        )
        self._restart_in(actor, delay)

    def _restart_in(self, actor: InstanceActor, delay: float) -> None:
        """Restarts ``actor`` from its checkpoint after ``delay`` seconds (pending meanwhile)."""
        actor.woken = True
        self.pending += 1
        self.ctx.loop.call_later(delay, self._restart, actor)

    def _restart(self, actor: InstanceActor) -> None:
        self.pending -= 1
        self.slots.wake(actor, "crash")
