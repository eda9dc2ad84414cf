"""Keyed flow control: ``create(key=, priority=)`` and ``Limits(max_concurrent_per_key=)``."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path
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
    # A key's slot is given back on the engine loop right after the final commit,
    # which wait() may see first.
    assert rt.wait_until_idle(10)
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


def test_queued_keys_and_priorities_survive_a_restart(
    make_runtime: Any, location: str, journal: Journal
) -> None:
    first = make_runtime()
    wf = first.unregistered("keyed")  # queues only: nothing runs here
    wf.create_batch(
        [
            {"id": f"{k}{n}", "params": {"key": k}, "key": k, "priority": -n}
            for k in ("a", "b")
            for n in range(4)
        ]
    )
    wf.create(id="low", params={"key": "c"}, priority=9)
    wf.create(id="high", params={"key": "c"}, key="c", priority=-9)
    first.close()
    rt = make_runtime(limits=af.Limits(max_concurrent=10, max_concurrent_per_key=1))
    wf = _register(rt, journal)
    d = wf.get("a1").describe()
    assert (d.status, d.key, d.priority) == ("queued", "a", -1)
    journal.gate("key:c").set()
    assert wf.get("low").wait(timeout=10).status == "complete"
    kc: KeyCount = journal.data["kc"]
    assert kc.starts.index("high") < kc.starts.index("low")
    wait_for(lambda: sorted(kc.starts) == ["a3", "b3", "high", "low"])
    assert rt.wait_until_idle(0.2) is False  # a3 and b3 hold their keys
    journal.gate("key:a").set()
    journal.gate("key:b").set()
    for k in ("a", "b"):
        for n in range(4):
            assert wf.get(f"{k}{n}").wait(timeout=10).status == "complete"
    assert [i for i in kc.starts if i[0] == "a"] == ["a3", "a2", "a1", "a0"]
    assert kc.peak["a"] == kc.peak["b"] == 1


def test_each_node_enforces_the_cap_for_what_it_runs(location: str, tmp_path: Path) -> None:
    from actorflow.testing import NodeProcess

    log = tmp_path / "journal.txt"
    env = {"SLOW_MS": "20", "KEY_CAP": "1"}
    app = "apps.node_app:factory"
    with (
        NodeProcess(location, app, node_id="a", lease_timeout=5, env=env) as a,
        NodeProcess(location, app, node_id="b", lease_timeout=5, env=env) as b,
    ):
        ids = []
        for node in (a, b):
            items = [
                {
                    "id": f"{node.node_id}-{k}-{n}",
                    "params": {"journal": str(log), "key": f"k{k}"},
                    "key": f"k{k}",
                }
                for n in range(8)
                for k in range(3)
            ]
            ids += [(node, i) for i in node.create_batch("keyed", items)]
        pids = {}
        for node, iid in ids:
            pids[iid] = node.wait_for_status("keyed", iid, "complete", timeout=60)["output"]
        assert {pids[i] for _, i in ids if i.startswith("a-")} == {a.pid}
        assert {pids[i] for _, i in ids if i.startswith("b-")} == {b.pid}
    running: Counter[tuple[str, str]] = Counter()
    per_node_peak: Counter[tuple[str, str]] = Counter()
    across: Counter[str] = Counter()
    across_peak: Counter[str] = Counter()
    for line in log.read_text().splitlines():
        what, pid, key = line.split()
        step = 1 if what == "start" else -1
        running[(pid, key)] += step
        across[key] += step
        per_node_peak[(pid, key)] = max(per_node_peak[(pid, key)], running[(pid, key)])
        across_peak[key] = max(across_peak[key], across[key])
    assert len(per_node_peak) == 6  # both nodes ran every key
    assert set(per_node_peak.values()) == {1}  # the cap holds on each node
    # Not a global cap: each node enforces its own, so a key runs at most once per node.
    assert max(across_peak.values()) <= 2


class KeyedSleeper(af.Workflow):
    """A step, a sleep of a minute, then a step that blocks on gate ``"b"``."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        iid = event.instance_id

        def second() -> None:
            j.data["kc"].enter("sleeper:k", iid + ".b")
            j.add(("start", "k", iid + ".b"))
            try:
                j.block("b")
            finally:
                j.data["kc"].leave("sleeper:k")

        step.do("a", lambda: j.data["kc"].starts.append(iid + ".a"))
        step.sleep("nap", "1 minute")
        step.do("b", second)


