"""Forking an instance: which of its steps the fork keeps, and the write that creates it.

Used by :meth:`~actorflow.workflows.handles.Instance.fork`. A fork is a new
instance of the same workflow whose step records start as copies of the
origin's completed steps that started before ``at_step`` (optionally with
other outputs): its run replays those and runs ``at_step`` and every later
step anew. Everything it is (its record, id, fence, index and queue entries,
its copied steps and, on several nodes, its ownership) is one guarded write,
so a crash leaves either no fork or a whole one; the origin's records are
only read.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from actorflow.core.errors import InvalidInstanceState, LimitExceeded, SerializationError
from actorflow.core.serializers import Serializer
from actorflow.core.storage import WriteBatch
from actorflow.workflows.engine.context import WorkflowEngine
from actorflow.workflows.engine.creation import new_instance_batch
from actorflow.workflows.matching import PATCH_KIND
from actorflow.workflows.records import (
    STEPS,
    StepCheckpoint,
    StepStatus,
    dump,
    load_step,
    record_number,
    rkey,
    step_key_of,
)

__all__ = ["ForkPlan", "fork_instance_batch", "plan_fork", "step_ref"]

#: The kinds of step records a fork can start from and keep (rollback handlers'
#: records are not steps of the run: the replay registers the handlers again).
_RUN_KINDS = ("do", "sleep", "wait_for_event")


def step_ref(at_step: Any, where: str) -> tuple[str, int]:
    """``(name, count)`` of a step given as a name (its first occurrence) or ``{"name", "count"}``.

    Raises:
        TypeError: ``at_step`` is neither a str nor such a mapping.
        ValueError: The name is empty, the mapping has other keys, or the
            count is not a positive int.
    """
    if isinstance(at_step, str):
        name, count = at_step, 1
    elif isinstance(at_step, Mapping):
        extra = set(at_step) - {"name", "count"}
        if extra or "name" not in at_step:
            raise ValueError(
                f'{where}: at_step is a step name or {{"name": ..., "count": n}}, not {at_step!r}'
            )
        name, count = at_step["name"], at_step.get("count", 1)
        if not isinstance(name, str):
            raise TypeError(f"{where}: at_step's name is a str, not {type(name).__name__}")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"{where}: at_step's count is an int from 1, not {count!r}")
    else:
        raise TypeError(
            f'{where}: at_step is a step name or {{"name": ..., "count": n}}, '
            f"not {type(at_step).__name__}"
        )
    if not name:
        raise ValueError(f"{where}: at_step names no step (an empty name)")
    return name, count


class ForkPlan:
    """The step records a fork keeps, checked against the origin's.

    Attributes:
        at: ``(name, count)`` of the step the fork runs from.
        kept: The records it keeps (in start order), with the overrides
            applied and marked as kept from the origin (``fk``).
    """

    __slots__ = ("at", "kept")

    def __init__(self, at: tuple[str, int], kept: list[StepCheckpoint]) -> None:
        self.at = at
        self.kept = kept


def plan_fork(
    wfe: WorkflowEngine,
    origin: str,
    stored: Iterable[tuple[bytes, bytes]],
    at_step: Any,
    overrides: Mapping[str, Any] | None,
    serializer: Serializer,
) -> ForkPlan:
    """Checks a fork of instance ``origin`` (step rows ``stored``) and picks its steps.

    Kept: the ``do`` steps, sleeps and event waits that started before
    ``at_step``; each must be complete. ``overrides`` maps the name of a kept
    ``do`` step or event wait to the output its first occurrence returns in
    the fork instead of the stored one.

    Raises:
        InvalidInstanceState: ``at_step`` is not in the origin's steps; a step
            before it failed or has not ended (the fork could not replay it);
            an override names a step that does not exist, is not before
            ``at_step``, or is a sleep (which has no output).
        SerializationError: An override value cannot be serialized.
        LimitExceeded: An override is larger than the step result (or event
            payload) limit.
        TypeError, ValueError: ``at_step`` or ``overrides`` is malformed.
    """
    name = wfe.name
    where = f"workflow {name!r}, instance {origin!r}: fork"
    at_name, at_count = step_ref(at_step, where)
    rows = sorted(
        (load_step(v) for _k, v in stored),
        key=lambda r: r["seq"],
    )
    # The answers of step.patched given before at_step go with the steps they
    # chose: decided again, the copied steps past the call would make it False.
    patches = [r for r in rows if r["k"] == PATCH_KIND]
    rows = [r for r in rows if r["k"] in _RUN_KINDS]
    at = next((r for r in rows if r["n"] == at_name and r["c"] == at_count), None)
    if at is None:
        known = ", ".join(sorted({repr(r["n"]) for r in rows})) or "none"
        raise InvalidInstanceState(
            f"(instance.cannot_fork) {where}: step {at_name!r} (occurrence {at_count}) is not in "
            f"its execution history (its steps: {known})",
            workflow=name,
            instance=origin,
            step=at_name,
        )
    before = [r for r in rows if r["seq"] < at["seq"]]
    for r in before:
        if r["s"] != StepStatus.DONE:
            raise InvalidInstanceState(
                f"(instance.cannot_fork) {where} at step {at_name!r}: step {r['n']!r} "
                f"(occurrence {r['c']}) before it is {r['s']}, not complete, so the fork "
                f"could not replay it; fork at {r['n']!r} or before it",
                workflow=name,
                instance=origin,
                step=r["n"],
            )
    kept = [cast(StepCheckpoint, dict(r)) for r in before]
    if overrides is not None and not isinstance(overrides, Mapping):
        raise TypeError(
            f"{where}: overrides is a mapping of step names to outputs, "
            f"not {type(overrides).__name__}"
        )
    for step, value in (overrides or {}).items():
        if not isinstance(step, str):
            raise TypeError(f"{where}: an override is keyed by a step name, not {step!r}")
        i = next((i for i, r in enumerate(kept) if r["n"] == step and r["c"] == 1), None)
        if i is None:
            later = any(r["n"] == step for r in rows)
            why = f"is not before step {at_name!r}" if later else "is not one of its steps"
            raise InvalidInstanceState(
                f"(instance.cannot_fork) {where} at step {at_name!r}: override of step "
                f"{step!r}: it {why}; only the steps the fork keeps can be overridden",
                workflow=name,
                instance=origin,
                step=step,
            )
        rec = kept[i]
        step_where = f"{where} at step {at_name!r}: override of step {step!r}"
        if rec["k"] == "sleep":
            raise InvalidInstanceState(
                f"(instance.cannot_fork) {step_where}: a sleep has no output to override",
                workflow=name,
                instance=origin,
                step=step,
            )
        try:
            data = serializer.dumps(value)
        except SerializationError as e:
            raise SerializationError(
                f"{step_where}: {e}", workflow=name, instance=origin, step=step
            ) from None
        limits = wfe.limits
        limit = limits.max_step_result_bytes if rec["k"] == "do" else limits.max_event_payload_bytes
        if len(data) > limit:
            raise LimitExceeded(
                f"{step_where}: the value is {len(data)} bytes; the maximum is {limit}",
                workflow=name,
                instance=origin,
                step=step,
            )
        if rec["k"] == "do":
            rec["r"] = data
        else:
            rec["ev"] = [data, rec["ev"][1]]
    kept += [cast(StepCheckpoint, dict(r)) for r in patches if r["seq"] < at["seq"]]
    for rec in kept:
        rec.pop("tk", None)  # a timer key of the origin's: the fork holds no timer of it
        rec["fk"] = True
    return ForkPlan((at_name, at_count), kept)


def fork_instance_batch(
    wfe: WorkflowEngine,
    origin: str,
    plan: ForkPlan,
    iid: str,
    n: int,
    params: bytes,
    now_ms: int,
    seq: int,
    traceparent: str | None = None,
    *,
    key: str | None = None,
    priority: int = 0,
) -> WriteBatch:
    """The write that creates fork ``iid`` (record number ``n``) of instance ``origin``.

    That of :func:`~actorflow.workflows.engine.creation.new_instance_batch`
    (guarded: the id must not exist; claimed by this node on several nodes),
    with the record naming its origin, plus the kept step records under the
    fork's key. ``key`` and ``priority`` are the origin's flow control.
    """
    batch = new_instance_batch(
        wfe,
        iid,
        n,
        params,
        now_ms,
        seq,
        traceparent,
        origin={"w": wfe.name, "i": origin, "n": plan.at[0], "c": plan.at[1]},
        key=key,
        priority=priority,
    )
    rk = rkey(wfe.name, record_number(n))
    for rec in plan.kept:
        batch.put(STEPS, step_key_of(rk, rec), dump(rec))
    return batch
