"""Threads and coroutines waiting for instances to finish (``Instance.wait``).

Thread: any. :meth:`Watchers.finished` is called on the engine loop, the
others from the waiting threads.
"""

from __future__ import annotations

import threading
from typing import Protocol

__all__ = ["Waker", "Watchers"]


class Waker(Protocol):
    """What is woken: a ``threading.Event``, or anything with a quick ``set()``."""

    def set(self) -> None: ...


class Watchers:
    """Events set when an instance finishes, by instance key."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: dict[bytes, list[Waker]] = {}

    def finished(self, ik: bytes) -> None:
        """Wakes the threads waiting for instance ``ik`` to finish."""
        if not self._watchers:
            # Read without the lock: a watcher added meanwhile reads the status
            # after adding itself, and the end is durable already.
            return
        with self._lock:
            watchers = self._watchers.pop(ik, [])
        for ev in watchers:
            ev.set()

    def watch(self, ik: bytes, waker: Waker | None = None) -> Waker:
        """Returns ``waker`` (by default a new ``threading.Event``), set when
        instance ``ik`` next finishes."""
        ev: Waker = threading.Event() if waker is None else waker
        with self._lock:
            self._watchers.setdefault(ik, []).append(ev)
        return ev

    def unwatch(self, ik: bytes, ev: Waker) -> None:
        """Forgets an event :meth:`watch` returned."""
        with self._lock:
            lst = self._watchers.get(ik)
            if lst and ev in lst:
                lst.remove(ev)
                if not lst:
                    del self._watchers[ik]
