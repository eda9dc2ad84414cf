"""Concurrency slots and the scheduling pass that hands them out.

Thread: the engine loop, except :meth:`Slots.kick` and :meth:`Slots.kick_for`
(any thread: a creation, the clock) and :meth:`Slots.room_for` (a creating
thread, under the router's lock; it reads the counters without a lock, as a
bound that the next pass corrects).
"""

from __future__ import annotations

import collections
import logging
from typing import TYPE_CHECKING, Any

import pykka

from actorflow.core.errors import InstanceNotFound
from actorflow.workflows.engine.messages import Start
from actorflow.workflows.records import EVENTS, STEPS, events_prefix, steps_prefix

if TYPE_CHECKING:
    from actorflow.workflows.engine.context import EngineContext, WorkflowEngine
    from actorflow.workflows.engine.instance import InstanceActor
    from actorflow.workflows.supervisor.live import LiveTable

__all__ = ["START_WINDOW", "Slots"]

log = logging.getLogger("actorflow.supervisor")

# Instances started whose runs have not yet reached their first wait. Starting
# every free slot at once (tens of thousands) would move them through the
# engine as one wave, all in memory together; a window keeps them flowing.
START_WINDOW = 512


class Slots:
    """Caps running instances and starts the next ones, wake-ups before new ones.

    Args:
        ctx: The engine context.
        engines: The registered workflows by name (shared with the supervisor).
        live: The live table, to activate an instance taken from a queue.
    """

    def __init__(
        self, ctx: EngineContext, engines: dict[str, WorkflowEngine], live: LiveTable
    ) -> None:
        self.ctx = ctx
        self.engines = engines
        self.live = live
        self.running = 0
        self.activating = 0  # see START_WINDOW
        self.by_wf: collections.Counter[str] = collections.Counter()
        self.wakes: collections.deque[tuple[InstanceActor, str]] = collections.deque()
        # Woken instances whose flow-control key is at its cap, by (workflow, key):
        # each release of such a key moves its first one back to ``wakes``.
        self.key_waits: dict[tuple[str, str], collections.deque[tuple[InstanceActor, str]]] = {}
        self.started = 0
        self.closing = False
        self._window_full = False
        self._kick_pending = False
        self._pump_pending = False
        self._retry_handle: Any = None
        self._rr = 0

    def kick(self) -> None:
        """Asks for a scheduling pass (from any thread)."""
        if self._kick_pending:
            return
        self._kick_pending = True
        try:
            self.ctx.loop.call_soon_threadsafe(self.pump)
        except RuntimeError:
            pass  # the loop is closed

    def kick_for(self, wfe: WorkflowEngine) -> None:
        """Asks for a scheduling pass after ``wfe``'s queue got a durable entry.

        Skipped while every slot the entry could use is taken: waking the loop
        costs a self-pipe write and a pass per create, all for nothing. Safe
        because the caller's entry is committed before this check, and the
        release of a slot decrements the counters and then pumps on the loop,
        so a release the check missed pumps after the entry is readable.
        """
        if (
            self.running >= self.ctx.limits.max_concurrent
            or self.by_wf[wfe.name] >= wfe.limits.max_concurrent
        ):
            return
        self.kick()

    def room_for(self, wfe: WorkflowEngine, n: int) -> bool:
        """True if ``n`` more instances of ``wfe`` could run at once (``overflow="reject"``).

        ``n`` counts the instances waiting for a slot already as well as the new ones.
        """
        return (
            self.by_wf[wfe.name] + n <= wfe.limits.max_concurrent
            and self.running + n <= self.ctx.limits.max_concurrent
        )

    def pump_soon(self) -> None:
        """Asks for a scheduling pass later in this loop iteration (engine loop only).

        Slots freed and wake-ups queued by many callbacks of one iteration
        (a group commit resolves hundreds of runs at once) then share a pass,
        and their starts share one read of storage.
        """
        if not self._pump_pending:
            self._pump_pending = True
            self.ctx.loop.call_soon(self.pump)

    def pump(self) -> None:
        """Starts instances while slots are free (engine loop only)."""
        self._kick_pending = False
        self._pump_pending = False
        if self.closing:
            return
        cap = self.ctx.limits.max_concurrent
        throttled = None
        batch: list[tuple[InstanceActor, str]] = []
        while self.running < cap:
            if self.activating >= START_WINDOW:
                self._window_full = True
                break
            nxt = self._next()
            if nxt is None:
                break
            actor = nxt[0]
            self.activating += 1
            actor.activating = True
            self.started += 1
            actor.woken = True  # keeps it in memory until it starts
            batch.append(nxt)
        if batch:
            self._start(batch)
        for wfe in self.engines.values():
            if wfe.router.throttled and wfe.router.bucket is not None:
                w = wfe.router.bucket.wait_s()
                throttled = w if throttled is None else min(throttled, w)
        if throttled is not None and self._retry_handle is None:
            self._retry_handle = self.ctx.loop.call_later(max(throttled, 0.001), self._retry)

    def _start(self, batch: list[tuple[InstanceActor, str]]) -> None:
        """Starts the runs of instances just given a slot.

        A quiet actor whose start writes nothing gets its run here, its steps
        and events read with those of the whole batch in one snapshot (nothing
        else runs on the loop meanwhile, so they are what the run would read
        itself); any other gets a "start" message.
        """
        # Only the begin() calls below change what can_begin() looks at, and
        # only for their own actor: an actor listed twice (rare) begins once
        # and its repeat gets the message, which finds the run going.
        rows: dict[int, tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]] | None] = {}
        wanted: list[tuple[str, bytes]] = []
        for a, reason in batch:
            if id(a) not in rows and a.can_begin(reason):
                rows[id(a)] = None
                wanted.append((STEPS, steps_prefix(a.rk)))
                wanted.append((EVENTS, events_prefix(a.rk)))
        if wanted:
            try:
                got = iter(self.ctx.storage.scan_prefixes(wanted))
                for key in rows:  # in insertion order, as ``wanted``
                    rows[key] = (next(got), next(got))
            except Exception:
                log.exception("reading the steps of %d instances to start failed", len(rows))
                rows.clear()  # each gets "start", which reads (and fails) on its own
        launched: list[InstanceActor] = []
        for actor, reason in batch:
            pre = rows.pop(id(actor), None)
            if pre is not None:
                try:
                    actor.begin(pre, settle=False)
                except Exception:
                    log.exception(
                        "%s: its run could not start",
                        actor.where,
                        extra={"workflow": actor.wfe.name, "instance": actor.iid},
                    )
                    actor.exec = None
                    self.released(actor)
                    actor.maybe_evict()
                    continue
                launched.append(actor)
                continue
            try:
                actor.actor_ref.tell(Start(reason))
            except pykka.ActorDeadError:
                self._count_in(actor.wfe.name, -1)
                if actor.key_slots:
                    self._key_out(actor)
                self.settled(actor)
        if launched:
            # After the first step of every task just made: their runs have
            # gone as far as they can without waiting (see START_WINDOW).
            self.ctx.loop.call_soon(self._settle_all, launched)

    def _settle_all(self, actors: list[InstanceActor]) -> None:
        for actor in actors:
            self.settled(actor, pump=False)
        if self._window_full and self.activating <= START_WINDOW // 2:
            self._window_full = False
            self.pump()

    def close(self) -> None:
        """Starts nothing more (engine loop only)."""
        self.closing = True
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None

    def _retry(self) -> None:
        self._retry_handle = None
        self.pump()

    def _next(self) -> tuple[InstanceActor, str] | None:
        """Picks the next instance to start and counts it as running.

        An instance taken from the queue is counted before the pop: the queue
        stops counting it as waiting from the pop on, and ``room_for`` (read
        by creating threads in reject mode) must never see it neither waiting
        nor running, even while its record is being read.
        """
        deferred = []
        found = None
        while self.wakes:
            actor, reason = self.wakes.popleft()
            if self.by_wf[actor.wfe.name] >= actor.wfe.limits.max_concurrent:
                deferred.append((actor, reason))
                continue
            key = actor.record.get("ky")
            if key is not None and not actor.wfe.router.key_room(key):
                self._wait_for_key(actor, reason, key)
                continue
            found = (actor, reason)
            break
        self.wakes.extendleft(reversed(deferred))
        if found is not None:
            self._count_in(found[0].wfe.name, 1)
            self._key_in(found[0])
            return found
        engines = list(self.engines.values())
        for i in range(len(engines)):
            wfe = engines[(self._rr + i) % len(engines)]
            if self.by_wf[wfe.name] >= wfe.limits.max_concurrent:
                continue
            self._count_in(wfe.name, 1)
            while True:
                item = wfe.router.pop(use_bucket=wfe.limits.overflow == "queue")
                if item is None:
                    self._count_in(wfe.name, -1)
                    break
                reason, iid = item
                try:
                    actor = self.live.actor(wfe, iid)
                except InstanceNotFound:
                    continue
                except BaseException:
                    self._count_in(wfe.name, -1)
                    raise
                key = actor.record.get("ky")
                if key is not None:
                    if not wfe.router.key_room(key):
                        # A wake-up entry (the router checks new ones): it waits
                        # for its key in memory; the slot goes to the next entry.
                        self._wait_for_key(actor, reason, key)
                        continue
                    self._key_in(actor)
                self._rr = (self._rr + i + 1) % len(engines)
                return actor, reason
        return None

    def _count_in(self, wf: str, n: int) -> None:
        self.running += n
        self.by_wf[wf] += n

    def _key_in(self, actor: InstanceActor) -> None:
        """Counts a started instance against its flow-control key, if it has one."""
        key = actor.record.get("ky")
        if key is not None:
            actor.wfe.router.key_in(key)
            actor.key_slots += 1

    def _key_out(self, actor: InstanceActor) -> None:
        """Gives back the key slot of an instance that held one; wakes the key's next waiter."""
        actor.key_slots -= 1
        key: str = actor.record["ky"]
        wf = actor.wfe.name
        actor.wfe.router.key_out(key)
        waits = self.key_waits.get((wf, key))
        if waits:
            self.wakes.appendleft(waits.popleft())
            if not waits:
                del self.key_waits[(wf, key)]

    def _wait_for_key(self, actor: InstanceActor, reason: str, key: str) -> None:
        actor.woken = True  # keeps it in memory until it starts
        self.key_waits.setdefault((actor.wfe.name, key), collections.deque()).append(
            (actor, reason)
        )

    def released(self, actor: InstanceActor) -> None:
        """An instance gave its slot back (hibernated, finished, crashed or skipped)."""
        self._count_in(actor.wfe.name, -1)
        if actor.key_slots:
            self._key_out(actor)
        self.settled(actor, pump=False)
        self.pump_soon()

    def settled(self, actor: InstanceActor, pump: bool = True) -> None:
        """A started instance's run reached its first wait (or ended): it leaves the window."""
        if not actor.activating:
            return
        actor.activating = False
        self.activating -= 1
        if pump and self._window_full and self.activating <= START_WINDOW // 2:
            self._window_full = False
            self.pump()

    def wake(self, actor: InstanceActor, reason: str = "wake") -> None:
        """Queues a waking instance ahead of new ones (engine loop only)."""
        actor.woken = True
        self.wakes.append((actor, reason))
        self.pump_soon()

    def queue(self, actor: InstanceActor, reason: str) -> None:
        """Queues a waking instance without a pass (engine loop only): the caller pumps."""
        actor.woken = True
        self.wakes.append((actor, reason))

    def forget(self, actor: InstanceActor) -> None:
        """Drops a deleted instance's queued wake-ups (engine loop only)."""
        if any(a is actor for a, _ in self.wakes):
            self.wakes = collections.deque((a, r) for a, r in self.wakes if a is not actor)
        key: str | None = actor.record.get("ky")
        if key is None:
            return
        where = (actor.wfe.name, key)
        waits = self.key_waits.get(where)
        if waits and any(a is actor for a, _ in waits):
            rest = collections.deque((a, r) for a, r in waits if a is not actor)
            if rest:
                self.key_waits[where] = rest
            else:
                del self.key_waits[where]

    def has_startable(self) -> bool:
        """True if a queued new instance could take a free slot now (engine loop only)."""
        if self.running >= self.ctx.limits.max_concurrent:
            return False
        for wfe in self.engines.values():
            if (
                self.by_wf[wfe.name] < wfe.limits.max_concurrent
                and wfe.router.ready()
                and (wfe.router.bucket is None or wfe.router.bucket.wait_s() == 0.0)
            ):
                return True
        return False
