"""OpenTelemetry tracing of workflow runs (the optional extra ``otel``).

Enable it per runtime, with an OpenTelemetry SDK ``TracerProvider``::

    rt = af.Runtime("./data", tracer_provider=provider)
    # or, on a running runtime:
    actorflow.tracing.instrument(rt, provider)

Then every activation of an instance (a run, from its start or wake-up to
its end or hibernation) is a span, with a child span per step it ended
(``step.do``, ``step.sleep``, ``step.wait_for_event``) and, under each
``step.do`` span, a span per attempt. Failed attempts carry an
``exception`` event and an error status; a retry is a ``retry`` event on the
step span with its delay. ``create()`` makes a ``workflow.create`` span in the
caller's context and stores its W3C ``traceparent`` with the instance: every
run of the instance is its child, in the caller's trace if there is one,
also after the process restarts.

Step and attempt spans are made from the step's durable record once it
ended, with the exact start and end of every attempt (including attempts
made before a restart), in batches: when the run ends or hibernates, or
every 64 ended steps. Timestamps come from the runtime's clock.

Without a provider nothing of this module is imported by the engine and
OpenTelemetry need not be installed: the engine's hooks are a ``None`` test.
"""

from __future__ import annotations

import os
import random
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from actorflow.workflows.engine.execution import Execution

__all__ = ["OTelObserver", "RunObserver", "instrument", "uninstrument"]

#: The field of an instance record holding the creator's W3C traceparent.
TRACEPARENT = "tp"
_NS = 1_000_000  # ms -> ns
_BATCH = 64  # ended steps of a run turned into spans together
_ATTEMPT = tuple(f"attempt {i}" for i in range(16))  # span names


class RunObserver(Protocol):
    """What the engine tells an observer about runs and steps (engine loop only)."""

    def traceparent(self) -> str | None:
        """The caller's trace context to store with a new instance (any thread)."""
        ...

    def run_started(self, ex: Execution) -> None:
        """A run (one activation of an instance) starts."""
        ...

    def step_committed(self, ex: Execution, rec: dict[str, Any]) -> None:
        """A step record ``rec`` was written durably."""
        ...

    def run_ended(self, ex: Execution, outcome: str, value: Any) -> None:
        """The run ended: ``complete``, ``errored``, ``suspended``, ``stop`` or ``crashed``."""
        ...


class _Instrumentable(Protocol):
    _engine: Any


def instrument(
    rt: _Instrumentable, provider: Any, *, first_attempt_spans: bool = True
) -> OTelObserver:
    """Traces the runs of runtime ``rt`` with ``provider`` (an OpenTelemetry TracerProvider).

    Args:
        rt: The runtime.
        provider: The TracerProvider.
        first_attempt_spans: False leaves out the ``attempt 1`` span of a
            step done at its first attempt (its step span says all it would:
            same times, ``actorflow.attempts`` 1, no error), which halves
            the spans of steps that seldom fail.

    Raises:
        ImportError: OpenTelemetry is not installed (``pip install actorflow[otel]``).
    """
    observer = OTelObserver(provider, first_attempt_spans=first_attempt_spans)
    rt._engine.observer = observer  # noqa: SLF001 - the runtime owns its engine context and names it to no user; tracing is installed into it
    return observer


def uninstrument(rt: _Instrumentable) -> None:
    """Stops tracing runtime ``rt``; runs in progress end their spans normally."""
    rt._engine.observer = None  # noqa: SLF001 - the runtime owns its engine context and names it to no user; tracing is installed into it


