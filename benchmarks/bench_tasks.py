"""Throughput of BackgroundTaskManager: start + complete trivial in-process tasks.

Each case starts N trivial coroutines through the manager (every run is added PENDING, marked
RUNNING and then COMPLETED in the registry: three registry writes per task) and waits for all of
them. Cases: in-memory registry without and with a concurrency limit, and a SQLite registry
(WAL, on a temporary file). Reports the median over rounds of tasks per second.

    python benchmarks/bench_tasks.py [--memory-tasks 10000] [--sqlite-tasks 1000] [--rounds 3]

Writes benchmarks/results/tasks.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import table, write_json

from prismq_subprocess._background._memory_registry import BaseRunRegistry, RunRegistry
from prismq_subprocess._background._run_record import Run, RunStatus
from prismq_subprocess._background._sqlite_registry import SQLiteRunRegistry
from prismq_subprocess._background._task_manager import BackgroundTaskManager


async def trivial() -> int:
    return 0


async def one_round(
    make_registry: Callable[[], BaseRunRegistry], tasks: int, max_concurrent: int | None
) -> float:
    async with make_registry() as registry:
        await registry.count_runs()  # open (SQLite) outside the timed part
        async with BackgroundTaskManager(registry, max_concurrent=max_concurrent) as manager:
            start = time.perf_counter()
            for _ in range(tasks):
                await manager.start_task(Run(module_id="bench"), trivial())
            await manager.wait_all()
            elapsed = time.perf_counter() - start
        completed = await registry.count_runs(status=RunStatus.COMPLETED)
        if completed != tasks:
            raise RuntimeError(f"expected {tasks} completed runs, registry has {completed}")
    return elapsed


def run(memory_tasks: int, sqlite_tasks: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp:
        counter = iter(range(1_000_000))

        def sqlite_registry() -> BaseRunRegistry:
            return SQLiteRunRegistry(Path(tmp) / f"runs-{next(counter)}.db")

        cases: dict[str, tuple[Callable[[], BaseRunRegistry], int, int | None]] = {
            "memory": (RunRegistry, memory_tasks, None),
            "memory, max_concurrent=100": (RunRegistry, memory_tasks, 100),
            "sqlite (WAL)": (sqlite_registry, sqlite_tasks, None),
        }
        results: dict[str, Any] = {}
        for name, (factory, tasks, limit) in cases.items():
            samples = [asyncio.run(one_round(factory, tasks, limit)) for _ in range(rounds)]
            median = statistics.median(samples)
            results[name] = {
                "tasks": tasks,
                "max_concurrent": limit,
                "seconds": samples,
                "median_seconds": median,
                "tasks_per_second": tasks / median,
                "us_per_task": median / tasks * 1e6,
            }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory-tasks", type=int, default=10_000)
    parser.add_argument("--sqlite-tasks", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    results = run(args.memory_tasks, args.sqlite_tasks, args.rounds)
    rows = [
        (
            name,
            r["tasks"],
            f"{r['median_seconds']:.3f}",
            f"{r['tasks_per_second']:,.0f}",
            f"{r['us_per_task']:.1f}",
        )
        for name, r in results.items()
    ]
    print(table(["case", "tasks", "median s", "tasks/s", "us/task"], rows))
    path = write_json("tasks", {"rounds": args.rounds, "cases": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
