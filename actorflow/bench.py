"""Throughput and latency scenarios behind ``actorflow bench``.

Each scenario runs on a fresh data directory, measures one figure several
times and reports the median. The ``disk`` baseline (fsync'd LMDB commits per
second, one at a time) is measured in the same run, so figures from a shared
machine can be read as ratios to what the hardware allowed at that moment.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lmdb

import actorflow as af

__all__ = ["SCENARIOS", "TrivialSteps", "run_scenarios"]


class TrivialSteps(af.Workflow):
    """``payload`` trivial async steps, each checkpointed."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        async def one() -> int:
            return 1

        total = 0
        for i in range(event.payload):
            total += await step.do(f"s{i}", one)
        return total


class _First(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> float:
        async def stamp() -> float:
            return time.perf_counter()

        return float(await step.do("first", stamp))


class _Counter(af.DurableObject):
    def increment(self, by: int = 1) -> int:
        n: int = self.ctx.storage.get("n", 0) + by
        self.ctx.storage.put("n", n)
        return n


def _fresh(root: Path, name: str) -> Path:
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    return d


def disk(root: Path, n: int = 500) -> dict[str, float]:
    """fsync'd LMDB commits per second, one write per commit: the hardware baseline."""
    d = _fresh(root, "disk")
    env = lmdb.open(str(d), map_size=1 << 28, sync=True)
    t = time.perf_counter()
    for i in range(n):
        with env.begin(write=True) as txn:
            txn.put(b"k%d" % i, b"v")
    dt = time.perf_counter() - t
    env.close()
    return {"fsync_commits_per_s": n / dt}


def steps(root: Path, instances: int = 1000, per: int = 20) -> dict[str, float]:
    """Durable trivial steps per second: ``instances`` x ``per`` async steps, fsync on."""
    with af.Runtime(_fresh(root, "steps")) as rt:
        wf = rt.register(TrivialSteps, name="steps")
        t = time.perf_counter()
        insts = wf.create_batch([{"params": per} for _ in range(instances)])
        for inst in insts:
            inst.wait(timeout=300)
        dt = time.perf_counter() - t
    return {"steps_per_s": instances * per / dt, "seconds": dt}


def create(
    root: Path, batch: int = 20_000, threads: int = 16, single: int = 5_000
) -> dict[str, float]:
    """Durable creations per second: one ``create_batch`` and ``create()`` from many threads."""
    limits = af.Limits(max_concurrent=1)  # measure ingestion, not execution
    with af.Runtime(_fresh(root, "create"), limits=limits) as rt:
        wf = rt.register(TrivialSteps, name="steps")
        t = time.perf_counter()
        wf.create_batch([{"params": 0} for _ in range(batch)])
        batch_rate = batch / (time.perf_counter() - t)
        per = single // threads

        def worker() -> None:
            for _ in range(per):
                wf.create(params=0)

        ts = [threading.Thread(target=worker) for _ in range(threads)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        single_rate = per * threads / (time.perf_counter() - t)
    return {"create_batch_per_s": batch_rate, "create_16_threads_per_s": single_rate}


def latency(root: Path, n: int = 300) -> dict[str, float]:
    """Milliseconds from ``create()`` returning to the first step's body starting."""
    with af.Runtime(_fresh(root, "latency")) as rt:
        wf = rt.register(_First, name="first")
        samples = []
        for _ in range(n):
            t = time.perf_counter()
            inst = wf.create()
            started = inst.wait(timeout=30).output
            samples.append((started - t) * 1000)
    samples.sort()
    return {
        "create_to_first_step_p50_ms": samples[len(samples) // 2],
        "create_to_first_step_p99_ms": samples[int(len(samples) * 0.99) - 1],
    }


def objects(root: Path, objects_n: int = 1000, calls: int = 20_000) -> dict[str, float]:
    """Durable Durable-Object calls per second (counter increments) over many objects."""
    with af.Runtime(_fresh(root, "objects")) as rt:
        ns = rt.durable_objects(_Counter, name="counter")
        stubs = [ns.get_by_name(f"c{i}") for i in range(objects_n)]
        t = time.perf_counter()
        futs = [stubs[i % objects_n].increment.future(1) for i in range(calls)]
        for f in futs:
            f.get()
        rate = calls / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(200):
            stubs[0].increment(1)
        single_ms = (time.perf_counter() - t) / 200 * 1000
    return {"do_calls_per_s": rate, "do_single_call_ms": single_ms}


SCENARIOS: dict[str, Callable[..., dict[str, float]]] = {
    "disk": disk,
    "steps": steps,
    "create": create,
    "latency": latency,
    "objects": objects,
}

#: Cloudflare Workflows V2's published figures, for ``--profile cloudflare-v2``.
CLOUDFLARE_V2 = {"create_batch_per_s": 300.0, "create_16_threads_per_s": 300.0}


def run_scenarios(
    names: list[str],
    repeat: int = 3,
    root: str | None = None,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Runs each scenario ``repeat`` times; returns the median of every figure."""
    base = Path(root or tempfile.mkdtemp(prefix="actorflow-bench-"))
    out: dict[str, dict[str, float]] = {}
    try:
        for name in names:
            runs = []
            for i in range(repeat):
                if progress:
                    progress(f"{name} run {i + 1}/{repeat}")
                runs.append(SCENARIOS[name](base))
            out[name] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    finally:
        if root is None:
            shutil.rmtree(base, ignore_errors=True)
    return out
