"""The ``actorflow`` command: inspect and control workflow instances, serve, benchmark.

    actorflow [--data DIR | --url URL [--token-file PATH]] [--json] COMMAND ...

    list [--workflow W] [--status S] [--limit N] [--cursor C]
    status WORKFLOW ID          describe WORKFLOW ID         history WORKFLOW ID
    steps WORKFLOW ID
    send-event WORKFLOW ID TYPE [--payload JSON]
    pause | resume | terminate | delete WORKFLOW (ID... | --status S)
    restart WORKFLOW (ID... | --status S) [--from-step NAME]
    fork WORKFLOW ID AT_STEP [--count N] [--id NEW] [--params JSON] [--override NAME=JSON]...
    diff WORKFLOW A B           the steps whose outputs differ between two instances
    metrics
    schedules [--workflow W]    the cron schedules, with their next tick
    replay-check MODULE:CLASS [--data DIR] [--workflow W] [--limit N]
                                replays recorded instances against the code (exit 1 if
                                any diverges)
    serve [--app pkg.mod:factory] [--host H] [--port P] [--token-file PATH]
    bench ...                   (arguments go to ``actorflow.bench``)

With ``--data`` (the default, ``./actorflow-data``) it works on a data
directory. Reads are always safe: LMDB readers never block or disturb a
writer. Changes (``send-event``, ``pause``, ...) need the directory to be
closed: while a runtime holds it open, they are refused, and ``--url``
sends them to that runtime's HTTP API (``actorflow serve``) instead. On a
closed directory they write the same durable records as the Python API, so
the next runtime that registers the workflow continues from them. ``delete``
removes instances and every record of them for good (``Instance.delete``);
their ids can be created again. ``fork`` makes a new instance that replays
an instance's steps before a step (``Instance.fork``); ``diff`` compares the
steps of two instances and exits 1 if they differ.

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
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, is_dataclass
from datetime import datetime
from typing import Any, TypeVar

import click
from click.core import ParameterSource

from actorflow.core.errors import ActorflowError, DataDirectoryLocked, InstanceNotFound
from actorflow.runtime import OWNER_LOCK, Runtime, is_database_url
from actorflow.workflows.definition import STATUSES
from actorflow.workflows.handles import MAX_DELETE_BATCH, WorkflowBinding
from actorflow.workflows.query import (
    LISTED_STATUSES,
    STATUS_FIELDS,
    Query,
    document,
    history_document,
    schedule_document,
    step_document,
    summary_document,
)
from actorflow.workflows.replay import replay_check

__all__ = ["cli", "format_table", "main"]

T = TypeVar("T")

_ACTIONS = ("pause", "resume", "terminate", "restart", "delete")


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


class _BadInput(click.ClickException):
    """A command error that exits with status 2 (what it was given cannot be used)."""

    exit_code = 2


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
            rows = [summary_document(r) for r in page.rows]
            return {"instances": rows, "cursor": page.next}

    def status(self, wf: str, iid: str) -> dict[str, Any]:
        with self._query(wf, iid) as q:
            return q.status_document(wf, iid)

    def describe(self, wf: str, iid: str) -> dict[str, Any]:
        with self._query(wf, iid) as q:
            return document(q.describe(wf, iid))

    def history(self, wf: str, iid: str) -> list[dict[str, Any]]:
        with self._query(wf, iid) as q:
            return history_document(q.history(wf, iid))

    def steps(self, wf: str, iid: str) -> list[dict[str, Any]]:
        with self._query(wf, iid) as q:
            return [step_document(s) for s in q.steps(wf, iid)]

    def exports(self, wf: str, limit: int | None) -> list[dict[str, Any]]:
        """The exported documents of the newest ``limit`` instances of ``wf`` (None: all).

        Raises:
            click.ClickException: (exit status 2) the directory has no instance of ``wf``.
        """
        with self._query() as q:
            names = q.workflows()
            if wf not in names:
                raise _BadInput(
                    f"{self.data} has no instance of workflow {wf!r} (it has: "
                    f"{', '.join(names) or 'none'}); name it with --workflow"
                )
            docs = []
            for iid in q.ids(wf, limit=limit):
                try:
                    docs.append(q.export(wf, iid))
                except InstanceNotFound:
                    continue  # deleted meanwhile
            return docs

    def metrics(self) -> dict[str, Any]:
        """What the directory itself tells: counts, queue depths, timers (rates live in
        the process that runs the workflows: ask it with ``--url``)."""
        with self._query() as q:
            workflows: dict[str, dict[str, Any]] = {}
            for wf in q.workflows():
                counts = {s: n for s, n in q.counts(wf).items() if n}
                by_key, nkeys = q.queued_by_key(wf)
                workflows[wf] = {
                    "name": wf,
                    "counts": counts,
                    "queue_depth": q.queue_depth(wf),
                    "queued_by_key": by_key,
                    "queued_keys": nkeys,
                }
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
            return [schedule_document(s) for s in q.schedules(workflow)]

    def ids(self, workflow: str, status: str) -> list[str]:
        with self._query() as q:
            return q.ids(workflow, status, limit=None)

    def counts(self) -> dict[str, dict[str, int]]:
        """Each workflow's instance counts by status."""
        with self._query() as q:
            return {wf: q.counts(wf) for wf in q.workflows()}

    def control(self, wf: str, ids: Sequence[str], action: str, **kw: Any) -> list[tuple[str, str]]:
        """Applies ``action`` to each instance; returns the ``(id, error)`` of those refused."""
        refused = []
        with _exclusive(self.data), _ToolRuntime(self.data) as rt:
            binding = rt.unregistered(wf)
            if action == "delete":
                return _delete_batches(binding, ids)
            for iid in _progress(ids, action):
                try:
                    _apply(binding.get(iid), action, kw)
                except ActorflowError as e:
                    refused.append((iid, f"{type(e).__name__}: {e}"))
        return refused

    def fork(self, wf: str, iid: str, **kw: Any) -> dict[str, Any]:
        """Forks instance ``iid`` (see ``Instance.fork``); returns the fork's document."""
        with _exclusive(self.data), _ToolRuntime(self.data) as rt:
            binding = rt.unregistered(wf)
            try:
                fork = binding.get(iid).fork(
                    kw["at_step"], id=kw["id"], params=kw["params"], overrides=kw["overrides"]
                )
            except (ActorflowError, ValueError, TypeError) as e:
                raise click.ClickException(f"{type(e).__name__}: {e}") from None
            d = fork.describe()
            return {
                "id": fork.id,
                "workflow": wf,
                "status": d.status,
                "forked_from": d.forked_from,
            }


