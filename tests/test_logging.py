"""Logging: quiet by default, DEBUG-only in normal operation, structured fields."""

from __future__ import annotations

import io
import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import actorflow as af
from actorflow.observe import logs
from actorflow.testing import FakeClock

PACKAGE = Path(af.__file__).parent


class Busy(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        def flaky(ctx: af.StepContext) -> int:
            if ctx.attempt == 1:
                raise RuntimeError("transient")
            return 1

        step.do("flaky", flaky, retries={"limit": 2, "delay": "1 second"})
        step.sleep("nap", "1 minute")
        ev = step.wait_for_event("go", "go", timeout="1 hour")
        return ev.payload


class Counter(af.DurableObject):
    def increment(self) -> int:
        n = self.ctx.storage.get("n", 0) + 1
        self.ctx.storage.put("n", n)
        return int(n)


def test_the_package_logger_has_a_null_handler() -> None:
    handlers = logging.getLogger("actorflow").handlers
    assert any(isinstance(h, logging.NullHandler) for h in handlers)


def test_every_subsystem_logger_exists() -> None:
    source = "\n".join(p.read_text() for p in PACKAGE.rglob("*.py"))
    for name in logs.SUBSYSTEMS:
        assert f'getLogger("{name}")' in source, name


def test_normal_operation_logs_nothing_above_debug(
    rt: af.Runtime, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="actorflow")
    wf = rt.register(Busy, name="busy")
    inst = wf.create(id="b1")
    other = wf.create(id="b2")
    assert rt.wait_until_idle()
    clock.advance("1 second")
    assert rt.wait_until_idle()
    clock.advance("1 minute")
    inst.wait_for_status("waiting")
    inst.pause()
    inst.resume()
    inst.send_event("go", 7)
    assert inst.wait(timeout=10).output == 7
    other.terminate()
    assert rt.durable_objects(Counter).get_by_name("c").increment() == 1
    above = [r for r in caplog.records if r.levelno > logging.DEBUG]
    assert not above, [r.getMessage() for r in above]
    engine = [r for r in caplog.records if r.name == "actorflow.engine"]
    assert engine, "the engine logs its instances' life at DEBUG"
    assert all(
        r.workflow == "busy" and r.instance in ("b1", "b2")  # type: ignore[attr-defined]
        for r in engine
    )
    (failed,) = [r for r in engine if "attempt 1 failed" in r.getMessage() and r.instance == "b1"]  # type: ignore[attr-defined]
    assert (failed.step, failed.attempt) == ("flaky", 1)  # type: ignore[attr-defined]
    ends = {r.outcome for r in engine if hasattr(r, "outcome")}  # type: ignore[attr-defined]
    assert {"suspended", "complete"} <= ends


def test_a_real_problem_is_logged_above_debug(
    rt: af.Runtime, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="actorflow")
    wf = rt.register(Busy, name="busy")
    wf.modify("c1").crash_at("flaky").disable_retry_delays().disable_sleeps()
    inst = wf.create(id="c1")
    inst.wait_for_status("waiting")
    crashes = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert crashes and crashes[0].name == "actorflow.supervisor"
    assert "crashed" in crashes[0].getMessage()


def test_nothing_is_printed_unless_configured(tmp_path: Path) -> None:
    code = (
        "import actorflow as af\n"
        "class W(af.Workflow):\n"
        "    def run(self, event, step):\n"
        "        return step.do('s', lambda: 1)\n"
        f"with af.Runtime({str(tmp_path / 'd')!r}) as rt:\n"
        "    wf = rt.register(W)\n"
        "    wf.modify('x').crash_at('s')\n"  # a crash: logged as a warning
        "    assert wf.create(id='x').wait(10).output == 1\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "" and done.stdout == ""


def test_configure_prints_structured_fields() -> None:
    stream = io.StringIO()
    handler = logs.configure("DEBUG", json=True, stream=stream)
    logger = logging.getLogger("actorflow")
    try:
        logging.getLogger("actorflow.engine").warning(
            "step failed", extra=logs.fields(workflow="w", instance="i", step="s", attempt=None)
        )
        line = json.loads(stream.getvalue().splitlines()[-1])
        assert (line["level"], line["logger"], line["message"]) == (
            "WARNING",
            "actorflow.engine",
            "step failed",
        )
        assert (line["workflow"], line["instance"], line["step"]) == ("w", "i", "s")
        assert "attempt" not in line
        handler.setFormatter(logs.StructuredFormatter())
        logging.getLogger("actorflow.storage").error("disk", extra={"workflow": "w"})
        assert stream.getvalue().rstrip().endswith("actorflow.storage: disk workflow=w")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def test_a_full_queue_is_logged_at_debug_with_the_workflow(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="actorflow.router")
    limits = af.Limits(max_creation_rate=0.01, max_queued=2)  # starts wait: the queue fills
    with af.Runtime(tmp_path / "q", limits=limits) as rt:
        wf = rt.register(Busy, name="full")
        with pytest.raises(af.RateLimitError):
            for k in range(5):
                wf.create(id=f"c{k}")
    recs = [r for r in caplog.records if r.name == "actorflow.router"]
    assert recs and recs[0].levelno == logging.DEBUG and recs[0].workflow == "full"
