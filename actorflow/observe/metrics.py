"""Runtime metrics: counts by status, rates, queue depths and commit latency.

:meth:`actorflow.Runtime.metrics` returns a :class:`Metrics` snapshot. Every
figure is kept up to date as the runtime works, so reading it costs
O(workflows), not O(instances):

* counts by status come from the storage writer thread, which sees every
  change of the status index as it commits. They are seeded by one scan of
  the index on the first call (the only call whose cost grows with the
  number of instances) and maintained from then on;
* creations, completed steps and group commits are counted in one-second
  buckets of a sliding window (:class:`RateWindow`);
* commit latency is the p50 and p99 of the most recent group commits;
* queued instances per flow-control key are the one exception: they are
  counted from the keyed queue at each call, O(keyed instances queued)
  (nothing for workflows whose instances have no key).

Nothing here reads time except through the clock it is given.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from actorflow.core.rates import RateWindow
from actorflow.workflows.records import StatusMove, split_idx_key

__all__ = ["TOP_KEYS", "CommitMonitor", "Metrics", "RateWindow", "WorkflowMetrics", "top_keys"]

#: How many flow-control keys the per-key figures show (those with most).
TOP_KEYS = 10


def top_keys(counts: dict[str, int], n: int = TOP_KEYS) -> dict[str, int]:
    """The ``n`` keys with the largest counts, largest first (ties by key)."""
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:n])


_LATENCY_SAMPLES = 1024


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    i = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[i]


class CommitMonitor:
    """Watches every group commit of one storage (a storage commit observer).

    It measures commit latency and rates, counts creations, and, once
    :meth:`seed` has run, keeps the number of instances per workflow and
    status from the changes of the status index.

    Args:
        now: The runtime's clock, in seconds.
    """

    def __init__(self, now: Callable[[], float]) -> None:
        self.latencies: collections.deque[float] = collections.deque(maxlen=_LATENCY_SAMPLES)
        self.commits = RateWindow(now)
        self.batches = RateWindow(now)
        self.creations = RateWindow(now)
        self._lock = threading.Lock()
        self._counting = False  # set by seed(): index changes are counted from then on
        self._recorded: list[tuple[int, dict[tuple[str, str], int]]] | None = None
        self._counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __call__(
        self,
        items: list[tuple[Any, Any]],
        results: list[BaseException | None],
        seconds: float,
        txn_id: int,
    ) -> None:
        """Storage hook: one group commit of ``items`` ended (writer thread)."""
        self.latencies.append(seconds)
        self.commits.add()
        ok = 0
        created = 0
        counting = self._counting
        delta: dict[tuple[str, str], int] = {}
        for (batch, _cb), err in zip(items, results, strict=True):
            if err is not None:
                continue
            ok += 1
            if batch.notes is None:
                continue
            for what in batch.notes:
                if type(what) is not StatusMove:
                    continue
                if what.old is None:
                    created += 1
                elif counting:
                    k = (what.workflow, what.old)
                    delta[k] = delta.get(k, 0) - 1
                if counting and what.new is not None:  # None: deleted
                    k = (what.workflow, what.new)
                    delta[k] = delta.get(k, 0) + 1
        if ok:
            self.batches.add(ok)
        if created:
            self.creations.add(created)
        if delta:
            with self._lock:
                if self._recorded is not None:
                    self._recorded.append((txn_id, delta))
                else:
                    self._counts.update(delta)

    @property
    def seeded(self) -> bool:
        """True once counts by status are maintained."""
        return self._counting and self._recorded is None

    def seed(self, scan: Callable[[Callable[[bytes], None]], int]) -> None:
        """Starts counting by status from a scan of the status index.

        Args:
            scan: Calls its argument with every key of the status index, in
                one read transaction, and returns that transaction's id.
                Commits after it, seen while the scan ran, are added on top.
        """
        with self._lock:
            if self._counting:
                return
            self._recorded = []
            self._counting = True

        counts: collections.Counter[tuple[str, str]] = collections.Counter()

        def visit(key: bytes) -> None:
            counts[split_idx_key(key)] += 1

        txn_id = scan(visit)
        with self._lock:
            for tid, delta in self._recorded or ():
                if tid > txn_id:
                    counts.update(delta)
            self._counts = counts
            self._recorded = None

    def counts(self) -> dict[str, dict[str, int]]:
        """Instances per workflow and status (after :meth:`seed`)."""
        with self._lock:
            items = list(self._counts.items())
        out: dict[str, dict[str, int]] = {}
        for (wf, status), n in items:
            if n:
                out.setdefault(wf, {})[status] = n
        return out

    def latency_ms(self) -> tuple[float, float]:
        """p50 and p99 of the recent group commits, in milliseconds."""
        values = sorted(self.latencies)
        return _percentile(values, 0.5) * 1000, _percentile(values, 0.99) * 1000


@dataclass(frozen=True)
class WorkflowMetrics:
    """The figures of one workflow.

    Attributes:
        name: The workflow's name.
        counts: Instances by status (statuses with none are left out).
        queue_depth: Instances in its queue waiting for a slot.
        running: Its instances holding a concurrency slot.
        max_concurrent: Its concurrency cap.
        registered: Whether it is registered in this runtime (only
            registered workflows run; the others are known from storage).
        queued_by_key: Queued instances per flow-control key
            (``create(key=)``), for the keys with most (at most
            :data:`TOP_KEYS`), most first.
        queued_keys: How many keys have queued instances.
        running_by_key: Its instances holding a slot per key, in this
            process (at most :data:`TOP_KEYS` keys, most first).
        max_concurrent_per_key: Its cap per key (None: none).
    """

    name: str
    counts: dict[str, int]
    queue_depth: int
    running: int
    max_concurrent: int
    registered: bool
    queued_by_key: dict[str, int] = field(default_factory=dict)
    queued_keys: int = 0
    running_by_key: dict[str, int] = field(default_factory=dict)
    max_concurrent_per_key: int | None = None


@dataclass(frozen=True)
class Metrics:
    """A snapshot of a runtime's figures (see :meth:`actorflow.Runtime.metrics`).

    Attributes:
        workflows: Per workflow, by name.
        counts: Instances by status, over every workflow.
        creations_per_s: Instances created per second (sliding window).
        steps_per_s: Steps ended (complete or failed for good) per second.
        running: Instances holding a concurrency slot. A run gives its slot
            back just after its final write is durable, so an instance that
            :meth:`~actorflow.Instance.wait` saw end may count here for a tick.
        max_concurrent: The runtime's concurrency cap.
        queue_depth: Instances waiting in every queue.
        timer_backlog: Armed timers (sleeps, retry delays, event timeouts, alarms).
        live_instances: Instance actors in memory.
        commit_p50_ms: Median latency of the recent group commits.
        commit_p99_ms: 99th percentile of the same.
        commits_per_s: Group commits (transactions with one fsync) per second.
        batches_per_s: Write batches committed per second (many per group commit).
        window_s: Seconds the rates are averaged over.
    """

    workflows: dict[str, WorkflowMetrics]
    counts: dict[str, int]
    creations_per_s: float
    steps_per_s: float
    running: int
    max_concurrent: int
    queue_depth: int
    timer_backlog: int
    live_instances: int
    commit_p50_ms: float
    commit_p99_ms: float
    commits_per_s: float
    batches_per_s: float
    window_s: int = 10

    def to_dict(self) -> dict[str, Any]:
        """The snapshot as plain JSON-ready data."""
        return asdict(self)
