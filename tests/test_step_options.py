"""Step options: sensitive outputs (``sensitive="output"``) and retry delay functions."""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import Journal, wait_for
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.routing import Route
from starlette.testclient import TestClient

import actorflow as af
from actorflow.cli import cli
from actorflow.http import create_app
from actorflow.testing import FakeClock
from actorflow.workflows import step_options

#: The sensitive value: it must appear on no surface.
SECRET = "tok-5c1e0f9a7b3d4e21-never-shown"
REDACTED = "[REDACTED]"


# -- sensitive outputs -----------------------------------------------------------------


class Vault(af.Workflow):
    """A sensitive step, a step that uses its output, a sleep (a replay), and one more use."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        journal: Journal = self.env
        token = step.do("fetch token", lambda: SECRET, sensitive="output")
        step.do("use token", lambda: journal.add(("use", token == SECRET)))

        def flaky(ctx: af.StepContext) -> str:
            if ctx.attempt == 1:
                raise RuntimeError("not yet")
            return SECRET  # the secret again, from another sensitive step

        again = step.do(
            "fetch again",
            flaky,
            retries={"limit": 1, "delay": 1, "backoff": "constant"},
            config={"sensitive": "output"},
        )
        step.sleep("nap", "1 minute")
        # After the sleep (and a restart of the runtime) replay gives the real values.
        same = step.do("after", lambda: journal.add(("after", token == SECRET == again)) or 1)
        return {"length": len(token), "same": token == again, "after": same}


def _surfaces(text: str) -> None:
    assert SECRET not in text


def _traced() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def test_a_sensitive_output_is_on_no_surface_and_replay_gets_it(
    make_runtime: Any,
    location: str,
    clock: FakeClock,
    journal: Journal,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="actorflow")
    provider, exporter = _traced()
    rt = make_runtime(tracer_provider=provider)
    wf = rt.register(Vault, name="vault", env=journal)
    inst = wf.create(id="v1")
    assert rt.wait_until_idle()
    clock.advance(1)  # the retry of "fetch again"
    inst.wait_for_status("waiting")
    rt.close()  # a restart of the runtime in the sleep: the rest is a replay
    rt = make_runtime(tracer_provider=provider)
    wf = rt.register(Vault, name="vault", env=journal)
    assert rt.wait_until_idle()
    clock.advance("1 minute")
    inst = wf.get("v1")
    st = inst.wait(timeout=10)
    assert st.status == "complete", st
    assert st.output == {"length": len(SECRET), "same": True, "after": 1}
    assert journal.entries == [("use", True), ("after", True)]

    # steps() and history(): the marker instead of the output, the flag in the config.
    steps = {s.name: s for s in inst.steps()}
    for name in ("fetch token", "fetch again"):
        assert steps[name].output == REDACTED
        assert steps[name].config is not None and steps[name].config["sensitive"] == "output"
    assert steps["after"].output == 1 and "sensitive" not in (steps["after"].config or {})
    results = {e.step: e.data["result"] for e in inst.history() if e.type == "STEP_SUCCESS"}
    assert results["fetch token-1"] == results["fetch again-1"] == REDACTED
    assert inst.wait_for_step("fetch token") == REDACTED
    _surfaces(repr(inst.steps()) + repr(inst.history()) + repr(inst.describe()))

    # The HTTP API: every GET route, with the instance's names filled in.
    app = create_app(rt)
    gets = [r for r in app.routes if isinstance(r, Route) and "GET" in (r.methods or ())]
    seen = 0
    with TestClient(app, headers={"Authorization": f"Bearer {app.state.token}"}) as client:
        for route in gets:
            path = route.path.replace("{wf}", "vault").replace("{id}", "v1")
            if "{" in path:
                continue  # a route about something else than an instance
            resp = client.get(path)
            assert resp.status_code == 200, (path, resp.text)
            _surfaces(resp.text)
            seen += 1
        details = client.get("/api/workflows/vault/instances/v1").json()["result"]
    assert seen >= 6
    shown = {s["name"]: s["output"] for s in details["steps"]}
    assert shown["fetch token"] == shown["fetch again"] == REDACTED

    # Logs and spans.
    assert caplog.records, "nothing was logged at DEBUG"
    for record in caplog.records:
        _surfaces(record.getMessage())
        _surfaces(repr(record.__dict__))
    spans = exporter.get_finished_spans()
    assert any(s.name == "step fetch token" for s in spans)
    for span in spans:
        _surfaces(span.to_json())
    rt.close()
    provider.shutdown()

    # The CLI: every read command, as a table and as JSON.
    runner = CliRunner()
    for args in (
        ["list"],
        ["status", "vault", "v1"],
        ["describe", "vault", "v1"],
        ["history", "vault", "v1"],
        ["steps", "vault", "v1"],
        ["metrics"],
    ):
        for fmt in ([], ["--json"]):
            result = runner.invoke(cli, ["--data", location, *fmt, *args], catch_exceptions=False)
            assert result.exit_code == 0, (args, result.output)
            _surfaces(result.output)
            if args[0] in ("history", "steps") and fmt:
                assert REDACTED in result.output


class Shapes(af.Workflow):
    """Every way of asking for a sensitive output."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        @step.do("decorated", sensitive="output")
        async def decorated(ctx: af.StepContext) -> Any:
            return {"secret": SECRET, "sensitive": ctx.config.get("sensitive")}

        d = await decorated()
        m = await step.map("mapped", lambda i: f"{SECRET}-{i}", [0, 1], sensitive="output")
        p = await step.parallel(("p1", lambda: SECRET), ("p2", lambda: 2), sensitive="output")
        plain = await step.do("plain", lambda: "visible")
        return [d["sensitive"], len(m), p[1], plain]


