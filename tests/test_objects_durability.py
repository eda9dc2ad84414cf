"""Durability of Durable Object calls across a SIGKILL of the process.

A child process streams calls that each write two keys (a counter and a log
entry) and prints every result it gets. The parent kills it with SIGKILL in
mid-stream, reopens the data directory and checks that every printed result
is on disk and that no call is half-applied.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import actorflow as af

CHILD = Path(__file__).with_name("_do_child.py")
OBJECTS = 40


class Ledger(af.DurableObject):
    """Read side of the child's Ledger (same namespace name, same keys)."""

    def dump(self) -> dict[str, Any]:
        return self.ctx.storage.list()


def run_and_kill(data_dir: Path, results: int) -> list[tuple[int, int, int]]:
    """Runs the child until it has printed ``results`` results, then SIGKILLs it."""
    proc = subprocess.Popen(
        [sys.executable, str(CHILD), str(data_dir), str(OBJECTS)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    seen: list[tuple[int, int, int]] = []
    try:
        deadline = time.monotonic() + 60
        first = proc.stdout.readline()
        assert first == "ready\n", first + (proc.stderr.read() if proc.stderr else "")
        while len(seen) < results and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            obj, n, tok = map(int, line.split())
            seen.append((obj, n, tok))
        os.kill(proc.pid, signal.SIGKILL)
        # Lines written before the kill are results the child received too.
        for line in proc.stdout:
            parts = line.split()
            if len(parts) == 3:  # a line cut short by the kill was never a full result
                seen.append((int(parts[0]), int(parts[1]), int(parts[2])))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        err = proc.stderr.read() if proc.stderr else ""
        proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, err
    assert len(seen) >= results, f"child printed only {len(seen)} results:\n{err}"
    return seen


def check(data_dir: Path, seen: list[tuple[int, int, int]]) -> dict[int, int]:
    """Checks the acknowledged calls against the disk; returns each object's count."""
    counts: dict[int, int] = {}
    with af.Runtime(data_dir) as rt:
        ns = rt.durable_objects(Ledger, name="ledger")
        for obj in range(OBJECTS):
            data = ns.get_by_name(f"o{obj}").dump()
            count = data.pop("count", 0)
            # Never half-applied: the counter and the log agree exactly.
            assert sorted(data) == [f"entry:{n:08d}" for n in range(1, count + 1)], obj
            counts[obj] = count
            for o, n, tok in seen:
                if o == obj:
                    assert n <= count, f"acknowledged call {n} of o{obj} lost"
                    assert data[f"entry:{n:08d}"] == tok
    return counts


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_acknowledged_calls_survive_sigkill_and_none_is_half_applied(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    seen = run_and_kill(data_dir, 1500)
    counts = check(data_dir, seen)
    assert sum(counts.values()) >= len(seen)
    # A second life on the same directory goes on from where the first stopped.
    seen2 = run_and_kill(data_dir, 1500)
    assert all(n > 0 for _obj, n, _tok in seen2)
    first_of = {obj: min(n for o, n, _ in seen2 if o == obj) for obj, _, _ in seen2}
    for obj, n in first_of.items():
        assert n == counts[obj] + 1  # went on from exactly what was on disk
    counts2 = check(data_dir, seen + seen2)
    assert all(counts2[o] >= counts[o] for o in counts)
