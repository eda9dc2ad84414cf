"""Cloudflare's Python Workflows style: ``@step.do`` steps with dependencies by parameter name.

Cloudflare's own examples (tests/apps/cloudflare_examples.py, imports changed
only) run as published; then the rules one by one: injection by name,
once-per-run resolution, ``concurrent=True`` (shown with gates), the legacy
``depends=[...]``, replay after a restart, the ``TypeError`` for a parameter
that names no step, and ``event[...]`` / ``ctx[...]`` read as dicts.
"""

from __future__ import annotations

import os
import types
from datetime import timedelta
from typing import Any

import pytest
from _clusters import dask_cluster
from apps import cloudflare_examples
from conftest import Journal, wait_for

import actorflow as af
from actorflow.testing import FakeClock

# -- Cloudflare's examples, as published ----------------------------------------------------


def _steps(inst: af.Instance) -> dict[str, af.StepRecord]:
    return {s.name: s for s in inst.steps()}


def test_the_dag_docs_example_runs(
    rt: af.Runtime, clock: FakeClock, capsys: pytest.CaptureFixture[str]
) -> None:
    wf = rt.register(cloudflare_examples.PythonWorkflowStarter, name="starter")
    inst = wf.create(id="s1")
    inst.wait_for_status("waiting")  # its 'demo sleep' of 10 seconds
    clock.advance("10 seconds")
    st = inst.wait(timeout=10)
    assert st.status == "complete", st
    steps = _steps(inst)
    assert steps["dep_1"].output == "dep1" and steps["dep_2"].output == "dep2"
    assert steps["final_step"].status == "complete"
    assert all(s.count == 1 for s in inst.steps())  # each dependency ran once
    out = capsys.readouterr().out
    assert out.count("executing dep1") == 1 and out.count("executing dep2") == 1
    assert "dep1 dep2" in out
    assert "Successfully caught" not in out


def test_the_python_workers_examples_page_workflow_sums_its_dependencies(rt: af.Runtime) -> None:
    wf = rt.register(cloudflare_examples.MyWorkflow, name="my-workflow")
    inst = wf.create(id="m1")
    assert inst.wait(timeout=10).status == "complete"
    steps = _steps(inst)
    assert (steps["step_a"].output, steps["step_b"].output) == (10, 20)
    assert steps["my_final_step"].output == 30  # "should return 30"


