"""One run of one instance: replay ``run``, execute and checkpoint its steps.

Everything here runs on the runtime's engine loop, the instance actor's
thread. A plain ``def run`` executes there too, as a greenlet driven by the
run's task (:class:`actorflow.core.greenlets.LoopGreenlets`): each step call switches
back to the task with its coroutine (:meth:`Execution.block_on`). One that
blocks the loop outside its steps moves to a thread of the run pool
(:meth:`Execution._slice_ended`), and from there sends each step call to
the loop.

Replay: ``run`` starts from the top on every activation. Steps are keyed by
(kind, name, occurrence). A stored complete step returns its result, a stored
failed step raises its error, and anything else executes.

Hibernation: when every branch of the run is blocked (a sleep, a retry delay,
an event wait, or a requested pause) and no step body or commit is in flight,
the instance writes its ``waiting`` (or ``paused``) status, its timers stay
armed in the durable index, and ``run`` is unwound with :class:`Suspend`. It
then holds no thread and no live actor until a timer, an event or a resume
wakes it, and it replays.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import copy
import functools
import inspect
import logging
import threading
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, cast

from greenlet import getcurrent

from actorflow.core.clock import MAX_EPOCH_MS, parse_duration_ms, to_datetime, to_epoch_ms
from actorflow.core.errors import (
    ActorflowError,
    EventTimeoutError,
    InvalidInstanceState,
    LimitExceeded,
    NonRetryableDelayError,
    NonRetryableError,
    SerializationError,
    StepTimeoutError,
    StorageError,
)
from actorflow.core.greenlets import LoopGreenlet, await_on_loop
from actorflow.core.storage import ConflictError, WriteBatch
from actorflow.core.timers import TimerService, timer_key
from actorflow.executors.base import RanOn, StepExecutor, check_resources
from actorflow.workflows.definition import (
    Status,
    WorkflowEvent,
    WorkflowStepEvent,
    validate_event_type,
    validate_step_name,
)
from actorflow.workflows.engine.context import BLOCKING_SLICE_S
from actorflow.workflows.engine.signals import (
    EngineFault,
    Fatal,
    InjectedCrash,
    Rehome,
    Stop,
    StorageFault,
    Suspend,
    Unwind,
)
from actorflow.workflows.matching import PATCH_KIND, StepMatcher
from actorflow.workflows.records import (
    EVENTS,
    STEPS,
    WAKE_KIND,
    StepCheckpoint,
    StepStatus,
    dump,
    error_dict,
    events_prefix,
    load_event,
    load_step,
    step_key,
    step_target,
    step_timers,
    steps_prefix,
    stored_error,
)
from actorflow.workflows.rollbacks import ROLLBACK_KIND, RollbackHook, rollback_call, rollback_hook
from actorflow.workflows.step import (
    StepContext,
    StepInfo,
    WorkflowStep,
    resolve_config,
    retry_delay_ms,
    wants_ctx,
)
from actorflow.workflows.step_options import (
    DELAY_FUNCTION_TIMEOUT_S,
    delay_function,
    delay_kwargs,
    evaluate_delay,
)

if TYPE_CHECKING:
    from actorflow.workflows.engine.instance import InstanceActor

__all__ = ["Execution"]

log = logging.getLogger("actorflow.engine")


def _deadline(now_ms: int, ms: int, where: str) -> int:
    """``now_ms + ms``, refused past what a deadline can hold (the year 9999)."""
    dl = now_ms + ms
    if dl > MAX_EPOCH_MS:
        raise ValueError(f"{where}: the deadline would fall after the year 9999")
    return dl


class _BodySignal(Exception):
    """Carries a BaseException that a sync step body or delay function raised in its thread.

    Thrown into the run's coroutines as it is, a GeneratorExit would close
    them instead of reaching the step's handler, and asyncio re-raises
    SystemExit and KeyboardInterrupt out of the loop: wrapped, it is an
    ordinary failure of the attempt.
    """

    def __init__(self, signal: BaseException) -> None:
        super().__init__(repr(signal))
        self.signal = signal


def _call_body(fn: Callable[[], Any]) -> Any:
    """Calls a sync step body or delay function (in a step thread), wrapping what is not an
    Exception."""
    try:
        return fn()
    except Exception:
        raise
    except BaseException as e:
        raise _BodySignal(e) from e


def _cancelling() -> bool:
    """True if the current task is being cancelled (by the engine, not by user code)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _user_signal(where: str, what: str, exc: BaseException) -> NonRetryableError:
    """The failure of a step or run whose own code raised a BaseException.

    SystemExit, KeyboardInterrupt, GeneratorExit and a CancelledError nobody
    asked for mean "stop" to Python, but here they come from workflow code:
    they fail the step at once (no retries) or the run, with an error that
    says what was raised.
    """
    err = NonRetryableError(
        f"{where}: {what} raised {type(exc).__name__}({exc}); a workflow cannot stop the "
        "process or the engine: it fails instead"
    )
    err.__cause__ = exc
    return err


def _att(a0: int, a1: int, ed: Any, delay: int | None, ran_on: RanOn | None) -> tuple[Any, ...]:
    """An attempt's entry in its step record; where it ran only if not in-process."""
    if ran_on is None:
        return (a0, a1, ed, delay)
    return (a0, a1, ed, delay, ran_on)


class _Waiter:
    __slots__ = ("deadline", "etype", "fut", "key")

    def __init__(
        self, key: bytes | None, deadline: int | None, etype: str | None, fut: asyncio.Future[Any]
    ) -> None:
        self.key = key
        self.deadline = deadline
        self.etype = etype
        self.fut = fut


#: The outcomes of ``run`` (after its rollbacks) that the run's final write records.
_ENDS = (Status.COMPLETE, Status.ERRORED, Status.TERMINATED)

# The lifecycle of a run, as bits of ``Execution.state``. One int, so that the
# per-step checks are one AND. A run moves RUNNING -> HIBERNATING -> SUSPENDED
# (or back to RUNNING if woken while writing its status) and RUNNING -> ENDING
# -> FINISHED; any run ends FINISHED. They are bits, not one value, because
# some overlap: STOPPED comes at any time and the stopped run still unwinds to
# FINISHED (a step call then raises Stop, not "called after run ended"), and a
# run whose branches were hibernating when ``run`` raised is ENDING while its
# HIBERNATING write lands, then SUSPENDED.
RUNNING = 0
HIBERNATING = 1
SUSPENDED = 2
ENDING = 4
FINISHED = 8
STOPPED = 16
# A plain ``def run`` on the loop held it outside its steps: it unwinds with
# Rehome and starts again on a run thread.
MOVING = 32


