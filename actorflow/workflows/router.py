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
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from actorflow.core.clock import Clock
from actorflow.core.errors import RateLimitError
from actorflow.workflows.records import PRIO_NEW, PRIO_WAKE, queue_db

log = logging.getLogger("actorflow.router")

if TYPE_CHECKING:
    from actorflow.cluster.lease import NodeLease
    from actorflow.workflows.engine.context import WorkflowEngine

__all__ = ["Router", "TokenBucket"]

_PREFETCH = 512
# Reserves served from the bound between two reads of the real entry count.
_RECOUNT_EVERY = 256
# Headroom below max_queued under which the bound is trusted (see _waiting_bound).
_BOUND_MARGIN = 16_384


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

    def take(self, n: int = 1) -> bool:
        """Takes ``n`` tokens if that many are available (all or none)."""
        with self._lock:
            self._refill()
            if self._tokens >= n:
                self._tokens -= n
                return True
            return False

    def wait_s(self) -> float:
        """Seconds until the next token."""
        with self._lock:
            self._refill()
            return max(0.0, (1.0 - self._tokens) / self.rate)


class Router:
    """The durable queue of one workflow and its admission rules.

    Args:
        wfe: The workflow.
        room: ``room(wfe, n)``: True if ``n`` more instances of the workflow
            could run at once (the supervisor's slots); read for
            ``overflow="reject"``.
        node: This node's lease (multi-node): only entries of instances it
            owns are taken. None for a lone runtime.
    """

    def __init__(
        self,
        wfe: WorkflowEngine,
        room: Callable[[WorkflowEngine, int], bool],
        node: NodeLease | None = None,
    ) -> None:
        self.wfe = wfe
        self._room = room
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
        # The last entry count read, and the entries announced before it (see
        # _waiting_bound).
        self._count = 0
        self._announced = 0
        self._announced_at_count = 0
        self._since_count = _RECOUNT_EVERY  # read it on the first reserve
        # Queue keys handed to the supervisor whose entries are still stored:
        # the instance started but its first write (which deletes the entry)
        # has not landed yet. They are not "queued" any more.
        self._handed: set[bytes] = set()
        self._prefetch: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._new_cursor: bytes | None = None
        # The new-instance queue was read empty and nothing was enqueued since:
        # spares a storage scan on every pass of the supervisor.
        self._new_empty = False
        self._wake_cursor: bytes | None = None
        self._wakes = bool(self._storage.scan(self.db, prefix=PRIO_WAKE, limit=1, keys_only=True))
        self.throttled = False
        # Multi-node: only entries of instances this node owns are taken.
        self.accept: Callable[[bytes], bool] | None = (
            None if node is None else lambda iid: node.owns(wfe.ik(iid.decode()))
        )

    def depth(self) -> int:
        """Instances waiting in the queue: committed entries not yet started."""
        return max(0, self._storage.count(self.db) - len(self._handed))

    def reserve(self, n: int, what: str) -> None:
        """Claims room for ``n`` entries or raises :class:`RateLimitError` (nothing written).

        With ``overflow="reject"`` it also refuses instances that could not
        start at once: the running ones plus those already waiting for a slot
        (created but not started yet) must stay within ``max_concurrent``, and
        creations beyond ``max_creation_rate`` are refused rather than delayed.
        """
        try:
            self._reserve(n, what)
        except RateLimitError as e:
            log.debug("%s", e, extra={"workflow": self.wfe.name})
            raise

    def _reserve(self, n: int, what: str) -> None:
        lim = self.wfe.limits
        with self._lock:
            waiting = self._waiting_bound(n, lim.max_queued, exact=lim.overflow == "reject")
            if waiting + n > lim.max_queued:
                raise RateLimitError(
                    f"workflow {self.wfe.name!r}: {what}: the queue holds its maximum of "
                    f"{lim.max_queued} instances; try again later",
                    workflow=self.wfe.name,
                )
            if lim.overflow == "reject":
                if not self._room(self.wfe, waiting + n):
                    raise RateLimitError(
                        f"workflow {self.wfe.name!r}: {what}: {lim.max_concurrent} instances "
                        "are already running or about to",
                        workflow=self.wfe.name,
                    )
                if self.bucket is not None and not self.bucket.take(n):
                    raise RateLimitError(
                        f"workflow {self.wfe.name!r}: {what}: more than "
                        f"{lim.max_creation_rate} creations per second",
                        workflow=self.wfe.name,
                    )
            self._reserved += n

    def _waiting_bound(self, n: int, max_queued: int, exact: bool) -> int:
        """Returns the waiting instances (reserved included), or an upper bound of them.

        Reading the entry count is a read transaction per ``create``, under
        the lock: with many creating threads that lock convoys behind the
        reads. Far from ``max_queued`` an upper bound does as well: the last
        count read plus every entry announced (:meth:`enqueued`) since. Near
        the limit, every ``_RECOUNT_EVERY`` reserves, and in reject mode
        (whose concurrency check wants small exact numbers) it reads the
        count as before. The margin covers entries committed but not yet
        announced (engine writes whose callbacks the loop has not run).
        Called with the lock held.
        """
        if not exact and self._since_count < _RECOUNT_EVERY:
            bound = self._count + (self._announced - self._announced_at_count) + self._reserved
            if bound + n + _BOUND_MARGIN <= max_queued:
                self._since_count += 1
                return bound
        self._announced_at_count = self._announced
        self._count = self._storage.count(self.db)
        self._since_count = 0
        return max(0, self._count - len(self._handed)) + self._reserved

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
        with self._lock:
            if self._wakes:
                rows, cursor = self._take(PRIO_WAKE, self._wake_cursor, 1)
                self._wake_cursor = cursor
                if rows:
                    self._handed.add(rows[0][0])
                    return ("wake", rows[0][1].decode())
                self._wakes = False
            if not self._prefetch:
                if self._new_empty:
                    return None
                rows, cursor = self._take(PRIO_NEW, self._new_cursor, _PREFETCH)
                self._new_cursor = cursor
                if not rows:
                    self._new_empty = True
                    return None
                self._prefetch.extend(rows)
            if use_bucket and self.bucket is not None and not self.bucket.take():
                self.throttled = True
                return None
            key, iid = self._prefetch.popleft()
            self._handed.add(key)
            return ("new", iid.decode())

    def _take(
        self, prefix: bytes, cursor: bytes | None, limit: int
    ) -> tuple[list[tuple[bytes, bytes]], bytes | None]:
        """Reads up to ``limit`` entries after ``cursor`` not handed out yet.

        Returns them and the cursor past them (and past handed entries skipped).
        """
        out: list[tuple[bytes, bytes]] = []
        while True:
            rows = self._storage.scan(
                self.db, prefix=prefix, start_after=cursor, limit=max(limit, 64)
            )
            if not rows:
                return out, cursor
            for key, value in rows:
                cursor = key
                if key in self._handed or (self.accept is not None and not self.accept(value)):
                    continue
                out.append((key, value))
                if len(out) == limit:
                    return out, cursor

    def enqueued(self, key: bytes) -> None:
        """The entry ``key`` was written durably.

        Keys are taken before their batches commit, and concurrent writers
        (threads calling ``create``, the engine loop) may commit out of key
        order: if the cursor already passed ``key``, read again from the start.
        """
        with self._lock:
            self._announced += 1
            if key[:1] == PRIO_WAKE:
                self._wakes = True
                if self._wake_cursor is not None and key <= self._wake_cursor:
                    self._wake_cursor = None
            else:
                self._new_empty = False
                if self._new_cursor is not None and key <= self._new_cursor:
                    self._new_cursor = None
                    self._prefetch.clear()

    def rescan(self) -> None:
        """Reads the queue again from its start (this node took over instances)."""
        with self._lock:
            self._wakes = True
            self._wake_cursor = None
            self._new_cursor = None
            self._new_empty = False
            self._prefetch.clear()

    def dequeued(self, key: bytes) -> None:
        """The entry ``key`` was deleted durably (its instance started or changed state)."""
        self._handed.discard(key)

    def ready(self) -> bool:
        """True if an entry is waiting that :meth:`pop` has not handed out yet."""
        with self._lock:
            if self._prefetch:
                return True
            for prefix, cursor in ((PRIO_WAKE, self._wake_cursor), (PRIO_NEW, self._new_cursor)):
                if self._take(prefix, cursor, 1)[0]:
                    return True
            return False
