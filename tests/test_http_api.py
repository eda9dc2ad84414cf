"""The HTTP API: every endpoint, the envelope, status codes and error names."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from conftest import Journal, wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

import actorflow as af
from actorflow.http import create_app
from actorflow.testing import FakeClock

BASE = "/api/workflows/flaky/instances"


class Flaky(af.Workflow):
    """Fails its first step once (retried after 1 s), then waits for an approval."""

    def run(self, event: af.WorkflowEvent, step: Any) -> Any:
        def charge(ctx: Any) -> dict[str, Any]:
            if ctx.attempt == 1:
                raise RuntimeError("card declined")
            return {"charge": f"ch_{event.payload['n']}"}

        charged = step.do("charge", charge, retries={"limit": 3, "delay": "1 second"})
        ok = step.wait_for_event("approval", "approved", timeout="1 hour")
        step.do("ship", lambda: "shipped")
        return {"charged": charged, "by": ok.payload}


class Blocked(af.Workflow):
    """Waits for an event forever (for status changes)."""

    def run(self, event: af.WorkflowEvent, step: Any) -> Any:
        step.do("first", lambda: 1)
        step.do("second", lambda: 2)
        step.wait_for_event("wait", "go", timeout="1 day")
        return "done"


def with_token(app: Starlette, outer: Starlette | None = None) -> TestClient:
    """A client of ``outer`` (default ``app``) that sends ``app``'s token (made by create_app)."""
    return TestClient(outer or app, headers={"Authorization": f"Bearer {app.state.token}"})


@pytest.fixture
def client(rt: af.Runtime) -> Iterator[TestClient]:
    rt.register(Flaky, name="flaky")
    rt.register(Blocked, name="blocked")
    with with_token(create_app(rt)) as c:
        yield c


def ok(resp: Any, status: int = 200) -> Any:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["success"] is True and body["errors"] == [] and body["messages"] == []
    return body["result"]


def fails(resp: Any, status: int, name: str) -> str:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert body["success"] is False and body["result"] is None
    [err] = body["errors"]
    assert err["name"] == name, err
    assert err["code"] == 10000 + status
    message: str = err["message"]
    return message


def test_create_get_list_and_counts(client: TestClient, rt: af.Runtime) -> None:
    made = ok(client.post(BASE, json={"id": "o-1", "params": {"n": 1}}), 201)
    assert made == {"id": "o-1", "workflow": "flaky", "status": "queued"}
    made = ok(client.post(BASE, json={"params": {"n": 2}}), 201)
    auto_id = made["id"]
    assert len(auto_id) == 36  # a uuid4
    assert rt.workflow("flaky").get("o-1").status().status != "unknown"

    got = ok(client.get(f"{BASE}/o-1"))
    assert got["id"] == "o-1" and got["params"] == {"n": 1}
    assert got["status"] in ("queued", "running", "waiting")

    wait_for(lambda: rt.workflow("flaky").get("o-1").status().status == "waiting")
    rows = ok(client.get(BASE))
    assert {r["id"] for r in rows} == {"o-1", auto_id}
    assert all(r["workflow"] == "flaky" and r["created_on"] for r in rows)

    workflows = ok(client.get("/api/workflows"))
    by_name = {w["name"]: w for w in workflows}
    assert set(by_name) == {"flaky", "blocked"}
    assert by_name["flaky"]["total"] == 2 and by_name["blocked"]["total"] == 0
    assert sum(by_name["flaky"]["counts"].values()) == 2
    one = ok(client.get("/api/workflows/flaky"))
    assert one["name"] == "flaky" and one["total"] == 2


