"""Structured logging for actorflow (the implementation is :mod:`actorflow.observe.logs`)."""

from actorflow.observe.logs import *  # noqa: F403
from actorflow.observe.logs import __all__  # noqa: F401
