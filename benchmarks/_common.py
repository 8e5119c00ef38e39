"""Shared helpers for the benchmark suite: interleaved timing, fresh-process cases, results.

Every comparison runs its cases A/B/C... interleaved inside one round (and rotates the order from
round to round), so slow drift of a shared machine hits every case alike; ratios are then taken
per round and their median reported, with the spread (min / median / max) over the rounds.

Sample sizes are calibrated per case (:func:`calibrate`) so a warm sample lasts 1.25-1.5 times a
minimum time (0.5 s in a full run), which keeps timed samples above the minimum unless the
machine speeds up by more than that between calibration and timing (the JSON keeps every
sample); the calibration runs are the case's untimed warm-up. Cases sized differently are
compared per operation (per spawn, per line, per task).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable
TRUE = "/bin/true" if os.path.exists("/bin/true") else "/usr/bin/true"


@dataclass
class Target:
    """One pass/fail line of issue 7."""

    name: str
    passed: bool | None  # None: could not be measured in this run
    detail: str

    def line(self) -> str:
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[self.passed]
        return f"{verdict:4}  {self.name}: {self.detail}"


@dataclass
class Interleaved:
    """Timings of several cases measured round by round in rotating order."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, case: str) -> float:
        return statistics.median(self.samples[case])

    def paired_ratio(self, case: str, base: str) -> float:
        """Median over rounds of ``case / base`` measured in the same round."""
        pairs = zip(self.samples[case], self.samples[base], strict=True)
        return statistics.median(a / b for a, b in pairs)

    def paired_ratios(self, case: str, base: str) -> list[float]:
        """``case / base`` for every round (the spread behind :meth:`paired_ratio`)."""
        return [a / b for a, b in zip(self.samples[case], self.samples[base], strict=True)]

    def spread(self, case: str) -> tuple[float, float, float]:
        """(min, median, max) of the case's samples."""
        return spread(self.samples[case])

    def as_dict(self) -> dict[str, Any]:
        return {
            case: {"median": statistics.median(v), "min": min(v), "max": max(v), "samples": v}
            for case, v in self.samples.items()
        }


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(min, median, max) of ``values``."""
    return min(values), statistics.median(values), max(values)


#: Calibration aims samples this far above the minimum and accepts none under ``HEADROOM`` times
#: it: a timed round on a shared machine can run much faster than the calibration run (a full
#: run once had timed samples of 0.34 s from a size calibrated to 0.5 s).
HEADROOM = 1.25
AIM = 1.5


def calibrate(
    sample: Callable[[int], float],
    min_seconds: float,
    start: int,
    *,
    maximum: int = 1_000_000_000,
    log: Callable[[str], None] | None = None,
) -> int:
    """A size whose sample lasts at least ``HEADROOM * min_seconds``: ``sample(size)`` returns
    seconds.

    Starts at ``start`` (also the smallest size returned) and scales up from the measured time,
    aiming at ``AIM * min_seconds``; these runs are not recorded, so they are the case's warm-up
    as well (every case runs at least once before timing). The first run is cold (imports,
    caches, thread pools), so a size is never accepted on the first run's time alone: it is
    measured again warm.
    """
    size = max(1, start)
    cold = True
    for _ in range(8):
        seconds = sample(size)
        if seconds >= min_seconds * HEADROOM or size >= maximum:
            if not cold or size >= maximum or min_seconds <= 0:
                return size
            cold = False
            continue  # the same size once more, warm
        cold = False
        grow = min_seconds * AIM / max(seconds, 1e-6)
        size = min(maximum, max(size + 1, math.ceil(size * min(grow, 100.0))))
    if log is not None:
        log(f"  calibration stopped at size {size} (samples still under {min_seconds:g} s)")
    return size


def interleave(
    cases: dict[str, Callable[[], float]],
    rounds: int,
    *,
    warmup: bool = False,
    log: Callable[[str], None] | None = None,
) -> Interleaved:
    """Call every case once per round, order rotated each round; each call returns seconds.

    ``warmup``: call every case once, untimed, first (cases sized with :func:`calibrate` are
    already warm).
    """
    names = list(cases)
    result = Interleaved({name: [] for name in names})
    if warmup:
        for name in names:
            cases[name]()
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            result.samples[name].append(cases[name]())
        if log is not None:
            log(f"  round {r + 1}/{rounds} done")
    return result


def environment() -> dict[str, Any]:
    return {
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def write_json(name: str, data: dict[str, Any], results_dir: Path | None = None) -> Path:
    out_dir = results_dir or RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    payload = {"environment": environment(), **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def run_fresh(script: Path, args: Sequence[str], timeout: float = 600.0) -> dict[str, Any]:
    """Run ``script`` with ``args`` in a fresh interpreter; it prints one JSON object last.

    Memory-hungry cases run this way so one case's peak RSS or leftover threads never pollute
    the next one's measurement.
    """
    proc = subprocess.run(
        [PYTHON, str(script), *args],
        capture_output=True,
        timeout=timeout,
        check=False,
        cwd=BENCH_DIR.parent,
    )
    lines = proc.stdout.decode(errors="replace").strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"{script.name} {' '.join(args)} failed ({proc.returncode}): "
            f"{proc.stderr.decode(errors='replace')[-2000:]}"
        )
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def fmt_spread(values: Sequence[float], fmt: Callable[[float], str]) -> str:
    """``min / median / max`` of ``values``, each formatted with ``fmt``."""
    low, mid, high = spread(values)
    return f"{fmt(low)} / {fmt(mid)} / {fmt(high)}"


def fmt_seconds(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.1f} us"
    if s < 1:
        return f"{s * 1e3:.2f} ms"
    return f"{s:.2f} s"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    out = []
    for n, row in enumerate(cells):
        out.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def maxrss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class Sampler:
    """Samples this process's RSS and thread count in a background thread (psutil)."""

    def __init__(self, interval: float = 0.005) -> None:
        import threading

        import psutil

        self._proc = psutil.Process()
        self._interval = interval
        self._stop = threading.Event()
        self.peak_rss = self._proc.memory_info().rss
        self.peak_threads = self._proc.num_threads()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._sample()

    def _sample(self) -> None:
        self.peak_rss = max(self.peak_rss, self._proc.memory_info().rss)
        # The sampler's own thread is not the library's: leave it out.
        self.peak_threads = max(self.peak_threads, self._proc.num_threads() - 1)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