def test_list_filters_by_status_and_pages_with_a_cursor(
    client: TestClient, rt: af.Runtime, clock: FakeClock
) -> None:
    b = rt.workflow("blocked")
    for i in range(5):
        b.create(id=f"b-{i}")
        clock.advance(10)  # ms: distinct creation times, so newest first is well defined
    wait_for(lambda: all(b.get(f"b-{i}").status().status == "waiting" for i in range(5)))
    b.get("b-0").terminate()

    waiting = ok(client.get("/api/workflows/blocked/instances?status=waiting"))
    assert [r["id"] for r in waiting] == ["b-4", "b-3", "b-2", "b-1"]
    terminated = ok(client.get("/api/workflows/blocked/instances", params={"status": "terminated"}))
    assert [r["id"] for r in terminated] == ["b-0"]

    resp = client.get("/api/workflows/blocked/instances?limit=2")
    assert [r["id"] for r in ok(resp)] == ["b-4", "b-3"]
    info = resp.json()["result_info"]
    assert info == {"count": 2, "cursor": "b-3"}
    resp = client.get("/api/workflows/blocked/instances?limit=2&cursor=b-3")
    assert [r["id"] for r in ok(resp)] == ["b-2", "b-1"]
    resp = client.get("/api/workflows/blocked/instances?limit=2&cursor=b-1")
    assert [r["id"] for r in ok(resp)] == ["b-0"]
    assert resp.json()["result_info"]["cursor"] is None

    created = {r["id"]: r["created_on"] for r in ok(client.get("/api/workflows/blocked/instances"))}
    newer = ok(
        client.get("/api/workflows/blocked/instances", params={"created_after": created["b-2"]})
    )
    assert [r["id"] for r in newer] == ["b-4", "b-3"]
    ms = rt.workflow("blocked").get("b-3").history()[0].timestamp.timestamp() * 1000
    newer = ok(client.get(f"/api/workflows/blocked/instances?created_after={round(ms)}"))
    assert [r["id"] for r in newer] == ["b-4"]
    fails(
        client.get("/api/workflows/blocked/instances?created_after=2024-01-01T00:00:00"),
        400,
        "ValidationError",
    )
    fails(
        client.get("/api/workflows/blocked/instances?created_after=yesterday"),
        400,
        "ValidationError",
    )

    counts = ok(client.get("/api/workflows/blocked"))["counts"]
    assert counts["waiting"] == 4 and counts["terminated"] == 1

    fails(client.get("/api/workflows/blocked/instances?status=bogus"), 400, "ValidationError")
    fails(client.get("/api/workflows/blocked/instances?limit=0"), 400, "ValidationError")
    fails(client.get("/api/workflows/blocked/instances?limit=x"), 400, "ValidationError")
    fails(client.get("/api/workflows/blocked/instances?cursor=a.b"), 400, "InvalidInstanceId")
    fails(client.get("/api/workflows/blocked/instances?cursor=nobody"), 404, "InstanceNotFound")


def test_create_batch_skips_existing_ids(client: TestClient, rt: af.Runtime) -> None:
    ok(client.post(BASE, json={"id": "x-1", "params": {"n": 1}}), 201)
    made = ok(
        client.post(
            BASE, json=[{"id": "x-1", "params": {"n": 1}}, {"id": "x-2", "params": {"n": 2}}]
        ),
        201,
    )
    assert [m["id"] for m in made] == ["x-2"]
    made = ok(client.post(f"{BASE}/batch", json=[{"instance_id": "x-3", "params": {"n": 3}}]), 201)
    assert [m["id"] for m in made] == ["x-3"]
    assert rt.workflow("flaky").get("x-3").status().status != "unknown"
    fails(client.post(f"{BASE}/batch", json={"id": "x-4"}), 400, "ValidationError")
    fails(client.post(f"{BASE}/batch", json=[]), 400, "ValidationError")
    fails(
        client.post(f"{BASE}/batch", json=[{"id": f"y{i}"} for i in range(101)]),
        400,
        "LimitExceeded",
    )
    fails(
        client.post(f"{BASE}/batch", json=[{"id": "ok"}, {"id": "not ok"}]),
        400,
        "InvalidInstanceId",
    )
    with pytest.raises(af.InstanceNotFound):
        rt.workflow("flaky").get("ok")  # nothing of a rejected batch was written


