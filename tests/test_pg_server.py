"""The real PostgreSQL servers of :mod:`actorflow.testkit.postgres`: start, stop, crash, freeze, failover."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator

import pytest
from conftest import postgres_or_skip

from actorflow.testkit.postgres import (
    PostgresServer,
    PostgresServerError,
    multi_host_url,
    replicated_pair,
    run_sql,
)

pytestmark = [pytest.mark.postgres, pytest.mark.usefixtures("require_postgres")]


@pytest.fixture
def require_postgres() -> None:
    postgres_or_skip()


@pytest.fixture
def pair() -> Iterator[tuple[PostgresServer, PostgresServer]]:
    primary, standby = replicated_pair(synchronous=True)
    yield primary, standby
    standby.cleanup()
    primary.cleanup()


def wait_gone(pids: list[int], timeout: float = 10.0) -> None:
    """Polls until no process in ``pids`` exists any more (an exited one may wait to be reaped)."""
    deadline = time.monotonic() + timeout
    left = list(pids)
    while left:
        for pid in list(left):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                left.remove(pid)
        if left and time.monotonic() > deadline:
            pytest.fail(f"processes {left} still exist")
        time.sleep(0.01)


def state(pid: int) -> str:
    """The /proc state letter of ``pid`` (``T`` when stopped by a signal)."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    return stat[stat.rindex(")") + 2]


def test_start_stop_url_settings_and_cleanup() -> None:
    server = PostgresServer(settings={"work_mem": "8MB", "max_connections": "50"})
    try:
        server.init()
        server.start()
        assert server.url == f"postgresql://actorflow@127.0.0.1:{server.port}/actorflow"
        assert run_sql(server.url, "SELECT current_user, current_database()") == (
            "actorflow|actorflow"
        )
        assert run_sql(server.url, "SELECT inet_server_port()") == str(server.port)
        assert server.sql("SHOW fsync") == "on"
        assert server.sql("SHOW wal_level") == "replica"
        assert server.sql("SHOW work_mem") == "8MB"
        assert server.sql("SHOW max_connections") == "50"  # the caller's setting wins
        with pytest.raises(PostgresServerError, match="no_such_table"):
            server.sql("SELECT * FROM no_such_table")
        server.sql("CREATE TABLE t (x int); INSERT INTO t VALUES (7)")
        pid = server.pid
        assert os.getpgid(pid) == pid  # its own process group
        server.stop()
        assert not server.running
        wait_gone([pid])
        with pytest.raises(PostgresServerError):
            server.sql("SELECT 1", timeout=5)
        # The same directory starts again, with what it held.
        server.start()
        assert server.sql("SELECT x FROM t") == "7"
        pids = server.processes()
        assert len(pids) > 1  # the postmaster and its workers
    finally:
        server.cleanup()
    wait_gone(pids)
    assert not os.path.exists(server.directory)
    server.cleanup()  # a second time does nothing


def test_a_killed_server_restarts_with_crash_recovery() -> None:
    server = PostgresServer()
    try:
        server.init()
        # Its port, picked free, is taken before it starts: it picks another.
        taken = server.port
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", taken))
            squatter.listen()
            server.start()
        assert server.port != taken
        assert server.sql("SELECT inet_server_port()") == str(server.port)
        server.sql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)")
        pids = server.processes()
        assert len(pids) > 1  # the postmaster and its workers
        server.kill()
        assert not server.running
        with pytest.raises(PostgresServerError):
            server.sql("SELECT 1", timeout=5)
        server.start()
        assert server.sql("SELECT x FROM t") == "1"
    finally:
        server.cleanup()
    wait_gone(pids)


def test_kill_and_promote_keeps_a_synchronously_committed_row(
    pair: tuple[PostgresServer, PostgresServer],
) -> None:
    primary, standby = pair
    url = multi_host_url(primary, standby)
    assert run_sql(url, "SELECT inet_server_port()") == str(primary.port)
    assert standby.sql("SELECT pg_is_in_recovery()") == "t"
    assert primary.sql("SHOW synchronous_commit") == "remote_apply"
    assert standby.sql("SHOW synchronous_standby_names") == ""

    primary.sql("CREATE TABLE t (x int); INSERT INTO t VALUES (42)")
    primary.kill()
    standby.promote()

    assert standby.sql("SELECT pg_is_in_recovery()") == "f"
    assert standby.sql("SELECT x FROM t") == "42"
    # The multi-host URL now reaches the promoted standby, which commits on its own.
    assert run_sql(url, "SELECT inet_server_port()") == str(standby.port)
    run_sql(url, "INSERT INTO t VALUES (43)", timeout=10)
    assert standby.sql("SELECT x FROM t ORDER BY x") == "42\n43"


def test_a_frozen_server_does_not_answer_until_thawed() -> None:
    with PostgresServer() as server:
        server.freeze()
        assert server.frozen
        pids = server.processes()
        assert len(pids) > 1
        assert {pid: state(pid) for pid in pids} == dict.fromkeys(pids, "T")
        started = time.monotonic()
        with pytest.raises(PostgresServerError, match="did not finish"):
            server.sql("SELECT 1", timeout=1)
        assert time.monotonic() - started < 10
        server.thaw()
        assert not server.frozen
        assert server.sql("SELECT 1") == "1"
        # A frozen server still stops (it is thawed first).
        server.freeze()
        server.stop()
        assert not server.running


def test_two_servers_at_once(pg_server: PostgresServer) -> None:
    with PostgresServer() as other:
        assert other.port != pg_server.port
        assert other.directory != pg_server.directory
        other.sql("CREATE TABLE only_here (x int)")
        query = "SELECT count(*) FROM pg_tables WHERE tablename = 'only_here'"
        assert other.sql(query) == "1"
        assert pg_server.sql(query) == "0"
    assert pg_server.sql("SELECT 1") == "1"


def test_the_server_is_out_of_the_callers_process_group(pg_server: PostgresServer) -> None:
    assert os.getpgid(pg_server.pid) == pg_server.pid != os.getpgrp()


def test_pg_url_is_a_fresh_database(pg_server: PostgresServer, pg_url: str) -> None:
    name = pg_url.rsplit("/", 1)[1]
    assert name.startswith("t_")
    assert run_sql(pg_url, "SELECT current_database()") == name
    assert run_sql(pg_url, "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'") == "0"
    assert pg_url.startswith(f"postgresql://actorflow@127.0.0.1:{pg_server.port}/")
