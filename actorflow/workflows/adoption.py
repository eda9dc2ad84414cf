"""Adoption, the workflow side: taking over the instances of an expired node.

The cluster layer (:mod:`actorflow.cluster.lease`) decides that a node
expired and walks its ``owned`` index; it reads no workflow record. For each
chunk of that index it calls the claimer made here, which moves each
unfinished instance to the adopting node: a new epoch (so the old owner can
never commit again) and the new owner, in one write guarded on the epoch,
the owner and the record read.
"""

from __future__ import annotations

import functools
import threading

from actorflow.cluster.lease import OWNED, OWNER, Claimer, NodeLease, owned_key
from actorflow.core.codec import dump, load
from actorflow.core.storage import ConflictError, WriteBatch
from actorflow.workflows.definition import FINISHED
from actorflow.workflows.records import FENCE, IDS, INST, epoch_bytes, rkey_of

__all__ = ["claimer_for"]


def claimer_for(lease: NodeLease) -> Claimer:
    """Returns the claimer that adopts instances into ``lease``'s node."""
    return functools.partial(claim_instances, lease)


def claim_instances(lease: NodeLease, node: str, iks: list[bytes]) -> list[tuple[bytes, str]]:
    """Claims the instances ``iks`` of ``node`` for ``lease``'s node; drops index entries
    of the rest (finished, or no longer ``node``'s).

    Returns:
        The ``(instance key, status)`` pairs taken over.
    """
    storage = lease.storage
    rks = {ik: rkey_of(ik, n) for ik, n in storage.get_many(IDS, iks).items()}
    fences = storage.get_many(FENCE, rks.values())
    owners = storage.get_many(OWNER, iks)
    recs = storage.get_many(INST, rks.values())
    waits: list[tuple[bytes, str, threading.Event, list[BaseException | None]]] = []
    cleanup = WriteBatch()
    for ik in iks:
        rk = rks.get(ik, b"")
        raw, fence = recs.get(rk), fences.get(rk)
        rec = load(raw) if raw is not None else None
        if owners.get(ik) != node.encode() or rec is None or fence is None or rec["s"] in FINISHED:
            cleanup.delete(OWNED, owned_key(node, ik))
            continue
        epoch = int.from_bytes(fence, "big") + 1
        rec["epoch"] = epoch
        batch = WriteBatch()
        # Guarded on the record too: a node presumed dead may still be
        # writing (a late heartbeat), and its last write must not be undone.
        batch.guard(FENCE, rk, fence).guard(OWNER, ik, node.encode()).guard(INST, rk, raw)
        batch.put(FENCE, rk, epoch_bytes(epoch)).put(INST, rk, dump(rec))
        lease.claim(batch, ik, node)
        ev = threading.Event()
        res: list[BaseException | None] = [None]

        def cb(
            err: BaseException | None,
            ev: threading.Event = ev,
            res: list[BaseException | None] = res,
        ) -> None:
            res[0] = err
            ev.set()

        storage.submit(batch, cb)
        waits.append((ik, rec["s"], ev, res))
    if len(cleanup):
        storage.write(cleanup)
    out = []
    conflicts = False
    for ik, status, ev, res in waits:
        ev.wait()
        if res[0] is None:
            out.append((ik, status))
        elif not isinstance(res[0], ConflictError):
            raise res[0]
        else:
            conflicts = True  # it moved meanwhile (the next scan reads it again)...
    if conflicts:
        lease.confirm_live()  # ...or this node lost its own lease
    return out
