"""``actorflow bench executors``: step bodies in-process, on Ray and on Dask.

On a local cluster of 2 worker processes (Ray: ``num_cpus=2``; Dask: a
LocalCluster of 2 workers of one thread), in the same run:

- a CPU-bound ``step.map`` of ``size`` pure-Python bodies of ~200 ms each:
  in-process they share one GIL, on a cluster they run in parallel;
- the cost of a trivial step, run 20 times in a row: what an executor adds to
  each step (shipping, scheduling, fetching the result).

Ray and Dask are measured when installed (the ``ray`` and ``dask`` extras);
each cluster is started once per run, warmed up (every worker runs a body
before anything is timed), and shut down after. Each figure is the median of
``ROUNDS`` timed rounds.
"""

from __future__ import annotations

import contextlib
import importlib.util
import shutil
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import actorflow as af
from actorflow.bench.progress import Progress
from actorflow.bench.scenarios import Outcome, Scenario

__all__ = ["EXECUTORS", "run_executors"]

BODY_S = 0.2  # seconds of pure-Python work per map body
TRIVIAL = 20  # trivial steps in a row
WORKERS = 2  # worker processes of each cluster
ROUNDS = 3  # timed rounds of each; the median is reported


def spin(n: int) -> int:
    """Pure-Python work: holds the GIL all along."""
    x = 0
    for i in range(n):
        x += i * i
    return x


def calibrate(seconds: float) -> int:
    """The ``spin`` argument that takes about ``seconds`` here."""
    n = 200_000
    while True:
        t = time.perf_counter()
        spin(n)
        dt = time.perf_counter() - t
        if dt > 0.05:
            return max(1, int(n * seconds / dt))
        n *= 2


class CpuMap(af.Workflow):
    """``step.map`` of ``len(items)`` bodies of ``spin(n)``."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        n, k = event.payload["n"], event.payload["k"]
        return step.map("spin", lambda _i: spin(n), range(k))


class Trivial(af.Workflow):
    """``k`` trivial sync steps, one after the other."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        for i in range(event.payload):
            step.do(f"s{i}", lambda: 1)
        return event.payload


@contextlib.contextmanager
def _executor(kind: str) -> Iterator[af.executors.StepExecutor | None]:
    if kind == "inprocess":
        yield None
    elif kind == "ray":
        with af.executors.RayExecutor(num_cpus=WORKERS) as ex:
            yield ex
    else:
        import dask
        from distributed import Client, LocalCluster

        with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
            cluster = LocalCluster(
                n_workers=WORKERS, threads_per_worker=1, processes=True, dashboard_address=":0"
            )
        client = Client(cluster)
        try:
            with af.executors.DaskExecutor(client) as ex:
                yield ex
        finally:
            client.close()
            cluster.close()


def _measure(kind: str, d: Path, n: int, size: int) -> dict[str, float]:
    shutil.rmtree(d, ignore_errors=True)
    with _executor(kind) as ex, af.Runtime(d, executor=ex) as rt:
        cpu, triv = rt.register(CpuMap), rt.register(Trivial)
        # Warm-up: every worker started and running a body (the code shipped,
        # modules imported) before anything is timed.
        cpu.create(params={"n": max(1, n // 20), "k": 2 * WORKERS}).wait(timeout=300)
        triv.create(params=TRIVIAL).wait(timeout=300)
        maps, steps = [], []
        for _ in range(ROUNDS):
            t = time.perf_counter()
            st = cpu.create(params={"n": n, "k": size}).wait(timeout=600)
            maps.append(time.perf_counter() - t)
            if st.status != "complete":
                raise RuntimeError(f"{kind}: the map ended {st.status}: {st.error}")
            t = time.perf_counter()
            triv.create(params=TRIVIAL).wait(timeout=300)
            steps.append((time.perf_counter() - t) * 1000 / TRIVIAL)
    return {f"{kind}_map_s": statistics.median(maps), f"{kind}_step_ms": statistics.median(steps)}


def available() -> list[str]:
    """The executors this environment can measure."""
    kinds = ["inprocess"]
    if importlib.util.find_spec("ray") is not None:
        kinds.append("ray")
    if importlib.util.find_spec("distributed") is not None:
        kinds.append("dask")
    return kinds


def run_executors(root: Path, size: int, progress: Progress, opts: Any) -> Outcome:
    """In-process vs Ray vs Dask: a CPU-bound map of ``size`` bodies, a trivial step."""
    n = calibrate(BODY_S)
    kinds = available()
    figures: dict[str, float] = {"body_s": BODY_S}
    progress.phase(f"{size} x {BODY_S * 1000:.0f} ms bodies on {', '.join(kinds)}", len(kinds))
    for i, kind in enumerate(kinds):
        figures.update(_measure(kind, root / f"executors-{kind}", n, size))
        progress.update(i + 1)
    base_map, base_step = figures["inprocess_map_s"], figures["inprocess_step_ms"]
    for kind in kinds[1:]:
        figures[f"{kind}_speedup"] = base_map / figures[f"{kind}_map_s"]
        figures[f"{kind}_overhead_ms"] = figures[f"{kind}_step_ms"] - base_step
    return Outcome(figures)


EXECUTORS = Scenario(
    "executors",
    run_executors,
    8,
    False,
    "a CPU-bound step.map of N x 200 ms bodies, in-process vs Ray vs Dask "
    "(2 workers); a trivial step's cost on each",
    unit="bodies",
)
