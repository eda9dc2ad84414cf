"""The runtime: one data directory (or database), its storage, actors, timers and registry."""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Iterable
from typing import Any, TypeVar

from actorflow.cluster.lease import (
    DEFAULT_LEASE_TIMEOUT,
    LEASE_TIMEOUT_ENV,
    NODE_ID_ENV,
    NODE_MAP_SIZE,
    NodeLease,
    node_sequence,
)
from actorflow.core.actors import ThreadExecutor
from actorflow.core.clock import Clock, SystemClock
from actorflow.core.datadir import DirectoryClaim, claim_directory, hold_shared
from actorflow.core.errors import ActorflowError
from actorflow.core.limits import Limits
from actorflow.core.storage import Serializer, Storage, is_database_url, open_storage
from actorflow.core.timers import TimerService
from actorflow.executors.base import StepExecutor
from actorflow.objects.namespace import DurableObject, DurableObjectNamespace
from actorflow.objects.storage import ALARM_KIND, split_alarm_target
from actorflow.observe.metrics import TOP_KEYS, CommitMonitor, Metrics, WorkflowMetrics, top_keys
from actorflow.workflows.adoption import claimer_for
from actorflow.workflows.definition import Workflow
from actorflow.workflows.engine.context import EngineContext, WorkflowEngine
from actorflow.workflows.handles import WorkflowBinding
from actorflow.workflows.records import IDX, SCHEDULE_KIND, WAKE_KIND, queue_db, queued_by_key
from actorflow.workflows.schedules import (
    Scheduler,
    ScheduleSummary,
    list_schedules,
    parse_schedules,
)
from actorflow.workflows.supervisor import Supervisor

__all__ = ["OWNER_LOCK", "Runtime", "is_database_url"]

#: A file in the data directory that every open runtime holds a shared
#: ``flock`` on: tools take it exclusively to know that no process has the
#: directory open.
OWNER_LOCK = "actorflow.lock"
#: Seconds a new runtime waits for the ``actorflow`` command to finish changing
#: its directory (it holds OWNER_LOCK exclusively meanwhile).
OWNER_WAIT = 30.0

log = logging.getLogger("actorflow.runtime")
#: The collector thresholds a runtime raises the process's to (see ``Runtime(gc_threshold=)``).
GC_THRESHOLD = (1_000_000, 20, 100)
T = TypeVar("T", bound=DurableObject)


