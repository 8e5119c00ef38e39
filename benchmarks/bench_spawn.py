"""Spawn overhead: runs of a trivial program, sequential and at concurrency 8 / 64 / 256.

Programs: ``/bin/true`` (the spawn itself dominates) and ``python -c pass`` (a realistic small
child). Every case captures stdout and stderr through pipes (as ``run()`` does), except the
``posix_spawn`` floor, which starts and reaps the child and nothing else.

Cases, interleaved round by round: ``os.posix_spawn``+``waitpid`` (floor), ``subprocess.run``,
raw ``asyncio.create_subprocess_exec``+``communicate`` (the reference for ratios),
``anyio.run_process``, ``trio.run_process``, and ``SubprocessWrapper.run()`` in ASYNC, THREADED,
LOCAL and DRY_RUN, plus ASYNC through the drop-in ``create_subprocess_exec``+``communicate``,
and ASYNC ``run()`` with containment off (process group only: no cgroup sub-group, no cookie;
informative, printed beside the ASYNC target so the run path's own cost shows).

Each sample runs N spawns, N calibrated per case so a sample lasts >= 0.5 s (the calibration
runs are the warm-up); cases are compared per spawn, paired round by round, and the spread over
the rounds is printed.

    python benchmarks/bench_spawn.py [--min-sample 0.5] [--rounds 7] [--groups true:1,python:8]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
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
    calibrate,
    fmt_seconds,
    interleave,
    spread,
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
CONTAINMENT_OFF = "ASYNC run(), containment off"


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


def _without_containment() -> Any:
    """Platform operations whose children get only their process group: no cgroup sub-group,
    no cookie (what ``PRISMQ_CGROUP=0 PRISMQ_COOKIE=0`` select at start-up), or ``None`` where
    there is no such host (Windows)."""
    try:
        from prismq_subprocess._platform._posix import PosixOps
        from prismq_subprocess._platform._posix_host import PosixHost
    except ImportError:  # pragma: no cover - the package's layout changed
        return None
    if os.name != "posix":
        return None
    host = PosixHost(use_cgroup=False, use_cookie=False, use_subreaper=False)
    return PosixOps(name=sys.platform, host=host)


def wrapper_run_case(
    mode: pq.RunMode, *, contained: bool = True
) -> Callable[[list[str], int, int], float]:
    def case(cmd: list[str], n: int, conc: int) -> float:
        async def main() -> float:
            ops = None if contained else _without_containment()
            async with pq.SubprocessWrapper(mode, ops=ops) as w:

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
    # Informative: the run path without the containment of double-forked daemons (issue 13),
    # so its cost and the run path's own can be told apart in every run.
    CONTAINMENT_OFF: wrapper_run_case(pq.RunMode.ASYNC, contained=False),
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


def _sized(
    case: Callable[[list[str], int, int], float], cmd: list[str], conc: int
) -> Callable[[int], float]:
    """``case`` as a function of the number of spawns (for :func:`calibrate`)."""
    return lambda size: case(cmd, size, conc)


def _per_spawn(
    case: Callable[[list[str], int, int], float], cmd: list[str], size: int, conc: int
) -> Callable[[], float]:
    """One timed sample of ``case``: ``size`` spawns, returned as seconds per spawn."""
    return lambda: case(cmd, size, conc) / size


#: (program, concurrency) groups of a full run; ``/bin/true`` up to 256 in flight.
GROUPS: tuple[tuple[str, int], ...] = (
    ("true", 1),
    ("true", 8),
    ("true", 64),
    ("true", 256),
    ("python", 1),
    ("python", 8),
)
#: Perf issue target: ASYNC run('/bin/true') per spawn at most this times raw asyncio's.
ASYNC_TRUE_LIMIT = 1.05


def run(
    min_sample: float = 0.5,
    rounds: int = 7,
    groups: tuple[tuple[str, int], ...] = GROUPS,
    n: int = 20,
    cases: tuple[str, ...] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Measure every case; returns the JSON-ready result.

    Each case's N (spawns per sample) is calibrated so a sample lasts at least ``min_sample``
    seconds, and is at least ``n`` and twice the concurrency; the calibration runs are the
    warm-up. Samples are seconds per spawn, so cases with different N compare directly.
    """
    chosen = {k: v for k, v in CASES.items() if cases is None or k in cases or k == REFERENCE}
    result_groups: dict[str, Any] = {}
    for program, conc in groups:
        cmd = PROGRAMS[program]
        key = f"{program} c={conc}"
        if log:
            log(f"spawn: {key}, {rounds} rounds, {len(chosen)} cases, >= {min_sample:g} s/sample")
        sizes = {
            name: calibrate(
                _sized(f, cmd, conc),
                min_sample,
                max(n, 2 * conc),
                log=log,
            )
            for name, f in chosen.items()
        }

        timings: Interleaved = interleave(
            {name: _per_spawn(f, cmd, sizes[name], conc) for name, f in chosen.items()},
            rounds,
            log=log,
        )
        result_groups[key] = {
            "program": program,
            "concurrency": conc,
            "command": cmd,
            "n_per_sample": sizes,
            "per_spawn_median_s": {c: timings.median(c) for c in chosen},
            "per_spawn_spread_s": {c: timings.spread(c) for c in chosen},
            "ratio_to_asyncio": {c: timings.paired_ratio(c, REFERENCE) for c in chosen},
            "ratio_to_asyncio_spread": {
                c: spread(timings.paired_ratios(c, REFERENCE)) for c in chosen
            },
            "ratio_to_subprocess_run": (
                {c: timings.paired_ratio(c, "subprocess.run") for c in chosen}
                if "subprocess.run" in chosen
                else {}
            ),
            "timings": timings.as_dict(),
        }
    dry = dry_run_100(max(rounds, 5))
    return {
        "min_sample_s": min_sample,
        "rounds": rounds,
        "groups": result_groups,
        "dry_run_100_s": dry,
    }