class OTelObserver:
    """A :class:`RunObserver` that makes OpenTelemetry spans.

    With the SDK's ``TracerProvider``, run, step and attempt spans are built
    as finished spans and handed straight to the provider's span processors
    (they are complete when the step ends), which costs a fraction of the
    tracer's ``start_span``/``end``; the SDK's ``BatchSpanProcessor`` gets
    each batch with one queue operation. With any other provider they go
    through its tracer.

    Args:
        provider: The TracerProvider.
        first_attempt_spans: See :func:`instrument`.
    """

    def __init__(self, provider: Any, *, first_attempt_spans: bool = True) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._SpanContext = SpanContext
        self._kind = SpanKind.INTERNAL
        self._ok = Status(StatusCode.OK)
        self._unset = Status(StatusCode.UNSET)
        self._sampled = TraceFlags(TraceFlags.SAMPLED)
        self._Status = Status
        self._ERROR = StatusCode.ERROR
        self._propagator = TraceContextTextMapPropagator()
        self._tracer = provider.get_tracer("actorflow")
        self._first_attempts = first_attempt_spans
        # id(execution) -> (the run's span, or what makes it at the end; its context if
        # sampled, else None; its attributes; its ended steps not turned into spans yet)
        self._runs: dict[int, tuple[Any, Any, dict[str, Any], list[dict[str, Any]]]] = {}
        self._last_tp: str | None = None
        self._last_parent: Any = None
        self._parent_sc: Any = None
        self._fast: tuple[Any, ...] | None = None
        processor = getattr(provider, "_active_span_processor", None)
        scope = getattr(self._tracer, "_instrumentation_scope", None)
        if processor is not None and scope is not None:
            from opentelemetry.sdk.trace import Event, ReadableSpan
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

            ids = provider.id_generator
            # The default generator is getrandbits(64) but for 0, never a span id (see _build).
            new_id: Callable[[], int] = (
                partial(random.getrandbits, 64)
                if type(ids) is RandomIdGenerator
                else ids.generate_span_id
            )
            self._fast = (provider.resource, new_id, scope, ReadableSpan, Event)
            self._processor = processor
            self._batch_type: type = BatchSpanProcessor
            self._new_trace_id = ids.generate_trace_id
            self._sampler = provider.sampler

    # -- create ----------------------------------------------------------------

    def traceparent(self) -> str | None:
        """Emits a ``workflow.create`` span in the caller's context; returns its traceparent.

        Every run of the instances created is its child: one trace per
        instance, inside the caller's trace if there is one.
        """
        span = self._tracer.start_span("workflow.create", kind=self._kind)
        carrier: dict[str, str] = {}
        self._propagator.inject(carrier, context=self._trace.set_span_in_context(span))
        span.end()
        return carrier.get("traceparent")

    # -- runs --------------------------------------------------------------------

    def run_started(self, ex: Execution) -> None:
        rec = ex.actor.record
        tp = rec.get(TRACEPARENT) if rec is not None else None
        name = f"workflow.run {ex.wfe.name}"
        attrs = {
            "actorflow.workflow": ex.wfe.name,
            "actorflow.instance": ex.actor.iid,
            "actorflow.epoch": ex.actor.epoch,
        }
        parent = self._parent(tp) if tp else None
        if self._fast is None:
            span = self._tracer.start_span(
                name, context=parent, kind=self._kind, start_time=ex.t_start * _NS, attributes=attrs
            )
            sc = span.get_span_context()
            self._runs[id(ex)] = (span, sc if sc.trace_flags.sampled else None, attrs, [])
            return
        # The run span is emitted finished when the run ends; its context is made now
        # (with the provider's sampler) so that step spans can point to it.
        parent_sc = self._parent_sc if parent is not None else None
        trace_id = parent_sc.trace_id if parent_sc is not None else self._new_trace_id()
        decision = self._sampler.should_sample(parent, trace_id, name, self._kind, attrs)
        if not decision.decision.is_sampled():
            self._runs[id(ex)] = (None, None, attrs, [])
            return
        ctx = self._SpanContext(
            trace_id, self._fast[1]() or 1, False, self._sampled, decision.trace_state
        )
        self._runs[id(ex)] = ((name, parent_sc, ex.t_start), ctx, attrs, [])

    def _parent(self, tp: str) -> Any:
        """The context of traceparent ``tp``; its span context in ``_parent_sc``.

        The last one is kept: the instances of a ``create_batch`` share theirs.
        """
        if tp != self._last_tp:
            parent = self._propagator.extract({"traceparent": tp})
            sc = self._trace.get_current_span(parent).get_span_context()
            self._last_tp, self._last_parent, self._parent_sc = (
                tp,
                parent,
                sc if sc.is_valid else None,
            )
        return self._last_parent

    def run_ended(self, ex: Execution, outcome: str, value: Any) -> None:
        run = self._runs.pop(id(ex), None)
        if run is None or (run[0] is None and run[1] is None):
            return
        status = self._ok if outcome == "complete" else self._unset
        events: list[Any] = []
        end = ex.now_ms()
        if outcome == "errored" or outcome == "crashed":
            if isinstance(value, BaseException):
                desc = f"{type(value).__name__}: {value}"
                events.append(
                    (
                        "exception",
                        end,
                        {
                            "exception.type": type(value).__name__,
                            "exception.message": str(value),
                            "exception.stacktrace": "".join(traceback.format_exception(value)),
                        },
                    )
                )
            else:
                desc = str(value)
            status = self._Status(self._ERROR, desc)
        first, ctx, attrs, _ = run
        if isinstance(first, tuple):  # the SDK's fast path: one finished span
            name, parent_sc, start = first
            resource, _, scope, readable, event = self._fast  # type: ignore[misc]
            spans = self._build(ex, run)
            spans.append(
                readable(
                    name,
                    ctx,
                    parent_sc,
                    resource,
                    {**attrs, "actorflow.outcome": outcome},
                    [event(n, a, t * _NS) for n, t, a in events],
                    (),
                    self._kind,
                    None,
                    status,
                    start * _NS,
                    end * _NS,
                    scope,
                )
            )
            self._emit(spans)
            return
        self._flush(ex, run)
        span = first
        span.set_attribute("actorflow.outcome", outcome)
        for n, t, a in events:
            span.add_event(n, a, timestamp=t * _NS)
        if status is not self._unset:
            span.set_status(status)
        span.end(end_time=end * _NS)

    # -- steps ---------------------------------------------------------------------

    def step_committed(self, ex: Execution, rec: dict[str, Any]) -> None:
        status = rec["s"]
        if status != "complete" and status != "errored":
            return
        run = self._runs.get(id(ex))
        if run is None or run[1] is None:
            return  # not traced, or not sampled
        # Spans are made in batches (when the run ends, or every _BATCH steps): the
        # span code then runs hot instead of between two steps of the engine.
        run[3].append(rec)
        if len(run[3]) >= _BATCH:
            self._flush(ex, run)

    def _flush(self, ex: Execution, run: tuple[Any, Any, Any, list[dict[str, Any]]]) -> None:
        """Emits the spans of the steps of ``run`` ended so far."""
        if not run[3]:
            return
        if self._fast is not None:
            self._emit(self._build(ex, run))
            return
        steps = run[3][:]
        run[3].clear()
        parent = run[1]
        for rec in steps:
            self._step_spans(ex, parent, rec)

    def _build(self, ex: Execution, run: tuple[Any, Any, Any, list[dict[str, Any]]]) -> list[Any]:
        """The finished SDK spans of the steps of ``run`` ended so far (the fast path)."""
        recs = run[3][:]
        run[3].clear()
        spans: list[Any] = []
        if not recs:
            return spans
        resource, new_id, scope, readable, _ = self._fast  # type: ignore[misc]
        parent = run[1]
        kind, ok, sc, new = self._kind, self._ok, self._SpanContext, tuple.__new__
        tid, flags, state = parent.trace_id, parent.trace_flags, parent.trace_state
        wf, iid = ex.wfe.name, ex.actor.iid
        first = self._first_attempts
        now = None
        add = spans.append
        for rec in recs:
            status, name, count, k = rec["s"], rec["n"], rec["c"], rec["k"]
            t0, t1 = rec.get("t0"), rec.get("t1")
            if not t0:
                t0 = ex.t_start
            if not t1:
                t1 = now = now or ex.now_ms()
            if k == "do" and status == "complete":
                attempts = rec.get("att", ())
                if len(attempts) == 1 and attempts[0][2] is None:
                    # The common case, a step done at its first attempt: two spans.
                    a0, a1 = attempts[0][0], attempts[0][1]
                    ctx = new(sc, (tid, new_id() or 1, False, flags, state, True))
                    ns0, ns1 = t0 * _NS, t1 * _NS
                    add(
                        readable(
                            "step " + name,
                            ctx,
                            parent,
                            resource,
                            {
                                "actorflow.workflow": wf,
                                "actorflow.instance": iid,
                                "actorflow.step": name,
                                "actorflow.step.count": count,
                                "actorflow.step.kind": k,
                                "actorflow.step.status": status,
                                "actorflow.attempts": 1,
                                **(_ran_on(attempts[0]) if len(attempts[0]) > 4 else {}),
                            },
                            (),
                            (),
                            kind,
                            None,
                            ok,
                            ns0,
                            ns1,
                            scope,
                        )
                    )
                    if not first:
                        continue
                    add(
                        readable(
                            "attempt 1",
                            new(sc, (tid, new_id() or 1, False, flags, state, True)),
                            ctx,
                            resource,
                            {
                                "actorflow.workflow": wf,
                                "actorflow.instance": iid,
                                "actorflow.step": name,
                                "actorflow.step.count": count,
                                "actorflow.attempt": 1,
                                **(_ran_on(attempts[0]) if len(attempts[0]) > 4 else {}),
                            },
                            (),
                            (),
                            kind,
                            None,
                            ok,
                            ns0 if a0 == t0 else a0 * _NS,
                            ns1 if a1 == t1 or a1 is None else a1 * _NS,
                            scope,
                        )
                    )
                    continue
            attrs = {
                "actorflow.workflow": wf,
                "actorflow.instance": iid,
                "actorflow.step": name,
                "actorflow.step.count": count,
                "actorflow.step.kind": k,
                "actorflow.step.status": status,
            }
            events: Any = ()
            st = ok
            if k == "do":
                attempts = rec.get("att", ())
                attrs["actorflow.attempts"] = len(attempts)
                if len(attempts) > 1:
                    events = [
                        ("retry", a[1], {"actorflow.attempt": i, "actorflow.retry.delay_ms": a[3]})
                        for i, a in enumerate(attempts, 1)
                        if a[3] is not None
                    ]
                if status == "errored":
                    st, events = self._failed(rec.get("ed"), events, t1)
                # A SpanContext without re-validating ids that come from the generator.
                ctx = new(sc, (tid, new_id() or 1, False, flags, state, True))
                ns0, ns1 = t0 * _NS, t1 * _NS
                add(
                    readable(
                        "step " + name,
                        ctx,
                        parent,
                        resource,
                        attrs,
                        self._events(events) if events else (),
                        (),
                        kind,
                        None,
                        st,
                        ns0,
                        ns1,
                        scope,
                    )
                )
                for i, att in enumerate(attempts, 1):
                    a0, a1, aerr = att[0], att[1], att[2]
                    if a1 is None:
                        a1 = t1
                    st, events = (ok, ()) if aerr is None else self._failed(aerr, (), a1)
                    add(
                        readable(
                            _ATTEMPT[i] if i < len(_ATTEMPT) else f"attempt {i}",
                            new(sc, (tid, new_id() or 1, False, flags, state, True)),
                            ctx,
                            resource,
                            {
                                "actorflow.workflow": wf,
                                "actorflow.instance": iid,
                                "actorflow.step": name,
                                "actorflow.step.count": count,
                                "actorflow.attempt": i,
                                **(_ran_on(att) if len(att) > 4 else {}),
                            },
                            self._events(events) if events else (),
                            (),
                            kind,
                            None,
                            st,
                            ns0 if a0 == t0 else a0 * _NS,
                            ns1 if a1 == t1 else a1 * _NS,
                            scope,
                        )
                    )
            else:
                if k == "wait_for_event":
                    attrs["actorflow.event.type"] = rec.get("ty", "")
                if status == "errored":
                    st, events = self._failed(rec.get("ed"), events, t1)
                add(
                    readable(
                        ("sleep " if k == "sleep" else "wait_for_event ") + name,
                        new(sc, (tid, new_id() or 1, False, flags, state, True)),
                        parent,
                        resource,
                        attrs,
                        self._events(events) if events else (),
                        (),
                        kind,
                        None,
                        st,
                        t0 * _NS,
                        t1 * _NS,
                        scope,
                    )
                )
        return spans

    def _failed(self, error: Mapping[str, str] | None, events: Any, end_ms: int) -> tuple[Any, Any]:
        """The error status and events of a span that ended with ``error``."""
        if error is None:
            return self._ok, events
        return (
            self._Status(self._ERROR, f"{error['name']}: {error['message']}"),
            [
                *events,
                (
                    "exception",
                    end_ms,
                    {"exception.type": error["name"], "exception.message": error["message"]},
                ),
            ],
        )

    def _events(self, events: Any) -> Any:
        event = self._fast[4]  # type: ignore[index]
        return [event(n, a, t * _NS) for n, t, a in events]

    def _emit(self, spans: list[Any]) -> None:
        """Hands finished SDK spans to the provider's span processors, in order.

        The SDK's ``BatchSpanProcessor`` gets them with one queue operation
        instead of one ``on_end`` each (see :func:`_enqueue`); any other
        processor gets an ``on_end`` per span.
        """
        if not spans:
            return
        multi = self._processor
        processors = getattr(multi, "_span_processors", None)
        if type(processors) is not tuple:
            for span in spans:
                multi.on_end(span)
            return
        for processor in processors:
            if type(processor) is self._batch_type and _enqueue(processor, spans):
                continue
            on_end = processor.on_end
            for span in spans:
                on_end(span)

    def _step_spans(self, ex: Execution, parent: Any, rec: dict[str, Any]) -> None:
        status = rec["s"]
        kind = rec["k"]
        wf, iid, name = ex.wfe.name, ex.actor.iid, rec["n"]
        attrs = {
            "actorflow.workflow": wf,
            "actorflow.instance": iid,
            "actorflow.step": name,
            "actorflow.step.count": rec["c"],
            "actorflow.step.kind": kind,
            "actorflow.step.status": status,
        }
        t0, t1 = rec.get("t0") or ex.t_start, rec.get("t1") or ex.now_ms()
        error = rec.get("ed") if status == "errored" else None
        if kind == "do":
            attempts = rec.get("att", ())
            attrs["actorflow.attempts"] = len(attempts)
            events = (
                [
                    ("retry", a[1], {"actorflow.attempt": i + 1, "actorflow.retry.delay_ms": a[3]})
                    for i, a in enumerate(attempts)
                    if a[3] is not None
                ]
                if len(attempts) > 1
                else ()
            )
            step = self._span(parent, "step " + name, attrs, t0, t1, events, error)
            if len(attempts) == 1 and attempts[0][2] is None and not self._first_attempts:
                return
            for i, att in enumerate(attempts, 1):
                a0, a1, aerr = att[0], att[1], att[2]
                self._span(
                    step,
                    f"attempt {i}",
                    {
                        "actorflow.workflow": wf,
                        "actorflow.instance": iid,
                        "actorflow.step": name,
                        "actorflow.step.count": rec["c"],
                        "actorflow.attempt": i,
                        **(_ran_on(att) if len(att) > 4 else {}),
                    },
                    a0,
                    a1 if a1 is not None else t1,
                    (),
                    aerr,
                )
        else:
            if kind == "wait_for_event":
                attrs["actorflow.event.type"] = rec.get("ty", "")
            label = "sleep " if kind == "sleep" else "wait_for_event "
            self._span(parent, label + name, attrs, t0, t1, (), error)

    def _span(
        self,
        parent: Any,
        name: str,
        attributes: dict[str, Any],
        start_ms: int,
        end_ms: int,
        events: Any,
        error: Mapping[str, str] | None,
    ) -> Any:
        """Emits one finished span through the tracer; returns its SpanContext."""
        status = self._ok
        if error is not None:
            status, events = self._failed(error, events, end_ms)
        live = self._tracer.start_span(
            name,
            context=self._trace.set_span_in_context(self._trace.NonRecordingSpan(parent)),
            kind=self._kind,
            attributes=attributes,
            start_time=start_ms * _NS,
        )
        for n, t, a in events:
            live.add_event(n, a, timestamp=t * _NS)
        live.set_status(status)
        live.end(end_time=end_ms * _NS)
        return live.get_span_context()


