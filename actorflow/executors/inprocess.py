"""The default executor: step bodies run in the runtime's own process."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
from collections.abc import Callable
from typing import Any

from actorflow.core.errors import ExecutorError
from actorflow.executors.base import RanOn, StepCall, StepExecutor, local_place

__all__ = ["InProcessExecutor"]


class _ThreadCall(StepCall):
    def __init__(self, fut: concurrent.futures.Future[Any], ran_on: RanOn) -> None:
        self._fut = fut
        self.ran_on = ran_on

    async def wait(self) -> Any:
        value = await asyncio.wrap_future(self._fut)
        if asyncio.iscoroutine(value):
            value = await value
        return value

    def cancel(self) -> None:
        # A thread cannot be stopped: a body already running goes on to its
        # end, and its value is dropped. One not started yet never starts.
        self._fut.cancel()


class InProcessExecutor(StepExecutor):
    """Runs step bodies in the runtime's process: today's behaviour, the default.

    A runtime given this executor (or none) runs sync bodies on its own step
    threads (``Runtime(step_threads=...)``) and ``async def`` bodies on its
    engine loop, exactly as without executors: nothing is pickled and the
    hot path has no extra step. :meth:`submit` offers the same semantics for
    direct use, on a thread pool of ``threads`` threads. ``resources=`` is
    accepted and ignored: the process's cores are all there is.

    Args:
        threads: Threads of :meth:`submit`'s pool.
    """

    name = "inprocess"
    remote = False

    def __init__(self, threads: int = 8) -> None:
        super().__init__()
        self._threads = threads
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    def _connect(self) -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(self._threads, "actorflow-inprocess")

    def _disconnect(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        resources: dict[str, float] | None = None,
    ) -> StepCall:
        pool = self._pool
        if pool is None:
            raise ExecutorError("the in-process executor is not open")
        return _ThreadCall(pool.submit(functools.partial(fn, *args)), local_place(self.name))
