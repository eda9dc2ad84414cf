"""Steps: the ``step`` object given to ``run``, step configs and retry policies."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol

from actorflow.clock import parse_duration_ms

__all__ = [
    "DEFAULT_CONFIG",
    "RetryPolicy",
    "StepContext",
    "StepInfo",
    "WorkflowStep",
    "resolve_config",
    "retry_delay_ms",
    "wants_ctx",
]

BACKOFFS = ("constant", "linear", "exponential")
MAX_RETRIES = 10_000
#: Cloudflare's production defaults: 5 retries, 10 s, exponential, 10 minutes per attempt.
DEFAULT_CONFIG: dict[str, Any] = {
    "retries": {"limit": 5, "delay": 10_000, "backoff": "exponential"},
    "timeout": 600_000,
}


@dataclass(frozen=True)
class RetryPolicy:
    """A retries setting, accepted wherever a retries dict is."""

    limit: int = 5
    delay: int | float | str | timedelta = "10 seconds"
    backoff: str = "exponential"


@dataclass(frozen=True)
class StepInfo:
    """The step a callable runs for: its name and occurrence count (1-based)."""

    name: str
    count: int


@dataclass(frozen=True)
class StepContext:
    """What a step callable may take as its ``ctx`` parameter."""

    attempt: int
    step: StepInfo
    config: dict[str, Any]


def resolve_config(
    where: str,
    config: dict[str, Any] | None = None,
    retries: dict[str, Any] | RetryPolicy | None = None,
    timeout: Any = None,
) -> dict[str, Any]:
    """Merges a step's settings field by field over :data:`DEFAULT_CONFIG`.

    Returns a config with ``retries.delay`` and ``timeout`` in milliseconds.

    Raises:
        ValueError: An unknown key, a negative limit, a bad duration or backoff,
            or a zero timeout; the message names ``where`` (the step).
    """
    d = DEFAULT_CONFIG["retries"]
    cfg: dict[str, Any] = {
        "retries": {"limit": d["limit"], "delay": d["delay"], "backoff": d["backoff"]},
        "timeout": DEFAULT_CONFIG["timeout"],
    }
    if config is not None:
        if not isinstance(config, dict):
            raise ValueError(f"{where}: config must be a dict")
        unknown = set(config) - {"retries", "timeout", "redact"}
        if unknown:
            raise ValueError(f"{where}: unknown config keys {sorted(unknown)}")
        if "redact" in config:
            if not isinstance(config["redact"], bool):
                raise ValueError(f"{where}: redact must be True or False")
            if config["redact"]:
                # Kept with the step's record: what shows its output shows a redaction.
                cfg["redact"] = True
        retries = config.get("retries", retries) if retries is None else retries
        timeout = config.get("timeout", timeout) if timeout is None else timeout
    if retries is not None:
        if isinstance(retries, RetryPolicy):
            retries = {"limit": retries.limit, "delay": retries.delay, "backoff": retries.backoff}
        if not isinstance(retries, dict):
            raise ValueError(f"{where}: retries must be a dict or RetryPolicy")
        unknown = set(retries) - {"limit", "delay", "backoff"}
        if unknown:
            raise ValueError(f"{where}: unknown retries keys {sorted(unknown)}")
        r = cfg["retries"]
        if "limit" in retries:
            limit = retries["limit"]
            valid = isinstance(limit, int) and not isinstance(limit, bool)
            if not valid or not 0 <= limit <= MAX_RETRIES:
                raise ValueError(f"{where}: retries.limit must be an int from 0 to {MAX_RETRIES}")
            r["limit"] = limit
        if "delay" in retries:
            r["delay"] = parse_duration_ms(retries["delay"], what=f"{where}: retries.delay")
        if "backoff" in retries:
            if retries["backoff"] not in BACKOFFS:
                raise ValueError(f"{where}: retries.backoff must be one of {BACKOFFS}")
            r["backoff"] = retries["backoff"]
    if timeout is not None:
        ms = parse_duration_ms(timeout, what=f"{where}: timeout")
        if ms <= 0:
            raise ValueError(f"{where}: timeout must be greater than 0")
        cfg["timeout"] = ms
    return cfg


def retry_delay_ms(config: dict[str, Any], attempt: int) -> int:
    """Returns the wait after failed attempt ``attempt`` (1-based)."""
    r = config["retries"]
    delay: int = r["delay"]
    if r["backoff"] == "constant":
        return delay
    if r["backoff"] == "linear":
        return delay * attempt
    return int(delay * 2 ** (attempt - 1))


def wants_ctx(fn: Callable[..., Any]) -> bool:
    """Tells whether a step callable takes a ``ctx`` parameter."""
    code = getattr(fn, "__code__", None)
    if code is not None and not hasattr(fn, "__wrapped__"):
        # Plain functions and lambdas: read the code object (inspect.signature is slow).
        names = code.co_varnames[: code.co_argcount + code.co_kwonlyargcount]
        return "ctx" in names
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return "ctx" in params


class StepRunner(Protocol):
    """What :class:`WorkflowStep` needs from the engine (one instance's run)."""

    def do(
        self, name: str, fn: Callable[..., Any], retries: Any, timeout: Any, config: Any
    ) -> Coroutine[Any, Any, Any]: ...

    def sleep(self, name: str, duration: Any) -> Coroutine[Any, Any, None]: ...

    def sleep_until(self, name: str, when: Any) -> Coroutine[Any, Any, None]: ...

    def wait_for_event(
        self, name: str, event_type: str, timeout: Any
    ) -> Coroutine[Any, Any, Any]: ...

    def gather(
        self, coros: list[Coroutine[Any, Any, Any]], limit: int | None
    ) -> Coroutine[Any, Any, list[Any]]: ...

    def block_on(self, coro: Coroutine[Any, Any, Any]) -> Any: ...


class WorkflowStep:
    """The ``step`` argument of ``run``.

    In an ``async def run`` every method returns an awaitable; in a plain
    ``def run`` every method blocks and returns the result.
    """

    def __init__(self, runner: StepRunner, sync: bool) -> None:
        self._runner = runner
        self._sync = sync

    def _result(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self._runner.block_on(coro) if self._sync else coro

    def do(
        self,
        name: str,
        fn: Callable[..., Any] | None = None,
        /,
        *,
        retries: dict[str, Any] | RetryPolicy | None = None,
        timeout: Any = None,
        config: dict[str, Any] | None = None,
    ) -> Any:
        """Runs ``fn`` as a durable step and returns its result.

        Without ``fn`` it is a decorator: the decorated function runs the step
        when called. ``fn`` may take one parameter named ``ctx`` (a
        :class:`StepContext`). A completed step never runs again; its stored
        result is returned on replay.
        """
        if fn is None:

            def decorator(func: Callable[..., Any]) -> Callable[[], Any]:
                @functools.wraps(func)
                def run_step() -> Any:
                    return self.do(name, func, retries=retries, timeout=timeout, config=config)

                return run_step

            return decorator
        return self._result(self._runner.do(name, fn, retries, timeout, config))

    def sleep(self, name: str, duration: Any) -> Any:
        """Sleeps durably for ``duration`` (ms, a string like "10 seconds", or a timedelta)."""
        return self._result(self._runner.sleep(name, duration))

    def sleep_until(self, name: str, when: Any) -> Any:
        """Sleeps durably until ``when`` (an aware datetime or epoch milliseconds)."""
        return self._result(self._runner.sleep_until(name, when))

    def wait_for_event(self, name: str, type: str, *, timeout: Any = "24 hours") -> Any:
        """Waits for an event of ``type``; returns a :class:`~actorflow.WorkflowStepEvent`.

        Raises :class:`~actorflow.EventTimeoutError` into ``run`` on timeout.
        """
        return self._result(self._runner.wait_for_event(name, type, timeout))

    def map(
        self,
        name: str,
        fn: Callable[[Any], Any],
        items: Iterable[Any],
        *,
        retries: dict[str, Any] | RetryPolicy | None = None,
        timeout: Any = None,
        max_concurrency: int | None = None,
    ) -> Any:
        """Runs ``fn(item)`` for every item concurrently, each as step ``f"{name}[{i}]"``.

        Returns the results in item order.
        """
        coros = [
            self._runner.do(f"{name}[{i}]", _bind(fn, item), retries, timeout, None)
            for i, item in enumerate(items)
        ]
        return self._result(self._runner.gather(coros, max_concurrency))

    def parallel(
        self,
        *steps: tuple[str, Callable[..., Any]],
        retries: dict[str, Any] | RetryPolicy | None = None,
        timeout: Any = None,
        max_concurrency: int | None = None,
    ) -> Any:
        """Runs distinct ``(name, fn)`` steps concurrently; returns their results in order."""
        coros = [self._runner.do(n, f, retries, timeout, None) for n, f in steps]
        return self._result(self._runner.gather(coros, max_concurrency))


def _bind(fn: Callable[[Any], Any], item: Any) -> Callable[[], Any]:
    if inspect.iscoroutinefunction(fn):

        async def call_async() -> Any:
            return await fn(item)

        return call_async

    def call() -> Any:
        return fn(item)

    return call