def _enqueue(processor: Any, spans: list[Any]) -> bool:
    """Queues sampled ``spans`` on an SDK ``BatchSpanProcessor`` as its ``on_end`` would.

    One ``deque.extendleft`` for all the spans, in the order ``on_end``
    would add them, then the same wake-up of its export thread, as its
    ``emit`` does in SDK 1.45. Returns False, doing nothing, when its
    internals are not those (another SDK version), it is shut down, the
    process was forked, or its queue is too full: its own ``on_end`` then
    does what it does in those cases (drops, counts, warns, re-forks).
    """
    # A friend of the SDK's BatchSpanProcessor: it has no public way to queue
    # many spans at once. Each private name is read under AttributeError, and
    # the types are checked, so another SDK version falls back to on_end.
    try:
        bp = processor._batch_processor  # noqa: SLF001 - the SDK's internals (see above)
        queue = bp._queue  # noqa: SLF001 - the SDK's internals (see above)
        if (
            type(queue) is not deque
            or queue.maxlen is None
            or bp._shutdown  # noqa: SLF001 - the SDK's internals (see above)
            or len(queue) + len(spans) > queue.maxlen
            or bp._pid != os.getpid()  # noqa: SLF001 - the SDK's internals (see above)
        ):
            return False
        awaken = bp._worker_awaken  # noqa: SLF001 - the SDK's internals (see above)
        limit = bp._max_export_batch_size  # noqa: SLF001 - the SDK's internals (see above)
    except AttributeError:
        return False
    queue.extendleft(spans)
    if len(queue) >= limit and not awaken.is_set():
        awaken.set()
    return True


def _ran_on(attempt: Any) -> dict[str, str]:
    """The span attributes of where a remote executor ran an attempt (its 5th field)."""
    return {
        f"actorflow.executor.{k}" if k != "executor" else "actorflow.executor": str(v)
        for k, v in attempt[4].items()
    }
