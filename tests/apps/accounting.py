"""Accounts for what calls through nodes promised against what a data directory holds.

The chaos app (:mod:`apps.chaos_app`) journals every step body run and puts
the run's nonce in each committed result; its event waits take ``{"token"}``
payloads. Once every node is gone:

- :func:`read_back` reads a data directory: each instance's status, owner,
  history and consumed event tokens, each committed step result and failed
  attempt (with the nonce of the run that counted), and the node registry;
- :func:`journal_violations` finds committed step bodies that ran again;
- a :class:`Ledger` books calls sent through nodes, each acknowledged,
  refused, or of unknown fate (the node died before it answered), and
  :meth:`Ledger.audit` judges them against what was read back.

What an audit counts (each must be 0):

- **stranded**: instances that had to run to their end and did not: those a
  node acknowledged creating (or that exist after a create of unknown fate),
  and every instance the caller lists as due to finish;
- **lost**: acknowledged calls without effect: an event never consumed by its
  instance, a pause not in the instance's history, a terminate that did not
  end it, a resume after which the instance never ran to its end;
- **doubled**: a committed step body that ran again, or an event consumed
  twice;
- **half_written**: refused calls with an effect: a refused create whose
  instance exists, a refused pause in the history, a refused terminate that
  ended the instance, a refused event consumed.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actorflow.cluster.lease import NODES, OWNER
from actorflow.core.errors import ActorflowError
from actorflow.core.storage import PickleSerializer, open_storage
from actorflow.testkit.node import NodeProcess, NodeProcessError
from actorflow.workflows.records import DONE, HIST, IDS, INST, STEPS, load

__all__ = [
    "ACKED",
    "REFUSED",
    "UNKNOWN",
    "Audit",
    "Call",
    "DataDir",
    "Ledger",
    "Stored",
    "fate_of",
    "journal_violations",
    "read_back",
]

ACKED, REFUSED, UNKNOWN = "acked", "refused", "unknown"
_ENDED = ("complete", "errored", "terminated")


@dataclass
class Stored:
    """One instance as stored."""

    status: str
    owner: str | None
    history: list[str]  # instance-level history event types, oldest first
    tokens: list[str]  # the tokens of the events its waits consumed, in step order


@dataclass
class DataDir:
    """What :func:`read_back` found."""

    instances: dict[tuple[str, str], Stored]  # (workflow, instance id)
    committed: dict[tuple[str, str], str]  # (instance id, step) -> nonce of the run that counted
    failed: dict[tuple[str, str, int], str]  # (instance id, step, attempt) -> nonce
    registry: dict[str, dict[str, Any]]  # node id -> its registry record


def read_back(data: Path | str, workflows: Iterable[str]) -> DataDir:
    """Reads the instances of ``workflows`` (instance ids unique across them) and the registry.

    ``data`` is a data directory or a ``postgresql://`` URL.
    """
    ser = PickleSerializer()
    store = open_storage(data)
    try:
        out = DataDir({}, {}, {}, {})
        for wf in workflows:
            pre = wf.encode() + b"\x00"
            ids = {pre + n: k[len(pre) :].decode() for k, n in store.scan(IDS, prefix=pre)}
            tokens: dict[str, list[tuple[int, str]]] = collections.defaultdict(list)
            for key, raw in store.scan(STEPS, prefix=pre):
                iid = ids[key[: len(pre) + 8]]
                rec = load(raw)
                if rec["k"] == "do":
                    for i, att in enumerate(rec["att"], start=1):
                        if att[2] is not None:
                            out.failed[(iid, rec["n"], i)] = att[2]["message"].rsplit(" ", 1)[-1]
                    if rec["s"] == DONE:
                        out.committed[(iid, rec["n"])] = ser.loads(rec["r"])["n"]
                elif rec["k"] == "wait_for_event" and rec["s"] == DONE:
                    tokens[iid].append((rec["seq"], ser.loads(rec["ev"][0])["token"]))
            for rk, iid in ids.items():
                raw = store.get(INST, rk)
                if raw is None:
                    continue
                owner = store.get(OWNER, pre + iid.encode())
                history = [load(v)["type"] for _, v in store.scan(HIST, prefix=rk + b"\x00")]
                out.instances[(wf, iid)] = Stored(
                    load(raw)["s"],
                    owner.decode() if owner is not None else None,
                    history,
                    [t for _, t in sorted(tokens.get(iid, []))],
                )
        out.registry = {
            k.decode(): load(v) for k, v in store.scan(NODES) if not k.startswith(b"\x00")
        }
    finally:
        store.close()
    return out


def journal_violations(
    lines: list[str],
    committed: dict[tuple[str, str], str],
    failed: dict[tuple[str, str, int], str],
    frozen_pids: set[str],
) -> tuple[list[str], int, dict[str, int], int]:
    """Finds step runs that started after their step (or attempt) committed.

    In write order, no run of a step may start after the end of the run whose
    result was committed, nor a run of an attempt after the end of the run
    whose failure was committed. A frozen node, thawed, may start a body in
    the moment before it finds its lease gone: such runs (by the pid of a
    frozen node) are counted apart; their results never commit (the caller
    checks that every committed result is from a run in the journal).

    Returns the violations, the frozen nodes' late runs, the end position of
    each run (by nonce), and the number of runs.
    """
    ended_at: dict[str, int] = {}
    starts: list[tuple[int, str, str, int, str]] = []
    for pos, line in enumerate(lines):
        kind, iid, name, attempt, nonce = line.split()
        if kind == "E":
            ended_at[nonce] = pos
        else:
            starts.append((pos, iid, name, int(attempt), nonce))
    bad, stale = [], 0
    for pos, iid, name, attempt, nonce in starts:
        win = committed.get((iid, name))
        fail = failed.get((iid, name, attempt))
        late = (win is not None and nonce != win and pos > ended_at.get(win, len(lines))) or (
            fail is not None and nonce != fail and pos > ended_at.get(fail, len(lines))
        )
        if late and nonce.split(".")[0] in frozen_pids:
            stale += 1
        elif late:
            bad.append(f"{iid} {name} attempt {attempt} ran again after it committed")
    return bad, stale, ended_at, len(starts)


@dataclass
class Call:
    """One call sent through a node, and what became of it.

    ``op`` is ``create``, ``event``, ``pause``, ``resume`` or ``terminate``;
    ``token`` is an event's token. ``fate`` is :data:`ACKED` (the node
    answered success), :data:`REFUSED` (it answered an error) or
    :data:`UNKNOWN` (it died before answering: the call may have landed).
    """

    op: str
    workflow: str
    iid: str
    via: str
    token: str | None = None
    fate: str = "pending"
    error: str = ""

    def __str__(self) -> str:
        what = f"{self.op} {self.workflow}/{self.iid}" + (f" [{self.token}]" if self.token else "")
        return f"{what} via {self.via}: {self.fate}" + (f" ({self.error})" if self.error else "")


def fate_of(exc: BaseException | None) -> str:
    """The fate of a call that raised ``exc`` (None: it returned)."""
    if exc is None:
        return ACKED
    if isinstance(exc, TimeoutError) or (
        isinstance(exc, NodeProcessError)
        and ("died" in str(exc) or "is not running" in str(exc) or "no reply" in str(exc))
    ):
        return UNKNOWN
    return REFUSED


def _describe(exc: BaseException | None) -> str:
    return "" if exc is None else f"{type(exc).__name__}: {exc}"[:300]


def _submit(node: NodeProcess, call: Call, params: Any = None) -> Any:
    """Sends ``call`` through ``node``; returns the future of its answer (``params``: a create's)."""
    if call.op == "create":
        return node.submit("create", workflow=call.workflow, id=call.iid, params=params)
    if call.op == "event":
        return node.submit(
            "send_event",
            workflow=call.workflow,
            id=call.iid,
            type="go",
            payload={"token": call.token},
        )
    return node.submit(
        "control", workflow=call.workflow, id=call.iid, action=call.op, from_step=None
    )


@dataclass
class Audit:
    """The counts of an audit (see the module docstring), with what was found."""

    stranded: list[str] = field(default_factory=list)
    lost: list[str] = field(default_factory=list)
    doubled: list[str] = field(default_factory=list)
    half_written: list[str] = field(default_factory=list)
    stale_runs: int = 0
    body_runs: int = 0
    fates: collections.Counter[str] = field(default_factory=collections.Counter)

    def counts(self) -> dict[str, int]:
        return {
            "stranded": len(self.stranded),
            "lost": len(self.lost),
            "doubled": len(self.doubled),
            "half_written": len(self.half_written),
        }

    def clean(self) -> bool:
        return not any(self.counts().values())

    def report(self, limit: int = 20) -> str:
        lines = [f"{self.counts()}, calls {dict(self.fates)}"]
        for name in ("stranded", "lost", "doubled", "half_written"):
            lines += [f"  {name}: {x}" for x in getattr(self, name)[:limit]]
        return "\n".join(lines)


class Ledger:
    """The calls sent through nodes (thread-safe), and their audit."""

    def __init__(self) -> None:
        self.calls: list[Call] = []
        self._lock = threading.Lock()

    def book(self, call: Call) -> Call:
        with self._lock:
            self.calls.append(call)
        return call

    def send(
        self,
        node: NodeProcess,
        call: Call,
        params: Any = None,
        done: Callable[[Call], None] | None = None,
    ) -> Call:
        """Books ``call``, sends it through ``node`` without waiting; its fate is set on reply.

        ``done(call)`` runs (in the node's reply thread) once the fate is known.
        """
        self.book(call)
        call.via = node.node_id

        def settle(fut: Any) -> None:
            exc = fut.exception()
            call.fate, call.error = fate_of(exc), _describe(exc)
            if done is not None:
                done(call)

        try:
            _submit(node, call, params).add_done_callback(settle)
        except NodeProcessError as e:
            call.fate, call.error = UNKNOWN, str(e)
            if done is not None:
                done(call)
        return call

    def send_batch(
        self,
        node: NodeProcess,
        workflow: str,
        iids: list[str],
        params: Any,
        done: Callable[[list[Call]], None] | None = None,
    ) -> list[Call]:
        """Books one ``create`` per instance, sent through ``node`` as one ``create_batch``.

        An instance the batch's answer lists is acknowledged; one it leaves out
        is refused (its id is new: the batch skipped it).
        """
        calls = [self.book(Call("create", workflow, iid, node.node_id)) for iid in iids]

        def settle(fut: Any) -> None:
            exc = fut.exception()
            made = set(fut.result()) if exc is None else set()
            for c in calls:
                if exc is not None:
                    c.fate, c.error = fate_of(exc), _describe(exc)
                elif c.iid in made:
                    c.fate = ACKED
                else:
                    c.fate, c.error = REFUSED, "left out of the batch's answer"
            if done is not None:
                done(calls)

        items = [{"id": iid, "params": params} for iid in iids]
        try:
            node.submit("create_batch", workflow=workflow, items=items).add_done_callback(settle)
        except NodeProcessError as e:
            for c in calls:
                c.fate, c.error = UNKNOWN, str(e)
            if done is not None:
                done(calls)
        return calls

    def call(
        self, node: NodeProcess, call: Call, params: Any = None, timeout: float = 60.0
    ) -> Call:
        """Books ``call``, sends it through ``node`` and waits for its fate."""
        self.book(call)
        call.via = node.node_id
        try:
            _submit(node, call, params).result(timeout)
            call.fate = ACKED
        except (ActorflowError, TimeoutError) as e:
            call.fate, call.error = fate_of(e), _describe(e)
        return call

    def pending(self) -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.fate == "pending"]

    def audit(
        self,
        found: DataDir,
        journal: Path,
        *,
        frozen_pids: set[str],
        finish: Iterable[tuple[str, str]] = (),
        ended: Iterable[tuple[str, str]] = (),
    ) -> Audit:
        """Judges the booked calls against ``found`` and the journal.

        ``finish`` lists instances that must be complete whatever the calls
        did (the driver made sure they could finish); ``ended`` lists
        instances that must have ended (complete or terminated).
        """
        out = Audit()
        with self._lock:
            calls = list(self.calls)
        out.fates.update(f"{c.op} {c.fate}" for c in calls)
        by_inst: dict[tuple[str, str], list[Call]] = collections.defaultdict(list)
        for c in calls:
            by_inst[(c.workflow, c.iid)].append(c)
        must_end: dict[tuple[str, str], str] = {k: "complete" for k in finish}
        must_end.update((k, "ended") for k in ended if k not in must_end)
        for key, cs in by_inst.items():
            inst = found.instances.get(key)
            name = f"{key[0]}/{key[1]}"
            for c in cs:
                if c.op == "create":
                    if c.fate == REFUSED and inst is not None:
                        out.half_written.append(f"{c}: the instance exists ({inst.status})")
                    elif c.fate == ACKED or (c.fate == UNKNOWN and inst is not None):
                        must_end.setdefault(key, "ended")
                elif c.op == "pause":
                    paused = inst is not None and "WORKFLOW_PAUSED" in inst.history
                    if c.fate == ACKED and not paused:
                        out.lost.append(f"{c}: never paused")
                    elif c.fate == REFUSED and paused:
                        out.half_written.append(f"{c}: it was paused")
                elif c.op == "terminate":
                    ended_t = inst is not None and inst.status == "terminated"
                    if c.fate == ACKED and not ended_t:
                        out.lost.append(f"{c}: it is {inst.status if inst else 'missing'}")
                    elif c.fate == REFUSED and ended_t:
                        out.half_written.append(f"{c}: it was terminated")
                elif c.op == "resume" and c.fate == ACKED:
                    status = inst.status if inst is not None else "missing"
                    if status not in _ENDED:
                        out.lost.append(f"{c}: it never ran to its end (it is {status})")
                    must_end.setdefault(key, "ended")
            events = [c for c in cs if c.op == "event"]
            if events:
                got = set(inst.tokens) if inst is not None else set()
                acked_missing = [c for c in events if c.fate == ACKED and c.token not in got]
                # An event of unknown fate that landed may have taken a wait an
                # acknowledged one was sent for: the latter then stays buffered.
                spare = sum(1 for c in events if c.fate == UNKNOWN and c.token in got)
                for c in acked_missing[spare:]:
                    out.lost.append(f"{c}: never consumed (consumed {sorted(got)})")
                for c in events:
                    if c.fate == REFUSED and c.token in got:
                        out.half_written.append(f"{c}: consumed")
                stray = got - {c.token for c in events}
                if stray:
                    out.doubled.append(f"{name} consumed events not sent to it: {sorted(stray)}")
        for key, want in sorted(must_end.items()):
            inst = found.instances.get(key)
            status = inst.status if inst is not None else "missing"
            if (want == "complete" and status != "complete") or (
                want == "ended" and status not in ("complete", "terminated")
            ):
                owner = inst.owner if inst is not None else None
                state = found.registry.get(owner or "", {}).get("state")
                out.stranded.append(f"{key[0]}/{key[1]} is {status}, owned by {owner} ({state})")
        consumed = collections.Counter(t for inst in found.instances.values() for t in inst.tokens)
        out.doubled += [f"event {t} consumed {n} times" for t, n in consumed.items() if n > 1]
        lines = journal.read_text().splitlines() if journal.exists() else []
        bad, out.stale_runs, ended_at, out.body_runs = journal_violations(
            lines, found.committed, found.failed, frozen_pids
        )
        out.doubled += bad
        for (iid, step), win in found.committed.items():
            if win not in ended_at:
                out.doubled.append(f"{iid} {step}: the committed run is not in the journal")
        return out
