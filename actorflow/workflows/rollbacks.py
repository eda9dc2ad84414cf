"""Saga rollbacks: the handlers ``step.do(..., rollback=fn)`` registers, and their status.

A handler is a function, which cannot be stored: the run's own call of
``step.do`` hands it over again on every replay, with the step's stored
output. So the chain of an instance is what its replay registers: when
``run`` raises for good, the engine runs the handlers of the completed steps
of that replay, in reverse order of step start (their records' ``seq``).
Each handler is a step of kind ``"rollback"`` (keyed by the name and count
of the step it undoes), with its own record of attempts: a handler whose
record says complete never runs again, and a crash during the chain
replays ``run`` to the same failure and goes on with the handlers not yet
complete. The instance record's ``rb`` says how the chain stands (see
:func:`rollback_status`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from actorflow.workflows.step import resolve_config
from actorflow.workflows.step_options import ROLLBACK_ARGS, rollback_kwargs

__all__ = [
    "ROLLBACK_CONFIG_KEYS",
    "ROLLBACK_KIND",
    "RollbackHook",
    "rollback_call",
    "rollback_hook",
    "rollback_status",
]

#: The kind of the step records of rollback handlers.
ROLLBACK_KIND = "rollback"
#: What ``rollback_config`` may hold (Cloudflare's ``rollbackConfig``).
ROLLBACK_CONFIG_KEYS = ("retries", "timeout")


@dataclass(frozen=True, slots=True)
class RollbackHook:
    """A checked rollback handler of one ``step.do`` call.

    Attributes:
        fn: The handler.
        names: The keyword arguments it is called with (among
            :data:`~actorflow.workflows.step_options.ROLLBACK_ARGS`).
        cfg: Its resolved config (retries and timeout, the step defaults
            where ``rollback_config`` says nothing).
        config: ``rollback_config`` as given, where a retry delay function
            comes from (a stored config has none).
    """

    fn: Callable[..., Any]
    names: tuple[str, ...]
    cfg: dict[str, Any]
    config: dict[str, Any] | None


def rollback_hook(where: str, fn: Any, config: Any) -> RollbackHook:
    """Checks the ``rollback`` and ``rollback_config`` of a ``step.do`` call.

    Raises:
        TypeError: ``fn`` is not callable.
        ValueError: ``rollback_config`` without ``rollback``, not a dict, with
            keys other than ``retries`` and ``timeout``, or with bad values;
            or a handler that cannot be called with keyword arguments among
            ``output``, ``error``, ``ctx`` and ``step_name``. Each message
            names ``where`` (the workflow, the instance and the step).
    """
    if fn is None:
        raise ValueError(f"{where}: rollback_config is given without a rollback handler")
    if not callable(fn):
        raise TypeError(
            f"{where}: rollback must be a callable taking keyword arguments among "
            f"{', '.join(ROLLBACK_ARGS)}, not a {type(fn).__name__}"
        )
    if config is not None:
        if not isinstance(config, dict):
            raise ValueError(
                f"{where}: rollback_config must be a dict (retries, timeout), not a "
                f"{type(config).__name__}"
            )
        unknown = set(config) - set(ROLLBACK_CONFIG_KEYS)
        if unknown:
            raise ValueError(
                f"{where}: unknown rollback_config keys {sorted(unknown)}; it takes "
                "retries and timeout only"
            )
    cfg = resolve_config(f"{where}: rollback_config", config)
    names = rollback_kwargs(fn, f"{where}: rollback")
    return RollbackHook(fn, names, cfg, config)


def rollback_call(fn: Callable[..., Any], kwargs: dict[str, Any]) -> Callable[[], Any]:
    """A body without arguments that calls handler ``fn`` with ``kwargs`` (async if it is)."""
    if inspect.iscoroutinefunction(fn):

        async def call_async() -> Any:
            return await fn(**kwargs)

        return call_async

    def call() -> Any:
        return fn(**kwargs)

    return call


def rollback_status(rb: dict[str, Any] | None) -> dict[str, Any] | None:
    """``InstanceStatus.rollback`` from the instance record's ``rb``.

    None when no rollback ran, else ``{"outcome": "running" | "complete" |
    "failed", "error": {name, message} | None}`` (the error of the handler
    that failed for good).
    """
    if rb is None:
        return None
    return {"outcome": rb["o"], "error": rb.get("ed")}
