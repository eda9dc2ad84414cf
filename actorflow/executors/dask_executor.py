"""Step bodies as Dask tasks (the ``dask`` extra: ``pip install 'actorflow[dask]'``).

``distributed`` is imported only here, and only when the executor opens. Each
attempt is one ``Client.submit(..., pure=False, retries=0)``: the step's
policy retries, not Dask. Dask actors are not used (they do not survive
their worker).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

from actorflow.core.errors import ExecutorError
from actorflow.executors.base import (
    RanOn,
    StepCall,
    StepExecutor,
    probe,
    run_shipped,
    ship,
    unpack,
)

__all__ = ["DaskExecutor", "dask_resources"]

log = logging.getLogger("actorflow.executors")
_CONNECT_S = 10  # seconds to reach a scheduler given by address


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError as e:
        raise ExecutorError(
            f"DaskExecutor needs Dask: pip install 'actorflow[dask]' ({e})", executor="dask"
        ) from None
    return distributed


def _dask_body(blob: bytes) -> bytes:
    """The task: runs a shipped body in a Dask worker (see :func:`run_shipped`)."""
    from distributed import get_worker

    ran_on: RanOn = {"executor": "dask", "host": socket.gethostname(), "pid": str(os.getpid())}
    try:
        w = get_worker()
        ran_on["worker"] = str(w.address)
        ran_on["node"] = str(w.address).split("://", 1)[-1].rsplit(":", 1)[0]
    except ValueError:
        pass  # not in a worker (a synchronous scheduler): host and pid say it all
    return run_shipped(blob, ran_on)


def dask_resources(resources: dict[str, float] | None) -> dict[str, float] | None:
    """``step.do(resources=)`` as Dask worker resources.

    ``num_cpus`` and ``num_gpus`` become ``CPU`` and ``GPU``; other names pass
    as they are. Dask runs such a task only on a worker started with that
    resource (``dask worker --resources "GPU=1"``): when no worker of the
    cluster offers it, the attempt fails with ExecutorError instead of waiting.
    """
    if not resources:
        return None
    names = {"num_cpus": "CPU", "num_gpus": "GPU"}
    return {names.get(k, k): v for k, v in resources.items()}


def _allowed_failures(dask_scheduler: Any = None) -> int:
    return int(getattr(dask_scheduler, "allowed_failures", 0))


def _offered(client: Any, need: dict[str, float]) -> bool:
    """True if some worker of the cluster declares every resource in ``need``."""
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    return any(
        all((w.get("resources") or {}).get(k, 0) >= v for k, v in need.items())
        for w in workers.values()
    )


class _DaskCall(StepCall):
    def __init__(
        self,
        client: Any,
        blob: bytes,
        resources: dict[str, float] | None,
        loop: asyncio.AbstractEventLoop,
        pool: concurrent.futures.ThreadPoolExecutor,
    ) -> None:
        self._client = client
        self._pool = pool
        self._fut: Any = None
        self._cancelled = False
        self._done: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        self.ran_on = {"executor": "dask"}
        need = dask_resources(resources)
        if need:
            # Off the engine loop: asking the scheduler what its workers offer
            # is a round trip.
            pool.submit(self._start, blob, need)
        else:
            self._launch(blob, None)

    def _start(self, blob: bytes, need: dict[str, float]) -> None:
        try:
            offered = _offered(self._client, need)
        except Exception as e:
            self._post((False, e))
            return
        if not offered:
            # Dask would hold the task until such a worker joins: fail the
            # attempt instead (the step's policy retries it).
            self._post(
                (
                    False,
                    ExecutorError(
                        f"no Dask worker offers the resources {need} (start workers with "
                        f'--resources, e.g. dask worker --resources "GPU=1")',
                        executor="dask",
                    ),
                )
            )
            return
        try:
            self._launch(blob, need)
        except Exception as e:
            self._post((False, e))

    def _launch(self, blob: bytes, need: dict[str, float] | None) -> None:
        fut = self._client.submit(_dask_body, blob, pure=False, retries=0, resources=need)
        self._fut = fut
        if self._cancelled:
            self._pool.submit(fut.cancel)
        fut.add_done_callback(self._settle)

    def _settle(self, fut: Any) -> None:
        # In Dask's one callback thread: the result is fetched (a round trip
        # to the worker) in the executor's own threads.
        try:
            self._pool.submit(self._fetch, fut)
        except RuntimeError:
            self._fetch(fut)  # the executor closed meanwhile

    def _fetch(self, fut: Any) -> None:
        try:
            outcome: tuple[bool, Any] = (True, fut.result())
        except BaseException as e:
            outcome = (False, e)
        self._post(outcome)

    def _post(self, outcome: tuple[bool, Any]) -> None:
        loop = self._done.get_loop()
        try:
            loop.call_soon_threadsafe(self._resolve, outcome)
        except RuntimeError:
            pass  # the engine loop is closed: nobody waits any more

    def _resolve(self, outcome: tuple[bool, Any]) -> None:
        if not self._done.done():
            self._done.set_result(outcome)

    async def wait(self) -> Any:
        # shield: a cancelled wait (a timeout, a stopped run) leaves the
        # future to _post; the engine then cancels the task itself.
        ok, data = await asyncio.shield(self._done)
        if not ok:
            if isinstance(data, ExecutorError):
                raise data
            raise ExecutorError(
                f"the Dask task running the attempt failed: {type(data).__name__}: {data}",
                executor="dask",
            )
        return unpack(self, data)

    def cancel(self) -> None:
        # Off the engine loop: Client.cancel waits for the scheduler. A task
        # already running keeps its worker thread to its end (Dask cannot
        # interrupt a thread); its result is released.
        self._cancelled = True
        fut = self._fut
        if fut is None:
            return
        try:
            self._pool.submit(fut.cancel)
        except RuntimeError:
            pass  # the executor closed meanwhile


class DaskExecutor(StepExecutor):
    """Runs step bodies as Dask tasks.

    Args:
        client_or_address: A ``distributed.Client`` (used as it is, never
            closed here), or a scheduler's address (``"tcp://host:8786"``): a
            client is made on the first :meth:`open` and closed on the last
            :meth:`close`.

    For a lost worker to fail its attempt (the step's policy then retries it),
    the scheduler must not re-run the task elsewhere itself: start it with
    ``distributed.scheduler.allowed-failures: 0``. With Dask's default (3) a
    body whose worker died runs again on another worker within the same
    attempt; the executor logs a warning when it finds such a scheduler.
    """

    name = "dask"

    def __init__(self, client_or_address: Any) -> None:
        super().__init__()
        self._given = client_or_address
        self._client: Any = None
        self._owned = False
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def client(self) -> Any:
        """The ``distributed.Client`` (None while closed)."""
        return self._client

    def _connect(self) -> None:
        distributed = _import_distributed()
        if isinstance(self._given, str):
            probe(self._given, "Dask scheduler", "dask")
            try:
                self._client = distributed.Client(self._given, timeout=_CONNECT_S)
            except Exception as e:
                raise ExecutorError(
                    f"cannot reach the Dask scheduler at {self._given}: {type(e).__name__}: {e}",
                    executor="dask",
                    address=self._given,
                ) from None
            self._owned = True
        else:
            self._client = self._given
            self._owned = False
            if getattr(self._client, "status", "running") not in ("running", "connecting"):
                raise ExecutorError(
                    f"the Dask client is not running (status {self._client.status!r})",
                    executor="dask",
                )
        self._pool = concurrent.futures.ThreadPoolExecutor(4, "actorflow-dask")
        try:
            n = self._client.run_on_scheduler(_allowed_failures)
        except Exception:
            n = None
        if n:
            log.warning(
                "the Dask scheduler re-runs a task lost with its worker up to %d times "
                "(distributed.scheduler.allowed-failures): such a re-run is not counted "
                "as an attempt of the step",
                n,
            )

    def _disconnect(self) -> None:
        client, self._client = self._client, None
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        if client is not None and self._owned:
            client.close()
        self._owned = False

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        resources: dict[str, float] | None = None,
    ) -> StepCall:
        client, pool = self._client, self._pool
        if client is None or pool is None:
            raise ExecutorError("the Dask executor is not open", executor="dask")
        blob = ship(fn, args)
        try:
            return _DaskCall(client, blob, resources, asyncio.get_running_loop(), pool)
        except Exception as e:
            raise ExecutorError(
                f"Dask refused the task: {type(e).__name__}: {e}", executor="dask"
            ) from None

    def __repr__(self) -> str:
        given = self._given if isinstance(self._given, str) else type(self._given).__name__
        return f"DaskExecutor({given!r})"