def test_errors_map_to_status_codes_and_class_names(client: TestClient, rt: af.Runtime) -> None:
    ok(client.post(BASE, json={"id": "dup", "params": {"n": 1}}), 201)
    fails(client.post(BASE, json={"id": "dup"}), 409, "InstanceAlreadyExists")
    fails(client.post(BASE, json={"id": "bad id!"}), 400, "InvalidInstanceId")
    fails(client.post(BASE, json={"id": "x" * 101}), 400, "InvalidInstanceId")
    fails(client.post(BASE, json={"id": 7}), 400, "InvalidInstanceId")
    fails(client.post(BASE, json={"id": "a", "extra": 1}), 400, "ValidationError")
    fails(client.post(BASE, json="just a string"), 400, "ValidationError")
    msg = fails(client.get(f"{BASE}/nope"), 404, "InstanceNotFound")
    assert "nope" in msg
    fails(client.get("/api/workflows/unknown"), 404, "WorkflowNotFound")
    fails(client.get("/api/workflows/unknown/instances"), 404, "WorkflowNotFound")
    fails(client.get(f"{BASE}/nope/history"), 404, "InstanceNotFound")
    fails(client.get("/api/nothing-here"), 404, "NotFound")
    fails(client.put(f"{BASE}/dup"), 405, "MethodNotAllowed")
    fails(client.delete(f"{BASE}/dup/history"), 405, "MethodNotAllowed")
    fails(
        client.post(BASE, content=b"{not json", headers={"content-type": "application/json"}),
        400,
        "ValidationError",
    )
    fails(
        client.post(
            BASE,
            content=b'{"id": "n", "params": NaN}',
            headers={"content-type": "application/json"},
        ),
        400,
        "ValidationError",
    )
    with pytest.raises(af.InstanceNotFound):
        rt.workflow("flaky").get("n")


def test_rate_limit_is_429(make_runtime: Any) -> None:
    runtime = make_runtime(limits=af.Limits(max_queued=0))
    runtime.register(Blocked, name="blocked")
    with with_token(create_app(runtime)) as c:
        fails(c.post("/api/workflows/blocked/instances", json={"id": "r1"}), 429, "RateLimitError")
    with pytest.raises(af.InstanceNotFound):
        runtime.workflow("blocked").get("r1")


def test_instance_shows_failed_attempt_retry_and_history(
    client: TestClient, rt: af.Runtime, clock: FakeClock
) -> None:
    ok(client.post(BASE, json={"id": "o-9", "params": {"n": 9}}), 201)
    inst = rt.workflow("flaky").get("o-9")
    wait_for(lambda: inst.status().status == "waiting")
    got = ok(client.get(f"{BASE}/o-9"))
    [charge] = got["steps"]
    assert charge["type"] == "step" and charge["status"] == "retrying"
    [first] = charge["attempts"]
    assert first["success"] is False and first["retry_delay_ms"] == 1000
    assert first["error"] == {"name": "RuntimeError", "message": "card declined"}

    clock.advance("1 second")
    wait_for(lambda: [s.name for s in inst.steps()] == ["charge", "approval"])
    got = ok(client.get(f"{BASE}/o-9"))
    charge, approval = got["steps"]
    assert [a["success"] for a in charge["attempts"]] == [False, True]
    assert charge["output"] == {"charge": "ch_9"} and charge["success"] is True
    assert approval["type"] == "waitForEvent" and approval["finished"] is False

    sent = ok(client.post(f"{BASE}/o-9/events/approved", json={"user": "ann"}))
    assert sent["type"] == "approved"
    assert inst.wait(timeout=10).status == "complete"
    got = ok(client.get(f"{BASE}/o-9"))
    assert got["status"] == "complete" and got["success"] is True
    assert got["output"] == {"charged": {"charge": "ch_9"}, "by": {"user": "ann"}}
    assert got["end"] is not None and got["start"] is not None

    events = ok(client.get(f"{BASE}/o-9/history"))
    types = [e["type"] for e in events]
    assert types[:2] == ["WORKFLOW_QUEUED", "WORKFLOW_START"]
    assert types[-1] == "WORKFLOW_SUCCESS"
    failure = next(e for e in events if e["type"] == "ATTEMPT_FAILURE")
    assert failure["step"] == "charge-1" and failure["attempt"] == 1
    assert failure["data"]["retryDelayMs"] == 1000
    assert [e["type"] for e in events if e["step"] == "charge-1"].count("ATTEMPT_START") == 2


