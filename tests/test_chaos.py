"""Chaos: three node processes on one data directory, one disrupted every ~2 s.

Thousands of instances of a 10-step workflow (some sleep, some wait for two
events sent through random nodes) run while, every ~2 s, a random node is
SIGKILLed (or, one time in four, frozen with SIGSTOP for twice its lease and
then thawed) and a fresh node takes its place. The survivors adopt a dead
node's instances once its lease expires. At the end:

- every instance is ``complete``, with one committed result per step;
- no committed step body ran again: in the journal (one line per body start
  and end, with the run's nonce), no run of a step starts after the end of
  the run whose result was committed (for a failed attempt: no run of that
  attempt starts after the committed failure's end), except runs by a frozen
  node in the moment after it thawed, counted apart;
- no event was consumed twice: the two waits of an instance hold distinct
  tokens, each one sent to that instance;
- a frozen node that was adopted exits with EXIT_LEASE_LOST once thawed, and
  no node is adopted while alive and undisturbed.

While a node is frozen, the run also sends calls *through it*: creates (one
by one and as a batch), events, pauses, resumes and terminates of instances
of a second workflow (``routed``, the same class), each waiting for one
event. They sit in the frozen node's input and reach it when it thaws, after
it was adopted. Each answer is booked (acknowledged, refused, or unknown: the
node exited first), then every instance is made to finish through live nodes,
and the audit (:mod:`apps.accounting`) counts what an acknowledgement did not
deliver: 0 stranded (acknowledged creates and resumes that never ran to their
end), 0 lost (acknowledged events never consumed, pauses and terminates
without effect), 0 doubled (a committed step body run again, an event
consumed twice), 0 half-written (refused calls that left an effect).

The full runs (5,000 instances: 60 s of disruptions, and the drained
workload with and without failures) are ``make chaos``; a shorter one runs
by default.
"""

from __future__ import annotations

import collections
import json
import os
import random
import signal
import statistics
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from apps.accounting import ACKED, REFUSED, UNKNOWN, Audit, Call, Ledger, journal_violations
from apps.accounting import read_back as read_data
from apps.chaos_app import FLAKY, JOURNAL_ENV
from apps.chaos_app import STEPS as STEP_NAMES

from actorflow.cluster.lease import NODES
from actorflow.core.errors import ActorflowError, InstanceNotFound, InvalidInstanceState
from actorflow.core.storage import open_storage
from actorflow.testing import NodeProcess, NodeProcessError
from actorflow.testkit.node import EXIT_LEASE_LOST
from actorflow.workflows.records import load

APP = "apps.chaos_app:factory"
WF = "chaos"
ROUTED = "routed"  # the instances driven through frozen nodes
#: Calls sent through each frozen node, by kind ("batch": a create_batch of that many).
PER_FREEZE = {"event": 2, "pause": 2, "resume": 2, "terminate": 2, "create": 3, "batch": 2}


@dataclass
class Outcome:
    """What a chaos run measured."""

    n: int
    seconds: float = 0.0
    kills: list[tuple[str, float]] = field(default_factory=list)  # (node id, wall time)
    # Disruptions that found no node to spare: fewer than two ready (one frozen or
    # being replaced), since one is always left to adopt the others' instances.
    skipped: int = 0
    adoption_ms: list[float] = field(default_factory=list)
    reruns: int = 0
    freezes: int = 0
    lease_lost_exits: int = 0
    frozen_pids: set[str] = field(default_factory=set)
    stalled: set[str] = field(default_factory=set)
    stale_runs: int = 0
    body_runs: int = 0
    steps: int = 0
    routed: collections.Counter[str] = field(default_factory=collections.Counter)
    audit: Audit | None = None

    def summary(self) -> dict[str, Any]:
        ad = sorted(self.adoption_ms)
        return {
            "instances": self.n,
            "seconds": round(self.seconds, 1),
            "instances_per_s": round(self.n / self.seconds, 1),
            "steps_per_s": round(self.steps / self.seconds, 1),
            "kills": len(self.kills) - self.freezes,
            "freezes": self.freezes,
            "disruptions_skipped": self.skipped,
            "freezes_adopted_then_exited_on_lease_loss": self.lease_lost_exits,
            "freezes_not_adopted_in_time": len(self.stalled),
            "adoption_ms_p50": round(statistics.median(ad)) if ad else None,
            "adoption_ms_p99": round(ad[min(len(ad) - 1, int(len(ad) * 0.99))]) if ad else None,
            "adoption_ms_max": round(ad[-1]) if ad else None,
            "body_runs": self.body_runs,
            "reruns_of_uncommitted_steps": self.reruns,
            "stale_runs_after_thaw": self.stale_runs,
            "calls_through_frozen_nodes": sum(self.routed.values()),
            **{f"through_frozen_{fate}": self.routed[fate] for fate in (ACKED, REFUSED, UNKNOWN)},
            **(self.audit.counts() if self.audit is not None else {}),
        }


