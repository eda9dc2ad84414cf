"""Engine records cannot run code: a crafted data directory is refused, never executed.

Engine records (instance, step, event, history and node records) are
MessagePack; records of directories written before are pickles, still read,
through an unpickler that refuses every global. User values inside records
(params, outputs, payloads) keep the runtime's serializer: the attacks here
are in the engine records' own fields.
"""

from __future__ import annotations

import copyreg
import os
import pickle
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

import actorflow as af
from actorflow.cluster.lease import NODES, OWNER
from actorflow.core.errors import RecordFormatError
from actorflow.core.lmdb_backend import LmdbStorage
from actorflow.core.storage import Storage, WriteBatch
from actorflow.workflows.records import (
    EVENTS,
    HIST,
    IDS,
    INST,
    STEPS,
    dump,
    ikey,
    load,
    rkey,
    steps_prefix,
)

ENGINE_KEYSPACES = (INST, STEPS, EVENTS, HIST, NODES)


class Order(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        charged = step.do(
            "charge",
            lambda: {"paid": event.payload},
            retries={"limit": 1, "delay": 1, "backoff": "constant"},
        )
        ev = step.wait_for_event("approval", "approved", timeout="1 hour")
        return {"charged": charged, "by": ev.payload}


class _Opens:
    """Unpickles into ``open(path, "w")``: whoever unpickles it creates the file."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _crafted(marker: Path, like: dict[str, Any]) -> bytes:
    """A record shaped like ``like`` whose every field would create ``marker``."""
    return pickle.dumps({k: _Opens(marker) for k in like}, protocol=5)


def _rk(store: Storage, iid: str) -> bytes:
    n = store.get(IDS, ikey("order", iid))
    assert n is not None
    return rkey("order", n)


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A closed directory: ``done`` complete, ``wait`` waiting with a buffered event;
    written by node ``n1`` (so it has a node registry)."""
    path = tmp_path_factory.mktemp("records") / "data"
    with af.Runtime(path, node_id="n1") as rt:
        wf = rt.register(Order, name="order")
        done = wf.create(id="done", params="ann")
        done.wait_for_status("waiting")
        done.send_event("approved", "bob")
        done.wait(timeout=30)
        wait = wf.create(id="wait", params="cat")
        wait.wait_for_status("waiting")
        wait.send_event("later", "kept")  # not waited for: buffered
    return path


@pytest.fixture
def data(template: Path, tmp_path: Path) -> Path:
    path = tmp_path / "data"
    shutil.copytree(template, path)
    return path


ROOT = Path(__file__).resolve().parent.parent


def _cli(data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Runs ``actorflow --data DATA ARGS`` in a process of its own."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "actorflow.cli", "--data", str(data), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


def _assert_refused(res: subprocess.CompletedProcess[str], marker: Path) -> None:
    assert not marker.exists(), "the crafted record ran"
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "RecordFormatError" in res.stderr and "Traceback" not in res.stderr, res.stderr


# -- (a) a crafted directory ------------------------------------------------------------


def _overwrite(data: Path, target: str, marker: Path) -> None:
    """Replaces one engine record of ``data`` with a crafted pickle."""
    store = LmdbStorage(data)
    try:
        if target == "nodes":
            key, ks = b"n1", NODES
        elif target.startswith("inst:"):
            key, ks = _rk(store, target[5:]), INST
        else:
            ks = {"steps": STEPS, "hist": HIST, "events": EVENTS}[target]
            key = store.scan(ks, prefix=steps_prefix(_rk(store, "wait")))[0][0]
        old = store.get(ks, key)
        assert old is not None
        store.write(WriteBatch().put(ks, key, _crafted(marker, load(old))))
    finally:
        store.close()


@pytest.mark.parametrize("iid", ["done", "wait"])
def test_a_crafted_instance_record_is_refused(data: Path, tmp_path: Path, iid: str) -> None:
    marker = tmp_path / "marker"
    _overwrite(data, f"inst:{iid}", marker)
    for args in (
        ["status", "order", iid],
        ["list"],
        ["history", "order", iid],
        ["steps", "order", iid],
    ):
        _assert_refused(_cli(data, *args), marker)
    with af.Runtime(data) as rt:
        wf = rt.register(Order, name="order")
        with pytest.raises(RecordFormatError, match=r"io\.open"):
            wf.get(iid).status()
        with pytest.raises(RecordFormatError):
            wf.get(iid).history()
        other = "wait" if iid == "done" else "done"
        assert wf.get(other).status().status in ("complete", "waiting")  # the rest still works
        inst = wf.create(id="new", params="dan")
        inst.wait_for_status("waiting")
        inst.send_event("approved", "eve")
        assert inst.wait(timeout=30).output == {"charged": {"paid": "dan"}, "by": "eve"}
    assert not marker.exists()


@pytest.mark.parametrize("target", ["steps", "hist"])
def test_a_crafted_step_or_history_record_is_refused(
    data: Path, tmp_path: Path, target: str
) -> None:
    marker = tmp_path / "marker"
    _overwrite(data, target, marker)
    for args in (
        ["history", "order", "wait"],
        *([["steps", "order", "wait"]] if target == "steps" else []),
    ):
        _assert_refused(_cli(data, *args), marker)
    res = _cli(data, "--json", "status", "order", "wait")  # reads the instance record only
    assert not marker.exists() and res.returncode == 0 and '"waiting"' in res.stdout, res.stderr
    with af.Runtime(data) as rt:
        inst = rt.register(Order, name="order").get("wait")
        with pytest.raises(RecordFormatError):
            inst.history()
        if target == "steps":
            with pytest.raises(RecordFormatError):
                inst.steps()
    assert not marker.exists()


def test_a_crafted_buffered_event_is_refused(
    data: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The run that would take it cannot load it: the event never becomes code."""
    marker = tmp_path / "marker"
    _overwrite(data, "events", marker)

    def refused() -> bool:
        return any(
            r.exc_info and isinstance(r.exc_info[1], RecordFormatError) for r in caplog.records
        )

    with af.Runtime(data) as rt:
        inst = rt.register(Order, name="order").get("wait")
        inst.send_event("approved", "bob")  # wakes the run, which reads its buffered events
        deadline = time.monotonic() + 10
        while not refused() and not marker.exists():
            assert time.monotonic() < deadline, "the run never read its events"
            time.sleep(0.02)
        assert not marker.exists()
        assert "io.open" in str(next(r for r in caplog.records if r.exc_info).exc_info)
    assert not marker.exists()


def test_a_crafted_node_record_is_refused(data: Path, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    _overwrite(data, "nodes", marker)
    with pytest.raises(RecordFormatError, match=r"io\.open"):
        af.Runtime(data, node_id="n2")
    assert not marker.exists()


# -- the unpickler of old records -------------------------------------------------------


def test_every_way_a_pickle_calls_something_is_refused(tmp_path: Path) -> None:
    """Each opcode that can call something, or fetch something to call, is refused."""
    marker = tmp_path / "marker"
    m = str(marker).encode()
    live = [
        pickle.dumps({"s": _Opens(marker)}, protocol=5),  # STACK_GLOBAL + REDUCE
        pickle.dumps({"s": _Opens(marker)}, protocol=2),  # GLOBAL + REDUCE
        # MARK, path, "w", INST io.open
        b"\x80\x02(X" + struct.pack("<I", len(m)) + m + b"X\x01\x00\x00\x00wiio\nopen\n.",
    ]
    for data in live:  # each one does run code when unpickled
        opened = pickle.loads(data)
        (opened["s"] if isinstance(opened, dict) else opened).close()
        assert marker.exists()
        marker.unlink()
    crafted = [
        *live,
        b"\x80\x05\x8c\x01a)R.",  # REDUCE of a str
        b"\x80\x05}}b.",  # BUILD on a dict
        b"\x80\x05K\x01)\x81.",  # NEWOBJ of an int
        b"\x80\x05\x8c\x01xQ.",  # BINPERSID
        b"\x80\x05\x97.",  # NEXT_BUFFER
    ]
    for data in crafted:
        with pytest.raises(RecordFormatError):
            load(data)
    copyreg.add_extension("io", "open", 0x7FFFFFF0)
    try:
        ext = (
            b"\x80\x05\x84\xf0\xff\xff\x7f"
            + b"X"
            + struct.pack("<I", len(m))
            + m
            + b"\x8c\x01w\x86R."
        )  # EXT4 code, path, "w", TUPLE2, REDUCE
        pickle.loads(ext).close()  # live: it opens the file (and caches io.open for EXT4)
        assert marker.exists()
        marker.unlink()
        # The cached object never passes through find_class: the opcode check stops it.
        with pytest.raises(RecordFormatError, match="EXT4"):
            load(ext)
    finally:
        copyreg.remove_extension("io", "open", 0x7FFFFFF0)
    assert not marker.exists()


def test_what_is_not_a_record_is_refused_by_name() -> None:
    for data in (
        b"",
        b"\xc1",
        dump({"a": 1})[:-1],
        dump({"a": 1}) + b"\x00",
        b"\x92\x01\x02",
        b"\xc7\x01\x05x",
        pickle.dumps([1, 2], protocol=5),
        b"\x80\x05\x95garbage",
    ):
        with pytest.raises(RecordFormatError):
            load(data)


# -- (b) round trips --------------------------------------------------------------------


def test_every_engine_record_of_a_directory_round_trips(template: Path) -> None:
    store = LmdbStorage(template)
    try:
        seen = 0
        for ks in ENGINE_KEYSPACES:
            for key, raw in store.scan(ks):
                if ks == NODES and key.startswith(b"\x00"):
                    continue  # sequence slots: a node id, not a record
                assert raw[:1] != b"\x80"  # not a pickle
                rec = load(raw)
                assert isinstance(rec, dict) and dump(rec) == raw  # canonical: guards compare bytes
                seen += 1
        kinds = {ks for ks in ENGINE_KEYSPACES if store.count(ks)}
        assert kinds == set(ENGINE_KEYSPACES) and seen > 10
    finally:
        store.close()


def test_values_of_every_builtin_kind_round_trip() -> None:
    rec = {
        "s": "complete",
        "n": None,
        "t": True,
        "f": False,
        "x": 1.5,
        "nan_free": -0.0,
        "u64": 2**64 - 1,
        "i64": -(2**63),
        "big": 2**200,
        "neg_big": -(2**64) - 7,
        "b": b"\x80\x05 user bytes",
        "empty": b"",
        "str": "naïve ✓",
        "list": [1, [2, b"3"]],
        "tuple": (1, (None, {"k": "v"})),
        "nested": {"d": {"e": []}},
        "none": {},
    }
    out = load(dump(rec))
    assert out == {**rec, "tuple": [1, [None, {"k": "v"}]]}  # tuples come back as lists
    assert type(out["big"]) is int and type(out["t"]) is bool and type(out["b"]) is bytes
    assert load(dump({})) == {}
    with pytest.raises(TypeError, match="set"):
        dump({"s": {1, 2}})


# -- (c) directories written before: pickled records ---------------------------------------


def _to_old_format(data: Path) -> int:
    """Rewrites every engine record of ``data`` as the earlier versions wrote it:
    a protocol-5 pickle, with tuples where they had tuples."""
    store = LmdbStorage(data)
    try:
        batch, n = WriteBatch(), 0
        for ks in ENGINE_KEYSPACES:
            for key, raw in store.scan(ks):
                if ks == NODES and key.startswith(b"\x00"):
                    continue
                rec = load(raw)
                if "att" in rec:
                    rec["att"] = [tuple(a) for a in rec["att"]]
                if "ev" in rec:
                    rec["ev"] = tuple(rec["ev"])
                batch.put(ks, key, pickle.dumps(rec, protocol=5))
                n += 1
        store.write(batch)
        return n
    finally:
        store.close()


def _snapshot(rt: af.Runtime) -> dict[str, Any]:
    wf = rt.register(Order, name="order")
    return {
        iid: (wf.get(iid).status(), wf.get(iid).history(), wf.get(iid).steps())
        for iid in ("done", "wait")
    }


def test_an_old_directory_reads_the_same_and_runs_on(data: Path, tmp_path: Path) -> None:
    before = {
        args: _cli(data, "--json", *args).stdout
        for args in (
            ("list",),
            ("status", "order", "done"),
            ("history", "order", "wait"),
            ("steps", "order", "done"),
        )
    }
    with af.Runtime(data, node_id="n1") as rt:
        expected = _snapshot(rt)
    assert _to_old_format(data) > 10
    for args, out in before.items():
        assert _cli(data, "--json", *args).stdout == out
    with af.Runtime(data, node_id="n1") as rt:  # rejoins: reads its old registry record
        assert _snapshot(rt) == expected
        wait = rt.workflow("order").get("wait")
        wait.send_event("approved", "bob")
        assert wait.wait(timeout=30).output == {"charged": {"paid": "cat"}, "by": "bob"}
        assert [e.type for e in wait.history()][-2:] == ["WAIT_COMPLETE", "WORKFLOW_SUCCESS"]
        assert [s.name for s in wait.steps()] == ["charge", "approval"]


def test_an_old_node_that_left_is_adopted(data: Path) -> None:
    """Its registry record is a pickle: adoption checks it by value, not by re-encoding it."""
    _to_old_format(data)
    with af.Runtime(data, node_id="n2", lease_timeout=60) as rt:
        wait = rt.register(Order, name="order").get("wait")
        deadline = time.monotonic() + 10  # a node that left is adopted at the next pass
        while rt.storage.get(OWNER, ikey("order", "wait")) != b"n2":
            assert time.monotonic() < deadline, "n1's instances were not adopted"
            time.sleep(0.05)
        wait.send_event("approved", "bob")
        assert wait.wait(timeout=30).output == {"charged": {"paid": "cat"}, "by": "bob"}


class Naps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.sleep("nap", "1 minute")
        return step.do("after", lambda: event.payload)


def test_one_damaged_record_does_not_hold_up_the_others(tmp_path: Path) -> None:
    from actorflow.testing import FakeClock

    data = tmp_path / "data"
    clock = FakeClock()
    with af.Runtime(data, clock=clock) as rt:
        wf = rt.register(Naps, name="naps")
        for i in range(3):
            wf.create(id=f"n{i}", params=i).wait_for_status("waiting")
        # "running" when the process went: recovery must read it at register time.
        bad_running = wf.create(id="r", params="r")
        bad_running.wait_for_status("waiting")
    store = LmdbStorage(data)
    try:
        for iid in ("n1", "r"):
            n = store.get(IDS, ikey("naps", iid))
            assert n is not None
            store.write(WriteBatch().put(INST, rkey("naps", n), b"\xc1 not a record"))
    finally:
        store.close()
    with af.Runtime(data, clock=clock) as rt:
        wf = rt.register(Naps, name="naps")  # does not raise for the damaged ones
        clock.advance("1 minute")
        for iid in ("n0", "n2"):
            assert wf.get(iid).wait(timeout=10).output == int(iid[1])
        with pytest.raises(RecordFormatError):
            wf.get("n1").status()
        assert wf.create(id="new", params=7) is not None  # the runtime goes on
