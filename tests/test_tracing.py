"""OpenTelemetry spans of runs, steps and attempts, checked with the SDK's in-memory exporter."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (
    InMemorySpanExporter,
)
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import StatusCode

import actorflow as af
from actorflow.observe import tracing
from actorflow.testing import FakeClock


class Flaky(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        def charge(ctx: af.StepContext) -> str:
            if ctx.attempt == 1:
                raise RuntimeError("card declined")
            return "charged"

        out = step.do(
            "charge", charge, retries={"limit": 2, "delay": "1 second", "backoff": "constant"}
        )
        step.sleep("cool down", "1 minute")
        try:
            step.do("doomed", self.fail, retries={"limit": 0, "delay": 1})
        except ValueError:
            pass
        return out

    @staticmethod
    def fail() -> None:
        raise ValueError("no luck")


def _run_flaky(rt: af.Runtime, clock: FakeClock, iid: str) -> None:
    """Runs a Flaky instance to its end: a failed attempt, the retry 1 s later, a 1 min sleep."""
    inst = rt.register(Flaky, name="flaky").create(id=iid)
    assert rt.wait_until_idle()
    clock.advance("1 second")  # the retry
    assert rt.wait_until_idle()
    clock.advance("1 minute")  # the sleep
    assert inst.wait(timeout=10).output == "charged"


@pytest.fixture
def traced() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


def _by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def test_run_step_and_attempt_spans(
    tmp_path: Path, clock: FakeClock, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    with af.Runtime(tmp_path / "d", clock=clock, tracer_provider=provider) as rt:
        _run_flaky(rt, clock, "order-1")
    spans = exporter.get_finished_spans()
    runs = _by_name(spans, "workflow.run flaky")
    assert len(runs) == 3  # first run, after the retry delay, after the sleep
    assert [r.attributes["actorflow.outcome"] for r in runs] == [
        "suspended",
        "suspended",
        "complete",
    ]
    run_ids = {r.context.span_id for r in runs}
    create = _by_name(spans, "workflow.create")[0]
    assert {r.parent.span_id for r in runs if r.parent} == {create.context.span_id}
    assert {s.context.trace_id for s in spans} == {create.context.trace_id}

    (step,) = _by_name(spans, "step charge")
    assert step.parent is not None and step.parent.span_id in run_ids
    assert step.attributes["actorflow.workflow"] == "flaky"
    assert step.attributes["actorflow.instance"] == "order-1"
    assert step.attributes["actorflow.step"] == "charge"
    assert step.attributes["actorflow.attempts"] == 2
    assert step.status.status_code == StatusCode.OK
    (retry,) = [e for e in step.events if e.name == "retry"]
    assert retry.attributes["actorflow.retry.delay_ms"] == 1000
    attempts = sorted(
        (
            s
            for s in spans
            if s.name.startswith("attempt") and s.attributes["actorflow.step"] == "charge"
        ),
        key=lambda s: s.attributes["actorflow.attempt"],
    )
    assert [a.attributes["actorflow.attempt"] for a in attempts] == [1, 2]
    assert all(a.parent is not None and a.parent.span_id == step.context.span_id for a in attempts)
    assert attempts[0].status.status_code == StatusCode.ERROR
    (exc,) = attempts[0].events
    assert exc.name == "exception"
    assert exc.attributes["exception.type"] == "RuntimeError"
    assert exc.attributes["exception.message"] == "card declined"
    assert attempts[1].status.status_code == StatusCode.OK
    # Times are the durable ones, from the runtime's clock: the retry waited 1 s.
    assert attempts[1].start_time - attempts[0].end_time == 1_000_000_000
    assert step.start_time <= attempts[0].start_time and attempts[1].end_time <= step.end_time

    (sleep,) = _by_name(spans, "sleep cool down")
    assert sleep.end_time - sleep.start_time == 60_000_000_000
    (doomed,) = _by_name(spans, "step doomed")
    assert doomed.status.status_code == StatusCode.ERROR
    assert doomed.events[0].attributes["exception.type"] == "ValueError"


def test_errored_run_has_an_error_status(
    rt_traced: tuple[af.Runtime, InMemorySpanExporter],
) -> None:
    rt, exporter = rt_traced

    class Boom(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            raise KeyError("missing")

    inst = rt.register(Boom, name="boom").create(id="b")
    assert inst.wait(timeout=10).status == "errored"
    (run,) = _by_name(exporter.get_finished_spans(), "workflow.run boom")
    assert run.status.status_code == StatusCode.ERROR
    assert run.attributes["actorflow.outcome"] == "errored"
    assert [e.name for e in run.events] == ["exception"]


@pytest.fixture
def rt_traced(
    tmp_path: Path, clock: FakeClock, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> Iterator[tuple[af.Runtime, InMemorySpanExporter]]:
    provider, exporter = traced
    rt = af.Runtime(tmp_path / "data", clock=clock)
    tracing.instrument(rt, provider)
    yield rt, exporter
    rt.close()


class Quick(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return step.do("only", lambda: event.payload)


def test_context_propagates_from_the_create_caller(
    tmp_path: Path, clock: FakeClock, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("caller")
    with (
        tracer.start_as_current_span("handle request") as caller,
        af.Runtime(tmp_path / "d", clock=clock, tracer_provider=provider) as rt,
    ):
        assert rt.register(Quick, name="quick").create(id="q", params=7).wait(10).output == 7
    spans = exporter.get_finished_spans()
    trace_id = caller.get_span_context().trace_id
    create = _by_name(spans, "workflow.create")[0]
    assert create.parent is not None and create.parent.span_id == caller.get_span_context().span_id
    for name in ("workflow.run quick", "step only", "attempt 1"):
        assert _by_name(spans, name)[0].context.trace_id == trace_id


def test_trace_context_survives_a_restart(
    tmp_path: Path, clock: FakeClock, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("caller")
    with (
        af.Runtime(tmp_path / "d", clock=clock, tracer_provider=provider) as rt,
        tracer.start_as_current_span("enqueue") as caller,
    ):
        rt.unregistered("quick").create(id="later", params=3)  # runs in the next process
    exporter.clear()
    with af.Runtime(tmp_path / "d", clock=clock, tracer_provider=provider) as rt:
        assert rt.register(Quick, name="quick").get("later").wait(timeout=10).output == 3
    (run,) = _by_name(exporter.get_finished_spans(), "workflow.run quick")
    assert run.context.trace_id == caller.get_span_context().trace_id


def test_unsampled_runs_make_no_step_spans(tmp_path: Path, clock: FakeClock) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ALWAYS_OFF)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    with af.Runtime(tmp_path / "d", clock=clock, tracer_provider=provider) as rt:
        assert rt.register(Quick, name="quick").create(params=1).wait(timeout=10).output == 1
    assert exporter.get_finished_spans() == ()


def test_uninstrument_stops_tracing(
    rt_traced: tuple[af.Runtime, InMemorySpanExporter],
) -> None:
    rt, exporter = rt_traced
    tracing.uninstrument(rt)
    assert rt.register(Quick, name="quick").create(params=1).wait(timeout=10).output == 1
    assert exporter.get_finished_spans() == ()


def test_without_tracing_opentelemetry_is_never_imported(tmp_path: Path) -> None:
    code = (
        "import sys, actorflow as af\n"
        "class Q(af.Workflow):\n"
        "    def run(self, event, step):\n"
        "        return step.do('s', lambda: 1)\n"
        f"with af.Runtime({str(tmp_path / 'd')!r}) as rt:\n"
        "    assert rt.register(Q).create().wait(10).output == 1\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


class _ApiOnly:
    """A provider seen only through the OpenTelemetry API (no SDK internals)."""

    def __init__(self, provider: TracerProvider) -> None:
        self._provider = provider

    def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
        return self._provider.get_tracer(*args, **kwargs)


def test_any_api_provider_gets_the_same_spans(
    tmp_path: Path, clock: FakeClock, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    with af.Runtime(tmp_path / "d", clock=clock, tracer_provider=_ApiOnly(provider)) as rt:
        _run_flaky(rt, clock, "api")
    spans = exporter.get_finished_spans()
    runs = _by_name(spans, "workflow.run flaky")
    assert len(runs) == 3
    (step,) = _by_name(spans, "step charge")
    assert step.parent is not None and step.parent.span_id in {r.context.span_id for r in runs}
    attempts = [
        s
        for s in spans
        if s.name.startswith("attempt") and s.attributes["actorflow.step"] == "charge"
    ]
    assert len(attempts) == 2
    assert all(a.parent is not None and a.parent.span_id == step.context.span_id for a in attempts)
    assert [e.name for e in step.events] == ["retry"]
    (doomed,) = _by_name(spans, "step doomed")
    assert doomed.status.status_code == StatusCode.ERROR


class Long(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        journal = self.env
        for i in range(70):
            step.do(f"s{i}", lambda: None)
        step.do("hold", lambda: journal.block("go"))
        return "done"


def test_a_long_run_emits_its_step_spans_as_it_goes(
    rt_traced: tuple[af.Runtime, InMemorySpanExporter], journal: Any
) -> None:
    rt, exporter = rt_traced
    inst = rt.register(Long, name="long", env=journal).create(id="l")
    deadline = time.monotonic() + 10
    while len(_by_name(exporter.get_finished_spans(), "step s0")) == 0:
        assert time.monotonic() < deadline, "no step span while the run goes on"
        time.sleep(0.01)
    assert inst.status().status == "running"  # blocked in "hold": the run has not ended
    steps = [s for s in exporter.get_finished_spans() if s.name.startswith("step ")]
    assert 64 <= len(steps) < 71
    journal.open_all()
    assert inst.wait(timeout=10).output == "done"
    steps = [s for s in exporter.get_finished_spans() if s.name.startswith("step ")]
    assert len(steps) == 71


def _tree(spans: tuple[ReadableSpan, ...]) -> list[tuple[Any, ...]]:
    """Spans as (name, parent name, attributes, events, status) in emission order."""
    names = {s.context.span_id: s.name for s in spans}
    return [
        (
            s.name,
            names.get(s.parent.span_id) if s.parent else None,
            dict(s.attributes or {}),
            [e.name for e in s.events],
            s.status.status_code,
            s.start_time,
            s.end_time,
        )
        for s in spans
    ]


def test_a_batch_processor_gets_the_same_spans_in_the_same_order(
    tmp_path: Path, clock: FakeClock
) -> None:
    # The SDK's BatchSpanProcessor is fed a run's spans in one go: what it exports
    # is what a SimpleSpanProcessor beside it sees, span for span.
    batched, simple = InMemorySpanExporter(), InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(batched))
    provider.add_span_processor(SimpleSpanProcessor(simple))
    with af.Runtime(tmp_path / "d", clock=clock, tracer_provider=provider) as rt:
        _run_flaky(rt, clock, "b")
    provider.force_flush()
    assert len(simple.get_finished_spans()) == 10  # create, 3 runs, 3 steps, 3 attempts
    assert [s.context.span_id for s in batched.get_finished_spans()] == [
        s.context.span_id for s in simple.get_finished_spans()
    ]
    assert _tree(batched.get_finished_spans()) == _tree(simple.get_finished_spans())
    provider.shutdown()


def test_a_subclassed_batch_processor_gets_every_span_through_on_end(
    tmp_path: Path, clock: FakeClock
) -> None:
    class Filtering(BatchSpanProcessor):
        def on_end(self, span: ReadableSpan) -> None:
            if not span.name.startswith("attempt"):
                super().on_end(span)

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(Filtering(exporter))
    with af.Runtime(tmp_path / "d", clock=clock, tracer_provider=provider) as rt:
        assert rt.register(Quick, name="quick").create(params=1).wait(timeout=10).output == 1
    provider.force_flush()
    assert sorted(s.name for s in exporter.get_finished_spans()) == [
        "step only",
        "workflow.create",
        "workflow.run quick",
    ]
    provider.shutdown()


def test_each_caller_gets_its_own_trace(
    tmp_path: Path, clock: FakeClock, traced: tuple[TracerProvider, InMemorySpanExporter]
) -> None:
    provider, exporter = traced
    tracer = provider.get_tracer("caller")
    callers = {}
    with af.Runtime(tmp_path / "d", clock=clock, tracer_provider=provider) as rt:
        quick = rt.register(Quick, name="quick")
        for who in ("a", "b"):
            with tracer.start_as_current_span(f"request {who}") as span:
                callers[who] = span.get_span_context().trace_id
                insts = (
                    [quick.create(id=who, params=1)]
                    if who == "a"
                    else quick.create_batch([{"id": f"b{i}", "params": 1} for i in range(3)])
                )
            for inst in insts:
                assert inst.wait(timeout=10).output == 1
        assert quick.create(id="none", params=1).wait(timeout=10).output == 1
    runs = {
        s.attributes["actorflow.instance"]: s.context.trace_id
        for s in _by_name(exporter.get_finished_spans(), "workflow.run quick")
    }
    assert runs["a"] == callers["a"]
    assert runs["b0"] == runs["b1"] == runs["b2"] == callers["b"]
    assert runs["none"] not in (callers["a"], callers["b"])


@pytest.mark.parametrize("api_only", [False, True])
def test_first_attempt_spans_can_be_left_out(
    tmp_path: Path,
    clock: FakeClock,
    traced: tuple[TracerProvider, InMemorySpanExporter],
    api_only: bool,
) -> None:
    provider, exporter = traced
    rt = af.Runtime(tmp_path / "d", clock=clock)
    tracing.instrument(rt, _ApiOnly(provider) if api_only else provider, first_attempt_spans=False)
    with rt:
        assert rt.register(Quick, name="quick").create(params=1).wait(timeout=10).output == 1
        _run_flaky(rt, clock, "f")
    spans = exporter.get_finished_spans()
    (only,) = _by_name(spans, "step only")
    assert only.attributes["actorflow.attempts"] == 1
    # Attempts are kept where they say more than their step: a retry, a failure.
    attempts = sorted(
        (s.attributes["actorflow.step"], s.name) for s in spans if s.name.startswith("attempt")
    )
    assert attempts == [("charge", "attempt 1"), ("charge", "attempt 2"), ("doomed", "attempt 1")]
