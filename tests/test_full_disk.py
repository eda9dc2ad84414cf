"""A disk that fills up and empties again costs running instances a delay, not their lives."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import Journal, history_types, wait_for

import actorflow as af
from actorflow.testing import Faults


class ManySteps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        total = 0
        for i in range(event.payload["steps"]):
            total += step.do(f"s{i}", lambda i=i: j.add((event.instance_id, i)) or i)
            if event.payload.get("pad"):
                step.do(f"pad{i}", lambda: "x" * event.payload["pad"])
        return total


def test_writes_refused_for_a_while_fail_no_instance(make_runtime: Any, journal: Journal) -> None:
    # max_crashes=1: were each refused checkpoint a crash, every instance would end errored.
    rt = make_runtime(max_crashes=1)
    wf = rt.register(ManySteps, env=journal)
    insts = [wf.create(id=f"i{n}", params={"steps": 10}) for n in range(20)]
    wait_for(lambda: len(journal.entries) >= 20, timeout=20)
    faults = Faults(rt).fail_writes()
    wait_for(lambda: faults.failed_writes >= 60, timeout=30)  # many refusals per instance
    faults.stop_failing_writes()
    for inst in insts:
        s = inst.wait(timeout=60)
        assert s.status == "complete", (inst.id, s)
        assert s.output == sum(range(10))
    # Nothing errored, and no step that had been committed ran again.
    assert rt.metrics().counts.get("errored", 0) == 0
    for inst in insts:
        done = {r.name for r in inst.steps() if r.status == "complete"}
        assert len(done) == 10


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 MiB tmpfs, unmounted afterwards (needs root, as in CI)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(path: Path) -> None:
    """Writes ``path`` until the file system has no room left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for size in (1 << 16, 4096, 512):
            chunk = b"\0" * size
            try:
                while True:
                    os.write(fd, chunk)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_a_real_disk_full_for_seconds_then_freed(
    tiny_disk: Path, journal: Journal, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="actorflow")
    with af.Runtime(tiny_disk / "data", max_crashes=1) as rt:
        wf = rt.register(ManySteps, env=journal)
        insts = [wf.create(id=f"i{n}", params={"steps": 40, "pad": 4000}) for n in range(20)]
        wait_for(lambda: len(journal.entries) >= 40, timeout=30)
        filler = tiny_disk / "filler"
        _fill(filler)
        t0 = time.monotonic()
        # The disk stays full for 5 s (the outage), and until writes were refused.
        wait_for(lambda: "storage refused a write" in caplog.text, timeout=30)
        wait_for(lambda: time.monotonic() - t0 >= 5, timeout=30)
        statuses = {i.status().status for i in insts}
        assert "errored" not in statuses
        os.unlink(filler)
        for inst in insts:
            s = inst.wait(timeout=120)
            assert s.status == "complete", (inst.id, s)
            assert s.output == sum(range(40))
            assert "WORKFLOW_FAILURE" not in history_types(inst)
