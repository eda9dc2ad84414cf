"""Several node processes on one location: ownership, events, adoption, fencing.

The location is a data directory, or a PostgreSQL database with ``--backend=postgres``.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import pytest

import actorflow as af
from actorflow.cluster.lease import NODES, OWNER
from actorflow.core.storage import Storage, is_database_url, open_storage
from actorflow.testing import NodeProcess
from actorflow.testkit.node import EXIT_LEASE_LOST
from actorflow.workflows.records import IDS, STEPS, load, rkey, step_key

APP = "apps.node_app:factory"
LEASE = 1.0


def read(data: str, keyspace: str, key: bytes) -> bytes | None:
    store = open_storage(data)
    try:
        return store.get(keyspace, key)
    finally:
        store.close()


def test_each_node_runs_what_it_created(nodes, location: str) -> None:
    a, b = nodes("a"), nodes("b")
    a.create("greeter", id="ga", params={"name": "a"})
    b.create("greeter", id="gb", params={"name": "b"})
    for node, iid in ((a, "ga"), (b, "gb")):
        node.wait_for_status("greeter", iid, "waiting")
        node.send_event("greeter", iid, "ok", 1)
    assert a.wait_for_status("greeter", "ga", "complete")["output"]["pid"] == a.pid
    assert b.wait_for_status("greeter", "gb", "complete")["output"]["pid"] == b.pid
    assert read(location, OWNER, b"greeter\x00ga") == b"a"
    assert read(location, OWNER, b"greeter\x00gb") == b"b"


def test_an_event_through_another_node_reaches_the_owner(nodes) -> None:
    a, b = nodes("a"), nodes("b")
    a.create_batch("greeter", [{"id": f"g{i}", "params": {"name": str(i)}} for i in range(20)])
    for i in range(20):
        a.wait_for_status("greeter", f"g{i}", "waiting")
    for i in range(20):
        b.send_event("greeter", f"g{i}", "ok", {"via": "b", "i": i})
    for i in range(20):
        st = b.wait_for_status("greeter", f"g{i}", "complete")
        assert st["output"]["ok"] == {"via": "b", "i": i}
        assert st["output"]["pid"] == a.pid  # it stayed with its owner
    assert b.stats()["started"] == 0  # b never ran any of them


def test_a_killed_nodes_instances_are_adopted_after_its_lease(nodes, location: str) -> None:
    a, b = nodes("a"), nodes("b")
    a.create_batch("greeter", [{"id": f"g{i}", "params": {"name": str(i)}} for i in range(30)])
    for i in range(30):
        a.wait_for_status("greeter", f"g{i}", "waiting")
    for i in range(10):  # buffered with the owner before it dies
        b.send_event("greeter", f"g{i}", "ok", i)
    a.kill()
    killed = time.monotonic()
    for i in range(10, 30):  # sent while nobody owns them: picked up by the adopter
        b.send_event("greeter", f"g{i}", "ok", i)
    for i in range(30):
        st = b.wait_for_status("greeter", f"g{i}", "complete", timeout=30)
        assert st["output"]["ok"] == i
    took = time.monotonic() - killed
    assert took < LEASE + 5
    adoptions = b.stats()["adoptions"]
    assert [x["node"] for x in adoptions] == ["a"]
    rec = load(read(location, NODES, b"a") or b"")
    assert rec["state"] == "adopted" and rec["adopted_by"] == "b"


def test_a_clean_exit_hands_instances_over_at_once(location: str) -> None:
    data = location
    with NodeProcess(data, APP, node_id="b", lease_timeout=60) as b:
        with NodeProcess(data, APP, node_id="a", lease_timeout=60) as a:
            a.create("greeter", id="g1", params={"name": "x"})
            a.wait_for_status("greeter", "g1", "waiting")
        t0 = time.monotonic()
        b.send_event("greeter", "g1", "ok", 1)
        assert b.wait_for_status("greeter", "g1", "complete", timeout=20)["output"]["pid"] == b.pid
        assert time.monotonic() - t0 < 10  # not the 60 s lease


def test_a_control_call_through_another_node_takes_the_instance_over(nodes) -> None:
    a, b = nodes("a"), nodes("b")
    a.create("greeter", id="g1", params={"name": "x"})
    a.wait_for_status("greeter", "g1", "waiting")
    b.control("greeter", "g1", "pause")
    assert a.wait_for_status("greeter", "g1", "paused")["status"] == "paused"
    b.control("greeter", "g1", "resume")
    a.send_event("greeter", "g1", "ok", "through a")  # a no longer owns it: a poke to b
    st = a.wait_for_status("greeter", "g1", "complete", timeout=20)
    assert st["output"] == {"hello": "hello x", "ok": "through a", "pid": b.pid}


def test_a_frozen_node_cannot_commit_after_adoption(nodes, location: str, tmp_path: Path) -> None:
    """SIGSTOP a node mid-step; another adopts; SIGCONT: nothing of it lands, it exits."""
    data, journal = location, tmp_path / "journal.txt"
    a = nodes("a", SLOW_MS="1500")
    b = nodes("b", SLOW_MS="4000")
    a.create("slow", id="s1", params={"journal": str(journal)})
    deadline = time.monotonic() + 10
    while not (journal.exists() and f"start {a.pid}" in journal.read_text()):
        assert time.monotonic() < deadline, "a never started the step"
        time.sleep(0.01)
    patience = LEASE * 4
    if is_database_url(data):
        from actorflow.core.pg_backend import IDLE_IN_TRANSACTION

        # Frozen inside its group transaction, a holds the database's write lock
        # until the server ends that transaction: nobody adopts before then.
        patience += IDLE_IN_TRANSACTION
    for _ in range(5):
        a.send_signal(signal.SIGSTOP)
        deadline = time.monotonic() + patience
        while f"start {b.pid}" not in journal.read_text() and time.monotonic() < deadline:
            time.sleep(0.01)  # b adopts it and runs the step
        if f"start {b.pid}" in journal.read_text():
            break
        # Frozen in the middle of a write, a holds the host's LMDB write lock: no
        # node can write, and none counts that time against a's lease. Again.
        a.send_signal(signal.SIGCONT)
        time.sleep(0.05)
    else:
        pytest.fail("b never adopted the instance")
    a.send_signal(signal.SIGCONT)  # a's step ends now, long before b's
    assert a.wait(timeout=15) == EXIT_LEASE_LOST  # it noticed its lease was gone
    key = step_key(rkey("slow", read(data, IDS, b"slow\x00s1") or b""), "do", "slow", 1)
    # Whether a's body got to its end before a stopped or not, its result never landed.
    assert read(data, STEPS, key) is None
    st = b.wait_for_status("slow", "s1", "complete", timeout=20)
    assert st["output"] == b.pid  # the one committed result is b's
    rec = load(read(data, STEPS, key) or b"")
    assert len(rec["att"]) == 1 and rec["att"][0][2] is None
    assert "lease" in a.log_tail()


def _seed_instance(
    store: Storage, ik: bytes, n: int, owner: str, status: str, epoch: int = 3
) -> bytes:
    """Writes instance ``ik`` (record number ``n``); returns the key of its records."""
    from actorflow.cluster.lease import claim_ops
    from actorflow.core.storage import WriteBatch
    from actorflow.workflows.records import FENCE, INST, dump, epoch_bytes, record_number

    rk = rkey(ik.split(b"\x00")[0].decode(), record_number(n))
    batch = WriteBatch()
    batch.put(IDS, ik, record_number(n))
    batch.put(INST, rk, dump({"s": status, "epoch": epoch}))
    batch.put(FENCE, rk, epoch_bytes(epoch))
    claim_ops(batch, ik, owner, None)
    store.write(batch)
    return rk


def test_adoption_moves_owner_and_epoch_and_fences_the_old_owner(location: str) -> None:
    """In one process, on storage: an expired node's unfinished instances change hands."""
    from actorflow.cluster.lease import OWNED, NodeLease, owned_key
    from actorflow.core.storage import ConflictError, WriteBatch
    from actorflow.workflows.adoption import claimer_for
    from actorflow.workflows.records import FENCE, INST, epoch_bytes

    store = open_storage(location)
    try:
        old = NodeLease(store, "old", timeout=0.05)
        assert old.join() == 0
        new = NodeLease(store, "new", timeout=60)
        new.claimer = claimer_for(new)  # as a runtime wires it
        assert new.join() == 1  # a distinct sequence slot while "old" is alive
        run = _seed_instance(store, b"wf\x00run", 1, "old", "running")
        _seed_instance(store, b"wf\x00done", 2, "old", "complete")
        adopted: list[list[tuple[bytes, str]]] = []
        new.on_adopted = adopted.append
        new.check_others()  # sees "old" beat once...
        assert not adopted
        time.sleep(0.1)  # ...and then not again for longer than its lease...
        new.check_others()
        assert not adopted  # ...but "new" itself has not beaten since: it cannot tell
        for _ in range(3):
            new.beat()
        new.check_others()
        assert adopted == [[(b"wf\x00run", "running")]]
        assert store.get(OWNER, b"wf\x00run") == b"new"
        assert store.get(FENCE, run) == epoch_bytes(4)
        assert load(store.get(INST, run) or b"")["epoch"] == 4
        assert store.get(OWNED, owned_key("new", b"wf\x00run")) == b""
        assert not store.scan(OWNED, prefix=b"old\x00")  # the finished one's entry is dropped
        assert store.get(OWNER, b"wf\x00done") == b"old"
        # The old owner's next write, guarded on the epoch it had, fails.
        stale = WriteBatch().guard(FENCE, run, epoch_bytes(3)).put(INST, run, b"x")
        with pytest.raises(ConflictError):
            store.write(stale)
        # Its heartbeat fails too: it finds out that its lease is gone.
        lost: list[bool] = []
        old.on_lost = lambda: lost.append(True)
        old.beat()
        assert old.lost and lost == [True]
        rec = load(store.get(NODES, b"old") or b"")
        assert (rec["state"], rec["was"], rec["adopted_by"], rec["adopted_n"]) == (
            "adopted",
            "alive",
            "new",
            1,
        )
        new.check_others()  # adopted once only
        assert len(adopted) == 1
    finally:
        store.close()


