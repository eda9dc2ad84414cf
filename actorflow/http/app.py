"""The ASGI application: the workflows REST API, its OpenAPI schema and the dashboard.

Responses use Cloudflare's envelope (see :mod:`actorflow.http.envelope`).
Runtime calls block (they return once their writes are durable), so handlers
run them in Starlette's thread pool and the event loop stays free.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from importlib import resources
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from actorflow.core.errors import InstanceNotFound
from actorflow.http.envelope import (
    BODY_SLACK,
    ApiError,
    SecurityHeaders,
    envelope,
    error_of,
    error_response,
    int_param,
    read_json,
    time_param,
)
from actorflow.http.openapi import openapi_schema
from actorflow.http.views import (
    instance_summary,
    instance_view,
    jsonable,
    sse_message,
    workflow_counts,
)
from actorflow.runtime import Runtime
from actorflow.workflows.definition import STATUSES, validate_instance_id
from actorflow.workflows.handles import Instance, WorkflowBinding
from actorflow.workflows.query import history_document, schedule_document

if TYPE_CHECKING:
    from actorflow.workflows.history import HistoryEvent

__all__ = ["LOOPBACK_HOSTS", "ApiError", "create_app"]

log = logging.getLogger("actorflow.http")

#: Instances one batch request may create (Cloudflare's ``createBatch`` cap).
MAX_BATCH = 100
#: Instances one list page may hold.
MAX_PAGE = 1000
ACTIONS = ("pause", "resume", "terminate", "restart")
#: The host names a tokenless app answers by default (``[::1]`` is how a Host header
#: writes ``::1``).
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
_ASSETS = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/dashboard/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/dashboard/style.css": ("style.css", "text/css; charset=utf-8"),
}


Handler = Callable[[Request], Awaitable[Response]]


class _Token(enum.Enum):
    """The default of ``create_app(token=...)``: a token made for the app."""

    GENERATE = "generate"

    def __repr__(self) -> str:
        return "<generated>"


class _Api:
    """The handlers, bound to one runtime and one token."""

    def __init__(self, rt: Runtime, token: str | None) -> None:
        self.rt = rt
        self._token_digest = None if token is None else hashlib.sha256(token.encode()).digest()
        self._lock = threading.Lock()
        self._unregistered: dict[str, WorkflowBinding] = {}

    # -- plumbing -----------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        """True if no token is configured, or the request carries it (constant time)."""
        if self._token_digest is None:
            return True
        scheme, _, cred = request.headers.get("authorization", "").partition(" ")
        given = hashlib.sha256(cred.strip().encode()).digest()
        return scheme.lower() == "bearer" and hmac.compare_digest(given, self._token_digest)

    def endpoint(self, fn: Handler) -> Handler:
        """Wraps a handler with the token check and the error envelope."""

        async def wrapped(request: Request) -> Response:
            if not self.authorized(request):
                return error_response(401, "Unauthorized", "a valid bearer token is required")
            try:
                return await fn(request)
            except Exception as exc:
                err = error_of(exc)
                return error_response(err.status, err.name, err.message)

        wrapped.__name__ = fn.__name__
        wrapped.__doc__ = fn.__doc__
        return wrapped

    def runtime_metrics(self) -> Any:
        """``rt.metrics()``, or None for a runtime without it."""
        fn = getattr(self.rt, "metrics", None)
        return fn() if callable(fn) else None

    def workflow_names(self) -> dict[str, bool]:
        """Every workflow to show, registered or only found in storage -> registered."""
        # A binding from rt.unregistered(name, listed=True) is listed among
        # rt.workflows, but nothing of it runs here.
        names = {
            n: bool(getattr(self.rt.workflow(n), "registered", True)) for n in self.rt.workflows
        }
        by_wf = getattr(self.runtime_metrics(), "workflows", None)
        if isinstance(by_wf, dict) and callable(getattr(self.rt, "unregistered", None)):
            for name in by_wf:
                names.setdefault(name, False)
        return names

    def binding_named(self, name: str) -> WorkflowBinding:
        """The binding of workflow ``name``: registered, or one found in storage only.

        A workflow with instances in the data directory but no class registered
        in this process is still readable and controllable (``rt.unregistered``).
        """
        if name in self.rt.workflows:
            return self.rt.workflow(name)
        with self._lock:
            found = self._unregistered.get(name)
            if found is None:
                if name not in self.workflow_names():
                    raise ApiError(404, "WorkflowNotFound", f"no workflow {name!r}")
                found = self._unregistered[name] = self.rt.unregistered(name)
            return found

    async def binding(self, request: Request) -> WorkflowBinding:
        """The binding of the request's ``{wf}`` (404 WorkflowNotFound if none)."""
        return await run_in_threadpool(self.binding_named, request.path_params["wf"])

    def instance(self, request: Request) -> tuple[WorkflowBinding, Instance]:
        """The request's ``{wf}`` and instance ``{id}`` (404 InstanceNotFound if none)."""
        b = self.binding_named(request.path_params["wf"])
        return b, b.get(request.path_params["id"])

    def check_runs(self, binding: WorkflowBinding) -> None:
        """Refuses to create instances that nothing serving here would ever start."""
        if not getattr(binding, "registered", True):
            raise ApiError(
                409,
                "WorkflowNotRegistered",
                f"workflow {binding.name!r} has no class registered in the serving runtime, so "
                "an instance created here would never start; serve the data with its app "
                "(actorflow serve --app package.module:factory)",
            )

    def body_limit(self, binding: WorkflowBinding) -> int:
        """The largest body accepted: the workflow's payload limit plus framing."""
        return self.rt.limits.for_workflow(binding.name).max_event_payload_bytes + BODY_SLACK

    # -- handlers -------------------------------------------------------------------

    def counts(self, names: list[str]) -> dict[str, dict[str, int]]:
        """Counts by status of workflows ``names``.

        From ``rt.metrics()`` (kept up to date, O(workflows)) when the runtime
        has it, else by listing every instance.
        """
        by_wf = getattr(self.runtime_metrics(), "workflows", None)
        out = {}
        for name in names:
            wm = by_wf.get(name) if isinstance(by_wf, dict) else None
            if wm is not None and isinstance(getattr(wm, "counts", None), dict):
                raw = wm.counts
                out[name] = {s: int(raw.get(s, 0)) for s in STATUSES if s != "unknown"}
            else:
                out[name] = workflow_counts(self.binding_named(name))
        return out

    def workflow_rows(self, only: str | None = None) -> list[dict[str, Any]]:
        """The rows of ``GET /api/workflows`` (of workflow ``only``, if given)."""
        names = self.workflow_names()
        if only is not None:
            names = {only: names.get(only, False)}
        counts = self.counts(list(names))
        return [
            {"name": n, "registered": names[n], "counts": c, "total": sum(c.values())}
            for n, c in counts.items()
        ]

    async def list_workflows(self, request: Request) -> Response:
        """Every workflow (registered, or with instances in storage) with counts by status."""
        return envelope(await run_in_threadpool(self.workflow_rows))

    async def get_workflow(self, request: Request) -> Response:
        """One workflow with its instance counts by status."""
        b = await self.binding(request)
        [row] = await run_in_threadpool(self.workflow_rows, b.name)
        return envelope(row)

    async def list_instances(self, request: Request) -> Response:
        """A page of a workflow's instances, newest first."""
        b = await self.binding(request)
        q = request.query_params
        status = q.get("status") or None
        if status is not None and status not in STATUSES:
            raise ApiError(400, "ValidationError", f"unknown status {status!r}")
        limit = int_param(q.get("limit"), "limit", default=50, lo=1, hi=MAX_PAGE)
        cursor = q.get("cursor") or None
        if cursor is not None:
            validate_instance_id(cursor, b.name)
        after = time_param(q.get("created_after"), "created_after")

        def work() -> tuple[list[dict[str, Any]], str | None]:
            if cursor is not None:
                try:
                    b.get(cursor)
                except InstanceNotFound as e:
                    raise InstanceNotFound(f"cursor: {e}", workflow=b.name, instance=cursor)
            if after is None:
                page = b.list(status=status, limit=limit + 1, cursor=cursor)
            else:
                page = b.list(status=status, limit=limit + 1, cursor=cursor, created_after=after)
            more = len(page) > limit
            page = page[:limit]
            rows = [instance_summary(b, i) for i in page]
            return rows, (page[-1].id if more and page else None)

        rows, next_cursor = await run_in_threadpool(work)
        return envelope(rows, result_info={"count": len(rows), "cursor": next_cursor})

    async def create_instance(self, request: Request) -> Response:
        """Creates one instance (``{"id"?, "params"?, "key"?, "priority"?}``) or, given a
        list, a batch."""
        b = await self.binding(request)
        self.check_runs(b)
        body = await read_json(request, self.body_limit(b))
        if isinstance(body, list):
            return await self._create_batch(b, body)
        item = _create_item({} if body is None else body)

        def work() -> dict[str, Any]:
            inst = b.create(
                id=item["id"], params=item["params"], key=item["key"], priority=item["priority"]
            )
            return {"id": inst.id, "workflow": b.name, "status": inst.status().status}

        return envelope(await run_in_threadpool(work), status=201)

    async def create_batch(self, request: Request) -> Response:
        """Creates many instances; ids that already exist are skipped."""
        b = await self.binding(request)
        self.check_runs(b)
        body = await read_json(request, self.body_limit(b))
        if not isinstance(body, list):
            raise ApiError(400, "ValidationError", "the body must be a JSON array of instances")
        return await self._create_batch(b, body)

    async def _create_batch(self, b: WorkflowBinding, body: list[Any]) -> Response:
        if not body:
            raise ApiError(400, "ValidationError", "a batch needs at least one instance")
        if len(body) > MAX_BATCH:
            raise ApiError(
                400,
                "LimitExceeded",
                f"a batch holds at most {MAX_BATCH} instances, not {len(body)}",
            )
        items = [_create_item(x) for x in body]

        def work() -> list[dict[str, Any]]:
            made = b.create_batch(items)
            return [{"id": i.id, "workflow": b.name, "status": "queued"} for i in made]

        return envelope(await run_in_threadpool(work), status=201)

    async def get_instance(self, request: Request) -> Response:
        """An instance: status, params, output, error, times and steps with attempts."""

        def work() -> dict[str, Any]:
            b, inst = self.instance(request)
            return instance_view(b, inst)

        return envelope(await run_in_threadpool(work))

    async def get_history(self, request: Request) -> Response:
        """An instance's event log, oldest first."""

        def work() -> list[dict[str, Any]]:
            _b, inst = self.instance(request)
            return history_document(inst.history())

        return envelope(await run_in_threadpool(work))

    async def stream_history(self, request: Request) -> Response:
        """The history, then the live events, as Server-Sent Events, until the instance ends.

        Each message is ``id: <cursor>``, ``event: <type>``, ``data: <the event
        as JSON>``. A reconnecting client resumes after the event its
        ``Last-Event-ID`` header (or the ``cursor`` query parameter) names;
        ``types`` (comma-separated) keeps only those event types.
        """
        cursor = request.headers.get("last-event-id") or request.query_params.get("cursor")
        raw_types = request.query_params.get("types")
        types = [t for t in raw_types.split(",") if t.strip()] if raw_types else None

        def open_stream() -> AsyncIterator[HistoryEvent]:
            _b, inst = self.instance(request)
            return inst.subscribe_async(cursor=cursor or None, types=types)

        # Opened before the response starts: a bad cursor or id gets its error envelope.
        events = await run_in_threadpool(open_stream)

        async def body() -> AsyncIterator[str]:
            try:
                async for e in events:
                    yield sse_message(e)
            finally:
                close = getattr(events, "aclose", None)
                if close is not None:
                    await close()

        return StreamingResponse(
            body(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def send_event(self, request: Request) -> Response:
        """Sends an event of type ``{type}``; the JSON body is its payload."""
        b = await self.binding(request)
        payload = await read_json(request, self.body_limit(b))
        event_type = request.path_params["type"]

        def work() -> dict[str, Any]:
            inst = b.get(request.path_params["id"])
            inst.send_event(event_type, payload)
            return {"id": inst.id, "type": event_type, "status": inst.status().status}

        return envelope(await run_in_threadpool(work))

    async def change_status(self, request: Request) -> Response:
        """Pauses, resumes, terminates or restarts an instance."""
        b = await self.binding(request)
        body = await read_json(request, BODY_SLACK)
        if not isinstance(body, dict) or body.get("status") not in ACTIONS:
            raise ApiError(
                400, "ValidationError", f'the body must be {{"status": one of {list(ACTIONS)}}}'
            )
        unknown = set(body) - {"status", "from_step", "rollback"}
        if unknown:
            raise ApiError(400, "ValidationError", f"unknown fields {sorted(unknown)}")
        action, from_step = body["status"], body.get("from_step")
        if from_step is not None and (action != "restart" or not isinstance(from_step, str)):
            raise ApiError(400, "ValidationError", "from_step is a step name, only for restart")
        rollback = body.get("rollback", False)
        if rollback is not False and (action != "terminate" or rollback is not True):
            # Cloudflare's local explorer refuses it for pause, resume and restart too.
            raise ApiError(400, "ValidationError", "rollback is true or false, only for terminate")

        def work() -> dict[str, Any]:
            inst = b.get(request.path_params["id"])
            if action == "restart":
                inst.restart(from_step=from_step)
            elif action == "terminate":
                inst.terminate(rollback=rollback)
            else:
                getattr(inst, action)()
            return {"id": inst.id, "status": inst.status().status}

        return envelope(await run_in_threadpool(work))

    async def fork_instance(self, request: Request) -> Response:
        """Forks an instance: a new one that replays its steps before ``at_step``.

        The body is ``{"at_step", "id"?, "params"?, "overrides"?}`` (see
        ``Instance.fork``); the answer (201) is the new instance, with where
        it comes from.
        """
        b = await self.binding(request)
        self.check_runs(b)
        body = await read_json(request, self.body_limit(b))
        item = _fork_item(body)

        def work() -> dict[str, Any]:
            fork = b.get(request.path_params["id"]).fork(
                item["at_step"], id=item["id"], params=item["params"], overrides=item["overrides"]
            )
            d = fork.describe()
            return {
                "id": fork.id,
                "workflow": b.name,
                "status": d.status,
                "forked_from": d.forked_from,
            }

        return envelope(await run_in_threadpool(work), status=201)

    async def delete_instance(self, request: Request) -> Response:
        """Deletes an instance and every record of it; its id can then be created again.

        A live run is stopped first, without rollbacks. Like every change, the
        request must say ``Content-Type: application/json``; the body is
        empty or ``null``.
        """
        b = await self.binding(request)
        body = await read_json(request, BODY_SLACK)
        if body is not None:
            raise ApiError(400, "ValidationError", "the body of a DELETE is empty or null")

        def work() -> dict[str, Any]:
            inst = b.get(request.path_params["id"])
            inst.delete()
            return {"id": inst.id, "deleted": True}

        return envelope(await run_in_threadpool(work))

    async def list_schedules(self, request: Request) -> Response:
        """The cron schedules (of ``?workflow=``, if given), with their next tick."""
        workflow = request.query_params.get("workflow") or None

        def work() -> list[dict[str, Any]]:
            return [schedule_document(s) for s in self.rt.schedules(workflow)]

        return envelope(await run_in_threadpool(work))

    async def get_metrics(self, request: Request) -> Response:
        """The runtime's metrics (``rt.metrics()``), or counts by status without it."""

        def work() -> dict[str, Any]:
            found = self.runtime_metrics()
            if found is not None:
                return {"source": "runtime", "metrics": jsonable(found)}
            counts = self.counts(self.rt.workflows)
            return {"source": "counts", "metrics": {"instances_by_status": counts}}

        return envelope(await run_in_threadpool(work))


def _create_item(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(
            400,
            "ValidationError",
            'an instance is a JSON object {"id"?, "params"?, "key"?, "priority"?}',
        )
    unknown = set(body) - {"id", "instance_id", "params", "key", "priority"}
    if unknown:
        raise ApiError(400, "ValidationError", f"unknown fields {sorted(unknown)}")
    iid = body.get("id", body.get("instance_id"))
    if iid is not None and not isinstance(iid, str):
        raise ApiError(400, "InvalidInstanceId", f"an instance id is a string, not {iid!r}")
    # key and priority are checked by create (InvalidFlowControl: a 400). JSON has no
    # int type: 3.0 is the integer 3 (as JSON Schema's "integer" says), 3.5 is refused.
    priority = body.get("priority")
    if isinstance(priority, float) and priority.is_integer():
        priority = int(priority)
    return {
        "id": iid,
        "params": body.get("params"),
        "key": body.get("key"),
        "priority": priority,
    }


def _fork_item(body: Any) -> dict[str, Any]:
    shape = '{"at_step": name or {"name", "count"}, "id"?, "params"?, "overrides"?}'
    if not isinstance(body, dict) or "at_step" not in body:
        raise ApiError(400, "ValidationError", f"the body must be a JSON object {shape}")
    unknown = set(body) - {"at_step", "id", "params", "overrides"}
    if unknown:
        raise ApiError(400, "ValidationError", f"unknown fields {sorted(unknown)}")
    at_step = body["at_step"]
    if isinstance(at_step, dict):
        count = at_step.get("count", 1)
        if (
            set(at_step) - {"name", "count"}
            or not isinstance(at_step.get("name"), str)
            or isinstance(count, bool)
            or not isinstance(count, int)
            or count < 1
        ):
            raise ApiError(
                400, "ValidationError", 'at_step is a step name or {"name": str, "count": int >= 1}'
            )
    elif not isinstance(at_step, str) or not at_step:
        raise ApiError(400, "ValidationError", "at_step is a step name (or {name, count})")
    iid = body.get("id")
    if iid is not None and not isinstance(iid, str):
        raise ApiError(400, "InvalidInstanceId", f"an instance id is a string, not {iid!r}")
    overrides = body.get("overrides")
    if overrides is not None and not isinstance(overrides, dict):
        raise ApiError(400, "ValidationError", "overrides is an object {step name: output}")
    return {"at_step": at_step, "id": iid, "params": body.get("params"), "overrides": overrides}


def _asset(name: str) -> bytes:
    return (resources.files("actorflow") / "dashboard" / name).read_bytes()


def create_app(
    rt: Runtime,
    *,
    token: str | _Token | None = _Token.GENERATE,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """Returns the ASGI app serving the API, its OpenAPI schema and the dashboard.

    Mount it in any ASGI service (``Mount("/actorflow", app=create_app(rt,
    token=...))``) or run it with :func:`actorflow.http.serve`. It is safe as
    made: every ``/api`` request needs a bearer token, or, with
    ``token=None``, the app answers only requests addressed to a loopback
    host name, so that no web page can drive it (DNS rebinding). The token
    is ``app.state.token``.

    Args:
        rt: The runtime whose workflows the app exposes: those registered,
            and those with instances in its data directory (readable and
            controllable, though they do not run in this process).
        token: Every ``/api`` request, reads included, must carry
            ``Authorization: Bearer <token>``; others get 401 and change
            nothing. Not given: a random token is made for this app and
            logged once (warning level) on the ``actorflow.http`` logger; pass
            your own (from a secret) to choose it. ``None``: no token, which
            is safe only on a loopback address (as ``serve`` does) or behind
            your own authentication.
        allowed_hosts: The ``Host`` names answered (Starlette's
            ``TrustedHostMiddleware``: ``"*.example.com"`` patterns, ``"*"``
            for any); others get 400. Default: any host with a token, and
            only :data:`LOOPBACK_HOSTS` without one.

    Raises:
        TypeError: ``token`` is neither a str nor None, or ``allowed_hosts``
            is a single str.
        ValueError: ``token`` is empty or blank.
    """
    if token is _Token.GENERATE:
        token = secrets.token_urlsafe(32)
        log.warning(
            "create_app() was given no token, so this app's API needs the one it generated: "
            "%s (send 'Authorization: Bearer <token>'; the dashboard asks for it). Pass "
            "token=... to choose it, or token=None to serve without one to loopback host "
            "names only.",
            token,
        )
    if token is not None and not isinstance(token, str):
        raise TypeError(f"the API token must be a str or None, not {type(token).__name__}")
    if token is not None and not token.strip():
        raise ValueError("the API token must not be empty")
    if isinstance(allowed_hosts, str):
        raise TypeError("allowed_hosts is a list of host names, not one str")
    if allowed_hosts is None and token is None:
        # Without a token the Host check is the only guard against a page whose
        # own name resolves to 127.0.0.1 (DNS rebinding): keep it to loopback names.
        allowed_hosts = LOOPBACK_HOSTS
    api = _Api(rt, token)
    ep = api.endpoint
    base = "/api/workflows/{wf}/instances"
    routes = [
        Route("/api/workflows", ep(api.list_workflows), methods=["GET"]),
        Route("/api/workflows/{wf}", ep(api.get_workflow), methods=["GET"]),
        Route(base, ep(api.list_instances), methods=["GET"]),
        Route(base, ep(api.create_instance), methods=["POST"]),
        Route(base + "/batch", ep(api.create_batch), methods=["POST"]),
        Route(base + "/{id}", ep(api.get_instance), methods=["GET"]),
        Route(base + "/{id}", ep(api.delete_instance), methods=["DELETE"]),
        Route(base + "/{id}/history", ep(api.get_history), methods=["GET"]),
        Route(base + "/{id}/history/stream", ep(api.stream_history), methods=["GET"]),
        Route(base + "/{id}/events/{type}", ep(api.send_event), methods=["POST"]),
        Route(base + "/{id}/status", ep(api.change_status), methods=["PATCH"]),
        Route(base + "/{id}/fork", ep(api.fork_instance), methods=["POST"]),
        Route("/api/metrics", ep(api.get_metrics), methods=["GET"]),
        Route("/api/schedules", ep(api.list_schedules), methods=["GET"]),
    ]
    schema = openapi_schema([(r.path, sorted(r.methods or ())) for r in routes])

    async def openapi(request: Request) -> Response:
        return JSONResponse(schema)

    def asset(path: str) -> Handler:
        name, media = _ASSETS[path]

        async def serve_asset(request: Request) -> Response:
            return Response(_asset(name), media_type=media, headers={"Cache-Control": "no-cache"})

        return serve_asset

    routes.append(Route("/openapi.json", openapi, methods=["GET"]))
    routes += [Route(p, asset(p), methods=["GET"]) for p in _ASSETS]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        name = {404: "NotFound", 405: "MethodNotAllowed"}.get(exc.status_code, "HTTPError")
        return error_response(exc.status_code, name, str(exc.detail))

    middleware = [Middleware(SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(
            Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts), www_redirect=False)
        )
    app = Starlette(
        routes=routes, middleware=middleware, exception_handlers={HTTPException: http_error}
    )
    app.state.token = token
    return app
