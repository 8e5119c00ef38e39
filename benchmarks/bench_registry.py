"""SQLiteRunRegistry: runs recorded per second by 1 and by 8 concurrent writers.

One recorded run = ``add_run`` (PENDING), ``mark_running`` + ``update_run``, ``mark_completed``
+ ``update_run``: the three writes the task manager makes per run. W writer tasks do this in a
loop on one registry (a fresh WAL file per sample, in a temporary directory).

Reference (the floor for this design): bare ``sqlite3`` on one worker thread reached through
``run_in_executor``, same pragmas (WAL, ``synchronous=NORMAL``), the same three statements each
in its own transaction, on a small table of our own. Yardstick: the same statements called
directly from the loop thread (no hop; blocks the loop), i.e. what SQLite itself allows here.
Each sample's run count is calibrated to >= 0.5 s (calibration = warm-up); cases run
interleaved, 7 rounds in a full run.

    python benchmarks/bench_registry.py [--min-sample 0.5] [--rounds 7] [--writers 1,8]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import itertools
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Target, calibrate, interleave, table, write_json

import prismq_subprocess as pq

#: Target of the performance issue, with 8 concurrent writers.
RUNS_PER_SECOND_TARGET = 10_000
TARGET_WRITERS = 8


def _split(total: int, writers: int) -> list[int]:
    share, extra = divmod(total, writers)
    return [share + (1 if i < extra else 0) for i in range(writers)]


async def _registry_sample(path: Path, runs: int, writers: int) -> float:
    async with pq.SQLiteRunRegistry(path) as registry:
        await registry.count_runs()  # open, migrate and recover outside the timed part

        async def writer(count: int) -> None:
            for _ in range(count):
                run = pq.Run(module_id="bench")
                await registry.add_run(run)
                run.mark_running(pid=os.getpid())
                await registry.update_run(run)
                run.mark_completed(0)
                await registry.update_run(run)

        started = time.perf_counter()
        await asyncio.gather(*(writer(n) for n in _split(runs, writers)))
        elapsed = time.perf_counter() - started
        stored = await registry.count_runs(status=pq.RunStatus.COMPLETED)
    if stored != runs:
        raise AssertionError(f"expected {runs} completed runs, the registry has {stored}")
    return elapsed


_SCHEMA = """CREATE TABLE IF NOT EXISTS bench_runs (
    id TEXT PRIMARY KEY, status TEXT NOT NULL, created REAL, started REAL, finished REAL,
    exit_code INTEGER)"""


def _floor_db(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(_SCHEMA)
    return conn


def _in_transaction(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.execute(sql, params)
    conn.execute("COMMIT")


async def _floor_sample(path: Path, runs: int, writers: int) -> float:
    loop = asyncio.get_running_loop()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        conn = await loop.run_in_executor(pool, _floor_db, path)

        async def write(sql: str, *params: Any) -> None:
            await loop.run_in_executor(pool, _in_transaction, conn, sql, params)

        async def writer(count: int) -> None:
            for _ in range(count):
                run_id = uuid.uuid4().hex
                await write(
                    "INSERT INTO bench_runs (id, status, created) VALUES (?, 'PENDING', ?)",
                    run_id,
                    time.time(),
                )
                await write(
                    "UPDATE bench_runs SET status = 'RUNNING', started = ? WHERE id = ?",
                    time.time(),
                    run_id,
                )
                await write(
                    "UPDATE bench_runs SET status = 'COMPLETED', finished = ?, exit_code = 0 "
                    "WHERE id = ?",
                    time.time(),
                    run_id,
                )

        started = time.perf_counter()
        await asyncio.gather(*(writer(n) for n in _split(runs, writers)))
        elapsed = time.perf_counter() - started
        await loop.run_in_executor(pool, conn.close)
    return elapsed


async def _direct_sample(path: Path, runs: int, writers: int) -> float:
    """The same statements straight from the caller's thread: SQLite's own speed, no hop.
    (It blocks the event loop, so it is a yardstick, not a design; ``writers`` is ignored.)"""
    conn = _floor_db(path)
    try:
        started = time.perf_counter()
        for _ in range(runs):
            run_id = uuid.uuid4().hex
            _in_transaction(
                conn,
                "INSERT INTO bench_runs (id, status, created) VALUES (?, 'PENDING', ?)",
                (run_id, time.time()),
            )
            _in_transaction(
                conn,
                "UPDATE bench_runs SET status = 'RUNNING', started = ? WHERE id = ?",
                (time.time(), run_id),
            )
            _in_transaction(
                conn,
                "UPDATE bench_runs SET status = 'COMPLETED', finished = ?, exit_code = 0 "
                "WHERE id = ?",
                (time.time(), run_id),
            )
        return time.perf_counter() - started
    finally:
        conn.close()


Sample = Callable[[Path, int, int], Any]
DIRECT = "sqlite3 direct, no thread hop (yardstick)"


def run(
    min_sample: float = 0.5,
    rounds: int = 7,
    writers: Sequence[int] = (1, TARGET_WRITERS),
    runs: int = 200,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``runs``: smallest sample; grown per case until a sample lasts ``min_sample`` s."""
    kinds: dict[str, Sample] = {
        "SQLiteRunRegistry": _registry_sample,
        "sqlite3 executor (floor)": _floor_sample,
    }
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        files: Iterator[int] = itertools.count()

        def sized(kind: Sample, count: int) -> Callable[[int], float]:
            def sample(n: int) -> float:
                path = Path(tmp) / f"runs-{next(files)}.db"
                try:
                    seconds: float = asyncio.run(kind(path, n, count))
                finally:
                    for suffix in ("", "-wal", "-shm"):
                        Path(f"{path}{suffix}").unlink(missing_ok=True)
                return seconds

            return sample

        cases = {
            f"{name}, {count} writer{'s' if count > 1 else ''}": (sized(kind, count), count)
            for count in writers
            for name, kind in kinds.items()
        }
        cases[DIRECT] = (sized(_direct_sample, 1), 1)
        if log:
            log(f"registry: {len(cases)} cases, {rounds} rounds, >= {min_sample:g} s/sample")
        sizes = {
            name: calibrate(sample, min_sample, runs, log=log)
            for name, (sample, _) in cases.items()
        }

        def per_run(name: str) -> Callable[[], float]:
            sample, size = cases[name][0], sizes[name]
            return lambda: sample(size) / size

        t = interleave({name: per_run(name) for name in cases}, rounds, log=log)
    # The registry's runs/s over a reference's, paired per round (the suite's rule), not a
    # ratio of two medians: time per run of the reference / time per run of the registry.
    paired: dict[str, dict[str, float]] = {}
    for name in cases:
        if not name.startswith("SQLiteRunRegistry, "):
            continue
        refs = {"floor": name.replace("SQLiteRunRegistry", "sqlite3 executor (floor)")}
        refs["direct"] = DIRECT
        paired[name] = {key: t.paired_ratio(ref, name) for key, ref in refs.items() if ref in cases}
    return {
        "min_sample_s": min_sample,
        "rounds": rounds,
        "cases": {
            name: {
                "writers": count,
                "runs_per_sample": sizes[name],
                "runs_per_second": 1 / t.median(name),
                "runs_per_second_spread": [1 / x for x in t.spread(name)[::-1]],
            }
            for name, (_, count) in cases.items()
        },
        "paired_ratios": paired,
        "timings": t.as_dict(),
    }