def _delete_batches(binding: WorkflowBinding, ids: Sequence[str]) -> list[tuple[str, str]]:
    """Deletes ``ids`` with ``binding.delete_batch``, 100 at a time; returns the refused."""
    refused = []
    shown = _Progress(len(ids), "delete")
    try:
        for at in range(0, len(ids), MAX_DELETE_BATCH):
            chunk = ids[at : at + MAX_DELETE_BATCH]
            got = binding.delete_batch(chunk)
            refused += [(e["id"], f"{e['name']}: {e['message']}") for e in got["errors"]]
            shown.advance(len(chunk))
    finally:
        shown.close()
    return refused


def _apply(inst: Any, action: str, kw: dict[str, Any]) -> None:
    if action == "event":
        inst.send_event(kw["type"], kw.get("payload"))
    elif action == "restart":
        inst.restart(from_step=kw.get("from_step"))
    elif action == "terminate" and kw.get("rollback"):
        inst.terminate(rollback=True)
    else:
        getattr(inst, action)()


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
        if data is not None or method != "GET":
            # The API takes a change only with this header, even without a body.
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

    def instances(
        self, workflow: str | None, status: str | None, limit: int, cursor: str | None
    ) -> dict[str, Any]:
        if workflow is None:
            rows: list[dict[str, Any]] = []
            for wf in self.counts():
                rows += self.instances(wf, status, limit, None)["instances"]
            rows.sort(key=lambda r: r.get("created_on") or "", reverse=True)
            return {"instances": rows[:limit], "cursor": None}
        env = self._call(
            "GET",
            f"/api/workflows/{_q(workflow)}/instances",
            query={"status": status, "limit": limit, "cursor": cursor},
            envelope=True,
        )
        rows = list(env.get("result") or [])
        return {"instances": rows, "cursor": (env.get("result_info") or {}).get("cursor")}

    def status(self, wf: str, iid: str) -> dict[str, Any]:
        result = self._call("GET", f"/api/workflows/{_q(wf)}/instances/{_q(iid)}") or {}
        return {k: result.get(k) for k in STATUS_FIELDS}

    def describe(self, wf: str, iid: str) -> dict[str, Any]:
        result = self._call("GET", f"/api/workflows/{_q(wf)}/instances/{_q(iid)}") or {}
        return dict(result.get("description") or {})

    def history(self, wf: str, iid: str) -> list[dict[str, Any]]:
        return list(self._call("GET", f"/api/workflows/{_q(wf)}/instances/{_q(iid)}/history") or [])

    def steps(self, wf: str, iid: str) -> list[dict[str, Any]]:
        result = self._call("GET", f"/api/workflows/{_q(wf)}/instances/{_q(iid)}") or {}
        return list(result.get("steps", []))

    def metrics(self) -> dict[str, Any]:
        """The served runtime's metrics: the directory's figures and its live rates."""
        got = self._call("GET", "/api/metrics") or {}
        if got.get("source") == "runtime":
            return dict(got.get("metrics") or {})
        by_wf = (got.get("metrics") or {}).get("instances_by_status") or {}
        total: dict[str, int] = {}
        for counts in by_wf.values():
            for st, n in counts.items():
                total[st] = total.get(st, 0) + n
        return {
            "workflows": {
                wf: {"name": wf, "counts": {k: v for k, v in c.items() if v}}
                for wf, c in by_wf.items()
            },
            "counts": {k: v for k, v in total.items() if v},
        }

    def schedules(self, workflow: str | None) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/schedules", query={"workflow": workflow}) or [])

    def counts(self) -> dict[str, dict[str, int]]:
        """Each workflow's instance counts by status."""
        rows = self._call("GET", "/api/workflows") or []
        return {r["name"]: dict(r.get("counts") or {}) for r in rows if isinstance(r, dict)}

    def ids(self, workflow: str, status: str) -> list[str]:
        out: list[str] = []
        cursor = None
        while True:
            env = self._call(
                "GET",
                f"/api/workflows/{_q(workflow)}/instances",
                query={"status": status, "limit": _PAGE, "cursor": cursor},
                envelope=True,
            )
            out += [r["id"] for r in env.get("result") or []]
            cursor = (env.get("result_info") or {}).get("cursor")
            if not cursor:
                return out

    def control(self, wf: str, ids: Sequence[str], action: str, **kw: Any) -> list[tuple[str, str]]:
        """Applies ``action`` to each instance; returns the ``(id, error)`` of those refused."""
        refused = []
        for iid in _progress(ids, action):
            base = f"/api/workflows/{_q(wf)}/instances/{_q(iid)}"
            try:
                if action == "event":
                    self._call("POST", f"{base}/events/{_q(kw['type'])}", kw.get("payload"))
                elif action == "delete":
                    self._call("DELETE", base)
                else:
                    body: dict[str, Any] = {"status": action}
                    if kw.get("from_step"):
                        body["from_step"] = kw["from_step"]
                    if kw.get("rollback"):
                        body["rollback"] = True
                    self._call("PATCH", f"{base}/status", body)
            except click.ClickException as e:
                refused.append((iid, e.message))
        return refused

    def fork(self, wf: str, iid: str, **kw: Any) -> dict[str, Any]:
        """Forks instance ``iid`` through the HTTP API; returns the fork's document."""
        body = {k: v for k, v in kw.items() if v is not None}
        path = f"/api/workflows/{_q(wf)}/instances/{_q(iid)}/fork"
        return dict(self._call("POST", path, body) or {})


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
@click.option("--all", "every", is_flag=True, help="Every instance, read page by page.")
@click.pass_obj
def list_cmd(
    obj: _Ctx,
    workflow: str | None,
    status: str | None,
    limit: int,
    cursor: str | None,
    every: bool,
) -> None:
    """List instances, newest first."""
    page = (
        _list_all(obj, workflow, status)
        if every
        else obj.target.instances(workflow, status, limit, cursor)
    )
    rows = [
        [r["workflow"], r["id"], r["status"], r.get("created_on") or ""] for r in page["instances"]
    ]
    table = format_table(rows, ["workflow", "id", "status", "created"])
    if page["cursor"]:
        table += f"\n(more: --cursor {page['cursor']})"
    obj.emit(page, table)


