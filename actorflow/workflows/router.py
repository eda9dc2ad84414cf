"""The router: the Queues-style ingestion buffer of one workflow.

``create`` writes the instance and its queue entry durably and returns at
once with status ``queued``. The queue lives in LMDB (a keyspace per
workflow), so two million queued instances cost disk, not memory. The
supervisor pulls from it as concurrency allows; new instances are released
at ``max_creation_rate`` by a token bucket, while instances waking up
(resumed, or woken by an event) sit in a higher-priority band and go first.

The queue depth is LMDB's entry count of the keyspace: exact and O(1).

Keyed flow control (``create(key=, priority=)``, ``max_concurrent_per_key``):
instances with a key or a priority other than 0 have their entries in a band
of their own, ordered by priority, then creation; the router merges it with
the default band (read as priority 0), so instances that use neither pay for
nothing but an emptiness flag. An entry whose key is at its cap is skipped,
and the key remembered as *blocked*: its skipped entries are then behind the
read position of the band, and only the keyed queue (the same entries, by
key) finds them again, when one of the key's slots frees. A hot key thus
costs one read per start of its own and never holds up other keys.
"""

from __future__ import annotations

import collections
import heapq
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from actorflow.core.clock import Clock
from actorflow.core.errors import RateLimitError
from actorflow.workflows.records import (
    KQUEUE,
    PRIO_KEYED,
    PRIO_NEW,
    PRIO_WAKE,
    key_queue_prefix,
    parse_queue_entry,
    queue_db,
    queue_entry,
    queue_key_before,
    queue_order,
    split_key_queue_key,
)

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
            None
            if node is None
            else lambda value: node.owns(wfe.ik(parse_queue_entry(value)[0].decode()))
        )
        # Keyed flow control (see the module's docstring): the band of keyed
        # and prioritized entries, read as the default band is.
        self.per_key = lim.max_concurrent_per_key
        self.key_running: dict[str, int] = {}
        self._kprefetch: collections.deque[tuple[bytes, bytes]] = collections.deque()
        self._kcursor: bytes | None = None
        self._kempty = not self._storage.scan(self.db, prefix=PRIO_KEYED, limit=1, keys_only=True)
        # Keys at their cap whose skipped entries are behind the band's read
        # position; the heads of those that have room again (qk, value, key).
        self._blocked: set[str] = set()
        self._heap: list[tuple[bytes, bytes, str]] = []
        self._in_heap: set[str] = set()
        self._refill: set[str] = set()

    def depth(self) -> int:
        """Instances waiting in the queue: committed entries not yet started."""
        return max(0, self._storage.count(self.db) - len(self._handed))

    def handed(self) -> frozenset[bytes]:
        """Queue keys of instances started whose entries are still stored (any thread)."""
        with self._lock:
            return frozenset(self._handed)

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
            if not self._prefetch and not self._new_empty:
                rows, cursor = self._take(PRIO_NEW, self._new_cursor, _PREFETCH)
                self._new_cursor = cursor
                if rows:
                    self._prefetch.extend(rows)
                else:
                    self._new_empty = True
            if self._kempty and not self._heap and not self._refill:
                if not self._prefetch:
                    return None
                if use_bucket and self.bucket is not None and not self.bucket.take():
                    self.throttled = True
                    return None
                key, iid = self._prefetch.popleft()
                self._handed.add(key)
                return ("new", iid.decode())
            return self._pop_keyed(use_bucket)

    def _pop_keyed(self, use_bucket: bool) -> tuple[str, str] | None:
        """:meth:`pop` when keyed or prioritized entries may wait: the first of the
        default band, the keyed band and the heads of blocked keys. Lock held."""
        for k in self._refill:
            self._refill_key(k)
        self._refill.clear()
        best: tuple[int, int] | None = None
        src = 0
        if self._prefetch:
            best, src = queue_order(self._prefetch[0][0]), 1
        head = self._keyed_head()
        if head is not None:
            order = queue_order(head[0])
            if best is None or order < best:
                best, src = order, 2
        while self._heap and not self._has_room(self._heap[0][2]):
            # Filled again meanwhile (a wake-up took the slot): wait for the next release.
            self._in_heap.discard(heapq.heappop(self._heap)[2])
        if self._heap:
            order = queue_order(self._heap[0][0])
            if best is None or order < best:
                best, src = order, 3
        if best is None:
            return None
        if use_bucket and self.bucket is not None and not self.bucket.take():
            self.throttled = True
            return None
        if src == 1:
            qk, value = self._prefetch.popleft()
        elif src == 2:
            qk, value = self._kprefetch.popleft()
        else:
            qk, value, k = heapq.heappop(self._heap)
            self._in_heap.discard(k)
            self._refill.add(k)  # its next head, once this start is counted
        self._handed.add(qk)
        return ("new", parse_queue_entry(value)[0].decode())

    def _has_room(self, key: str) -> bool:
        return self.per_key is None or self.key_running.get(key, 0) < self.per_key

    def _keyed_head(self) -> tuple[bytes, bytes] | None:
        """The first entry of the keyed band whose key has room; skips (and blocks) the others."""
        while True:
            if not self._kprefetch:
                if self._kempty:
                    return None
                rows, cursor = self._take(PRIO_KEYED, self._kcursor, _PREFETCH)
                self._kcursor = cursor
                if not rows:
                    self._kempty = True
                    return None
                self._kprefetch.extend(rows)
            head = self._kprefetch[0]
            key = parse_queue_entry(head[1])[1]
            if key is None or self._has_room(key):
                return head
            self._kprefetch.popleft()
            self._blocked.add(key)

    def _frontier(self) -> tuple[bytes | None, bool]:
        """Where the keyed band's reading stands: entries before it were taken or skipped.

        ``(bound, inclusive)``: entries ``< bound`` (``<= bound`` if inclusive)
        are behind it; a None bound: nothing is.
        """
        if self._kprefetch:
            return self._kprefetch[0][0], False
        return self._kcursor, True

    def _refill_key(self, key: str) -> None:
        """Puts the first skipped entry of a blocked ``key`` on the heap, if it has room."""
        if key not in self._blocked or key in self._in_heap or not self._has_room(key):
            return
        bound, inclusive = self._frontier()
        prefix = key_queue_prefix(self.wfe.name, key)
        after: bytes | None = None
        while bound is not None:
            rows = self._storage.scan(KQUEUE, prefix=prefix, start_after=after, limit=64)
            for kqk, iid in rows:
                after = kqk
                qk = split_key_queue_key(self.wfe.name, kqk)[1]
                if qk > bound or (qk == bound and not inclusive):
                    rows = []
                    break
                entry = queue_entry(iid.decode(), key)
                if qk in self._handed or (self.accept is not None and not self.accept(entry)):
                    continue
                heapq.heappush(self._heap, (qk, entry, key))
                self._in_heap.add(key)
                return
            if not rows:
                break
        self._blocked.discard(key)  # nothing of it is behind the band's reading any more

    def key_in(self, key: str) -> None:
        """An instance with ``key`` took a slot (engine loop only)."""
        self.key_running[key] = self.key_running.get(key, 0) + 1

    def key_out(self, key: str) -> None:
        """An instance with ``key`` gave its slot back (engine loop only)."""
        n = self.key_running[key] - 1
        if n:
            self.key_running[key] = n
        else:
            del self.key_running[key]
        if key in self._blocked:
            with self._lock:
                self._refill.add(key)

    def key_room(self, key: str) -> bool:
        """True if one more instance with ``key`` may run (engine loop only)."""
        return self._has_room(key)

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
            elif key[:1] == PRIO_NEW:
                self._new_empty = False
                if self._new_cursor is not None and key <= self._new_cursor:
                    self._new_cursor = None
                    self._prefetch.clear()
            else:
                self._keyed_enqueued(key)

    def _keyed_enqueued(self, key: bytes) -> None:
        """A keyed-band entry was written: the band's reading goes back before it if need be.

        Only back to just before it (keys of the band have one length), not to
        the start: the entries skipped for blocked keys stay behind. Lock held.
        """
        self._kempty = False
        if self._kcursor is None or key > self._kcursor:
            return
        while self._kprefetch and self._kprefetch[-1][0] >= key:
            self._kprefetch.pop()
        self._kcursor = queue_key_before(key)
        if not self._kprefetch and self._heap:
            # Heads now ahead of the reading are found by it: off the heap.
            keep = [h for h in self._heap if h[0] < key]
            for h in self._heap:
                if h[0] >= key:
                    self._in_heap.discard(h[2])
                    self._refill.add(h[2])
            self._heap = keep
            heapq.heapify(self._heap)

    def rescan(self) -> None:
        """Reads the queue again from its start (this node took over instances)."""
        with self._lock:
            self._wakes = True
            self._wake_cursor = None
            self._new_cursor = None
            self._new_empty = False
            self._prefetch.clear()
            self._kcursor = None
            self._kempty = False
            self._kprefetch.clear()
            self._blocked.clear()
            self._heap.clear()
            self._in_heap.clear()
            self._refill.clear()

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
            if self._kempty and not self._heap and not self._refill:
                return False
            for k in self._refill:
                self._refill_key(k)
            self._refill.clear()
            if any(self._has_room(h[2]) for h in self._heap):
                return True
            return self._keyed_head() is not None
