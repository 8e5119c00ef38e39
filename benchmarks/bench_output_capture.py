"""Cost of OutputCapture appends and fan-out (issue 14: append_line with no subscriber
<= 0.3 us/line; issue 11 C9: appending is O(1) per line whatever the number of subscribers).

Cases, interleaved round by round (see _common.interleave), each reported in us per line:

- ``await noop()``: an empty coroutine awaited the same way, the floor on this machine;
- ``append_line`` without subscribers, for lines without and with a trailing newline;
- ``append_lines`` in batches of 1000 lines (what ModuleRunner's pump does);
- ``append_lines`` with 1, 10 and 100 subscribers that keep up (reading chunks), per line
  appended, their reading included; the producer side per line stays flat;
- ``append_lines`` with 100 stalled subscribers (attached, never reading): the producer's own
  cost, which must not grow with the number of subscribers;
- ``append_line`` with a ``log_dir`` (the writer thread's CPU time included).

Times are CPU time of this process (``time.process_time``), so that other load on a shared
machine inflates them less than wall time; the ratio to ``await noop()`` measured in the same
round is the most portable figure.

    python benchmarks/bench_output_capture.py [--lines 200000] [--rounds 7]

Writes benchmarks/results/output_capture.json.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

from _common import Target, interleave, table, write_json

from prismq_subprocess import OutputCapture, OutputChunk

TARGET_US = 0.3
LINE = "2024-01-01 12:00:00 INFO step 12345 of the job is done"


async def _noop(run_id: str, line: str) -> None:
    return None


async def _append_each(lines: int, text: str, log_dir: str | None = None) -> float:
    capture = OutputCapture(log_dir=log_dir)
    append = capture.append_line
    start = time.process_time()
    for _ in range(lines):
        await append("r", text)
    elapsed = time.process_time() - start
    await capture.aclose()
    return elapsed


async def _noop_each(lines: int) -> float:
    start = time.process_time()
    for _ in range(lines):
        await _noop("r", LINE)
    return time.process_time() - start


async def _append_stalled(lines: int, subscribers: int) -> float:
    capture = OutputCapture()
    capture.open_run("r")
    stalled = [capture.subscribe("r") for _ in range(subscribers)]
    batch = [LINE] * 1000
    start = time.process_time()
    for _ in range(lines // 1000):
        await capture.append_lines("r", batch)
    elapsed = time.process_time() - start
    assert all(sub.next_seq == 0 for sub in stalled)
    return elapsed


async def _append_batches(lines: int, subscribers: int) -> float:
    capture = OutputCapture()
    capture.open_run("r")
    batch = [LINE] * 1000
    received = [0] * subscribers

    async def read(index: int) -> None:
        async for chunk in capture.subscribe("r").chunks():
            if isinstance(chunk, OutputChunk):
                received[index] += len(chunk.lines)

    readers = [asyncio.create_task(read(i)) for i in range(subscribers)]
    await asyncio.sleep(0)
    start = time.process_time()
    for _ in range(lines // 1000):
        await capture.append_lines("r", batch)
    await capture.close_run("r")
    await asyncio.gather(*readers)
    elapsed = time.process_time() - start
    assert all(count == lines // 1000 * 1000 for count in received), received
    return elapsed


def run(lines: int = 200_000, rounds: int = 7) -> dict[str, Any]:
    log_dir = tempfile.mkdtemp(prefix="bench-output-")

    def timed(make: Callable[[], Any]) -> Callable[[], float]:
        return lambda: asyncio.run(make()) / lines * 1e6  # us per line

    cases: dict[str, Callable[[], float]] = {
        "await noop()": timed(lambda: _noop_each(lines)),
        "append_line": timed(lambda: _append_each(lines, LINE)),
        "append_line (with \\n)": timed(lambda: _append_each(lines, LINE + "\n")),
        "append_lines x1000": timed(lambda: _append_batches(lines, 0)),
        "append_lines, 1 subscriber": timed(lambda: _append_batches(lines, 1)),
        "append_lines, 10 subscribers": timed(lambda: _append_batches(lines, 10)),
        "append_lines, 100 subscribers": timed(lambda: _append_batches(lines, 100)),
        "append_lines, 100 stalled": timed(lambda: _append_stalled(lines, 100)),
        "append_line, log_dir": timed(lambda: _append_each(lines, LINE, log_dir)),
    }
    measured = interleave(cases, rounds, warmup=True)  # every case once, untimed, first
    return {
        "lines": lines,
        "rounds": rounds,
        "us_per_line": {
            case: {
                "median": statistics.median(v),
                "min": min(v),
                "x_noop": measured.paired_ratio(case, "await noop()"),
            }
            for case, v in measured.samples.items()
        },
    }


def targets(result: dict[str, Any]) -> list[Target]:
    per_line = result["us_per_line"]
    value = per_line["append_line"]["median"]
    return [
        Target(
            f"append_line without subscribers <= {TARGET_US} us/line",
            value <= TARGET_US,
            f"{value:.3f} us/line (an awaited no-op coroutine: "
            f"{per_line['await noop()']['median']:.3f} us)",
        )
    ]


def report(result: dict[str, Any]) -> str:
    rows = [
        (case, f"{v['median']:.3f}", f"{v['min']:.3f}", f"{v['x_noop']:.1f}")
        for case, v in result["us_per_line"].items()
    ]
    lines = [table(["case", "median us/line", "min us/line", "x await noop()"], rows)]
    lines += [target.line() for target in targets(result)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    result = run(args.lines, args.rounds)
    print(report(result))
    print(f"wrote {write_json('output_capture', result)}")


if __name__ == "__main__":
    main()
