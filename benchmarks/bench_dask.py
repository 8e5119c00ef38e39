"""ModuleRunner on a Dask cluster against ModuleRunner here: throughput and first-line latency.

A ``distributed.LocalCluster`` (worker processes on this machine, its scheduler in this process)
stands in for the cluster, so the figures show what the Dask path *adds* per run (task submit,
the worker-side runner, the event topic back to the host), not what more machines give. Both
sides run the same module (``print`` one line, exit 0) with the same concurrency: the local
runner allows ``concurrency`` runs at once; the cluster has two workers with ``concurrency / 2``
task threads each.

- throughput: ``modules`` runs started at once with ``start_module``, until the last is recorded;
  runs/s, local and cluster interleaved round by round;
- latency: one run at a time, from the ``start_module`` call to its first line reaching an
  ``OutputCapture`` subscriber; the added latency is cluster minus local, paired per round.

Not part of ``run_all.py`` (it needs the ``[dask]`` extra and starts a cluster):

    python benchmarks/bench_dask.py [--modules 200] [--rounds 5] [--latency-samples 20]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Target, fmt_seconds, fmt_spread, table, write_json

CASES = ["local", "dask"]
MODULE = "print('hello', flush=True)\n"
#: The cluster path may cost this much throughput on one machine (it adds a scheduler round trip,
#: an event loop and an event topic per run, and shares the 2 cores with the workers).
THROUGHPUT_FLOOR = 0.5
#: Added first-line latency we accept on one machine.
LATENCY_CEILING_S = 0.05


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    """A cluster, an async client and a script, shared by every sample of one run."""

    def __init__(self, address: str, script: Path, concurrency: int) -> None:
        self.address = address
        self.script = script
        self.concurrency = concurrency

    def runner(self, client: Any | None) -> Any:
        import prismq_subprocess as pq
        from prismq_subprocess.dask import DaskBackend

        backend = None if client is None else DaskBackend(client)
        return pq.ModuleRunner(
            pq.RunRegistry(),
            output=pq.OutputCapture(),
            backend=backend,
            max_concurrent=self.concurrency if client is None else None,
        )

    async def throughput(self, client: Any | None, modules: int) -> float:
        """Seconds for ``modules`` runs started at once."""
        import prismq_subprocess as pq

        async with self.runner(client) as runner:
            started = time.perf_counter()
            ids = [await runner.start_module("m", "m", self.script) for _ in range(modules)]
            await runner.task_manager.wait_all()
            wall = time.perf_counter() - started
            runs = [await runner.registry.get_run(run_id) for run_id in ids]
        failed = [r for r in runs if r is None or r.status is not pq.RunStatus.COMPLETED]
        if failed:
            raise AssertionError(f"{len(failed)} runs did not complete: {failed[:1]}")
        return wall

    async def first_lines(self, client: Any | None, samples: int) -> list[float]:
        """Seconds from ``start_module`` to the first line, one run at a time."""
        latencies = []
        async with self.runner(client) as runner:
            for i in range(samples):
                run_id = f"latency-{i}"
                subscription = runner.output.subscribe(run_id, wait=True)
                started = time.perf_counter()
                await runner.start_module("m", "m", self.script, run_id=run_id)
                await anext(subscription)
                latencies.append(time.perf_counter() - started)
                await subscription.aclose()
                await runner.task_manager.wait_all()
        return latencies


async def _measure(
    bench: Bench, modules: int, rounds: int, latency_samples: int
) -> dict[str, Any]:
    from distributed import Client

    async with Client(bench.address, asynchronous=True, set_as_default=False) as client:
        await client.wait_for_workers(2)
        clients = {"local": None, "dask": client}
        walls: dict[str, list[float]] = {case: [] for case in CASES}
        latency: dict[str, list[list[float]]] = {case: [] for case in CASES}
        for case in CASES:  # warm-up: imports on the workers, the first connections
            await bench.throughput(clients[case], min(modules, 8))
            await bench.first_lines(clients[case], 2)
        for r in range(rounds):
            order = CASES[r % 2 :] + CASES[: r % 2]
            for case in order:
                walls[case].append(await bench.throughput(clients[case], modules))
            for case in order:
                latency[case].append(await bench.first_lines(clients[case], latency_samples))
            log(f"  round {r + 1}/{rounds} done")
    return {"walls": walls, "latency": latency}


def run(
    modules: int = 200, rounds: int = 5, latency_samples: int = 20, concurrency: int = 8
) -> dict[str, Any]:
    """Start a LocalCluster, measure both cases, stop the cluster; return the results."""
    from distributed import LocalCluster

    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "hello.py"
        script.write_text(MODULE)
        with LocalCluster(
            n_workers=2,
            threads_per_worker=max(1, concurrency // 2),
            processes=True,
            silence_logs=40,
            # No dashboard; the scheduler's HTTP endpoint on a free port (8787 may be taken).
            dashboard_address=None,
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        ) as cluster:
            bench = Bench(cluster.scheduler_address, script, concurrency)
            measured = asyncio.run(_measure(bench, modules, rounds, latency_samples))
    walls = measured["walls"]
    per_round_latency = {
        case: [statistics.median(samples) for samples in measured["latency"][case]]
        for case in CASES
    }
    all_latency = {
        case: sorted(x for samples in measured["latency"][case] for x in samples) for case in CASES
    }
    return {
        "modules": modules,
        "rounds": rounds,
        "concurrency": concurrency,
        "latency_samples": latency_samples,
        "runs_per_second": {
            case: [modules / wall for wall in walls[case]] for case in CASES
        },
        "throughput_ratio": [d / loc for loc, d in zip(walls["local"], walls["dask"], strict=True)],
        "first_line_seconds": all_latency,
        "first_line_round_medians": per_round_latency,
        "added_latency_seconds": [
            d - loc
            for loc, d in zip(per_round_latency["local"], per_round_latency["dask"], strict=True)
        ],
    }


def _p90(values: list[float]) -> float:
    return values[min(len(values) - 1, int(0.9 * len(values)))]


def report(result: dict[str, Any]) -> str:
    rows = []
    for case in CASES:
        rates = result["runs_per_second"][case]
        lat = result["first_line_seconds"][case]
        rows.append(
            [
                case,
                fmt_spread(rates, lambda v: f"{v:.0f}"),
                fmt_seconds(statistics.median(lat)),
                fmt_seconds(_p90(lat)),
            ]
        )
    ratio = statistics.median(1 / r for r in result["throughput_ratio"])
    added = result["added_latency_seconds"]
    return "\n".join(
        [
            f"{result['modules']} short modules, concurrency {result['concurrency']},"
            f" {result['rounds']} rounds",
            table(["case", "runs/s (min/median/max)", "first line p50", "first line p90"], rows),
            f"cluster throughput = {ratio:.2f}x local (median of paired rounds)",
            f"added first-line latency: {fmt_spread(added, fmt_seconds)} (min / median / max)",
        ]
    )


def targets(result: dict[str, Any]) -> list[Target]:
    ratio = statistics.median(1 / r for r in result["throughput_ratio"])
    added = statistics.median(result["added_latency_seconds"])
    return [
        Target(
            f"Dask cluster throughput >= {THROUGHPUT_FLOOR}x local on one machine",
            ratio >= THROUGHPUT_FLOOR,
            f"{ratio:.2f}x",
        ),
        Target(
            f"Dask added first-line latency <= {LATENCY_CEILING_S * 1e3:.0f} ms",
            added <= LATENCY_CEILING_S,
            fmt_seconds(added),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modules", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--latency-samples", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    result = run(args.modules, args.rounds, args.latency_samples, args.concurrency)
    print(report(result))
    for target in targets(result):
        print(target.line())
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        write_json(args.json.stem, result, args.json.parent)
    else:
        write_json("dask", result)


if __name__ == "__main__":
    main()
