"""The ``actorflow`` command: inspect and control workflow instances, serve, benchmark.

    actorflow [--data DIR | --url URL [--token-file PATH]] [--json] COMMAND ...

    list [--workflow W] [--status S] [--limit N] [--cursor C]
    status WORKFLOW ID          describe WORKFLOW ID         history WORKFLOW ID
    steps WORKFLOW ID
    send-event WORKFLOW ID TYPE [--payload JSON]
    pause | resume | terminate WORKFLOW ID
    restart WORKFLOW ID [--from-step NAME]
    metrics
    schedules [--workflow W]    the cron schedules, with their next tick
    serve [--app pkg.mod:factory] [--host H] [--port P] [--token-file PATH]
    bench ...                   (arguments go to ``actorflow.bench``)

With ``--data`` (the default, ``./actorflow-data``) it works on a data
directory. Reads are always safe: LMDB readers never block or disturb a
writer. Changes (``send-event``, ``pause``, ...) need the directory to be
closed: while a runtime holds it open, they are refused, and ``--url``
sends them to that runtime's HTTP API (``actorflow serve``) instead. On a
closed directory they write the same durable records as the Python API, so
the next runtime that registers the workflow continues from them.

The bearer token for ``--url`` and ``serve`` comes from the ``ACTORFLOW_TOKEN``
environment variable or from ``--token-file PATH``. ``--token VALUE`` works
too, but warns: a command line is visible to every user of the machine
(``ps``, ``/proc/PID/cmdline``) and stays in the shell's history.
"""

from __future__ import annotations

import base64
import fcntl
import importlib
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, is_dataclass
from datetime import datetime
from typing import Any

import click
from click.core import ParameterSource

from actorflow.core.errors import ActorflowError, DataDirectoryLocked, InstanceNotFound
from actorflow.runtime import OWNER_LOCK, Runtime, is_database_url
from actorflow.workflows.definition import STATUSES
from actorflow.workflows.query import Query, document, iso

__all__ = ["cli", "format_table", "main"]

_ACTIONS = ("pause", "resume", "terminate", "restart")