def test_the_examples_repository_legacy_depends_workflow_runs(
    rt: af.Runtime, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Its steps sleep a random 1 to 15 s of real time: 0 s here, the rest as published.
    monkeypatch.setattr(
        cloudflare_examples, "random", types.SimpleNamespace(randint=lambda a, b: 0)
    )
    wf = rt.register(cloudflare_examples.DAGWorkflow, name="dag")
    inst = wf.create(id="d1")
    assert inst.wait(timeout=10).status == "complete"
    assert [s.name for s in inst.steps()] == ["dependency 1", "dependency 2", "final step"]
    out = capsys.readouterr().out
    assert out.count("executing dep1") == out.count("executing dep2") == 1
    assert "I awaited the first two steps and now I am done" in out


# -- injection by name, once per run ----------------------------------------------------------


class Diamond(af.Workflow):
    """``base`` feeds ``left`` and ``right``, which feed ``top``: base must run once."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        @step.do()
        def base() -> int:
            j.add("base")
            return 1

        @step.do("left")
        async def left(base: int) -> int:
            j.add("left")
            return base + 10

        @step.do("right")
        def right(ctx: af.StepContext, base: int) -> list[Any]:
            j.add("right")
            return [base + 20, ctx.step.name]

        @step.do(concurrent=True)
        def top(left: int, right: list[Any]) -> list[Any]:
            return [left, right]

        first = await top()

        @step.do(name="again")
        def again(top: list[Any], base: int) -> list[Any]:
            return [top, base]  # both resolved already: neither runs again

        return {"top": first, "again": await again()}


def test_dependencies_by_parameter_name_resolved_once_per_run(
    rt: af.Runtime, journal: Journal
) -> None:
    inst = rt.register(Diamond, name="diamond", env=journal).create(id="d")
    st = inst.wait(timeout=10)
    assert st.status == "complete", st
    assert st.output == {"top": [11, [21, "right"]], "again": [[11, [21, "right"]], 1]}
    assert journal.counts() == {"base": 1, "left": 1, "right": 1}
    assert sorted((s.name, s.count) for s in inst.steps()) == [
        ("again", 1),
        ("base", 1),
        ("left", 1),
        ("right", 1),
        ("top", 1),
    ]


class CalledTwice(af.Workflow):
    """Calling a declared step is a step.do each time (Cloudflare's SDK does the same)."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        @step.do
        def tick(ctx: af.StepContext) -> int:
            return int(ctx.step.count)

        @step.do()
        def last(tick: int) -> int:
            return tick  # the result of the last call of tick in this run

        return [tick(), tick(), last()]


def test_the_bare_decorator_and_each_call_a_step(rt: af.Runtime) -> None:
    inst = rt.register(CalledTwice, name="twice").create(id="t")
    assert inst.wait(timeout=10).output == [1, 2, 2]
    assert [(s.name, s.count) for s in inst.steps()] == [("tick", 1), ("tick", 2), ("last", 1)]


# -- concurrent=True, shown with gates ----------------------------------------------------------


def _gated(j: Journal, name: str) -> Any:
    """A step body that says it started, then waits for the test to let it finish."""

    def body() -> str:
        j.add(f"{name} in")
        j.block(f"go {name}")
        j.add(f"{name} out")
        return name

    body.__name__ = name
    return body


class FanInAsync(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        step.do()(_gated(j, "a"))
        step.do()(_gated(j, "b"))

        @step.do(concurrent=event.payload["concurrent"])
        def join(a: str, b: str) -> str:
            return a + b

        return await join()


class FanInSync(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env
        step.do()(_gated(j, "a"))
        step.do()(_gated(j, "b"))

        @step.do(concurrent=event.payload["concurrent"])
        def join(a: str, b: str) -> str:
            return a + b

        return join()


@pytest.mark.parametrize("cls", [FanInAsync, FanInSync])
def test_concurrent_runs_the_dependencies_together(
    rt: af.Runtime, journal: Journal, cls: type[af.Workflow]
) -> None:
    inst = rt.register(cls, name="fan", env=journal).create(id="f", params={"concurrent": True})
    # Both have started while neither may finish: they run at the same time.
    wait_for(lambda: {"a in", "b in"} <= set(journal.entries))
    assert "a out" not in journal.entries and "b out" not in journal.entries
    journal.gate("go b").set()
    journal.gate("go a").set()
    assert inst.wait(timeout=10).output == "ab"


@pytest.mark.parametrize("cls", [FanInAsync, FanInSync])
def test_without_concurrent_the_dependencies_run_in_parameter_order(
    rt: af.Runtime, journal: Journal, cls: type[af.Workflow]
) -> None:
    inst = rt.register(cls, name="fan", env=journal).create(id="f", params={"concurrent": False})
    wait_for(lambda: "a in" in journal.entries)
    journal.gate("go a").set()
    wait_for(lambda: "b in" in journal.entries)  # b starts only once a is done
    assert journal.entries == ["a in", "a out", "b in"]
    journal.gate("go b").set()
    assert inst.wait(timeout=10).output == "ab"


# -- replay after a restart --------------------------------------------------------------------


class Nap(af.Workflow):
    """Dependencies, a sleep (the runtime is closed there), then a step that needs them again."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        j: Journal = self.env

        @step.do("fetch a")
        def fetch_a() -> int:
            j.add("a")
            return 2

        @step.do("fetch b")
        async def fetch_b() -> int:
            j.add("b")
            return 3

        @step.do(concurrent=True, config={"retries": {"limit": 0}})
        def product(fetch_a: int, fetch_b: int) -> int:
            j.add("product")
            return fetch_a * fetch_b

        first = await product()
        await step.sleep("nap", "1 minute")

        @step.do()
        def report(product: int, fetch_a: int) -> str:
            j.add("report")
            return f"{product}/{fetch_a}"

        return [first, await report()]


def test_replay_after_a_restart_runs_no_completed_step_again(
    make_runtime: Any, clock: FakeClock, journal: Journal
) -> None:
    rt = make_runtime()
    inst = rt.register(Nap, name="nap", env=journal).create(id="n")
    inst.wait_for_status("waiting")
    assert journal.counts() == {"a": 1, "b": 1, "product": 1}
    rt.close()
    rt = make_runtime()  # the same location: the rest is a replay
    wf = rt.register(Nap, name="nap", env=journal)
    assert rt.wait_until_idle()
    clock.advance("1 minute")
    st = wf.get("n").wait(timeout=10)
    assert st.status == "complete", st
    assert st.output == [6, "6/2"]
    assert journal.counts() == {"a": 1, "b": 1, "product": 1, "report": 1}
    steps = _steps(wf.get("n"))
    assert steps["product"].config is not None and steps["product"].config["retries"]["limit"] == 0


# -- config, the legacy depends form, ctx as a dict ---------------------------------------------


class Legacy(af.Workflow):
    """Cloudflare's legacy form; ``config`` as Cloudflare gives it; ``ctx[...]``."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        @step.do("one")
        def one() -> str:
            return "foo"

        @step.do("two", config={"retries": {"limit": 2, "delay": 0, "backoff": "constant"}})
        def two(ctx: Any) -> Any:
            if ctx["attempt"] < 2:
                raise RuntimeError("first attempt fails")
            return {
                "attempt": ctx["attempt"],
                "step": ctx["step"],
                "limit": ctx["config"]["retries"]["limit"],
            }

        @step.do("three", depends=[one, two], concurrent=True)
        async def three(result1: str, ctx: Any, result2: Any) -> list[Any]:
            return [result1, ctx["step"]["name"], result2]

        return await three()


def test_legacy_depends_and_config(rt: af.Runtime) -> None:
    inst = rt.register(Legacy, name="legacy").create(id="l")
    st = inst.wait(timeout=10)
    assert st.status == "complete", st
    assert st.output == [
        "foo",
        "three",
        {"attempt": 2, "step": {"name": "two", "count": 1}, "limit": 2},
    ]
    assert len(_steps(inst)["two"].attempts) == 2


# -- bad parameters ------------------------------------------------------------------------------


class BadParameters(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        @step.do()
        async def known() -> int:
            return 1

        @step.do("uses unknown")
        async def uses(known: int, unknown: int) -> int:
            return known + unknown

        @step.do("uneven", depends=[known])
        def uneven(a: int, b: int) -> int:
            return a + b

        @step.do("not a step", depends=[lambda: 1])
        def not_a_step(a: int) -> int:
            return a

        caught = []
        for fn in (uses, uneven, not_a_step):
            try:
                await fn()
            except TypeError as e:
                caught.append([type(e).__name__, str(e), e.step, e.parameter])
        if event.payload == "raise":
            await uses()
        return caught


def test_a_parameter_naming_no_step_is_a_type_error_naming_the_step(rt: af.Runtime) -> None:
    inst = rt.register(BadParameters, name="bad").create(id="b1")
    st = inst.wait(timeout=10)
    assert st.status == "complete", st
    unknown, uneven, not_a_step = st.output
    assert unknown[0] == "StepDependencyError"
    assert unknown[1].startswith("workflow 'bad', instance 'b1', step 'uses unknown': ")
    assert "parameter 'unknown'" in unknown[1] and "'known'" in unknown[1]
    assert unknown[2:] == ["uses unknown", "unknown"]
    assert uneven[1].startswith("workflow 'bad', instance 'b1', step 'uneven': ")
    assert "2 parameter(s) besides ctx but depends lists 1" in uneven[1]
    assert not_a_step[1].startswith("workflow 'bad', instance 'b1', step 'not a step': ")
    # Refused before anything was run or recorded, its dependencies included (as Cloudflare's SDK).
    assert inst.steps() == []
    # Not caught: the instance fails with it.
    failed = (
        rt.register(BadParameters, name="bad2").create(id="b2", params="raise").wait(timeout=10)
    )
    assert failed.status == "errored"
    assert failed.error is not None and failed.error["name"] == "StepDependencyError"
    assert "workflow 'bad2', instance 'b2', step 'uses unknown'" in failed.error["message"]


def test_concurrent_and_depends_belong_to_the_decorator(rt: af.Runtime) -> None:
    class Misused(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            return step.do("s", lambda: 1, concurrent=True)

    st = rt.register(Misused, name="misused").create(id="m").wait(timeout=10)
    assert st.status == "errored"
    assert st.error is not None and "step 's': concurrent= and depends=" in st.error["message"]


class FailingDependency(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        @step.do()
        def fine() -> int:
            return 1

        @step.do()
        def broken() -> int:
            raise af.NonRetryableError("the source is gone")

        @step.do(concurrent=True)
        def joined(fine: int, broken: int) -> int:
            return fine + broken

        try:
            await joined()
        except af.NonRetryableError as e:
            return str(e)
        return "joined ran"


def test_a_failed_dependency_raises_into_run_and_its_dependent_never_runs(rt: af.Runtime) -> None:
    inst = rt.register(FailingDependency, name="failing").create(id="f")
    assert inst.wait(timeout=10).output == "the source is gone"
    steps = _steps(inst)
    assert steps["broken"].status == "errored" and "joined" not in steps


class BadNames(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        out = []
        for name in (123, "", "x" * 300):
            try:
                step.do(name)
            except ValueError as e:
                out.append(str(e))
        return out


def test_a_bad_step_name_is_refused_when_declared(rt: af.Runtime) -> None:
    out = rt.register(BadNames, name="names").create(id="n").wait(timeout=10).output
    assert len(out) == 3
    assert all(m.startswith("workflow 'names', instance 'n': ") for m in out)
    assert "a step name must be a non-empty str, got 123" in out[0]


# -- event as a dict -------------------------------------------------------------------------------


class EventDict(af.Workflow):
    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        try:
            event["nope"]
            missing = None
        except KeyError as e:
            missing = str(e)
        return {
            "payload": event["payload"],
            "timestamp": event["timestamp"],
            "instanceId": event["instanceId"],
            "workflowName": event["workflowName"],
            "schedule": event["schedule"],
            "missing": missing,
            "keys": sorted(dict(event)),
            "get": [event.get("payload"), event.get("nope", "default")],
            "in": ["payload" in event, "nope" in event],
        }


def test_event_reads_as_cloudflares_dict(rt: af.Runtime, clock: FakeClock) -> None:
    inst = rt.register(EventDict, name="evd").create(id="e1", params={"x": 1})
    out = inst.wait(timeout=10).output
    assert out["payload"] == {"x": 1}
    ts = out["timestamp"]
    assert ts.utcoffset() == timedelta(0) and ts.timestamp() == pytest.approx(
        clock.now(), abs=0.001
    )
    assert (out["instanceId"], out["workflowName"], out["schedule"]) == ("e1", "evd", None)
    assert out["missing"] == "'nope'"
    assert out["keys"] == ["instanceId", "payload", "schedule", "timestamp", "workflowName"]
    assert out["get"] == [{"x": 1}, "default"]
    assert out["in"] == [True, False]


# -- on an executor: the dependencies' results travel with the body ---------------------------------


class Remote(af.Workflow):
    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        @step.do()
        def left() -> list[int]:
            return [os.getpid()]

        @step.do()
        async def right() -> int:
            return 5

        @step.do(concurrent=True)
        def both(ctx: Any, left: list[int], right: int) -> list[Any]:
            return [left, right, ctx["step"]["name"], os.getpid()]

        return await both()


@pytest.mark.executors
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_declared_steps_on_a_dask_cluster(tmp_path: Any) -> None:
    pytest.importorskip("distributed")
    cluster, client = dask_cluster(2)
    try:
        with (
            af.executors.DaskExecutor(client) as ex,
            af.Runtime(tmp_path / "data", executor=ex) as rt,
        ):
            inst = rt.register(Remote, name="remote").create(id="r")
            st = inst.wait(timeout=120)
            assert st.status == "complete", st
            (left_pid,), right, name, both_pid = st.output
            assert (right, name) == (5, "both")
            assert os.getpid() not in (left_pid, both_pid)  # both ran on Dask workers
            assert {
                a.ran_on["executor"] for s in inst.steps() if s.name != "right" for a in s.attempts
            } == {"dask"}
    finally:
        client.close()
        cluster.close()
