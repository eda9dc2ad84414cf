"""The ``scaling`` scenario: other scenarios at growing sizes, each in a fresh process.

For every size it records the time and the memory per instance; between
consecutive sizes it computes the growth exponent ``log(t2 / t1) / log(n2 / n1)``
(1 is linear). An exponent above :data:`SUPERLINEAR` from 1,000 instances on is
flagged: per-instance cost should stay flat or fall as the count grows.
"""

from __future__ import annotations

import math
from pathlib import Path

from actorflow.bench.isolate import run_isolated
from actorflow.bench.progress import Progress
from actorflow.bench.scenarios import SCENARIOS, Options, Outcome, Scenario

__all__ = ["SCALING", "SIZES", "SUPERLINEAR", "run_scaling"]

SIZES = (100, 1_000, 10_000, 100_000, 1_000_000)
SUPERLINEAR = 1.2


class _Prefixed:
    """Relays progress with a prefix on each phase label."""

    def __init__(self, inner: Progress, prefix: str) -> None:
        self._inner, self._prefix = inner, prefix

    def phase(self, label: str, total: int) -> None:
        self._inner.phase(f"{self._prefix}{label}", total)

    def update(self, done: int) -> None:
        self._inner.update(done)


def _exponent(n1: int, v1: float, n2: int, v2: float) -> float:
    if v1 <= 0 or v2 <= 0:
        return math.nan
    return math.log(v2 / v1) / math.log(n2 / n1)


def run_scaling(root: Path, size: int, progress: Progress, opts: Options) -> Outcome:
    """Runs each scenario of ``opts.of`` (comma-separated) at 100, 1,000, ... up to ``size``."""
    figures: dict[str, float] = {}
    for name in [s.strip() for s in opts.of.split(",") if s.strip()]:
        sc = SCENARIOS.get(name)
        if sc is None or not sc.isolated:
            isolated = [s.name for s in SCENARIOS.values() if s.isolated]
            raise ValueError(f"scaling runs one of {isolated}, not {name!r}")
        worst_t = worst_m = 0.0
        prev: tuple[int, float, float] | None = None
        for n in [s for s in SIZES if s <= size]:
            o = run_isolated(name, n, root, _Prefixed(progress, f"{name} {n:,}: "), opts)
            secs = o.figures[sc.time_figure]
            grown = max(1e-3, o.figures["peak_rss_mib"] - o.figures["rss_start_mib"])
            figures[f"{name}_{n}_us_per_instance"] = secs / n * 1e6
            figures[f"{name}_{n}_kib_per_instance"] = grown * 1024 / n
            figures[f"{name}_{n}_peak_rss_mib"] = o.figures["peak_rss_mib"]
            if "instances_per_s" in o.figures:
                figures[f"{name}_{n}_instances_per_s"] = o.figures["instances_per_s"]
            if prev is not None and prev[0] >= 1_000:
                worst_t = max(worst_t, _exponent(prev[0], prev[1], n, secs))
                worst_m = max(worst_m, _exponent(prev[0], prev[2], n, grown))
            prev = (n, secs, grown)
        figures[f"{name}_time_exponent"] = worst_t
        figures[f"{name}_memory_exponent"] = worst_m
        figures[f"{name}_superlinear"] = float(max(worst_t, worst_m) > SUPERLINEAR)
    return Outcome(figures)


SCALING = Scenario(
    "scaling",
    run_scaling,
    100_000,
    False,
    "--of scenarios (default queue) at 100, 1,000, ... up to N: time and memory per instance",
)
