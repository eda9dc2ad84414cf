"""``actorflow bench``: throughput, latency, memory and scaling scenarios.

    actorflow bench [SCENARIO ...] [--repeat N] [--size N] [--json FILE|-]
                    [--profile cloudflare-v2] [--plot DIR]
    actorflow bench peers [--peer-python PATH]

Every scenario runs on a fresh data directory with ``fsync`` on; each figure
is the median of ``--repeat`` runs. The ``physical`` scenario (the disk's
``fsync``'d commit rate, a bare call, a thread handoff) is measured in the same
run so that every figure can be read against what the machine allowed.
Scenarios whose memory is part of the result run in a fresh child process.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actorflow.bench.executors import EXECUTORS
from actorflow.bench.isolate import run_isolated
from actorflow.bench.progress import Bar, NullProgress, Progress
from actorflow.bench.report import CLOUDFLARE_V2, format_table, machine, rows
from actorflow.bench.scaling import SCALING
from actorflow.bench.scenarios import SCENARIOS as _BASE
from actorflow.bench.scenarios import Options, Outcome, Scenario
from actorflow.bench.workloads import TrivialSteps

__all__ = [
    "CLOUDFLARE_V2",
    "DEFAULT",
    "SCENARIOS",
    "Measurement",
    "Options",
    "TrivialSteps",
    "main",
    "measure",
    "run_scenarios",
]

#: Every scenario, by name.
SCENARIOS: dict[str, Scenario] = {**_BASE, SCALING.name: SCALING, EXECUTORS.name: EXECUTORS}
#: What ``actorflow bench`` runs without names: everything but ``scaling`` and
#: ``executors`` (it starts Ray and Dask clusters).
DEFAULT = [name for name in SCENARIOS if name not in ("scaling", "executors")]
_ALIASES = {"disk": "physical"}


@dataclass
class Measurement:
    """The medians, the runs and the samples of one ``measure`` call."""

    sizes: dict[str, int] = field(default_factory=dict)
    medians: dict[str, dict[str, float]] = field(default_factory=dict)
    runs: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    samples: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def measure(
    names: list[str],
    repeat: int = 3,
    *,
    size: int | None = None,
    options: Options | None = None,
    root: str | Path | None = None,
    progress: Callable[[str], Progress] | None = None,
) -> Measurement:
    """Runs each scenario ``repeat`` times and takes the median of every figure.

    Args:
        names: Scenario names (see :data:`SCENARIOS`).
        repeat: Runs per scenario (``scaling`` runs once: each of its points is a run).
        size: Overrides every scenario's default size.
        options: Knobs besides the size.
        root: Where the data directories go (default: a temporary directory, removed).
        progress: Given a label such as ``"steps 1/3"``, returns where that run reports.

    Raises:
        KeyError: An unknown scenario name.
    """
    opts = options or Options()
    base = Path(root) if root else Path(tempfile.mkdtemp(prefix="actorflow-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    out = Measurement()
    try:
        for name in names:
            sc = SCENARIOS[_ALIASES.get(name, name)]
            n = sc.size if size is None else size
            out.sizes[name] = n
            runs: list[Outcome] = []
            reps = 1 if sc is SCALING else repeat  # each of its points is already a run
            for i in range(reps):
                where = progress(f"{name} {i + 1}/{reps} ") if progress else NullProgress()
                if sc.isolated:
                    runs.append(run_isolated(sc.name, n, base, where, opts))
                else:
                    runs.append(sc.run(base, n, where, opts))
            keys = [k for k in runs[0].figures if all(k in r.figures for r in runs)]
            out.medians[name] = {k: statistics.median(r.figures[k] for r in runs) for k in keys}
            out.runs[name] = [r.figures for r in runs]
            merged: dict[str, list[float]] = {}
            for r in runs:
                for k, v in r.samples.items():
                    merged.setdefault(k, []).extend(v)
            if merged:
                out.samples[name] = merged
    finally:
        if root is None:
            shutil.rmtree(base, ignore_errors=True)
    return out


def run_scenarios(
    names: list[str],
    repeat: int = 3,
    root: str | None = None,
    progress: Callable[[str], Any] | None = None,
) -> dict[str, dict[str, float]]:
    """Runs each scenario ``repeat`` times; returns the median of every figure by scenario.

    ``progress``, if given, is called with a line such as ``"steps run 1/3"``
    before each run.
    """

    def announce(label: str) -> Progress:
        if progress:
            progress(label.strip().replace(" ", " run ", 1))
        return NullProgress()

    return measure(names, repeat, root=root, progress=announce).medians


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="actorflow bench",
        description="Run benchmark scenarios and print a table of medians.",
        epilog="scenarios:\n"
        + "\n".join(f"  {s.name:<12} {s.about} (default N={s.size:,})" for s in SCENARIOS.values())
        + "\n  peers        DBOS side by side (see `actorflow bench peers --help`)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "scenarios",
        nargs="*",
        metavar="SCENARIO",
        help="scenarios to run (default: all but scaling)",
    )
    p.add_argument("--repeat", type=int, default=3, help="runs per scenario (default 3)")
    p.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="[SCENARIO=]N",
        help="N for every scenario, or for one (repeatable): --size scaling=100000",
    )
    p.add_argument("--json", metavar="FILE", default=None, help="write JSON to FILE (- = stdout)")
    p.add_argument(
        "--profile",
        choices=["cloudflare-v2"],
        default=None,
        help="show each figure beside Cloudflare V2's published limit",
    )
    p.add_argument(
        "--plot",
        metavar="DIR",
        default=None,
        help="write PNG charts to DIR (needs the 'plot' extra)",
    )
    p.add_argument(
        "--hold",
        type=float,
        default=Options.hold,
        help="concurrency: seconds each step awaits (default %(default)s)",
    )
    p.add_argument(
        "--wake-rate",
        type=float,
        default=Options.wake_rate,
        help="sleepers: wakes per second (default %(default)s)",
    )
    p.add_argument(
        "--sleep-margin",
        type=float,
        default=None,
        help="sleepers: seconds before the first deadline (default: estimated)",
    )
    p.add_argument(
        "--of",
        default=Options.of,
        help="scaling: comma-separated isolated scenarios (default %(default)s)",
    )
    p.add_argument("--no-drain", action="store_true", help="queue: do not drain the queue")
    p.add_argument("--data-dir", default=None, help="where data goes (default: a temp dir)")
    p.add_argument(
        "--no-physical", action="store_true", help="do not add the physical baselines to the run"
    )
    return p


def _sizes(specs: list[str]) -> dict[str, int]:
    """``["1000", "queue=5000"]`` -> ``{"": 1000, "queue": 5000}`` (``""``: every scenario)."""
    out = {}
    for spec in specs:
        name, _, n = spec.rpartition("=")
        name = _ALIASES.get(name, name)
        if name and name not in SCENARIOS:
            raise ValueError(f"--size {spec}: no scenario {name!r}")
        out[name] = int(n.replace(",", "").replace("_", ""))
    return out


def main(argv: list[str]) -> int:
    """The ``actorflow bench`` command; returns its exit status."""
    if argv[:1] == ["peers"]:
        from actorflow.bench.peers import main as peers_main

        return peers_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        names, sizes = _plan(args)
    except ValueError as exc:
        print(f"actorflow bench: {exc}", file=sys.stderr)
        return 2
    if args.plot:
        from actorflow.bench.plots import check_available

        check_available()
    opts = Options(
        hold=args.hold,
        wake_rate=args.wake_rate,
        of=args.of,
        drain=not args.no_drain,
        sleep_margin=args.sleep_margin,
    )
    result, failed = _run_all(names, sizes, args, opts)
    _report(result, failed, args, opts)
    if args.plot:
        from actorflow.bench.plots import plot_all

        for path in plot_all(result, Path(args.plot), opts.hold):
            print(f"wrote {path}", file=sys.stderr)
    return 1 if failed else 0


def _plan(args: argparse.Namespace) -> tuple[list[str], dict[str, int]]:
    """The scenarios to run, in order, and their sizes; ValueError names a bad argument."""
    names = args.scenarios or list(DEFAULT)
    unknown = [n for n in names if _ALIASES.get(n, n) not in SCENARIOS]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; see --help")
    names = [_ALIASES.get(n, n) for n in names]
    sizes = _sizes(args.size)
    if not args.no_physical and "physical" not in names:
        names.insert(0, "physical")
    return names, sizes


def _run_all(
    names: list[str], sizes: dict[str, int], args: argparse.Namespace, opts: Options
) -> tuple[Measurement, dict[str, str]]:
    """Measures each scenario in turn; one that fails is reported and the others still run.

    Returns the figures and, by scenario, what failed.
    """
    show = args.json is None and sys.stderr.isatty()
    bar = Bar() if show else None

    def progress(label: str) -> Progress:
        if bar is None:
            return NullProgress()
        bar.prefix = label
        return bar

    result = Measurement()
    failed: dict[str, str] = {}
    try:
        for name in names:
            size = None if name == "physical" else sizes.get(name, sizes.get(""))
            try:
                m = measure(
                    [name],
                    args.repeat,
                    size=size,
                    options=opts,
                    root=args.data_dir,
                    progress=progress,
                )
            except Exception as exc:  # report it, keep the other scenarios' figures
                failed[name] = f"{type(exc).__name__}: {exc}"
                if bar is not None:
                    bar.close()
                print(f"actorflow bench: {name} failed: {failed[name]}", file=sys.stderr)
                continue
            result.sizes.update(m.sizes)
            result.medians.update(m.medians)
            result.runs.update(m.runs)
            result.samples.update(m.samples)
    finally:
        if bar is not None:
            bar.close()
    return result, failed


def _report(
    result: Measurement, failed: dict[str, str], args: argparse.Namespace, opts: Options
) -> None:
    """Prints the table (unless the JSON goes to stdout) and writes the JSON if asked."""
    header, body = rows(result.medians, result.sizes, args.profile)
    info = machine()
    if args.json != "-":
        print(
            f"actorflow bench: medians of {args.repeat} run(s); {info['cpus']} CPUs, "
            f"Python {info['python']}, fsync on, load {info['loadavg']:.1f}"
        )
        print(format_table(header, body))
    if args.json is not None:
        doc = {
            "machine": info,
            "repeat": args.repeat,
            "sizes": result.sizes,
            "options": vars(opts),
            "medians": result.medians,
            "runs": result.runs,
            "failed": failed,
            "table": [dict(zip(header, r, strict=True)) for r in body],
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