def test_a_live_node_is_not_adopted_and_a_rejoin_is_a_new_incarnation(location: str) -> None:
    from actorflow.cluster.lease import NodeLease
    from actorflow.workflows.adoption import claimer_for

    store = open_storage(location)
    try:
        a = NodeLease(store, "a", timeout=60)
        a.join()
        b = NodeLease(store, "b", timeout=60)
        b.claimer = claimer_for(b)
        b.join()
        _seed_instance(store, b"wf\x00x", 1, "a", "waiting")
        b.check_others()
        assert store.get(OWNER, b"wf\x00x") == b"a"
        a.beat()
        assert not a.lost
        again = NodeLease(store, "a", timeout=60)  # the same node, restarted
        assert again.join() == 0  # keeps its slot
        assert again.record["inc"] == 2
        a.beat()  # the previous incarnation finds itself replaced
        assert a.lost
    finally:
        store.close()


def test_a_terminate_through_another_node_fences_the_running_owner(
    nodes, location: str, tmp_path: Path
) -> None:
    """b terminates an instance a is running: a's commit of the step in flight is refused."""
    data, journal = location, tmp_path / "journal.txt"
    a, b = nodes("a", SLOW_MS="1500"), nodes("b")
    a.create("slow", id="s1", params={"journal": str(journal)})
    deadline = time.monotonic() + 10
    while not (journal.exists() and f"start {a.pid}" in journal.read_text()):
        assert time.monotonic() < deadline, "a never started the step"
        time.sleep(0.01)
    b.control("slow", "s1", "terminate")
    assert b.status("slow", "s1")["status"] == "terminated"
    deadline = time.monotonic() + 10
    while f"end {a.pid}" not in journal.read_text():  # a's body ends, its commit is refused
        assert time.monotonic() < deadline, "a's step never ended"
        time.sleep(0.01)
    time.sleep(0.5)
    rk = rkey("slow", read(data, IDS, b"slow\x00s1") or b"")
    assert read(data, STEPS, step_key(rk, "do", "slow", 1)) is None
    assert a.status("slow", "s1")["status"] == "terminated"
    assert a.alive and not a.stats()["lease_lost"]  # a lost one instance, not its lease
    assert read(data, OWNER, b"slow\x00s1") == b"b"


