"""Fixtures for the pytest-benchmark suites: a runtime on a fresh data directory."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import actorflow as af


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[af.Runtime]:
    """A runtime with fsync on (the default), as users run it."""
    rt = af.Runtime(tmp_path / "data")
    yield rt
    rt.close()
