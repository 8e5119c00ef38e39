"""Spawn overhead: N runs of a trivial program, sequential and at concurrency 8.

Programs: ``/bin/true`` (the spawn itself dominates) and ``python -c pass`` (a realistic small
child). Every case captures stdout and stderr through pipes (as ``run()`` does), except the
``posix_spawn`` floor, which starts and reaps the child and nothing else.

Cases, interleaved round by round: ``os.posix_spawn``+``waitpid`` (floor), ``subprocess.run``,
raw ``asyncio.create_subprocess_exec``+``communicate`` (the reference for ratios),
``anyio.run_process``, ``trio.run_process``, and ``SubprocessWrapper.run()`` in ASYNC, THREADED,
LOCAL and DRY_RUN, plus ASYNC through the drop-in ``create_subprocess_exec``+``communicate``.

    python benchmarks/bench_spawn.py [--n 100] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import functools
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import (
    PYTHON,
    TRUE,
    Interleaved,
    Target,
    fmt_seconds,
    interleave,
    table,
    write_json,
)

import prismq_subprocess as pq

PIPE = subprocess.PIPE
DEVNULL = subprocess.DEVNULL

PROGRAMS: dict[str, list[str]] = {
    "true": [TRUE],
    "python": [PYTHON, "-c", "pass"],
}
REFERENCE = "asyncio"


# -- synchronous baselines ---------------------------------------------------------------------
def posix_spawn_case(cmd: list[str], n: int, conc: int) -> float:
    env = dict(os.environ)
    started = time.perf_counter()
    inflight: set[int] = set()
    launched = 0
    while launched < n or inflight:
        while launched < n and len(inflight) < conc:
            inflight.add(os.posix_spawn(cmd[0], cmd, env))
            launched += 1
        pid, _ = os.waitpid(-1, 0)
        inflight.discard(pid)
    return time.perf_counter() - started


def subprocess_run_case(cmd: list[str], n: int, conc: int) -> float:
    def one(_: int) -> None:
        subprocess.run(cmd, stdin=DEVNULL, capture_output=True, check=False)

    one(0)  # warm-up (imports, page cache)
    started = time.perf_counter()
    if conc == 1:
        for i in range(n):
            one(i)
    else:
        with concurrent.futures.ThreadPoolExecutor(conc) as pool:
            list(pool.map(one, range(n)))
    return time.perf_counter() - started


# -- asyncio-based cases -----------------------------------------------------------------------
async def _drive(n: int, conc: int, one: Callable[[], Awaitable[Any]]) -> float:
    await one()  # warm-up: thread pools, child watcher, imports
    remaining = iter(range(n))

    async def worker() -> None:
        for _ in remaining:
            await one()

    started = time.perf_counter()
    if conc == 1:
        await worker()
    else:
        await asyncio.gather(*(worker() for _ in range(conc)))
    return time.perf_counter() - started


def asyncio_case(cmd: list[str], n: int, conc: int) -> float:
    async def one() -> None:
        proc = await asyncio.create_subprocess_exec(*cmd, stdin=DEVNULL, stdout=PIPE, stderr=PIPE)
        await proc.communicate()

    return asyncio.run(_drive(n, conc, one))


def wrapper_run_case(mode: pq.RunMode) -> Callable[[list[str], int, int], float]:
    def case(cmd: list[str], n: int, conc: int) -> float:
        async def main() -> float:
            async with pq.SubprocessWrapper(mode) as w:

                async def one() -> None:
                    await w.run(*cmd)

                return await _drive(n, conc, one)

        return asyncio.run(main())

    return case


def wrapper_exec_case(mode: pq.RunMode) -> Callable[[list[str], int, int], float]:
    def case(cmd: list[str], n: int, conc: int) -> float:
        async def main() -> float:
            async with pq.SubprocessWrapper(mode) as w:

                async def one() -> None:
                    proc = await w.create_subprocess_exec(
                        *cmd, stdin=DEVNULL, stdout=PIPE, stderr=PIPE
                    )
                    await proc.communicate()

                return await _drive(n, conc, one)

        return asyncio.run(main())

    return case


# -- anyio and trio ----------------------------------------------------------------------------
def anyio_case(cmd: list[str], n: int, conc: int) -> float:
    import anyio

    async def one() -> None:
        await anyio.run_process(cmd, stdin=DEVNULL, check=False)

    async def main() -> float:
        await one()
        remaining = iter(range(n))

        async def worker() -> None:
            for _ in remaining:
                await one()

        started = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for _ in range(conc):
                tg.start_soon(worker)
        return time.perf_counter() - started

    return anyio.run(main, backend="asyncio")


def trio_case(cmd: list[str], n: int, conc: int) -> float:
    import trio

    async def one() -> None:
        await trio.run_process(
            cmd, stdin=DEVNULL, capture_stdout=True, capture_stderr=True, check=False
        )

    async def main() -> float:
        await one()
        remaining = iter(range(n))

        async def worker() -> None:
            for _ in remaining:
                await one()

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for _ in range(conc):
                nursery.start_soon(worker)
        return time.perf_counter() - started

    return trio.run(main)


CASES: dict[str, Callable[[list[str], int, int], float]] = {
    "posix_spawn (floor)": posix_spawn_case,
    "subprocess.run": subprocess_run_case,
    REFERENCE: asyncio_case,
    "anyio.run_process": anyio_case,
    "trio.run_process": trio_case,
    "ASYNC run()": wrapper_run_case(pq.RunMode.ASYNC),
    "ASYNC exec+communicate": wrapper_exec_case(pq.RunMode.ASYNC),
    "THREADED run()": wrapper_run_case(pq.RunMode.THREADED),
    "LOCAL run()": wrapper_run_case(pq.RunMode.LOCAL),
    "DRY_RUN run()": wrapper_run_case(pq.RunMode.DRY_RUN),
}


def dry_run_100(rounds: int) -> list[float]:
    """Seconds for 100 ``run()`` calls in DRY_RUN, one sample per round."""

    async def main() -> list[float]:
        samples = []
        async with pq.SubprocessWrapper(pq.RunMode.DRY_RUN) as w:
            await w.run(TRUE)
            for _ in range(rounds):
                started = time.perf_counter()
                for _ in range(100):
                    await w.run(TRUE)
                samples.append(time.perf_counter() - started)
        return samples

    return asyncio.run(main())


def run(
    n: int = 100,
    rounds: int = 7,
    concurrencies: tuple[int, ...] = (1, 8),
    programs: tuple[str, ...] = ("true", "python"),
    cases: tuple[str, ...] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every case; returns the JSON-ready result."""
    chosen = {k: v for k, v in CASES.items() if cases is None or k in cases or k == REFERENCE}
    groups: dict[str, Any] = {}
    for program in programs:
        cmd = PROGRAMS[program]
        for conc in concurrencies:
            key = f"{program} c={conc}"
            if log:
                log(f"spawn: {key}, n={n}, {rounds} rounds, {len(chosen)} cases")
            timings: Interleaved = interleave(
                {name: functools.partial(f, cmd, n, conc) for name, f in chosen.items()},
                rounds,
                log=log,
            )
            groups[key] = {
                "n": n,
                "concurrency": conc,
                "command": cmd,
                "per_spawn_median_s": {c: timings.median(c) / n for c in chosen},
                "ratio_to_asyncio": {c: timings.paired_ratio(c, REFERENCE) for c in chosen},
                "ratio_to_subprocess_run": (
                    {c: timings.paired_ratio(c, "subprocess.run") for c in chosen}
                    if "subprocess.run" in chosen
                    else {}
                ),
                "timings": timings.as_dict(),
            }
    dry = dry_run_100(max(rounds, 5))
    return {"n": n, "rounds": rounds, "groups": groups, "dry_run_100_s": dry}


