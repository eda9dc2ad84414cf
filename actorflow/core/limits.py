"""Flow-control and size limits, with Cloudflare's published presets."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["Limits"]

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """The caps a runtime enforces.

    The defaults suit local use: no creation-rate limit, 10,000 instances
    running at once, 2,000,000 queued per workflow, and Cloudflare's size
    and step limits.

    Attributes:
        max_concurrent: Instances ``running`` at once (waiting and paused
            ones do not count). Past it, instances stay ``queued``.
        max_creation_rate: Starts released per second (a token bucket);
            ``None`` means unlimited. Creations above it are still accepted
            and queued, unless ``overflow="reject"``.
        max_queued: Instances queued per workflow; past it ``create`` raises
            :class:`~actorflow.RateLimitError` and writes nothing.
        max_steps: ``step.do`` calls per instance run (replays included).
        max_step_result_bytes: Serialized size of one step result.
        max_event_payload_bytes: Serialized size of params and event payloads.
        overflow: ``"queue"`` (Cloudflare's behaviour) or ``"reject"``: raise
            :class:`~actorflow.RateLimitError` at ``create`` when the rate or
            the concurrency cap is exceeded instead of queueing.
        max_concurrent_per_key: Instances ``running`` at once that share a
            flow-control ``key`` (``create(key=...)``); ``None``: no cap. As
            for ``max_concurrent``, waiting and paused instances give their
            slot back; past the cap, the key's instances stay ``queued``
            without holding up other keys. Each node enforces it for the
            instances it runs.
        burst: Token-bucket capacity for ``max_creation_rate`` (default: one
            second's worth).
        per_workflow: Overrides by workflow name, e.g.
            ``{"checkout": {"max_concurrent": 10}}``.

    Raises:
        ValueError: At construction, for a field of the wrong type or out of
            its range (a count below 1, ``max_concurrent_per_key`` included,
            or below 0 for ``max_queued``; a rate that is not a positive
            finite number; a ``burst`` below 1), an
            unknown ``overflow``, or a ``per_workflow`` override that names an
            unknown field or sets a bad value (named with its workflow).
    """

    max_concurrent: int = 10_000
    max_creation_rate: float | None = None
    max_queued: int = 2_000_000
    max_steps: int = 10_000
    max_step_result_bytes: int = MiB
    max_event_payload_bytes: int = MiB
    overflow: Literal["queue", "reject"] = "queue"
    burst: float | None = None
    max_concurrent_per_key: int | None = None
    per_workflow: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _count("max_concurrent", self.max_concurrent, 1)
        _count("max_queued", self.max_queued, 0)
        _count("max_steps", self.max_steps, 1)
        _count("max_step_result_bytes", self.max_step_result_bytes, 1)
        _count("max_event_payload_bytes", self.max_event_payload_bytes, 1)
        if self.max_concurrent_per_key is not None:
            _count("max_concurrent_per_key", self.max_concurrent_per_key, 1)
        _number("max_creation_rate", self.max_creation_rate, least=0, strict=True)
        _number("burst", self.burst, least=1, strict=False)
        if self.overflow not in ("queue", "reject"):
            raise ValueError(f"Limits.overflow must be 'queue' or 'reject', not {self.overflow!r}")
        if not isinstance(self.per_workflow, Mapping):
            raise ValueError("Limits.per_workflow must map workflow names to dicts of fields")
        names = {f.name for f in dataclasses.fields(self)} - {"per_workflow"}
        for wf, over in self.per_workflow.items():
            if not isinstance(wf, str) or not isinstance(over, Mapping):
                raise ValueError(
                    f"Limits.per_workflow must map workflow names to dicts of fields, "
                    f"not {wf!r} to {over!r}"
                )
            unknown = set(over) - names
            if unknown:
                raise ValueError(f"Limits.per_workflow[{wf!r}]: unknown fields {sorted(unknown)}")
            try:
                # The same checks, now rather than when the workflow first runs.
                dataclasses.replace(self, per_workflow={}, **dict(over))
            except ValueError as e:
                raise ValueError(f"Limits.per_workflow[{wf!r}]: {e}") from None

    @classmethod
    def cloudflare_v1(cls, **overrides: Any) -> Limits:
        """Workflows at GA: 4,500 concurrent, 100 creations/s, 1,000,000 queued."""
        base: dict[str, Any] = dict(
            max_concurrent=4_500, max_creation_rate=100.0, max_queued=1_000_000
        )
        return cls(**(base | overrides))

    @classmethod
    def cloudflare_v2(cls, **overrides: Any) -> Limits:
        """Workflows V2: 50,000 concurrent, 300 creations/s, 2,000,000 queued per workflow."""
        base: dict[str, Any] = dict(
            max_concurrent=50_000, max_creation_rate=300.0, max_queued=2_000_000
        )
        return cls(**(base | overrides))

    def for_workflow(self, name: str) -> Limits:
        """Returns the limits that apply to workflow ``name`` (its overrides applied)."""
        over = self.per_workflow.get(name)
        if not over:
            return self
        return dataclasses.replace(self, per_workflow={}, **dict(over))


def _count(name: str, value: object, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"Limits.{name} must be an int >= {least}, not {value!r}")


def _number(name: str, value: object, *, least: float, strict: bool) -> None:
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or (value <= least if strict else value < least)
    ):
        rule = f"> {least:g}" if strict else f">= {least:g}"
        raise ValueError(f"Limits.{name} must be a finite number {rule} or None, not {value!r}")
