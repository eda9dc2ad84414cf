"""The PostgreSQL backend's own faults: bad URLs, schemas, lost connections, retries, limits.

The storage contract itself runs on both backends in test_storage.py; these
are what only a database has. Every test uses a real server.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

import actorflow as af
from actorflow.core.errors import DataDirectoryLocked, LimitExceeded, StorageError
from actorflow.core.pg_backend import MAX_VALUE_BYTES, SCHEMA_VERSION, PostgresStorage
from actorflow.core.storage import WriteBatch, open_storage
from actorflow.testkit.postgres import PostgresServer, run_sql

pytestmark = pytest.mark.postgres
KS = "data"


@pytest.fixture
def store(pg_url: str) -> Iterator[PostgresStorage]:
    s = open_storage(pg_url)
    assert isinstance(s, PostgresStorage)
    yield s
    s.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_an_unreachable_url_is_a_clear_error() -> None:
    url = f"postgresql://actorflow:secret@127.0.0.1:{_free_port()}/actorflow"
    t0 = time.monotonic()
    with pytest.raises(StorageError, match="cannot reach the PostgreSQL database") as err:
        af.Runtime(url)
    assert time.monotonic() - t0 < 15
    assert "secret" not in str(err.value)  # the password never reaches a message


def test_a_wrong_database_name_is_a_clear_error(pg_server: PostgresServer) -> None:
    with pytest.raises(StorageError, match="no_such_db"):
        open_storage(pg_server.url_for("no_such_db"))


def test_the_schema_is_created_on_first_use(pg_url: str) -> None:
    s = open_storage(pg_url)
    s.close()
    tables = run_sql(
        pg_url,
        "SELECT string_agg(tablename, ',' ORDER BY tablename) FROM pg_tables"
        " WHERE tablename LIKE 'actorflow%'",
    )
    assert tables == "actorflow_kv,actorflow_meta,actorflow_writers"
    assert run_sql(pg_url, "SELECT value FROM actorflow_meta WHERE name='schema'") == str(
        SCHEMA_VERSION
    )


def test_a_schema_from_a_newer_version_is_refused_and_left_alone(pg_url: str) -> None:
    s = open_storage(pg_url)
    s.write(WriteBatch().put(KS, b"k", b"v"))
    s.close()
    run_sql(pg_url, f"UPDATE actorflow_meta SET value = '{SCHEMA_VERSION + 1}' WHERE name='schema'")
    with pytest.raises(StorageError, match="newer actorflow"):
        open_storage(pg_url)
    with pytest.raises(StorageError, match="newer actorflow"):
        af.Runtime(pg_url)
    assert run_sql(pg_url, "SELECT count(*) FROM actorflow_kv") == "1"  # nothing changed


def test_a_serialization_failure_is_retried_not_lost(store: PostgresStorage, pg_url: str) -> None:
    # A real error from the server, SQLSTATE 40001, raised by a trigger on the
    # first two commits that reach it (a sequence counts them: it is not
    # rolled back with the transaction that failed).
    run_sql(
        pg_url,
        "CREATE SEQUENCE failures;"
        " CREATE FUNCTION fail_twice() RETURNS trigger LANGUAGE plpgsql AS $$"
        " BEGIN IF nextval('failures') <= 2 THEN"
        " RAISE EXCEPTION 'injected' USING ERRCODE = '40001'; END IF; RETURN NEW; END $$;"
        " CREATE TRIGGER fail_twice BEFORE INSERT OR UPDATE ON actorflow_writers"
        " FOR EACH ROW EXECUTE FUNCTION fail_twice();",
    )
    for i in range(3):
        store.write(WriteBatch().put(KS, b"k%d" % i, b"v"))
    assert store.count(KS) == 3
    assert int(run_sql(pg_url, "SELECT last_value FROM failures")) >= 3  # both failures happened


def test_a_value_over_postgresqls_limit_is_refused_before_anything_is_written(
    store: PostgresStorage,
) -> None:
    big = bytes(MAX_VALUE_BYTES + 1)
    with pytest.raises(LimitExceeded, match="PostgreSQL's limit"):
        store.write(WriteBatch().put(KS, b"small", b"1").put(KS, b"big", big))
    del big
    assert store.get(KS, b"small") is None
    store.write(WriteBatch().put(KS, b"after", b"1"))  # the storage keeps working
    assert store.get(KS, b"after") == b"1"


def test_a_lone_runtime_has_the_database_to_itself(pg_url: str) -> None:
    with af.Runtime(pg_url):
        with pytest.raises(DataDirectoryLocked, match="in use"):
            af.Runtime(pg_url)
        with pytest.raises(DataDirectoryLocked, match="in use"):
            af.Runtime(pg_url, node_id="n1")
    with af.Runtime(pg_url, node_id="n1"):
        with pytest.raises(DataDirectoryLocked, match="n1"):
            af.Runtime(pg_url, node_id="n1")
        with pytest.raises(DataDirectoryLocked):
            af.Runtime(pg_url)


def _end_every_session(url: str) -> None:
    """What a server restart or a failover does to the runtimes' sessions.

    The timeout makes each call wait until its backend has exited, so the session's advisory
    locks are gone when this returns (without it the signal is only sent).
    """
    run_sql(
        url,
        "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        " AND application_name NOT LIKE 'psql%'",
    )


def test_a_claim_lost_with_the_server_is_taken_again(pg_url: str) -> None:
    first = open_storage(pg_url)
    assert isinstance(first, PostgresStorage)
    try:
        first.claim("n1")
        _end_every_session(pg_url)
        # The write meets the lost session, reconnects, and takes the claim again.
        first.write(WriteBatch().put(KS, b"after", b"1"))
        second = open_storage(pg_url)
        assert isinstance(second, PostgresStorage)
        try:
            with pytest.raises(DataDirectoryLocked, match="n1"):
                second.claim("n1")
        finally:
            second.close()
    finally:
        first.close()


def test_a_claim_taken_by_another_runtime_meanwhile_stops_this_ones_writes(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="actorflow.storage")
    first, second = open_storage(pg_url), open_storage(pg_url)
    assert isinstance(first, PostgresStorage) and isinstance(second, PostgresStorage)
    try:
        first.claim("n1")
        first.write(WriteBatch().put(KS, b"before", b"1"))
        _end_every_session(pg_url)
        second.claim("n1")  # its locks went with the session: another runtime takes them
        with pytest.raises(DataDirectoryLocked, match="node 'n1', lost its claim"):
            first.write(WriteBatch().put(KS, b"lost", b"1"))
        with pytest.raises(DataDirectoryLocked):
            first.write(WriteBatch().put(KS, b"lost", b"2"))
        assert "lost its claim" in caplog.text
        assert first.get(KS, b"lost") is None and first.get(KS, b"before") == b"1"
        second.write(WriteBatch().put(KS, b"second", b"1"))  # the holder writes on
        assert second.get(KS, b"second") == b"1"
    finally:
        first.close()
        second.close()


def test_killed_connections_lose_no_acknowledged_write(
    store: PostgresStorage, pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The server ends the writer's session again and again while writes stream in."""
    caplog.set_level(logging.WARNING, logger="actorflow.storage")
    acked: list[int] = []
    failed: list[BaseException] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            n = i
            i += 1

            def cb(err: BaseException | None, n: int = n) -> None:
                with lock:
                    (failed.append(err) if err is not None else acked.append(n))

            store.submit(WriteBatch().put(KS, b"%08d" % n, b"v").guard(KS, b"%08d" % n, None), cb)
            if i % 50 == 0:
                time.sleep(0.001)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(8):
            time.sleep(0.15)
            run_sql(
                pg_url,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " AND application_name NOT LIKE 'psql%'",
            )
    finally:
        stop.set()
        t.join()
    deadline = time.monotonic() + 30
    while not store.idle() and time.monotonic() < deadline:
        time.sleep(0.05)
    store.write(WriteBatch().put(KS, b"zz-last", b"v"))
    # A guard of "absent, then put" would fail a group applied twice: none did.
    assert failed == []
    rows = {k for k, _ in store.scan(KS, keys_only=True)}
    assert {b"%08d" % n for n in acked} <= rows
    assert len(acked) > 100
    assert "cannot be reached" in caplog.text


