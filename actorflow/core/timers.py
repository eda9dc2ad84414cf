"""One durable timer index for a runtime, and the thread that fires it.

Every deadline (a workflow sleep, a retry delay, an event timeout, a Durable
Object alarm) is a key in the ``timers`` keyspace: the deadline in epoch ms
(8 bytes, big-endian, so keys sort by time), one byte of kind, then the
target. A million sleeping instances therefore cost a million small keys on
disk and nothing in memory.

A timer is armed and disarmed inside the owner's own write batch, so it is
exactly as durable as the state that needs it. Firing is at least once: the
service hands a due timer to its kind's handler and remembers it as in
flight; the owner deletes the key in the commit that consumes it, then calls
:meth:`TimerService.done`. After a crash, undeleted keys simply fire again.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable

from actorflow.core.clock import Clock
from actorflow.core.storage import Storage, WriteBatch

__all__ = ["TIMERS", "TimerService", "armed_keys", "count_armed", "parse_timer_key", "timer_key"]

log = logging.getLogger("actorflow.timers")

TIMERS = "timers"
_DEADLINE = struct.Struct(">Q")
_MAX_SCAN = 20_000  # keys one pass examines at most
_CHUNK = 512
# The longest a timer thread sleeps without re-reading the index, so that
# timers armed by another process on the same data directory are seen.
_POLL_S = 0.5
# The shortest a timer thread sleeps before a deadline in the future. Timers
# due a fraction of a ms apart (10,000 wake-ups a second) would otherwise cost
# one pass (a read of the index, a hand-over to the engine loop) each; this
# way they share one, each at most this much later.
_COALESCE_S = 0.002

#: handler(target, key, deadline_ms) -> accepted. Returning False means "not
#: now" (backpressure); the timer is offered again on a later pass.
Handler = Callable[[bytes, bytes, int], bool]


def timer_key(deadline_ms: int, kind: str, target: bytes) -> bytes:
    """Returns the index key of a timer."""
    return _DEADLINE.pack(max(0, deadline_ms)) + kind.encode() + target


def count_armed(storage: Storage) -> int:
    """How many timers are armed in ``storage`` (for readers without a timer service)."""
    return storage.count(TIMERS)


def armed_keys(storage: Storage, before_ms: int | None = None) -> list[bytes]:
    """The keys of the armed timers (due before ``before_ms``, if given), in deadline order."""
    end = None if before_ms is None else _DEADLINE.pack(max(0, before_ms))
    return [key for key, _ in storage.scan(TIMERS, end=end, keys_only=True)]


def parse_timer_key(key: bytes) -> tuple[int, str, bytes]:
    """Splits an index key into ``(deadline_ms, kind, target)``."""
    return _DEADLINE.unpack_from(key)[0], chr(key[8]), key[9:]


class TimerService:
    """Fires due timers to the handler registered for their kind.

    Args:
        storage: Where the index lives.
        clock: The runtime's clock; every deadline is read against it.
    """

    def __init__(self, storage: Storage, clock: Clock) -> None:
        self._storage = storage
        self._clock = clock
        self._handlers: dict[str, Handler] = {}
        self._saturated: dict[str, Callable[[], bool]] = {}
        self._inflight: set[bytes] = set()
        # Keys an owner's commit consumed (or re-armed) during the current pass:
        # the pass may have read them just before that commit, and must not hand
        # out a timer that is gone (nobody would ever call done() for it). One
        # that was re-armed is offered by the next pass (done() kicks one).
        self._gone: set[bytes] = set()
        self._cond = threading.Condition()
        self._kicked = False
        self._stopped = False
        self._passes = 0  # passes finished
        self._started = 0  # passes begun
        self._thread = threading.Thread(target=self._run, name="actorflow-timers", daemon=True)
        self.fired = 0
        self._floor: bytes | None = None  # see _pass
        self._resets = 0  # bumped whenever the floor is dropped during a pass
        self._full_at = 0.0
        clock.subscribe(self.kick)

    def register(
        self, kind: str, handler: Handler, saturated: Callable[[], bool] | None = None
    ) -> None:
        """Routes timers of ``kind`` (one character) to ``handler``.

        Args:
            kind: The kind.
            handler: Called with each due timer of the kind.
            saturated: Optional; True while the handler would refuse every
                timer. A pass then skips the kind's keys without calling the
                handler, and stops after a run of them, instead of offering
                thousands of due keys again on every pass of a wake-up burst.
        """
        if len(kind) != 1:
            raise ValueError("timer kind must be one character")
        self._handlers[kind] = handler
        if saturated is not None:
            self._saturated[kind] = saturated

    def start(self) -> None:
        """Starts the timer thread."""
        self._thread.start()

    # Arming and disarming: the only writers of the index. Static, because a
    # timer is armed in its owner's own batch, not by the service.

    @staticmethod
    def arm(batch: WriteBatch, deadline_ms: int, kind: str, target: bytes) -> bytes:
        """Adds a timer to ``batch``; returns its key (keep it to disarm it)."""
        key = timer_key(deadline_ms, kind, target)
        batch.put(TIMERS, key, b"")
        return key

    @staticmethod
    def arm_key(batch: WriteBatch, key: bytes) -> None:
        """Adds timer ``key`` (made by :func:`timer_key`) to ``batch``.

        For an owner that keeps the key in its own record before arming it,
        or arms again a timer it had armed before.
        """
        batch.put(TIMERS, key, b"")

    @staticmethod
    def disarm(batch: WriteBatch, key: bytes | None) -> None:
        """Adds the removal of timer ``key`` to ``batch`` (None: nothing)."""
        if key:
            batch.delete(TIMERS, key)

    def armed(self, keys: Iterable[bytes]) -> set[bytes]:
        """Returns those of ``keys`` still armed (not yet consumed), in one snapshot."""
        return set(self._storage.get_many(TIMERS, keys))

    def done(self, key: bytes | None, consumed: bool = False) -> None:
        """Tells the service the handler of ``key`` finished (or gave it up).

        Args:
            key: The timer.
            consumed: The owner's commit deleted (or re-armed) the key; the
                pass going on does not offer it again, even if it read the key
                before that commit. Unless consumed, the key may be due again
                and the next pass re-reads the index head.
        """
        if key:
            with self._cond:
                self._inflight.discard(key)
                if consumed:
                    self._gone.add(key)
                if not consumed and self._floor is not None and key <= self._floor:
                    self._drop_floor()

    def kick(self) -> None:
        """Makes the thread re-read the index now (a new early timer, freed capacity)."""
        with self._cond:
            self._kicked = True
            self._cond.notify_all()

    def sync(self, timeout: float = 10.0) -> bool:
        """Waits until a full pass that started after this call has finished."""
        with self._cond:
            # Pass number ``_started + 1`` is the first to begin after now.
            target = self._started + 1
            self._drop_floor()  # a full pass: nothing below the floor is missed
            self._kicked = True
            self._cond.notify_all()
            return self._cond.wait_for(lambda: self._passes >= target or self._stopped, timeout)

    def pending(self) -> int:
        """Returns how many timers are armed (the timer backlog)."""
        return count_armed(self._storage)

    def next_deadline_ms(self, after_ms: int | None = None) -> int | None:
        """Returns the earliest armed deadline that is not in flight, or None.

        With ``after_ms``, only deadlines later than it count: timers already
        due that nobody took (their owner is not registered) are skipped.
        """
        start = timer_key(after_ms + 1, "\x00", b"") if after_ms is not None else None
        for key, _ in self._storage.scan(TIMERS, start=start, limit=_MAX_SCAN, keys_only=True):
            if key not in self._inflight:
                return parse_timer_key(key)[0]
        return None

    def busy(self, ignore: set[bytes] | frozenset[bytes] = frozenset()) -> bool:
        """True while a fired timer is being handled (keys in ``ignore`` aside)."""
        with self._cond:
            return bool(self._inflight - ignore) if ignore else bool(self._inflight)

    def stop(self) -> None:
        """Stops the timer thread."""
        self._clock.unsubscribe(self.kick)
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                if self._stopped:
                    return
                self._kicked = False
                self._started += 1
                # What the pass reads happens after this: a commit that lands
                # earlier is not in its reads.
                self._gone.clear()
            try:
                next_ms = self._pass()
            except Exception:
                if self._stopped:
                    return
                log.exception("timer pass failed")
                next_ms = None
            with self._cond:
                self._passes += 1
                self._cond.notify_all()
                if self._stopped:
                    return
                if self._kicked:
                    continue
                wait = _POLL_S
                if next_ms is not None:
                    real = self._clock.real_timeout(next_ms / 1000.0)
                    wait = _POLL_S if real is None else min(max(real, _COALESCE_S), _POLL_S)
                if wait > 0:
                    self._cond.wait(wait)

    def _pass(self) -> int | None:
        """Dispatches every due timer; returns the next deadline in ms, if any.

        Due timers stay in the index until their owner's commit deletes them,
        so a burst of wake-ups leaves thousands of in-flight keys at its head.
        A pass therefore starts after the run of in-flight keys the previous
        pass saw at the head (``_floor``) rather than re-reading them all. A
        key can only land below that point if it was armed with a deadline
        already past, or handed back without being deleted: a full pass every
        ``_POLL_S`` picks those up.
        """
        now_ms = int(self._clock.now() * 1000)
        mono = time.monotonic()
        with self._cond:
            if self._floor is None or mono - self._full_at >= _POLL_S:
                self._floor, self._full_at = None, mono
            floor, resets = self._floor, self._resets
        head = True  # every key so far is in flight
        seen = skipped = 0
        full = {k for k, f in self._saturated.items() if f()}
        start_after = floor
        # A first small read: usually the head is already a future deadline.
        chunk = 16
        while seen < _MAX_SCAN and skipped < _CHUNK:
            rows = self._storage.scan(TIMERS, start_after=start_after, limit=chunk, keys_only=True)
            chunk = _CHUNK
            if not rows:
                break
            for key, _ in rows:
                seen += 1
                deadline, kind, target = parse_timer_key(key)
                if deadline > now_ms:
                    self._keep_floor(floor, resets)
                    return deadline
                if kind in full:
                    head = False
                    skipped += 1
                    if skipped >= _CHUNK:
                        break
                    continue
                skipped = 0
                with self._cond:
                    if key in self._gone:
                        head = False  # the floor stays below it: it may be armed again
                        continue
                    if key in self._inflight:
                        if head:
                            floor = key
                        continue
                    self._inflight.add(key)
                handler = self._handlers.get(kind)
                accepted = False
                try:
                    accepted = handler is not None and handler(target, key, deadline)
                except Exception:
                    log.exception("timer handler for kind %r failed", kind)
                if accepted:
                    self.fired += 1
                    if head:
                        floor = key
                else:
                    head = False
                    with self._cond:
                        self._inflight.discard(key)
            start_after = rows[-1][0]
        self._keep_floor(floor, resets)
        return None

    def _drop_floor(self) -> None:
        """Makes the next pass read the index from its head (hold ``_cond``)."""
        self._floor, self._resets = None, self._resets + 1

    def _keep_floor(self, floor: bytes | None, resets: int) -> None:
        with self._cond:
            if self._resets == resets:  # nothing below it was handed back meanwhile
                self._floor = floor