def test_a_sleeping_instance_gives_its_key_slot_back_and_wakes_first(
    make_runtime: Any, journal: Journal, clock: Any
) -> None:
    rt = make_runtime(limits=af.Limits(max_concurrent=10, max_concurrent_per_key=1))
    journal.data["kc"] = KeyCount()
    sleeper = rt.register(KeyedSleeper, name="sleeper", env=journal)
    keyed = rt.register(Keyed, name="keyed", env=journal)
    kc: KeyCount = journal.data["kc"]
    s1 = sleeper.create(id="s1", key="k")
    s1.wait_for_status("waiting")
    # Sleeping, it holds no slot of its key: another instance of the key starts.
    n1 = keyed.create(id="n1", params={"key": "k"}, key="k")
    wait_for(lambda: "n1" in kc.starts)
    # Keys are per workflow: "k" of "keyed" is full, "k" of "sleeper" is not.
    s2 = sleeper.create(id="s2", key="k")
    s2.wait_for_status("waiting")
    n2 = keyed.create(id="n2", params={"key": "k"}, key="k")
    assert rt.metrics().workflows["keyed"].queued_by_key == {"k": 1}
    # (its slot is given back on the loop just after the "waiting" commit)
    wait_for(lambda: rt.metrics().workflows["sleeper"].running_by_key == {})
    s3 = sleeper.create(id="s3", key="k", priority=-1)  # runs at once: "k" is free
    wait_for(lambda: "s3.a" in kc.starts)
    s3.wait_for_status("waiting")
    clock.advance("1 minute", settle_timeout=0.2)
    # s1, s2 and s3 woke: one of them runs its second step, the others wait for "k".
    wait_for(lambda: sum(1 for i in kc.starts if i.endswith(".b")) == 1)
    assert rt.wait_until_idle(0.2) is False
    assert rt.metrics().workflows["sleeper"].running_by_key == {"k": 1}
    assert {s.status().status for s in (s1, s2, s3)} == {"running", "queued"}
    # A new instance of the key, however urgent, goes after the woken ones.
    s4 = sleeper.create(id="s4", key="k", priority=-100)
    journal.gate("b").set()
    for s in (s1, s2, s3):
        assert s.wait(timeout=10).status == "complete"
    wait_for(lambda: "s4.a" in kc.starts)
    assert kc.starts.index("s4.a") > max(kc.starts.index(f"s{n}.b") for n in (1, 2, 3))
    s4.wait_for_status("waiting")
    assert kc.peak["sleeper:k"] == 1
    assert n2.status().status == "queued"  # "keyed"'s "k" is still held by n1
    journal.gate("key:k").set()
    assert n1.wait(timeout=10).status == n2.wait(timeout=10).status == "complete"
    assert kc.starts.index("n2") > kc.starts.index("n1")
    assert kc.peak["k"] == 1


