"""Calls through a node that was adopted while still alive: frozen, or too slow to renew its lease.

Two node processes, ``a`` and ``b``, share a data directory (lease 1 s). Node
``a`` is frozen with SIGSTOP until ``b`` has adopted it; calls are then sent
through ``a`` while it is still frozen, so that they sit in its input and
reach it when it thaws, after the adoption. (Or ``a``'s heartbeat thread
stalls while the rest of it serves calls: it is adopted while it answers.)

A thawed node may refuse such a call (nothing was acknowledged) or acknowledge
it; an acknowledged call must take effect on the live nodes: a created or
resumed instance runs to its end, an event is consumed, a pause or terminate
is in the instance's record. The audit (:mod:`apps.accounting`) counts what
did not: stranded instances, lost calls, doubled step runs or events, and
refused calls that wrote something anyway; every count must be 0.
"""

from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from apps.accounting import ACKED, REFUSED, UNKNOWN, Audit, Call, DataDir, Ledger, Stored, read_back
from apps.chaos_app import JOURNAL_ENV, STALL_ENV

from actorflow.core.errors import InstanceNotFound
from actorflow.testing import NodeProcess
from actorflow.testkit.node import EXIT_LEASE_LOST

APP = "apps.chaos_app:factory"
WF = "chaos"
LEASE = 1.0
#: How long an acknowledged instance may take to run to its end on ``b``.
FINISH_S = 10.0
RUN = {"sleep_ms": 0, "events": 0, "work_ms": 1}  # ten steps, then complete
WAIT = {"sleep_ms": 0, "events": 1, "work_ms": 1}  # waits for one "go" event at step 6


