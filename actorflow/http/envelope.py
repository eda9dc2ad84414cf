"""Cloudflare's response envelope, the API's errors and the parsing of request input.

Every API response is::

    {"success": true, "errors": [], "messages": [], "result": ...}

and a failure carries ``errors: [{"code", "message", "name"}]`` where ``name``
is the error class (``InstanceNotFound``, ``RateLimitError``, ...) and ``code``
is 10000 + the HTTP status. Request bodies are JSON only, size-capped before
they are parsed, and parsed with :func:`json.loads` (never unpickled).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actorflow.core.errors import (
    ActorflowError,
    InstanceAlreadyExists,
    InstanceNotFound,
    InvalidCursor,
    InvalidFlowControl,
    InvalidInstanceId,
    InvalidInstanceState,
    LimitExceeded,
    RateLimitError,
    SerializationError,
    StorageError,
)

__all__ = [
    "BODY_SLACK",
    "ERROR_STATUS",
    "ApiError",
    "SecurityHeaders",
    "envelope",
    "error_of",
    "error_response",
    "int_param",
    "read_json",
    "time_param",
]

log = logging.getLogger("actorflow.http")

#: HTTP status of each error class (the first match wins).
ERROR_STATUS: tuple[tuple[type[BaseException], int], ...] = (
    (InstanceNotFound, 404),
    (InstanceAlreadyExists, 409),
    (InvalidInstanceState, 409),
    (InvalidInstanceId, 400),
    (InvalidCursor, 400),
    (InvalidFlowControl, 400),
    (SerializationError, 400),
    (LimitExceeded, 400),
    (RateLimitError, 429),
    (StorageError, 503),
)
#: Bytes a request body may have beyond the runtime's payload limit (ids, JSON framing).
BODY_SLACK = 64 * 1024
_SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'",
    ),
)


class ApiError(Exception):
    """An error answered as an envelope with an HTTP status.

    Args:
        status: The HTTP status code.
        name: The error's name (``errors[0].name``).
        message: A human-readable message.
    """

    def __init__(self, status: int, name: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.name = name
        self.message = message


def envelope(result: Any, status: int = 200, result_info: Any = None) -> JSONResponse:
    """Returns a successful response in Cloudflare's envelope."""
    body: dict[str, Any] = {"success": True, "errors": [], "messages": [], "result": result}
    if result_info is not None:
        body["result_info"] = result_info
    return JSONResponse(body, status_code=status)


def error_response(status: int, name: str, message: str) -> JSONResponse:
    """Returns a failed response in Cloudflare's envelope; the code is 10000 + status."""
    body = {
        "success": False,
        "errors": [{"code": 10000 + status, "message": message, "name": name}],
        "messages": [],
        "result": None,
    }
    headers = {"WWW-Authenticate": 'Bearer realm="actorflow"'} if status == 401 else None
    return JSONResponse(body, status_code=status, headers=headers)


def error_of(exc: BaseException) -> ApiError:
    """Maps an exception to its API error: the class name and the status of its kind.

    Errors that are not the client's (anything unexpected) are logged and
    answered as a bare 500 that reveals nothing of the server.
    """
    if isinstance(exc, ApiError):
        return exc
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            return ApiError(status, type(exc).__name__, str(exc))
    if isinstance(exc, ValueError | TypeError):
        return ApiError(400, "ValidationError", str(exc))
    if isinstance(exc, ActorflowError):
        return ApiError(503, type(exc).__name__, str(exc))
    log.exception("unexpected error in an API handler")
    return ApiError(500, "InternalError", "internal error; see the server's log")


class SecurityHeaders:
    """ASGI middleware adding headers that keep browsers from framing or sniffing responses."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], *_SECURITY_HEADERS]
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def read_json(request: Request, limit: int) -> Any:
    """Reads a JSON body of at most ``limit`` bytes; an empty body is None.

    Every mutating request must say ``Content-Type: application/json``,
    even with an empty body: a browser cannot send that header across
    origins without a CORS preflight, which this app never grants.
    """
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":
        raise ApiError(
            415,
            "UnsupportedMediaType",
            f"the body must be application/json, not {ctype or 'missing'!r}",
        )
    declared = request.headers.get("content-length")
    if declared is not None and (
        not re.fullmatch(r"[0-9]{1,18}", declared) or int(declared) > limit
    ):
        raise ApiError(413, "LimitExceeded", f"the body is larger than {limit} bytes")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise ApiError(413, "LimitExceeded", f"the body is larger than {limit} bytes")
    if not data.strip():
        return None
    try:
        return json.loads(bytes(data), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "ValidationError", f"the body is not valid JSON: {e}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def int_param(raw: str | None, name: str, *, default: int, lo: int, hi: int) -> int:
    """Parses an integer query parameter in ``[lo, hi]`` (``default`` when absent)."""
    if raw is None or raw == "":
        return default
    if not re.fullmatch(r"[0-9]{1,9}", raw) or not lo <= int(raw) <= hi:
        raise ApiError(400, "ValidationError", f"{name} must be an integer from {lo} to {hi}")
    return int(raw)


def time_param(raw: str | None, name: str) -> int | None:
    """Parses epoch milliseconds or an ISO 8601 time with a UTC offset."""
    if raw is None or raw == "":
        return None
    if re.fullmatch(r"[0-9]{1,15}", raw):
        return int(raw)
    try:
        when = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        when = None
    if when is None or when.tzinfo is None:
        raise ApiError(
            400,
            "ValidationError",
            f"{name} must be epoch milliseconds or an ISO 8601 time with an offset",
        )
    return round(when.timestamp() * 1000)
