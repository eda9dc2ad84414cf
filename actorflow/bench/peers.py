"""``actorflow bench peers``: a real peer, DBOS Transact, on the same workloads in one session.

DBOS runs in its own virtual environment (``make bench-peers`` creates
``benchmarks/peers/.venv`` with ``dbos`` from PyPI); its script is
``benchmarks/peers/dbos_peer.py``. By default DBOS uses its SQLite system
database and actorflow LMDB. With ``--store postgres`` (a throwaway local
server) or ``--store postgresql://...`` both run on the same PostgreSQL
server, each run on a fresh database, and actorflow on LMDB runs beside them. Each run of each
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
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import actorflow as af
from actorflow.bench.report import format_table
from actorflow.bench.stores import Store, StoreError, fresh_database, open_store, parse_store
from actorflow.bench.workloads import OneStep, TrivialSteps
from actorflow.core.storage import is_database_url

__all__ = [
    "TARGET_POSTGRES_STEPS_RATIO",
    "TARGET_STEPS_RATIO",
    "actorflow_workload",
    "main",
    "peer_workload",
]

TARGET_STEPS_RATIO = 20.0
#: actorflow on PostgreSQL against DBOS on the same server, durable steps/s.
TARGET_POSTGRES_STEPS_RATIO = 5.0
_FIGURE = {"steps": "steps_per_s", "starts": "starts_per_s", "enqueues": "enqueues_per_s"}


def actorflow_workload(
    workload: str, data: Path | str, n: int, workflows: int, steps: int
) -> dict[str, float]:
    """Runs one workload on actorflow (fsync on); returns its figure.

    ``data`` is a directory (removed first) or the URL of an empty PostgreSQL database.
    """
    if not is_database_url(str(data)):
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
    python: str, script: str, workload: str, db: Path | str, n: int, workflows: int, steps: int
) -> dict[str, float]:
    """Runs one workload of the peer script in a fresh process; returns its figures.

    ``db`` is a SQLite file, or the URL of an empty PostgreSQL database.
    """
    cmd = [
        python,
        script,
        workload,
        "--url" if is_database_url(str(db)) else "--db",
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
    workload, data, n, w, s = argv[0], argv[1], int(argv[2]), int(argv[3]), int(argv[4])
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
    p.add_argument(
        "--store",
        default="sqlite",
        help="sqlite (DBOS on SQLite, actorflow on LMDB; the default), postgres (both on a "
        "throwaway local PostgreSQL server, actorflow on LMDB beside them) or a "
        "postgresql://USER@HOST:PORT/DB URL (the same on that server; the role needs CREATEDB)",
    )
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
    try:
        store = None if args.store == "sqlite" else parse_store(args.store)
        if store is not None and store.backend != "postgresql":
            raise StoreError(f"--store {args.store}: give sqlite, postgres or a postgresql:// URL")
        with open_store(store) if store is not None else _no_store() as opened:
            figures, version = _measure(args, opened)
    except StoreError as exc:
        print(f"actorflow bench peers: {exc}", file=sys.stderr)
        return 2
    _report(args, figures, version, on_postgres=store is not None)
    return 0


@contextlib.contextmanager
def _no_store() -> Iterator[None]:
    yield None


def _ours(workload: str, location: str, args: argparse.Namespace) -> float:
    """One actorflow run of ``workload`` in a fresh process; returns its figure."""
    cmd = [
        sys.executable,
        "-m",
        "actorflow.bench",
        "peers",
        "--actorflow-child",
        workload,
        location,
        str(args.n),
        str(args.workflows),
        str(args.steps),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(
            f"actorflow {workload} failed ({done.returncode}):\n{done.stderr[-2000:]}"
        )
    return float(json.loads(lines[-1][len("RESULT ") :])[_FIGURE[workload]])


def _measure(
    args: argparse.Namespace, store: Store | None
) -> tuple[dict[str, dict[str, list[float]]], str]:
    """Every run of every workload, by figure and engine; and DBOS's version.

    Engines alternate within each repeat so that all see the same machine load:
    without a store ``dbos`` (SQLite) and ``actorflow`` (LMDB); with a
    PostgreSQL store ``dbos`` and ``actorflow`` on it, then ``actorflow_lmdb``.
    """
    root = Path(tempfile.mkdtemp(prefix="actorflow-peers-"))
    runs: dict[str, dict[str, list[float]]] = {}
    version = "?"
    try:
        for workload in args.workloads:
            fig = _FIGURE[workload]
            out = runs.setdefault(fig, {})
            for i in range(args.repeat):
                engines = "dbos, actorflow" + (", actorflow on LMDB" if store else "")
                print(
                    f"  {workload} run {i + 1}/{args.repeat}: {engines}",
                    file=sys.stderr,
                    flush=True,
                )
                sizes = (args.n, args.workflows, args.steps)
                if store is None:
                    db = root / f"dbos-{workload}-{i}" / "bench.sqlite"
                    peer = peer_workload(args.peer_python, args.peer_script, workload, db, *sizes)
                    out.setdefault("actorflow", []).append(
                        _ours(workload, str(root / f"af-{workload}-{i}"), args)
                    )
                else:
                    assert store.url is not None
                    with fresh_database(store.url) as url:
                        peer = peer_workload(
                            args.peer_python, args.peer_script, workload, url, *sizes
                        )
                    with fresh_database(store.url) as url:
                        out.setdefault("actorflow", []).append(_ours(workload, url, args))
                    out.setdefault("actorflow_lmdb", []).append(
                        _ours(workload, str(root / f"af-{workload}-{i}"), args)
                    )
                version = str(peer.pop("_version", version))
                out.setdefault("dbos", []).append(peer[fig])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return runs, version


def _report(
    args: argparse.Namespace,
    runs: dict[str, dict[str, list[float]]],
    version: str,
    *,
    on_postgres: bool,
) -> None:
    """Prints the medians and ratios (unless the JSON goes to stdout); writes the JSON if asked."""
    target_ratio = TARGET_POSTGRES_STEPS_RATIO if on_postgres else TARGET_STEPS_RATIO
    if on_postgres:
        header = [
            "figure",
            "actorflow (PostgreSQL)",
            f"dbos {version} (PostgreSQL)",
            "ratio",
            "target",
            "actorflow (LMDB)",
            "LMDB / dbos",
        ]
    else:
        header = ["figure", "actorflow", f"dbos {version} (SQLite)", "ratio", "target"]
    body, doc = [], {}
    for fig, by in runs.items():
        a, d = statistics.median(by["actorflow"]), statistics.median(by["dbos"])
        target = ""
        if fig == "steps_per_s":
            ok = a / d >= target_ratio
            target = f">= {target_ratio:g}x: {'met' if ok else 'MISSED'}"
        row = [fig, f"{a:,.0f}", f"{d:,.0f}", f"{a / d:,.1f}x", target]
        doc[fig] = {
            "actorflow": a,
            "dbos": d,
            "ratio": a / d,
            "actorflow_runs": by["actorflow"],
            "dbos_runs": by["dbos"],
        }
        if on_postgres:
            lm = statistics.median(by["actorflow_lmdb"])
            row += [f"{lm:,.0f}", f"{lm / d:,.1f}x"]
            doc[fig] |= {
                "actorflow_lmdb": lm,
                "lmdb_ratio": lm / d,
                "actorflow_lmdb_runs": by["actorflow_lmdb"],
            }
        body.append(row)
    where = "both on one PostgreSQL server" if on_postgres else "DBOS on SQLite, actorflow on LMDB"
    if args.json != "-":
        print(
            f"actorflow vs DBOS {version}: medians of {args.repeat} runs, fsync on, "
            f"one fresh process per run, {where}; steps: {args.workflows} x {args.steps}, "
            f"starts and enqueues: {args.n:,}"
        )
        print(format_table(header, body))
    if args.json is not None:
        text = json.dumps(
            {
                "dbos_version": version,
                "repeat": args.repeat,
                "system_database": "postgresql" if on_postgres else "sqlite",
                "figures": doc,
            },
            indent=2,
        )
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
