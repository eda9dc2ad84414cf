"""The runtime: one data directory, its storage, actors, timers and registry."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any, TypeVar

from actorflow.actors import ThreadExecutor
from actorflow.clock import Clock, SystemClock
from actorflow.limits import Limits
from actorflow.objects import ALARM_KIND, DurableObject, DurableObjectNamespace
from actorflow.storage import Serializer, Storage
from actorflow.timers import TimerService

__all__ = ["Runtime"]

log = logging.getLogger("actorflow.runtime")
T = TypeVar("T", bound=DurableObject)


class Runtime:
    """An embedded actorflow runtime over one data directory.

    It is running once constructed; :meth:`close` (or leaving a ``with``
    block) stops it cleanly. Each runtime owns its own storage, actors,
    timers and registry; nothing is shared between runtimes.

    Args:
        data_dir: The data directory (one LMDB environment).
        limits: Flow-control limits (default :class:`Limits`).
        clock: The clock (default the system clock; tests pass a FakeClock).
        sync: fsync every commit (default True).
        serializer: Serializer for user values (default pickle, with
            cloudpickle for what pickle cannot do).
        pool_size: Threads running Durable Object calls.
        idle_timeout: Seconds an object may stay idle before eviction.
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
    ) -> None:
        self.data_dir = os.fspath(data_dir)
        self.limits = limits or Limits()
        self.clock: Clock = clock or SystemClock()
        self.idle_timeout = idle_timeout
        self.storage = Storage(self.data_dir, sync=sync, serializer=serializer)
        self.timers = TimerService(self.storage, self.clock)
        self.timers.register(ALARM_KIND, self._fire_alarm)
        self._pool = ThreadExecutor(pool_size, name="actorflow-do")
        self._namespaces: dict[str, DurableObjectNamespace[Any]] = {}
        self._closed = threading.Event()
        self._reaper = threading.Thread(target=self._reap, name="actorflow-reaper", daemon=True)
        self._reaper.start()
        self.timers.start()

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
        ns = self._namespaces.get(target.split(b"\x00", 1)[0].decode())
        return ns is not None and ns._fire_alarm(target, key, deadline)

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
        self.timers.stop()
        for ns in self._namespaces.values():
            ns.shutdown()
        self._pool.shutdown()
        self._reaper.join()
        self.storage.close()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
