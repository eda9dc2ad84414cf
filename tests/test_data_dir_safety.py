"""One runtime per data directory, and damaged or full data directories, with real processes.

Every open of a directory that could kill its process (a truncated data file,
a full disk) runs in a child interpreter: a SIGBUS there is a negative return
code that fails the test, instead of the death of pytest.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import actorflow as af
import actorflow.runtime
from actorflow.core.datadir import MARKER, RUNTIME_LOCK
from actorflow.core.lmdb_backend import LmdbStorage
from actorflow.core.storage import WriteBatch
from actorflow.runtime import OWNER_LOCK

ROOT = str(Path(__file__).resolve().parents[1])
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p),
}

# Opens a runtime (argv: data dir, node id or ""), reads, closes it, and reports as JSON.
_OPEN = """
import json, sys, actorflow as af
try:
    rt = af.Runtime(sys.argv[1], node_id=sys.argv[2] or None)
except af.ActorflowError as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e), "fields": e.fields}))
else:
    rt.metrics()  # reads the status index: a truncated file's missing pages would SIGBUS here
    rt.close()
    print(json.dumps({"opened": True}))
"""

# Holds a runtime open (argv: data dir, node id or "") and runs one-step
# instances on request: "run ID" -> "done ID PID-THAT-RAN-THE-STEP".
_HOLDER = """
import os, sys, actorflow as af

class Once(af.Workflow):
    def run(self, event, step):
        return step.do("mark", os.getpid)

with af.Runtime(sys.argv[1], node_id=sys.argv[2] or None) as rt:
    once = rt.register(Once, name="once")
    print("ready", os.getpid(), flush=True)
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        if cmd == "run":
            st = once.create(id=arg).wait(timeout=30)
            print("done", arg, st.output, flush=True)
        else:
            break
"""


def _open(data: Path, node_id: str = "") -> dict[str, Any]:
    """Opens a runtime on ``data`` in a child process; its report (it must not die of a signal)."""
    proc = subprocess.run(
        [sys.executable, "-c", _OPEN, str(data), node_id],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"the child died ({proc.returncode}): {proc.stderr[-2000:]}"
    report: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return report


class Holder:
    """A runtime held open in a child process."""

    def __init__(self, data: Path, node_id: str = "") -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(data), node_id],
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.out, self.inp = self.proc.stdout, self.proc.stdin
        line = self.out.readline().split()
        assert line[:1] == ["ready"], f"the holder did not start: {line}"
        self.pid = int(line[1])

    def run(self, iid: str) -> int:
        """Runs instance ``iid`` to completion in the holder; the pid that ran its step."""
        self.inp.write(f"run {iid}\n")
        self.inp.flush()
        line = self.out.readline().split()
        assert line[:2] == ["done", iid], line
        return int(line[2])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.inp.write("quit\n")
            self.inp.flush()
        assert self.proc.wait(timeout=30) == 0

    def kill(self) -> None:
        self.proc.kill()
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.inp.close()
        self.out.close()


@pytest.fixture
def holders() -> Iterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for h in made:
        h.cleanup()


# -- one runtime per data directory -----------------------------------------------------


def test_a_second_process_without_node_id_is_refused(tmp_path: Path, holders: list[Holder]) -> None:
    data = tmp_path / "data"
    first = Holder(data)
    holders.append(first)
    second = _open(data)
    assert second.get("error") == "DataDirectoryLocked", second
    assert second["fields"]["pid"] == first.pid
    msg = second["message"]
    assert str(data) in msg and f"process {first.pid}" in msg
    assert "node_id" in msg and "gunicorn" in msg
    assert first.run("a") == first.pid  # the first keeps working, alone
    first.kill()  # the kernel drops its locks
    assert _open(data) == {"opened": True}


def test_the_next_runtime_opens_once_the_first_closes(
    tmp_path: Path, holders: list[Holder]
) -> None:
    data = tmp_path / "data"
    first = Holder(data)
    holders.append(first)
    assert _open(data)["error"] == "DataDirectoryLocked"
    first.close()
    again = Holder(data)
    holders.append(again)
    assert again.run("b") == again.pid


def test_nodes_share_a_directory_but_not_a_node_id_nor_with_a_lone_runtime(
    tmp_path: Path, holders: list[Holder]
) -> None:
    data = tmp_path / "data"
    a = Holder(data, "a")
    holders.append(a)
    b = Holder(data, "b")  # distinct node ids share it, as before
    holders.append(b)
    same = _open(data, "a")
    assert same["error"] == "DataDirectoryLocked", same
    assert same["fields"]["pid"] == a.pid and "node 'a'" in same["message"]
    lone = _open(data)
    assert lone["error"] == "DataDirectoryLocked", lone
    assert "nodes 'a'" in lone["message"] and "'b'" in lone["message"]
    assert a.run("x") == a.pid and b.run("y") == b.pid
    a.kill()
    b.close()
    lone_holder = Holder(data)
    holders.append(lone_holder)
    node = _open(data, "c")  # and no node while a lone runtime has it
    assert node["error"] == "DataDirectoryLocked", node
    assert node["fields"]["pid"] == lone_holder.pid
    assert "without a node_id" in node["message"]


def test_a_second_runtime_in_the_same_process_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with af.Runtime(data) as rt:
        for node_id in (None, "n1"):
            with pytest.raises(af.DataDirectoryLocked, match="this process") as err:
                af.Runtime(data, node_id=node_id)
            assert err.value.path == str(data)  # type: ignore[attr-defined]
        with pytest.raises(af.DataDirectoryLocked, match="already open in this process"):
            LmdbStorage(data)
        assert not rt.closed
    with (
        af.Runtime(data, node_id="n1"),
        pytest.raises(af.DataDirectoryLocked, match="node 'n1' is already open"),
    ):
        af.Runtime(data, node_id="n1")
    with af.Runtime(data):  # nothing was left held by the refused ones
        pass


def test_a_runtime_waits_for_the_command_but_not_forever(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setattr(actorflow.runtime, "OWNER_WAIT", 0.2)
    fd = os.open(data / OWNER_LOCK, os.O_RDWR | os.O_CREAT)
    done = threading.Timer(0.2, fcntl.flock, (fd, fcntl.LOCK_UN))  # the command ends
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as the `actorflow` command does while it changes it
        with pytest.raises(af.DataDirectoryLocked, match="actorflow` command"):
            af.Runtime(data)
        monkeypatch.setattr(actorflow.runtime, "OWNER_WAIT", 30.0)
        done.start()
        with af.Runtime(data):
            pass
    finally:
        done.cancel()
        if done.is_alive():
            done.join()
        os.close(fd)


# -- a damaged data file ------------------------------------------------------------------


_WAITER = """
import sys, actorflow as af
class Wait(af.Workflow):
    def run(self, event, step):
        step.do("a", lambda: event.payload)
        return step.wait_for_event("go", "go", timeout="1 hour").payload
