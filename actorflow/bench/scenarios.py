"""The named scenarios behind ``actorflow bench``.

Each scenario takes a fresh data directory, a size (its main count: instances,
calls or samples), a :class:`~actorflow.bench.progress.Progress` and the
:class:`Options`, and returns an :class:`Outcome`: named figures plus, for
latency distributions, the raw samples. Heavy scenarios are run in a fresh
child process each (see :mod:`actorflow.bench.isolate`) so that their memory is
measured cleanly; the parent adds ``peak_rss_mib`` and ``kib_per_instance``.
"""

from __future__ import annotations

import asyncio
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import actorflow as af
from actorflow.bench.physical import physical
from actorflow.bench.progress import Progress
from actorflow.bench.stores import serial_commits
from actorflow.bench.workloads import (
    Counter,
    EventResume,
    Gauge,
    HeldStep,
    HeldStepSync,
    Journaled,
    KeyedStep,
    KeyGauge,
    OneStep,
    Sleeper,
    SleeperSync,
    StampFirst,
    TrivialSteps,
    TrivialStepsSync,
)
from actorflow.workflows.records import INST, STEPS, load

__all__ = [
    "SCENARIOS",
    "Options",
    "Outcome",
    "Scenario",
    "peak_rss_since_exec_mib",
    "percentile",
    "rss_mib",
]

CHUNK = 20_000  # instances per create_batch call in the large scenarios


@dataclass
class Options:
    """Knobs of the scenarios besides their size.

    Attributes:
        hold: ``concurrency``: seconds each step awaits ``asyncio.sleep``.
        wake_rate: ``sleepers``: deadlines are spread so this many wake per second.
        of: ``scaling``: the scenario run at growing sizes.
        drain: ``queue``: also drain the queue to completion.
        sleep_margin: ``sleepers``: seconds from the first creation to the first
            deadline; ``None`` estimates the time to put them all asleep.
        database: The URL of an empty PostgreSQL database for this run (made
            per run by :func:`actorflow.bench.measure`); empty: an LMDB data
            directory under the run's root.
        style: ``steps``, ``concurrency``, ``sleepers``: the workflows' ``run``
            as ``async def`` ("async"), as ``def`` ("sync") or each in turn in
            the same run ("both"); None: both for ``steps``, async for the others.
    """

    hold: float = 2.0
    wake_rate: float = 10_000.0
    of: str = "queue"
    drain: bool = True
    sleep_margin: float | None = None
    database: str = ""
    style: str | None = None

    def styles(self, default: str) -> tuple[str, ...]:
        """The styles a scenario runs, in order (see ``style``)."""
        style = self.style or default
        return ("async", "sync") if style == "both" else (style,)


#: The figures of a sync-style run are those of the async one with this prefix.
SYNC_PREFIX = "sync_"


def _styled(figures: dict[str, dict[str, float]], ratio: str | None) -> dict[str, float]:
    """One run's figures by style, merged; ``sync_vs_async`` is sync's ``ratio`` over async's."""
    out = dict(figures.get("async", {}))
    out.update({SYNC_PREFIX + k: v for k, v in figures.get("sync", {}).items()})
    if ratio and "async" in figures and "sync" in figures and figures["async"][ratio]:
        out["sync_vs_async"] = figures["sync"][ratio] / figures["async"][ratio]
    return out


@dataclass
class Outcome:
    """What one run of a scenario measured."""

    figures: dict[str, float]
    samples: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    """A named scenario.

    Attributes:
        name: Its name on the command line.
        run: ``run(data_dir, size, progress, options) -> Outcome``.
        size: The default size, small enough for a 2-core machine.
        isolated: Run in a fresh child process (memory is part of the result).
        about: One line for ``--help`` and the docs.
        unit: What ``size`` counts.
        time_figure: For ``scaling``: the figure that is the run's duration.
    """

    name: str
    run: Callable[[Path, int, Progress, Options], Outcome]
    size: int
    isolated: bool
    about: str
    unit: str = "instances"
    time_figure: str = ""


