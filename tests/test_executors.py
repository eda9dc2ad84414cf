"""The executor contract, against every executor: in-process, Ray and Dask.

One suite, parametrized: the in-process runs are part of the default test run;
the Ray and Dask ones (marked ``executors`` and ``slow``) run with ``make
executors``, on real clusters: a Ray head started with ``ray start`` and a
Dask LocalCluster of two worker processes. Bodies count their runs in files
(they run in other processes), and failures are real: a worker SIGKILLed in
the middle of a body, the runtime's own process SIGKILLed while remote bodies
run.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _clusters import RAY_ENV, RayNodes, dask_cluster
from apps import executor_app as app
from apps.executor_app import pids, runs

import actorflow as af
from actorflow.executors.dask_executor import dask_resources
from actorflow.executors.ray_executor import ray_options

REMOTE = [pytest.mark.executors, pytest.mark.slow, pytest.mark.timeout(300)]
ALL = [
    pytest.param("inprocess", id="inprocess"),
    pytest.param("ray", id="ray", marks=REMOTE),
    pytest.param("dask", id="dask", marks=REMOTE),
]
ONLY_REMOTE = [p for p in ALL if p.id != "inprocess"]
ROOT = Path(__file__).resolve().parent


# -- clusters (module-scoped: one Ray and one Dask for the whole module) ---------------------


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayNodes]:
    """A Ray head of 2 CPUs in its own processes (``ray start --head``)."""
    pytest.importorskip("ray")
    nodes = RayNodes()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in RAY_ENV.items():
            mp.setenv(k, v)  # this process is the cluster's driver
        try:
            nodes.head(num_cpus=2)
            yield nodes
        finally:
            left = nodes.stop()
            assert not left, f"Ray processes left behind: {left}"


@pytest.fixture(scope="module")
def ray_executor(ray_head: RayNodes) -> Iterator[af.executors.RayExecutor]:
    ex = af.executors.RayExecutor(address=ray_head.address)
    with ex:
        yield ex


@pytest.fixture(scope="module")
def dask_executor() -> Iterator[af.executors.DaskExecutor]:
    pytest.importorskip("distributed")
    cluster, client = dask_cluster(2, resources={"CPU": 2})
    ex = af.executors.DaskExecutor(client)
    try:
        with ex:
            yield ex
    finally:
        client.close()
        cluster.close()


@pytest.fixture
def executor(request: pytest.FixtureRequest) -> af.executors.StepExecutor:
    kind = request.param
    if kind == "inprocess":
        return af.executors.InProcessExecutor()
    return request.getfixturevalue(f"{kind}_executor")


@pytest.fixture
def work(tmp_path: Path) -> str:
    d = tmp_path / "work"
    d.mkdir()
    return str(d)


@pytest.fixture
def runtime(tmp_path: Path, executor: af.executors.StepExecutor, work: str) -> Iterator[af.Runtime]:
    rt = af.Runtime(tmp_path / "data", executor=executor)
    for cls in app.WORKFLOWS:
        rt.register(cls)
    try:
        yield rt
    finally:
        Path(work, "release").write_text("go")  # no body stays blocked
        rt.close()


def _ran_on(inst: af.Instance, step: str) -> list[dict[str, str]]:
    return [a.ran_on for s in inst.steps() if s.name == step for a in s.attempts]


# -- the contract, on every executor ----------------------------------------------------------


@pytest.mark.parametrize("executor", ALL, indirect=True)
def test_a_sync_run_checkpoints_each_step_once(
    runtime: af.Runtime, executor: af.executors.StepExecutor, work: str
) -> None:
    inst = runtime.workflow("Pipeline").create(id="p", params={"dir": work, "n": 4})
    st = inst.wait(timeout=60)
    assert st.status == "complete", st
    pid, xs = st.output
    assert [v for v, _ in xs] == [0, 1, 4, 9]
    remote = executor.remote
    assert (pid != os.getpid()) is remote
    assert all((p != os.getpid()) is remote for _, p in xs)
    assert runs(work, "first") == 1 and all(runs(work, f"sq{i}") == 1 for i in range(4))
    for name in ("first", "sq[0]", "sq[3]"):
        (where,) = _ran_on(inst, name)
        assert where["executor"] == executor.name
        if remote:
            assert where["worker"] and where["node"] and where["pid"]
    # Replay after a reopen returns the checkpoints: nothing runs again.
    assert inst.status().output == st.output
    assert runs(work, "first") == 1


@pytest.mark.parametrize("executor", ALL, indirect=True)
def test_an_async_run_and_an_async_body(
    runtime: af.Runtime, executor: af.executors.StepExecutor, work: str
) -> None:
    inst = runtime.workflow("AsyncPipeline").create(id="a", params={"dir": work, "n": 3})
    st = inst.wait(timeout=60)
    assert st.status == "complete", st
    _pid, xs, later = st.output
    assert [v for v, _ in xs] == [0, 1, 4]
    # async def bodies run on the engine loop in-process, under asyncio.run in a worker.
    assert (later != os.getpid()) is executor.remote
    assert runs(work, "later") == 1


@pytest.mark.parametrize("executor", ALL, indirect=True)
def test_the_runtime_retries_and_keeps_the_bodys_own_error(
    runtime: af.Runtime, executor: af.executors.StepExecutor, work: str
) -> None:
    inst = runtime.workflow("Flaky").create(id="f", params={"dir": work})
    st = inst.wait(timeout=60)
    assert st.status == "complete" and st.output == 2, st
    assert runs(work, "flaky") == 2
    (step,) = inst.steps()
    assert [a.error["name"] if a.error else None for a in step.attempts] == ["ValueError", None]
    failure = [e for e in inst.history() if e.type == "ATTEMPT_FAILURE"]
    assert failure and failure[0].data["error"]["message"] == "boom on the first attempt"
    if executor.remote:
        assert failure[0].data["ranOn"]["executor"] == executor.name


@pytest.mark.parametrize("executor", ALL, indirect=True)
def test_a_non_retryable_error_fails_the_step_at_once(runtime: af.Runtime, work: str) -> None:
    inst = runtime.workflow("Refusing").create(id="r", params={"dir": work})
    st = inst.wait(timeout=60)
    assert st.status == "errored" and st.error["name"] == "NonRetryableError", st
    assert runs(work, "refuse") == 1


@pytest.mark.parametrize("executor", ALL, indirect=True)
def test_a_timed_out_attempt_fails_and_a_remote_one_is_cancelled(
    runtime: af.Runtime, executor: af.executors.StepExecutor, work: str
) -> None:
    inst = runtime.workflow("Slow").create(id="s", params={"dir": work})
    st = inst.wait(timeout=60)
    assert st.status == "errored" and st.error["name"] == "StepTimeoutError", st
    assert runs(work, "slow") == 1
    if executor.name == "ray":
        # ray.cancel(force=True): the worker running the body is killed.
        pid = int(Path(work, "slow.pid").read_text())
        _wait_dead(pid, 30)


@pytest.mark.parametrize("executor", ONLY_REMOTE, indirect=True)
def test_a_body_that_cannot_be_pickled_fails_its_step_naming_it(runtime: af.Runtime) -> None:
    inst = runtime.workflow("Unpicklable").create(id="u")
    st = inst.wait(timeout=60)
    assert st.status == "errored", st
    assert st.error["name"] == "SerializationError"
    msg = st.error["message"]
    assert "Unpicklable" in msg and "'u'" in msg and "holds_lock" in msg, msg
    (step,) = inst.steps()
    assert len(step.attempts) == 1  # it would fail alike every time: no retries


@pytest.mark.parametrize("executor", ALL, indirect=True)
def test_resources_reach_the_executor(
    runtime: af.Runtime, executor: af.executors.StepExecutor
) -> None:
    inst = runtime.workflow("Resourceful").create(id="r", params={"resources": {"num_cpus": 2}})
    st = inst.wait(timeout=60)
    assert st.status == "complete", st
    if executor.name == "ray":
        assert st.output == {"CPU": 2.0}


@pytest.mark.parametrize("executor", [p for p in ONLY_REMOTE if p.id == "dask"], indirect=True)
def test_a_resource_no_dask_worker_offers_fails_the_attempt(runtime: af.Runtime) -> None:
    inst = runtime.workflow("Resourceful").create(id="g", params={"resources": {"num_gpus": 1}})
    st = inst.wait(timeout=60)
    assert st.status == "errored" and st.error["name"] == "ExecutorError", st
    assert "GPU" in st.error["message"]


@pytest.mark.parametrize("executor", ALL, indirect=True)
def test_bad_resources_are_refused_naming_the_step(runtime: af.Runtime) -> None:
    inst = runtime.workflow("Resourceful").create(id="b", params={"resources": {"num_cpus": -1}})
    st = inst.wait(timeout=60)
    assert st.status == "errored" and st.error["name"] == "ValueError", st
    assert "'r'" in st.error["message"] and "num_cpus" in st.error["message"]


@pytest.mark.parametrize("executor", ALL, indirect=True)
def test_submit_wait_and_cancel_directly(executor: af.executors.StepExecutor) -> None:
    def double(x: int) -> int:
        return 2 * x

    def fails() -> None:
        raise KeyError("nope")

    async def go() -> None:
        call = executor.submit(double, (21,), None)
        assert await call.wait() == 42
        assert call.ran_on["executor"] == executor.name
        with pytest.raises(KeyError):
            await executor.submit(fails, (), None).wait()
        slow = executor.submit(time.sleep, (3,), None)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(slow.wait(), 0.5)
        slow.cancel()

    with executor:
        asyncio.run(go())


def test_resources_map_onto_ray_and_dask_names() -> None:
    got = ray_options({"num_cpus": 2, "num_gpus": 1, "memory": 1e9, "tpu": 4})
    assert got == {"num_cpus": 2, "num_gpus": 1, "memory": 1e9, "resources": {"tpu": 4}}
    assert ray_options(None) == {}
    assert dask_resources({"num_cpus": 2, "num_gpus": 1, "tpu": 4}) == {
        "CPU": 2,
        "GPU": 1,
        "tpu": 4,
    }


def test_an_executor_that_is_not_one_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="StepExecutor"):
        af.Runtime(tmp_path / "d", executor=object())  # type: ignore[arg-type]


def test_the_default_executor_records_attempts_as_in_process(tmp_path: Path, work: str) -> None:
    with af.Runtime(tmp_path / "d") as rt:
        inst = rt.register(app.Flaky).create(id="f", params={"dir": work})
        assert inst.wait(timeout=30).status == "complete"
        assert [a.ran_on for a in inst.steps()[0].attempts] == [{"executor": "inprocess"}] * 2
        assert all("ranOn" not in e.data for e in inst.history())


# -- an unreachable cluster -----------------------------------------------------------------------


@pytest.mark.executors
@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: af.executors.RayExecutor(address="127.0.0.1:1"), id="ray"),
        pytest.param(lambda: af.executors.DaskExecutor("tcp://127.0.0.1:1"), id="dask"),
    ],
)
def test_an_unreachable_cluster_is_a_clear_error_at_start(tmp_path: Path, make: Any) -> None:
    t = time.monotonic()
    with pytest.raises(af.executors.ExecutorError, match=r"cannot reach .*127\.0\.0\.1:1"):
        af.Runtime(tmp_path / "d", executor=make())
    assert time.monotonic() - t < 30
    # Nothing was claimed: the directory opens at once.
    af.Runtime(tmp_path / "d").close()


@pytest.mark.executors
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_cluster_lost_mid_run_fails_attempts_that_the_policy_retries(
    tmp_path: Path, work: str
) -> None:
    pytest.importorskip("distributed")
    cluster, client = dask_cluster(1)
    ex = af.executors.DaskExecutor(client)
    try:
        with af.Runtime(tmp_path / "d", executor=ex) as rt:
            wf = rt.register(app.Pipeline)
            assert wf.create(id="a", params={"dir": work, "n": 1}).wait(60).status == "complete"
            client.close()  # the cluster is gone for this runtime
            st = wf.create(id="b", params={"dir": work, "n": 1}).wait(60)
    finally:
        client.close()
        cluster.close()
    assert st.status == "errored" and st.error["name"] == "ExecutorError", st
    with af.Runtime(tmp_path / "d") as rt:
        b = rt.register(app.Pipeline).get("b")
        (first,) = [s for s in b.steps() if s.name == "first"]
    # Every attempt failed with the executor's error, as many as the policy allows.
    assert len(first.attempts) == 1 + app.FAST["limit"]
    assert {a.error["name"] for a in first.attempts if a.error} == {"ExecutorError"}


@pytest.mark.executors
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_ray_cluster_lost_mid_run_ends_the_runtime_which_resumes_on_restart(
    tmp_path: Path, work: str
) -> None:
    """Ray ends a driver whose cluster (its GCS) is gone: the checkpoints carry the run on.

    Unlike a Dask client, a Ray driver cannot outlive its cluster: after
    ``gcs_rpc_server_reconnect_timeout_s`` (60 s by default, 5 s here) Ray
    terminates the process. Nothing committed is lost: a runtime on a new
    cluster resumes the instance and re-submits only what had not committed.
    """
    pytest.importorskip("ray")
    data = tmp_path / "data"
    first, second = RayNodes(), RayNodes()
    log: Any = None
    try:
        first.head(num_cpus=2)
        child, log = _child(
            tmp_path,
            data,
            "ray",
            first.address,
            work,
            RAY_gcs_rpc_server_reconnect_timeout_s="5",
            **RAY_ENV,
        )
        try:
            _wait_mid_map(child, work, tmp_path / "child.log")
            first.nodes[0].kill()  # the whole cluster: GCS, raylet, the workers running 2 and 3
            child.wait(60)  # Ray itself ends the runtime's process
        finally:
            if child.poll() is None:
                child.kill()
                child.wait(10)
        Path(work, "release").write_text("go")
        second.head(num_cpus=2)
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "apps.executor_app",
                str(data),
                "ray",
                second.address,
                work,
                "resume",
            ],
            cwd=ROOT,
            env=dict(
                os.environ,
                PYTHONPATH=os.pathsep.join((str(ROOT.parent), str(ROOT))),
                **RAY_ENV,
            ),
            capture_output=True,
            timeout=180,
            check=False,
        )
        assert out.returncode == 0, out.stderr.decode()[-3000:]
    finally:
        if log is not None:
            log.close()
        left = first.stop() + second.stop()
        assert not left, f"Ray processes left behind: {left}"
    st = json.loads(out.stdout.decode().strip().splitlines()[-1])
    assert st["status"] == "complete" and st["output"] == [0, 1, 2, 3], st
    assert runs(work, "first") == 1
    assert runs(work, "item0") == 1 and runs(work, "item1") == 1
    assert runs(work, "item2") == 2 and runs(work, "item3") == 2
    assert all(w["executor"] == "ray" for w in st["steps"]["items[2]"])


# -- real failures: a worker killed mid-body, the runtime killed mid-run ------------------------------


def _wait_file(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            pytest.fail(f"{path} never appeared")
        time.sleep(0.05)


def _wait_dead(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"process {pid} is still alive")
        time.sleep(0.05)


@pytest.mark.parametrize("executor", ONLY_REMOTE, indirect=True)
def test_a_worker_killed_mid_body_fails_that_attempt_only(
    runtime: af.Runtime, executor: af.executors.StepExecutor, work: str
) -> None:
    inst = runtime.workflow("Victim").create(id="v", params={"dir": work})
    pid_file = Path(work, "victim.pid")
    _wait_file(pid_file, 60)
    pid = int(pid_file.read_text())
    assert pid != os.getpid()
    os.kill(pid, signal.SIGKILL)
    st = inst.wait(timeout=120)
    assert st.status == "complete" and st.output == ("ok", 2), st
    assert runs(work, "before") == 1  # the completed step never reran
    assert runs(work, "victim") == 2
    (victim,) = [s for s in inst.steps() if s.name == "victim"]
    first, second = victim.attempts
    assert first.error is not None and first.error["name"] == "ExecutorError", first
    assert second.error is None and second.ran_on["pid"] != str(pid)


def _child(
    tmp_path: Path, data: Path, kind: str, address: str, work: str, *more: str, **env_: str
) -> tuple[subprocess.Popen[bytes], Any]:
    """``python -m apps.executor_app`` (a runtime) in a process of its own, and its log file."""
    env = dict(os.environ, **env_)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT.parent), str(ROOT), env.get("PYTHONPATH")) if p
    )
    log = open(tmp_path / "child.log", "ab")  # noqa: SIM115 (the caller closes it)
    child = subprocess.Popen(
        [sys.executable, "-m", "apps.executor_app", str(data), kind, address, work, *more],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    return child, log


def _wait_mid_map(child: subprocess.Popen[bytes], work: str, log: Path) -> None:
    """Until ``first`` and items 0 and 1 are durable, and items 2 and 3 run on workers."""
    deadline = time.monotonic() + 120
    while not Path(work, "committed").exists():
        if child.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the child never committed: {log.read_text()}")
        time.sleep(0.05)
    # Items 2 and 3 are running on the cluster's workers, waiting for "release".
    _wait_file(Path(work, "item2"), 30)
    _wait_file(Path(work, "item3"), 30)
    assert pids(work, "item2")[0] != child.pid and pids(work, "item3")[0] != child.pid


def _address(executor: af.executors.StepExecutor) -> str:
    """The address a process of its own joins this executor's cluster at."""
    if isinstance(executor, af.executors.RayExecutor):
        assert executor.address
        return executor.address
    assert isinstance(executor, af.executors.DaskExecutor)
    return str(executor.client.scheduler.address)


