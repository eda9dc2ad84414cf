"""What the workflow engine of one runtime shares: its loop, pools and registry."""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from actorflow.core.actors import LoopExecutor
from actorflow.core.clock import Clock
from actorflow.core.errors import ActorflowError
from actorflow.core.greenlets import LoopGreenlets, SliceMonitor
from actorflow.core.limits import Limits
from actorflow.core.rates import RateWindow
from actorflow.core.storage import Storage, WriteBatch
from actorflow.core.threadcalls import LoopNotifier, ThreadCalls
from actorflow.core.timers import TimerService
from actorflow.workflows.definition import Workflow, validate_workflow_name
from actorflow.workflows.engine.modifiers import Modifiers
from actorflow.workflows.records import IDS, ikey, rkey
from actorflow.workflows.router import Router
from actorflow.workflows.subscribe import CommitWatch

if TYPE_CHECKING:
    from actorflow.executors.base import StepExecutor
    from actorflow.observe.tracing import RunObserver
    from actorflow.workflows.supervisor import Supervisor

__all__ = ["EngineContext", "Watchdog", "WorkflowEngine"]

_NAME_CACHE = 4096
_SHUTDOWN_S = 5.0  # how long close() lets stopped runs and pending handlers finish
# A slice of a plain ``def run`` on the loop (its code between two step calls)
# longer than this blocks the loop: it is logged, and the workflow's later runs
# take a run thread. Far above what replaying and calling a step costs.
BLOCKING_SLICE_S = 0.25


def _warn_held(execution: Any, seconds: float) -> None:
    """Told by the slice monitor, while a ``def run`` holds the loop (on its thread)."""
    logging.getLogger("actorflow.engine").warning(
        "%s: run has held the engine loop for %.2f s outside its steps (blocking code in a "
        "def run: time.sleep, a blocking call, a long computation); every other instance "
        "waits meanwhile. Put that code in a step.",
        execution.where,
        seconds,
        extra={"workflow": execution.wfe.name, "instance": execution.actor.iid},
    )


class _Watch:
    __slots__ = ("deadline", "fired", "task")

    def __init__(self, task: asyncio.Task[Any] | None, deadline: float) -> None:
        self.task = task
        self.deadline = deadline
        self.fired = False


