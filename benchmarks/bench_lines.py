"""Line streaming: a child prints N short lines (14 bytes each); consumers count them one by one.

Consumers, interleaved round by round (each sample = spawn + read every line + wait):
``await readline()`` loops and ``async for line in stream`` on raw asyncio and on our ASYNC and
THREADED streams, our ``iter_lines`` in ASYNC and THREADED, anyio's
``BufferedByteReceiveStream.receive_until(b"\\n")`` on ``anyio.open_process`` (anyio's documented
way to read delimited records; ``TextReceiveStream`` yields chunks, not lines), and synchronous
iteration over ``Popen.stdout`` (the ceiling: no event loop at all). ``read(256k)+count`` reads
big chunks and counts newlines without producing line objects: the I/O cost alone.

    python benchmarks/bench_lines.py [--lines 2000000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import PYTHON, Target, interleave, table, write_json

import prismq_subprocess as pq

PIPE = subprocess.PIPE
LINE_BYTES = 14  # b"line 00000000\n"

_WRITER = r"""
import sys
n = int(sys.argv[1])
w = sys.stdout.buffer.write
block = b"".join(b"line %08d\n" % i for i in range(10000))
full, rest = divmod(n, 10000)
for _ in range(full):
    w(block)
w(block[: rest * 14])
sys.stdout.buffer.flush()
"""


def writer_cmd(lines: int) -> list[str]:
    return [PYTHON, "-c", _WRITER, str(lines)]


# Each consumer returns (seconds, lines counted).
Consumer = Callable[[int], tuple[float, int]]


async def _readline_loop(stream: Any) -> int:
    count = 0
    readline = stream.readline
    while await readline():
        count += 1
    return count


async def _async_for(stream: Any) -> int:
    count = 0
    async for _ in stream:
        count += 1
    return count


async def _chunks(stream: Any) -> int:
    count = 0
    read = stream.read
    while chunk := await read(256 * 1024):
        count += chunk.count(b"\n")
    return count


async def _iter_lines(stream: Any) -> int:
    count = 0
    async for _ in pq.iter_lines(stream):
        count += 1
    return count


def raw_asyncio(read: Callable[[Any], Any]) -> Consumer:
    def consume(lines: int) -> tuple[float, int]:
        async def main() -> tuple[float, int]:
            started = time.perf_counter()
            proc = await asyncio.create_subprocess_exec(*writer_cmd(lines), stdout=PIPE)
            count = await read(proc.stdout)
            await proc.wait()
            return time.perf_counter() - started, count

        return asyncio.run(main())

    return consume


def ours(mode: pq.RunMode, read: Callable[[Any], Any]) -> Consumer:
    def consume(lines: int) -> tuple[float, int]:
        async def main() -> tuple[float, int]:
            async with pq.SubprocessWrapper(mode) as w:
                started = time.perf_counter()
                proc = await w.create_subprocess_exec(*writer_cmd(lines), stdout=PIPE)
                count = await read(proc.stdout)
                await proc.wait()
                return time.perf_counter() - started, count

        return asyncio.run(main())

    return consume


def anyio_receive_until(lines: int) -> tuple[float, int]:
    import anyio
    from anyio.streams.buffered import BufferedByteReceiveStream

    async def main() -> tuple[float, int]:
        started = time.perf_counter()
        count = 0
        async with await anyio.open_process(writer_cmd(lines), stderr=None) as proc:
            assert proc.stdout is not None
            buffered = BufferedByteReceiveStream(proc.stdout)
            receive_until = buffered.receive_until
            try:
                while True:
                    await receive_until(b"\n", 65536)
                    count += 1
            except anyio.IncompleteRead:
                pass
            await proc.wait()
        return time.perf_counter() - started, count

    return anyio.run(main, backend="asyncio")


def popen_sync(lines: int) -> tuple[float, int]:
    started = time.perf_counter()
    count = 0
    with subprocess.Popen(writer_cmd(lines), stdout=PIPE) as proc:
        assert proc.stdout is not None
        for _ in proc.stdout:
            count += 1
    return time.perf_counter() - started, count


CONSUMERS: dict[str, Consumer] = {
    "asyncio readline()": raw_asyncio(_readline_loop),
    "asyncio async for": raw_asyncio(_async_for),
    "ASYNC readline()": ours(pq.RunMode.ASYNC, _readline_loop),
    "ASYNC iter_lines": ours(pq.RunMode.ASYNC, _iter_lines),
    "THREADED readline()": ours(pq.RunMode.THREADED, _readline_loop),
    "THREADED async for": ours(pq.RunMode.THREADED, _async_for),
    "THREADED iter_lines": ours(pq.RunMode.THREADED, _iter_lines),
    "ASYNC read(256k)+count (no lines)": ours(pq.RunMode.ASYNC, _chunks),
    "anyio receive_until": anyio_receive_until,
    "Popen.stdout sync (ceiling)": popen_sync,
}


def run(
    lines: int = 2_000_000, rounds: int = 3, log: Callable[[str], None] | None = None
) -> dict[str, Any]:
    if log:
        log(f"lines: {lines} lines, {rounds} rounds, {len(CONSUMERS)} consumers")

    def timed(consumer: Consumer) -> Callable[[], float]:
        def sample() -> float:
            seconds, count = consumer(lines)
            if count != lines:
                raise AssertionError(f"counted {count} lines, expected {lines}")
            return seconds

        return sample

    timings = interleave({k: timed(v) for k, v in CONSUMERS.items()}, rounds, log=log)
    return {
        "lines": lines,
        "line_bytes": LINE_BYTES,
        "rounds": rounds,
        "lines_per_second": {k: lines / timings.median(k) for k in CONSUMERS},
        # speedup[a][b]: how many times faster a is than b, median of per-round pairs
        "speedup": {
            "ASYNC iter_lines / ASYNC readline()": timings.paired_ratio(
                "ASYNC readline()", "ASYNC iter_lines"
            ),
            "THREADED iter_lines / THREADED readline()": timings.paired_ratio(
                "THREADED readline()", "THREADED iter_lines"
            ),
            "ASYNC iter_lines / anyio receive_until": timings.paired_ratio(
                "anyio receive_until", "ASYNC iter_lines"
            ),
            "THREADED iter_lines / anyio receive_until": timings.paired_ratio(
                "anyio receive_until", "THREADED iter_lines"
            ),
            "ASYNC iter_lines / Popen.stdout sync": timings.paired_ratio(
                "Popen.stdout sync (ceiling)", "ASYNC iter_lines"
            ),
        },
        "vs_asyncio_readline": {
            k: timings.paired_ratio("asyncio readline()", k) for k in CONSUMERS
        },
        "timings": timings.as_dict(),
    }


def report(result: dict[str, Any]) -> str:
    rows = [
        [k, f"{v / 1e6:.2f} M", f"{result['vs_asyncio_readline'][k]:.2f}x"]
        for k, v in result["lines_per_second"].items()
    ]
    speed = [[k, f"{v:.2f}x"] for k, v in result["speedup"].items()]
    return (
        f"Lines: {result['lines']} lines of {result['line_bytes']} bytes, median of "
        f"{result['rounds']} interleaved rounds (spawn to exit)\n"
        + table(["consumer", "lines/s", "vs asyncio readline()"], rows)
        + "\n"
        + table(["speed-up (paired)", "ratio"], speed)
    )


def targets(result: dict[str, Any]) -> list[Target]:
    s = result["speedup"]
    a = s["ASYNC iter_lines / ASYNC readline()"]
    t = s["THREADED iter_lines / THREADED readline()"]
    n = s["ASYNC iter_lines / anyio receive_until"]
    nt = s["THREADED iter_lines / anyio receive_until"]
    return [
        Target("iter_lines >= 5x readline() in ASYNC", a >= 5, f"{a:.2f}x"),
        Target("iter_lines >= 4x readline() in THREADED", t >= 4, f"{t:.2f}x"),
        Target(
            "iter_lines >= 2x anyio receive_until",
            n >= 2 and nt >= 2,
            f"ASYNC {n:.2f}x, THREADED {nt:.2f}x",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    result = run(args.lines, args.rounds, log=lambda s: print(s, file=sys.stderr))
    print(report(result))
    for t in targets(result):
        print(t.line())
    print(f"wrote {write_json('lines', result)}")


if __name__ == "__main__":
    main()
