"""The storage contract, run against every backend configuration.

One suite, parametrized over ``sync=True`` (fsync every group commit) and
``sync=False``, and over the serializers where values matter. Scans are
checked against a plain sorted-dict model, by hand and with hypothesis.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actorflow.core.errors import LimitExceeded, SerializationError, StorageError
from actorflow.core.lmdb_backend import LmdbStorage
from actorflow.core.storage import (
    Chain,
    ConflictError,
    JsonSerializer,
    PickleSerializer,
    Serializer,
    Storage,
    WriteBatch,
    open_storage,
)

KS = "data"


@pytest.fixture(params=[True, False], ids=["sync", "nosync"])
def sync(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


@pytest.fixture(params=["lmdb", "lmdb-nosync", "postgres"])
def where(request: pytest.FixtureRequest, tmp_path: Any) -> tuple[str, dict[str, Any]]:
    """One storage location of each backend, and its options: the contract runs on all."""
    if request.param == "postgres":
        return request.getfixturevalue("pg_url"), {}
    return str(tmp_path / "db"), {"sync": request.param == "lmdb"}


@pytest.fixture
def store(where: tuple[str, dict[str, Any]]) -> Iterator[Storage]:
    s = open_storage(where[0], **where[1])
    yield s
    s.close()


@pytest.fixture(params=[PickleSerializer(), JsonSerializer()], ids=["pickle", "json"])
def serializer(request: pytest.FixtureRequest) -> Serializer:
    ser: Serializer = request.param
    return ser


def put_all(store: Storage, items: dict[bytes, bytes], keyspace: str = KS) -> None:
    batch = WriteBatch()
    for k, v in items.items():
        batch.put(keyspace, k, v)
    store.write(batch)


def model_scan(
    data: dict[bytes, bytes],
    *,
    prefix: bytes = b"",
    start: bytes | None = None,
    start_after: bytes | None = None,
    end: bytes | None = None,
    reverse: bool = False,
    limit: int | None = None,
) -> list[tuple[bytes, bytes]]:
    keys = sorted(
        k
        for k in data
        if k.startswith(prefix)
        and (start is None or k >= start)
        and (start_after is None or k > start_after)
        and (end is None or k < end)
    )
    if reverse:
        keys.reverse()
    if limit is not None:
        keys = keys[: max(0, limit)]
    return [(k, data[k]) for k in keys]


# -- reads ---------------------------------------------------------------------


def test_get_and_get_many(store: Storage) -> None:
    put_all(store, {b"a": b"1", b"b": b"2", b"c\x00d": b"3"})
    assert store.get(KS, b"a") == b"1"
    assert store.get(KS, b"c\x00d") == b"3"
    assert store.get(KS, b"missing") is None
    assert store.get("other", b"a") is None
    assert store.get_many(KS, [b"b", b"zz", b"a"]) == {b"b": b"2", b"a": b"1"}
    assert store.get_many(KS, []) == {}


SCAN_DATA = {
    k: k.upper() + b"!"
    for k in [
        b"a",
        b"ab",
        b"abc",
        b"abd",
        b"ac",
        b"b",
        b"ba",
        b"b\xff",
        b"b\xff\xff",
        b"c",
        b"\xff",
    ]
}

SCAN_CASES: list[dict[str, Any]] = [
    {},
    {"prefix": b"ab"},
    {"prefix": b"b\xff"},
    {"prefix": b"\xff"},
    {"prefix": b"zz"},
    {"start": b"abc"},
    {"start": b"abcc", "end": b"b"},
    {"start_after": b"abc"},
    {"start_after": b"ab", "prefix": b"ab"},
    {"end": b"ac"},
    {"prefix": b"a", "start": b"0"},
    {"prefix": b"a", "end": b"zz"},
    {"limit": 3},
    {"limit": 0},
    {"prefix": b"a", "limit": 2, "start_after": b"ab"},
]


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", SCAN_CASES, ids=[repr(c) for c in SCAN_CASES])
def test_scan_matches_sorted_dict_model(
    store: Storage, case: dict[str, Any], reverse: bool
) -> None:
    put_all(store, SCAN_DATA)
    got = store.scan(KS, reverse=reverse, **case)
    assert got == model_scan(SCAN_DATA, reverse=reverse, **case)
    keys_only = store.scan(KS, reverse=reverse, keys_only=True, **case)
    assert [k for k, _ in keys_only] == [k for k, _ in got]
    assert all(v == b"" for _, v in keys_only)


def test_scan_prefixes_reads_several_keyspaces_from_one_snapshot(store: Storage) -> None:
    put_all(store, SCAN_DATA)
    other = WriteBatch()
    other.put("other", b"a1", b"x")
    other.put("other", b"b1", b"y")
    store.write(other)
    got = store.scan_prefixes([(KS, b"a"), ("other", b"b"), (KS, b"zz-none"), ("other", b"")])
    assert got == [
        model_scan(SCAN_DATA, prefix=b"a"),
        [(b"b1", b"y")],
        [],
        [(b"a1", b"x"), (b"b1", b"y")],
    ]


def test_count_and_first(store: Storage) -> None:
    put_all(store, SCAN_DATA)
    assert store.count(KS) == len(SCAN_DATA)
    assert store.count(KS, b"ab") == 3
    assert store.count(KS, b"b\xff") == 2
    assert store.count(KS, b"q") == 0
    assert store.first(KS) == (b"a", b"A!")
    assert store.first(KS, after=b"ab") == (b"abc", b"ABC!")
    assert store.first(KS, after=b"abcc") == (b"abd", b"ABD!")
    assert store.first(KS, after=b"\xff") is None
    assert store.first("empty") is None


keys_strategy = st.binary(min_size=1, max_size=4).map(lambda b: bytes(x % 4 * 85 for x in b))
bounds = st.none() | keys_strategy


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    data=st.dictionaries(keys_strategy, st.binary(max_size=3), max_size=25),
    prefix=st.sampled_from([b"", b"\x00", b"U", b"\xff", b"U\xaa"]),
    start=bounds,
    start_after=bounds,
    end=bounds,
    reverse=st.booleans(),
    limit=st.none() | st.integers(min_value=0, max_value=30),
)
def test_scan_property(
    store: Storage,
    data: dict[bytes, bytes],
    prefix: bytes,
    start: bytes | None,
    start_after: bytes | None,
    end: bytes | None,
    reverse: bool,
    limit: int | None,
) -> None:
    store.write(WriteBatch().delete_prefix(KS, b""))  # each example starts empty
    if data:
        put_all(store, data)
    kwargs = {
        "prefix": prefix,
        "start": start,
        "start_after": start_after,
        "end": end,
        "reverse": reverse,
        "limit": limit,
    }
    assert store.scan(KS, **kwargs) == model_scan(data, **kwargs)
    assert store.count(KS, prefix) == len(model_scan(data, prefix=prefix))


# -- values and serializers ----------------------------------------------------------


VALUES: list[Any] = [0, -7, 3.5, "", "héllo", [1, [2, "x"]], {"a": {"b": None}}, True, None]


def test_serializer_round_trip_through_storage(
    tmp_path: Any, sync: bool, serializer: Serializer
) -> None:
    s = LmdbStorage(tmp_path / "db", sync=sync, serializer=serializer)
    try:
        assert s.serializer is serializer
        batch = WriteBatch()
        for i, v in enumerate(VALUES):
            batch.put(KS, b"k%d" % i, s.serializer.dumps(v))
        s.write(batch)
        for i, v in enumerate(VALUES):
            raw = s.get(KS, b"k%d" % i)
            assert raw is not None
            assert s.serializer.loads(raw) == v
    finally:
        s.close()


def test_unserializable_value_raises_and_writes_nothing(
    store: Storage, serializer: Serializer
) -> None:
    bad = threading.Lock() if isinstance(serializer, PickleSerializer) else {1, 2}
    batch = WriteBatch().put(KS, b"ok", b"1")
    with pytest.raises(SerializationError) as info:
        batch.put(KS, b"bad", serializer.dumps(bad))
        store.write(batch)
    assert type(bad).__name__ in str(info.value)
    assert isinstance(info.value, TypeError)  # SerializationError is also a TypeError
    assert store.get(KS, b"ok") is None
    assert store.count(KS) == 0


def test_pickle_falls_back_to_cloudpickle_for_lambdas_and_local_classes(store: Storage) -> None:
    class Local:
        def __init__(self, x: int) -> None:
            self.x = x

    ser = PickleSerializer()
    store.write(WriteBatch().put(KS, b"f", ser.dumps(lambda x: x * 3)))
    store.write(WriteBatch().put(KS, b"o", ser.dumps(Local(4))))
    f = ser.loads(store.get(KS, b"f") or b"")
    assert f(5) == 15
    assert ser.loads(store.get(KS, b"o") or b"").x == 4


def test_corrupt_value_raises_serialization_error() -> None:
    with pytest.raises(SerializationError):
        PickleSerializer().loads(b"not a pickle")


# -- writes: atomicity, guards, prefixes ------------------------------------------------


def test_failed_guard_rejects_the_whole_batch(store: Storage) -> None:
    put_all(store, {b"fence": b"1", b"keep": b"old"})
    batch = (
        WriteBatch()
        .put(KS, b"new", b"x")
        .delete(KS, b"keep")
        .put("other", b"y", b"z")
        .guard(KS, b"fence", b"2")
    )
    with pytest.raises(ConflictError):
        store.write(batch)
    assert store.get(KS, b"new") is None
    assert store.get(KS, b"keep") == b"old"
    assert store.get("other", b"y") is None
    # A guard that holds lets it through, including "must be absent".
    store.write(WriteBatch().put(KS, b"new", b"x").guard(KS, b"fence", b"1"))
    store.write(WriteBatch().put(KS, b"n2", b"x").guard(KS, b"absent", None))
    with pytest.raises(ConflictError):
        store.write(WriteBatch().put(KS, b"n3", b"x").guard(KS, b"fence", None))
    assert store.get(KS, b"new") == b"x"
    assert store.get(KS, b"n2") == b"x"
    assert store.get(KS, b"n3") is None


def test_an_insert_guard_refuses_an_existing_key_and_writes_nothing(store: Storage) -> None:
    # "Must be absent" on the key the batch puts first is applied as one insert.
    put_all(store, {b"taken": b"old"})
    batch = (
        WriteBatch()
        .guard(KS, b"taken", None)
        .put(KS, b"taken", b"new")
        .put(KS, b"side", b"x")
        .put("other", b"y", b"z")
    )
    with pytest.raises(ConflictError):
        store.write(batch)
    assert store.get(KS, b"taken") == b"old"
    assert store.get(KS, b"side") is None
    assert store.get("other", b"y") is None
    store.write(WriteBatch().guard(KS, b"free", None).put(KS, b"free", b"1").put(KS, b"s2", b"2"))
    assert (store.get(KS, b"free"), store.get(KS, b"s2")) == (b"1", b"2")


def test_a_rejected_batch_does_not_fail_its_group(store: Storage) -> None:
    results: dict[int, BaseException | None] = {}
    done = threading.Event()
    n = 200

    def cb(i: int) -> Any:
        def f(err: BaseException | None) -> None:
            results[i] = err
            if len(results) == n:
                done.set()

        return f

    for i in range(n):
        batch = WriteBatch().put(KS, b"k%03d" % i, b"v")
        if i % 3 == 0:
            batch.guard(KS, b"never", b"x")
        store.submit(batch, cb(i))
    assert done.wait(10)
    for i in range(n):
        if i % 3 == 0:
            assert isinstance(results[i], ConflictError)
            assert store.get(KS, b"k%03d" % i) is None
        else:
            assert results[i] is None
            assert store.get(KS, b"k%03d" % i) == b"v"


def test_operations_apply_in_order(store: Storage) -> None:
    store.write(WriteBatch().put(KS, b"a", b"1").delete(KS, b"a").put(KS, b"b", b"1"))
    store.write(WriteBatch().put(KS, b"b", b"2").put(KS, b"b", b"3"))
    assert store.get(KS, b"a") is None
    assert store.get(KS, b"b") == b"3"
    batch = WriteBatch().put(KS, b"c", b"1")
    assert len(batch.extend(WriteBatch().delete(KS, b"c").guard(KS, b"b", b"3"))) == 2
    store.write(batch)
    assert store.get(KS, b"c") is None


def test_delete_prefix(store: Storage) -> None:
    put_all(store, SCAN_DATA)
    put_all(store, {b"ab": b"other keyspace"}, keyspace="other")
    store.write(WriteBatch().delete_prefix(KS, b"ab").put(KS, b"abz", b"after"))
    assert [k for k, _ in store.scan(KS, prefix=b"a")] == [b"a", b"abz", b"ac"]
    store.write(WriteBatch().delete_prefix(KS, b"b\xff"))
    assert [k for k, _ in store.scan(KS, prefix=b"b")] == [b"b", b"ba"]
    store.write(WriteBatch().delete_prefix(KS, b"nothing"))
    assert store.count(KS) == 7
    assert store.get("other", b"ab") == b"other keyspace"
    store.write(WriteBatch().delete_prefix(KS, b""))
    assert store.count(KS) == 0


def test_key_limits(store: Storage) -> None:
    with pytest.raises(LimitExceeded):
        WriteBatch().put(KS, b"x" * 512, b"")
    with pytest.raises(ValueError):
        WriteBatch().put(KS, b"", b"v")
    store.write(WriteBatch().put(KS, b"x" * 511, b"max"))
    assert store.get(KS, b"x" * 511) == b"max"


# -- group commit and callbacks ----------------------------------------------------------


def test_group_commit_folds_concurrent_batches(store: Storage) -> None:
    threads, per = 8, 150
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for i in range(per):
                store.write(WriteBatch().put(KS, b"t%d-%04d" % (t, i), b"%d" % i))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    b0, c0 = store.batches, store.commits
    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    assert store.commits - c0 == threads * per
    assert store.batches - b0 < store.commits - c0  # fewer transactions than batches
    assert store.count(KS) == threads * per


def test_callbacks_run_in_order_and_only_after_the_commit(store: Storage) -> None:
    seen: list[tuple[int, bytes | None]] = []
    all_done = threading.Event()
    n = 300

    def cb(i: int) -> Any:
        def f(err: BaseException | None) -> None:
            assert err is None
            # The batch must already be readable (committed) when we are told.
            seen.append((i, store.get(KS, b"%04d" % i)))
            if i == n - 1:
                all_done.set()

        return f

    for i in range(n):
        store.submit(WriteBatch().put(KS, b"%04d" % i, b"v%d" % i), cb(i))
    assert all_done.wait(10)
    assert [i for i, _ in seen] == list(range(n))
    assert all(v == b"v%d" % i for i, v in seen)


def test_callback_waits_for_a_slow_commit(store: Storage) -> None:
    gate = threading.Event()
    store.set_fault(lambda batch: gate.wait(5))
    done = threading.Event()
    store.submit(WriteBatch().put(KS, b"slow", b"1"), lambda err: done.set())
    assert not done.wait(0.2)
    assert store.get(KS, b"slow") is None
    gate.set()
    assert done.wait(5)
    assert store.get(KS, b"slow") == b"1"


def test_write_timeout(store: Storage) -> None:
    gate = threading.Event()
    store.set_fault(lambda batch: gate.wait(5))
    try:
        with pytest.raises(StorageError, match="not confirmed"):
            store.write(WriteBatch().put(KS, b"k", b"v"), timeout=0.05)
    finally:
        gate.set()


def test_after_batch_hook_runs_after_each_group(store: Storage) -> None:
    calls: list[int] = []
    store.add_after_batch(lambda: calls.append(store.batches))
    store.write(WriteBatch().put(KS, b"a", b"1"))
    store.write(WriteBatch().put(KS, b"b", b"1"))
    assert len(calls) >= 2
    assert calls == sorted(calls)


# -- the map grows ---------------------------------------------------------------------------


def test_map_grows_instead_of_failing(tmp_path: Any, sync: bool) -> None:
    s = LmdbStorage(tmp_path / "db", sync=sync, map_size=64 * 1024)
    stop = threading.Event()
    read_errors: list[BaseException] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                s.get(KS, b"k0000")
                s.scan(KS, limit=3)
            except BaseException as exc:  # pragma: no cover - reported below
                read_errors.append(exc)
                return

    t = threading.Thread(target=reader)
    t.start()
    try:
        start = s.map_size
        value = os.urandom(32 * 1024)
        for j in range(16):  # 16 batches of 8 x 32 KiB = 4 MiB
            batch = WriteBatch()
            for i in range(8):
                batch.put(KS, b"k%04d" % (j * 8 + i), value)
            s.write(batch)
        assert s.map_size > start
        assert s.map_size >= 4 * 1024 * 1024
        assert s.count(KS) == 128
        assert s.get(KS, b"k0127") == value
    finally:
        stop.set()
        t.join()
        s.close()
    assert not read_errors


DEADLOCK_SCRIPT = """
import sys, threading, time
from actorflow.core.storage import WriteBatch
from actorflow.core.lmdb_backend import LmdbStorage
store = LmdbStorage(sys.argv[1], sync=SYNC)
gate = threading.Event()
store.set_fault(lambda batch: gate.wait(5))
store.submit(WriteBatch().put("data", b"held", b"1"))
got = []
reader = threading.Thread(target=lambda: got.append(store.get("fresh-keyspace", b"k")))
time.sleep(0.05)  # the writer is now inside its transaction
reader.start()
time.sleep(0.1)
gate.set()
reader.join(10)
assert not reader.is_alive() and got == [None], got
store.set_fault(None)
store.write(WriteBatch().put("fresh-keyspace", b"k", b"v"))
assert store.get("fresh-keyspace", b"k") == b"v"
store.close()
"""


def test_new_keyspace_opened_during_a_commit_does_not_deadlock(tmp_path: Any, sync: bool) -> None:
    # Opening a named database needs LMDB's write lock; taken from a reader
    # thread while the writer holds it inside a group commit, py-lmdb would
    # wait for it holding the GIL and hang the whole process. Hence a child
    # process: a regression fails here instead of hanging the test run.
    script = DEADLOCK_SCRIPT.replace("SYNC", str(sync))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script, str(tmp_path / "db")],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=30,
        )
    except subprocess.TimeoutExpired:
        pytest.fail("opening a keyspace during a group commit deadlocked")
    assert proc.returncode == 0, proc.stderr


# -- faults, chains ------------------------------------------------------------------------------


def test_fault_hook_fails_the_batch_and_writes_nothing(store: Storage) -> None:
    def fault(batch: WriteBatch) -> None:
        raise OSError("disk on fire")

    store.set_fault(fault)
    with pytest.raises(StorageError, match="disk on fire"):
        store.write(WriteBatch().put(KS, b"a", b"1").put(KS, b"b", b"2"))
    assert store.count(KS) == 0
    store.set_fault(None)
    store.write(WriteBatch().put(KS, b"a", b"1"))
    assert store.get(KS, b"a") == b"1"


def test_fault_hook_can_fail_one_batch_of_a_group(store: Storage) -> None:
    def fault(batch: WriteBatch) -> None:
        if any(op[2] == b"bad" for op in batch.ops):
            raise StorageError("injected")

    store.set_fault(fault)
    results: list[BaseException | None] = []
    done = threading.Event()
    for key in (b"good1", b"bad", b"good2"):
        store.submit(
            WriteBatch().put(KS, key, b"v"),
            lambda err: (results.append(err), len(results) == 3 and done.set()),
        )
    assert done.wait(5)
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], StorageError)
    assert store.get(KS, b"bad") is None
    assert store.get(KS, b"good1") == store.get(KS, b"good2") == b"v"


def test_a_failed_batch_fails_the_rest_of_its_chain(store: Storage) -> None:
    gate = threading.Event()

    def fault(batch: WriteBatch) -> None:
        gate.wait(5)  # hold the writer so that everything below is queued first
        if any(op[2] == b"c1" for op in batch.ops):
            raise StorageError("injected")

    store.set_fault(fault)
    chain, other = Chain(), Chain()
    results: dict[bytes, BaseException | None] = {}
    done = threading.Event()

    def cb(key: bytes) -> Any:
        def f(err: BaseException | None) -> None:
            results[key] = err
            if len(results) == 5:
                done.set()

        return f

    store.submit(WriteBatch(chain).put(KS, b"c0", b"v"), cb(b"c0"))
    store.submit(WriteBatch(chain).put(KS, b"c1", b"v"), cb(b"c1"))
    store.submit(WriteBatch(other).put(KS, b"o1", b"v"), cb(b"o1"))
    store.submit(WriteBatch(chain).put(KS, b"c2", b"v"), cb(b"c2"))
    store.submit(WriteBatch().put(KS, b"free", b"v"), cb(b"free"))
    gate.set()
    assert done.wait(5)
    assert results[b"c0"] is None and results[b"o1"] is None and results[b"free"] is None
    assert isinstance(results[b"c1"], StorageError)
    assert isinstance(results[b"c2"], StorageError)
    assert chain.failed and not other.failed
    assert store.get(KS, b"c1") is None and store.get(KS, b"c2") is None
    assert store.get(KS, b"c0") == store.get(KS, b"o1") == b"v"
    # A failed chain stays failed.
    store.set_fault(None)
    with pytest.raises(StorageError):
        store.write(WriteBatch(chain).put(KS, b"c3", b"v"))
    assert store.get(KS, b"c3") is None


# -- lifecycle ---------------------------------------------------------------------------------


def test_reopen_keeps_data_and_close_is_idempotent(where: tuple[str, dict[str, Any]]) -> None:
    s = open_storage(where[0], **where[1])
    s.write(WriteBatch().put(KS, b"k", b"v"))
    s.close()
    s.close()
    with pytest.raises(StorageError, match="closed"):
        s.get(KS, b"k")
    with pytest.raises(StorageError, match="closed"):
        s.submit(WriteBatch().put(KS, b"k2", b"v"))
    s2 = open_storage(where[0], **where[1])
    try:
        assert s2.get(KS, b"k") == b"v"
    finally:
        s2.close()


def test_close_flushes_queued_batches(where: tuple[str, dict[str, Any]]) -> None:
    s = open_storage(where[0], **where[1])
    for i in range(500):
        s.submit(WriteBatch().put(KS, b"%04d" % i, b"v"))
    s.close()
    s2 = open_storage(where[0], **where[1])
    try:
        assert s2.count(KS) == 500
    finally:
        s2.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_use_after_fork_raises_storage_error(store: Storage) -> None:
    store.write(WriteBatch().put(KS, b"k", b"v"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 10
        try:
            try:
                store.get(KS, b"k")
            except StorageError as exc:
                code = 0 if "fork" in str(exc) else 11
            try:
                store.submit(WriteBatch().put(KS, b"x", b"y"))
                code = 12
            except StorageError:
                pass
            store.close()  # must not touch the parent's environment
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    # The parent's storage is unharmed.
    assert store.get(KS, b"k") == b"v"
    store.write(WriteBatch().put(KS, b"after", b"fork"))
    assert store.get(KS, b"after") == b"fork"


def test_commit_stats_are_counted(store: Storage) -> None:
    t0 = time.perf_counter()
    store.write(WriteBatch().put(KS, b"k", b"v"))
    assert store.commits >= 1 and store.batches >= 1
    assert 0 < store.commit_seconds <= time.perf_counter() - t0 + 0.001
