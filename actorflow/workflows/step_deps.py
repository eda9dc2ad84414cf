"""Cloudflare's Python Workflows style: ``@step.do`` steps that name their dependencies.

``@step.do(name=None, *, concurrent=False, config=None)`` declares a step
without running it and returns a :class:`DeclaredStep`; calling that runs the
step (an awaitable in an ``async def run``, the result in a ``def run``).
Each parameter of the decorated function is ``ctx`` (the
:class:`~actorflow.StepContext`) or the name of a step declared earlier in the
run, whose result is passed in: it is run first if this run has not run it
yet, and its result is reused if it has (once per run, as in Cloudflare's
SDK, ``workers/_workers.py``). ``concurrent=True`` resolves the dependencies
concurrently, else one after the other in parameter order. Cloudflare's
legacy form, ``depends=[step_a, step_b]``, gives the dependencies as a list
matched one for one with the parameters other than ``ctx``.

The memo is per run, in memory: after a restart the run starts again from the
top, and every step already completed returns its stored result from the
engine without running, as any ``step.do`` does.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from actorflow.core.errors import StepDependencyError
from actorflow.workflows.definition import validate_step_name

if TYPE_CHECKING:
    from actorflow.workflows.step import StepRunner, WorkflowStep

__all__ = ["Declarations", "DeclaredStep"]

#: The parameter that receives the step context rather than a dependency.
_CTX = "ctx"
_VARIADIC = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)


class DeclaredStep:
    """A step declared with ``@step.do(...)``: calling it runs the step.

    In an ``async def run`` the call returns an awaitable; in a ``def run``
    it blocks and returns the step's result. Every call is a ``step.do`` of
    its own (a second call is the name's next occurrence); a step that names
    this one as a dependency reuses the result of its last call in the run.

    Attributes:
        name: The step's name (the function's ``__name__`` unless given).
        func: The decorated function.
        concurrent: Whether its dependencies are resolved concurrently.
        depends: The legacy explicit dependency list, or None (by parameter name).
    """

    def __init__(
        self,
        decls: Declarations,
        name: str,
        func: Callable[..., Any],
        concurrent: bool,
        depends: Sequence[Any] | None,
        options: dict[str, Any],
    ) -> None:
        self._decls = decls
        self.name = name
        self.func = func
        self.concurrent = concurrent
        self.depends = None if depends is None else list(depends)
        self.options = options
        self.__name__ = getattr(func, "__name__", name)
        self.__qualname__ = getattr(func, "__qualname__", self.__name__)
        self.__doc__ = getattr(func, "__doc__", None)
        self.__wrapped__ = func

    def __call__(self) -> Any:
        """Runs the step (after its dependencies); see the class docstring."""
        return self._decls.result(self._decls.call(self))

    def declared_by(self, decls: Declarations) -> bool:
        """Whether this step was declared in the run ``decls`` belongs to."""
        return self._decls is decls

    def __repr__(self) -> str:
        return f"<step {self.name!r} declared by {self.__qualname__}>"


class Declarations:
    """The steps one run declared with ``@step.do``, and the results of those it ran.

    Args:
        runner: The engine's side of the run.
        step: An ``async`` view of the run's ``step`` (its ``do`` returns a
            coroutine), through which every declared step runs: in a sync
            run the dependencies are still awaited on the engine loop, which
            is what lets ``concurrent=True`` run them together.
        sync: Whether the run is a ``def run`` (calls block).
    """

    def __init__(self, runner: StepRunner, step: WorkflowStep, sync: bool) -> None:
        self._runner = runner
        self._step = step
        self._sync = sync
        self._by_name: dict[str, DeclaredStep] = {}
        self._by_function: dict[str, DeclaredStep] = {}
        self._memo: dict[str, Any] = {}
        self._in_flight: dict[str, asyncio.Future[Any]] = {}

    def decorator(
        self,
        name: Any,
        concurrent: bool,
        depends: Sequence[Any] | None,
        options: dict[str, Any],
    ) -> Callable[[Callable[..., Any]], DeclaredStep]:
        """What ``step.do(name, concurrent=..., depends=..., **options)`` returns.

        Raises:
            ValueError: ``name`` is given and is not a valid step name (it
                would fail every call alike); the message names the run.
        """
        if name is not None:
            validate_step_name(name, self._runner.where)

        def declare(func: Callable[..., Any]) -> DeclaredStep:
            if not callable(func):
                raise TypeError(
                    f"{self._runner.where}: @step.do decorates a function, "
                    f"not a {type(func).__name__}"
                )
            step_name = getattr(func, "__name__", None) if name is None else name
            if not isinstance(step_name, str):
                raise TypeError(
                    f"{self._runner.where}: @step.do() needs a name for {func!r}, "
                    "which has no __name__"
                )
            declared = DeclaredStep(self, step_name, func, concurrent, depends, options)
            self._by_name[step_name] = declared
            self._by_function[declared.__name__] = declared
            return declared

        return declare

    def result(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """The call's result in a sync run (blocking); the awaitable in an async one."""
        return self._runner.block_on(coro) if self._sync else coro

    async def call(self, declared: DeclaredStep) -> Any:
        """Resolves ``declared``'s dependencies, then runs it as a ``step.do``."""
        plan = self._plan(declared)
        deps = [d for d in plan if d is not None]
        if declared.concurrent and len(deps) > 1:
            values = await self._runner.gather([self._resolve(d) for d in deps], None)
        else:
            values = [await self._resolve(d) for d in deps]
        body = _bound(declared.func, plan, values)
        name = declared.name
        # A task, so that a step resolving this one as its own dependency
        # meanwhile (concurrent=True) waits for this run of it, not a second one.
        task = asyncio.ensure_future(self._step.do(name, body, **declared.options))
        self._in_flight[name] = task
        try:
            result = await task
        finally:
            if self._in_flight.get(name) is task:
                del self._in_flight[name]
        self._memo[name] = result
        return result

    async def _resolve(self, dep: DeclaredStep) -> Any:
        """A dependency's result: from this run's memo, its run under way, or a run now."""
        if dep.name in self._memo:
            return self._memo[dep.name]
        running = self._in_flight.get(dep.name)
        if running is not None:
            return await asyncio.shield(running)
        return await self.call(dep)

    def _plan(self, declared: DeclaredStep) -> list[DeclaredStep | None]:
        """For each parameter of the step function, its dependency (None: ``ctx``).

        Raises:
            StepDependencyError: A parameter names no step declared so far
                (or is ``*args`` / ``**kwargs``), or a ``depends`` list does
                not match the parameters other than ``ctx``.
        """
        try:
            params = list(inspect.signature(declared.func).parameters.values())
        except (TypeError, ValueError):
            params = []  # a callable whose signature cannot be read: called without arguments
        for p in params:
            if p.kind in _VARIADIC:
                raise self._error(
                    declared,
                    f"its function cannot take {'*' if p.kind is _VARIADIC[0] else '**'}{p.name}",
                    p.name,
                )
        if declared.depends is not None:
            return self._explicit(declared, params)
        plan: list[DeclaredStep | None] = []
        for p in params:
            if p.name == _CTX:
                plan.append(None)
                continue
            dep = self._by_name.get(p.name) or self._by_function.get(p.name)
            if dep is None or dep is declared:
                known = sorted(n for n in self._by_name if n != declared.name)
                raise self._error(
                    declared,
                    f"parameter {p.name!r} of {declared.__qualname__} names no step declared "
                    f"before it (declared: {known}); each parameter of a @step.do function is "
                    "ctx or the name of an earlier step, whose result it receives",
                    p.name,
                )
            plan.append(dep)
        return plan

    def _explicit(
        self, declared: DeclaredStep, params: list[inspect.Parameter]
    ) -> list[DeclaredStep | None]:
        """The plan of a legacy ``depends=[...]`` step: the list, in parameter order."""
        depends = declared.depends or []
        others = [p for p in params if p.name != _CTX]
        if len(others) != len(depends):
            raise self._error(
                declared,
                f"{declared.__qualname__} has {len(others)} parameter(s) besides ctx but "
                f"depends lists {len(depends)} step(s); they are matched one for one",
                None,
            )
        for dep in depends:
            if not isinstance(dep, DeclaredStep) or not dep.declared_by(self):
                raise self._error(
                    declared,
                    f"depends must list steps declared with @step.do in this run, not {dep!r}",
                    None,
                )
        it = iter(depends)
        return [None if p.name == _CTX else next(it) for p in params]

    def _error(self, declared: DeclaredStep, problem: str, parameter: str | None) -> Exception:
        return StepDependencyError(
            f"{self._runner.where}, step {declared.name!r}: {problem}",
            step=declared.name,
            parameter=parameter,
        )