def test_send_event_validates_type_and_payload(make_runtime: Any) -> None:
    runtime = make_runtime(limits=af.Limits(max_event_payload_bytes=200))
    runtime.register(Blocked, name="blocked")
    inst = runtime.workflow("blocked").create(id="e1")
    url = "/api/workflows/blocked/instances/e1/events"
    with with_token(create_app(runtime)) as c:
        fails(c.post(f"{url}/bad.type", json={}), 400, "ValidationError")
        fails(c.post(f"{url}/{'t' * 101}", json={}), 400, "ValidationError")
        fails(c.post(f"{url}/go", json={"blob": "x" * 500}), 400, "LimitExceeded")
        fails(c.post(f"{url}/go", json={"blob": "x" * 70_000}), 413, "LimitExceeded")
        fails(
            c.post("/api/workflows/blocked/instances/none/events/go", json={}),
            404,
            "InstanceNotFound",
        )
        ok(c.post(f"{url}/go", content=b"", headers={"content-type": "application/json"}))
    assert inst.wait(timeout=10).status == "complete"


def test_status_changes(client: TestClient, rt: af.Runtime) -> None:
    b = rt.workflow("blocked")
    inst = b.create(id="s1")
    url = "/api/workflows/blocked/instances/s1/status"
    wait_for(lambda: inst.status().status == "waiting")
    assert ok(client.patch(url, json={"status": "pause"}))["status"] == "paused"
    assert inst.status().status == "paused"
    assert ok(client.patch(url, json={"status": "resume"}))["status"] in (
        "queued",
        "running",
        "waiting",
    )
    wait_for(lambda: inst.status().status == "waiting")
    ok(client.patch(url, json={"status": "terminate"}))
    assert inst.status().status == "terminated"
    fails(client.patch(url, json={"status": "terminate"}), 409, "InvalidInstanceState")
    fails(
        client.patch(url, json={"status": "restart", "from_step": "nope"}),
        409,
        "InvalidInstanceState",
    )
    ok(client.patch(url, json={"status": "restart", "from_step": "second"}))
    wait_for(lambda: inst.status().status == "waiting")
    assert [e.type for e in inst.history()].count("WORKFLOW_RESTARTED") == 1
    ok(client.patch(url, json={"status": "restart"}))
    wait_for(lambda: inst.status().status == "waiting")

    fails(client.patch(url, json={"status": "explode"}), 400, "ValidationError")
    fails(client.patch(url, json={}), 400, "ValidationError")
    fails(client.patch(url, json={"status": "pause", "from_step": "x"}), 400, "ValidationError")
    fails(client.patch(url, json={"status": "pause", "other": 1}), 400, "ValidationError")
    fails(
        client.patch("/api/workflows/blocked/instances/none/status", json={"status": "pause"}),
        404,
        "InstanceNotFound",
    )


JSON = {"Content-Type": "application/json"}


def delete(c: TestClient, url: str, **kw: Any) -> Any:
    """``DELETE url``, saying ``Content-Type: application/json`` as every change must."""
    headers = {**JSON, **kw.pop("headers", {})}
    return c.request("DELETE", url, headers=headers, **kw)


