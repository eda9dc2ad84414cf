"""pytest fixtures for testing workflows and Durable Objects built on actorflow.

Installing actorflow registers this module as a pytest plugin (the
``pytest11`` entry point ``actorflow``), so the fixtures are there in any
test suite without a ``conftest.py``:

* ``fake_clock``: a :class:`~actorflow.testing.FakeClock`; time moves only on
  ``fake_clock.advance(...)``.
* ``actorflow_runtime``: a :class:`~actorflow.Runtime` on a fresh data
  directory under ``tmp_path``, driven by ``fake_clock``, closed after the test.
* ``actorflow_faults``: :class:`~actorflow.testing.Faults` of that runtime,
  cleared after the test.
* ``node_factory``: builds :class:`~actorflow.testing.NodeProcess` children on
  one shared data directory and kills every one still alive after the test.

The ``actorflow`` marker tunes the first two, for example
``@pytest.mark.actorflow(autojump=True, limits=af.Limits(max_concurrent=2))``:
``autojump`` and ``start`` go to the clock, every other keyword to ``Runtime``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from actorflow.runtime import Runtime
from actorflow.testing import FakeClock
from actorflow.testkit.faults import Faults

if TYPE_CHECKING:
    from actorflow.testkit.node import NodeProcess

__all__ = [
    "NodeFactory",
    "actorflow_faults",
    "actorflow_runtime",
    "fake_clock",
    "node_factory",
    "pytest_configure",
]

_CLOCK_KEYS = ("autojump", "start")


def pytest_configure(config: pytest.Config) -> None:
    """Declares the ``actorflow`` marker (suites run with ``--strict-markers`` too)."""
    config.addinivalue_line(
        "markers",
        "actorflow(**options): options of the actorflow_runtime and fake_clock fixtures "
        "(autojump and start go to the FakeClock, the rest to Runtime)",
    )


def _options(request: pytest.FixtureRequest) -> dict[str, Any]:
    marker = request.node.get_closest_marker("actorflow")
    if marker is None:
        return {}
    if marker.args:
        raise TypeError("@pytest.mark.actorflow takes keyword options only")
    return dict(marker.kwargs)


@pytest.fixture
def fake_clock(request: pytest.FixtureRequest) -> Iterator[FakeClock]:
    """A fake clock: time moves only on ``fake_clock.advance(...)`` (or by autojump)."""
    opts = _options(request)
    clock = FakeClock(**{k: opts[k] for k in _CLOCK_KEYS if k in opts})
    yield clock
    clock.close()


@pytest.fixture
def actorflow_runtime(
    request: pytest.FixtureRequest, tmp_path: Path, fake_clock: FakeClock
) -> Iterator[Runtime]:
    """A runtime on ``tmp_path / "actorflow-data"`` driven by ``fake_clock``; closed after."""
    opts = {k: v for k, v in _options(request).items() if k not in _CLOCK_KEYS}
    opts.setdefault("clock", fake_clock)
    runtime = Runtime(tmp_path / "actorflow-data", **opts)
    yield runtime
    runtime.close()


@pytest.fixture
def actorflow_faults(actorflow_runtime: Runtime) -> Iterator[Faults]:
    """Fault injection into ``actorflow_runtime``; every fault is removed after the test."""
    faults = Faults(actorflow_runtime)
    yield faults
    faults.clear()


class NodeFactory:
    """Builds :class:`~actorflow.testing.NodeProcess` children on one shared data directory.

    Args:
        data_dir: The data directory every node opens.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.nodes: list[NodeProcess] = []

    def __call__(
        self,
        app: str,
        *,
        node_id: str | None = None,
        env: Mapping[str, str] | None = None,
        start: bool = True,
        **options: Any,
    ) -> NodeProcess:
        """Makes a node running ``app`` (``"package.module:factory"``) and starts it.

        ``options`` go to :class:`~actorflow.testing.NodeProcess` (for example
        ``lease_timeout``). With ``start=False`` the caller starts it.
        """
        from actorflow.testkit.node import NodeProcess  # only suites that use nodes pay for it

        node = NodeProcess(self.data_dir, app, node_id=node_id, env=env, **options)
        self.nodes.append(node)
        if start:
            node.start()
        return node

    def kill_all(self) -> None:
        """SIGKILLs every node still alive and reaps it."""
        for node in self.nodes:
            if node.pid is not None:
                node.kill()


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator[NodeFactory]:
    """Builds node processes on ``tmp_path / "actorflow-nodes"``; kills them all after."""
    data_dir = tmp_path / "actorflow-nodes"
    os.makedirs(data_dir, exist_ok=True)
    factory = NodeFactory(data_dir)
    yield factory
    factory.kill_all()
