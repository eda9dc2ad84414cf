"""Workflows for the executor tests: every body counts its runs in files.

Bodies run in other processes (Ray and Dask workers), so they record what
they did in files under the directory given in the instance's params
(``{"dir": ...}``): one line per run, with the pid that ran it. The module is
pickled by value (``cloudpickle.register_pickle_by_value``), so workers need
not import it.

Run as a script it is a runtime that works until it is killed, its bodies on
the Ray cluster or the Dask scheduler at ADDRESS:
    python executor_app.py DATA_DIR ray|dask ADDRESS WORK_DIR
or, with ``resume`` after those, a runtime that waits for that instance to end
and prints its status as JSON.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import cloudpickle

import actorflow as af

cloudpickle.register_pickle_by_value(sys.modules[__name__])

FAST = {"limit": 2, "delay": 0, "backoff": "constant"}


def mark(d: str, name: str) -> None:
    """Appends one line (this process's pid) to ``d/name``: one atomic write."""
    fd = os.open(os.path.join(d, name), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()}\n".encode())
    finally:
        os.close(fd)


def runs(d: str | Path, name: str) -> int:
    """How many times ``mark(d, name)`` was called."""
    p = Path(d) / name
    return len(p.read_text().splitlines()) if p.exists() else 0


def pids(d: str | Path, name: str) -> list[int]:
    p = Path(d) / name
    return [int(x) for x in p.read_text().split()] if p.exists() else []


def wait_file(d: str, name: str, timeout: float) -> bool:
    """Polls for ``d/name`` (what a test creates to release a body)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(os.path.join(d, name)):
            return True
        time.sleep(0.02)
    return False


def square(d: str, x: int) -> tuple[int, int]:
    mark(d, f"sq{x}")
    return x * x, os.getpid()


class Pipeline(af.Workflow):
    """A step, then a map of ``n`` squares: the results, and the pids that ran them."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        d = event.payload["dir"]

        def first() -> int:
            mark(d, "first")
            return os.getpid()

        pid = step.do("first", first, retries=FAST)
        xs = step.map("sq", lambda x: square(d, x), range(event.payload.get("n", 4)), retries=FAST)
        return pid, xs


class AsyncPipeline(af.Workflow):
    """Pipeline with ``async def run``, and an ``async def`` body."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        d = event.payload["dir"]

        def first() -> int:
            mark(d, "first")
            return os.getpid()

        async def later() -> int:
            await asyncio.sleep(0.01)
            mark(d, "later")
            return os.getpid()

        pid = await step.do("first", first)
        xs = await step.map("sq", lambda x: square(d, x), range(event.payload.get("n", 4)))
        return pid, xs, await step.do("later", later)


class Flaky(af.Workflow):
    """A body that fails its first attempt with ValueError, then returns its attempt."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        d = event.payload["dir"]

        def flaky(ctx: af.StepContext) -> int:
            mark(d, "flaky")
            if ctx.attempt == 1:
                raise ValueError("boom on the first attempt")
            return ctx.attempt

        return step.do("flaky", flaky, retries=FAST)


class Refusing(af.Workflow):
    """A body that raises NonRetryableError: one attempt only."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        d = event.payload["dir"]

        def refuse() -> None:
            mark(d, "refuse")
            raise af.NonRetryableError("no, never")

        return step.do("refuse", refuse, retries=FAST)


class Slow(af.Workflow):
    """A body that outlives its 1 s timeout (until ``d/release`` exists, at most 60 s)."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        d = event.payload["dir"]

        def slow() -> str:
            with open(os.path.join(d, "slow.pid"), "w") as f:
                f.write(str(os.getpid()))
            mark(d, "slow")
            wait_file(d, "release", 60)
            return "late"

        return step.do("slow", slow, timeout="1 second", retries={"limit": 0})


class Victim(af.Workflow):
    """A step, then one whose first attempt waits to be killed (its pid in ``d/victim.pid``)."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        d = event.payload["dir"]

        def before() -> str:
            mark(d, "before")
            return "ok"

        def victim(ctx: af.StepContext) -> int:
            mark(d, "victim")
            if ctx.attempt == 1:
                tmp = os.path.join(d, "victim.pid.tmp")
                with open(tmp, "w") as f:
                    f.write(str(os.getpid()))
                os.replace(tmp, os.path.join(d, "victim.pid"))
                time.sleep(60)  # killed here
            return ctx.attempt

        first = step.do("before", before)
        return first, step.do("victim", victim, retries=FAST)


class Unpicklable(af.Workflow):
    """A body that holds a lock: it cannot travel to a worker."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        lock = threading.Lock()

        def holds_lock() -> bool:
            with lock:
                return True

        return step.do("holds_lock", holds_lock, retries=FAST)


class Resourceful(af.Workflow):
    """A body run with the resources in the params; returns what the worker says it got."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        def assigned() -> Any:
            try:
                import ray

                # Only in a Ray worker (this process may be a Ray driver, or
                # no Ray at all: get_runtime_context would then start one).
                if ray.is_initialized():
                    return ray.get_runtime_context().get_assigned_resources()
                return None
            except Exception:
                return None

        return step.do(
            "r",
            assigned,
            resources=event.payload["resources"],
            retries={"limit": 0},
            timeout=event.payload.get("timeout", "30 seconds"),
        )


class Spread(af.Workflow):
    """A map of ``n`` bodies of ``secs`` seconds each: returns the node id each ran on."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        d, secs = event.payload["dir"], event.payload["secs"]

        def where(i: int) -> str:
            mark(d, f"item{i}")
            import ray

            node = ray.get_runtime_context().get_node_id()
            with open(os.path.join(d, f"node{i}-{os.getpid()}"), "w") as f:
                f.write(node)
            time.sleep(secs)
            mark(d, f"done{i}")
            return node

        return step.map("spread", where, range(event.payload["n"]), retries=FAST)


class Interrupted(af.Workflow):
    """A step, then a map whose items 2 and 3 wait for ``d/release``: the runtime dies meanwhile."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        d = event.payload["dir"]

        def first() -> str:
            mark(d, "first")
            return "first"

        def item(i: int) -> int:
            mark(d, f"item{i}")
            if i >= 2:
                wait_file(d, "release", 60)
            return i

        step.do("first", first)
        return step.map("items", item, range(4), retries=FAST)


WORKFLOWS: list[type[af.Workflow]] = [
    Pipeline,
    AsyncPipeline,
    Flaky,
    Refusing,
    Slow,
    Victim,
    Unpicklable,
    Resourceful,
    Spread,
    Interrupted,
]


def main(data_dir: str, kind: str, address: str, work: str, resume: str = "") -> None:
    """Runs one Interrupted instance on the ``kind`` cluster at ``address`` until killed.

    Writes ``work/committed`` once ``first`` and items 0 and 1 are durable.
    With ``resume``: waits for the instance (resumed by the runtime) to end,
    prints its status and steps as JSON, and returns.
    """
    executor: af.executors.StepExecutor
    if kind == "ray":
        executor = af.executors.RayExecutor(address=address)
    else:
        executor = af.executors.DaskExecutor(address)
    rt = af.Runtime(data_dir, executor=executor)
    wf = rt.register(Interrupted)
    if resume:
        inst = wf.get("crash")
        st = inst.wait(timeout=120)
        steps = {s.name: [a.ran_on for a in s.attempts] for s in inst.steps()}
        print(json.dumps({"status": st.status, "output": st.output, "steps": steps}))
        rt.close()
        return
    inst = wf.create(id="crash", params={"dir": work})
    while True:
        done = {s.name for s in inst.steps() if s.status == "complete"}
        if {"first", "items[0]", "items[1]"} <= done:
            Path(work, "committed").write_text("yes")
        time.sleep(0.05)


if __name__ == "__main__":
    main(*sys.argv[1:6])
