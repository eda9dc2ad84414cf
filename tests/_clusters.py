"""Real Ray and Dask clusters for the executor tests, and their teardown.

Ray nodes are started with ``ray start --block`` in child processes of their
own session, so that a node can be killed as a whole (its raylet and workers)
and nothing of it outlives the tests: :meth:`RayNodes.stop` kills the process
tree of every node it started and checks that none is left.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RAY = str(Path(sys.executable).with_name("ray"))
#: The test clusters listen on loopback only, without Ray's token authentication
#: (the driver, the test process, must then say so too: see ``ray_env``).
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


class RayNode:
    """One ``ray start --block`` process and the tree under it."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.proc = proc
        self.log = log

    def tree(self) -> list[Any]:
        import psutil

        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def kill(self) -> None:
        """SIGKILLs the node: its ``ray start``, raylet, workers, everything under it."""
        import psutil

        procs = self.tree()
        for p in procs:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        psutil.wait_procs(procs, timeout=10)
        self.proc.wait(10)


class RayNodes:
    """A Ray cluster of real node processes on this machine."""

    def __init__(self) -> None:
        # Short: Ray's unix sockets live under it (a path is at most 107 bytes).
        self.temp = tempfile.mkdtemp(prefix="rayaf-", dir="/tmp")
        self.nodes: list[RayNode] = []
        self.address = ""

    def _start(self, args: list[str], name: str) -> RayNode:
        log = Path(self.temp) / f"{name}.log"
        env = dict(os.environ, **RAY_ENV)
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                [RAY, "start", "--block", "--disable-usage-stats", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )
        node = RayNode(proc, log)
        self.nodes.append(node)
        return node

    def head(self, num_cpus: int = 2, timeout: float = 90.0) -> str:
        """Starts the head node; returns its address once it accepts connections."""
        port = free_port()
        node = self._start(
            [
                "--head",
                f"--port={port}",
                f"--num-cpus={num_cpus}",
                "--include-dashboard=false",
                f"--temp-dir={self.temp}",
                "--node-ip-address=127.0.0.1",
            ],
            "head",
        )
        deadline = time.monotonic() + timeout
        while not _listening(port):
            if node.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Ray head did not start:\n{node.log.read_text()[-3000:]}")
            time.sleep(0.2)
        self.address = f"127.0.0.1:{port}"
        return self.address

    def worker(self, num_cpus: int = 1, resources: str | None = None) -> RayNode:
        """Starts a node that joins the head."""
        args = [
            f"--address={self.address}",
            f"--num-cpus={num_cpus}",
            "--node-ip-address=127.0.0.1",
        ]
        if resources:
            args.append(f"--resources={resources}")
        return self._start(args, f"node{len(self.nodes)}")

    def stop(self) -> list[int]:
        """Kills every node; returns the pids of processes that survived (should be none)."""
        import psutil

        procs = [p for n in self.nodes for p in n.tree()]
        for n in self.nodes:
            if n.proc.poll() is None:
                try:
                    os.killpg(n.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        _gone, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        _gone, alive = psutil.wait_procs(alive, timeout=10)
        for n in self.nodes:
            try:
                n.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        left = [p.pid for p in alive if p.is_running()]
        left += [p.pid for p in _by_temp_dir(self.temp)]
        return left


def _by_temp_dir(temp: str) -> list[Any]:
    """Processes whose command line names ``temp`` (Ray's own, of this cluster)."""
    import psutil

    out = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp in a for a in p.info["cmdline"] or ()):
                out.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


def dask_cluster(n_workers: int = 2, **kwargs: Any) -> tuple[Any, Any]:
    """A LocalCluster of ``n_workers`` worker processes (one thread each) and its client.

    Its scheduler re-runs no task lost with its worker (``allowed-failures:
    0``): the step's policy retries instead.
    """
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            **kwargs,
        )
    return cluster, Client(cluster)
