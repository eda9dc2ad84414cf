"""Timer delivery: due instance timers reach their actors, or are held back.

Thread: :meth:`TimerDelivery.on_timer` and :meth:`TimerDelivery.saturated` run
on the timer thread, :meth:`TimerDelivery.prune_foreign` on the lease's
heartbeat thread; the deliveries themselves and the releases run on the
engine loop. The lists handed between them are guarded by one lock.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import pykka

from actorflow.core.timers import parse_timer_key
from actorflow.workflows.definition import Status
from actorflow.workflows.engine.messages import Timer
from actorflow.workflows.records import is_poke, orphan_timer_batch, split_ikey, target_rkey

if TYPE_CHECKING:
    from actorflow.cluster.lease import NodeLease
    from actorflow.workflows.engine.context import EngineContext, WorkflowEngine
    from actorflow.workflows.supervisor.live import LiveTable
    from actorflow.workflows.supervisor.slots import Slots

__all__ = ["TimerDelivery"]

_MAX_WAKES = 4096  # timer wake-ups held in memory before the timer index is left to wait


class TimerDelivery:
    """Hands due timers to their instances; holds those nobody here may take.

    Args:
        ctx: The engine context.
        engines: The registered workflows by name (shared with the supervisor).
        live: The live table.
        slots: Where a hibernated instance's wake-up is queued.
        node: This node's lease (multi-node), None for a lone runtime.
    """

    def __init__(
        self,
        ctx: EngineContext,
        engines: dict[str, WorkflowEngine],
        live: LiveTable,
        slots: Slots,
        node: NodeLease | None,
    ) -> None:
        self.ctx = ctx
        self.engines = engines
        self.live = live
        self.slots = slots
        self.node = node
        self._lock = threading.Lock()
        # Timer wake-ups handed to the loop, not yet delivered.
        self._deliveries: list[tuple[WorkflowEngine, str, bytes, int]] = []
        # Due timers of workflows not registered (yet): held as "in flight" so that
        # they are not offered again and again, and released by ``release_parked``.
        self._parked: dict[str, list[bytes]] = {}
        # Multi-node (see actorflow.cluster.lease): due timers of instances other
        # nodes own, held until their owner consumes them or this node adopts
        # the instance.
        self._foreign: dict[bytes, set[bytes]] = {}

    def saturated(self) -> bool:
        """True while wake-ups are refused: enough are waiting for a slot already."""
        return len(self.slots.wakes) + len(self._deliveries) >= _MAX_WAKES

    def on_timer(self, target: bytes, key: bytes, deadline: int) -> bool:
        """Timer-thread handler of instance deadlines; False means "not now"."""
        if self.saturated():
            return False
        wf, iid = split_ikey(target)
        node = self.node
        with self._lock:
            wfe = self.engines.get(wf)
            if wfe is None:
                self._parked.setdefault(wf, []).append(key)
                return True
            if node is None:
                # Delivered from the loop, where eviction happens too: a message
                # can then never land in an actor that is being evicted. One
                # loop wake-up carries every delivery made meanwhile: a burst
                # of due timers costs one self-pipe write, not one each.
                self._deliveries.append((wfe, iid, key, deadline))
                first = len(self._deliveries) == 1
        if node is not None:
            ik = wfe.ik(iid)
            if not node.owns(ik):
                with self._lock:
                    self._foreign.setdefault(ik, set()).add(key)
                return True
            with self._lock:
                self._deliveries.append((wfe, iid, key, deadline))
                first = len(self._deliveries) == 1
        if first:
            try:
                self.ctx.loop.call_soon_threadsafe(self._deliver_timers)
            except RuntimeError:
                with self._lock:
                    self._deliveries.clear()
                return False
        return True

    def _deliver_timers(self) -> None:
        with self._lock:
            items, self._deliveries = self._deliveries, []
        # A step's timer names its instance's records: no ids lookup per wake-up.
        known = {}
        for wfe, iid, key, _ in items:
            rk = target_rkey(parse_timer_key(key)[2])
            if rk is not None:
                known[wfe.ik(iid)] = rk
        actors = self.live.actors([(wfe, iid) for wfe, iid, _, _ in items], known)
        woke = False
        wakes = self.slots.wakes
        for (wfe, iid, key, deadline), actor in zip(items, actors, strict=True):
            if actor is None:
                self._orphan(wfe.ik(iid), key)
                continue
            if (
                actor.exec is None
                and not actor.busy
                and not actor.woken
                and actor.owned
                and actor.record["s"] == Status.WAITING
                and actor.actor_inbox.empty()
                and not is_poke(key)
            ):
                # A hibernated instance: what handle_timer would do, without a
                # message and a task. The run consumes the timer.
                actor.woken = True
                wakes.append((actor, "wake"))
                woke = True
                continue
            try:
                actor.actor_ref.tell(Timer(key, deadline))
            except pykka.ActorDeadError:
                self.ctx.timers.done(key)
        if woke:
            self.slots.pump()

    def _orphan(self, ik: bytes, key: bytes) -> None:
        """A due timer whose instance was not found: removed if the instance is gone."""
        timers = self.ctx.timers
        batch = orphan_timer_batch(self.ctx.storage, ik, key)
        if batch is None:  # its record exists but cannot be read: left as it is
            timers.done(key)
            return
        self.ctx.storage.submit(batch, lambda err: timers.done(key, consumed=err is None))

    def release_parked(self, wf: str) -> None:
        """Workflow ``wf`` is registered now: its held timers are offered again."""
        with self._lock:
            parked = self._parked.pop(wf, [])
        for key in parked:
            self.ctx.timers.done(key)
        if parked:
            self.ctx.timers.kick()

    def release_foreign(self, ik: bytes) -> None:
        """This node now owns ``ik``: its held timers are offered again."""
        with self._lock:
            keys = self._foreign.pop(ik, ())
        for key in keys:
            self.ctx.timers.done(key)
        if keys:
            self.ctx.timers.kick()

    def prune_foreign(self) -> None:
        """Forgets held timers their owner has consumed (any thread)."""
        with self._lock:
            items = [(ik, k) for ik, keys in self._foreign.items() for k in keys]
        if not items:
            return
        alive = self.ctx.timers.armed([k for _, k in items])
        with self._lock:
            for ik, key in items:
                if key not in alive:
                    keys = self._foreign.get(ik)
                    if keys is not None:
                        keys.discard(key)
                        if not keys:
                            del self._foreign[ik]
                    self.ctx.timers.done(key)

    def held(self) -> set[bytes]:
        """Timers held back: of workflows not registered, or of instances other nodes own."""
        with self._lock:
            return {k for keys in [*self._parked.values(), *self._foreign.values()] for k in keys}
