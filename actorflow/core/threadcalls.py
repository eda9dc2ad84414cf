"""Results of other threads handed to an asyncio loop in batches.

:class:`LoopNotifier` resolves the futures of storage commits, one loop
wake-up per group commit. :class:`ThreadCalls` runs blocking calls on
threads and hands their results back alike.

``loop.run_in_executor`` wakes a thread per call and the loop once per
finished call (a ``call_soon_threadsafe``, a write to its self-pipe). The
sync step bodies of many instances come in bursts of short calls, and each
wake-up is a handoff of the GIL. :class:`ThreadCalls` lets one thread drain
a burst, calls more threads only while every draining one is stuck in a slow
call, and hands back every result that finished since the loop last looked
in one callback.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from typing import Any

__all__ = ["LoopNotifier", "ThreadCalls"]

# A draining thread busy with one call for longer than this is stuck: the
# calls queued behind it get threads of their own.
STUCK_S = 0.002

# A future and what to resolve it with: (future, value, error or None).
_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


def _resolve(items: list[_Outcome]) -> None:
    """On the loop: sets each future's outcome, unless it was given up on meanwhile."""
    for fut, value, err in items:
        if fut.done():
            continue  # given up on (a timeout, a stopped run)
        if err is None:
            fut.set_result(value)
        else:
            fut.set_exception(err)


class LoopNotifier:
    """Resolves asyncio futures from the storage writer thread, one loop wake-up per group commit.

    ``callback(fut)`` gives the function to pass to ``Storage.submit``;
    ``flush`` is registered as the storage's after-batch hook.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._ready: list[_Outcome] = []

    def callback(self, fut: asyncio.Future[Any]) -> Callable[[BaseException | None], None]:
        def done(err: BaseException | None) -> None:
            with self._lock:
                self._ready.append((fut, None, err))

        return done

    def flush(self) -> None:
        with self._lock:
            if not self._ready:
                return
            items, self._ready = self._ready, []
        try:
            self._loop.call_soon_threadsafe(_resolve, items)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


class ThreadCalls:
    """Runs calls on at most ``threads`` threads; resolves their futures on ``loop``.

    No call waits more than about :data:`STUCK_S` behind a slow one while a
    thread is free.
    """

    def __init__(self, threads: int, loop: asyncio.AbstractEventLoop, name: str) -> None:
        self._max = threads
        self._loop = loop
        self._name = name
        self._lock = threading.Lock()
        self._cv = threading.Condition(self._lock)
        self._queue: collections.deque[tuple[Callable[[], Any], asyncio.Future[Any]]] = (
            collections.deque()
        )
        self._threads = 0
        self._idle = 0  # threads waiting for work
        self._draining = 0  # threads awake (or woken) to take calls
        # When each busy thread began its current call, by thread.
        self._began: dict[int, float] = {}
        self._done: list[_Outcome] = []
        self._closed = False
        self._check: asyncio.TimerHandle | None = None  # the loop's look at stuck threads

    def call(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Starts ``fn()`` in a thread; on the loop. The future gets its result or error.

        ``fn`` must raise only :class:`Exception`: asyncio lets a
        ``SystemExit`` or ``KeyboardInterrupt`` set in a future escape the loop.

        Raises:
            RuntimeError: After :meth:`close`.
        """
        fut = self._loop.create_future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._name}: closed")
            self._queue.append((fn, fut))
            if self._draining == 0:
                self._wake(1)
        if self._check is None:
            self._check = self._loop.call_later(STUCK_S, self._unstick)
        return fut

    def close(self) -> None:
        """Lets every thread end once its call is done; queued calls never run."""
        with self._lock:
            self._closed = True
            self._queue.clear()
            self._draining += self._idle  # each ends as a draining thread does
            self._idle = 0
            self._cv.notify_all()

    def _wake(self, n: int) -> None:
        """Sets ``n`` more threads draining, idle ones first (under the lock)."""
        k = min(n, self._idle)
        if k:
            self._idle -= k
            self._draining += k
            self._cv.notify(k)
        for _ in range(min(n - k, self._max - self._threads)):
            self._threads += 1
            self._draining += 1
            threading.Thread(target=self._work, name=self._name, daemon=True).start()

    def _unstick(self) -> None:
        """On the loop, while calls wait: more threads if every draining one is stuck."""
        self._check = None
        with self._lock:
            if not self._queue or self._closed:
                return
            now = time.perf_counter()
            began = self._began.values()
            if len(began) == self._draining and all(now - t > STUCK_S for t in began):
                self._wake(len(self._queue))
        self._check = self._loop.call_later(STUCK_S, self._unstick)

    def _work(self) -> None:
        me = threading.get_ident()
        lock = self._lock
        with lock:
            while True:
                if self._closed:
                    self._threads -= 1
                    self._draining -= 1
                    return
                if not self._queue:
                    self._draining -= 1
                    self._idle += 1
                    self._cv.wait()
                    continue  # the waker counted this thread as draining again
                fn, fut = self._queue.popleft()
                if fut.done():
                    continue  # given up on before it began (a timeout, a stopped run)
                self._began[me] = time.perf_counter()
                lock.release()
                try:
                    item: _Outcome = (fut, fn(), None)
                except BaseException as e:
                    item = (fut, None, e)
                finally:
                    lock.acquire()
                del self._began[me]
                self._done.append(item)
                if len(self._done) == 1:
                    try:
                        self._loop.call_soon_threadsafe(self._flush)
                    except RuntimeError:
                        pass  # the loop is closed: nobody waits for the result any more

    def _flush(self) -> None:
        with self._lock:
            items, self._done = self._done, []
        _resolve(items)
