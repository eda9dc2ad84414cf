"""Real local PostgreSQL servers for tests, benchmarks and failover drills.

:class:`PostgresServer` runs one server from the installed PostgreSQL binaries
in its own temporary directory, listening on a free loopback TCP port, as a
child process of the caller (the postmaster's pid is :attr:`PostgresServer.pid`).
It can be stopped, killed (a crashed database host), frozen and thawed (an
unreachable one) and, as a standby, promoted. :func:`replicated_pair` makes a
primary with a streaming standby; :func:`multi_host_url` names both so that a
client follows the failover.

The server refuses to run as root. When the caller is root (as in CI), the
server's programs run as the unprivileged ``postgres`` system user (made by
Debian's ``postgresql`` package) and its directory belongs to that user. The
client programs (``psql``, ``pg_isready``) run as the caller and connect over
TCP with trust authentication.

Every server's superuser is ``actorflow`` and its default database is
``actorflow``. Only a loopback interface is listened on; nothing here is meant
for a shared machine's untrusted users.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from actorflow.core.errors import ActorflowError

__all__ = [
    "DATABASE",
    "HOST",
    "SUPERUSER",
    "PostgresServer",
    "PostgresServerError",
    "available",
    "bin_dir",
    "multi_host_url",
    "replicated_pair",
    "run_sql",
    "temporary_database",
]

#: The superuser made by ``initdb`` on every server.
SUPERUSER = "actorflow"
#: The database :meth:`PostgresServer.start` makes on a primary.
DATABASE = "actorflow"
#: The only address the servers listen on.
HOST = "127.0.0.1"

#: The system user the server's programs run as when the caller is root.
_SERVER_USER = "postgres"
_SERVER_PROGRAMS = ("initdb", "postgres", "pg_ctl", "pg_basebackup", "pg_isready", "psql")

# The settings every server starts with, before the caller's own ``settings``.
_DEFAULT_SETTINGS: dict[str, str] = {
    "listen_addresses": HOST,
    "fsync": "on",
    "synchronous_commit": "on",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "wal_level": "replica",
    "max_wal_senders": "10",
    "max_replication_slots": "10",
    "hot_standby": "on",
}

# The signal that asks the postmaster for each shutdown mode of ``pg_ctl stop -m``.
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}


class PostgresServerError(ActorflowError):
    """A PostgreSQL server could not be made, started, stopped, promoted or queried."""


def bin_dir() -> str | None:
    """The directory of the PostgreSQL server programs, or None if there is none.

    The newest ``/usr/lib/postgresql/*/bin`` (Debian's layout) comes first,
    then ``pg_config --bindir``, then the directory of ``postgres`` on ``PATH``.
    """

    def complete(path: str) -> bool:
        return all(os.access(os.path.join(path, p), os.X_OK) for p in _SERVER_PROGRAMS)

    def version(path: str) -> tuple[int, ...]:
        name = os.path.basename(os.path.dirname(path))
        return tuple(int(n) for n in re.findall(r"\d+", name)) or (0,)

    for path in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if complete(path):
            return path
    pg_config = shutil.which("pg_config")
    if pg_config is not None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, timeout=10, check=True
            ).stdout.strip()
            if out and complete(out):
                return out
    postgres = shutil.which("postgres")
    if postgres is not None and complete(os.path.dirname(postgres)):
        return os.path.dirname(postgres)
    return None


def available() -> str | None:
    """Whether a server can be run here.

    Returns:
        None if it can, else the reason it cannot (for a test's skip message).
    """
    if os.name != "posix" or not os.path.isdir("/proc"):
        return "the PostgreSQL test servers need Linux"
    if bin_dir() is None:
        return (
            "no PostgreSQL server programs (initdb, postgres, pg_ctl, pg_basebackup, "
            "pg_isready, psql) in /usr/lib/postgresql/*/bin, pg_config --bindir or PATH; "
            "install Debian's postgresql package"
        )
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            return (
                f"running as root, and there is no {_SERVER_USER!r} system user to run "
                "the server as (PostgreSQL refuses to run as root)"
            )
    return None


