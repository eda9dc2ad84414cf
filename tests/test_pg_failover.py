"""Losing the database: node processes on PostgreSQL while the server fails under them.

Every run drives instances of the chaos app's 10-step workflow
(:mod:`apps.chaos_app`: each step body appends its start and end to a journal
file, with a nonce the committed result names) on node processes that share
nothing but the database URL, and disrupts the database in the middle:

- **failover**: a primary with a synchronous streaming standby, the nodes on
  a multi-host URL (``target_session_attrs=read-write``); the primary is
  SIGKILLed with all its processes, the standby promoted;
- **outage**: the only server stops (``immediate``: no checkpoint, crash
  recovery on restart), stays down for 10 s, and starts again on the same
  port and data directory; every node logs that it waits and retries;
- **node killed during the outage**: as the outage, and a node is SIGKILLed
  while the server is down; the others adopt its instances once it is back.

Events: a quarter of the instances wait for two events, sent by the test
through random nodes during the run (over the disruption too). A send whose
node answered is *acknowledged*; one that failed (the node timed out, or
died) has an unknown fate and is retried with a new token.

The checks, once every node is gone, on what the database holds:

- every instance is complete, with a committed result for every step;
- **lost steps**: a step body that starts after a body of the instance's
  next step started (the workflow reaches a step only once the previous
  step's result is committed and acknowledged: a rerun after that is an
  acknowledged step that was lost);
- **committed reruns**: a step body that starts after the end of the run
  whose result was committed (:func:`apps.accounting.journal_violations`);
  reruns of bodies whose commit was never acknowledged are counted apart;
- **lost events**: an acknowledged event not consumed although its instance
  consumed fewer events sent before it than it waits for (events are
  consumed in the order they landed, and the test sends an instance's
  events one after the other);
- **events consumed twice**: two waits of one instance holding one token;
  and no wait holds a token never sent to its instance.

``make pg-chaos`` runs these and the chaos workload over PostgreSQL
(:func:`test_chaos_on_postgres`), printing a summary line for each.
"""

from __future__ import annotations

import collections
import json
import os
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from apps.accounting import journal_violations, read_back
from apps.chaos_app import FLAKY, JOURNAL_ENV
from apps.chaos_app import STEPS as STEP_NAMES
from test_chaos import run_chaos

from actorflow.core.errors import ActorflowError, InvalidInstanceState
from actorflow.testing import NodeProcess, NodeProcessError
from actorflow.testkit.postgres import (
    HOST,
    PostgresServer,
    available,
    multi_host_url,
    replicated_pair,
)

APP = "apps.chaos_app:factory"
WF = "chaos"
LEASE = 3.0
#: The log lines of a node's storage while the database cannot be reached, and once it is back.
WAITING = "cannot be reached"
BACK = "is back after"