def format_table(rows: list[list[str]], header: list[str]) -> str:
    """Formats rows as a plain-text table with a header and a rule."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*header), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*map(str, r)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


def _plain(value: Any) -> Any:
    """JSON-ready data from records, dataclasses and datetimes."""
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat(timespec="milliseconds")
    if isinstance(value, bytes):
        return base64.b64encode(value).decode()
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return repr(value)


# -- the data directory -----------------------------------------------------------


class _ToolRuntime(Runtime):
    """A runtime opened by the command while it holds the owner lock exclusively."""

    def _lock_owner(self) -> int:
        return -1


@contextmanager
def _exclusive(data: str) -> Iterator[None]:
    """Holds the data directory's owner lock exclusively, or fails if a runtime has it.

    A database has no owner file: the runtime opened inside claims it alone,
    and is refused while any other runtime has it open.
    """
    if is_database_url(data):
        try:
            yield
        except DataDirectoryLocked:
            raise click.ClickException(
                f"a running process has {data.split('@')[-1]} open; change it through that "
                "process's HTTP API instead: actorflow --url http://HOST:PORT ..."
            ) from None
        return
    if not os.path.isdir(data):
        raise click.ClickException(f"no data directory at {data}")
    fd = os.open(os.path.join(data, OWNER_LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise click.ClickException(
                f"a running process has {data} open; changing it from here could corrupt it. "
                "Send the change through that process's HTTP API instead: "
                "actorflow --url http://HOST:PORT ... (see `actorflow serve`)"
            ) from None
        yield
    finally:
        os.close(fd)  # releases the lock


class _Local:
    """Reads (and, when no process has it open, changes) a data directory."""

    def __init__(self, data: str) -> None:
        self.data = data

    @contextmanager
    def _query(self, wf: str | None = None, iid: str | None = None) -> Iterator[Query]:
        """The directory's read-only queries; an unknown instance is a command error."""
        with ExitStack() as stack:
            try:
                q = stack.enter_context(Query.open(self.data))
            except FileNotFoundError:
                raise click.ClickException(f"no actorflow data directory at {self.data}") from None
            try:
                yield q
            except InstanceNotFound as e:
                if wf is None:
                    raise click.ClickException(f"{type(e).__name__}: {e}") from None
                raise click.ClickException(f"workflow {wf!r} has no instance {iid!r}") from None

    def instances(
        self, workflow: str | None, status: str | None, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        with self._query() as q:
            try:
                page = q.page(workflow, status, limit=limit, token=cursor)
            except ValueError:
                raise click.BadParameter(
                    "not a cursor printed by list", param_hint="--cursor"
                ) from None
            rows = [
                {
                    "workflow": r.workflow,
                    "id": r.id,
                    "status": r.status,
                    "created": iso(r.created),
                    "error": r.error,
                }
                for r in page.rows
            ]
            return {"instances": rows, "cursor": page.next}

    def status(self, wf: str, iid: str) -> dict[str, Any]:
        with self._query(wf, iid) as q:
            # The instance record only: a damaged step record does not hide the status.
            rk = q.record_key(wf, iid)
            st, row = q.status(wf, iid, rk), q.summary(wf, iid, rk)
            return {
                "workflow": wf,
                "id": iid,
                "status": st.status,
                "output": st.output,
                "error": st.error,
                "rollback": st.rollback,
                "created": iso(row.created),
                "started": iso(row.started) or "",
            }

    def describe(self, wf: str, iid: str) -> dict[str, Any]:
        with self._query(wf, iid) as q:
            return document(q.describe(wf, iid))

    def history(self, wf: str, iid: str) -> list[dict[str, Any]]:
        with self._query(wf, iid) as q:
            return [_plain(e) for e in q.history(wf, iid)]

    def steps(self, wf: str, iid: str) -> list[dict[str, Any]]:
        with self._query(wf, iid) as q:
            return [_plain(s) for s in q.steps(wf, iid)]

    def metrics(self) -> dict[str, Any]:
        """What the directory itself tells: counts, queue depths, timers (rates live in
        the process that runs the workflows: ask it with ``--url``)."""
        with self._query() as q:
            workflows: dict[str, dict[str, Any]] = {}
            for wf in q.workflows():
                counts = {s: n for s, n in q.counts(wf).items() if n}
                workflows[wf] = {"name": wf, "counts": counts, "queue_depth": q.queue_depth(wf)}
            total: dict[str, int] = {}
            for w in workflows.values():
                for st, n in w["counts"].items():
                    total[st] = total.get(st, 0) + n
            return {
                "workflows": workflows,
                "counts": total,
                "queue_depth": sum(w["queue_depth"] for w in workflows.values()),
                "timer_backlog": q.timer_backlog(),
            }

    def schedules(self, workflow: str | None) -> list[dict[str, Any]]:
        with self._query() as q:
            return [_schedule_row(s) for s in q.schedules(workflow)]

    def control(self, wf: str, iid: str, action: str, **kw: Any) -> None:
        with _exclusive(self.data), _ToolRuntime(self.data) as rt:
            try:
                inst = rt.unregistered(wf).get(iid)
                if action == "event":
                    inst.send_event(kw["type"], kw.get("payload"))
                elif action == "restart":
                    inst.restart(from_step=kw.get("from_step"))
                elif action == "terminate" and kw.get("rollback"):
                    inst.terminate(rollback=True)
                else:
                    getattr(inst, action)()
            except ActorflowError as e:
                raise click.ClickException(f"{type(e).__name__}: {e}") from None


# -- a running service ---------------------------------------------------------------


class _Remote:
    """Talks to a running runtime through its HTTP API (``actorflow serve``)."""

    def __init__(self, url: str, token: str | None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def _call(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, Any] | None = None,
        envelope: bool = False,
    ) -> Any:
        url = self.url + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                env = json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            try:
                env = json.loads(e.read() or b"{}")
            except ValueError:
                raise click.ClickException(f"{method} {url}: HTTP {e.code}") from None
            errors = env.get("errors") or [{"message": f"HTTP {e.code}"}]
            raise click.ClickException(
                "; ".join(f"{err.get('name') or 'Error'}: {err.get('message')}" for err in errors)
            ) from None
        except urllib.error.URLError as e:
            raise click.ClickException(f"cannot reach {self.url}: {e.reason}") from None
        if envelope:
            return env
        return env.get("result") if isinstance(env, dict) else env

    def _wfs(self) -> list[str]:
        result = self._call("GET", "/api/workflows") or []
        return [w["name"] if isinstance(w, dict) else str(w) for w in result]

    def instances(
        self, workflow: str | None, status: str | None, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        if workflow is None:
            rows: list[dict[str, Any]] = []
            for wf in self._wfs():
                rows += self.instances(wf, status, limit, None)["instances"]
            rows.sort(key=lambda r: r.get("created") or "", reverse=True)
            return {"instances": rows[:limit], "cursor": None}
        env = self._call(
            "GET",
            f"/api/workflows/{_q(workflow)}/instances",
            query={"status": status, "limit": limit, "cursor": cursor},
            envelope=True,
        )
        items = env.get("result") or []
        nxt = (env.get("result_info") or {}).get("cursor")
        rows = [
            dict(
                r,
                workflow=r.get("workflow", workflow),
                created=r.get("created", r.get("created_on")),
            )
            for r in items
        ]
        return {"instances": rows, "cursor": nxt}

    def status(self, wf: str, iid: str) -> dict[str, Any]:
        result = self._call("GET", f"/api/workflows/{_q(wf)}/instances/{_q(iid)}")
        result = dict(result or {})
        result.pop("steps", None)
        result.pop("description", None)
        return result

    def describe(self, wf: str, iid: str) -> dict[str, Any]:
        result = self._call("GET", f"/api/workflows/{_q(wf)}/instances/{_q(iid)}") or {}
        return dict(result.get("description") or {})

    def history(self, wf: str, iid: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/api/workflows/{_q(wf)}/instances/{_q(iid)}/history") or [])

    def steps(self, wf: str, iid: str) -> list[dict[str, Any]]:
        result = self._call("GET", f"/api/workflows/{_q(wf)}/instances/{_q(iid)}") or {}
        return list(result.get("steps", []))

    def metrics(self) -> dict[str, Any]:
        return dict(self._call("GET", "/api/metrics") or {})

    def schedules(self, workflow: str | None) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/schedules", query={"workflow": workflow}) or [])

    def control(self, wf: str, iid: str, action: str, **kw: Any) -> None:
        base = f"/api/workflows/{_q(wf)}/instances/{_q(iid)}"
        if action == "event":
            self._call("POST", f"{base}/events/{_q(kw['type'])}", kw.get("payload"))
        else:
            body: dict[str, Any] = {"status": action}
            if kw.get("from_step"):
                body["from_step"] = kw["from_step"]
            if kw.get("rollback"):
                body["rollback"] = True
            self._call("PATCH", f"{base}/status", body)


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


# -- commands -----------------------------------------------------------------------


class _Ctx:
    def __init__(self, target: _Local | _Remote, as_json: bool, token: str | None) -> None:
        self.target = target
        self.json = as_json
        self.token = token

    def emit(self, data: Any, table: str) -> None:
        click.echo(json.dumps(_plain(data), indent=2) if self.json else table)


#: Printed when the token is given on the command line.
TOKEN_ARGV_WARNING = (
    "actorflow: warning: --token puts the token on the command line, where every user of "
    "this machine can read it (ps, /proc/PID/cmdline) and the shell keeps it in its "
    "history; set ACTORFLOW_TOKEN or use --token-file PATH instead"
)
_TOKEN_HELP = (
    "Bearer token. Visible to other users in ps: prefer ACTORFLOW_TOKEN "
    "(read when this is not given) or --token-file."
)
_TOKEN_FILE_HELP = "Read the bearer token from this file (surrounding whitespace is ignored)."


def _token(ctx: click.Context, token: str | None, token_file: str | None) -> str | None:
    """The token from ``--token-file``, ``--token`` (with a warning) or ``ACTORFLOW_TOKEN``."""
    on_argv = ctx.get_parameter_source("token") is ParameterSource.COMMANDLINE
    if token_file is not None:
        if on_argv:
            raise click.UsageError("give the token with --token-file or --token, not both")
        try:
            with open(token_file, encoding="utf-8") as f:
                token = f.read().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise click.BadParameter(
                f"cannot read {token_file}: {e}", param_hint="--token-file"
            ) from None
        if not token:
            raise click.BadParameter(f"{token_file} is empty", param_hint="--token-file")
        return token
    if on_argv:
        click.echo(TOKEN_ARGV_WARNING, err=True)
    return token or None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--data",
    default="./actorflow-data",
    show_default=True,
    envvar="ACTORFLOW_DATA",
    help="The data directory, or a postgresql:// URL.",
)
@click.option(
    "--url",
    default=None,
    envvar="ACTORFLOW_URL",
    help="A running runtime's HTTP API (actorflow serve), instead of --data.",
)
@click.option("--token", default=None, envvar="ACTORFLOW_TOKEN", help=_TOKEN_HELP)
@click.option("--token-file", default=None, type=click.Path(dir_okay=False), help=_TOKEN_FILE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of tables.")
@click.pass_context
def cli(
    ctx: click.Context,
    data: str,
    url: str | None,
    token: str | None,
    token_file: str | None,
    as_json: bool,
) -> None:
    """Inspect and control actorflow workflow instances."""
    token = _token(ctx, token, token_file)
    target: _Local | _Remote = _Remote(url, token) if url else _Local(data)
    ctx.obj = _Ctx(target, as_json, token)


@cli.command("list")
@click.option("--workflow", "-w", default=None, help="Only this workflow.")
@click.option("--status", "-s", default=None, type=click.Choice(STATUSES), help="Only this status.")
@click.option("--limit", "-n", default=50, show_default=True, type=click.IntRange(1))
@click.option("--cursor", default=None, help="The cursor printed after the previous page.")
@click.pass_obj
def list_cmd(
    obj: _Ctx, workflow: str | None, status: str | None, limit: int, cursor: str | None
) -> None:
    """List instances, newest first."""
    page = obj.target.instances(workflow, status, limit, cursor)
    rows = [
        [r["workflow"], r["id"], r["status"], r.get("created") or ""] for r in page["instances"]
    ]
    table = format_table(rows, ["workflow", "id", "status", "created"])
    if page["cursor"]:
        table += f"\n(more: --cursor {page['cursor']})"
    obj.emit(page, table)


def _emit_fields(obj: _Ctx, doc: dict[str, Any], skip: tuple[Any, ...]) -> None:
    """Prints a document as a field/value table (its JSON with ``--json``)."""
    rows = [
        [k, json.dumps(_plain(v)) if not isinstance(v, str) else v]
        for k, v in doc.items()
        if not any(v == empty for empty in skip)
    ]
    obj.emit(doc, format_table(rows, ["field", "value"]))


@cli.command()
@click.argument("workflow")
@click.argument("instance_id")
@click.pass_obj
def status(obj: _Ctx, workflow: str, instance_id: str) -> None:
    """Show an instance's status, output and error."""
    _emit_fields(obj, obj.target.status(workflow, instance_id), skip=(None,))


@cli.command()
@click.argument("workflow")
@click.argument("instance_id")
@click.pass_obj
def describe(obj: _Ctx, workflow: str, instance_id: str) -> None:
    """Describe an instance: status, times, params, output, error, waits and steps."""
    _emit_fields(obj, obj.target.describe(workflow, instance_id), skip=(None, []))


@cli.command()
@click.argument("workflow")
@click.argument("instance_id")
@click.pass_obj
def history(obj: _Ctx, workflow: str, instance_id: str) -> None:
    """Show an instance's event log, oldest first."""
    events = obj.target.history(workflow, instance_id)
    rows = [
        [
            e.get("timestamp") or "",
            e["type"],
            e.get("step") or "",
            str(e.get("attempt") or ""),
            _brief(e.get("data")),
        ]
        for e in events
    ]
    obj.emit(events, format_table(rows, ["time", "event", "step", "attempt", "data"]))


@cli.command()
@click.argument("workflow")
@click.argument("instance_id")
@click.pass_obj
def steps(obj: _Ctx, workflow: str, instance_id: str) -> None:
    """Show an instance's steps with their attempts."""
    recs = obj.target.steps(workflow, instance_id)
    rows = []
    for s in recs:
        atts = s.get("attempts") or []
        failed = sum(1 for a in atts if a.get("error"))
        err = s.get("error") or {}
        rows.append(
            [
                s["name"],
                str(s["count"]),
                s.get("kind") or s.get("type") or "",
                s["status"],
                str(len(atts)),
                str(failed),
                _duration(s.get("start"), s.get("end")),
                f"{err.get('name')}: {err.get('message')}" if err else _brief(s.get("output")),
            ]
        )
    obj.emit(
        recs,
        format_table(
            rows,
            ["step", "count", "kind", "status", "attempts", "failed", "duration", "output / error"],
        ),
    )


@cli.command()
@click.pass_obj
def metrics(obj: _Ctx) -> None:
    """Show counts by status, rates, queue depths and commit latency."""
    m = obj.target.metrics()
    rows = [
        [k, f"{v:,.2f}" if isinstance(v, float) else _counts(v) if isinstance(v, dict) else str(v)]
        for k, v in m.items()
        if k != "workflows"
    ]
    for name, wm in (m.get("workflows") or {}).items():
        rows.append(
            [
                f"workflow {name}",
                f"{_counts(wm.get('counts') or {})}  queue={wm.get('queue_depth')}",
            ]
        )
    obj.emit(m, format_table(rows, ["figure", "value"]))


def _schedule_row(s: Any) -> dict[str, Any]:
    """A schedule (:class:`~actorflow.workflows.schedules.ScheduleSummary`) as JSON."""
    return {
        "workflow": s.workflow,
        "cron": s.cron,
        "next": iso(s.next),
        "last": iso(s.last),
        "last_instance": s.last_instance,
    }


@cli.command()
@click.option("--workflow", "-w", default=None, help="Only this workflow.")
@click.pass_obj
def schedules(obj: _Ctx, workflow: str | None) -> None:
    """List the cron schedules (UTC) with their next and last ticks."""
    found = obj.target.schedules(workflow)
    rows = [
        [
            s["workflow"],
            s["cron"],
            s.get("next") or "",
            s.get("last") or "",
            s.get("last_instance") or "",
        ]
        for s in found
    ]
    obj.emit(found, format_table(rows, ["workflow", "cron", "next", "last", "last instance"]))


@cli.command("send-event")
@click.argument("workflow")
@click.argument("instance_id")
@click.argument("event_type")
@click.option("--payload", default=None, help="The event's payload, as JSON.")
@click.pass_obj
def send_event(
    obj: _Ctx, workflow: str, instance_id: str, event_type: str, payload: str | None
) -> None:
    """Send an event to an instance."""
    try:
        value = None if payload is None else json.loads(payload)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint="--payload") from None
    obj.target.control(workflow, instance_id, "event", type=event_type, payload=value)
    obj.emit({"ok": True}, f"sent {event_type!r} to {workflow}/{instance_id}")


def _action(name: str, doc: str) -> None:
    @click.argument("workflow")
    @click.argument("instance_id")
    @click.pass_obj
    def command(obj: _Ctx, workflow: str, instance_id: str, **kw: Any) -> None:
        obj.target.control(workflow, instance_id, name, **kw)
        obj.emit({"ok": True}, f"{name}: {workflow}/{instance_id}")

    command.__doc__ = doc
    if name == "restart":
        command = click.option(
            "--from-step", default=None, help="Keep the steps before this step."
        )(command)
    if name == "terminate":
        command = click.option(
            "--rollback",
            is_flag=True,
            default=False,
            help="Run the rollback handlers of the completed steps first (once the "
            "workflow's runtime runs the instance).",
        )(command)
    cli.command(name)(command)


_action("pause", "Pause an instance.")
_action("resume", "Resume a paused instance.")
_action("terminate", "Terminate an instance for good.")
_action("restart", "Run an instance again from the start (or from a step).")


@cli.command()
@click.option(
    "--app", default=None, help="pkg.module:factory building the Runtime (with its registrations)."
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8787, show_default=True, type=int)
@click.option("--token", default=None, envvar="ACTORFLOW_TOKEN", help=_TOKEN_HELP)
@click.option("--token-file", default=None, type=click.Path(dir_okay=False), help=_TOKEN_FILE_HELP)
@click.pass_context
def serve(
    ctx: click.Context,
    app: str | None,
    host: str,
    port: int,
    token: str | None,
    token_file: str | None,
) -> None:
    """Serve the HTTP API and dashboard of a runtime.

    With a token, every API request must carry it; without one, the server
    binds loopback only.
    """
    token = _token(ctx, token, token_file)
    if token is None and isinstance(ctx.obj, _Ctx):
        token = ctx.obj.token
    try:
        http = importlib.import_module("actorflow.http")
    except ImportError as e:
        raise click.ClickException(
            f"the HTTP API is not available ({e}); install actorflow[serve]"
        ) from None
    data = ctx.parent.params["data"] if ctx.parent else "./actorflow-data"
    if app:
        # The same contract as NodeProcess: factory(data_dir) -> Runtime.
        mod_name, _, attr = app.partition(":")
        factory = getattr(importlib.import_module(mod_name), attr or "create_runtime")
        rt = factory(data)
    else:
        rt = Runtime(data)
        names = sorted(rt.metrics().workflows)
        for name in names:
            rt.unregistered(name, listed=True)
        click.echo(
            f"serving {data} without --app: its workflows ({', '.join(names) or 'none'})"
            " can be read and controlled, but nothing runs; pass --app "
            "pkg.module:factory to run them",
            err=True,
        )
    try:
        http.serve(rt, host=host, port=port, token=token)
    except ValueError as e:  # a public address without a token
        raise click.ClickException(str(e)) from None
    finally:
        rt.close()


@cli.command(
    context_settings={
        "ignore_unknown_options": True,
        "allow_extra_args": True,
        "help_option_names": [],
    }
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def bench(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run the benchmarks (arguments go to actorflow.bench; try `bench --help`)."""
    mod = importlib.import_module("actorflow.bench")
    ctx.exit(mod.main(list(args)))


def _counts(counts: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"


def _brief(value: Any, width: int = 60) -> str:
    if value in (None, {}, []):
        return ""
    text = value if isinstance(value, str) else json.dumps(_plain(value))
    return text if len(text) <= width else text[: width - 3] + "..."


def _duration(start: str | None, end: str | None) -> str:
    if not start or not end:
        return ""
    ms = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() * 1000
    return f"{ms:,.0f} ms"


def main(argv: list[str] | None = None) -> int:
    """Runs the command; returns its exit status."""
    try:
        code = cli.main(args=argv, prog_name="actorflow", standalone_mode=False)
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except ActorflowError as e:  # a read of a damaged or crafted record, for one
        click.ClickException(f"{type(e).__name__}: {e}").show()
        return 1
    except click.exceptions.Abort:
        click.echo("Aborted!", err=True)
        return 1
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
