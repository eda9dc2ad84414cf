"""Steps: the ``step`` object given to ``run``, step configs and retry policies."""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Protocol, cast

from actorflow.core.clock import MAX_DURATION_MS, MAX_EPOCH_MS, parse_duration_ms, to_epoch_ms
from actorflow.core.errors import NonRetryableError
from actorflow.workflows.step_deps import Declarations
from actorflow.workflows.step_options import (
    check_sensitive,
    delay_kwargs,
    is_delay_function,
    with_sensitive,
)

__all__ = [
    "DEFAULT_CONFIG",
    "RetryPolicy",
    "StepContext",
    "StepInfo",
    "WorkflowStep",
    "resolve_config",
    "retry_delay_ms",
    "step_body_problem",
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
    """A retries setting, accepted wherever a retries dict is.

    Checked when it is made, with the rules (and messages) of a retries dict.
    ``delay`` may be a function (a dynamic delay, see ``docs/steps-options.md``):
    it gets the keyword arguments among ``ctx`` and ``error`` that it names and
    returns a duration, which goes through ``backoff`` as a fixed delay does.

    Raises:
        ValueError: ``limit`` is not an int from 0 to 10,000, ``delay`` is not
            a valid duration nor a function callable with keyword arguments
            among ``ctx`` and ``error``, or ``backoff`` is not one of
            ``constant``, ``linear``, ``exponential``.
    """

    limit: int = 5
    delay: int | float | str | timedelta | Callable[..., Any] = "10 seconds"
    backoff: str = "exponential"

    def __post_init__(self) -> None:
        _check_retries(
            "RetryPolicy",
            {"limit": self.limit, "delay": self.delay, "backoff": self.backoff},
            prefix="",
        )


@dataclass(frozen=True)
class StepInfo:
    """The step a callable runs for: its name and occurrence count (1-based)."""

    name: str
    count: int


@dataclass(frozen=True)
class StepContext:
    """What a step callable may take as its ``ctx`` parameter.

    ``ctx[key]`` reads it as the dict a Cloudflare Python step gets:
    ``ctx["attempt"]``, ``ctx["step"]`` (``{"name", "count"}``) and
    ``ctx["config"]``.
    """

    attempt: int
    step: StepInfo
    config: dict[str, Any]

    def __getitem__(self, key: str) -> Any:
        """Cloudflare's dict form of the context.

        Raises:
            KeyError: ``key`` is not ``attempt``, ``step`` or ``config``.
        """
        if key == "attempt":
            return self.attempt
        if key == "step":
            return {"name": self.step.name, "count": self.step.count}
        if key == "config":
            return self.config
        raise KeyError(key)


def resolve_config(
    where: str,
    config: dict[str, Any] | None = None,
    retries: dict[str, Any] | RetryPolicy | None = None,
    timeout: Any = None,
) -> dict[str, Any]:
    """Merges a step's settings field by field over :data:`DEFAULT_CONFIG`.

    Returns a config with ``retries.delay`` and ``timeout`` in milliseconds.
    A delay function is left out of it (the config is stored with the step,
    a function cannot be): see :func:`~actorflow.workflows.step_options.delay_function`.
    ``config["sensitive"]`` (``"output"``) is kept in it.

    Raises:
        ValueError: An unknown key, a negative limit, a bad duration or backoff,
            a zero timeout, or a ``sensitive`` other than None and ``"output"``;
            the message names ``where`` (the step).
    """
    d = DEFAULT_CONFIG["retries"]
    cfg: dict[str, Any] = {
        "retries": {"limit": d["limit"], "delay": d["delay"], "backoff": d["backoff"]},
        "timeout": DEFAULT_CONFIG["timeout"],
    }
    if config is not None:
        if not isinstance(config, dict):
            raise ValueError(f"{where}: config must be a dict")
        unknown = set(config) - {"retries", "timeout", "redact", "sensitive"}
        if unknown:
            raise ValueError(f"{where}: unknown config keys {sorted(unknown)}")
        if "redact" in config:
            if not isinstance(config["redact"], bool):
                raise ValueError(f"{where}: redact must be True or False")
            if config["redact"]:
                # Kept with the step's record: what shows its output shows a redaction.
                cfg["redact"] = True
        if config.get("sensitive") is not None:
            # Kept with the step's record: every view of it shows SENSITIVE_OUTPUT.
            cfg["sensitive"] = check_sensitive(where, config["sensitive"])
        retries = config.get("retries", retries) if retries is None else retries
        timeout = config.get("timeout", timeout) if timeout is None else timeout
    if retries is not None:
        if isinstance(retries, RetryPolicy):
            retries = {"limit": retries.limit, "delay": retries.delay, "backoff": retries.backoff}
        if not isinstance(retries, dict):
            raise ValueError(f"{where}: retries must be a dict or RetryPolicy")
        cfg["retries"].update(_check_retries(where, retries))
        if is_delay_function(cfg["retries"]["delay"]):
            # Not stored (a function cannot be): the run's step.do call gives it on replay.
            del cfg["retries"]["delay"]
    if timeout is not None:
        ms = parse_duration_ms(timeout, what=f"{where}: timeout")
        if ms <= 0:
            raise ValueError(f"{where}: timeout must be greater than 0")
        cfg["timeout"] = ms
    return cfg


def _check_retries(where: str, retries: dict[str, Any], prefix: str = "retries.") -> dict[str, Any]:
    """Checks the fields of a retries setting; returns them with ``delay`` in ms.

    Raises:
        ValueError: An unknown key, a limit outside 0 to 10,000, a bad delay
            or backoff; the message names ``where``.
    """
    unknown = set(retries) - {"limit", "delay", "backoff"}
    if unknown:
        raise ValueError(f"{where}: unknown retries keys {sorted(unknown)}")
    out: dict[str, Any] = {}
    if "limit" in retries:
        limit = retries["limit"]
        valid = isinstance(limit, int) and not isinstance(limit, bool)
        if not valid or not 0 <= limit <= MAX_RETRIES:
            raise ValueError(
                f"{where}: {prefix}limit must be an int from 0 to {MAX_RETRIES}, not {limit!r}"
            )
        out["limit"] = limit
    if "delay" in retries:
        delay = retries["delay"]
        if is_delay_function(delay):
            delay_kwargs(delay, f"{where}: {prefix}delay")  # refuses a function it cannot call
            out["delay"] = delay
        else:
            out["delay"] = parse_duration_ms(delay, what=f"{where}: {prefix}delay")
    if "backoff" in retries:
        if retries["backoff"] not in BACKOFFS:
            raise ValueError(
                f"{where}: {prefix}backoff must be one of {BACKOFFS}, not {retries['backoff']!r}"
            )
        out["backoff"] = retries["backoff"]
    return out


def retry_delay_ms(config: dict[str, Any], attempt: int, base: int | None = None) -> int:
    """Returns the wait after failed attempt ``attempt`` (1-based).

    ``base`` is the delay a delay function gave for this attempt (None: the
    config's fixed ``retries.delay``); the backoff applies to either alike.
    At most :data:`~actorflow.core.clock.MAX_DURATION_MS` (100 years): an
    exponential backoff over thousands of retries would otherwise reach
    deadlines the engine cannot store.
    """
    r = config["retries"]
    delay: int = r["delay"] if base is None else base
    if r["backoff"] == "constant":
        wait = delay
    elif r["backoff"] == "linear":
        wait = delay * attempt
    else:
        wait = delay * 2 ** (attempt - 1)
    return min(int(wait), MAX_DURATION_MS)


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


#: Stands for the argument a step body is called with, when its signature is checked.
_PROBE = object()


def step_body_problem(fn: Callable[..., Any]) -> str | None:
    """Tells what keeps ``fn`` from being called as a step body, or None if nothing does.

    The engine calls a step body with no argument, or, when it has a parameter
    named ``ctx``, with one positional argument (the :class:`StepContext`). A
    body that cannot be called so (``lambda x, y: ...``, ``def f(item)``, a
    keyword-only ``ctx``) would fail every attempt alike: this is checked
    before the first one. A callable whose signature cannot be read (some
    builtins) is let through.
    """
    if _plainly_fine(fn):
        return None
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    takes_ctx = "ctx" in sig.parameters
    try:
        bound = sig.bind(_PROBE) if takes_ctx else sig.bind()
    except TypeError as e:
        how = "with ctx as its only argument" if takes_ctx else "without arguments"
        return f"{_described(fn, sig)} cannot be called {how} ({e})"
    if takes_ctx and bound.arguments.get("ctx") is not _PROBE:
        return f"{_described(fn, sig)} must take ctx as its first positional parameter"
    return None


def _plainly_fine(fn: Callable[..., Any]) -> bool:
    """True for the common shapes of a good body, read from the code object.

    ``inspect.signature`` is slow and this runs for every step call: only a
    verdict of "fine" is taken here; anything else is looked at in full.
    """
    skip = 0
    if type(fn) is types.MethodType:
        fn, skip = fn.__func__, 1  # ``self`` is bound already
    if type(fn) is not types.FunctionType or hasattr(fn, "__wrapped__"):
        return False
    code = fn.__code__
    if code.co_kwonlyargcount:
        return False
    n = code.co_argcount
    names = code.co_varnames[skip:n]
    required = len(names) - len(fn.__defaults__ or ())
    if required <= 0 and "ctx" not in names:
        return True
    return bool(names) and names[0] == "ctx" and required <= 1


def _described(fn: Callable[..., Any], sig: inspect.Signature) -> str:
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"the step function {name}{sig}"


_BODY_RULE = "a step function takes no parameter, or one parameter named ctx (an af.StepContext)"
_ITEM_RULE = "the function of step.map takes one positional parameter, the item"


def _bad_body(where: str, name: str, problem: str, rule: str = _BODY_RULE) -> Callable[[], Any]:
    """A body that fails its step at once (no retries), recorded like any step failure."""
    message = f"{where}, step {name!r}: {problem}; {rule}"

    def invalid_step_function() -> Any:
        raise NonRetryableError(message, step=name)

    return invalid_step_function


def _item_problem(fn: Any) -> str | None:
    """Tells what keeps ``fn`` from being called with one item (``step.map``), or None."""
    if not callable(fn):
        return f"a {type(fn).__name__} is not callable"
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    try:
        sig.bind(_PROBE)
    except TypeError as e:
        return (
            f"the function {getattr(fn, '__qualname__', type(fn).__name__)}{sig} cannot "
            f"be called with one item ({e})"
        )
    return None


class StepRunner(Protocol):
    """What :class:`WorkflowStep` needs from the engine (one instance's run)."""

    @property
    def where(self) -> str:
        """Names the workflow and the instance in messages."""
        ...

    def do(
        self,
        name: str,
        fn: Callable[..., Any],
        retries: Any,
        timeout: Any,
        config: Any,
        resources: Any = None,
        rollback: Any = None,
        rollback_config: Any = None,
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

    def patched(self, patch_id: str) -> bool: ...


class WorkflowStep:
    """The ``step`` argument of ``run``.

    In an ``async def run`` every method returns an awaitable; in a plain
    ``def run`` every method blocks and returns the result.
    """

    def __init__(self, runner: StepRunner, sync: bool) -> None:
        self._runner = runner
        self._sync = sync
        self._declared: Declarations | None = None

    def _result(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return self._runner.block_on(coro) if self._sync else coro

    def do(
        self,
        name: str | Callable[..., Any] | None = None,
        fn: Callable[..., Any] | None = None,
        *,
        retries: dict[str, Any] | RetryPolicy | None = None,
        timeout: Any = None,
        config: dict[str, Any] | None = None,
        resources: dict[str, float] | None = None,
        sensitive: str | None = None,
        concurrent: bool = False,
        depends: Sequence[Any] | None = None,
        rollback: Callable[..., Any] | None = None,
        rollback_config: dict[str, Any] | None = None,
    ) -> Any:
        """Runs ``fn`` as a durable step and returns its result.

        Without ``fn`` it is a decorator (Cloudflare's Python Workflows style,
        see ``docs/python-style.md``): ``@step.do("name")``, ``@step.do()``
        (the name is the function's ``__name__``) or a bare ``@step.do``
        declares the step without running it; calling what it returns runs
        it. Each parameter of the decorated function is ``ctx`` or the name
        of a step declared earlier in the run, whose result it receives (run
        first if this run has not run it yet, reused if it has);
        ``concurrent=True`` resolves those concurrently, and
        ``depends=[step_a, ...]`` gives them as a list instead (Cloudflare's
        legacy form). ``fn`` may take one parameter named ``ctx`` (a
        :class:`StepContext`). A completed step never runs again; its stored
        result is returned on replay. ``resources`` (``{"num_cpus": 2,
        "num_gpus": 1}``, custom names) is what each attempt asks of the
        runtime's executor (see :mod:`actorflow.executors`); the in-process
        executor ignores it. ``sensitive="output"`` (also
        ``config={"sensitive": "output"}``) shows ``"[REDACTED]"`` instead of
        the step's output in every view of the instance; replay still gets the
        real value. ``rollback`` (sync or async) undoes the completed step if
        the instance fails: it gets the keyword arguments among ``output``,
        ``error``, ``ctx`` and ``step_name`` that it names; ``rollback_config``
        (``retries``, ``timeout``) is its retry policy (see docs/rollbacks.md).

        Raises:
            StepDependencyError: (a ``TypeError``) when a declared step is
                called and a parameter of its function names no earlier step.
        """
        if fn is None:
            # The decorator forms; a bare ``@step.do`` passes the function as ``name``.
            func = name if callable(name) and not isinstance(name, str) else None
            declare = self._declarations().decorator(
                None if func is not None else name,
                concurrent,
                depends,
                {
                    "retries": retries,
                    "timeout": timeout,
                    "config": config,
                    "resources": resources,
                    "sensitive": sensitive,
                    "rollback": rollback,
                    "rollback_config": rollback_config,
                },
            )
            return declare if func is None else declare(func)
        if concurrent or depends is not None:
            raise TypeError(
                f"{self._runner.where}, step {name!r}: concurrent= and depends= belong to "
                "the decorator form, @step.do(...)"
            )
        step_name = cast("str", name)  # the engine refuses a name that is not a str, naming it
        if sensitive is not None:
            config = with_sensitive(config, sensitive)
        if rollback is None and rollback_config is None:
            return self._result(
                self._runner.do(
                    step_name, self._body(step_name, fn), retries, timeout, config, resources
                )
            )
        return self._result(
            self._runner.do(
                step_name,
                self._body(step_name, fn),
                retries,
                timeout,
                config,
                resources,
                rollback,
                rollback_config,
            )
        )

    def _declarations(self) -> Declarations:
        """This run's ``@step.do`` steps and their results (made at the first decorator)."""
        if self._declared is None:
            self._declared = Declarations(
                self._runner, WorkflowStep(self._runner, sync=False), self._sync
            )
        return self._declared

    def _body(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn``, or, if it cannot be called as a step body, one that fails the step at once."""
        if not callable(fn):
            return fn  # the engine refuses it, naming the step
        problem = step_body_problem(fn)
        return fn if problem is None else _bad_body(self._runner.where, name, problem)

    def patched(self, patch_id: str) -> bool:
        """Tells whether this instance takes the new code path of patch ``patch_id``.

        Temporal's ``workflow.patched``, to change the code of a workflow that
        has instances in flight (see ``docs/versioning.md``). The first time an
        instance reaches the call the answer is False if its recorded steps
        already go past this point (it started on the code before the patch
        and is replaying), else True; the answer is recorded in the instance,
        and every later call with the same id in the instance, in this run or
        any replay, returns it. Synchronous also in an ``async def run`` (no
        ``await``). Call it from ``run``'s own flow, not from a concurrent
        branch.

        Raises:
            TypeError: ``patch_id`` is not a str.
            ValueError: ``patch_id`` breaks the rules of a step name (empty,
                longer than 256 characters, control characters).
        """
        if self._sync:
            return bool(self._runner.block_on(_calling(self._runner.patched, patch_id)))
        return self._runner.patched(patch_id)

    def sleep(self, name: str, duration: Any) -> Any:
        """Sleeps durably for ``duration`` (ms, a string like "10 seconds", or a timedelta)."""
        return self._result(self._runner.sleep(name, duration))

    def sleep_until(self, name: str, when: Any) -> Any:
        """Sleeps durably until ``when`` (an aware datetime or epoch milliseconds).

        ``when`` must be from 1970 to 9999 (epoch ms 0 to
        :data:`~actorflow.core.clock.MAX_EPOCH_MS`); else ``ValueError`` is raised
        into ``run``, naming the step.
        """
        if type(when) is int and not 0 <= when <= MAX_EPOCH_MS:
            # The engine takes an int as it is (its fast path): refuse it here, where the
            # deadline could otherwise be written and make the instance unreadable.
            try:
                to_epoch_ms(when, what=f"{self._runner.where}, step {name!r}")
            except ValueError as e:
                return self._result(_raising(e))
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
        resources: dict[str, float] | None = None,
        sensitive: str | None = None,
    ) -> Any:
        """Runs ``fn(item)`` for every item concurrently, each as step ``f"{name}[{i}]"``.

        Returns the results in item order. ``resources`` is asked for each
        item's step; ``sensitive="output"`` redacts each item's output.
        """
        problem = _item_problem(fn)
        config = with_sensitive(None, sensitive)
        coros = [
            self._runner.do(
                f"{name}[{i}]",
                _bind(fn, item)
                if problem is None
                else _bad_body(self._runner.where, f"{name}[{i}]", problem, _ITEM_RULE),
                retries,
                timeout,
                config,
                resources,
            )
            for i, item in enumerate(items)
        ]
        return self._result(self._runner.gather(coros, max_concurrency))

    def parallel(
        self,
        *steps: tuple[str, Callable[..., Any]],
        retries: dict[str, Any] | RetryPolicy | None = None,
        timeout: Any = None,
        max_concurrency: int | None = None,
        resources: dict[str, float] | None = None,
        sensitive: str | None = None,
    ) -> Any:
        """Runs distinct ``(name, fn)`` steps concurrently; returns their results in order.

        ``sensitive="output"`` redacts the output of each of them.
        """
        config = with_sensitive(None, sensitive)
        coros = [
            self._runner.do(n, self._body(n, f), retries, timeout, config, resources)
            for n, f in steps
        ]
        return self._result(self._runner.gather(coros, max_concurrency))


async def _calling(fn: Callable[..., Any], *args: Any) -> Any:
    """Calls ``fn`` on the runner's loop (a plain ``def run`` blocks on it)."""
    return fn(*args)


async def _raising(error: BaseException) -> Any:
    """A step call that fails with ``error`` where the call is awaited (or blocked on)."""
    raise error


def _bind(fn: Callable[[Any], Any], item: Any) -> Callable[[], Any]:
    if inspect.iscoroutinefunction(fn):

        async def call_async() -> Any:
            return await fn(item)

        return call_async

    def call() -> Any:
        return fn(item)

    return call
