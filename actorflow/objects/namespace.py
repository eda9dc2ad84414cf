"""Durable Objects: single-threaded actors, each owning a transactional keyspace.

An object is activated on its first call (or alarm), handles one call at a
time in arrival order on a :class:`~actorflow.core.actors.PooledActor`, and is
evicted once it has been idle for ``idle_timeout`` seconds. Its storage
survives eviction and restarts; its in-memory state does not.

All writes of one call are buffered and committed atomically when the call
returns (or raises); the caller gets the result only after that commit is
durable. This is Cloudflare's output gate. Writes made before an exception
are committed too; use :meth:`ObjectStorage.transaction` to roll them back.

How the output gate is kept without blocking a thread per call:

* When a call ends, its writes become one :class:`~actorflow.core.storage.WriteBatch`
  that is *submitted* to the group commit; the reply is parked on a
  :class:`_Flight` that the writer thread releases once the batch is durable.
  The actor meanwhile takes its next message, so one fsync serves many calls
  of many objects and no pool thread sleeps on a commit.
* A call that wrote nothing may still have read writes that are not durable
  yet, so its reply joins the object's latest flight (or goes out at once
  when nothing is in flight).
* Reads see the object's own submitted-but-not-yet-durable writes through a
  *view* kept by :class:`ObjectStorage`: the values this activation wrote,
  tagged with the flight that carries them, plus a small cache of values it
  read (only the object itself writes its keys). Entries whose flight has
  landed are dropped when the view grows.
* The batches of one activation form a :class:`~actorflow.core.storage.Chain`: once
  one fails, every later one fails unapplied. The failed flights' replies get
  :class:`~actorflow.core.errors.StorageError` and the object is reset (dropped
  from the live table); messages it had not handled yet go to a fresh
  activation, which reads storage anew.
* An object is evicted only when idle *and* with nothing in flight, so a new
  activation never reads storage older than what the previous one wrote.

Alarms (one per object) live in the runtime's durable timer index and run at
least once: the timer key is removed only in the commit that settles the
handler's run. A handler that raises is retried after ``2 s << n`` plus up to
25 % jitter, at most :data:`ALARM_MAX_RETRIES` times; its writes made before
the exception are kept (as for calls), and if it set or deleted the alarm,
that replaces the retry. While the handler runs, ``get_alarm()`` reads None
unless the handler set a new alarm.

Storage of an object is written only through that object: its view caches
what it read, so writing its keys behind its back (another process on the
same data directory) is not supported.
"""

from __future__ import annotations

import asyncio
import builtins
import hashlib
import inspect
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import pykka

from actorflow.core.actors import Envelope, Executor, LatchFuture, PooledActor
from actorflow.core.clock import Clock
from actorflow.core.errors import ActorflowError, StorageError
from actorflow.core.greenlets import offloaded
from actorflow.core.storage import Chain, Storage
from actorflow.core.timers import TimerService
from actorflow.objects.storage import ALARM_RECORD, ObjectState, ObjectStorage, split_alarm_target

__all__ = [
    "AlarmInfo",
    "DeliveryError",
    "DurableObject",
    "DurableObjectId",
    "DurableObjectNamespace",
    "DurableObjectState",
    "DurableObjectStub",
    "ObjectStorage",
]

log = logging.getLogger("actorflow.objects")

ALARM_MAX_RETRIES = 6
_SEND_ATTEMPTS = 100
T = TypeVar("T", bound="DurableObject")
ExcInfo = tuple[type[BaseException], BaseException, Any]


@dataclass(frozen=True)
class AlarmInfo:
    """What an ``alarm(info)`` handler is told."""

    retry_count: int
    is_retry: bool
    scheduled_time: int  # epoch ms


class DeliveryError(ActorflowError):
    """A call to a Durable Object was lost on its way, as a network fault would lose it.

    Raised to the caller instead of the call's result; only fault injection
    (:mod:`actorflow.testing`) causes it in an embedded runtime. Its fields:
    ``retryable`` (always True: the object is fine, try again), ``applied``
    (False: the request was lost and the call never ran; True: the reply was
    lost after the call ran and its writes became durable, so a retry applies
    it twice unless the method is idempotent), ``namespace`` and ``method``.
    """


