"""Running the HTTP app: the bind-address rule and a blocking :func:`serve`."""

from __future__ import annotations

import ipaddress
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn

from actorflow.http.app import create_app
from actorflow.runtime import Runtime

__all__ = ["TOKEN_ENV", "check_bind", "make_server", "serve", "serving"]

#: The environment variable read for the token when none is passed.
TOKEN_ENV = "ACTORFLOW_TOKEN"


def is_loopback(host: str) -> bool:
    """True if ``host`` names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuses a bind address other than loopback when no token is configured.

    Raises:
        ValueError: ``host`` is not a loopback address and ``token`` is None.
    """
    if not is_loopback(host) and not token:
        raise ValueError(
            f"refusing to serve on {host!r} without a token: anyone who can reach it could "
            f"control your workflows. Pass a token (the {TOKEN_ENV} environment variable or "
            "--token-file PATH; token= from Python), or bind 127.0.0.1."
        )


def make_server(
    rt: Runtime,
    host: str = "127.0.0.1",
    port: int = 8787,
    token: str | None = None,
    **uvicorn_options: Any,
) -> uvicorn.Server:
    """Returns a uvicorn server for the app, not yet started (see :func:`serve`).

    ``token`` defaults to the ``ACTORFLOW_TOKEN`` environment variable. With no
    token, the server binds loopback only and answers only requests addressed
    to a loopback host name (a guard against DNS rebinding): the defaults of
    ``create_app(rt, token=None)``.

    Raises:
        ValueError: ``host`` is not loopback and there is no token.
    """
    token = token or os.environ.get(TOKEN_ENV) or None
    check_bind(host, token)
    app = create_app(rt, token=token)
    options: dict[str, Any] = {"log_level": "warning", "server_header": False}
    options.update(uvicorn_options)
    return uvicorn.Server(uvicorn.Config(app, host=host, port=port, **options))


def serve(rt: Runtime, host: str = "127.0.0.1", port: int = 8787, token: str | None = None) -> None:
    """Serves the HTTP API and the dashboard until interrupted (blocking).

    Args:
        rt: The runtime to expose.
        host: The address to bind; anything but loopback needs a token.
        port: The TCP port.
        token: The bearer token; defaults to ``$ACTORFLOW_TOKEN``.

    Raises:
        ValueError: ``host`` is not loopback and there is no token.
    """
    make_server(rt, host, port, token, log_level="info").run()


@contextmanager
def serving(
    rt: Runtime,
    host: str = "127.0.0.1",
    port: int = 0,
    token: str | None = None,
    startup_timeout: float = 10.0,
) -> Iterator[str]:
    """Serves the app in a background thread for the ``with`` block; yields its base URL.

    ``port=0`` picks a free port. Useful in tests and notebooks.

    Raises:
        ValueError: ``host`` is not loopback and there is no token.
        RuntimeError: The server did not start within ``startup_timeout`` seconds.
    """
    server = make_server(rt, host, port, token)
    thread = threading.Thread(target=server.run, name="actorflow-http", daemon=True)
    thread.start()
    deadline = threading.Event()
    for _ in range(int(startup_timeout / 0.01)):
        if server.started or not thread.is_alive():
            break
        deadline.wait(0.01)
    if not server.started:
        server.should_exit = True
        thread.join(startup_timeout)
        raise RuntimeError(f"the HTTP server on {host}:{port} did not start")
    sock = server.servers[0].sockets[0]
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    try:
        yield f"http://{url_host}:{bound_port}"
    finally:
        server.should_exit = True
        thread.join(startup_timeout)