def _list_all(obj: _Ctx, workflow: str | None, status: str | None) -> dict[str, Any]:
    """Every instance (of ``workflow``, in ``status``), newest first, with progress."""
    counts = obj.target.counts()
    names = [workflow] if workflow is not None else sorted(counts)
    total = sum(
        n
        for wf in names
        for st, n in (counts.get(wf) or {}).items()
        if status is None or st == status
    )
    shown = _Progress(total, "list")
    rows: list[dict[str, Any]] = []
    try:
        for wf in names:
            cursor = None
            while True:
                page = obj.target.instances(wf, status, _PAGE, cursor)
                rows += page["instances"]
                shown.advance(len(page["instances"]))
                cursor = page["cursor"]
                if not cursor:
                    break
    finally:
        shown.close()
    if workflow is None:
        rows.sort(key=lambda r: r.get("created_on") or "", reverse=True)
    return {"instances": rows, "cursor": None}


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


_FULL_HELP = "Show values whole instead of cutting them to fit a line."


@cli.command()
@click.argument("workflow")
@click.argument("instance_id")
@click.option("--full", is_flag=True, help=_FULL_HELP)
@click.pass_obj
def history(obj: _Ctx, workflow: str, instance_id: str, full: bool) -> None:
    """Show an instance's event log, oldest first."""
    events = obj.target.history(workflow, instance_id)
    width = None if full else _BRIEF
    rows = [
        [
            e.get("timestamp") or "",
            e["type"],
            e.get("step") or "",
            str(e.get("attempt") or ""),
            _brief(e.get("data"), width),
        ]
        for e in events
    ]
    obj.emit(events, format_table(rows, ["time", "event", "step", "attempt", "data"]))