class _LostReply(LatchFuture[Any]):
    """Stands in for a caller's reply: whatever the call returns, the caller gets ``error``."""

    __slots__ = ("_caller", "_error")

    def __init__(self, caller: LatchFuture[Any], error: DeliveryError) -> None:
        super().__init__()
        self._caller = caller
        self._error = error

    def set(self, value: Any | None = None) -> None:
        self._caller.set_exception(exc_info=_exc_info(self._error))

    def set_exception(self, exc_info: Any = None) -> None:
        self._caller.set_exception(exc_info=_exc_info(self._error))


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


class DurableObjectState:
    """``ctx``: what an object knows about itself."""

    def __init__(self, oid: DurableObjectId, storage: ObjectStorage, namespace: str) -> None:
        self.id = oid
        self.storage = storage
        self.namespace = namespace


class DurableObject:
    """Base class of user Durable Objects.

    Public methods are callable through a stub. Override ``alarm(info)`` to
    handle alarms. An optional ``on_evict()`` runs when the object leaves
    memory; writes it makes are discarded.

    Args:
        ctx: The object's state: ``ctx.id`` and ``ctx.storage``.
        env: Whatever was passed as ``env`` when the namespace was made.
    """

    def __init__(self, ctx: DurableObjectState, env: Any = None) -> None:
        self.ctx = ctx
        self.env = env


