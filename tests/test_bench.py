"""Smoke tests of ``actorflow bench``: every scenario at a tiny size, results' shape and sanity."""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from actorflow.bench import (
    CLOUDFLARE_V2,
    DEFAULT,
    SCENARIOS,
    Measurement,
    Options,
    main,
    measure,
    run_scenarios,
)
from actorflow.bench.isolate import run_isolated
from actorflow.bench.peers import actorflow_workload
from actorflow.bench.peers import main as peers_main
from actorflow.bench.physical import bare_call_ns, thread_handoff_us
from actorflow.bench.progress import Bar, NullProgress
from actorflow.bench.report import TARGETS, Target, hardware, judge, rows
from actorflow.bench.scenarios import percentile

FAST = Options(hold=0.2, wake_rate=2_000, sleep_margin=1.5)


def _positive(figures: dict[str, float], *names: str) -> None:
    for name in names:
        assert figures[name] > 0 and math.isfinite(figures[name]), (name, figures[name])


def test_every_scenario_is_named_and_described() -> None:
    expected = {
        "physical",
        "create",
        "steps",
        "latency",
        "concurrency",
        "sleepers",
        "queue",
        "recovery",
        "objects",
        "keys",
        "scaling",
        "executors",
    }
    assert set(SCENARIOS) == expected
    assert "scaling" not in DEFAULT
    assert "executors" not in DEFAULT  # it starts Ray and Dask clusters
    assert all(s.about and s.name == k for k, s in SCENARIOS.items())
    assert {t.scenario for t in TARGETS} <= expected


def test_physical_baselines(tmp_path: Path) -> None:
    figures = SCENARIOS["physical"].run(tmp_path, 0, NullProgress(), Options()).figures
    _positive(
        figures,
        "fsync_commits_per_s",
        "fsync_commit_ms",
        "bare_call_ns",
        "thread_handoff_us",
        "threaded_commits_per_s",
    )
    assert figures["bare_call_ns"] < 10_000  # a call is nanoseconds, not microseconds
    for page in ("fsync_scattered_page_us", "fsync_contiguous_page_us"):
        assert 0 <= figures[page] < 1e6 and math.isfinite(figures[page]), (page, figures[page])
    assert 0 < thread_handoff_us(500) < 10_000
    assert bare_call_ns(10_000) >= 0


def test_create(tmp_path: Path) -> None:
    figures = SCENARIOS["create"].run(tmp_path, 256, NullProgress(), FAST).figures
    _positive(
        figures,
        "create_batch_per_s",
        "create_16_threads_per_s",
        "create_16_threads_batches_per_commit",
    )
    # 64 creations from 16 threads, each waiting for its own commit, in at least 4 commits;
    # the engine's own writes join them, so the bound is loose
    assert figures["create_16_threads_batches_per_commit"] <= 64
    if sys.platform == "linux":
        _positive(figures, "create_16_threads_pages_per_commit")


def test_steps(tmp_path: Path) -> None:
    figures = SCENARIOS["steps"].run(tmp_path, 10, NullProgress(), FAST).figures
    _positive(figures, "steps_per_s", "seconds")
    assert figures["steps_per_s"] == pytest.approx(200 / figures["seconds"])
    # Both styles by default, in the same run: `def run` beside `async def run`.
    assert figures["sync_steps_per_s"] == pytest.approx(200 / figures["sync_seconds"])
    assert figures["sync_vs_async"] == pytest.approx(
        figures["sync_steps_per_s"] / figures["steps_per_s"]
    )
    only_sync = SCENARIOS["steps"].run(
        tmp_path / "s", 10, NullProgress(), replace(FAST, style="sync")
    )
    assert set(only_sync.figures) == {"sync_steps_per_s", "sync_seconds"}


def test_latency_samples_and_percentiles(tmp_path: Path) -> None:
    out = SCENARIOS["latency"].run(tmp_path, 8, NullProgress(), FAST)
    assert {len(v) for v in out.samples.values()} == {8}
    for kind in ("create_to_first_step", "event_to_resume", "timer_lateness"):
        p50, p90, p99 = (out.figures[f"{kind}_p{q}_ms"] for q in (50, 90, 99))
        assert 0 <= p50 <= p90 <= p99
    assert 0 < out.figures["create_to_first_step_p50_ms"] < 1000
    assert 0 < out.figures["event_to_resume_p50_ms"] < 1000


