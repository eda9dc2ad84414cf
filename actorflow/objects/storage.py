"""``ctx.storage``: a Durable Object's private, transactional key-value store.

Keys live in the runtime's ``objects`` keyspace under ``namespace \\0 id \\0``;
the object's one alarm is a record in the ``alarms`` keyspace plus a key in the
runtime's timer index. Writes are buffered per call and committed by the
object's actor (see :mod:`actorflow.objects.namespace`).
"""

from __future__ import annotations

import builtins
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, overload

from actorflow.core.clock import to_epoch_ms
from actorflow.core.errors import LimitExceeded
from actorflow.core.storage import MAX_KEY_BYTES, Chain, Storage, WriteBatch
from actorflow.core.timers import TimerService

__all__ = [
    "ALARMS",
    "ALARM_KIND",
    "ALARM_RECORD",
    "OBJECTS",
    "ObjectState",
    "ObjectStorage",
    "alarm_target",
    "split_alarm_target",
]

OBJECTS = "objects"  # keyspace of object data: ns \0 id \0 key
ALARMS = "alarms"  # keyspace of alarm records: ns \0 id -> deadline, retries, timer key
ALARM_KIND = "A"


def alarm_target(namespace: str, oid: str) -> bytes:
    """The target of an object's alarm timer: ``namespace \\0 object id``."""
    return f"{namespace}\x00{oid}".encode()


def split_alarm_target(target: bytes) -> tuple[str, str]:
    """``(namespace, object id)`` of an alarm timer's target."""
    namespace, oid = target.split(b"\x00", 1)
    return namespace.decode(), oid.decode()


ALARM_RECORD = struct.Struct(">QI")  # deadline ms, retries; the timer key follows
_TOMBSTONE = None
_MISS: Any = object()  # "not known here": look further down
_VIEW_MIN = 1024  # view entries kept before landed ones are dropped