@cli.command()
@click.argument("workflow")
@click.argument("instance_id")
@click.option("--full", is_flag=True, help=_FULL_HELP)
@click.pass_obj
def steps(obj: _Ctx, workflow: str, instance_id: str, full: bool) -> None:
    """Show an instance's steps with their attempts."""
    recs = obj.target.steps(workflow, instance_id)
    width = None if full else _BRIEF
    rows = []
    for s in recs:
        atts = s.get("attempts") or []
        failed = sum(1 for a in atts if a.get("error"))
        err = s.get("error") or {}
        rows.append(
            [
                s["name"],
                str(s["count"]),
                s.get("type") or "",
                s["status"],
                str(len(atts)),
                str(failed),
                _duration(s.get("start"), s.get("end")),
                f"{err.get('name')}: {err.get('message')}"
                if err
                else _brief(s.get("output"), width),
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
        for figure in ("queued_by_key", "running_by_key"):
            if wm.get(figure):
                rows.append([f"  {figure}", " ".join(f"{k}={v}" for k, v in wm[figure].items())])
    obj.emit(m, format_table(rows, ["figure", "value"]))


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
    for _iid, error in obj.target.control(
        workflow, [instance_id], "event", type=event_type, payload=value
    ):
        raise click.ClickException(error)
    obj.emit({"ok": True}, f"sent {event_type!r} to {workflow}/{instance_id}")


def _action(name: str, doc: str) -> None:
    @click.argument("workflow")
    @click.argument("instance_ids", metavar="[ID]...", nargs=-1)
    @click.option(
        "--status",
        "-s",
        "select",
        default=None,
        type=click.Choice(LISTED_STATUSES),
        help="Every instance of the workflow in this status (instead of IDs).",
    )
    @click.pass_obj
    def command(
        obj: _Ctx, workflow: str, instance_ids: tuple[str, ...], select: str | None, **kw: Any
    ) -> None:
        if bool(instance_ids) == (select is not None):
            raise click.UsageError("give instance IDs or --status, not both nor neither")
        ids = list(instance_ids) if select is None else obj.target.ids(workflow, select)
        refused = obj.target.control(workflow, ids, name, **kw)
        if len(ids) == 1 and refused:
            raise click.ClickException(refused[0][1])
        for iid, error in refused:
            click.echo(f"{workflow}/{iid}: {error}", err=True)
        done = [i for i in ids if i not in {r[0] for r in refused}]
        if len(ids) == 1:
            table = f"{name}: {workflow}/{ids[0]}"
        else:
            table = f"{name}: {len(done):,} of {len(ids):,} instances of {workflow}"
        obj.emit({"ok": not refused, "done": done, "refused": dict(refused)}, table)
        if refused:
            raise click.exceptions.Exit(1)

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


_action("pause", "Pause instances (IDs, or every one in --status).")
_action("resume", "Resume paused instances.")
_action("terminate", "Terminate instances for good.")
_action("restart", "Run instances again from the start (or from a step).")
_action(
    "delete",
    "Delete instances and every record of them, for good (a live run is stopped "
    "first, without rollbacks); their ids can be created again.",
)


def _json_option(value: str, hint: str) -> Any:
    try:
        return json.loads(value)
    except ValueError as e:
        raise click.BadParameter(f"not JSON: {e}", param_hint=hint) from None


@cli.command()
@click.argument("workflow")
@click.argument("instance_id")
@click.argument("at_step")
@click.option(
    "--count",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Which occurrence of AT_STEP (a name used more than once).",
)
@click.option("--id", "new_id", default=None, help="The fork's id (default: a new uuid4).")
@click.option("--params", default=None, help="The fork's params, as JSON (default: the origin's).")
@click.option(
    "--override",
    "overrides",
    multiple=True,
    metavar="NAME=JSON",
    help="The output step NAME (a kept step, before AT_STEP) returns in the fork; repeatable.",
)
@click.pass_obj
def fork(
    obj: _Ctx,
    workflow: str,
    instance_id: str,
    at_step: str,
    count: int,
    new_id: str | None,
    params: str | None,
    overrides: tuple[str, ...],
) -> None:
    """Fork an instance: a new one that replays its steps before AT_STEP and runs the rest."""
    replaced: dict[str, Any] = {}
    for item in overrides:
        name, eq, value = item.partition("=")
        if not eq or not name:
            raise click.BadParameter(f"{item!r} is not NAME=JSON", param_hint="--override")
        replaced[name] = _json_option(value, "--override")
    doc = obj.target.fork(
        workflow,
        instance_id,
        at_step=at_step if count == 1 else {"name": at_step, "count": count},
        id=new_id,
        params=None if params is None else _json_option(params, "--params"),
        overrides=replaced or None,
    )
    step = f"{at_step!r}" + (f" (occurrence {count})" if count != 1 else "")
    obj.emit(doc, f"fork: {workflow}/{instance_id} at step {step} -> {workflow}/{doc['id']}")


@cli.command()
@click.argument("workflow")
@click.argument("a")
@click.argument("b")
@click.option("--full", is_flag=True, help=_FULL_HELP)
@click.pass_obj
def diff(obj: _Ctx, workflow: str, a: str, b: str, full: bool) -> None:
    """Show the steps (name, count) whose outputs differ between instances A and B.

    Steps present in only one of them are shown too. Exits 0 if none differ,
    1 if some do, 2 if an instance cannot be read.
    """
    try:
        steps_a, steps_b = obj.target.steps(workflow, a), obj.target.steps(workflow, b)
    except click.ClickException as e:
        raise _Unreadable(e.message) from None
    doc = _step_diff(workflow, a, b, steps_a, steps_b)
    width = None if full else _BRIEF
    rows = [
        [d["name"], str(d["count"]), "differs", _side(d["a"], width), _side(d["b"], width)]
        for d in doc["differ"]
    ]
    rows += [
        [d["name"], str(d["count"]), f"only in {a}", _side(d, width), ""] for d in doc["only_a"]
    ]
    rows += [
        [d["name"], str(d["count"]), f"only in {b}", "", _side(d, width)] for d in doc["only_b"]
    ]
    if rows:
        table = format_table(rows, ["step", "count", "change", a, b])
    else:
        table = f"{workflow}/{a} and {workflow}/{b}: the same {doc['same']} steps"
    obj.emit(doc, table)
    if rows:
        raise click.exceptions.Exit(1)


class _Unreadable(click.ClickException):
    """``diff``: an instance could not be read (exit status 2, as diff(1) has)."""

    exit_code = 2


def _step_diff(
    workflow: str, a: str, b: str, steps_a: list[dict[str, Any]], steps_b: list[dict[str, Any]]
) -> dict[str, Any]:
    """The steps (by name and count) whose outcome differs between two instances' step lists.

    Returns ``{"workflow", "a", "b", "differ": [{"name", "count", "a", "b"}],
    "only_a": [...], "only_b": [...], "same": n}``, each side (and each entry
    of ``only_*``) with the step's ``type``, ``status``, ``output`` and ``error``.
    """

    def side(s: dict[str, Any]) -> dict[str, Any]:
        return {k: s.get(k) for k in ("type", "status", "output", "error")}

    def keyed(steps: list[dict[str, Any]]) -> dict[tuple[str, int], dict[str, Any]]:
        return {(s["name"], s["count"]): s for s in steps if s.get("type") != "rollback"}

    in_a, in_b = keyed(steps_a), keyed(steps_b)
    differ, same = [], 0
    for key, sa in in_a.items():
        sb = in_b.get(key)
        if sb is None:
            continue
        if side(sa) == side(sb):
            same += 1
        else:
            differ.append({"name": key[0], "count": key[1], "a": side(sa), "b": side(sb)})
    return {
        "workflow": workflow,
        "a": a,
        "b": b,
        "differ": differ,
        "only_a": [
            {"name": k[0], "count": k[1], **side(s)} for k, s in in_a.items() if k not in in_b
        ],
        "only_b": [
            {"name": k[0], "count": k[1], **side(s)} for k, s in in_b.items() if k not in in_a
        ],
        "same": same,
    }


def _side(s: dict[str, Any], width: int | None) -> str:
    """One side of a diff row: the output of a complete step, else its status (and error)."""
    if s.get("status") == "complete":
        return _brief(s.get("output"), width) or "null"
    err = s.get("error") or {}
    return f"{s.get('status')}: {err.get('name')}" if err else str(s.get("status"))


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


def _workflow_class(target: str) -> type:
    """The class named by ``MODULE:CLASS`` (the current directory is on the path)."""
    mod_name, _, attr = target.partition(":")
    if not mod_name or not attr:
        raise _BadInput(f"{target!r}: give the workflow class as MODULE:CLASS")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise _BadInput(f"cannot load {target}: {type(e).__name__}: {e}") from None
    if not isinstance(obj, type):
        raise _BadInput(f"{target} is not a class")
    return obj


@cli.command("replay-check")
@click.argument("target", metavar="MODULE:CLASS")
@click.option("--data", "data", default=None, help="The data directory, or a postgresql:// URL.")
@click.option("--workflow", "-w", default=None, help="The workflow's name (default: the class's).")
@click.option("--limit", "-n", default=None, type=click.IntRange(1), help="The newest N instances.")
@click.pass_context
def replay_check_cmd(
    ctx: click.Context, target: str, data: str | None, workflow: str | None, limit: int | None
) -> None:
    """Replay the recorded instances of a workflow against its current code.

    No step body runs and nothing is written: each instance's recorded steps
    are fed back to the class's run. Exits 1 if any instance diverges.
    """
    obj: _Ctx = ctx.obj
    if data is None:
        if isinstance(obj.target, _Remote):
            raise _BadInput("replay-check reads a data directory: give --data, not --url")
        data = obj.target.data
    cls = _workflow_class(target)
    name = workflow or cls.__name__
    docs = _Local(data).exports(name, limit)
    try:
        reports = replay_check(cls, docs)
    except TypeError as e:
        raise _BadInput(f"{target}: {e}") from None
    rows = [
        [
            r.instance,
            "ok" if r.ok else "DIVERGED",
            str(r.steps),
            r.outcome if r.ok or r.divergence is None else r.divergence.describe(),
        ]
        for r in reports
    ]
    bad = sum(1 for r in reports if not r.ok)
    table = format_table(rows, ["instance", "result", "steps", "detail"])
    table += f"\n{len(reports) - bad} ok, {bad} diverged ({name}, {cls.__qualname__})"
    obj.emit({"workflow": name, "reports": [r.document() for r in reports]}, table)
    if bad:
        ctx.exit(1)


def _counts(counts: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(counts.items())) or "-"


_BRIEF = 60  # characters of a value in a table cell, unless --full
_PAGE = 1000  # instances per page when the command reads many
_PROGRESS_FROM = 50  # items from which a long operation shows its progress


class _Progress:
    """How far a long operation got, on stderr: a bar on a terminal, else a plain line
    at every tenth (for logs). Silent below ``_PROGRESS_FROM`` items."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = total, label, 0
        self._every = max(1, total // 10)
        self._bar: Any = None
        if total >= _PROGRESS_FROM and sys.stderr.isatty():
            self._bar = click.progressbar(
                length=total, label=label, file=sys.stderr, show_pos=True
            ).__enter__()

    def advance(self, n: int = 1) -> None:
        before, self.done = self.done, self.done + n
        if self._bar is not None:
            self._bar.update(n)
        elif self.total >= _PROGRESS_FROM and (
            self.done // self._every > before // self._every or self.done == self.total
        ):
            click.echo(f"{self.label}: {self.done:,}/{self.total:,}", err=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)


def _progress(items: Sequence[T], label: str) -> Iterator[T]:
    """Yields ``items``, showing how far it got (:class:`_Progress`)."""
    shown = _Progress(len(items), label)
    try:
        for item in items:
            yield item
            shown.advance()
    finally:
        shown.close()


def _brief(value: Any, width: int | None = _BRIEF) -> str:
    if value in (None, {}, []):
        return ""
    text = value if isinstance(value, str) else json.dumps(_plain(value))
    return text if width is None or len(text) <= width else text[: width - 3] + "..."


def _duration(start: str | None, end: str | None) -> str:
    if not start or not end:
        return ""
    ms = (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds() * 1000
    return f"{ms:,.0f} ms"


def _json_after_the_command(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    if value:
        ctx.find_object(_Ctx).json = True  # type: ignore[union-attr]


def _json_flags(group: click.Group) -> None:
    """Lets ``--json`` come after the command too (``actorflow list --json``)."""
    for name, command in group.commands.items():
        if name not in ("bench", "serve"):
            command.params.append(
                click.Option(
                    ["--json"],
                    is_flag=True,
                    expose_value=False,
                    callback=_json_after_the_command,
                    help="Print JSON instead of tables.",
                )
            )


_json_flags(cli)


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
