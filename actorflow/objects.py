"""Durable Objects: single-threaded actors, each owning a transactional keyspace.

An object is activated on its first call (or alarm), handles one call at a
time in arrival order on a :class:`~actorflow.actors.PooledActor`, and is
evicted once it has been idle for ``idle_timeout`` seconds. Its storage
survives eviction and restarts; its in-memory state does not.

All writes of one call are buffered and committed atomically when the call
returns (or raises); the caller gets the result only after that commit is
durable. This is Cloudflare's output gate. Writes made before an exception
are committed too; use :meth:`ObjectStorage.transaction` to roll them back.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import logging
import random
import secrets
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, overload

import pykka
from pykka.messages import ProxyCall

from actorflow.actors import Executor, PooledActor
from actorflow.clock import Clock, to_epoch_ms
from actorflow.errors import ActorflowError, StorageError
from actorflow.storage import Storage, WriteBatch
from actorflow.timers import TimerService

__all__ = [
    "AlarmInfo",
    "DurableObject",
    "DurableObjectId",
    "DurableObjectNamespace",
    "DurableObjectState",
    "DurableObjectStub",
    "ObjectStorage",
]

log = logging.getLogger("actorflow.objects")

OBJECTS = "objects"  # keyspace of object data: ns \0 id \0 key
ALARMS = "alarms"  # keyspace of alarm records: ns \0 id -> deadline, retries, timer key
ALARM_KIND = "A"
ALARM_MAX_RETRIES = 6
_ALARM = struct.Struct(">QI")
_TOMBSTONE = None
T = TypeVar("T", bound="DurableObject")


@dataclass(frozen=True)
class AlarmInfo:
    """What an ``alarm(info)`` handler is told."""

    retry_count: int
    is_retry: bool
    scheduled_time: int  # epoch ms


class DurableObjectId:
    """An object's id: 64 hex characters; the last 8 tie it to its namespace."""

    __slots__ = ("hex", "name")

    def __init__(self, hex_id: str, name: str | None = None) -> None:
        self.hex = hex_id
        self.name = name

    def __str__(self) -> str:
        return self.hex

    def __repr__(self) -> str:
        return f"DurableObjectId({self.hex!r}{', name=' + repr(self.name) if self.name else ''})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DurableObjectId) and other.hex == self.hex

    def __hash__(self) -> int:
        return hash(self.hex)


