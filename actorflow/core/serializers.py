"""Serializers: how values become the bytes that storage holds, and back.

A serializer is chosen per runtime (``Runtime(serializer=...)``) and runs in
the caller's thread, so an unserializable value raises
:class:`~actorflow.core.errors.SerializationError` before anything is written.
"""

from __future__ import annotations

import json
import pickle
from typing import Any, Protocol

import cloudpickle

from actorflow.core.errors import SerializationError

__all__ = ["JsonSerializer", "PickleSerializer", "Serializer"]


class Serializer(Protocol):
    """Turns values into bytes and back. Must be thread-safe."""

    name: str

    def dumps(self, value: Any) -> bytes:
        """Returns the bytes of ``value``; raises SerializationError if it cannot."""
        ...

    def loads(self, data: bytes) -> Any:
        """Returns the value of ``data``."""
        ...


class PickleSerializer:
    """The default: pickle (fast), falling back to cloudpickle for closures,
    lambdas and local classes, which plain pickle cannot serialize."""

    name = "pickle"

    def dumps(self, value: Any) -> bytes:
        try:
            return pickle.dumps(value, protocol=5)
        except Exception:
            pass
        try:
            return cloudpickle.dumps(value, protocol=5)
        except Exception as exc:
            raise SerializationError(
                f"value of type {type(value).__name__} cannot be serialized: {exc}"
            ) from None

    def loads(self, data: bytes) -> Any:
        try:
            return pickle.loads(data)
        except Exception as exc:
            raise SerializationError(f"stored value cannot be deserialized: {exc}") from None


class JsonSerializer:
    """Portable JSON values (dicts, lists, str, numbers, bool, None)."""

    name = "json"

    def dumps(self, value: Any) -> bytes:
        try:
            return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"value of type {type(value).__name__} is not JSON-serializable: {exc}"
            ) from None

    def loads(self, data: bytes) -> Any:
        return json.loads(data)
