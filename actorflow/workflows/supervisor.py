"""The supervisor: concurrency slots, wake-ups, crash restarts and recovery.

It runs on the engine loop. Only ``running`` instances hold a slot; an
instance that hibernates gives its slot back. When a slot frees, instances
waking up (a timer fired, an event arrived, a resume, a crash restart) go
before new ones from the router.

It also keeps the table of live instance actors: at most one per instance,
activated on demand and evicted when idle.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Any

import pykka

from actorflow.core.errors import ActorflowError, InstanceNotFound, RecordFormatError, StorageError
from actorflow.core.timers import parse_timer_key
from actorflow.workflows.definition import ACTIVE, Status
from actorflow.workflows.engine.context import EngineContext, WorkflowEngine
from actorflow.workflows.engine.instance import InstanceActor
from actorflow.workflows.engine.messages import Fail, InstanceMessage, Start, Timer
from actorflow.workflows.engine.signals import StorageFault
from actorflow.workflows.records import (
    EVENTS,
    IDS,
    IDX,
    INST,
    STEPS,
    events_prefix,
    idx_iid,
    idx_prefix,
    is_poke,
    load,
    rkey_of,
    split_ikey,
    steps_prefix,
    target_rkey,
)

if TYPE_CHECKING:
    from actorflow.cluster.lease import NodeLease

__all__ = ["Supervisor"]

log = logging.getLogger("actorflow.supervisor")

_MAX_WAKES = 4096  # timer wake-ups held in memory before the timer index is left to wait
#: Seconds between restarts of an instance while storage refuses its writes.
_STORAGE_BACKOFF_MAX = 2.0
# Instances started whose runs have not yet reached their first wait. Starting
# every free slot at once (tens of thousands) would move them through the
# engine as one wave, all in memory together; a window keeps them flowing.
_START_WINDOW = 512


class Supervisor:
    """Caps running instances, orders wake-ups before new starts, restarts crashes.

    Args:
        ctx: The engine context.
        max_crashes: Crashes tolerated within ``crash_window`` seconds before
            the instance is marked ``errored``.
        crash_window: The window, in seconds.
    """

    def __init__(
        self, ctx: EngineContext, max_crashes: int = 5, crash_window: float = 60.0
    ) -> None:
        self.ctx = ctx
        self.engines: dict[str, WorkflowEngine] = {}
        self.live: dict[bytes, InstanceActor] = {}
        self._lock = threading.Lock()
        self.running = 0
        self.activating = 0  # see _START_WINDOW
        # Timer wake-ups handed to the loop, not yet delivered.
        self._deliveries: list[tuple[WorkflowEngine, str, bytes, int]] = []
        self._window_full = False
        self.by_wf: collections.Counter[str] = collections.Counter()
        self.wakes: collections.deque[tuple[InstanceActor, str]] = collections.deque()
        self._kick_pending = False
        self._pump_pending = False
        self._retry_handle: Any = None
        self._rr = 0
        self._watchers: dict[bytes, list[threading.Event]] = {}
        self.max_crashes = max_crashes
        self.crash_window = crash_window
        self.started = 0
        self.crash_count = 0
        self.closing = False
        self.restarting = 0  # crash restarts waiting for their backoff to pass
        # Due timers of workflows not registered (yet): held as "in flight" so that
        # they are not offered again and again, and released by ``recover``.
        self._parked: dict[str, list[bytes]] = {}
        # Multi-node (see actorflow.lease): this node's lease, and due timers of
        # instances other nodes own, held until their owner consumes them or
        # this node adopts the instance.
        self.node: NodeLease | None = None
        self._foreign: dict[bytes, set[bytes]] = {}
        ctx.clock.subscribe(self.kick)

    # -- the live table ------------------------------------------------------------

    def actor(self, wfe: WorkflowEngine, iid: str) -> InstanceActor:
        """Returns the live actor of an instance, activating it if needed.

        Raises:
            InstanceNotFound: No such instance.
        """
        ik = wfe.ik(iid)
        actor = self.live.get(ik)
        if actor is not None and not actor.actor_stopped.is_set():
            return actor
        with self._lock:
            actor = self.live.get(ik)
            if actor is None or actor.actor_stopped.is_set():
                rk = wfe.rk(iid)
                raw = self.ctx.storage.get(INST, rk) if rk is not None else None
                if rk is None or raw is None:
                    raise InstanceNotFound(
                        f"(instance.not_found) workflow {wfe.name!r}: no instance {iid!r}",
                        workflow=wfe.name,
                        instance=iid,
                    )
                actor = self._activate(wfe, iid, ik, rk, raw)
        return actor

    def _activate(
        self, wfe: WorkflowEngine, iid: str, ik: bytes, rk: bytes, raw: bytes
    ) -> InstanceActor:
        """Makes the live actor of an instance from its record (hold ``_lock``).

        Not started on the executor: its first message schedules it, and the
        supervisor starts runs without one (see ``InstanceActor.can_begin``).
        """
        actor = InstanceActor(wfe, iid, rk, load(raw))
        if self.node is not None:  # read after the record: see NodeLease
            actor.owner = self.node.owner_of(ik)
            actor.owned = actor.owner == self.node.node_id
        self.live[ik] = actor
        return actor

    def actors(
        self,
        pairs: list[tuple[WorkflowEngine, str]],
        known: dict[bytes, bytes] | None = None,
    ) -> list[InstanceActor | None]:
        """:meth:`actor` for many instances, with one read for every record (engine loop only).

        None stands for an instance that does not exist. ``known`` maps
        instance keys to record keys the caller already has (from timer targets).
        """
        out: list[InstanceActor | None] = [None] * len(pairs)
        missing: list[tuple[int, WorkflowEngine, str, bytes]] = []
        live = self.live
        for i, (wfe, iid) in enumerate(pairs):
            ik = wfe.ik(iid)
            actor = live.get(ik)
            if actor is not None and not actor.actor_stopped.is_set():
                out[i] = actor
            else:
                missing.append((i, wfe, iid, ik))
        if not missing:
            return out
        known = known or {}
        rks = {m[3]: known[m[3]] for m in missing if m[3] in known}
        unknown = [m[3] for m in missing if m[3] not in known]
        if unknown:
            rks.update(
                (ik, rkey_of(ik, n)) for ik, n in self.ctx.storage.get_many(IDS, unknown).items()
            )
        raws = self.ctx.storage.get_many(INST, list(rks.values()))
        with self._lock:
            for i, wfe, iid, ik in missing:
                actor = live.get(ik)  # made meanwhile (another thread, or a repeat here)
                if actor is None or actor.actor_stopped.is_set():
                    rk = rks.get(ik)
                    raw = raws.get(rk) if rk is not None else None
                    if rk is None or raw is None:
                        continue
                    try:
                        actor = self._activate(wfe, iid, ik, rk, raw)
                    except RecordFormatError as e:
                        # One damaged record must not hold up the others of the burst.
                        log.error(
                            "workflow %r, instance %r: %s",
                            wfe.name,
                            iid,
                            e,
                            extra={"workflow": wfe.name, "instance": iid},
                        )
                        continue
                out[i] = actor
        return out

    def evict(self, actor: InstanceActor) -> None:
        with self._lock:
            if not actor.actor_inbox.empty():
                return
            if self.live.get(actor.ik) is actor:
                del self.live[actor.ik]
            actor.actor_stopped.set()
            # The run is over (or never was): dropping it breaks the actor <->
            # run reference cycle, so both are freed at once, not by a full
            # collection.
            actor.exec = None

    def call(self, wfe: WorkflowEngine, iid: str, message: InstanceMessage) -> Any:
        """Sends ``message`` to the instance's actor and returns its reply."""
        self.ctx.check()
        for _ in range(16):
            actor = self.actor(wfe, iid)
            try:
                return actor.actor_ref.ask(message)
            except pykka.ActorDeadError:
                continue  # evicted before it took the message: it never ran
        raise ActorflowError(f"workflow {wfe.name!r}, instance {iid!r}: actor kept stopping")

    # -- slots ---------------------------------------------------------------------

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
            if self.activating >= _START_WINDOW:
                self._window_full = True
                break
            nxt = self._next()
            if nxt is None:
                break
            actor = nxt[0]
            self.running += 1
            self.activating += 1
            actor.activating = True
            self.by_wf[actor.wfe.name] += 1
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
                self.running -= 1
                self.by_wf[actor.wfe.name] -= 1
                self.settled(actor)
        if launched:
            # After the first step of every task just made: their runs have
            # gone as far as they can without waiting (see _START_WINDOW).
            self.ctx.loop.call_soon(self._settle_all, launched)

    def _settle_all(self, actors: list[InstanceActor]) -> None:
        for actor in actors:
            self.settled(actor, pump=False)
        if self._window_full and self.activating <= _START_WINDOW // 2:
            self._window_full = False
            self.pump()

    def shutdown(self) -> None:
        """Stops every live run without writing (engine loop only); starts nothing more.

        The runs resume from their checkpoints when the data directory is
        opened again.
        """
        self.closing = True
        self.ctx.clock.unsubscribe(self.kick)
        if self._retry_handle is not None:
            self._retry_handle.cancel()
            self._retry_handle = None
        for actor in list(self.live.values()):
            actor.stop_run()

    def _retry(self) -> None:
        self._retry_handle = None
        self.pump()

    def _next(self) -> tuple[InstanceActor, str] | None:
        deferred = []
        found = None
        while self.wakes:
            actor, reason = self.wakes.popleft()
            if self.by_wf[actor.wfe.name] >= actor.wfe.limits.max_concurrent:
                deferred.append((actor, reason))
                continue
            found = (actor, reason)
            break
        self.wakes.extendleft(reversed(deferred))
        if found is not None:
            return found
        engines = list(self.engines.values())
        for i in range(len(engines)):
            wfe = engines[(self._rr + i) % len(engines)]
            if self.by_wf[wfe.name] >= wfe.limits.max_concurrent:
                continue
            while True:
                item = wfe.router.pop(use_bucket=wfe.limits.overflow == "queue")
                if item is None:
                    break
                reason, iid = item
                try:
                    actor = self.actor(wfe, iid)
                except InstanceNotFound:
                    continue
                self._rr = (self._rr + i + 1) % len(engines)
                return actor, reason
        return None

    def released(self, actor: InstanceActor) -> None:
        """An instance gave its slot back (hibernated, finished, crashed or skipped)."""
        self.running -= 1
        self.by_wf[actor.wfe.name] -= 1
        self.settled(actor, pump=False)
        self.pump_soon()

    def settled(self, actor: InstanceActor, pump: bool = True) -> None:
        """A started instance's run reached its first wait (or ended): it leaves the window."""
        if not actor.activating:
            return
        actor.activating = False
        self.activating -= 1
        if pump and self._window_full and self.activating <= _START_WINDOW // 2:
            self._window_full = False
            self.pump()

    def wake(self, actor: InstanceActor, reason: str = "wake") -> None:
        """Queues a waking instance ahead of new ones (engine loop only)."""
        actor.woken = True
        self.wakes.append((actor, reason))
        self.pump_soon()

    def saturated(self) -> bool:
        """True while wake-ups are refused: enough are waiting for a slot already."""
        return len(self.wakes) + len(self._deliveries) >= _MAX_WAKES

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
        actors = self.actors([(wfe, iid) for wfe, iid, _, _ in items], known)
        woke = False
        for (_, _, key, deadline), actor in zip(items, actors, strict=True):
            if actor is None:
                self.ctx.timers.done(key)
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
                self.wakes.append((actor, "wake"))
                woke = True
                continue
            try:
                actor.actor_ref.tell(Timer(key, deadline))
            except pykka.ActorDeadError:
                self.ctx.timers.done(key)
        if woke:
            self.pump()

    # -- outcomes --------------------------------------------------------------------

    def crashed(self, actor: InstanceActor, exc: BaseException) -> None:
        """Restarts a crashed instance from its checkpoint, with backoff, or gives up.

        A storage fault (a commit refused by a full disk, an I/O error) is
        not the instance's fault: it restarts with backoff (at most
        ``_STORAGE_BACKOFF_MAX`` s apart) for as long as the fault lasts,
        and never counts against ``max_crashes``.
        """
        self.crash_count += 1
        now = time.monotonic()
        if isinstance(exc, StorageFault | StorageError):
            actor.storage_faults += 1
            if self.closing:
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
            actor.woken = True
            self.restarting += 1
            self.ctx.loop.call_later(delay, self._restart, actor)
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
        if self.closing:
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
        actor.woken = True
        self.restarting += 1
        self.ctx.loop.call_later(delay, self._restart, actor)

    def _restart(self, actor: InstanceActor) -> None:
        self.restarting -= 1
        self.wake(actor, "crash")

    def finished(self, actor: InstanceActor) -> None:
        """Wakes threads waiting for the instance to finish."""
        if not self._watchers:
            # Read without the lock: a watcher added meanwhile reads the status
            # after adding itself, and the end is durable already.
            return
        with self._lock:
            watchers = self._watchers.pop(actor.ik, [])
        for ev in watchers:
            ev.set()

    def watch(self, ik: bytes) -> threading.Event:
        ev = threading.Event()
        with self._lock:
            self._watchers.setdefault(ik, []).append(ev)
        return ev

    def unwatch(self, ik: bytes, ev: threading.Event) -> None:
        with self._lock:
            lst = self._watchers.get(ik)
            if lst and ev in lst:
                lst.remove(ev)
                if not lst:
                    del self._watchers[ik]

    def parked_timers(self) -> set[bytes]:
        """Timers held back because their workflow is not registered (nobody can take them)."""
        with self._lock:
            return {k for keys in [*self._parked.values(), *self._foreign.values()] for k in keys}

    def is_idle(self) -> bool:
        """True when no instance can make progress on its own (engine loop only)."""
        if self.wakes or self.restarting:
            return False
        for actor in list(self.live.values()):
            if actor.busy:
                return False
            ex = actor.exec
            # A run that has not ended always moves on by itself: to its next
            # step, to hibernation, or out of ``run`` after hibernating. Even
            # "every branch blocked" is only the moment before it hibernates.
            if ex is not None and not ex.finished:
                return False
        if self.running < self.ctx.limits.max_concurrent:
            for wfe in self.engines.values():
                if (
                    self.by_wf[wfe.name] < wfe.limits.max_concurrent
                    and wfe.router.ready()
                    and (wfe.router.bucket is None or wfe.router.bucket.wait_s() == 0.0)
                ):
                    return False
        return True

    # -- recovery ----------------------------------------------------------------------

    def recover(self, wfe: WorkflowEngine) -> int:
        """Resumes a workflow's unfinished runs after a restart (engine loop only).

        Queued instances are in the router's durable queue and waiting ones in
        the timer index; instances that were running (or pausing) when the
        process died are queued here, and each gets a new epoch when it starts.
        """
        with self._lock:
            parked = self._parked.pop(wfe.name, [])
        for key in parked:
            self.ctx.timers.done(key)
        if parked:
            self.ctx.timers.kick()
        n = 0
        for status in (Status.RUNNING, Status.WAITING_FOR_PAUSE):
            for key, _ in self.ctx.storage.scan(
                IDX, prefix=idx_prefix(wfe.name, status), keys_only=True
            ):
                iid = idx_iid(key)
                if self.node is not None and not self.node.owns(wfe.ik(iid)):
                    continue  # another node's: its owner (or an adopter) resumes it
                try:
                    actor = self.actor(wfe, iid)
                except InstanceNotFound:
                    continue
                except RecordFormatError as e:
                    # A damaged record: that instance stays where it is (its calls
                    # raise the same error); the others of the workflow resume.
                    log.error(
                        "workflow %r, instance %r: %s",
                        wfe.name,
                        iid,
                        e,
                        extra={"workflow": wfe.name, "instance": iid},
                    )
                    continue
                if actor.running() or actor.woken:
                    continue
                actor.woken = True
                self.wakes.append((actor, "recover"))
                n += 1
        self.pump()
        return n

    # -- multi-node ------------------------------------------------------------------

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

    def adopted(self, items: list[tuple[bytes, str]]) -> None:
        """This node took over ``(instance key, status)`` pairs (any thread)."""
        try:
            self.ctx.loop.call_soon_threadsafe(self._adopted, items)
        except RuntimeError:
            pass  # the loop is closed

    def _adopted(self, items: list[tuple[bytes, str]]) -> None:
        if self.closing:
            return
        rescan: set[str] = set()
        for ik, status in items:
            self.release_foreign(ik)
            wf, iid = split_ikey(ik)
            wfe = self.engines.get(wf)
            if wfe is None:
                continue  # resumed by recover() when the workflow is registered
            old = self.live.get(ik)
            if old is not None and not old.busy and not old.running() and not old.woken:
                self.evict(old)  # made before the takeover: reload it
            if status in ACTIVE:
                try:
                    actor = self.actor(wfe, iid)
                except InstanceNotFound:
                    continue
                if not actor.owned:  # made before the takeover and busy: try again
                    self.ctx.loop.call_soon(self._adopted, [(ik, status)])
                elif not actor.running() and not actor.woken:
                    actor.woken = True
                    self.wakes.append((actor, "recover"))
            elif status == Status.QUEUED:
                rescan.add(wf)
        for wf in rescan:
            self.engines[wf].router.rescan()
        self.ctx.timers.kick()
        self.pump()
