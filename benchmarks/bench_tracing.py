"""The cost of OpenTelemetry tracing on step throughput.

Durable steps per second, with tracing off and on, measured in the same
process, alternating the two so that both see the same machine load. With
tracing on, every run, step and attempt is a span handed to a
``BatchSpanProcessor`` (its export thread running, as in production) whose
exporter drops them. History needs no switch: it is synthesized from the
step records every run writes anyway, so "off" already pays for it.

    .venv/bin/python benchmarks/bench_tracing.py [--instances 1000] [--steps 20] [--rounds 5]
        [--workload async|sync] [--no-first-attempt-spans]

prints the median throughput and CPU time per step (every thread of the
process) of each mode, the overheads, and the median of the per-round
ratios (each traced run against the untraced run beside it, which cancels
most load changes between rounds); ``make bench``
runs the pytest-benchmark form, which records the same figures in
``extra_info``: ``test_tracing_overhead_sync_steps`` (``def run`` workflows,
held under 15 %) and ``test_tracing_overhead_trivial_async_steps`` (async
steps that do nothing, the worst case: the engine's own cost per step is
smallest there, so the spans weigh most).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult

import actorflow as af
from actorflow.bench import TrivialSteps
from actorflow.observe import tracing

MAX_OVERHEAD = 0.15


class SyncSteps(af.Workflow):
    """``payload`` trivial steps of a plain ``def run``, the common style."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        total = 0
        for i in range(event.payload):
            total += step.do(f"s{i}", _one)
        return total


def _one() -> int:
    return 1


WORKLOADS: dict[str, type[af.Workflow]] = {"async": TrivialSteps, "sync": SyncSteps}


class CountingExporter(SpanExporter):
    """Drops spans, counting them."""

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def steps_per_s(
    data_dir: Path,
    instances: int,
    steps: int,
    traced: bool,
    workload: str = "async",
    first_attempt_spans: bool = True,
) -> tuple[float, float, int]:
    """Runs ``instances`` x ``steps`` trivial durable steps.

    Returns:
        Steps per second, CPU microseconds per step (every thread of the
        process, span export included) and the spans exported.
    """
    provider = exporter = None
    if traced:
        exporter = CountingExporter()
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=1 << 20))
    with af.Runtime(data_dir) as rt:
        if provider is not None:
            tracing.instrument(rt, provider, first_attempt_spans=first_attempt_spans)
        wf = rt.register(WORKLOADS[workload], name="steps")
        t0, cpu0 = time.perf_counter(), time.process_time()
        insts = wf.create_batch([{"params": steps}] * instances)
        for inst in insts:
            assert inst.wait(timeout=600).output == steps
        elapsed = time.perf_counter() - t0
    spans = 0
    if provider is not None and exporter is not None:
        provider.shutdown()  # flushes the batch processor: its export is counted too
        spans = exporter.spans
    cpu = time.process_time() - cpu0
    n = instances * steps
    return n / elapsed, cpu / n * 1e6, spans


def compare(
    instances: int,
    steps: int,
    rounds: int,
    workload: str = "async",
    first_attempt_spans: bool = True,
) -> dict[str, Any]:
    """Alternates untraced and traced runs; returns the medians and the overhead."""
    off: list[float] = []
    on: list[float] = []
    cpu_off: list[float] = []
    cpu_on: list[float] = []
    spans = 0
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for traced in (False, True) if i % 2 == 0 else (True, False):
                rate, cpu, n = steps_per_s(
                    Path(tmp) / f"r{i}-{traced}",
                    instances,
                    steps,
                    traced,
                    workload,
                    first_attempt_spans,
                )
                (on if traced else off).append(rate)
                (cpu_on if traced else cpu_off).append(cpu)
                spans = max(spans, n)
    m_off, m_on = statistics.median(off), statistics.median(on)
    # Each round's two runs ran back to back: their ratio cancels most of the
    # machine's load changes between rounds.
    paired = statistics.median(1 - b / a for a, b in zip(off, on, strict=True))
    paired_cpu = statistics.median(b / a - 1 for a, b in zip(cpu_off, cpu_on, strict=True))
    return {
        "workload": workload,
        "instances": instances,
        "steps_per_instance": steps,
        "rounds": rounds,
        "untraced_steps_per_s": m_off,
        "traced_steps_per_s": m_on,
        "overhead": 1 - m_on / m_off,
        "untraced_cpu_us_per_step": statistics.median(cpu_off),
        "traced_cpu_us_per_step": statistics.median(cpu_on),
        "cpu_overhead": statistics.median(cpu_on) / statistics.median(cpu_off) - 1,
        "paired_overhead": paired,
        "paired_cpu_overhead": paired_cpu,
        "spans_per_run": spans,
        "untraced_runs": off,
        "traced_runs": on,
        "untraced_cpu_runs": cpu_off,
        "traced_cpu_runs": cpu_on,
    }


def test_tracing_overhead_sync_steps(benchmark: Any) -> None:
    """Plain ``def run`` workflows: tracing must cost under 15 % of step throughput."""
    result = benchmark.pedantic(compare, args=(300, 20, 5, "sync"), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["spans_per_run"] >= 300 * 20 * 2  # a step span and an attempt span per step
    assert result["overhead"] < MAX_OVERHEAD, result


def test_tracing_overhead_trivial_async_steps(benchmark: Any) -> None:
    """The worst case, steps that do nothing: recorded, not held to the 15 % bound."""
    result = benchmark.pedantic(compare, args=(500, 20, 5, "async"), rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    assert result["spans_per_run"] >= 500 * 20 * 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--workload",
        choices=sorted(WORKLOADS),
        default="async",
        help="async: async def run and steps; sync: def run and def steps",
    )
    parser.add_argument(
        "--no-first-attempt-spans",
        dest="first_attempt_spans",
        action="store_false",
        help="trace with first_attempt_spans=False (no 'attempt 1' span "
        "for a step done at its first attempt)",
    )
    args = parser.parse_args(argv)
    r = compare(args.instances, args.steps, args.rounds, args.workload, args.first_attempt_spans)
    print(
        f"{args.instances} instances x {args.steps} {args.workload} steps, median of "
        f"{args.rounds} alternating rounds, fsync on"
        + ("" if args.first_attempt_spans else ", first_attempt_spans=False")
    )
    print(
        f"  tracing off: {r['untraced_steps_per_s']:10,.0f} steps/s  "
        f"{[round(x) for x in r['untraced_runs']]}"
    )
    print(
        f"  tracing on:  {r['traced_steps_per_s']:10,.0f} steps/s  "
        f"{[round(x) for x in r['traced_runs']]}"
    )
    print(f"  overhead:    {r['overhead']:10.1%}  ({r['spans_per_run']:,} spans per traced run)")
    print(
        f"  CPU per step: {r['untraced_cpu_us_per_step']:.1f} us off, "
        f"{r['traced_cpu_us_per_step']:.1f} us on ({r['cpu_overhead']:+.1%})  "
        f"{[round(x, 1) for x in r['untraced_cpu_runs']]} -> "
        f"{[round(x, 1) for x in r['traced_cpu_runs']]}"
    )
    print(
        f"  per round (on vs the off run beside it), median: throughput "
        f"{-r['paired_overhead']:+.1%}, CPU per step {r['paired_cpu_overhead']:+.1%}"
    )
    ok = r["overhead"] < MAX_OVERHEAD and r["cpu_overhead"] < MAX_OVERHEAD
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
