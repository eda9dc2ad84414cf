"""pytest-benchmark suites for the workflow engine's hot paths.

Run with ``make bench`` (saves each run); ``make bench-compare`` runs them again
and fails if a median regressed by more than 50 % against the last saved run.
Figures are per operation; read them against the baselines measured in the
same session: ``test_fsync_commit`` (one fsync'd LMDB commit), ``test_bare_call``
and ``test_thread_handoff_round_trip``.
"""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path
from typing import Any

import lmdb

import actorflow as af
from actorflow.bench import TrivialSteps as Steps
from actorflow.bench.physical import echo_thread
from actorflow.core.storage import WriteBatch
from actorflow.core.timers import TIMERS, TimerService
from actorflow.workflows.records import step_key


def test_fsync_commit(benchmark: Any, tmp_path: Path) -> None:
    """The baseline: one fsync'd LMDB commit with one small put."""
    env = lmdb.open(str(tmp_path / "raw"), map_size=1 << 26, sync=True)
    keys = iter(range(10**9))

    def commit() -> None:
        with env.begin(write=True) as txn:
            txn.put(b"k%d" % next(keys), b"v" * 64)

    benchmark(commit)
    env.close()


def test_step_commit(benchmark: Any, runtime: af.Runtime) -> None:
    """One instance running one trivial durable step (create to complete)."""
    wf = runtime.register(Steps, name="steps")

    def one_step() -> None:
        assert wf.create(params=1).wait(timeout=30).output == 1

    benchmark(one_step)


def test_replay_1000_step_history(benchmark: Any, runtime: af.Runtime) -> None:
    """Replaying ``run`` over 1,000 completed steps (a restart of a finished instance)."""
    wf = runtime.register(Steps, name="steps")
    inst = wf.create(params=1000)
    assert inst.wait(timeout=120).output == 1000

    def replay() -> None:
        # restart(from_step) keeps the 999 steps before the last one: a replay of 999
        inst.restart(from_step="s999")
        assert inst.wait(timeout=60).output == 1000

    benchmark.pedantic(replay, rounds=5, iterations=1)


def test_serialize_step_result(benchmark: Any) -> None:
    """Serializing a typical step result with the default serializer."""
    ser = af.PickleSerializer()
    value = {"order": "o-1", "items": ["a", "b", "c"], "total": 42.5, "ok": True}
    benchmark(lambda: ser.loads(ser.dumps(value)))


def test_step_key(benchmark: Any) -> None:
    benchmark(lambda: step_key(b"wf\x00instance-1", "do", "charge card", 3))


def test_timer_insert_and_pop(benchmark: Any, runtime: af.Runtime) -> None:
    """Arming a durable timer in a batch, then removing it (one group commit each)."""
    store = runtime.storage
    n = iter(range(10**9))

    def arm_and_disarm() -> None:
        b = WriteBatch()
        key = TimerService.arm(b, 10**12 + next(n), "X", b"target")
        store.write(b)
        b = WriteBatch()
        TimerService.disarm(b, key)
        store.write(b)

    benchmark(arm_and_disarm)
    assert not [k for k, _ in store.scan(TIMERS) if k[8:9] == b"X"]


def test_pickle_record(benchmark: Any) -> None:
    rec = {
        "k": "do",
        "n": "charge",
        "c": 1,
        "seq": 3,
        "s": "complete",
        "att": [(1, 2, None, None)],
        "r": b"x" * 32,
        "t0": 1,
        "t1": 2,
        "cfg": {"retries": {"limit": 5}, "timeout": 600000},
    }
    benchmark(lambda: pickle.loads(pickle.dumps(rec, 5)))


def test_asyncio_task_step(benchmark: Any) -> None:
    """The interpreter's cost of one coroutine round trip: a floor for an async step."""
    loop = asyncio.new_event_loop()

    async def nop() -> int:
        return 1

    benchmark(lambda: loop.run_until_complete(nop()))
    loop.close()


def test_bare_call(benchmark: Any) -> None:
    """The interpreter's floor: one call of a one-argument Python function."""

    def nop(x: int) -> int:
        return x

    benchmark(nop, 1)


def test_thread_handoff_round_trip(benchmark: Any) -> None:
    """Two thread handoffs: an item to another thread and its reply back (SimpleQueue)."""
    ping, pong, th = echo_thread()

    def round_trip() -> int:
        ping.put(1)
        return pong.get()

    assert benchmark(round_trip) == 1
    ping.put(None)
    th.join()