class Quick(af.Workflow):
    """Returns at once, except on the hot key, whose bodies block on gate ``"hot"``."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        key = event.payload

        def body() -> None:
            j.add(key)
            if key == "hot":
                j.block("hot", timeout=900)

        step.do("work", body)


@pytest.mark.slow
@pytest.mark.timeout(900)  # the hot key drains two at a time: minutes on a loaded machine
def test_ten_thousand_queued_over_a_hundred_keys(make_runtime: Any, journal: Journal) -> None:
    """The issue's figure: 10,000 queued, 5,000 on one hot key capped at 2."""
    rt = make_runtime(limits=af.Limits(max_concurrent=200, max_concurrent_per_key=2))
    wf = rt.register(Quick, name="quick", env=journal)
    items = []
    for n in range(10_000):
        key = "hot" if n % 2 == 0 else f"k{n % 99}"
        items.append({"id": f"i{n}", "params": key, "key": key})
    wf.create_batch(items)
    cold = [i["id"] for i in items if i["key"] != "hot"]
    for iid in cold:
        assert wf.get(iid).wait(timeout=60).status == "complete"
    assert journal.counts()["hot"] == 2
    m = rt.metrics().workflows["quick"]
    assert m.queued_by_key == {"hot": 4_998} and m.queued_keys == 1
    assert m.running_by_key == {"hot": 2}
    journal.gate("hot").set()
    wait_for(lambda: rt.metrics().counts.get("complete") == 10_000, timeout=800)
    assert journal.counts()["hot"] == 5_000


def test_http_and_cli_take_and_show_keys(
    make_runtime: Any, location: str, journal: Journal
) -> None:
    import json

    from click.testing import CliRunner
    from starlette.testclient import TestClient

    from actorflow.cli import cli
    from actorflow.http import create_app

    rt = make_runtime(limits=af.Limits(max_concurrent_per_key=1))
    _register(rt, journal)
    app = create_app(rt)
    base = "/api/workflows/keyed/instances"
    with TestClient(app, headers={"Authorization": f"Bearer {app.state.token}"}) as c:
        r = c.post(base, json={"id": "h1", "params": {"key": "h"}, "key": "h", "priority": 3})
        assert r.status_code == 201, r.text
        r = c.post(
            base + "/batch",
            json=[{"id": f"h{n}", "params": {"key": "h"}, "key": "h"} for n in (2, 3)],
        )
        assert r.status_code == 201, r.text
        wait_for(lambda: "h1" in journal.data["kc"].starts)
        got = c.get(base + "/h2").json()["result"]["description"]
        assert (got["key"], got["priority"]) == ("h", 0)
        assert c.get(base + "/h1").json()["result"]["description"]["priority"] == 3
        m = c.get("/api/metrics").json()["result"]["metrics"]["workflows"]["keyed"]
        assert m["queued_by_key"] == {"h": 2} and m["running_by_key"] == {"h": 1}
        assert m["queued_keys"] == 1
        assert m["max_concurrent_per_key"] == 1
        r = c.post(base, json={"id": "h4", "params": {"key": "h"}, "key": "h", "priority": 2.0})
        assert r.status_code == 201, r.text  # JSON's 2.0 is the integer 2
        assert c.get(base + "/h4").json()["result"]["description"]["priority"] == 2
        for bad in ({"priority": "high"}, {"key": ""}, {"priority": 2**40}, {"priority": 1.5}):
            r = c.post(base, json={"id": "bad", **bad})
            assert r.status_code == 400, r.text
            [err] = r.json()["errors"]
            assert err["name"] == "InvalidFlowControl" and "'bad'" in err["message"]
        assert c.get(base + "/bad").status_code == 404
        doc = c.get("/openapi.json").json()
        props = doc["components"]["schemas"]["CreateInstance"]["properties"]
        assert {"key", "priority"} <= set(props)
    if location.startswith("postgres"):
        return  # the command reads a data directory here
    rt.close()
    out = CliRunner().invoke(cli, ["--data", location, "--json", "metrics"], catch_exceptions=False)
    assert out.exit_code == 0, out.output
    keyed = json.loads(out.output)["workflows"]["keyed"]
    assert keyed["queued_by_key"] == {"h": 4} and keyed["queued_keys"] == 1
    out = CliRunner().invoke(cli, ["--data", location, "metrics"], catch_exceptions=False)
    assert "queued_by_key" in out.output and "h=4" in out.output
