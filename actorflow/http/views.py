"""JSON views of workflows, instances, steps and history for the HTTP API.

Every read goes through :mod:`actorflow.workflows.query` (the one read-only
query module the handles and the ``actorflow`` command use too). Values
stored by the runtime (params, outputs, step results, event payloads) are
arbitrary Python values: they are rendered as JSON where they can be, and as
their ``repr`` where they cannot, so that a read never fails on an odd value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from actorflow.core.clock import to_datetime
from actorflow.workflows.definition import FINISHED
from actorflow.workflows.handles import Instance, WorkflowBinding
from actorflow.workflows.query import document, iso, jsonable

if TYPE_CHECKING:  # the public types of what the handles return
    from actorflow.workflows.history import Attempt, HistoryEvent, StepRecord

__all__ = [
    "history_view",
    "instance_summary",
    "instance_view",
    "iso",
    "jsonable",
    "step_view",
    "workflow_counts",
]

_KINDS = {"do": "step", "sleep": "sleep", "wait_for_event": "waitForEvent"}


def workflow_counts(binding: WorkflowBinding) -> dict[str, int]:
    """Counts a workflow's instances by status (live statuses included).

    From the status index, one prefix per status: O(statuses), not a read
    per instance.
    """
    return binding.parts.query.counts(binding.name)


def instance_summary(binding: WorkflowBinding, inst: Instance) -> dict[str, Any]:
    """One row of an instance list: id, status, times and error."""
    parts = binding.parts
    s = parts.query.summary(binding.name, inst.id, parts.record_key(inst.id))
    return {
        "id": s.id,
        "workflow": s.workflow,
        "status": s.status,
        "created_on": iso(s.created),
        "started_on": iso(s.started),
        "error": jsonable(s.error),
    }


def _attempt_view(a: Attempt) -> dict[str, Any]:
    return {
        "attempt": a.attempt,
        "start": iso(a.start),
        "end": iso(a.end),
        "success": None if a.end is None else a.error is None,
        "error": jsonable(a.error),
        "retry_delay_ms": a.retry_delay_ms,
        "ran_on": a.ran_on,
    }


def step_view(s: StepRecord) -> dict[str, Any]:
    """One step, in the shape of Cloudflare's instance details, plus its attempts."""
    finished = s.status in ("complete", "errored")
    return {
        "type": _KINDS.get(s.kind, s.kind),
        "name": s.name,
        "count": s.count,
        "status": s.status,
        "start": iso(s.start),
        "end": iso(s.end),
        "deadline": iso(s.deadline),
        "finished": finished,
        "success": (s.status == "complete") if finished else None,
        "config": jsonable(s.config),
        "attempts": [_attempt_view(a) for a in s.attempts],
        "output": jsonable(s.output),
        "error": jsonable(s.error),
    }


def instance_view(binding: WorkflowBinding, inst: Instance) -> dict[str, Any]:
    """An instance's status, params, output, error, times and steps.

    ``description`` is :meth:`Instance.describe <actorflow.Instance.describe>`
    as JSON: the document ``actorflow describe --json`` prints.
    """
    steps = inst.steps()
    parts = binding.parts
    d = parts.query.describe(binding.name, inst.id, parts.record_key(inst.id), steps=steps)
    finished = d.status in FINISHED
    return {
        "id": inst.id,
        "workflow": binding.name,
        "status": d.status,
        "params": jsonable(d.params),
        "output": jsonable(d.output),
        "error": jsonable(d.error),
        "rollback": jsonable(d.rollback),
        "queued": iso(d.created),
        "start": iso(d.started),
        "end": iso(d.ended),
        "success": (d.status == "complete") if finished else None,
        "now": iso(to_datetime(parts.ctx.now_ms() / 1000.0)),
        "steps": [step_view(s) for s in steps],
        "description": document(d),
    }


def history_view(events: list[HistoryEvent]) -> list[dict[str, Any]]:
    """The event log as JSON, oldest first."""
    return [
        {
            "type": e.type,
            "timestamp": iso(e.timestamp),
            "step": e.step,
            "attempt": e.attempt,
            "data": jsonable(e.data),
        }
        for e in events
    ]
