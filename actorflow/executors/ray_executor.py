"""Step bodies as Ray tasks (the ``ray`` extra: ``pip install 'actorflow[ray]'``).

Ray is imported only here, and only when the executor opens. Each attempt is
one task of a remote function made with ``max_retries=0``: the step's policy
retries, not Ray. Nothing durable is kept in Ray (its control store is not
durable by default), and Ray Workflows are not used.
"""

from __future__ import annotations

import asyncio
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

__all__ = ["RayExecutor", "ray_options"]

#: Defaults of a local Ray started by ``RayExecutor()`` (``address=None``).
LOCAL_DEFAULTS: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as e:
        raise ExecutorError(
            f"RayExecutor needs Ray: pip install 'actorflow[ray]' ({e})", executor="ray"
        ) from None
    return ray


def _ray_body(blob: bytes) -> bytes:
    """The task: runs a shipped body in a Ray worker (see :func:`run_shipped`)."""
    import ray

    ctx = ray.get_runtime_context()
    ran_on: RanOn = {
        "executor": "ray",
        "node": ctx.get_node_id(),
        "worker": ctx.get_worker_id(),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
    }
    return run_shipped(blob, ran_on)


def ray_options(resources: dict[str, float] | None) -> dict[str, Any]:
    """``step.do(resources=)`` as options of a Ray task.

    ``num_cpus``, ``num_gpus`` and ``memory`` are Ray's own; any other name is
    a custom resource (``resources={"accelerator": 1}``).
    """
    if not resources:
        return {}
    opts: dict[str, Any] = {}
    custom: dict[str, float] = {}
    for k, v in resources.items():
        if k in ("num_cpus", "num_gpus", "memory"):
            opts[k] = v
        else:
            custom[k] = v
    if custom:
        opts["resources"] = custom
    return opts


class _RayCall(StepCall):
    def __init__(self, ray: Any, ref: Any) -> None:
        self._ray = ray
        self._ref = ref
        self.ran_on = {"executor": "ray"}

    async def wait(self) -> Any:
        try:
            data = await asyncio.wrap_future(self._ref.future())
        except self._ray.exceptions.RayError as e:
            raise ExecutorError(
                f"the Ray task running the attempt failed: {type(e).__name__}: "
                f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}",
                executor="ray",
            ) from None
        return unpack(self, data)

    def cancel(self) -> None:
        try:
            # force: a pure-Python body cannot be interrupted any other way; its
            # worker process is killed (and replaced by Ray).
            self._ray.cancel(self._ref, force=True)
        except Exception:
            pass  # it ended meanwhile


class RayExecutor(StepExecutor):
    """Runs step bodies as Ray tasks.

    Args:
        address: A cluster to join (``"host:6379"``, ``"ray://host:10001"``,
            ``"auto"``). None: start a local Ray (no dashboard, workers' logs
            not copied to this process), shut down on the last :meth:`close`.
            Either way, a process already connected to Ray (``ray.init`` was
            called) keeps that connection, and this executor leaves it open.
        **init_kwargs: More arguments of ``ray.init`` (``num_cpus=2``,
            ``runtime_env={...}``, ...).
    """

    name = "ray"

    def __init__(self, address: str | None = None, **init_kwargs: Any) -> None:
        super().__init__()
        self.address = address
        self.init_kwargs = init_kwargs
        self._ray: Any = None
        self._owned = False
        self._fn: Any = None
        self._by_resources: dict[tuple[tuple[str, float], ...], Any] = {}

    def _connect(self) -> None:
        ray = _import_ray()
        if self.address is not None:
            probe(self.address, "Ray cluster", "ray")
        if ray.is_initialized():
            # This process is a Ray driver already (ray.init was called, or
            # another RayExecutor is open): its cluster is the one used.
            self._owned = False
        else:
            kwargs = dict(self.init_kwargs)
            if self.address is None:
                kwargs = {**LOCAL_DEFAULTS, **kwargs}
            try:
                ray.init(address=self.address, **kwargs)
            except Exception as e:
                where = self.address or "a local Ray"
                raise ExecutorError(
                    f"cannot start or join {where}: {type(e).__name__}: {e}", executor="ray"
                ) from None
            self._owned = True
        self._ray = ray
        self._fn = ray.remote(max_retries=0)(_ray_body)
        self._by_resources = {}

    def _disconnect(self) -> None:
        ray, self._ray, self._fn = self._ray, None, None
        self._by_resources = {}
        if ray is not None and self._owned:
            ray.shutdown()
        self._owned = False

    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        resources: dict[str, float] | None = None,
    ) -> StepCall:
        remote = self._fn
        if remote is None:
            raise ExecutorError("the Ray executor is not open", executor="ray")
        blob = ship(fn, args)
        if resources:
            key = tuple(sorted(resources.items()))
            task = self._by_resources.get(key)
            if task is None:
                task = self._by_resources[key] = remote.options(**ray_options(resources))
        else:
            task = remote
        try:
            ref = task.remote(blob)
        except Exception as e:
            raise ExecutorError(
                f"Ray refused the task: {type(e).__name__}: {e}", executor="ray"
            ) from None
        return _RayCall(self._ray, ref)

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes, as ``ray.nodes()`` lists them (for tools and tests)."""
        if self._ray is None:
            raise ExecutorError("the Ray executor is not open", executor="ray")
        return list(self._ray.nodes())

    def __repr__(self) -> str:
        return f"RayExecutor(address={self.address!r})"
