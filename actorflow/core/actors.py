"""A pykka actor type that runs many actors on a bounded set of threads.

Pykka's :class:`pykka.ThreadingActor` gives every actor its own OS thread. That
caps a process at about 20,000 actors and slows messaging sharply long before
that. :class:`PooledActor` keeps pykka's model (``ActorRef``, ``tell``,
``ask``, futures, ``on_start``/``on_stop``/``on_failure``, one message at a
time, in arrival order) but an idle actor owns no thread: when a message
arrives, the actor is scheduled on an :class:`Executor`, handles a slice of
its inbox, and gives the thread back.

Two executors exist:

* :class:`ThreadExecutor`, a fixed pool of worker threads, for actors whose
  handlers may block (user Durable Objects).
* :class:`LoopExecutor`, an asyncio event loop, for actors whose handlers are
  short or ``async`` (workflow instances). A handler that returns an
  awaitable is awaited before the actor's next message is taken: the
  actor's input gate stays closed until the reply is ready.

Actors made here are not put in pykka's process-wide ``ActorRegistry``: each
runtime keeps its own table of live actors.

Besides pykka's ``ActorRef.tell``/``ask``, an owner may post envelopes with
:meth:`PooledActor.post` and shut the inbox with :meth:`PooledActor.close`;
both take the actor's scheduling lock, so "is the actor still taking
messages?" and "enqueue" are one atomic step (no message can slip into the
inbox of an actor being evicted). :class:`LatchFuture` is a cheaper
:class:`pykka.Future` for one-shot replies.
"""

from __future__ import annotations

import _thread
import asyncio
import collections
import functools
import inspect
import logging
import os
import queue
import sys
import threading
import weakref
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import pykka
from pykka import messages

# pykka exports no name for its envelope type (4.x): the one import of it from
# pykka's private module is here, and the rest of actorflow takes it from us.
from pykka._envelope import Envelope

from actorflow.core.greenlets import in_loop_greenlet, offload

__all__ = [
    "Envelope",
    "Executor",
    "LatchFuture",
    "LoopExecutor",
    "PooledActor",
    "StopFlag",
    "ThreadExecutor",
]

log = logging.getLogger("actorflow.actors")

_SLICE = 32  # messages handled per scheduling, so one busy actor cannot starve the rest
T = TypeVar("T")
# pykka's immutable "no hook result" marker, which it names only privately.
_UNSET: Any = pykka.Future()._get_hook_result  # noqa: SLF001 - pykka has no public name for it


class LatchFuture(pykka.Future[T]):
    """A one-shot :class:`pykka.Future` on a bare lock.

    :class:`pykka.ThreadingFuture` builds a ``Condition`` (an ``RLock`` plus a
    waiter lock per ``get``) for every reply; a held lock that ``set``
    releases does the same job for a single producer at a fraction of the
    cost. Behaves like ``ThreadingFuture``: ``get`` may be called many times
    and from many threads, ``get(timeout=...)`` raises :class:`pykka.Timeout`,
    and setting twice raises :class:`queue.Full`.
    """

    __slots__ = ("_exc_info", "_latch", "_set", "_value")

    def __init__(self) -> None:
        # pykka.Future.__init__ minus a fresh "unset" marker per future.
        self._get_hook = None
        self._get_hook_result = _UNSET
        self._latch = _thread.allocate_lock()
        self._latch.acquire()
        self._set = False
        self._value: Any = None
        self._exc_info: Any = None

    def get(self, *, timeout: float | None = None) -> T:
        if self._get_hook is not None:
            return super().get(timeout=timeout)
        if not self._set:
            if in_loop_greenlet():
                # A def run on the engine loop: the reply may need the loop.
                return offload(functools.partial(self.get, timeout=timeout))
            if timeout is None:
                self._latch.acquire()
            elif not self._latch.acquire(timeout=max(0.0, timeout)):
                raise pykka.Timeout(f"{timeout} seconds")
            # Let every other waiter through too.
            self._latch.release()
        if self._exc_info is not None:
            _type, value, tb = self._exc_info
            if value is None:
                value = _type()
            if value.__traceback__ is not tb:
                raise value.with_traceback(tb)
            raise value
        result: T = self._value
        return result

    def set(self, value: Any | None = None) -> None:
        if self._set or self._get_hook is not None:
            raise queue.Full
        self._value = value
        self._set = True
        self._latch.release()

    def set_exception(self, exc_info: Any = None) -> None:
        if exc_info is None:
            exc_info = sys.exc_info()
        if self._set or self._get_hook is not None:
            raise queue.Full
        self._exc_info = exc_info
        self._set = True
        self._latch.release()

    def done(self) -> bool:
        """Whether a value or an exception has been set."""
        return self._set


