"""The HTTP API and the live dashboard of a runtime (the ``serve`` extra).

``create_app(rt)`` returns an ASGI app to mount in your service (its API needs
a bearer token: the one you pass, or one it makes, ``app.state.token``);
``serve(rt)`` runs it with uvicorn on 127.0.0.1:8787 (what ``actorflow serve``
does).
"""

from __future__ import annotations

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(
        "actorflow.http needs the 'serve' extra: pip install 'actorflow[serve]'"
    ) from e

from actorflow.http.app import ApiError, create_app
from actorflow.http.server import TOKEN_ENV, check_bind, make_server, serve, serving

__all__ = [
    "TOKEN_ENV",
    "ApiError",
    "check_bind",
    "create_app",
    "make_server",
    "serve",
    "serving",
]