class Watchdog:
    """Cancels async step bodies that outlive their timeout.

    One periodic check (every 50 ms while anything is armed) instead of a
    timer handle per step: arming is a dict insert on the hot path.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._armed: dict[int, _Watch] = {}
        self._handle: asyncio.TimerHandle | None = None

    def arm(self, seconds: float) -> _Watch:
        w = _Watch(asyncio.current_task(), self._loop.time() + seconds)
        self._armed[id(w)] = w
        if self._handle is None:
            self._handle = self._loop.call_later(min(seconds, 0.05), self._check)
        return w

    def disarm(self, w: _Watch) -> None:
        self._armed.pop(id(w), None)

    def _check(self) -> None:
        self._handle = None
        now = self._loop.time()
        for key, w in list(self._armed.items()):
            if w.deadline <= now:
                del self._armed[key]
                w.fired = True
                if w.task is not None:
                    w.task.cancel()
        if self._armed:
            soonest = min(w.deadline for w in self._armed.values())
            self._handle = self._loop.call_later(max(0.001, min(soonest - now, 0.05)), self._check)


class EngineContext:
    """The engine loop (the thread every instance actor runs on) and its pools.

    Args:
        storage: The runtime's storage.
        clock: The runtime's clock.
        timers: The runtime's timer service.
        limits: The runtime's limits.
        run_threads: Threads for the plain ``def run`` workflows moved off
            the loop (the most that execute at once; more running instances
            wait for a thread), and for the sync handles such a run calls on it.
        step_threads: Threads for sync step callables and retry delay functions.
        seq: The ids for events, history and queue entries (a node's own
            residue, see :func:`~actorflow.cluster.lease.node_sequence`); None:
            counted from the real time in microseconds.
        supervisor: Makes the supervisor of this context, given the context
            (called last in the constructor: the supervisor needs the rest).
        executor: Where sync and async step bodies run, if not in this
            process (an open remote :class:`~actorflow.executors.StepExecutor`);
            None: on the step threads and the engine loop.
    """

    def __init__(
        self,
        storage: Storage,
        clock: Clock,
        timers: TimerService,
        limits: Limits,
        run_threads: int = 256,
        step_threads: int = 64,
        seq: Iterator[int] | None = None,
        *,
        supervisor: Callable[[EngineContext], Supervisor],
        executor: StepExecutor | None = None,
    ) -> None:
        self.storage = storage
        self.clock = clock
        self.timers = timers
        self.limits = limits
        self.loop = asyncio.new_event_loop()
        self.loop_executor = LoopExecutor(self.loop)
        self.notifier = LoopNotifier(self.loop)
        storage.add_after_batch(self.notifier.flush)
        # Wakes the subscribers of an instance (Instance.subscribe) on its commits.
        self.commits = CommitWatch()
        storage.add_commit_observer(self.commits.observe)
        self.run_pool = concurrent.futures.ThreadPoolExecutor(run_threads, "actorflow-run")
        # Sync step bodies and retry delay functions.
        self.body_calls = ThreadCalls(step_threads, self.loop, "actorflow-step")
        self.modifiers: dict[bytes, Modifiers] = {}
        self.watchdog = Watchdog(self.loop)
        # Names the runs of plain ``def run`` workflows that hold the loop (see execution).
        self.slices = SliceMonitor(BLOCKING_SLICE_S, _warn_held)
        # The greenlets plain ``def run``s run in on the loop, kept for reuse.
        self.greenlets = LoopGreenlets(self.run_pool, self.slices)
        self.valid_names: set[str] = set()
        # Unique, increasing ids for events, history and queue entries, also
        # across restarts: seeded from the real time in microseconds.
        self._seq = (
            seq if seq is not None else itertools.count(time.time_ns() // 1000)  # noqa: TID251
        )
        self._thread = threading.Thread(target=self._run_loop, name="actorflow-engine", daemon=True)
        self._ready = threading.Event()
        self.loop_error: BaseException | None = None
        # Observability: steps ended per second, and the run observer (tracing).
        self.step_rate = RateWindow(clock.now)
        self.observer: RunObserver | None = None
        self.executor = executor
        self.supervisor = supervisor(self)

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop_executor.bind_thread()
        self.loop.call_soon(self._ready.set)
        log = logging.getLogger("actorflow.engine")
        while True:
            try:
                self.loop.run_forever()
                return
            except (SystemExit, KeyboardInterrupt) as e:
                # asyncio re-raises these out of run_forever from the task or
                # callback that raised them. Workflow code that calls sys.exit()
                # must not take every other instance of the runtime down: the
                # task that raised it is done, the loop goes on.
                log.error("%r escaped into the engine loop; the loop goes on", e)
            except BaseException as e:  # the runtime reports this loudly on every call
                self.loop_error = e
                self._ready.set()
                log.critical("the engine loop died; every workflow call will fail: %r", e)
                return

    def alive(self) -> bool:
        return self._thread.is_alive()

    def check(self) -> None:
        """Raises if the engine loop is not running, so that no call fails silently."""
        if not self._thread.is_alive():
            if self.loop_error is not None:
                raise ActorflowError(f"the engine loop died: {self.loop_error!r}")
            raise ActorflowError("the runtime is closed")

    def timers_done(self, keys: list[bytes]) -> None:
        """Tells the timer service that a commit consumed or re-armed ``keys``."""
        for k in keys:
            self.timers.done(k, consumed=True)
        if keys:
            self.timers.kick()

    def remember_name(self, name: str) -> None:
        """Caches a validated step name (validation is on the hot path)."""
        if len(self.valid_names) >= _NAME_CACHE:
            self.valid_names.clear()
        self.valid_names.add(name)

    def next_seq(self) -> int:
        return next(self._seq)

    def now_ms(self) -> int:
        # round, not int: float seconds lose a fraction of a ms (a fake clock
        # advanced ms by ms drifts below the true value).
        return round(self.clock.now() * 1000)

    async def write(self, batch: WriteBatch) -> None:
        """Commits ``batch`` from the loop and waits until it is durable."""
        fut = self.loop.create_future()
        self.storage.submit(batch, self.notifier.callback(fut))
        await fut

    async def _shutdown(self) -> None:
        self.supervisor.shutdown()
        me = asyncio.current_task()
        deadline = self.loop.time() + _SHUTDOWN_S
        while True:
            tasks = [t for t in asyncio.all_tasks(self.loop) if t is not me and not t.done()]
            if not tasks:
                # Callbacks already queued (a commit's reply resuming a run) may
                # start new tasks: let them run, then look again.
                for _ in range(3):
                    await asyncio.sleep(0)
                tasks = [t for t in asyncio.all_tasks(self.loop) if t is not me and not t.done()]
                if not tasks:
                    return
            left = deadline - self.loop.time()
            if left <= 0:
                break
            await asyncio.wait(tasks, timeout=left)
        for t in tasks:
            t.cancel()
        await asyncio.wait(tasks, timeout=1.0)

    def call(self, fn: Any, *args: Any, timeout: float | None = None) -> Any:
        """Runs ``fn(*args)`` (a coroutine function or plain function) on the loop, waits."""

        async def run() -> Any:
            result = fn(*args)
            if inspect.isawaitable(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout)

    def stop(self) -> None:
        """Stops every run, lets pending handlers end, then stops the loop.

        Runs are stopped without writing anything (they resume from their
        checkpoints on the next start). Stopping the loop under pending tasks
        would destroy them mid-await and run their cleanup against closed
        storage.
        """
        if self._thread.is_alive():
            try:
                asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(
                    _SHUTDOWN_S + 1.0
                )
            except (concurrent.futures.TimeoutError, RuntimeError):
                pass  # stop the loop anyway; what is left is lost, as in a crash
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.run_pool.shutdown(wait=False, cancel_futures=True)
        self.body_calls.close()
        self.slices.close()
        if not self._thread.is_alive():
            # Tasks the loop will never run again (it died, or shutdown timed
            # out): close their coroutines now, so that none is reported as
            # "never awaited" whenever the collector gets to it.
            for task in asyncio.all_tasks(self.loop):
                task.get_coro().close()
            self.loop.close()


class WorkflowEngine:
    """One registered workflow: its class, limits and queue (router)."""

    def __init__(self, ctx: EngineContext, cls: type[Workflow], name: str, env: Any) -> None:
        if not isinstance(cls, type) or not issubclass(cls, Workflow):
            raise TypeError("register() needs a subclass of actorflow.Workflow")
        if cls.run is Workflow.run:
            raise TypeError(f"{cls.__name__} must define run(event, step)")
        self.ctx = ctx
        self.cls = cls
        self.name = validate_workflow_name(name)
        self.env = env
        self.is_async = inspect.iscoroutinefunction(cls.run)
        # A plain ``def run`` runs as a greenlet on the loop until one of its
        # runs blocks the loop outside its steps; from then on, in the run threads.
        self.threaded = False
        self.limits = ctx.limits.for_workflow(name)
        sup = ctx.supervisor
        self.router = Router(self, sup.slots.room_for, sup.node)

    def ik(self, iid: str) -> bytes:
        """Returns the key that names an instance (see :mod:`actorflow.workflows.records`)."""
        return ikey(self.name, iid)

    def rk(self, iid: str) -> bytes | None:
        """Returns the key of an instance's records; None if there is no such instance."""
        n = self.ctx.storage.get(IDS, ikey(self.name, iid))
        return None if n is None else rkey(self.name, n)
