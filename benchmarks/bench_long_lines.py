"""Long lines: a child prints one line of S MB; ``iter_lines`` over our ASYNC and THREADED
streams (bytes and text) must take time linear in S, and keep the event loop free while the line
is put together.

Each sample is spawn + read the line + wait. Besides the time, a ticker task measures the longest
stretch the loop was held (its largest gap between two ticks) while the line was read.

    python benchmarks/bench_long_lines.py [--sizes 8,16,32,64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import PYTHON, Target, table, write_json

import prismq_subprocess as pq

_WRITER = r"""
import sys
size = int(sys.argv[1]) << 20
block = b"x" * (1 << 20)
for _ in range(size >> 20):
    sys.stdout.buffer.write(block)
sys.stdout.buffer.write(b"\n")
sys.stdout.buffer.flush()
"""

CASES: dict[str, tuple[pq.RunMode, str | None]] = {
    "ASYNC bytes": (pq.RunMode.ASYNC, None),
    "ASYNC text": (pq.RunMode.ASYNC, "utf-8"),
    "THREADED bytes": (pq.RunMode.THREADED, None),
}


def sample(mode: pq.RunMode, encoding: str | None, size_mb: int) -> tuple[float, float]:
    """(seconds, longest loop stall in seconds) for one line of ``size_mb`` MB."""

    async def main() -> tuple[float, float]:
        stall = 0.0

        async def ticker() -> None:
            nonlocal stall
            loop = asyncio.get_running_loop()
            last = loop.time()
            while True:
                await asyncio.sleep(0.001)
                now = loop.time()
                stall = max(stall, now - last)
                last = now

        async with pq.SubprocessWrapper(mode) as w:
            ticking = asyncio.ensure_future(ticker())
            started = time.perf_counter()
            proc = await w.create_subprocess_exec(
                PYTHON, "-c", _WRITER, str(size_mb), stdout=pq.PIPE
            )
            lines = [line async for line in pq.iter_lines(proc.stdout, encoding=encoding)]
            await proc.wait()
            seconds = time.perf_counter() - started
            ticking.cancel()
        if len(lines) != 1 or len(lines[0]) != (size_mb << 20) + 1:
            raise AssertionError(f"got {[len(line) for line in lines]}")
        return seconds, stall

    return asyncio.run(main())


def run(
    sizes: tuple[int, ...] = (8, 16, 32, 64),
    rounds: int = 3,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    seconds: dict[str, dict[int, list[float]]] = {case: {s: [] for s in sizes} for case in CASES}
    stalls: dict[str, dict[int, list[float]]] = {case: {s: [] for s in sizes} for case in CASES}
    for r in range(rounds):
        for size in sizes:
            for case, (mode, encoding) in CASES.items():
                if log:
                    log(f"long lines: round {r + 1}, {size} MB, {case}")
                took, stall = sample(mode, encoding, size)
                seconds[case][size].append(took)
                stalls[case][size].append(stall)
    return {
        "sizes_mb": list(sizes),
        "rounds": rounds,
        "seconds": {c: {s: statistics.median(v) for s, v in d.items()} for c, d in seconds.items()},
        "max_stall_s": {c: {s: max(v) for s, v in d.items()} for c, d in stalls.items()},
    }


def report(result: dict[str, Any]) -> str:
    sizes = result["sizes_mb"]
    rows = [
        [case, *(f"{result['seconds'][case][s]:.3f} s" for s in sizes)]
        for case in result["seconds"]
    ]
    stall_rows = [
        [case, *(f"{result['max_stall_s'][case][s] * 1000:.1f} ms" for s in sizes)]
        for case in result["max_stall_s"]
    ]
    heads = ["case", *(f"{s} MB" for s in sizes)]
    return (
        f"Long lines: one line of S MB through iter_lines, median of {result['rounds']} rounds "
        "(spawn to exit)\n"
        + table(heads, rows)
        + "\nLongest event-loop stall while reading\n"
        + table(heads, stall_rows)
    )


def targets(result: dict[str, Any]) -> list[Target]:
    sizes = result["sizes_mb"]
    small, big = sizes[0], sizes[-1]
    out = []
    for case, by_size in result["seconds"].items():
        ratio = by_size[big] / by_size[small]
        # Linear: ratio ~ big / small; quadratic: ~ (big / small) ** 2.
        bound = 1.5 * big / small
        out.append(
            Target(
                f"{case}: {big} MB line within 1.5x of linear from {small} MB",
                ratio <= bound,
                f"{ratio:.1f}x for {big / small:.0f}x the size (bound {bound:.0f}x)",
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,16,32,64")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    result = run(sizes, args.rounds, log=lambda s: print(s, file=sys.stderr))
    print(report(result))
    for t in targets(result):
        print(t.line())
    print(f"wrote {write_json('long_lines', result)}")


if __name__ == "__main__":
    main()