class Cluster:
    """Node processes on one data directory; a disrupted node is replaced by a new one.

    Disruptions return at once: the replacement starts (and a frozen node is
    thawed) in the background, so that they keep their pace.
    """

    def __init__(
        self,
        data: Path | str,
        journal: Path,
        size: int,
        lease: float,
        concurrency: int,
        logs: Path | None = None,
    ):
        self.detour: Detour | None = None  # calls sent through frozen nodes
        self.data, self.lease, self.logs = data, lease, logs
        self.env = {JOURNAL_ENV: str(journal), "ACTORFLOW_CHAOS_CONCURRENCY": str(concurrency)}
        self.nodes: list[NodeProcess] = []
        self.busy: set[str] = set()  # frozen, or being replaced
        self.frozen_pids: set[str] = set()
        self.thawed: list[NodeProcess] = []
        self.stalled: set[str] = set()
        self.gen = 0
        self.lock = threading.Lock()
        self.helpers: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        for _ in range(size):
            self.nodes.append(self._new())

    def _new(self) -> NodeProcess:
        with self.lock:
            self.gen += 1
            node_id = f"n{self.gen}"
        log = None if self.logs is None else self.logs / f"node-{node_id}.log"
        node = NodeProcess(
            self.data, APP, node_id=node_id, env=self.env, lease_timeout=self.lease, log_path=log
        )
        return node.start()

    def any(self) -> NodeProcess:
        with self.lock:
            alive = [n for n in self.nodes if n.alive and n.node_id not in self.busy]
        if not alive:
            raise NodeProcessError("no node is alive")
        return random.choice(alive)

    def _victim(self) -> NodeProcess | None:
        with self.lock:
            ready = [n for n in self.nodes if n.alive and n.node_id not in self.busy]
            if len(ready) < 2:
                return None  # always leave one node to adopt the others' instances
            victim = random.choice(ready)
            self.busy.add(victim.node_id)
            return victim

    def _in_background(self, fn: Any) -> None:
        def run() -> None:
            try:
                fn()
            except BaseException as e:
                self.errors.append(e)

        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.helpers.append(t)

    def _replace(self, victim: NodeProcess) -> None:
        node = self._new()
        with self.lock:
            self.nodes[self.nodes.index(victim)] = node

    def kill_one(self) -> tuple[str, float] | None:
        """SIGKILLs a random node; a new node (a new node id) replaces it."""
        victim = self._victim()
        if victim is None:
            return None
        at = time.time()
        victim.kill()
        self._in_background(lambda: self._replace(victim))
        return victim.node_id, at

    def freeze_one(self, seconds: float) -> tuple[str, float] | None:
        """SIGSTOPs a random node for ``seconds`` (longer than its lease), then SIGCONTs it.

        Its instances are adopted meanwhile; thawed, it finds its lease gone,
        stops, and exits with EXIT_LEASE_LOST; a new node takes its place.
        """
        victim = self._victim()
        if victim is None:
            return None
        with self.lock:
            self.frozen_pids.add(str(victim.pid))
        at = time.time()
        victim.send_signal(signal.SIGSTOP)
        # Calls that reach it when it thaws (after its adoption, unless it stalled everyone).
        routed = self.detour.through(victim) if self.detour is not None else []

        def thaw() -> None:
            time.sleep(seconds)
            victim.send_signal(signal.SIGCONT)
            try:
                code = victim.wait(timeout=self.lease * 3 + 10)
            except subprocess.TimeoutExpired:
                # Not adopted while frozen: frozen holding the host's LMDB write
                # lock, no node could write (nor renew, nor adopt) meanwhile; or
                # the others had not renewed their own leases enough times yet.
                # It simply goes on (and is not disrupted again: see check()).
                with self.lock:
                    self.stalled.add(victim.node_id)
                if self.detour is not None:
                    self.detour.follow_up(routed)
                return
            assert code == EXIT_LEASE_LOST, f"{victim.node_id} exited with {code} after a freeze"
            with self.lock:
                self.thawed.append(victim)
            if self.detour is not None:
                self.detour.follow_up(routed)
            self._replace(victim)

        self._in_background(thaw)
        return victim.node_id, at

    def settle(self) -> None:
        """Waits for the replacements and thaws in progress."""
        for t in self.helpers:
            t.join(120)

    def close(self) -> None:
        self.settle()
        for node in [*self.thawed, *self.nodes]:
            node.terminate(timeout=30)  # reaps the dead ones too
        assert not self.errors, self.errors


