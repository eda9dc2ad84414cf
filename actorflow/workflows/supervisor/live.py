"""The live table: at most one instance actor per instance, activated on demand.

Thread: :meth:`LiveTable.actor` and :meth:`LiveTable.call` are called from any
thread (a handle's control call comes from the user's); the table is changed
under its lock. :meth:`LiveTable.actors` and :meth:`LiveTable.evict` run on the
engine loop.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

import pykka

from actorflow.core.errors import ActorflowError, RecordFormatError
from actorflow.workflows.definition import instance_not_found
from actorflow.workflows.engine.instance import InstanceActor
from actorflow.workflows.records import IDS, INST, load, rkey_of

if TYPE_CHECKING:
    from actorflow.cluster.lease import NodeLease
    from actorflow.core.storage import Storage
    from actorflow.workflows.engine.context import EngineContext, WorkflowEngine
    from actorflow.workflows.engine.messages import InstanceMessage

__all__ = ["LiveTable"]

log = logging.getLogger("actorflow.supervisor")


class LiveTable:
    """The live instance actors by instance key.

    Args:
        ctx: The engine context (its storage and liveness check).
        node: This node's lease (multi-node), None for a lone runtime.
    """

    def __init__(self, ctx: EngineContext, node: NodeLease | None) -> None:
        self.ctx = ctx
        self._storage: Storage = ctx.storage
        self.node = node
        self.live: dict[bytes, InstanceActor] = {}
        self._lock = threading.Lock()

    def actor(self, wfe: WorkflowEngine, iid: str) -> InstanceActor:
        """Returns the live actor of an instance, activating it if needed.

        Raises:
            InstanceNotFound: No such instance.
        """
        ik = wfe.ik(iid)
        actor = self.live.get(ik)
        if actor is not None and not actor.actor_stopped.is_set():
            return actor
        with self._lock:
            actor = self.live.get(ik)
            if actor is None or actor.actor_stopped.is_set():
                rk = wfe.rk(iid)
                raw = self._storage.get(INST, rk) if rk is not None else None
                if rk is None or raw is None:
                    raise instance_not_found(wfe.name, iid)
                actor = self._activate(wfe, iid, ik, rk, raw)
        return actor

    def _activate(
        self, wfe: WorkflowEngine, iid: str, ik: bytes, rk: bytes, raw: bytes
    ) -> InstanceActor:
        """Makes the live actor of an instance from its record (hold ``_lock``).

        Not started on the executor: its first message schedules it, and the
        supervisor starts runs without one (see ``InstanceActor.can_begin``).
        """
        actor = InstanceActor(wfe, iid, rk, load(raw))
        if self.node is not None:  # read after the record: see NodeLease
            actor.owner = self.node.owner_of(ik)
            actor.owned = actor.owner == self.node.node_id
        self.live[ik] = actor
        return actor

    def actors(
        self,
        pairs: list[tuple[WorkflowEngine, str]],
        known: dict[bytes, bytes] | None = None,
    ) -> list[InstanceActor | None]:
        """:meth:`actor` for many instances, with one read for every record (engine loop only).

        None stands for an instance that does not exist. ``known`` maps
        instance keys to record keys the caller already has (from timer targets).
        """
        out: list[InstanceActor | None] = [None] * len(pairs)
        missing: list[tuple[int, WorkflowEngine, str, bytes]] = []
        live = self.live
        for i, (wfe, iid) in enumerate(pairs):
            ik = wfe.ik(iid)
            actor = live.get(ik)
            if actor is not None and not actor.actor_stopped.is_set():
                out[i] = actor
            else:
                missing.append((i, wfe, iid, ik))
        if not missing:
            return out
        known = known or {}
        rks = {m[3]: known[m[3]] for m in missing if m[3] in known}
        unknown = [m[3] for m in missing if m[3] not in known]
        if unknown:
            rks.update(
                (ik, rkey_of(ik, n)) for ik, n in self._storage.get_many(IDS, unknown).items()
            )
        raws = self._storage.get_many(INST, list(rks.values()))
        with self._lock:
            for i, wfe, iid, ik in missing:
                actor = live.get(ik)  # made meanwhile (another thread, or a repeat here)
                if actor is None or actor.actor_stopped.is_set():
                    rk = rks.get(ik)
                    raw = raws.get(rk) if rk is not None else None
                    if rk is None or raw is None:
                        continue
                    try:
                        actor = self._activate(wfe, iid, ik, rk, raw)
                    except RecordFormatError as e:
                        # One damaged record must not hold up the others of the burst.
                        log_damaged(wfe.name, iid, e)
                        continue
                out[i] = actor
        return out

    def drop(self, actor: InstanceActor) -> None:
        """Takes a deleted instance's actor out of the table (engine loop only).

        The next call about the instance finds no record; the actor itself
        lives on until its inbox is empty, refusing what is in it (see
        ``InstanceActor.deleted``), and is then evicted as usual.
        """
        with self._lock:
            if self.live.get(actor.ik) is actor:
                del self.live[actor.ik]

    def evict(self, actor: InstanceActor) -> None:
        """Drops an idle actor from the table (engine loop only); kept if a message came."""
        with self._lock:
            if not actor.actor_inbox.empty():
                return
            if self.live.get(actor.ik) is actor:
                del self.live[actor.ik]
            actor.actor_stopped.set()
            # The run is over (or never was): dropping it breaks the actor <->
            # run reference cycle, so both are freed at once, not by a full
            # collection.
            actor.exec = None

    def call(self, wfe: WorkflowEngine, iid: str, message: InstanceMessage) -> Any:
        """Sends ``message`` to the instance's actor and returns its reply (any thread)."""
        self.ctx.check()
        for _ in range(16):
            actor = self.actor(wfe, iid)
            try:
                return actor.actor_ref.ask(message)
            except pykka.ActorDeadError:
                continue  # evicted before it took the message: it never ran
        raise ActorflowError(f"workflow {wfe.name!r}, instance {iid!r}: actor kept stopping")

    def call_many(
        self, wfe: WorkflowEngine, ids: list[str], message: InstanceMessage
    ) -> list[BaseException | None]:
        """:meth:`call` to many instances at once (any thread): their writes share commits.

        Returns each instance's error, or None where the call succeeded.
        """
        self.ctx.check()
        asked: list[pykka.Future[Any] | None] = []
        for iid in ids:
            try:
                asked.append(self.actor(wfe, iid).actor_ref.ask(message, block=False))
            except (ActorflowError, pykka.ActorDeadError):
                asked.append(None)  # :meth:`call` below gives the answer (or the error again)
        out: list[BaseException | None] = []
        for iid, fut in zip(ids, asked, strict=True):
            try:
                if fut is None or not _answered(fut):
                    self.call(wfe, iid, message)
                out.append(None)
            except ActorflowError as e:
                out.append(e)
        return out


def _answered(fut: pykka.Future[Any]) -> bool:
    """Waits for an asked message's reply; False if the actor stopped before taking it."""
    try:
        fut.get()
    except pykka.ActorDeadError:  # evicted before it took the message: it never ran
        return False
    return True


def log_damaged(workflow: str, iid: str, err: RecordFormatError) -> None:
    """Logs an instance left where it is because its record is damaged."""
    log.error(
        "workflow %r, instance %r: %s",
        workflow,
        iid,
        err,
        extra={"workflow": workflow, "instance": iid},
    )
