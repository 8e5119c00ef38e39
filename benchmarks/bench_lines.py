"""Line streaming: a child prints short lines (14 bytes each); consumers handle them one by one.

Consumers, interleaved round by round (each sample = spawn + read every line + wait):

- raw asyncio ``await readline()`` and ``async for line in stream``;
- ours: ``readline()`` / ``async for`` on ASYNC and THREADED streams, ``iter_lines`` in bytes
  and in text mode (``encoding="utf-8"``), and a batch line API when the package has one
  (:data:`BATCH_API_NAMES`; "n/a" otherwise), bytes and text;
- the peers' fastest idiomatic paths: raw asyncio ``read(64 KiB)`` + split, anyio
  ``async for chunk in proc.stdout`` + split (bytes) and ``TextReceiveStream`` + split (text),
  trio ``receive_some()`` + split; anyio's ``receive_until`` is left out: it is several times
  slower than these;
- synchronous ``for line in Popen.stdout``, bytes (64 KiB buffer, the async readers' read size)
  and text: the ceiling, no event loop at all;
- ``read(256k)`` + count newlines: the I/O cost alone, no line objects.

Against the peers, like is compared with like: their paths give the consumer a chunk's lines to
loop over synchronously, which is what our batch API does; the per-line ``iter_lines`` adds an
async-iteration step per line, so its ratios to the peers are shown but are not a target.

Every consumer hands each line to Python code (``count += 1``). The number of lines per sample
is calibrated per consumer so a sample lasts >= 0.5 s (the calibration runs are the warm-up);
consumers are compared per line, paired round by round; min / median / max are printed.

    python benchmarks/bench_lines.py [--min-sample 0.5] [--rounds 7]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import PYTHON, Target, calibrate, interleave, spread, table, write_json

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


async def _iter_text(stream: Any) -> int:
    count = 0
    async for _ in pq.iter_lines(stream, encoding="utf-8"):
        count += 1
    return count


#: Names a batch line API (``stream -> async iterator of lists of lines``) may have; the batch
#: case and its target are "n/a" while the package has none of them.
BATCH_API_NAMES = ("iter_line_batches", "iter_lines_batched")


def batch_api() -> Callable[[Any], AsyncIterator[list[bytes]]] | None:
    for name in BATCH_API_NAMES:
        found = getattr(pq, name, None)
        if callable(found):
            return found  # type: ignore[no-any-return]
    return None


async def _batches(stream: Any) -> int:
    api = batch_api()
    assert api is not None
    count = 0
    async for batch in api(stream):
        for _ in batch:
            count += 1
    return count


async def _batches_text(stream: Any) -> int:
    api = batch_api()
    assert api is not None
    count = 0
    async for batch in api(stream, encoding="utf-8"):  # type: ignore[call-arg]
        for _ in batch:
            count += 1
    return count


def asyncio_bytes_split(lines: int) -> tuple[float, int]:
    """Raw asyncio's fastest line path: ``read(64 KiB)`` and split each chunk."""

    async def main() -> tuple[float, int]:
        started = time.perf_counter()
        count = 0
        proc = await asyncio.create_subprocess_exec(*writer_cmd(lines), stdout=PIPE)
        assert proc.stdout is not None
        tail = b""
        read = proc.stdout.read
        while chunk := await read(PIPE_CHUNK):
            parts = (tail + chunk).split(b"\n")
            tail = parts.pop()
            for _ in parts:
                count += 1
        if tail:
            count += 1
        await proc.wait()
        return time.perf_counter() - started, count

    return asyncio.run(main())


def anyio_bytes_split(lines: int) -> tuple[float, int]:
    import anyio

    async def main() -> tuple[float, int]:
        started = time.perf_counter()
        count = 0
        async with await anyio.open_process(writer_cmd(lines), stderr=None) as proc:
            assert proc.stdout is not None
            tail = b""
            async for chunk in proc.stdout:
                parts = (tail + chunk).split(b"\n")
                tail = parts.pop()
                for _ in parts:
                    count += 1
            if tail:
                count += 1
            await proc.wait()
        return time.perf_counter() - started, count

    return anyio.run(main, backend="asyncio")


