"""Step options beyond retries and timeout: sensitive outputs and retry delay functions.

``sensitive="output"`` is kept in the step's stored config, where every view
of the step (:func:`actorflow.workflows.history.build_steps`) finds it and
shows :data:`SENSITIVE_OUTPUT` instead of the output; replay reads the stored
result itself.

A retry delay may be a function (``retries={"delay": fn}``): the function is
not stored (the step's config then has no ``delay``), the run's own call of
``step.do`` hands it over again on every replay, and the engine calls it only
when an attempt has just failed and a retry follows. The wait it gave is
recorded in that attempt, so a replay never calls it for an attempt already
recorded.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from actorflow.core.clock import parse_duration_ms

__all__ = [
    "DELAY_FUNCTION_TIMEOUT_S",
    "SENSITIVE_OUTPUT",
    "check_sensitive",
    "delay_function",
    "delay_kwargs",
    "evaluate_delay",
    "is_delay_function",
    "rollback_kwargs",
    "with_sensitive",
]

#: What every view of a step run with ``sensitive="output"`` shows as its output.
SENSITIVE_OUTPUT = "[REDACTED]"
#: The only value of ``sensitive`` besides None (Cloudflare's ``sensitive: "output"``).
_SENSITIVE_VALUES = ("output",)
#: How long a retry delay function may take (Cloudflare's local engine gives it 5 s).
DELAY_FUNCTION_TIMEOUT_S = 5.0
#: The keyword arguments a retry delay function may name.
_DELAY_ARGS = ("ctx", "error")
#: The keyword arguments a rollback handler may name (Cloudflare's ``{ctx, error,
#: output, stepName}``, in Python's spelling).
ROLLBACK_ARGS = ("output", "error", "ctx", "step_name")


def check_sensitive(where: str, value: Any) -> str | None:
    """Returns ``value`` if it is a valid ``sensitive`` setting (None or ``"output"``).

    Raises:
        ValueError: Any other value; the message names ``where`` (the step).
    """
    if value is None or (isinstance(value, str) and value in _SENSITIVE_VALUES):
        return value
    raise ValueError(f"{where}: sensitive must be 'output' or None, not {value!r}")


def with_sensitive(config: Any, sensitive: Any) -> Any:
    """``config`` with the ``sensitive=`` shorthand of a step call folded in (it wins)."""
    if sensitive is None:
        return config
    if config is None:
        return {"sensitive": sensitive}
    if isinstance(config, dict):
        return {**config, "sensitive": sensitive}
    return config  # not a dict: resolve_config refuses it, naming the step


def is_delay_function(delay: Any) -> bool:
    """True if a retries ``delay`` is a function rather than a duration."""
    return callable(delay)


def delay_kwargs(fn: Callable[..., Any], what: str) -> tuple[str, ...]:
    """The keyword arguments among ``ctx`` and ``error`` that delay function ``fn`` names.

    A function with ``**kwargs`` gets both.

    Raises:
        ValueError: ``fn`` cannot be called with keyword arguments among
            those (it needs another one, or takes only positional ones); the
            message names ``what``.
    """
    return _named_kwargs(fn, what, _DELAY_ARGS, "delay function")


def rollback_kwargs(fn: Callable[..., Any], what: str) -> tuple[str, ...]:
    """The keyword arguments among :data:`ROLLBACK_ARGS` that rollback handler ``fn`` names.

    A handler with ``**kwargs`` gets all of them.

    Raises:
        ValueError: ``fn`` cannot be called with keyword arguments among
            those; the message names ``what``.
    """
    return _named_kwargs(fn, what, ROLLBACK_ARGS, "rollback handler")


def _named_kwargs(
    fn: Callable[..., Any], what: str, allowed: tuple[str, ...], label_of: str
) -> tuple[str, ...]:
    """The names among ``allowed`` that ``fn`` takes as keyword arguments (see above)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return ()  # a builtin whose signature cannot be read: called without arguments
    params = sig.parameters
    names: tuple[str, ...]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        names = allowed
    else:
        names = tuple(
            n
            for n in allowed
            if n in params and params[n].kind is not inspect.Parameter.POSITIONAL_ONLY
        )
    try:
        sig.bind(**dict.fromkeys(names))
    except TypeError as e:
        label = getattr(fn, "__qualname__", None) or type(fn).__name__
        among = ", ".join(allowed[:-1]) + " and " + allowed[-1]
        raise ValueError(
            f"{what}: the {label_of} {label}{sig} cannot be called with the keyword "
            f"arguments it may name, {among} ({e})"
        ) from None
    return names


def delay_function(retries: Any, config: Any) -> Callable[..., Any] | None:
    """The retry delay function of a step call, or None if its delay is a duration.

    ``retries`` (a dict or :class:`~actorflow.RetryPolicy`) wins over
    ``config["retries"]``, as in :func:`~actorflow.workflows.step.resolve_config`.
    """
    if retries is None and isinstance(config, dict):
        retries = config.get("retries")
    delay = retries.get("delay") if isinstance(retries, dict) else getattr(retries, "delay", None)
    return delay if is_delay_function(delay) else None


async def evaluate_delay(
    fn: Callable[..., Any],
    kwargs: dict[str, Any],
    in_thread: Callable[[Callable[[], Any]], Awaitable[Any]],
    what: str,
) -> int:
    """Calls a retry delay function and returns the duration it gave, in ms.

    A sync function runs through ``in_thread`` (not on the engine loop, which
    it would hold up); an async one, or an awaitable it returns, is awaited.
    Either has :data:`DELAY_FUNCTION_TIMEOUT_S`.

    Raises:
        TimeoutError: It took longer.
        ValueError: What it returned is not a valid duration.
        Exception: What it raised.
    """
    async with asyncio.timeout(DELAY_FUNCTION_TIMEOUT_S):
        if inspect.iscoroutinefunction(fn):
            value = await fn(**kwargs)
        else:
            value = await in_thread(functools.partial(fn, **kwargs))
            if inspect.isawaitable(value):
                value = await value
    return parse_duration_ms(value, what=f"{what}: the delay function returned {value!r}")
