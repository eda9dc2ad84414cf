"""The Durable Objects contract, through ``Runtime.durable_objects``."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import pykka
import pytest

import actorflow as af
from actorflow.core.storage import WriteBatch
from actorflow.objects.namespace import ALARM_MAX_RETRIES

T0 = 1_700_000_000.0  # the fake clock's start, epoch seconds
FAR_FUTURE_MS = 4_000_000_000_000


class FakeClock:
    """A clock that only moves when told (implements actorflow.clock.Clock)."""

    def __init__(self, start: float = T0) -> None:
        self._now = start
        self._lock = threading.Lock()
        self._subscribers: list[Callable[[], None]] = []

    def now(self) -> float:
        return self._now

    def now_ms(self) -> int:
        return int(self._now * 1000)

    def real_timeout(self, deadline: float) -> float | None:
        return None

    def subscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            self._subscribers.append(callback)

    def unsubscribe(self, callback: Callable[[], None]) -> None:
        with self._lock:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

    def advance(self, seconds: float) -> None:
        self._now += seconds
        with self._lock:
            subscribers = list(self._subscribers)
        for cb in subscribers:
            cb()


class Boom(Exception):
    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class Counter(af.DurableObject):
    def __init__(self, ctx: af.DurableObjectState, env: Any = None) -> None:
        super().__init__(ctx, env)
        self.calls = 0  # in-memory only
        self.busy = False

    def increment(self, by: int = 1) -> int:
        self.calls += 1
        n: int = self.ctx.storage.get("n", 0) + by
        self.ctx.storage.put("n", n)
        return n

    def memory_calls(self) -> int:
        self.calls += 1
        return self.calls

    def append(self, item: Any) -> int:
        # Not thread-safe on purpose: two calls running at once would trip it.
        if self.busy:
            raise RuntimeError("two calls overlapped")
        self.busy = True
        try:
            log = self.ctx.storage.get("log", [])
            time.sleep(0)  # give another thread every chance to barge in
            log.append(item)
            self.ctx.storage.put("log", log)
            return len(log)
        finally:
            self.busy = False

    def get(self, key: Any, default: Any = None) -> Any:
        return self.ctx.storage.get(key, default)

    def put(self, key: Any, value: Any = None) -> None:
        self.ctx.storage.put(key, value)

    def delete(self, key: Any) -> Any:
        return self.ctx.storage.delete(key)

    def list(self, **kwargs: Any) -> dict[str, Any]:
        return self.ctx.storage.list(**kwargs)

    def delete_all(self) -> None:
        self.ctx.storage.delete_all()

    def apply_and_list(
        self, puts: dict[str, Any], deletes: list[str], kwargs: dict[str, Any]
    ) -> dict[str, Any]:
        self.ctx.storage.put(puts)
        self.ctx.storage.delete(deletes)
        return self.ctx.storage.list(**kwargs)

    def put_then_raise(self, key: str) -> None:
        self.ctx.storage.put(key, "written")
        raise Boom(f"failed after writing {key}", code=7)

    def transactional(self, fail: bool) -> str:
        self.ctx.storage.put("outside", 1)
        try:
            with self.ctx.storage.transaction() as txn:
                txn.put("inside", 1)
                txn.delete("outside")
                txn.set_alarm(FAR_FUTURE_MS)
                txn.delete_all()
                if fail:
                    raise ValueError("roll back")
        except ValueError:
            return "rolled back"
        return "committed"

    def set_alarm(self, when: Any) -> None:
        self.ctx.storage.set_alarm(when)

    def get_alarm(self) -> int | None:
        return self.ctx.storage.get_alarm()

    def delete_alarm(self) -> None:
        self.ctx.storage.delete_alarm()

    def whoami(self) -> str:
        return str(self.ctx.id)

    async def async_increment(self) -> int:
        return self.increment(10)

    def _private(self) -> str:
        return "secret"

    def on_evict(self) -> None:
        if isinstance(self.env, dict) and "evicted" in self.env:
            self.env["evicted"].append(self.calls)


class Alarmed(af.DurableObject):
    """Its alarm handler records each attempt in ``env`` and obeys a plan."""

    def alarm(self, info: af.AlarmInfo) -> None:
        env: dict[str, Any] = self.env
        env["attempts"].append((info.retry_count, info.is_retry, info.scheduled_time))
        env["get_alarm_inside"].append(self.ctx.storage.get_alarm())
        self.ctx.storage.put("fired", len(env["attempts"]))
        action = env["plan"](info)
        if action == "fail":
            raise RuntimeError(f"alarm failed (retry {info.retry_count})")
        if isinstance(action, tuple) and action[0] == "reschedule_and_fail":
            self.ctx.storage.set_alarm(action[1])
            raise RuntimeError("failed after setting a new alarm")

    def set_alarm(self, when: Any) -> None:
        self.ctx.storage.set_alarm(when)

    def get_alarm(self) -> int | None:
        return self.ctx.storage.get_alarm()

    def delete_alarm(self) -> None:
        self.ctx.storage.delete_alarm()

    def delete_all(self) -> None:
        self.ctx.storage.delete_all()

    def fired(self) -> Any:
        return self.ctx.storage.get("fired")

    def ping(self) -> str:
        return "pong"


class Other(af.DurableObject):
    def hello(self) -> str:
        return "hi"


class Writer(af.DurableObject):
    def __init__(self, ctx: af.DurableObjectState, env: Any = None) -> None:
        super().__init__(ctx, env)
        if env == "fail-constructor":
            ctx.storage.put("ctor", "partial")
            raise Boom("constructor failed")
        if ctx.storage.get("created") is None:
            ctx.storage.put("created", "by constructor")

    def get(self, key: str) -> Any:
        return self.ctx.storage.get(key)

    def put(self, key: str, value: Any) -> None:
        self.ctx.storage.put(key, value)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def rt(tmp_path: Any, clock: FakeClock) -> Iterator[af.Runtime]:
    runtime = af.Runtime(tmp_path / "data", clock=clock, pool_size=8)
    yield runtime
    runtime.close()


def counters(rt: af.Runtime, name: str = "counter", env: Any = None) -> af.DurableObjectNamespace:
    return rt.durable_objects(Counter, name=name, env=env)


# -- ids and stubs -------------------------------------------------------------------


def test_id_from_name_is_deterministic_and_namespaced(rt: af.Runtime) -> None:
    a, b = counters(rt, "a"), counters(rt, "b")
    assert a.id_from_name("alice") == a.id_from_name("alice")
    assert str(a.id_from_name("alice")) == str(a.id_from_name("alice"))
    assert a.id_from_name("alice") != a.id_from_name("bob")
    assert a.id_from_name("alice") != b.id_from_name("alice")
    assert a.id_from_name("alice").name == "alice"
    assert len(str(a.id_from_name("x"))) == 64


def test_id_from_name_is_stable_across_runtimes(tmp_path: Any) -> None:
    with af.Runtime(tmp_path / "one") as r1:
        first = str(counters(r1).id_from_name("alice"))
    with af.Runtime(tmp_path / "two") as r2:
        assert str(counters(r2).id_from_name("alice")) == first


def test_new_unique_id_is_unique(rt: af.Runtime) -> None:
    ns = counters(rt)
    ids = {str(ns.new_unique_id()) for _ in range(2000)}
    assert len(ids) == 2000
    some = ns.new_unique_id()
    assert ns.id_from_string(str(some)) == some


def test_id_from_string_round_trip_and_rejections(rt: af.Runtime) -> None:
    ns, other = counters(rt, "a"), counters(rt, "b")
    oid = ns.id_from_name("carol")
    assert ns.id_from_string(str(oid)) == oid
    assert ns.id_from_string(str(oid).upper()) == oid
    for bad in ["", "xyz", str(oid)[:-1], str(oid) + "0", "g" * 64, " " + str(oid)[1:]]:
        with pytest.raises(ValueError, match="invalid"):
            ns.id_from_string(bad)
    with pytest.raises(ValueError, match="namespace"):
        other.id_from_string(str(oid))
    with pytest.raises(ValueError):
        other.get(oid)
    with pytest.raises(TypeError):
        ns.get("carol")  # type: ignore[arg-type]


def test_get_by_name_is_get_of_id_from_name(rt: af.Runtime) -> None:
    ns = counters(rt)
    ns.get_by_name("dave").increment(5)
    assert ns.get(ns.id_from_name("dave")).increment(1) == 6
    assert ns.get_by_name("dave").id == ns.id_from_name("dave")
    assert ns.get_by_name("dave").whoami() == str(ns.id_from_name("dave"))


def test_namespace_name_is_bound_to_one_class(rt: af.Runtime) -> None:
    counters(rt, "shared")
    assert counters(rt, "shared") is counters(rt, "shared")
    with pytest.raises(ValueError):
        rt.durable_objects(Other, name="shared")
    with pytest.raises(TypeError):
        rt.durable_objects(int, name="nope")  # type: ignore[type-var]


def test_stubs_send_nothing_until_the_first_call(rt: af.Runtime) -> None:
    ns = counters(rt)
    stubs = [ns.get(ns.id_from_name(f"lazy{i}")) for i in range(50)]
    stubs.append(ns.get(ns.new_unique_id()))
    assert ns.activations == 0 and ns.live_count == 0
    _ = stubs[0].increment  # looking up a method sends nothing either
    assert ns.activations == 0
    assert stubs[0].increment() == 1
    assert ns.activations == 1 and ns.live_count == 1
    stubs[0].increment()
    assert ns.activations == 1
    with pytest.raises(AttributeError):
        _ = stubs[1]._private  # noqa: SLF001 - the point: a private name is no RPC method


# -- calls ------------------------------------------------------------------------------


def test_calls_run_one_at_a_time_in_arrival_order(rt: af.Runtime) -> None:
    stub = counters(rt).get_by_name("ordered")
    futures = [stub.append.future(i) for i in range(1000)]
    assert [f.get(timeout=30) for f in futures] == list(range(1, 1001))
    assert stub.get("log") == list(range(1000))


def test_calls_from_many_threads_never_overlap(rt: af.Runtime) -> None:
    stub = counters(rt).get_by_name("contended")
    errors: list[BaseException] = []

    def sender(t: int) -> None:
        try:
            futures = [stub.append.future((t, i)) for i in range(150)]
            for f in futures:
                f.get(timeout=30)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors
    log = stub.get("log")
    assert len(log) == 600
    for t in range(4):  # each sender's calls ran in the order it sent them
        assert [i for (tt, i) in log if tt == t] == list(range(150))


def test_return_values_and_exceptions_reach_the_caller(rt: af.Runtime) -> None:
    stub = counters(rt).get_by_name("errors")
    assert stub.increment(3) == 3
    assert stub.get("missing", {"default": True}) == {"default": True}
    with pytest.raises(Boom, match="failed after writing k") as info:
        stub.put_then_raise("k")
    assert info.value.code == 7
    future = stub.put_then_raise.future("k2")
    with pytest.raises(Boom):
        future.get(timeout=10)
    with pytest.raises(AttributeError, match="no public method"):
        stub.no_such_method()
    with pytest.raises(AttributeError):
        rt.durable_objects(Counter, name="counter-priv").get_by_name("x").__getattr__("_private")
    with pytest.raises(TypeError):
        stub.increment(1, 2, 3)
    assert stub.increment(1) == 4  # the object survived every error


def test_writes_before_an_exception_are_committed(rt: af.Runtime, tmp_path: Any) -> None:
    stub = counters(rt).get_by_name("partial")
    with pytest.raises(Boom):
        stub.put_then_raise("before")
    assert stub.get("before") == "written"
    rt.close()
    with af.Runtime(tmp_path / "data") as again:
        assert counters(again).get_by_name("partial").get("before") == "written"


def test_async_methods(rt: af.Runtime) -> None:
    stub = counters(rt).get_by_name("async")
    assert stub.async_increment() == 10
    assert stub.async_increment.future().get(timeout=10) == 20


def test_future_is_a_pykka_future(rt: af.Runtime) -> None:
    stub = counters(rt).get_by_name("futures")
    f = stub.increment.future(2)
    assert isinstance(f, pykka.Future)
    assert f.map(lambda n: n * 10).get(timeout=10) == 20
    assert pykka.get_all([stub.increment.future(1), stub.increment.future(1)]) == [3, 4]


# -- the output gate -----------------------------------------------------------------------


def test_a_reply_waits_until_its_writes_are_durable(rt: af.Runtime) -> None:
    stub = counters(rt).get_by_name("gated")
    stub.increment()
    release = threading.Event()
    rt.storage.set_fault(lambda batch: release.wait(10))
    try:
        f = stub.increment.future(1)
        g = stub.get.future("n")  # writes nothing, but read n=2 which is not durable yet
        time.sleep(0.2)
        assert not f.done() and not g.done()  # type: ignore[attr-defined]
    finally:
        release.set()
    assert f.get(timeout=10) == 2
    assert g.get(timeout=10) == 2
    # Once the caller has the value, it is in storage.
    assert (
        rt.storage.serializer.loads(rt.storage.get("objects", _data_key(rt, stub, "n")) or b"") == 2
    )


def _data_key(rt: af.Runtime, stub: Any, key: str) -> bytes:
    return f"{counters(rt).name}\x00{stub.id}\x00{key}".encode()


def test_returned_values_survive_a_restart(tmp_path: Any) -> None:
    with af.Runtime(tmp_path / "d") as r1:
        stubs = [counters(r1).get_by_name(f"c{i}") for i in range(20)]
        futures = [s.increment.future(i + 1) for i, s in enumerate(stubs) for _ in range(5)]
        results = [f.get(timeout=10) for f in futures]
    assert results[4] == 5 and results[-1] == 100
    with af.Runtime(tmp_path / "d") as r2:
        ns = counters(r2)
        assert [ns.get_by_name(f"c{i}").get("n") for i in range(20)] == [
            5 * (i + 1) for i in range(20)
        ]


def test_reads_see_writes_still_in_flight(rt: af.Runtime) -> None:
    stub = counters(rt).get_by_name("pipelined")
    stub.put("base", 1)
    release = threading.Event()
    rt.storage.set_fault(lambda batch: release.wait(10))
    try:
        f1 = stub.put.future("a", 1)
        f2 = stub.delete.future("base")
        f3 = stub.list.future()
        f4 = stub.get.future(["a", "base"])
        f5 = stub.increment.future(5)
        f6 = stub.increment.future(5)
        time.sleep(0.1)  # let the object run them all while the first write is held
    finally:
        release.set()
    assert f1.get(timeout=10) is None
    assert f2.get(timeout=10) is True
    assert f3.get(timeout=10) == {"a": 1}
    assert f4.get(timeout=10) == {"a": 1}
    assert [f5.get(timeout=10), f6.get(timeout=10)] == [5, 10]


def test_a_failed_write_fails_the_call_and_resets_the_object(rt: af.Runtime) -> None:
    ns = counters(rt)
    stub = ns.get_by_name("fragile")
    assert stub.increment() == 1
    assert stub.memory_calls() == 2
    release = threading.Event()

    def fault(batch: WriteBatch) -> None:
        release.wait(10)
        for _kind, _ks, key, value in batch.ops:
            if key.endswith(b"\x00n") and value and rt.storage.serializer.loads(value) == 2:
                raise OSError("disk full")

    rt.storage.set_fault(fault)
    try:
        f1 = stub.increment.future()  # n=2: its write fails
        f2 = stub.increment.future()  # read n=2 (never durable): must fail too
        f3 = stub.get.future("n")  # no writes, but it saw n=3
        time.sleep(0.1)  # let the object run all three while the first write is held
    finally:
        release.set()
    for f in (f1, f2, f3):
        with pytest.raises(af.StorageError):
            f.get(timeout=10)
    rt.storage.set_fault(None)
    assert stub.get("n") == 1  # what is durable
    assert stub.memory_calls() == 1  # a fresh instance: memory was reset
    assert ns.activations == 2
    assert stub.increment() == 2


def test_constructor_writes_and_failures(tmp_path: Any) -> None:
    with af.Runtime(tmp_path / "d") as r:
        ok = r.durable_objects(Writer, name="w")
        assert ok.get_by_name("x").get("created") == "by constructor"
        broken = r.durable_objects(Writer, name="wb", env="fail-constructor")
        stub = broken.get_by_name("x")
        with pytest.raises(Boom, match="constructor failed"):
            stub.put("k", 1)
        with pytest.raises(Boom):  # tried again on the next call
            stub.get("ctor")
        assert r.storage.count("objects", b"wb\x00") == 0  # nothing of it was written


# -- the storage API ---------------------------------------------------------------------


def test_storage_get_put_delete_forms(rt: af.Runtime) -> None:
    stub = counters(rt).get_by_name("forms")
    stub.put({"b": 2, "a": 1, "é": 3, "Z": 0, "nested": {"x": [1, 2]}})
    assert stub.get("nested") == {"x": [1, 2]}
    got = stub.get(["é", "b", "missing", "a", "Z"])
    assert got == {"Z": 0, "a": 1, "b": 2, "é": 3}
    assert list(got) == ["Z", "a", "b", "é"]  # UTF-8 order, missing left out
    assert stub.delete("a") is True
    assert stub.delete("a") is False
    assert stub.delete(["b", "é", "missing"]) == 2
    assert stub.list() == {"Z": 0, "nested": {"x": [1, 2]}}
    with pytest.raises(TypeError):
        stub.get(1)
    with pytest.raises(af.SerializationError):
        stub.put("lock", threading.Lock())
    assert stub.get("lock") is None
    with pytest.raises(af.SerializationError):  # all of a dict or nothing
        stub.put({"fine": 1, "lock": threading.Lock()})
    assert stub.get(["fine", "lock"]) == {}
    with pytest.raises(af.LimitExceeded):
        stub.put("k" * 600, 1)


LIST_BASE = {k: i for i, k in enumerate(["a", "ab", "abc", "b", "ba", "bb", "c", "é", "z"])}
LIST_CASES: list[dict[str, Any]] = [
    {},
    {"prefix": "a"},
    {"prefix": "b", "reverse": True},
    {"start": "ab"},
    {"start_after": "ab"},
    {"end": "b"},
    {"start": "abc", "end": "bb", "reverse": True},
    {"limit": 2},
    {"limit": 3, "reverse": True},
    {"prefix": "b", "limit": 1, "start_after": "b"},
    {"start_after": "a", "limit": 4},
]


def model_list(data: dict[str, Any], **kw: Any) -> list[tuple[str, Any]]:
    keys = sorted(
        (
            k
            for k in data
            if k.startswith(kw.get("prefix", ""))
            and (kw.get("start") is None or k.encode() >= kw["start"].encode())
            and (kw.get("start_after") is None or k.encode() > kw["start_after"].encode())
            and (kw.get("end") is None or k.encode() < kw["end"].encode())
        ),
        key=str.encode,
        reverse=kw.get("reverse", False),
    )
    if kw.get("limit") is not None:
        keys = keys[: kw["limit"]]
    return [(k, data[k]) for k in keys]


@pytest.mark.parametrize("case", LIST_CASES, ids=[repr(c) for c in LIST_CASES])
def test_list_merges_committed_and_pending_writes(rt: af.Runtime, case: dict[str, Any]) -> None:
    stub = counters(rt).get_by_name("lister")
    stub.put(LIST_BASE)
    puts = {"aa": 100, "bz": 101, "b": 102}
    deletes = ["ab", "ba", "nope"]
    expected = {**{k: v for k, v in LIST_BASE.items() if k not in deletes}, **puts}
    # Pending (same call), then committed (next call): both must agree with the model.
    got_pending = stub.apply_and_list(puts, deletes, case)
    assert list(got_pending.items()) == model_list(expected, **case)
    assert list(stub.list(**case).items()) == model_list(expected, **case)
    # A fresh activation reads everything from disk.
    ns = counters(rt)
    deadline = time.monotonic() + 5
    while ns.evict_idle(idle=0.0) == 0 and ns.live_count and time.monotonic() < deadline:
        time.sleep(0.005)
    assert ns.live_count == 0
    assert list(stub.list(**case).items()) == model_list(expected, **case)


def test_list_rejects_start_with_start_after(rt: af.Runtime) -> None:
    with pytest.raises(ValueError):
        counters(rt).get_by_name("x").list(start="a", start_after="b")
    assert counters(rt).get_by_name("x").list(limit=0) == {}


def test_transaction_rolls_back_on_exception(rt: af.Runtime) -> None:
    stub = counters(rt).get_by_name("tx")
    stub.put("keep", 1)
    assert stub.transactional(True) == "rolled back"
    assert stub.list() == {"keep": 1, "outside": 1}
    assert stub.get_alarm() is None
    assert stub.transactional(False) == "committed"
    assert stub.list() == {}
    assert stub.get_alarm() == FAR_FUTURE_MS


def test_delete_all_keeps_the_alarm(rt: af.Runtime, tmp_path: Any) -> None:
    stub = counters(rt).get_by_name("wipe")
    stub.put({"a": 1, "b": 2})
    stub.set_alarm(datetime(2030, 1, 1, tzinfo=UTC))
    stub.delete_all()
    assert stub.list() == {}
    assert stub.get("a") is None
    assert stub.get_alarm() == int(datetime(2030, 1, 1, tzinfo=UTC).timestamp() * 1000)
    stub.put("c", 3)
    rt.close()
    with af.Runtime(tmp_path / "data", clock=FakeClock()) as again:
        s = counters(again).get_by_name("wipe")
        assert s.list() == {"c": 3}
        assert s.get_alarm() == int(datetime(2030, 1, 1, tzinfo=UTC).timestamp() * 1000)


def test_json_serializer_option(tmp_path: Any) -> None:
    with af.Runtime(tmp_path / "d", serializer=af.JsonSerializer()) as r:
        stub = counters(r).get_by_name("json")
        stub.put("t", (1, "x"))
        assert stub.get("t") == [1, "x"]  # JSON has no tuples
        assert stub.increment(2) == 2
        with pytest.raises(af.SerializationError):
            stub.put("s", {1, 2})
        assert stub.get("s") is None
        raw = r.storage.get("objects", _data_key(r, stub, "t"))
        assert raw == b'[1,"x"]'


# -- alarms --------------------------------------------------------------------------------


def alarm_env(plan: Callable[[af.AlarmInfo], Any] = lambda info: None) -> dict[str, Any]:
    return {"attempts": [], "get_alarm_inside": [], "plan": plan}


def settle(rt: af.Runtime, stub: Any) -> None:
    """Lets due timers fire and the alarms they start finish."""
    assert rt.timers.sync()
    assert stub.ping() == "pong"  # queued behind any alarm; its reply waits for its writes


def test_alarm_set_get_delete_and_run(rt: af.Runtime, clock: FakeClock) -> None:
    env = alarm_env()
    stub = rt.durable_objects(Alarmed, name="al", env=env).get_by_name("a")
    when = clock.now_ms() + 5_000
    assert stub.get_alarm() is None
    stub.set_alarm(when)
    assert stub.get_alarm() == when
    stub.set_alarm(datetime.fromtimestamp((when + 1000) / 1000, tz=UTC))
    assert stub.get_alarm() == when + 1000
    stub.delete_alarm()
    assert stub.get_alarm() is None
    stub.set_alarm(when)
    clock.advance(4.9)
    settle(rt, stub)
    assert env["attempts"] == []  # not due yet
    clock.advance(0.2)
    settle(rt, stub)
    assert env["attempts"] == [(0, False, when)]
    assert env["get_alarm_inside"] == [None]  # while running, the alarm reads as unset
    assert stub.fired() == 1
    assert stub.get_alarm() is None
    assert rt.timers.pending() == 0
    with pytest.raises(ValueError):
        stub.set_alarm(datetime(2030, 1, 1))  # noqa: DTZ001 - naive on purpose


def test_deleted_or_replaced_alarm_does_not_fire(rt: af.Runtime, clock: FakeClock) -> None:
    env = alarm_env()
    ns = rt.durable_objects(Alarmed, name="al2", env=env)
    a, b = ns.get_by_name("a"), ns.get_by_name("b")
    a.set_alarm(clock.now_ms() + 1000)
    a.delete_alarm()
    b.set_alarm(clock.now_ms() + 1000)
    b.set_alarm(clock.now_ms() + 60_000)
    clock.advance(2)
    settle(rt, a)
    settle(rt, b)
    assert env["attempts"] == []
    assert rt.timers.pending() == 1


def test_failing_alarm_is_retried_with_backoff_then_abandoned(
    rt: af.Runtime, clock: FakeClock
) -> None:
    env = alarm_env(lambda info: "fail")
    stub = rt.durable_objects(Alarmed, name="retry", env=env).get_by_name("r")
    when = clock.now_ms() + 1000
    stub.set_alarm(when)
    clock.advance(1)
    settle(rt, stub)
    assert len(env["attempts"]) == 1
    for n in range(ALARM_MAX_RETRIES):
        failed_at = clock.now_ms()
        nxt = rt.timers.next_deadline_ms()
        assert nxt is not None
        delay = 2000 << n
        assert delay <= nxt - failed_at <= delay + delay // 4, (n, nxt - failed_at)
        clock.advance((nxt - failed_at - 10) / 1000)  # 10 ms early: nothing
        settle(rt, stub)
        assert len(env["attempts"]) == n + 1
        clock.advance(0.02)
        settle(rt, stub)
        assert len(env["attempts"]) == n + 2
    assert [a[0] for a in env["attempts"]] == list(range(ALARM_MAX_RETRIES + 1))
    assert [a[1] for a in env["attempts"]] == [False] + [True] * ALARM_MAX_RETRIES
    assert {a[2] for a in env["attempts"]} == {when}  # scheduled_time stays the original
    assert stub.fired() == ALARM_MAX_RETRIES + 1  # writes before the raise were kept
    assert rt.timers.pending() == 0 and stub.get_alarm() is None
    clock.advance(10_000)
    settle(rt, stub)
    assert len(env["attempts"]) == ALARM_MAX_RETRIES + 1


def test_alarm_that_recovers_on_retry(rt: af.Runtime, clock: FakeClock) -> None:
    env = alarm_env(lambda info: "fail" if info.retry_count < 2 else None)
    stub = rt.durable_objects(Alarmed, name="recover", env=env).get_by_name("r")
    stub.set_alarm(clock.now_ms())
    for _ in range(3):
        clock.advance(10)
        settle(rt, stub)
    assert [a[0] for a in env["attempts"]] == [0, 1, 2]
    clock.advance(1000)
    settle(rt, stub)
    assert len(env["attempts"]) == 3
    assert rt.timers.pending() == 0


def test_new_alarm_set_by_a_failing_handler_replaces_the_retry(
    rt: af.Runtime, clock: FakeClock
) -> None:
    later = clock.now_ms() + 100_000

    def plan(info: af.AlarmInfo) -> Any:
        return ("reschedule_and_fail", later) if info.scheduled_time != later else None

    env = alarm_env(plan)
    stub = rt.durable_objects(Alarmed, name="resched", env=env).get_by_name("r")
    stub.set_alarm(clock.now_ms() + 1000)
    clock.advance(1)
    settle(rt, stub)
    assert stub.get_alarm() == later
    clock.advance(50)  # a retry would have run by now
    settle(rt, stub)
    assert len(env["attempts"]) == 1
    clock.advance(60)
    settle(rt, stub)
    assert [(a[0], a[2]) for a in env["attempts"]] == [(0, later - 99_000), (0, later)]


def test_alarm_wakes_an_object_and_survives_a_restart(tmp_path: Any) -> None:
    clock = FakeClock()
    env = alarm_env()
    with af.Runtime(tmp_path / "d", clock=clock) as r1:
        stub = r1.durable_objects(Alarmed, name="persist", env=env).get_by_name("p")
        stub.set_alarm(clock.now_ms() + 30_000)
    clock2 = FakeClock(clock.now() + 29)
    with af.Runtime(tmp_path / "d", clock=clock2) as r2:
        ns = r2.durable_objects(Alarmed, name="persist", env=env)
        assert r2.timers.sync()
        assert env["attempts"] == [] and ns.activations == 0
        clock2.advance(2)
        assert r2.timers.sync()
        deadline = time.monotonic() + 10
        while not env["attempts"] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(env["attempts"]) == 1
        assert ns.activations == 1  # the alarm activated the object
        stub = ns.get_by_name("p")
        assert stub.fired() == 1
        assert stub.get_alarm() is None


def test_alarm_fires_after_restart_if_the_handler_never_finished(tmp_path: Any) -> None:
    """At least once: an alarm whose settling never reached disk fires again."""
    clock = FakeClock()
    env = alarm_env()
    with af.Runtime(tmp_path / "d", clock=clock) as r1:
        stub = r1.durable_objects(Alarmed, name="alo", env=env).get_by_name("p")
        stub.set_alarm(clock.now_ms() + 1000)

        def fault(batch: WriteBatch) -> None:
            raise OSError("crash before the alarm settled")

        r1.storage.set_fault(fault)
        clock.advance(2)
        assert r1.timers.sync()
        deadline = time.monotonic() + 10
        while not env["attempts"] and time.monotonic() < deadline:
            time.sleep(0.01)
        r1.timers.stop()  # a crash: no more passes
    ran = len(env["attempts"])
    assert ran >= 1
    with af.Runtime(tmp_path / "d", clock=FakeClock(clock.now())) as r2:
        ns = r2.durable_objects(Alarmed, name="alo", env=env)
        assert r2.timers.sync()
        settle(r2, ns.get_by_name("p"))
        assert len(env["attempts"]) == ran + 1
        assert r2.timers.pending() == 0


# -- eviction ---------------------------------------------------------------------------------


def test_idle_objects_are_evicted_losing_memory_but_not_storage(tmp_path: Any) -> None:
    env: dict[str, Any] = {"evicted": []}
    with af.Runtime(tmp_path / "d", idle_timeout=0.2, pool_size=4) as r:
        ns = counters(r, env=env)
        stub = ns.get_by_name("idle")
        assert stub.increment() == 1
        assert stub.memory_calls() == 2
        deadline = time.monotonic() + 10
        while ns.live_count and time.monotonic() < deadline:
            time.sleep(0.02)
        assert ns.live_count == 0
        assert env["evicted"] == [2]
        assert stub.memory_calls() == 1  # a new instance
        assert stub.increment() == 2  # same storage
        assert ns.activations == 2


def test_busy_objects_are_not_evicted(tmp_path: Any) -> None:
    with af.Runtime(tmp_path / "d", idle_timeout=0.3, pool_size=4) as r:
        ns = counters(r)
        stub = ns.get_by_name("busy")
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            stub.memory_calls()
            time.sleep(0.02)
        assert ns.activations == 1
        assert ns.evict_idle(idle=0.0) == 1
        assert ns.live_count == 0


def test_eviction_waits_for_writes_in_flight(rt: af.Runtime) -> None:
    ns = counters(rt)
    stub = ns.get_by_name("inflight")
    stub.increment()
    release = threading.Event()
    rt.storage.set_fault(lambda batch: release.wait(10))
    try:
        f = stub.increment.future()
        time.sleep(0.1)  # the call has run; its write is held back
        assert not f.done()  # type: ignore[attr-defined]
        assert ns.evict_idle(idle=0.0) == 0
        assert ns.live_count == 1
    finally:
        release.set()
    assert f.get(timeout=10) == 2
    deadline = time.monotonic() + 5
    while ns.evict_idle(idle=0.0) == 0 and time.monotonic() < deadline:
        time.sleep(0.005)
    assert ns.live_count == 0
    assert stub.increment() == 3
    assert ns.activations == 2


def test_close_finishes_queued_calls(tmp_path: Any) -> None:
    r = af.Runtime(tmp_path / "d", pool_size=2)
    stub = counters(r).get_by_name("closing")
    futures = [stub.increment.future() for _ in range(300)]
    r.close()
    assert [f.get(timeout=10) for f in futures] == list(range(1, 301))
    with af.Runtime(tmp_path / "d") as r2:
        assert counters(r2).get_by_name("closing").get("n") == 300
