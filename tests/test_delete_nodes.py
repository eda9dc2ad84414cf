"""Deletes on several node processes: through a node that does not own the
instance, racing its owner, and a node SIGKILLed in the middle of deleting.

The location is a data directory, or a PostgreSQL database with ``--backend=postgres``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest

import actorflow as af
from actorflow.cluster.lease import OWNED, OWNER
from actorflow.core.storage import open_storage
from actorflow.workflows.records import (
    EVENTS,
    FENCE,
    HIST,
    IDS,
    INST,
    STEPS,
    events_prefix,
    hist_prefix,
    ikey,
    rkey,
    steps_prefix,
)

WF = "greeter"


def _record_keys(location: str, ids: list[str]) -> dict[str, bytes]:
    store = open_storage(location)
    try:
        out = {}
        for iid in ids:
            n = store.get(IDS, ikey(WF, iid))
            assert n is not None
            out[iid] = rkey(WF, n)
        return out
    finally:
        store.close()


def _presence(location: str, rks: dict[str, bytes]) -> dict[str, dict[str, bool]]:
    """For each instance, which of its records exist."""
    store = open_storage(location)
    try:
        out = {}
        for iid, rk in rks.items():
            ik = ikey(WF, iid)
            out[iid] = {
                "ids": store.get(IDS, ik) is not None,
                "inst": store.get(INST, rk) is not None,
                "fence": store.get(FENCE, rk) is not None,
                "steps": bool(store.scan(STEPS, prefix=steps_prefix(rk), limit=1)),
                "events": bool(store.scan(EVENTS, prefix=events_prefix(rk), limit=1)),
                "hist": bool(store.scan(HIST, prefix=hist_prefix(rk), limit=1)),
                "owner": store.get(OWNER, ik) is not None,
            }
        return out
    finally:
        store.close()


def _owned_count(location: str) -> int:
    store = open_storage(location)
    try:
        return len(store.scan(OWNED, keys_only=True))
    finally:
        store.close()


def test_a_delete_through_another_node_takes_the_instance_over_and_removes_it(
    nodes: Any, location: str
) -> None:
    a, b = nodes("a"), nodes("b")
    ids = [f"g{i}" for i in range(20)]
    a.create_batch(WF, [{"id": i, "params": {"name": i}} for i in ids])
    for i in ids:
        a.wait_for_status(WF, i, "waiting")
    a.send_event(WF, ids[0], "unrelated", 1)  # a buffered event to remove as well
    rks = _record_keys(location, ids)
    gone = ids[:10]
    for i in gone[:5]:
        b.control(WF, i, "delete")
    assert b.delete_batch(WF, gone[5:]) == {"deleted": gone[5:], "errors": []}
    presence = _presence(location, rks)
    for i in gone:
        assert not any(presence[i].values()), (i, presence[i])
    for i in ids[10:]:
        assert all(v for k, v in presence[i].items() if k != "events"), (i, presence[i])
    assert _owned_count(location) == 10
    for node in (a, b):
        with pytest.raises(af.InstanceNotFound):
            node.send_event(WF, gone[0], "ok", 1)
        with pytest.raises(af.InstanceNotFound):
            node.status(WF, gone[0])
    # The owner goes on with the others; the deleted ids can be created again.
    for i in ids[10:]:
        b.send_event(WF, i, "ok", 1)
    for i in ids[10:]:
        assert a.wait_for_status(WF, i, "complete")["output"]["pid"] == a.pid
    b.create(WF, id=gone[0], params={"name": "again"})
    b.send_event(WF, gone[0], "ok", 2)
    assert b.wait_for_status(WF, gone[0], "complete")["output"]["ok"] == 2
    assert a.stats()["crashes"] == 0 and b.stats()["crashes"] == 0


def test_a_node_killed_while_deleting_leaves_each_instance_whole_or_gone(
    nodes: Any, location: str
) -> None:
    # b's commits are slow (100 ms each), so its deletes are still going on
    # when it is killed, however slow this machine is.
    a, b = nodes("a"), nodes("b", "apps.node_app:slow_commits_factory")
    ids = [f"g{i}" for i in range(400)]
    a.create_batch(WF, [{"id": i, "params": {"name": i}} for i in ids])
    for i in ids:
        a.wait_for_status(WF, i, "waiting")
    rks = _record_keys(location, ids)
    # b deletes them 50 at a time, and is SIGKILLed in the middle of the third
    # batch: once it has taken over one of that batch's instances (the first
    # write of a delete through a node that does not own the instance).
    for n in (0, 50):
        assert b.delete_batch(WF, ids[n : n + 50])["errors"] == []
    third = ids[100:150]
    b.submit("delete_batch", workflow=WF, ids=third)
    store = open_storage(location)  # one reader, polled: the window is one slow commit
    try:
        deadline = time.monotonic() + 30
        while not any(store.get(OWNER, ikey(WF, i)) == b"b" for i in third):
            assert time.monotonic() < deadline, b.log_tail()
            time.sleep(0.001)
        b.kill()
    finally:
        store.close()
    presence = _presence(location, rks)
    whole = [i for i, p in presence.items() if all(v for k, v in p.items() if k != "events")]
    gone = [i for i, p in presence.items() if not any(p.values())]
    assert sorted(whole + gone) == sorted(ids), {
        i: p for i, p in presence.items() if i not in whole and i not in gone
    }
    assert len(gone) >= 100 and whole, (len(gone), len(whole))
    # What is left works: a live node deletes the rest (b's share is adopted
    # by nobody: b owned none of them), and the owner runs none of the deleted.
    for n in range(0, len(whole), 100):
        out = a.delete_batch(WF, whole[n : n + 100])
        assert out == {"deleted": whole[n : n + 100], "errors": []}
    assert not any(any(p.values()) for p in _presence(location, rks).values())
    assert _owned_count(location) == 0
    a.create(WF, id=ids[0], params={"name": "again"})
    a.send_event(WF, ids[0], "ok", 3)
    assert a.wait_for_status(WF, ids[0], "complete")["output"]["ok"] == 3
    assert a.stats()["crashes"] == 0


def test_events_through_another_node_racing_deletes_leave_nothing_behind(
    nodes: Any, location: str
) -> None:
    a, b = nodes("a"), nodes("b")
    ids = [f"g{i}" for i in range(60)]
    a.create_batch(WF, [{"id": i, "params": {"name": i}} for i in ids])
    for i in ids:
        a.wait_for_status(WF, i, "waiting")
    rks = _record_keys(location, ids)
    # b stores events for instances a owns (and pokes a) while a deletes them.
    sent = [
        b.submit("send_event", workflow=WF, id=i, type="other", payload=n)
        for n in range(3)
        for i in ids
    ]
    assert a.delete_batch(WF, ids) == {"deleted": ids, "errors": []}
    for fut in sent:
        try:
            fut.result(30)
        except af.InstanceNotFound:
            pass  # refused: the instance was gone
    assert a.wait_until_idle() and b.wait_until_idle()
    presence = _presence(location, rks)
    assert [i for i, p in presence.items() if any(p.values())] == []
    assert a.stats()["crashes"] == 0 and b.stats()["crashes"] == 0
