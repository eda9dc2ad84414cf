"""``actorflow bench``: throughput, latency, memory and scaling scenarios.

    actorflow bench [SCENARIO ...] [--repeat N] [--size N] [--json FILE|-]
                    [--store lmdb|DIR|postgres|postgresql://...] [--profile cloudflare-v2]
                    [--plot DIR]
    actorflow bench peers [--peer-python PATH] [--store sqlite|postgres|postgresql://...]

Every scenario runs on a fresh data directory with ``fsync`` on; each figure
is the median of ``--repeat`` runs. The ``physical`` scenario (the disk's
``fsync``'d commit rate, a bare call, a thread handoff) is measured in the same
run so that every figure can be read against what the machine allowed.
Scenarios whose memory is part of the result run in a fresh child process.
``--store`` (repeatable) runs ``create``, ``steps``, ``latency`` and
``objects`` on a PostgreSQL server too, each run on a fresh database; the
figures of a PostgreSQL store are shown as ``SCENARIO@postgres``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from actorflow.bench.executors import EXECUTORS
from actorflow.bench.isolate import run_isolated
from actorflow.bench.progress import Bar, NullProgress, Progress
from actorflow.bench.report import CLOUDFLARE_V2, format_table, machine, rows
from actorflow.bench.scaling import SCALING
from actorflow.bench.scenarios import SCENARIOS as _BASE
from actorflow.bench.scenarios import Options, Outcome, Scenario
from actorflow.bench.stores import (
    POSTGRES_SCENARIOS,
    Store,
    StoreError,
    describe,
    fresh_database,
    open_store,
    parse_store,
)
from actorflow.bench.workloads import TrivialSteps

__all__ = [
    "CLOUDFLARE_V2",
    "DEFAULT",
    "SCENARIOS",
    "Measurement",
    "Options",
    "Store",
    "StoreError",
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
    store: Store | None = None,
) -> Measurement:
    """Runs each scenario ``repeat`` times and takes the median of every figure.

    Args:
        names: Scenario names (see :data:`SCENARIOS`).
        repeat: Runs per scenario (``scaling`` runs once: each of its points is a run).
        size: Overrides every scenario's default size.
        options: Knobs besides the size.
        root: Where the data directories go (default: a temporary directory, removed).
        progress: Given a label such as ``"steps 1/3"``, returns where that run reports.
        store: A PostgreSQL store (its server running, see
            :func:`actorflow.bench.stores.open_store`): each run gets a fresh
            database on it, dropped after the run. None or LMDB: a data
            directory under ``root``.

    Raises:
        KeyError: An unknown scenario name.
        StoreError: A scenario that runs on LMDB only, with a PostgreSQL store.
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
            on_postgres = store is not None and store.backend == "postgresql"
            if on_postgres and sc.name not in POSTGRES_SCENARIOS:
                raise StoreError(
                    f"scenario {sc.name} runs on LMDB only; on PostgreSQL: "
                    + ", ".join(POSTGRES_SCENARIOS)
                )
            runs: list[Outcome] = []
            reps = 1 if sc is SCALING else repeat  # each of its points is already a run
            for i in range(reps):
                where = progress(f"{name} {i + 1}/{reps} ") if progress else NullProgress()
                if on_postgres:
                    assert store is not None and store.url is not None
                    with fresh_database(store.url) as url:
                        runs.append(sc.run(base, n, where, replace(opts, database=url)))
                elif sc.isolated:
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
        "--style",
        choices=["async", "sync", "both"],
        default=None,
        help="steps, concurrency, sleepers: workflows with `async def run`, `def run`, or "
        "both in each run (default: both for steps, async for the others); sync figures "
        "are prefixed sync_, and sync_vs_async is their ratio",
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
        "--store",
        action="append",
        default=[],
        metavar="STORE",
        help="where the scenarios keep their state (repeatable; default lmdb): lmdb, a "
        "directory, postgres (a throwaway local PostgreSQL server for this run) or a "
        "postgresql://USER@HOST:PORT/DB URL (each run gets a fresh database on that server; "
        "the role needs CREATEDB). On PostgreSQL: " + ", ".join(POSTGRES_SCENARIOS),
    )
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
        stores = _stores(args, names)
        if not args.scenarios and any(st.backend == "postgresql" for st in stores):
            names = [n for n in names if n in POSTGRES_SCENARIOS]  # what runs on both
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
        style=args.style,
    )
    with ExitStack() as stack:
        try:
            stores = [stack.enter_context(open_store(s)) for s in stores]
        except StoreError as exc:
            print(f"actorflow bench: {exc}", file=sys.stderr)
            return 2
        result, failed = _run_all(names, sizes, args, opts, stores)
    _report(result, failed, args, opts, stores)
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