with af.Runtime(sys.argv[1]) as rt:
    w = rt.register(Wait, name="wait")
    w.create_batch([{"id": f"i{n}", "params": n} for n in range(int(sys.argv[2]))])
    assert rt.wait_until_idle(timeout=60)
"""


@pytest.fixture
def with_data(tmp_path: Path) -> Path:
    """A closed data directory holding 400 waiting instances."""
    data = tmp_path / "data"
    subprocess.run(
        [sys.executable, "-c", _WAITER, str(data), "400"], env=ENV, check=True, timeout=120
    )
    assert (data / MARKER).exists()
    return data


def test_a_truncated_data_file_is_refused_not_a_sigbus(with_data: Path) -> None:
    size = (with_data / "data.mdb").stat().st_size
    os.truncate(with_data / "data.mdb", size // 3)
    report = _open(with_data)
    assert report.get("error") == "StorageCorrupted", report
    assert "truncated" in report["message"] and str(with_data) in report["message"]
    assert report["fields"]["path"] == str(with_data)


@pytest.mark.parametrize("damage", ["empty", "deleted"])
def test_a_lost_data_file_is_refused_not_opened_empty(with_data: Path, damage: str) -> None:
    if damage == "empty":
        os.truncate(with_data / "data.mdb", 0)
    else:
        os.unlink(with_data / "data.mdb")
    report = _open(with_data)
    assert report.get("error") == "StorageCorrupted", report
    word = "empty" if damage == "empty" else "missing"
    assert word in report["message"] and "backup" in report["message"]
    os.unlink(with_data / MARKER)  # the way to start over on purpose
    assert _open(with_data) == {"opened": True}


def test_damaged_meta_pages_are_refused(with_data: Path) -> None:
    with open(with_data / "data.mdb", "r+b") as f:
        f.write(random.Random(7).randbytes(4096))
    report = _open(with_data)
    assert report.get("error") == "StorageCorrupted", report
    assert "meta pages" in report["message"]


def test_a_new_directory_opens_and_is_marked(tmp_path: Path) -> None:
    data = tmp_path / "fresh"
    assert _open(data) == {"opened": True}
    assert json.loads((data / MARKER).read_text())["actorflow"] == 1
    assert _open(data) == {"opened": True}


_KEYS = 3000


def _scribbled(tmp_path: Path, *, lmdb_sees_it: bool) -> Path:
    """A closed directory of ``_KEYS`` keys (one commit) with random bytes over a leaf page.

    With ``lmdb_sees_it``, the page's type bits are cleared: LMDB checks them
    on every lookup. Otherwise the page is left as the random bytes fell.
    """
    data = tmp_path / "scribbled"
    store = LmdbStorage(data)
    batch = WriteBatch()
    for i in range(_KEYS):
        batch.put("k", b"key-%05d" % i, b"v" * 200)
    store.write(batch)
    store.close()
    path = data / "data.mdb"
    psize = 4096
    raw = path.read_bytes()
    leaves = [
        n
        for n in range(2, len(raw) // psize)
        if raw[n * psize + 10] & 0x03 == 0x02 and b"key-" in raw[n * psize : (n + 1) * psize]
    ]
    assert len(leaves) > 50  # one commit: every such page is live
    page = leaves[len(leaves) // 2]
    junk = bytearray(random.Random(page).randbytes(psize))
    if lmdb_sees_it:
        junk[10] &= ~0x03
    with open(path, "r+b") as f:
        f.seek(page * psize)
        f.write(junk)
    return data


_VERIFY = """
import json, sys, actorflow as af
from actorflow.core.storage import Storage
from actorflow.core.lmdb_backend import LmdbStorage
store = LmdbStorage(sys.argv[1])
try:
    store.verify()
    print(json.dumps({"ok": True}))