class Executor(Protocol):
    """Runs callables on behalf of actors."""

    def schedule(self, fn: Callable[[], None]) -> None:
        """Runs ``fn`` soon, on one of the executor's threads."""
        ...


class ThreadExecutor:
    """A fixed pool of worker threads shared by many actors.

    Args:
        size: The number of worker threads (the most handlers running at once).
        name: A prefix for the threads' names.
    """

    def __init__(self, size: int, name: str = "actorflow-pool") -> None:
        if size < 1:
            raise ValueError("pool size must be at least 1")
        self.size = size
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._threads = [
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True)
            for i in range(size)
        ]
        for t in self._threads:
            t.start()

    def schedule(self, fn: Callable[[], None]) -> None:
        self._queue.put(fn)

    def _work(self) -> None:
        q = self._queue
        while True:
            fn = q.get()
            if fn is None:
                return
            try:
                fn()
            except BaseException:
                log.exception("actor slice crashed a pool thread's task")

    def shutdown(self, wait: bool = True) -> None:
        """Stops the workers after the queued work is done."""
        for _ in self._threads:
            self._queue.put(None)
        if wait:
            for t in self._threads:
                if t is not threading.current_thread():
                    t.join()


class LoopExecutor:
    """Runs actor slices as callbacks on one asyncio event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._thread_id: int | None = None

    def bind_thread(self) -> None:
        """Records the loop's thread, to skip the thread-safe path there."""
        self._thread_id = threading.get_ident()

    def schedule(self, fn: Callable[[], None]) -> None:
        if threading.get_ident() == self._thread_id:
            self.loop.call_soon(fn)
        else:
            self.loop.call_soon_threadsafe(fn)


class _Inbox:
    """An unbounded FIFO inbox that schedules its actor when a message arrives."""

    __slots__ = ("_owner", "items")

    def __init__(self) -> None:
        #: The envelopes waiting; its actor appends and drains them under its lock.
        self.items: collections.deque[Envelope[Any]] = collections.deque()
        self._owner: weakref.ref[PooledActor] | None = None

    @property
    def owner(self) -> PooledActor | None:
        return None if self._owner is None else self._owner()

    @owner.setter
    def owner(self, actor: PooledActor) -> None:
        # Weak: actor -> inbox -> actor would be a reference cycle per actor,
        # left for the cyclic collector; short-lived actors made by the
        # thousand then cost full collections over a large heap.
        self._owner = weakref.ref(actor)

    def put(self, envelope: Envelope[Any], /) -> None:
        owner = self.owner
        if owner is None and self._owner is not None:
            # The actor is gone (nobody held it): answer as pykka does for a
            # message that reached a stopped actor.
            if envelope.reply_to is not None:
                envelope.reply_to.set_exception(
                    exc_info=(pykka.ActorDeadError, pykka.ActorDeadError("actor stopped"), None)
                )
            return
        self.items.append(envelope)
        if owner is not None:
            owner.wake()

    def get(self) -> Envelope[Any]:
        return self.items.popleft()

    def empty(self) -> bool:
        return not self.items


