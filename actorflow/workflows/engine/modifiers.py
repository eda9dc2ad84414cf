"""Per-instance test modifiers (Cloudflare's ``modify``) and injected crashes."""

from __future__ import annotations

import threading
from typing import Any

__all__ = ["CRASH_POINTS", "Modifiers"]

#: Where a crash can be injected around a step: before its body runs, after
#: the body returned but before its result is written, or after the write.
CRASH_POINTS = ("before", "after_body", "after_commit")


class Modifiers:
    """What a test changed for one instance. Thread-safe; read by the engine."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.results: dict[str, Any] = {}
        self.errors: dict[str, list[Any]] = {}  # name -> [error, remaining or None]
        self.timeouts: set[str] = set()
        self.event_timeouts: set[str] = set()
        self.events: dict[str, Any] = {}
        self.no_sleeps = False
        self.no_retry_delays = False
        self.crashes: list[list[Any]] = []  # [step, point, remaining]

    def step_mock(self, name: str) -> tuple[str, Any] | None:
        """Returns ("value", v) or ("error", e) for this attempt of ``name``, or None."""
        with self._lock:
            if name in self.errors:
                err, left = self.errors[name]
                if left is None or left > 0:
                    if left is not None:
                        self.errors[name][1] = left - 1
                    return ("error", err)
            if name in self.results:
                return ("value", self.results[name])
        return None

    def forced_timeout(self, name: str) -> bool:
        return name in self.timeouts

    def forced_event_timeout(self, name: str) -> bool:
        return name in self.event_timeouts

    def event_mock(self, event_type: str) -> Any:
        return self.events.get(event_type)

    def take_crash(self, step: str, point: str) -> bool:
        """Tells whether to crash now at ``point`` of ``step`` (and counts it)."""
        with self._lock:
            for c in self.crashes:
                if c[0] == step and c[1] == point and (c[2] is None or c[2] > 0):
                    if c[2] is not None:
                        c[2] -= 1
                    return True
        return False
