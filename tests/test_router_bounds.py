"""The router's cheap queue-depth bound never lets the queue pass max_queued,
and skipped wake-ups never strand a queued instance."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

import actorflow as af


class Quick(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> int:
        async def one() -> int:
            return 1

        return int(await step.do("one", one))


class Blocker(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> None:
        async def hold() -> None:
            await asyncio.sleep(60)

        await step.do("hold", hold)


def test_max_queued_holds_exactly_with_a_large_limit(tmp_path: Path) -> None:
    limit = 20_000  # above the margin where the router trusts its bound instead of counting
    limits = af.Limits(max_concurrent=1, max_queued=limit)
    with af.Runtime(tmp_path / "d", limits=limits) as rt:
        blocker = rt.register(Blocker, name="blocker").create(id="hold")
        while blocker.status().status != "running":
            time.sleep(0.005)
        wf = rt.register(Quick, name="q")  # its instances stay queued behind the blocker
        wf.create_batch([{"id": f"b{i}"} for i in range(limit - 40)])
        errors: list[BaseException] = []

        def worker(k: int) -> None:
            for i in range(20):
                try:
                    wf.create(id=f"t{k}-{i}")
                except af.RateLimitError as e:
                    errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wf.list("queued", limit=None)) == limit
        assert len(errors) == 4 * 20 - 40, "creations beyond max_queued were accepted"
        with pytest.raises(af.RateLimitError):
            for i in range(100):
                wf.create(id=f"extra{i}")


def test_concurrent_creates_with_one_slot_all_complete(tmp_path: Path) -> None:
    with af.Runtime(tmp_path / "d", limits=af.Limits(max_concurrent=1)) as rt:
        wf = rt.register(Quick, name="q")
        made: list[af.Instance] = []
        lock = threading.Lock()

        def worker(k: int) -> None:
            for i in range(25):
                inst = wf.create(id=f"w{k}-{i}")
                with lock:
                    made.append(inst)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(made) == 100
        for inst in made:
            assert inst.wait(timeout=60).output == 1
