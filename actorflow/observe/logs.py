"""Logging: one standard ``logging`` logger per subsystem, quiet by default.

actorflow logs through the standard library, under the ``actorflow``
logger, which has a ``NullHandler``: nothing is printed unless the
application configures logging. The subsystems log under
``actorflow.<name>`` (see :data:`SUBSYSTEMS`).

Levels: ``DEBUG`` for the normal life of instances and objects (a run
starts or ends, a control message, a failed attempt that will be retried);
``WARNING`` and above only for real problems (an instance's actor crashed,
a write failed, the engine loop died). A healthy runtime logs nothing above
``DEBUG``.

Records about an instance carry structured fields (``extra=``):
``workflow``, ``instance`` and, where it applies, ``step``, ``attempt`` and
``outcome``. :class:`StructuredFormatter` prints them; :func:`configure`
installs it::

    actorflow.logs.configure("DEBUG", json=True)
"""

from __future__ import annotations

import json
import logging
import sys
from typing import IO, Any

__all__ = ["FIELDS", "SUBSYSTEMS", "StructuredFormatter", "configure", "fields"]

#: The loggers of actorflow's subsystems.
SUBSYSTEMS = (
    "actorflow.actors",
    "actorflow.engine",
    "actorflow.objects",
    "actorflow.router",
    "actorflow.runtime",
    "actorflow.storage",
    "actorflow.supervisor",
    "actorflow.timers",
)
#: Structured fields a record may carry (``record.<field>``).
FIELDS = ("workflow", "instance", "step", "attempt", "outcome", "namespace", "object")


def fields(**values: Any) -> dict[str, Any]:
    """Returns the ``extra=`` mapping of a record's structured fields (None values dropped)."""
    return {k: v for k, v in values.items() if v is not None}


class StructuredFormatter(logging.Formatter):
    """Formats records with their structured fields.

    Args:
        json_lines: One JSON object per record instead of text with
            ``key=value`` pairs.
    """

    def __init__(self, json_lines: bool = False) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json_lines = json_lines

    def format(self, record: logging.LogRecord) -> str:
        found = {f: getattr(record, f) for f in FIELDS if hasattr(record, f)}
        if self.json_lines:
            out: dict[str, Any] = {
                "time": self.formatTime(record),
                "level": record.levelname,
                "logger": record.name,
                "message": record.getMessage(),
                **found,
            }
            if record.exc_info:
                out["exc"] = self.formatException(record.exc_info)
            return json.dumps(out, default=str)
        text = super().format(record)
        if found:
            text += " " + " ".join(f"{k}={v}" for k, v in found.items())
        return text


def configure(
    level: int | str = "INFO", *, json: bool = False, stream: IO[str] | None = None
) -> logging.Handler:
    """Prints actorflow's records at ``level`` and above to ``stream`` (default stderr).

    Returns the handler installed on the ``actorflow`` logger (remove it with
    ``logging.getLogger("actorflow").removeHandler(handler)``).
    """
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(StructuredFormatter(json_lines=json))
    logger = logging.getLogger("actorflow")
    logger.addHandler(handler)
    logger.setLevel(level)
    return handler
