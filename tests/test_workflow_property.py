"""Property-based: random creates, completions, wake-ups, pauses and crashes under a cap.

Invariants: the cap is never exceeded, no instance is lost (all complete in the
end), and no committed step body runs again.
"""

from __future__ import annotations

import tempfile
import threading
import time
from typing import Any

from conftest import Journal
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actorflow as af
from actorflow.testing import FakeClock


class Mixed(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        iid, kind = event.instance_id, event.payload

        def body(name: str) -> Any:
            def run() -> str:
                j.add((iid, name))
                if kind == "block" and name == "s1":
                    j.block(iid, timeout=30)
                return name

            return run

        out = [step.do("s1", body("s1"))]
        if kind == "sleep":
            step.sleep("nap", "1 minute")
        elif kind == "event":
            step.wait_for_event("wait", "go", timeout="1 day")
        out.append(step.do("s2", body("s2")))
        return out


KINDS = ["plain", "block", "sleep", "event"]
CRASHES = [
    None,
    ("s1", "before"),
    ("s1", "after_body"),
    ("s1", "after_commit"),
    ("s2", "after_body"),
]

ops = st.lists(
    st.one_of(
        st.tuples(st.just("create"), st.sampled_from(KINDS), st.sampled_from(CRASHES)),
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("advance")),
        st.tuples(st.just("event"), st.integers(0, 20)),
        st.tuples(st.just("pause"), st.integers(0, 20)),
        st.tuples(st.just("resume"), st.integers(0, 20)),
    ),
    min_size=1,
    max_size=12,
)


class Sampler:
    """Samples the supervisor's running count from another thread (the cap must hold)."""

    def __init__(self, rt: af.Runtime) -> None:
        self.rt = rt
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.0005):
            # Every 0.5 ms, from its own thread: the supervisor's own count, as
            # metrics() (which reads it too) would add a snapshot per sample.
            running = self.rt._supervisor.running  # noqa: SLF001 - see above
            self.peak = max(self.peak, running)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


@settings(
    max_examples=20, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
@given(cap=st.integers(1, 3), program=ops)
def test_cap_never_exceeded_nothing_lost_nothing_rerun(cap: int, program: list[Any]) -> None:
    journal = Journal()
    clock = FakeClock()
    with tempfile.TemporaryDirectory() as data:
        rt = af.Runtime(data, clock=clock, limits=af.Limits(max_concurrent=cap))
        sampler = Sampler(rt)
        try:
            wf = rt.register(Mixed, name="mixed", env=journal)
            made: list[tuple[af.Instance, str, Any]] = []
            for op in program:
                if op[0] == "create":
                    iid = f"i{len(made)}"
                    if op[2] is not None:
                        wf.modify(iid).crash_at(*op[2])
                    made.append((wf.create(id=iid, params=op[1]), op[1], op[2]))
                elif op[0] == "release" and made:
                    journal.gate(made[op[1] % len(made)][0].id).set()
                elif op[0] == "advance":
                    clock.advance("1 minute", settle_timeout=0.05)
                elif op[0] in ("event", "pause", "resume") and made:
                    inst = made[op[1] % len(made)][0]
                    try:
                        if op[0] == "event":
                            inst.send_event("go")
                        elif op[0] == "pause":
                            inst.pause()
                        else:
                            inst.resume()
                    except af.InvalidInstanceState:
                        pass  # already finished
                # One snapshot: read on the engine loop, no status moves meanwhile
                # (one after another from here, a run that ends and the one that
                # takes its slot could both be read as running).
                statuses = rt._engine.call(  # noqa: SLF001 - a snapshot of the loop's own state
                    lambda: [i.status().status for i, _, _ in made], timeout=10
                )
                assert statuses.count("running") <= cap
                assert rt.metrics().running <= cap

            # Let everything finish: open every gate, resume, deliver every event, pass
            # every sleep.
            journal.open_all()
            for inst, kind, _ in made:
                inst.resume()
                if kind == "event":
                    try:
                        inst.send_event("go")
                    except af.InvalidInstanceState:
                        pass  # it had its event already and finished
            deadline = time.monotonic() + 20
            while any(i.status().status != "complete" for i, _, _ in made):
                assert time.monotonic() < deadline, [(i.id, i.status()) for i, _, _ in made]
                clock.advance("1 minute", settle_timeout=0.2)
            assert sampler.stop() <= cap

            counts = journal.counts()
            for inst, _kind, crash in made:
                for name in ("s1", "s2"):
                    expected = 2 if crash == (name, "after_body") else 1
                    assert counts[(inst.id, name)] == expected, (inst.id, name, crash)
                assert inst.status().output == ["s1", "s2"]
        finally:
            sampler.stop()
            journal.open_all()
            rt.close()
            clock.close()
