"""The report: targets, Cloudflare V2's published limits, hardware bounds, the table."""

from __future__ import annotations

import math
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

__all__ = [
    "CLOUDFLARE_V2",
    "CLOUDFLARE_V2_NOTES",
    "TARGETS",
    "Target",
    "format_table",
    "hardware",
    "judge",
    "machine",
    "rows",
]

#: Cloudflare Workflows V2's published limits (Workers Paid, April 2026), by figure.
CLOUDFLARE_V2: dict[str, float] = {
    "create_batch_per_s": 300.0,
    "create_16_threads_per_s": 300.0,
    "enqueues_per_s": 300.0,
    "peak_running": 50_000.0,
    "queued": 2_000_000.0,
}
CLOUDFLARE_V2_NOTES: dict[str, str] = {
    "create_batch_per_s": "creation rate, per account",
    "create_16_threads_per_s": "creation rate, per account",
    "enqueues_per_s": "creation rate (queued ones count)",
    "peak_running": "concurrent running instances",
    "queued": "queued instances per workflow",
}


_CAPACITY = {"peak_running", "queued"}  # counts, not rates: a ratio only at full scale


@dataclass(frozen=True)
class Target:
    """A goal for one figure.

    Attributes:
        scenario: The scenario that measures it.
        figure: The figure's name.
        op: ``">="`` or ``"<="``.
        value: The bound.
        at_size: Judged only when the scenario ran at this size or more.
    """

    scenario: str
    figure: str
    op: str
    value: float
    at_size: int = 0

    def text(self) -> str:
        """The target as shown in the table."""
        v = f"{self.value:,.0f}" if self.value >= 10 else f"{self.value:g}"
        return f"{self.op} {v}" + (f" at {self.at_size:,}" if self.at_size else "")


GiB = 1024.0
TARGETS: list[Target] = [
    Target("steps", "steps_per_s", ">=", 20_000),
    # A `def run` workflow at the speed of the same `async def run` one, same run.
    Target("steps", "sync_vs_async", ">=", 0.8),
    Target("concurrency", "sync_vs_async", ">=", 0.8),
    Target("create", "create_batch_per_s", ">=", 50_000),
    Target("create", "create_16_threads_per_s", ">=", 10_000),
    Target("latency", "create_to_first_step_p50_ms", "<=", 2),
    Target("latency", "event_to_resume_p50_ms", "<=", 2),
    Target("latency", "timer_lateness_p99_ms", "<=", 50),
    Target("concurrency", "peak_running", ">=", 50_000, 50_000),
    Target("concurrency", "peak_rss_mib", "<=", 3 * GiB, 50_000),
    Target("sleepers", "peak_rss_mib", "<=", 2 * GiB, 1_000_000),
    Target("sleepers", "wake_lateness_p99_ms", "<=", 50),
    # Instances woken per second by `def run` and `async def run` sleepers, same run.
    Target("sleepers", "sync_vs_async", ">=", 0.8),
    # Memory while holding them: the drain that follows stores every completed
    # instance, which grows the data file and its map (peak_rss_mib).
    Target("queue", "peak_rss_queued_mib", "<=", 1 * GiB, 2_000_000),
    Target("recovery", "first_resumed_step_s", "<=", 5, 10_000),
]


def judge(target: Target, value: float, size: int) -> str:
    """``"met"``, ``"MISSED"``, or ``"not at scale"`` when run below ``target.at_size``."""
    if size < target.at_size:
        return "not at scale"
    if math.isnan(value):
        return "MISSED"
    ok = value >= target.value if target.op == ">=" else value <= target.value
    return "met" if ok else "MISSED"


_RATES = {
    "create_batch_per_s",
    "create_16_threads_per_s",
    "create_async_1000_per_s",
    "steps_per_s",
    "sync_steps_per_s",
    "do_calls_per_s",
    "enqueues_per_s",
    "drained_per_s",
}


def hardware(figure: str, value: float, phys: dict[str, float]) -> str:
    """How ``value`` compares with what the machine allowed in the same run."""
    fsync = phys.get("fsync_commits_per_s")
    commit_ms = phys.get("fsync_commit_ms")
    call_ns = phys.get("bare_call_ns")
    handoff_us = phys.get("thread_handoff_us")
    if not (fsync and commit_ms and call_ns and handoff_us) or value <= 0:
        return ""
    if figure in _RATES:
        us = 1e6 / value
        out = f"{value / fsync:.1f}x fsync'd commits/s; {us:.1f} us each"
        if figure == "create_16_threads_per_s" and phys.get("threaded_commits_per_s"):
            share = value / phys["threaded_commits_per_s"]
            return out + f"; {share:.0%} of 16 threads' bare durable calls"
        if figure == "create_16_threads_per_s" or figure == "do_calls_per_s":
            return out + f" = {us / handoff_us:.0f} thread handoffs"
        return out + f" = {us * 1000 / call_ns:,.0f} bare calls"
    if figure in (
        "create_to_first_step_p50_ms",
        "event_to_resume_p50_ms",
        "timer_lateness_p50_ms",
        "do_single_call_ms",
    ):
        return f"{value / commit_ms:.1f} fsync'd commits"
    if figure == "create_16_threads_pages_per_commit" and phys.get("fsync_scattered_page_us"):
        page_us = phys["fsync_scattered_page_us"]
        return (
            f"{commit_ms + value * page_us / 1000:.2f} ms of disk per commit "
            f"({commit_ms:.2f} ms + {value:.0f} scattered pages x {page_us:.0f} us)"
        )
    if figure == "do_rpc_hop_us":
        return f"{value / handoff_us:.1f} thread handoffs"
    return ""


def _fmt(v: float) -> str:
    if math.isnan(v):
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:,.2f}"
    return f"{v:.3g}"


def rows(
    results: dict[str, dict[str, float]],
    sizes: dict[str, int],
    profile: str | None = None,
) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows: each figure with its target, hardware and profile columns."""
    phys = results.get("physical", {})
    targets = {(t.scenario, t.figure): t for t in TARGETS}
    header = ["scenario", "figure", "median", "target", "", "vs the machine"]
    if profile == "cloudflare-v2":
        header += ["Cloudflare V2", "ratio"]
    out = []
    for scen, figures in results.items():
        for fig, v in figures.items():
            t = targets.get((scen, fig))
            row = [
                scen,
                fig,
                _fmt(v),
                t.text() if t else "",
                judge(t, v, sizes.get(scen, 0)) if t else "",
                "" if scen == "physical" else hardware(fig, v, phys),
            ]
            if profile == "cloudflare-v2":
                cf = CLOUDFLARE_V2.get(fig)
                ratio = f"{v / cf:,.1f}x" if cf else ""
                if cf and fig in _CAPACITY and v < cf:
                    ratio = f"run at {v:,.0f}"
                row += [f"{cf:,.0f} ({CLOUDFLARE_V2_NOTES[fig]})" if cf else "", ratio]
            out.append(row)
    return header, out


def format_table(header: list[str], body: list[list[str]]) -> str:
    """Plain-text columns with a rule under the header."""
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    text = [line.format(*header), line.format(*("-" * w for w in widths))]
    text += [line.format(*r) for r in body]
    return "\n".join(t.rstrip() for t in text)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    return {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "loadavg": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "fsync": True,
    }