class ObjectState:
    """The engine side of one object's storage: what its actor commits and tracks.

    :class:`ObjectStorage` (``ctx.storage``) is the object's API over this
    state; the object's actor (:mod:`actorflow.objects.namespace`) takes the
    pending writes as a batch, discards them, trims the view and settles
    alarms through it. Not user API.

    Attributes:
        pending: The current call's writes (key -> value, None deletes).
        cleared: The current call ran ``delete_all``.
        alarm: The current call's alarm change: False untouched, None deleted,
            an int (epoch ms) set.
        alarm_retry: A failed alarm handler's retry: deadline, retries, when.
        running_alarm: An alarm handler is running.
        view: Key -> (value, seq of the flight carrying it; 0 for a read).
        seq: The last flight submitted.
        landed: The last flight durable (written by the writer thread).
    """

    # One per live object: slots keep it small.
    __slots__ = (
        "alarm",
        "alarm_key",
        "alarm_rec",
        "alarm_retry",
        "cleared",
        "cleared_seq",
        "landed",
        "max_key",
        "pending",
        "prefix",
        "running_alarm",
        "seq",
        "ser",
        "store",
        "view",
        "view_cleared",
        "view_limit",
    )

    def __init__(self, store: Storage, namespace: str, oid: str) -> None:
        self.store = store
        self.ser = store.serializer
        self.prefix = f"{namespace}\x00{oid}\x00".encode()
        self.alarm_key = alarm_target(namespace, oid)
        self.max_key = MAX_KEY_BYTES - len(self.prefix)
        self.pending: dict[str, bytes | None] = {}
        self.cleared = False
        self.alarm: int | bool | None = False
        self.alarm_retry: tuple[int, int, int] | None = None
        self.running_alarm = False
        self.view: dict[str, tuple[bytes | None, int]] = {}
        self.view_cleared = False  # a delete_all in flight: keys not in the view are absent
        self.cleared_seq = 0
        self.view_limit = _VIEW_MIN
        self.alarm_rec: bytes | None = _MISS
        self.seq = 0
        self.landed = 0

    def read(self, key: str) -> bytes | None:
        """``key``'s value as the object sees it: its pending writes, the view, storage."""
        raw: bytes | None = self.pending.get(key, _MISS)
        if raw is not _MISS:
            return raw
        if self.cleared:
            return None
        entry = self.view.get(key)
        if entry is not None:
            return entry[0]
        if self.view_cleared:
            return None
        raw = self.store.get(OBJECTS, self.prefix + key.encode())
        if len(self.view) < self.view_limit:
            self.view[key] = (raw, 0)
        return raw

    def alarm_record(self) -> bytes | None:
        """The object's alarm record (cached), or None."""
        if self.alarm_rec is _MISS:
            self.alarm_rec = self.store.get(ALARMS, self.alarm_key)
        return self.alarm_rec

    def take_batch(self, chain: Chain | None = None) -> tuple[WriteBatch | None, bool]:
        """Turns the pending writes into a batch and moves them to the view.

        Returns the batch (None when there is nothing to write) and whether
        it arms a timer.
        """
        if (
            not self.pending
            and not self.cleared
            and self.alarm is False
            and self.alarm_retry is None
        ):
            return None, False
        seq = self.seq + 1
        batch = WriteBatch(chain)
        prefix = self.prefix
        if self.cleared:
            batch.delete_prefix(OBJECTS, prefix)
        for k, v in self.pending.items():
            if v is None:
                batch.delete(OBJECTS, prefix + k.encode())
            else:
                batch.put(OBJECTS, prefix + k.encode(), v)
        armed = False
        new_rec: bytes | None = _MISS
        if self.alarm is not False or self.alarm_retry is not None:
            old = self.alarm_record()
            if old is not None:
                TimerService.disarm(batch, old[ALARM_RECORD.size :])
            if self.alarm is False and self.alarm_retry is not None:
                deadline, retries, when = self.alarm_retry
                tkey = TimerService.arm(batch, when, ALARM_KIND, self.alarm_key)
                new_rec = ALARM_RECORD.pack(deadline, retries) + tkey
            elif isinstance(self.alarm, int):
                tkey = TimerService.arm(batch, self.alarm, ALARM_KIND, self.alarm_key)
                new_rec = ALARM_RECORD.pack(self.alarm, 0) + tkey
            else:
                new_rec = None
            if new_rec is None:
                batch.delete(ALARMS, self.alarm_key)
            else:
                batch.put(ALARMS, self.alarm_key, new_rec)
                armed = True
        # The batch is built: nothing below can fail, so the view stays exact.
        view = self.view
        if self.cleared:
            view.clear()
            self.view_cleared = True
            self.cleared_seq = seq
        for k, v in self.pending.items():
            view[k] = (v, seq)
        if new_rec is not _MISS:
            self.alarm_rec = new_rec
        self.seq = seq
        self.discard()
        return batch, armed

    def discard(self) -> None:
        """Drops the current call's writes."""
        self.pending = {}
        self.cleared = False
        self.alarm = False
        self.alarm_retry = None

    def trim(self) -> None:
        """Drops view entries already durable once the view has grown."""
        if len(self.view) <= self.view_limit:
            return
        landed = self.landed
        if self.view_cleared and self.cleared_seq <= landed:
            self.view_cleared = False
        self.view = {k: e for k, e in self.view.items() if e[1] > landed}
        self.view_limit = max(_VIEW_MIN, 2 * len(self.view))