def _stores(args: argparse.Namespace, names: list[str]) -> list[Store]:
    """The parsed ``--store`` values, at most one per backend; ValueError names a bad one."""
    stores = [parse_store(spec, args.data_dir) for spec in args.store or ["lmdb"]]
    backends = [s.backend for s in stores]
    if len(set(backends)) < len(backends):
        raise StoreError("--store: give at most one LMDB store and one PostgreSQL store")
    if args.scenarios and any(s.backend == "postgresql" for s in stores):
        lmdb_only = [n for n in names if n not in POSTGRES_SCENARIOS]
        if lmdb_only:
            raise StoreError(
                f"--store {args.store[-1]}: {', '.join(lmdb_only)} run(s) on LMDB only; "
                f"on PostgreSQL: {', '.join(POSTGRES_SCENARIOS)}"
            )
    return stores


def _relabel(progress: Callable[[str], Progress], name: str, key: str) -> Callable[[str], Progress]:
    """``progress``, its labels naming the store: ``steps 1/3`` becomes ``steps@postgres 1/3``."""
    return lambda label: progress(key + label[len(name) :])


def _key(name: str, store: Store) -> str:
    """A scenario's name in the results: ``steps`` on LMDB, ``steps@postgres`` on PostgreSQL."""
    return name if store.backend == "lmdb" else f"{name}@{store.label}"


def _run_all(
    names: list[str],
    sizes: dict[str, int],
    args: argparse.Namespace,
    opts: Options,
    stores: list[Store] | None = None,
) -> tuple[Measurement, dict[str, str]]:
    """Measures each scenario in turn on each store; one that fails is reported, the others run.

    ``physical`` measures the machine on LMDB, and a PostgreSQL store's serial
    commits as ``physical@postgres``. Returns the figures and, by scenario, what failed.
    """
    stores = stores or [parse_store("lmdb", args.data_dir)]
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
            on = list(stores)
            if name == "physical" and all(s.backend != "lmdb" for s in on):
                on.insert(0, parse_store("lmdb", args.data_dir))  # the machine, always
            for store in on:
                key = _key(name, store)
                try:
                    m = measure(
                        [name],
                        args.repeat,
                        size=size,
                        options=opts,
                        root=store.directory if store.backend == "lmdb" else args.data_dir,
                        progress=_relabel(progress, name, key),
                        store=store,
                    )
                except Exception as exc:  # report it, keep the other scenarios' figures
                    failed[key] = f"{type(exc).__name__}: {exc}"
                    if bar is not None:
                        bar.close()
                    print(f"actorflow bench: {key} failed: {failed[key]}", file=sys.stderr)
                    continue
                result.sizes.update({_key(k, store): v for k, v in m.sizes.items()})
                result.medians.update({_key(k, store): v for k, v in m.medians.items()})
                result.runs.update({_key(k, store): v for k, v in m.runs.items()})
                result.samples.update({_key(k, store): v for k, v in m.samples.items()})
    finally:
        if bar is not None:
            bar.close()
    return result, failed


def _report(
    result: Measurement,
    failed: dict[str, str],
    args: argparse.Namespace,
    opts: Options,
    stores: list[Store] | None = None,
) -> None:
    """Prints the table (unless the JSON goes to stdout) and writes the JSON if asked."""
    header, body = rows(result.medians, result.sizes, args.profile)
    info = machine()
    stores = stores or [parse_store("lmdb", args.data_dir)]
    where = "; ".join(describe(s) for s in stores)
    if args.json != "-":
        print(
            f"actorflow bench: medians of {args.repeat} run(s); {info['cpus']} CPUs, "
            f"Python {info['python']}, fsync on, load {info['loadavg']:.1f}; {where}"
        )
        print(format_table(header, body))
    if args.json is not None:
        doc = {
            "machine": info,
            "repeat": args.repeat,
            "sizes": result.sizes,
            "options": vars(opts),
            "stores": [{"backend": s.label, "spec": s.spec, "where": describe(s)} for s in stores],
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
