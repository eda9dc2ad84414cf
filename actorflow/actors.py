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
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, Protocol

import pykka
from pykka import messages
from pykka._envelope import Envelope

__all__ = ["Executor", "LoopExecutor", "PooledActor", "ThreadExecutor"]

log = logging.getLogger("actorflow.actors")

_SLICE = 32  # messages handled per scheduling, so one busy actor cannot starve the rest


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
            threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(size)
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

    __slots__ = ("_items", "owner")

    def __init__(self) -> None:
        self._items: collections.deque[Envelope[Any]] = collections.deque()
        self.owner: PooledActor | None = None

    def put(self, envelope: Envelope[Any], /) -> None:
        self._items.append(envelope)
        if self.owner is not None:
            self.owner._wake()

    def get(self) -> Envelope[Any]:
        return self._items.popleft()

    def empty(self) -> bool:
        return not self._items


class PooledActor(pykka.Actor):
    """A pykka actor that borrows a thread from an :class:`Executor` per slice.

    Subclass it like :class:`pykka.ThreadingActor`, but pass the executor to
    ``__init__`` and start it with :meth:`start_on` instead of ``start``.
    """

    def __init__(self, executor: Executor, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._executor = executor
        self._sched_lock = threading.Lock()
        self._scheduled = False
        self._setup_done = False
        self._torn_down = False
        inbox = self.actor_inbox
        assert isinstance(inbox, _Inbox)
        inbox.owner = self

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
        self._wake(force=True)

    def _wake(self, force: bool = False) -> None:
        with self._sched_lock:
            if self._scheduled:
                return
            self._scheduled = True
        self._executor.schedule(self._slice)

    # -- the receive loop, one slice at a time ----------------------------

    def _slice(self) -> None:
        if not self._setup_done:
            self._setup_done = True
            self._actor_loop_setup()
        inbox = self.actor_inbox
        handled = 0
        while handled < _SLICE and not self.actor_stopped.is_set():
            if inbox.empty():
                break
            envelope = inbox.get()
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