class ObjectStorage:
    """``ctx.storage``: an object's private, transactional key-value store.

    Keys are ``str`` (ordered by their UTF-8 bytes); values are anything the
    runtime's serializer accepts. Reads see the call's own pending writes and
    the object's earlier writes, durable or not yet.
    """

    __slots__ = ("_s",)

    def __init__(self, state: ObjectState) -> None:
        self._s = state

    # -- reads -------------------------------------------------------------

    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    @overload
    def get(self, key: builtins.list[str], default: Any = None) -> dict[str, Any]: ...
    def get(self, key: str | builtins.list[str], default: Any = None) -> Any:
        """Returns the value of ``key`` (or ``default``), or a dict for a list of keys.

        For a list, missing keys are left out and the dict is in key order.
        """
        if isinstance(key, builtins.list):
            out = {}
            for k in sorted(key, key=lambda s: _check_key(s).encode()):
                raw = self._s.read(k)
                if raw is not None:
                    out[k] = self._s.ser.loads(raw)
            return out
        raw = self._s.read(_check_key(key))
        return default if raw is None else self._s.ser.loads(raw)

    def list(
        self,
        *,
        prefix: str = "",
        start: str | None = None,
        start_after: str | None = None,
        end: str | None = None,
        reverse: bool = False,
        limit: int | None = None,
    ) -> dict[str, Any]:
        """Returns the pairs in key order (descending with ``reverse``).

        ``start`` is inclusive, ``start_after`` exclusive, ``end`` exclusive;
        ``reverse`` does not change their meaning.
        """
        if start is not None and start_after is not None:
            raise ValueError("list(): give start or start_after, not both")
        if limit is not None and limit <= 0:
            return {}
        sb = start.encode() if start is not None else None
        sab = start_after.encode() if start_after is not None else None
        eb = end.encode() if end is not None else None

        def in_range(k: str) -> bool:
            if not k.startswith(prefix):
                return False
            kb = k.encode()
            return not (
                (sb is not None and kb < sb)
                or (sab is not None and kb <= sab)
                or (eb is not None and kb >= eb)
            )

        rows: dict[str, bytes | None] = {}
        if not self._s.cleared:
            if not self._s.view_cleared:
                enc = self._s.prefix
                # Fetch enough that deletions not yet durable cannot starve the limit.
                extra = sum(1 for v, _s in self._s.view.values() if v is None)
                extra += sum(1 for v in self._s.pending.values() if v is None)
                committed = self._s.store.scan(
                    OBJECTS,
                    prefix=enc + prefix.encode(),
                    start=enc + sb if sb is not None else None,
                    start_after=enc + sab if sab is not None else None,
                    end=enc + eb if eb is not None else None,
                    reverse=reverse,
                    limit=None if limit is None else limit + extra,
                )
                n = len(enc)
                rows = {k[n:].decode(): v for k, v in committed}
            for k, (v, _s) in self._s.view.items():
                if in_range(k):
                    rows[k] = v
        for k, pv in self._s.pending.items():
            if in_range(k):
                rows[k] = pv
        keys = sorted(
            (k for k, v in rows.items() if v is not None), key=str.encode, reverse=reverse
        )
        if limit is not None:
            keys = keys[:limit]
        out: dict[str, Any] = {}
        for k in keys:
            raw = rows[k]
            assert raw is not None
            out[k] = self._s.ser.loads(raw)
        return out

    # -- writes ------------------------------------------------------------

    def _writable(self, key: str) -> str:
        _check_key(key)
        if len(key) * 4 > self._s.max_key and len(key.encode()) > self._s.max_key:
            raise LimitExceeded(
                f"storage key {key[:40]!r}... of {len(key.encode())} bytes is too long for "
                f"this object (at most {self._s.max_key} bytes)"
            )
        return key

    def put(self, key: str | dict[str, Any], value: Any = None) -> None:
        """Stores ``value`` at ``key``, or every pair of a dict.

        Raises:
            SerializationError: The value cannot be stored; nothing is written.
            LimitExceeded: The key is too long.
        """
        if isinstance(key, dict):
            encoded = {self._writable(k): self._s.ser.dumps(v) for k, v in key.items()}
            self._s.pending.update(encoded)
            return
        self._s.pending[self._writable(key)] = self._s.ser.dumps(value)

    @overload
    def delete(self, key: str) -> bool: ...
    @overload
    def delete(self, key: builtins.list[str]) -> int: ...
    def delete(self, key: str | builtins.list[str]) -> bool | int:
        """Deletes a key (returns whether it existed) or a list (returns the count)."""
        if isinstance(key, builtins.list):
            return sum(1 for k in key if self.delete(k))
        existed = self._s.read(self._writable(key)) is not None
        self._s.pending[key] = _TOMBSTONE
        return existed

    def delete_all(self) -> None:
        """Deletes every key of the object. The alarm is kept."""
        self._s.pending.clear()
        self._s.cleared = True

    @contextmanager
    def transaction(self) -> Iterator[ObjectStorage]:
        """Groups writes that are rolled back if the block raises."""
        st = self._s
        saved = (dict(st.pending), st.cleared, st.alarm)
        try:
            yield self
        except BaseException:
            st.pending, st.cleared, st.alarm = saved
            raise

    # -- alarms ------------------------------------------------------------

    def set_alarm(self, when: Any) -> None:
        """Sets the object's one alarm (aware datetime or epoch ms), replacing any other."""
        self._s.alarm = to_epoch_ms(when, what="set_alarm")

    def get_alarm(self) -> int | None:
        """Returns the alarm time in epoch ms, or None.

        While an alarm handler runs, this is None unless it set a new one.
        """
        if self._s.alarm is not False:
            return self._s.alarm if isinstance(self._s.alarm, int) else None
        if self._s.running_alarm:
            return None
        rec = self._s.alarm_record()
        return None if rec is None else int(ALARM_RECORD.unpack_from(rec)[0])

    def delete_alarm(self) -> None:
        """Cancels the alarm, if any."""
        self._s.alarm = None


def _check_key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"storage keys are str, not {type(key).__name__}")
    return key
