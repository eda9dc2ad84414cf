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

import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from actorflow.engine.execution import Execution

__all__ = ["OTelObserver", "RunObserver", "instrument", "uninstrument"]

#: The field of an instance record holding the creator's W3C traceparent.
TRACEPARENT = "tp"
_NS = 1_000_000  # ms -> ns
_BATCH = 64  # ended steps of a run turned into spans together


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


def instrument(rt: _Instrumentable, provider: Any) -> OTelObserver:
    """Traces the runs of runtime ``rt`` with ``provider`` (an OpenTelemetry TracerProvider).

    Raises:
        ImportError: OpenTelemetry is not installed (``pip install actorflow[otel]``).
    """
    observer = OTelObserver(provider)
    rt._engine.observer = observer
    return observer


def uninstrument(rt: _Instrumentable) -> None:
    """Stops tracing runtime ``rt``; runs in progress end their spans normally."""
    rt._engine.observer = None


class OTelObserver:
    """A :class:`RunObserver` that makes OpenTelemetry spans.

    With the SDK's ``TracerProvider``, step and attempt spans are built as
    finished spans and handed straight to the provider's span processors
    (they are complete when the step ends), which costs a fraction of the
    tracer's ``start_span``/``end``. With any other provider they go
    through its tracer.

    Args:
        provider: The TracerProvider.
    """

    def __init__(self, provider: Any) -> None:
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
        # id(execution) -> (the run's span, or what makes it at the end; its context if
        # sampled, else None; its attributes; its ended steps not turned into spans yet)
        self._runs: dict[int, tuple[Any, Any, dict[str, Any], list[dict[str, Any]]]] = {}
        self._fast: tuple[Any, ...] | None = None
        processor = getattr(provider, "_active_span_processor", None)
        scope = getattr(self._tracer, "_instrumentation_scope", None)
        if processor is not None and scope is not None:
            from opentelemetry.sdk.trace import Event, ReadableSpan

            self._fast = (processor.on_end, provider.resource,
                          provider.id_generator.generate_span_id, scope, ReadableSpan, Event)
            self._new_trace_id = provider.id_generator.generate_trace_id
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
        attrs = {"actorflow.workflow": ex.wfe.name, "actorflow.instance": ex.actor.iid,
                 "actorflow.epoch": ex.actor.epoch}
        parent = self._propagator.extract({"traceparent": tp}) if tp else None
        if self._fast is None:
            span = self._tracer.start_span(name, context=parent, kind=self._kind,
                                           start_time=ex.t_start * _NS, attributes=attrs)
            sc = span.get_span_context()
            self._runs[id(ex)] = (span, sc if sc.trace_flags.sampled else None, attrs, [])
            return
        # The run span is emitted finished when the run ends; its context is made now
        # (with the provider's sampler) so that step spans can point to it.
        parent_sc = self._trace.get_current_span(parent).get_span_context() if parent else None
        if parent_sc is not None and not parent_sc.is_valid:
            parent_sc = None
        trace_id = parent_sc.trace_id if parent_sc is not None else self._new_trace_id()
        decision = self._sampler.should_sample(parent, trace_id, name, self._kind, attrs)
        if not decision.decision.is_sampled():
            self._runs[id(ex)] = (None, None, attrs, [])
            return
        ctx = self._SpanContext(trace_id, self._fast[2](), False, self._sampled,
                                decision.trace_state)
        self._runs[id(ex)] = ((name, parent_sc, ex.t_start), ctx, attrs, [])

    def run_ended(self, ex: Execution, outcome: str, value: Any) -> None:
        run = self._runs.pop(id(ex), None)
        if run is None or (run[0] is None and run[1] is None):
            return
        self._flush(ex, run)
        status = self._ok if outcome == "complete" else self._unset
        events: list[Any] = []
        end = ex.now_ms()
        if outcome == "errored" or outcome == "crashed":
            if isinstance(value, BaseException):
                desc = f"{type(value).__name__}: {value}"
                events.append(("exception", end, {
                    "exception.type": type(value).__name__, "exception.message": str(value),
                    "exception.stacktrace": "".join(traceback.format_exception(value))}))
            else:
                desc = str(value)
            status = self._Status(self._ERROR, desc)
        first, ctx, attrs, _ = run
        if isinstance(first, tuple):  # the SDK's fast path: one finished span
            name, parent_sc, start = first
            on_end, resource, _, scope, readable, event = self._fast  # type: ignore[misc]
            on_end(readable(
                name, ctx, parent_sc, resource, {**attrs, "actorflow.outcome": outcome},
                [event(n, a, t * _NS) for n, t, a in events], (), self._kind, None, status,
                start * _NS, end * _NS, scope))
            return
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
        steps = run[3][:]
        run[3].clear()
        parent = run[1]
        for rec in steps:
            self._step_spans(ex, parent, rec)

    def _step_spans(self, ex: Execution, parent: Any, rec: dict[str, Any]) -> None:
        status = rec["s"]
        kind = rec["k"]
        wf, iid, name = ex.wfe.name, ex.actor.iid, rec["n"]
        attrs = {"actorflow.workflow": wf, "actorflow.instance": iid, "actorflow.step": name,
                 "actorflow.step.count": rec["c"], "actorflow.step.kind": kind,
                 "actorflow.step.status": status}
        t0, t1 = rec.get("t0") or ex.t_start, rec.get("t1") or ex.now_ms()
        error = rec.get("ed") if status == "errored" else None
        if kind == "do":
            attempts = rec.get("att", ())
            attrs["actorflow.attempts"] = len(attempts)
            events = [
                ("retry", a[1], {"actorflow.attempt": i + 1, "actorflow.retry.delay_ms": a[3]})
                for i, a in enumerate(attempts) if a[3] is not None
            ] if len(attempts) > 1 else ()
            step = self._span(parent, "step " + name, attrs, t0, t1, events, error)
            for i, (a0, a1, aerr, _delay) in enumerate(attempts, 1):
                self._span(step, f"attempt {i}", {
                    "actorflow.workflow": wf, "actorflow.instance": iid, "actorflow.step": name,
                    "actorflow.step.count": rec["c"], "actorflow.attempt": i,
                }, a0, a1 if a1 is not None else t1, (), aerr)
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
        """Emits one finished span; returns its SpanContext."""
        status = self._ok
        if error is not None:
            status = self._Status(self._ERROR, f"{error['name']}: {error['message']}")
            events = [*events, ("exception", end_ms, {"exception.type": error["name"],
                                                     "exception.message": error["message"]})]
        if self._fast is not None:
            on_end, resource, new_id, scope, readable, event = self._fast
            # A SpanContext without re-validating ids that come from the generator.
            ctx = tuple.__new__(self._SpanContext, (parent.trace_id, new_id(), False,
                                                    parent.trace_flags, parent.trace_state, True))
            on_end(readable(
                name, ctx, parent, resource, attributes,
                [event(n, a, t * _NS) for n, t, a in events] if events else (),
                (), self._kind, None, status, start_ms * _NS, end_ms * _NS, scope))
            return ctx
        live = self._tracer.start_span(
            name, context=self._trace.set_span_in_context(self._trace.NonRecordingSpan(parent)),
            kind=self._kind, attributes=attributes, start_time=start_ms * _NS)
        for n, t, a in events:
            live.add_event(n, a, timestamp=t * _NS)
        live.set_status(status)
        live.end(end_time=end_ms * _NS)
        return live.get_span_context()
