"""JSON views of workflows, instances, steps and history for the HTTP API.

Every read goes through :mod:`actorflow.workflows.query` (the one read-only
query module the handles and the ``actorflow`` command use too). Values
stored by the runtime (params, outputs, step results, event payloads) are
arbitrary Python values: they are rendered as JSON where they can be, and as
their ``repr`` where they cannot, so that a read never fails on an odd value.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from actorflow.core.clock import to_datetime
from actorflow.workflows.handles import Instance, WorkflowBinding
from actorflow.workflows.query import (
    document,
    event_document,
    iso,
    jsonable,
    step_document,
    summary_document,
)

if TYPE_CHECKING:
    from actorflow.workflows.history import HistoryEvent

__all__ = [
    "instance_summary",
    "instance_view",
    "iso",
    "jsonable",
    "sse_message",
    "workflow_counts",
]


def workflow_counts(binding: WorkflowBinding) -> dict[str, int]:
    """Counts a workflow's instances by status (live statuses included).

    From the status index, one prefix per status: O(statuses), not a read
    per instance.
    """
    return binding.parts.query.counts(binding.name)


def instance_summary(binding: WorkflowBinding, inst: Instance) -> dict[str, Any]:
    """One row of an instance list: id, status, times and error."""
    parts = binding.parts
    return summary_document(parts.query.summary(binding.name, inst.id, parts.record_key(inst.id)))


def instance_view(binding: WorkflowBinding, inst: Instance) -> dict[str, Any]:
    """An instance's status, params, output, error, times and steps.

    ``description`` is :meth:`Instance.describe <actorflow.Instance.describe>`
    as JSON: the document ``actorflow describe --json`` prints.
    """
    steps = inst.steps()
    parts = binding.parts
    rk = parts.record_key(inst.id)
    d = parts.query.describe(binding.name, inst.id, rk, steps=steps)
    return {
        **parts.query.status_document(binding.name, inst.id, rk),
        "end": iso(d.ended),
        "now": iso(to_datetime(parts.ctx.now_ms() / 1000.0)),
        "steps": [step_document(s) for s in steps],
        "description": document(d),
    }


def sse_message(e: HistoryEvent) -> str:
    """One Server-Sent Events message: ``id`` the cursor, ``event`` the type, ``data`` JSON.

    The JSON is on one line (``json.dumps`` escapes newlines), as a ``data``
    field must be.
    """
    data = json.dumps(event_document(e), separators=(",", ":"))
    return f"id: {e.cursor}\nevent: {e.type}\ndata: {data}\n\n"
