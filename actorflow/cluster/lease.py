"""Several runtimes on one data directory: node leases, ownership and adoption.

A runtime opened with a ``node_id`` is a *node*. Several nodes (processes on
one host) can share a data directory; LMDB is safe across processes.

- **The node registry** (keyspace ``nodes``): one record per node id with its
  incarnation (bumped each time the node starts), its process id, its
  heartbeat (wall-clock ms) and its state (``alive``, ``dead`` while being
  adopted, ``adopted``, ``left`` after a clean close). A node rewrites its
  record every ``timeout / 5`` seconds (at most 0.5 s), guarded on the value
  it wrote last,
  so a node whose record was taken over finds out at its next heartbeat.
- **Ownership**: every instance has an owner node (keyspace ``owner``, with
  the index ``owned``: ``node \\0 instance key``). The creating node owns a
  new instance. Only the owner starts it, fires its timers and runs it;
  other nodes leave its queue entries and timers alone.
- **Fencing**: taking over an instance (adoption, or a control call through
  another node) writes the new owner and moves the instance's epoch in one
  batch guarded on the epoch read. Every engine write of the old owner is
  guarded on the old epoch and fails: a stale node can never commit.
- **Adoption**: a node whose heartbeat has not moved for its lease timeout
  (as seen by the observing node), or that left cleanly, is adopted by the
  first live node to notice: it marks the record ``dead``, takes over every
  unfinished instance of that node (guarded on its epoch, owner and record),
  resumes the running ones from their checkpoints, and marks it ``adopted``.

Leases use real time, never the runtime's clock (a
:class:`~actorflow.testing.FakeClock` is private to one process): heartbeats
carry the wall clock for people reading the registry, and a node judges
another expired by its own monotonic clock since it last saw it beat.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

from actorflow.core.clock import SystemClock
from actorflow.core.codec import dump, load
from actorflow.core.errors import LeaseLost, StorageError
from actorflow.core.storage import ConflictError, Storage, WriteBatch

__all__ = [
    "DEFAULT_LEASE_TIMEOUT",
    "LEASE_TIMEOUT_ENV",
    "NODES",
    "NODE_ID_ENV",
    "NODE_MAP_SIZE",
    "OWNED",
    "OWNER",
    "NodeLease",
    "claim_ops",
    "disown_ops",
    "lease_lost",
    "node_sequence",
]

log = logging.getLogger("actorflow.lease")

NODES = "nodes"
OWNER = "owner"
OWNED = "owned"
#: Seconds without a heartbeat after which a node's instances are adopted.
DEFAULT_LEASE_TIMEOUT = 5.0
_SLOTS = 256  # sequence streams: live nodes draw ids from distinct residues
_SLOT_KEY = b"\x00slot\x00"
#: ``_LIVE_KEY + node``: the token of the node's live incarnation, written when
#: it joins and removed in the write that marks it dead (or left). Every write
#: that makes a node the owner of an instance is guarded on its own token, so a
#: node that was presumed dead (frozen, or slow past its lease) can never take
#: an instance in its own name after it was adopted: it would never run it.
_LIVE_KEY = b"\x00live\x00"
_CHUNK = 512

#: adopted(instances) is called after a takeover with ``(instance key, status)`` pairs.
Adopted = Callable[[list[tuple[bytes, str]]], None]
#: claimer(node, instance keys) takes over those instances of an expired node
#: (a chunk of its ``owned`` index) and returns the ``(instance key, status)``
#: pairs it took. The workflow layer provides it: this layer reads no workflow
#: record (see actorflow.workflows.adoption).
Claimer = Callable[[str, list[bytes]], list[tuple[bytes, str]]]


def lease_lost(node: str, where: str) -> LeaseLost:
    """The error of a call refused because node ``node`` lost its lease."""
    return LeaseLost(
        f"{where}: node {node!r} lost its lease (it was presumed dead and other nodes took "
        "over its instances); nothing was written: retry through another node",
        node=node,
    )


def owned_key(node: str, ik: bytes) -> bytes:
    """Returns the key of ``ik`` in a node's ownership index."""
    return node.encode() + b"\x00" + ik


def claim_ops(batch: WriteBatch, ik: bytes, node: str, old: str | None) -> None:
    """Adds the writes that make ``node`` the owner of instance ``ik`` to ``batch``."""
    if old is not None and old != node:
        batch.delete(OWNED, owned_key(old, ik))
    batch.put(OWNER, ik, node.encode())
    batch.put(OWNED, owned_key(node, ik), b"")