class Execution:
    """Executes ``run`` for one activation of an instance."""

    # Defaults of the run's state, set per run only when they change: an
    # activation is made per wake-up, and most never change most of them.
    step_calls = 0
    in_flight = 0
    pending = 0
    pause_requested = False
    state = RUNNING  # a set of the lifecycle bits (see RUNNING)
    task: asyncio.Task[Any] | None = None
    slot = True  # holds a concurrency slot until it ends
    _poke_scheduled = False
    _hib_task: asyncio.Task[None] | None = None
    _hib_done: asyncio.Future[None] | None = None
    # Waiters woken so far: a hibernation decided at count n is void if it moved.
    wakeups = 0
    # Step records written by the next commit of the run, whatever it is
    # (see _commit_step).
    _staged: WriteBatch | None = None
    # Saga rollbacks (see _roll_back): the handlers this run's steps registered,
    # by step key; the instance record's ``rb`` while a chain is going on; and
    # whether terminate(rollback=True) asked for it (the replay then stops at
    # the first step not done).
    _rollbacks: dict[bytes, RollbackHook] | None = None
    rolling: dict[str, Any] | None = None
    terminating = False
    # Divergences found for steps that have no record yet, by step key: they
    # go into the record when it is first written (see _follow).
    _dv: dict[bytes, dict[str, Any]] | None = None
    # A plain ``def run``: the thread it runs on, and the step coroutine that
    # thread is blocked on (its calls are the run's sequential ones).
    _run_thread: int | None = None
    _main_coro: Coroutine[Any, Any, Any] | None = None
    # Or the greenlet it runs in on the loop (see actorflow.core.greenlets),
    # and whether a step call of a thread it started was given up.
    _green: LoopGreenlet | None = None
    _gave_up = False

    def __init__(
        self,
        actor: InstanceActor,
        preloaded: tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]]] | None = None,
    ) -> None:
        """Loads the instance's steps and buffered events.

        Args:
            actor: The instance.
            preloaded: The instance's ``(steps, events)`` rows, read by the
                caller in the same loop callback (the supervisor reads those
                of every instance it starts at once in one snapshot). None:
                read them here.
        """
        self.actor = actor
        self.wfe = actor.wfe
        self.ctx = actor.wfe.ctx
        self.loop = self.ctx.loop
        self.ik = actor.ik
        self.rk = actor.rk
        self.limits = self.wfe.limits
        self.ser = self.ctx.storage.serializer
        self.mods = self.ctx.modifiers.get(self.ik)
        self.steps: dict[bytes, StepCheckpoint] = {}
        seq = 0
        if preloaded is None:
            steps, events = self.ctx.storage.scan_prefixes(
                [(STEPS, steps_prefix(self.rk)), (EVENTS, events_prefix(self.rk))]
            )
        else:
            steps, events = preloaded
        recorded = []
        for k, v in steps:
            rec = load_step(v)
            self.steps[k] = rec
            seq = max(seq, rec["seq"] + 1)
            recorded.append((rec["seq"], rec["k"], rec["n"], rec["c"]))
        self.seq = seq
        # The step keys and positions of this replay (matching's rules).
        self.match = StepMatcher(recorded)
        self.inbox: dict[str, collections.deque[tuple[bytes, bytes, int]]] = {}
        for k, v in events:
            ev = load_event(v)
            self.inbox.setdefault(ev["type"], collections.deque()).append((k, ev["p"], ev["ts"]))
        self.waiters: list[_Waiter] = []
        self.t_start = self.ctx.now_ms()
        self._sync_futs: set[concurrent.futures.Future[Any]] = set()
        rb = actor.record.get("rb")
        if rb is not None and rb["o"] == "running":
            self.rolling = rb
            self.terminating = bool(rb.get("t"))
        # What to do once the commit that writes the staged records is durable.
        self._staged_after: list[tuple[StepCheckpoint, bytes | None, bytes | None]] = []

    # The old names of the lifecycle bits, for readers off the hot path.

    @property
    def hibernating(self) -> bool:
        """Writing the "waiting"/"paused" status that unwinds the run, if nothing wakes it."""
        return bool(self.state & HIBERNATING)

    @property
    def suspended(self) -> bool:
        """Hibernated: the status is written, the run only unwinds."""
        return bool(self.state & SUSPENDED)

    @property
    def ending(self) -> bool:
        """``run`` returned or raised: only the final write may land."""
        return bool(self.state & ENDING)

    @property
    def finished(self) -> bool:
        """The run's task is over."""
        return bool(self.state & FINISHED)

    @property
    def stopped(self) -> bool:
        """Stopped (terminate, restart, fenced, shutdown): nothing more is written."""
        return bool(self.state & STOPPED)

    @property
    def where(self) -> str:
        """Names the instance in messages (made when needed: most runs need none)."""
        return self.actor.where

    # -- driving the run ----------------------------------------------------

    def launch(self, settle: bool = True) -> None:
        """Starts ``run`` as a task on the engine loop.

        Args:
            settle: Tell the supervisor once the task has gone as far as it
                can without waiting; False if the caller does it.
        """
        self.task = self.loop.create_task(self._drive())
        if settle:
            # Runs once the task has gone as far as it can without waiting (its
            # first commit, a step's I/O, hibernation): the supervisor's start window.
            self.loop.call_soon(self.ctx.supervisor.slots.settled, self.actor)

    async def _drive(self) -> None:
        actor = self.actor
        assert actor.record is not None
        obs = self.ctx.observer
        if obs is not None:
            obs.run_started(self)
        outcome = self._overridden(await self._run())
        rb: dict[str, Any] | None = None
        if (self._rollbacks is not None or self.rolling is not None) and not self.state & STOPPED:
            outcome, rb = await self._roll_back(outcome)
        if outcome[0] in _ENDS and not self.state & STOPPED:
            try:
                await self._finish(outcome[0], outcome[1], rb)
            except (Stop, asyncio.CancelledError):
                outcome = ("stop", None)
            except BaseException as e:
                outcome = ("crashed", e)
        self.state |= FINISHED
        self._cancel_waiters(Stop)
        if obs is not None:
            obs.run_ended(self, outcome[0], outcome[1])
        actor.execution_ended(self, outcome[0], outcome[1])

    async def _run(self) -> tuple[str, Any]:
        """Runs the workflow's ``run``; returns how it ended: ``(outcome, value)``."""
        wfe, actor = self.wfe, self.actor
        rec = actor.record
        try:
            obj = wfe.cls(wfe.env)
            event = WorkflowEvent(
                payload=self.ser.loads(rec["params"]),
                timestamp=to_datetime(rec["created"] / 1000),
                instance_id=actor.iid,
                workflow_name=wfe.name,
                schedule=_schedule_of(rec),
            )
            if wfe.is_async:
                output = await obj.run(event, WorkflowStep(self, sync=False))
            elif wfe.threaded:
                output = await self.loop.run_in_executor(
                    self.ctx.run_pool, self._run_sync, obj.run, event, WorkflowStep(self, sync=True)
                )
            else:
                greenlets = self.ctx.greenlets
                g = self._green = greenlets.greenlet()
                try:
                    output = await greenlets.run(
                        g,
                        obj.run,
                        (event, WorkflowStep(self, sync=True)),
                        self,
                        self._thrown,
                        self._slice_ended,
                    )
                finally:
                    self._green = None
            return (Status.COMPLETE, output)
        except GeneratorExit as e:
            if not self.loop.is_running():
                raise  # the coroutine is being closed (its loop is gone): do nothing more
            return (Status.ERRORED, _user_signal(self.where, "run", e))
        except Suspend as e:
            # Unwinding left frames -> waiters -> futures -> this exception ->
            # its traceback -> frames: a cycle per run that only the cyclic
            # collector could free, and a full collection over a large heap is
            # what a burst of hibernations would then cost.
            e.__traceback__ = None
            return ("suspended", None)
        except Stop as e:
            e.__traceback__ = None
            return ("stop", None)
        except Unwind as e:
            e.__traceback__ = None
            return ("unwound", None)
        except asyncio.CancelledError as e:
            e.__traceback__ = None
            if self.state & STOPPED or _cancelling():
                return ("stop", None)
            # Raised by the workflow's own code: nobody cancelled this run.
            return (Status.ERRORED, _user_signal(self.where, "run", e))
        except Fatal as f:
            return (Status.ERRORED, f.error)
        except EngineFault as e:
            return ("crashed", e)
        except Exception as e:
            return (Status.ERRORED, e)
        except BaseException as e:
            # SystemExit or KeyboardInterrupt raised by run's own code: a failure
            # of the workflow. Taken as a crash it would be replayed into the
            # same exit on every restart and reopen.
            return (Status.ERRORED, _user_signal(self.where, "run", e))

    def _run_sync(self, run: Callable[..., Any], event: WorkflowEvent, step: WorkflowStep) -> Any:
        """Runs a plain ``def run`` in a thread of the run pool, noting the thread."""
        self._run_thread = threading.get_ident()
        return run(event, step)

    def _thrown(self, exc: BaseException) -> BaseException:
        """What a step call of a greenlet run raises when its awaitable raised ``exc``."""
        if isinstance(exc, asyncio.CancelledError) and (self.state & STOPPED or _cancelling()):
            return Stop()  # as block_on raises it in a run thread
        return exc

    def _slice_ended(self, held: float) -> BaseException | None:
        """After each slice of a greenlet run: one that held the loop too long moves it.

        Returns what to throw into the run instead of awaiting its request:
        Rehome, which unwinds it; it starts again on a thread, as every later
        run of the workflow does.
        """
        if held <= BLOCKING_SLICE_S:
            return None
        self.state |= MOVING
        wfe = self.wfe
        if not wfe.threaded:
            wfe.threaded = True
            log.warning(
                "%s: run held the engine loop for %.2f s outside its steps; it starts again "
                "from its checkpoint on a thread, as every later run of workflow %r will "
                "(slower: put blocking code in steps)",
                self.where,
                held,
                wfe.name,
                extra={"workflow": wfe.name, "instance": self.actor.iid},
            )
        return Rehome()

    def _overridden(self, outcome: tuple[str, Any]) -> tuple[str, Any]:
        """What ``run`` returned or raised after the engine unwound it is void."""
        if self._gave_up and not self.state & STOPPED:
            # A step call of one of its threads was given up (_result_beside):
            # what it returned may rest on that; it is run again on a thread.
            return ("crashed", Rehome())
        if self.state & SUSPENDED and outcome[0] != "suspended":
            # run caught the engine's unwinding (a bare except, or except
            # BaseException, around a step) and went on: what it returned or
            # raised afterwards is void. The instance is hibernated already.
            self._warn_caught("suspended")
            return ("suspended", None)
        if self.state & STOPPED and outcome[0] in (Status.COMPLETE, Status.ERRORED):
            self._warn_caught("stopped")
            return ("stop", None)
        return outcome

    def _warn_caught(self, how: str) -> None:
        log.warning(
            "%s: run went on after the engine %s it (user code caught BaseException around "
            "a step): its result is ignored. Catch Exception, not BaseException, in run.",
            self.where,
            how,
            extra={"workflow": self.wfe.name, "instance": self.actor.iid},
        )

    async def _finish(self, kind: str, value: Any, rb: dict[str, Any] | None = None) -> None:
        """Writes the run's end: ``complete``, ``errored`` or (after the rollbacks
        of ``terminate(rollback=True)``) ``terminated``; ``rb``: how the chain of
        rollbacks ended, if one ran."""
        # Branches still going (siblings of a failed branch of a gather or
        # step.map) must not write after this: their activation would turn the
        # finished instance back into "running".
        self.state |= ENDING
        batch = WriteBatch()
        keys = self._disarm_all(batch)
        actor = self.actor
        before = actor.record
        fields: dict[str, Any] = {}
        if rb is not None or self.rolling is not None:
            fields["rb"] = rb  # the end of the chain (None: it had nothing to run)
        if rb is not None:
            actor.add_history(
                batch,
                "ROLLBACK_COMPLETE" if rb["o"] == "complete" else "ROLLBACK_FAILED",
                {"error": rb["ed"]} if rb["ed"] is not None else None,
            )
        if kind == Status.TERMINATED:
            actor.end_ops(
                batch,
                Status.TERMINATED,
                self.t_start,
                hist="WORKFLOW_TERMINATED",
                hist_data={"trigger": {"source": "api"}, "rollback": True},
                **fields,
            )
        if kind == Status.COMPLETE:
            try:
                data = self.ser.dumps(value)
            except SerializationError as e:
                kind, value = (
                    Status.ERRORED,
                    SerializationError(f"{self.where}: output of run: {e}"),
                )
            else:
                actor.end_ops(
                    batch,
                    Status.COMPLETE,
                    self.t_start,
                    output=data,
                    hist="WORKFLOW_SUCCESS",
                    **fields,
                )
        if kind == Status.ERRORED:
            rolling = self.rolling
            err = rolling["fe"] if rolling is not None and "fe" in rolling else error_dict(value)
            actor.end_ops(
                batch,
                Status.ERRORED,
                self.t_start,
                error=err,
                hist="WORKFLOW_FAILURE",
                hist_data={"error": err},
                **fields,
            )
        # Status reads must not show the end before it is durable: the record
        # that says "complete" becomes the actor's once the commit landed.
        final, actor.record = actor.record, before
        await self._commit(batch, activate=False, final=True)
        actor.record = final
        self.ctx.timers_done(keys)

    # -- saga rollbacks ---------------------------------------------------------

    def _hook(self, where: str, rollback: Any, rollback_config: Any) -> RollbackHook | None:
        """The checked rollback handler of a ``step.do`` call (None: it has none)."""
        if rollback is None and rollback_config is None:
            return None
        return rollback_hook(where, rollback, rollback_config)

    def _register(self, key: bytes, hook: RollbackHook) -> None:
        """Step ``key`` completed (now or in an earlier run) with a rollback handler."""
        if self._rollbacks is None:
            self._rollbacks = {}
        self._rollbacks[key] = hook

    async def _roll_back(
        self, outcome: tuple[str, Any]
    ) -> tuple[tuple[str, Any], dict[str, Any] | None]:
        """Runs the rollback chain, if the way ``run`` ended calls for one.

        The chain is the handlers this run registered (its replay registers
        those of the steps done in earlier runs), in reverse order of step
        start; it stops at the first handler that fails for good. A chain
        already going on (the record's ``rb``: a crash, a hibernation in a
        handler's retry delay) goes on, with the error that started it,
        whatever this replay of ``run`` did.

        Returns:
            The outcome to finish the run with, and how the chain ended
            (None: no chain ran, or it has not ended: suspended, stopped).
        """
        kind = outcome[0]
        rolling, term = self.rolling, self.terminating
        if kind not in (Status.COMPLETE, Status.ERRORED, "unwound"):
            return outcome, None  # suspended, stopped, crashed: the next run goes on
        if term:
            error: BaseException = InvalidInstanceState(
                f"{self.where}: terminated (terminate(rollback=True))",
                workflow=self.wfe.name,
                instance=self.actor.iid,
            )
            end: tuple[str, Any] = (Status.TERMINATED, None)
        elif rolling is not None:
            error = self._failure_of(rolling)
            end = (Status.ERRORED, error)
        elif kind == Status.ERRORED:
            error, end = outcome[1], outcome
        else:
            return outcome, None
        started = rolling is not None and bool(rolling.get("go"))
        steps = self.steps
        chain = sorted(
            (
                (steps[k], hook)
                for k, hook in (self._rollbacks or {}).items()
                if k in steps and steps[k]["s"] == StepStatus.DONE
            ),
            key=lambda p: p[0]["seq"],
            reverse=True,
        )
        if not chain and not started:
            return end, None
        try:
            if not started:
                await self._rollback_start(error, term)
            failure = None
            for rec, hook in chain:
                failure = await self._run_rollback(rec, hook, error)
                if failure is not None:
                    break  # Cloudflare: the chain stops at the first handler that fails
        except (Stop, asyncio.CancelledError):
            return ("stop", None), None
        except Suspend:
            return ("suspended", None), None
        except EngineFault as e:
            return ("crashed", e), None
        return end, {"o": "failed" if failure is not None else "complete", "ed": failure}

    def _failure_of(self, rolling: dict[str, Any]) -> BaseException:
        """The error that started a chain going on, as stored when it started."""
        data = rolling.get("fx")
        decode = None if data is None else functools.partial(self.ser.loads, data)
        return stored_error(decode, rolling.get("fe"), "the instance failed")

    async def _rollback_start(self, error: BaseException, term: bool) -> None:
        """Writes ROLLBACK_START and the chain's state (``rb``) in the instance record."""
        actor = self.actor
        ed = error_dict(error)
        rb: dict[str, Any] = {"o": "running", "ed": None, "go": True, "t": term, "fe": ed}
        rb["fx"] = self._dump_error(error)
        batch = WriteBatch()
        actor.activation_ops(batch)
        actor.status_ops(
            batch, actor.record["s"], hist="ROLLBACK_START", hist_data={"error": ed}, rb=rb
        )
        await self._commit(batch, activate=False)
        self.rolling = rb

    async def _run_rollback(
        self, step: StepCheckpoint, hook: RollbackHook, error: BaseException
    ) -> dict[str, str] | None:
        """Runs the handler of completed step ``step`` as a durable, retried step.

        Returns:
            None once it is complete (now or in an earlier run: it never runs
            again), else the ``{name, message}`` of its failure for good.
        """
        name, count = step["n"], step["c"]
        key = step_key(self.rk, ROLLBACK_KIND, name, count)
        rec = self.steps.get(key)
        if rec is not None:
            if rec["s"] == StepStatus.DONE:
                return None
            if rec["s"] == StepStatus.FAILED:
                return rec.get("ed") or {"name": "Error", "message": "rollback failed"}
        label = f"{name} (rollback)"
        where = self._here(label)
        kwargs: dict[str, Any] = {}
        if "output" in hook.names:
            kwargs["output"] = self.ser.loads(step["r"]) if step.get("r") is not None else None
        if "error" in hook.names:
            kwargs["error"] = error
        if "ctx" in hook.names:
            kwargs["ctx"] = StepContext(
                max(1, len(step.get("att", ()))),
                StepInfo(name, count),
                copy.deepcopy(step.get("cfg") or {}),
            )
        if "step_name" in hook.names:
            kwargs["step_name"] = f"{name}-{count}"  # Cloudflare's stepName
        body = rollback_call(hook.fn, kwargs)
        now = self.now_ms()
        if rec is None:
            rec = {
                "k": ROLLBACK_KIND,
                "n": name,
                "c": count,
                "seq": self._next_seq(),
                "s": StepStatus.RUNNING,
                "cfg": hook.cfg,
                "att": [],
                "t0": now,
            }
        elif rec["s"] == StepStatus.RETRYING and rec.get("dl", 0) > now:
            await self._block(key, rec["dl"], None)
        cfg = rec["cfg"]
        while True:
            await self._gate()
            if self.actor.fenced():
                self.state |= STOPPED
                raise Stop()
            attempt = len(rec["att"]) + 1
            a0 = self.now_ms()
            _, err, ran_on = await self._attempt(
                body, False, attempt, label, count, cfg, where, None
            )
            a1 = self.now_ms()
            if err is None:
                new: StepCheckpoint = {
                    **rec,
                    "s": StepStatus.DONE,
                    "att": [*rec["att"], _att(a0, a1, None, None, ran_on)],
                    "t1": a1,
                }
                new.pop("dl", None)
                await self._commit_step(key, new, disarm=rec.get("tk"))
                return None
            try:
                rec = await self._failed(
                    key, rec, err, attempt, a0, a1, label, where, ran_on, (None, hook.config)
                )
            except Exception:
                return self.steps[key].get("ed") or error_dict(err)

    def stop(self) -> None:
        """Stops the run at once (terminate, restart); its later writes are fenced off."""
        self.state |= STOPPED
        for f in list(self._sync_futs):
            f.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()

    def _cancel_waiters(self, exc: type[BaseException]) -> None:
        for w in list(self.waiters):
            if not w.fut.done():
                w.fut.set_exception(exc())

    # -- commits ------------------------------------------------------------

    async def _commit(
        self,
        batch: WriteBatch,
        activate: bool = True,
        *,
        hibernation: bool = False,
        final: bool = False,
    ) -> None:
        self.pending += 1
        try:
            # A branch woken while the status "waiting"/"paused" is being
            # written waits for that write: the hibernation then either carries
            # on (and this commit sets "running" again) or suspends the run (and
            # this commit must not land after it).
            while self.state & HIBERNATING and not hibernation and self._hib_done is not None:
                await asyncio.shield(self._hib_done)
            state = self.state
            if state & STOPPED or (state & ENDING and not final):
                self.actor.reload_record()  # what the refused batch put in the record
                raise Stop()
            if state & SUSPENDED:
                self.actor.reload_record()
                raise Suspend()
            if activate:
                self.actor.activation_ops(batch)
            staged = self._staged
            if staged is not None:
                # Earlier in the batch: a later write of the same key wins.
                batch.ops[:0] = staged.ops
                after, self._staged, self._staged_after = self._staged_after, None, []
            batch.guard(*self.actor.fence_guard())
            fut = self.loop.create_future()
            self.ctx.storage.submit(batch, self.ctx.notifier.callback(fut))
            await fut
            self.actor.committed()
            if staged is not None:
                for rec, arm, disarm in after:
                    self._step_durable(rec)
                    self._timers_after(arm, disarm)
        except ConflictError:
            self.state |= STOPPED
            self.actor.reload_record()
            raise Stop() from None
        except StorageError as e:
            self.actor.reload_record()
            raise StorageFault(f"{self.where}: commit failed: {e}") from e
        finally:
            self.pending -= 1
            if self.waiters:
                self._poke()

    async def _commit_step(
        self,
        key: bytes,
        rec: StepCheckpoint,
        *,
        arm: bytes | None = None,
        disarm: bytes | None = None,
        batch: WriteBatch | None = None,
        stage: bool = False,
    ) -> None:
        """Writes a step record (with its timer changes) and waits until it is durable.

        With ``stage``, the record is not written now but by the run's next
        commit, whatever that is: a sleep's start goes with the hibernation
        that follows it, and its end with the next step or the run's end.
        Nothing outside the run reads these records before then, and a crash
        before then replays the sleep from its earlier record to the same
        result.
        """
        if stage:
            batch = self._staged = self._staged or WriteBatch()
        else:
            batch = batch or WriteBatch()
        if self._dv is not None and key in self._dv:
            rec["dv"] = self._dv.pop(key)
        if arm:
            rec["tk"] = arm
            TimerService.arm_key(batch, arm)
        else:
            rec.pop("tk", None)
        if disarm != arm:
            TimerService.disarm(batch, disarm)
        batch.put(STEPS, key, dump(rec))
        if stage:
            self.steps[key] = rec
            self._staged_after.append((rec, arm, disarm))
            return
        await self._commit(batch)
        self.steps[key] = rec
        self._step_durable(rec)
        self._timers_after(arm, disarm)

    def _step_durable(self, rec: StepCheckpoint) -> None:
        if rec["s"] == StepStatus.DONE or rec["s"] == StepStatus.FAILED:
            self.ctx.step_rate.add()
        if self.ctx.observer is not None:
            self.ctx.observer.step_committed(self, cast("dict[str, Any]", rec))

    def _timers_after(self, arm: bytes | None, disarm: bytes | None) -> None:
        if disarm and disarm != arm:
            self.ctx.timers.done(disarm, consumed=True)  # the commit deleted it
        if arm:
            self.ctx.timers.kick()

    def _disarm_all(self, batch: WriteBatch, rearm: bool = False) -> list[bytes]:
        """Adds the removal (or re-arming) of every armed timer of the run to ``batch``.

        The caller passes the returned keys to ``ctx.timers_done`` after the
        commit, so that a re-armed timer that had fired is offered again.
        """
        keys = step_timers(self.steps.values())
        for tk in keys:
            if rearm:
                TimerService.arm_key(batch, tk)
            else:
                TimerService.disarm(batch, tk)
        return keys

    # -- blocking and hibernation --------------------------------------------

    async def _block(self, key: bytes | None, deadline: int | None, etype: str | None) -> None:
        fut: asyncio.Future[Any] = self.loop.create_future()
        w = _Waiter(key, deadline, etype, fut)
        self.waiters.append(w)
        self._poke()
        try:
            await fut
        finally:
            self.waiters.remove(w)

    def _poke(self) -> None:
        if not self._poke_scheduled and not self.state & FINISHED:
            self._poke_scheduled = True
            self.loop.call_soon(self._check_idle)

    def _check_idle(self) -> None:
        self._poke_scheduled = False
        if (
            not self.waiters
            or self.in_flight
            or self.pending
            or self.state & (HIBERNATING | STOPPED | SUSPENDED)
        ):
            return
        now = self.now_ms()
        for w in self.waiters:
            if w.fut.done():
                return  # woken, its branch has not resumed yet: it is not blocked
            ready = (w.deadline is not None and w.deadline <= now) or (
                w.etype is not None and self.inbox.get(w.etype)
            )
            if ready:
                self._wake(w)
                return
        self.state |= HIBERNATING
        self._hib_done = self.loop.create_future()
        # The loop keeps only weak references to tasks: hold this one.
        self._hib_task = self.loop.create_task(self._hibernate(self.wakeups))

    def _wake(self, w: _Waiter) -> None:
        w.fut.set_result(None)
        self.wakeups += 1

    async def _hibernate(self, seen: int) -> None:
        """Writes "waiting" (or "paused") and unwinds the run, unless it was woken meanwhile.

        Args:
            seen: :attr:`wakeups` when every branch was found blocked.
        """
        try:
            while True:
                paused = self.pause_requested
                batch = WriteBatch()
                keys = self._disarm_all(batch, rearm=not paused)
                waits = sorted({w.etype for w in self.waiters if w.etype})
                self.actor.activation_ops(batch)
                self.actor.status_ops(
                    batch,
                    Status.PAUSED if paused else Status.WAITING,
                    waits=waits,
                    hist="WORKFLOW_PAUSED" if paused else None,
                )
                try:
                    await self._commit(batch, activate=False, hibernation=True)
                except BaseException as e:
                    for w in list(self.waiters):
                        if not w.fut.done():
                            w.fut.set_exception(
                                e if isinstance(e, Stop | EngineFault) else EngineFault(repr(e))
                            )
                    return
                self.ctx.timers_done(keys)
                woken = self.wakeups != seen or any(w.fut.done() for w in self.waiters)
                if woken and not self.pause_requested:
                    return  # woken while writing the status: carry on running
                if self.pause_requested != paused:
                    continue  # paused or resumed meanwhile: write the status that holds now
                break
            self.state |= SUSPENDED
            self._cancel_waiters(Suspend)
        finally:
            self.state &= ~HIBERNATING
            if self._hib_done is not None and not self._hib_done.done():
                self._hib_done.set_result(None)

    def on_timer(self) -> bool:
        """A timer of this instance fired; wakes the waiters that are due."""
        now = self.now_ms()
        hit = False
        for w in self.waiters:
            if w.deadline is not None and w.deadline <= now and not w.fut.done():
                self._wake(w)
                hit = True
        return hit

    def on_event(self, etype: str, key: bytes, data: bytes, ts: int) -> None:
        """A durable event arrived; hands it to the first waiter of its type."""
        self.inbox.setdefault(etype, collections.deque()).append((key, data, ts))
        for w in self.waiters:
            if w.etype == etype and not w.fut.done():
                self._wake(w)
                break

    def request_pause(self) -> bool:
        """Asks the run to pause at its next step boundary; True if it can pause now."""
        self.pause_requested = True
        self._poke()
        return not self.in_flight and not self.pending

    def cancel_pause(self) -> None:
        """Withdraws a pause request; blocked steps go on."""
        self.pause_requested = False
        for w in self.waiters:
            if w.key is None and w.deadline is None and w.etype is None and not w.fut.done():
                self._wake(w)

    async def _gate(self) -> None:
        self._check_live()
        while self.pause_requested:
            await self._block(None, None, None)

    # -- helpers -------------------------------------------------------------

    def _check_live(self) -> None:
        """Refuses a step call once the run has been unwound, stopped or has ended.

        User code that catches BaseException around a step swallows the
        engine's unwinding; the next step call raises it again, before any
        body runs (a body run then could never be checkpointed).
        """
        state = self.state
        if not state & (STOPPED | SUSPENDED | FINISHED | MOVING):
            return
        if state & STOPPED:
            raise Stop()
        if state & MOVING:
            raise Rehome()
        if state & SUSPENDED:
            raise Suspend()
        if state & FINISHED:
            raise InvalidInstanceState(
                f"{self.where}: a step was called after run ended; the step object "
                "is valid only while run executes",
                workflow=self.wfe.name,
                instance=self.actor.iid,
            )

    def now_ms(self) -> int:
        return self.ctx.now_ms()

    def _check_name(self, name: str) -> None:
        # Names already seen valid skip the check: it runs for every step call.
        if name not in self.ctx.valid_names:
            validate_step_name(name, self.where)
            self.ctx.remember_name(name)

    def _key(self, kind: str, name: str) -> tuple[bytes, int]:
        m = self.match
        count = m.count(kind, name)
        key = step_key(self.rk, kind, name, count)
        if m.pos < m.n:  # replaying the recorded steps: compare the call with them
            self._follow(kind, name, count, key)
        return key, count

    def _follow(self, kind: str, name: str, count: int, key: bytes) -> None:
        """Compares a step call with the recorded step at its position (matching's rules).

        A divergence is logged and kept in the record of the step the code now
        calls there (once: a later replay that finds it recorded says nothing).
        """
        dv = self.match.follow((kind, name, count), self._sequential())
        if dv is None:
            return
        doc = dv.record()
        rec = self.steps.get(key)
        if rec is not None and rec.get("dv") == doc:
            return
        log.warning(
            "%s: the workflow's code diverged from the instance's recorded steps at %s; "
            "a changed step order or name reuses or skips recorded results "
            "(use step.patched() to change a running workflow)",
            self.where,
            dv.describe(),
            extra={"workflow": self.wfe.name, "instance": self.actor.iid, "step": name},
        )
        if rec is None:
            if self._dv is None:
                self._dv = {}
            self._dv[key] = doc
        else:
            self._stage_record(key, cast("StepCheckpoint", {**rec, "dv": doc}))

    def _sequential(self) -> bool:
        """True if the current step call comes from the run's own flow, not a branch.

        The task of an ``async def run``; for a plain ``def run``, the step
        its thread is blocked on. Branches (``step.map``, ``gather``, tasks
        and threads of ``run``) run in tasks of their own.
        """
        task = asyncio.current_task()
        if task is None:
            return False
        if task is self.task:
            return True
        main = self._main_coro
        return main is not None and task.get_coro() is main

    def _stage_record(self, key: bytes, rec: StepCheckpoint) -> None:
        """Writes a step record with the run's next commit (see :meth:`_commit_step`)."""
        batch = self._staged = self._staged or WriteBatch()
        batch.put(STEPS, key, dump(rec))
        self.steps[key] = rec

    def patched(self, patch_id: str) -> bool:
        """``step.patched``: the recorded answer, or the answer decided now and recorded.

        Decided the first time the instance reaches the call: False if a
        recorded step has not been met by this replay yet (the instance runs
        past this point on older code), else True. The record rides on the
        run's next commit: a crash before it replays to the same answer.
        """
        self._check_live()
        if not isinstance(patch_id, str):
            raise TypeError(
                f"{self.where}: step.patched needs a patch id that is a str, "
                f"got {type(patch_id).__name__} {patch_id!r}"
            )
        validate_step_name(patch_id, f"{self.where}, patch {patch_id!r}")
        key = step_key(self.rk, PATCH_KIND, patch_id, 1)
        rec = self.steps.get(key)
        if rec is not None:
            return bool(rec.get("pa"))
        answer = not self.match.unreached((r["k"], r["n"], r["c"]) for r in self.steps.values())
        now = self.now_ms()
        self._stage_record(
            key,
            {
                "k": PATCH_KIND,
                "n": patch_id,
                "c": 1,
                "seq": self._next_seq(),
                "s": StepStatus.DONE,
                "pa": answer,
                "t0": now,
                "t1": now,
            },
        )
        return answer

    def _timer(self, deadline_ms: int, key: bytes) -> bytes:
        """The timer key of step ``key``'s deadline (its target names the instance)."""
        return timer_key(deadline_ms, WAKE_KIND, step_target(self.ik, self.rk, key))

    def _next_seq(self) -> int:
        self.seq += 1
        return self.seq - 1

    def _here(self, name: str) -> str:
        return f"{self.where}, step {name!r}"

    def _dump_error(self, err: BaseException) -> bytes | None:
        try:
            return self.ser.dumps(err)
        except Exception:
            return None

    def _stored_error(self, rec: StepCheckpoint) -> BaseException:
        data = rec.get("e")
        decode = None if data is None else functools.partial(self.ser.loads, data)
        return stored_error(decode, rec.get("ed"), "step failed")

    def _crash_point(self, name: str, point: str) -> None:
        if self.mods is not None and self.mods.take_crash(name, point):
            raise InjectedCrash(f"{self._here(name)}: injected crash {point}")

    def block_on(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Runs a step coroutine on the loop from a sync run's thread and waits for it."""
        try:
            self._check_live()
        except BaseException:
            coro.close()
            raise
        g = self._green
        if g is not None and getcurrent() is g:
            return await_on_loop(coro)  # awaited in the run's task
        if self._run_thread == threading.get_ident():
            self._main_coro = coro  # the run's own flow (see _sequential)
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._sync_futs.add(fut)
        try:
            if g is None:
                return fut.result()
            return self._result_beside(fut)
        except concurrent.futures.CancelledError:
            raise Stop() from None
        finally:
            self._sync_futs.discard(fut)

    def _result_beside(self, fut: concurrent.futures.Future[Any]) -> Any:
        """Waits in a thread of a greenlet run (one the run started) for a step call.

        The loop serves the call only once the run's greenlet lets it go: if
        the run holds the loop meanwhile (it waits for this very thread, say),
        it never would. Then the call is given up with Rehome, and the run
        moves to a thread when its slice ends (see :meth:`_slice_ended`).
        """
        while True:
            try:
                return fut.result(BLOCKING_SLICE_S)
            except concurrent.futures.TimeoutError:
                if self.ctx.slices.held(self) < BLOCKING_SLICE_S:
                    continue
                # The slice's end moves the run (_slice_ended): only give up here.
                self._gave_up = True
                fut.cancel()
                raise Rehome() from None

    async def gather(self, coros: list[Coroutine[Any, Any, Any]], limit: int | None) -> list[Any]:
        """Runs step coroutines concurrently; results in order."""
        if limit is not None and limit > 0:
            sem = asyncio.Semaphore(limit)

            async def bounded(c: Coroutine[Any, Any, Any]) -> Any:
                async with sem:
                    return await c

            return list(await asyncio.gather(*(bounded(c) for c in coros)))
        return list(await asyncio.gather(*coros))

    # -- step.do ---------------------------------------------------------------

    async def do(
        self,
        name: str,
        fn: Callable[..., Any],
        retries: Any,
        timeout: Any,
        config: Any,
        resources: Any = None,
        rollback: Any = None,
        rollback_config: Any = None,
    ) -> Any:
        where = self._here(name)
        self._check_live()
        self._check_name(name)
        if not callable(fn):
            raise TypeError(f"{where}: step.do needs a callable")
        hook = self._hook(where, rollback, rollback_config)
        self.step_calls += 1
        if self.step_calls > self.limits.max_steps:
            raise Fatal(
                LimitExceeded(
                    f"{where}: the limit of {self.limits.max_steps} steps has been reached",
                    workflow=self.wfe.name,
                    instance=self.actor.iid,
                    step=name,
                )
            )
        key, count = self._key("do", name)
        rec = self.steps.get(key)
        if rec is not None:
            if rec["s"] == StepStatus.DONE:
                if hook is not None:
                    self._register(key, hook)
                return self.ser.loads(rec["r"])
            if rec["s"] == StepStatus.FAILED:
                raise self._stored_error(rec)
            cfg = rec["cfg"]
        else:
            cfg = resolve_config(where, config, retries, timeout)
        if self.terminating:
            raise Unwind()
        if resources is not None:
            resources = check_resources(resources, where)
        await self._gate()
        now = self.now_ms()
        if rec is None:
            rec = {
                "k": "do",
                "n": name,
                "c": count,
                "seq": self._next_seq(),
                "s": StepStatus.RUNNING,
                "cfg": cfg,
                "att": [],
                "t0": now,
            }
        elif rec["s"] == StepStatus.RETRYING and rec.get("dl", 0) > now:
            await self._block(key, rec["dl"], None)
        use_ctx = wants_ctx(fn)
        while True:
            attempt = len(rec["att"]) + 1
            if self.actor.fenced():
                # Another node took the instance over (this one was frozen):
                # a body started now could only repeat one it committed.
                self.state |= STOPPED
                raise Stop()
            self._crash_point(name, "before")
            a0 = self.now_ms()
            value, err, ran_on = await self._attempt(
                fn, use_ctx, attempt, name, count, cfg, where, resources
            )
            a1 = self.now_ms()
            if err is None:
                value = await self._succeeded(key, rec, value, a0, a1, name, where, ran_on)
                if hook is not None:
                    self._register(key, hook)
                return value
            rec = await self._failed(
                key, rec, err, attempt, a0, a1, name, where, ran_on, (retries, config)
            )

    async def _attempt(
        self,
        fn: Callable[..., Any],
        use_ctx: bool,
        attempt: int,
        name: str,
        count: int,
        cfg: dict[str, Any],
        where: str,
        resources: dict[str, float] | None,
    ) -> tuple[Any, BaseException | None, RanOn | None]:
        """Runs one attempt of a step body.

        Returns:
            Its value, or the error it failed with, and where it ran when an
            executor ran it (None: in the runtime's process).
        """
        mock = self.mods.step_mock(name) if self.mods is not None else None
        # Where a remote executor ran the attempt (filled by _remote).
        box: list[RanOn] | None = [] if self.ctx.executor is not None else None
        value: Any = None
        err: BaseException | None = None
        self.in_flight += 1
        try:
            if mock is not None:
                kind, payload = mock
                if kind == "error":
                    raise payload
                return payload, None, None
            value = await self._invoke(fn, use_ctx, attempt, name, count, cfg, resources, box)
        except (Suspend, Stop, Fatal, EngineFault):
            raise
        except asyncio.CancelledError as e:
            if self.state & STOPPED or _cancelling():
                raise
            err = _user_signal(where, "the step body", e)  # raised by the body itself
        except _BodySignal as e:
            err = _user_signal(where, "the step body", e.signal)
        except Exception as e:
            err = e
        except BaseException as e:
            # SystemExit, KeyboardInterrupt, GeneratorExit raised by the body:
            # out of a step they would end the engine loop, and the step would
            # rerun into the same exit on every reopen. The step fails instead.
            err = _user_signal(where, "the step body", e)
        finally:
            self.in_flight -= 1
            if self.waiters:
                self._poke()
        return value, err, (box[0] if box else None)

    async def _succeeded(
        self,
        key: bytes,
        rec: StepCheckpoint,
        value: Any,
        a0: int,
        a1: int,
        name: str,
        where: str,
        ran_on: RanOn | None = None,
    ) -> Any:
        """Checkpoints a step's result; a result that cannot be stored fails the instance."""
        self._crash_point(name, "after_body")
        fatal: ActorflowError | None = None
        try:
            data = self.ser.dumps(value)
        except SerializationError as e:
            fatal = SerializationError(
                f"{where}: value returned from the step is not serializable: {e}",
                workflow=self.wfe.name,
                instance=self.actor.iid,
                step=name,
            )
        else:
            if len(data) > self.limits.max_step_result_bytes:
                fatal = LimitExceeded(
                    f"{where}: output is too large ({len(data)} bytes); the maximum is "
                    f"{self.limits.max_step_result_bytes} bytes",
                    workflow=self.wfe.name,
                    instance=self.actor.iid,
                    step=name,
                )
        if fatal is not None:
            # The step's record says why it failed; it lands with the
            # instance's failure, in the run's final commit.
            ed = error_dict(fatal)
            new: StepCheckpoint = {
                **rec,
                "s": StepStatus.FAILED,
                "att": [*rec["att"], _att(a0, a1, ed, None, ran_on)],
                "t1": a1,
                "ed": ed,
                "e": self._dump_error(fatal),
            }
            new.pop("dl", None)
            await self._commit_step(key, new, disarm=rec.get("tk"), stage=True)
            raise Fatal(fatal)
        new = {
            **rec,
            "s": StepStatus.DONE,
            "r": data,
            "att": [*rec["att"], _att(a0, a1, None, None, ran_on)],
            "t1": a1,
        }
        new.pop("dl", None)
        await self._commit_step(key, new, disarm=rec.get("tk"))
        self._crash_point(name, "after_commit")
        return value

    async def _failed(
        self,
        key: bytes,
        rec: StepCheckpoint,
        err: BaseException,
        attempt: int,
        a0: int,
        a1: int,
        name: str,
        where: str,
        ran_on: RanOn | None = None,
        options: tuple[Any, Any] = (None, None),
    ) -> StepCheckpoint:
        """Records a failed attempt: raises it once the step has failed for good, else
        waits out the retry delay and returns the step's record for the next attempt.

        ``options`` is the ``(retries, config)`` of the step call, where a delay
        function comes from (a stored config has none).
        """
        ed = error_dict(err)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s: attempt %d failed: %s: %s",
                where,
                attempt,
                ed["name"],
                ed["message"],
                extra={
                    "workflow": self.wfe.name,
                    "step": name,
                    "instance": self.actor.iid,
                    "attempt": attempt,
                },
            )
        cfg = rec["cfg"]
        final: BaseException | None = err
        if not (
            isinstance(err, NonRetryableError)
            or attempt > cfg["retries"]["limit"]
            or getattr(err, "retryable", True) is False
        ):
            final = None
            if self.mods is not None and self.mods.no_retry_delays:
                delay = 0
            elif "delay" in cfg["retries"]:
                delay = retry_delay_ms(cfg, attempt)
            else:
                delay, final = await self._dynamic_delay(rec, err, attempt, where, options)
        if final is not None:
            failed: StepCheckpoint = {
                **rec,
                "s": StepStatus.FAILED,
                "att": [*rec["att"], _att(a0, a1, ed, None, ran_on)],
                "t1": a1,
                "ed": ed if final is err else error_dict(final),
                "e": self._dump_error(final),
            }
            await self._commit_step(key, failed, disarm=rec.get("tk"))
            raise final
        dl = _deadline(a1, delay, where)
        new: StepCheckpoint = {
            **rec,
            "s": StepStatus.RETRYING,
            "att": [*rec["att"], _att(a0, a1, ed, delay, ran_on)],
            "dl": dl,
        }
        tk = self._timer(dl, key) if delay > 0 else None
        await self._commit_step(key, new, arm=tk, disarm=rec.get("tk"))
        if delay > 0:
            await self._block(key, dl, None)
        return new

    async def _dynamic_delay(
        self,
        rec: StepCheckpoint,
        err: BaseException,
        attempt: int,
        where: str,
        options: tuple[Any, Any],
    ) -> tuple[int, NonRetryableDelayError | None]:
        """Calls the step's delay function after failed attempt ``attempt``.

        Returns:
            The wait (its result through the backoff), or the error that fails
            the step at once: the function raised, took too long, gave no
            valid duration, or is missing (the step started with one).
        """
        cfg = rec["cfg"]
        name, count = rec["n"], rec["c"]
        fn = delay_function(*options)
        try:
            if fn is None:
                raise ValueError(
                    "the step started with a delay function and this call of step.do gives "
                    "none (the workflow's code changed)"
                )
            wanted = delay_kwargs(fn, where)
            kwargs: dict[str, Any] = {}
            if "ctx" in wanted:
                kwargs["ctx"] = StepContext(attempt, StepInfo(name, count), copy.deepcopy(cfg))
            if "error" in wanted:
                kwargs["error"] = err
            # In flight like a step body: the run must not hibernate under it.
            self.in_flight += 1
            try:
                base = await evaluate_delay(fn, kwargs, self._in_step_thread, where)
            finally:
                self.in_flight -= 1
                if self.waiters:
                    self._poke()
        except (Suspend, Stop, Fatal, EngineFault):
            raise
        except asyncio.CancelledError:
            if self.state & STOPPED or _cancelling():
                raise
            return 0, self._delay_error(where, name, attempt, "was cancelled", None)
        except _BodySignal as e:  # it raised SystemExit, KeyboardInterrupt, GeneratorExit
            how = f"raised {type(e.signal).__name__}"
            return 0, self._delay_error(where, name, attempt, how, e.signal)
        except TimeoutError as e:
            how = f"took longer than {DELAY_FUNCTION_TIMEOUT_S:g} s"
            return 0, self._delay_error(where, name, attempt, how, e)
        except Exception as e:
            return 0, self._delay_error(where, name, attempt, f"failed: {type(e).__name__}: {e}", e)
        return retry_delay_ms(cfg, attempt, base), None

    def _delay_error(
        self, where: str, name: str, attempt: int, how: str, cause: BaseException | None
    ) -> NonRetryableDelayError:
        err = NonRetryableDelayError(
            f"{where}: the retry delay function after attempt {attempt} {how}; the step "
            "fails without further retries",
            workflow=self.wfe.name,
            instance=self.actor.iid,
            step=name,
        )
        err.__cause__ = cause
        return err

    async def _invoke(
        self,
        fn: Callable[..., Any],
        use_ctx: bool,
        attempt: int,
        name: str,
        count: int,
        cfg: dict[str, Any],
        resources: dict[str, float] | None = None,
        box: list[RanOn] | None = None,
    ) -> Any:
        args: tuple[Any, ...] = ()
        if use_ctx:
            args = (StepContext(attempt, StepInfo(name, count), copy.deepcopy(cfg)),)
        if self.mods is not None and self.mods.forced_timeout(name):
            raise StepTimeoutError(f"{self._here(name)}: attempt {attempt} timed out (forced)")
        executor = self.ctx.executor
        if executor is not None:
            return await self._remote(executor, fn, args, attempt, name, cfg, resources, box)
        # Sync bodies run in a step thread; a timeout gives up on the attempt
        # (the thread cannot be stopped), an async body is cancelled.
        watch = self.ctx.watchdog.arm(cfg["timeout"] / 1000.0)
        try:
            if inspect.iscoroutinefunction(fn):
                return await fn(*args)
            value = await self._in_step_thread(functools.partial(fn, *args))
            if inspect.isawaitable(value):
                value = await value
            return value
        except asyncio.CancelledError:
            if watch.fired:
                asyncio.current_task().uncancel()  # type: ignore[union-attr]
                raise self._timed_out(name, attempt, cfg) from None
            raise
        finally:
            self.ctx.watchdog.disarm(watch)

    def _in_step_thread(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Calls a sync step body or delay function in a step thread (see ThreadCalls)."""
        return self.ctx.body_calls.call(functools.partial(_call_body, fn))

    async def _remote(
        self,
        executor: StepExecutor,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        attempt: int,
        name: str,
        cfg: dict[str, Any],
        resources: dict[str, float] | None,
        box: list[RanOn] | None,
    ) -> Any:
        """Runs one attempt on a remote executor; cancels it on a timeout or a stop."""
        try:
            call = executor.submit(fn, args, resources)
        except SerializationError as e:
            # It would fail alike on every attempt: the step fails at once.
            raise SerializationError(
                f"{self._here(name)}: {e}",
                workflow=self.wfe.name,
                instance=self.actor.iid,
                step=name,
                retryable=False,
            ) from None
        try:
            async with asyncio.timeout(cfg["timeout"] / 1000.0) as cm:
                return await call.wait()
        except TimeoutError:
            if cm.expired():
                call.cancel()
                raise self._timed_out(name, attempt, cfg) from None
            raise
        except asyncio.CancelledError:
            call.cancel()  # the run stopped (terminate, restart, shutdown)
            raise
        finally:
            if box is not None:
                box.append(call.ran_on)

    def _timed_out(self, name: str, attempt: int, cfg: dict[str, Any]) -> StepTimeoutError:
        return StepTimeoutError(
            f"{self._here(name)}: attempt {attempt} timed out after {cfg['timeout']} ms",
            workflow=self.wfe.name,
            instance=self.actor.iid,
            step=name,
        )

    # -- sleeps -----------------------------------------------------------------

    async def sleep(self, name: str, duration: Any) -> None:
        self._check_live()
        self._check_name(name)
        ms = parse_duration_ms(duration, what=self._here(name))
        await self._sleep(name, None, ms)

    async def sleep_until(self, name: str, when: Any) -> None:
        self._check_live()
        self._check_name(name)
        if type(when) is not int:  # epoch ms as an int: nothing to convert or check
            when = to_epoch_ms(when, what=self._here(name))
        await self._sleep(name, when, 0)

    async def _sleep(self, name: str, until: int | None, ms: int) -> None:
        key, count = self._key("sleep", name)
        rec = self.steps.get(key)
        if rec is not None and rec["s"] == StepStatus.DONE:
            return
        if self.terminating:
            raise Unwind()
        if self.state & STOPPED or self.pause_requested:
            await self._gate()
        now = self.now_ms()
        if rec is None:
            dl = until if until is not None else _deadline(now, ms, self._here(name))
            if self.mods is not None and self.mods.no_sleeps:
                dl = now
            rec = {
                "k": "sleep",
                "n": name,
                "c": count,
                "seq": self._next_seq(),
                "s": StepStatus.SLEEPING,
                "dl": dl,
                "t0": now,
            }
            if dl > now:
                await self._commit_step(key, rec, arm=self._timer(dl, key), stage=True)
        if rec["dl"] > now:
            await self._block(key, rec["dl"], None)
            now = self.now_ms()
        new: StepCheckpoint = {**rec, "s": StepStatus.DONE, "t1": now}
        await self._commit_step(key, new, disarm=rec.get("tk"), stage=True)

    # -- events -----------------------------------------------------------------

    async def wait_for_event(self, name: str, event_type: str, timeout: Any) -> WorkflowStepEvent:
        where = self._here(name)
        self._check_live()
        self._check_name(name)
        validate_event_type(event_type, where)
        ms = parse_duration_ms(timeout, what=f"{where}: timeout")
        if ms <= 0:
            raise ValueError(f"{where}: timeout must be greater than 0")
        key, count = self._key("wait_for_event", name)
        rec = self.steps.get(key)
        if rec is not None:
            if rec["s"] == StepStatus.DONE:
                data, ts = rec["ev"]
                return WorkflowStepEvent(rec["ty"], self.ser.loads(data), to_datetime(ts / 1000))
            if rec["s"] == StepStatus.FAILED:
                raise self._stored_error(rec)
        if self.terminating:
            raise Unwind()
        await self._gate()
        if self.mods is not None:
            mocked = self.mods.event_mock(event_type)
            if mocked is not None and not self.inbox.get(event_type):
                self.inbox.setdefault(event_type, collections.deque()).append(
                    (b"", self.ser.dumps(mocked), self.now_ms())
                )
        forced = self.mods is not None and self.mods.forced_event_timeout(name)
        if rec is None:
            now = self.now_ms()
            rec = {
                "k": "wait_for_event",
                "n": name,
                "c": count,
                "seq": self._next_seq(),
                "s": StepStatus.WAITING,
                "ty": event_type,
                "dl": _deadline(now, ms, where),
                "t0": now,
            }
            if not self.inbox.get(event_type) and not forced:
                await self._commit_step(key, rec, arm=self._timer(rec["dl"], key))
        while True:
            queue = self.inbox.get(event_type)
            if queue and not forced:
                ekey, data, ts = queue.popleft()
                batch = WriteBatch()
                if ekey:
                    batch.delete(EVENTS, ekey)  # consumed in the same commit as the result
                new: StepCheckpoint = {
                    **rec,
                    "s": StepStatus.DONE,
                    "ev": (data, ts),
                    "t1": self.now_ms(),
                }
                new.pop("dl", None)
                await self._commit_step(key, new, disarm=rec.get("tk"), batch=batch)
                return WorkflowStepEvent(event_type, self.ser.loads(data), to_datetime(ts / 1000))
            if forced or self.now_ms() >= rec["dl"]:
                err = EventTimeoutError(
                    f"{where}: no {event_type!r} event arrived within {ms} ms",
                    workflow=self.wfe.name,
                    instance=self.actor.iid,
                    step=name,
                )
                new = {
                    **rec,
                    "s": StepStatus.FAILED,
                    "t1": self.now_ms(),
                    "ed": error_dict(err),
                    "e": self._dump_error(err),
                }
                await self._commit_step(key, new, disarm=rec.get("tk"))
                raise err
            await self._block(key, rec["dl"], event_type)


def _schedule_of(rec: Any) -> dict[str, Any] | None:
    """``event.schedule`` of an instance a cron schedule created (else None)."""
    sch = rec.get("sch")
    if sch is None:
        return None
    return {"cron": sch["c"], "scheduled_time": to_datetime(sch["t"] / 1000)}
