"""Event rates over a sliding window, for figures such as steps or creations per second."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["RateWindow"]


class RateWindow:
    """Events per second over a sliding window of one-second buckets.

    ``add`` is meant for one writing thread; ``rate`` may be read from any
    thread (it never mutates the buckets).

    Args:
        now: Returns the current time in seconds (the runtime's clock).
        window: Seconds the rate is averaged over.
    """

    __slots__ = ("_counts", "_now", "_origin", "_tags", "total", "window")

    def __init__(self, now: Callable[[], float], window: int = 10) -> None:
        self._now = now
        self.window = window
        self._tags = [-1] * window
        self._counts = [0] * window
        self._origin = now()
        self.total = 0

    def add(self, n: int = 1) -> None:
        """Counts ``n`` events now."""
        sec = int(self._now())
        i = sec % self.window
        if self._tags[i] != sec:
            self._tags[i] = sec
            self._counts[i] = 0
        self._counts[i] += n
        self.total += n

    def rate(self) -> float:
        """Events per second over the last ``window`` seconds (or since creation)."""
        now = self._now()
        sec = int(now)
        n = sum(
            c for t, c in zip(self._tags, self._counts, strict=True) if sec - self.window < t <= sec
        )
        span = min(float(self.window), max(1.0, now - self._origin))
        return n / span