def test_writes_wait_for_a_restarted_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="actorflow.storage")
    with PostgresServer() as server:
        s = open_storage(server.url)
        try:
            s.write(WriteBatch().put(KS, b"before", b"1"))
            server.stop(mode="immediate")
            done = threading.Event()
            errors: list[Any] = []

            def cb(err: BaseException | None) -> None:
                errors.append(err)
                done.set()

            s.submit(WriteBatch().put(KS, b"during", b"1"), cb)
            assert not done.wait(1.5)  # waiting, not failed
            server.start()
            assert done.wait(30) and errors == [None]
            assert s.get(KS, b"during") == b"1" and s.get(KS, b"before") == b"1"
        finally:
            s.close()
    assert "writes wait and retry" in caplog.text and "is back" in caplog.text


def test_a_workflow_runs_on_postgres_and_survives_a_reopen(pg_url: str) -> None:
    class Two(af.Workflow):
        def run(self, event: Any, step: Any) -> int:
            a = step.do("a", lambda: 20)
            return int(step.do("b", lambda: a + 1))

    with af.Runtime(pg_url) as rt:
        inst = rt.register(Two, "two").create(id="i1")
        assert inst.wait(timeout=30).output == 21
    with af.Runtime(pg_url) as rt:
        assert rt.register(Two, "two").get("i1").status().output == 21