def test_the_decorator_map_and_parallel_take_sensitive(rt: af.Runtime) -> None:
    inst = rt.register(Shapes, name="shapes").create(id="s")
    assert inst.wait(timeout=10).output == ["output", 2, 2, "visible"]
    outputs = {s.name: s.output for s in inst.steps()}
    assert outputs == {
        "decorated": REDACTED,
        "mapped[0]": REDACTED,
        "mapped[1]": REDACTED,
        "p1": REDACTED,
        "p2": REDACTED,
        "plain": "visible",
    }
    _surfaces(repr(inst.history()))


def test_the_error_of_a_sensitive_step_is_not_redacted(rt: af.Runtime) -> None:
    class Fails(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            def boom() -> None:
                raise af.NonRetryableError("shown as it is")

            step.do("boom", boom, sensitive="output")

    inst = rt.register(Fails, name="fails").create(id="f")
    st = inst.wait(timeout=10)
    assert st.error == {"name": "NonRetryableError", "message": "shown as it is"}
    (rec,) = inst.steps()
    assert rec.output is None and rec.error == st.error


@pytest.mark.parametrize(
    ("how", "value"),
    [("kwarg", "yes"), ("kwarg", True), ("config", "input"), ("config", 1)],
)
def test_a_bad_sensitive_value_is_refused_naming_the_step(
    rt: af.Runtime, how: str, value: Any
) -> None:
    class Bad(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            if how == "kwarg":
                return step.do("careful", lambda: 1, sensitive=value)
            return step.do("careful", lambda: 1, config={"sensitive": value})

    st = rt.register(Bad, name="bad").create(id="b1").wait(timeout=10)
    assert st.status == "errored"
    assert st.error is not None and st.error["name"] == "ValueError"
    message = st.error["message"]
    assert "workflow 'bad'" in message and "instance 'b1'" in message
    assert "step 'careful'" in message and f"not {value!r}" in message


# -- retry delay functions ---------------------------------------------------------------


class Backoff(af.Workflow):
    """A step that fails ``params["fails"]`` times, with a delay function over a backoff."""

    def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        journal: Journal = self.env
        p = event.payload

        def body(ctx: af.StepContext) -> int:
            if ctx.attempt <= p["fails"]:
                raise ConnectionError(f"down {ctx.attempt}")
            return ctx.attempt

        def delay(ctx: af.StepContext, error: BaseException) -> Any:
            journal.add(("delay", ctx.attempt, str(error), "delay" in ctx.config["retries"]))
            return p["base"]

        return step.do(
            "call",
            body,
            retries={"limit": p["limit"], "delay": delay, "backoff": p["backoff"]},
        )


def _attempts(inst: af.Instance) -> int:
    steps = inst.steps()
    return len(steps[0].attempts) if steps else 0


@pytest.mark.parametrize(
    ("backoff", "waits"),
    [
        ("constant", [1000, 1000, 1000]),
        ("linear", [1000, 2000, 3000]),
        ("exponential", [1000, 2000, 4000]),
    ],
)
def test_a_delay_function_goes_through_the_backoff_and_is_recorded(
    rt: af.Runtime, clock: FakeClock, journal: Journal, backoff: str, waits: list[int]
) -> None:
    wf = rt.register(Backoff, name="backoff", env=journal)
    params = {"fails": 3, "limit": 5, "base": "1 second", "backoff": backoff}
    inst = wf.create(id="b", params=params)
    for n, wait in enumerate(waits, 1):
        wait_for(lambda n=n: _attempts(inst) == n)
        assert rt.wait_until_idle()
        assert inst.status().status == "waiting"
        clock.advance(wait - 1)  # not due yet: the wait is the function's result, backed off
        assert rt.wait_until_idle()
        assert _attempts(inst) == n
        clock.advance(1)
    assert inst.wait(timeout=10).output == 4
    (rec,) = inst.steps()
    assert [a.retry_delay_ms for a in rec.attempts] == [*waits, None]
    assert "delay" not in rec.config["retries"]  # a function is not stored
    failures = [e.data["retryDelayMs"] for e in inst.history() if e.type == "ATTEMPT_FAILURE"]
    assert failures == waits
    # Called once per failed attempt that a retry follows, with ctx and the error.
    assert journal.entries == [("delay", n, f"down {n}", False) for n in (1, 2, 3)]


def test_a_delay_function_is_not_called_again_on_replay(
    make_runtime: Any, clock: FakeClock, journal: Journal
) -> None:
    params = {"fails": 2, "limit": 5, "base": "1 hour", "backoff": "constant"}
    rt = make_runtime()
    inst = rt.register(Backoff, name="backoff", env=journal).create(id="r", params=params)
    wait_for(lambda: _attempts(inst) == 1)
    assert rt.wait_until_idle()
    assert journal.count(("delay", 1, "down 1", False)) == 1
    rt.close()  # mid-backoff: the next attempt is an hour away
    rt = make_runtime()
    wf = rt.register(Backoff, name="backoff", env=journal)
    assert rt.wait_until_idle()
    clock.advance("30 minutes")  # the replay waits what is left of the recorded delay
    assert rt.wait_until_idle()
    inst = wf.get("r")
    assert _attempts(inst) == 1 and len(journal.entries) == 1
    clock.advance("30 minutes")
    wait_for(lambda: _attempts(inst) == 2)
    assert rt.wait_until_idle()
    rt.close()  # again, in the second delay
    rt = make_runtime()
    wf = rt.register(Backoff, name="backoff", env=journal)
    assert rt.wait_until_idle()
    clock.advance("1 hour")
    assert wf.get("r").wait(timeout=10).output == 3
    assert journal.entries == [("delay", 1, "down 1", False), ("delay", 2, "down 2", False)]
    (rec,) = wf.get("r").steps()
    assert [a.retry_delay_ms for a in rec.attempts] == [3_600_000, 3_600_000, None]


class Kinds(af.Workflow):
    """Delay functions of every shape a step may name."""

    async def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
        journal: Journal = self.env
        seen: list[Any] = []

        def failing_twice(ctx: af.StepContext) -> str:
            if ctx.attempt < 3:
                raise KeyError(ctx.attempt)
            return "ok"

        async def async_delay(error: BaseException) -> int:
            await asyncio.sleep(0)
            journal.add(("async", repr(error)))
            return 5

        def everything(**kw: Any) -> Any:
            journal.add(("kw", sorted(kw)))
            from datetime import timedelta

            return timedelta(milliseconds=7)

        seen.append(
            await step.do(
                "async",
                failing_twice,
                retries={"limit": 2, "delay": async_delay, "backoff": "linear"},
            )
        )
        seen.append(
            await step.do(
                "policy",
                failing_twice,
                retries=af.RetryPolicy(limit=2, delay=everything, backoff="constant"),
            )
        )
        seen.append(
            await step.do(
                "config form",
                failing_twice,
                config={"retries": {"limit": 2, "delay": lambda: 3, "backoff": "constant"}},
            )
        )
        return seen


def test_delay_functions_sync_async_kwargs_and_forms(
    rt: af.Runtime, clock: FakeClock, journal: Journal
) -> None:
    inst = rt.register(Kinds, name="kinds", env=journal).create(id="k")
    for _ in range(50):
        assert rt.wait_until_idle()
        if inst.status().status == "complete":
            break
        clock.advance(10)
    assert inst.wait(timeout=10).output == ["ok", "ok", "ok"]
    delays = {s.name: [a.retry_delay_ms for a in s.attempts] for s in inst.steps()}
    assert delays == {
        "async": [5, 10, None],  # linear: 5 * 1, 5 * 2
        "policy": [7, 7, None],
        "config form": [3, 3, None],
    }
    assert journal.entries == [
        ("async", "KeyError(1)"),
        ("async", "KeyError(2)"),
        ("kw", ["ctx", "error"]),
        ("kw", ["ctx", "error"]),
    ]


def _failing_delay(delay: Any) -> type[af.Workflow]:
    class Fails(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            journal: Journal = self.env

            def body() -> None:
                journal.add("attempt")
                raise ConnectionError("the body failed")

            try:
                step.do("call", body, retries={"limit": 5, "delay": delay})
            except af.NonRetryableDelayError as e:
                return {"caught": type(e).__name__, "message": str(e)}
            return None

    return Fails


def _bad_delay_raises() -> Any:
    raise LookupError("no delay table")


def _delay_exits() -> Any:
    raise SystemExit(3)  # in its step thread: it must not reach the engine loop


@pytest.mark.parametrize(
    ("delay", "says"),
    [
        (_bad_delay_raises, "LookupError: no delay table"),
        (_delay_exits, "raised SystemExit"),
        (lambda: "soon", "invalid duration 'soon'"),
        (lambda: -5, "must be finite and >= 0"),
        (lambda: None, "not NoneType"),
        (lambda: True, "a duration must be a number"),
    ],
)
def test_a_delay_function_that_fails_fails_the_step_at_once(
    rt: af.Runtime, journal: Journal, delay: Any, says: str
) -> None:
    inst = rt.register(_failing_delay(delay), name="fails", env=journal).create(id="d")
    out = inst.wait(timeout=10).output
    assert out is not None and out["caught"] == "NonRetryableDelayError"
    message = out["message"]
    for part in ("workflow 'fails'", "instance 'd'", "step 'call'", "after attempt 1", says):
        assert part in message, (part, message)
    assert journal.entries == ["attempt"]  # no further attempt
    (rec,) = inst.steps()
    assert rec.status == "errored"
    assert rec.error is not None and rec.error["name"] == "NonRetryableDelayError"
    (att,) = rec.attempts
    assert att.error == {"name": "ConnectionError", "message": "the body failed"}
    assert att.retry_delay_ms is None


def test_a_delay_function_that_takes_too_long_fails_the_step(
    rt: af.Runtime, journal: Journal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(step_options, "DELAY_FUNCTION_TIMEOUT_S", 0.2)

    def slow() -> int:
        journal.block("slow delay")
        return 1

    inst = rt.register(_failing_delay(slow), name="fails", env=journal).create(id="t")
    out = inst.wait(timeout=10).output
    journal.open_all()
    assert out is not None and out["caught"] == "NonRetryableDelayError"
    assert "took longer than" in out["message"] and "step 'call'" in out["message"]


def test_a_delay_function_it_cannot_call_is_refused_naming_the_step(rt: af.Runtime) -> None:
    with pytest.raises(ValueError, match="cannot be called with the keyword arguments"):
        af.RetryPolicy(delay=lambda attempt: 1)

    class Bad(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: af.WorkflowStep) -> Any:
            return step.do("call", lambda: 1, retries={"delay": lambda ctx, attempt: 1})

    st = rt.register(Bad, name="bad").create(id="b").wait(timeout=10)
    assert st.status == "errored" and st.error is not None
    assert re.search(
        r"workflow 'bad', instance 'b', step 'call': retries.delay", st.error["message"]
    )


def test_disabled_retry_delays_do_not_call_the_delay_function(
    rt: af.Runtime, journal: Journal
) -> None:
    wf = rt.register(Backoff, name="backoff", env=journal)
    wf.modify("m").disable_retry_delays()
    params = {"fails": 2, "limit": 5, "base": "1 hour", "backoff": "constant"}
    assert wf.create(id="m", params=params).wait(timeout=10).output == 3
    assert journal.entries == []