def report(result: dict[str, Any]) -> str:
    groups = result["groups"]
    keys = list(groups)
    cases = list(next(iter(groups.values()))["per_spawn_median_s"])
    headers = ["case"] + [f"{k}: per spawn (vs asyncio)" for k in keys]
    rows = []
    spreads = []
    for case in cases:
        rows.append(
            [case]
            + [
                f"{fmt_seconds(groups[k]['per_spawn_median_s'][case])} "
                f"({groups[k]['ratio_to_asyncio'][case]:.2f}x)"
                for k in keys
            ]
        )
        spreads.append(
            [case]
            + [
                "{:.2f}-{:.2f}x".format(*groups[k]["ratio_to_asyncio_spread"][case][::2])
                + f" [{fmt_seconds(groups[k]['per_spawn_spread_s'][case][0])}"
                f"..{fmt_seconds(groups[k]['per_spawn_spread_s'][case][2])}]"
                for k in keys
            ]
        )
    dry = sorted(result["dry_run_100_s"])
    return (
        f"Spawn: median of {result['rounds']} interleaved rounds, each sample >= "
        f"{result['min_sample_s']:g} s (N calibrated per case, warm-up first); "
        "ratio = median of per-round (case / raw asyncio) per spawn\n"
        + table(headers, rows)
        + "\nSpread over the rounds: ratio min-max [per spawn min..max]\n"
        + table(["case", *keys], spreads)
        + f"\nDRY_RUN: 100 run() calls take {fmt_seconds(dry[len(dry) // 2])} (median)"
    )


def targets(result: dict[str, Any]) -> list[Target]:
    groups = result["groups"]
    out = []

    def check(name: str, case: str, base: str, limit: float, program: str | None = None) -> None:
        ratios = {}
        for key, g in groups.items():
            if program is not None and g["program"] != program:
                continue
            table_ = g["ratio_to_asyncio"] if base == REFERENCE else g["ratio_to_subprocess_run"]
            if case in table_ and base in table_:
                ratios[key] = table_[case]
        if not ratios:
            out.append(Target(name, None, "not measured"))
            return
        detail = ", ".join(f"{k}: {v:.2f}x" for k, v in ratios.items())
        out.append(Target(name, all(v <= limit for v in ratios.values()), detail))

    check(
        f"ASYNC run('/bin/true') <= {ASYNC_TRUE_LIMIT:.2f}x raw asyncio at every concurrency",
        "ASYNC run()",
        REFERENCE,
        ASYNC_TRUE_LIMIT,
        program="true",
    )
    # The same run path without the containment of daemons (informative, not a target): the
    # part of the ratio that is the run path's own, and the part that is containment's.
    off = {
        key: g["ratio_to_asyncio"][CONTAINMENT_OFF]
        for key, g in groups.items()
        if g["program"] == "true" and CONTAINMENT_OFF in g["ratio_to_asyncio"]
    }
    if off and out and out[-1].passed is not None:
        detail = ", ".join(f"{k}: {v:.2f}x" for k, v in off.items())
        out[-1] = Target(
            out[-1].name, out[-1].passed, f"{out[-1].detail} (containment off: {detail})"
        )
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


def _groups(text: str) -> tuple[tuple[str, int], ...]:
    """``true:1,true:8,python:1`` -> (("true", 1), ("true", 8), ("python", 1))."""
    out = []
    for item in text.split(","):
        program, _, conc = item.strip().partition(":")
        out.append((program, int(conc or 1)))
    return tuple(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-sample", type=float, default=0.5, help="seconds per sample")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument(
        "--groups",
        type=_groups,
        default=GROUPS,
        help="program:concurrency list, default " + ",".join(f"{p}:{c}" for p, c in GROUPS),
    )
    args = parser.parse_args()
    result = run(args.min_sample, args.rounds, args.groups, log=lambda s: print(s, file=sys.stderr))
    print(report(result))
    for t in targets(result):
        print(t.line())
    print(f"wrote {write_json('spawn', result)}")


if __name__ == "__main__":
    main()
