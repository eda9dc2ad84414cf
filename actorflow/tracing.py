"""OpenTelemetry tracing of workflow runs (implemented in :mod:`actorflow.observe.tracing`)."""

from actorflow.observe.tracing import *  # noqa: F403
from actorflow.observe.tracing import __all__  # noqa: F401
