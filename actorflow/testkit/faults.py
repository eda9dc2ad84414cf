"""Fault injection for tests: failing or slow storage writes, lost or duplicated calls.

:class:`Faults` drives the hooks of one runtime. Every fault ends in a
documented outcome, never in silent loss (see ``docs/testing.md``):

* A write that fails (``fail_writes``, a full disk by default) fails the
  operation that made it: ``create``, ``send_event`` and control calls raise
  :class:`~actorflow.StorageError` to their caller and nothing of them is
  written; a Durable Object call raises it to its caller and the object is
  reset (its next call reads storage anew); a workflow run that cannot
  checkpoint is restarted from its last checkpoint, with backoff, for as
  long as writes fail (a storage fault never counts against
  ``max_crashes``).
* A slow write (``slow_writes``) only delays: every caller still gets its
  answer after its writes are durable.
* A lost request (``drop_calls``) raises :class:`~actorflow.DeliveryError`
  with ``applied=False``: the call never ran. A lost reply
  (``drop_calls(..., reply=True)``) raises it with ``applied=True``: the
  call ran and its writes are durable.
* A duplicated delivery (``duplicate_calls``) runs the call twice, one after
  the other; both runs' writes commit and the caller gets the first reply.

Crashes at step boundaries are a modifier: ``binding.modify(id).crash_at(...)``.
"""

from __future__ import annotations

import copy
import errno
import threading
from typing import TYPE_CHECKING, Any

from actorflow.core.clock import parse_duration_ms
from actorflow.core.storage import WriteBatch
from actorflow.objects.namespace import DurableObjectId, DurableObjectNamespace, DurableObjectStub

if TYPE_CHECKING:
    from actorflow.runtime import Runtime
    from actorflow.workflows.handles import Instance

__all__ = ["Faults"]


class _Rule:
    """One delivery fault: what to do, to which calls, how many more times."""

    __slots__ = ("action", "left", "method", "oid")

    def __init__(self, action: str, oid: str | None, method: str | None, left: int | None) -> None:
        self.action = action
        self.oid = oid
        self.method = method
        self.left = left


