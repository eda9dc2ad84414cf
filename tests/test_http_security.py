"""Security of the HTTP API: bind address, bearer token, JSON only, limits, no unpickling."""

from __future__ import annotations

import json
import pickle
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import wait_for
from starlette.testclient import TestClient

import actorflow as af
from actorflow.http import TOKEN_ENV, check_bind, create_app, make_server, serve, serving
from actorflow.http import app as http_app
from actorflow.workflows.records import EVENTS, FENCE, HIST, IDS, IDX, INST, STEPS, queue_db

TOKEN = "s3cret-token-for-tests"
WF = "/api/workflows/blocked/instances"


class Blocked(af.Workflow):
    """Runs one step, then waits for an event."""

    def run(self, event: af.WorkflowEvent, step: Any) -> Any:
        step.do("first", lambda: event.payload)
        return step.wait_for_event("wait", "go", timeout="1 day").payload


@pytest.fixture
def blocked(rt: af.Runtime) -> af.WorkflowBinding:
    b = rt.register(Blocked, name="blocked")
    inst = b.create(id="existing", params={"n": 1})
    wait_for(lambda: inst.status().status == "waiting")
    return b


def local(rt: af.Runtime, **options: Any) -> TestClient:
    """A client of a tokenless app, addressed to ``localhost`` (which it answers)."""
    return TestClient(create_app(rt, token=None, **options), base_url="http://localhost")


