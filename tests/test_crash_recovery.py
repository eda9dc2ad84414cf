"""SIGKILL a real process with instances in flight; a new process finishes them all.

No committed step body runs again; steps whose result was not yet committed
may run again (at least once), and every step of every instance completes.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import actorflow as af
from actorflow.core.lmdb_backend import LmdbStorage
from actorflow.workflows.records import DONE, IDS, STEPS, load

APP = Path(__file__).parent / "apps" / "crash_app.py"
sys.path.insert(0, str(Path(__file__).parent))
from apps import crash_app  # noqa: E402


def journal_counts(path: Path) -> collections.Counter[tuple[str, str]]:
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    if path.exists():
        for line in path.read_text().splitlines():
            if line:
                iid, step = line.split(",")
                counts[(iid, step)] += 1
    return counts


def committed_steps(data_dir: Path) -> set[tuple[str, str]]:
    store = LmdbStorage(data_dir)
    try:
        out = set()
        pre = b"crashflow\x00"
        ids = {pre + n: k[len(pre) :].decode() for k, n in store.scan(IDS, prefix=pre)}
        for key, value in store.scan(STEPS, prefix=pre):
            rec = load(value)
            if rec["k"] == "do" and rec["s"] == DONE:
                out.add((ids[key[: len(pre) + 8]], rec["n"]))
        return out
    finally:
        store.close()


def run_and_kill(tmp_path: Path, n: int, kill_after_lines: int, max_concurrent: int) -> Path:
    data, journal = tmp_path / "data", tmp_path / "journal.txt"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parent.parent))
    err = tmp_path / "child.err"
    with open(err, "wb") as err_file:
        child = subprocess.Popen(
            [sys.executable, str(APP), str(data), str(journal), str(n), str(max_concurrent)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline:
            if child.poll() is not None:
                pytest.fail(f"child exited early: {err.read_text()[-2000:]}")
            if sum(journal_counts(journal).values()) >= kill_after_lines:
                break
            time.sleep(0.01)
        else:
            pytest.fail("the child made no progress")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    return data


def test_sigkill_mid_flight_then_recover_in_new_process(tmp_path: Path, monkeypatch) -> None:
    n = 1000
    data = run_and_kill(tmp_path, n, kill_after_lines=900, max_concurrent=300)
    journal = tmp_path / "journal.txt"
    at_kill = journal_counts(journal)
    committed = committed_steps(data)
    assert committed, "nothing was committed before the kill"
    assert len(committed) < n * 4, "everything finished before the kill: the test proves nothing"

    monkeypatch.setenv(crash_app.JOURNAL_ENV, str(journal))
    with crash_app.factory(str(data), max_concurrent=300) as rt:
        wf = rt.workflow("crashflow")
        statuses = collections.Counter(i.status().status for i in wf.list(limit=None))
        assert sum(statuses.values()) == n, statuses  # every created instance survived
        for k, item in enumerate(crash_app.kinds(n)):
            if item["params"]["kind"] == "event":
                wf.get(f"i{k}").send_event("go", "ok")
        for k in range(n):
            st = wf.get(f"i{k}").wait(timeout=120)
            assert st.status == "complete", (k, st)
            assert len(st.output) in (4, 5)

    after = journal_counts(journal)
    for k in range(n):
        for step in ("s1", "s2", "s3", "s4"):
            assert after[(f"i{k}", step)] >= 1, f"step {step} of i{k} never ran"
    rerun_committed = {p: c for p, c in after.items() if p in committed and c > 1}
    assert not rerun_committed, f"committed steps ran again: {list(rerun_committed.items())[:10]}"
    # uncommitted steps may have run before the kill and again after: at least once
    assert all(after[p] >= at_kill[p] for p in at_kill)


def test_close_and_reopen_resumes_from_last_step(tmp_path: Path, monkeypatch) -> None:
    journal = tmp_path / "journal.txt"
    monkeypatch.setenv(crash_app.JOURNAL_ENV, str(journal))
    data = str(tmp_path / "data")
    with crash_app.factory(data) as rt:
        inst = rt.workflow("crashflow").create(id="e1", params={"kind": "event"})
        deadline = time.monotonic() + 10
        while inst.status().status != "waiting" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert inst.status().status == "waiting"
    with crash_app.factory(data) as rt:
        inst = rt.workflow("crashflow").get("e1")
        assert inst.status().status == "waiting"
        inst.send_event("go", "ok")
        assert inst.wait(timeout=30).output == ["e1:s1", "ok", "e1:s2", "e1:s3", "e1:s4"]
    assert set(journal_counts(journal).values()) == {1}


def test_runtime_is_not_shared_across_fork(tmp_path: Path) -> None:
    with af.Runtime(tmp_path / "data") as rt:
        pid = os.fork()
        if pid == 0:  # child: the parent's environment must refuse to work here
            try:
                rt.storage.get("inst", b"x")
            except af.StorageError:
                os._exit(0)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
