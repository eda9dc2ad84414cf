"""Durable Object benchmarks.

Two ways to run it:

* ``pytest benchmarks --benchmark-only`` (``make bench``): pytest-benchmark
  timings of one RPC hop to a live object, one durable increment (a call
  whose result waits for its fsync'd commit), and the commit of a write batch.
* ``python benchmarks/bench_objects.py``: a small table with the throughput of
  pipelined durable calls spread over ``--objects`` objects (median of
  ``--runs`` runs), the latency of a single call, and, for a baseline
  measured in the same run, raw LMDB batched puts and fsync'd commits. With
  ``--objects 1000000`` (or any count of 100,000 or more) every object is
  called once, then evicted, and the table reports the resident memory.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import shutil
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import lmdb

import actorflow as af
from actorflow.bench.workloads import Counter
from actorflow.core.storage import WriteBatch

# -- pytest-benchmark ---------------------------------------------------------------------


def test_rpc_hop(benchmark: Any, runtime: af.Runtime) -> None:
    """A call that writes nothing: the cost of reaching the object and back."""
    stub = runtime.durable_objects(Counter, name="bench").get_by_name("hop")
    stub.ping()
    assert benchmark(stub.ping) == "pong"


def test_durable_increment(benchmark: Any, runtime: af.Runtime) -> None:
    """A call whose result waits for its fsync'd commit (the output gate)."""
    stub = runtime.durable_objects(Counter, name="bench").get_by_name("inc")
    stub.increment()
    assert benchmark(stub.increment) > 1


def test_pipelined_increments_over_1000_objects(benchmark: Any, runtime: af.Runtime) -> None:
    """1,000 futures, one per object, then all results: group commit at work."""
    ns = runtime.durable_objects(Counter, name="bench")
    stubs = [ns.get_by_name(f"o{i}") for i in range(1000)]
    for f in [s.increment.future(0) for s in stubs]:
        f.get(timeout=30)

    def burst() -> int:
        futures = [s.increment.future(1) for s in stubs]
        return sum(f.get(timeout=30) for f in futures)

    assert benchmark.pedantic(burst, rounds=10, warmup_rounds=1) > 0


def test_commit_batch(benchmark: Any, runtime: af.Runtime) -> None:
    """Storage.write of a 100-put batch: one fsync'd group commit."""
    value = b"x" * 100
    batch = WriteBatch()
    for i in range(100):
        batch.put("bench", b"k%03d" % i, value)
    benchmark(runtime.storage.write, batch)
    assert runtime.storage.count("bench") == 100


# -- standalone ------------------------------------------------------------------------------


def rss_mib() -> float:
    """The current resident set size in MiB (Linux), else the peak."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_rss_mib()


def peak_rss_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def lmdb_baseline(path: Path, puts: int, batch: int, sync: bool) -> tuple[float, float]:
    """Raw LMDB: puts/s in transactions of ``batch`` puts, and one commit's p50 in ms."""
    env = lmdb.open(str(path), map_size=1 << 30, sync=sync, metasync=sync, max_dbs=2)
    db = env.open_db(b"raw")
    try:
        t0 = time.perf_counter()
        for j in range(0, puts, batch):
            with env.begin(write=True, db=db) as txn:
                for i in range(j, min(puts, j + batch)):
                    txn.put(b"obj%04d\x00n" % (i % 1000), struct.pack(">q", i))
        rate = puts / (time.perf_counter() - t0)
        lat = []
        for i in range(200):
            t = time.perf_counter()
            with env.begin(write=True, db=db) as txn:
                txn.put(b"single%03d" % i, b"v")
            lat.append(time.perf_counter() - t)
        return rate, statistics.median(lat) * 1000
    finally:
        env.close()


def pump(stubs: list[Any], calls: int, window: int) -> None:
    """Sends ``calls`` increments round-robin over ``stubs``, ``window`` in flight."""
    inflight: deque[Any] = deque()
    n = len(stubs)
    for i in range(calls):
        if len(inflight) >= window:
            inflight.popleft().get(timeout=60)
        inflight.append(stubs[i % n].increment.future(1))
    for f in inflight:
        f.get(timeout=60)


