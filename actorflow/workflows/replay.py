"""The replay gate: exported instances, replayed against the current code.

:func:`export_document` turns an instance's records into a JSON document
(``inst.export()``, the ``actorflow replay-check`` command). :func:`replay_check`
replays such documents against a workflow class without running any step
body: a recorded result is given back, a recorded failure raised, a sleep or
an event wait returns its recorded outcome, and the replay stops cleanly where
the recording ends (a step not recorded, or recorded unfinished). Steps are
met by the engine's own rules (:class:`~actorflow.workflows.matching.StepMatcher`),
so the replay finds the divergences the engine would meet on a real replay:
a step renamed, removed, added, moved or of another kind.

Values in a document: JSON data (``None``, bool, int, finite float, str,
lists, dicts with str keys not starting with ``$``) is kept as it is; any
other value (a tuple, a datetime, a set, an object) becomes
``{"$pickle": "<base64 of pickle protocol 5>"}``, or ``{"$repr": "..."}`` if it
cannot be pickled (a replay then gets the repr string). Loading a ``$pickle``
unpickles it: replay only documents you made or trust.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import json
import math
import os
import pickle
import threading
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from actorflow.core.clock import to_datetime
from actorflow.core.errors import EventTimeoutError
from actorflow.workflows.definition import (
    Workflow,
    WorkflowEvent,
    WorkflowStepEvent,
    validate_step_name,
)
from actorflow.workflows.matching import (
    PATCH_KIND,
    Divergence,
    StepMatcher,
    StepRef,
)
from actorflow.workflows.records import stored_error
from actorflow.workflows.step import WorkflowStep
from actorflow.workflows.step_options import SENSITIVE_OUTPUT

__all__ = [
    "EXPORT_FORMAT",
    "Histories",
    "ReplayReport",
    "decode_value",
    "encode_value",
    "export_document",
    "load_histories",
    "replay_check",
]

#: The ``format`` of an exported instance document.
EXPORT_FORMAT = "actorflow.instance/1"
_MAX_DEPTH = 64


# -- values -----------------------------------------------------------------------


def _exact_json(value: Any, depth: int = 0) -> bool:
    """True if ``value`` comes back from JSON as an equal value of the same types."""
    if depth > _MAX_DEPTH:
        return False
    if value is None or type(value) in (bool, int, str):
        return True
    if type(value) is float:
        return math.isfinite(value)
    if type(value) is list:
        return all(_exact_json(v, depth + 1) for v in value)
    if type(value) is dict:
        return all(
            type(k) is str and not k.startswith("$") and _exact_json(v, depth + 1)
            for k, v in value.items()
        )
    return False


def encode_value(value: Any) -> Any:
    """A value as JSON data (see the module's docstring for the encoding)."""
    if _exact_json(value):
        return value
    try:
        return {"$pickle": base64.b64encode(pickle.dumps(value, protocol=5)).decode("ascii")}
    except Exception:
        return {"$repr": repr(value)}


def decode_value(data: Any) -> Any:
    """The value :func:`encode_value` encoded."""
    if type(data) is dict and len(data) == 1:
        if "$pickle" in data:
            # Trusted documents only (see the module's docstring).
            return pickle.loads(base64.b64decode(data["$pickle"]))
        if "$repr" in data:
            return str(data["$repr"])
    return data


def _iso(ms: int | None) -> str | None:
    return None if ms is None else to_datetime(ms / 1000).isoformat(timespec="milliseconds")


def _ms(iso: str | None) -> int | None:
    return None if iso is None else round(datetime.fromisoformat(iso).timestamp() * 1000)


# -- export -----------------------------------------------------------------------


def export_document(
    workflow: str,
    iid: str,
    status: str,
    record: dict[str, Any],
    steps: Iterable[dict[str, Any]],
    events: Iterable[dict[str, Any]],
    history: list[dict[str, Any]],
    loads: Callable[[bytes], Any],
    *,
    include_sensitive: bool = False,
) -> dict[str, Any]:
    """The JSON document of an instance, from its records (``inst.export()``).

    Args:
        workflow: The workflow's name.
        iid: The instance's id.
        status: Its status.
        record: Its instance record.
        steps: Its step records.
        events: Its buffered events (sent, not yet consumed by a wait).
        history: Its event log as JSON documents.
        loads: The runtime's serializer's ``loads``.
        include_sensitive: Export the outputs of ``sensitive="output"``
            (and redacted) steps; else they are ``"[REDACTED]"``.
    """
    out_steps = []
    for r in sorted(steps, key=lambda r: r["seq"]):
        kind = r["k"]
        doc: dict[str, Any] = {
            "kind": kind,
            "name": r["n"],
            "count": r["c"],
            "seq": r["seq"],
            "status": r["s"],
            "start": _iso(r.get("t0")),
            "end": _iso(r.get("t1")),
            "attempts": len(r.get("att", ())),
        }
        if r["s"] == "complete":
            if kind in ("do", "rollback") and r.get("r") is not None:
                cfg = r.get("cfg") or {}
                hidden = cfg.get("sensitive") == "output" or cfg.get("redact")
                if hidden and not include_sensitive:
                    doc["output"] = SENSITIVE_OUTPUT
                    doc["sensitive"] = True
                else:
                    doc["output"] = encode_value(loads(r["r"]))
            elif kind == "wait_for_event" and r.get("ev") is not None:
                data, ts = r["ev"]
                doc["event"] = {
                    "type": r.get("ty"),
                    "payload": encode_value(loads(data)),
                    "timestamp": _iso(ts),
                }
            elif kind == PATCH_KIND:
                doc["patched"] = bool(r.get("pa"))
        if kind == "wait_for_event":
            doc["event_type"] = r.get("ty")
        if r.get("dl") is not None:
            doc["deadline"] = _iso(r["dl"])
        if r.get("ed") is not None:
            doc["error"] = dict(r["ed"])
            if r.get("e") is not None:
                try:
                    doc["error_value"] = encode_value(loads(r["e"]))
                except Exception:
                    pass  # the error's name and message are there
        if r.get("dv"):
            doc["divergence"] = Divergence.from_record(r["dv"]).document()
        out_steps.append(doc)
    sch = record.get("sch")
    return {
        "format": EXPORT_FORMAT,
        "workflow": workflow,
        "id": iid,
        "status": status,
        "created": _iso(record["created"]),
        "params": encode_value(loads(record["params"])) if record.get("params") else None,
        "schedule": (
            {"cron": sch["c"], "scheduled_time": _iso(sch["t"])} if sch is not None else None
        ),
        "output": (
            encode_value(loads(record["output"]))
            if status == "complete" and record.get("output") is not None
            else None
        ),
        "error": record.get("error") if status == "errored" else None,
        "steps": out_steps,
        "events": [
            {"type": e["type"], "payload": encode_value(loads(e["p"])), "timestamp": _iso(e["ts"])}
            for e in events
        ],
        "history": history,
    }


#: What :func:`replay_check` takes: exported instances (``inst.export()``
#: documents), paths of JSON files or of directories of them, or one of these.
Histories = (
    Iterable[dict[str, Any] | str | os.PathLike[str]] | dict[str, Any] | str | os.PathLike[str]
)


def load_histories(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Reads exported instances from a JSON file, or from every ``*.json`` in a directory.

    A file holds one document (``inst.export()``) or a list of them.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: A file is not JSON, or holds no exported instance.
    """
    p = Path(path)
    files = sorted(p.glob("*.json")) if p.is_dir() else [p]
    out: list[dict[str, Any]] = []
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{f}: not JSON: {e}") from None
        for doc in data if isinstance(data, list) else [data]:
            _check_document(doc, str(f))
            out.append(doc)
    return out


def _check_document(doc: Any, where: str) -> None:
    if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
        raise ValueError(
            f"{where}: not an exported instance (inst.export(), format {EXPORT_FORMAT!r})"
        )


# -- the replay ----------------------------------------------------------------------


@dataclass(frozen=True)
class ReplayReport:
    """How the replay of one exported instance went.

    ``ok`` is False if the code diverged: then ``divergence`` says where
    (its ``position``, the ``expected`` recorded step and the step ``found``)
    and ``step`` names the step the code calls there (None: ``run`` ended
    where the recording has more steps). ``outcome`` says how the replay
    ended: ``"end of recording"`` (it reached a step the instance has not
    finished or not started), ``"returned"``, ``"raised <Error>: <message>"``
    (``run`` raised, as an instance that errored does) or ``"diverged"``.
    ``steps`` counts the recorded steps met.
    """

    workflow: str
    instance: str
    ok: bool
    outcome: str
    steps: int
    divergence: Divergence | None = None

    @property
    def step(self) -> str | None:
        """The name of the step where the code diverged (None: none, or the end of run)."""
        return self.divergence.step if self.divergence is not None else None

    def document(self) -> dict[str, Any]:
        """The report as JSON data (``actorflow replay-check --json``)."""
        return {
            "workflow": self.workflow,
            "instance": self.instance,
            "ok": self.ok,
            "outcome": self.outcome,
            "steps": self.steps,
            "step": self.step,
            "divergence": self.divergence.document() if self.divergence else None,
        }

    def __str__(self) -> str:
        head = f"{self.workflow}/{self.instance}"
        if self.ok:
            return f"{head}: ok ({self.outcome}, {self.steps} steps)"
        assert self.divergence is not None
        return f"{head}: diverged at {self.divergence.describe()}"


class _Stopped(BaseException):
    """Unwinds ``run`` in a replay (a BaseException: ``except Exception`` lets it by)."""


class _EndOfRecording(_Stopped):
    pass


class _Diverged(_Stopped):
    def __init__(self, dv: Divergence) -> None:
        super().__init__(dv.describe())
        self.dv = dv


class _Replay:
    """A :class:`~actorflow.workflows.step.StepRunner` that feeds recorded outcomes back."""

    def __init__(self, doc: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.doc = doc
        self.loop = loop
        self.wf = str(doc.get("workflow"))
        self.iid = str(doc.get("id"))
        self.steps: dict[StepRef, dict[str, Any]] = {}
        for s in doc.get("steps", ()):
            self.steps[(s["kind"], s["name"], int(s["count"]))] = s
        self.match = StepMatcher(
            (int(s["seq"]), s["kind"], s["name"], int(s["count"])) for s in doc.get("steps", ())
        )
        self.patches: dict[str, bool] = {
            s["name"]: bool(s.get("patched"))
            for s in doc.get("steps", ())
            if s["kind"] == PATCH_KIND
        }
        self.stop: _Stopped | None = None
        self.task: asyncio.Task[Any] | None = None
        self.run_thread: int | None = None
        self.main_coro: Coroutine[Any, Any, Any] | None = None
        self.met = 0

    @property
    def where(self) -> str:
        return f"workflow {self.wf!r}, instance {self.iid!r} (replay)"

    # -- meeting recorded steps ---------------------------------------------------

    def _sequential(self) -> bool:
        """The run's own flow, as in the engine (see ``Execution._sequential``)."""
        task = asyncio.current_task()
        if task is None:
            return False
        if task is self.task:
            return True
        return self.main_coro is not None and task.get_coro() is self.main_coro

    def _halt(self, stop: _Stopped) -> _Stopped:
        if self.stop is None:
            self.stop = stop
        return self.stop

    def _meet(self, kind: str, name: str) -> dict[str, Any]:
        """The recorded step of this call; raises at a divergence or the recording's end."""
        if self.stop is not None:
            raise self.stop  # run caught the unwinding and went on
        validate_step_name(name, self.where)
        m = self.match
        ref = (kind, name, m.count(kind, name))
        within = m.pos < m.n
        p = m.pos
        sequential = self._sequential()
        if within:
            dv = m.follow(ref, sequential)
            if dv is not None:
                raise self._halt(_Diverged(dv))
        rec = self.steps.get(ref)
        if rec is None:
            if within:
                raise self._halt(_Diverged(Divergence(p, None, ref, concurrent=not sequential)))
            raise self._halt(_EndOfRecording())
        if rec["status"] not in ("complete", "errored"):
            raise self._halt(_EndOfRecording())
        self.met += 1
        return rec

    def _error(self, rec: dict[str, Any]) -> BaseException:
        value = rec.get("error_value")
        decode = None if value is None else functools.partial(decode_value, value)
        return stored_error(decode, rec.get("error"), "step failed")

    # -- the StepRunner protocol ----------------------------------------------------

    async def do(
        self,
        name: str,
        fn: Callable[..., Any],
        retries: Any,
        timeout: Any,
        config: Any,
        resources: Any = None,
        rollback: Any = None,
        rollback_config: Any = None,
    ) -> Any:
        rec = self._meet("do", name)
        if rec["status"] == "errored":
            raise self._error(rec)
        return decode_value(rec.get("output"))

    async def sleep(self, name: str, duration: Any) -> None:
        rec = self._meet("sleep", name)
        if rec["status"] == "errored":
            raise self._error(rec)

    async def sleep_until(self, name: str, when: Any) -> None:
        await self.sleep(name, when)

    async def wait_for_event(self, name: str, event_type: str, timeout: Any) -> Any:
        rec = self._meet("wait_for_event", name)
        if rec["status"] == "errored":
            err = self._error(rec)
            if not isinstance(err, EventTimeoutError):
                err = EventTimeoutError(str(err), workflow=self.wf, instance=self.iid, step=name)
            raise err
        ev = rec.get("event") or {}
        ts = ev.get("timestamp")
        return WorkflowStepEvent(
            ev.get("type") or event_type,
            decode_value(ev.get("payload")),
            datetime.fromisoformat(ts) if ts else to_datetime(0),
        )

    async def gather(self, coros: list[Coroutine[Any, Any, Any]], limit: int | None) -> list[Any]:
        # The engine's own concurrency (Execution.gather): every coroutine in a task.
        if limit is not None and limit > 0:
            sem = asyncio.Semaphore(limit)

            async def bounded(c: Coroutine[Any, Any, Any]) -> Any:
                async with sem:
                    return await c

            return list(await asyncio.gather(*(bounded(c) for c in coros)))
        return list(await asyncio.gather(*coros))

    def block_on(self, coro: Coroutine[Any, Any, Any]) -> Any:
        if self.stop is not None:
            coro.close()
            raise self.stop
        if threading.get_ident() == self.run_thread:
            self.main_coro = coro
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def patched(self, patch_id: str) -> bool:
        if not isinstance(patch_id, str):
            raise TypeError(
                f"{self.where}: step.patched needs a patch id that is a str, "
                f"got {type(patch_id).__name__} {patch_id!r}"
            )
        validate_step_name(patch_id, f"{self.where}, patch {patch_id!r}")
        if patch_id not in self.patches:
            self.patches[patch_id] = not self.match.unreached(self.steps)
        return self.patches[patch_id]

    # -- driving ----------------------------------------------------------------------

    async def drive(self, cls: type[Workflow]) -> ReplayReport:
        self.task = asyncio.current_task()
        doc = self.doc
        sch = doc.get("schedule")
        event = WorkflowEvent(
            payload=decode_value(doc.get("params")),
            timestamp=datetime.fromisoformat(doc["created"]),
            instance_id=self.iid,
            workflow_name=self.wf,
            schedule=(
                {
                    "cron": sch["cron"],
                    "scheduled_time": datetime.fromisoformat(sch["scheduled_time"]),
                }
                if sch
                else None
            ),
        )
        obj = cls()
        outcome = "returned"
        try:
            if asyncio.iscoroutinefunction(cls.run):
                await obj.run(event, WorkflowStep(self, sync=False))
            else:
                pool = concurrent.futures.ThreadPoolExecutor(1, "actorflow-replay")
                try:
                    await self.loop.run_in_executor(
                        pool, self._run_sync, obj.run, event, WorkflowStep(self, sync=True)
                    )
                finally:
                    pool.shutdown(wait=False)
        except _Stopped:
            pass
        except Exception as e:
            outcome = f"raised {type(e).__name__}: {e}"
        stop = self.stop
        if isinstance(stop, _Diverged):
            return self._report(False, "diverged", stop.dv)
        if isinstance(stop, _EndOfRecording):
            return self._report(True, "end of recording")
        dv = self.match.finish()
        if dv is not None:
            return self._report(False, "diverged", dv)
        return self._report(True, outcome)

    def _run_sync(self, run: Callable[..., Any], event: WorkflowEvent, step: WorkflowStep) -> Any:
        self.run_thread = threading.get_ident()
        return run(event, step)

    def _report(self, ok: bool, outcome: str, dv: Divergence | None = None) -> ReplayReport:
        return ReplayReport(self.wf, self.iid, ok, outcome, self.met, dv)


def _replay_one(cls: type[Workflow], doc: dict[str, Any]) -> ReplayReport:
    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(_Replay(doc, loop).drive(cls))
    finally:
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()


def replay_check(
    workflow_cls: type[Workflow],
    histories: Histories,
) -> list[ReplayReport]:
    """Replays recorded instances against ``workflow_cls`` without running a step body.

    Args:
        workflow_cls: The workflow's class, as the code is now.
        histories: Exported instances (``inst.export()`` documents), paths of
            JSON files or directories of them (see :func:`load_histories`),
            or one of these.

    Returns:
        One report per instance, in order: ok, or the first divergence.

    Raises:
        TypeError: ``workflow_cls`` is not a subclass of ``actorflow.Workflow``.
        ValueError: A history is not an exported instance.
    """
    if not isinstance(workflow_cls, type) or not issubclass(workflow_cls, Workflow):
        raise TypeError("replay_check() needs a subclass of actorflow.Workflow")
    if isinstance(histories, dict | str | os.PathLike):
        histories = [histories]
    docs: list[dict[str, Any]] = []
    for h in histories:
        if isinstance(h, dict):
            _check_document(h, "history")
            docs.append(h)
        else:
            docs += load_histories(h)
    # A thread of its own: the caller may be on a running event loop.
    with concurrent.futures.ThreadPoolExecutor(1, "actorflow-replay-check") as pool:
        return [pool.submit(_replay_one, workflow_cls, d).result() for d in docs]