def snapshot(rt: af.Runtime) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every record the workflow engine keeps for workflow ``blocked``."""
    spaces = [IDS, INST, FENCE, IDX, STEPS, EVENTS, HIST, queue_db("blocked")]
    return {ks: rt.storage.scan(ks) for ks in spaces}


# (method, path, JSON body) of every mutating endpoint
MUTATIONS: list[tuple[str, str, Any]] = [
    ("POST", WF, {"id": "new-one", "params": {"n": 2}}),
    ("POST", WF, [{"id": "new-two"}]),
    ("POST", f"{WF}/batch", [{"id": "new-three"}]),
    ("POST", f"{WF}/existing/events/go", {"user": "mallory"}),
    ("PATCH", f"{WF}/existing/status", {"status": "pause"}),
    ("PATCH", f"{WF}/existing/status", {"status": "terminate"}),
    ("PATCH", f"{WF}/existing/status", {"status": "restart"}),
]
READS = [
    "/api/workflows",
    "/api/workflows/blocked",
    WF,
    f"{WF}/existing",
    f"{WF}/existing/history",
    "/api/metrics",
    "/api/schedules",
]


@pytest.mark.parametrize(
    "auth",
    [
        None,
        "Bearer wrong-token",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer ",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
    ],
    ids=["missing", "wrong", "basic", "no-scheme", "empty", "longer", "shorter"],
)
def test_bad_token_gets_401_and_changes_nothing(
    rt: af.Runtime, blocked: af.WorkflowBinding, auth: str | None
) -> None:
    before = snapshot(rt)
    headers = {} if auth is None else {"Authorization": auth}
    with TestClient(create_app(rt, token=TOKEN)) as c:
        for method, path, body in MUTATIONS:
            resp = c.request(method, path, json=body, headers=headers)
            assert resp.status_code == 401, (method, path, resp.text)
            assert resp.json()["errors"][0]["name"] == "Unauthorized"
            assert resp.headers["www-authenticate"].startswith("Bearer")
        for path in READS:
            assert c.get(path, headers=headers).status_code == 401, path
    rt.wait_until_idle()
    assert snapshot(rt) == before
    assert blocked.get("existing").status().status == "waiting"


def test_the_right_token_is_accepted(rt: af.Runtime, blocked: af.WorkflowBinding) -> None:
    good = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(rt, token=TOKEN)) as c:
        assert c.post(WF, json={"id": "made"}, headers=good).status_code == 201
        assert c.get(f"{WF}/made", headers=good).status_code == 200
        lower = {"Authorization": f"bearer {TOKEN}"}
        assert (
            c.patch(f"{WF}/existing/status", json={"status": "pause"}, headers=lower).status_code
            == 200
        )
        # the dashboard's page itself loads without the token; it asks for it
        assert c.get("/").status_code == 200
    assert blocked.get("made").status().status != "unknown"
    assert blocked.get("existing").status().status == "paused"


def test_the_token_is_compared_in_constant_time(
    rt: af.Runtime, blocked: af.WorkflowBinding, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = http_app.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(http_app.hmac, "compare_digest", spy)
    with TestClient(create_app(rt, token=TOKEN)) as c:
        c.post(WF, json={"id": "x"}, headers={"Authorization": "Bearer guess"})
    assert len(calls) == 1
    # both sides are digests of the same length, so timing does not reveal the length
    assert len(calls[0][0]) == len(calls[0][1]) == 32


def test_an_empty_token_is_refused(rt: af.Runtime) -> None:
    with pytest.raises(ValueError, match="empty"):
        create_app(rt, token="  ")


# -- create_app's defaults: what a service that mounts it gets --------------------------------


def test_create_app_by_default_needs_a_token_it_generates(
    rt: af.Runtime, blocked: af.WorkflowBinding, caplog: pytest.LogCaptureFixture
) -> None:
    """Mounted as the docs show, with no argument: no request without the token does anything,
    whatever host it is addressed to (a DNS-rebinding page's ``evil.example`` included)."""
    with caplog.at_level("WARNING", logger="actorflow.http"):
        app = create_app(rt)
    before = snapshot(rt)
    for base in ("http://evil.example", "http://127.0.0.1:8787", "http://localhost"):
        with TestClient(app, base_url=base) as c:
            for method, path, body in MUTATIONS:
                resp = c.request(method, path, json=body)
                assert resp.status_code == 401, (base, method, path, resp.text)
            for path in READS:
                assert c.get(path).status_code == 401, (base, path)
            assert c.get("/").status_code == 200  # the dashboard's page, which asks for it
    rt.wait_until_idle()
    assert snapshot(rt) == before
    token = app.state.token
    assert isinstance(token, str) and len(token) >= 32
    assert [r.getMessage().count(token) for r in caplog.records] == [1]  # logged once
    assert create_app(rt).state.token != token  # one per app
    with TestClient(
        app, base_url="http://ops.example.com", headers={"Authorization": f"Bearer {token}"}
    ) as c:
        assert c.post(WF, json={"id": "made"}).status_code == 201
        assert c.get(f"{WF}/made").status_code == 200
    assert blocked.get("made").status().status != "unknown"


def test_a_tokenless_app_answers_only_loopback_host_names(
    rt: af.Runtime, blocked: af.WorkflowBinding
) -> None:
    """``create_app(rt, token=None)``: a page whose own name resolves to 127.0.0.1 is refused."""
    app = create_app(rt, token=None)
    before = snapshot(rt)
    for host in ("evil.example", "evil.example:8787", "127.0.0.1.evil.example", "testserver"):
        with TestClient(app, base_url=f"http://{host}") as c:
            for method, path, body in MUTATIONS:
                resp = c.request(method, path, json=body)
                assert resp.status_code == 400, (host, method, path, resp.text)
            for path in [*READS, "/", "/openapi.json"]:
                assert c.get(path).status_code == 400, (host, path)
    rt.wait_until_idle()
    assert snapshot(rt) == before
    for host in ("localhost", "localhost:8787", "127.0.0.1:8787", "[::1]:8787"):
        with TestClient(app, base_url=f"http://{host}") as c:
            assert c.get("/api/workflows").status_code == 200, host
    with TestClient(app, base_url="http://localhost") as c:
        assert c.post(WF, json={"id": "local"}).status_code == 201
    assert app.state.token is None


def test_allowed_hosts_widen_or_narrow_the_host_check(
    rt: af.Runtime, blocked: af.WorkflowBinding
) -> None:
    with local(rt, allowed_hosts=["ops.example.com", "*.internal"]) as c:
        for host, code in [
            ("ops.example.com", 200),
            ("a.b.internal", 200),
            ("localhost", 400),
            ("evil.example", 400),
        ]:
            assert c.get("/api/workflows", headers={"Host": host}).status_code == code, host
    with TestClient(
        create_app(rt, token=None, allowed_hosts=["*"]), base_url="http://anything.example"
    ) as c:
        assert c.get("/api/workflows").status_code == 200
    # with a token, a Host check is still applied when asked for
    with TestClient(
        create_app(rt, token=TOKEN, allowed_hosts=["localhost"]),
        base_url="http://evil.example",
        headers={"Authorization": f"Bearer {TOKEN}"},
    ) as c:
        assert c.get("/api/workflows").status_code == 400


def test_create_app_refuses_bad_arguments(rt: af.Runtime) -> None:
    with pytest.raises(TypeError, match="token must be a str or None"):
        create_app(rt, token=12345)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="allowed_hosts is a list"):
        create_app(rt, token=None, allowed_hosts="localhost")