class Pair:
    """Nodes ``a`` and ``b`` on one data directory, and the ledger of calls through them."""

    def __init__(self, tmp: Path) -> None:
        self.data, self.journal = tmp / "data", tmp / "journal.txt"
        self.stall = tmp / "stall-a"
        env = {JOURNAL_ENV: str(self.journal)}
        self.a = NodeProcess(
            self.data,
            APP,
            node_id="a",
            lease_timeout=LEASE,
            env={**env, STALL_ENV: str(self.stall)},
        )
        self.b = NodeProcess(self.data, APP, node_id="b", lease_timeout=LEASE, env=env)
        self.ledger = Ledger()
        self.a_pid = ""

    def start(self) -> None:
        self.a.start()
        self.b.start()
        self.a_pid = str(self.a.pid)

    def close(self) -> None:
        for node in (self.a, self.b):
            if node.alive:
                node.send_signal(signal.SIGCONT)
            node.kill()  # also reaps one that exited by itself, and closes its pipes

    # -- setting the scene ----------------------------------------------------------

    def make(
        self, node: NodeProcess, iids: list[str], params: dict[str, Any], status: str | None = None
    ) -> None:
        """Creates instances through ``node``; waits until each is in ``status``."""
        node.create_batch(WF, [{"id": i, "params": params} for i in iids])
        if status is not None:
            for iid in iids:
                node.wait_for_status(WF, iid, status, timeout=20)

    def adopted(self) -> bool:
        return any(x["node"] == "a" for x in self.b.stats()["adoptions"])

    def wait_adopted(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.adopted():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def freeze_until_adopted(self) -> None:
        """SIGSTOPs ``a`` and waits until ``b`` has adopted it; ``a`` stays frozen."""
        for _ in range(5):
            self.a.send_signal(signal.SIGSTOP)
            if self.wait_adopted(LEASE * 4 + 2):
                return
            # Frozen in the middle of a write, a holds the host's LMDB write lock:
            # no node can write, and none counts that time against a's lease. Again.
            self.a.send_signal(signal.SIGCONT)
            self.a.ping()
        pytest.fail("b never adopted the frozen node a")

    def stall_until_adopted(self) -> None:
        """Stalls ``a``'s heartbeat thread until ``b`` has adopted it; ``a`` serves calls."""
        self.stall.touch()
        if not self.wait_adopted(LEASE * 4 + 5):
            pytest.fail("b never adopted node a, whose heartbeats stalled")

    def through_a(
        self, op: str, iids: list[str], params: dict[str, Any] | None = None
    ) -> list[Call]:
        """Sends ``op`` for each instance through ``a`` (frozen: it reads them when it thaws)."""
        return [
            self.ledger.send(self.a, Call(op, WF, iid, "a", token=self.token(op)), params)
            for iid in iids
        ]

    def batch_through_a(self, iids: list[str], params: dict[str, Any]) -> list[Call]:
        """Sends one ``create_batch`` of ``iids`` through ``a``."""
        return self.ledger.send_batch(self.a, WF, iids, params)

    def through(
        self, node: NodeProcess, op: str, iids: list[str], params: dict[str, Any] | None = None
    ) -> list[Call]:
        """Sends ``op`` for each instance through ``node`` and waits for each answer."""
        return [
            self.ledger.call(node, Call(op, WF, iid, "", token=self.token(op)), params)
            for iid in iids
        ]

    def through_b(self, op: str, iids: list[str]) -> list[Call]:
        return self.through(self.b, op, iids)

    @staticmethod
    def token(op: str) -> str | None:
        return uuid.uuid4().hex if op == "event" else None

    def thaw(self, *, stalled: bool = False) -> None:
        """Lets ``a`` go on; waits for its answers and for it to exit on its lost lease."""
        if stalled:
            self.stall.unlink()
        else:
            self.a.send_signal(signal.SIGCONT)
        assert self.a.wait(timeout=15) == EXIT_LEASE_LOST, self.a.log_tail()
        deadline = time.monotonic() + 10
        while self.ledger.pending():  # every call was answered, or ended with the node
            assert time.monotonic() < deadline, [str(c) for c in self.ledger.pending()]
            time.sleep(0.01)

    def wait_journal(self, starts: list[str], timeout: float = 10.0) -> None:
        """Waits until the journal holds lines starting with each of ``starts``."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.journal.read_text().splitlines() if self.journal.exists() else []
            if all(any(line.startswith(x) for line in lines) for x in starts):
                return
            assert time.monotonic() < deadline, f"no step run began: {starts}"
            time.sleep(0.01)

    # -- outcomes -------------------------------------------------------------------

    def status(self, iid: str) -> str | None:
        """The status of an instance through ``b`` (None: it does not exist)."""
        try:
            return str(self.b.status(WF, iid)["status"])
        except InstanceNotFound:
            return None

    def wait_statuses(
        self, iids: list[str], wanted: tuple[str | None, ...], timeout: float = FINISH_S
    ) -> dict[str, str | None]:
        """Polls until every instance is in one of ``wanted``, or the time is up."""
        deadline = time.monotonic() + timeout
        while True:
            got = {iid: self.status(iid) for iid in iids}
            if all(s in wanted for s in got.values()) or time.monotonic() > deadline:
                return got
            time.sleep(0.05)

    def audit(self, finish: Sequence[str] = (), ended: Sequence[str] = ()) -> Audit:
        """Stops ``b`` cleanly, reads the data directory back and audits the ledger."""
        self.b.terminate(timeout=30)
        found = read_back(self.data, [WF])
        out = self.ledger.audit(
            found,
            self.journal,
            frozen_pids={self.a_pid},
            finish=[(WF, i) for i in finish],
            ended=[(WF, i) for i in ended],
        )
        print(f"\n{out.report()}")
        return out


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    p = Pair(tmp_path)
    try:
        p.start()
        yield p
    finally:
        p.close()


def settled(calls: list[Call], *fates: str) -> list[str]:
    """The instances of the calls that met one of ``fates``."""
    return [c.iid for c in calls if c.fate in fates]


def test_a_create_through_an_adopted_frozen_node_runs_or_is_refused(pair: Pair) -> None:
    """An acknowledged create runs to its end on a live node; a refused one left nothing."""
    pair.freeze_until_adopted()
    creates = pair.through_a("create", [f"new{i}" for i in range(5)], RUN)
    creates += pair.batch_through_a([f"batch{i}" for i in range(5)], RUN)
    pair.thaw()
    pair.wait_statuses(settled(creates, ACKED, UNKNOWN), ("complete", None))
    audit = pair.audit()
    assert audit.clean(), audit.report()


def test_a_resume_through_an_adopted_frozen_node_takes_effect(pair: Pair) -> None:
    """A paused instance resumed through the frozen node runs to its end once acknowledged."""
    iids = [f"r{i}" for i in range(3)]
    pair.make(pair.a, iids, WAIT, "waiting")
    for iid in iids:
        pair.a.control(WF, iid, "pause")
        pair.a.wait_for_status(WF, iid, "paused")
    pair.through(pair.a, "event", iids)  # buffered until each runs again
    pair.freeze_until_adopted()
    resumes = pair.through_a("resume", iids)
    pair.thaw()
    refused = settled(resumes, REFUSED)
    still = pair.wait_statuses(refused, ("paused",), timeout=2)
    half = {iid: s for iid, s in still.items() if s != "paused"}
    pair.through_b("resume", settled(resumes, REFUSED, UNKNOWN))
    pair.wait_statuses(iids, ("complete",))
    audit = pair.audit(finish=iids)
    assert not half, f"refused resumes that moved the instance anyway: {half}"
    assert audit.clean(), audit.report()


def test_events_around_an_adopted_frozen_node_are_delivered_once(pair: Pair) -> None:
    """Events through the frozen node, and to instances it acknowledged creating, are consumed."""
    waiting = [f"e{i}" for i in range(3)]
    pair.make(pair.a, waiting, WAIT, "waiting")  # a's own, adopted by b
    pair.freeze_until_adopted()
    sent = pair.through_a("event", waiting)
    creates = pair.through_a("create", [f"new{i}" for i in range(3)], WAIT)
    pair.thaw()
    pair.through_b("event", settled(sent, REFUSED, UNKNOWN))  # not acknowledged: again
    made = [
        c.iid
        for c in creates
        if c.fate == ACKED or (c.fate == UNKNOWN and pair.status(c.iid) is not None)
    ]
    pair.through_b("event", made)  # each waits for one event: through the live node
    pair.wait_statuses(waiting + made, ("complete",))
    audit = pair.audit(finish=waiting + made)
    assert audit.clean(), audit.report()


def test_pause_and_terminate_through_an_adopted_frozen_node_take_effect(pair: Pair) -> None:
    """An acknowledged pause pauses, an acknowledged terminate ends; refused ones do neither.

    Half of the instances wait for an event (hibernated, adopted by ``b``);
    ``a`` is in the middle of the first step of the others when it freezes
    (``b`` runs them again once it has adopted them).
    """
    pausing, ending = ["p0", "p1", "p-run"], ["t0", "t1", "t-run"]
    pair.make(pair.a, ["p0", "p1", "t0", "t1"], WAIT, "waiting")
    pair.make(pair.a, ["p-run", "t-run"], {**WAIT, "first_ms": 1500})
    pair.wait_journal([f"S {iid} s1 1 {pair.a_pid}." for iid in ("p-run", "t-run")])
    pair.freeze_until_adopted()
    pauses = pair.through_a("pause", pausing)
    terminates = pair.through_a("terminate", ending)
    pair.thaw()
    paused = pair.wait_statuses(settled(pauses, ACKED), ("paused",), timeout=5)
    not_paused = {i: s for i, s in paused.items() if s != "paused"}
    # Then every instance is made to finish through the live node.
    pair.through_b("resume", pausing)
    pair.through_b("event", pausing)
    live = [
        c.iid
        for c in terminates
        if c.fate == REFUSED or (c.fate == UNKNOWN and pair.status(c.iid) != "terminated")
    ]
    pair.through_b("event", live)
    pair.wait_statuses(pausing + live, ("complete",))
    pair.wait_statuses(settled(terminates, ACKED), ("terminated",), timeout=2)
    audit = pair.audit(finish=pausing + live, ended=ending)
    assert not not_paused, f"acknowledged pauses without effect: {not_paused}"
    assert audit.clean(), audit.report()


def test_calls_through_a_node_adopted_while_its_heartbeat_stalls(pair: Pair) -> None:
    """A slow node (its heartbeat thread stalls past its lease) answers calls after its adoption.

    It runs the instances it creates or resumes until they wait, then finds
    its lease gone and exits: what it acknowledged must go on on ``b``.
    """
    pair.make(pair.a, ["e0"], WAIT, "waiting")
    pair.make(pair.a, ["r0"], WAIT, "waiting")
    pair.a.control(WF, "r0", "pause")
    pair.a.wait_for_status(WF, "r0", "paused")
    pair.stall_until_adopted()
    creates = pair.through_a("create", ["new0", "new1"], WAIT)
    resumes = pair.through_a("resume", ["r0"])
    sent = pair.through_a("event", ["e0"])
    deadline = time.monotonic() + 10
    while pair.ledger.pending():  # a answers at once: only its heartbeat is stuck
        assert time.monotonic() < deadline, [str(c) for c in pair.ledger.pending()]
        time.sleep(0.01)
    for iid in settled(creates, ACKED) + settled(resumes, ACKED):
        pair.a.wait_for_status(WF, iid, "waiting", timeout=10)  # a ran it up to its wait
    pair.thaw(stalled=True)
    pair.through_b("event", settled(sent, REFUSED, UNKNOWN))
    pair.through_b("resume", settled(resumes, REFUSED, UNKNOWN))
    made = [
        c.iid
        for c in creates
        if c.fate == ACKED or (c.fate == UNKNOWN and pair.status(c.iid) is not None)
    ]
    pair.through_b("event", ["r0", *made])
    everything = ["e0", "r0", *made]
    pair.wait_statuses(everything, ("complete",))
    audit = pair.audit(finish=everything)
    assert audit.clean(), audit.report()


def test_the_audit_can_fail(tmp_path: Path) -> None:
    """Each count of the audit catches what it is for (on a data directory made up here)."""
    found = DataDir(
        instances={
            (WF, "ran"): Stored("complete", "b", ["WORKFLOW_START"], ["t1"]),
            (WF, "stuck"): Stored("queued", "a", [], []),
            (WF, "made"): Stored("queued", "a", [], []),
            (WF, "unpaused"): Stored("complete", "b", [], ["t3", "t4"]),
            (WF, "paused"): Stored("paused", "b", ["WORKFLOW_PAUSED"], []),
            (WF, "twice"): Stored("complete", "b", [], ["t1"]),
        },
        committed={("ran", "s1"): "1.a"},
        failed={},
        registry={"a": {"state": "adopted"}, "b": {"state": "alive"}},
    )
    journal = tmp_path / "journal.txt"
    journal.write_text("S ran s1 1 1.a\nE ran s1 1 1.a\nS ran s1 1 2.b\n")
    ledger = Ledger()
    for call in [
        Call("create", WF, "ran", "a", fate=ACKED),
        Call("event", WF, "ran", "a", token="t1", fate=ACKED),
        Call("create", WF, "stuck", "a", fate=ACKED),  # stranded
        Call("event", WF, "stuck", "b", token="t2", fate=ACKED),  # lost
        Call("create", WF, "made", "a", fate=REFUSED),  # half-written
        Call("pause", WF, "unpaused", "a", fate=ACKED),  # lost
        Call("event", WF, "unpaused", "a", token="t3", fate=UNKNOWN),  # landed: it explains...
        Call("event", WF, "unpaused", "b", token="t5", fate=ACKED),  # ...this one left over
        Call("pause", WF, "paused", "a", fate=REFUSED),  # half-written
        Call("terminate", WF, "paused", "a", fate=ACKED),  # lost
    ]:
        ledger.book(call)
    audit = ledger.audit(found, journal, frozen_pids=set(), finish=[(WF, "twice"), (WF, "paused")])
    assert audit.counts() == {"stranded": 2, "lost": 3, "doubled": 3, "half_written": 2}, (
        audit.report()
    )
    assert [x.split()[0] for x in audit.stranded] == ["chaos/paused", "chaos/stuck"]
    assert audit.doubled == [
        "chaos/unpaused consumed events not sent to it: ['t4']",
        "event t1 consumed 2 times",
        "ran s1 attempt 1 ran again after it committed",
    ]
    # The same late run by a frozen node's pid is counted apart, not as doubled.
    assert len(ledger.audit(found, journal, frozen_pids={"2"}).doubled) == 2
    clean = Ledger()
    clean.book(Call("create", WF, "ran", "a", fate=ACKED))
    clean.book(Call("event", WF, "ran", "a", token="t1", fate=ACKED))
    only = DataDir({(WF, "ran"): found.instances[(WF, "ran")]}, {("ran", "s1"): "1.a"}, {}, {})
    journal.write_text("S ran s1 1 1.a\nE ran s1 1 1.a\n")
    assert clean.audit(only, journal, frozen_pids=set()).clean()
