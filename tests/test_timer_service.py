"""The timer service against the races of a live index (real storage, real threads)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import pytest

from actorflow.core.clock import SystemClock
from actorflow.core.lmdb_backend import LmdbStorage
from actorflow.core.storage import Storage, WriteBatch
from actorflow.core.timers import TIMERS, TimerService


def _consume(storage: Storage, service: TimerService, key: bytes) -> None:
    """What an owner does with a due timer: its commit deletes the key, then it says so."""
    batch = WriteBatch()
    TimerService.disarm(batch, key)
    storage.write(batch)
    service.done(key, consumed=True)


class _CommitAfterRead:
    """A storage whose ``nth`` index read of ``key`` is overtaken by the commit consuming it.

    The read returns ``key``; right after it, the owner's commit deletes the
    key and reports it done, as a run that reached its deadline on its own
    does while the timer thread is between its read and its offer.
    """

    def __init__(self, inner: Storage, key: bytes, nth: int) -> None:
        self.inner = inner
        self.key = key
        self.nth = nth
        self.reads = 0
        self.service: TimerService | None = None
        self.raced = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def scan(self, keyspace: str, **kwargs: Any) -> list[tuple[bytes, bytes]]:
        rows = self.inner.scan(keyspace, **kwargs)
        if not self.raced and keyspace == TIMERS and any(k == self.key for k, _ in rows):
            self.reads += 1
            if self.reads < self.nth:
                return rows
            self.raced = True
            assert self.service is not None
            _consume(self.inner, self.service, self.key)
        return rows


@pytest.mark.parametrize("in_flight", [False, True], ids=["idle", "in-flight"])
def test_a_timer_consumed_between_the_read_and_the_offer_is_not_handed_out(
    tmp_path: Path, in_flight: bool
) -> None:
    """In flight: offered once already, its owner consumes it while a later pass reads it."""
    inner = LmdbStorage(str(tmp_path / "db"))
    deadline = int(time.time() * 1000) - 1000
    batch = WriteBatch()
    key = TimerService.arm(batch, deadline, "W", b"instance")
    later = TimerService.arm(batch, deadline + 1, "W", b"other")
    inner.write(batch)
    store = _CommitAfterRead(inner, key, nth=2 if in_flight else 1)
    service = TimerService(cast(Storage, store), SystemClock())
    store.service = service
    offered: list[bytes] = []

    def handler(target: bytes, k: bytes, due: int) -> bool:
        offered.append(k)
        return True

    service.register("W", handler)
    service.start()
    try:
        assert service.sync(timeout=10)
        if in_flight:
            assert sorted(offered) == [key, later]
            offered.clear()
            assert service.sync(timeout=10)
        assert store.raced
        # The consumed key was not offered (again): an offer nobody will ever
        # answer would keep the service busy for good (a settle that never ends).
        assert offered == ([] if in_flight else [later])
        _consume(inner, service, later)
        assert not service.busy()
        # The next pass does not skip a key re-armed after the race.
        again = WriteBatch()
        TimerService.arm_key(again, key)
        inner.write(again)
        assert service.sync(timeout=10)
        assert offered[-1:] == [key] and offered.count(key) == 1
    finally:
        service.stop()
        inner.close()
