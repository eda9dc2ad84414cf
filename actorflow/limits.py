"""Flow-control and size limits, with Cloudflare's published presets."""

from __future__ import annotations

import dataclasses
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
        burst: Token-bucket capacity for ``max_creation_rate`` (default: one
            second's worth).
        per_workflow: Overrides by workflow name, e.g.
            ``{"checkout": {"max_concurrent": 10}}``.
    """

    max_concurrent: int = 10_000
    max_creation_rate: float | None = None
    max_queued: int = 2_000_000
    max_steps: int = 10_000
    max_step_result_bytes: int = MiB
    max_event_payload_bytes: int = MiB
    overflow: Literal["queue", "reject"] = "queue"
    burst: float | None = None
    per_workflow: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_concurrent < 1:
            raise ValueError("Limits.max_concurrent must be at least 1")
        if self.max_creation_rate is not None and self.max_creation_rate <= 0:
            raise ValueError("Limits.max_creation_rate must be positive or None")
        if self.max_queued < 0 or self.max_steps < 1:
            raise ValueError("Limits.max_queued must be >= 0 and max_steps >= 1")
        if self.overflow not in ("queue", "reject"):
            raise ValueError("Limits.overflow must be 'queue' or 'reject'")
        names = {f.name for f in dataclasses.fields(self)} - {"per_workflow"}
        for wf, over in self.per_workflow.items():
            unknown = set(over) - names
            if unknown:
                raise ValueError(f"Limits.per_workflow[{wf!r}]: unknown fields {sorted(unknown)}")

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