def test_objects(tmp_path: Path) -> None:
    figures = SCENARIOS["objects"].run(tmp_path, 300, NullProgress(), FAST).figures
    _positive(figures, "do_calls_per_s", "do_single_call_ms", "do_rpc_hop_us")


def test_concurrency_holds_all_at_once(tmp_path: Path) -> None:
    figures = run_isolated("concurrency", 40, tmp_path, NullProgress(), FAST).figures
    assert figures["peak_running"] == 40
    assert figures["all_complete_s"] >= FAST.hold
    _positive(figures, "peak_rss_mib", "kib_per_instance", "instances_per_s")
    assert figures["peak_rss_mib"] >= figures["rss_start_mib"]


def test_concurrency_and_sleepers_in_sync_style(tmp_path: Path) -> None:
    both = replace(FAST, style="both")
    figures = run_isolated("concurrency", 40, tmp_path / "c", NullProgress(), both).figures
    assert figures["peak_running"] == figures["sync_peak_running"] == 40
    assert figures["sync_vs_async"] == pytest.approx(
        figures["sync_instances_per_s"] / figures["instances_per_s"]
    )
    out = run_isolated("sleepers", 40, tmp_path / "s", NullProgress(), replace(FAST, style="sync"))
    assert "wake_lateness_p99_ms" not in out.figures
    assert out.figures["sync_all_asleep_before_first_wake"] == 1
    assert len(out.samples["sync_wake_lateness_ms"]) == 40


def test_sleepers_wake_and_report_lateness(tmp_path: Path) -> None:
    out = run_isolated("sleepers", 40, tmp_path, NullProgress(), FAST)
    assert out.figures["all_asleep_before_first_wake"] == 1
    assert len(out.samples["wake_lateness_ms"]) == 40
    assert min(out.samples["wake_lateness_ms"]) >= 0
    _positive(out.figures, "rss_asleep_mib", "peak_rss_mib")


def test_keys_capped_and_uncapped(tmp_path: Path) -> None:
    figures = SCENARIOS["keys"].run(tmp_path, 300, NullProgress(), FAST).figures
    assert figures["n"] == 300 and figures["hot"] == 150
    _positive(figures, "capped_cold_wait_p90_ms", "uncapped_all_complete_s")
    # Capped at 2, the hot key had started few of its 150 when the cold keys were done.
    assert figures["capped_hot_started_when_cold_done"] < 150
    assert figures["uncapped_hot_started_when_cold_done"] <= 150


def test_queue_fills_then_drains(tmp_path: Path) -> None:
    figures = run_isolated("queue", 300, tmp_path, NullProgress(), FAST).figures
    assert 290 <= figures["queued"] <= 300  # at most one runs at a time while filling
    _positive(figures, "enqueues_per_s", "drained_per_s", "rss_queued_mib")
    # The queue's memory target reads the peak before the drain, which only grows it.
    assert 0 < figures["peak_rss_queued_mib"] <= figures["peak_rss_mib"]


def test_recovery_after_sigkill(tmp_path: Path) -> None:
    figures = run_isolated("recovery", 30, tmp_path, NullProgress(), FAST).figures
    assert figures["bodies_before_kill"] >= 30
    first = figures["first_resumed_step_s"]  # nan if every body had run before the kill
    assert math.isnan(first) or 0 < first <= figures["all_complete_s"]
    assert figures["bodies_run_again"] >= 0  # at least once: nothing skipped


def test_a_failing_child_reports_its_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match=r"scaling|KeyError"):
        run_isolated("scaling", 10, tmp_path, NullProgress(), FAST)


def test_scaling_reports_per_instance_cost(tmp_path: Path) -> None:
    figures = (
        SCENARIOS["scaling"]
        .run(tmp_path, 1_000, NullProgress(), Options(of="queue", drain=False))
        .figures
    )
    for n in (100, 1_000):
        _positive(figures, f"queue_{n}_us_per_instance", f"queue_{n}_peak_rss_mib")
    assert "queue_10000_us_per_instance" not in figures
    assert figures["queue_superlinear"] in (0, 1)
    with pytest.raises(ValueError, match="scaling runs one of"):
        SCENARIOS["scaling"].run(tmp_path, 100, NullProgress(), Options(of="steps"))


def test_measure_takes_medians(tmp_path: Path) -> None:
    m = measure(["steps"], repeat=3, size=5, options=FAST, root=tmp_path)
    runs = [r["steps_per_s"] for r in m.runs["steps"]]
    assert len(runs) == 3
    assert m.medians["steps"]["steps_per_s"] == sorted(runs)[1]
    assert m.sizes == {"steps": 5}