# -- helpers --------------------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """The nearest-rank ``q``-th percentile (0 < q <= 100) of ``samples``."""
    if not samples:
        return math.nan
    s = sorted(samples)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def _dist(prefix: str, samples: list[float]) -> dict[str, float]:
    return {f"{prefix}_p{q}_ms": percentile(samples, q) for q in (50, 90, 99)}


def rss_mib() -> float:
    """This process's resident set size now, in MiB (Linux), else its peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_rss_since_exec_mib() -> float | None:
    """This process's peak RSS in MiB (``VmHWM``, Linux), counted from its ``exec``.

    ``getrusage``'s ``ru_maxrss`` would also count the parent's pages at the
    ``fork`` that started this process; the high-water mark of this
    process's own address space does not.
    """
    kib = _proc_field("/proc/self/status", "VmHWM")
    return None if kib is None else kib / 1024


def _proc_field(path: str, name: str) -> int | None:
    """The number after ``name:`` in a ``/proc`` file (Linux), else None."""
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key == name:
                    return int(rest.split()[0])
    except OSError:
        pass
    return None


def rss_parts_mib(prefix: str) -> dict[str, float]:
    """This process's resident memory now, split: anonymous (the heap) and file-backed.

    File-backed pages are mostly LMDB's memory map of the data file: the
    kernel can drop them under pressure and they are shared with the page
    cache. Returns ``{prefix_anon_mib, prefix_file_mib}`` (empty off Linux).
    """
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    out[f"{prefix}_{key[3:].lower()}_mib"] = int(rest.split()[0]) / 1024
    except OSError:
        pass
    return out


def _disk_mib(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _fresh(root: Path, name: str) -> Path:
    d = root / name
    shutil.rmtree(d, ignore_errors=True)
    return d


def _location(root: Path, name: str, opts: Options) -> str | Path:
    """Where a run keeps its state: the run's empty database if it has one, else a new directory."""
    return opts.database or _fresh(root, name)


def _count(rt: af.Runtime, wf: str, status: str) -> int:
    """Instances of ``wf`` in ``status``, from the counts the runtime maintains.

    The first call scans the status index once; later ones are O(1). Counting
    the index's keys on every poll instead walks a million keys in Python
    every two seconds at the largest sizes, taking the GIL from the engine
    being measured.
    """
    wm = rt.metrics().workflows.get(wf)
    return wm.counts.get(status, 0) if wm is not None else 0


def _create_all(
    wf: af.WorkflowBinding, items: Iterator[dict[str, Any]], n: int, progress: Progress
) -> float:
    """Creates ``n`` instances in batches of :data:`CHUNK`; returns the seconds it took."""
    t = time.perf_counter()
    batch: list[dict[str, Any]] = []
    done = 0
    for item in items:
        batch.append(item)
        if len(batch) == CHUNK:
            wf.create_batch(batch)
            done += len(batch)
            batch = []
            progress.update(done)
    if batch:
        wf.create_batch(batch)
        progress.update(n)
    return time.perf_counter() - t


def _poll(until: Callable[[], int], n: int, progress: Progress, timeout: float) -> float:
    """Polls ``until()`` (a count) until it reaches ``n``; returns the seconds waited.

    The polling interval grows with ``n`` so that counting does not steal much
    of the engine's time.
    """
    t = time.perf_counter()
    every = min(2.0, max(0.02, n / 500_000))
    while (done := until()) < n:
        progress.update(done)
        if time.perf_counter() - t > timeout:
            raise TimeoutError(f"only {done:,} of {n:,} after {timeout:.0f} s")
        time.sleep(every)
    progress.update(n)
    return time.perf_counter() - t


# -- in-process scenarios --------------------------------------------------------------------