class _Call:
    __slots__ = ("args", "kwargs", "name")

    def __init__(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.name = name
        self.args = args
        self.kwargs = kwargs


class _Alarm:
    __slots__ = ("deadline", "key")

    def __init__(self, key: bytes, deadline: int) -> None:
        self.key = key
        self.deadline = deadline


class _Stop:
    __slots__ = ()


class _Flight:
    """A batch on its way to disk and the replies it holds back."""

    __slots__ = ("actor", "alarm_key", "armed", "replies", "seq")

    def __init__(self, actor: _ObjectActor, seq: int, armed: bool) -> None:
        self.actor = actor
        self.seq = seq
        self.armed = armed
        self.alarm_key: bytes | None = None
        self.replies: list[tuple[pykka.Future[Any] | None, Any, ExcInfo | None]] = []

    def __call__(self, error: BaseException | None) -> None:
        self.actor.landed(self, error)


def _deliver(reply: pykka.Future[Any] | None, value: Any, exc_info: ExcInfo | None) -> None:
    if reply is None:
        return
    try:
        if exc_info is None:
            reply.set(value)
        else:
            reply.set_exception(exc_info=exc_info)
    except Exception:  # already set: the caller gave up on it
        pass


def _exc_info(exc: BaseException) -> ExcInfo:
    return (type(exc), exc, exc.__traceback__)


class _Host:
    """What the actors and stubs of one namespace are given by it.

    The namespace's parts (storage, timers, clock, executor) and the few of its
    verbs they call back, under public names, so that neither reaches into the
    namespace's private attributes.
    """

    __slots__ = (
        "call_on_evict",
        "clock",
        "executor",
        "fail_unhandled",
        "ns",
        "reset",
        "send",
        "storage",
        "timers",
    )

    def __init__(
        self,
        ns: DurableObjectNamespace[Any],
        *,
        storage: Storage,
        timers: TimerService,
        executor: Executor,
        clock: Clock,
        send: Callable[[DurableObjectId, str, tuple[Any, ...], dict[str, Any]], LatchFuture[Any]],
        reset: Callable[[_ObjectActor, BaseException | None], None],
        fail_unhandled: Callable[[builtins.list[Envelope[Any]]], None],
        call_on_evict: Callable[[_ObjectActor], None],
    ) -> None:
        self.ns = ns
        self.storage = storage
        self.timers = timers
        self.executor = executor
        self.clock = clock
        self.send = send
        self.reset = reset
        self.fail_unhandled = fail_unhandled
        self.call_on_evict = call_on_evict


class _ObjectActor(PooledActor):
    """The actor hosting one live object."""

    def __init__(self, host: _Host, oid: DurableObjectId) -> None:
        super().__init__(host.executor)
        self.host = host
        self.ns = host.ns
        self.oid = oid
        self.state = ObjectState(host.storage, host.ns.name, oid.hex)
        self.storage = ObjectStorage(self.state)
        self.obj: DurableObject | None = None
        self.last_used = time.monotonic()
        self._chain = Chain()
        # A list, not a deque: usually empty or short, and one object less for
        # the garbage collector to walk per live object.
        self._flights: builtins.list[_Flight] = []
        # Guards _flights against the writer thread. The scheduling lock does
        # (never held together with this role), one lock less per object.
        self._gate = self._sched_lock

    def on_start(self) -> None:
        """Nothing: the object is built when its first message is handled."""

    def _ensure_obj(self) -> DurableObject:
        obj = self.obj
        if obj is None:
            ctx = DurableObjectState(self.oid, self.storage, self.ns.name)
            try:
                obj = self.ns.cls(ctx, self.ns.env)
            except BaseException:
                self.state.discard()
                raise
            # The constructor's writes commit with the first message's.
            self.obj = obj
        return obj

    def _handle_envelope(self, envelope: Envelope[Any]) -> None:
        msg = envelope.message
        self.last_used = time.monotonic()
        kind = type(msg)
        if kind is _Call:
            self._run_call(msg, envelope.reply_to)
        elif kind is _Alarm:
            self._run_alarm(msg)
        elif kind is _Stop:
            self._run_stop(envelope.reply_to)
        else:
            err = ActorflowError(f"object {self.ns.name}/{self.oid}: unknown message {msg!r}")
            _deliver(envelope.reply_to, None, _exc_info(err))
        return None

    def _run_call(self, msg: _Call, reply: pykka.Future[Any] | None) -> None:
        value: Any = None
        exc_info: ExcInfo | None = None
        try:
            obj = self._ensure_obj()
            name = msg.name
            fn = getattr(obj, name, None) if not name.startswith("_") else None
            if fn is None or not callable(fn):
                raise AttributeError(f"{self.ns.cls.__name__} has no public method {name!r}")
            value = fn(*msg.args, **msg.kwargs)
            if inspect.iscoroutine(value):
                value = asyncio.run(value)
        except BaseException as exc:
            value = None
            exc_info = _exc_info(exc)
            if not isinstance(exc, Exception):
                # SystemExit and the like: answer, then let the object go.
                self._finish(reply, None, exc_info)
                self.host.reset(self, None)
                return
        self._finish(reply, value, exc_info)

    def _finish(
        self,
        reply: pykka.Future[Any] | None,
        value: Any,
        exc_info: ExcInfo | None,
        alarm_key: bytes | None = None,
    ) -> None:
        """Commits the message's writes and releases its reply once they are durable."""
        st = self.state
        try:
            batch, armed = st.take_batch(self._chain)
        except Exception as exc:  # cannot happen short of a bug; never lose the reply
            log.exception("object %s/%s: building its write batch failed", self.ns.name, self.oid)
            st.discard()
            batch, armed, exc_info = None, False, _exc_info(exc)
        if batch is None:
            with self._gate:
                if self._flights:
                    # Its result may rest on writes not yet durable: wait for them.
                    self._flights[-1].replies.append((reply, value, exc_info))
                    return
                failed = self._chain.failed
            if failed:
                err = self._storage_error(self._chain.error)
                exc_info = _exc_info(err)
            _deliver(reply, value, exc_info)
            if alarm_key is not None:
                self.host.timers.done(alarm_key)
            return
        flight = _Flight(self, st.seq, armed)
        flight.alarm_key = alarm_key
        flight.replies.append((reply, value, exc_info))
        with self._gate:
            self._flights.append(flight)
        try:
            self.host.storage.submit(batch, flight)
        except Exception as exc:  # storage closed, or used after fork(): never queued
            if not self._chain.failed:
                self._chain.error = exc
                self._chain.failed = True
            self.landed(flight, exc)
        st.trim()

    def _storage_error(self, err: BaseException | None) -> StorageError:
        if isinstance(err, StorageError):
            return err
        return StorageError(f"object {self.ns.name}/{self.oid}: write failed: {err}")

    def landed(self, flight: _Flight, error: BaseException | None) -> None:
        """Runs on the writer thread once ``flight``'s batch is durable or failed."""
        with self._gate:
            if self._flights and self._flights[0] is flight:
                del self._flights[0]
            else:  # pragma: no cover - flights land in submission order
                try:
                    self._flights.remove(flight)
                except ValueError:
                    pass
            replies = flight.replies
            flight.replies = []
        if error is None:
            self.state.landed = flight.seq
            for reply, value, exc_info in replies:
                _deliver(reply, value, exc_info)
        else:
            err = self._storage_error(error)
            log.error("object %s/%s: write failed, resetting it: %s", self.ns.name, self.oid, err)
            for reply, _value, _exc in replies:
                _deliver(reply, None, _exc_info(err))
            self.host.reset(self, err)
        timers = self.host.timers
        if flight.alarm_key is not None:
            timers.done(flight.alarm_key)
        if flight.armed:
            timers.kick()

    def has_flights(self) -> bool:
        """Whether some of its writes are not durable yet."""
        return bool(self._flights)

    def _run_stop(self, reply: pykka.Future[Any] | None) -> None:
        left = self.close() or []
        self.host.fail_unhandled(left)
        self.host.call_on_evict(self)
        self.state.discard()
        self._finish(reply, None, None)

    def _run_alarm(self, msg: _Alarm) -> None:
        host, st = self.host, self.state
        rec = st.alarm_record()
        if rec is None or rec[ALARM_RECORD.size :] != msg.key:
            host.timers.done(msg.key)  # stale: replaced or deleted since
            return
        deadline, retries = ALARM_RECORD.unpack_from(rec)
        error: BaseException | None = None
        st.running_alarm = True
        try:
            obj = self._ensure_obj()
            handler = getattr(obj, "alarm", None)
            if handler is not None:
                result = handler(AlarmInfo(retries, retries > 0, deadline))
                if inspect.iscoroutine(result):
                    asyncio.run(result)
        except Exception as exc:
            error = exc
        finally:
            st.running_alarm = False
        if st.alarm is False:
            # The handler did not set or delete the alarm: settle this one.
            if error is not None and retries < ALARM_MAX_RETRIES:
                delay = 2000 << retries
                when = int(host.clock.now() * 1000) + delay + random.randint(0, delay // 4)
                st.alarm_retry = (deadline, retries + 1, when)
                log.warning(
                    "alarm of %s/%s failed (retry %d in %d ms): %r",
                    self.ns.name,
                    self.oid,
                    retries + 1,
                    when - int(host.clock.now() * 1000),
                    error,
                )
            else:
                st.alarm = None
                if error is not None:
                    log.error(
                        "alarm of %s/%s abandoned after %d retries: %r",
                        self.ns.name,
                        self.oid,
                        retries,
                        error,
                    )
        self._finish(None, None, None, alarm_key=msg.key)


class _RemoteMethod:
    __slots__ = ("_host", "_name", "_oid")

    def __init__(self, host: _Host, oid: DurableObjectId, name: str) -> None:
        self._host = host
        self._oid = oid
        self._name = name

    @offloaded
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._host.send(self._oid, self._name, args, kwargs).get()

    def future(self, *args: Any, **kwargs: Any) -> pykka.Future[Any]:
        """Sends the call and returns a pykka future of its result at once."""
        return self._host.send(self._oid, self._name, args, kwargs)


class DurableObjectStub(Generic[T]):
    """A handle on an object. Attribute calls are RPCs to the object's actor.

    ``stub.method(*args)`` blocks for the result (or raises the method's
    exception); ``stub.method.future(*args)`` returns a future at once.
    Creating a stub sends nothing; the object starts on its first call.
    """

    def __init__(self, ns: DurableObjectNamespace[T], oid: DurableObjectId, host: _Host) -> None:
        self._ns = ns
        self._host = host
        self.id = oid
        self.name = oid.name

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        method = _RemoteMethod(self._host, self.id, name)
        self.__dict__[name] = method  # found without __getattr__ next time
        return method

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
        self._closing = False
        self.activations = 0
        self._delivery_fault: Callable[[DurableObjectId, str], str | None] | None = None
        self._host = _Host(
            self,
            storage=storage,
            timers=timers,
            executor=executor,
            clock=clock,
            send=self._send,
            reset=self._reset,
            fail_unhandled=self._fail_unhandled,
            call_on_evict=self._call_on_evict,
        )

    # -- ids and stubs -------------------------------------------------------

    def id_from_name(self, name: str) -> DurableObjectId:
        """Returns the id for ``name``: the same name always gives the same object.

        Raises:
            TypeError: ``name`` is not a ``str`` (``5`` and ``"5"`` would
                otherwise silently be the same object).
            ValueError: ``name`` cannot be encoded as UTF-8 (a lone surrogate).
        """
        if not isinstance(name, str):
            raise TypeError(
                f"namespace {self.name!r}: id_from_name() takes a str name, "
                f"not {type(name).__name__}"
            )
        try:
            raw = f"{self.name}\x00{name}".encode()
        except UnicodeEncodeError as e:
            raise ValueError(
                f"namespace {self.name!r}: the name {name!r:.60} is not valid text ({e.reason})"
            ) from None
        return DurableObjectId(hashlib.sha256(raw).hexdigest()[:56] + self._tag, name)

    def new_unique_id(self) -> DurableObjectId:
        """Returns a new random id."""
        return DurableObjectId(secrets.token_hex(28) + self._tag)

    def id_from_string(self, value: str) -> DurableObjectId:
        """Parses an id made by this namespace (its ``str``).

        Raises:
            TypeError: ``value`` is neither a ``str`` nor a :class:`DurableObjectId`.
            ValueError: Not 64 hex characters, or made by another namespace.
        """
        if not isinstance(value, str | DurableObjectId):
            raise TypeError(
                f"namespace {self.name!r}: id_from_string() takes the str of an id, "
                f"not {type(value).__name__}"
            )
        v = str(value).lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError(
                f"namespace {self.name!r}: invalid Durable Object id {value!r:.80}: "
                "expected 64 hex characters"
            )
        if v[56:] != self._tag:
            raise ValueError(
                f"Durable Object id {value!r} does not belong to namespace {self.name!r}"
            )
        return DurableObjectId(v)

    def get(self, oid: DurableObjectId) -> DurableObjectStub[T]:
        """Returns a stub for ``oid``; nothing is started until the first call."""
        if not isinstance(oid, DurableObjectId):
            raise TypeError(
                f"namespace {self.name!r}: get() takes a DurableObjectId, not "
                f"{type(oid).__name__}; use get_by_name() for names"
            )
        if oid.hex[56:] != self._tag:
            raise ValueError(f"id {oid} does not belong to namespace {self.name!r}")
        return DurableObjectStub(self, oid, self._host)

    def get_by_name(self, name: str) -> DurableObjectStub[T]:
        """Same as ``get(id_from_name(name))``.

        Raises:
            TypeError: ``name`` is not a ``str``.
        """
        return self.get(self.id_from_name(name))

    # -- activation, calls, eviction ------------------------------------------

    def _activate(self, oid: DurableObjectId) -> _ObjectActor:
        with self._lock:
            return self._activate_locked(oid)

    def _activate_locked(self, oid: DurableObjectId) -> _ObjectActor:
        if self._closing:
            raise ActorflowError(f"namespace {self.name!r} is shut down")
        actor = self._live.get(oid.hex)
        if actor is None or actor.closed:
            actor = _ObjectActor(self._host, oid)
            self._live[oid.hex] = actor
            self.activations += 1
        return actor

    def _post(self, oid: DurableObjectId, envelope: Envelope[Any]) -> None:
        for _ in range(_SEND_ATTEMPTS):
            actor = self._live.get(oid.hex)
            if actor is None:
                actor = self._activate(oid)
            if actor.post(envelope):
                return
            # Closed (evicted or reset) between the lookup and the post: the
            # message was not taken; look again.
            with self._lock:
                if self._live.get(oid.hex) is actor:
                    del self._live[oid.hex]
        raise ActorflowError(f"object {self.name}/{oid} kept stopping before taking a message")

    def _send(
        self, oid: DurableObjectId, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> LatchFuture[Any]:
        future: LatchFuture[Any] = LatchFuture()
        fault = self._delivery_fault
        if fault is not None:
            action = fault(oid, name)
            if action is not None:
                self._deliver_faulty(action, oid, _Call(name, args, kwargs), future)
                return future
        self._post(oid, Envelope(_Call(name, args, kwargs), reply_to=future))
        return future

    def set_delivery_fault(
        self, fault: Callable[[DurableObjectId, str], str | None] | None
    ) -> None:
        """Installs a hook that may lose or duplicate calls (used by :mod:`actorflow.testing`).

        ``fault(id, method)`` is asked for every call and returns None
        (deliver it), ``"drop"`` (lose the request: the call never runs),
        ``"drop_reply"`` (run it, commit its writes, lose the reply) or
        ``"duplicate"`` (deliver it twice in a row; the caller gets the first
        reply). A lost request or reply raises :class:`DeliveryError` to the caller.
        """
        self._delivery_fault = fault

    def _deliver_faulty(
        self, action: str, oid: DurableObjectId, call: _Call, future: LatchFuture[Any]
    ) -> None:
        where = f"object {self.name}/{oid}: call {call.name!r}"
        fields = {"namespace": self.name, "method": call.name, "retryable": True}
        if action == "drop":
            err = DeliveryError(
                f"{where}: the request was lost before it reached the object; the call did not run",
                applied=False,
                **fields,
            )
            future.set_exception(exc_info=_exc_info(err))
        elif action == "drop_reply":
            err = DeliveryError(
                f"{where}: the reply was lost; the call ran and its writes are durable",
                applied=True,
                **fields,
            )
            self._post(oid, Envelope(call, reply_to=_LostReply(future, err)))
        elif action == "duplicate":
            self._post(oid, Envelope(call, reply_to=future))
            self._post(oid, Envelope(_Call(call.name, call.args, call.kwargs)))
        else:
            raise ValueError(f"unknown delivery fault {action!r}")

    def _call(
        self, oid: DurableObjectId, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        return self._send(oid, name, args, kwargs).get()

    def fire_alarm(self, target: bytes, key: bytes, deadline: int) -> bool:
        """Timer handler: the alarm of the object named in ``target`` is due.

        The runtime routes the alarm timers of its namespaces here; it is not
        meant to be called otherwise. False means "not now" (shutting down).
        """
        oid = DurableObjectId(split_alarm_target(target)[1])
        try:
            self._post(oid, Envelope(_Alarm(key, deadline)))
        except ActorflowError:
            return False  # shutting down: it fires again after a restart
        return True

    def _reset(self, actor: _ObjectActor, error: BaseException | None) -> None:
        """Drops ``actor`` after a failed write; hands its unhandled messages on."""
        with self._lock:
            left = actor.close() or []
            if self._live.get(actor.oid.hex) is actor:
                del self._live[actor.oid.hex]
            if not left:
                return
            if not self._closing:
                fresh = self._activate_locked(actor.oid)
                for envelope in left:
                    fresh.post(envelope)
                return
        self._fail_unhandled(left)

    def _fail_unhandled(self, envelopes: builtins.list[Envelope[Any]]) -> None:
        for envelope in envelopes:
            msg = envelope.message
            if isinstance(msg, _Alarm):
                self._timers.done(msg.key)
            err = ActorflowError(f"namespace {self.name!r} shut down before the call ran")
            _deliver(envelope.reply_to, None, _exc_info(err))

    def _call_on_evict(self, actor: _ObjectActor) -> None:
        obj = actor.obj
        if obj is None or not hasattr(obj, "on_evict"):
            return
        try:
            obj.on_evict()
        except Exception:
            log.exception("on_evict of %s/%s failed", self.name, actor.oid)

    def _try_evict(self, actor: _ObjectActor) -> bool:
        with self._lock:
            if actor.closed:
                return False
            left = actor.close(only_if_idle=True, check=lambda: not actor.has_flights())
            if left is None:
                return False
            if self._live.get(actor.oid.hex) is actor:
                del self._live[actor.oid.hex]
        # Closed while idle: nothing else runs this object's code any more.
        self._call_on_evict(actor)
        actor.state.discard()
        return True

    def evict_idle(self, now: float | None = None, idle: float | None = None) -> int:
        """Evicts every object idle for ``idle`` seconds; returns how many left memory.

        An object with writes not yet durable stays until they are.
        """
        limit = (now if now is not None else time.monotonic()) - (
            self.idle_timeout if idle is None else idle
        )
        evicted = 0
        for actor in builtins.list(self._live.values()):
            if actor.last_used <= limit and self._try_evict(actor):
                evicted += 1
        return evicted

    @property
    def live_count(self) -> int:
        """How many objects of this namespace are in memory."""
        return len(self._live)

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops every live object once its queued calls are done (storage stays)."""
        with self._lock:
            self._closing = True
            actors = builtins.list(self._live.values())
            self._live.clear()
        futures: builtins.list[LatchFuture[Any]] = []
        for actor in actors:
            future: LatchFuture[Any] = LatchFuture()
            if actor.post(Envelope(_Stop(), reply_to=future)):
                futures.append(future)
        deadline = time.monotonic() + timeout
        for f in futures:
            try:
                f.get(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:
                pass