@pytest.mark.parametrize("executor", ONLY_REMOTE, indirect=True)
def test_the_runtime_killed_mid_run_resubmits_only_uncommitted_steps(
    tmp_path: Path, executor: af.executors.StepExecutor, work: str
) -> None:
    data = tmp_path / "data"
    # A runtime in a process of its own, on the same cluster as this one.
    child, log = _child(tmp_path, data, executor.name, _address(executor), work)
    try:
        _wait_mid_map(child, work, tmp_path / "child.log")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        log.close()
    Path(work, "release").write_text("go")
    with af.Runtime(data, executor=executor) as rt:
        inst = rt.register(app.Interrupted).get("crash")
        st = inst.wait(timeout=120)
        steps = {s.name: s for s in inst.steps()}
    assert st.status == "complete" and st.output == [0, 1, 2, 3], st
    # What had committed before the kill never ran again; what had not ran once more.
    assert runs(work, "first") == 1
    assert runs(work, "item0") == 1 and runs(work, "item1") == 1
    assert runs(work, "item2") == 2 and runs(work, "item3") == 2
    for i in (2, 3):
        where = steps[f"items[{i}]"].attempts[-1].ran_on
        assert where["executor"] == executor.name and where["pid"] != str(os.getpid())


@pytest.mark.parametrize("executor", ALL, indirect=True)
def test_the_trace_says_where_each_attempt_ran(
    tmp_path: Path, executor: af.executors.StepExecutor, work: str
) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        with af.Runtime(tmp_path / "d", executor=executor, tracer_provider=provider) as rt:
            assert rt.register(app.Flaky).create(params={"dir": work}).wait(60).output == 2
            assert rt.register(app.Pipeline).create(params={"dir": work, "n": 1}).wait(60)
        spans = exporter.get_finished_spans()
    finally:
        provider.shutdown()
    attempts = [s for s in spans if s.name.startswith("attempt ")]
    assert len(attempts) >= 4  # flaky: 2, first: 1, sq[0]: 1
    for s in attempts:
        attrs = dict(s.attributes or {})
        if executor.remote:
            assert attrs["actorflow.executor"] == executor.name, attrs
            assert attrs["actorflow.executor.pid"] != str(os.getpid())
        else:
            assert "actorflow.executor" not in attrs  # in-process: nothing more is recorded
