"""JSON views of workflows, instances, steps and history for the HTTP API.

Values stored by the runtime (params, outputs, step results, event payloads)
are arbitrary Python values. They are rendered as JSON where they can be, and
as their ``repr`` where they cannot, so that a read never fails on an odd value.
"""

from __future__ import annotations

import dataclasses
import math
from datetime import datetime
from typing import Any

from actorflow.core.clock import to_datetime
from actorflow.workflows.definition import STATUSES
from actorflow.workflows.handles import Instance, WorkflowBinding
from actorflow.workflows.history import Attempt, HistoryEvent, StepRecord, read_history
from actorflow.workflows.records import INST, load

__all__ = [
    "history_view",
    "instance_summary",
    "instance_view",
    "jsonable",
    "step_view",
    "workflow_counts",
]

_MAX_DEPTH = 64
_ENDS = ("WORKFLOW_SUCCESS", "WORKFLOW_FAILURE", "WORKFLOW_TERMINATED")
_KINDS = {"do": "step", "sleep": "sleep", "wait_for_event": "waitForEvent"}


def jsonable(value: Any, _depth: int = 0) -> Any:
    """Returns ``value`` as plain JSON data: datetimes as ISO strings, others as repr."""
    if _depth > _MAX_DEPTH:
        return repr(value)
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, datetime):
        return iso(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, _depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [jsonable(v, _depth + 1) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            f.name: jsonable(getattr(value, f.name), _depth + 1) for f in dataclasses.fields(value)
        }
    return repr(value)


def iso(when: datetime | None) -> str | None:
    """Returns an ISO 8601 string with milliseconds, or None."""
    return None if when is None else when.isoformat(timespec="milliseconds")


def _ms_iso(ms: int | float | None) -> str | None:
    if ms is None:
        return None
    return iso(to_datetime(ms / 1000.0))


def _record(binding: WorkflowBinding, inst: Instance) -> dict[str, Any] | None:
    rk = binding._wfe.rk(inst.id)
    raw = binding._storage.get(INST, rk) if rk is not None else None
    return None if raw is None else load(raw)


def workflow_counts(binding: WorkflowBinding) -> dict[str, int]:
    """Counts a workflow's instances by status (live statuses included).

    One listing, each instance counted once at the status it has when read:
    a list per status could meet an instance that moved between two of them.
    """
    out = dict.fromkeys((s for s in STATUSES if s != "unknown"), 0)
    for inst in binding.list(limit=None):
        status = inst.status().status
        if status in out:
            out[status] += 1
    return out


def instance_summary(binding: WorkflowBinding, inst: Instance) -> dict[str, Any]:
    """One row of an instance list: id, status, times and error."""
    st = inst.status()
    rec = _record(binding, inst) or {}
    return {
        "id": inst.id,
        "workflow": binding.name,
        "status": st.status,
        "created_on": _ms_iso(rec.get("created")),
        "started_on": _ms_iso(rec.get("started")),
        "error": jsonable(st.error),
    }


def _attempt_view(a: Attempt) -> dict[str, Any]:
    return {
        "attempt": a.attempt,
        "start": iso(a.start),
        "end": iso(a.end),
        "success": None if a.end is None else a.error is None,
        "error": jsonable(a.error),
        "retry_delay_ms": a.retry_delay_ms,
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
    """An instance's status, params, output, error, times and steps."""
    st = inst.status()
    rec = _record(binding, inst) or {}
    steps = inst.steps()
    params = rec.get("params")
    finished = st.status in ("complete", "errored", "terminated")
    end = None
    if finished and rec:
        ends = [
            e.timestamp
            for e in read_history(binding._storage, inst._rk(), rec, steps)
            if e.type in _ENDS
        ]
        end = ends[-1] if ends else None
    return {
        "id": inst.id,
        "workflow": binding.name,
        "status": st.status,
        "params": jsonable(binding._storage.serializer.loads(params)) if params else None,
        "output": jsonable(st.output),
        "error": jsonable(st.error),
        "queued": _ms_iso(rec.get("created")),
        "start": _ms_iso(rec.get("started")),
        "end": iso(end),
        "success": (st.status == "complete") if finished else None,
        "now": _ms_iso(binding._ctx.now_ms()),
        "steps": [step_view(s) for s in steps],
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