def report(result: dict[str, Any]) -> str:
    rows = [
        [
            name,
            f"{c['runs_per_second']:,.0f}",
            " / ".join(f"{x:,.0f}" for x in c["runs_per_second_spread"]),
            f"{c['runs_per_sample']:,}",
        ]
        for name, c in result["cases"].items()
    ]
    ratios = []
    for name, refs in result["paired_ratios"].items():
        parts = [
            f"{ratio:.2f}x {'the floor' if key == 'floor' else key}" for key, ratio in refs.items()
        ]
        if parts:
            ratios.append(f"{name}: {', '.join(parts)} (runs/s, paired per round)")
    return (
        "Registry: runs recorded per second (add PENDING + RUNNING + COMPLETED), median of "
        f"{result['rounds']} interleaved rounds, each sample >= {result['min_sample_s']:g} s "
        "(warm-up first), fresh WAL file per sample\n"
        + table(["case", "runs/s", "min / median / max", "runs per sample"], rows)
        + "".join(f"\n{line}" for line in ratios)
    )


def targets(result: dict[str, Any]) -> list[Target]:
    name = f"SQLiteRunRegistry, {TARGET_WRITERS} writers"
    target = f"SQLiteRunRegistry >= {RUNS_PER_SECOND_TARGET:,} runs/s with {TARGET_WRITERS} writers"
    case = result["cases"].get(name)
    if case is None:
        return [Target(target, None, "not measured")]
    floor = result["cases"].get(f"sqlite3 executor (floor), {TARGET_WRITERS} writers")
    detail = f"{case['runs_per_second']:,.0f} runs/s"
    if floor is not None:
        detail += f" (bare sqlite3 via executor {floor['runs_per_second']:,.0f}"
        direct = result["cases"].get(DIRECT)
        if direct is not None:
            detail += f", direct {direct['runs_per_second']:,.0f}"
        detail += ")"
    return [Target(target, case["runs_per_second"] >= RUNS_PER_SECOND_TARGET, detail)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-sample", type=float, default=0.5, help="seconds per sample")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--writers", default=f"1,{TARGET_WRITERS}")
    args = parser.parse_args()
    result = run(
        args.min_sample,
        args.rounds,
        [int(x) for x in args.writers.split(",")],
        log=lambda s: print(s, file=sys.stderr),
    )
    print(report(result))
    for t in targets(result):
        print(t.line())
    print(f"wrote {write_json('registry', result)}")


if __name__ == "__main__":
    main()
