"""Time: the runtime's clock and the parsing of durations and instants.

Engine code never reads the system time directly; it asks the runtime's
:class:`Clock`. That is what lets :class:`actorflow.testing.FakeClock` move
time for sleeps, retry delays, event timeouts and alarms in tests.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Protocol, runtime_checkable

__all__ = [
    "MAX_DURATION_MS",
    "MAX_EPOCH_MS",
    "Clock",
    "SystemClock",
    "format_ms",
    "parse_duration_ms",
    "to_datetime",
    "to_epoch_ms",
]

_UNITS_MS = {
    "millisecond": 1,
    "second": 1_000,
    "minute": 60_000,
    "hour": 3_600_000,
    "day": 86_400_000,
    "week": 604_800_000,
    "month": 2_592_000_000,  # 30 days, as Cloudflare's itty-time does
    "year": 31_536_000_000,  # 365 days
}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]+?)s?\s*$")
#: The longest duration accepted (a sleep, a timeout, a retry delay): 100 years of 365 days.
#: Far beyond any schedule, and short enough that a deadline computed from the current
#: time stays inside what the engine stores (8-byte epoch ms) and shows (a datetime).
MAX_DURATION_MS = 100 * _UNITS_MS["year"]
#: The latest instant accepted (``sleep_until``, alarms): 9999-12-31T23:59:59.999Z, the
#: last millisecond a :class:`~datetime.datetime` can hold.
MAX_EPOCH_MS = 253_402_300_799_999
_LATEST = datetime.max.replace(tzinfo=UTC)
_EARLIEST = datetime.min.replace(tzinfo=UTC)


@runtime_checkable
class Clock(Protocol):
    """What the engine needs from a clock.

    A clock gives wall time in epoch seconds, tells a waiting thread how long
    to block before a deadline, and calls subscribers when time jumps (a fake
    clock being advanced), so that timer threads re-check their deadlines.
    """

    def now(self) -> float:
        """Returns the current time in seconds since the epoch (UTC)."""
        ...

    def real_timeout(self, deadline: float) -> float | None:
        """Returns how many real seconds to block before ``deadline``.

        ``None`` means "until notified": a fake clock only moves on ``advance``.
        """
        ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Registers ``callback`` to be called whenever time jumps."""
        ...

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        """Removes a callback registered with :meth:`subscribe`."""
        ...


class SystemClock:
    """The real wall clock."""

    def now(self) -> float:
        return time.time()

    def real_timeout(self, deadline: float) -> float | None:
        return max(0.0, deadline - time.time())

    def subscribe(self, callback: Callable[[], None]) -> None:
        # Real time never jumps under the engine's feet.
        pass

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        pass


class _Subscribers:
    """A small thread-safe callback list, for clocks that can jump."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def add(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._callbacks.append(callback)

    def remove(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def notify(self) -> None:
        with self._lock:
            callbacks = list(self._callbacks)
        for cb in callbacks:
            cb()


def parse_duration_ms(value: object, *, what: str = "duration") -> int:
    """Parses a duration into whole milliseconds.

    Accepted: a number (milliseconds, as in Cloudflare), a
    :class:`~datetime.timedelta`, or a string such as ``"10 seconds"``,
    ``"1 minute"``, ``"2 hours"``, ``"3 days"``, ``"1 week"``, ``"1 month"``
    (30 days) or ``"1 year"`` (365 days), singular or plural.

    Args:
        value: The duration.
        what: Names the value in the error message (for example the step).

    Returns:
        The duration in milliseconds.

    Raises:
        ValueError: The value is negative, not finite, longer than
            :data:`MAX_DURATION_MS` (100 years), or not understood.
    """
    if isinstance(value, bool):
        raise ValueError(f"{what}: a duration must be a number of ms, a string or a timedelta")
    if isinstance(value, timedelta):
        ms = value.total_seconds() * 1000.0
    elif isinstance(value, int):
        # Clamped first: float() of an int beyond 1e308 would raise OverflowError.
        ms = float(max(-1, min(value, MAX_DURATION_MS + 1)))
    elif isinstance(value, float):
        ms = value
    elif isinstance(value, str):
        m = _DURATION_RE.match(value.lower())
        unit = m.group(2) if m else ""
        if not m or unit not in _UNITS_MS:
            raise ValueError(
                f"{what}: invalid duration {_shown(value)}; use milliseconds, a timedelta or a "
                "string like '10 seconds', '5 minutes', '2 hours', '3 days'"
            )
        ms = float(m.group(1)) * _UNITS_MS[unit]
    else:
        raise ValueError(
            f"{what}: a duration must be a number of ms, a string or a timedelta, "
            f"not {type(value).__name__}"
        )
    if ms != ms or ms < 0 or (isinstance(value, float) and math.isinf(ms)):
        raise ValueError(f"{what}: invalid duration {_shown(value)} (must be finite and >= 0)")
    if ms > MAX_DURATION_MS:  # also a string whose number overflows to infinity
        raise ValueError(
            f"{what}: duration {_shown(value)} is too long; the longest accepted is 100 years "
            f"({MAX_DURATION_MS} ms)"
        )
    return round(ms)


def _shown(value: object) -> str:
    """A value's repr for an error message, cut short (an int of a million digits, ...)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's int-to-str digit limit
        return f"<an {type(value).__name__} too large to show>"
    return text if len(text) <= 60 else text[:57] + "..."


def to_epoch_ms(when: object, *, what: str = "time") -> int:
    """Converts an aware :class:`~datetime.datetime` or epoch milliseconds to epoch ms.

    Raises:
        ValueError: A naive datetime, a value of another type, or a time
            before 1970 or after 9999 (epoch ms outside 0 to :data:`MAX_EPOCH_MS`),
            which the engine could neither store nor show.
    """
    if isinstance(when, datetime):
        if when.tzinfo is None:
            raise ValueError(f"{what}: use an aware datetime (for example with tzinfo=UTC)")
        ms = round(when.timestamp() * 1000)
    elif isinstance(when, int | float) and not isinstance(when, bool):
        if isinstance(when, float) and not math.isfinite(when):
            raise ValueError(f"{what}: invalid time {_shown(when)} (must be finite)")
        ms = int(when)
    else:
        raise ValueError(
            f"{what}: expected an aware datetime or epoch milliseconds, got {_shown(when)}"
        )
    if not 0 <= ms <= MAX_EPOCH_MS:
        raise ValueError(
            f"{what}: time {_shown(when)} is out of range; it must be from 1970-01-01 to "
            f"9999-12-31 UTC (epoch milliseconds 0 to {MAX_EPOCH_MS})"
        )
    return ms


def to_datetime(epoch_s: float) -> datetime:
    """Returns an aware UTC datetime for epoch seconds.

    A time outside what a datetime can hold (only in records written by
    versions that accepted it) gives the earliest or latest datetime, so that
    every reader can still show the record.

    Raises:
        ValueError: ``epoch_s`` is NaN.
    """
    try:
        return datetime.fromtimestamp(epoch_s, tz=UTC)
    except (OverflowError, ValueError, OSError):
        if epoch_s != epoch_s:
            raise ValueError("a time cannot be NaN") from None
        return _LATEST if epoch_s > 0 else _EARLIEST


def format_ms(ms: float) -> str:
    """Formats a duration in ms for humans (``"1.5 s"``, ``"250 ms"``)."""
    if ms >= 60_000:
        return f"{ms / 60_000:.1f} min"
    if ms >= 1000:
        return f"{ms / 1000:.2f} s"
    return f"{ms:.0f} ms"
