"""``make demo``: an order-checkout pipeline on an embedded data directory.

Each order charges a card (a flaky payment gateway, retried with backoff),
reserves inventory, sleeps through a fraud cool-down, waits for a manager's
approval event, and fans out one shipping label per item. A few thousand
orders run at once; the demo prints live progress, a summary, and the
step-by-step trace of one order that needed retries.

Run it with ``python -m actorflow.demo [--orders N] [--data DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import hashlib
import secrets
import sys
import threading
import time
from typing import Any

import actorflow as af
from actorflow.cli import format_table

__all__ = ["Checkout", "main"]


class PaymentDeclined(Exception):
    """The (simulated) payment gateway failed; worth retrying."""


def _flaky(order_id: str) -> int:
    """How many times the gateway fails for this order (0, 1 or 2), fixed per order."""
    h = hashlib.sha1(order_id.encode()).digest()[0]
    return 2 if h < 20 else 1 if h < 80 else 0


class Checkout(af.Workflow):
    """Charge, reserve, cool down, get approval, then print shipping labels."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> dict[str, Any]:
        order = event.payload

        async def charge(ctx: af.StepContext) -> dict[str, Any]:
            await asyncio.sleep(0.002)  # the gateway's round trip
            if ctx.attempt <= _flaky(order["id"]):
                raise PaymentDeclined(f"gateway timeout on attempt {ctx.attempt}")
            return {"charge_id": f"ch_{order['id']}", "amount": order["total"]}

        async def reserve() -> list[str]:
            return [f"{sku}@warehouse-{len(sku) % 3}" for sku in order["items"]]

        async def label(sku: str) -> str:
            await asyncio.sleep(0.001)
            return f"LBL-{order['id']}-{sku}"

        payment = await step.do(
            "charge card",
            charge,
            retries={"limit": 3, "delay": 250, "backoff": "exponential"},
            timeout="5 seconds",
        )
        reserved = await step.do("reserve inventory", reserve)
        await step.sleep("fraud cool-down", "1 second")
        approval = await step.wait_for_event("manager approval", "approved", timeout="1 minute")
        labels = await step.map("shipping label", label, order["items"])
        return {
            "payment": payment,
            "reserved": reserved,
            "approved_by": approval.payload["by"],
            "labels": labels,
        }


def _orders(run: str, n: int) -> list[dict[str, Any]]:
    skus = ["book", "lamp", "mug", "poster", "socks"]
    out = []
    for k in range(n):
        oid = f"{run}-{k:05d}"
        items = [skus[(k + j) % len(skus)] for j in range(1 + k % 3)]
        out.append({"id": oid, "params": {"id": oid, "items": items, "total": 10 + k % 90}})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=3000)
    parser.add_argument("--data", default="./actorflow-data")
    args = parser.parse_args(argv)
    run = secrets.token_hex(3)

    print(f"actorflow demo: {args.orders} checkout orders on {args.data} (run {run})\n")
    with af.Runtime(args.data) as rt:
        checkout = rt.register(Checkout, name="checkout")
        t0 = time.perf_counter()
        orders = checkout.create_batch(_orders(run, args.orders))
        t_created = time.perf_counter() - t0

        def approve() -> None:
            # A manager approves every order; an approval that arrives before the
            # workflow reaches its wait is buffered until it gets there.
            for inst in orders:
                inst.send_event("approved", {"by": "ann"})

        approver = threading.Thread(target=approve, name="manager")
        approver.start()
        pending = {i.id: i for i in orders}
        counts: collections.Counter[str] = collections.Counter()
        while pending:
            time.sleep(0.5)
            counts = collections.Counter(i.status().status for i in orders)
            for iid in [
                k for k, i in pending.items() if i.status().status in ("complete", "errored")
            ]:
                del pending[iid]
            line = "  ".join(f"{s}={n}" for s, n in sorted(counts.items()))
            print(f"  {time.perf_counter() - t0:5.1f}s  {line}", flush=True)
        wall = time.perf_counter() - t0
        approver.join()

        steps = retries = 0
        flaky = None
        for inst in orders:
            for rec in inst.steps():
                steps += 1
                retries += max(0, len(rec.attempts) - 1)
                if rec.name == "charge card" and len(rec.attempts) == 3 and flaky is None:
                    flaky = inst
        rows = [(s, str(n)) for s, n in sorted(counts.items())]
        rows += [
            ("orders", str(len(orders))),
            ("create_batch", f"{len(orders) / t_created:,.0f}/s"),
            ("steps checkpointed", f"{steps:,}"),
            ("payment retries", f"{retries:,}"),
            ("wall time", f"{wall:.1f} s"),
            ("steps/s (incl. sleeps)", f"{steps / wall:,.0f}"),
        ]
        print()
        print(format_table([list(r) for r in rows], ["Summary", ""]))
        if flaky is not None:
            print(f"\nTrace of order {flaky.id} (its card was declined twice):")
            start = None
            for ev in flaky.history():
                start = start or ev.timestamp
                ms = (ev.timestamp - start).total_seconds() * 1000
                what = ev.step or ""
                extra = ""
                if ev.attempt is not None:
                    extra = f"attempt {ev.attempt}"
                if ev.type == "ATTEMPT_FAILURE":
                    err, delay = ev.data["error"]["message"], ev.data.get("retryDelayMs")
                    extra += f"  {err}; retry in {delay} ms"
                print(f"  +{ms:7.0f} ms  {ev.type:<18} {what:<22} {extra}")
            print(f"  output: {flaky.status().output['labels']}")
    return 0 if counts.get("complete", 0) == len(orders) else 1


if __name__ == "__main__":
    sys.exit(main())
