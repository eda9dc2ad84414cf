"""The supervisor: concurrency slots, wake-ups, crash restarts and recovery.

It runs on the engine loop. Only ``running`` instances hold a slot; an
instance that hibernates gives its slot back. When a slot frees, instances
waking up (a timer fired, an event arrived, a resume, a crash restart) go
before new ones from the router.

:class:`Supervisor` is made of one part per job, each in its own module and
each saying which thread it runs on:

- :class:`~actorflow.workflows.supervisor.live.LiveTable`: the live instance
  actors, at most one per instance, activated on demand and evicted when idle;
- :class:`~actorflow.workflows.supervisor.slots.Slots`: the running count, the
  wake-up queue, the scheduling pass and the start window;
- :class:`~actorflow.workflows.supervisor.restarts.Restarts`: crash restarts
  with backoff, storage-fault retries, giving up;
- :class:`~actorflow.workflows.supervisor.delivery.TimerDelivery`: due timers
  to their actors, and the timers held back (workflow not registered, instance
  owned by another node);
- :class:`~actorflow.workflows.supervisor.watchers.Watchers`: threads waiting
  for an instance to finish.

What needs several parts stays here: recovery when a workflow is registered,
adoption of another node's instances, idleness and shutdown.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from actorflow.core.errors import InstanceNotFound, RecordFormatError
from actorflow.workflows.definition import ACTIVE, Status
from actorflow.workflows.records import IDX, idx_iid, idx_prefix, split_ikey
from actorflow.workflows.supervisor.delivery import TimerDelivery
from actorflow.workflows.supervisor.live import LiveTable, log_damaged
from actorflow.workflows.supervisor.restarts import Restarts
from actorflow.workflows.supervisor.slots import Slots
from actorflow.workflows.supervisor.watchers import Waker, Watchers

if TYPE_CHECKING:
    import collections

    from actorflow.cluster.lease import NodeLease
    from actorflow.workflows.engine.context import EngineContext, WorkflowEngine
    from actorflow.workflows.engine.instance import InstanceActor
    from actorflow.workflows.engine.messages import InstanceMessage

__all__ = ["Supervisor"]

log = logging.getLogger("actorflow.supervisor")


class Supervisor:
    """Caps running instances, orders wake-ups before new starts, restarts crashes.

    Args:
        ctx: The engine context.
        max_crashes: Crashes tolerated within ``crash_window`` seconds before
            the instance is marked ``errored``.
        crash_window: The window, in seconds.
        node: This node's lease (multi-node), None for a lone runtime.
    """

    def __init__(
        self,
        ctx: EngineContext,
        max_crashes: int = 5,
        crash_window: float = 60.0,
        node: NodeLease | None = None,
    ) -> None:
        self.ctx = ctx
        self.node = node
        self.engines: dict[str, WorkflowEngine] = {}
        self.table = LiveTable(ctx, node)
        self.slots = Slots(ctx, self.engines, self.table)
        self.restarts = Restarts(ctx, self.slots, max_crashes, crash_window)
        self.delivery = TimerDelivery(ctx, self.engines, self.table, self.slots, node)
        self.watchers = Watchers()
        ctx.clock.subscribe(self.slots.kick)

    # -- what the runtime, the handles and the tests read ------------------------------

    @property
    def live(self) -> dict[bytes, InstanceActor]:
        """The live actors by instance key."""
        return self.table.live

    @property
    def running(self) -> int:
        """Instances holding a slot."""
        return self.slots.running

    @property
    def by_wf(self) -> collections.Counter[str]:
        """Instances holding a slot, by workflow."""
        return self.slots.by_wf

    @property
    def started(self) -> int:
        """Slots handed out so far."""
        return self.slots.started

    @property
    def crash_count(self) -> int:
        """Crashes so far (storage faults included)."""
        return self.restarts.crash_count

    def call(self, wfe: WorkflowEngine, iid: str, message: InstanceMessage) -> Any:
        """Sends ``message`` to the instance's actor and returns its reply (any thread)."""
        return self.table.call(wfe, iid, message)

    def call_many(
        self, wfe: WorkflowEngine, ids: list[str], message: InstanceMessage
    ) -> list[BaseException | None]:
        """See :meth:`LiveTable.call_many` (any thread)."""
        return self.table.call_many(wfe, ids, message)

    def kick_for(self, wfe: WorkflowEngine) -> None:
        """See :meth:`Slots.kick_for` (any thread)."""
        self.slots.kick_for(wfe)

    def watch(self, ik: bytes, waker: Waker | None = None) -> Waker:
        """See :meth:`Watchers.watch` (any thread)."""
        return self.watchers.watch(ik, waker)

    def unwatch(self, ik: bytes, ev: Waker) -> None:
        """See :meth:`Watchers.unwatch` (any thread)."""
        self.watchers.unwatch(ik, ev)

    def parked_timers(self) -> set[bytes]:
        """Timers held back because nobody here can take them (any thread)."""
        return self.delivery.held()

    def forget(self, actor: InstanceActor) -> None:
        """An instance was deleted: nothing of it stays queued, held or watched (engine loop)."""
        self.slots.forget(actor)
        self.delivery.release_foreign(actor.ik)
        self.table.drop(actor)
        self.watchers.finished(actor.ik)

    # -- the whole -------------------------------------------------------------------

    def shutdown(self) -> None:
        """Stops every live run without writing (engine loop only); starts nothing more.

        The runs resume from their checkpoints when the data directory is
        opened again.
        """
        self.slots.close()
        self.ctx.clock.unsubscribe(self.slots.kick)
        for actor in list(self.table.live.values()):
            actor.stop_run()

    def is_idle(self) -> bool:
        """True when no instance can make progress on its own (engine loop only)."""
        if self.slots.wakes or self.restarts.pending:
            return False
        for actor in list(self.table.live.values()):
            if actor.busy:
                return False
            ex = actor.exec
            # A run that has not ended always moves on by itself: to its next
            # step, to hibernation, or out of ``run`` after hibernating. Even
            # "every branch blocked" is only the moment before it hibernates.
            if ex is not None and not ex.finished:
                return False
        return not self.slots.has_startable()

    # -- recovery ----------------------------------------------------------------------

    def recover(self, wfe: WorkflowEngine) -> int:
        """Resumes a workflow's unfinished runs after a restart (engine loop only).

        Queued instances are in the router's durable queue and waiting ones in
        the timer index; instances that were running (or pausing) when the
        process died are queued here, and each gets a new epoch when it starts.
        """
        self.delivery.release_parked(wfe.name)
        n = 0
        for status in (Status.RUNNING, Status.WAITING_FOR_PAUSE):
            for key, _ in self.ctx.storage.scan(
                IDX, prefix=idx_prefix(wfe.name, status), keys_only=True
            ):
                iid = idx_iid(key)
                if self.node is not None and not self.node.owns(wfe.ik(iid)):
                    continue  # another node's: its owner (or an adopter) resumes it
                try:
                    actor = self.table.actor(wfe, iid)
                except InstanceNotFound:
                    continue
                except RecordFormatError as e:
                    # A damaged record: that instance stays where it is (its calls
                    # raise the same error); the others of the workflow resume.
                    log_damaged(wfe.name, iid, e)
                    continue
                if actor.running() or actor.woken:
                    continue
                self.slots.queue(actor, "recover")
                n += 1
        self.slots.pump()
        return n

    # -- multi-node ------------------------------------------------------------------

    def adopted(self, items: list[tuple[bytes, str]]) -> None:
        """This node took over ``(instance key, status)`` pairs (any thread)."""
        try:
            self.ctx.loop.call_soon_threadsafe(self._adopted, items)
        except RuntimeError:
            pass  # the loop is closed

    def _adopted(self, items: list[tuple[bytes, str]]) -> None:
        if self.slots.closing:
            return
        rescan: set[str] = set()
        for ik, status in items:
            self.delivery.release_foreign(ik)
            wf, iid = split_ikey(ik)
            wfe = self.engines.get(wf)
            if wfe is None:
                continue  # resumed by recover() when the workflow is registered
            old = self.table.live.get(ik)
            if old is not None and not old.busy and not old.running() and not old.woken:
                self.table.evict(old)  # made before the takeover: reload it
            if status in ACTIVE:
                try:
                    actor = self.table.actor(wfe, iid)
                except InstanceNotFound:
                    continue
                if not actor.owned:  # made before the takeover and busy: try again
                    self.ctx.loop.call_soon(self._adopted, [(ik, status)])
                elif not actor.running() and not actor.woken:
                    self.slots.queue(actor, "recover")
            elif status == Status.QUEUED:
                rescan.add(wf)
        for wf in rescan:
            self.engines[wf].router.rescan()
        self.ctx.timers.kick()
        self.slots.pump()
