"""An app for the rollback crash test: a saga whose second handler blocks on a file gate.

Each handler appends its name to ``ROLLBACK_JOURNAL`` (opened with O_APPEND)
when it starts, and ``done:<name>`` when it is about to return; ``undo-b``
waits until the file ``ROLLBACK_GATE`` exists.
"""

from __future__ import annotations

import os
import time
from typing import Any

import actorflow as af


def _append(line: str) -> None:
    fd = os.open(os.environ["ROLLBACK_JOURNAL"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.write(fd, (line + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _handler(name: str, gated: bool = False) -> Any:
    def undo() -> None:
        _append(name)
        if gated:
            while not os.path.exists(os.environ["ROLLBACK_GATE"]):
                time.sleep(0.01)
        _append(f"done:{name}")

    return undo


class Saga(af.Workflow):
    """Three steps with rollbacks, then a failure: the chain is c, b (gated), a."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("a", lambda: "A", rollback=_handler("undo-a"))
        step.do("b", lambda: "B", rollback=_handler("undo-b", gated=True))
        step.do("c", lambda: "C", rollback=_handler("undo-c"))
        raise RuntimeError("the saga fails")


def build(data_dir: str) -> af.Runtime:
    """Builds the node's runtime."""
    rt = af.Runtime(data_dir)
    rt.register(Saga, name="saga")
    return rt
