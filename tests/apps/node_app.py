"""A small app for NodeProcess tests: a workflow with a step, an event wait and a sleep."""

from __future__ import annotations

import os

import actorflow as af


class Greeter(af.Workflow):
    """Greets, waits for an "ok" event, naps, and returns a summary."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> dict[str, object]:
        name = event.payload["name"]
        hello = step.do("hello", lambda: f"hello {name}")
        ok = step.wait_for_event("wait ok", "ok", timeout="1 hour")
        step.sleep("nap", "50 milliseconds")
        return {"hello": hello, "ok": ok.payload, "pid": step.do("pid", os.getpid)}


class Counter(af.DurableObject):
    """Counts."""

    def add(self, by: int = 1) -> int:
        n = int(self.ctx.storage.get("n", 0)) + by
        self.ctx.storage.put("n", n)
        return n


def factory(data_dir: str) -> af.Runtime:
    """Builds the node's runtime."""
    rt = af.Runtime(data_dir)
    rt.register(Greeter, name="greeter")
    rt.durable_objects(Counter, name="counter")
    return rt


def broken(data_dir: str) -> af.Runtime:
    """A factory that fails."""
    raise RuntimeError("this factory is broken on purpose")
