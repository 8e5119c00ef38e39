"""Many live children: C concurrent ``run("sleep", "1")`` calls, all alive at the same time.

Each case runs in a fresh interpreter; a psutil sampler (every 5 ms) records the process's peak
thread count (the sampler's own thread excluded) and peak RSS. Wall time is from the first spawn
to the last result; ideal is the sleep itself (1 s) plus spawn cost.

Cases: ``SubprocessWrapper.run()`` in ASYNC and THREADED, and raw ``asyncio`` exec+communicate
for reference (on Python 3.11 its default child watcher starts one thread per child).

    python benchmarks/bench_many.py [--children 500] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Sampler, Target, run_fresh, table, write_json

PIPE = subprocess.PIPE
MB = 1024 * 1024
SLEEP = shutil.which("sleep") or "/bin/sleep"
CASES = ["ASYNC run()", "THREADED run()", "asyncio communicate"]
OURS = CASES[:2]
#: What "bounded" means for the target: peak threads that do not grow with the number of children.
THREAD_ALLOWANCE = 64


def _measure_child(case: str, children: int, seconds: float) -> dict[str, Any]:
    cmd = [SLEEP, str(seconds)]

    async def main() -> dict[str, Any]:
        if case == "asyncio communicate":

            async def one() -> int:
                p = await asyncio.create_subprocess_exec(*cmd, stdout=PIPE, stderr=PIPE)
                await p.communicate()
                assert p.returncode is not None
                return p.returncode

            await one()
            with Sampler() as sampler:
                started = time.perf_counter()
                codes = await asyncio.gather(*(one() for _ in range(children)))
                wall = time.perf_counter() - started
        else:
            import prismq_subprocess as pq

            mode = pq.RunMode[case.split()[0]]
            async with pq.SubprocessWrapper(mode) as w:
                await w.run("true")

                async def ours() -> int:
                    return (await w.run(*cmd)).returncode

                with Sampler() as sampler:
                    started = time.perf_counter()
                    codes = await asyncio.gather(*(ours() for _ in range(children)))
                    wall = time.perf_counter() - started
        if any(codes):
            raise AssertionError(f"{case}: {sum(1 for c in codes if c)} children failed")
        return {
            "case": case,
            "wall_seconds": wall,
            "peak_threads": sampler.peak_threads,
            "peak_rss": sampler.peak_rss,
        }

    return asyncio.run(main())


def run(
    children: int = 500,
    rounds: int = 2,
    seconds: float = 1.0,
    cases: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    chosen = cases or CASES
    if log:
        log(f"many: {children} x sleep {seconds:g}, {rounds} rounds, fresh process per case")
    samples: dict[str, list[dict[str, Any]]] = {c: [] for c in chosen}
    for r in range(rounds):
        shift = r % len(chosen)
        for case in chosen[shift:] + chosen[:shift]:
            samples[case].append(
                run_fresh(
                    Path(__file__),
                    ["--child", case, "--children", str(children), "--seconds", str(seconds)],
                )
            )
        if log:
            log(f"  round {r + 1}/{rounds} done")
    summary = {
        case: {
            "wall_seconds_median": statistics.median(s["wall_seconds"] for s in runs),
            "peak_threads_max": max(s["peak_threads"] for s in runs),
            "peak_rss_max": max(s["peak_rss"] for s in runs),
        }
        for case, runs in samples.items()
    }
    return {
        "children": children,
        "sleep_seconds": seconds,
        "rounds": rounds,
        "cpus": os.cpu_count(),
        "cases": summary,
        "samples": samples,
    }


def report(result: dict[str, Any]) -> str:
    rows = [
        [
            case,
            f"{s['wall_seconds_median']:.2f} s",
            s["peak_threads_max"],
            f"{s['peak_rss_max'] / MB:.1f} MB",
        ]
        for case, s in result["cases"].items()
    ]
    return (
        f"Many: {result['children']} concurrent run(sleep {result['sleep_seconds']:g}), "
        f"median of {result['rounds']} interleaved rounds, fresh interpreter per sample\n"
        + table(["case", "wall", "peak threads", "peak RSS"], rows)
    )


def targets(result: dict[str, Any]) -> list[Target]:
    cases = result["cases"]
    n = result["children"]
    out = []
    done = [c for c in OURS if c in cases]
    out.append(
        Target(
            f"{n} live children complete (ASYNC, THREADED)",
            len(done) == len(OURS),
            ", ".join(f"{c.split()[0]} {cases[c]['wall_seconds_median']:.2f} s" for c in done),
        )
    )
    if "THREADED run()" in cases:
        peak = cases["THREADED run()"]["peak_threads_max"]
        out.append(
            Target(
                f"THREADED bounded threads (<= {THREAD_ALLOWANCE} with {n} children)",
                peak <= THREAD_ALLOWANCE,
                f"peak {peak} threads",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--children", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure_child(args.child, args.children, args.seconds)))
        return
    result = run(args.children, args.rounds, args.seconds, log=lambda s: print(s, file=sys.stderr))
    print(report(result))
    for t in targets(result):
        print(t.line())
    print(f"wrote {write_json('many', result)}")


if __name__ == "__main__":
    main()
