"""PNG charts of a measurement (``--plot DIR``); needs matplotlib (the ``plot`` extra).

* ``bench-throughput-concurrency.png``: instances completed per second against
  the number started together (``concurrency`` and ``scaling --of
  concurrency``), beside the ideal ``N / hold``.
* ``bench-memory.png``: peak RSS against instance count, per scenario.
* ``bench-latency.png``: the distribution (CDF) of every latency sampled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from actorflow.bench import Measurement

__all__ = ["check_available", "plot_all"]

_SCALED = re.compile(r"^(\w+?)_(\d+)_(us_per_instance|peak_rss_mib|instances_per_s)$")


def check_available() -> None:
    """Raises SystemExit with install advice when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'actorflow[plot]'")


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _scaled(m: Measurement) -> dict[str, dict[int, dict[str, float]]]:
    """``scaling`` figures as ``{scenario: {n: {"us_per_instance": .., "peak_rss_mib": ..}}}``."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for fig, v in m.medians.get("scaling", {}).items():
        if (hit := _SCALED.match(fig)) is not None:
            name, n, what = hit.group(1), int(hit.group(2)), hit.group(3)
            out.setdefault(name, {}).setdefault(n, {})[what] = v
    return out


def throughput_vs_concurrency(m: Measurement, path: Path, hold: float) -> Path | None:
    """Completions per second against instances running at once."""
    points = {
        n: f["instances_per_s"]
        for n, f in _scaled(m).get("concurrency", {}).items()
        if f.get("instances_per_s")
    }
    conc = m.medians.get("concurrency")
    if conc and conc.get("n"):
        points.setdefault(int(conc["n"]), conc["instances_per_s"])
    if not points:
        return None
    plt = _pyplot()
    xs = sorted(points)
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(xs, [points[x] for x in xs], "o-", label="measured (fsync on)")
    ax.plot(xs, [x / hold for x in xs], "--", color="grey", label=f"ideal: N / {hold:g} s hold")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("instances started together, each step awaiting asyncio.sleep (no thread)")
    ax.set_ylabel("instances completed per second")
    ax.set_title("Throughput vs concurrency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_LIMITS = {"concurrency": (50_000, 3072), "sleepers": (1_000_000, 2048), "queue": (2_000_000, 1024)}


def memory_vs_count(m: Measurement, path: Path) -> Path | None:
    """Peak RSS against instance count, one line per scenario, targets as markers."""
    series: dict[str, dict[int, float]] = {}
    for name, by_n in _scaled(m).items():
        series[name] = {n: f["peak_rss_mib"] for n, f in by_n.items() if "peak_rss_mib" in f}
    for name, figs in m.medians.items():
        if "peak_rss_mib" in figs and figs.get("n"):
            series.setdefault(name, {})[int(figs["n"])] = figs["peak_rss_mib"]
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in sorted(series.items()):
        xs = sorted(pts)
        line = ax.plot(xs, [pts[x] for x in xs], "o-", label=name)[0]
        if name in _LIMITS:
            n, mib = _LIMITS[name]
            ax.plot(
                [n],
                [mib],
                "x",
                markersize=10,
                color=line.get_color(),
                label=f"{name} target: {mib / 1024:g} GiB at {n:,}",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("instances")
    ax.set_ylabel("peak RSS of the process (MiB)")
    ax.set_title("Memory vs instance count (one fresh process per point)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def latency_distribution(m: Measurement, path: Path) -> Path | None:
    """The CDF of every latency sample, on a log axis, with the targets marked."""
    series = {k: v for by_name in m.samples.values() for k, v in by_name.items() if v}
    if not series:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for k, v in sorted(series.items()):
        xs = sorted(max(x, 0.01) for x in v)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        ax.step(xs, ys, where="post", label=f"{k.removesuffix('_ms')} (n={len(xs):,})")
    for x, label in ((2, "2 ms"), (50, "50 ms")):
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
        ax.text(x, 0.02, f" {label} target", color="grey", fontsize=8)
    ax.axhline(0.99, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("milliseconds (0 shown as 0.01)")
    ax.set_ylabel("fraction of samples at or below")
    ax.set_title("Latency distribution")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="center right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_all(m: Measurement, out: Path, hold: float = 2.0) -> list[Path]:
    """Writes every chart the measurement has data for; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    made = [
        throughput_vs_concurrency(m, out / "bench-throughput-concurrency.png", hold),
        memory_vs_count(m, out / "bench-memory.png"),
        latency_distribution(m, out / "bench-latency.png"),
    ]
    return [p for p in made if p is not None]