class StopFlag(threading.Event):
    """A :class:`threading.Event` for ``actor_stopped`` that costs one small object.

    An Event carries a Condition, a lock, a waiter deque and bound methods:
    about seven objects the garbage collector must walk, per actor, for a
    flag that is almost never waited on. This one makes its Event only if
    somebody waits.
    """

    __slots__ = ("_ev", "_flg", "_mutex")

    def __init__(self) -> None:  # no Event.__init__: that is the point
        self._flg = False
        self._ev: threading.Event | None = None
        self._mutex = _thread.allocate_lock()

    def is_set(self) -> bool:
        return self._flg

    isSet = is_set  # threading.Event's legacy alias

    def set(self) -> None:
        with self._mutex:
            self._flg = True
            ev = self._ev
        if ev is not None:
            ev.set()

    def clear(self) -> None:
        with self._mutex:
            self._flg = False
            if self._ev is not None:
                self._ev.clear()

    def wait(self, timeout: float | None = None) -> bool:
        with self._mutex:
            if self._flg:
                return True
            if self._ev is None:
                self._ev = threading.Event()
            ev = self._ev
        return ev.wait(timeout)

    def __repr__(self) -> str:
        return f"<StopFlag {'set' if self._flg else 'unset'}>"


class PooledActor(pykka.Actor):
    """A pykka actor that borrows a thread from an :class:`Executor` per slice.

    Subclass it like :class:`pykka.ThreadingActor`, but pass the executor to
    ``__init__`` and start it with :meth:`start_on` instead of ``start``.
    """

    def __init__(self, executor: Executor, *args: Any, **kwargs: Any) -> None:
        # pykka.Actor.__init__ also makes a uuid4 URN and an ActorRef; an actor
        # here may live for one message, so both are made on first use (see the
        # properties below), which halves the cost of an activation.
        self.actor_inbox = self._create_actor_inbox()
        self.actor_stopped = StopFlag()
        self._urn: str | None = None
        self._ref: pykka.ActorRef[Any] | None = None
        self._executor = executor
        self._sched_lock = threading.Lock()
        self._scheduled = False
        self._closed = False
        self._setup_done = False
        self._torn_down = False
        inbox = self.actor_inbox
        assert isinstance(inbox, _Inbox)
        inbox.owner = self

    @property
    def actor_urn(self) -> str:
        """The actor's URN, made on first use."""
        if self._urn is None:
            # Random like pykka's uuid4 URNs, without building a UUID object:
            # an instance actor is made per activation, on the engine's hot path.
            self._urn = f"urn:actorflow:{os.urandom(12).hex()}"
        return self._urn

    @actor_urn.setter
    def actor_urn(self, value: str) -> None:
        self._urn = value

    @property
    def actor_ref(self) -> pykka.ActorRef[Any]:
        """The actor's :class:`pykka.ActorRef`, made on first use."""
        ref = self._ref
        if ref is None:
            ref = self._ref = pykka.ActorRef(self)
        return ref

    @staticmethod
    def _create_actor_inbox() -> _Inbox:
        return _Inbox()

    @staticmethod
    def _create_future() -> pykka.Future[Any]:
        return pykka.ThreadingFuture()

    def start_on(self) -> pykka.ActorRef[Any]:
        """Starts this (already constructed) actor; returns its ref."""
        self._start_actor_loop()
        return self.actor_ref

    def _start_actor_loop(self) -> None:
        self.wake(force=True)

    def wake(self, force: bool = False) -> None:
        """Schedules a slice of the inbox on the executor, unless one is already scheduled."""
        with self._sched_lock:
            if self._scheduled:
                return
            self._scheduled = True
        self._executor.schedule(self._slice)

    def post(self, envelope: Envelope[Any]) -> bool:
        """Enqueues ``envelope`` unless the inbox was closed; returns whether it was.

        Unlike ``actor_ref.tell``, the check and the enqueue are atomic with
        respect to :meth:`close`.
        """
        inbox = self.actor_inbox
        assert isinstance(inbox, _Inbox)
        with self._sched_lock:
            if self._closed:
                return False
            inbox.items.append(envelope)
            if self._scheduled:
                return True
            self._scheduled = True
        self._executor.schedule(self._slice)
        return True

    def close(
        self, *, only_if_idle: bool = False, check: Callable[[], bool] | None = None
    ) -> list[Envelope[Any]] | None:
        """Stops taking messages; returns the envelopes that were never handled.

        Args:
            only_if_idle: Close only if no slice is scheduled or running and the
                inbox is empty; otherwise change nothing and return None.
            check: With ``only_if_idle``, one more condition, evaluated under
                the scheduling lock (so the actor cannot run meanwhile).

        The actor's handlers are not interrupted: a message being handled
        finishes, then the actor stops (``actor_stopped`` is set at once).
        """
        inbox = self.actor_inbox
        assert isinstance(inbox, _Inbox)
        with self._sched_lock:
            if only_if_idle and (
                self._scheduled or inbox.items or (check is not None and not check())
            ):
                return None
            self._closed = True
            left = list(inbox.items)
            inbox.items.clear()
        self.actor_stopped.set()
        return left

    def quiet(self) -> bool:
        """True if no slice is scheduled or running and the inbox is empty.

        Read without the scheduling lock: a message posted from another thread
        right after is handled by a slice that runs later on the executor, as
        if it had arrived after whatever the caller does now.
        """
        return not self._scheduled and self.actor_inbox.empty()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # -- the receive loop, one slice at a time ----------------------------

    def _slice(self) -> None:
        if not self._setup_done:
            self._setup_done = True
            self._actor_loop_setup()
        inbox = self.actor_inbox
        handled = 0
        while handled < _SLICE and not self.actor_stopped.is_set():
            try:
                envelope = inbox.get()
            except IndexError:  # empty, or drained by close() meanwhile
                break
            handled += 1
            pending = self._handle_envelope(envelope)
            if pending is not None:
                # An async handler: resume the slice when it is done.
                pending.add_done_callback(lambda _f: self._slice())
                return
        if self.actor_stopped.is_set():
            self._teardown()
            return
        with self._sched_lock:
            if inbox.empty():
                self._scheduled = False
                return
        self._executor.schedule(self._slice)

    def _teardown(self) -> None:
        with self._sched_lock:
            self._scheduled = False
        self._actor_loop_teardown()

    def _handle_envelope(self, envelope: Envelope[Any]) -> asyncio.Future[Any] | None:
        reply_to = envelope.reply_to
        try:
            response = self._handle_receive(envelope.message)
            if inspect.isawaitable(response):
                return self._await_reply(response, reply_to)
            if reply_to is not None:
                reply_to.set(response)
        except Exception:
            self._fail(reply_to, sys.exc_info())
        except BaseException:
            log.debug("%r in %s; stopping it", sys.exc_info()[1], self)
            self._stop()
        return None

    def _await_reply(
        self, awaitable: Any, reply_to: pykka.Future[Any] | None
    ) -> asyncio.Future[Any]:
        task = asyncio.ensure_future(awaitable)

        def finish(t: asyncio.Future[Any]) -> None:
            if t.cancelled():
                exc_info = (asyncio.CancelledError, asyncio.CancelledError(), None)
                self._fail(reply_to, exc_info)
                return
            exc = t.exception()
            if exc is None:
                if reply_to is not None:
                    reply_to.set(t.result())
            elif isinstance(exc, Exception):
                self._fail(reply_to, (type(exc), exc, exc.__traceback__))
            else:
                self._stop()

        task.add_done_callback(finish)
        return task

    def _fail(self, reply_to: pykka.Future[Any] | None, exc_info: Any) -> None:
        if reply_to is not None:
            reply_to.set_exception(exc_info=exc_info)
            return
        self._handle_failure(*exc_info)
        try:
            self.on_failure(*exc_info)
        except Exception:
            self._handle_failure(*sys.exc_info())

    def _stop(self) -> None:
        # Unlike pykka's, there is no registry entry to remove.
        self.actor_stopped.set()
        try:
            self.on_stop()
        except Exception:
            self._handle_failure(*sys.exc_info())

    def _handle_failure(self, exception_type: Any, exception_value: Any, traceback: Any) -> None:
        log.error(
            "unhandled exception in %s", self, exc_info=(exception_type, exception_value, traceback)
        )
        self.actor_stopped.set()

    def on_receive(self, message: Any) -> Any:
        """Handles a message that is not a pykka proxy call; override as needed."""
        if isinstance(message, messages.ProxyCall):  # pragma: no cover - handled upstream
            return None
        return None