@dataclass(frozen=True)
class _RunAs:
    """The identity the server's programs run with (None fields: the caller's)."""

    user: int | None = None
    group: int | None = None
    extra_groups: tuple[int, ...] | None = None
    home: str | None = None

    @classmethod
    def for_server(cls) -> _RunAs:
        if os.geteuid() != 0:
            return cls()
        try:
            entry = pwd.getpwnam(_SERVER_USER)
        except KeyError:
            raise PostgresServerError(
                f"running as root, and there is no {_SERVER_USER!r} user to run PostgreSQL as"
            ) from None
        return cls(user=entry.pw_uid, group=entry.pw_gid, extra_groups=(), home=entry.pw_dir)

    def env(self) -> dict[str, str]:
        env = _client_env()
        if self.home is not None:
            # Not the caller's: libpq looks for ~/.pgpass there (and names it
            # in the primary_conninfo that pg_basebackup -R writes).
            env["HOME"] = self.home
        return env

    def popen_kwargs(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        groups = list(self.extra_groups or ())
        return {"user": self.user, "group": self.group, "extra_groups": groups}

    def chown_tree(self, path: str) -> None:
        if self.user is None or self.group is None:
            return
        os.chown(path, self.user, self.group)
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                os.chown(os.path.join(root, name), self.user, self.group, follow_symlinks=False)


def _client_env(connect_timeout: float | None = None) -> dict[str, str]:
    # The caller's PG* variables (PGHOST, PGSERVICE, PGSSLMODE...) would
    # redirect or change every connection made here.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    if connect_timeout is not None:
        env["PGCONNECT_TIMEOUT"] = str(max(1, round(connect_timeout)))
    return env


def _programs() -> str:
    path = bin_dir()
    if path is None:
        raise PostgresServerError(available() or "no PostgreSQL server programs found")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
        return port


def run_sql(url: str, statement: str, *, timeout: float = 30.0) -> str:
    """Runs ``statement`` with ``psql -At`` against a connection URL.

    Args:
        url: A libpq connection URL (one host or several, as from :func:`multi_host_url`).
        statement: One or more SQL statements; the output of the last is returned.
        timeout: Seconds for the connection and the statement together.

    Returns:
        psql's output (unaligned, tuples only: ``|`` between columns, one row a
        line), without the trailing newline.

    Raises:
        PostgresServerError: psql failed, or did not finish within ``timeout``.
    """
    cmd = [
        os.path.join(_programs(), "psql"),
        "-X",
        "-q",
        "-At",
        "-v",
        "ON_ERROR_STOP=1",
        "-d",
        url,
        "-c",
        statement,
    ]
    try:
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_client_env(connect_timeout=timeout),
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise PostgresServerError(
            f"psql did not finish within {timeout} s on {url}: {statement[:200]}", url=url
        ) from None
    if done.returncode != 0:
        raise PostgresServerError(
            f"psql failed (exit {done.returncode}) on {url}: {done.stderr.strip()}\n"
            f"statement: {statement[:200]}",
            url=url,
        )
    return done.stdout.rstrip("\n")


def multi_host_url(*servers: PostgresServer, database: str = DATABASE) -> str:
    """A URL naming every server, which connects to the one that accepts writes.

    libpq (and psycopg) try the hosts in order and keep the first that is not
    in recovery: after a failover it reaches the promoted standby.

    Args:
        *servers: The servers, in the order to try them.
        database: The database to connect to.
    """
    if not servers:
        raise ValueError("multi_host_url needs at least one server")
    hosts = ",".join(f"{s.host}:{s.port}" for s in servers)
    return f"postgresql://{SUPERUSER}@{hosts}/{database}?target_session_attrs=read-write"


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """The state letter and parent pid of ``pid`` from /proc, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ")".
    fields = stat[stat.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _gone(pid: int) -> bool:
    # A zombie has exited: only its parent's (or init's) reaping is left.
    stat = _proc_stat(pid)
    return stat is None or stat[0] in ("Z", "X")


def _children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (the postmaster's backends and workers)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(int(entry))
        if stat is not None and stat[1] == pid and stat[0] not in ("Z", "X"):
            found.append(int(entry))
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class PostgresServer:
    """One local PostgreSQL server in its own directory, on a loopback TCP port.

    The directory (made with :func:`tempfile.mkdtemp`) holds the data directory
    ``data/``, the Unix socket and the server's log ``postgres.log``;
    :meth:`cleanup` removes it. Make the server with :meth:`init` (a new
    cluster) or :meth:`init_standby` (a copy of a running primary), then
    :meth:`start` it. As a context manager it is made and started on entry,
    if it was not yet, and cleaned up on exit.

    Args:
        port: The TCP port (default: a free one, picked now).
        base_dir: The directory in which the server's own directory is made
            (default: the system's temporary directory). It must be traversable
            by the ``postgres`` user when the caller is root.
        settings: Extra ``postgresql.conf`` settings, which override the
            defaults (values are written quoted; PostgreSQL accepts any value
            quoted).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        base_dir: str | None = None,
        settings: Mapping[str, str] | None = None,
    ) -> None:
        self.port: int = port if port is not None else _free_port()
        self._port_picked = port is None
        self.host: str = HOST
        self.user: str = SUPERUSER
        self.database: str = DATABASE
        self.settings: dict[str, str] = dict(settings or {})
        self._run_as = _RunAs.for_server()
        self._bin = _programs()
        self.directory: str = tempfile.mkdtemp(prefix="actorflow-pg-", dir=base_dir)
        # mkdtemp makes it 0700 for the caller: the server's user must own it.
        self._run_as.chown_tree(self.directory)
        self.data_dir: str = os.path.join(self.directory, "data")
        self.log_path: str = os.path.join(self.directory, "postgres.log")
        self._proc: subprocess.Popen[bytes] | None = None
        #: The name a standby connects to its primary as (None on a primary).
        self.application_name: str | None = None
        self._initialized = False
        self._frozen = False

    # -- identity ------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``postgresql://actorflow@127.0.0.1:PORT/actorflow``."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """The URL of another database on this server."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{database}"

    @property
    def pid(self) -> int:
        """The postmaster's pid.

        Raises:
            PostgresServerError: The server is not running.
        """
        if self._proc is None or self._proc.poll() is not None:
            raise PostgresServerError(f"the PostgreSQL server on port {self.port} is not running")
        return self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the postmaster is alive (frozen counts as alive)."""
        return self._proc is not None and self._proc.poll() is None

    def processes(self) -> list[int]:
        """The postmaster's pid and its children's (backends, WAL sender, workers).

        Each child of the postmaster leads its own process group, so this is
        how they are all reached (empty when the server is not running).
        """
        if not self.running:
            return []
        return [self.pid, *_children(self.pid)]

    def log_tail(self, lines: int = 30) -> str:
        """The end of the server's log, for error messages."""
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"PostgresServer(port={self.port}, {state}, directory={self.directory!r})"

    # -- making --------------------------------------------------------------------

    def init(self) -> None:
        """Makes a new cluster with ``initdb`` and writes its settings.

        Trust authentication for local and loopback connections (replication
        included), superuser ``actorflow``, UTF8.

        Raises:
            PostgresServerError: initdb failed, or the server was made already.
        """
        self._check_new()
        self._run_server_program(
            [
                "initdb",
                "-D",
                self.data_dir,
                "-U",
                self.user,
                "-E",
                "UTF8",
                "--locale=C",
                "--auth=trust",
                "--no-sync",
                "--no-instructions",
            ],
            what="initdb",
        )
        self._write_settings(self.settings)
        self._initialized = True

    def init_standby(self, primary: PostgresServer, *, application_name: str | None = None) -> None:
        """Makes this server a streaming standby of a running ``primary``.

        Copies the primary with ``pg_basebackup -R`` through a new physical
        replication slot; the standby connects as ``application_name``
        (default ``standby_<port>``), the name the primary's
        ``synchronous_standby_names`` can list.

        Raises:
            PostgresServerError: pg_basebackup failed, or this server was made already.
        """
        self._check_new()
        name = application_name or f"standby_{self.port}"
        conninfo = (
            f"host={primary.host} port={primary.port} user={primary.user} application_name={name}"
        )
        self._run_server_program(
            [
                "pg_basebackup",
                "-d",
                conninfo,
                "-D",
                self.data_dir,
                "-R",
                "-X",
                "stream",
                "-C",
                "-S",
                name,
                "-c",
                "fast",
                "--no-sync",
            ],
            what="pg_basebackup",
        )
        self.application_name = name
        # The copied postgresql.conf carries the primary's port and socket
        # directory: this server's own settings are appended after them.
        self._write_settings(self.settings)
        self._initialized = True

    def _check_new(self) -> None:
        if self._initialized:
            raise PostgresServerError(f"the server in {self.directory} was made already")

    def _write_settings(self, extra: Mapping[str, str]) -> None:
        settings = {
            **_DEFAULT_SETTINGS,
            "port": str(self.port),
            "unix_socket_directories": self.directory,
            **extra,
        }
        self.configure(settings)

    def configure(self, settings: Mapping[str, str], *, reload: bool = False) -> None:
        """Appends settings to ``postgresql.conf`` (a later line wins).

        Args:
            settings: Setting names and values.
            reload: Also make a running server read them (``pg_reload_conf()``);
                settings that need a restart only apply on the next start.
        """
        lines = ["", "# actorflow.testkit.postgres"]
        for key, value in settings.items():
            quoted = str(value).replace("\\", "\\\\").replace("'", "''")
            lines.append(f"{key} = '{quoted}'")
        with open(os.path.join(self.data_dir, "postgresql.conf"), "a") as f:
            f.write("\n".join(lines) + "\n")
        if reload:
            self.sql("SELECT pg_reload_conf()", database="postgres")

    def _run_server_program(self, argv: list[str], *, what: str, timeout: float = 120) -> str:
        cmd = [os.path.join(self._bin, argv[0]), *argv[1:]]
        try:
            done = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=timeout,
                cwd=self.directory,  # the caller's own may be closed to the server's user
                env=self._run_as.env(),
                stdin=subprocess.DEVNULL,
                **self._run_as.popen_kwargs(),
            )
        except subprocess.TimeoutExpired:
            raise PostgresServerError(f"{what} did not finish within {timeout} s") from None
        if done.returncode != 0:
            raise PostgresServerError(
                f"{what} failed (exit {done.returncode}) in {self.directory}:\n"
                f"{done.stdout.strip()}\n{done.stderr.strip()}"
            )
        return done.stdout

    # -- running -------------------------------------------------------------------

    def start(self, timeout: float = 30) -> None:
        """Starts ``postgres -D`` as a child and waits until it accepts connections.

        The postmaster is this process's child, in a process group of its own
        (a signal to the caller's group does not reach it). On a primary, the
        ``actorflow`` database is made if it is missing.

        Raises:
            PostgresServerError: The server is running already, exited, or did
                not accept connections within ``timeout`` (the message carries
                the end of its log).
        """
        if not self._initialized:
            raise PostgresServerError(f"the server in {self.directory} was not made: call init()")
        if self.running:
            raise PostgresServerError(f"the PostgreSQL server on port {self.port} is running")
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            log_start = os.path.getsize(self.log_path) if os.path.exists(self.log_path) else 0
            try:
                self._start_once(deadline)
                return
            except PostgresServerError:
                # A port picked free may have been taken since: pick another.
                if not self._port_picked or attempt == 2 or not self._lost_port(log_start):
                    raise
            self.port = _free_port()
            self.configure({"port": str(self.port)})

    def _lost_port(self, log_start: int) -> bool:
        with open(self.log_path, "rb") as f:
            f.seek(log_start)
            return b"could not bind" in f.read()

    def _start_once(self, deadline: float) -> None:
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [os.path.join(self._bin, "postgres"), "-D", self.data_dir],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                env=self._run_as.env(),
                process_group=0,
                **self._run_as.popen_kwargs(),
            )
        self._frozen = False
        try:
            self._wait_ready(deadline)
            # pg_isready may have reached another server on a port this one failed to bind.
            query = "SELECT current_setting('data_directory'), pg_is_in_recovery()"
            data_dir, in_recovery = self.sql(query, database="postgres").split("|")
            if os.path.realpath(data_dir) != os.path.realpath(self.data_dir):
                raise PostgresServerError(
                    f"port {self.port} is served by another PostgreSQL server ({data_dir}):\n"
                    f"{self.log_tail()}"
                )
            if in_recovery == "f":
                self._create_database(self.database)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, deadline: float) -> None:
        isready = os.path.join(self._bin, "pg_isready")
        while True:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise PostgresServerError(
                    f"the PostgreSQL server on port {self.port} exited (status {code}):\n"
                    f"{self.log_tail()}"
                )
            done = subprocess.run(
                [isready, "-q", "-h", self.host, "-p", str(self.port), "-t", "1"],
                env=_client_env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                check=False,
            )
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise PostgresServerError(
                    f"the PostgreSQL server on port {self.port} did not accept connections "
                    f"in time:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def _create_database(self, name: str) -> None:
        query = f"SELECT 1 FROM pg_database WHERE datname = '{name}'"
        exists = self.sql(query, database="postgres")
        if exists != "1":
            self.sql(f'CREATE DATABASE "{name}"', database="postgres")

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Shuts the server down and waits until the postmaster has exited.

        A frozen server is thawed first. Does nothing if it is not running.

        Args:
            mode: ``pg_ctl stop -m``'s mode: ``"smart"`` (wait for clients),
                ``"fast"`` (disconnect them, checkpoint) or ``"immediate"``
                (no checkpoint; crash recovery on the next start).
            timeout: Seconds to wait; then the server is killed and
                :class:`PostgresServerError` raised.
        """
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"mode must be one of {sorted(_STOP_SIGNALS)}, not {mode!r}")
        if not self.running or self._proc is None:
            return
        if self._frozen:
            self.thaw()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._proc.pid, _STOP_SIGNALS[mode])
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise PostgresServerError(
                f"the PostgreSQL server on port {self.port} did not stop ({mode}) within "
                f"{timeout} s; killed it"
            ) from None

    def kill(self, timeout: float = 10) -> None:
        """SIGKILLs the postmaster and all its children: a crashed database host.

        Returns once every one of them has exited (so that the directory can be
        started again, with crash recovery). Does nothing if it is not running.
        """
        if not self.running or self._proc is None:
            return
        postmaster = self._proc.pid
        # Stopped first, so that it forks no child that the list below misses.
        with contextlib.suppress(ProcessLookupError):
            os.kill(postmaster, signal.SIGSTOP)
        self._wait_states([postmaster], stopped=True)
        pids = [postmaster, *_children(postmaster)]
        _signal_all(pids, signal.SIGKILL)
        self._proc.wait()
        self._frozen = False
        deadline = time.monotonic() + timeout
        while not all(_gone(pid) for pid in pids):
            if time.monotonic() > deadline:
                raise PostgresServerError(
                    f"processes of the PostgreSQL server on port {self.port} outlived SIGKILL"
                )
            time.sleep(0.01)

    def freeze(self) -> None:
        """SIGSTOPs the postmaster and all its children: an unreachable database.

        Connections are still accepted by the kernel, but nothing answers:
        clients wait until their own timeouts.
        """
        postmaster = self.pid
        # The postmaster first, so that it forks no child after the list is read.
        os.kill(postmaster, signal.SIGSTOP)
        self._frozen = True
        # A signal is delivered asynchronously: list the children only once it
        # has stopped, and return only once nothing runs.
        self._wait_states([postmaster], stopped=True)
        children = _children(postmaster)
        _signal_all(children, signal.SIGSTOP)
        self._wait_states(children, stopped=True)

    def _wait_states(self, pids: list[int], *, stopped: bool, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        for pid in pids:
            while True:
                stat = _proc_stat(pid)
                if stat is None or stat[0] in ("Z", "X") or (stat[0] in ("T", "t")) == stopped:
                    break
                if time.monotonic() > deadline:
                    raise PostgresServerError(
                        f"process {pid} of the PostgreSQL server on port {self.port} did not "
                        f"{'stop' if stopped else 'continue'} in time"
                    )
                time.sleep(0.001)

    def thaw(self) -> None:
        """SIGCONTs what :meth:`freeze` stopped."""
        postmaster = self.pid
        pids = [*_children(postmaster), postmaster]
        _signal_all(pids, signal.SIGCONT)
        self._frozen = False
        self._wait_states(pids, stopped=False)

    @property
    def frozen(self) -> bool:
        """Whether :meth:`freeze` stopped the server (and :meth:`thaw` has not resumed it)."""
        return self._frozen and self.running

    def promote(self, timeout: float = 30) -> None:
        """Promotes a standby (``pg_ctl promote``) and waits until it accepts writes.

        Raises:
            PostgresServerError: It is not running, not a standby, or still in
                recovery after ``timeout``.
        """
        if not self.running:
            raise PostgresServerError(f"the PostgreSQL server on port {self.port} is not running")
        self._run_server_program(
            ["pg_ctl", "promote", "-D", self.data_dir, "-w", "-t", str(max(1, round(timeout)))],
            what="pg_ctl promote",
            timeout=timeout + 10,
        )
        deadline = time.monotonic() + timeout
        while self.sql("SELECT pg_is_in_recovery()", database="postgres") != "f":
            if time.monotonic() > deadline:
                raise PostgresServerError(
                    f"the PostgreSQL server on port {self.port} was still in recovery "
                    f"{timeout} s after pg_ctl promote:\n{self.log_tail()}"
                )
            time.sleep(0.05)

    def sql(self, statement: str, *, database: str | None = None, timeout: float = 30.0) -> str:
        """Runs ``statement`` with ``psql -At`` on this server (see :func:`run_sql`).

        Args:
            statement: One or more SQL statements.
            database: The database (default ``actorflow``).
            timeout: Seconds for the connection and the statement together.
        """
        return run_sql(self.url_for(database or self.database), statement, timeout=timeout)

    def cleanup(self) -> None:
        """Stops the server if it runs (kills it if it will not stop); removes its directory."""
        try:
            if self.running:
                try:
                    self.stop("fast", timeout=15)
                except PostgresServerError:
                    self.kill()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        try:
            if not self._initialized:
                self.init()
            if not self.running:
                self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def replicated_pair(
    *, synchronous: bool = True, timeout: float = 60
) -> tuple[PostgresServer, PostgresServer]:
    """A started primary and its streaming standby (``pg_basebackup -R``, a replication slot).

    With ``synchronous=True`` the primary lists the standby's application name
    in ``synchronous_standby_names`` with ``synchronous_commit =
    remote_apply``: a commit the primary acknowledged is applied, and visible,
    on the standby. It returns once the standby streams (synchronously if asked).
    The standby's own configuration has no synchronous standby, so once
    promoted it commits on its own.

    Call :meth:`PostgresServer.cleanup` on both when done.

    Raises:
        PostgresServerError: A server failed to start, or the standby did not
            stream within ``timeout`` seconds.
    """
    primary = PostgresServer()
    standby: PostgresServer | None = None
    try:
        primary.init()
        primary.start()
        standby = PostgresServer()
        standby.init_standby(primary)
        standby.start()
        name = standby.application_name
        assert name is not None
        if synchronous:
            # Set only now: the standby's copy of the configuration must not
            # wait for a standby of its own after a promotion.
            primary.configure(
                {"synchronous_standby_names": f'"{name}"', "synchronous_commit": "remote_apply"},
                reload=True,
            )
        wanted = "sync" if synchronous else "async"
        query = (
            "SELECT sync_state FROM pg_stat_replication "
            f"WHERE application_name = '{name}' AND state = 'streaming'"
        )
        deadline = time.monotonic() + timeout
        while primary.sql(query, database="postgres") != wanted:
            if time.monotonic() > deadline:
                raise PostgresServerError(
                    f"the standby on port {standby.port} did not stream ({wanted}) from the "
                    f"primary on port {primary.port} within {timeout} s:\n{standby.log_tail()}"
                )
            time.sleep(0.05)
    except BaseException:
        if standby is not None:
            standby.cleanup()
        primary.cleanup()
        raise
    return primary, standby


@contextlib.contextmanager
def temporary_database(server: PostgresServer) -> Iterator[str]:
    """A fresh database ``t_<hex>`` on ``server``, dropped afterwards; yields its URL."""
    name = f"t_{uuid.uuid4().hex}"
    server.sql(f'CREATE DATABASE "{name}"', database="postgres")
    try:
        yield server.url_for(name)
    finally:
        if server.running and not server.frozen:
            server.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', database="postgres")
