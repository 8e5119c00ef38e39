"""OutputCapture: producer cost per appended line, and fan-out to 0 / 1 / 10 / 100 subscribers.

A producer appends short lines to one run (``await capture.append_line(run_id, line)``), in
slices of 256 lines with an ``await asyncio.sleep(0)`` between slices (as a producer reading a
child's pipe would yield between reads); each subscriber is a task iterating
``capture.subscribe(run_id)``. Measured per line: the producer's time inside the append calls
(what the code reading the child pays), and the end-to-end time until every subscriber has
received the run's end; plus how many lines were delivered and how many were dropped.

The producer's time inside the append calls includes the subscribers' turns when it yields to
them (it does, every half ring, while someone follows the run). The producer's *own* cost is
measured apart: its task's coroutine is wrapped so that only the time of its own steps is
counted (``_StepTimer``), never the time other tasks run while it is suspended. That is the
figure the issue's "O(1) per line whatever the number of subscribers" is about, and the fan-out
target compares it with 10 and 100 subscribers against 1. The garbage collector is off during a
timed sample (the lines are freed by reference counting): a collection started by the
subscribers' garbage would otherwise be charged to whichever task allocates when it triggers.

Reference: the same producer appending to a bare ``collections.deque`` (the floor of any
buffer). Each sample's line count is calibrated to >= 0.5 s (calibration = warm-up); the cases
run interleaved, 7 rounds in a full run.

    python benchmarks/bench_capture.py [--min-sample 0.5] [--rounds 7] [--subscribers 0,1,10,100]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import collections.abc
import gc
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import Target, calibrate, fmt_seconds, fmt_spread, spread, table, write_json

import prismq_subprocess as pq

SLICE = 256
LINE = "2026-01-01 12:00:00 INFO worker 7 processed item 123456\n"
#: Target of the performance issue: append cost with no subscriber.
APPEND_LIMIT_S = 0.3e-6
BASELINE = "deque.append (floor)"
#: Fan-out is O(1) per line per subscriber: the end-to-end cost per delivery with 10 or 100
#: subscribers may be at most this many times the cost with one. (It only catches growth worse
#: than linear: with a fixed cost per line, the cost per delivery falls as subscribers are added.)
FANOUT_PER_DELIVERY_LIMIT = 1.5
#: The producer's own cost per line (its steps only) with 10 or 100 subscribers may be at most
#: this many times its cost with one: O(1) per line whatever the number of subscribers.
FANOUT_PRODUCER_LIMIT = 1.5


class _StepTimer(collections.abc.Coroutine[Any, Any, Any]):
    """Wraps a coroutine run as a task and adds up the time of its steps only (each ``send`` or
    ``throw`` the task makes into it), not the time it spends suspended."""

    def __init__(self, coro: collections.abc.Coroutine[Any, Any, Any]) -> None:
        self._coro = coro
        self.elapsed = 0.0

    def send(self, value: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._coro.send(value)
        finally:
            self.elapsed += time.perf_counter() - started

    def throw(self, *args: Any) -> Any:
        started = time.perf_counter()
        try:
            return self._coro.throw(*args)
        finally:
            self.elapsed += time.perf_counter() - started

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Any:
        raise TypeError("run it as a task")


def _fmt_us(seconds: float) -> str:
    return f"{seconds * 1e6:.3f}"


async def _deque_sample(lines: int) -> dict[str, float]:
    buffer: collections.deque[str] = collections.deque(maxlen=1000)
    append = buffer.append
    inside = 0.0
    started = time.perf_counter()
    for first in range(0, lines, SLICE):
        t0 = time.perf_counter()
        for _ in range(min(SLICE, lines - first)):
            append(LINE.rstrip("\n"))
        inside += time.perf_counter() - t0
        await asyncio.sleep(0)
    return {"append": inside / lines, "total": (time.perf_counter() - started) / lines}


async def _capture_sample(lines: int, subscribers: int) -> dict[str, float]:
    capture = pq.OutputCapture()
    run_id = "bench"
    counts = [0] * subscribers
    gaps = [0] * subscribers

    async def follow(index: int) -> None:
        async with capture.subscribe(run_id, wait=True) as subscription:
            async for item in subscription:
                if isinstance(item, pq.OutputGap):
                    gaps[index] += item.dropped
                else:
                    counts[index] += 1

    tasks = [asyncio.create_task(follow(i)) for i in range(subscribers)]
    await asyncio.sleep(0)  # every subscriber is registered before the first line
    append = capture.append_line
    inside = 0.0

    async def produce() -> None:
        nonlocal inside
        for first in range(0, lines, SLICE):
            t0 = time.perf_counter()
            for _ in range(min(SLICE, lines - first)):
                await append(run_id, LINE)
            inside += time.perf_counter() - t0
            await asyncio.sleep(0)
        await capture.close_run(run_id)

    producer = _StepTimer(produce())
    gc.collect()
    gc.disable()
    try:
        started = time.perf_counter()
        await asyncio.get_running_loop().create_task(producer)
        await asyncio.gather(*tasks)
        total = time.perf_counter() - started
    finally:
        gc.enable()
    await capture.aclose()
    delivered = sum(counts)
    return {
        "append": inside / lines,
        "own": producer.elapsed / lines,
        "total": total / lines,
        "delivered": delivered / (lines * subscribers) if subscribers else 1.0,
        "dropped": float(sum(gaps)),
    }


def _case_name(subscribers: int) -> str:
    return f"OutputCapture, {subscribers} subscriber{'' if subscribers == 1 else 's'}"


def run(
    min_sample: float = 0.5,
    rounds: int = 7,
    subscribers: Sequence[int] = (0, 1, 10, 100),
    lines: int = 2_000,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """``lines``: smallest sample; grown per case until a sample lasts ``min_sample`` s."""
    cases: dict[str, Callable[[int], dict[str, float]]] = {
        BASELINE: lambda n: asyncio.run(_deque_sample(n))
    }
    for count in subscribers:
        cases[_case_name(count)] = _bind(count)
    if log:
        log(f"capture: {len(cases)} cases, {rounds} rounds, >= {min_sample:g} s/sample")

    def seconds(case: Callable[[int], dict[str, float]]) -> Callable[[int], float]:
        return lambda n: case(n)["total"] * n

    sizes = {
        name: calibrate(seconds(case), min_sample, lines, log=log) for name, case in cases.items()
    }
    samples: dict[str, list[dict[str, float]]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].append(cases[name](sizes[name]))
        if log:
            log(f"  round {r + 1}/{rounds} done")
    summary: dict[str, dict[str, Any]] = {
        name: {
            "subscribers": None if name == BASELINE else int(name.split(", ")[1].split()[0]),
            "lines_per_sample": sizes[name],
            "append_s_per_line": spread([s["append"] for s in runs]),
            "producer_own_s_per_line": (
                None if name == BASELINE else spread([s["own"] for s in runs])
            ),
            "total_s_per_line": spread([s["total"] for s in runs]),
            "delivered_fraction_min": min(s.get("delivered", 1.0) for s in runs),
            "dropped_max": max(s.get("dropped", 0.0) for s in runs),
        }
        for name, runs in samples.items()
    }
    one = samples.get(_case_name(1))
    if one is not None:
        for name, runs in samples.items():
            count = summary[name]["subscribers"]
            if isinstance(count, int) and count > 1:
                # Paired: each round's own cost against the one-subscriber case of that round.
                summary[name]["producer_own_vs_1"] = spread(
                    [mine["own"] / base["own"] for mine, base in zip(runs, one, strict=True)]
                )
    return {"min_sample_s": min_sample, "rounds": rounds, "cases": summary, "samples": samples}


def _bind(subscribers: int) -> Callable[[int], dict[str, float]]:
    return lambda n: asyncio.run(_capture_sample(n, subscribers))


def report(result: dict[str, Any]) -> str:
    rows = []
    for name, s in result["cases"].items():
        subs = s["subscribers"]
        total = s["total_s_per_line"][1]
        rows.append(
            [
                name,
                fmt_spread(s["append_s_per_line"], _fmt_us),
                ""
                if s["producer_own_s_per_line"] is None
                else fmt_spread(s["producer_own_s_per_line"], _fmt_us),
                fmt_spread(s["total_s_per_line"], _fmt_us),
                "" if not subs else fmt_seconds(total / subs),
                "" if subs is None else f"{s['delivered_fraction_min']:.1%}",
                "" if subs is None else int(s["dropped_max"]),
            ]
        )
    return (
        f"OutputCapture: lines appended in slices of {SLICE}, median of {result['rounds']} "
        f"interleaved rounds, each sample >= {result['min_sample_s']:g} s (warm-up first); "
        "times per line in us, min / median / max\n"
        + table(
            [
                "case",
                "append (producer)",
                "producer's own steps",
                "end to end",
                "per delivery",
                "delivered (worst)",
                "dropped",
            ],
            rows,
        )
    )


def targets(result: dict[str, Any]) -> list[Target]:
    out = []
    name = _case_name(0)
    cases = result["cases"]
    if name in cases:
        append = cases[name]["append_s_per_line"][1]
        floor = cases[BASELINE]["append_s_per_line"][1]
        out.append(
            Target(
                f"OutputCapture append <= {APPEND_LIMIT_S * 1e6:g} us/line with no subscribers",
                append <= APPEND_LIMIT_S,
                f"{append * 1e6:.3f} us (deque.append floor {floor * 1e6:.3f} us)",
            )
        )
    fanned = {k: v for k, v in cases.items() if v["subscribers"]}
    if fanned:
        worst = min(v["delivered_fraction_min"] for v in fanned.values())
        out.append(
            Target(
                "OutputCapture fan-out delivers every line to every subscriber (yielding producer)",
                worst >= 1.0,
                ", ".join(
                    f"{v['subscribers']}: {v['delivered_fraction_min']:.1%}"
                    for v in fanned.values()
                ),
            )
        )
        own = {
            v["subscribers"]: v["producer_own_vs_1"]
            for v in fanned.values()
            if "producer_own_vs_1" in v
        }
        one = next((v for v in fanned.values() if v["subscribers"] == 1), None)
        if one is not None and own:
            base_own = one["producer_own_s_per_line"][1]
            out.append(
                Target(
                    f"OutputCapture producer's own cost per line with 10/100 subscribers <= "
                    f"{FANOUT_PRODUCER_LIMIT:g}x that with 1 (O(1) per line, paired per round)",
                    max(r[1] for r in own.values()) <= FANOUT_PRODUCER_LIMIT,
                    ", ".join(f"{n}: {r[1]:.2f}x" for n, r in own.items())
                    + f" of {base_own * 1e6:.2f} us",
                )
            )
        if one is not None:
            base = one["total_s_per_line"][1]
            ratios = {
                v["subscribers"]: v["total_s_per_line"][1] / v["subscribers"] / base
                for v in fanned.values()
                if v["subscribers"] > 1
            }
            if ratios:
                out.append(
                    Target(
                        f"OutputCapture fan-out cost per delivery with 10/100 subscribers <= "
                        f"{FANOUT_PER_DELIVERY_LIMIT:g}x the cost with 1 (O(1) per subscriber)",
                        max(ratios.values()) <= FANOUT_PER_DELIVERY_LIMIT,
                        ", ".join(f"{n}: {r:.2f}x" for n, r in ratios.items())
                        + f" of {base * 1e6:.2f} us",
                    )
                )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--min-sample", type=float, default=0.5, help="seconds per sample")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--subscribers", default="0,1,10,100")
    args = parser.parse_args()
    result = run(
        args.min_sample,
        args.rounds,
        [int(x) for x in args.subscribers.split(",")],
        log=lambda s: print(s, file=sys.stderr),
    )
    print(report(result))
    for t in targets(result):
        print(t.line())
    print(f"wrote {write_json('capture', result)}")


if __name__ == "__main__":
    main()
