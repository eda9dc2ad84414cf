"""The router: the Queues-style ingestion buffer of one workflow.

``create`` writes the instance and its queue entry durably and returns at
once with status ``queued``. The queue lives in LMDB (a keyspace per
workflow), so two million queued instances cost disk, not memory. The
supervisor pulls from it as concurrency allows; new instances are released
at ``max_creation_rate`` by a token bucket, while instances waking up
(resumed, or woken by an event) sit in a higher-priority band and go first.

The queue depth is LMDB's entry count of the keyspace: exact and O(1).
"""

from __future__ import annotations

import collections
import threading
from typing import TYPE_CHECKING

from actorflow.clock import Clock
from actorflow.engine.records import PRIO_NEW, PRIO_WAKE, queue_db
from actorflow.errors import RateLimitError

if TYPE_CHECKING:
    from actorflow.engine.context import WorkflowEngine

__all__ = ["Router", "TokenBucket"]

_PREFETCH = 512


class TokenBucket:
    """Allows ``rate`` events per second with bursts of up to ``capacity``.

    Reads time through the runtime's clock, so a fake clock drives it in tests.
    """

    def __init__(self, rate: float, capacity: float, clock: Clock) -> None:
        self.rate = rate
        self.capacity = max(1.0, capacity)
        self._clock = clock
        self._tokens = self.capacity
        self._last = clock.now()
        self._lock = threading.Lock()

    def _refill(self) -> None:
        now = self._clock.now()
        if now > self._last:
            self._tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now

    def take(self) -> bool:
        """Takes a token if one is available."""
        with self._lock:
            self._refill()
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            return False

    def wait_s(self) -> float:
        """Seconds until the next token."""
        with self._lock:
            self._refill()
            return max(0.0, (1.0 - self._tokens) / self.rate)


class Router:
    """The durable queue of one workflow and its admission rules."""

    def __init__(self, wfe: WorkflowEngine) -> None:
        self.wfe = wfe
        self.db = queue_db(wfe.name)
        self._storage = wfe.ctx.storage
        lim = wfe.limits
        self.bucket = (
            TokenBucket(lim.max_creation_rate, lim.burst or lim.max_creation_rate, wfe.ctx.clock)
            if lim.max_creation_rate
            else None
        )
        self._lock = threading.Lock()
        self._reserved = 0
        self._prefetch: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._new_cursor: bytes | None = None
        self._wake_cursor: bytes | None = None
        self._wakes = bool(self._storage.scan(self.db, prefix=PRIO_WAKE, limit=1, keys_only=True))
        self.throttled = False

    def depth(self) -> int:
        """Instances waiting in the queue (committed entries)."""
        return self._storage.count(self.db)

    def reserve(self, n: int, what: str) -> None:
        """Claims room for ``n`` entries or raises :class:`RateLimitError` (nothing written)."""
        limit = self.wfe.limits.max_queued
        with self._lock:
            if self.depth() + self._reserved + n > limit:
                raise RateLimitError(
                    f"workflow {self.wfe.name!r}: {what}: the queue holds its maximum of "
                    f"{limit} instances; try again later", workflow=self.wfe.name)
            self._reserved += n

    def unreserve(self, n: int) -> None:
        with self._lock:
            self._reserved -= n

    def note_wake(self) -> None:
        """A high-priority entry was written."""
        self._wakes = True

    def pop(self, use_bucket: bool = True) -> tuple[str, str] | None:
        """Returns ``(reason, instance id)`` of the next instance to start, or None.

        Called on the engine loop only. The entry stays in storage until the
        instance's first write removes it, so a crash before that restarts it.
        """
        self.throttled = False
        if self._wakes:
            rows = self._storage.scan(self.db, prefix=PRIO_WAKE, start_after=self._wake_cursor,
                                      limit=1)
            if rows:
                self._wake_cursor = rows[0][0]
                return ("wake", rows[0][1].decode())
            self._wakes = False
        if not self._prefetch:
            rows = self._storage.scan(self.db, prefix=PRIO_NEW, start_after=self._new_cursor,
                                      limit=_PREFETCH)
            if not rows:
                return None
            self._new_cursor = rows[-1][0]
            self._prefetch.extend(rows)
        if use_bucket and self.bucket is not None and not self.bucket.take():
            self.throttled = True
            return None
        _key, iid = self._prefetch.popleft()
        return ("new", iid.decode())

    def ready(self) -> bool:
        """True if an entry is waiting that :meth:`pop` has not handed out yet."""
        if self._prefetch:
            return True
        for prefix, cursor in ((PRIO_WAKE, self._wake_cursor), (PRIO_NEW, self._new_cursor)):
            if self._storage.scan(self.db, prefix=prefix, start_after=cursor, limit=1,
                                  keys_only=True):
                return True
        return False

    def forget_position(self) -> None:
        """Reads the queue again from its start (after recovery or a takeover)."""
        self._prefetch.clear()
        self._new_cursor = None
        self._wake_cursor = None
        self._wakes = True