def anyio_text_split(lines: int) -> tuple[float, int]:
    import anyio
    from anyio.streams.text import TextReceiveStream

    async def main() -> tuple[float, int]:
        started = time.perf_counter()
        count = 0
        async with await anyio.open_process(writer_cmd(lines), stderr=None) as proc:
            assert proc.stdout is not None
            tail = ""
            async for text in TextReceiveStream(proc.stdout, encoding="utf-8"):
                parts = (tail + text).split("\n")
                tail = parts.pop()
                for _ in parts:
                    count += 1
            if tail:
                count += 1
            await proc.wait()
        return time.perf_counter() - started, count

    return anyio.run(main, backend="asyncio")


def trio_bytes_split(lines: int) -> tuple[float, int]:
    import trio

    async def main() -> tuple[float, int]:
        started = time.perf_counter()
        count = 0
        proc = await trio.lowlevel.open_process(writer_cmd(lines), stdout=PIPE)
        assert proc.stdout is not None
        try:
            tail = b""
            receive_some = proc.stdout.receive_some
            while chunk := await receive_some():
                parts = (tail + chunk).split(b"\n")
                tail = parts.pop()
                for _ in parts:
                    count += 1
            if tail:
                count += 1
        finally:
            await proc.wait()
            await proc.stdout.aclose()
        return time.perf_counter() - started, count

    return trio.run(main)


#: Read size of the peers' chunk paths (anyio's and trio's default, a Linux pipe's capacity).
PIPE_CHUNK = 64 * 1024


def popen_sync(lines: int) -> tuple[float, int]:
    started = time.perf_counter()
    count = 0
    # The ceiling reads as much per call as the async readers do: with Popen's default 8 KiB
    # buffer it made 8 reads per pipe-full and was about 10% slower (CPU and wall, paired).
    with subprocess.Popen(writer_cmd(lines), stdout=PIPE, bufsize=PIPE_CHUNK) as proc:
        assert proc.stdout is not None
        for _ in proc.stdout:
            count += 1
    return time.perf_counter() - started, count


def popen_sync_text(lines: int) -> tuple[float, int]:
    started = time.perf_counter()
    count = 0
    with subprocess.Popen(writer_cmd(lines), stdout=PIPE, encoding="utf-8") as proc:
        assert proc.stdout is not None
        for _ in proc.stdout:
            count += 1
    return time.perf_counter() - started, count


CEILING = "Popen.stdout sync (ceiling)"
TEXT_CEILING = "Popen.stdout sync text (ceiling)"
BATCH = "ASYNC batch API"
BATCH_THREADED = "THREADED batch API"
BATCH_TEXT = "ASYNC batch API text"
BATCH_THREADED_TEXT = "THREADED batch API text"
PEERS = (
    "asyncio read(64k)+split",
    "anyio chunks+split",
    "anyio TextReceiveStream+split",
    "trio receive_some+split",
)

CONSUMERS: dict[str, Consumer] = {
    "asyncio readline()": raw_asyncio(_readline_loop),
    "asyncio async for": raw_asyncio(_async_for),
    "ASYNC readline()": ours(pq.RunMode.ASYNC, _readline_loop),
    "ASYNC iter_lines": ours(pq.RunMode.ASYNC, _iter_lines),
    "ASYNC iter_lines text": ours(pq.RunMode.ASYNC, _iter_text),
    "THREADED readline()": ours(pq.RunMode.THREADED, _readline_loop),
    "THREADED async for": ours(pq.RunMode.THREADED, _async_for),
    "THREADED iter_lines": ours(pq.RunMode.THREADED, _iter_lines),
    "THREADED iter_lines text": ours(pq.RunMode.THREADED, _iter_text),
    "ASYNC read(256k)+count (no lines)": ours(pq.RunMode.ASYNC, _chunks),
    PEERS[0]: asyncio_bytes_split,
    PEERS[1]: anyio_bytes_split,
    PEERS[2]: anyio_text_split,
    PEERS[3]: trio_bytes_split,
    CEILING: popen_sync,
    TEXT_CEILING: popen_sync_text,
}
if batch_api() is not None:
    CONSUMERS[BATCH] = ours(pq.RunMode.ASYNC, _batches)
    CONSUMERS[BATCH_THREADED] = ours(pq.RunMode.THREADED, _batches)
    CONSUMERS[BATCH_TEXT] = ours(pq.RunMode.ASYNC, _batches_text)
    CONSUMERS[BATCH_THREADED_TEXT] = ours(pq.RunMode.THREADED, _batches_text)

