"""The collector's thresholds are the process's: a runtime raises them, never restores them."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest

import actorflow as af
from actorflow.runtime import GC_THRESHOLD


@pytest.fixture
def interpreter_default() -> Iterator[None]:
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    yield
    gc.set_threshold(*before)


@pytest.mark.usefixtures("interpreter_default")
def test_closing_one_runtime_leaves_the_collector_of_another_alone(tmp_path: Path) -> None:
    first = af.Runtime(tmp_path / "a")
    assert gc.get_threshold() == GC_THRESHOLD
    with af.Runtime(tmp_path / "b"):
        first.close()
        assert gc.get_threshold() == GC_THRESHOLD  # the second one still runs on it
    assert gc.get_threshold() == GC_THRESHOLD  # nobody owns it: nothing is put back


@pytest.mark.usefixtures("interpreter_default")
def test_a_runtime_never_lowers_a_threshold(tmp_path: Path) -> None:
    gc.set_threshold(5_000_000, 5, 500)
    with af.Runtime(tmp_path / "a"):
        assert gc.get_threshold() == (5_000_000, 20, 500)  # each raised to at least its own
    with af.Runtime(tmp_path / "b", gc_threshold=None):
        assert gc.get_threshold() == (5_000_000, 20, 500)
