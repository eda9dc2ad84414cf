"""A small app for NodeProcess tests: a workflow with a step, an event wait and a sleep."""

from __future__ import annotations

import os
import time

import actorflow as af


class Greeter(af.Workflow):
    """Greets, waits for an "ok" event, naps, and returns a summary."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> dict[str, object]:
        name = event.payload["name"]
        hello = step.do("hello", lambda: f"hello {name}")
        ok = step.wait_for_event("wait ok", "ok", timeout="1 hour")
        step.sleep("nap", "50 milliseconds")
        return {"hello": hello, "ok": ok.payload, "pid": step.do("pid", os.getpid)}


def slow_body(journal: str) -> object:
    """A step body taking ``SLOW_MS`` ms of this node's environment; journals start and end."""

    def run() -> int:
        with open(journal, "a") as f:
            f.write(f"start {os.getpid()}\n")
        time.sleep(int(os.environ.get("SLOW_MS", "100")) / 1000)
        with open(journal, "a") as f:
            f.write(f"end {os.getpid()}\n")
        return os.getpid()

    return run


class Slow(af.Workflow):
    """One slow step whose result is the pid of the node that ran it."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        pid: int = step.do("slow", slow_body(event.payload["journal"]))
        return pid


class KeyedSlow(af.Workflow):
    """One step of ``SLOW_MS`` ms that journals ``start|end pid key`` (flow-control tests)."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        journal, key = event.payload["journal"], event.payload["key"]

        def body() -> int:
            with open(journal, "a") as f:
                f.write(f"start {os.getpid()} {key}\n")
            time.sleep(int(os.environ.get("SLOW_MS", "100")) / 1000)
            with open(journal, "a") as f:
                f.write(f"end {os.getpid()} {key}\n")
            return os.getpid()

        pid: int = step.do("slow", body)
        return pid


class Counter(af.DurableObject):
    """Counts."""

    def add(self, by: int = 1) -> int:
        n = int(self.ctx.storage.get("n", 0)) + by
        self.ctx.storage.put("n", n)
        return n


def factory(data_dir: str) -> af.Runtime:
    """Builds the node's runtime."""
    cap = int(os.environ.get("KEY_CAP", "1"))
    rt = af.Runtime(
        data_dir, limits=af.Limits(per_workflow={"keyed": {"max_concurrent_per_key": cap}})
    )
    rt.register(Greeter, name="greeter")
    rt.register(Slow, name="slow")
    rt.register(KeyedSlow, name="keyed")
    rt.durable_objects(Counter, name="counter")
    return rt


def broken(data_dir: str) -> af.Runtime:
    """A factory that fails."""
    raise RuntimeError("this factory is broken on purpose")


def slow_commits_factory(data_dir: str) -> af.Runtime:
    """:func:`factory`, with every group commit taking 100 ms longer (a slow disk)."""
    rt = factory(data_dir)
    rt.storage.set_latency(0.1)
    return rt
