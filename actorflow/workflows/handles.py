"""The user's handles: a :class:`WorkflowBinding` and its :class:`Instance` s."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import threading
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any

from actorflow.cluster.lease import lease_lost
from actorflow.core.errors import (
    ActorflowError,
    InstanceAlreadyExists,
    InstanceNotFound,
    InvalidInstanceState,
    LimitExceeded,
    SerializationError,
)
from actorflow.core.greenlets import offloaded
from actorflow.core.storage import ConflictError, WriteBatch
from actorflow.workflows.definition import (
    FINISHED,
    STATUSES,
    InstanceStatus,
    instance_not_found,
    validate_event_type,
    validate_flow,
    validate_instance_id,
)
from actorflow.workflows.engine.context import WorkflowEngine
from actorflow.workflows.engine.creation import (
    SLICE,
    Countdown,
    RandomIds,
    RecordNumbers,
    new_instance_batch,
)
from actorflow.workflows.engine.forking import fork_instance_batch, plan_fork
from actorflow.workflows.engine.messages import (
    Delete,
    Event,
    InstanceMessage,
    Pause,
    Restart,
    Resume,
    Terminate,
)
from actorflow.workflows.engine.modifiers import CRASH_POINTS, Modifiers
from actorflow.workflows.history import HistoryEvent, StepRecord, read_history, read_steps
from actorflow.workflows.matching import PATCH_KIND
from actorflow.workflows.query import InstanceDescription, Query
from actorflow.workflows.records import (
    INST,
    STEPS,
    load,
    new_queue_key,
    step_key,
    steps_prefix,
)
from actorflow.workflows.subscribe import Subscription
from actorflow.workflows.supervisor import Supervisor

__all__ = ["MAX_DELETE_BATCH", "Instance", "WorkflowBinding", "WorkflowModifier"]

#: The most ids one ``delete_batch`` takes (Cloudflare's batch size).
MAX_DELETE_BATCH = 100


class Instance:
    """A handle on one workflow instance. Cheap to make; holds no resources."""

    def __init__(
        self, binding: WorkflowBinding, instance_id: str, record_key: bytes | None = None
    ) -> None:
        self._b = binding
        self._p = binding.parts
        self.id = instance_id
        self._rkey = record_key

    def __repr__(self) -> str:
        return f"<Instance {self._b.name}/{self.id}>"

    @property
    def parts(self) -> BindingParts:
        """Its workflow's engine-side parts (:class:`BindingParts`): not user API."""
        return self._p

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Instance) and (other._b.name, other.id) == (self._b.name, self.id)

    def __hash__(self) -> int:
        return hash((self._b.name, self.id))

    def _call(self, message: InstanceMessage) -> Any:
        return self._p.call(self.id, message)

    def _rk(self) -> bytes:
        """The key of the instance's records (it never changes, so it is kept)."""
        rk = self._rkey
        if rk is None:
            rk = self._rkey = self._p.record_key(self.id)
        return rk

    def _record(self) -> dict[str, Any]:
        return self._p.record(self.id, self._rk())

    @offloaded
    def status(self) -> InstanceStatus:
        """Returns the status, the output (when complete) and the error (when errored)."""
        return self._p.query.status(self._b.name, self.id, self._rkey or self._rk())

    @offloaded
    def describe(self) -> InstanceDescription:
        """Returns everything about the instance at a glance (Temporal's ``describe()``).

        Its status, output and error are those :meth:`status` gives; with them
        come its times (created, started, ended), params, the event types it
        waits for, its step counts, its epoch and (multi-node) its owner.

        Raises:
            InstanceNotFound: There is no such instance.
        """
        return self._p.query.describe(self._b.name, self.id, self._rk())

    @offloaded
    def pause(self) -> None:
        """Pauses: at once in a sleep or wait, else after the steps in flight end."""
        self._call(Pause())

    @offloaded
    def resume(self) -> None:
        """Resumes a paused (or pausing) instance; no effect in other statuses but one.

        Raises:
            InvalidInstanceState: It is terminated (a terminated instance cannot
                be resumed; ``restart`` runs it again).
        """
        self._call(Resume())

    @offloaded
    def terminate(self, *, rollback: bool = False) -> None:
        """Ends the instance for good. Raises InvalidInstanceState if it already ended.

        With ``rollback=True`` the rollback handlers of its completed steps run
        first (see docs/rollbacks.md): this returns once that is durably asked
        for; the instance is ``terminated`` when they have run (``wait()``).

        Raises:
            InvalidInstanceState: It already ended, or (with ``rollback``) its
                rollbacks are running already.
        """
        self._call(Terminate(bool(rollback)))

    @offloaded
    def delete(self) -> None:
        """Removes the instance and every record of it; the id may then be created again.

        A live run is stopped first, without rollbacks (as by ``terminate()``).
        Its steps, events, history, index and queue entries, timers and (on
        several nodes) ownership go in one atomic write: a crash leaves the
        instance either whole or gone. Afterwards ``get(id)`` and every call
        on this handle raise :class:`~actorflow.InstanceNotFound`.

        Raises:
            InstanceNotFound: There is no such instance (or it was deleted already).
        """
        self._call(Delete())

    async def delete_async(self) -> None:
        """:meth:`delete` for asyncio (the call waits in a worker thread)."""
        await asyncio.to_thread(self.delete)

    @offloaded
    def fork(
        self,
        at_step: str | Mapping[str, Any],
        *,
        id: str | None = None,
        params: Any = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Instance:
        """Creates a new instance of the workflow that replays this one up to ``at_step``.

        The fork keeps this instance's completed ``do`` steps, sleeps and
        event waits that started before ``at_step`` (their stored outputs, or
        those in ``overrides``); its run replays them without running their
        bodies, and runs ``at_step`` and every later step anew. It is queued
        like a created instance, in one atomic write (a crash leaves no fork
        or a whole one). This instance is only read, in any status: a running
        one gives the steps durably written so far. Its buffered events are
        not copied. The fork's ``describe().forked_from`` and the data of its
        ``WORKFLOW_QUEUED`` history event name its origin.

        Args:
            at_step: A step name (its first occurrence) or ``{"name": ...,
                "count": n}``; it must be among this instance's steps.
            id: The fork's id (None: a uuid4, as ``create`` makes).
            params: The fork's params (None: this instance's).
            overrides: ``{step name: output}``: the output the first
                occurrence of each (a kept ``do`` step or event wait) returns
                in the fork.

        Raises:
            InvalidInstanceState: ``at_step`` is not one of its steps; a step
                before it failed or has not ended; an override names a step
                that does not exist, is not before ``at_step``, or is a sleep.
            SerializationError: ``params`` or an override cannot be serialized.
            InvalidInstanceId: A malformed ``id``.
            InstanceAlreadyExists: ``id`` exists.
            InstanceNotFound: This instance does not exist.
            RateLimitError: The workflow's queue is full.
        """
        return self._b.fork_of(self, at_step, id=id, params=params, overrides=overrides)

    async def fork_async(
        self,
        at_step: str | Mapping[str, Any],
        *,
        id: str | None = None,
        params: Any = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Instance:
        """:meth:`fork` for asyncio (the call waits in a worker thread)."""
        return await asyncio.to_thread(
            self.fork, at_step, id=id, params=params, overrides=overrides
        )

    @offloaded
    def restart(self, from_step: str | None = None) -> None:
        """Runs the instance again from the start (or from step ``from_step``), same params."""
        self._call(Restart(from_step))

    @offloaded
    def send_event(self, type: str, payload: Any = None) -> None:
        """Delivers an event; buffered until a ``wait_for_event`` of that type takes it."""
        where = f"workflow {self._b.name!r}, instance {self.id!r}: send_event"
        validate_event_type(type, where)
        data = self._p.encode(payload, where)
        self._call(Event(type, data, self._p.ctx.now_ms()))

    @offloaded
    def wait(self, timeout: float | None = None) -> InstanceStatus:
        """Blocks until the instance is complete, errored or terminated; returns its status.

        Raises:
            TimeoutError: It had not finished after ``timeout`` seconds.
        """
        ik = self._p.engine.ik(self.id)
        deadline = None if timeout is None else time.monotonic() + timeout  # real time
        ev = threading.Event()
        self._p.supervisor.watch(ik, ev)
        try:
            while True:
                st = self.status()
                if st.status in FINISHED:
                    return st
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{self!r} is still {st.status} after {timeout} s")
                if ev.wait(0.5 if left is None else min(left, 0.5)):
                    ev = threading.Event()  # the supervisor drops a watcher it has set
                    self._p.supervisor.watch(ik, ev)
        finally:
            self._p.supervisor.unwatch(ik, ev)

    async def status_async(self) -> InstanceStatus:
        """:meth:`status` for asyncio (the read runs in a worker thread)."""
        return await asyncio.to_thread(self.status)

    async def send_event_async(self, type: str, payload: Any = None) -> None:
        """:meth:`send_event` for asyncio: returns once the event is durably buffered."""
        await asyncio.to_thread(self.send_event, type, payload)

    async def wait_async(self, timeout: float | None = None) -> InstanceStatus:
        """:meth:`wait` for asyncio: woken when the instance finishes, no thread held.

        Raises:
            TimeoutError: It had not finished after ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        ik = self._p.engine.ik(self.id)
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            woken: asyncio.Future[None] = loop.create_future()
            waker = _LoopWaker(loop, woken)
            self._p.supervisor.watch(ik, waker)  # before the read: no finish is missed
            try:
                st = await self.status_async()
                if st.status in FINISHED:
                    return st
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise TimeoutError(f"{self!r} is still {st.status} after {timeout} s")
                # Also on a timer: a finish on another node wakes nobody here.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken, 0.5 if left is None else min(left, 0.5))
            finally:
                self._p.supervisor.unwatch(ik, waker)

    @offloaded
    def history(self) -> list[HistoryEvent]:
        """The event log (Cloudflare's event names), oldest first."""
        return read_history(self._p.storage, self._rk(), self._record())

    def subscribe(
        self,
        *,
        cursor: str | None = None,
        types: Iterable[str] | str | None = None,
    ) -> Iterator[HistoryEvent]:
        """Iterates the history, then the live events as they are committed, until the end.

        The iterator gives every event :meth:`history` has, then each new one
        once its write is durable, and ends after the instance is complete,
        errored or terminated (it stops at once when the caller stops
        iterating). Each event carries a ``cursor``: given back, the new
        iterator starts right after that event, with nothing missed or given
        twice, also in another process or after a restart of the runtime.
        Between commits it sleeps; a commit by another process (another node
        on the same data directory) is seen within a second.

        Args:
            cursor: The ``cursor`` of the last event received (None: from the start).
            types: Only events of these types (a name or names, such as
                ``"STEP_SUCCESS"``); the cursors still count the others.

        Raises:
            InstanceNotFound: There is no such instance.
            InvalidCursor: ``cursor`` is malformed or another instance's.
            ValueError: ``types`` names no event type.
        """
        return iter(self._subscription(cursor, types))

    def subscribe_async(
        self,
        *,
        cursor: str | None = None,
        types: Iterable[str] | str | None = None,
    ) -> AsyncIterator[HistoryEvent]:
        """:meth:`subscribe` as an async iterator (``async for e in inst.subscribe_async()``).

        It waits for commits on the event loop and reads storage in a worker
        thread. It checks its arguments at once, as :meth:`subscribe` does.
        """
        return aiter(self._subscription(cursor, types))

    def _subscription(self, cursor: str | None, types: Iterable[str] | str | None) -> Subscription:
        p = self._p
        return Subscription(
            p.storage, p.ctx.commits, self._b.name, self.id, self._rk(), cursor=cursor, types=types
        )

    @offloaded
    def export(self, *, include_sensitive: bool = False) -> dict[str, Any]:
        """The instance as a JSON-serializable document, for ``af.testing.replay_check``.

        ``{"format", "workflow", "id", "status", "created", "params",
        "schedule", "output", "error", "steps", "events", "history"}``: each
        step with its ``kind``, ``name``, ``count``, ``seq`` (start order),
        ``status`` and outcome (``output``, ``event``, ``error``, ``patched``);
        ``events`` are those sent and not yet consumed. A value that is not
        plain JSON is ``{"$pickle": base64}`` (see ``docs/versioning.md``).
        What it reads is durable; the outputs of ``sensitive="output"``
        steps are ``"[REDACTED]"`` unless ``include_sensitive``.

        Raises:
            InstanceNotFound: There is no such instance.
        """
        return self._p.query.export(
            self._b.name, self.id, self._rk(), include_sensitive=include_sensitive
        )

    @offloaded
    def steps(self) -> list[StepRecord]:
        """One record per step (in start order), with its attempts."""
        self._record()  # raises InstanceNotFound
        return read_steps(self._p.storage, self._rk())

    @offloaded
    def wait_for_status(self, status: str, timeout: float = 10.0) -> InstanceStatus:
        """Blocks until the instance is in ``status`` (Cloudflare's ``waitForStatus``).

        It polls in real time and never moves a fake clock. Meant for statuses
        an instance stays in (``waiting``, ``paused``, ``errored``...): a
        ``running`` spell shorter than the polling interval can be missed.

        Returns:
            The status, as :meth:`status` gives it.

        Raises:
            ValueError: ``status`` is not a status name.
            InvalidInstanceState: The instance ended in another status first.
            TimeoutError: It was not in ``status`` after ``timeout`` seconds.
        """
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}; use one of {STATUSES}")
        deadline = time.monotonic() + timeout  # real time: a test's patience
        delay = 0.001
        while True:
            st = self.status()
            if st.status == status:
                return st
            if st.status in FINISHED:
                raise InvalidInstanceState(
                    f"{self!r} ended {st.status} (error: {st.error}) while waiting for "
                    f"status {status!r}",
                    workflow=self._b.name,
                    instance=self.id,
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self!r} is still {st.status}, not {status!r}, after {timeout} s"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    @offloaded
    def wait_for_step(self, name: str, *, count: int = 1, timeout: float = 10.0) -> Any:
        """Blocks until step ``name`` has a result and returns it (``waitForStepResult``).

        The result of ``step.do`` is its return value, of ``wait_for_event``
        the event's payload, of a sleep ``None``. ``count`` picks an occurrence
        of a name used more than once (1-based, as in ``inst.steps()``). It
        polls in real time and never moves a fake clock.

        Raises:
            Exception: The step failed for good: its error (for ``step.do``,
                the exception the body raised last; a timed-out wait raises
                :class:`~actorflow.EventTimeoutError`).
            InvalidInstanceState: The instance ended without that step completing.
            TimeoutError: The step had no result after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout  # real time: a test's patience
        delay = 0.001
        while True:
            st = self.status()  # read first: a step is written before the end
            for rec in read_steps(self._p.storage, self._rk()):
                if rec.name != name or rec.count != count or rec.kind == PATCH_KIND:
                    continue
                if rec.status == "complete":
                    return rec.output
                if rec.status == "errored":
                    raise self._step_error(rec)
            if st.status in FINISHED:
                raise InvalidInstanceState(
                    f"{self!r} ended {st.status} (error: {st.error}) without a result for "
                    f"step {name!r} (occurrence {count})",
                    workflow=self._b.name,
                    instance=self.id,
                    step=name,
                )
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"{self!r}: step {name!r} (occurrence {count}) has no result "
                    f"after {timeout} s; the instance is {st.status}"
                )
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _step_error(self, rec: StepRecord) -> BaseException:
        raw = self._p.storage.get(STEPS, step_key(self._rk(), rec.kind, rec.name, rec.count))
        stored = load(raw).get("e") if raw is not None else None
        if stored is not None:
            try:
                err = self._p.storage.serializer.loads(stored)
            except Exception:
                err = None
            if isinstance(err, BaseException):
                return err
        ed = rec.error or {"name": "Error", "message": "step failed"}
        return ActorflowError(
            f"{self!r}, step {rec.name!r}: {ed['name']}: {ed['message']}",
            workflow=self._b.name,
            instance=self.id,
            step=rec.name,
        )


class WorkflowModifier:
    """Cloudflare's test modifiers for one instance (see ``binding.modify``)."""

    def __init__(self, mods: Modifiers) -> None:
        self._m = mods

    def mock_step_result(self, name: str, value: Any) -> WorkflowModifier:
        """Step ``name`` returns ``value`` without running."""
        self._m.results[name] = value
        return self

    def mock_step_error(
        self, name: str, error: BaseException, times: int | None = None
    ) -> WorkflowModifier:
        """Step ``name`` raises ``error`` on its next ``times`` attempts (always if None)."""
        self._m.errors[name] = [error, times]
        return self

    def force_step_timeout(self, name: str) -> WorkflowModifier:
        """Every attempt of step ``name`` times out."""
        self._m.timeouts.add(name)
        return self

    def disable_sleeps(self) -> WorkflowModifier:
        """Sleeps end at once."""
        self._m.no_sleeps = True
        return self

    def disable_retry_delays(self) -> WorkflowModifier:
        """Retries follow failed attempts at once."""
        self._m.no_retry_delays = True
        return self

    def mock_event(self, type: str, payload: Any = None) -> WorkflowModifier:
        """``wait_for_event`` of ``type`` receives ``payload`` at once."""
        self._m.events[type] = payload
        return self

    def force_event_timeout(self, name: str) -> WorkflowModifier:
        """``wait_for_event`` step ``name`` times out at once."""
        self._m.event_timeouts.add(name)
        return self

    def crash_at(self, step: str, point: str = "before", times: int | None = 1) -> WorkflowModifier:
        """Crashes the instance's actor at a boundary of step ``step``.

        ``point`` is ``"before"`` (the body), ``"after_body"`` (before the
        result is written) or ``"after_commit"``. The supervisor restarts the
        instance from its last checkpoint.
        """
        if point not in CRASH_POINTS:
            raise ValueError(f"crash point must be one of {CRASH_POINTS}")
        self._m.crashes.append([step, point, times])
        return self


class BindingParts:
    """The engine-side parts of a :class:`WorkflowBinding`, for actorflow's own modules.

    Its instances, the faces (``actorflow.http``) and the test tools reach the
    engine, the supervisor, storage and the query module through this, never
    through the binding's private attributes. It is not user API: its names
    may change without notice.

    Attributes:
        name: The workflow's name.
        engine: The workflow's engine (definition, limits, router, key encoders).
        supervisor: The supervisor of the runtime's instance actors.
        ctx: The engine context shared by every workflow of the runtime.
        storage: The runtime's storage.
        query: The read-only query module over ``storage``.
    """

    __slots__ = ("ctx", "engine", "name", "query", "storage", "supervisor")

    def __init__(self, wfe: WorkflowEngine, supervisor: Supervisor) -> None:
        self.name = wfe.name
        self.engine = wfe
        self.supervisor = supervisor
        self.ctx = wfe.ctx
        self.storage = wfe.ctx.storage
        self.query = Query(self.storage, supervisor.live)

    def call(self, instance_id: str, message: InstanceMessage) -> Any:
        """Sends ``message`` to the instance's actor and returns its answer."""
        return self.supervisor.call(self.engine, instance_id, message)

    def not_found(self, instance_id: str) -> InstanceNotFound:
        """The error for an instance id the workflow does not have."""
        return instance_not_found(self.name, instance_id)

    def record_key(self, instance_id: str) -> bytes:
        """The key of the instance's records; raises InstanceNotFound if there is none."""
        rk = self.engine.rk(instance_id)
        if rk is None:
            raise self.not_found(instance_id)
        return rk

    def record(self, instance_id: str, rk: bytes) -> dict[str, Any]:
        """The instance record at ``rk``; raises InstanceNotFound if there is none."""
        raw = self.storage.get(INST, rk)
        if raw is None:
            raise self.not_found(instance_id)
        return load(raw)

    def encode(self, value: Any, where: str) -> bytes:
        """Serializes a payload (params, an event's) within the workflow's size limit.

        Raises:
            SerializationError: The value cannot be serialized.
            LimitExceeded: It is larger than ``max_event_payload_bytes``.
        """
        try:
            data = self.storage.serializer.dumps(value)
        except SerializationError as e:
            raise SerializationError(f"{where}: {e}", workflow=self.name) from None
        limit = self.engine.limits.max_event_payload_bytes
        if len(data) > limit:
            raise LimitExceeded(
                f"{where}: payload is {len(data)} bytes; the maximum is {limit}", workflow=self.name
            )
        return data


class WorkflowBinding:
    """A registered workflow: creates, finds and lists its instances."""

    def __init__(
        self, wfe: WorkflowEngine, supervisor: Supervisor, *, registered: bool = True
    ) -> None:
        #: The engine-side parts (:class:`BindingParts`): not user API.
        self.parts = BindingParts(wfe, supervisor)
        #: False for a binding from ``Runtime.unregistered``: its instances can
        #: be read and controlled, but none runs in this runtime.
        self.registered = registered
        self._wfe = wfe
        self._sup = supervisor
        self._ctx = wfe.ctx
        self._storage = wfe.ctx.storage
        self.name = wfe.name
        self._ids = RandomIds()
        self._numbers = RecordNumbers(self._storage)
        self._query = self.parts.query

    def __repr__(self) -> str:
        return f"<WorkflowBinding {self.name}>"

    def _encode(self, value: Any, where: str) -> bytes:
        return self.parts.encode(value, where)

    @offloaded
    def create(
        self,
        id: str | None = None,
        params: Any = None,
        *,
        key: str | None = None,
        priority: int | None = None,
    ) -> Instance:
        """Creates an instance (queued at once, durably) and returns it.

        Args:
            id: Its id (None: a uuid4).
            params: The payload ``run`` gets as ``event.payload``.
            key: Its flow-control key: with ``Limits(max_concurrent_per_key=N)``
                at most N instances sharing a key run at once; the others
                wait queued without holding up other keys.
            priority: Lower starts first among the workflow's queued
                instances (default 0; from ``-2**31`` to ``2**31 - 1``).
                Wake-ups of started instances still go before new ones.

        Raises:
            InvalidInstanceId: A malformed id.
            InvalidFlowControl: A bad ``key`` or ``priority``.
            InstanceAlreadyExists: The id exists.
            RateLimitError: The queue is full (or a reject-mode limit was hit).
        """
        self._ctx.check()
        iid, where, qk, batch = self._new_instance(id, params, self._numbers.take(), key, priority)
        return self._write_new(iid, where, qk, batch)

    def _write_new(self, iid: str, where: str, qk: bytes, batch: WriteBatch) -> Instance:
        """Writes the batch that creates instance ``iid`` (queue key ``qk``); the bookkeeping."""
        self._wfe.router.reserve(1, where)
        try:
            self._storage.write(batch)
        except BaseException as e:
            failure = self._created(iid, where, qk, e)
            if failure is e or failure is None:
                raise
            raise failure from None
        self._created(iid, where, qk, None)
        return Instance(self, iid)

    @offloaded
    def fork_of(
        self,
        origin: Instance,
        at_step: str | Mapping[str, Any],
        *,
        id: str | None = None,
        params: Any = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> Instance:
        """Forks instance ``origin``: see :meth:`Instance.fork`."""
        self._ctx.check()
        iid = validate_instance_id(id if id is not None else self._ids.next(), self.name)
        rk = origin.parts.record_key(origin.id)
        rec = origin.parts.record(origin.id, rk)
        plan = plan_fork(
            self._wfe,
            origin.id,
            self._storage.scan(STEPS, prefix=steps_prefix(rk)),
            at_step,
            overrides,
            self._storage.serializer,
        )
        where = f"workflow {self.name!r}, instance {iid!r}: fork of {origin.id!r}"
        stored = rec.get("params")
        data = stored if params is None and stored else self._encode(params, where)
        seq = self._ctx.next_seq()
        obs = self._ctx.observer
        # The fork keeps the origin's flow control (see docs/fork.md).
        key, priority = rec.get("ky"), int(rec.get("pr", 0))
        batch = fork_instance_batch(
            self._wfe,
            origin.id,
            plan,
            iid,
            self._numbers.take(),
            data,
            self._ctx.now_ms(),
            seq,
            obs.traceparent() if obs is not None else None,
            key=key,
            priority=priority,
        )
        return self._write_new(iid, where, new_queue_key(seq, priority, key), batch)

    async def create_async(
        self,
        id: str | None = None,
        params: Any = None,
        *,
        key: str | None = None,
        priority: int | None = None,
    ) -> Instance:
        """:meth:`create` for asyncio: awaits the commit without blocking the loop.

        Concurrent calls from many coroutines share group commits, as calls
        from many threads do.
        """
        self._ctx.check()
        loop = asyncio.get_running_loop()
        number = self._numbers.take_nowait()
        if number is None:  # the next block of record numbers is a write of its own
            number = await loop.run_in_executor(None, self._numbers.take)
        iid, where, qk, batch = self._new_instance(id, params, number, key, priority)
        self._wfe.router.reserve(1, where)
        done: asyncio.Future[None] = loop.create_future()

        def committed(err: BaseException | None) -> None:
            # On the writer thread: the bookkeeping happens even if the caller
            # was cancelled meanwhile, since the instance exists all the same.
            try:
                outcome = self._created(iid, where, qk, err)
            except BaseException as e:  # LeaseLost, for one
                outcome = e
            loop.call_soon_threadsafe(_settle, done, outcome)

        try:
            self._storage.submit(batch, committed)
        except BaseException:
            self._wfe.router.unreserve(1)
            raise
        await done
        return Instance(self, iid)

    def _new_instance(
        self,
        id: str | None,
        params: Any,
        number: int,
        key: object = None,
        priority: object = None,
    ) -> tuple[str, str, bytes, WriteBatch]:
        """Checks a creation and builds its batch: ``(id, where, queue key, batch)``."""
        iid = validate_instance_id(id if id is not None else self._ids.next(), self.name)
        if key is None and priority is None:
            fkey, prio = None, 0
        else:
            fkey, prio = validate_flow(key, priority, self.name, iid)
        where = f"workflow {self.name!r}, instance {iid!r}: create"
        data = self._encode(params, where)
        seq = self._ctx.next_seq()
        obs = self._ctx.observer
        batch = new_instance_batch(
            self._wfe,
            iid,
            number,
            data,
            self._ctx.now_ms(),
            seq,
            obs.traceparent() if obs is not None else None,
            key=fkey,
            priority=prio,
        )
        return iid, where, new_queue_key(seq, prio, fkey), batch

    def _created(
        self, iid: str, where: str, qk: bytes, err: BaseException | None
    ) -> BaseException | None:
        """After a creation's write (``err`` if it failed): the bookkeeping, and the
        error for the caller, if any."""
        router = self._wfe.router
        try:
            if err is None:
                router.enqueued(qk)
        finally:
            router.unreserve(1)
        if isinstance(err, ConflictError):
            self._check_lease(where)  # raises LeaseLost if this node was adopted
            return InstanceAlreadyExists(
                f"{where}: an instance with this id already exists",
                workflow=self.name,
                instance=iid,
            )
        if err is None:
            self._sup.kick_for(self._wfe)
        return err

    async def create_batch_async(self, items: Iterable[Mapping[str, Any]]) -> list[Instance]:
        """:meth:`create_batch` for asyncio: runs in a worker thread, the loop stays free."""
        return await asyncio.to_thread(self.create_batch, list(items))

    def _check_lease(self, where: str) -> None:
        """After a refused creation: raises LeaseLost if this node was adopted."""
        node = self._sup.node
        if node is not None and not node.confirm_live():
            raise lease_lost(node.node_id, where)

    @offloaded
    def create_batch(self, items: Iterable[Mapping[str, Any]]) -> list[Instance]:
        """Creates many instances in group commits; ids that exist are skipped.

        Each item is ``{"id": ..., "params": ..., "key": ..., "priority": ...}``
        (all optional; ``key`` and ``priority`` as for :meth:`create`). Returns
        the created instances, in order. Every item is checked before anything
        is written: a bad id, payload, key or priority raises and creates none.
        """
        self._ctx.check()
        items = list(items)
        if not items:
            raise ValueError(f"workflow {self.name!r}: create_batch needs at least one instance")
        now = self._ctx.now_ms()
        obs = self._ctx.observer
        tp = obs.traceparent() if obs is not None else None
        checked: list[tuple[str, bytes, str | None, int]] = []
        seen = set()
        for item in items:
            iid = validate_instance_id(
                item.get("id") if item.get("id") is not None else self._ids.next(), self.name
            )
            if iid in seen:
                continue
            seen.add(iid)
            key, prio = item.get("key"), item.get("priority")
            if key is not None or prio is not None:
                key, prio = validate_flow(key, prio, self.name, iid)
            else:
                prio = 0
            where = f"workflow {self.name!r}, instance {iid!r}"
            checked.append((iid, self._encode(item.get("params"), where), key, prio))
        router = self._wfe.router
        router.reserve(len(checked), "create_batch")
        try:
            results = self._write_all(checked, now, tp)
        finally:
            router.unreserve(len(checked))
        out = []
        if any(isinstance(err, ConflictError) for err in results):
            # Refused as existing, or because this node was adopted meanwhile.
            # The latter wrote nothing after the adoption, and says so.
            self._check_lease(f"workflow {self.name!r}: create_batch")
        for (iid, *_), err in zip(checked, results, strict=True):
            if err is None:
                out.append(Instance(self, iid))
            elif not isinstance(err, ConflictError):
                raise err
        self._sup.kick_for(self._wfe)
        return out

    def _write_all(
        self, checked: list[tuple[str, bytes, str | None, int]], now: int, tp: str | None
    ) -> list[BaseException | None]:
        """Writes one batch per instance, a slice at a time; returns each one's error.

        Building every batch up front would hold all of them in memory while
        the writer works through them (about 1.7 KiB each: a 20,000-item call
        peaked at 35 MiB). With at most two slices in flight, the next slice
        is built while the writer commits the previous one.
        """
        results: list[BaseException | None] = [None] * len(checked)
        router = self._wfe.router
        inflight: collections.deque[tuple[Countdown, list[bytes]]] = collections.deque()

        def settle() -> None:
            countdown, qks = inflight.popleft()
            countdown.done.wait()
            for qk, err in zip(
                qks, results[countdown.base : countdown.base + len(qks)], strict=True
            ):
                if err is None:
                    router.enqueued(qk)

        take = self._numbers.take
        for base in range(0, len(checked), SLICE):
            part = checked[base : base + SLICE]
            countdown = Countdown(results, base, len(part))
            qks = []
            for i, (iid, data, key, prio) in enumerate(part):
                seq = self._ctx.next_seq()
                qks.append(new_queue_key(seq, prio, key))
                self._storage.submit(
                    new_instance_batch(
                        self._wfe, iid, take(), data, now, seq, tp, key=key, priority=prio
                    ),
                    functools.partial(countdown.set, base + i),
                )
            inflight.append((countdown, qks))
            if len(inflight) > 1:
                settle()
        while inflight:
            settle()
        return results

    @offloaded
    def delete_batch(self, ids: Iterable[str]) -> dict[str, list[Any]]:
        """Deletes up to 100 instances (see :meth:`Instance.delete`); their writes share commits.

        Returns:
            ``{"deleted": [ids], "errors": [{"id", "name", "message"}]}``: an
            id that names no instance (or is malformed) is an error of its own
            and does not stop the others.

        Raises:
            LimitExceeded: More than 100 ids.
        """
        ids = list(ids)
        if len(ids) > MAX_DELETE_BATCH:
            raise LimitExceeded(
                f"workflow {self.name!r}: delete_batch takes at most {MAX_DELETE_BATCH} ids, "
                f"got {len(ids)}",
                workflow=self.name,
            )
        outcome: dict[str, BaseException | None] = {}  # in the order of ``ids``
        valid: list[str] = []
        for iid in ids:
            try:
                valid.append(validate_instance_id(iid, self.name))
                outcome.setdefault(valid[-1], None)
            except ActorflowError as e:
                outcome[str(iid)] = e
        unique = list(dict.fromkeys(valid))
        outcome.update(zip(unique, self._sup.call_many(self._wfe, unique, Delete()), strict=True))
        return {
            "deleted": [iid for iid, err in outcome.items() if err is None],
            "errors": [
                {"id": iid, "name": type(err).__name__, "message": str(err)}
                for iid, err in outcome.items()
                if err is not None
            ],
        }

    async def delete_batch_async(self, ids: Iterable[str]) -> dict[str, list[Any]]:
        """:meth:`delete_batch` for asyncio (the calls wait in a worker thread)."""
        return await asyncio.to_thread(self.delete_batch, list(ids))

    @offloaded
    def get(self, id: str) -> Instance:
        """Returns the instance ``id``; raises InstanceNotFound if there is none."""
        iid = validate_instance_id(id, self.name)
        parts = self.parts
        rk = parts.record_key(iid)
        parts.record(iid, rk)  # raises InstanceNotFound
        return Instance(self, iid, rk)  # keeps the key: its later calls look up no id

    @offloaded
    def list(
        self,
        status: str | None = None,
        *,
        limit: int | None = 100,
        cursor: str | None = None,
        created_after: datetime | int | None = None,
    ) -> list[Instance]:
        """Lists instances, newest first, optionally of one status.

        Args:
            status: Only instances in this status.
            limit: The most instances to return (None: all).
            cursor: The id of the last instance of the previous page; the
                page starts after it, also if its status changed meanwhile.
            created_after: Only instances created strictly after this
                (an aware datetime, or epoch milliseconds).
        """
        ids = self._query.ids(
            self.name, status, limit=limit, cursor=cursor, created_after=created_after
        )
        return [Instance(self, i) for i in ids]

    def modify(self, id: str) -> WorkflowModifier:
        """Returns the test modifiers of instance ``id`` (it may not exist yet).

        They apply from the next step the instance reaches, also when it is
        already running.
        """
        ik = self._wfe.ik(validate_instance_id(id, self.name))
        mods = self._ctx.modifiers.setdefault(ik, Modifiers())
        actor = self._sup.live.get(ik)
        ex = actor.exec if actor is not None else None
        if ex is not None and ex.mods is None:
            ex.mods = mods  # a run that started before any modifier existed
        return WorkflowModifier(mods)


def _settle(fut: asyncio.Future[None], err: BaseException | None) -> None:
    """Resolves ``fut`` (on its loop) unless its awaiter gave up on it."""
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


class _LoopWaker:
    """A watcher (:meth:`Supervisor.watch`) that wakes a coroutine on its own loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> None:
        self._loop = loop
        self._fut = fut

    def set(self) -> None:
        # Any thread; a loop closed meanwhile has nobody left to wake.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_settle, self._fut, None)