def test_run_scenarios_keeps_the_old_names(tmp_path: Path) -> None:
    said: list[str] = []
    res = run_scenarios(["disk"], 1, root=str(tmp_path), progress=said.append)
    assert res["disk"]["fsync_commits_per_s"] > 0
    assert said == ["disk run 1/1"]
    assert CLOUDFLARE_V2["create_batch_per_s"] == 300


def test_percentile_nearest_rank() -> None:
    xs = [float(i) for i in range(1, 101)]
    assert (percentile(xs, 50), percentile(xs, 99), percentile(xs, 100)) == (50, 99, 100)
    assert math.isnan(percentile([], 50))


def test_targets_are_judged_only_at_scale() -> None:
    t = Target("queue", "peak_rss_mib", "<=", 1024, 2_000_000)
    assert judge(t, 100, 1_000) == "not at scale"
    assert judge(t, 100, 2_000_000) == "met"
    assert judge(t, 2000, 2_000_000) == "MISSED"
    assert judge(Target("steps", "steps_per_s", ">=", 20_000), 19_999, 1) == "MISSED"


def test_table_rows_with_profile_and_hardware() -> None:
    phys = {
        "fsync_commits_per_s": 4000.0,
        "fsync_commit_ms": 0.25,
        "bare_call_ns": 25.0,
        "thread_handoff_us": 5.0,
    }
    assert "8.0x fsync" in hardware("steps_per_s", 32_000, phys)
    assert "thread handoffs" in hardware("create_16_threads_per_s", 8_000, phys)
    with_ceiling = {**phys, "threaded_commits_per_s": 16_000.0}
    assert "50% of 16 threads' bare durable calls" in hardware(
        "create_16_threads_per_s", 8_000, with_ceiling
    )
    pages = {**phys, "fsync_scattered_page_us": 80.0}
    assert hardware("create_16_threads_pages_per_commit", 30, pages).startswith(
        "2.65 ms of disk per commit (0.25 ms + 30 scattered pages x 80 us)"
    )
    assert hardware("steps_per_s", 32_000, {}) == ""
    header, body = rows(
        {"physical": phys, "create": {"create_batch_per_s": 60_000.0}},
        {"create": 100},
        "cloudflare-v2",
    )
    assert header[-2:] == ["Cloudflare V2", "ratio"]
    create = next(r for r in body if r[1] == "create_batch_per_s")
    assert create[4] == "met" and create[-1] == "200.0x"


def test_bar_draws_on_a_stream() -> None:
    out = io.StringIO()
    bar = Bar(out, prefix="steps 1/3 ")
    bar.phase("creating", 10)
    bar.update(5)
    bar.close()
    assert "steps 1/3 creating [" in out.getvalue() and "0/10" in out.getvalue()


def test_main_json_to_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "steps",
                "objects",
                "--size",
                "5",
                "--size",
                "objects=7",
                "--repeat",
                "1",
                "--json",
                "-",
                "--data-dir",
                str(tmp_path),
            ]
        )
        == 0
    )
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["medians"]) == {"physical", "steps", "objects"}
    assert (doc["sizes"]["steps"], doc["sizes"]["objects"]) == (5, 7)
    assert any(r["figure"] == "steps_per_s" for r in doc["table"])