def test_delete_removes_the_instance_and_its_id_can_be_made_again(
    client: TestClient, rt: af.Runtime
) -> None:
    b = rt.workflow("blocked")
    url = "/api/workflows/blocked/instances"
    for iid in ("d1", "d2"):
        ok(client.post(url, json={"id": iid}), 201)
    wait_for(lambda: all(b.get(i).status().status == "waiting" for i in ("d1", "d2")))

    assert ok(delete(client, f"{url}/d1")) == {"id": "d1", "deleted": True}
    with pytest.raises(af.InstanceNotFound):
        b.get("d1")
    assert "d1" in fails(client.get(f"{url}/d1"), 404, "InstanceNotFound")
    fails(client.get(f"{url}/d1/history"), 404, "InstanceNotFound")
    msg = fails(delete(client, f"{url}/d1"), 404, "InstanceNotFound")
    assert "'blocked'" in msg and "'d1'" in msg
    assert [r["id"] for r in ok(client.get(url))] == ["d2"]
    counts = ok(client.get("/api/workflows/blocked"))
    assert counts["total"] == 1 and counts["counts"]["waiting"] == 1
    assert b.get("d2").status().status == "waiting"  # the other instance is untouched

    # The id is free again: a new instance, with a history of its own.
    assert ok(client.post(url, json={"id": "d1"}), 201)["id"] == "d1"
    wait_for(lambda: b.get("d1").status().status == "waiting")
    types = [e["type"] for e in ok(client.get(f"{url}/d1/history"))]
    assert types.count("WORKFLOW_QUEUED") == 1 and types.count("WORKFLOW_START") == 1
    # ... and it runs to its end.
    ok(client.post(f"{url}/d1/events/go", json={"n": 1}))
    assert b.get("d1").wait(timeout=10).status == "complete"
    assert ok(delete(client, f"{url}/d1", content=b"null")) == {"id": "d1", "deleted": True}
    fails(client.get(f"{url}/d1"), 404, "InstanceNotFound")


def test_delete_is_refused_without_json_a_token_or_a_known_target(
    client: TestClient, rt: af.Runtime
) -> None:
    b = rt.workflow("blocked")
    b.create(id="keep")
    url = "/api/workflows/blocked/instances/keep"
    fails(client.request("DELETE", url), 415, "UnsupportedMediaType")
    fails(
        client.request("DELETE", url, headers={"Content-Type": "text/plain"}),
        415,
        "UnsupportedMediaType",
    )
    fails(delete(client, url, content=b'{"force": true}'), 400, "ValidationError")
    fails(delete(client, url, headers={"Authorization": "Bearer wrong"}), 401, "Unauthorized")
    with TestClient(client.app) as anonymous:
        fails(delete(anonymous, url), 401, "Unauthorized")
    # A tokenless app answers loopback host names only (DNS rebinding).
    with TestClient(create_app(rt, token=None), base_url="http://evil.example") as c:
        assert delete(c, url).status_code == 400
    fails(delete(client, "/api/workflows/nope/instances/keep"), 404, "WorkflowNotFound")
    fails(delete(client, "/api/workflows/blocked/instances/bad.id"), 400, "InvalidInstanceId")
    assert b.get("keep").status().status != "unknown"  # none of them changed anything
    assert ok(delete(client, url)) == {"id": "keep", "deleted": True}


def test_delete_of_a_workflow_found_only_in_storage(make_runtime: Any) -> None:
    first = make_runtime()
    first.register(Blocked, name="blocked").create(id="u1")
    first.close()
    second = make_runtime()  # the same directory; nothing registered
    with with_token(create_app(second)) as c:
        url = "/api/workflows/blocked/instances/u1"
        assert ok(delete(c, url)) == {"id": "u1", "deleted": True}
        fails(c.get(url), 404, "InstanceNotFound")
    second.close()
    third = make_runtime()
    with pytest.raises(af.InstanceNotFound):
        third.register(Blocked, name="blocked").get("u1")