def disown_ops(batch: WriteBatch, ik: bytes, owner: str | None) -> None:
    """Adds the removal of instance ``ik``'s ownership (it is being deleted) to ``batch``."""
    batch.delete(OWNER, ik)
    if owner is not None:
        batch.delete(OWNED, owned_key(owner, ik))


class NodeLease:
    """This runtime's membership of the node registry, and its heartbeat thread.

    Args:
        storage: The runtime's storage.
        node_id: This node's id (stable across restarts of the same node).
        timeout: The lease timeout in seconds.
    """

    def __init__(
        self, storage: Storage, node_id: str, timeout: float = DEFAULT_LEASE_TIMEOUT
    ) -> None:
        if not node_id or "\x00" in node_id or len(node_id) > 128:
            raise ValueError(f"invalid node id {node_id!r}")
        self.storage = storage
        self.node_id = node_id
        self.timeout = float(timeout)
        self._wall = SystemClock()
        self._key = node_id.encode()
        self._live_key = _LIVE_KEY + self._key
        self._token: bytes | None = None
        self._last: bytes | None = None
        # Records whose write timed out: they may still land (storage keeps a
        # queued batch until it commits, over a database outage too).
        self._unconfirmed: dict[bytes, dict[str, Any]] = {}
        self.record: dict[str, Any] = {}
        self.lost = False
        self._lose_lock = threading.Lock()
        self.on_lost: Callable[[], None] | None = None
        self.on_adopted: Adopted | None = None
        self.claimer: Claimer | None = None
        self.on_tick: Callable[[], None] | None = None
        self.adoptions: list[dict[str, Any]] = []
        # node id -> (its last heartbeat seen, when it was first seen (monotonic
        # s), this node's own heartbeats by then)
        self._seen: dict[str, tuple[tuple[Any, Any], float, int]] = {}
        self._beats = 0  # heartbeats of this node that landed
        self.period = max(0.05, min(self.timeout / 5, 0.5))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="actorflow-lease", daemon=True)

    def now_ms(self) -> int:
        return int(self._wall.now() * 1000)

    # -- joining ---------------------------------------------------------------------

    def join(self) -> int:
        """Registers a new incarnation of this node; returns its sequence slot."""
        self.storage.reader_check()
        while True:
            raw = self.storage.get(NODES, self._key)
            old = load(raw) if raw is not None else {}
            slot = self._take_slot(old.get("slot"))
            rec = {
                "node": self.node_id,
                "inc": old.get("inc", 0) + 1,
                "pid": os.getpid(),
                "hb": self.now_ms(),
                "state": "alive",
                "slot": slot,
                "timeout_ms": int(self.timeout * 1000),
                "started": self.now_ms(),
            }
            data = dump(rec)
            token = f"{rec['inc']}:{rec['pid']}:{rec['started']}".encode()
            batch = (
                WriteBatch()
                .guard(NODES, self._key, raw)
                .put(NODES, self._key, data)
                .put(NODES, self._live_key, token)
            )
            try:
                self.storage.write(batch)
            except ConflictError:
                continue
            self._last, self.record, self._token = data, rec, token
            return slot

    def _take_slot(self, mine: int | None) -> int:
        """Claims a sequence slot no live node holds (``mine`` first)."""
        order = ([mine] if mine is not None else []) + [s for s in range(_SLOTS) if s != mine]
        nodes = self.nodes()
        for slot in order:
            key = _SLOT_KEY + bytes([slot])
            holder = self.storage.get(NODES, key)
            if holder is not None and holder != self._key:
                rec = nodes.get(holder.decode())
                if rec is not None and rec.get("state") == "alive":
                    continue  # held until the node leaves or is adopted
            try:
                self.storage.write(
                    WriteBatch().guard(NODES, key, holder).put(NODES, key, self._key)
                )
            except ConflictError:
                continue
            return slot
        raise RuntimeError(f"more than {_SLOTS} live nodes on {self.storage.path}")

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Every registered node's record, by node id."""
        out = {}
        for key, value in self.storage.scan(NODES):
            if not key.startswith(b"\x00"):
                out[key.decode()] = load(value)
        return out

    def _expired(self, node: str, rec: dict[str, Any]) -> bool:
        """True if ``node``'s heartbeat has not moved for its lease timeout, as seen here.

        Judged by this node's own observations, not by the time written in the
        record (a heartbeat that waited in a busy writer's queue is late, not
        stale), and only over time in which this node could write: it must
        also have renewed its own lease enough times since (while a process
        holds the host's LMDB write lock, frozen, no node can write, and none
        of them counts that time against the others).
        """
        now = time.monotonic()
        beat = (rec.get("inc"), rec.get("hb"))
        seen = self._seen.get(node)
        if seen is None or seen[0] != beat:
            self._seen[node] = (beat, now, self._beats)
            return False
        timeout = rec.get("timeout_ms", 0) / 1000
        needed = math.ceil(timeout / self.period) + 1
        return now - seen[1] > timeout and self._beats - seen[2] >= needed

    # -- ownership -------------------------------------------------------------------

    def owner_of(self, ik: bytes) -> str | None:
        """The owner of instance ``ik`` (None: it has none)."""
        raw = self.storage.get(OWNER, ik)
        return raw.decode() if raw is not None else None

    def owns(self, ik: bytes) -> bool:
        """True if this node owns instance ``ik``."""
        return self.storage.get(OWNER, ik) == self._key

    def claim(self, batch: WriteBatch, ik: bytes, old: str | None) -> None:
        """Adds the writes that make this node the owner of ``ik``, guarded on its lease.

        If this node has been presumed dead meanwhile (it was frozen or slow
        past its lease, and another node adopted it), the batch is refused
        with :class:`ConflictError`; :meth:`confirm_live` then tells why.
        """
        batch.guard(NODES, self._live_key, self._token)
        claim_ops(batch, ik, self.node_id, old)

    def confirm_live(self) -> bool:
        """After a refused claim: True if this node still holds its lease.

        False means another node took this one over; the lease is then
        marked lost at once (as the next heartbeat would find), so that no
        further call is accepted here.
        """
        if self.lost:
            return False
        if self.storage.get(NODES, self._live_key) == self._token:
            return True
        self._lose()
        return False

    # -- the heartbeat thread --------------------------------------------------------

    def start(
        self,
        *,
        claimer: Claimer | None = None,
        on_adopted: Adopted | None = None,
        on_tick: Callable[[], None] | None = None,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        """Starts the heartbeat thread, with the layer above's callbacks.

        Args:
            claimer: Takes over a chunk of an expired node's instances.
            on_adopted: Told what was taken over, after each adoption.
            on_tick: Called after every heartbeat pass.
            on_lost: Called once, when this node finds its lease taken over.
        """
        if claimer is not None:
            self.claimer = claimer
        if on_adopted is not None:
            self.on_adopted = on_adopted
        if on_tick is not None:
            self.on_tick = on_tick
        if on_lost is not None:
            self.on_lost = on_lost
        self._thread.start()

    def stop(self) -> None:
        """Stops the heartbeat thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def leave(self) -> None:
        """Records a clean exit: other nodes adopt this node's instances at once."""
        self.stop()
        if not self.lost and self._last is not None:
            rec = dict(self.record, state="left", hb=0)
            try:
                self._write_own(rec, leaving=True)
            except Exception:
                log.warning("node %s could not record that it left", self.node_id)

    def _write_own(self, rec: dict[str, Any], leaving: bool = False) -> None:
        data = dump(rec)
        batch = WriteBatch().guard(NODES, self._key, self._last).put(NODES, self._key, data)
        if leaving:
            batch.delete(NODES, self._live_key)
        try:
            self.storage.write(batch, timeout=max(self.timeout, 10.0))
        except StorageError as exc:
            if getattr(exc, "pending", False):
                self._unconfirmed[data] = rec
            raise
        self._last, self.record = data, rec
        self._unconfirmed.clear()

    def _landed_late(self) -> bool:
        """True if the record a guard missed is one of ours whose write had timed out.

        Then it is the last record written, and the lease was never taken over.
        """
        if not self._unconfirmed:
            return False
        raw = self.storage.get(NODES, self._key)
        rec = self._unconfirmed.get(raw) if raw is not None else None
        if rec is None:
            return False
        self._last, self.record = raw, rec
        self._unconfirmed.clear()
        return True

    def _loop(self) -> None:
        while not self._stop.wait(self.period):
            try:
                self.beat()
                if self.lost:
                    return
                self.check_others()
                self.storage.reader_check()  # slots of killed processes
                if self.on_tick is not None:
                    self.on_tick()
            except Exception:
                if self._stop.is_set():
                    return
                log.exception("lease pass of node %s failed", self.node_id)

    def beat(self) -> None:
        """Renews this node's lease; notices if it was taken over."""
        try:
            self._write_own(dict(self.record, hb=self.now_ms()))
            self._beats += 1
        except ConflictError:
            if not self._landed_late():
                self._lose()

    def _lose(self) -> None:
        with self._lose_lock:
            if self.lost:
                return
            self.lost = True
        log.error(
            "node %s: its lease was taken over (it was presumed dead); it stops running instances",
            self.node_id,
        )
        if self.on_lost is not None:
            self.on_lost()

    def check_others(self) -> None:
        """Adopts the instances of nodes whose lease expired (or that left)."""
        nodes = self.nodes()
        for node, rec in nodes.items():
            if node == self.node_id:
                continue
            state = rec.get("state")
            if state == "left" or (state == "alive" and self._expired(node, rec)):
                self.adopt(node, rec)
            elif state == "dead":
                by_id = rec.get("adopted_by", "")
                by = nodes.get(by_id)
                if (
                    by_id == self.node_id
                    or by is None
                    or by.get("state") != "alive"
                    or self._expired(by_id, by)
                ):
                    self.adopt(node, rec)  # its adopter died too, or this node's attempt failed

    # -- adoption ---------------------------------------------------------------------

    def adopt(self, node: str, rec: dict[str, Any]) -> int:
        """Takes over every unfinished instance of ``node``; returns how many."""
        key = node.encode()
        # Guarded on the stored bytes, checked to hold ``rec``: encoding ``rec``
        # again would not give them back for a record of an older format.
        raw = self.storage.get(NODES, key)
        if raw is None or load(raw) != rec:
            return 0  # it came back, or another node is adopting it
        t0 = self.now_ms()
        mark = dict(rec, state="dead", was=rec.get("state"), adopted_by=self.node_id, adopted_at=t0)
        # Its live token goes in the same write: from now on no claim of that
        # incarnation can land (see NodeLease.claim).
        try:
            self.storage.write(
                WriteBatch()
                .guard(NODES, key, raw)
                .put(NODES, key, dump(mark))
                .delete(NODES, _LIVE_KEY + key)
            )
        except ConflictError:
            return 0  # it came back, or another node is adopting it
        log.warning(
            "node %s adopts the instances of node %s (last heartbeat %d ms ago)",
            self.node_id,
            node,
            t0 - rec.get("hb", 0),
        )
        taken: list[tuple[bytes, str]] = []
        prefix = key + b"\x00"
        while True:
            rows = self.storage.scan(OWNED, prefix=prefix, limit=_CHUNK, keys_only=True)
            if not rows:
                break
            if self.claimer is None:
                raise RuntimeError(f"node {self.node_id}: no claimer to adopt instances with")
            taken.extend(self.claimer(node, [k[len(prefix) :] for k, _ in rows]))
            if self.lost:
                break  # this node was adopted meanwhile: it can claim nothing more
        done = dict(mark, state="adopted", adopted_done=self.now_ms(), adopted_n=len(taken))
        try:
            self.storage.write(
                WriteBatch().guard(NODES, key, dump(mark)).put(NODES, key, dump(done))
            )
        except ConflictError:
            pass
        self.adoptions.append({"node": node, "n": len(taken), "at": t0, "ms": self.now_ms() - t0})
        if taken and self.on_adopted is not None:
            self.on_adopted(taken)
        return len(taken)


#: The environment variable that makes a runtime join its data directory as a node.
NODE_ID_ENV = "ACTORFLOW_NODE_ID"
#: The environment variable with the node's lease timeout, in seconds.
LEASE_TIMEOUT_ENV = "ACTORFLOW_LEASE_TIMEOUT"
#: The memory map of a node: large and sparse, so that no process ever has to
#: grow it while others have it mapped.
NODE_MAP_SIZE = 1 << 38


def node_sequence(slot: int) -> itertools.count[int]:
    """Event, history and queue ids for a node: increasing, and distinct across live nodes.

    Ids start from the current time in microseconds, as for a lone runtime,
    shifted by the slot so that every live node draws from its own residue.
    """
    return itertools.count(time.time_ns() // 1000 * _SLOTS + slot, _SLOTS)  # noqa: TID251