def throughput_run(
    path: Path, objects: int, calls: int, window: int, args: argparse.Namespace
) -> dict[str, float]:
    """One run over ``objects`` warm objects; returns calls/s and group-commit stats."""
    with af.Runtime(path, sync=not args.no_sync, pool_size=args.pool_size) as rt:
        ns = rt.durable_objects(Counter, name="bench")
        stubs = [ns.get_by_name(f"o{i}") for i in range(objects)]
        pump(stubs, objects, window)  # activate them all first
        c0, b0 = rt.storage.commits, rt.storage.batches
        t0 = time.perf_counter()
        pump(stubs, calls, window)
        elapsed = time.perf_counter() - t0
        per_txn = (rt.storage.commits - c0) / max(1, rt.storage.batches - b0)
        lat = []
        one = stubs[0]
        for _ in range(1000):
            t = time.perf_counter()
            one.increment(1)
            lat.append(time.perf_counter() - t)
        lat.sort()
    return {
        "rate": calls / elapsed,
        "per_txn": per_txn,
        "p50": lat[len(lat) // 2] * 1000,
        "p99": lat[int(len(lat) * 0.99)] * 1000,
    }


def distinct_run(
    path: Path, objects: int, window: int, args: argparse.Namespace
) -> dict[str, float]:
    """Calls each of ``objects`` objects once, then waits until all are evicted."""
    peak_live = 0
    stop = threading.Event()
    with af.Runtime(
        path, sync=not args.no_sync, pool_size=args.pool_size, idle_timeout=args.idle_timeout
    ) as rt:
        ns = rt.durable_objects(Counter, name="bench")

        def watch() -> None:
            nonlocal peak_live
            while not stop.wait(0.05):
                peak_live = max(peak_live, ns.live_count)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        rss0 = rss_mib()
        t0 = time.perf_counter()
        inflight: deque[Any] = deque()
        for i in range(objects):
            if len(inflight) >= window:
                inflight.popleft().get(timeout=60)
            inflight.append(ns.get(ns.id_from_name(f"u{i}")).increment.future(1))
        for f in inflight:
            f.get(timeout=60)
        elapsed = time.perf_counter() - t0
        rss_loaded = rss_mib()
        deadline = time.monotonic() + 60 + args.idle_timeout
        while ns.live_count and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        watcher.join()
        gc.collect()
        left = ns.live_count
        rss_after = rss_mib()
    return {
        "rate": objects / elapsed,
        "rss0": rss0,
        "rss_loaded": rss_loaded,
        "rss_after": rss_after,
        "peak_rss": peak_rss_mib(),
        "peak_live": float(peak_live),
        "left": float(left),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--objects", type=int, default=1000, help="objects the calls are spread over")
    p.add_argument("--calls", type=int, default=100_000, help="calls per throughput run")
    p.add_argument("--runs", type=int, default=3, help="throughput runs (the median is reported)")
    p.add_argument(
        "--window",
        type=int,
        default=None,
        help="calls in flight at most (default 20,000; 2,000 when each object is called once)",
    )
    p.add_argument("--pool-size", type=int, default=64, help="Runtime(pool_size=...)")
    p.add_argument("--idle-timeout", type=float, default=1.0, help="eviction, distinct mode")
    p.add_argument("--no-sync", action="store_true", help="turn fsync off (not the target)")
    p.add_argument("--data-dir", help="where to put the data (default: a temporary directory)")
    args = p.parse_args(argv)

    base = Path(args.data_dir or tempfile.mkdtemp(prefix="actorflow-bench-"))
    rows: list[tuple[str, str]] = []
    try:
        raw_rate, raw_commit = lmdb_baseline(base / "raw", 100_000, 200, not args.no_sync)
        rows.append(("baseline: raw LMDB puts, 200 per txn", f"{raw_rate:,.0f} puts/s"))
        rows.append(("baseline: raw LMDB 1-put commit p50", f"{raw_commit:.3f} ms"))
        if args.objects >= 100_000:
            r = distinct_run(base / "distinct", args.objects, args.window or 2000, args)
            rows.append(
                (f"{args.objects:,} objects, each called once", f"{r['rate']:,.0f} calls/s")
            )
            rows.append(("  most objects live at once", f"{r['peak_live']:,.0f}"))
            rows.append(
                ("  RSS before / after the calls", f"{r['rss0']:.0f} / {r['rss_loaded']:.0f} MiB")
            )
            rows.append(
                ("  RSS once all evicted", f"{r['rss_after']:.0f} MiB ({r['left']:.0f} live)")
            )
            rows.append(("  peak RSS", f"{r['peak_rss']:.0f} MiB"))
        else:
            runs = []
            for i in range(args.runs):
                path = base / f"run{i}"
                runs.append(
                    throughput_run(path, args.objects, args.calls, args.window or 20_000, args)
                )
                shutil.rmtree(path, ignore_errors=True)
            rates = [r["rate"] for r in runs]
            rows.append(
                (
                    f"durable calls over {args.objects:,} objects",
                    f"{statistics.median(rates):,.0f} calls/s (runs: "
                    + ", ".join(f"{x:,.0f}" for x in rates)
                    + ")",
                )
            )
            rows.append(
                (
                    "  batches per group commit",
                    f"{statistics.median(r['per_txn'] for r in runs):.0f}",
                )
            )
            rows.append(
                ("single call latency p50", f"{statistics.median(r['p50'] for r in runs):.3f} ms")
            )
            rows.append(
                ("single call latency p99", f"{statistics.median(r['p99'] for r in runs):.3f} ms")
            )
    finally:
        if not args.data_dir:
            shutil.rmtree(base, ignore_errors=True)
    width = max(len(k) for k, _ in rows)
    print(
        f"actorflow Durable Objects (fsync {'off' if args.no_sync else 'on'}, "
        f"pool_size={args.pool_size}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]})"
    )
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
