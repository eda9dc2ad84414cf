"""What the machine allows, measured in the same run as the scenarios.

The baselines: the disk's ``fsync``'d commit rate (raw LMDB, one put per
commit, one commit at a time), what each page written adds to an ``fsync``
(scattered pages, as a B-tree commit writes them, and contiguous ones), the
interpreter's cost of a bare function call, the cost of handing an item from
one thread to another through a ``queue.SimpleQueue``, and how many durable
calls 16 Python threads can make through one group-commit writer thread when
each call does nothing else.
"""

from __future__ import annotations

import contextlib
import os
import queue
import shutil
import statistics
import threading
import time
from pathlib import Path

import lmdb

__all__ = [
    "bare_call_ns",
    "fsync_commits",
    "fsync_page_us",
    "physical",
    "thread_handoff_us",
    "threaded_commits_per_s",
]


def fsync_commits(path: Path, n: int = 500) -> tuple[float, float]:
    """Raw LMDB, one small put per ``fsync``'d commit: commits/s and the median commit in ms."""
    shutil.rmtree(path, ignore_errors=True)
    env = lmdb.open(str(path), map_size=1 << 28, sync=True, metasync=True)
    try:
        lat = []
        t0 = time.perf_counter()
        for i in range(n):
            t = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(b"k%d" % i, b"v" * 64)
            lat.append(time.perf_counter() - t)
        rate = n / (time.perf_counter() - t0)
    finally:
        env.close()
        shutil.rmtree(path, ignore_errors=True)
    return rate, statistics.median(lat) * 1000


def fsync_page_us(path: Path, pages: int = 32, n: int = 40) -> tuple[float, float]:
    """What each 4 KiB page adds to one ``fdatasync``: scattered pages, then contiguous ones.

    A group commit writes every page it dirtied, then syncs: LMDB copies each
    B-tree page it changes into a free page, so the pages of one commit lie
    scattered in the file. Many disks (virtual ones above all) pay per
    separate write, not per byte. Measured as the median time to write
    ``pages`` pages and ``fdatasync``, less that of one page, per extra page,
    in microseconds, over a file written in full beforehand (so that no sync
    has file metadata to write).
    """
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path)
    span = 4096  # pages in the file: 16 MiB
    page = b"p" * 4096
    sync = getattr(os, "fdatasync", os.fsync)  # macOS has no fdatasync
    fd = os.open(path / "pages", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        for i in range(0, span, 256):
            os.pwrite(fd, page * 256, i * 4096)
        os.fsync(fd)
        step = span // pages  # one page in every ``step``: no two adjacent

        def timed(offsets: list[int]) -> float:
            t = time.perf_counter()
            for off in offsets:
                os.pwrite(fd, page, off * 4096)
            sync(fd)
            return time.perf_counter() - t

        one, scattered, contiguous = [], [], []
        for k in range(n):
            base = (k * 7) % step
            one.append(timed([base]))
            scattered.append(timed([base + i * step for i in range(pages)]))
            contiguous.append(timed([base + i for i in range(pages)]))
    finally:
        os.close(fd)
        shutil.rmtree(path, ignore_errors=True)
    t1 = statistics.median(one)
    return (
        max(0.0, statistics.median(scattered) - t1) / (pages - 1) * 1e6,
        max(0.0, statistics.median(contiguous) - t1) / (pages - 1) * 1e6,
    )


def _nop(x: int) -> int:
    return x


def bare_call_ns(n: int = 1_000_000) -> float:
    """Nanoseconds per call of a one-argument Python function (loop overhead removed)."""
    f = _nop
    r = range(n)
    t = time.perf_counter()
    for i in r:
        f(i)
    with_call = time.perf_counter() - t
    t = time.perf_counter()
    for _ in r:
        pass
    empty = time.perf_counter() - t
    return max(0.0, with_call - empty) / n * 1e9


def echo_thread() -> tuple[queue.SimpleQueue[int | None], queue.SimpleQueue[int], threading.Thread]:
    """Starts a thread that sends back every item put on ``ping`` through ``pong``.

    Returns ``(ping, pong, thread)``; putting None on ``ping`` stops the thread.
    """
    ping: queue.SimpleQueue[int | None] = queue.SimpleQueue()
    pong: queue.SimpleQueue[int] = queue.SimpleQueue()

    def echo() -> None:
        while (item := ping.get()) is not None:
            pong.put(item)

    th = threading.Thread(target=echo, daemon=True)
    th.start()
    return ping, pong, th


def thread_handoff_us(n: int = 20_000) -> float:
    """Microseconds to hand an item to another thread and be woken by its reply, halved.

    A ping-pong over two ``queue.SimpleQueue`` s: each round trip is two
    handoffs, each a put, a wake-up of the blocked thread and a get.
    """
    ping, pong, th = echo_thread()
    for i in range(100):  # warm up
        ping.put(i)
        pong.get()
    t = time.perf_counter()
    for i in range(n):
        ping.put(i)
        pong.get()
    dt = time.perf_counter() - t
    ping.put(None)
    th.join()
    return dt / n / 2 * 1e6


def threaded_commits_per_s(path: Path, threads: int = 16, per: int = 1000) -> float:
    """Durable calls per second from ``threads`` threads through one writer thread.

    Each call puts one random 16-byte key and blocks on a lock until the
    writer's group commit (raw LMDB, ``fsync`` on) holding it is durable: the
    shape of ``create()`` with none of its work. Its ceiling on CPython is set
    by thread switches (every call wakes a thread, which then waits for the
    GIL), not by the disk.
    """
    shutil.rmtree(path, ignore_errors=True)
    env = lmdb.open(str(path), map_size=1 << 28, sync=True, metasync=True)
    q: queue.SimpleQueue[tuple[bytes, threading.Lock] | None] = queue.SimpleQueue()

    def writer() -> None:
        stop = False
        while not stop and (item := q.get()) is not None:
            items = [item]
            time.sleep(0)  # as Storage's writer: let the callers just woken join this group
            with contextlib.suppress(queue.Empty):
                while not stop:
                    nxt = q.get_nowait()
                    if nxt is None:
                        stop = True
                    else:
                        items.append(nxt)
            with env.begin(write=True) as txn:
                for key, _ in items:
                    txn.put(key, b"v" * 64)
            for _, lock in items:
                lock.release()

    def caller() -> None:
        for _ in range(per):
            lock = threading.Lock()
            lock.acquire()
            q.put((os.urandom(16), lock))
            lock.acquire()

    w = threading.Thread(target=writer, daemon=True)
    w.start()
    callers = [threading.Thread(target=caller, daemon=True) for _ in range(threads)]
    try:
        t = time.perf_counter()
        for th in callers:
            th.start()
        for th in callers:
            th.join()
        rate = threads * per / (time.perf_counter() - t)
    finally:
        q.put(None)
        w.join()
        env.close()
        shutil.rmtree(path, ignore_errors=True)
    return rate


def physical(root: Path) -> dict[str, float]:
    """All the baselines, as figures of the ``physical`` scenario."""
    rate, commit_ms = fsync_commits(root / "disk")
    scattered_us, contiguous_us = fsync_page_us(root / "pages")
    return {
        "fsync_commits_per_s": rate,
        "fsync_commit_ms": commit_ms,
        "fsync_scattered_page_us": scattered_us,
        "fsync_contiguous_page_us": contiguous_us,
        "bare_call_ns": bare_call_ns(),
        "thread_handoff_us": thread_handoff_us(),
        "threaded_commits_per_s": threaded_commits_per_s(root / "threaded"),
    }
