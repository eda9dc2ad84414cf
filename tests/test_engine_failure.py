"""If the engine loop (the supervisor's thread) dies, every workflow call fails loudly."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

import actorflow as af


class Nap(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> None:
        step.sleep("nap", "1 hour")


def _kill_loop(rt: af.Runtime) -> None:
    # SystemExit no longer ends the loop (user code may raise it, see
    # test_poison_code.py): break the loop's own machinery instead.
    loop = rt._engine.loop  # noqa: SLF001 - breaks the engine loop's own machinery on purpose

    def broken() -> None:
        raise RuntimeError("injected engine failure")

    def die() -> None:
        loop._run_once = broken  # type: ignore[attr-defined]  # noqa: SLF001 - as above

    loop.call_soon_threadsafe(die)
    engine = rt._engine  # noqa: SLF001 - the engine whose loop was broken
    engine._thread.join(5)  # noqa: SLF001 - waits for the loop's thread to end
    assert not engine.alive()


def test_a_dead_engine_loop_fails_every_call_loudly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rt = af.Runtime(tmp_path / "d")
    try:
        wf = rt.register(Nap, name="nap")
        inst = wf.create(id="a")
        with caplog.at_level(logging.CRITICAL, logger="actorflow.engine"):
            _kill_loop(rt)
        assert any("engine loop died" in r.message for r in caplog.records)
        with pytest.raises(af.ActorflowError, match="engine loop died"):
            wf.create(id="b")
        with pytest.raises(af.ActorflowError, match="engine loop died"):
            wf.create_batch([{"id": "c"}])
        with pytest.raises(af.ActorflowError, match="engine loop died"):
            inst.pause()
        with pytest.raises(af.InstanceNotFound):
            wf.get("b")  # nothing was written by the failed create
    finally:
        rt.close()
