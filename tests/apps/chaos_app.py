"""The chaos test's app: a 10-step workflow whose step bodies journal every run.

Each step body appends ``S iid step attempt nonce`` when it starts and
``E iid step attempt nonce`` when it ends to the journal named by
:data:`JOURNAL_ENV` (one ``write`` on an ``O_APPEND`` file: lines of
concurrent processes never mix), and returns ``{"n": nonce}``. The committed
result (or the committed error of a failed attempt) names the run that
counted, so the journal tells committed runs from re-runs.

A node started with :data:`STALL_ENV` naming a file stalls its heartbeat
thread while that file exists (a slow node: a long pause of that one thread
while the rest of the node serves calls), so other nodes adopt it while it
still answers.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import actorflow as af

JOURNAL_ENV = "ACTORFLOW_CHAOS_JOURNAL"
STALL_ENV = "ACTORFLOW_CHAOS_STALL"
#: The workflow names the app registers ChaosFlow under: the chaos run's
#: workload, and the instances it drives through frozen nodes.
WORKFLOWS = ("chaos", "routed")
STEPS = [f"s{i}" for i in range(1, 11)]
FLAKY = "s3"  # its first attempt fails (after journaling), the retry succeeds


def _journal(line: str) -> None:
    fd = os.open(os.environ[JOURNAL_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def body(iid: str, name: str, work_ms: float) -> Callable[[af.StepContext], Awaitable[Any]]:
    """A step body that journals its start and end around ``work_ms`` of waiting."""

    async def run(ctx: af.StepContext) -> dict[str, str]:
        nonce = f"{os.getpid()}.{uuid.uuid4().hex[:10]}"
        _journal(f"S {iid} {name} {ctx.attempt} {nonce}\n")
        await asyncio.sleep(work_ms / 1000)
        _journal(f"E {iid} {name} {ctx.attempt} {nonce}\n")
        if name == FLAKY and ctx.attempt == 1:
            raise ValueError(f"planned failure {nonce}")
        return {"n": nonce}

    return run


class ChaosFlow(af.Workflow):
    """Ten journaled steps; some instances sleep, some wait for two events.

    Params: ``{"sleep_ms": int, "events": int, "work_ms": float}``, and
    optionally ``"first_ms"``: how long the first step's body takes instead.
    """

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> dict[str, Any]:
        iid, p = event.instance_id, event.payload
        tokens = []
        for i, name in enumerate(STEPS):
            work_ms = p.get("first_ms", p["work_ms"]) if i == 0 else p["work_ms"]
            await step.do(
                name,
                body(iid, name, work_ms),
                retries={"limit": 3, "delay": "50 milliseconds", "backoff": "constant"},
            )
            if i == 2 and p["sleep_ms"]:
                await step.sleep("nap", p["sleep_ms"])
            if i == 5:
                for k in range(p["events"]):
                    ev = await step.wait_for_event(f"go {k}", "go", timeout="1 hour")
                    tokens.append(ev.payload["token"])
        return {"tokens": tokens}


def stall_heartbeats(rt: af.Runtime, flag: str) -> None:
    """Makes the node's heartbeat thread wait while file ``flag`` exists, before each beat."""
    lease = rt.lease
    if lease is None:
        raise ValueError(f"{STALL_ENV} needs a node (a runtime with a node id)")
    beat = lease.beat

    def stalled() -> None:
        while os.path.exists(flag):
            time.sleep(0.01)
        beat()

    # The heartbeat thread calls self.beat(): an attribute of this one object.
    lease.beat = stalled  # type: ignore[method-assign]


def factory(data_dir: str) -> af.Runtime:
    """Builds a node's runtime (the node id and lease come from NodeProcess).

    The node's warnings (the database unreachable and back, adoptions) go to
    its log: actorflow's own logger prints nothing unless the app says where.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    limit = int(os.environ.get("ACTORFLOW_CHAOS_CONCURRENCY", "200"))
    rt = af.Runtime(data_dir, limits=af.Limits(max_concurrent=limit))
    for name in WORKFLOWS:
        rt.register(ChaosFlow, name=name)
    flag = os.environ.get(STALL_ENV)
    if flag:
        stall_heartbeats(rt, flag)
    return rt