class Runtime:
    """An embedded actorflow runtime over one data directory.

    It is running once constructed; :meth:`close` (or leaving a ``with``
    block) stops it cleanly. Each runtime owns its own storage, actors,
    timers and registry; nothing is shared between runtimes.

    Args:
        data_dir: Where the state lives: a data directory (one embedded LMDB
            environment, the default), or a ``postgresql://`` URL (every record
            in that PostgreSQL database; several nodes on any number of hosts
            may share it, see docs/postgresql.md).
        limits: Flow-control limits (default :class:`Limits`).
        clock: The clock (default the system clock; tests pass a FakeClock).
        sync: fsync every commit (default True).
        serializer: Serializer for user values (default pickle, with
            cloudpickle for what pickle cannot do).
        pool_size: Threads running Durable Object calls.
        idle_timeout: Seconds an object may stay idle before eviction.
        run_threads: Threads for the plain ``def run`` workflows that
            blocked the engine loop outside their steps and were moved off it
            (the most such runs executing at once); the others, and ``async
            def run`` workflows, need none.
        step_threads: Threads for sync step callables.
        max_crashes: Crashes of one instance tolerated within
            ``crash_window`` seconds before it is marked errored.
        crash_window: See ``max_crashes``.
        tracer_provider: An OpenTelemetry ``TracerProvider``: traces runs,
            steps and attempts (see :mod:`actorflow.observe.tracing`; needs the
            ``otel`` extra). None (the default): no tracing, at no cost.
        node_id: Join the data directory as this node (default: the
            ``ACTORFLOW_NODE_ID`` environment variable; unset: a lone
            runtime). Several nodes, in processes on one host, can share a
            data directory; each runs the instances it owns and adopts those
            of a node whose lease expired (see :mod:`actorflow.cluster.lease`).
        lease_timeout: Seconds without a heartbeat after which this node's
            instances are adopted by another node (default: the
            ``ACTORFLOW_LEASE_TIMEOUT`` environment variable, else 5).
        gc_threshold: Raise the cyclic garbage collector's thresholds to at
            least this (``gc.set_threshold``) for the rest of the process.
            The thresholds are the process's, not a runtime's: a runtime only
            ever raises them, never lowers or restores them, so closing one
            runtime never changes the collector under another. The engine
            makes a few dozen short-lived objects per instance; with the
            interpreter's default (700, 10, 10) tens of thousands of
            instances in flight get promoted to the oldest generation and
            every full collection walks them all, which halves throughput.
            The first threshold counts objects made and not yet freed, and a
            collection walks them all: it is set above what a busy engine
            keeps alive (about 45 objects per run in flight), so that no
            collection pauses a burst of wake-ups (at 500,000, collections of
            100 to 200 ms during a burst of 10,000 wakes/s let it fall
            behind). The engine makes no reference cycles, so a high
            threshold costs little memory. None leaves the collector alone.
        executor: Where step bodies run (:mod:`actorflow.executors`): None or
            an ``InProcessExecutor``, in this process; a ``RayExecutor`` or
            ``DaskExecutor``, on that cluster. The runtime opens it (an
            unreachable cluster raises :class:`~actorflow.core.errors.ExecutorError`
            here) and closes it with itself.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] = "./actorflow-data",
        *,
        limits: Limits | None = None,
        clock: Clock | None = None,
        sync: bool = True,
        serializer: Serializer | None = None,
        pool_size: int = 64,
        idle_timeout: float = 10.0,
        run_threads: int = 256,
        step_threads: int = 64,
        max_crashes: int = 5,
        crash_window: float = 60.0,
        tracer_provider: Any = None,
        node_id: str | None = None,
        lease_timeout: float | None = None,
        gc_threshold: tuple[int, int, int] | None = GC_THRESHOLD,
        executor: StepExecutor | None = None,
    ) -> None:
        self.data_dir = os.fspath(data_dir)
        self._on_database = is_database_url(self.data_dir)
        if executor is not None and not isinstance(executor, StepExecutor):
            raise TypeError(
                f"executor must be an actorflow.executors.StepExecutor, not {executor!r}"
            )
        self.executor = executor
        if executor is not None:
            # First: an unreachable cluster is refused before the directory is claimed.
            executor.open()
        if gc_threshold is not None:
            _raise_gc_thresholds(gc_threshold)
        self.limits = limits or Limits()
        self.clock: Clock = clock or SystemClock()
        self.idle_timeout = idle_timeout
        self.node_id = node_id or os.environ.get(NODE_ID_ENV) or None
        self._claim: DirectoryClaim | None = None
        self._owner_fd = -1
        self.storage: Storage
        try:
            if self._on_database:
                self.storage = self._open_database(serializer)
            else:
                self._owner_fd = self._lock_owner()
                try:
                    self.storage = open_storage(
                        self.data_dir,
                        sync=sync,
                        serializer=serializer,
                        **({"map_size": NODE_MAP_SIZE} if self.node_id else {}),
                    )
                except BaseException:
                    self._unlock()
                    raise
        except BaseException:
            self._close_executor()
            raise
        self._commits = CommitMonitor(self.clock.now)
        self.storage.add_commit_observer(self._commits)
        self.timers = TimerService(self.storage, self.clock)
        self.timers.register(ALARM_KIND, self._fire_alarm)
        self._pool = ThreadExecutor(pool_size, name="actorflow-do")
        self._namespaces: dict[str, DurableObjectNamespace[Any]] = {}
        self._closed = threading.Event()
        # Built in dependency order, each whole when made: the lease (it
        # gives the id sequence and fences the supervisor's claims), the
        # engine context and, last in its constructor, its supervisor; then
        # the callbacks of the timer service and the lease, which call into
        # the supervisor only once their threads start, at the end.
        lease: NodeLease | None = None
        seq = None
        if self.node_id:
            lease, slot = self._join(lease_timeout)
            seq = node_sequence(slot)  # ids distinct from other live nodes'
        self._lease = lease
        self._engine = EngineContext(
            self.storage,
            self.clock,
            self.timers,
            self.limits,
            run_threads,
            step_threads,
            seq=seq,
            supervisor=lambda ctx: Supervisor(ctx, max_crashes, crash_window, lease),
            executor=executor if executor is not None and executor.remote else None,
        )
        self._supervisor = self._engine.supervisor
        delivery = self._supervisor.delivery
        self.timers.register(WAKE_KIND, delivery.on_timer, delivery.saturated)
        self._scheduler = Scheduler(self.storage, self.timers)
        self.timers.register(SCHEDULE_KIND, self._scheduler.on_timer)
        self._bindings: dict[str, WorkflowBinding] = {}
        # The engine of each binding, by name (the binding keeps its own private).
        self._engines: dict[str, WorkflowEngine] = {}
        if tracer_provider is not None:
            from actorflow.observe.tracing import instrument

            instrument(self, tracer_provider)
        self._engine.start()
        attach = getattr(self.clock, "attach", None)
        if attach is not None:
            attach(self)
        self._reaper = threading.Thread(target=self._reap, name="actorflow-reaper", daemon=True)
        self._reaper.start()
        self.timers.start()
        if lease is not None:
            lease.start(
                claimer=claimer_for(lease),
                on_adopted=self._supervisor.adopted,
                on_tick=delivery.prune_foreign,
                on_lost=self._lease_lost,
            )

    # -- Workflows -------------------------------------------------------------

    def register(
        self,
        cls: type[Workflow],
        name: str | None = None,
        *,
        env: Any = None,
        schedules: Iterable[str] | None = None,
    ) -> WorkflowBinding:
        """Registers a workflow class under ``name`` and returns its binding.

        Registering is also what resumes that workflow's unfinished instances
        found in the data directory.

        Args:
            cls: The workflow class.
            name: Its name (default the class name).
            env: Given to each instance of ``cls`` (``self.env``).
            schedules: Cron expressions (5 fields, UTC): each due tick creates
                one instance (see docs/schedules.md). Given (also ``[]``), it
                replaces the workflow's stored schedules: those not listed are
                removed. Not given, the stored ones are left alone and this
                runtime fires none of them.

        Raises:
            InvalidSchedule: A schedule is not a valid cron expression
                (nothing is registered).
        """
        self._check_open()
        name = name or cls.__name__
        parsed = parse_schedules(name, schedules)
        if name in self._bindings:
            if self._engines[name].cls is not cls:
                raise ValueError(f"workflow {name!r} is already registered to another class")
            if schedules is not None and parsed != self._scheduler.of(name):
                raise ValueError(f"workflow {name!r} is already registered with other schedules")
            return self._bindings[name]
        wfe = WorkflowEngine(self._engine, cls, name, env)
        binding = WorkflowBinding(wfe, self._supervisor)
        self._bindings[name] = binding
        self._engines[name] = wfe

        def attach() -> None:
            self._supervisor.engines[name] = wfe
            self._supervisor.recover(wfe)

        self._engine.call(attach)
        if parsed or schedules is not None:
            self._scheduler.add(binding, parsed)
        self.timers.kick()
        return binding

    def unregistered(self, name: str, *, listed: bool = False) -> WorkflowBinding:
        """A binding on the instances of workflow ``name`` without registering its class.

        Its instances can be read and controlled (``pause``, ``resume``,
        ``terminate``, ``restart``, ``send_event``): each control writes the
        same durable records as it does for a registered workflow, so the
        runtime that registers the class later continues them correctly.
        Nothing of the workflow runs here: ``create`` queues instances that
        only a runtime registering the class will start.

        With ``listed=True`` the binding is also what :meth:`workflow` returns
        and :attr:`workflows` lists, for tools built on those (the HTTP API
        serving a data directory without its classes); the name can then no
        longer be registered in this runtime.
        """
        self._check_open()
        if name in self._bindings:
            return self._bindings[name]

        class Unregistered(Workflow):
            def run(self, event: Any, step: Any) -> Any:
                raise RuntimeError(f"workflow {name!r} is not registered in this runtime")

        wfe = WorkflowEngine(self._engine, Unregistered, name, None)
        binding = WorkflowBinding(wfe, self._supervisor, registered=False)
        if listed:
            self._bindings[name] = binding
            self._engines[name] = wfe
        return binding

    def workflow(self, name: str) -> WorkflowBinding:
        """Returns the binding of a registered workflow."""
        try:
            return self._bindings[name]
        except KeyError:
            raise KeyError(f"no workflow registered as {name!r}") from None

    @property
    def workflows(self) -> list[str]:
        """The names of the registered workflows."""
        return list(self._bindings)

    def schedules(self, workflow: str | None = None) -> list[ScheduleSummary]:
        """The stored cron schedules (of ``workflow``, if given), each with its next tick.

        Read from storage: every runtime on the data directory (or database)
        sees the schedules any of them registered.
        """
        self._check_open()
        return list_schedules(self.storage, workflow)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` has been called."""
        return self._closed.is_set()

    # -- observability -------------------------------------------------------------

    def metrics(self) -> Metrics:
        """Returns a snapshot of the runtime's figures (:class:`~actorflow.observe.Metrics`).

        Counts by status cover every workflow in the data directory. The first
        call scans the status index once; later calls cost O(workflows).
        """
        self._check_open()
        if not self._commits.seeded:
            self._commits.seed(self._scan_index)
        sup = self._supervisor
        counts = self._commits.counts()
        names = sorted(set(counts) | set(self._bindings))
        workflows = {}
        for name in names:
            wfe = self._engines.get(name)
            lim = wfe.limits if wfe is not None else self.limits.for_workflow(name)
            started = None
            if wfe is not None:
                depth = wfe.router.depth()
                by_key = top_keys(dict(wfe.router.key_running))
                started = wfe.router.handed  # copied only if the workflow has keyed entries
            else:
                depth = self.storage.count(queue_db(name))
                by_key = {}
            queued, nkeys = queued_by_key(self.storage, name, TOP_KEYS, started)
            workflows[name] = WorkflowMetrics(
                name,
                counts.get(name, {}),
                depth,
                sup.by_wf.get(name, 0),
                lim.max_concurrent,
                wfe is not None,
                queued_by_key=queued,
                queued_keys=nkeys,
                running_by_key=by_key,
                max_concurrent_per_key=lim.max_concurrent_per_key,
            )
        total: dict[str, int] = {}
        for wm in workflows.values():
            for status, n in wm.counts.items():
                total[status] = total.get(status, 0) + n
        p50, p99 = self._commits.latency_ms()
        return Metrics(
            workflows=workflows,
            counts=total,
            creations_per_s=self._commits.creations.rate(),
            steps_per_s=self._engine.step_rate.rate(),
            running=sup.running,
            max_concurrent=self.limits.max_concurrent,
            queue_depth=sum(w.queue_depth for w in workflows.values()),
            timer_backlog=self.timers.pending(),
            live_instances=len(sup.live),
            commit_p50_ms=p50,
            commit_p99_ms=p99,
            commits_per_s=self._commits.commits.rate(),
            batches_per_s=self._commits.batches.rate(),
            window_s=self._commits.commits.window,
        )

    def _scan_index(self, visit: Any) -> int:
        """Visits every status-index key in one snapshot; returns its transaction id."""
        return self.storage.visit_keys(IDX, visit)

    def _lock_owner(self) -> int:
        """Claims the data directory for this runtime's life; returns the owner lock's descriptor.

        A runtime without a node id claims it alone, a node shares it with
        nodes of other ids (see :func:`actorflow.core.datadir.claim_directory`);
        either refuses at once with :class:`~actorflow.core.errors.DataDirectoryLocked`.
        Then it takes a shared lock on the owner file, waiting while the
        ``actorflow`` command holds that exclusively (at most ``OWNER_WAIT``).
        """
        self._claim = claim_directory(self.data_dir, self.node_id)
        try:
            return hold_shared(os.path.join(self.data_dir, OWNER_LOCK), OWNER_WAIT)
        except BaseException:
            self._claim.release()
            self._claim = None
            raise

    def _open_database(self, serializer: Serializer | None) -> Storage:
        """Opens the PostgreSQL storage and claims it, as :meth:`_lock_owner` claims a directory."""
        from actorflow.core.pg_backend import PostgresStorage  # psycopg: the postgres extra

        storage = PostgresStorage(self.data_dir, serializer=serializer)
        try:
            storage.claim(self.node_id)
        except BaseException:
            storage.close()
            raise
        return storage

    def _unlock(self) -> None:
        """Releases what :meth:`_lock_owner` took."""
        if self._owner_fd >= 0:
            os.close(self._owner_fd)  # releases the owner lock
            self._owner_fd = -1
        if self._claim is not None:
            self._claim.release()
            self._claim = None

    # -- multi-node ----------------------------------------------------------------

    def _join(self, lease_timeout: float | None) -> tuple[NodeLease, int]:
        """Joins the data directory as node :attr:`node_id` (see :mod:`actorflow.cluster.lease`).

        Returns:
            The lease (not yet beating) and this node's sequence slot.
        """
        assert self.node_id is not None
        if lease_timeout is None:
            lease_timeout = float(os.environ.get(LEASE_TIMEOUT_ENV) or DEFAULT_LEASE_TIMEOUT)
        lease = NodeLease(self.storage, self.node_id, lease_timeout)
        return lease, lease.join()

    def _lease_lost(self) -> None:
        # Other nodes took over: stop every run here (their writes would fail anyway).
        try:
            self._engine.call(self._supervisor.shutdown, timeout=10)
        except Exception:
            log.exception("stopping the runs of node %s failed", self.node_id)

    @property
    def lease_lost(self) -> bool:
        """True once this node found its lease taken over (it then runs nothing)."""
        return self._lease is not None and self._lease.lost

    @property
    def lease(self) -> NodeLease | None:
        """This node's lease (None for a lone runtime)."""
        return self._lease

    # -- idleness ----------------------------------------------------------------

    def is_idle(self) -> bool:
        """True when nothing can progress without time passing or outside input.

        Every live instance is blocked (sleeping, waiting or pausing), nothing is
        being written, no wake-up or startable instance is pending, and no
        timer is being delivered.
        """
        if self._closed.is_set():
            return True
        parked = self._supervisor.parked_timers()
        if not self.storage.idle() or self.timers.busy(ignore=parked):
            return False
        return bool(self._engine.call(self._supervisor.is_idle, timeout=10))

    def wait_until_idle(self, timeout: float = 10.0) -> bool:
        """Blocks until :meth:`is_idle` holds twice in a row; False on timeout."""
        deadline = time.monotonic() + timeout
        streak = 0
        while time.monotonic() < deadline:
            self.timers.sync(timeout=max(0.01, deadline - time.monotonic()))
            if self.is_idle():
                streak += 1
                if streak >= 2:
                    return True
            else:
                streak = 0
                time.sleep(0.001)
        return False

    def _check_open(self) -> None:
        if self._closed.is_set():
            raise ActorflowError(f"runtime at {self.data_dir} is closed")
        if not self._engine.alive():
            raise ActorflowError(
                f"the engine loop of {self.data_dir} died: {self._engine.loop_error!r}"
            )
        if self.lease_lost:
            raise ActorflowError(
                f"node {self.node_id} of {self.data_dir} lost its lease: other nodes took "
                "over its instances; open a new runtime to rejoin"
            )

    # -- Durable Objects -----------------------------------------------------

    def durable_objects(
        self, cls: type[T], name: str | None = None, *, env: Any = None
    ) -> DurableObjectNamespace[T]:
        """Returns the namespace of ``cls`` objects under ``name`` (default the class name).

        Registering a namespace is what lets its alarms fire after a restart.
        """
        name = name or cls.__name__
        ns = self._namespaces.get(name)
        if ns is not None:
            if ns.cls is not cls:
                raise ValueError(f"namespace {name!r} is already bound to {ns.cls.__name__}")
            return ns
        ns = DurableObjectNamespace(
            cls,
            name,
            storage=self.storage,
            timers=self.timers,
            executor=self._pool,
            clock=self.clock,
            env=env,
            idle_timeout=self.idle_timeout,
        )
        self._namespaces[name] = ns
        self.timers.kick()
        return ns

    def _fire_alarm(self, target: bytes, key: bytes, deadline: int) -> bool:
        ns = self._namespaces.get(split_alarm_target(target)[0])
        return ns is not None and ns.fire_alarm(target, key, deadline)

    def _reap(self) -> None:
        period = max(0.05, min(1.0, self.idle_timeout / 4))
        while not self._closed.wait(period):
            for ns in list(self._namespaces.values()):
                try:
                    ns.evict_idle()
                except Exception:
                    log.exception("eviction pass of %s failed", ns.name)

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Stops every actor and timer, flushes storage and closes it."""
        if self._closed.is_set():
            return
        self._closed.set()
        if self._lease is not None:
            self._lease.stop()
        self.timers.stop()
        self._engine.stop()
        for ns in self._namespaces.values():
            ns.shutdown()
        self._pool.shutdown()
        self._reaper.join()
        self._close_executor()
        if self._lease is not None:
            self._lease.leave()
        self.storage.close()
        self._unlock()

    def _close_executor(self) -> None:
        if self.executor is not None:
            try:
                self.executor.close()
            except Exception:
                log.exception("closing the executor %r failed", self.executor)

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _raise_gc_thresholds(wanted: tuple[int, int, int]) -> None:
    """Raises each of the collector's thresholds to at least ``wanted``'s; lowers none."""
    current = gc.get_threshold()
    raised = tuple(max(c, w) for c, w in zip(current, wanted, strict=True))
    if raised != current:
        gc.set_threshold(*raised)
