"""Plain ``def`` code run as a greenlet inside a coroutine on an asyncio loop.

SQLAlchemy's asyncio bridge does the same: :meth:`LoopGreenlets.run` runs
a sync function in a :class:`LoopGreenlet` on the loop's own thread. Where the
function would wait for the loop, it calls :func:`await_on_loop`: that
switches back to the driving coroutine with the awaitable, which awaits it
and switches in again with the result (or throws its error in). A waiting
function then holds no thread, and a call into the loop costs no handoff
between threads.

The function must not block the loop's thread. What would (a call that
waits for the loop itself, from a handle of the runtime) goes to a thread
with :func:`offload`; :class:`SliceMonitor` tells of a function that blocks
anyway, while it does.

Inside the greenlet the loop is hidden (``asyncio.get_running_loop()``
raises, ``asyncio.run()`` works), as it would be in a thread.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
import time
from asyncio.events import _set_running_loop  # asyncio's own, in asyncio.events.__all__
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from typing import Any, ParamSpec, TypeVar

from greenlet import GreenletExit, getcurrent, greenlet

__all__ = [
    "LoopGreenlet",
    "LoopGreenlets",
    "SliceMonitor",
    "await_on_loop",
    "in_loop_greenlet",
    "offload",
    "offloaded",
]

P = ParamSpec("P")
T = TypeVar("T")


class _Done:
    """What a greenlet hands back when its function returned or raised."""

    __slots__ = ("error", "value")

    def __init__(self, value: Any, error: BaseException | None) -> None:
        self.value = value
        self.error = error


class _Offload:
    """What a greenlet asks its driver to run in a thread."""

    __slots__ = ("call",)

    def __init__(self, call: Callable[[], Any]) -> None:
        self.call = call


class LoopGreenlet(greenlet):
    """A greenlet of :class:`LoopGreenlets`.

    It runs one function after another: starting a greenlet costs several
    times what switching to one does.
    """

    def __init__(self) -> None:
        super().__init__(self._serve, parent=getcurrent())

    def _serve(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        parent = self.parent
        while True:
            try:
                done = _Done(fn(*args), None)
            except GreenletExit:
                raise  # collected while suspended in fn: it ends
            except BaseException as e:
                done = _Done(None, e)
            fn = args = None  # type: ignore[assignment]
            # Hands the outcome back; the next switch in brings the next function.
            fn, args = parent.switch(done)


def in_loop_greenlet() -> bool:
    """True if the caller runs in a :class:`LoopGreenlet`."""
    return isinstance(getcurrent(), LoopGreenlet)


def await_on_loop(awaitable: Awaitable[T]) -> T:
    """Awaits ``awaitable`` in the coroutine that drives the current greenlet.

    Only from inside a :class:`LoopGreenlet`.
    """
    return getcurrent().parent.switch(awaitable)


def offload(call: Callable[[], T]) -> T:
    """``call()``; from a :class:`LoopGreenlet`, in a thread while the loop runs on."""
    g = getcurrent()
    if isinstance(g, LoopGreenlet):
        return g.parent.switch(_Offload(call))
    return call()


def offloaded(method: Callable[P, T]) -> Callable[P, T]:
    """Makes a blocking method :func:`offload` itself when called from a :class:`LoopGreenlet`.

    For the runtime's sync handles: they wait for the loop, which a caller on
    the loop's thread would never let run.
    """

    @functools.wraps(method)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        if isinstance(getcurrent(), LoopGreenlet):
            return offload(functools.partial(method, *args, **kwargs))
        return method(*args, **kwargs)

    return call


class SliceMonitor:
    """Tells of a greenlet that holds its loop's thread longer than ``limit`` seconds.

    :meth:`LoopGreenlets.run` notes the start and end of each slice (the time
    a greenlet runs between two switches). A thread, started at the first
    slice, looks every ``limit / 2`` seconds and calls ``warn(owner,
    seconds)`` once for each slice that outlives ``limit``, while it still runs.
    """

    def __init__(self, limit: float, warn: Callable[[Any, float], None]) -> None:
        self.limit = limit
        self._warn = warn
        # (start, owner, slice number): written by the loop, read by other threads.
        self._current: tuple[float, Any, int] | None = None
        self._slices = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, owner: Any) -> None:
        self._slices += 1
        self._current = (time.perf_counter(), owner, self._slices)
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._watch, name="actorflow-slices", daemon=True
            )
            self._thread.start()

    def end(self) -> float:
        """Ends the current slice; returns how long it ran."""
        cur = self._current
        self._current = None
        return 0.0 if cur is None else time.perf_counter() - cur[0]

    def held(self, owner: Any) -> float:
        """How long ``owner``'s greenlet has held the loop so far (0.0: it holds it not)."""
        cur = self._current
        return 0.0 if cur is None or cur[1] is not owner else time.perf_counter() - cur[0]

    def _watch(self) -> None:
        warned = 0
        while not self._stop.wait(self.limit / 2):
            cur = self._current
            if cur is None or cur[2] == warned:
                continue
            held = time.perf_counter() - cur[0]
            if held > self.limit:
                warned = cur[2]
                self._warn(cur[1], held)

    def close(self) -> None:
        self._stop.set()


