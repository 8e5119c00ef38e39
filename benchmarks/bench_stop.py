"""Stop at scale: how fast closing a wrapper stops N live children, and what it costs the loop.

Case 1, close: N children (``sleep 300``, stdout and stderr piped) are started in one
``SubprocessWrapper(mode)``; then ``await wrapper.aclose()`` stops them all. Measured: wall time
of the close, the longest event-loop stall during it, and that nothing is left running. The
baseline is raw asyncio: N ``create_subprocess_exec`` children, then ``kill()`` each and wait
for all.

Case 2, timeout stop: one ``await wrapper.run("sleep", "300", timeout=0.2)`` (the
``ProcessTimeoutError`` is expected), measured for its longest loop stall while the timeout
stop runs, with 0 and with 1,000 unrelated ``sleep 300`` processes alive on the host (started
with plain ``subprocess.Popen`` by the parent interpreter, killed afterwards). Baseline: raw
asyncio ``wait_for(p.wait(), 0.2)`` then ``kill()`` + ``wait()``.

Loop stall: a ticker task loops on ``await asyncio.sleep(0.001)`` and records each gap between
wakeups minus the 1 ms it asked for; the largest gap inside the measured window is the stall.

Leftovers: every child gets a unique marker in its environment. Right after the stop, each
child pid must be gone or a zombie, and a scan of all host processes must find no live process
carrying the marker; after the measuring interpreter exits, the parent scans again (and kills
anything it finds, so a failed case never leaves 1,000 sleeps behind).

Every case runs in a fresh interpreter. A close that has not finished after ``--cap`` seconds
is cancelled (which still kills everything) and reported as capped, with its stall so far.

    python benchmarks/bench_stop.py [--children 100,500,1000] [--modes ASYNC,THREADED,asyncio]
                                    [--cap 60] [--unrelated 1000] [--repeats 5] [--json PATH]

Writes benchmarks/results/stop.json (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _common import RESULTS_DIR, TRUE, Target, environment, run_fresh, table

PIPE = subprocess.PIPE
SLEEP = shutil.which("sleep") or "/bin/sleep"
MARKER_VAR = "PRISMQ_BENCH_STOP"
#: The raw-asyncio reference; the other cases are ``RunMode`` names.
BASELINE = "asyncio"
MODES = ("ASYNC", "THREADED", BASELINE)
OURS = ("ASYNC", "THREADED")
TIMEOUT = 0.2
TICK = 0.001

#: Targets of the stop-at-scale issue.
TARGET_CHILDREN = 1000
TARGET_CLOSE_S = 1.0
TARGET_CLOSE_STALL_S = 0.020
TARGET_TIMEOUT_STALL_S = 0.005
TARGET_UNRELATED = 1000


class StallMeter:
    """Ticker task measuring how late the event loop wakes a 1 ms sleep.

    ``async with StallMeter() as meter:`` runs the ticker; ``meter.max_stall(t0, t1)`` is the
    largest lateness of a wakeup that happened between ``t0`` and ``t1`` (``perf_counter``).
    """

    def __init__(self, interval: float = TICK) -> None:
        self.interval = interval
        self.gaps: list[tuple[float, float]] = []  # (wakeup time, lateness)
        # Full (generation 2) garbage collections: (start, end). One pass over a heap that
        # holds a thousand children takes 20-45 ms here, whoever's objects they are; it is
        # reported beside the stall so a reader can tell the two apart.
        self.collections: list[tuple[float, float]] = []
        self._collect_started = 0.0
        self._task: asyncio.Task[None] | None = None
        self.last_wakeup = time.perf_counter()

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._collect_started = time.perf_counter()
        else:
            self.collections.append((self._collect_started, time.perf_counter()))

    def longest_collection(self, start: float, end: float) -> float:
        """The longest full garbage collection that ran between ``start`` and ``end``."""
        inside = [b - a for a, b in self.collections if start <= b and a <= end]
        return max(inside, default=0.0)

    def max_stall_without_collections(self, start: float, end: float) -> float:
        """The largest lateness of a wakeup whose wait held no full garbage collection."""
        inside = [
            gap
            for at, gap in self.gaps
            if start <= at <= end
            and not any(at - gap - self.interval <= b and a <= at for a, b in self.collections)
        ]
        return max(inside, default=0.0)

    async def _tick(self) -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(self.interval)
            now = time.perf_counter()
            self.gaps.append((now, now - last - self.interval))
            last = self.last_wakeup = now

    def max_stall(self, start: float, end: float) -> float:
        inside = [gap for at, gap in self.gaps if start <= at <= end]
        return max(inside, default=0.0)

    async def __aenter__(self) -> StallMeter:
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.02)  # let the ticker settle into its rhythm
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._task is not None
        # One last wakeup, so a stall that ends the window is recorded too.
        await asyncio.sleep(self.interval * 2)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        gc.callbacks.remove(self._on_gc)


# -- leftovers ----------------------------------------------------------------------------------
def _marked(var: str, marker: str) -> Iterator[Any]:
    """Live (non-zombie) processes on the host whose environment carries ``var=marker``."""
    import psutil

    for proc in psutil.process_iter():
        try:
            if proc.environ().get(var) == marker and proc.status() != psutil.STATUS_ZOMBIE:
                yield proc
        except (psutil.Error, OSError):
            continue  # gone, or not ours to read


def _still_running(pids: Sequence[int]) -> int:
    import psutil

    running = 0
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                running += 1
        except psutil.NoSuchProcess:
            continue
    return running


def _reap_marked(var: str, marker: str) -> int:
    """Kill what a failed case left behind; return how many processes that was."""
    found = list(_marked(var, marker))
    for proc in found:
        with contextlib.suppress(Exception):
            proc.kill()
    return len(found)


def _marked_env(marker: str) -> dict[str, str]:
    return {**os.environ, MARKER_VAR: marker}


# -- case 1: close N children (runs in a fresh interpreter) ------------------------------------
async def _close_case(case: str, children: int, cap: float, marker: str) -> dict[str, Any]:
    env = _marked_env(marker)
    cmd = (SLEEP, "300")
    spawn_started = time.perf_counter()
    if case == BASELINE:
        procs: list[Any] = []
        try:
            for _ in range(children):
                procs.append(
                    await asyncio.create_subprocess_exec(*cmd, stdout=PIPE, stderr=PIPE, env=env)
                )
        except BaseException:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            raise
        pids = [p.pid for p in procs]

        async def close() -> None:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()
            await asyncio.gather(*(p.wait() for p in procs))

        def emergency() -> None:
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.kill()

    else:
        import prismq_subprocess as pq

        wrapper = pq.SubprocessWrapper(pq.RunMode[case])
        pids = []
        try:
            for _ in range(children):
                p = await wrapper.create_subprocess_exec(*cmd, stdout=PIPE, stderr=PIPE, env=env)
                pids.append(p.pid)
        except BaseException:
            wrapper.cleanup()
            raise

        async def close() -> None:
            await wrapper.aclose()

        emergency = wrapper.cleanup
    spawn_seconds = time.perf_counter() - spawn_started

    capped = False
    async with StallMeter() as meter:
        started = time.perf_counter()
        common = {"case": case, "children": children, "spawn_seconds": spawn_seconds}
        finished = _watchdog(cap, started, meter, common)
        task = asyncio.create_task(close())
        done, _ = await asyncio.wait({task}, timeout=cap)
        ended = time.perf_counter()
        if not done:
            # Slow but not blocking the loop: cancelling aclose() still kills what is left.
            capped = True
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        after_cancel = time.perf_counter()
        finished.set()
    emergency()
    return {
        **common,
        "close_seconds": ended - started,
        "capped": capped,
        "cap_seconds": cap,
        "cancel_seconds": after_cancel - ended if capped else 0.0,
        "max_stall_seconds": meter.max_stall(started, ended),
        "max_stall_without_gc_seconds": meter.max_stall_without_collections(started, ended),
        "longest_gc_seconds": meter.longest_collection(started, ended),
        "stall_ticks": sum(1 for at, _ in meter.gaps if started <= at <= ended),
        "running_after": _still_running(pids),
        "marked_after": len(list(_marked(MARKER_VAR, marker))),
    }


def _watchdog(
    cap: float, started: float, meter: StallMeter, common: dict[str, Any]
) -> threading.Event:
    """Enforce ``cap`` on a close that blocks the event loop (``asyncio.wait`` cannot time out
    then): print a capped result and end the interpreter at once. The parent kills the children
    left behind (they carry the marker)."""
    finished = threading.Event()

    def watch() -> None:
        if finished.wait(cap):
            return
        now = time.perf_counter()
        result = {
            **common,
            "close_seconds": now - started,
            "capped": True,
            "loop_blocked_at_cap": now - meter.last_wakeup > 1.0,
            "cap_seconds": cap,
            "cancel_seconds": 0.0,
            # The stall still under way when the cap hit counts: the loop has not woken since.
            "max_stall_seconds": max(meter.max_stall(started, now), now - meter.last_wakeup),
            "stall_ticks": sum(1 for at, _ in meter.gaps if started <= at <= now),
            "running_after": None,
            "marked_after": None,
        }
        os.write(1, (json.dumps(result) + "\n").encode())
        os._exit(0)

    threading.Thread(target=watch, name="bench-stop-watchdog", daemon=True).start()
    return finished


# -- case 2: one run(timeout) stop (runs in a fresh interpreter) -------------------------------
async def _timeout_case(case: str, repeats: int, marker: str) -> dict[str, Any]:
    env = _marked_env(marker)
    cmd = (SLEEP, "300")
    samples: list[dict[str, float]] = []
    if case == BASELINE:

        async def once() -> None:
            p = await asyncio.create_subprocess_exec(
                *cmd, stdin=subprocess.DEVNULL, stdout=PIPE, stderr=PIPE, env=env
            )
            try:
                await asyncio.wait_for(p.wait(), TIMEOUT)
            except TimeoutError:
                p.kill()
                await p.communicate()

        wrapper: Any = None
        await (await asyncio.create_subprocess_exec(TRUE)).wait()  # warm-up
    else:
        import prismq_subprocess as pq

        wrapper = pq.SubprocessWrapper(pq.RunMode[case])
        await wrapper.run(TRUE)  # warm-up: thread pools, imports

        async def once() -> None:
            try:
                await wrapper.run(*cmd, timeout=TIMEOUT, env=env)
            except pq.ProcessTimeoutError:
                return
            raise AssertionError("run(sleep 300, timeout=0.2) did not time out")

    try:
        async with StallMeter() as meter:
            for _ in range(repeats):
                started = time.perf_counter()
                await once()
                ended = time.perf_counter()
                await asyncio.sleep(0.02)
                samples.append(
                    {
                        "seconds": ended - started,
                        "stop_seconds": ended - started - TIMEOUT,
                        "stop_stall": meter.max_stall(started + TIMEOUT, ended),
                        "whole_stall": meter.max_stall(started, ended),
                        "stop_stall_without_gc": meter.max_stall_without_collections(
                            started + TIMEOUT, ended
                        ),
                        "longest_gc": meter.longest_collection(started + TIMEOUT, ended),
                    }
                )
    finally:
        if wrapper is not None:
            await wrapper.aclose()
    return {
        "case": case,
        "repeats": repeats,
        "samples": samples,
        "stop_stall_max": max(s["stop_stall"] for s in samples),
        "stop_stall_median": statistics.median(s["stop_stall"] for s in samples),
        "whole_stall_max": max(s["whole_stall"] for s in samples),
        "stop_stall_without_gc_max": max(s["stop_stall_without_gc"] for s in samples),
        "longest_gc": max(s["longest_gc"] for s in samples),
        "stop_seconds_median": statistics.median(s["stop_seconds"] for s in samples),
        "marked_after": len(list(_marked(MARKER_VAR, marker))),
    }


def _child_main(args: argparse.Namespace) -> dict[str, Any]:
    if args.child == "close":
        return asyncio.run(_close_case(args.case, args.children[0], args.cap, args.marker))
    return asyncio.run(_timeout_case(args.case, args.repeats, args.marker))


# -- the parent: fresh interpreter per sample ---------------------------------------------------
def _fresh(args: list[str], marker: str, cap: float) -> dict[str, Any]:
    """One sample in a fresh interpreter; afterwards no process with ``marker`` may be alive."""
    error = None
    try:
        sample = run_fresh(Path(__file__), [*args, "--marker", marker], timeout=cap * 2 + 120)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        sample = {}
        error = str(exc)[-500:]
    sample["left_after_exit"] = _reap_marked(MARKER_VAR, marker)
    if error is not None:
        sample["error"] = error
    return sample


@contextlib.contextmanager
def unrelated_processes(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` plain ``sleep 300`` processes alive on the host; killed and reaped on exit."""
    marker = f"unrelated-{uuid.uuid4()}"
    env = {**os.environ, "PRISMQ_BENCH_UNRELATED": marker}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            procs.append(
                subprocess.Popen(
                    [SLEEP, "300"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    env=env,
                )
            )
        yield procs
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait()
        _reap_marked("PRISMQ_BENCH_UNRELATED", marker)


def run(
    children: Sequence[int] = (TARGET_CHILDREN,),
    modes: Sequence[str] = MODES,
    cap: float = 60.0,
    rounds: int = 1,
    unrelated: Sequence[int] = (0, TARGET_UNRELATED),
    repeats: int = 5,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    for mode in modes:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose from {MODES}")
    run_id = uuid.uuid4().hex[:12]
    close: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for n in children:
        close[str(n)] = {m: [] for m in modes}
        for r in range(rounds):
            shift = r % len(modes)
            for mode in [*modes[shift:], *modes[:shift]]:
                if log:
                    log(f"stop: close {n} children, {mode}, round {r + 1}/{rounds}")
                sample = _fresh(
                    ["--child", "close", "--case", mode, "--children", str(n), "--cap", str(cap)],
                    f"{run_id}-close-{mode}-{n}-{r}",
                    cap,
                )
                close[str(n)][mode].append(sample)
    timeout: dict[str, dict[str, Any]] = {}
    for count in unrelated:
        timeout[str(count)] = {}
        if log:
            log(f"stop: run(timeout={TIMEOUT}) x {repeats} with {count} unrelated processes")
        with unrelated_processes(count):
            for mode in modes:
                timeout[str(count)][mode] = _fresh(
                    ["--child", "timeout", "--case", mode, "--repeats", str(repeats)],
                    f"{run_id}-timeout-{mode}-{count}",
                    cap,
                )
    return {
        "children": list(children),
        "modes": list(modes),
        "cap_seconds": cap,
        "rounds": rounds,
        "timeout_seconds": TIMEOUT,
        "unrelated": list(unrelated),
        "repeats": repeats,
        "close": close,
        "timeout": timeout,
    }


# -- reporting ----------------------------------------------------------------------------------
def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f} ms"


def _worst(values: Iterable[int | None]) -> int | None:
    """Largest count, ``None`` when no sample could check (all were cut off at the cap)."""
    checked = [v for v in values if v is not None]
    return max(checked) if checked else None


def _close_summary(samples: list[dict[str, Any]]) -> dict[str, Any] | None:
    good = [s for s in samples if "close_seconds" in s]
    if not good:
        return None
    return {
        "close_seconds": statistics.median(s["close_seconds"] for s in good),
        "capped": any(s["capped"] for s in good),
        "max_stall_seconds": max(s["max_stall_seconds"] for s in good),
        # Samples from before these fields existed have neither: 0 then.
        "max_stall_without_gc_seconds": max(
            s.get("max_stall_without_gc_seconds", 0.0) for s in good
        ),
        "longest_gc_seconds": max(s.get("longest_gc_seconds", 0.0) for s in good),
        "spawn_seconds": statistics.median(s["spawn_seconds"] for s in good),
        "running_after": _worst(s["running_after"] for s in good),
        "marked_after": _worst(s["marked_after"] for s in good),
        "left_after_exit": max(s["left_after_exit"] for s in samples),
        "errors": sum(1 for s in samples if "error" in s),
    }


def report(result: dict[str, Any]) -> str:
    rows = []
    for n, by_mode in result["close"].items():
        for mode, samples in by_mode.items():
            s = _close_summary(samples)
            if s is None:
                rows.append([f"{mode} close {n}", "error", "", "", "", "", "", ""])
                continue
            wall = f"{s['close_seconds']:.2f} s"
            if s["capped"]:
                wall = f"> {result['cap_seconds']:g} s (capped)"
            left = "n/a (capped)"
            if s["running_after"] is not None:
                left = f"{s['running_after']}/{s['marked_after']}"
            rows.append(
                [
                    f"{mode} close {n}" if mode != BASELINE else f"asyncio kill+wait {n}",
                    wall,
                    (">= " if s["capped"] else "") + _ms(s["max_stall_seconds"]),
                    _ms(s["max_stall_without_gc_seconds"]),
                    _ms(s["longest_gc_seconds"]),
                    f"{s['spawn_seconds']:.2f} s",
                    left,
                    s["left_after_exit"],
                ]
            )
    text = (
        f"Stop at scale: close N live children (sleep 300, piped), {result['rounds']} round(s), "
        f"fresh interpreter per sample, cap {result['cap_seconds']:g} s\n"
        + table(
            [
                "case",
                "close wall",
                "max loop stall",
                "stall, no full GC in it",
                "longest full GC",
                "spawn N",
                "left: pids/marked",
                "left at exit",
            ],
            rows,
        )
    )
    rows = []
    for count, by_mode in result["timeout"].items():
        for mode, s in by_mode.items():
            if "stop_stall_max" not in s:
                rows.append([f"{mode}, {count} unrelated", "error", "", "", "", ""])
                continue
            rows.append(
                [
                    f"{mode}, {count} unrelated",
                    _ms(s["stop_seconds_median"]),
                    _ms(s["stop_stall_median"]),
                    _ms(s["stop_stall_max"]),
                    _ms(s["whole_stall_max"]),
                    s["marked_after"] + s["left_after_exit"],
                ]
            )
    text += (
        f"\n\nTimeout stop: run(sleep 300, timeout={result['timeout_seconds']:g}), "
        f"{result['repeats']} repeats; stall after the deadline (and over the whole call)\n"
        + table(
            ["case", "stop time (median)", "stall median", "stall max", "whole-call max", "left"],
            rows,
        )
    )
    return text


def targets(result: dict[str, Any]) -> list[Target]:
    out: list[Target] = []
    n = max(int(k) for k in result["close"])
    scaled = "" if n >= TARGET_CHILDREN else f" (scaled-down run; target set for {TARGET_CHILDREN})"
    for mode in OURS:
        samples = result["close"][str(n)].get(mode)
        if samples is None:
            continue
        s = _close_summary(samples)
        name = f"stop: {mode} closes {n} children in <= {TARGET_CLOSE_S:g} s{scaled}"
        if s is None:
            out.append(Target(name, False, "the case failed"))
            continue
        wall = f"{s['close_seconds']:.2f} s"
        if s["capped"]:
            wall = f"> {result['cap_seconds']:g} s (capped)"
        out.append(Target(name, not s["capped"] and s["close_seconds"] <= TARGET_CLOSE_S, wall))
        out.append(
            Target(
                f"stop: {mode} loop never stalls > {TARGET_CLOSE_STALL_S * 1e3:g} ms "
                f"closing {n} children",
                s["max_stall_seconds"] <= TARGET_CLOSE_STALL_S,
                f"max stall {'>= ' if s['capped'] else ''}{_ms(s['max_stall_seconds'])} "
                f"({_ms(s['max_stall_without_gc_seconds'])} where no full GC ran; longest full "
                f"GC {_ms(s['longest_gc_seconds'])})",
            )
        )
        name = f"stop: {mode} leaves nothing running after closing {n} children"
        if s["running_after"] is None:
            out.append(Target(name, None, "not checked: the close was cut off at the cap"))
            continue
        left = s["running_after"] + s["marked_after"] + s["left_after_exit"]
        out.append(
            Target(
                name,
                left == 0 and s["errors"] == 0,
                f"{s['running_after']} pids, {s['marked_after']} marked running after close; "
                f"{s['left_after_exit']} after exit",
            )
        )
    count = max(int(k) for k in result["timeout"])
    for mode in OURS:
        s = result["timeout"][str(count)].get(mode)
        if s is None:
            continue
        name = (
            f"stop: {mode} run(timeout) stop stalls <= {TARGET_TIMEOUT_STALL_S * 1e3:g} ms "
            f"with {count} unrelated processes"
        )
        if "stop_stall_max" not in s:
            out.append(Target(name, False, "the case failed"))
            continue
        out.append(
            Target(
                name,
                s["stop_stall_max"] <= TARGET_TIMEOUT_STALL_S,
                f"max {_ms(s['stop_stall_max'])}, median {_ms(s['stop_stall_median'])} "
                f"over {s['repeats']} stops{_gc_note(s)}",
            )
        )
    return out


def _gc_note(s: dict[str, Any]) -> str:
    """Where a full garbage collection fell inside a stop: the worst stall without it, and it."""
    if not s.get("longest_gc"):
        return ""
    return (
        f" ({_ms(s['stop_stall_without_gc_max'])} where no full GC ran; longest full GC "
        f"{_ms(s['longest_gc'])})"
    )


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--children",
        type=_int_list,
        default=[TARGET_CHILDREN],
        help="N, or a comma list like 100,500,1000",
    )
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma list of {MODES}")
    parser.add_argument("--cap", type=float, default=60.0, help="per-case cap on a close (s)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--unrelated", type=_int_list, default=[0, TARGET_UNRELATED])
    parser.add_argument("--repeats", type=int, default=5, help="run(timeout) stops per case")
    parser.add_argument("--json", type=Path, help="output path (default results/stop.json)")
    parser.add_argument("--child", choices=("close", "timeout"), help=argparse.SUPPRESS)
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--marker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child_main(args)))
        return
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    result = run(
        args.children,
        modes,
        cap=args.cap,
        rounds=args.rounds,
        unrelated=args.unrelated,
        repeats=args.repeats,
        log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(report(result))
    for t in targets(result):
        print(t.line())
    path = args.json or RESULTS_DIR / "stop.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **result}, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
