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
from typing import TYPE_CHECKING, Any, overload

from actorflow.core.clock import to_epoch_ms
from actorflow.core.errors import LimitExceeded
from actorflow.core.storage import MAX_KEY_BYTES, Chain, WriteBatch
from actorflow.core.timers import TimerService

if TYPE_CHECKING:
    from actorflow.objects.namespace import DurableObjectNamespace

__all__ = ["ALARMS", "ALARM_KIND", "ALARM_RECORD", "OBJECTS", "ObjectStorage"]

OBJECTS = "objects"  # keyspace of object data: ns \0 id \0 key
ALARMS = "alarms"  # keyspace of alarm records: ns \0 id -> deadline, retries, timer key
ALARM_KIND = "A"
ALARM_RECORD = struct.Struct(">QI")  # deadline ms, retries; the timer key follows
_TOMBSTONE = None
_MISS: Any = object()  # "not known here": look further down
_VIEW_MIN = 1024  # view entries kept before landed ones are dropped


class ObjectStorage:
    """``ctx.storage``: an object's private, transactional key-value store.

    Keys are ``str`` (ordered by their UTF-8 bytes); values are anything the
    runtime's serializer accepts. Reads see the call's own pending writes and
    the object's earlier writes, durable or not yet.
    """

    def __init__(self, host: DurableObjectNamespace[Any], oid: str) -> None:
        self._host = host
        self._store = host._storage
        self._ser = host._storage.serializer
        self._prefix = f"{host.name}\x00{oid}\x00".encode()
        self._alarm_key = f"{host.name}\x00{oid}".encode()
        self._max_key = MAX_KEY_BYTES - len(self._prefix)
        # The current call's writes.
        self._pending: dict[str, bytes | None] = {}
        self._cleared = False
        self._alarm: int | bool | None = False  # False: untouched; None: deleted; int: set
        self._alarm_retry: tuple[int, int, int] | None = None  # deadline, retries, when
        self.running_alarm = False
        # The view: key -> (value, seq of the flight carrying it; 0 for a read).
        self._view: dict[str, tuple[bytes | None, int]] = {}
        self._view_cleared = False  # a delete_all in flight: keys not in the view are absent
        self._cleared_seq = 0
        self._view_limit = _VIEW_MIN
        self._alarm_rec: bytes | None = _MISS
        self._seq = 0  # the last flight submitted
        self.landed = 0  # the last flight durable (written by the writer thread)

    # -- reads -------------------------------------------------------------

    def _read(self, key: str) -> bytes | None:
        raw: bytes | None = self._pending.get(key, _MISS)
        if raw is not _MISS:
            return raw
        if self._cleared:
            return None
        entry = self._view.get(key)
        if entry is not None:
            return entry[0]
        if self._view_cleared:
            return None
        raw = self._store.get(OBJECTS, self._prefix + key.encode())
        if len(self._view) < self._view_limit:
            self._view[key] = (raw, 0)
        return raw

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
                raw = self._read(k)
                if raw is not None:
                    out[k] = self._ser.loads(raw)
            return out
        raw = self._read(_check_key(key))
        return default if raw is None else self._ser.loads(raw)

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
        if not self._cleared:
            if not self._view_cleared:
                enc = self._prefix
                # Fetch enough that deletions not yet durable cannot starve the limit.
                extra = sum(1 for v, _s in self._view.values() if v is None)
                extra += sum(1 for v in self._pending.values() if v is None)
                committed = self._store.scan(
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
            for k, (v, _s) in self._view.items():
                if in_range(k):
                    rows[k] = v
        for k, pv in self._pending.items():
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
            out[k] = self._ser.loads(raw)
        return out

    # -- writes ------------------------------------------------------------

    def _writable(self, key: str) -> str:
        _check_key(key)
        if len(key) * 4 > self._max_key and len(key.encode()) > self._max_key:
            raise LimitExceeded(
                f"storage key {key[:40]!r}... of {len(key.encode())} bytes is too long for "
                f"this object (at most {self._max_key} bytes)"
            )
        return key

    def put(self, key: str | dict[str, Any], value: Any = None) -> None:
        """Stores ``value`` at ``key``, or every pair of a dict.

        Raises:
            SerializationError: The value cannot be stored; nothing is written.
            LimitExceeded: The key is too long.
        """
        if isinstance(key, dict):
            encoded = {self._writable(k): self._ser.dumps(v) for k, v in key.items()}
            self._pending.update(encoded)
            return
        self._pending[self._writable(key)] = self._ser.dumps(value)

    @overload
    def delete(self, key: str) -> bool: ...
    @overload
    def delete(self, key: builtins.list[str]) -> int: ...
    def delete(self, key: str | builtins.list[str]) -> bool | int:
        """Deletes a key (returns whether it existed) or a list (returns the count)."""
        if isinstance(key, builtins.list):
            return sum(1 for k in key if self.delete(k))
        existed = self._read(self._writable(key)) is not None
        self._pending[key] = _TOMBSTONE
        return existed

    def delete_all(self) -> None:
        """Deletes every key of the object. The alarm is kept."""
        self._pending.clear()
        self._cleared = True

    @contextmanager
    def transaction(self) -> Iterator[ObjectStorage]:
        """Groups writes that are rolled back if the block raises."""
        saved = (dict(self._pending), self._cleared, self._alarm)
        try:
            yield self
        except BaseException:
            self._pending, self._cleared, self._alarm = saved
            raise

    # -- alarms ------------------------------------------------------------

    def _alarm_record(self) -> bytes | None:
        if self._alarm_rec is _MISS:
            self._alarm_rec = self._store.get(ALARMS, self._alarm_key)
        return self._alarm_rec

    def set_alarm(self, when: Any) -> None:
        """Sets the object's one alarm (aware datetime or epoch ms), replacing any other."""
        self._alarm = to_epoch_ms(when, what="set_alarm")

    def get_alarm(self) -> int | None:
        """Returns the alarm time in epoch ms, or None.

        While an alarm handler runs, this is None unless it set a new one.
        """
        if self._alarm is not False:
            return self._alarm if isinstance(self._alarm, int) else None
        if self.running_alarm:
            return None
        rec = self._alarm_record()
        return None if rec is None else int(ALARM_RECORD.unpack_from(rec)[0])

    def delete_alarm(self) -> None:
        """Cancels the alarm, if any."""
        self._alarm = None

    # -- commit (used by the actor) ----------------------------------------

    def _take_batch(self, chain: Chain | None = None) -> tuple[WriteBatch | None, bool]:
        """Turns the pending writes into a batch and moves them to the view.

        Returns the batch (None when there is nothing to write) and whether
        it arms a timer.
        """
        if (
            not self._pending
            and not self._cleared
            and self._alarm is False
            and self._alarm_retry is None
        ):
            return None, False
        seq = self._seq + 1
        batch = WriteBatch(chain)
        prefix = self._prefix
        if self._cleared:
            batch.delete_prefix(OBJECTS, prefix)
        for k, v in self._pending.items():
            if v is None:
                batch.delete(OBJECTS, prefix + k.encode())
            else:
                batch.put(OBJECTS, prefix + k.encode(), v)
        armed = False
        new_rec: bytes | None = _MISS
        if self._alarm is not False or self._alarm_retry is not None:
            old = self._alarm_record()
            if old is not None:
                TimerService.disarm(batch, old[ALARM_RECORD.size :])
            if self._alarm is False and self._alarm_retry is not None:
                deadline, retries, when = self._alarm_retry
                tkey = TimerService.arm(batch, when, ALARM_KIND, self._alarm_key)
                new_rec = ALARM_RECORD.pack(deadline, retries) + tkey
            elif isinstance(self._alarm, int):
                tkey = TimerService.arm(batch, self._alarm, ALARM_KIND, self._alarm_key)
                new_rec = ALARM_RECORD.pack(self._alarm, 0) + tkey
            else:
                new_rec = None
            if new_rec is None:
                batch.delete(ALARMS, self._alarm_key)
            else:
                batch.put(ALARMS, self._alarm_key, new_rec)
                armed = True
        # The batch is built: nothing below can fail, so the view stays exact.
        view = self._view
        if self._cleared:
            view.clear()
            self._view_cleared = True
            self._cleared_seq = seq
        for k, v in self._pending.items():
            view[k] = (v, seq)
        if new_rec is not _MISS:
            self._alarm_rec = new_rec
        self._seq = seq
        self._discard()
        return batch, armed

    def _discard(self) -> None:
        self._pending = {}
        self._cleared = False
        self._alarm = False
        self._alarm_retry = None

    def _trim(self) -> None:
        """Drops view entries already durable once the view has grown."""
        if len(self._view) <= self._view_limit:
            return
        landed = self.landed
        if self._view_cleared and self._cleared_seq <= landed:
            self._view_cleared = False
        self._view = {k: e for k, e in self._view.items() if e[1] > landed}
        self._view_limit = max(_VIEW_MIN, 2 * len(self._view))


def _check_key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"storage keys are str, not {type(key).__name__}")
    return key
