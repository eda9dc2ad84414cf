"""Fault injection: every fault ends in a retry, a restart from the checkpoint, or an error."""

from __future__ import annotations

import pickle
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import Journal, history_types, wait_for

import actorflow as af
from actorflow.testing import Faults


class TwoSteps(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        a = step.do("a", lambda: j.add("a") or 1)

        def b() -> int:
            j.add("b")
            j.block("b")
            return 2

        return a + step.do("b", b)


def test_a_refused_step_commit_restarts_the_instance_from_its_checkpoint(
    rt: af.Runtime, journal: Journal
) -> None:
    inst = rt.register(TwoSteps, env=journal).create(id="i")
    assert inst.wait_for_step("a") == 1
    faults = Faults(rt).fail_writes(times=1, instance=inst)  # b's result will not land
    journal.gate("b").set()
    assert inst.wait(timeout=10).output == 3
    assert faults.failed_writes == 1
    assert journal.counts() == {"a": 1, "b": 2}  # b ran again; a was checkpointed
    types = history_types(inst)
    assert types.count("INSTANCE_RECOVERED") == 1 and types[-1] == "WORKFLOW_SUCCESS"


def test_a_full_disk_that_lasts_delays_the_instance_until_the_write_can_land(
    make_runtime: Any, journal: Journal
) -> None:
    rt = make_runtime(max_crashes=2)
    inst = rt.register(TwoSteps, env=journal).create(id="i")
    assert inst.wait_for_step("a") == 1
    faults = Faults(rt).fail_writes(instance=inst)
    journal.gate("b").set()
    # Restarts from the checkpoint with backoff, each refused, far past max_crashes:
    # a storage fault is not the instance's, and it costs a delay, not the instance.
    wait_for(lambda: faults.failed_writes >= 4)
    seen = faults.failed_writes
    wait_for(lambda: faults.failed_writes > seen)  # it keeps trying
    # Nothing new is durable meanwhile, and nothing says it failed.
    assert [s.name for s in inst.steps()] == ["a"]
    assert "WORKFLOW_FAILURE" not in history_types(inst)
    assert inst.status().status != "errored"
    faults.stop_failing_writes()
    s = inst.wait(timeout=10)
    assert s.status == "complete" and s.output == 3
    assert journal.count("a") == 1  # the checkpointed step never ran again
    assert "WORKFLOW_FAILURE" not in history_types(inst)


class WaitsForGo(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        return step.wait_for_event("go", "go", timeout="1 hour").payload


def test_create_send_event_and_pause_raise_on_a_full_disk_and_write_nothing(rt: af.Runtime) -> None:
    wf = rt.register(WaitsForGo)
    inst = wf.create(id="w")
    inst.wait_for_status("waiting")
    with Faults(rt).fail_writes() as faults:
        with pytest.raises(af.StorageError, match="No space left"):
            wf.create(id="new")
        with pytest.raises(af.StorageError, match="No space left"):
            inst.send_event("go", 1)
        with pytest.raises(af.StorageError, match="No space left"):
            inst.pause()
        assert faults.failed_writes == 3
    with pytest.raises(af.InstanceNotFound):
        wf.get("new")
    assert rt.wait_until_idle()
    assert inst.status().status == "waiting"  # the lost event was never buffered
    inst.send_event("go", 2)
    assert inst.wait(timeout=10).output == 2


class Counter(af.DurableObject):
    def increment(self, by: int = 1) -> int:
        n: int = self.ctx.storage.get("n", 0) + by
        self.ctx.storage.put("n", n)
        return n

    def peek(self) -> int:
        n: int = self.ctx.storage.get("n", 0)
        return n


def test_an_object_call_whose_write_fails_raises_and_resets_the_object(rt: af.Runtime) -> None:
    stub = rt.durable_objects(Counter).get_by_name("c")
    assert stub.increment() == 1
    with Faults(rt).fail_writes(times=1), pytest.raises(af.StorageError, match="No space left"):
        stub.increment()
    assert stub.peek() == 1  # nothing of the failed call landed; the object read storage anew
    assert stub.increment() == 2


def test_slow_writes_delay_every_durable_answer_and_lose_nothing(rt: af.Runtime) -> None:
    wf = rt.register(WaitsForGo)
    stub = rt.durable_objects(Counter).get_by_name("c")
    with Faults(rt).slow_writes("200 milliseconds"):
        t0 = time.monotonic()
        inst = wf.create(id="slow")
        assert time.monotonic() - t0 >= 0.2  # create returns once its write is durable
        t0 = time.monotonic()
        assert stub.increment() == 1
        assert time.monotonic() - t0 >= 0.2
        inst.send_event("go", "late")
        assert inst.wait(timeout=10).output == "late"
    t0 = time.monotonic()
    assert stub.increment() == 2
    assert time.monotonic() - t0 < 0.2


def test_a_lost_request_raises_delivery_error_and_the_call_never_ran(rt: af.Runtime) -> None:
    ns = rt.durable_objects(Counter)
    stub = ns.get_by_name("c")
    faults = Faults(rt).drop_calls(ns)
    with pytest.raises(af.DeliveryError, match="request was lost") as info:
        stub.increment()
    assert info.value.applied is False and info.value.retryable is True
    assert info.value.method == "increment" and faults.dropped == 1
    assert stub.increment() == 1  # times=1: the retry goes through, applied once


def test_a_lost_reply_raises_delivery_error_but_the_call_landed(rt: af.Runtime) -> None:
    ns = rt.durable_objects(Counter)
    stub = ns.get_by_name("c")
    Faults(rt).drop_calls(stub, reply=True)
    with pytest.raises(af.DeliveryError, match="reply was lost") as info:
        stub.increment()
    assert info.value.applied is True
    assert stub.peek() == 1  # its write is durable: a blind retry would count twice


def test_a_duplicated_delivery_runs_the_call_twice_and_answers_once(rt: af.Runtime) -> None:
    ns = rt.durable_objects(Counter)
    stub = ns.get_by_name("c")
    faults = Faults(rt).duplicate_calls(ns, method="increment")
    assert stub.increment() == 1  # the caller gets the first delivery's reply
    assert stub.peek() == 2  # both deliveries were applied, in order
    assert stub.increment() == 3 and faults.duplicated == 1


def test_delivery_faults_target_one_object_and_method_and_clear(rt: af.Runtime) -> None:
    ns = rt.durable_objects(Counter)
    a, b = ns.get_by_name("a"), ns.get_by_name("b")
    faults = Faults(rt).drop_calls(a, method="increment", times=None)
    assert b.increment() == 1  # another object
    assert a.peek() == 0  # another method
    for _ in range(3):
        with pytest.raises(af.DeliveryError):
            a.increment()
    faults.clear()
    assert a.increment() == 1
    with pytest.raises(TypeError):
        faults.drop_calls(rt)  # type: ignore[arg-type]


def test_delivery_error_is_an_actorflow_error_that_pickles() -> None:
    err = af.DeliveryError("lost", applied=False, retryable=True, namespace="n", method="m")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, af.ActorflowError)
    assert (back.applied, back.retryable, back.method, str(back)) == (False, True, "m", "lost")


def test_faults_are_per_runtime(tmp_path: Path) -> None:
    with af.Runtime(tmp_path / "a") as one, af.Runtime(tmp_path / "b") as two:
        Faults(one).fail_writes()
        with pytest.raises(af.StorageError):
            one.durable_objects(Counter).get_by_name("x").increment()
        assert two.durable_objects(Counter).get_by_name("x").increment() == 1


def test_a_refused_final_write_restarts_from_what_is_durable(
    rt: af.Runtime, journal: Journal
) -> None:
    import errno

    from actorflow.workflows.records import INST, load

    refused: list[bool] = []

    def fault(batch: Any) -> None:
        for _kind, ks, _key, value in batch.ops:
            if ks == INST and value and load(value)["s"] == "complete" and not refused:
                refused.append(True)
                raise OSError(errno.ENOSPC, "No space left on device")

    journal.gate("b").set()
    rt.storage.set_fault(fault)
    inst = rt.register(TwoSteps, env=journal).create(id="f")
    assert inst.wait(timeout=10).output == 3  # not stranded "running" after the refusal
    assert refused == [True]
    assert journal.counts() == {"a": 1, "b": 1}  # both results were durable: replayed
    assert history_types(inst).count("INSTANCE_RECOVERED") == 1


def test_status_never_shows_a_refused_final_write(rt: af.Runtime, journal: Journal) -> None:
    import errno

    from actorflow.workflows.records import INST, load

    refused: list[bool] = []

    def fault(batch: Any) -> None:
        for _kind, ks, _key, value in batch.ops:
            if ks == INST and value and load(value)["s"] == "complete" and len(refused) < 3:
                refused.append(True)
                raise OSError(errno.ENOSPC, "No space left on device")

    journal.gate("b").set()
    rt.storage.set_fault(fault)
    inst = rt.register(TwoSteps, env=journal).create(id="f")
    rk = inst.parts.record_key(inst.id)
    seen = 0
    while True:
        st = inst.status().status
        if st == "complete":
            seen += 1
            raw = rt.storage.get(INST, rk)
            assert raw is not None and load(raw)["s"] == "complete", "reported before durable"
            break
        assert st in ("queued", "running", "waiting"), st
    assert refused == [True, True, True]
    assert seen == 1
