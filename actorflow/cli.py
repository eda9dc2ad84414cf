"""The ``actorflow`` command: inspect a data directory and run benchmarks.

    actorflow --data ./actorflow-data list [--workflow W] [--status S]
    actorflow --data ./actorflow-data status WORKFLOW ID
    actorflow --data ./actorflow-data history WORKFLOW ID
    actorflow --data ./actorflow-data steps WORKFLOW ID
    actorflow bench [steps create latency objects disk] [--repeat 3] [--json]
                    [--profile cloudflare-v2]

The inspection commands read the data directory; they never change it.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from actorflow.bench import CLOUDFLARE_V2, SCENARIOS, run_scenarios
from actorflow.engine.records import IDX, INST, ikey, load
from actorflow.history import read_history, read_steps
from actorflow.storage import Storage

__all__ = ["main"]


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Formats rows as a plain-text table with a header and a rule."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(lines)


def _record(store: Storage, wf: str, iid: str) -> dict[str, Any]:
    raw = store.get(INST, ikey(wf, iid))
    if raw is None:
        raise SystemExit(f"actorflow: workflow {wf!r} has no instance {iid!r}")
    return load(raw)


def _cmd_list(store: Storage, args: argparse.Namespace) -> list[dict[str, Any]]:
    """Instances of the index, newest first, filtered by workflow and status."""
    out = []
    for key, _ in store.scan(IDX, keys_only=True):
        wf, status, _created, iid = key.split(b"\x00", 3)
        if args.workflow and wf.decode() != args.workflow:
            continue
        if args.status and status.decode() != args.status:
            continue
        rec = _record(store, wf.decode(), iid.decode())
        out.append(
            {
                "workflow": wf.decode(),
                "id": iid.decode(),
                "status": status.decode(),
                "created_ms": rec["created"],
                "error": rec.get("error"),
            }
        )
    out.sort(key=lambda r: -r["created_ms"])
    return out[: args.limit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="actorflow", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="./actorflow-data", help="the data directory")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("list", help="list instances, newest first")
    p.add_argument("--workflow")
    p.add_argument("--status")
    p.add_argument("--limit", type=int, default=50)
    for name in ("status", "history", "steps"):
        p = sub.add_parser(name, help=f"show an instance's {name}")
        p.add_argument("workflow")
        p.add_argument("id")
    p = sub.add_parser("bench", help="run benchmark scenarios and print a table")
    p.add_argument(
        "scenarios",
        nargs="*",
        default=["disk", "steps", "create", "latency", "objects"],
        metavar="SCENARIO",
        help=f"any of {sorted(SCENARIOS)}",
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", choices=["cloudflare-v2"], default=None)
    args = parser.parse_args(argv)

    if args.cmd == "bench":
        res = run_scenarios(
            args.scenarios,
            args.repeat,
            progress=lambda m: print(f"  running {m}", file=sys.stderr, flush=True),
        )
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        rows = []
        disk = res.get("disk", {}).get("fsync_commits_per_s")
        for scen, figures in res.items():
            for k, v in figures.items():
                row = [scen, k, f"{v:,.2f}"]
                if args.profile == "cloudflare-v2":
                    cf = CLOUDFLARE_V2.get(k)
                    row += [f"{cf:,.0f}" if cf else "", f"{v / cf:,.0f}x" if cf else ""]
                if disk and k.endswith("_per_s") and scen != "disk":
                    row.append(f"{v / disk:.1f}x disk")
                rows.append(row)
        header = ["scenario", "figure", f"median of {args.repeat}"]
        if args.profile == "cloudflare-v2":
            header += ["Cloudflare V2", "ratio"]
        width = max(len(r) for r in rows)
        header += [""] * (width - len(header))
        print(format_table([r + [""] * (width - len(r)) for r in rows], header))
        return 0

    store = Storage(args.data)
    try:
        if args.cmd == "list":
            found = _cmd_list(store, args)
            if args.json:
                print(json.dumps(found, indent=2))
            else:
                print(
                    format_table(
                        [[r["workflow"], r["id"], r["status"]] for r in found],
                        ["workflow", "id", "status"],
                    )
                )
            return 0
        rec = _record(store, args.workflow, args.id)
        ik = ikey(args.workflow, args.id)
        steps = read_steps(store, ik)
        if args.cmd == "status":
            out = {
                "status": rec["s"],
                "error": rec.get("error"),
                "output": store.serializer.loads(rec["output"]) if rec.get("output") else None,
            }
            print(json.dumps(out, indent=None if args.json else 2, default=str))
        elif args.cmd == "steps":
            rows = [[s.name, str(s.count), s.kind, s.status, str(len(s.attempts))] for s in steps]
            print(
                json.dumps([s.__dict__ for s in steps], default=str)
                if args.json
                else format_table(rows, ["step", "count", "kind", "status", "attempts"])
            )
        else:
            events = read_history(store, ik, rec, steps)
            rows = [
                [
                    e.timestamp.isoformat(timespec="milliseconds"),
                    e.type,
                    e.step or "",
                    str(e.attempt or ""),
                ]
                for e in events
            ]
            print(
                json.dumps([e.__dict__ for e in events], default=str)
                if args.json
                else format_table(rows, ["time", "event", "step", "attempt"])
            )
        return 0
    finally:
        store.close()


if __name__ == "__main__":
    sys.exit(main())
