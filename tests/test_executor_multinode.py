"""Two Ray nodes on one machine, one killed in the middle of a step.map.

A head and a second node are separate ``ray start`` processes of one CPU
each, so the map's bodies spread over both. The second node is SIGKILLed
(its raylet and workers) while its bodies run: their attempts fail, the step
policy retries them on the head, the workflow completes, and no step that
had completed runs again.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from _clusters import RAY_ENV, RayNodes
from apps import executor_app as app
from apps.executor_app import runs

import actorflow as af

pytestmark = [pytest.mark.executors, pytest.mark.slow, pytest.mark.timeout(300)]
N = 6


@pytest.fixture
def cluster() -> Iterator[RayNodes]:
    pytest.importorskip("ray")
    nodes = RayNodes()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in RAY_ENV.items():
            mp.setenv(k, v)
        try:
            nodes.head(num_cpus=1)
            yield nodes
        finally:
            left = nodes.stop()
            assert not left, f"Ray processes left behind: {left}"


def test_a_node_killed_mid_map_loses_no_completed_step(cluster: RayNodes, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    second = cluster.worker(num_cpus=1)
    ex = af.executors.RayExecutor(address=cluster.address)
    with ex:
        deadline = time.monotonic() + 60
        while sum(1 for n in ex.nodes() if n["Alive"]) < 2:
            assert time.monotonic() < deadline, "the second node never joined"
            time.sleep(0.2)
        head_id = next(
            n["NodeID"]
            for n in ex.nodes()
            if n["Alive"] and "node:__internal_head__" in n.get("Resources", {})
        )
        with af.Runtime(tmp_path / "data", executor=ex) as rt:
            inst = rt.register(app.Spread).create(
                id="m", params={"dir": str(work), "n": N, "secs": 1.5}
            )
            # Wait until a body runs on the second node, and one has completed.
            deadline = time.monotonic() + 60
            while True:
                on_second = [
                    p for p in work.glob("node*-*") if p.read_text() and p.read_text() != head_id
                ]
                done = [s for s in inst.steps() if s.status == "complete"]
                if on_second and done:
                    break
                assert time.monotonic() < deadline, "the map never spread over both nodes"
                time.sleep(0.05)
            completed = {s.name for s in done}
            second.kill()
            st = inst.wait(timeout=180)
            steps = inst.steps()
    assert st.status == "complete", st
    assert len(st.output) == N
    # The completed steps ran once; those lost with the node ran again, on the head.
    for name in completed:
        i = int(name.split("[")[1].rstrip("]"))
        assert runs(work, f"item{i}") == 1, name
    retried = [s for s in steps if len(s.attempts) > 1]
    assert retried, "no attempt was lost with the node"
    for s in retried:
        assert s.attempts[0].error is not None
        assert s.attempts[0].error["name"] == "ExecutorError"
        assert s.attempts[-1].ran_on["node"] == head_id
    assert {a.ran_on.get("node") for s in steps for a in s.attempts} - {None} >= {head_id}