def run_physical(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """The machine's baselines: fsync'd commits, a bare call, a thread handoff, threaded calls."""
    if opts.database:
        progress.phase("serial commits", 0)
        return Outcome(serial_commits(opts.database))
    progress.phase("fsync, call, handoff", 0)
    return Outcome(physical(root))


def run_create(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """``create_batch`` of ``size``, then ``size // 4`` ``create()`` calls from 16 threads."""
    limits = af.Limits(max_concurrent=1, max_queued=max(2_000_000, size))  # ingestion only
    with af.Runtime(_location(root, "create", opts), limits=limits) as rt:
        wf = rt.register(TrivialSteps, name="steps")
        progress.phase("create_batch", size)
        dt = _create_all(wf, ({"params": 0} for _ in range(size)), size, progress)
        batch_rate = size / dt
        threads = 16
        per = max(1, size // 4 // threads)
        progress.phase("create() x 16 threads", per * threads)
        done = [0] * threads

        def worker(k: int) -> None:
            for i in range(per):
                wf.create(params=0)
                done[k] = i + 1

        ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
        st = rt.storage
        # Storage counts group commits as ``batches`` and write batches as ``commits``.
        groups0, batches0 = st.batches, st.commits
        written0 = _proc_field("/proc/self/io", "wchar")  # bytes passed to write calls
        t = time.perf_counter()
        for th in ts:
            th.start()
        while any(th.is_alive() for th in ts):
            progress.update(sum(done))
            ts[0].join(0.05)
        for th in ts:
            th.join()
        single_rate = per * threads / (time.perf_counter() - t)
        written = _proc_field("/proc/self/io", "wchar")
        groups = max(1, st.batches - groups0)
        figures = {
            "create_batch_per_s": batch_rate,
            "create_16_threads_per_s": single_rate,
            # write batches per group commit: creations, and the engine's own writes
            "create_16_threads_batches_per_commit": (st.commits - batches0) / groups,
        }
        if written0 is not None and written is not None and not opts.database:
            figures["create_16_threads_pages_per_commit"] = (written - written0) / 4096 / groups
        coros = 1000
        progress.phase(f"create_async() x {coros} coroutines", per * threads)
        figures["create_async_1000_per_s"] = asyncio.run(
            _create_async_rate(wf, coros, per * threads, progress)
        )
    return Outcome(figures)


async def _create_async_rate(
    wf: af.WorkflowBinding, coros: int, total: int, progress: Progress
) -> float:
    """Creations per second from ``coros`` coroutines sharing ``total`` ``create_async`` calls."""
    done = [0]

    async def worker(n: int) -> None:
        for _ in range(n):
            await wf.create_async(params=0)
            done[0] += 1
            if done[0] % 500 == 0:
                progress.update(done[0])

    shares = [total // coros + (1 if k < total % coros else 0) for k in range(coros)]
    t = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in shares if n))
    return total / (time.perf_counter() - t)


def run_steps(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """``size`` instances of 20 trivial steps, created in one batch, until all complete.

    Async style: ``async def run`` with async bodies; sync style: ``def run``
    with plain function bodies, each in a data directory of its own (on
    PostgreSQL, the run's database, under another workflow name).
    """
    per = 20
    figures = {}
    for style in opts.styles("both"):
        cls = TrivialSteps if style == "async" else TrivialStepsSync
        where = "steps" if style == "async" else "steps-sync"
        with af.Runtime(_location(root, where, opts)) as rt:
            wf = rt.register(cls, name="steps" if style == "async" else "steps_sync")
            progress.phase(f"{size:,} x {per} steps, {style} run", size)
            t = time.perf_counter()
            insts = wf.create_batch([{"params": per} for _ in range(size)])
            for i, inst in enumerate(insts):
                inst.wait(timeout=600)
                progress.update(i + 1)
            dt = time.perf_counter() - t
        figures[style] = {"steps_per_s": size * per / dt, "seconds": dt}
    return Outcome(_styled(figures, "steps_per_s"))


def run_latency(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """``size`` samples each: create to first step, event to resume, timer lateness."""
    with af.Runtime(_location(root, "latency", opts)) as rt:
        first = rt.register(StampFirst, name="first")
        progress.phase("create -> first step", size)
        create_ms = []
        for i in range(size):
            t = time.perf_counter()
            started = first.create().wait(timeout=30).output
            create_ms.append((started - t) * 1000)
            progress.update(i + 1)

        waiter = rt.register(EventResume, name="waiter")
        insts = waiter.create_batch([{} for _ in range(size)])
        progress.phase("waiting for events", size)
        _poll(lambda: _count(rt, "waiter", "waiting"), size, progress, 120)
        progress.phase("event -> resume", size)
        event_ms = []
        for i, inst in enumerate(insts):
            t = time.perf_counter()
            inst.send_event("go")
            resumed = inst.wait(timeout=30).output
            event_ms.append((resumed - t) * 1000)
            progress.update(i + 1)

        sleeper = rt.register(Sleeper, name="sleeper")
        start = int(rt.clock.now() * 1000) + 1000  # one wake every 5 ms from 1 s on
        sleepers = sleeper.create_batch([{"params": start + 5 * i} for i in range(size)])
        progress.phase("timers", size)
        timer_ms = []
        for i, inst in enumerate(sleepers):
            inst.wait(timeout=60)
            progress.update(i + 1)
            for s in inst.steps():
                if s.kind == "sleep" and s.end and s.deadline:
                    timer_ms.append((s.end - s.deadline).total_seconds() * 1000)
    figures = {
        **_dist("create_to_first_step", create_ms),
        **_dist("event_to_resume", event_ms),
        **_dist("timer_lateness", timer_ms),
    }
    samples = {
        "create_to_first_step_ms": create_ms,
        "event_to_resume_ms": event_ms,
        "timer_lateness_ms": timer_ms,
    }
    return Outcome(figures, samples)


def run_objects(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """``size`` durable increments pipelined over 1,000 objects; then one call at a time."""
    n_objects = min(1000, size)
    with af.Runtime(_location(root, "objects", opts)) as rt:
        ns = rt.durable_objects(Counter, name="counter")
        stubs = [ns.get_by_name(f"c{i}") for i in range(n_objects)]
        for f in [s.increment.future(0) for s in stubs]:
            f.get(timeout=60)  # activate every object first
        progress.phase("pipelined calls", size)
        t = time.perf_counter()
        futs = [stubs[i % n_objects].increment.future(1) for i in range(size)]
        for i, f in enumerate(futs):
            f.get(timeout=60)
            if i % 1000 == 0:
                progress.update(i)
        rate = size / (time.perf_counter() - t)
        progress.phase("one call at a time", 400)
        one = stubs[0]
        calls, hops = [], []
        for i in range(200):
            t = time.perf_counter()
            one.increment(1)
            calls.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            one.ping()
            hops.append((time.perf_counter() - t) * 1e6)
            progress.update(2 * i + 2)
    return Outcome(
        {
            "do_calls_per_s": rate,
            "do_single_call_ms": percentile(calls, 50),
            "do_rpc_hop_us": percentile(hops, 50),
        }
    )


# -- isolated scenarios (one child process each) ----------------------------------------------


def run_concurrency(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """``size`` instances running at once, each step awaiting ``asyncio.sleep(hold)``."""
    figures = {
        style: _concurrency_once(root, size, progress, opts, style)
        for style in opts.styles("async")
    }
    return Outcome(_styled(figures, "instances_per_s"))


def _concurrency_once(
    root: Path, size: int, progress: Progress, opts: Options, style: str
) -> dict[str, float]:
    gauge = Gauge()
    limits = af.Limits(max_concurrent=size, max_queued=max(2_000_000, size))
    with af.Runtime(_fresh(root, f"concurrency-{style}"), limits=limits) as rt:
        cls = HeldStep if style == "async" else HeldStepSync
        wf = rt.register(cls, name="held", env=gauge)
        rss0 = rss_mib()
        progress.phase("creating", size)
        t = time.perf_counter()
        _create_all(wf, ({"params": opts.hold} for _ in range(size)), size, progress)
        progress.phase("running at once", size)
        # All of them at once, unless the first finished before the last started.
        _poll(lambda: gauge.peak if gauge.done == 0 else size, size, progress, 600 + opts.hold)
        all_running_s = time.perf_counter() - t
        running_mem = rss_parts_mib("rss_running")
        progress.phase("complete", size)
        _poll(lambda: _count(rt, "held", "complete"), size, progress, 600 + opts.hold)
        dt = time.perf_counter() - t
    return {
        "n": float(size),
        "peak_running": float(gauge.peak),
        "all_running_s": all_running_s,
        "all_complete_s": dt,
        "instances_per_s": size / dt,
        "rss_start_mib": rss0,
        **running_mem,
    }


def _sleep_lateness(rt: af.Runtime) -> tuple[list[float], float]:
    """Lateness in ms (resumed minus deadline) of every completed sleep in the store,
    and the rate at which they were woken (per second, first deadline to last wake)."""
    out = []
    first_dl = last_t1 = None
    for _, v in rt.storage.scan(STEPS):
        r = load(v)
        if r.get("k") == "sleep" and "t1" in r:
            out.append(float(r["t1"] - r["dl"]))
            first_dl = r["dl"] if first_dl is None else min(first_dl, r["dl"])
            last_t1 = r["t1"] if last_t1 is None else max(last_t1, r["t1"])
    if first_dl is None or last_t1 is None:
        return out, 0.0
    return out, len(out) / max(0.001, (last_t1 - first_dl) / 1000)


def run_sleepers(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """``size`` sleeping instances, then woken at ``wake_rate`` per second."""
    figures: dict[str, dict[str, float]] = {}
    samples: dict[str, list[float]] = {}
    for style in opts.styles("async"):
        out = _sleepers_once(root, size, progress, opts, style)
        figures[style] = out.figures
        prefix = "" if style == "async" else SYNC_PREFIX
        samples.update({prefix + k: v for k, v in out.samples.items()})
    return Outcome(_styled(figures, "woken_per_s"), samples)


def _sleepers_once(root: Path, size: int, progress: Progress, opts: Options, style: str) -> Outcome:
    limits = af.Limits(max_queued=max(2_000_000, size))
    with af.Runtime(_fresh(root, f"sleepers-{style}"), limits=limits) as rt:
        wf = rt.register(Sleeper if style == "async" else SleeperSync, name="sleeper")
        rt.metrics()  # seeds the status counts (see _count) while the index is empty
        rss0 = rss_mib()
        # Time to put them all asleep, estimated generously: the first wake comes after it.
        margin = opts.sleep_margin if opts.sleep_margin is not None else 5.0 + size / 1_000
        first_wake = int((rt.clock.now() + margin) * 1000)
        step_ms = 1000.0 / opts.wake_rate
        items = ({"params": first_wake + int(j * step_ms)} for j in range(size))
        progress.phase("creating", size)
        t = time.perf_counter()
        _create_all(wf, items, size, progress)
        progress.phase("falling asleep", size)

        def settled() -> int:  # asleep or already woken and done
            return _count(rt, "sleeper", "waiting") + _count(rt, "sleeper", "complete")

        _poll(settled, size, progress, 3600)
        asleep_s = time.perf_counter() - t
        before_first_wake = rt.clock.now() * 1000 < first_wake
        rss_asleep = rss_mib()
        asleep_mem = rss_parts_mib("rss_asleep")
        db_asleep = _disk_mib(Path(rt.data_dir))
        progress.phase("waking", size)
        _poll(lambda: _count(rt, "sleeper", "complete"), size, progress, 3600 + margin)
        late, woken_per_s = _sleep_lateness(rt)
    figures = {
        "n": float(size),
        "asleep_s": asleep_s,
        "all_asleep_before_first_wake": float(before_first_wake),
        "rss_start_mib": rss0,
        "rss_asleep_mib": rss_asleep,
        **asleep_mem,
        "data_file_mib": db_asleep,
        "wake_rate_per_s": opts.wake_rate,
        "woken_per_s": woken_per_s,
        **_dist("wake_lateness", late),
    }
    return Outcome(figures, {"wake_lateness_ms": late})


def run_queue(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """``size`` instances queued in one workflow (one runs at a time), then drained."""
    data = _fresh(root, "queue")
    limits = af.Limits(max_concurrent=1, max_queued=max(2_000_000, size))
    with af.Runtime(data, limits=limits) as rt:
        wf = rt.register(OneStep, name="one")
        rt.metrics()  # seeds the status counts (see _count) while the index is empty
        rss0 = rss_mib()
        progress.phase("enqueueing", size)
        dt = _create_all(wf, ({} for _ in range(size)), size, progress)
        rss_queued = rss_mib()
        queued_mem = rss_parts_mib("rss_queued")
        # The high-water mark so far: while enqueueing, before the drain (whose
        # completed instances' records and history grow the data file) begins.
        peak_queued = peak_rss_since_exec_mib()
        queued = _count(rt, "one", "queued")
        db_queued = _disk_mib(data)
    figures = {
        "n": float(size),
        "enqueue_s": dt,
        "enqueues_per_s": size / dt,
        "queued": float(queued),
        "rss_start_mib": rss0,
        "rss_queued_mib": rss_queued,
        **queued_mem,
        "peak_rss_queued_mib": peak_queued if peak_queued is not None else rss_queued,
        "data_file_mib": db_queued,
    }
    if opts.drain:
        with af.Runtime(data, limits=af.Limits(max_queued=max(2_000_000, size))) as rt:
            t = time.perf_counter()
            rt.register(OneStep, name="one")
            progress.phase("draining", size)
            _poll(lambda: _count(rt, "one", "complete"), size, progress, 7200)
            drain = time.perf_counter() - t
        figures["drain_s"] = drain
        figures["drained_per_s"] = size / drain
    return Outcome(figures)


#: ``keys``: the keys the instances share, the share of the hot one, its cap,
#: the instances running at once and the milliseconds of each step.
KEYS, HOT_SHARE, PER_KEY, KEYS_CONCURRENT, KEYS_STEP_MS = 100, 0.5, 2, 50, 3


def _keyed_run(
    root: Path, name: str, size: int, per_key: int | None, progress: Progress, opts: Options
) -> dict[str, float]:
    """One run of the ``keys`` workload; its figures prefixed by ``name``."""
    hot_n = int(size * HOT_SHARE)
    gauge = KeyGauge(size - hot_n)
    limits = af.Limits(max_concurrent=KEYS_CONCURRENT, max_concurrent_per_key=per_key)
    items = []
    # The hot key's instances spread through the queue, the others round-robin
    # over the cold keys: every cold instance has hot ones queued before it.
    step = size / max(1, hot_n)
    hot_at = {int(i * step) for i in range(hot_n)}
    cold = 0
    for n in range(size):
        hot = n in hot_at
        key = "hot" if hot else f"k{cold % (KEYS - 1)}"
        cold += 0 if hot else 1
        items.append({"params": {"hot": hot, "ms": KEYS_STEP_MS}, "key": key})
    data = _fresh(root, f"keys-{name}")
    with af.Runtime(data, limits=limits) as rt:
        wf = rt.register(KeyedStep, name="keyed", env=gauge)
        rt.metrics()  # seeds the status counts (see _count)
        progress.phase(f"{name}: creating", size)
        t = time.perf_counter()
        _create_all(wf, iter(items), size, progress)
        progress.phase(f"{name}: running", size)
        _poll(lambda: _count(rt, "keyed", "complete"), size, progress, 3600)
        total = time.perf_counter() - t
        waits: dict[bool, list[float]] = {True: [], False: []}
        for _, raw in rt.storage.scan(INST):
            rec = load(raw)
            waits[rec.get("ky") == "hot"].append(float(rec["started"] - rec["created"]))
    return {
        f"{name}_cold_wait_p50_ms": percentile(waits[False], 50),
        f"{name}_cold_wait_p90_ms": percentile(waits[False], 90),
        f"{name}_hot_wait_p50_ms": percentile(waits[True], 50),
        f"{name}_cold_done_s": gauge.t_cold_done - t,
        f"{name}_hot_started_when_cold_done": float(gauge.hot_started_when_cold_done),
        f"{name}_all_complete_s": total,
    }


def run_keys(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """``size`` queued over 100 keys, half on one hot key; with and without a per-key cap."""
    figures = {"n": float(size), "hot": float(int(size * HOT_SHARE))}
    figures |= _keyed_run(root, "capped", size, PER_KEY, progress, opts)
    figures |= _keyed_run(root, "uncapped", size, None, progress, opts)
    return Outcome(figures)


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    except FileNotFoundError:
        return 0


def recovery_worker(data: str, journal: str, n: int) -> None:
    """The process that ``recovery`` kills: creates ``n`` instances and works until killed.

    It also ends if the process that started it is gone, so none is left behind.
    """
    parent = os.getppid()
    rt = af.Runtime(data, limits=af.Limits(max_concurrent=n, max_queued=max(2_000_000, n)))
    wf = rt.register(Journaled, name="journaled", env=journal)
    for k in range(0, n, CHUNK):
        wf.create_batch([{"id": f"i{j}"} for j in range(k, min(n, k + CHUNK))])
    while os.getppid() == parent:
        time.sleep(0.2)
    os._exit(1)


def run_recovery(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """SIGKILL a child process with ``size`` instances in flight, then reopen and finish them."""
    data = _fresh(root, "recovery")
    journal = root / "recovery.journal"
    journal.unlink(missing_ok=True)
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "actorflow.bench.child",
            "recovery-worker",
            str(data),
            str(journal),
            str(size),
        ],
        stdout=subprocess.DEVNULL,
    )
    progress.phase("child working", size)
    try:
        t = time.perf_counter()
        while (done := _lines(journal)) < size:  # about a quarter of all step bodies
            if child.poll() is not None:
                raise RuntimeError(f"the recovery child exited with {child.returncode}")
            if time.perf_counter() - t > 1800:
                raise TimeoutError("the recovery child made no progress")
            progress.update(done)
            time.sleep(0.01)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    at_kill = _lines(journal)
    progress.phase("reopening", 1)
    t0 = time.perf_counter()
    with af.Runtime(data, limits=af.Limits(max_concurrent=size)) as rt:
        rt.register(Journaled, name="journaled", env=str(journal))
        t_open = time.perf_counter() - t0
        # Every body may have run before the kill landed: then none runs again.
        while _lines(journal) == at_kill and at_kill < 4 * size:
            if time.perf_counter() - t0 > 600:
                raise TimeoutError("no step resumed")
            time.sleep(0.001)
        t_first = time.perf_counter() - t0 if _lines(journal) > at_kill else math.nan
        progress.phase("completing", size)
        _poll(lambda: _count(rt, "journaled", "complete"), size, progress, 3600)
        t_all = time.perf_counter() - t0
    total = _lines(journal)
    return Outcome(
        {
            "n": float(size),
            "bodies_before_kill": float(at_kill),
            "reopen_s": t_open,
            "first_resumed_step_s": t_first,
            "all_complete_s": t_all,
            "bodies_run_again": float(total - 4 * size),
        }
    )


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in [
        Scenario(
            "physical",
            run_physical,
            0,
            False,
            "the machine: fsync'd commits/s, a bare call, a thread handoff, "
            "16 threads' durable calls",
            unit="-",
        ),
        Scenario(
            "create",
            run_create,
            20_000,
            False,
            "create_batch of N, then N/4 create() calls from 16 threads",
        ),
        Scenario(
            "steps",
            run_steps,
            1_000,
            False,
            "N instances x 20 trivial async steps, created in one batch",
        ),
        Scenario(
            "latency",
            run_latency,
            200,
            False,
            "create to first step, event to resume, timer lateness: p50/p90/p99",
            unit="samples",
        ),
        Scenario(
            "objects",
            run_objects,
            20_000,
            False,
            "Durable Object increments pipelined over 1,000 objects; single calls",
            unit="calls",
        ),
        Scenario(
            "keys",
            run_keys,
            10_000,
            False,
            "N queued over 100 keys, N/2 on one hot key, 50 running at once, 3 ms steps: "
            "cold keys' wait to start, max_concurrent_per_key=2 vs none",
        ),
        Scenario(
            "concurrency",
            run_concurrency,
            5_000,
            True,
            "N instances running at once, each step awaiting asyncio.sleep(--hold)",
            time_figure="all_running_s",
        ),
        Scenario(
            "sleepers",
            run_sleepers,
            10_000,
            True,
            "N sleeping instances, then woken at --wake-rate per second",
            time_figure="asleep_s",
        ),
        Scenario(
            "queue",
            run_queue,
            50_000,
            True,
            "N queued in one workflow (one running at a time), then drained",
            time_figure="enqueue_s",
        ),
        Scenario(
            "recovery",
            run_recovery,
            1_000,
            True,
            "SIGKILL a child process with N in flight; reopen and finish them",
            time_figure="all_complete_s",
        ),
    ]
}