def test_fork_makes_a_new_instance_that_names_its_origin(
    client: TestClient, rt: af.Runtime
) -> None:
    b = rt.workflow("blocked")
    url = "/api/workflows/blocked/instances"
    ok(client.post(url, json={"id": "o"}), 201)
    wait_for(lambda: b.get("o").status().status == "waiting")
    before = ok(client.get(f"{url}/o"))
    body = {"at_step": "second", "id": "f", "overrides": {"first": 10}}
    origin = {"workflow": "blocked", "instance": "o", "at_step": {"name": "second", "count": 1}}
    made = ok(client.post(f"{url}/o/fork", json=body), 201)
    assert made["id"] == "f" and made["workflow"] == "blocked"
    assert made["forked_from"] == origin
    wait_for(lambda: b.get("f").status().status == "waiting")
    view = ok(client.get(f"{url}/f"))
    assert view["description"]["forked_from"] == origin
    assert [(s["name"], s["output"]) for s in view["steps"]] == [
        ("first", 10),
        ("second", 2),
        ("wait", None),
    ]
    history = ok(client.get(f"{url}/f/history"))
    assert history[0]["type"] == "WORKFLOW_QUEUED"
    assert history[0]["data"] == {"forked_from": origin}
    after = ok(client.get(f"{url}/o"))
    assert after["steps"] == before["steps"] and after["description"]["forked_from"] is None
    # A step by name and count, no id: a uuid4 is made.
    made = ok(client.post(f"{url}/o/fork", json={"at_step": {"name": "first", "count": 1}}), 201)
    assert len(made["id"]) == 36 and made["forked_from"]["at_step"]["name"] == "first"


def test_fork_errors(client: TestClient, rt: af.Runtime, make_runtime: Any, tmp_path: Any) -> None:
    b = rt.workflow("blocked")
    b.create(id="o")
    b.create(id="taken")
    wait_for(lambda: b.get("o").status().status == "waiting")
    url = "/api/workflows/blocked/instances/o/fork"
    msg = fails(client.post(url, json={"at_step": "nope"}), 409, "InvalidInstanceState")
    assert "'blocked'" in msg and "'o'" in msg and "'nope'" in msg
    fails(
        client.post(url, json={"at_step": "first", "overrides": {"second": 1}}),
        409,
        "InvalidInstanceState",
    )
    fails(client.post(url, json={"at_step": "second", "id": "taken"}), 409, "InstanceAlreadyExists")
    fails(client.post(url, json={"at_step": "second", "id": "a b"}), 400, "InvalidInstanceId")
    fails(client.post(url, json={"at_step": "second", "id": 3}), 400, "InvalidInstanceId")
    null = {"Content-Type": "application/json"}
    fails(client.post(url, content=b"null", headers=null), 400, "ValidationError")
    for bad in (
        [],
        {},
        {"at_step": ""},
        {"at_step": 3},
        {"at_step": {"name": "first", "count": 0}},
        {"at_step": {"name": "first", "extra": 1}},
        {"at_step": "first", "overrides": [1]},
        {"at_step": "first", "force": True},
    ):
        fails(client.post(url, json=bad), 400, "ValidationError")
    fails(
        client.post("/api/workflows/blocked/instances/ghost/fork", json={"at_step": "first"}),
        404,
        "InstanceNotFound",
    )
    fails(client.post(url, content=b'{"at_step": "first"}'), 415, "UnsupportedMediaType")
    assert sorted(i.id for i in b.list()) == ["o", "taken"]  # nothing was made
    # Served without its class: a fork would never start.
    second = make_runtime(data_dir=str(tmp_path / "elsewhere"))
    second.unregistered("blocked", listed=True)
    with with_token(create_app(second)) as c:
        fails(c.post(url, json={"at_step": "first"}), 409, "WorkflowNotRegistered")
    second.close()


