"""The OpenAPI 3.1 description of the HTTP API.

Each route of the app must have an entry in :data:`OPERATIONS`; building the
schema fails on a route without one, so the schema cannot fall behind the app.
"""

from __future__ import annotations

from typing import Any

from actorflow.workflows.definition import STATUSES

__all__ = ["OPERATIONS", "openapi_schema"]

_ID = {"type": "string", "maxLength": 100, "pattern": "^[a-zA-Z0-9_][a-zA-Z0-9-_]*$"}
_EVENT_TYPE = {"type": "string", "maxLength": 100, "pattern": "^[a-zA-Z0-9_][a-zA-Z0-9-_]*$"}
_STATUS = {"type": "string", "enum": [s for s in STATUSES]}
_ANY: dict[str, Any] = {}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _path(name: str, schema: dict[str, Any], doc: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": doc}


def _query(name: str, schema: dict[str, Any], doc: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": doc}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _ok(result: dict[str, Any], doc: str, status: str = "200") -> dict[str, Any]:
    env = {"allOf": [_ref("Envelope"), {"type": "object", "properties": {"result": result}}]}
    return {status: {"description": doc, **_json(env)}}


def _errors(*codes: int) -> dict[str, Any]:
    docs = {
        400: "Invalid input: InvalidInstanceId, ValidationError, SerializationError, LimitExceeded",
        401: "Unauthorized: a token is configured and the request lacks it",
        404: "WorkflowNotFound or InstanceNotFound",
        409: "InstanceAlreadyExists, InvalidInstanceState or WorkflowNotRegistered",
        413: "LimitExceeded: the body is larger than the payload limit",
        415: "UnsupportedMediaType: the body is not application/json",
        429: "RateLimitError: the workflow's queue is full",
    }
    return {str(c): {"description": docs[c], **_json(_ref("ErrorEnvelope"))} for c in (401, *codes)}


_WF = _path("wf", {"type": "string"}, "The workflow's registered name.")
_IID = _path("id", _ID, "The instance id.")
_MUTATING = (400, 404, 413, 415)

#: The operations of the API, keyed by (path, method).
OPERATIONS: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/workflows", "GET"): {
        "summary": "List the workflows (registered, or found in storage) with counts by status",
        "operationId": "listWorkflows",
        "responses": {
            **_ok({"type": "array", "items": _ref("Workflow")}, "The workflows"),
            **_errors(),
        },
    },
    ("/api/workflows/{wf}", "GET"): {
        "summary": "Get a workflow with its instance counts by status",
        "operationId": "getWorkflow",
        "parameters": [_WF],
        "responses": {**_ok(_ref("Workflow"), "The workflow"), **_errors(404)},
    },
    ("/api/workflows/{wf}/instances", "GET"): {
        "summary": "List a workflow's instances, newest first",
        "operationId": "listInstances",
        "parameters": [
            _WF,
            _query("status", _STATUS, "Only instances of this status."),
            _query(
                "limit",
                {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
                "The most instances to return.",
            ),
            _query("cursor", _ID, "result_info.cursor of the previous page."),
            _query(
                "created_after",
                {"type": "string", "pattern": "^[0-9]{1,15}$"},
                "Only instances created after this time, in epoch milliseconds (an ISO "
                "8601 time with a UTC offset is accepted too).",
            ),
        ],
        "responses": {
            "200": {
                "description": "A page of instances; result_info.cursor is the next page",
                **_json(
                    {
                        "allOf": [
                            _ref("Envelope"),
                            {
                                "type": "object",
                                "properties": {
                                    "result": {"type": "array", "items": _ref("InstanceSummary")},
                                    "result_info": {
                                        "type": "object",
                                        "properties": {
                                            "count": {"type": "integer"},
                                            "cursor": {"type": ["string", "null"]},
                                        },
                                    },
                                },
                            },
                        ]
                    }
                ),
            },
            **_errors(400, 404),
        },
    },
    ("/api/workflows/{wf}/instances", "POST"): {
        "summary": "Create an instance (or, with an array body, a batch)",
        "operationId": "createInstance",
        "parameters": [_WF],
        "requestBody": {
            "required": True,
            **_json(
                {
                    "oneOf": [
                        _ref("CreateInstance"),
                        {
                            "type": "array",
                            "items": _ref("CreateInstance"),
                            "minItems": 1,
                            "maxItems": 100,
                        },
                    ]
                }
            ),
        },
        "responses": {
            **_ok(
                {"oneOf": [_ref("Created"), {"type": "array", "items": _ref("Created")}]},
                "Created (durably queued)",
                "201",
            ),
            **_errors(*_MUTATING, 409, 429),
        },
    },
    ("/api/workflows/{wf}/instances/batch", "POST"): {
        "summary": "Create up to 100 instances; ids that already exist are skipped",
        "operationId": "createInstanceBatch",
        "parameters": [_WF],
        "requestBody": {
            "required": True,
            **_json(
                {"type": "array", "items": _ref("CreateInstance"), "minItems": 1, "maxItems": 100}
            ),
        },
        "responses": {
            **_ok({"type": "array", "items": _ref("Created")}, "The instances created", "201"),
            **_errors(*_MUTATING, 429),
        },
    },
    ("/api/workflows/{wf}/instances/{id}", "GET"): {
        "summary": "Get an instance's status, params, output, error and steps with attempts",
        "operationId": "getInstance",
        "parameters": [_WF, _IID],
        "responses": {**_ok(_ref("InstanceDetails"), "The instance"), **_errors(400, 404)},
    },
    ("/api/workflows/{wf}/instances/{id}", "DELETE"): {
        "summary": "Delete an instance and every record of it; its id can be created again",
        "description": (
            "A live run is stopped first, without rollbacks. Like every change, the request "
            "must say `Content-Type: application/json`; the body is `null` or empty."
        ),
        "operationId": "deleteInstance",
        "parameters": [_WF, _IID],
        "requestBody": {
            "required": True,
            "description": "null; an empty body is taken too (the Content-Type is what counts)",
            **_json({"type": "null"}),
        },
        "responses": {
            **_ok(
                {
                    "type": "object",
                    "required": ["id", "deleted"],
                    "properties": {"id": {"type": "string"}, "deleted": {"const": True}},
                },
                "The instance and its records are gone",
            ),
            **_errors(*_MUTATING),
        },
    },
    ("/api/workflows/{wf}/instances/{id}/history", "GET"): {
        "summary": "Get an instance's event log, oldest first",
        "operationId": "getInstanceHistory",
        "parameters": [_WF, _IID],
        "responses": {
            **_ok({"type": "array", "items": _ref("HistoryEvent")}, "The events"),
            **_errors(400, 404),
        },
    },
    ("/api/workflows/{wf}/instances/{id}/history/stream", "GET"): {
        "summary": "Stream an instance's history, then its live events, as Server-Sent Events",
        "description": (
            "Each message has `id` (the event's cursor), `event` (its type) and `data` (the "
            "event as JSON, with its `cursor`). The stream ends once the instance is complete, "
            "errored or terminated. A client that reconnects with `Last-Event-ID` (or "
            "`cursor`) resumes right after that event."
        ),
        "operationId": "streamInstanceHistory",
        "parameters": [
            _WF,
            _IID,
            _query("cursor", {"type": "string"}, "Resume after the event of this cursor."),
            _query(
                "types",
                {"type": "string"},
                "Comma-separated event types to keep (default: all).",
            ),
            {
                "name": "Last-Event-ID",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "As `cursor`; sent by a reconnecting EventSource.",
            },
        ],
        "responses": {
            "200": {
                "description": "The events, as they are committed",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            },
            **_errors(400, 404),
        },
    },
    ("/api/workflows/{wf}/instances/{id}/events/{type}", "POST"): {
        "summary": "Send an event to an instance; the JSON body is its payload",
        "operationId": "sendEvent",
        "parameters": [_WF, _IID, _path("type", _EVENT_TYPE, "The event type.")],
        "requestBody": {
            "required": True,
            "description": "The payload; null for none",
            **_json(_ANY),
        },
        "responses": {
            **_ok(
                {
                    "type": "object",
                    "properties": {
                        "id": {"type": "string"},
                        "type": {"type": "string"},
                        "status": _STATUS,
                    },
                },
                "The event is durably buffered",
            ),
            **_errors(*_MUTATING, 409),
        },
    },
    ("/api/workflows/{wf}/instances/{id}/status", "PATCH"): {
        "summary": "Pause, resume, terminate or restart an instance",
        "operationId": "changeInstanceStatus",
        "parameters": [_WF, _IID],
        "requestBody": {
            "required": True,
            **_json(
                {
                    "oneOf": [
                        {
                            "type": "object",
                            "required": ["status"],
                            "additionalProperties": False,
                            "properties": {
                                "status": {
                                    "type": "string",
                                    "enum": ["pause", "resume"],
                                }
                            },
                        },
                        {
                            "type": "object",
                            "required": ["status"],
                            "additionalProperties": False,
                            "properties": {
                                "status": {"const": "terminate"},
                                "rollback": {
                                    "type": "boolean",
                                    "description": "Run the rollback handlers of the "
                                    "completed steps first",
                                },
                            },
                        },
                        {
                            "type": "object",
                            "required": ["status"],
                            "additionalProperties": False,
                            "properties": {
                                "status": {"const": "restart"},
                                "from_step": {
                                    "type": "string",
                                    "minLength": 1,
                                    "maxLength": 256,
                                    "pattern": "^[^\\x00-\\x1f]*$",
                                    "description": "Keep the steps before this one",
                                },
                            },
                        },
                    ]
                }
            ),
        },
        "responses": {
            **_ok(
                {"type": "object", "properties": {"id": {"type": "string"}, "status": _STATUS}},
                "The status after the change",
            ),
            **_errors(*_MUTATING, 409),
        },
    },
    ("/api/workflows/{wf}/instances/{id}/fork", "POST"): {
        "summary": "Fork an instance: a new one that replays its steps before at_step",
        "description": (
            "The new instance keeps the completed steps that started before `at_step` (with "
            "`overrides` replacing their outputs), runs `at_step` and every later step anew, "
            "and names its origin in `forked_from`. The origin is not changed."
        ),
        "operationId": "forkInstance",
        "parameters": [_WF, _IID],
        "requestBody": {"required": True, **_json(_ref("ForkInstance"))},
        "responses": {
            **_ok(_ref("Forked"), "The fork (durably queued)", "201"),
            **_errors(*_MUTATING, 409, 429),
        },
    },
    ("/api/metrics", "GET"): {
        "summary": "The runtime's metrics",
        "operationId": "getMetrics",
        "responses": {
            **_ok(
                {
                    "type": "object",
                    "properties": {
                        "source": {"type": "string", "enum": ["runtime", "counts"]},
                        "metrics": {"type": "object"},
                    },
                },
                "Metrics",
            ),
            **_errors(),
        },
    },
    ("/api/schedules", "GET"): {
        "summary": "List the cron schedules (UTC) with their next and last ticks",
        "operationId": "listSchedules",
        "parameters": [_query("workflow", {"type": "string"}, "Only this workflow's schedules.")],
        "responses": {
            **_ok({"type": "array", "items": _ref("Schedule")}, "The schedules"),
            **_errors(),
        },
    },
}

_TIME = {"type": ["string", "null"], "format": "date-time"}
_ERROR = {
    "type": ["object", "null"],
    "properties": {"name": {"type": "string"}, "message": {"type": "string"}},
}
_COUNTS = {"type": "object", "additionalProperties": {"type": "integer"}}

SCHEMAS: dict[str, Any] = {
    "Envelope": {
        "type": "object",
        "required": ["success", "errors", "messages", "result"],
        "properties": {
            "success": {"type": "boolean"},
            "errors": {"type": "array", "items": _ref("Error")},
            "messages": {"type": "array", "items": {"type": "string"}},
            "result": _ANY,
        },
    },
    "ErrorEnvelope": {
        "allOf": [
            _ref("Envelope"),
            {
                "type": "object",
                "properties": {"success": {"const": False}, "result": {"type": "null"}},
            },
        ]
    },
    "Error": {
        "type": "object",
        "required": ["code", "message", "name"],
        "properties": {
            "code": {"type": "integer", "description": "10000 + the HTTP status"},
            "message": {"type": "string"},
            "name": {"type": "string", "description": "The error class, e.g. InstanceNotFound"},
        },
    },
    "Workflow": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "registered": {
                "type": "boolean",
                "description": "False: known from storage only; its instances do not run "
                "in this process, but can be read and controlled",
            },
            "counts": _COUNTS,
            "total": {"type": "integer"},
        },
    },
    "CreateInstance": {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "id": _ID,
            "instance_id": _ID,
            "params": _ANY,
            "key": {
                "type": "string",
                "minLength": 1,
                "maxLength": 100,
                "description": "Flow-control key: Limits(max_concurrent_per_key=N) caps the "
                "instances sharing it that run at once; the others wait without holding up "
                "other keys",
            },
            "priority": {
                "type": "integer",
                "minimum": -(2**31),
                "maximum": 2**31 - 1,
                "default": 0,
                "description": "Lower starts first among the workflow's queued instances",
            },
        },
    },
    "Created": {
        "type": "object",
        "properties": {"id": {"type": "string"}, "workflow": {"type": "string"}, "status": _STATUS},
    },
    "ForkInstance": {
        "type": "object",
        "required": ["at_step"],
        "additionalProperties": False,
        "properties": {
            "at_step": {
                "oneOf": [
                    {"type": "string", "minLength": 1, "description": "Its first occurrence"},
                    _ref("StepRef"),
                ],
                "description": "The step the fork runs from (it and every later step run anew)",
            },
            "id": {**_ID, "description": "The fork's id (default: a new uuid4)"},
            "params": {**_ANY, "description": "The fork's params (null: the origin's)"},
            "overrides": {
                "type": ["object", "null"],
                "additionalProperties": _ANY,
                "description": "{step name: output}: the output of the first occurrence of a "
                "kept step in the fork",
            },
        },
    },
    "StepRef": {
        "type": "object",
        "required": ["name"],
        "additionalProperties": False,
        "properties": {
            "name": {"type": "string"},
            "count": {"type": "integer", "minimum": 1, "default": 1},
        },
    },
    "Forked": {
        "type": "object",
        "required": ["id", "workflow", "status", "forked_from"],
        "properties": {
            "id": {"type": "string"},
            "workflow": {"type": "string"},
            "status": _STATUS,
            "forked_from": _ref("ForkedFrom"),
        },
    },
    "ForkedFrom": {
        "type": "object",
        "description": "Where a fork comes from",
        "properties": {
            "workflow": {"type": "string"},
            "instance": {"type": "string"},
            "at_step": _ref("StepRef"),
        },
    },
    "InstanceSummary": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "workflow": {"type": "string"},
            "status": _STATUS,
            "created_on": _TIME,
            "started_on": _TIME,
            "error": _ERROR,
        },
    },
    "Attempt": {
        "type": "object",
        "properties": {
            "attempt": {"type": "integer"},
            "start": _TIME,
            "end": _TIME,
            "success": {"type": ["boolean", "null"]},
            "error": _ERROR,
            "retry_delay_ms": {"type": ["integer", "null"]},
            "ran_on": {
                "type": "object",
                "description": "where it ran: executor (inprocess, ray, dask), node, worker, "
                "host, pid",
                "additionalProperties": {"type": "string"},
            },
        },
    },
    "Step": {
        "type": "object",
        "properties": {
            "type": {"type": "string", "enum": ["step", "sleep", "waitForEvent", "rollback"]},
            "name": {"type": "string"},
            "count": {"type": "integer"},
            "status": {"type": "string"},
            "start": _TIME,
            "end": _TIME,
            "deadline": _TIME,
            "finished": {"type": "boolean"},
            "success": {"type": ["boolean", "null"]},
            "config": _ANY,
            "attempts": {"type": "array", "items": _ref("Attempt")},
            "output": _ANY,
            "error": _ERROR,
        },
    },
    "InstanceDetails": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "workflow": {"type": "string"},
            "status": _STATUS,
            "params": _ANY,
            "output": _ANY,
            "error": _ERROR,
            "rollback": {
                "type": ["object", "null"],
                "description": "Its saga rollback: {outcome, error}; null if none ran",
            },
            "queued": _TIME,
            "start": _TIME,
            "end": _TIME,
            "success": {"type": ["boolean", "null"]},
            "now": {**_TIME, "description": "The runtime clock's time of this reading"},
            "steps": {"type": "array", "items": _ref("Step")},
            "description": _ref("InstanceDescription"),
        },
    },
    "InstanceDescription": {
        "type": "object",
        "description": "Instance.describe(): what `actorflow describe --json` prints",
        "properties": {
            "workflow": {"type": "string"},
            "id": {"type": "string"},
            "status": _STATUS,
            "created": _TIME,
            "started": _TIME,
            "ended": _TIME,
            "output": _ANY,
            "error": _ERROR,
            "params": _ANY,
            "waiting_for": {
                "type": "array",
                "items": {"type": "string"},
                "description": "The event types a waiting instance waits for",
            },
            "steps": {"type": "integer", "description": "How many steps it has"},
            "steps_complete": {"type": "integer"},
            "steps_failed": {"type": "integer"},
            "epoch": {
                "type": "integer",
                "description": "1, plus one per fence (restart, terminate, recovery)",
            },
            "owner": {
                "type": ["string", "null"],
                "description": "Multi-node: the node that runs it",
            },
            "rollback": {
                "type": ["object", "null"],
                "description": "Its saga rollback: {outcome, error}; null if none ran",
            },
            "forked_from": {
                "oneOf": [{"type": "null"}, _ref("ForkedFrom")],
                "description": "For a fork: its origin; null for any other instance",
            },
            "key": {
                "type": ["string", "null"],
                "description": "Its flow-control key; null if none",
            },
            "priority": {"type": "integer", "description": "Its priority (0 by default)"},
        },
    },
    "Schedule": {
        "type": "object",
        "properties": {
            "workflow": {"type": "string"},
            "cron": {"type": "string", "description": "5-field cron expression, UTC"},
            "next": {
                **_TIME,
                "description": "The next tick; one in the past has not been fired yet (its "
                "catch-up instance is made when a runtime registers the workflow)",
            },
            "last": {**_TIME, "description": "The last tick handled"},
            "last_instance": {
                "type": ["string", "null"],
                "description": "The id of the instance made for the last tick",
            },
        },
    },
    "HistoryEvent": {
        "type": "object",
        "properties": {
            "type": {"type": "string"},
            "timestamp": _TIME,
            "step": {"type": ["string", "null"]},
            "attempt": {"type": ["integer", "null"]},
            "data": {"type": "object"},
            "cursor": {"type": "string", "description": "In a subscribed stream only."},
        },
    },
}


def openapi_schema(routes: list[tuple[str, list[str]]]) -> dict[str, Any]:
    """Returns the OpenAPI document of ``routes`` (``(path, methods)`` pairs).

    Raises:
        KeyError: A route has no entry in :data:`OPERATIONS`.
    """
    paths: dict[str, dict[str, Any]] = {}
    for path, methods in routes:
        for method in methods:
            if method == "HEAD":
                continue
            op = OPERATIONS[(path, method)]
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "actorflow",
            "version": "1",
            "description": "Workflows and instances of one actorflow runtime, in the shape of "
            "Cloudflare's Workflows REST API.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
    }
