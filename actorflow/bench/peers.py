"""``actorflow bench peers``: a real peer, DBOS Transact, on the same workloads in one session.

DBOS runs in its own virtual environment (``make bench-peers`` creates
``benchmarks/peers/.venv`` with ``dbos`` from PyPI and uses its SQLite system
database); its script is ``benchmarks/peers/dbos_peer.py``. Each run of each
workload is a fresh process on a fresh database, for DBOS and for actorflow
alike, alternating between the two so that both see the same machine load.
The report shows the median of each figure and actorflow's ratio to DBOS.

Workloads (the same call shapes on both sides):

* ``steps``: W workflows of S trivial durable steps, started together; steps/s.
* ``starts``: N one-step workflows started one call at a time; starts/s until
  every call returned.
* ``enqueues``: N one-step workflows enqueued one call at a time while nothing
  consumes them; enqueues/s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import actorflow as af
from actorflow.bench.report import format_table
from actorflow.bench.workloads import OneStep, TrivialSteps

__all__ = ["TARGET_STEPS_RATIO", "actorflow_workload", "main", "peer_workload"]

TARGET_STEPS_RATIO = 20.0
_FIGURE = {"steps": "steps_per_s", "starts": "starts_per_s", "enqueues": "enqueues_per_s"}


def actorflow_workload(
    workload: str, data: Path, n: int, workflows: int, steps: int
) -> dict[str, float]:
    """Runs one workload on actorflow (fsync on) in a fresh directory; returns its figure."""
    shutil.rmtree(data, ignore_errors=True)
    if workload == "steps":
        with af.Runtime(data) as rt:
            wf = rt.register(TrivialSteps, name="steps")
            t = time.perf_counter()
            insts = [wf.create(params=steps) for _ in range(workflows)]
            for inst in insts:
                inst.wait(timeout=600)
            dt = time.perf_counter() - t
        return {"steps_per_s": workflows * steps / dt, "seconds": dt}
    limits = af.Limits(max_concurrent=1) if workload == "enqueues" else None
    with af.Runtime(data, limits=limits) as rt:
        wf = rt.register(OneStep, name="one")
        t = time.perf_counter()
        insts = [wf.create(params=k) for k in range(n)]
        dt = time.perf_counter() - t
        if workload == "starts":
            for inst in insts:
                inst.wait(timeout=600)
    return {_FIGURE[workload]: n / dt, "seconds": dt}


def peer_workload(
    python: str, script: str, workload: str, db: Path, n: int, workflows: int, steps: int
) -> dict[str, float]:
    """Runs one workload of the peer script in a fresh process; returns its figures."""
    cmd = [
        python,
        script,
        workload,
        "--db",
        str(db),
        "--n",
        str(n),
        "--workflows",
        str(workflows),
        "--steps",
        str(steps),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"peer {workload} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    data = json.loads(lines[-1][len("RESULT ") :])
    return {k: float(v) for k, v in data.items() if isinstance(v, int | float)} | {
        "_version": data.get("version", "?")
    }


def _child(argv: list[str]) -> int:
    """``--actorflow-child WORKLOAD DATA N W S``: one actorflow run in this fresh process."""
    workload, data, n, w, s = argv[0], Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4])
    print("RESULT " + json.dumps(actorflow_workload(workload, data, n, w, s)), flush=True)
    return 0


def main(argv: list[str]) -> int:
    """Runs every workload on both engines and prints the medians and the ratios."""
    if argv[:1] == ["--actorflow-child"]:
        return _child(argv[1:])
    p = argparse.ArgumentParser(prog="actorflow bench peers", description=__doc__.splitlines()[0])
    p.add_argument(
        "--peer-python",
        default="benchmarks/peers/.venv/bin/python",
        help="the interpreter with dbos installed (default %(default)s)",
    )
    p.add_argument("--peer-script", default="benchmarks/peers/dbos_peer.py")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--n", type=int, default=2000, help="starts and enqueues per run")
    p.add_argument("--workflows", type=int, default=500, help="steps: workflows per run")
    p.add_argument("--steps", type=int, default=20, help="steps: steps per workflow")
    p.add_argument("--json", metavar="FILE", default=None, help="write JSON to FILE (- = stdout)")
    p.add_argument("workloads", nargs="*", help=f"any of {list(_FIGURE)} (default all)")
    args = p.parse_args(argv)
    args.workloads = args.workloads or list(_FIGURE)
    if bad := [w for w in args.workloads if w not in _FIGURE]:
        p.error(f"unknown workload(s) {bad}")
    if not Path(args.peer_python).exists() or not Path(args.peer_script).exists():
        print(
            f"actorflow bench peers: {args.peer_python} or {args.peer_script} is missing; "
            "`make bench-peers` creates the peer's environment",
            file=sys.stderr,
        )
        return 2
    root = Path(tempfile.mkdtemp(prefix="actorflow-peers-"))
    ours: dict[str, list[float]] = {}
    theirs: dict[str, list[float]] = {}
    version = "?"
    try:
        for workload in args.workloads:
            fig = _FIGURE[workload]
            for i in range(args.repeat):
                print(
                    f"  {workload} run {i + 1}/{args.repeat}: dbos, actorflow",
                    file=sys.stderr,
                    flush=True,
                )
                peer = peer_workload(
                    args.peer_python,
                    args.peer_script,
                    workload,
                    root / f"dbos-{workload}-{i}" / "bench.sqlite",
                    args.n,
                    args.workflows,
                    args.steps,
                )
                version = str(peer.pop("_version", version))
                theirs.setdefault(fig, []).append(peer[fig])
                cmd = [
                    sys.executable,
                    "-m",
                    "actorflow.bench",
                    "peers",
                    "--actorflow-child",
                    workload,
                    str(root / f"af-{workload}-{i}"),
                    str(args.n),
                    str(args.workflows),
                    str(args.steps),
                ]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True)
                line = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")][-1]
                ours.setdefault(fig, []).append(json.loads(line[len("RESULT ") :])[fig])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    header = ["figure", "actorflow", f"dbos {version} (SQLite)", "ratio", "target"]
    body, doc = [], {}
    for fig in ours:
        a, d = statistics.median(ours[fig]), statistics.median(theirs[fig])
        target = ""
        if fig == "steps_per_s":
            ok = a / d >= TARGET_STEPS_RATIO
            target = f">= {TARGET_STEPS_RATIO:g}x: {'met' if ok else 'MISSED'}"
        body.append([fig, f"{a:,.0f}", f"{d:,.0f}", f"{a / d:,.1f}x", target])
        doc[fig] = {
            "actorflow": a,
            "dbos": d,
            "ratio": a / d,
            "actorflow_runs": ours[fig],
            "dbos_runs": theirs[fig],
        }
    if args.json != "-":
        print(
            f"actorflow vs DBOS {version}: medians of {args.repeat} runs, fsync on, "
            f"one fresh process per run; steps: {args.workflows} x {args.steps}, "
            f"starts and enqueues: {args.n:,}"
        )
        print(format_table(header, body))
    if args.json is not None:
        text = json.dumps(
            {"dbos_version": version, "repeat": args.repeat, "figures": doc}, indent=2
        )
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
    return 0