def _bound(
    func: Callable[..., Any], plan: list[DeclaredStep | None], values: list[Any]
) -> Callable[..., Any]:
    """A step body that calls ``func`` with ``ctx`` and the dependencies' results.

    It takes ``ctx`` only if ``func`` does (the engine makes the context only
    for bodies that name it), and is ``async`` if ``func`` is, so the engine
    runs it where it would run ``func``.
    """
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):
        params = []
    it = iter(values)
    fixed: list[tuple[inspect.Parameter, Any]] = [
        (p, None if dep is None else next(it)) for p, dep in zip(params, plan, strict=True)
    ]
    takes_ctx = any(p.name == _CTX for p in params)

    def arguments(ctx: Any) -> tuple[list[Any], dict[str, Any]]:
        args: list[Any] = []
        kwargs: dict[str, Any] = {}
        for p, value in fixed:
            v = ctx if p.name == _CTX else value
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                kwargs[p.name] = v
            else:
                args.append(v)
        return args, kwargs

    if inspect.iscoroutinefunction(func):
        if takes_ctx:

            async def async_body_ctx(ctx: Any) -> Any:
                args, kwargs = arguments(ctx)
                return await func(*args, **kwargs)

            return async_body_ctx

        async def async_body() -> Any:
            args, kwargs = arguments(None)
            return await func(*args, **kwargs)

        return async_body
    if takes_ctx:

        def body_ctx(ctx: Any) -> Any:
            args, kwargs = arguments(ctx)
            return func(*args, **kwargs)

        return body_ctx

    def body() -> Any:
        args, kwargs = arguments(None)
        return func(*args, **kwargs)

    return body
