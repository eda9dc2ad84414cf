"""A create_batch killed midway: each instance is whole, the created ones are a prefix,
and calling it again with the same items creates exactly the rest."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import actorflow as af

N = 120_000

CHILD = textwrap.dedent("""
    import sys
    import actorflow as af

    rt = af.Runtime(sys.argv[1])
    wf = rt.unregistered("idle")  # queued only: nothing of the workflow runs here
    print("ready", flush=True)
    wf.create_batch([{"id": f"b{i:06d}", "params": i} for i in range(int(sys.argv[2]))])
    print("done", flush=True)
""")


def test_a_create_batch_killed_midway_leaves_whole_instances_in_item_order(tmp_path: Path) -> None:
    data = tmp_path / "data"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data), str(N)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        mdb = data / "data.mdb"
        start = mdb.stat().st_size
        deadline = time.monotonic() + 60
        # Killed once a part of the batch is on disk, long before all of it is.
        while mdb.stat().st_size < start + (4 << 20):
            assert child.poll() is None, "the batch ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
    with af.Runtime(data) as rt:
        wf = rt.unregistered("idle")
        created = sorted(i.id for i in wf.list(limit=None))
        k = len(created)
        assert 0 < k < N
        assert created == [f"b{i:06d}" for i in range(k)]  # a prefix of the items
        for i in (0, k // 2, k - 1):  # each one whole: record, params, status, history
            inst = wf.get(f"b{i:06d}")
            assert inst.status().status == "queued"
            assert [e.type for e in inst.history()] == ["WORKFLOW_QUEUED"]
        again = wf.create_batch([{"id": f"b{i:06d}", "params": i} for i in range(N)])
        assert [i.id for i in again] == [f"b{i:06d}" for i in range(k, N)]
        assert rt.metrics().counts.get("queued") == N