class Faults:
    """Injects faults into one runtime; ``clear()`` (or leaving a ``with`` block) removes them.

    Methods chain. Counters tell what was injected: :attr:`failed_writes`,
    :attr:`dropped`, :attr:`duplicated`.

    Args:
        runtime: The runtime to inject faults into.
    """

    def __init__(self, runtime: Runtime) -> None:
        self._rt = runtime
        self._lock = threading.Lock()
        self._write_error: BaseException | None = None
        self._write_left: int | None = 0
        self._write_keys: list[bytes] | None = None
        self._rules: dict[str, list[_Rule]] = {}
        self._namespaces: dict[str, DurableObjectNamespace[Any]] = {}
        self.failed_writes = 0
        self.dropped = 0
        self.duplicated = 0

    def __enter__(self) -> Faults:
        return self

    def __exit__(self, *exc: object) -> None:
        self.clear()

    # -- storage --------------------------------------------------------------------

    def fail_writes(
        self,
        *,
        times: int | None = None,
        error: BaseException | None = None,
        instance: Instance | None = None,
    ) -> Faults:
        """Makes durable writes fail, as a full disk does.

        Args:
            times: How many write batches fail (``None``: every one until
                :meth:`stop_failing_writes` or :meth:`clear`).
            error: What the disk reports (default ``OSError(ENOSPC)``). The
                caller sees a :class:`~actorflow.StorageError` naming it.
            instance: Fail only the writes of this workflow instance (its
                record, steps, events and history).
        """
        err = error or OSError(errno.ENOSPC, "No space left on device")
        keys = None
        if instance is not None:
            keys = [instance.parts.record_key(instance.id)]
        with self._lock:
            self._write_error, self._write_left, self._write_keys = err, times, keys
        self._rt.storage.set_fault(self._write_fault)
        return self

    def stop_failing_writes(self) -> Faults:
        """Lets writes succeed again (the disk has room again)."""
        with self._lock:
            self._write_left = 0
        self._rt.storage.set_fault(None)
        return self

    def _write_fault(self, batch: WriteBatch) -> None:
        with self._lock:
            if self._write_left is not None and self._write_left <= 0:
                return
            if self._write_keys is not None and not _touches(batch, self._write_keys):
                return
            if self._write_left is not None:
                self._write_left -= 1
            self.failed_writes += 1
            err = self._write_error
        raise copy.copy(err) if err is not None else OSError(errno.ENOSPC, "disk full")

    def slow_writes(self, latency: Any) -> Faults:
        """Makes every group commit take ``latency`` longer (a duration: ms, a string...)."""
        seconds = parse_duration_ms(latency, what="Faults.slow_writes") / 1000.0
        self._rt.storage.set_latency(seconds)
        return self

    # -- Durable Object deliveries -------------------------------------------------

    def drop_calls(
        self,
        target: DurableObjectNamespace[Any] | DurableObjectStub[Any],
        *,
        method: str | None = None,
        times: int | None = 1,
        reply: bool = False,
    ) -> Faults:
        """Loses calls to a namespace's objects (or to one object, given a stub).

        Args:
            target: A namespace, or a stub for one object.
            method: Only calls of this method.
            times: How many calls are lost (``None``: all until cleared).
            reply: Lose the reply instead of the request: the call runs and
                its writes land, and the caller still gets
                :class:`~actorflow.DeliveryError` (``applied=True``).
        """
        return self._add(target, "drop_reply" if reply else "drop", method, times)

    def duplicate_calls(
        self,
        target: DurableObjectNamespace[Any] | DurableObjectStub[Any],
        *,
        method: str | None = None,
        times: int | None = 1,
    ) -> Faults:
        """Delivers calls twice: the object runs each twice in a row; the caller gets
        the first reply."""
        return self._add(target, "duplicate", method, times)

    def _add(
        self,
        target: DurableObjectNamespace[Any] | DurableObjectStub[Any],
        action: str,
        method: str | None,
        times: int | None,
    ) -> Faults:
        if isinstance(target, DurableObjectStub):
            # A stub names its namespace only privately: a public attribute would
            # shadow the object's RPC method of that name.
            ns, oid = target._ns, target.id.hex  # noqa: SLF001 - see above
        elif isinstance(target, DurableObjectNamespace):
            ns, oid = target, None
        else:
            raise TypeError("target must be a DurableObjectNamespace or a DurableObjectStub")
        with self._lock:
            self._rules.setdefault(ns.name, []).append(_Rule(action, oid, method, times))
            self._namespaces[ns.name] = ns

        def fault(oid: DurableObjectId, name: str) -> str | None:
            return self._delivery(ns.name, oid, name)

        ns.set_delivery_fault(fault)
        return self

    def _delivery(self, ns: str, oid: DurableObjectId, method: str) -> str | None:
        with self._lock:
            for rule in self._rules.get(ns, ()):
                if rule.left is not None and rule.left <= 0:
                    continue
                if (rule.oid is not None and rule.oid != oid.hex) or (
                    rule.method is not None and rule.method != method
                ):
                    continue
                if rule.left is not None:
                    rule.left -= 1
                if rule.action == "duplicate":
                    self.duplicated += 1
                else:
                    self.dropped += 1
                return rule.action
        return None

    # -- all ------------------------------------------------------------------------

    def clear(self) -> None:
        """Removes every fault this object injected."""
        self.stop_failing_writes()
        self._rt.storage.set_latency(0)
        with self._lock:
            namespaces = list(self._namespaces.values())
            self._rules.clear()
            self._namespaces.clear()
        for ns in namespaces:
            ns.set_delivery_fault(None)


def _touches(batch: WriteBatch, prefixes: list[bytes]) -> bool:
    """True if ``batch`` writes a key equal to, or under, one of ``prefixes``."""
    for _kind, _ks, key, _value in batch.ops:
        for p in prefixes:
            if key == p or key.startswith(p + b"\x00"):
                return True
    return False