@pytest.mark.parametrize(
    "ctype",
    [
        None,
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/octet-stream",
        "application/python-pickle",
        "application/jsonx",
    ],
)
def test_only_json_bodies_are_accepted(
    rt: af.Runtime, blocked: af.WorkflowBinding, ctype: str | None
) -> None:
    before = snapshot(rt)
    headers = {} if ctype is None else {"Content-Type": ctype}
    with local(rt) as c:
        for method, path, body in MUTATIONS:
            resp = c.request(method, path, content=json.dumps(body).encode(), headers=headers)
            assert resp.status_code == 415, (method, path, resp.text)
            assert resp.json()["errors"][0]["name"] == "UnsupportedMediaType"
    rt.wait_until_idle()
    assert snapshot(rt) == before


def test_a_body_is_never_unpickled(
    rt: af.Runtime, blocked: af.WorkflowBinding, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> Any:
            return (Path.touch, (marker,))

    evil = pickle.dumps(Exploit())
    before = snapshot(rt)
    with local(rt) as c:
        for ctype in ("application/json", "application/octet-stream"):
            for method, path, _ in MUTATIONS:
                resp = c.request(method, path, content=evil, headers={"Content-Type": ctype})
                assert resp.status_code in (400, 415), resp.text
    assert not marker.exists()
    rt.wait_until_idle()
    assert snapshot(rt) == before


def test_a_string_that_looks_like_a_pickle_stays_a_string(
    rt: af.Runtime, blocked: af.WorkflowBinding
) -> None:
    text = pickle.dumps({"x": 1}).decode("latin-1")
    with local(rt) as c:
        assert c.post(WF, json={"id": "p", "params": text}).status_code == 201
        assert c.get(f"{WF}/p").json()["result"]["params"] == text


def test_input_limits_match_the_python_api(make_runtime: Any) -> None:
    runtime = make_runtime(limits=af.Limits(max_event_payload_bytes=1000))
    runtime.register(Blocked, name="blocked")
    with local(runtime) as c:
        assert c.post(WF, json={"id": "x" * 100}).status_code == 201
        for bad in ("x" * 101, "-lead", "sp ace", "dot.ted", "", "ü"):
            r = c.post(WF, json={"id": bad})
            assert r.status_code == 400 and r.json()["errors"][0]["name"] == "InvalidInstanceId"
        big = c.post(WF, json={"id": "big", "params": "x" * 2000})
        assert big.status_code == 400 and big.json()["errors"][0]["name"] == "LimitExceeded"
        huge = c.post(WF, json={"id": "huge", "params": "x" * 100_000})
        assert huge.status_code == 413
        nested = c.post(
            WF,
            content=b"[" * 100_000 + b"]" * 100_000,
            headers={"Content-Type": "application/json"},
        )
        assert nested.status_code == 413
        deep = c.post(
            WF,
            content=b'{"params": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            headers={"Content-Type": "application/json"},
        )
        assert deep.status_code == 400
        lying = c.post(
            WF, content=b"{}", headers={"Content-Type": "application/json", "Content-Length": "-1"}
        )
        assert lying.status_code in (400, 413)
    for iid in ("big", "huge"):
        with pytest.raises(af.InstanceNotFound):
            runtime.workflow("blocked").get(iid)


def test_serve_binds_loopback_by_default(rt: af.Runtime, blocked: af.WorkflowBinding) -> None:
    assert make_server(rt).config.host == "127.0.0.1"
    assert serve.__defaults__ == ("127.0.0.1", 8787, None)
    with serving(rt) as url:
        assert url.startswith("http://127.0.0.1:")
        port = int(url.rsplit(":", 1)[1])
        with urllib.request.urlopen(url + "/api/workflows") as r:
            assert json.load(r)["success"] is True
        ext = _external_ip()
        if ext is not None:  # not reachable on another interface
            with pytest.raises(OSError), socket.create_connection((ext, port), timeout=1):
                pass


def _external_ip() -> str | None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # no packet is sent
            ip: str = s.getsockname()[0]
    except OSError:
        return None
    return None if ip.startswith("127.") else ip


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_other_hosts_need_a_token(
    rt: af.Runtime, host: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    with pytest.raises(ValueError, match="without a token"):
        check_bind(host, None)
    with pytest.raises(ValueError, match="without a token"):
        serve(rt, host=host, port=_free_port())
    check_bind(host, TOKEN)
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    make_server(rt, host=host, port=0)  # the token from the environment is enough


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_hosts_need_no_token(host: str) -> None:
    check_bind(host, None)


def test_a_non_loopback_server_enforces_the_env_token(
    rt: af.Runtime, blocked: af.WorkflowBinding, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    before = snapshot(rt)
    with serving(rt, host="0.0.0.0") as url:
        url = url.replace("0.0.0.0", "127.0.0.1")
        req = urllib.request.Request(
            url + WF,
            data=b'{"id": "sneaky"}',
            method="POST",
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 401
        e.value.close()
        assert snapshot(rt) == before
        req.add_header("Authorization", f"Bearer {TOKEN}")
        with urllib.request.urlopen(req) as r:
            assert r.status == 201
    assert blocked.get("sneaky").status().status != "unknown"


def test_without_a_token_only_loopback_host_names_are_answered(
    rt: af.Runtime, blocked: af.WorkflowBinding
) -> None:
    """A page on another site resolving its name to 127.0.0.1 (DNS rebinding) is refused."""
    with serving(rt) as url:
        req = urllib.request.Request(url + "/api/workflows", headers={"Host": "evil.example"})
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 400
        e.value.close()
        for name in ("localhost", "127.0.0.1", "[::1]"):
            port = url.rsplit(":", 1)[1]
            req = urllib.request.Request(url + "/api/workflows", headers={"Host": f"{name}:{port}"})
            with urllib.request.urlopen(req) as r:
                assert r.status == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(autouse=True)
def _no_env_token(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    yield


def test_unexpected_errors_reveal_nothing(
    rt: af.Runtime,
    blocked: af.WorkflowBinding,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def boom(self: Any, *a: Any, **k: Any) -> Any:
        raise RuntimeError("secret detail from /etc/passwd")

    monkeypatch.setattr(af.WorkflowBinding, "get", boom)
    with local(rt) as c:
        resp = c.get(f"{WF}/existing")
    assert resp.status_code == 500
    assert resp.json()["errors"][0]["name"] == "InternalError"
    assert "secret" not in resp.text
    assert "secret detail" in caplog.text  # but the server's log has it