def test_main_reports_a_failed_scenario(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # scaling of a scenario that is not isolated fails; the other figures are still printed
    assert (
        main(
            [
                "scaling",
                "steps",
                "--of",
                "steps",
                "--size",
                "5",
                "--repeat",
                "1",
                "--no-physical",
                "--json",
                "-",
            ]
        )
        == 1
    )
    doc = json.loads(capsys.readouterr().out)
    assert "scaling runs one of" in doc["failed"]["scaling"]
    assert "steps_per_s" in doc["medians"]["steps"]


def test_main_table_and_unknown_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["nope"]) == 2
    assert main(["steps", "--size", "nope=3"]) == 2
    assert (
        main(
            ["steps", "--size", "5", "--repeat", "1", "--no-physical", "--profile", "cloudflare-v2"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "steps_per_s" in out and "Cloudflare V2" in out and "physical" not in out


def test_plots(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from actorflow.bench.plots import plot_all

    m = Measurement(
        sizes={"concurrency": 100},
        medians={
            "concurrency": {"n": 100.0, "instances_per_s": 40.0, "peak_rss_mib": 60.0},
            "scaling": {
                "queue_100_us_per_instance": 30.0,
                "queue_100_peak_rss_mib": 40.0,
                "queue_1000_us_per_instance": 25.0,
                "queue_1000_peak_rss_mib": 45.0,
            },
        },
        samples={"latency": {"event_to_resume_ms": [0.5, 1.0, 2.0, 0.0]}},
    )
    made = plot_all(m, tmp_path / "charts")
    assert [p.name for p in made] == [
        "bench-throughput-concurrency.png",
        "bench-memory.png",
        "bench-latency.png",
    ]
    assert all(p.read_bytes()[:4] == b"\x89PNG" for p in made)


def test_peers_actorflow_side_and_missing_peer(tmp_path: Path) -> None:
    steps = actorflow_workload("steps", tmp_path / "s", 0, 5, 4)
    assert steps["steps_per_s"] == pytest.approx(20 / steps["seconds"])
    assert actorflow_workload("enqueues", tmp_path / "e", 20, 0, 0)["enqueues_per_s"] > 0
    assert peers_main(["--peer-python", str(tmp_path / "none")]) == 2


@pytest.mark.postgres
def test_store_runs_steps_on_a_postgres_url(
    pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["steps", "--size", "4", "--repeat", "2", "--json", "-", "--data-dir", str(tmp_path)]
    assert main([*argv, "--store", "lmdb", "--store", pg_url]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc["medians"]) == {"physical", "physical@postgres", "steps", "steps@postgres"}
    assert len(doc["runs"]["steps@postgres"]) == 2
    _positive(doc["medians"]["steps@postgres"], "steps_per_s")
    assert doc["medians"]["physical@postgres"]["pg_synchronous_commit_on"] == 1.0
    assert [s["backend"] for s in doc["stores"]] == ["lmdb", "postgres"]
    # each run had its own database, dropped afterwards: none is left on the server
    import psycopg

    with psycopg.connect(pg_url) as conn:
        left = conn.execute(
            "SELECT count(*) FROM pg_database WHERE datname LIKE 'af\\_bench\\_%'"
        ).fetchone()
    assert left == (0,)


@pytest.mark.postgres
def test_store_runs_steps_on_a_postgres_url_alone(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--size", "3", "--repeat", "1", "--no-physical", "--store", pg_url]) == 0
    out = capsys.readouterr().out
    # without names, what runs on PostgreSQL; the header names the backend
    assert "postgres on the server" in out
    assert "steps@postgres" in out and "latency@postgres" in out and "queue" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--store", "mysql://h/db"], "give lmdb, a directory, postgres"),
        (["--store", ""], "give lmdb, a directory, postgres"),
        (["--store", "lmdb", "--store", "lmdb"], "at most one LMDB store"),
        (["queue", "--store", "postgresql://u@127.0.0.1:1/db"], "queue run(s) on LMDB only"),
        # nothing listens on port 1: said before any scenario runs
        (["steps", "--store", "postgresql://u@127.0.0.1:1/db"], "cannot create a database"),
    ],
)
def test_bad_store_values_are_refused_clearly(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("actorflow bench: --store") and message in err, err


def test_a_store_that_is_a_file_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    f = tmp_path / "file"
    f.write_text("")
    assert main(["steps", "--store", str(f)]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_a_store_directory_holds_the_data(tmp_path: Path) -> None:
    assert (
        main(["steps", "--size", "3", "--repeat", "1", "--no-physical", "--store", str(tmp_path)])
        == 0
    )
    assert (tmp_path / "steps").is_dir()


def test_peers_refuses_a_bad_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script = tmp_path / "peer.py"
    script.write_text("")
    argv = ["--peer-python", sys.executable, "--peer-script", str(script), "--store", "lmdb"]
    assert peers_main(argv) == 2
    assert "give sqlite, postgres or a postgresql:// URL" in capsys.readouterr().err


def test_executors_in_process_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from actorflow.bench import executors

    monkeypatch.setattr(executors, "available", lambda: ["inprocess"])
    monkeypatch.setattr(executors, "BODY_S", 0.01)
    figures = SCENARIOS["executors"].run(tmp_path, 2, NullProgress(), FAST).figures
    assert figures["inprocess_map_s"] > 0 and figures["inprocess_step_ms"] > 0
    assert "ray_speedup" not in figures