except af.StorageCorrupted as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}))
finally:
    store.close()
"""

_READ_ALL = """
import json, sys, actorflow as af
from actorflow.core.storage import Storage
from actorflow.core.lmdb_backend import LmdbStorage
store = LmdbStorage(sys.argv[1])
ok = damaged = 0
message = ""
for i in range(int(sys.argv[2])):
    try:
        ok += store.get("k", b"key-%05d" % i) is not None
    except af.StorageCorrupted as e:
        damaged += 1
        message = str(e)
store.close()
print(json.dumps({"ok": ok, "damaged": damaged, "message": message}))
"""


def _child_json(code: str, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=ENV, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"the child died ({proc.returncode}): {proc.stderr[-2000:]}"
    out: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def test_verify_finds_random_bytes_over_a_page(tmp_path: Path) -> None:
    data = _scribbled(tmp_path, lmdb_sees_it=False)
    report = _child_json(_VERIFY, str(data))
    assert report.get("error") == "StorageCorrupted", report
    assert str(data) in report["message"] and "damaged" in report["message"]


def test_reads_of_a_damaged_page_raise_storage_corrupted(tmp_path: Path) -> None:
    data = _scribbled(tmp_path, lmdb_sees_it=True)
    report = _child_json(_READ_ALL, str(data), str(_KEYS))
    assert report["damaged"] > 0 and report["ok"] > _KEYS // 2, report
    assert str(data) in report["message"] and "'k'" in report["message"]
    assert _child_json(_VERIFY, str(data)).get("error") == "StorageCorrupted"


def test_verify_passes_a_healthy_directory(with_data: Path) -> None:
    assert _child_json(_VERIFY, str(with_data)) == {"ok": True}


# -- a full disk --------------------------------------------------------------------------


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs, mounted for the test and filled to the last byte."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        with open(mnt / "fill", "wb", buffering=0) as f:
            try:
                while True:
                    f.write(b"\0" * 4096)
            except OSError as e:
                assert e.errno == errno.ENOSPC
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_opening_a_new_directory_on_a_full_disk_is_an_error_not_a_sigbus(full_disk: Path) -> None:
    report = _open(full_disk / "data")
    assert report.get("error") == "StorageFull", report
    assert "full" in report["message"] and str(full_disk / "data") in report["message"]
    os.unlink(full_disk / "fill")
    assert _open(full_disk / "data") == {"opened": True}  # nothing half-made was left


def test_the_runtime_lock_names_its_holder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with af.Runtime(data):
        assert json.loads((data / RUNTIME_LOCK).read_text()) == {"pid": os.getpid(), "node": None}
    assert (data / RUNTIME_LOCK).read_text() == ""
