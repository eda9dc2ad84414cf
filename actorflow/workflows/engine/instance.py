"""The workflow instance as a Durable Object: one actor per live instance.

An :class:`InstanceActor` is a :class:`~actorflow.core.actors.PooledActor` on the
engine loop. Control operations (start, pause, resume, terminate, restart,
events, timers) are messages to it and are handled one at a time; the run
itself (:class:`~actorflow.workflows.engine.execution.Execution`) is a task on the
same loop, so it interleaves with them only at its awaits, as Cloudflare's
Durable Objects interleave requests. The actor is evicted as soon as it is
neither running nor handling a message: waiting and paused instances cost
storage only.

Every write guards the instance's epoch (its fencing token). Terminate,
restart, crash restarts and recovery move the epoch, so writes of a stale
run can never land.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from actorflow.cluster.lease import OWNER, disown_ops, lease_lost
from actorflow.core.actors import PooledActor
from actorflow.core.errors import ActorflowError, InvalidInstanceState, StorageError
from actorflow.core.storage import ConflictError, WriteBatch
from actorflow.core.timers import TimerService
from actorflow.workflows.definition import (
    ACTIVE,
    FINISHED,
    STARTABLE,
    UNFINISHED,
    Status,
    instance_not_found,
)
from actorflow.workflows.engine.execution import Execution
from actorflow.workflows.engine.messages import (
    Delete,
    Event,
    Fail,
    InstanceMessage,
    Pause,
    Restart,
    Resume,
    Start,
    StopRun,
    Terminate,
    Timer,
)
from actorflow.workflows.records import (
    EVENTS,
    FENCE,
    HIST,
    IDX,
    INST,
    PRIO_WAKE,
    STEPS,
    WAKE_KIND,
    StatusMove,
    StepCheckpoint,
    delete_instance_ops,
    dump,
    epoch_bytes,
    event_key,
    events_prefix,
    exists_guard,
    hist_key,
    idx_key,
    instance_pokes,
    is_poke,
    load,
    load_event,
    load_step,
    new_queue_key,
    poke_target,
    queue_key,
    queue_ops,
    step_key,
    step_timers,
    steps_prefix,
)

if TYPE_CHECKING:
    from actorflow.cluster.lease import NodeLease
    from actorflow.workflows.engine.context import WorkflowEngine

__all__ = ["HANDLERS", "InstanceActor"]

log = logging.getLogger("actorflow.engine")


class InstanceActor(PooledActor):
    """The live object of one workflow instance."""

    def __init__(self, wfe: WorkflowEngine, iid: str, rk: bytes, record: dict[str, Any]) -> None:
        super().__init__(wfe.ctx.loop_executor)
        self.wfe = wfe
        self.ctx = wfe.ctx
        self.iid = iid
        self.ik = wfe.ik(iid)  # names the instance: live actors, timers, owners
        self.rk = rk  # keys its records (see actorflow.engine.records)
        # An InstanceRecord; typed as a plain dict while the status readers
        # outside the engine (handles, observe) still read it as one.
        self.record = record
        self.epoch: int = record["epoch"]
        self.exec: Execution | None = None
        self.woken = False
        self.activating = False  # started, its run not yet past its first suspension
        self.key_slots = 0  # slots held against its flow-control key (see Slots)
        self.busy = 0
        self.crashes: list[float] = []
        self.storage_faults = 0  # commits refused by storage since the last one landed
        # Queue entries deleted and written by the batches being committed.
        self.dequeued: list[bytes] = []
        self.enqueued: list[bytes] = []
        self.start_after: str | None = None  # a start that waits for the run to unwind
        # Multi-node (see actorflow.lease): whether this node owns the instance,
        # and the event keys the current run was handed (so none is handed twice).
        self.owned = True
        self.owner: str | None = None
        self.seen_events: set[bytes] = set()
        self.deleted = False  # its records are gone: it only refuses what still comes

    @property
    def where(self) -> str:
        """Names the instance in messages (made when needed: most activations need none)."""
        return f"workflow {self.wfe.name!r}, instance {self.iid!r}"

    # -- message plumbing -------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        """Hands ``message`` to the handler of its class (see :data:`HANDLERS`)."""
        if self.deleted:
            return self._after_delete(message)
        handler = HANDLERS.get(type(message))
        if handler is None:
            raise ActorflowError(
                f"{self.where}: unknown message {message!r}; the instance actor handles "
                + ", ".join(sorted(t.__name__ for t in HANDLERS)),
                workflow=self.wfe.name,
                instance=self.iid,
            )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: %r",
                self.where,
                message,
                extra={"workflow": self.wfe.name, "instance": self.iid},
            )
        return handler(self, message)

    def _after_delete(self, message: Any) -> None:
        """A message that reached the actor after its instance was deleted."""
        if isinstance(message, Start):
            self.ctx.supervisor.slots.released(self)
        elif isinstance(message, Timer):
            self.ctx.timers.done(message.key)
        elif not isinstance(message, StopRun):
            raise instance_not_found(self.wfe.name, self.iid)

    def _handle_receive(self, message: Any) -> Any:
        self.busy += 1
        try:
            result = super()._handle_receive(message)
        except BaseException:
            self.busy -= 1
            self.maybe_evict()
            raise
        if inspect.isawaitable(result):
            return self._settle(result)
        self.busy -= 1
        self.maybe_evict()
        return result

    async def _settle(self, awaitable: Any) -> Any:
        try:
            return await awaitable
        finally:
            self.busy -= 1
            self.maybe_evict()

    def reload_record(self) -> None:
        """Goes back to the durable record, after a write that built a newer one failed.

        ``status_ops`` updates the record as it builds a batch; if the batch is
        refused, status reads must not show what never became durable.
        """
        raw = self.ctx.storage.get(INST, self.rk)
        if raw is not None:
            self.record = load(raw)
        self.dequeued.clear()
        self.enqueued.clear()

    def running(self) -> bool:
        return self.exec is not None and not self.exec.finished

    def maybe_evict(self) -> None:
        """Leaves memory once idle: no run, no pending wake, no message."""
        if not self.busy and not self.running() and not self.woken:
            self.ctx.supervisor.table.evict(self)

    # -- status and writes --------------------------------------------------------

    def live_run(self) -> Execution | None:
        """The run, if it is going on: not finished, and not unwinding after hibernating.

        A suspended run has written its "waiting"/"paused" status and only
        unwinds; events, timers and pauses must treat the instance as
        hibernated, or what they bring is lost with the run.
        """
        ex = self.exec
        if ex is None or ex.finished or ex.suspended:
            return None
        return ex

    def live_view(self) -> tuple[str, dict[str, Any]] | None:
        """The status users see and its record, from memory; None when storage must say.

        None once the actor stopped, and while the run's final write is in
        flight: a reader woken by that commit (a subscriber, a node that
        polls) must not then be told that the run is still going.
        """
        if self.actor_stopped.is_set():
            return None
        ex = self.exec
        if ex is not None and ex.ending and not ex.finished:
            return None
        return self.public_status(), self.record

    def public_status(self) -> str:
        """The status as users see it, including in-memory states."""
        ex = self.live_run()
        if ex is not None:
            if ex.pause_requested:
                return Status.WAITING_FOR_PAUSE
            return Status.RUNNING
        if self.woken and self.record["s"] in STARTABLE:
            # Woken (a timer, a crash restart, recovery) and waiting for a slot.
            return Status.QUEUED
        status: str = self.record["s"]
        return status

    def fenced(self) -> bool:
        """True if another node took this instance over (multi-node only; one read).

        A run about to start checks it, so that a node that was frozen and has
        not yet found its lease gone starts no run that could never commit.
        """
        return self.ctx.supervisor.node is not None and self.ctx.storage.get(
            FENCE, self.rk
        ) != epoch_bytes(self.epoch)

    def fence_guard(self) -> tuple[str, bytes, bytes]:
        return (FENCE, self.rk, epoch_bytes(self.epoch))

    def status_ops(
        self,
        batch: WriteBatch,
        status: str,
        *,
        hist: str | None = None,
        hist_data: dict[str, Any] | None = None,
        hist_ts: int | None = None,
        **fields: Any,
    ) -> None:
        """Adds a status change (record, index, queue entry, history) to ``batch``."""
        rec = self.record
        new = dict(rec, s=status, **fields)
        old_qk = rec.get("qk")
        new_qk = fields.get("qk", old_qk if status == Status.QUEUED else None)
        if old_qk and old_qk != new_qk:
            queue_ops(batch, self.wfe.name, old_qk, self.iid, rec.get("ky"), put=False)
            self.dequeued.append(old_qk)
        if new_qk and new_qk != old_qk:
            queue_ops(batch, self.wfe.name, new_qk, self.iid, rec.get("ky"), put=True)
            self.enqueued.append(new_qk)
        new["qk"] = new_qk
        batch.put(INST, self.rk, dump(new))
        if status != rec["s"]:
            batch.delete(IDX, idx_key(self.wfe.name, rec["s"], rec["created"], self.iid))
            batch.put(IDX, idx_key(self.wfe.name, status, rec["created"], self.iid), b"")
            batch.note(StatusMove(self.wfe.name, rec["s"], status))
        if hist:
            self.add_history(batch, hist, hist_data, hist_ts)
        self.record = new

    def add_history(
        self,
        batch: WriteBatch,
        kind: str,
        data: dict[str, Any] | None = None,
        ts: int | None = None,
    ) -> None:
        ev = {"type": kind, "ts": self.ctx.now_ms() if ts is None else ts, "data": data or {}}
        batch.put(HIST, hist_key(self.rk, self.ctx.next_seq()), dump(ev))

    def _active(self) -> bool:
        """True if the record already says this run is active (nothing to activate)."""
        rec = self.record
        return rec["s"] == Status.RUNNING or (
            rec["s"] == Status.WAITING_FOR_PAUSE and rec.get("started") is not None
        )

    def activation_ops(self, batch: WriteBatch) -> None:
        """On the first write of a run, records that the instance is running.

        A pending pause ("waitingForPause") stays as it is: the run pauses at
        its next step boundary, and a crash meanwhile must not forget it.
        """
        rec = self.record
        if self._active():
            return
        pausing = rec["s"] == Status.WAITING_FOR_PAUSE
        first = rec.get("started") is None
        t0 = self.exec.t_start if self.exec is not None else self.ctx.now_ms()
        self.status_ops(
            batch,
            Status.WAITING_FOR_PAUSE if pausing else Status.RUNNING,
            hist="WORKFLOW_START" if first else None,
            hist_ts=t0,
            started=rec.get("started") or t0,
            waits=[],
        )

    def end_ops(
        self,
        batch: WriteBatch,
        status: str,
        t0: int,
        *,
        hist: str,
        hist_data: dict[str, Any] | None = None,
        **fields: Any,
    ) -> None:
        """Adds a run's final status to ``batch``, after what :meth:`activation_ops` would add.

        One record and one index move instead of two: a woken instance that
        ends at once goes from "waiting" to "complete" in its only write.
        """
        rec = self.record
        if not self._active():
            if rec.get("started") is None:
                self.add_history(batch, "WORKFLOW_START", ts=t0)
            fields = {"started": rec.get("started") or t0, "waits": [], **fields}
        self.status_ops(batch, status, hist=hist, hist_data=hist_data, **fields)

    async def commit(self, batch: WriteBatch, new_epoch: bool = False) -> None:
        """Writes ``batch`` guarded by the current epoch (moving it if asked)."""
        batch.guard(*self.fence_guard())
        if new_epoch:
            batch.put(FENCE, self.rk, epoch_bytes(self.epoch + 1))
            self.record["epoch"] = self.epoch + 1
            batch.put(INST, self.rk, dump(self.record))
        try:
            await self.ctx.write(batch)
        except ConflictError:
            self.reload_record()
            node = self.ctx.supervisor.node
            if node is None:
                raise
            # The epoch moved under this actor: another node took the instance over.
            self.owned = False
            raise self._moved(node) from None
        self.committed()
        if new_epoch:
            self.epoch += 1

    def committed(self) -> None:
        """A batch built by :meth:`status_ops` is durable: tells the router what changed."""
        self.storage_faults = 0
        if self.dequeued:
            for key in self.dequeued:
                self.wfe.router.dequeued(key)
            self.dequeued.clear()
        if self.enqueued:
            for key in self.enqueued:
                self.wfe.router.enqueued(key)
            self.enqueued.clear()

    def _stored_steps(self) -> dict[bytes, StepCheckpoint]:
        if self.exec is not None:
            return self.exec.steps
        return {
            k: load_step(v) for k, v in self.ctx.storage.scan(STEPS, prefix=steps_prefix(self.rk))
        }

    def _disarm_steps(self, batch: WriteBatch, steps: dict[bytes, StepCheckpoint]) -> list[bytes]:
        keys = step_timers(steps.values())
        for tk in keys:
            TimerService.disarm(batch, tk)
        return keys

    # -- lifecycle messages ---------------------------------------------------------

    async def handle_start(self, msg: Start) -> None:
        """The supervisor gave this instance a slot."""
        reason = msg.reason
        self.woken = False
        if self.owned and self.fenced():
            self.owned = False  # another node took it over since this actor was made
        if not self.owned:  # another node owns it (a stale queue entry or wake-up)
            self.ctx.supervisor.slots.released(self)
            return
        old = self.exec
        if old is not None and not old.finished and old.suspended:
            # Woken while the previous run unwinds from hibernating (a sync run's
            # thread leaves ``run`` at its own pace): give the slot back and start
            # as a wake-up once it has ended (see execution_ended).
            self.start_after = reason
            self.woken = True  # stays in memory until then
            self.ctx.supervisor.slots.released(self)
            return
        if reason == "crash" and not self.running():
            # The write that failed may have left the record ahead of storage
            # (a "complete" never written): restart from what is durable.
            self.reload_record()
        status = self.record["s"]
        if self.running() or status not in UNFINISHED:
            self.ctx.supervisor.slots.released(self)
            return
        if status == Status.WAITING_FOR_PAUSE:  # recovered mid-pause: the pause takes effect now
            batch = WriteBatch()
            keys = self._disarm_steps(batch, self._stored_steps())
            self.status_ops(batch, Status.PAUSED, hist="WORKFLOW_PAUSED")
            try:
                await self.commit(batch, new_epoch=True)
            finally:
                self.ctx.supervisor.slots.released(self)
            self.ctx.timers_done(keys)
            return
        if reason in ("recover", "crash"):
            batch = WriteBatch()
            self.add_history(batch, "INSTANCE_RECOVERED", {"reason": reason})
            try:
                await self.commit(batch, new_epoch=True)
            except BaseException as e:
                self.ctx.supervisor.slots.released(self)
                if isinstance(e, StorageError) and not isinstance(e, ConflictError):
                    # Storage refused the write (a full disk): tried again with
                    # backoff while the fault lasts (see Restarts.crashed).
                    self.record["epoch"] = self.epoch
                    self.ctx.supervisor.restarts.crashed(self, e)
                    return
                raise
        self.begin()

    def can_begin(self, reason: str) -> bool:
        """True if a start needs nothing but a new run: no write, no message, no wait.

        The supervisor then calls :meth:`begin` directly instead of sending
        "start" (a message, a slice and a task per wake-up). Only while the
        actor is quiet: a start sent as a message would be handled at once too.
        """
        ex = self.exec
        return (
            not self.busy
            and not self.deleted
            and self.quiet()
            and self.owned
            and self.ctx.supervisor.node is None
            and reason not in ("recover", "crash")
            and (ex is None or ex.finished)
            and self.record["s"] in STARTABLE
        )

    def begin(
        self,
        preloaded: tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]] | None = None,
        settle: bool = True,
    ) -> Execution:
        """Starts a new run (engine loop only); see :class:`Execution` for ``preloaded``.

        With ``settle`` false, the caller tells the supervisor when the run
        has reached its first wait (see ``Slots.settled``).
        """
        self.woken = False
        ex = self.exec = Execution(self, preloaded)
        if ex.inbox:
            self.seen_events = {k for q in ex.inbox.values() for k, _, _ in q}
        elif self.seen_events:
            self.seen_events = set()
        ex.launch(settle)
        return ex

    def execution_ended(self, ex: Execution, outcome: str, value: Any) -> None:
        """Called by the run's task when ``run`` returned, raised or was unwound."""
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: run ended: %s",
                self.where,
                outcome,
                extra={"workflow": self.wfe.name, "instance": self.iid, "outcome": outcome},
            )
        if ex.slot:
            ex.slot = False
            self.ctx.supervisor.slots.released(self)
        if ex is not self.exec:
            return
        if self.start_after is not None:
            reason, self.start_after = self.start_after, None
            self.ctx.supervisor.slots.wake(self, reason)
            return
        if outcome == "crashed":
            self.ctx.supervisor.restarts.crashed(self, value)
        elif outcome in (Status.COMPLETE, Status.ERRORED, Status.TERMINATED):
            self.ctx.supervisor.watchers.finished(self.ik)
        self.maybe_evict()

    async def handle_fail(self, msg: Fail) -> None:
        """The supervisor gave up restarting: the instance is errored."""
        message = msg.message
        batch = WriteBatch()
        keys = self._disarm_steps(batch, self._stored_steps())
        err = {"name": "EngineFault", "message": message}
        self.status_ops(
            batch,
            Status.ERRORED,
            error=err,
            hist="WORKFLOW_FAILURE",
            hist_data={"error": err},
            **self._rollback_cut(err),
        )
        try:
            await self.commit(batch, new_epoch=True)
        except StorageError as e:
            if isinstance(e, ConflictError):
                raise
            # Not even "errored" can be written (a full disk): the instance
            # keeps its last durable status, and the write is tried again.
            self.reload_record()
            self._fail_later(message)
            return
        self.ctx.timers_done(keys)
        self.ctx.supervisor.watchers.finished(self.ik)

    def _fail_later(self, message: str, delay: float = 1.0) -> None:
        sup = self.ctx.supervisor
        sup.restarts.pending += 1  # pending work: the runtime is not idle meanwhile

        def again() -> None:
            sup.restarts.pending -= 1
            if not sup.slots.closing:
                sup.table.actor(self.wfe, self.iid).actor_ref.tell(Fail(message))

        self.ctx.loop.call_later(delay, again)

    async def handle_pause(self, msg: Pause) -> None:
        await self.take_over()
        status = self.public_status()
        if status in FINISHED:
            raise InvalidInstanceState(
                f"{self.where}: cannot pause an instance that is {status}",
                workflow=self.wfe.name,
                instance=self.iid,
            )
        if status in (Status.PAUSED, Status.WAITING_FOR_PAUSE):
            return
        ex = self.live_run()
        if ex is not None:
            if ex.ending:
                return  # run() returned: its end is being written; nothing to pause
            if not ex.request_pause():
                batch = WriteBatch()
                self.status_ops(batch, Status.WAITING_FOR_PAUSE)
                await self.commit(batch)
            return
        batch = WriteBatch()
        keys = self._disarm_steps(batch, self._stored_steps())
        self.woken = False
        self.status_ops(batch, Status.PAUSED, hist="WORKFLOW_PAUSED")
        await self.commit(batch)
        self.ctx.timers_done(keys)

    async def handle_resume(self, msg: Resume) -> None:
        await self.take_over()
        status = self.public_status()  # a run whose end is being written is still running
        if status == Status.TERMINATED:
            # Cloudflare: a terminated instance "cannot be resumed". On complete or
            # errored, as on any other status, resume has no effect (its docs).
            raise InvalidInstanceState(
                f"(instance.cannot_resume) {self.where}: cannot resume an instance that is "
                f"{status}",
                workflow=self.wfe.name,
                instance=self.iid,
            )
        ex = self.live_run()
        if status == Status.WAITING_FOR_PAUSE:
            if ex is not None:
                ex.cancel_pause()
                if ex.ending:
                    return  # run() returned: its end is being written
            batch = WriteBatch()
            self.status_ops(batch, Status.RUNNING, hist="WORKFLOW_RESUMED")
            await self.commit(batch)
        elif status == Status.PAUSED:
            batch = WriteBatch()
            self.status_ops(
                batch,
                Status.QUEUED,
                hist="WORKFLOW_RESUMED",
                qk=queue_key(PRIO_WAKE, self.ctx.next_seq()),
            )
            await self.commit(batch)
            self.wfe.router.note_wake()
            self.ctx.supervisor.slots.kick()

    async def handle_terminate(self, msg: Terminate) -> None:
        await self.take_over()
        await self._let_end()
        status = self.public_status()
        if status in FINISHED:
            raise InvalidInstanceState(
                f"(instance.cannot_terminate) {self.where}: cannot terminate an instance that is "
                f"{status}",
                workflow=self.wfe.name,
                instance=self.iid,
            )
        rb = self.record.get("rb")
        if msg.rollback and rb is not None and rb["o"] == "running":
            raise InvalidInstanceState(
                f"{self.where}: its rollbacks are running already; terminate() without "
                "rollback stops them",
                workflow=self.wfe.name,
                instance=self.iid,
            )
        batch = WriteBatch()
        keys = self._disarm_steps(batch, self._stored_steps())
        self.woken = False
        self.start_after = None
        if msg.rollback:
            await self._terminate_with_rollback(batch, keys)
            return
        self.status_ops(
            batch,
            Status.TERMINATED,
            hist="WORKFLOW_TERMINATED",
            hist_data={"trigger": {"source": "api"}},
            **self._rollback_cut({"name": "Terminated", "message": "terminated during rollback"}),
        )
        await self.commit(batch, new_epoch=True)
        self.ctx.timers_done(keys)
        if self.exec is not None:
            self.exec.stop()
        self.ctx.supervisor.watchers.finished(self.ik)

    async def _terminate_with_rollback(self, batch: WriteBatch, keys: list[bytes]) -> None:
        """``terminate(rollback=True)``: the run stops, and a new one runs the rollbacks.

        The new run replays ``run`` up to its first step not done (the
        handlers of the steps done are then registered again), runs them as
        after a failure, and writes "terminated". Until then the instance is
        queued or running, with ``rb`` saying so: a crash meanwhile resumes
        the termination, not the workflow.
        """
        self.status_ops(
            batch,
            Status.QUEUED,
            qk=queue_key(PRIO_WAKE, self.ctx.next_seq()),
            rb={"o": "running", "ed": None, "t": True},
            waits=[],
        )
        await self.commit(batch, new_epoch=True)
        self.ctx.timers_done(keys)
        if self.exec is not None:
            self.exec.stop()
            self.exec = None  # the run that rolls back starts from the queue
        self.wfe.router.note_wake()
        self.ctx.supervisor.slots.kick()

    def _rollback_cut(self, why: dict[str, str]) -> dict[str, Any]:
        """The ``rb`` of an instance ended while its rollbacks ran (they will not go on)."""
        rb = self.record.get("rb")
        if rb is None or rb["o"] != "running":
            return {}
        if rb.get("go"):
            return {"rb": {"o": "failed", "ed": why}}
        return {"rb": None}  # asked for, not begun

    async def handle_restart(self, msg: Restart) -> None:
        from_step = msg.from_step
        await self.take_over()
        await self._let_end()
        steps = self._stored_steps()
        batch = WriteBatch()
        if from_step is not None:
            target = steps.get(step_key(self.rk, "do", from_step, 1))
            if target is None:
                raise InvalidInstanceState(
                    f"(instance.cannot_restart) {self.where}: step {from_step!r} not found in "
                    "execution history",
                    workflow=self.wfe.name,
                    instance=self.iid,
                    step=from_step,
                )
            drop = {k: r for k, r in steps.items() if r["seq"] >= target["seq"]}
            for k in drop:
                batch.delete(STEPS, k)
        else:
            drop = steps
            batch.delete_prefix(STEPS, steps_prefix(self.rk))
        keys = self._disarm_steps(batch, drop)
        batch.delete_prefix(EVENTS, events_prefix(self.rk))
        self.woken = False
        self.start_after = None
        self.status_ops(
            batch,
            Status.QUEUED,
            hist="WORKFLOW_RESTARTED",
            hist_data={"from_step": from_step} if from_step else None,
            qk=new_queue_key(self.ctx.next_seq(), self.record.get("pr", 0), self.record.get("ky")),
            started=None,
            output=None,
            error=None,
            waits=[],
            rb=None,
        )
        await self.commit(batch, new_epoch=True)
        self.ctx.timers_done(keys)
        if self.exec is not None:
            self.exec.stop()
            self.exec = None  # the new run starts from the queue
        self.ctx.supervisor.slots.kick()

    async def handle_delete(self, msg: Delete) -> None:
        """Stops the run (no rollbacks) and removes every record, in one guarded write.

        The write is guarded on the epoch and removes the fence itself, so
        anything the stopped run (or a node that ran it before) still tries
        to write is refused: nothing of the instance can be left behind.
        """
        await self.take_over()
        await self._let_end()
        storage = self.ctx.storage
        timers = step_timers(self._stored_steps().values())
        node = self.ctx.supervisor.node
        if node is not None:
            # Other nodes' pokes (multi-node only) are due when they are armed:
            # only the head of the timer index is read. One armed by a node
            # whose clock runs ahead is removed when it fires (TimerDelivery).
            timers += instance_pokes(storage, self.ik, self.ctx.now_ms() + 1_000)
        batch = WriteBatch()
        delete_instance_ops(batch, self.wfe.name, self.iid, self.rk, self.record, timers)
        qk = self.record.get("qk")
        if qk:
            self.dequeued.append(qk)
        if node is not None:
            disown_ops(batch, self.ik, self.owner)
        await self.commit(batch)
        self.deleted = True
        self.woken = False
        self.start_after = None
        self.ctx.timers_done(timers)
        self.ctx.modifiers.pop(self.ik, None)
        if self.exec is not None:
            self.exec.stop()
            self.exec = None
        self.ctx.supervisor.forget(self)
        log.info(
            "%s: deleted",
            self.where,
            extra={"workflow": self.wfe.name, "instance": self.iid},
        )

    async def _let_end(self) -> None:
        """Waits for a run whose end is being written (run returned) to finish.

        Its final status is about to land or to fail; a control call built
        on the record before that would be built on the wrong status.
        """
        ex = self.exec
        if ex is not None and ex.ending and not ex.finished and ex.task is not None:
            await asyncio.wait([ex.task])

    async def handle_event(self, msg: Event) -> None:
        event_type, data, ts = msg.type, msg.data, msg.ts
        status = self.public_status()
        if status in FINISHED:
            raise InvalidInstanceState(
                f"{self.where}: cannot send event {event_type!r} to an instance that is {status}",
                workflow=self.wfe.name,
                instance=self.iid,
            )
        ekey = event_key(self.rk, event_type, self.ctx.next_seq())
        batch = WriteBatch()
        batch.put(EVENTS, ekey, dump({"type": event_type, "p": data, "ts": ts}))
        if not self.owned:
            # Another node runs it: store the event and poke the owner, whose
            # timer thread reads the poke and hands the event to its run. Not
            # guarded on the epoch (the owner moves it), but on the instance
            # still existing: an event for a deleted instance is refused.
            exists_guard(batch, self.ik, self.rk)
            TimerService.arm(batch, self.ctx.now_ms(), WAKE_KIND, poke_target(self.ik))
            try:
                await self.ctx.write(batch)
            except ConflictError:
                raise instance_not_found(self.wfe.name, self.iid) from None
            return
        wake = self.live_run() is None and self._wants(event_type)
        if wake:
            # Woken, it waits for a slot like a resumed instance: "queued" (served first).
            self.status_ops(batch, Status.QUEUED, qk=queue_key(PRIO_WAKE, self.ctx.next_seq()))
        await self.commit(batch)
        ex = self.live_run()  # the run may have hibernated while the event was being written
        if ex is not None:
            self.seen_events.add(ekey)
            ex.on_event(event_type, ekey, data, ts)
        elif wake:
            self.wfe.router.note_wake()
            self.ctx.supervisor.slots.kick()
        elif self._wants(event_type):
            self.ctx.supervisor.slots.wake(self)

    def _wants(self, event_type: str) -> bool:
        """True if the instance hibernated waiting for this type and nothing woke it yet."""
        return (
            not self.woken
            and self.record["s"] == Status.WAITING
            and event_type in self.record.get("waits", ())
        )

    async def handle_timer(self, msg: Timer) -> None:
        key = msg.key
        if not self.owned:
            self.ctx.timers.done(key)  # offered again, the supervisor holds it for its owner
            return
        if is_poke(key):
            await self._poked(key)
            return
        ex = self.live_run()
        if ex is not None:
            # A live run consumes its deadlines itself: the step that wakes
            # removes the timer in its own write. If no waiter is due yet (the
            # replay has not reached the step, or the run is hibernating right
            # now), leave the timer armed; it is offered again on a later pass.
            # A suspended run is handled below, like a hibernated instance:
            # handle_start lets it finish unwinding before the next run starts.
            if not ex.on_timer():
                self.ctx.timers.done(key)
            return
        if self.woken:
            return
        if self.record["s"] == Status.WAITING:
            self.ctx.supervisor.slots.wake(self)
            return
        # Queued, paused, finished: nobody needs it now (a replay re-arms what it waits on).
        batch = WriteBatch()
        TimerService.disarm(batch, key)
        try:
            await self.ctx.write(batch)
        finally:
            self.ctx.timers.done(key)

    async def _poked(self, key: bytes) -> None:
        """Another node stored events for this instance: hand them to the run, or wake it."""
        stored = self.ctx.storage.scan(EVENTS, prefix=events_prefix(self.rk))
        ex = self.live_run()
        if ex is not None:
            for ekey, raw in stored:
                if ekey not in self.seen_events:
                    self.seen_events.add(ekey)
                    ev = load_event(raw)
                    ex.on_event(ev["type"], ekey, ev["p"], ev["ts"])
        batch = WriteBatch()
        TimerService.disarm(batch, key)
        wake = (
            ex is None
            and not self.woken
            and self.record["s"] == Status.WAITING
            and bool(
                {load_event(raw)["type"] for _, raw in stored} & set(self.record.get("waits", ()))
            )
        )
        if wake:
            # Woken durably, in the write that consumes the poke, as by an event
            # sent through this node: a node that adopts it later sees it queued.
            self.status_ops(batch, Status.QUEUED, qk=queue_key(PRIO_WAKE, self.ctx.next_seq()))
        try:
            await self.commit(batch)
        finally:
            self.ctx.timers.done(key)
        if wake:
            self.wfe.router.note_wake()
            self.ctx.supervisor.slots.kick()

    def _moved(self, node: NodeLease) -> ActorflowError:
        """The error of a write refused because the instance's epoch moved (multi-node)."""
        if not node.confirm_live():
            return lease_lost(node.node_id, self.where)
        return InvalidInstanceState(
            f"{self.where}: it moved to another node meanwhile; try again",
            workflow=self.wfe.name,
            instance=self.iid,
        )

    async def take_over(self) -> None:
        """Makes this node the owner (a control call through a node that does not own it).

        Moves the epoch, so the previous owner's run can no longer commit, and
        resumes here what was running there.
        """
        node = self.ctx.supervisor.node
        if self.owned or node is None:
            return
        raw = self.ctx.storage.get(INST, self.rk)
        if raw is None:
            raise InvalidInstanceState(
                f"{self.where}: it moved to another node meanwhile; try again",
                workflow=self.wfe.name,
                instance=self.iid,
            )
        stored = load(raw)
        if stored["epoch"] != self.epoch:
            # This actor is older than the instance's last move (another node took
            # it over or adopted it since): a run it began then must write nothing.
            ex = self.exec
            if ex is not None and not ex.finished:
                ex.stop()
            self.epoch = stored["epoch"]
        # Read after the record: a move in between fails the guards below.
        owner = node.owner_of(self.ik)
        self.record = stored  # its owner may have moved it on since this actor was made
        if owner != node.node_id:  # else this node adopted it meanwhile: nothing to write
            new = self.epoch + 1
            rec = dict(stored, epoch=new)
            batch = WriteBatch()
            batch.guard(*self.fence_guard())
            batch.guard(INST, self.rk, raw)
            batch.guard(OWNER, self.ik, owner.encode() if owner is not None else None)
            batch.put(FENCE, self.rk, epoch_bytes(new))
            batch.put(INST, self.rk, dump(rec))
            node.claim(batch, self.ik, owner)
            try:
                await self.ctx.write(batch)
            except ConflictError:
                raise self._moved(node) from None
            self.record, self.epoch = rec, new
        self.owned, self.owner = True, node.node_id
        sup = self.ctx.supervisor
        sup.delivery.release_foreign(self.ik)
        status = self.record["s"]
        if status in ACTIVE and not self.woken:
            if self.running():
                # A run stopped above still unwinds: recovered once it has ended.
                self.start_after, self.woken = "recover", True
            else:
                sup.slots.wake(self, "recover")
        elif status == Status.QUEUED:
            self.wfe.router.rescan()
            sup.slots.kick()

    def handle_stop_run(self, msg: StopRun) -> None:
        self.stop_run()

    def stop_run(self) -> None:
        """Shutdown: stop the run without writing anything."""
        if self.exec is not None:
            self.exec.stop()


#: The handler of each message class (see ``InstanceActor.on_receive``).
HANDLERS: Mapping[type[InstanceMessage], Callable[[InstanceActor, Any], Any]] = MappingProxyType(
    {
        Start: InstanceActor.handle_start,
        Pause: InstanceActor.handle_pause,
        Resume: InstanceActor.handle_resume,
        Terminate: InstanceActor.handle_terminate,
        Delete: InstanceActor.handle_delete,
        Restart: InstanceActor.handle_restart,
        Event: InstanceActor.handle_event,
        Timer: InstanceActor.handle_timer,
        Fail: InstanceActor.handle_fail,
        StopRun: InstanceActor.handle_stop_run,
    }
)