def test_openapi_describes_every_route(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.")
    app = client.app
    assert isinstance(app, Starlette)
    documented = {(p, m.upper()) for p, ops in schema["paths"].items() for m in ops}
    api_routes = {
        (r.path, m)
        for r in app.routes
        if isinstance(r, Route) and r.path.startswith("/api/")
        for m in (r.methods or ())
        if m != "HEAD"
    }
    assert api_routes and api_routes == documented
    for ops in schema["paths"].values():
        for op in ops.values():
            assert "200" in op["responses"] or "201" in op["responses"]
            assert "401" in op["responses"]
    refs = {s.rsplit("/", 1)[1] for s in _refs(schema)}
    assert refs <= set(schema["components"]["schemas"])


def _refs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "$ref":
                yield v
            else:
                yield from _refs(v)
    elif isinstance(node, list):
        for v in node:
            yield from _refs(v)


def test_metrics_uses_rt_metrics_when_present(
    client: TestClient, rt: af.Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    rt.workflow("blocked").create(id="m1")
    got = ok(client.get("/api/metrics"))
    assert got["source"] == "runtime"
    assert sum(got["metrics"]["workflows"]["blocked"]["counts"].values()) == 1
    assert ok(client.get("/api/workflows/blocked"))["total"] == 1

    monkeypatch.setattr(rt, "metrics", lambda: {"steps_per_s": 1.5, "at": None})
    assert ok(client.get("/api/metrics")) == {
        "source": "runtime",
        "metrics": {"steps_per_s": 1.5, "at": None},
    }
    assert ok(client.get("/api/workflows/blocked"))["total"] == 1  # counted by listing

    monkeypatch.setattr(rt, "metrics", None)  # a runtime without metrics
    got = ok(client.get("/api/metrics"))
    assert got["source"] == "counts"
    assert sum(got["metrics"]["instances_by_status"]["blocked"].values()) == 1


def test_values_that_are_not_json_are_shown_as_repr(rt: af.Runtime, journal: Journal) -> None:
    class Odd(af.Workflow):
        def run(self, event: af.WorkflowEvent, step: Any) -> Any:
            return step.do("odd", lambda: {1, 2}) and {"when": event.timestamp, "b": b"\x00"}

    rt.register(Odd, name="odd")
    inst = rt.workflow("odd").create(id="o")
    assert inst.wait(timeout=10).status == "complete"
    with with_token(create_app(rt)) as c:
        got = ok(c.get("/api/workflows/odd/instances/o"))
    assert got["output"]["b"] == "b'\\x00'"
    assert got["output"]["when"].endswith("+00:00")
    assert got["steps"][0]["output"] == [1, 2]


def test_dashboard_assets_and_mounting(rt: af.Runtime) -> None:
    rt.register(Blocked, name="blocked")
    inner = create_app(rt)
    outer = Starlette(routes=[Route("/", lambda r: None), Mount("/ops", app=inner)])
    with with_token(inner, outer) as c:
        page = c.get("/ops/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert 'src="dashboard/app.js"' in page.text
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]
        js = c.get("/ops/dashboard/app.js")
        assert js.status_code == 200 and "renderGantt" in js.text
        assert "http://" not in js.text and "https://" not in js.text  # nothing from the internet
        assert c.get("/ops/dashboard/style.css").status_code == 200
        assert [w["name"] for w in ok(c.get("/ops/api/workflows"))] == ["blocked"]


def test_workflows_found_only_in_storage_are_readable_and_controllable(
    make_runtime: Any, clock: FakeClock
) -> None:
    first = make_runtime()
    b = first.register(Blocked, name="blocked")
    for iid in ("u1", "u2"):
        b.create(id=iid, params={"who": iid})
    wait_for(lambda: all(b.get(i).status().status == "waiting" for i in ("u1", "u2")))
    first.close()

    second = make_runtime()  # the same directory; nothing registered
    with with_token(create_app(second)) as c:
        [row] = ok(c.get("/api/workflows"))
        assert row["name"] == "blocked" and row["registered"] is False
        assert row["counts"]["waiting"] == 2
        assert ok(c.get("/api/workflows/blocked"))["total"] == 2
        assert {r["id"] for r in ok(c.get("/api/workflows/blocked/instances"))} == {"u1", "u2"}
        got = ok(c.get("/api/workflows/blocked/instances/u1"))
        assert got["params"] == {"who": "u1"} and got["status"] == "waiting"
        assert [s["name"] for s in got["steps"]] == ["first", "second", "wait"]
        assert ok(c.get("/api/workflows/blocked/instances/u1/history"))[0]["type"] == (
            "WORKFLOW_QUEUED"
        )
        url = "/api/workflows/blocked/instances/u2/status"
        assert ok(c.patch(url, json={"status": "terminate"}))["status"] == "terminated"
        fails(c.get("/api/workflows/never-seen"), 404, "WorkflowNotFound")
        fails(c.get("/api/workflows/never-seen/instances"), 404, "WorkflowNotFound")
    second.close()

    third = make_runtime()
    b3 = third.register(Blocked, name="blocked")
    assert b3.get("u2").status().status == "terminated"
    b3.get("u1").send_event("go")
    assert b3.get("u1").wait(timeout=10).status == "complete"


def test_serving_a_directory_without_its_app_says_unregistered_and_refuses_creations(
    make_runtime: Any,
) -> None:
    first = make_runtime()
    first.register(Blocked, name="blocked").create(id="u1")
    first.close()
    # What `actorflow serve` does without --app: the stored workflows listed unregistered.
    second = make_runtime()
    second.unregistered("blocked", listed=True)
    with with_token(create_app(second)) as c:
        [row] = ok(c.get("/api/workflows"))
        assert row["name"] == "blocked" and row["registered"] is False
        url = "/api/workflows/blocked/instances"
        assert "--app" in fails(c.post(url, json={"id": "u2"}), 409, "WorkflowNotRegistered")
        fails(c.post(url, json=[{"id": "u3"}]), 409, "WorkflowNotRegistered")
        fails(c.post(url + "/batch", json=[{"id": "u4"}]), 409, "WorkflowNotRegistered")
        fails(c.get(url + "/u2"), 404, "InstanceNotFound")  # nothing written
        assert {r["id"] for r in ok(c.get(url))} == {"u1"}
    second.close()


def test_random_requests_conform_to_the_schema(make_runtime: Any) -> None:
    """Schemathesis: generated requests never get a 500, and every answer fits the schema."""
    runtime = make_runtime(sync=False)
    b = runtime.register(Blocked, name="blocked")
    b.create(id="known")
    app = create_app(runtime, token=None, allowed_hosts=["*"])  # the API, not its guards
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # The event stream lasts until the instance ends (it never does here):
    # tests/test_subscribe.py covers it.
    operations = [
        op
        for op in (r.ok() for r in schema.get_all_operations())
        if not op.path.endswith("/stream")
    ]
    assert len(operations) == 13
    seen: set[str] = set()

    @given(data=st.data())
    @settings(
        max_examples=150,
        deadline=None,
        database=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    def check(data: Any) -> None:
        op = data.draw(st.sampled_from(operations))
        case = data.draw(op.as_strategy())
        params = case.path_parameters or {}
        if "wf" in params and data.draw(st.booleans()):
            params["wf"] = "blocked"  # a real workflow, not only 404s
            if "id" in params and data.draw(st.booleans()):
                params["id"] = "known"
        seen.add(f"{case.method} {case.operation.path}")
        response = case.call_and_validate()
        if case.method == "DELETE" and response.status_code == 200:
            assert params == {"wf": "blocked", "id": "known"}
            with pytest.raises(af.InstanceNotFound):
                b.get("known")
            b.create(id="known")  # the operations drawn next still find it

    check()
    assert len(seen) >= 8, seen


def test_the_core_does_not_need_the_serve_extra() -> None:
    code = (
        "import sys\n"
        "import actorflow, actorflow.cli\n"
        "assert 'starlette' not in sys.modules and 'uvicorn' not in sys.modules\n"
        "sys.modules['starlette'] = None  # as if the extra were not installed\n"
        "try:\n"
        "    import actorflow.http\n"
        "except ImportError as e:\n"
        "    assert \"pip install 'actorflow[serve]'\" in str(e), e\n"
        "else:\n"
        "    raise SystemExit('imported without starlette')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
