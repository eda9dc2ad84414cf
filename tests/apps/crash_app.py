"""A workflow app for crash tests: every step body appends a line to a journal.

Run as a script it creates instances and works until it is killed:
    python crash_app.py DATA_DIR JOURNAL N
"""

from __future__ import annotations

import os
import sys
import time

import actorflow as af

JOURNAL_ENV = "ACTORFLOW_TEST_JOURNAL"


def journal(iid: str, step: str):
    """Returns a step body that records that it ran, then returns a value."""

    def body() -> str:
        fd = os.open(os.environ[JOURNAL_ENV], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{iid},{step}\n".encode())  # one write on O_APPEND: an atomic line
        finally:
            os.close(fd)
        return f"{iid}:{step}"

    return body


class CrashFlow(af.Workflow):
    """Kinds: plain (5 steps), sleep (a step, a 1 s sleep, more steps), event (waits for "go")."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> list[str]:
        iid, kind = event.instance_id, event.payload["kind"]
        out = [step.do("s1", journal(iid, "s1"))]
        if kind == "sleep":
            step.sleep("nap", "1 second")
        if kind == "event":
            ev = step.wait_for_event("go", "go", timeout="1 hour")
            out.append(ev.payload)
        for name in ("s2", "s3", "s4"):
            out.append(step.do(name, journal(iid, name)))
        return out


def factory(data_dir: str, max_concurrent: int = 10_000) -> af.Runtime:
    rt = af.Runtime(data_dir, limits=af.Limits(max_concurrent=max_concurrent))
    rt.register(CrashFlow, name="crashflow")
    return rt


def kinds(n: int) -> list[dict[str, object]]:
    order = ("plain", "sleep", "event", "plain")
    return [{"id": f"i{k}", "params": {"kind": order[k % len(order)]}} for k in range(n)]


def main() -> None:
    data_dir, journal_path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    os.environ[JOURNAL_ENV] = journal_path
    rt = factory(data_dir, max_concurrent=int(sys.argv[4]) if len(sys.argv) > 4 else 10_000)
    rt.workflow("crashflow").create_batch(kinds(n))
    print("created", flush=True)
    while True:
        time.sleep(1)


if __name__ == "__main__":
    main()