class ObjectStorage:
    """``ctx.storage``: an object's private, transactional key-value store.

    Keys are ``str`` (ordered by their UTF-8 bytes); values are anything the
    runtime's serializer accepts. Reads see the call's own pending writes.
    """

    def __init__(self, host: DurableObjectNamespace, oid: str) -> None:
        self._host = host
        self._store = host._storage
        self._ser = host._storage.serializer
        self._prefix = f"{host.name}\x00{oid}\x00".encode()
        self._alarm_key = f"{host.name}\x00{oid}".encode()
        self._pending: dict[str, bytes | None] = {}
        self._cleared = False
        self._alarm: int | None | bool = False  # False: untouched; None: deleted; int: set
        self.running_alarm = False

    # -- reads -------------------------------------------------------------

    def _committed(self, key: str) -> bytes | None:
        if self._cleared:
            return None
        return self._store.get(OBJECTS, self._prefix + key.encode())

    def _read(self, key: str) -> bytes | None:
        if key in self._pending:
            return self._pending[key]
        return self._committed(key)

    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    @overload
    def get(self, key: list[str], default: Any = None) -> dict[str, Any]: ...
    def get(self, key: str | list[str], default: Any = None) -> Any:
        """Returns the value of ``key`` (or ``default``), or a dict for a list of keys.

        For a list, missing keys are left out and the dict is in key order.
        """
        if isinstance(key, list):
            out = {}
            for k in sorted(key, key=lambda s: s.encode()):
                raw = self._read(_check_key(k))
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

        ``start`` is inclusive, ``start_after`` exclusive, ``end`` exclusive.
        """
        if start is not None and start_after is not None:
            raise ValueError("list(): give start or start_after, not both")
        rows: dict[str, bytes | None] = {}
        if not self._cleared:
            enc = self._prefix
            extra = sum(1 for v in self._pending.values() if v is None)
            committed = self._store.scan(
                OBJECTS,
                prefix=enc + prefix.encode(),
                start=enc + start.encode() if start is not None else None,
                start_after=enc + start_after.encode() if start_after is not None else None,
                end=enc + end.encode() if end is not None else None,
                reverse=reverse,
                limit=None if limit is None else limit + extra,
            )
            n = len(enc)
            rows = {k[n:].decode(): v for k, v in committed}
        for k, v in self._pending.items():
            if not k.startswith(prefix):
                continue
            kb = k.encode()
            if start is not None and kb < start.encode():
                continue
            if start_after is not None and kb <= start_after.encode():
                continue
            if end is not None and kb >= end.encode():
                continue
            rows[k] = v
        keys = sorted((k for k, v in rows.items() if v is not None), key=str.encode, reverse=reverse)
        if limit is not None:
            keys = keys[:limit]
        out: dict[str, Any] = {}
        for k in keys:
            raw = rows[k]
            assert raw is not None
            out[k] = self._ser.loads(raw)
        return out

    # -- writes ------------------------------------------------------------

    def put(self, key: str | dict[str, Any], value: Any = None) -> None:
        """Stores ``value`` at ``key``, or every pair of a dict.

        Raises:
            SerializationError: The value cannot be stored; nothing is written.
        """
        if isinstance(key, dict):
            encoded = {_check_key(k): self._ser.dumps(v) for k, v in key.items()}
            self._pending.update(encoded)
            return
        self._pending[_check_key(key)] = self._ser.dumps(value)

    @overload
    def delete(self, key: str) -> bool: ...
    @overload
    def delete(self, key: list[str]) -> int: ...
    def delete(self, key: str | list[str]) -> bool | int:
        """Deletes a key (returns whether it existed) or a list (returns the count)."""
        if isinstance(key, list):
            return sum(1 for k in key if self.delete(k))
        existed = self._read(_check_key(key)) is not None
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
        rec = self._store.get(ALARMS, self._alarm_key)
        return None if rec is None else _ALARM.unpack_from(rec)[0]

    def delete_alarm(self) -> None:
        """Cancels the alarm, if any."""
        self._alarm = None

    # -- commit (used by the actor) ----------------------------------------

    def _take_batch(self) -> tuple[WriteBatch, int | None]:
        """Builds the batch of pending writes and resets them; returns it and a new alarm."""
        batch = WriteBatch()
        if self._cleared:
            batch.delete_prefix(OBJECTS, self._prefix)
        for k, v in self._pending.items():
            key = self._prefix + k.encode()
            if v is None:
                batch.delete(OBJECTS, key)
            else:
                batch.put(OBJECTS, key, v)
        new_alarm: int | None = None
        if self._alarm is not False:
            old = self._store.get(ALARMS, self._alarm_key)
            if old is not None:
                TimerService.disarm(batch, old[_ALARM.size :])
            if isinstance(self._alarm, int):
                new_alarm = self._alarm
                tkey = TimerService.arm(batch, new_alarm, ALARM_KIND, self._alarm_key)
                batch.put(ALARMS, self._alarm_key, _ALARM.pack(new_alarm, 0) + tkey)
            else:
                batch.delete(ALARMS, self._alarm_key)
        self._pending = {}
        self._cleared = False
        self._alarm = False
        return batch, new_alarm

    def _discard(self) -> None:
        self._pending = {}
        self._cleared = False
        self._alarm = False


def _check_key(key: str) -> str:
    if not isinstance(key, str):
        raise TypeError(f"storage keys are str, not {type(key).__name__}")
    return key


class DurableObjectState:
    """``ctx``: what an object knows about itself."""

    def __init__(self, oid: DurableObjectId, storage: ObjectStorage, namespace: str) -> None:
        self.id = oid
        self.storage = storage
        self.namespace = namespace


class DurableObject:
    """Base class of user Durable Objects.

    Public methods are callable through a stub. Override ``alarm(info)`` to
    handle alarms.

    Args:
        ctx: The object's state: ``ctx.id`` and ``ctx.storage``.
        env: Whatever was passed as ``env`` when the namespace was made.
    """

    def __init__(self, ctx: DurableObjectState, env: Any = None) -> None:
        self.ctx = ctx
        self.env = env


class _Alarm:
    __slots__ = ("deadline", "key")

    def __init__(self, key: bytes, deadline: int) -> None:
        self.key = key
        self.deadline = deadline


class _Evict:
    __slots__ = ()


class _ObjectActor(PooledActor):
    """The actor hosting one live object."""

    def __init__(self, host: DurableObjectNamespace, oid: DurableObjectId) -> None:
        super().__init__(host._executor)
        self.host = host
        self.oid = oid
        self.storage = ObjectStorage(host, oid.hex)
        self.obj: DurableObject | None = None
        self.last_used = time.monotonic()

    def on_start(self) -> None:
        ctx = DurableObjectState(self.oid, self.storage, self.host.name)
        self.obj = self.host.cls(ctx, self.host.env)
        self._commit()  # a constructor may write too

    def _handle_receive(self, message: Any) -> Any:
        self.last_used = time.monotonic()
        if isinstance(message, ProxyCall):
            return self._call(message)
        if isinstance(message, _Alarm):
            return self._run_alarm(message)
        if isinstance(message, _Evict):
            return self.host._evict_if_idle(self)
        return super()._handle_receive(message)

    def _call(self, message: ProxyCall) -> Any:
        name = message.attr_path[0]
        if self.obj is None:
            raise ActorflowError(f"object {self.host.name}/{self.oid} failed to start")
        fn = getattr(self.obj, name, None) if not name.startswith("_") else None
        if fn is None or not callable(fn):
            raise AttributeError(f"{self.host.cls.__name__} has no public method {name!r}")
        try:
            result = fn(*message.args, **message.kwargs)
            if inspect.iscoroutine(result):
                result = asyncio.run(result)
        finally:
            self._commit()
        return result

    def _commit(self) -> None:
        batch, _alarm = self.storage._take_batch()
        if not batch.ops:
            return
        try:
            self._storage_write(batch)
        except BaseException as exc:
            # The object's memory may disagree with storage now: reset it.
            self.host._forget(self)
            self.actor_stopped.set()
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"object {self.host.name}/{self.oid}: write failed: {exc}") from exc
        self.host._timers.kick()

    def _storage_write(self, batch: WriteBatch) -> None:
        self.host._storage.write(batch)

    def _run_alarm(self, msg: _Alarm) -> None:
        host, st = self.host, self.storage
        rec = host._storage.get(ALARMS, st._alarm_key)
        if rec is None or rec[_ALARM.size :] != msg.key or self.obj is None:
            host._timers.done(msg.key)  # stale: replaced or deleted since
            return
        deadline, retries = _ALARM.unpack_from(rec)
        handler = getattr(self.obj, "alarm", None)
        st.running_alarm = True
        error: BaseException | None = None
        try:
            if handler is not None:
                result = handler(AlarmInfo(retries, retries > 0, deadline))
                if inspect.iscoroutine(result):
                    asyncio.run(result)
        except Exception as exc:
            error = exc
        finally:
            st.running_alarm = False
        batch, _ = st._take_batch() if error is None else (WriteBatch(), None)
        if error is not None:
            st._discard()
        if not any(op[1] == ALARMS for op in batch.ops):
            # No new alarm was set by the handler: settle this one.
            TimerService.disarm(batch, msg.key)
            if error is not None and retries < ALARM_MAX_RETRIES:
                delay = 2000 << retries
                when = int(host._clock.now() * 1000) + delay + random.randint(0, delay // 4)
                tkey = TimerService.arm(batch, when, ALARM_KIND, st._alarm_key)
                batch.put(ALARMS, st._alarm_key, _ALARM.pack(deadline, retries + 1) + tkey)
                log.warning("alarm of %s/%s failed (retry %d): %s", host.name, self.oid,
                            retries + 1, error)
            else:
                batch.delete(ALARMS, st._alarm_key)
                if error is not None:
                    log.error("alarm of %s/%s abandoned after %d retries: %s", host.name,
                              self.oid, retries, error)
        try:
            host._storage.write(batch)
        finally:
            host._timers.done(msg.key)
            host._timers.kick()


class _RemoteMethod:
    __slots__ = ("_name", "_stub")

    def __init__(self, stub: DurableObjectStub[Any], name: str) -> None:
        self._stub = stub
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._stub._ns._call(self._stub.id, self._name, args, kwargs)

    def future(self, *args: Any, **kwargs: Any) -> pykka.Future[Any]:
        """Sends the call and returns a pykka future of its result at once."""
        return self._stub._ns._send(self._stub.id, self._name, args, kwargs)


class DurableObjectStub(Generic[T]):
    """A handle on an object. Attribute calls are RPCs to the object's actor.

    ``stub.method(*args)`` blocks for the result (or raises the method's
    exception); ``stub.method.future(*args)`` returns a future at once.
    Creating a stub sends nothing; the object starts on its first call.
    """

    def __init__(self, ns: DurableObjectNamespace, oid: DurableObjectId) -> None:
        self._ns = ns
        self.id = oid
        self.name = oid.name

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return _RemoteMethod(self, name)

    def __repr__(self) -> str:
        return f"<DurableObjectStub {self._ns.name}/{self.id.hex[:12]}>"


class DurableObjectNamespace(Generic[T]):
    """The objects of one class under one name; hands out ids and stubs.

    Made by :meth:`actorflow.Runtime.durable_objects`.
    """

    def __init__(
        self,
        cls: type[T],
        name: str,
        *,
        storage: Storage,
        timers: TimerService,
        executor: Executor,
        clock: Clock,
        env: Any = None,
        idle_timeout: float = 10.0,
    ) -> None:
        if not isinstance(cls, type) or not issubclass(cls, DurableObject):
            raise TypeError("durable_objects() needs a subclass of actorflow.DurableObject")
        if not name or "\x00" in name:
            raise ValueError(f"invalid namespace name {name!r}")
        self.cls = cls
        self.name = name
        self.env = env
        self.idle_timeout = idle_timeout
        self._storage = storage
        self._timers = timers
        self._executor = executor
        self._clock = clock
        self._tag = hashlib.sha256(name.encode()).hexdigest()[:8]
        self._live: dict[str, _ObjectActor] = {}
        self._lock = threading.Lock()
        self.activations = 0

    # -- ids and stubs -------------------------------------------------------

    def id_from_name(self, name: str) -> DurableObjectId:
        """Returns the id for ``name``: the same name always gives the same object."""
        digest = hashlib.sha256(f"{self.name}\x00{name}".encode()).hexdigest()[:56]
        return DurableObjectId(digest + self._tag, name)

    def new_unique_id(self) -> DurableObjectId:
        """Returns a new random id."""
        return DurableObjectId(secrets.token_hex(28) + self._tag)

    def id_from_string(self, value: str) -> DurableObjectId:
        """Parses an id made by this namespace (its ``str``).

        Raises:
            ValueError: Not 64 hex characters, or made by another namespace.
        """
        v = str(value).lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError(f"invalid Durable Object id {value!r}: expected 64 hex characters")
        if v[56:] != self._tag:
            raise ValueError(f"Durable Object id {value!r} does not belong to namespace {self.name!r}")
        return DurableObjectId(v)

    def get(self, oid: DurableObjectId) -> DurableObjectStub[T]:
        """Returns a stub for ``oid``; nothing is started until the first call."""
        if not isinstance(oid, DurableObjectId):
            raise TypeError("get() takes a DurableObjectId; use get_by_name() for names")
        if oid.hex[56:] != self._tag:
            raise ValueError(f"id {oid} does not belong to namespace {self.name!r}")
        return DurableObjectStub(self, oid)

    def get_by_name(self, name: str) -> DurableObjectStub[T]:
        """Same as ``get(id_from_name(name))``."""
        return self.get(self.id_from_name(name))

    # -- activation, calls, eviction ------------------------------------------

    def _actor(self, oid: DurableObjectId) -> _ObjectActor:
        actor = self._live.get(oid.hex)
        if actor is not None:
            return actor
        with self._lock:
            actor = self._live.get(oid.hex)
            if actor is None:
                actor = _ObjectActor(self, oid)
                self._live[oid.hex] = actor
                self.activations += 1
                actor.start_on()
        return actor

    def _send(
        self, oid: DurableObjectId, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> pykka.Future[Any]:
        return self._actor(oid).actor_ref.ask(ProxyCall((name,), args, kwargs), block=False)

    def _call(
        self, oid: DurableObjectId, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        for _ in range(8):
            try:
                return self._send(oid, name, args, kwargs).get()
            except pykka.ActorDeadError:
                # Evicted before it took the call: the call never ran; activate anew.
                with self._lock:
                    actor = self._live.get(oid.hex)
                    if actor is not None and actor.actor_stopped.is_set():
                        del self._live[oid.hex]
        raise ActorflowError(f"object {self.name}/{oid} kept stopping before taking a call")

    def _fire_alarm(self, target: bytes, key: bytes, deadline: int) -> bool:
        oid = DurableObjectId(target.split(b"\x00", 1)[1].decode())
        self._actor(oid).actor_ref.tell(_Alarm(key, deadline))
        return True

    def _forget(self, actor: _ObjectActor) -> None:
        with self._lock:
            if self._live.get(actor.oid.hex) is actor:
                del self._live[actor.oid.hex]

    def _evict_if_idle(self, actor: _ObjectActor) -> None:
        with self._lock:
            if not actor.actor_inbox.empty():
                return
            if self._live.get(actor.oid.hex) is actor:
                del self._live[actor.oid.hex]
            actor.actor_stopped.set()
        try:
            if actor.obj is not None and hasattr(actor.obj, "on_evict"):
                actor.obj.on_evict()
        except Exception:
            log.exception("on_evict of %s/%s failed", self.name, actor.oid)

    def evict_idle(self, now: float | None = None, idle: float | None = None) -> int:
        """Asks every object idle for ``idle`` seconds to stop; returns how many were asked."""
        limit = (now if now is not None else time.monotonic()) - (
            self.idle_timeout if idle is None else idle
        )
        asked = 0
        for actor in list(self._live.values()):
            if actor.last_used <= limit and actor.actor_inbox.empty():
                try:
                    actor.actor_ref.tell(_Evict())
                    asked += 1
                except pykka.ActorDeadError:
                    self._forget(actor)
        return asked

    @property
    def live_count(self) -> int:
        """How many objects of this namespace are in memory."""
        return len(self._live)

    def shutdown(self) -> None:
        """Stops every live object (their storage stays)."""
        with self._lock:
            actors = list(self._live.values())
            self._live.clear()
        futures = []
        for actor in actors:
            try:
                futures.append(actor.actor_ref.ask(_Evict(), block=False))
            except pykka.ActorDeadError:
                pass
        for f in futures:
            try:
                f.get(timeout=10)
            except Exception:
                pass

