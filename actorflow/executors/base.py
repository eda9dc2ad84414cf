"""The step executor protocol, and what travels between the runtime and a worker.

An executor decides where step bodies run. The runtime alone owns retries,
timeouts and checkpoints: an executor runs one attempt when asked
(:meth:`StepExecutor.submit`), reports its value or its error
(:meth:`StepCall.wait`, awaited on the engine loop without blocking it), and
stops it when asked (:meth:`StepCall.cancel`, on a timeout or a stopped run).
It never retries an attempt itself and keeps nothing durable.

A remote executor ships the body and its arguments with cloudpickle, as one
blob (:func:`ship`). The worker runs it through :func:`run_shipped`, which
sends back one blob too: the value or the exception the body raised, and where
it ran. So the runtime sees the body's own exception, as it would in-process,
and neither Ray nor Dask ever unpickles a user value on its own.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

import cloudpickle

from actorflow.core.errors import ActorflowError, ExecutorError, SerializationError

__all__ = [
    "RanOn",
    "StepCall",
    "StepExecutor",
    "check_resources",
    "local_place",
    "probe",
    "run_shipped",
    "ship",
    "unpack",
]

#: Where an attempt ran: ``executor`` (its name) and, when known, ``node``,
#: ``worker``, ``host`` and ``pid``; all strings.
RanOn = dict[str, str]


def check_resources(resources: Any, where: str) -> dict[str, float] | None:
    """Checks a ``resources=`` argument; returns it as a plain dict (None if empty).

    Raises:
        ValueError: Not a mapping of names to non-negative numbers; the
            message names ``where`` (the step).
    """
    if resources is None:
        return None
    if not isinstance(resources, Mapping):
        raise ValueError(f"{where}: resources must be a dict of names to amounts")
    out: dict[str, float] = {}
    for k, v in resources.items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"{where}: resources: names must be non-empty strings, not {k!r}")
        if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
            raise ValueError(f"{where}: resources[{k!r}] must be a number >= 0, not {v!r}")
        out[k] = v
    return out or None


def _name_of(fn: Callable[..., Any]) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def ship(fn: Callable[..., Any], args: tuple[Any, ...]) -> bytes:
    """The blob a worker runs: ``fn`` and ``args`` pickled with cloudpickle.

    Raises:
        SerializationError: They cannot be pickled; the message says what.
    """
    try:
        return cloudpickle.dumps((fn, args), protocol=5)
    except Exception as e:
        raise SerializationError(
            f"the step function {_name_of(fn)} cannot be pickled to run on a worker: "
            f"{type(e).__name__}: {e}"
        ) from None


def _dump_error(e: BaseException, ran_on: RanOn) -> bytes:
    try:
        return cloudpickle.dumps((False, e, ran_on), protocol=5)
    except Exception:
        # The body's exception does not pickle (it holds a lock, a socket, ...):
        # its type and message still reach the runtime.
        return cloudpickle.dumps(
            (False, ActorflowError(f"{type(e).__name__}: {e}"), ran_on), protocol=5
        )


def run_shipped(blob: bytes, ran_on: RanOn) -> bytes:
    """Runs a shipped body in a worker; returns the blob :func:`unpack` reads.

    An ``async def`` body (or one returning an awaitable) runs to its end
    under ``asyncio.run`` in the worker.
    """
    try:
        fn, args = cloudpickle.loads(blob)
        value = fn(*args)
        if inspect.isawaitable(value):
            value = asyncio.run(_awaited(value))
    except BaseException as e:
        return _dump_error(e, ran_on)
    try:
        return cloudpickle.dumps((True, value, ran_on), protocol=5)
    except Exception as e:
        return _dump_error(
            SerializationError(
                f"the value the step returned (a {type(value).__name__}) cannot be "
                f"pickled to leave the worker: {type(e).__name__}: {e}",
                retryable=False,
            ),
            ran_on,
        )


async def _awaited(aw: Any) -> Any:
    return await aw


def unpack(call: StepCall, data: bytes) -> Any:
    """Reads what :func:`run_shipped` sent back into ``call.ran_on``; returns the value.

    Raises:
        BaseException: The exception the body raised.
    """
    ok, value, ran_on = cloudpickle.loads(data)
    call.ran_on = ran_on
    if not ok:
        raise value
    return value


def local_place(executor: str) -> RanOn:
    """Where this process is: its host and pid."""
    return {"executor": executor, "host": socket.gethostname(), "pid": str(os.getpid())}


_PROBE_S = 5.0  # how long to try a TCP connection to a cluster's address before giving up


def probe(address: str, what: str, executor: str) -> None:
    """Fails fast, and clearly, when nothing listens at a ``[scheme://]host:port`` address.

    Raises:
        ExecutorError: The connection is refused or times out.
    """
    target = address.split("://", 1)[-1]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or a form the cluster's client resolves itself
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=_PROBE_S).close()
    except OSError as e:
        raise ExecutorError(
            f"cannot reach the {what} at {address}: {e}", executor=executor, address=address
        ) from None


class StepCall(ABC):
    """One attempt submitted to an executor."""

    #: Where the attempt ran, once known (set by :meth:`wait`); at least the executor.
    ran_on: RanOn

    @abstractmethod
    async def wait(self) -> Any:
        """Waits (on the engine loop, without blocking it) for the body's value.

        Raises:
            BaseException: What the body raised, as it raised it.
            ExecutorError: The worker running it was lost, or the cluster went away.
        """

    @abstractmethod
    def cancel(self) -> None:
        """Stops the attempt (a timeout, a stopped run); a no-op once it ended."""


class StepExecutor(ABC):
    """Where step bodies run (``Runtime(executor=...)``).

    An executor is opened by each runtime that uses it and closed with it; it
    connects on the first :meth:`open` and lets go of what it started (a
    local cluster, a client) on the last :meth:`close`. ``with executor:``
    holds it open meanwhile, so that runtimes come and go over one cluster.
    """

    #: Its name, as attempts record it (``ran_on["executor"]``).
    name: str = "executor"
    #: False: the engine runs bodies itself, on its step threads (in-process).
    remote: bool = True

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._opened = 0

    def open(self) -> None:
        """Connects on the first call (:meth:`_connect`); counts the others.

        Raises:
            ExecutorError: The cluster cannot be reached, or its package is missing.
        """
        with self._lock:
            if self._opened == 0:
                self._connect()
            self._opened += 1

    def close(self) -> None:
        """Lets go of the cluster on the last close (:meth:`_disconnect`)."""
        with self._lock:
            if self._opened == 0:
                return
            self._opened -= 1
            if self._opened == 0:
                self._disconnect()

    @property
    def is_open(self) -> bool:
        """True between the first :meth:`open` and the last :meth:`close`."""
        return self._opened > 0

    def __enter__(self) -> StepExecutor:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _connect(self) -> None:
        """Starts or joins the cluster."""

    @abstractmethod
    def _disconnect(self) -> None:
        """Lets go of what :meth:`_connect` started or joined."""

    @abstractmethod
    def submit(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        resources: dict[str, float] | None = None,
    ) -> StepCall:
        """Starts one attempt of ``fn(*args)``; called on the engine loop, returns at once.

        Raises:
            SerializationError: ``fn`` or ``args`` cannot be sent to a worker.
            ExecutorError: The executor is not open, or its cluster is gone.
        """

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
