"""Schedule accuracy of PeriodicTask on the real event-loop clock.

Runs a trivial coroutine every 10 ms for 500 ticks and reports, per run, the lateness of its
actual start against its grid time (origin + k * interval), the skipped ticks, and the end-to-end
drift (last start versus where the grid says it should be). A drifting scheduler's lateness
grows with k; ours stays bounded by wake-up latency.

    python benchmarks/bench_periodic.py [--ticks 500] [--interval 0.01]

Writes benchmarks/results/periodic.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
from pathlib import Path

from prismq_subprocess._background._periodic import PeriodicTask


def percentile(sorted_values: list[float], fraction: float) -> float:
    index = min(len(sorted_values) - 1, round(fraction * (len(sorted_values) - 1)))
    return sorted_values[index]


async def measure(ticks: int, interval: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    records: list[tuple[float, float]] = []
    done = asyncio.Event()

    async def tick() -> None:
        scheduled = task.stats.last_scheduled_time
        assert scheduled is not None
        records.append((loop.time(), scheduled))
        if len(records) >= ticks:
            done.set()

    task = PeriodicTask("bench", interval, tick, run_immediately=False)  # as measured before
    task.start()
    await done.wait()
    await task.stop()
    stats = task.stats

    records = records[:ticks]
    lateness_ms = sorted((actual - when) * 1000 for actual, when in records)
    origin = records[0][1] - interval
    last_actual, last_scheduled = records[-1]
    # Grid position of the last run = runs + skipped; the drift is its lateness against that.
    expected_last = origin + (stats.runs + stats.skipped) * interval
    return {
        "ticks": ticks,
        "interval_ms": interval * 1000,
        "runs": stats.runs,
        "skipped": stats.skipped,
        "lateness_ms": {
            "min": lateness_ms[0],
            "median": statistics.median(lateness_ms),
            "mean": statistics.fmean(lateness_ms),
            "p95": percentile(lateness_ms, 0.95),
            "p99": percentile(lateness_ms, 0.99),
            "max": lateness_ms[-1],
        },
        "last_run_grid_error_ms": (last_scheduled - expected_last) * 1000,
        "end_to_end_drift_ms": (last_actual - expected_last) * 1000,
        "wall_seconds": last_actual - origin,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ticks", type=int, default=500)
    parser.add_argument("--interval", type=float, default=0.010)
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "periodic.json"
    )
    args = parser.parse_args()

    result = asyncio.run(measure(args.ticks, args.interval))
    result["environment"] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")

    late = result["lateness_ms"]
    assert isinstance(late, dict)
    print(
        f"{result['runs']} runs at {args.interval * 1000:g} ms, {result['skipped']} skipped; "
        f"lateness ms: median {late['median']:.3f}, p95 {late['p95']:.3f}, "
        f"p99 {late['p99']:.3f}, max {late['max']:.3f}; "
        f"end-to-end drift {result['end_to_end_drift_ms']:.3f} ms "
        f"over {result['wall_seconds']:.2f} s"
    )
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
