"""Where an instance's records live: ``ids`` maps its id to a record number.

The number, not the (often random) id, keys the record, fence, steps, events
and history, so instances created together are stored together.
"""

from __future__ import annotations

import concurrent.futures
import uuid
from pathlib import Path
from typing import Any

import actorflow as af
from actorflow.core.lmdb_backend import LmdbStorage
from actorflow.workflows.engine.creation import RecordNumbers
from actorflow.workflows.records import EVENTS, FENCE, HIST, IDS, INST, STEPS, ikey, load, rkey


class Naps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.do("one", lambda: 1)
        step.wait_for_event("go", "go", timeout="1 hour")
        return 2


def _rk(rt: af.Runtime, wf: str, iid: str) -> bytes:
    n = rt.storage.get(IDS, ikey(wf, iid))
    assert n is not None, f"{iid} has no ids entry"
    return rkey(wf, n)


def test_records_of_random_ids_are_keyed_in_creation_order(rt: af.Runtime) -> None:
    wf = rt.register(Naps, name="naps")
    ids = [str(uuid.uuid4()) for _ in range(40)]
    wf.create_batch([{"id": i} for i in ids[:20]])
    for i in ids[20:]:
        wf.create(id=i)
    rks = [_rk(rt, "naps", i) for i in ids]
    assert rks == sorted(rks) and len(set(rks)) == len(rks)
    assert sorted(ids) != ids  # the ids themselves are not in that order


def test_every_record_of_an_instance_is_under_its_record_key(rt: af.Runtime) -> None:
    wf = rt.register(Naps, name="naps")
    inst = wf.create(id="a")
    inst.wait_for_step("one", timeout=10)
    inst.send_event("go")
    assert inst.wait(timeout=10).output == 2
    rk = _rk(rt, "naps", "a")
    assert load(rt.storage.get(INST, rk) or b"")["s"] == "complete"
    assert rt.storage.get(FENCE, rk) is not None
    assert rt.storage.scan(STEPS, prefix=rk + b"\x00")
    assert rt.storage.scan(HIST, prefix=rk + b"\x00")
    for ks in (INST, FENCE, STEPS, EVENTS, HIST):  # nothing is keyed by the id
        assert not rt.storage.scan(ks, prefix=ikey("naps", "a")), ks


def test_record_numbers_are_unique_across_numberers_and_reopens(tmp_path: Path) -> None:
    store = LmdbStorage(tmp_path / "data")
    try:
        a, b = RecordNumbers(store), RecordNumbers(store)  # as two processes would
        a.BLOCK = b.BLOCK = 8  # type: ignore[misc]
        seen = [a.take() for _ in range(20)] + [b.take() for _ in range(20)]
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            seen += list(pool.map(lambda _: a.take(), range(200)))
        assert len(set(seen)) == len(seen)
        last = max(seen)
    finally:
        store.close()
    store = LmdbStorage(tmp_path / "data")
    try:
        assert RecordNumbers(store).take() > last  # a reopened data dir goes on after them
    finally:
        store.close()


def test_numbers_taken_by_threads_increase_within_each_thread(tmp_path: Path) -> None:
    store = LmdbStorage(tmp_path / "data")
    try:
        nums = RecordNumbers(store)

        def run(_: int) -> list[int]:
            return [nums.take() for _ in range(500)]

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            runs = list(pool.map(run, range(4)))
        for r in runs:
            assert r == sorted(r)
        flat = [n for r in runs for n in r]
        assert len(set(flat)) == len(flat) == 2000
    finally:
        store.close()


def test_unknown_ids_have_no_records(rt: af.Runtime) -> None:
    wf = rt.register(Naps, name="naps")
    wf.create(id="known")
    assert rt.storage.get(IDS, ikey("naps", "unknown")) is None
    try:
        wf.get("unknown")
    except af.InstanceNotFound as e:
        assert "unknown" in str(e) and "naps" in str(e)
    else:
        raise AssertionError("get of an unknown id did not raise")


class Sleeps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        step.sleep("nap", "1 hour")
        return 1


def test_a_step_timer_names_the_instance_and_its_records(rt: af.Runtime) -> None:
    from actorflow.core.timers import TIMERS, parse_timer_key
    from actorflow.workflows.records import is_poke, poke_key, split_ikey, target_rkey

    wf = rt.register(Sleeps, name="sleeps")
    wf.create(id=str(uuid.uuid4()))
    inst = wf.create(id="b")
    assert rt.wait_until_idle()
    keys = [k for k, _ in rt.storage.scan(TIMERS)]
    assert len(keys) == 2
    targets = [parse_timer_key(k)[2] for k in keys]
    mine = [t for t in targets if split_ikey(t) == ("sleeps", "b")]
    assert len(mine) == 1 and target_rkey(mine[0]) == inst.parts.record_key(inst.id)
    assert not any(is_poke(k) for k in keys)
    poke = poke_key(0, ikey("sleeps", "b"))
    assert is_poke(poke) and target_rkey(parse_timer_key(poke)[2]) is None
