"""Big output: a child writes SIZE MB to stdout and SIZE MB to stderr at the same time.

Each case runs in a fresh interpreter (so one case's peak RSS cannot hide another's), and the
cases are interleaved round by round. Measured per case: wall time from spawn to result, and peak
RSS growth = ``ru_maxrss`` after the run minus ``ru_maxrss`` just before it (after imports and
a warm-up run), i.e. how much the run itself made the process grow.

Cases: ``SubprocessWrapper.run()`` with its default output bound in ASYNC, THREADED and LOCAL;
for reference the unbounded ``asyncio ... communicate()`` and ``subprocess.run(capture_output)``,
which keep everything.

    python benchmarks/bench_big_output.py [--size-mb 200] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import PYTHON, TRUE, Target, maxrss_bytes, run_fresh, table, write_json

PIPE = subprocess.PIPE
MB = 1024 * 1024
RSS_TARGET = 64 * MB

_WRITER = r"""
import sys, threading
n = int(sys.argv[1])
block = b"x" * (1 << 20)
def pour(f):
    for _ in range(n):
        f.write(block)
    f.flush()
t = threading.Thread(target=pour, args=(sys.stderr.buffer,))
t.start()
pour(sys.stdout.buffer)
t.join()
"""

CASES = ["ASYNC run()", "THREADED run()", "LOCAL run()", "asyncio communicate", "subprocess.run"]
OURS = CASES[:3]


def writer_cmd(size_mb: int) -> list[str]:
    return [PYTHON, "-c", _WRITER, str(size_mb)]


def _measure_child(case: str, size_mb: int) -> dict[str, Any]:
    """Runs inside the fresh interpreter."""
    cmd = writer_cmd(size_mb)
    if case == "subprocess.run":
        subprocess.run([TRUE], capture_output=True, check=False)
        before = maxrss_bytes()
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, check=False)
        seconds = time.perf_counter() - started
        out_total, err_total = len(done.stdout), len(done.stderr)
        kept = out_total + err_total
        truncated = False
        del done
    elif case == "asyncio communicate":

        async def raw() -> tuple[float, int, int, int]:
            p = await asyncio.create_subprocess_exec(TRUE, stdout=PIPE, stderr=PIPE)
            await p.communicate()
            nonlocal before
            before = maxrss_bytes()
            started = time.perf_counter()
            p = await asyncio.create_subprocess_exec(*cmd, stdout=PIPE, stderr=PIPE)
            out, err = await p.communicate()
            return time.perf_counter() - started, len(out), len(err), len(out) + len(err)

        before = 0
        seconds, out_total, err_total, kept = asyncio.run(raw())
        truncated = False
    else:
        import prismq_subprocess as pq

        mode = pq.RunMode[case.split()[0]]

        async def ours() -> tuple[float, int, int, int, bool]:
            async with pq.SubprocessWrapper(mode) as w:
                await w.run(TRUE)
                nonlocal before
                before = maxrss_bytes()
                started = time.perf_counter()
                r = await w.run(*cmd)
                seconds = time.perf_counter() - started
                return (
                    seconds,
                    r.stdout_total_bytes,
                    r.stderr_total_bytes,
                    len(r.stdout) + len(r.stderr),
                    r.stdout_truncated and r.stderr_truncated,
                )

        before = 0
        seconds, out_total, err_total, kept, truncated = asyncio.run(ours())
    after = maxrss_bytes()
    expected = size_mb * MB
    if out_total != expected or err_total != expected:
        raise AssertionError(f"{case}: got {out_total}/{err_total} bytes, expected {expected}")
    return {
        "case": case,
        "seconds": seconds,
        "rss_before": before,
        "rss_peak": after,
        "rss_growth": after - before,
        "kept_bytes": kept,
        "truncated": truncated,
    }


def run(
    size_mb: int = 200,
    rounds: int = 3,
    cases: list[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    chosen = cases or CASES
    if log:
        log(f"big output: {size_mb} MB + {size_mb} MB, {rounds} rounds, fresh process per case")
    samples: dict[str, list[dict[str, Any]]] = {c: [] for c in chosen}
    for r in range(rounds):
        shift = r % len(chosen)
        for case in chosen[shift:] + chosen[:shift]:
            samples[case].append(
                run_fresh(Path(__file__), ["--child", case, "--size-mb", str(size_mb)])
            )
        if log:
            log(f"  round {r + 1}/{rounds} done")
    summary = {}
    for case, runs in samples.items():
        summary[case] = {
            "seconds_median": statistics.median(s["seconds"] for s in runs),
            "rss_growth_max": max(s["rss_growth"] for s in runs),
            "rss_growth_median": statistics.median(s["rss_growth"] for s in runs),
            "kept_bytes": runs[0]["kept_bytes"],
            "truncated": runs[0]["truncated"],
        }
    ref = "asyncio communicate" if "asyncio communicate" in samples else None
    if ref:
        for case, runs in samples.items():
            summary[case]["time_ratio_to_asyncio"] = statistics.median(
                a["seconds"] / b["seconds"] for a, b in zip(runs, samples[ref], strict=True)
            )
    return {"size_mb": size_mb, "rounds": rounds, "cases": summary, "samples": samples}


def report(result: dict[str, Any]) -> str:
    rows = []
    for case, s in result["cases"].items():
        rows.append(
            [
                case,
                f"{s['seconds_median']:.2f} s",
                f"{s.get('time_ratio_to_asyncio', float('nan')):.2f}x",
                f"{s['rss_growth_max'] / MB:.1f} MB",
                f"{s['kept_bytes'] / MB:.1f} MB",
            ]
        )
    return (
        f"Big output: {result['size_mb']} MB stdout + {result['size_mb']} MB stderr at once, "
        f"median of {result['rounds']} interleaved rounds, fresh interpreter per sample\n"
        + table(["case", "time", "vs asyncio", "peak RSS growth (max)", "kept"], rows)
    )


def targets(result: dict[str, Any]) -> list[Target]:
    cases = result["cases"]
    measured = [c for c in OURS if c in cases]
    if not measured:
        return [Target("big output: peak RSS growth < 64 MB", None, "not measured")]
    worst = max(cases[c]["rss_growth_max"] for c in measured)
    detail = ", ".join(f"{c.split()[0]} {cases[c]['rss_growth_max'] / MB:.1f} MB" for c in measured)
    return [
        Target(
            f"big output ({result['size_mb']} MB x2): peak RSS growth < 64 MB",
            worst < RSS_TARGET,
            detail,
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure_child(args.child, args.size_mb)))
        return
    result = run(args.size_mb, args.rounds, log=lambda s: print(s, file=sys.stderr))
    print(report(result))
    for t in targets(result):
        print(t.line())
    print(f"wrote {write_json('big_output', result)}")


if __name__ == "__main__":
    main()
