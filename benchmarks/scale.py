"""Scale scenarios against Cloudflare V2's limits, one fresh process each.

    python benchmarks/scale.py concurrency --n 50000   # N running at once (async steps awaiting I/O)
    python benchmarks/scale.py sleepers --n 100000     # N sleeping (60 s), then woken over 10 s
    python benchmarks/scale.py queue --n 2000000       # N queued in one workflow
    python benchmarks/scale.py recovery --n 10000      # SIGKILL with N in flight, then reopen

Each prints one ``RESULT`` line with the figures and the peak RSS of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import actorflow as af
from actorflow.engine.records import load

TESTS = Path(__file__).resolve().parent.parent / "tests"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Io(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        async def io() -> int:
            await asyncio.sleep(5)
            return 1

        return int(await step.do("io", io))


class Sleeper(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        await step.sleep_until("nap", event.payload)
        return 1


class One(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        async def one() -> int:
            return 1

        return int(await step.do("one", one))


def create_many(wf: af.WorkflowBinding, n: int, params: object = None) -> float:
    t = time.perf_counter()
    for k in range(0, n, 20_000):
        wf.create_batch([{"id": f"i{j}", "params": params} for j in range(k, min(n, k + 20_000))])
    return time.perf_counter() - t


def concurrency(data: Path, n: int) -> str:
    with af.Runtime(data, limits=af.Limits(max_concurrent=n)) as rt:
        wf = rt.register(Io, name="io")
        t = time.perf_counter()
        create_many(wf, n)
        peak = 0
        while True:
            peak = max(peak, rt._supervisor.running)
            if rt._supervisor.running == 0 and time.perf_counter() - t > 3:
                break
            time.sleep(0.1)
        done = rt.storage.count("idx", b"io\x00complete\x00")
        return (f"concurrency n={n} peak_running={peak} complete={done} "
                f"seconds={time.perf_counter() - t:.1f} peak_rss_mib={peak_rss_mib():.0f}")


def sleepers(data: Path, n: int, sleep_s: float = 60.0) -> str:
    with af.Runtime(data, limits=af.Limits(max_concurrent=50_000)) as rt:
        wf = rt.register(Sleeper, name="sleeper")
        wake0 = int((rt.clock.now() + sleep_s) * 1000)
        t = time.perf_counter()
        for k in range(0, n, 20_000):  # deadlines spread over 10 s: n/10 wakes per second
            wf.create_batch([{"id": f"i{j}", "params": wake0 + j * 10_000 // n}
                             for j in range(k, min(n, k + 20_000))])
        def settled() -> int:  # asleep (waiting) or already done
            return (rt.storage.count("idx", b"sleeper\x00waiting\x00")
                    + rt.storage.count("idx", b"sleeper\x00complete\x00"))

        while settled() < n:
            time.sleep(0.2)
        asleep_s = time.perf_counter() - t
        rss_asleep = peak_rss_mib()
        while rt.storage.count("idx", b"sleeper\x00complete\x00") < n:
            time.sleep(0.5)
        late = sorted(r["t1"] - r["dl"] for _, v in rt.storage.scan("steps")
                      if (r := load(v))["k"] == "sleep")
        return (f"sleepers n={n} all_asleep_after_s={asleep_s:.1f} rss_asleep_mib={rss_asleep:.0f} "
                f"lateness_p50_ms={late[len(late) // 2]} p99_ms={late[int(len(late) * 0.99)]} "
                f"peak_rss_mib={peak_rss_mib():.0f}")


def queue(data: Path, n: int) -> str:
    with af.Runtime(data, limits=af.Limits(max_concurrent=1, max_queued=n)) as rt:
        wf = rt.register(One, name="one")
        dt = create_many(wf, n)
        return (f"queue n={n} create_s={dt:.1f} per_s={n / dt:.0f} depth={wf._wfe.router.depth()} "
                f"peak_rss_mib={peak_rss_mib():.0f}")


def recovery(data: Path, n: int) -> str:
    sys.path.insert(0, str(TESTS))
    from apps import crash_app

    journal = data.parent / "journal.txt"
    env = dict(os.environ, PYTHONPATH=str(TESTS.parent))
    child = subprocess.Popen([sys.executable, str(TESTS / "apps" / "crash_app.py"), str(data),
                              str(journal), str(n), str(n)], env=env, stdout=subprocess.DEVNULL)

    def lines() -> int:
        return journal.read_text().count("\n") if journal.exists() else 0

    while lines() < n:  # kill once about a quarter of all step bodies have run
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    at_kill = lines()
    os.environ[crash_app.JOURNAL_ENV] = str(journal)
    t0 = time.perf_counter()
    rt = crash_app.factory(str(data))
    t_open = time.perf_counter() - t0
    while lines() == at_kill:
        time.sleep(0.001)
    t_first = time.perf_counter() - t0
    wf = rt.workflow("crashflow")
    for k, item in enumerate(crash_app.kinds(n)):
        if item["params"]["kind"] == "event":  # type: ignore[index]
            wf.get(f"i{k}").send_event("go", "ok")
    for k in range(n):
        assert wf.get(f"i{k}").wait(timeout=600).status == "complete"
    t_all = time.perf_counter() - t0
    rt.close()
    return (f"recovery n={n} bodies_before_kill={at_kill} reopen_s={t_open:.2f} "
            f"first_resumed_step_s={t_first:.2f} all_complete_s={t_all:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scenario", choices=["concurrency", "sleepers", "queue", "recovery"])
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--sleep", type=float, default=60.0, help="sleepers: seconds until the first wake")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="actorflow-scale-"))
    try:
        data = root / "data"
        if args.scenario == "sleepers":
            result = sleepers(data, args.n, args.sleep)
        else:
            result = {"concurrency": concurrency, "queue": queue,
                      "recovery": recovery}[args.scenario](data, args.n)
        print("RESULT", result, flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
