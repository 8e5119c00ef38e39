"""Smoke test of the benchmark suite: every benchmark runs on a tiny size and reports.

No timing is asserted (that is the benchmark's own PASS/FAIL line); this only catches a benchmark
broken by an API change.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

BENCH_DIR = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH_DIR))

import bench_big_output  # noqa: E402
import bench_lines  # noqa: E402
import bench_long_lines  # noqa: E402
import bench_many  # noqa: E402
import bench_spawn  # noqa: E402


def _check(module: Any, result: dict[str, Any]) -> None:
    assert module.report(result)
    for target in module.targets(result):
        assert target.line()


def test_spawn_smoke() -> None:
    result = bench_spawn.run(n=5, rounds=1, concurrencies=(1, 2), programs=("true",))
    assert set(result["groups"]["true c=1"]["per_spawn_median_s"]) == set(bench_spawn.CASES)
    _check(bench_spawn, result)


def test_lines_smoke() -> None:
    result = bench_lines.run(lines=2_000, rounds=1)
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
