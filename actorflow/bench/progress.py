"""Progress reporting: a bar on a terminal, protocol lines from a child process."""

from __future__ import annotations

import sys
import time
from typing import Protocol, TextIO

__all__ = ["Bar", "ChildProgress", "NullProgress", "Progress"]


class Progress(Protocol):
    """Where a scenario reports how far it has got."""

    def phase(self, label: str, total: int) -> None:
        """Starts a phase of ``total`` units (0: no known total)."""

    def update(self, done: int) -> None:
        """Reports ``done`` units of the current phase finished."""


class NullProgress:
    """Reports nothing."""

    def phase(self, label: str, total: int) -> None:
        """Ignored."""

    def update(self, done: int) -> None:
        """Ignored."""


class ChildProgress:
    """Writes ``PROGRESS`` lines to stderr for the parent process to render."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._out = stream or sys.stderr
        self._last = 0.0

    def phase(self, label: str, total: int) -> None:
        """Announces a phase."""
        print(f"PROGRESS phase {total} {label}", file=self._out, flush=True)

    def update(self, done: int) -> None:
        """Announces progress, at most ten times a second."""
        now = time.monotonic()
        if now - self._last >= 0.1:
            self._last = now
            print(f"PROGRESS update {done}", file=self._out, flush=True)


class Bar:
    """A one-line progress bar redrawn in place on a terminal stream.

    Args:
        stream: Where to draw (default stderr).
        prefix: Shown before each phase's label, e.g. the scenario and run.
    """

    WIDTH = 28

    def __init__(self, stream: TextIO | None = None, prefix: str = "") -> None:
        self._out = stream or sys.stderr
        self.prefix = prefix
        self._label = ""
        self._total = 0
        self._t0 = time.monotonic()
        self._last = 0.0

    def phase(self, label: str, total: int) -> None:
        """Starts a new phase on the same line."""
        self._label, self._total, self._t0 = label, total, time.monotonic()
        self._draw(0, force=True)

    def update(self, done: int) -> None:
        """Redraws, at most ten times a second, and always on reaching the total."""
        self._draw(done, force=0 < self._total <= done)

    def _draw(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        secs = now - self._t0
        if self._total > 0:
            frac = min(1.0, done / self._total)
            fill = int(frac * self.WIDTH)
            bar = "#" * fill + "-" * (self.WIDTH - fill)
            body = f"[{bar}] {done:,}/{self._total:,}"
        else:
            body = f"{done:,}" if done else ""
        line = f"{self.prefix}{self._label} {body} {secs:5.1f}s"
        self._out.write("\r" + line[:119].ljust(119))
        self._out.flush()

    def close(self) -> None:
        """Clears the line."""
        self._out.write("\r" + " " * 119 + "\r")
        self._out.flush()
