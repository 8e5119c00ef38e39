"""Task layer against bare asyncio: BackgroundTaskManager per-task overhead, PeriodicTask lateness.

Per-task overhead: N trivial coroutines started through ``BackgroundTaskManager.start_task``
(a new ``Run`` per task, in-memory ``RunRegistry``: PENDING, RUNNING, COMPLETED recorded) and
waited for with ``wait_all()``, against the same coroutines started with bare
``asyncio.create_task`` and gathered, and in an ``asyncio.TaskGroup``. Like the bare cases, the
manager's starts are fire-and-forget (the guide's use: ``start_task`` returns the id); a fourth,
informative case awaits every ``TaskHandle`` (a loop round trip per task) before the next start.
N is calibrated so every case's sample lasts >= 0.5 s (calibration = warm-up), and all cases
run the same N (the largest calibrated: a task costs more when more are alive, so equal
durations would favour the dearer cases); compared per task, paired round by round. The
cases are single-threaded and CPU-bound, so a sample is the process's CPU time
(``time.process_time``): on a shared machine wall time also counts the neighbours' turns.

Periodic lateness: a trivial coroutine every 10 ms through ``PeriodicTask`` against a bare
asyncio schedule on the same fixed grid (``await asyncio.sleep(next_tick - loop.time())``) with
the same rule for a late wake-up (the latest due tick runs, the ones before it are skipped).
Lateness = actual start - grid time of the tick that runs; skipped ticks are counted for both;
a sample is ``--ticks`` runs (>= 0.5 s).

    python benchmarks/bench_background.py [--min-sample 0.5] [--rounds 7] [--ticks 100]
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Target, calibrate, fmt_seconds, interleave, spread, table, write_json

import prismq_subprocess as pq

#: Target of the performance issue.
MANAGER_LIMIT = 2.0
#: This benchmark's own thresholds: PeriodicTask may be this much later than a bare schedule.
PERIODIC_MEDIAN_ALLOWANCE_S = 0.5e-3
PERIODIC_P99_ALLOWANCE_S = 1.0e-3
INTERVAL = 0.01
BARE_TASKS = "asyncio.create_task (bare)"
TASK_GROUP = "asyncio.TaskGroup"
MANAGER = "BackgroundTaskManager.start_task"
MANAGER_AWAITED = "start_task, each handle awaited"
BARE_SCHEDULE = "bare asyncio schedule"
PERIODIC = "PeriodicTask"


async def _trivial() -> int:
    return 0


async def _bare_tasks(n: int) -> float:
    started = time.process_time()
    tasks = [asyncio.create_task(_trivial()) for _ in range(n)]
    await asyncio.gather(*tasks)
    return time.process_time() - started


async def _task_group(n: int) -> float:
    started = time.process_time()
    async with asyncio.TaskGroup() as group:
        for _ in range(n):
            group.create_task(_trivial())
    return time.process_time() - started


async def _manager_tasks(n: int, *, awaited: bool = False) -> float:
    async with pq.RunRegistry() as registry:
        manager = pq.BackgroundTaskManager(registry)
        started = time.process_time()
        if awaited:
            for _ in range(n):
                await manager.start_task(pq.Run(module_id="bench"), _trivial())
        else:
            for _ in range(n):
                manager.start_task(pq.Run(module_id="bench"), _trivial())
        await manager.wait_all()
        elapsed = time.process_time() - started
        await manager.shutdown()
        done = await registry.count_runs(status=pq.RunStatus.COMPLETED)
    if done != n:
        raise AssertionError(f"expected {n} completed runs, the registry has {done}")
    return elapsed


async def _manager_awaited(n: int) -> float:
    return await _manager_tasks(n, awaited=True)


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def _bare_schedule(ticks: int) -> tuple[list[float], int]:
    """A bare asyncio schedule with ``PeriodicTask``'s rules: a fixed grid, and a wake-up that
    finds several ticks due runs once, for the latest (the earlier ones are skipped). Lateness is
    measured against the tick that runs, as ``PeriodicTask`` reports it; without the same
    coalescing a stall of 3 intervals counted 35/25/15/5 ms here and under 10 ms there."""
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    skipped = 0
    origin = loop.time()
    k = 1
    while len(lateness) < ticks:
        delay = origin + k * INTERVAL - loop.time()
        await asyncio.sleep(delay if delay > 0 else 0)
        now = loop.time()
        latest = math.floor((now - origin) / INTERVAL)
        if latest > k:
            skipped += latest - k
            k = latest
        lateness.append(now - (origin + k * INTERVAL))
        await _trivial()
        k += 1
    return lateness, skipped


async def _periodic_schedule(ticks: int) -> tuple[list[float], int]:
    loop = asyncio.get_running_loop()
    lateness: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        scheduled = task.stats.last_scheduled_time
        assert scheduled is not None
        lateness.append(loop.time() - scheduled)
        if len(lateness) >= ticks:
            done.set()

    # The first run waits one interval, like the bare schedule's (run_immediately would make
    # one run in every sample a run that no timer had to wake).
    task = pq.PeriodicTask("bench", INTERVAL, tick, run_immediately=False)
    task.start()
    await done.wait()
    skipped = task.stats.skipped
    await task.stop()
    return lateness[:ticks], skipped


def run(
    min_sample: float = 0.5,
    rounds: int = 7,
    ticks: int = 100,
    tasks: int = 2_000,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    if log:
        log(f"background: {rounds} rounds, >= {min_sample:g} s/sample, {ticks} ticks at 10 ms")
    kinds = {
        BARE_TASKS: _bare_tasks,
        TASK_GROUP: _task_group,
        MANAGER: _manager_tasks,
        MANAGER_AWAITED: _manager_awaited,
    }
    calibrated = [calibrate(_runner(kind), min_sample, tasks, log=log) for kind in kinds.values()]
    # One size for every case: the cost per task grows with the number of live tasks (the
    # cyclic GC's passes), so cases sized to the same duration would give the cheapest case
    # the most tasks and flatter the others' ratios.
    sizes = dict.fromkeys(kinds, max(calibrated))
    t = interleave({name: _per_task(kinds[name], sizes[name]) for name in kinds}, rounds, log=log)

    schedules = {BARE_SCHEDULE: _bare_schedule, PERIODIC: _periodic_schedule}
    for schedule in schedules.values():
        asyncio.run(schedule(5))  # warm-up
    lateness: dict[str, list[list[float]]] = {name: [] for name in schedules}
    skipped: dict[str, list[int]] = {name: [] for name in schedules}
    names = list(schedules)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            late, skips = asyncio.run(schedules[name](ticks))
            lateness[name].append(late)
            skipped[name].append(skips)
        if log:
            log(f"  schedule round {r + 1}/{rounds} done")
    periodic = {
        name: {
            "median_s": statistics.median(statistics.median(s) for s in samples),
            "median_spread_s": spread([statistics.median(s) for s in samples]),
            "p99_s": statistics.median(_percentile(s, 0.99) for s in samples),
            "p99_spread_s": spread([_percentile(s, 0.99) for s in samples]),
            "max_s": max(max(s) for s in samples),
            "skipped": sum(skipped[name]),
        }
        for name, samples in lateness.items()
    }
    return {
        "min_sample_s": min_sample,
        "rounds": rounds,
        "tasks": {
            name: {
                "tasks_per_sample": sizes[name],
                "per_task_s": t.median(name),
                "per_task_spread_s": t.spread(name),
            }
            for name in kinds
        },
        "manager_over_bare": t.paired_ratio(MANAGER, BARE_TASKS),
        "manager_over_bare_spread": spread(t.paired_ratios(MANAGER, BARE_TASKS)),
        "task_group_over_bare": t.paired_ratio(TASK_GROUP, BARE_TASKS),
        "awaited_over_bare": t.paired_ratio(MANAGER_AWAITED, BARE_TASKS),
        "ticks": ticks,
        "interval_s": INTERVAL,
        "periodic": periodic,
        "lateness_samples": lateness,
        "timings": t.as_dict(),
    }


def _runner(kind: Callable[[int], Any]) -> Callable[[int], float]:
    return lambda n: float(asyncio.run(kind(n)))


def _per_task(kind: Callable[[int], Any], n: int) -> Callable[[], float]:
    return lambda: float(asyncio.run(kind(n))) / n


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def report(result: dict[str, Any]) -> str:
    rows = [
        [
            name,
            fmt_seconds(c["per_task_s"]),
            " / ".join(fmt_seconds(x) for x in c["per_task_spread_s"]),
            f"{c['tasks_per_sample']:,}",
        ]
        for name, c in result["tasks"].items()
    ]
    ratio = "{:.2f} / {:.2f} / {:.2f}".format(*result["manager_over_bare_spread"])
    late = [
        [
            name,
            " / ".join(_ms(x) for x in p["median_spread_s"]),
            " / ".join(_ms(x) for x in p["p99_spread_s"]),
            _ms(p["max_s"]),
            p["skipped"],
        ]
        for name, p in result["periodic"].items()
    ]
    return (
        f"Task layer vs bare asyncio: median of {result['rounds']} interleaved rounds, each "
        f"sample >= {result['min_sample_s']:g} s (warm-up first)\n"
        + table(["case", "per task", "min / median / max", "tasks per sample"], rows)
        + f"\nBackgroundTaskManager / bare create_task per task: "
        f"{result['manager_over_bare']:.2f}x (min / median / max {ratio})\n"
        f"Lateness of a {result['interval_s'] * 1e3:g} ms schedule, {result['ticks']} ticks per "
        "sample, in ms (per-round median and p99: min / median / max over rounds)\n"
        + table(["schedule", "median lateness", "p99 lateness", "max", "ticks skipped"], late)
    )


def targets(result: dict[str, Any]) -> list[Target]:
    ratio = result["manager_over_bare"]
    bare, ours = result["periodic"][BARE_SCHEDULE], result["periodic"][PERIODIC]
    return [
        Target(
            f"BackgroundTaskManager <= {MANAGER_LIMIT:g}x bare create_task per task",
            ratio <= MANAGER_LIMIT,
            f"{ratio:.2f}x ({fmt_seconds(result['tasks'][MANAGER]['per_task_s'])} vs "
            f"{fmt_seconds(result['tasks'][BARE_TASKS]['per_task_s'])})",
        ),
        Target(
            f"PeriodicTask lateness within +{PERIODIC_MEDIAN_ALLOWANCE_S * 1e3:g} ms (median) / "
            f"+{PERIODIC_P99_ALLOWANCE_S * 1e3:g} ms (p99) of a bare asyncio schedule",
            ours["median_s"] <= bare["median_s"] + PERIODIC_MEDIAN_ALLOWANCE_S
            and ours["p99_s"] <= bare["p99_s"] + PERIODIC_P99_ALLOWANCE_S,
            f"median {_ms(ours['median_s'])} vs {_ms(bare['median_s'])} ms, "
            f"p99 {_ms(ours['p99_s'])} vs {_ms(bare['p99_s'])} ms",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-sample", type=float, default=0.5, help="seconds per sample")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--ticks", type=int, default=100, help="ticks per schedule sample")
    args = parser.parse_args()
    result = run(args.min_sample, args.rounds, args.ticks, log=lambda s: print(s, file=sys.stderr))
    print(report(result))
    for t in targets(result):
        print(t.line())
    print(f"wrote {write_json('background', result)}")


if __name__ == "__main__":
    main()