#: Thresholds of the performance issue.
BATCH_VS_CEILING = 0.9
BATCH_VS_CEILING_THREADED = 0.8
PER_LINE_VS_CEILING = 0.6
TEXT_OVER_BYTES = 1.3
#: Our fastest line path against the peers' fastest, like for like (lines a chunk at a time,
#: a synchronous loop over each chunk's lines): at least as fast.
VS_PEERS = 1.0


def run(
    min_sample: float = 0.5,
    rounds: int = 7,
    lines: int = 200_000,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``lines`` is the smallest sample; each consumer's size grows until a sample lasts
    ``min_sample`` seconds."""
    if log:
        log(f"lines: {len(CONSUMERS)} consumers, {rounds} rounds, >= {min_sample:g} s/sample")

    def checked(consumer: Consumer) -> Callable[[int], float]:
        def sample(size: int) -> float:
            seconds, count = consumer(size)
            if count != size:
                raise AssertionError(f"counted {count} lines, expected {size}")
            return seconds

        return sample

    sizes = {
        name: calibrate(checked(c), min_sample, lines, log=log) for name, c in CONSUMERS.items()
    }

    def per_line(name: str) -> Callable[[], float]:
        sample, size = checked(CONSUMERS[name]), sizes[name]
        return lambda: sample(size) / size

    t = interleave({name: per_line(name) for name in CONSUMERS}, rounds, log=log)

    def faster(fast: str, slow: str) -> float:
        """How many times faster ``fast`` is than ``slow`` (paired per round)."""
        return t.paired_ratio(slow, fast)

    def faster_spread(fast: str, slow: str) -> tuple[float, float, float]:
        return spread(t.paired_ratios(slow, fast))

    comparisons: dict[str, tuple[str, str]] = {
        "ASYNC iter_lines / ASYNC readline()": ("ASYNC iter_lines", "ASYNC readline()"),
        "THREADED iter_lines / THREADED readline()": ("THREADED iter_lines", "THREADED readline()"),
        "ASYNC iter_lines / sync ceiling": ("ASYNC iter_lines", CEILING),
        "THREADED iter_lines / sync ceiling": ("THREADED iter_lines", CEILING),
        "ASYNC iter_lines text / sync text ceiling": ("ASYNC iter_lines text", TEXT_CEILING),
    }
    for peer in PEERS:
        text = " text" if "TextReceiveStream" in peer else ""
        for mode in ("ASYNC", "THREADED"):
            # Like for like first: the peers' paths hand the consumer a chunk's lines to loop
            # over synchronously, as the batch API does. The per-line iterator pays an
            # async-iteration step per line on top (shown, not a target: see the ceiling).
            batch = f"{mode} batch API{text}"
            if batch in CONSUMERS:
                comparisons[f"{batch} / {peer}"] = (batch, peer)
            ours_ = f"{mode} iter_lines{text}"
            comparisons[f"{ours_} / {peer}"] = (ours_, peer)
    if BATCH in CONSUMERS:
        comparisons[f"{BATCH} / sync ceiling"] = (BATCH, CEILING)
        comparisons[f"{BATCH_THREADED} / sync ceiling"] = (BATCH_THREADED, CEILING)
    return {
        "min_sample_s": min_sample,
        "line_bytes": LINE_BYTES,
        "rounds": rounds,
        "batch_api": BATCH in CONSUMERS,
        "lines_per_sample": sizes,
        "lines_per_second": {k: 1 / t.median(k) for k in CONSUMERS},
        "lines_per_second_spread": {k: [1 / x for x in t.spread(k)[::-1]] for k in CONSUMERS},
        # speedup[name]: how many times faster the first is than the second, paired per round
        "speedup": {k: faster(*pair) for k, pair in comparisons.items()},
        "speedup_spread": {k: faster_spread(*pair) for k, pair in comparisons.items()},
        # per-line time of text mode over bytes mode: the cost of decoding
        "text_over_bytes": {
            mode: t.paired_ratio(f"{mode} iter_lines text", f"{mode} iter_lines")
            for mode in ("ASYNC", "THREADED")
        },
        "vs_asyncio_readline": {k: t.paired_ratio("asyncio readline()", k) for k in CONSUMERS},
        "timings": t.as_dict(),
    }


def report(result: dict[str, Any]) -> str:
    rows = [
        [
            k,
            f"{v / 1e6:.2f} M",
            " / ".join(f"{x / 1e6:.2f}" for x in result["lines_per_second_spread"][k]),
            f"{result['vs_asyncio_readline'][k]:.2f}x",
            f"{result['lines_per_sample'][k]:,}",
        ]
        for k, v in result["lines_per_second"].items()
    ]
    speed = [
        [k, f"{v:.2f}x", "{:.2f} / {:.2f} / {:.2f}".format(*result["speedup_spread"][k])]
        for k, v in result["speedup"].items()
    ]
    text = ", ".join(f"{m} {v:.2f}x" for m, v in result["text_over_bytes"].items())
    batch = "" if result["batch_api"] else "\nBatch line API: n/a (the package has none yet)"
    return (
        f"Lines: lines of {result['line_bytes']} bytes, median of {result['rounds']} interleaved "
        f"rounds, each sample >= {result['min_sample_s']:g} s (spawn to exit, warm-up first)\n"
        + table(
            ["consumer", "lines/s", "min / median / max (M)", "vs asyncio readline()", "lines"],
            rows,
        )
        + "\n"
        + table(["speed-up (paired)", "ratio", "min / median / max"], speed)
        + f"\nText mode per line over bytes mode (iter_lines): {text}"
        + batch
    )


def targets(result: dict[str, Any]) -> list[Target]:
    s = result["speedup"]
    out: list[Target] = []
    for name, threshold in ((BATCH, BATCH_VS_CEILING), (BATCH_THREADED, BATCH_VS_CEILING_THREADED)):
        key = f"{name} / sync ceiling"
        title = f"{name} >= {threshold}x sync ceiling"
        if key in s:
            out.append(Target(title, s[key] >= threshold, f"{s[key]:.2f}x"))
        else:
            out.append(Target(title, None, "n/a: no batch API"))
    a, th = s["ASYNC iter_lines / sync ceiling"], s["THREADED iter_lines / sync ceiling"]
    out.append(
        Target(
            f"per-line iter_lines >= {PER_LINE_VS_CEILING}x sync ceiling",
            a >= PER_LINE_VS_CEILING and th >= PER_LINE_VS_CEILING,
            f"ASYNC {a:.2f}x, THREADED {th:.2f}x",
        )
    )
    tb = result["text_over_bytes"]
    out.append(
        Target(
            f"text mode within {TEXT_OVER_BYTES}x of bytes (iter_lines, per line)",
            all(v <= TEXT_OVER_BYTES for v in tb.values()),
            ", ".join(f"{m} {v:.2f}x" for m, v in tb.items()),
        )
    )
    a = s["ASYNC iter_lines / ASYNC readline()"]
    th = s["THREADED iter_lines / THREADED readline()"]
    out.append(Target("iter_lines >= 5x readline() in ASYNC", a >= 5, f"{a:.2f}x"))
    out.append(Target("iter_lines >= 4x readline() in THREADED", th >= 4, f"{th:.2f}x"))
    peers = {
        k: v for k, v in s.items() if " batch API" in k and any(k.endswith(f"/ {p}") for p in PEERS)
    }
    title = (
        f"batch API >= {VS_PEERS:g}x the peers' fastest line paths (asyncio, anyio, trio), "
        "like for like"
    )
    if peers:
        worst = min(peers, key=peers.__getitem__)
        out.append(
            Target(
                title,
                all(v >= VS_PEERS for v in peers.values()),
                f"worst: {worst} {peers[worst]:.2f}x",
            )
        )
    else:
        out.append(Target(title, None, "n/a: no batch API"))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-sample", type=float, default=0.5, help="seconds per sample")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    result = run(args.min_sample, args.rounds, log=lambda s: print(s, file=sys.stderr))
    print(report(result))
    for t in targets(result):
        print(t.line())
    print(f"wrote {write_json('lines', result)}")


if __name__ == "__main__":
    main()