def with_retries(cluster: Cluster, fn: Any, tries: int = 50) -> Any:
    """Calls ``fn(node)`` on random live nodes until one answers."""
    for _ in range(tries):
        try:
            return fn(cluster.any())
        except NodeProcessError:
            time.sleep(0.05)
        except ActorflowError as e:  # a thawed node that lost its lease refuses calls
            if "lost its lease" not in str(e) and "try again" not in str(e):
                raise
            time.sleep(0.05)
    raise AssertionError("no node answered")


class Detour:
    """Calls sent through frozen nodes, booked in a :class:`Ledger`, and what follows them.

    Instances of workflow ``routed`` each wait for one event at their sixth
    step: pools of waiting instances take events, pauses and terminates, a
    pool of paused ones takes resumes, and creates use new ids. Once the
    frozen node has exited (or carried on: it stalled everyone), each call is
    followed up through live nodes according to its fate, so that every
    instance can finish (see :meth:`follow_up`); :meth:`finish_rest` does the
    same for the instances no freeze used.
    """

    def __init__(self, cluster: Cluster, freezes: int, work_ms: float) -> None:
        self.cluster = cluster
        self.ledger = Ledger()
        self.params = {"sleep_ms": 0, "events": 1, "work_ms": work_ms}
        self.pools = {
            op: [f"{op}-{k}" for k in range(freezes * PER_FREEZE[op])]
            for op in ("event", "pause", "resume", "terminate")
        }
        self.created = 0
        self.through_frozen: list[Call] = []
        self.finish: set[str] = set()  # must be complete at the end (the others: ended)
        self.moved: list[str] = []  # refused resumes after which the instance was not paused
        self.lock = threading.Lock()

    def setup(self) -> None:
        """Creates the pools and waits until they wait (the resume pool: until paused)."""
        ids = [iid for pool in self.pools.values() for iid in pool]
        if not ids:
            return
        for i in range(0, len(ids), 500):
            items = [{"id": iid, "params": self.params} for iid in ids[i : i + 500]]
            with_retries(self.cluster, lambda node, items=items: node.create_batch(ROUTED, items))
        self._wait_for(lambda c: c.get("waiting", 0) == len(ids))
        for iid in self.pools["resume"]:
            with_retries(self.cluster, lambda node, iid=iid: node.control(ROUTED, iid, "pause"))
        self._wait_for(lambda c: c.get("paused", 0) == len(self.pools["resume"]))

    def _wait_for(self, cond: Any, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond(counts := with_retries(self.cluster, lambda n: n.counts(ROUTED))):
            assert time.monotonic() < deadline, f"the routed pools never settled: {counts}"
            time.sleep(0.1)

    def _take(self, op: str) -> list[str]:
        pool = self.pools[op]
        got, self.pools[op] = pool[: PER_FREEZE[op]], pool[PER_FREEZE[op] :]
        return got

    def through(self, victim: NodeProcess) -> list[Call]:
        """Sends one freeze's calls through ``victim`` (frozen); returns them as booked."""
        with self.lock:
            taken = {op: self._take(op) for op in self.pools}
            new = [
                f"new-{self.created + k}" for k in range(PER_FREEZE["create"] + PER_FREEZE["batch"])
            ]
            self.created += len(new)
        calls = []
        for op, iids in taken.items():
            for iid in iids:
                token = uuid.uuid4().hex if op == "event" else None
                calls.append(self.ledger.send(victim, Call(op, ROUTED, iid, "", token=token)))
        for iid in new[: PER_FREEZE["create"]]:
            calls.append(self.ledger.send(victim, Call("create", ROUTED, iid, ""), self.params))
        calls += self.ledger.send_batch(victim, ROUTED, new[PER_FREEZE["create"] :], self.params)
        with self.lock:
            self.through_frozen += calls
        return calls

    # -- through live nodes ----------------------------------------------------------

    def _live(self, op: str, iid: str) -> Call:
        """Sends ``op`` (an event or a resume) through live nodes until one acknowledges it.

        Gives up on an InvalidInstanceState (the instance ended: an event or a
        terminate of unknown fate had landed).
        """
        for _ in range(100):
            try:
                node = self.cluster.any()
            except NodeProcessError:
                time.sleep(0.05)
                continue
            token = uuid.uuid4().hex if op == "event" else None
            call = self.ledger.call(node, Call(op, ROUTED, iid, "", token=token))
            ended = "InvalidInstanceState" in call.error and "try again" not in call.error
            if call.fate == ACKED or ended:
                return call
            time.sleep(0.05)
        raise AssertionError(f"no live node took {op} of {ROUTED}/{iid}")

    def _status(self, iid: str) -> str | None:
        def get(node: NodeProcess) -> str | None:
            try:
                return str(node.status(ROUTED, iid)["status"])
            except InstanceNotFound:
                return None

        result: str | None = with_retries(self.cluster, get)
        return result

    def follow_up(self, calls: list[Call]) -> None:
        """After a freeze: lets every instance the calls touched finish, through live nodes."""
        deadline = time.monotonic() + 60
        while any(c.fate == "pending" for c in calls) and time.monotonic() < deadline:
            time.sleep(0.05)
        for c in calls:
            if c.fate == "pending":  # the node never answered, nor died: as if it had died
                c.fate, c.error = UNKNOWN, "no answer within 60 s"
        finish = []
        for c in calls:
            if c.op == "create":
                if c.fate == ACKED or (c.fate == UNKNOWN and self._status(c.iid) is not None):
                    self._live("event", c.iid)
                    finish.append(c.iid)
            elif c.op == "event":
                if c.fate != ACKED:
                    self._live("event", c.iid)
                finish.append(c.iid)
            elif c.op == "pause":
                self._live("resume", c.iid)
                self._live("event", c.iid)
                finish.append(c.iid)
            elif c.op == "resume":
                if c.fate == REFUSED and (st := self._status(c.iid)) != "paused":
                    with self.lock:
                        self.moved.append(f"{c}: then {st}")
                if c.fate != ACKED:
                    self._live("resume", c.iid)
                self._live("event", c.iid)
                finish.append(c.iid)
            elif c.op == "terminate":
                if c.fate == ACKED or (c.fate == UNKNOWN and self._status(c.iid) == "terminated"):
                    continue  # it must be terminated (the audit checks an acknowledged one)
                if "InvalidInstanceState" not in self._live("event", c.iid).error:
                    finish.append(c.iid)  # else it was terminated after all (an unknown fate)
        with self.lock:
            self.finish.update(finish)

    def finish_rest(self) -> None:
        """Lets the instances no freeze used finish (through live nodes)."""
        with self.lock:
            rest, self.pools = self.pools, {op: [] for op in self.pools}
        for op, iids in rest.items():
            for iid in iids:
                if op == "resume":
                    self._live("resume", iid)
                self._live("event", iid)
                with self.lock:
                    self.finish.add(iid)

    def wait_ended(self, timeout: float) -> None:
        """Waits (until ``timeout``) for every routed instance to end; stranded ones never do."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            counts = with_retries(self.cluster, lambda n: n.counts(ROUTED))
            if not set(counts) - {"complete", "terminated", "errored"}:
                return
            time.sleep(0.25)


def run_chaos(
    tmp: Path,
    name: str,
    *,
    n: int,
    kill_for: float,
    kill_every: float = 2.0,
    event_window: float = 10.0,
    lease: float = 2.0,
    concurrency: int = 200,
    work_ms: float = 5.0,
    timeout: float = 300.0,
    kill_until_done: bool = False,
    min_disruptions: int = 0,
    location: str | None = None,
) -> Outcome:
    """Runs the workload on 3 nodes, disrupting one every ~``kill_every`` s for ``kill_for`` s.

    With ``kill_until_done``, disruptions go on until every instance is complete.
    With ``min_disruptions``, they go on past ``kill_for`` until that many landed: each
    one waits for the node disrupted before it to be back, so a loaded machine fits
    fewer in the window.
    The nodes share ``location`` (a ``postgresql://`` URL; default: the data
    directory ``tmp/data``); their logs are in ``tmp``. Prints the summary as
    ``name`` (also when a check fails).
    """
    data: Path | str = location if location is not None else tmp / "data"
    journal = tmp / "journal.txt"
    rng = random.Random(7)
    params = []
    for k in range(n):
        params.append(
            {
                "id": f"c{k}",
                "params": {
                    "sleep_ms": rng.randint(200, 3000) if k % 5 == 0 else 0,
                    "events": 2 if k % 4 == 1 else 0,
                    "work_ms": work_ms,
                },
            }
        )
    sent: dict[str, set[str]] = collections.defaultdict(set)
    out = Outcome(n)
    cluster = Cluster(data, journal, 3, lease, concurrency, logs=tmp)
    # Enough routed instances for every freeze (one disruption in four).
    freezes = 10 if kill_until_done else int(kill_for / (kill_every * 0.75)) // 4 + 2
    detour = Detour(cluster, freezes if kill_for or kill_until_done else 0, work_ms)
    try:
        detour.setup()
        cluster.detour = detour
        t0 = time.monotonic()
        for i in range(0, n, 500):
            chunk = params[i : i + 500]
            with_retries(cluster, lambda node, chunk=chunk: node.create_batch(WF, chunk))
        stop = threading.Event()
        counts: dict[str, int] = {}

        def send_events() -> None:
            todo = [(p["id"], j) for p in params for j in range(p["params"]["events"])]
            rng.shuffle(todo)
            start = time.monotonic()
            for idx, (iid, _) in enumerate(todo):
                due = start + event_window * idx / max(1, len(todo))
                while time.monotonic() < due and not stop.is_set():
                    time.sleep(0.005)
                while True:  # a send through a node that dies may or may not have landed
                    token = uuid.uuid4().hex
                    sent[iid].add(token)
                    try:
                        cluster.any().send_event(WF, iid, "go", {"token": token})
                        break
                    except InvalidInstanceState:
                        break  # a send that seemed lost had landed: it has its events
                    except ActorflowError:  # died, or lost its lease: may have landed
                        time.sleep(0.05)

        sender = threading.Thread(target=send_events, daemon=True)
        sender.start()
        kill_until = time.monotonic() + kill_for
        next_kill = time.monotonic() + kill_every * rng.uniform(0.75, 1.25)
        deadline = time.monotonic() + timeout
        done, next_check = False, 0.0
        while not (done and time.monotonic() >= kill_until and len(out.kills) >= min_disruptions):
            now = time.monotonic()
            assert now < deadline, (
                f"instances never completed: {counts}"
                if not done
                else f"{len(out.kills)} disruptions"
            )
            wanted = now < kill_until or (kill_until_done and not done)
            if now >= next_kill and (wanted or len(out.kills) < min_disruptions):
                freeze = len(out.kills) % 4 == 1
                hit = cluster.freeze_one(lease * 2 + 1) if freeze else cluster.kill_one()
                if hit is not None:
                    out.kills.append(hit)
                    out.freezes += freeze
                else:
                    out.skipped += 1
                next_kill += kill_every * rng.uniform(0.75, 1.25)
            if now >= next_check:
                counts = with_retries(cluster, lambda node: node.counts(WF))
                done = counts.get("complete") == n
                next_check = now + 0.25
            time.sleep(0.02)
        sender.join(timeout)
        assert not sender.is_alive(), "events could not all be sent"
        out.seconds = time.monotonic() - t0
        cluster.settle()
        detour.finish_rest()
        detour.wait_ended(timeout=lease * 3 + 20)
        out.stalled = set(cluster.stalled)
        wait_adopted(data, {node for node, _ in out.kills} - out.stalled, timeout=lease * 3 + 10)
    finally:
        cluster.close()
    out.lease_lost_exits = len(cluster.thawed)
    out.frozen_pids = cluster.frozen_pids
    out.routed.update(c.fate for c in detour.through_frozen)
    try:
        check(data, journal, params, sent, out, detour)
    finally:
        report(name, out)
    return out


def wait_adopted(data: Path | str, nodes: set[str], timeout: float) -> None:
    """Waits until every disrupted node was adopted (the last ones may still be pending)."""
    store = open_storage(data)
    try:
        deadline = time.monotonic() + timeout
        while True:
            states = {n: load(store.get(NODES, n.encode()) or b"").get("state") for n in nodes}
            if all(st == "adopted" for st in states.values()):
                return
            assert time.monotonic() < deadline, f"nodes never adopted: {states}"
            time.sleep(0.1)
    finally:
        store.close()


def check(
    data: Path | str,
    journal: Path,
    params: list[dict[str, Any]],
    sent: dict[str, set[str]],
    out: Outcome,
    detour: Detour,
) -> None:
    """Reads the data directory and the journal: completion, no committed re-runs, events.

    Then audits the calls sent through frozen nodes (see :mod:`apps.accounting`).
    """
    found = read_data(data, [WF, ROUTED])
    committed, failed, registry = found.committed, found.failed, found.registry
    statuses = collections.Counter(
        inst.status for (wf, _), inst in found.instances.items() if wf == WF
    )
    assert statuses == {"complete": len(params)}, statuses
    for p in params:
        iid = p["id"]
        for name in STEP_NAMES:
            assert (iid, name) in committed, f"{iid} {name} has no committed result"
        assert (iid, FLAKY, 1) in failed, f"{iid}: the planned failure of {FLAKY} is not recorded"
        got = found.instances[(WF, iid)].tokens
        assert len(got) == p["params"]["events"], (iid, got)
        assert len(set(got)) == len(got), f"{iid} consumed one event twice: {got}"
        assert set(got) <= sent[iid], f"{iid} consumed events never sent to it: {got}"
    lines = journal.read_text().splitlines()
    bad, out.stale_runs, ended_at, _ = journal_violations(lines, committed, failed, out.frozen_pids)
    assert not bad, bad[:20]
    for (iid, name), win in committed.items():
        assert win in ended_at, f"{iid} {name}: the committed run is not in the journal"
    main = {p["id"] for p in params}
    out.body_runs = sum(1 for line in lines if line.startswith("S ") and line.split()[1] in main)
    expected_runs = sum(len(STEP_NAMES) + 1 for _ in params)  # + the planned failure
    out.reruns = out.body_runs - expected_runs
    out.steps = expected_runs + sum(
        p["params"]["events"] + bool(p["params"]["sleep_ms"]) for p in params
    )
    assert out.reruns >= 0
    for node, at in out.kills:
        if node in out.stalled:
            continue
        rec = registry.get(node, {})
        assert rec.get("state") == "adopted", (node, rec)
        out.adoption_ms.append(rec["adopted_done"] - at * 1000)
    for node in out.stalled:  # not adopted while frozen, as nobody could write
        assert registry[node].get("was") != "alive", (node, registry[node])
    disrupted = {node for node, _ in out.kills} - out.stalled
    spurious = [
        n for n, rec in registry.items() if rec.get("was") == "alive" and n not in disrupted
    ]
    assert not spurious, f"nodes adopted while alive (a heartbeat came too late): {spurious}"
    # Every routed instance was made able to finish: it must have ended (complete,
    # or terminated), and complete unless a terminate may have ended it.
    audit = detour.ledger.audit(
        found,
        journal,
        frozen_pids=out.frozen_pids,
        finish=[(ROUTED, iid) for iid in sorted(detour.finish)],
        ended=[key for key in found.instances if key[0] == ROUTED],
    )
    audit.half_written += detour.moved
    out.audit = audit
    assert audit.clean(), f"calls through frozen nodes: {audit.report()}"


def test_the_journal_check_can_fail() -> None:
    committed = {("c0", "s1"): "1.a", ("c0", "s3"): "1.d"}
    failed = {("c0", "s3", 1): "1.c"}
    ok = [
        "S c0 s1 1 9.x",
        "S c0 s1 1 1.a",
        "E c0 s1 1 1.a",
        "E c0 s1 1 9.x",  # killed run
        "S c0 s3 1 1.c",
        "E c0 s3 1 1.c",
        "S c0 s3 2 1.d",
        "E c0 s3 2 1.d",
    ]
    assert journal_violations(ok, committed, failed, set())[0] == []
    rerun = [*ok, "S c0 s1 1 2.b", "E c0 s1 1 2.b"]  # a committed step ran again
    assert journal_violations(rerun, committed, failed, set())[0] == [
        "c0 s1 attempt 1 ran again after it committed"
    ]
    assert journal_violations(rerun, committed, failed, {"2"})[:2] == ([], 1)  # a frozen node
    attempt = [*ok, "S c0 s3 1 3.e"]  # a committed failed attempt ran again
    assert len(journal_violations(attempt, committed, failed, set())[0]) == 1


def report(name: str, out: Outcome) -> dict[str, Any]:
    summary = out.summary()
    print(f"\n{name}: {json.dumps(summary)}")
    path = os.environ.get("ACTORFLOW_CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"run": name, **summary}) + "\n")
    return summary


def test_chaos_short(tmp_path: Path) -> None:
    """1,000 instances, a node SIGKILLed every ~2 s for 15 s."""
    out = run_chaos(tmp_path, "chaos short", n=1000, kill_for=15.0, event_window=8.0)
    summary = out.summary()
    assert len(out.kills) >= 3
    assert out.freezes >= 1 and out.lease_lost_exits + len(out.stalled) == out.freezes
    assert out.adoption_ms, "no node was ever adopted"
    assert summary["adoption_ms_max"] < 15_000


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(600)
def test_throughput_without_failures(tmp_path: Path) -> None:
    """The same workload as the full chaos run, nothing killed: the baseline."""
    run_chaos(tmp_path, "no failures", n=5000, kill_for=0.0, event_window=0.0)


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(600)
def test_throughput_with_failures(tmp_path: Path) -> None:
    """The baseline's workload, with a node disrupted every ~2 s until all are complete."""
    out = run_chaos(
        tmp_path,
        "failures every ~2 s",
        n=5000,
        kill_for=0.0,
        event_window=0.0,
        kill_until_done=True,
    )
    assert out.kills


@pytest.mark.slow
@pytest.mark.chaos
@pytest.mark.timeout(1200)
def test_chaos_full(tmp_path: Path) -> None:
    """5,000 instances, a node SIGKILLed every ~2 s for 60 s."""
    out = run_chaos(tmp_path, "chaos 60 s", n=5000, kill_for=60.0, event_window=45.0, timeout=600.0)
    summary = out.summary()
    # One due every ~2 s for 60 s. A freeze that lands while the node holds the
    # host's write lock stalls every node until it thaws (freezes_not_adopted_in_time),
    # and that node is not disrupted again: with two of the three out of reach, the
    # disruptions due later find no node to spare and are skipped. The first two
    # freezes are the 2nd and 6th disruptions: 6 always land.
    assert len(out.kills) + out.skipped >= 20 and len(out.kills) >= 6, summary
    assert out.lease_lost_exits + len(out.stalled) == out.freezes
    assert summary["adoption_ms_max"] < 15_000