def test_a_node_whose_run_was_fenced_takes_the_instance_back_on_the_next_call(
    location: str,
) -> None:
    """Another node took the instance over while this node's run was in a step body.

    The first call through this node finds the move (and says so); the next one
    takes the instance back at once, although the body has not returned: the
    fenced run writes nothing, and the instance resumes from what is durable.
    """
    from actorflow.cluster.lease import claim_ops
    from actorflow.core.storage import WriteBatch
    from actorflow.workflows.records import FENCE, INST, dump, epoch_bytes

    gate, entered, returned = threading.Event(), threading.Event(), threading.Event()
    bodies: list[int] = []

    def hold() -> str:
        bodies.append(1)
        entered.set()
        gate.wait(30)
        returned.set()
        return "held"

    class Held(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> str:
            return str(step.do("hold", hold))

    with af.Runtime(location, node_id="a", lease_timeout=60) as rt:
        inst = rt.register(Held).create(id="h1")
        assert entered.wait(10)
        ik = b"Held\x00h1"
        rk = rkey("Held", rt.storage.get(IDS, ik) or b"")
        rec = load(rt.storage.get(INST, rk) or b"")
        # Node "b" takes it over: its epoch moves, b owns it.
        moved = dict(rec, epoch=rec["epoch"] + 1)
        batch = WriteBatch().put(INST, rk, dump(moved)).put(FENCE, rk, epoch_bytes(moved["epoch"]))
        claim_ops(batch, ik, "b", "a")
        rt.storage.write(batch)
        with pytest.raises(af.InvalidInstanceState, match="moved to another node"):
            inst.pause()
        inst.pause()  # the body still holds its step: a takes the instance back anyway
        assert rt.storage.get(OWNER, ik) == b"a"
        assert inst.status().status == "paused"
        gate.set()  # the fenced run's body returns now: its result is not written
        assert returned.wait(10)
        rt.wait_until_idle()
        assert inst.steps() == [] and inst.status().status == "paused"
        inst.resume()
        assert inst.wait(timeout=20).output == "held"
        assert len(bodies) == 2  # the first result was never committed: the body ran again
        assert [s.name for s in inst.steps()] == ["hold"]
