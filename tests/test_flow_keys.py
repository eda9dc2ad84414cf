"""Keyed flow control: ``create(key=, priority=)`` and ``Limits(max_concurrent_per_key=)``."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

import pytest
from conftest import Journal, wait_for

import actorflow as af


class KeyCount:
    """Counts the running step bodies per key; notes the most seen at every start."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.now: Counter[str] = Counter()
        self.peak: Counter[str] = Counter()
        self.starts: list[str] = []

    def enter(self, key: str, iid: str) -> None:
        with self.lock:
            self.now[key] += 1
            self.peak[key] = max(self.peak[key], self.now[key])
            self.starts.append(iid)

    def leave(self, key: str) -> None:
        with self.lock:
            self.now[key] -= 1


class Keyed(af.Workflow):
    """One step that counts itself against ``params["key"]`` and blocks on its key's gate."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        key = event.payload["key"]

        def body() -> str:
            kc: KeyCount = j.data["kc"]
            kc.enter(key, event.instance_id)
            j.add(("start", key, event.instance_id))
            try:
                j.block(f"key:{key}")
            finally:
                kc.leave(key)
            return event.instance_id

        return step.do("work", body)


def _register(rt: af.Runtime, journal: Journal, **limits: Any) -> af.WorkflowBinding:
    journal.data["kc"] = KeyCount()
    return rt.register(Keyed, name="keyed", env=journal)


def test_priorities_order_starts(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=1))
    wf = _register(rt, journal)
    first = wf.create(id="first", params={"key": "k"})
    wait_for(lambda: len(journal.entries) == 1)
    prios = [5, -3, 0, 7, -3, 1, 0, 2**31 - 1, -(2**31)]
    for n, p in enumerate(prios):
        wf.create(id=f"p{n}", params={"key": "k"}, priority=p)
    wf.create(id="plain", params={"key": "k"})  # priority 0, no key: the default band
    journal.gate("key:k").set()
    assert first.wait(timeout=10).status == "complete"
    for iid in [f"p{n}" for n in range(len(prios))] + ["plain"]:
        assert wf.get(iid).wait(timeout=10).status == "complete"
    order = journal.data["kc"].starts[1:]
    expected = sorted([(p, n, f"p{n}") for n, p in enumerate(prios)] + [(0, len(prios), "plain")])
    assert order == [iid for _, _, iid in expected]
    d = wf.get("p1").describe()
    assert (d.key, d.priority) == (None, -3)
    assert wf.get("plain").describe().priority == 0


def test_the_per_key_cap_holds_and_other_keys_go_on(make_runtime: Any, journal: Journal) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=50, max_concurrent_per_key=2))
    wf = _register(rt, journal)
    insts = [
        wf.create(id=f"{k}{n}", params={"key": k}, key=k) for n in range(6) for k in ("a", "b", "c")
    ]
    kc: KeyCount = journal.data["kc"]
    wait_for(lambda: len(journal.entries) == 6)
    assert rt.wait_until_idle(0.2) is False
    assert Counter(k for _, k, _ in journal.entries) == {"a": 2, "b": 2, "c": 2}
    m = rt.metrics().workflows["keyed"]
    assert m.running_by_key == {"a": 2, "b": 2, "c": 2}
    assert m.queued_by_key == {"a": 4, "b": 4, "c": 4}
    assert m.queued_keys == 3
    # Key "a" finishes: only its own next two start, FIFO within the key.
    journal.gate("key:a").set()
    for i in insts[0:6:3]:
        assert i.wait(timeout=10).status == "complete"
    wait_for(lambda: kc.starts.count("a5") == 1)
    assert [iid for iid in kc.starts if iid.startswith("a")] == [f"a{n}" for n in range(6)]
    assert sum(1 for _, k, _ in journal.entries if k == "b") == 2
    journal.gate("key:b").set()
    journal.gate("key:c").set()
    assert all(i.wait(timeout=10).status == "complete" for i in insts)
    assert kc.peak == {"a": 2, "b": 2, "c": 2}
    m = rt.metrics().workflows["keyed"]
    assert m.running_by_key == {} and m.queued_by_key == {}
    assert wf.get("b3").describe().key == "b"


def test_no_head_of_line_blocking(make_runtime: Any, journal: Journal) -> None:
    """A hot key with most of the queue, at its cap, does not hold up the cold keys."""
    rt = make_runtime(limits=af.Limits(max_concurrent=64, max_concurrent_per_key=2))
    wf = _register(rt, journal)
    journal.gate("key:cold").set()
    items = [{"id": f"hot{n}", "params": {"key": "hot"}, "key": "hot"} for n in range(600)]
    cold = [
        {"id": f"c{k}-{n}", "params": {"key": "cold"}, "key": f"c{k}"}
        for n in range(3)
        for k in range(20)
    ]
    # The hot key's entries come first in the queue, then the cold ones interleaved.
    wf.create_batch(items[:300] + cold[:30] + items[300:] + cold[30:])
    for c in cold:
        assert wf.get(c["id"]).wait(timeout=20).status == "complete"
    kc: KeyCount = journal.data["kc"]
    assert sum(1 for iid in kc.starts if iid.startswith("hot")) == 2
    assert rt.metrics().workflows["keyed"].queued_by_key == {"hot": 598}
    journal.gate("key:hot").set()
    wait_for(lambda: wf.get("hot599").status().status == "complete", timeout=30)
    assert kc.peak["hot"] == 2
    hot = [iid for iid in kc.starts if iid.startswith("hot")]
    assert hot == [f"hot{n}" for n in range(600)]


def test_bad_input_is_refused_by_name(rt: af.Runtime, journal: Journal) -> None:
    wf = _register(rt, journal)
    bad: list[dict[str, Any]] = [
        {"priority": 1.5},
        {"priority": "1"},
        {"priority": True},
        {"priority": 2**31},
        {"priority": -(2**31) - 1},
        {"key": ""},
        {"key": 7},
        {"key": "x" * 101},
        {"key": b"bytes"},
    ]
    for kw in bad:
        with pytest.raises(af.InvalidFlowControl) as info:
            wf.create(id="bad", params={"key": "k"}, **kw)
        assert "'keyed'" in str(info.value) and "'bad'" in str(info.value), kw
        assert (info.value.workflow, info.value.instance) == ("keyed", "bad")
        with pytest.raises(af.InvalidFlowControl):
            wf.create_batch([{"id": "ok"}, {"id": "bad2", **kw}])
        with pytest.raises(af.InstanceNotFound):
            wf.get("bad")
        with pytest.raises(af.InstanceNotFound):
            wf.get("ok")
    assert isinstance(af.InvalidFlowControl("x"), ValueError)
    for n in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="max_concurrent_per_key"):
            af.Limits(max_concurrent_per_key=n)
    with pytest.raises(ValueError, match=r"per_workflow\['w'\].*max_concurrent_per_key"):
        af.Limits(per_workflow={"w": {"max_concurrent_per_key": 0}})
    # The runtime goes on working.
    journal.gate("key:k").set()
    ok = wf.create(id="fine", params={"key": "k"}, key="x" * 100, priority=-(2**31))
    assert ok.wait(timeout=10).status == "complete"
    assert ok.describe().key == "x" * 100