class LoopGreenlets:
    """Runs sync functions as greenlets on the thread of the loop that calls :meth:`run`.

    Args:
        offload_pool: Runs what the functions :func:`offload`.
        monitor: Notes each slice.
        keep: Idle greenlets kept for reuse.
    """

    def __init__(self, offload_pool: Executor, monitor: SliceMonitor, keep: int = 512) -> None:
        self._offload_pool = offload_pool
        self._monitor = monitor
        self._keep = keep
        self._idle: list[LoopGreenlet] = []

    def greenlet(self) -> LoopGreenlet:
        """An idle greenlet, for :meth:`run` (made if none is kept)."""
        return self._idle.pop() if self._idle else LoopGreenlet()

    async def run(
        self,
        g: LoopGreenlet,
        fn: Callable[..., T],
        args: tuple[Any, ...],
        owner: Any,
        translate: Callable[[BaseException], BaseException],
        on_slice: Callable[[float], BaseException | None],
    ) -> T:
        """Runs ``fn(*args)`` in ``g`` (from :meth:`greenlet`) to its end; returns its result.

        Raises what it raised. ``owner`` is what the monitor names.
        ``translate`` maps an error of an awaitable to the one thrown into the
        greenlet (an engine's cancellation to its own stop signal).
        ``on_slice(seconds)`` is called after each slice; an exception it
        returns is thrown into the greenlet in place of what it asked for.
        """
        loop = asyncio.get_running_loop()
        monitor = self._monitor
        veto: BaseException | None = None

        def run_slice(resume: Callable[..., Any], *a: Any) -> Any:
            nonlocal veto
            monitor.begin(owner)
            _set_running_loop(None)
            try:
                return resume(*a)
            finally:
                _set_running_loop(loop)
                veto = on_slice(monitor.end())

        # The context of the coroutine that runs it (tracing, logging fields).
        g.gr_context = contextvars.copy_context()
        req = run_slice(g.switch, fn, args)
        while type(req) is not _Done:
            if veto is not None:
                if asyncio.iscoroutine(req):
                    req.close()
                req = run_slice(g.throw, veto)
                continue
            try:
                value = await (
                    loop.run_in_executor(self._offload_pool, req.call)
                    if type(req) is _Offload
                    else req
                )
            except GeneratorExit:
                raise  # the coroutine is closed (its loop is gone): the greenlet goes with it
            except BaseException as e:
                req = run_slice(g.throw, translate(e))
            else:
                req = run_slice(g.switch, value)
        g.gr_context = None
        if len(self._idle) < self._keep:
            self._idle.append(g)
        if req.error is not None:
            error, req.error = req.error, None
            raise error
        return req.value