def report(result: dict[str, Any]) -> str:
    groups = result["groups"]
    keys = list(groups)
    cases = list(next(iter(groups.values()))["per_spawn_median_s"])
    headers = ["case"] + [f"{k}: per spawn (vs asyncio)" for k in keys]
    rows = []
    for case in cases:
        rows.append(
            [case]
            + [
                f"{fmt_seconds(groups[k]['per_spawn_median_s'][case])} "
                f"({groups[k]['ratio_to_asyncio'][case]:.2f}x)"
                for k in keys
            ]
        )
    dry = sorted(result["dry_run_100_s"])
    return (
        f"Spawn: N={result['n']} per sample, median of {result['rounds']} interleaved rounds; "
        "ratio = median of per-round (case / raw asyncio)\n"
        + table(headers, rows)
        + f"\nDRY_RUN: 100 run() calls take {fmt_seconds(dry[len(dry) // 2])} (median)"
    )


def targets(result: dict[str, Any]) -> list[Target]:
    groups = result["groups"]
    out = []

    def check(name: str, case: str, base: str, limit: float) -> None:
        ratios = {}
        for key, g in groups.items():
            table_ = g["ratio_to_asyncio"] if base == REFERENCE else g["ratio_to_subprocess_run"]
            if case in table_ and base in table_:
                ratios[key] = table_[case]
        if not ratios:
            out.append(Target(name, None, "not measured"))
            return
        detail = ", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items())
        out.append(Target(name, all(v <= limit for v in ratios.values()), detail))

    check("ASYNC run() within 10% of raw asyncio", "ASYNC run()", REFERENCE, 1.10)
    check("THREADED run() within 15% of raw asyncio", "THREADED run()", REFERENCE, 1.15)
    check("LOCAL run() within 10% of subprocess.run", "LOCAL run()", "subprocess.run", 1.10)
    for peer in ("anyio.run_process", "trio.run_process"):
        worst: list[str] = []
        measured = False
        for key, g in groups.items():
            r = g["ratio_to_asyncio"]
            if peer not in r:
                continue
            for mode in ("ASYNC run()", "THREADED run()", "LOCAL run()"):
                if mode in r:
                    measured = True
                    if r[mode] >= r[peer]:
                        worst.append(f"{mode} {r[mode]:.2f}x >= {r[peer]:.2f}x ({key})")
        if not measured:
            out.append(Target(f"ASYNC/THREADED/LOCAL faster than {peer}", None, "not measured"))
        else:
            out.append(
                Target(
                    f"ASYNC/THREADED/LOCAL faster than {peer}",
                    not worst,
                    "; ".join(worst) if worst else "all modes faster in every group",
                )
            )
    dry = sorted(result["dry_run_100_s"])
    median = dry[len(dry) // 2]
    out.append(Target("DRY_RUN 100 executions < 5 ms", median < 0.005, fmt_seconds(median)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--programs", default="true,python")
    parser.add_argument("--concurrency", default="1,8")
    args = parser.parse_args()
    result = run(
        args.n,
        args.rounds,
        tuple(int(c) for c in args.concurrency.split(",")),
        tuple(args.programs.split(",")),
        log=lambda s: print(s, file=sys.stderr),
    )
    print(report(result))
    for t in targets(result):
        print(t.line())
    print(f"wrote {write_json('spawn', result)}")


if __name__ == "__main__":
    main()
