"""DBOS Transact (PyPI ``dbos``) on actorflow's peer workloads.

Runs one workload in this process against a fresh SQLite file (``--db``), or a
PostgreSQL system database (``--url``, an empty database the caller made), and
prints one ``RESULT {json}`` line. ``actorflow bench peers`` runs it in DBOS's own
environment (``make bench-peers`` creates ``benchmarks/peers/.venv``), one
fresh process per run, beside the same workloads on actorflow.

    python dbos_peer.py steps --workflows 500 --steps 20 --db /tmp/x/bench.sqlite
    python dbos_peer.py starts --n 2000 --db /tmp/x/bench.sqlite
    python dbos_peer.py enqueues --n 2000 --db /tmp/x/bench.sqlite
    python dbos_peer.py steps --url postgresql://user@127.0.0.1:5432/empty_db

Workloads:
    steps     ``--workflows`` workflows of ``--steps`` trivial steps, started with
              ``DBOS.start_workflow``; durable steps per second until all complete.
    starts    ``--n`` one-step workflows started one call at a time with
              ``DBOS.start_workflow``; starts per second until every call returned.
    enqueues  ``--n`` one-step workflows enqueued one call at a time on a queue that this
              process does not consume (``DBOS.listen_queues([])``); enqueues per second.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from importlib.metadata import version

from dbos import DBOS, DBOSConfig


@DBOS.step()
def trivial_step(i: int) -> int:
    return i


@DBOS.workflow()
def one_step_wf(k: int) -> int:
    return trivial_step(k)


@DBOS.workflow()
def multi_step_wf(n_steps: int) -> int:
    for i in range(n_steps):
        trivial_step(i)
    return n_steps


def launch(db: str | None, url: str | None, consume: bool) -> None:
    if url is None:
        assert db is not None
        for suffix in ("", "-journal", "-wal", "-shm"):
            try:
                os.remove(db + suffix)
            except FileNotFoundError:
                pass
        os.makedirs(os.path.dirname(os.path.abspath(db)), exist_ok=True)
        url = f"sqlite:///{db}"
    config: DBOSConfig = {
        "name": "actorflow-peer",
        "system_database_url": url,
        "log_level": "WARNING",
        "application_version": "peer-v1",
    }
    DBOS(config=config)
    if not consume:
        DBOS.listen_queues([])
    DBOS.launch()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workload", choices=["steps", "starts", "enqueues"])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--db", help="SQLite file (recreated)")
    where.add_argument("--url", help="PostgreSQL system database (an empty one)")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--workflows", type=int, default=500)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--poll", type=float, default=0.05, help="get_result polling interval")
    args = p.parse_args()
    launch(args.db, args.url, consume=args.workload != "enqueues")
    out: dict[str, object] = {
        "peer": "dbos",
        "version": version("dbos"),
        "workload": args.workload,
        "system_database": "sqlite" if args.url is None else "postgresql",
    }
    if args.workload == "steps":
        t = time.perf_counter()
        handles = [DBOS.start_workflow(multi_step_wf, args.steps) for _ in range(args.workflows)]
        for h in handles:
            h.get_result(polling_interval_sec=args.poll)
        dt = time.perf_counter() - t
        out.update(steps_per_s=args.workflows * args.steps / dt, seconds=dt)
    elif args.workload == "starts":
        t = time.perf_counter()
        handles = [DBOS.start_workflow(one_step_wf, k) for k in range(args.n)]
        dt = time.perf_counter() - t
        for h in handles:
            h.get_result(polling_interval_sec=args.poll)
        out.update(starts_per_s=args.n / dt, seconds=dt)
    else:
        q = DBOS.register_queue("peer_q")
        t = time.perf_counter()
        for k in range(args.n):
            q.enqueue(one_step_wf, k)
        dt = time.perf_counter() - t
        out.update(enqueues_per_s=args.n / dt, seconds=dt)
    print("RESULT " + json.dumps(out), flush=True)
    DBOS.destroy()


if __name__ == "__main__":
    main()
