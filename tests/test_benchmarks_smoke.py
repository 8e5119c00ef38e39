"""Smoke test of the benchmark suite: every benchmark runs on a tiny size and reports.

No timing is asserted (that is the benchmark's own PASS/FAIL line); this only catches a benchmark
broken by an API change. ``min_sample=0`` skips the sample-size calibration, so each case runs
once to warm up and once per round at the smallest size.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_background  # noqa: E402
import bench_big_output  # noqa: E402
import bench_capture  # noqa: E402
import bench_lines  # noqa: E402
import bench_long_lines  # noqa: E402
import bench_many  # noqa: E402
import bench_output_capture  # noqa: E402
import bench_registry  # noqa: E402
import bench_spawn  # noqa: E402
import bench_stop  # noqa: E402


def _check(module: Any, result: dict[str, Any]) -> None:
    assert module.report(result)
    for target in module.targets(result):
        assert target.line()


def test_spawn_smoke() -> None:
    result = bench_spawn.run(min_sample=0, rounds=1, groups=(("true", 1), ("true", 2)), n=3)
    assert set(result["groups"]["true c=1"]["per_spawn_median_s"]) == set(bench_spawn.CASES)
    _check(bench_spawn, result)
    # The ASYNC target also shows the run path without containment, so the two costs can be
    # told apart in every run.
    (async_target,) = [t for t in bench_spawn.targets(result) if "ASYNC run('/bin/true')" in t.name]
    assert "(containment off: true c=1:" in async_target.detail


def test_lines_smoke() -> None:
    result = bench_lines.run(min_sample=0, rounds=1, lines=2_000)
    assert set(result["lines_per_second"]) == set(bench_lines.CONSUMERS)
    _check(bench_lines, result)


def test_long_lines_smoke() -> None:
    result = bench_long_lines.run(sizes=(1, 2), rounds=1)
    assert set(result["seconds"]) == set(bench_long_lines.CASES)
    _check(bench_long_lines, result)


def test_big_output_smoke() -> None:
    result = bench_big_output.run(size_mb=1, rounds=1, cases=["ASYNC run()", "THREADED run()"])
    assert result["cases"]["ASYNC run()"]["kept_bytes"] == 2 * 1024 * 1024
    _check(bench_big_output, result)


@pytest.mark.parametrize("case", ["ASYNC run()", "THREADED run()"])
def test_many_smoke(case: str) -> None:
    result = bench_many.run(children=5, rounds=1, seconds=0.1, cases=[case])
    assert result["cases"][case]["peak_threads_max"] >= 1
    _check(bench_many, result)


def test_stop_smoke() -> None:
    result = bench_stop.run(children=[5], unrelated=[10], repeats=1, cap=20.0)
    for mode in bench_stop.MODES:
        sample = result["close"]["5"][mode][0]
        assert "error" not in sample, sample
        assert sample["running_after"] == sample["left_after_exit"] == 0
        assert result["timeout"]["10"][mode]["marked_after"] == 0
    _check(bench_stop, result)


def test_capture_smoke() -> None:
    result = bench_capture.run(min_sample=0, rounds=1, subscribers=(0, 1, 3), lines=600)
    three = result["cases"]["OutputCapture, 3 subscribers"]
    assert three["delivered_fraction_min"] == 1.0
    # The producer's own steps are timed apart from the subscribers' turns, and compared
    # paired with the one-subscriber case.
    assert three["producer_own_s_per_line"][1] > 0
    assert three["producer_own_vs_1"][1] > 0
    titles = [target.name for target in bench_capture.targets(result)]
    assert any("producer's own cost" in title for title in titles)
    _check(bench_capture, result)


def test_registry_smoke() -> None:
    result = bench_registry.run(min_sample=0, rounds=2, writers=(1, 8), runs=16)
    assert result["cases"]["SQLiteRunRegistry, 8 writers"]["runs_per_second"] > 0
    _check(bench_registry, result)
    # The ratios to the floor and to direct sqlite3 are paired per round, as the suite claims
    # (they were a ratio of two medians).
    import statistics

    samples = {name: c["samples"] for name, c in result["timings"].items()}
    ours = samples["SQLiteRunRegistry, 8 writers"]
    floor = samples["sqlite3 executor (floor), 8 writers"]
    paired = result["paired_ratios"]["SQLiteRunRegistry, 8 writers"]
    assert paired["floor"] == statistics.median(f / o for f, o in zip(floor, ours, strict=True))
    assert "x the floor" in bench_registry.report(result)


def test_background_smoke() -> None:
    result = bench_background.run(min_sample=0, rounds=1, ticks=5, tasks=50)
    assert result["manager_over_bare"] > 0
    _check(bench_background, result)


def test_output_capture_smoke() -> None:
    result = bench_output_capture.run(lines=2_000, rounds=1)
    assert set(result["us_per_line"]) >= {"await noop()", "append_line", "append_lines x1000"}
    _check(bench_output_capture, result)


def test_dask_smoke(tmp_path: Path) -> None:
    pytest.importorskip(
        "distributed",
        reason="the [dask] extra is not installed (pip install 'prismq_subprocess[dask]')",
    )
    import json
    import subprocess

    from helpers import reaped

    # In a fresh interpreter under a reaper: its LocalCluster's worker processes start
    # multiprocessing's resource tracker, which must not end up a child of the test run.
    out = tmp_path / "dask.json"
    done = subprocess.run(
        reaped(
            sys.executable,
            str(BENCH_DIR / "bench_dask.py"),
            *("--modules", "4", "--rounds", "1", "--latency-samples", "2"),
            *("--concurrency", "2", "--json", str(out)),
        ),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "cluster throughput" in done.stdout and "added first-line latency" in done.stdout
    result = json.loads(out.read_text())
    assert len(result["runs_per_second"]["dask"]) == 1
    assert len(result["first_line_seconds"]["dask"]) == 2


def test_calibrate_leaves_headroom_above_the_minimum_and_never_trusts_the_cold_run() -> None:
    """A size is not accepted from a cold first run, nor from a run just over the minimum: a
    full run once had timed samples of 0.34 s from sizes calibrated to 0.5 s."""
    from _common import calibrate

    calls: list[int] = []

    def sample(size: int) -> float:
        calls.append(size)
        cold = 0.3 if len(calls) == 1 else 0.0  # imports, caches: the first run is slower
        return size * 0.001 + cold

    size = calibrate(sample, 0.5, 400)
    assert size * 0.001 >= 0.5 * 1.25, (size, calls)
    calls.clear()
    # A warm sample landing just over the minimum is grown too.
    size = calibrate(lambda n: n * 0.001, 0.5, 510)
    assert size * 0.001 >= 0.5 * 1.25, size
    # min_sample=0 (the smoke tests): one warm-up run, the start size.
    calls.clear()
    assert calibrate(sample, 0, 7) == 7 and len(calls) == 1


def test_periodic_lateness_is_measured_alike_for_both_schedules() -> None:
    """The loop stalls for 3.5 intervals every 0.1 s: ``PeriodicTask`` runs the latest due tick
    and reports its lateness against it, so the bare schedule must follow the same rule (it
    counted every overdue tick: p99 33 ms against 8 ms for the same stalls)."""
    import asyncio
    import time

    async def stalled(schedule: Any) -> tuple[list[float], int]:
        async def staller() -> None:
            while True:
                await asyncio.sleep(0.1)
                time.sleep(0.035)  # noqa: ASYNC251 - the stall is the point

        task = asyncio.create_task(staller())
        try:
            result: tuple[list[float], int] = await schedule(40)
            return result
        finally:
            task.cancel()

    for schedule in (bench_background._bare_schedule, bench_background._periodic_schedule):
        lateness, skipped = asyncio.run(stalled(schedule))
        assert len(lateness) == 40
        assert skipped >= 2, (schedule, skipped)
    lateness, _ = asyncio.run(stalled(bench_background._bare_schedule))
    # Measured against the tick that runs: never a whole interval late.
    assert max(lateness) < bench_background.INTERVAL


def test_a_full_run_gives_every_suite_at_least_7_rounds() -> None:
    """What run_all.py and docs/PERFORMANCE.md promise: >= 7 interleaved rounds per comparison
    in a full run (the stop suite ran 1, its module's default)."""
    import inspect

    import run_all

    for suite, (module, _) in run_all.MODULES.items():
        config = run_all.FULL[suite]
        rounds = config.get("rounds", inspect.signature(module.run).parameters["rounds"].default)
        assert rounds >= 7, (suite, rounds)
    assert run_all.FULL["stop"]["repeats"] >= 7


def test_line_peers_include_raw_asyncio_and_the_ceiling_reads_like_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch API's like-for-like target counts raw asyncio's chunk path too (it was compared
    only with asyncio's per-line readers), and the sync ceiling reads 64 KiB at a time like the
    async readers (Popen's default 8 KiB buffer made it about 10% slower)."""
    assert "asyncio read(64k)+split" in bench_lines.PEERS
    seconds, count = bench_lines.CONSUMERS["asyncio read(64k)+split"](1_001)
    assert count == 1_001 and seconds > 0
    import subprocess

    seen: list[Any] = []
    real = subprocess.Popen

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("bufsize", -1))
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", spy)
    assert bench_lines.popen_sync(500)[1] == 500
    assert seen == [bench_lines.PIPE_CHUNK] and bench_lines.PIPE_CHUNK >= 64 * 1024


def test_output_capture_cases_are_warmed_up_before_timing(monkeypatch: pytest.MonkeyPatch) -> None:
    """bench_output_capture.py has no calibration runs, so its first round was the cold one."""
    calls: list[bool] = []
    real = bench_output_capture.interleave

    def spy(cases: Any, rounds: int, **kwargs: Any) -> Any:
        calls.append(bool(kwargs.get("warmup")))
        return real(cases, rounds, **kwargs)

    monkeypatch.setattr(bench_output_capture, "interleave", spy)
    bench_output_capture.run(lines=1_000, rounds=1)
    assert calls == [True]


def test_stop_scale_stall_targets_judge_the_worst_round() -> None:
    """The stall targets (no stall > 20 ms; <= 5 ms for one stop) judged the median round's
    worst stall: one round of three at 30 ms passed."""
    import bench_stop_scale

    def case(stalls: list[float]) -> dict[str, Any]:
        return {
            "wall_seconds_median": 0.5,
            "max_stall_median": sorted(stalls)[1],
            "max_stall_max": max(stalls),
            "idle_stall_max": 0.001,
            "left_max": 0,
        }

    result = {
        "children": 1000,
        "unrelated": 1000,
        "rounds": 3,
        "cases": {
            "close async": case([0.010, 0.012, 0.030]),
            "single async": case([0.002, 0.003, 0.009]),
        },
    }
    verdicts = [t.passed for t in bench_stop_scale.targets(result)]
    assert verdicts == [False, False]
    assert bench_stop_scale.report(result)
