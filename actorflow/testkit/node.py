"""A runtime in a child process, for node-failure tests: :class:`NodeProcess`.

``NodeProcess(data_dir, app="package.module:factory")`` starts a fresh Python
interpreter (never a fork: an LMDB environment must not cross ``fork()``)
running ``python -m actorflow.testkit.node``. The child imports ``factory``, calls
``factory(data_dir)``, which builds and returns the :class:`~actorflow.Runtime`
with its registrations, and then serves a small control channel: one JSON
object per line on its stdin, one reply per line on a private pipe. Nothing
is ever unpickled from the channel.

Each node has a node id (given, or made up once per :class:`NodeProcess`
object and kept across its restarts). The child's runtime joins the data
directory as that node (see :mod:`actorflow.cluster.lease`): several node processes
can share one data directory, and when one dies the others adopt its
instances once its lease expires. Restarting the same :class:`NodeProcess`
is the same node coming back: it resumes what it still owns at once.

The child's own stdout and stderr (prints, logs) go to :attr:`NodeProcess.log_path`.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import IO, Any

from actorflow.cluster.lease import LEASE_TIMEOUT_ENV, NODE_ID_ENV
from actorflow.core import errors as _errors
from actorflow.core.errors import ActorflowError
from actorflow.core.storage import is_database_url

__all__ = ["LEASE_TIMEOUT_ENV", "NODE_ID_ENV", "NodeProcess", "NodeProcessError", "main"]

#: Exit status of a node process that found its lease taken over.
EXIT_LEASE_LOST = 3

_EOF = object()


class NodeProcessError(ActorflowError):
    """The node process failed to start, died, or a control call failed in it."""


def _load_factory(app: str) -> Callable[[str], Any]:
    mod_name, sep, attr = app.partition(":")
    if not sep or not mod_name or not attr:
        raise ValueError(f"app must be 'package.module:factory', not {app!r}")
    obj: Any = importlib.import_module(mod_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{app} is not callable")
    return obj


class NodeProcess:
    """A runtime in a child process, with SIGKILL, SIGTERM and a control channel.

    Args:
        data_dir: The data directory the child's runtime opens, or a
            ``postgresql://`` URL (then ``log_path`` should be given: the
            default log is in the system's temporary directory).
        app: ``"package.module:factory"``; the child calls ``factory(data_dir)``,
            which returns the :class:`~actorflow.Runtime` with its workflows
            registered. It must be importable in the child (the parent's
            ``sys.path`` is passed on).
        node_id: The node's id (default: a new random one, kept across
            restarts of this object).
        env: Extra environment variables for the child.
        lease_timeout: Seconds without a heartbeat after which other nodes
            adopt this node's instances (default: the runtime's default).
        log_path: Where the child's stdout and stderr go (default
            ``<data_dir>/node-<node_id>.log``, appended to).
        start_timeout: Seconds :meth:`start` waits for the runtime to be up.

    Use it as a context manager to make sure the child is gone afterwards.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        app: str,
        *,
        node_id: str | None = None,
        env: Mapping[str, str] | None = None,
        lease_timeout: float | None = None,
        log_path: str | os.PathLike[str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        if ":" not in app:
            raise ValueError(f"app must be 'package.module:factory', not {app!r}")
        self.data_dir = os.fspath(data_dir)
        self.app = app
        self.node_id = node_id or f"node-{uuid.uuid4().hex[:8]}"
        self.env = dict(env or {})
        self.lease_timeout = lease_timeout
        self._on_database = is_database_url(self.data_dir)
        # A database URL is no directory to keep the log in.
        log_dir = tempfile.gettempdir() if self._on_database else self.data_dir
        self.log_path = (
            os.fspath(log_path)
            if log_path is not None
            else os.path.join(log_dir, f"node-{self.node_id}.log")
        )
        self.start_timeout = start_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._ready: queue.Queue[Any] = queue.Queue()
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._dead = False
        self._lock = threading.Lock()
        self._next_id = 0
        self._reader: threading.Thread | None = None
        self._ctl: IO[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> NodeProcess:
        """Starts the child and returns once its runtime is up.

        Raises:
            NodeProcessError: The child exited or was not up in time (the
                message carries the end of its log).
        """
        if self.alive:
            raise NodeProcessError(f"node {self.node_id} is already running")
        if not self._on_database:
            os.makedirs(self.data_dir, exist_ok=True)
        os.makedirs(os.path.dirname(os.path.abspath(self.log_path)), exist_ok=True)
        env = dict(os.environ)
        paths = [os.getcwd(), *[p for p in sys.path if p]]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
        env[NODE_ID_ENV] = self.node_id
        if self.lease_timeout is not None:
            env[LEASE_TIMEOUT_ENV] = str(self.lease_timeout)
        env.update(self.env)
        ctl_r, ctl_w = os.pipe()
        self._ready = queue.Queue()
        self._dead = False
        with open(self.log_path, "ab") as log:
            try:
                self._proc = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "actorflow.testkit.node",
                        "--data",
                        self.data_dir,
                        "--app",
                        self.app,
                        "--reply-fd",
                        str(ctl_w),
                    ],
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=log,
                    env=env,
                    pass_fds=(ctl_w,),
                    start_new_session=True,  # a signal to the test's group does not reach it
                )
            finally:
                os.close(ctl_w)
        self._ctl = os.fdopen(ctl_r, "rb")
        self._reader = threading.Thread(
            target=self._read_replies,
            args=(self._ctl,),
            name=f"actorflow-node-{self.node_id}",
            daemon=True,
        )
        self._reader.start()
        try:
            first = self._ready.get(timeout=self.start_timeout)
        except queue.Empty:
            self.kill()
            raise NodeProcessError(
                f"node {self.node_id} was not up within {self.start_timeout} s:\n{self.log_tail()}"
            ) from None
        if first is _EOF or not first.get("ready"):
            self.kill()
            detail = "" if first is _EOF else first.get("error", "")
            raise NodeProcessError(
                f"node {self.node_id} failed to start: {detail}\n{self.log_tail()}"
            )
        return self

    def _read_replies(self, stream: IO[bytes]) -> None:
        first = True
        try:
            for line in stream:
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                if first:
                    first = False
                    self._ready.put(msg)
                    continue
                with self._lock:
                    fut = self._pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        except (OSError, ValueError):
            pass
        with contextlib.suppress(OSError):
            stream.close()
        with self._lock:
            self._dead = True
            pending, self._pending = list(self._pending.values()), {}
        self._ready.put(_EOF)
        for fut in pending:
            if not fut.done():
                fut.set_result(_EOF)

    @property
    def pid(self) -> int | None:
        """The child's process id (None before :meth:`start`)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        """True while the child process runs."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def returncode(self) -> int | None:
        """The child's exit status once it ended (negative: killed by that signal)."""
        return self._proc.poll() if self._proc is not None else None

    def kill(self) -> None:
        """SIGKILLs the child (a node failure) and reaps it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
        self._reap()

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERMs the child: its runtime closes cleanly. Returns its exit status.

        If it has not exited within ``timeout`` seconds it is killed.
        """
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._proc.kill()
        self._reap()
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Sends ``sig`` to the child (``signal.SIGSTOP`` freezes a node, ``SIGCONT`` thaws it)."""
        if self._proc is None or self._proc.poll() is not None:
            raise NodeProcessError(f"node {self.node_id} is not running")
        self._proc.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Waits for the child to exit and returns its exit status."""
        if self._proc is None:
            raise NodeProcessError(f"node {self.node_id} was never started")
        code = self._proc.wait(timeout)
        self._reap()
        return code

    def _reap(self) -> None:
        if self._proc is None:
            return
        self._proc.wait()
        if self._proc.stdin is not None:
            with contextlib.suppress(OSError):
                self._proc.stdin.close()
        if self._reader is not None:
            self._reader.join(5)
        if self._ctl is not None:
            with contextlib.suppress(OSError):
                self._ctl.close()
            self._ctl = None

    def __enter__(self) -> NodeProcess:
        if not self.alive:
            self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate(timeout=15)  # also reaps one that exited by itself

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the child's log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                size = f.tell()
                f.seek(max(0, size - chars))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    # -- the control channel -------------------------------------------------------

    def request(self, op: str, timeout: float | None = 60.0, **args: Any) -> Any:
        """Sends one control request and returns its result (thread-safe).

        Raises:
            NodeProcessError: The node is not running or died meanwhile.
            ActorflowError: The error the call raised in the node, as the same
                actorflow error class when there is one.
        """
        rid, fut = self._send(op, args)
        try:
            reply = fut.result(timeout)
        except concurrent.futures.TimeoutError:
            raise NodeProcessError(
                f"node {self.node_id}: no reply to {op!r} within {timeout} s"
            ) from None
        finally:
            with self._lock:
                self._pending.pop(rid, None)
        return self._unpack(op, reply)

    def submit(self, op: str, **args: Any) -> concurrent.futures.Future[Any]:
        """Sends one control request without waiting for its reply (thread-safe).

        The request is in the child's input when this returns, so a child
        stopped with SIGSTOP reads it once it is continued. The future gets
        what :meth:`request` would return or raise.

        Raises:
            NodeProcessError: The node is not running.
        """
        _, raw = self._send(op, args)
        out: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def unpack(done: concurrent.futures.Future[Any]) -> None:
            try:
                out.set_result(self._unpack(op, done.result()))
            except BaseException as e:
                out.set_exception(e)

        raw.add_done_callback(unpack)
        return out

    def _send(self, op: str, args: dict[str, Any]) -> tuple[int, concurrent.futures.Future[Any]]:
        """Writes one request line; returns its id and the future of its raw reply."""
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            proc = self._proc
            if proc is None or proc.poll() is not None or proc.stdin is None or self._dead:
                raise NodeProcessError(f"node {self.node_id} is not running")
            self._next_id += 1
            rid = self._next_id
            self._pending[rid] = fut
            line = json.dumps({"id": rid, "op": op, "args": args}, default=_jsonable) + "\n"
            try:
                proc.stdin.write(line.encode())
                proc.stdin.flush()
            except (OSError, ValueError):
                self._pending.pop(rid, None)
                raise NodeProcessError(f"node {self.node_id} died") from None
        return rid, fut

    def _unpack(self, op: str, reply: Any) -> Any:
        """The result of a raw reply, or the error it carries raised."""
        if reply is _EOF:
            raise NodeProcessError(f"node {self.node_id} died during {op!r}")
        if reply.get("ok"):
            return reply.get("result")
        err = reply.get("error") or {}
        cls = getattr(_errors, str(err.get("type")), None)
        msg = err.get("message", "")
        if isinstance(cls, type) and issubclass(cls, ActorflowError):
            raise cls(msg)
        raise NodeProcessError(f"node {self.node_id}: {op}: {err.get('type')}: {msg}")

    def ping(self) -> dict[str, Any]:
        """Returns ``{"pid", "node_id"}`` from the child."""
        result: dict[str, Any] = self.request("ping")
        return result

    def create(self, workflow: str, id: str | None = None, params: Any = None) -> str:
        """Creates an instance in the node; returns its id. ``params`` must be JSON."""
        return str(self.request("create", workflow=workflow, id=id, params=params))

    def create_batch(self, workflow: str, items: Iterable[Mapping[str, Any]]) -> list[str]:
        """Creates instances in one group commit; returns the ids created."""
        return list(self.request("create_batch", workflow=workflow, items=list(items)))

    def status(self, workflow: str, id: str) -> dict[str, Any]:
        """Returns ``{"status", "output", "error", "rollback"}`` of an instance (output as JSON)."""
        result: dict[str, Any] = self.request("status", workflow=workflow, id=id)
        return result

    def send_event(self, workflow: str, id: str, type: str, payload: Any = None) -> None:
        """Sends an event to an instance through this node."""
        self.request("send_event", workflow=workflow, id=id, type=type, payload=payload)

    def control(self, workflow: str, id: str, action: str, from_step: str | None = None) -> None:
        """``pause``, ``resume``, ``terminate``, ``restart`` or ``delete`` an instance here."""
        self.request("control", workflow=workflow, id=id, action=action, from_step=from_step)

    def fork(
        self,
        workflow: str,
        id: str,
        at_step: str | Mapping[str, Any],
        *,
        new_id: str | None = None,
        params: Any = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> str:
        """``inst.fork`` through this node (which then owns the fork); returns the fork's id."""
        return str(
            self.request(
                "fork",
                workflow=workflow,
                id=id,
                at_step=at_step if isinstance(at_step, str) else dict(at_step),
                new_id=new_id,
                params=params,
                overrides=None if overrides is None else dict(overrides),
            )
        )

    def delete_batch(self, workflow: str, ids: list[str]) -> dict[str, Any]:
        """``delete_batch`` through this node; returns its ``{"deleted", "errors"}``."""
        result: dict[str, Any] = self.request("delete_batch", workflow=workflow, ids=ids)
        return result

    def counts(self, workflow: str) -> dict[str, int]:
        """Instances of ``workflow`` by stored status."""
        result: dict[str, int] = self.request("counts", workflow=workflow)
        return result

    def call(self, namespace: str, name: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """Calls a Durable Object method in the node (arguments and result as JSON)."""
        return self.request(
            "call", namespace=namespace, name=name, method=method, args=list(args), kwargs=kwargs
        )

    def stats(self) -> dict[str, Any]:
        """The node's counters: instances started, crashes, adoptions, lease state."""
        result: dict[str, Any] = self.request("stats")
        return result

    def wait_for_status(
        self,
        workflow: str,
        id: str,
        status: str | Iterable[str] = ("complete", "errored", "terminated"),
        timeout: float = 30.0,
    ) -> dict[str, Any]:
        """Polls until the instance has ``status`` (one, or any of several); returns it.

        Raises:
            TimeoutError: It did not within ``timeout`` seconds.
        """
        wanted = {status} if isinstance(status, str) else set(status)
        deadline = time.monotonic() + timeout
        while True:
            st = self.status(workflow, id)
            if st["status"] in wanted:
                return st
            if time.monotonic() > deadline:
                raise TimeoutError(f"{workflow}/{id} is {st['status']} after {timeout} s")
            time.sleep(0.02)

    def wait_until_idle(self, timeout: float = 30.0) -> bool:
        """Blocks until the node's runtime is idle (see ``Runtime.wait_until_idle``)."""
        return bool(self.request("idle", timeout=timeout + 30.0, wait=timeout))


def _jsonable(value: Any) -> Any:
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, BaseException):
        return {"type": type(value).__name__, "message": str(value)}
    return repr(value)


# -- the child ---------------------------------------------------------------------


class _Server:
    """Serves control requests against one runtime (in the child)."""

    def __init__(self, rt: Any, out: IO[bytes]) -> None:
        self.rt = rt
        self.out = out
        self.out_lock = threading.Lock()

    def reply(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message, default=_jsonable) + "\n").encode()
        with self.out_lock:
            self.out.write(data)
            self.out.flush()

    def handle(self, req: dict[str, Any]) -> None:
        rid = req.get("id")
        try:
            fn = getattr(self, "op_" + str(req.get("op")), None)
            if fn is None:
                raise ValueError(f"unknown operation {req.get('op')!r}")
            result = fn(**(req.get("args") or {}))
            self.reply({"id": rid, "ok": True, "result": result})
        except Exception as exc:
            self.reply(
                {"id": rid, "ok": False, "error": {"type": type(exc).__name__, "message": str(exc)}}
            )

    def op_ping(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node_id": getattr(self.rt, "node_id", None)}

    def op_create(self, workflow: str, id: str | None = None, params: Any = None) -> str:
        return str(self.rt.workflow(workflow).create(id=id, params=params).id)

    def op_create_batch(self, workflow: str, items: list[dict[str, Any]]) -> list[str]:
        return [i.id for i in self.rt.workflow(workflow).create_batch(items)]

    def op_status(self, workflow: str, id: str) -> dict[str, Any]:
        st = self.rt.workflow(workflow).get(id).status()
        return {
            "status": st.status,
            "output": st.output,
            "error": st.error,
            "rollback": st.rollback,
        }

    def op_send_event(self, workflow: str, id: str, type: str, payload: Any = None) -> None:
        self.rt.workflow(workflow).get(id).send_event(type, payload)

    def op_control(self, workflow: str, id: str, action: str, from_step: str | None = None) -> None:
        inst = self.rt.workflow(workflow).get(id)
        if action == "restart":
            inst.restart(from_step)
        elif action in ("pause", "resume", "terminate", "delete"):
            getattr(inst, action)()
        else:
            raise ValueError(f"unknown action {action!r}")

    def op_fork(
        self,
        workflow: str,
        id: str,
        at_step: Any,
        new_id: str | None = None,
        params: Any = None,
        overrides: dict[str, Any] | None = None,
    ) -> str:
        inst = self.rt.workflow(workflow).get(id)
        return inst.fork(at_step, id=new_id, params=params, overrides=overrides).id

    def op_delete_batch(self, workflow: str, ids: list[str]) -> dict[str, Any]:
        return self.rt.workflow(workflow).delete_batch(ids)

    def op_counts(self, workflow: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for inst in self.rt.workflow(workflow).list(limit=None):
            st = inst.status().status
            counts[st] = counts.get(st, 0) + 1
        return counts

    def op_call(
        self, namespace: str, name: str, method: str, args: list[Any], kwargs: dict[str, Any]
    ) -> Any:
        ns = self.rt._namespaces.get(namespace)  # noqa: SLF001 - a test tool reading the runtime it hosts; no user API reaches these
        if ns is None:
            raise KeyError(f"no Durable Object namespace {namespace!r} in this node")
        return getattr(ns.get_by_name(name), method)(*args, **kwargs)

    def op_stats(self) -> dict[str, Any]:
        rt = self.rt
        sup = rt._supervisor  # noqa: SLF001 - a test tool reading the runtime it hosts; no user API reaches these
        lease = getattr(rt, "lease", None)
        return {
            "node_id": getattr(rt, "node_id", None),
            "pid": os.getpid(),
            "started": sup.started,
            "crashes": sup.crash_count,
            "running": sup.running,
            "live": len(sup.live),
            "lease_lost": bool(getattr(rt, "lease_lost", False)),
            "adoptions": list(lease.adoptions) if lease is not None else [],
        }

    def op_idle(self, wait: float = 30.0) -> bool:
        return bool(self.rt.wait_until_idle(wait))


def main(argv: list[str] | None = None) -> int:
    """The child: builds the runtime, serves the control channel until told to stop."""
    parser = argparse.ArgumentParser(prog="python -m actorflow.testkit.node")
    parser.add_argument("--data", required=True)
    parser.add_argument("--app", required=True)
    parser.add_argument("--reply-fd", type=int, required=True)
    opts = parser.parse_args(argv)
    out = os.fdopen(opts.reply_fd, "wb")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        rt = _load_factory(opts.app)(opts.data)
    except BaseException:
        out.write((json.dumps({"ready": False, "error": traceback.format_exc()}) + "\n").encode())
        out.flush()
        traceback.print_exc()
        return 1
    server = _Server(rt, out)

    def serve() -> None:
        for line in sys.stdin.buffer:
            try:
                req = json.loads(line)
            except ValueError:
                continue
            threading.Thread(target=server.handle, args=(req,), daemon=True).start()
        stop.set()  # the parent closed the channel

    threading.Thread(target=serve, name="actorflow-node-control", daemon=True).start()
    server.reply({"ready": True, "pid": os.getpid(), "node_id": getattr(rt, "node_id", None)})
    while not stop.wait(0.05):
        if getattr(rt, "lease_lost", False):
            # Other nodes own its instances now: exit at once, writing nothing more.
            print(
                "actorflow node: the lease of this node was taken over; exiting",
                file=sys.stderr,
                flush=True,
            )
            os._exit(EXIT_LEASE_LOST)
    code = 0
    try:
        rt.close()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