def postgres_or_skip() -> None:
    """Skips the test unless a PostgreSQL server can run here (fails if one is required)."""
    reason = available()
    if reason is None:
        return
    if os.environ.get("ACTORFLOW_REQUIRE_POSTGRES") == "1":
        pytest.fail(f"ACTORFLOW_REQUIRE_POSTGRES=1, but {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def pair() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    """A primary and its synchronous streaming standby."""
    postgres_or_skip()
    primary, standby = replicated_pair(synchronous=True)
    try:
        yield primary, standby
    finally:
        standby.cleanup()
        primary.cleanup()


@pytest.fixture
def server() -> Iterator[PostgresServer]:
    """One server on a port of its own choosing that a restart keeps (never re-picked)."""
    postgres_or_skip()
    with PostgresServer(port=free_port()) as srv:
        yield srv


@dataclass
class Send:
    token: str
    fate: str  # "acked", "unknown" (the node failed to answer), "refused" (instance ended)


@dataclass
class Result:
    """What one run measured."""

    n: int
    disruption: str
    seconds: float = 0.0
    db_kills: int = 0
    node_kills: int = 0
    outage_s: float = 0.0
    stalled_s: float = 0.0  # from the disruption until step bodies ran again
    body_runs: int = 0
    reruns: int = 0
    committed_reruns: int = 0
    lost_steps: int = 0
    lost_events: int = 0
    doubled_events: int = 0
    foreign_events: int = 0
    events_acked: int = 0
    events_unknown: int = 0
    waiting_logged: list[str] = field(default_factory=list)
    back_logged: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "instances": self.n,
            "disruption": self.disruption,
            "seconds": round(self.seconds, 1),
            "db_kills": self.db_kills,
            "node_kills": self.node_kills,
            "outage_s": round(self.outage_s, 1),
            "stalled_s": round(self.stalled_s, 1),
            "body_runs": self.body_runs,
            "lost_steps": self.lost_steps,
            "committed_reruns": self.committed_reruns,
            "reruns_of_unacknowledged_steps": self.reruns,
            "events_acked": self.events_acked,
            "events_unknown_fate": self.events_unknown,
            "lost_events": self.lost_events,
            "events_consumed_twice": self.doubled_events,
            "foreign_events": self.foreign_events,
            "nodes_logging_wait": len(self.waiting_logged),
            "nodes_logging_back": len(self.back_logged),
            "adopted": self.adopted,
        }


class Drill:
    """Node processes on one database URL, a workload, and the checks of the module doc."""

    def __init__(self, tmp: Path, url: str, nodes: int, n: int, disruption: str) -> None:
        self.tmp, self.url = tmp, url
        self.journal = tmp / "journal.txt"
        self.env = {JOURNAL_ENV: str(self.journal), "ACTORFLOW_CHAOS_CONCURRENCY": "200"}
        self.nodes = [self._node(f"n{i + 1}") for i in range(nodes)]
        self.result = Result(n, disruption)
        rng = random.Random(16)
        self.params = [
            {
                "id": f"c{k}",
                "params": {
                    "sleep_ms": rng.randint(200, 2000) if k % 5 == 0 else 0,
                    "events": 2 if k % 4 == 1 else 0,
                    "work_ms": 5.0,
                },
            }
            for k in range(n)
        ]
        self.sends: dict[str, list[Send]] = collections.defaultdict(list)
        self.sender_error: list[BaseException] = []

    def _node(self, node_id: str) -> NodeProcess:
        node = NodeProcess(
            self.url,
            APP,
            node_id=node_id,
            env=self.env,
            lease_timeout=LEASE,
            log_path=self.tmp / f"node-{node_id}.log",
        )
        return node.start()

    def live(self) -> list[NodeProcess]:
        return [n for n in self.nodes if n.alive]

    def retry(self, fn: Callable[[NodeProcess], Any], timeout: float = 180.0) -> Any:
        """Calls ``fn(node)`` on random live nodes until one answers (over an outage too)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                return fn(random.choice(self.live()))
            except (NodeProcessError, ActorflowError, IndexError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def journal_lines(self) -> int:
        try:
            with open(self.journal, "rb") as f:
                return sum(1 for _ in f)
        except FileNotFoundError:
            return 0

    def expected_runs(self) -> int:
        return len(self.params) * (len(STEP_NAMES) + 1)  # + the planned failure of FLAKY

    def send_events(self, window: float) -> None:
        """Sends each waiting instance its events through random nodes, spread over ``window``."""
        todo = [p["id"] for p in self.params for _ in range(p["params"]["events"])]
        random.Random(3).shuffle(todo)
        start = time.monotonic()
        try:
            for idx, iid in enumerate(todo):
                due = start + window * idx / max(1, len(todo))
                while time.monotonic() < due:
                    time.sleep(0.005)
                while True:
                    token = uuid.uuid4().hex
                    try:
                        node = random.choice(self.live())
                    except IndexError:
                        time.sleep(0.1)
                        continue
                    try:
                        node.send_event(WF, iid, "go", {"token": token})
                    except InvalidInstanceState:
                        self.sends[iid].append(Send(token, "refused"))
                        break  # it ended: events of unknown fate had landed
                    except (ActorflowError, NodeProcessError):
                        self.sends[iid].append(Send(token, "unknown"))
                        time.sleep(0.1)
                        continue
                    self.sends[iid].append(Send(token, "acked"))
                    break
        except BaseException as e:
            self.sender_error.append(e)
            raise

    def run(self, disrupt: Callable[[Drill], None], *, event_window: float = 20.0) -> Result:
        """Creates the instances, sends the events, disrupts mid-run, waits for completion."""
        out = self.result
        t0 = time.monotonic()
        for i in range(0, len(self.params), 250):
            chunk = self.params[i : i + 250]
            self.retry(lambda node, chunk=chunk: node.create_batch(WF, chunk))
        sender = threading.Thread(target=self.send_events, args=(event_window,), daemon=True)
        sender.start()
        half = self.expected_runs() // 2
        deadline = time.monotonic() + 120
        while self.journal_lines() < half:  # two lines per body run: half of the runs are done
            assert time.monotonic() < deadline, "the workload never got halfway"
            time.sleep(0.05)
        at = time.monotonic()
        disrupt(self)
        before = self.journal_lines()
        deadline = time.monotonic() + 120
        while self.journal_lines() == before:
            assert time.monotonic() < deadline, "no step body ran after the disruption"
            time.sleep(0.02)
        out.stalled_s = time.monotonic() - at
        deadline = time.monotonic() + 300
        counts: dict[str, int] = {}
        while counts.get("complete") != len(self.params):
            assert time.monotonic() < deadline, f"instances never completed: {counts}"
            time.sleep(0.25)
            counts = self.retry(lambda node: node.counts(WF))
        sender.join(120)
        assert not sender.is_alive() and not self.sender_error, self.sender_error
        out.seconds = time.monotonic() - t0
        return out

    def close(self) -> None:
        for node in self.nodes:
            node.terminate(timeout=30)

    def logs(self) -> None:
        """Which nodes logged that the database was unreachable, and that it was back."""
        for node in self.nodes:
            text = Path(node.log_path).read_text(errors="replace")
            if WAITING in text:
                self.result.waiting_logged.append(node.node_id)
            if BACK in text:
                self.result.back_logged.append(node.node_id)

    def check(self) -> None:
        """Reads the database and the journal (see the module doc); fills the counts."""
        out = self.result
        found = read_back(self.url, [WF])
        # A node that left cleanly at the end is adopted too when another is
        # still running (its instances handed over): only the dead count.
        out.adopted = sorted(
            n
            for n, rec in found.registry.items()
            if rec.get("state") == "adopted" and rec.get("was") != "left"
        )
        statuses = collections.Counter(inst.status for inst in found.instances.values())
        assert statuses == {"complete": len(self.params)}, statuses
        for p in self.params:
            for name in STEP_NAMES:
                assert (p["id"], name) in found.committed, f"{p['id']} {name}: no result"
            assert (p["id"], FLAKY, 1) in found.failed, f"{p['id']}: no planned failure"
        lines = self.journal.read_text().splitlines()
        bad, _, _, _ = journal_violations(lines, found.committed, found.failed, set())
        out.committed_reruns = len(bad)
        out.body_runs = sum(1 for line in lines if line.startswith("S "))
        out.reruns = out.body_runs - self.expected_runs()
        out.lost_steps = len(lost_steps(lines))
        for p in self.params:
            iid, waits = p["id"], p["params"]["events"]
            got = found.instances[(WF, iid)].tokens
            sends = self.sends.get(iid, [])
            out.events_acked += sum(s.fate == "acked" for s in sends)
            out.events_unknown += sum(s.fate == "unknown" for s in sends)
            assert len(got) == waits, (iid, got)
            out.doubled_events += len(got) - len(set(got))
            out.foreign_events += len(set(got) - {s.token for s in sends})
            for i, s in enumerate(sends):
                if s.fate != "acked" or s.token in got:
                    continue
                earlier = {x.token for x in sends[:i]}
                if len([t for t in got if t in earlier]) < waits:
                    out.lost_events += 1  # it had room: it was consumed by no wait
        bad_steps = lost_steps(lines)
        assert out.reruns >= 0
        assert not bad, bad[:10]
        assert not bad_steps, bad_steps[:10]
        assert out.lost_events == out.doubled_events == out.foreign_events == 0, out.summary()


def lost_steps(lines: list[str]) -> list[str]:
    """Step body runs that started after a run of the instance's next step had started."""
    order = {name: i for i, name in enumerate(STEP_NAMES)}
    furthest: dict[str, int] = {}
    bad = []
    for line in lines:
        parts = line.split()
        if parts[0] != "S":
            continue
        iid, i = parts[1], order[parts[2]]
        if i < furthest.get(iid, -1):
            bad.append(f"{line}: after step {STEP_NAMES[furthest[iid]]} of {iid} had started")
        furthest[iid] = max(furthest.get(iid, -1), i)
    return bad


def finish(drill: Drill, name: str) -> Result:
    """Closes the nodes, reads the logs, checks, and prints the summary (also on a failure)."""
    drill.close()
    drill.logs()
    try:
        drill.check()
    finally:
        report_line(name, drill.result)
    return drill.result


def report_line(name: str, out: Result) -> None:
    summary = out.summary()
    print(f"\n{name}: {json.dumps(summary)}")
    path = os.environ.get("ACTORFLOW_CHAOS_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"run": name, **summary}) + "\n")


def test_lost_steps_can_be_found() -> None:
    ok = ["S c0 s1 1 a", "E c0 s1 1 a", "S c0 s1 1 b", "S c0 s2 1 c", "S c1 s1 1 d"]
    assert lost_steps(ok) == []
    assert len(lost_steps([*ok, "S c0 s1 1 e"])) == 1  # s1 again after s2 started


@pytest.mark.postgres
@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_failover_to_the_synchronous_standby(
    pair: tuple[PostgresServer, PostgresServer], tmp_path: Path
) -> None:
    """1,000 instances x 10 steps on 3 nodes; the primary SIGKILLed mid-run, the standby promoted."""
    primary, standby = pair
    drill = Drill(tmp_path, multi_host_url(primary, standby), 3, 1000, "primary killed, promoted")

    def failover(d: Drill) -> None:
        t0 = time.monotonic()
        primary.kill()
        standby.promote()
        d.result.db_kills += 1
        d.result.outage_s = time.monotonic() - t0

    try:
        drill.run(failover)
    finally:
        out = finish(drill, "pg failover")
    assert out.db_kills == 1
    # Every node had writes in flight when the primary died: each waited and came back.
    assert len(out.back_logged) == 3, out.summary()


@pytest.mark.postgres
@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_database_unreachable_for_10_s(server: PostgresServer, tmp_path: Path) -> None:
    """The server stops (immediate) mid-run for 10 s and starts again: the nodes wait it out."""
    drill = Drill(tmp_path, server.url, 3, 1000, "server down 10 s")

    def outage(d: Drill) -> None:
        t0 = time.monotonic()
        server.stop(mode="immediate")
        d.result.db_kills += 1
        time.sleep(10)  # the outage itself
        server.start()
        d.result.outage_s = time.monotonic() - t0

    try:
        drill.run(outage)
    finally:
        out = finish(drill, "pg outage 10 s")
    assert sorted(out.waiting_logged) == ["n1", "n2", "n3"], out.summary()
    assert sorted(out.back_logged) == ["n1", "n2", "n3"], out.summary()
    assert out.adopted == [], "a node was adopted although none died"


@pytest.mark.postgres
@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_node_killed_while_the_database_is_down(server: PostgresServer, tmp_path: Path) -> None:
    """A node SIGKILLed during a 10 s outage: once the server is back, the others adopt it."""
    drill = Drill(tmp_path, server.url, 3, 1000, "server down 10 s, a node killed meanwhile")

    def outage(d: Drill) -> None:
        t0 = time.monotonic()
        server.stop(mode="immediate")
        d.result.db_kills += 1
        time.sleep(3)
        d.nodes[0].kill()
        d.result.node_kills += 1
        time.sleep(7)  # the rest of the outage
        server.start()
        d.result.outage_s = time.monotonic() - t0

    try:
        drill.run(outage)
    finally:
        out = finish(drill, "pg outage 10 s, node killed")
    assert out.adopted == ["n1"], out.summary()


@pytest.mark.postgres
@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_chaos_on_postgres(server: PostgresServer, tmp_path: Path) -> None:
    """The chaos workload on PostgreSQL: 3,000 instances, a node killed or frozen every ~2 s for 60 s."""
    out = run_chaos(
        tmp_path,
        "chaos on postgres",
        n=3000,
        kill_for=60.0,
        event_window=45.0,
        timeout=300.0,
        min_disruptions=10,
        location=server.url,
    )
    summary = out.summary()
    assert len(out.kills) >= 10
    assert out.lease_lost_exits + len(out.stalled) == out.freezes
    assert out.adoption_ms, "no node was ever adopted"
    assert summary["adoption_ms_max"] < 20_000
