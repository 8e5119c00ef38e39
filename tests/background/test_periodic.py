"""Tests of prismq_subprocess._background._periodic.PeriodicTask.

Timing guarantees are checked on schedule positions with an injected fake clock (exact), plus a
few short real-clock tests whose bounds are generous enough for a noisy 2-core machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import logging
import math
import random
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path

import anyio
import pytest
from anyio_support import closed_by_a_cancelled_scope
from hypothesis import given, settings
from hypothesis import strategies as st

from prismq_subprocess._background._periodic import PeriodicTask
from prismq_subprocess._core._exceptions import (
    InvalidArgumentTypeError,
    InvalidIntervalError,
    InvalidLimitError,
    InvalidTaskError,
    InvalidTimeoutError,
    PrismQError,
)

ORIGIN = 1000.0


class FakeClock:
    """A clock that only moves when the scheduler sleeps or a run says it took time.

    ``overshoot`` models OS wake-up latency: each sleep lasts a little longer than asked.
    """

    def __init__(self, overshoot: Callable[[], float] = lambda: 0.0) -> None:
        self.now = ORIGIN
        self.overshoot = overshoot
        self.sleeps: list[float] = []
        self.halted = False

    def halt(self) -> None:
        """Freeze the schedule: the next sleep never returns (until stop() cancels it)."""
        self.halted = True

    def time(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        if self.halted:
            await asyncio.Event().wait()
        self.sleeps.append(delay)
        self.now += delay + self.overshoot()
        await asyncio.sleep(0)


def fake_task(
    clock: FakeClock, func: Callable[..., object], interval: float, **options: object
) -> PeriodicTask:
    options.update(clock=clock.time, sleep=clock.sleep)
    return PeriodicTask("fake", interval, func, **options)  # type: ignore[arg-type]


async def test_no_drift_over_1000_ticks_with_noisy_wakeups() -> None:
    rng = random.Random(1234)
    clock = FakeClock(overshoot=lambda: rng.uniform(0.0, 0.003))
    interval = 0.010
    starts: list[float] = []
    scheduled: list[float] = []
    done = asyncio.Event()

    async def record() -> None:
        starts.append(clock.now)
        scheduled.append(task.stats.last_scheduled_time)  # type: ignore[arg-type]
        if len(starts) == 1000:
            clock.halt()
            done.set()

    task = fake_task(clock, record, interval, run_immediately=False)
    task.start()
    await asyncio.wait_for(done.wait(), 10)
    await task.stop()

    assert task.stats.skipped == 0
    assert len(starts) == task.stats.runs == 1000
    # Scheduled times are the grid origin + k * interval, exactly (up to float rounding).
    for k, when in enumerate(scheduled, start=1):
        assert when == pytest.approx(ORIGIN + k * interval, abs=1e-9)
    # Each start is late only by its own wake-up latency; lateness never accumulates, although
    # the summed overshoot (~1.5 s) is 150 intervals: a sleep(interval) loop would drift by that.
    lateness = [s - w for s, w in zip(starts, scheduled, strict=True)]
    assert min(lateness) >= -1e-9
    assert max(lateness) <= 0.003 + 1e-9
    assert abs(starts[999] - (ORIGIN + 1000 * interval)) < interval


async def test_overrun_is_coalesced_and_counted_without_overlap() -> None:
    clock = FakeClock()
    durations = iter([2.5, 0.1, 0.1, 3.2, 0.1, 0.1])
    scheduled: list[float] = []
    active = 0
    max_active = 0
    done = asyncio.Event()

    async def work() -> None:
        nonlocal active, max_active
        active += 1
        max_active = max(max_active, active)
        scheduled.append(task.stats.last_scheduled_time)  # type: ignore[arg-type]
        await asyncio.sleep(0)
        clock.now += next(durations, 0.1)
        active -= 1
        if len(scheduled) == 6:
            clock.halt()
            done.set()

    task = fake_task(clock, work, 1.0, run_immediately=True)
    task.start()
    await asyncio.wait_for(done.wait(), 5)
    await task.stop()

    # tick 0 runs 0..2.5: tick 1 skipped, tick 2 runs late at 2.5; tick 3 on time; tick 4 runs
    # 4.0..7.2: ticks 5 and 6 skipped, tick 7 runs late at 7.2; tick 8 on time.
    assert [w - ORIGIN for w in scheduled] == pytest.approx([0, 2, 3, 4, 7, 8])
    assert task.stats.skipped == 3
    assert task.stats.runs == 6
    assert max_active == 1


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(min_value=0.0, max_value=3.5), min_size=1, max_size=25),
    st.booleans(),
)
def test_schedule_positions_property(durations: list[float], run_immediately: bool) -> None:
    """For any run durations: scheduled times sit on the grid, strictly increase, and every
    grid tick up to the last one is either run or counted as skipped."""

    async def scenario() -> tuple[list[float], int, int]:
        clock = FakeClock()
        it = iter(durations)
        scheduled: list[float] = []
        done = asyncio.Event()

        async def work() -> None:
            scheduled.append(task.stats.last_scheduled_time)  # type: ignore[arg-type]
            clock.now += next(it, 0.0)
            if len(scheduled) == len(durations):
                clock.halt()
                done.set()

        task = fake_task(clock, work, 1.0, run_immediately=run_immediately)
        task.start()
        await asyncio.wait_for(done.wait(), 5)
        await task.stop()
        return scheduled, task.stats.skipped, task.stats.runs

    scheduled, skipped, runs = asyncio.run(scenario())
    positions = [(w - ORIGIN) for w in scheduled]
    ticks = [round(p) for p in positions]
    assert positions == pytest.approx(ticks, abs=1e-9)
    assert all(b > a for a, b in itertools.pairwise(ticks))
    first = 0 if run_immediately else 1
    assert ticks[0] == first
    assert ticks[-1] - first + 1 == runs + skipped


async def test_run_after_first_interval_when_not_immediate_and_next_run_time() -> None:
    clock = FakeClock()
    seen: list[float] = []
    gate = asyncio.Event()

    async def work() -> None:
        seen.append(clock.now)
        await gate.wait()

    task = fake_task(clock, work, 2.0, run_immediately=False)
    assert task.stats.next_run_time is None
    task.start()
    for _ in range(5):
        await asyncio.sleep(0)
    stats = task.stats
    assert seen == [ORIGIN + 2.0]
    assert stats.run_in_progress and stats.is_running
    assert stats.next_run_time == pytest.approx(ORIGIN + 4.0)
    gate.set()
    await task.stop()
    assert task.stats.next_run_time is None
    assert not task.stats.is_running


async def test_jitter_delays_start_but_never_moves_the_grid() -> None:
    clock = FakeClock()
    starts: list[float] = []
    scheduled: list[float] = []
    done = asyncio.Event()

    async def work() -> None:
        starts.append(clock.now)
        scheduled.append(task.stats.last_scheduled_time)  # type: ignore[arg-type]
        if len(starts) == 200:
            clock.halt()
            done.set()

    task = fake_task(clock, work, 1.0, jitter=0.4, run_immediately=False)
    task.start()
    await asyncio.wait_for(done.wait(), 5)
    await task.stop()
    offsets = [s - w for s, w in zip(starts, scheduled, strict=True)]
    assert all(-1e-9 <= o <= 0.4 + 1e-9 for o in offsets)
    assert max(offsets) > 0.2  # jitter actually applied
    assert scheduled[199] == pytest.approx(ORIGIN + 200.0)
    assert task.stats.skipped == 0


async def test_errors_are_logged_counted_and_do_not_stop_the_schedule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    outcomes = iter([ValueError("one"), ValueError("two"), None, KeyError("three"), None])
    done = asyncio.Event()
    calls = 0

    async def work() -> None:
        nonlocal calls
        calls += 1
        outcome = next(outcomes, None)
        if calls == 5:
            clock.halt()
            done.set()
        if outcome is not None:
            raise outcome

    task = fake_task(clock, work, 1.0)
    with caplog.at_level(logging.ERROR, logger="prismq_subprocess._background._periodic"):
        task.start()
        await asyncio.wait_for(done.wait(), 5)
        await task.stop()
    stats = task.stats
    assert stats.runs == 5
    assert stats.failures == 3
    assert stats.consecutive_failures == 0
    assert isinstance(stats.last_error, KeyError)
    assert stats.last_duration == 0.0
    failures = [r for r in caplog.records if "run failed" in r.getMessage()]
    assert len(failures) == 3
    assert all(r.exc_info is not None for r in failures)


async def test_max_consecutive_failures_stops_the_schedule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()

    def fail() -> None:
        raise RuntimeError("always")

    task = fake_task(clock, fail, 1.0, max_consecutive_failures=3)
    with caplog.at_level(logging.ERROR, logger="prismq_subprocess._background._periodic"):
        task.start()
        assert task._task is not None
        await asyncio.wait_for(asyncio.shield(task._task), 5)
    stats = task.stats
    assert not stats.is_running
    assert stats.failures == stats.runs == stats.consecutive_failures == 3
    assert any("consecutive failures" in r.getMessage() for r in caplog.records)
    await task.stop()  # already ended: a no-op


async def test_start_is_idempotent_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    task = PeriodicTask("twice", 10.0, lambda: None)
    task.start()
    first = task._task
    with caplog.at_level(logging.WARNING, logger="prismq_subprocess._background._periodic"):
        task.start()
    assert task._task is first
    assert any("already running" in r.getMessage() for r in caplog.records)
    await task.stop()
    assert not task.is_running


async def test_plain_function_runs_in_a_worker_thread() -> None:
    loop_thread = threading.get_ident()
    threads: list[int] = []
    done = threading.Event()

    def work(tag: str, *, extra: int) -> None:
        assert (tag, extra) == ("x", 7)
        threads.append(threading.get_ident())
        done.set()

    async with PeriodicTask("thread", 0.01, work, "x", run_immediately=True, extra=7) as task:
        await asyncio.wait_for(asyncio.to_thread(done.wait, 5), 6)
    assert threads and all(t != loop_thread for t in threads)
    assert not task.is_running
    assert task.stats.failures == 0


async def test_a_plain_callable_returning_a_coroutine_is_awaited() -> None:
    done = asyncio.Event()

    async def work() -> None:
        done.set()

    async with PeriodicTask("lambda", 0.01, lambda: work(), run_immediately=True) as task:
        await asyncio.wait_for(done.wait(), 5)
    assert task.stats.failures == 0


async def test_stop_lets_the_current_run_finish() -> None:
    started = asyncio.Event()
    finished = False

    async def work() -> None:
        nonlocal finished
        started.set()
        await asyncio.sleep(0.05)
        finished = True

    task = PeriodicTask("finish", 0.01, work, run_immediately=True)
    task.start()
    await asyncio.wait_for(started.wait(), 5)
    await task.stop(timeout=5.0)
    assert finished
    assert task.stats.runs == 1
    assert not task.is_running


async def test_stop_cancels_a_run_that_outlives_the_timeout() -> None:
    started = asyncio.Event()
    cancelled = False

    async def work() -> None:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled = True
            raise

    task = PeriodicTask("cancel", timedelta(milliseconds=10), work, run_immediately=True)
    task.start()
    await asyncio.wait_for(started.wait(), 5)
    t0 = time.monotonic()
    await task.stop(timeout=0.05)
    assert time.monotonic() - t0 < 2.0
    assert cancelled
    assert task.stats.runs == 0  # a cancelled run is not counted
    assert not task.is_running


async def test_a_run_can_stop_its_own_schedule() -> None:
    clock = FakeClock()

    async def work() -> None:
        if task.stats.runs == 2:  # the third run
            await task.stop()

    task = fake_task(clock, work, 1.0, run_immediately=True)
    task.start()
    assert task._task is not None
    await asyncio.wait_for(asyncio.shield(task._task), 5)
    assert task.stats.runs == 3 and task.stats.failures == 0
    assert not task.is_running


async def test_a_restart_after_a_stop_that_cut_a_chained_schedule_short_never_overlaps() -> None:
    # A fuzzer's find: start(); a stop() waiting for the run; start() again (a schedule that
    # waits for the old one); a stop(timeout) that times out cancelled both schedules but
    # returned while the old run was still in its clean-up, and a third start() ran at once:
    # two runs at the same time.
    active = peak = 0

    async def tick() -> None:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        try:
            await asyncio.sleep(0.5)
        finally:
            await asyncio.sleep(0.2)  # the run's clean-up, after its cancellation
            active -= 1

    task = PeriodicTask("p", 10.0, tick)
    task.start()
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(task.stop(timeout=None))
    await asyncio.sleep(0)
    task.start()
    await task.stop(timeout=0.05)
    assert active == 0  # stop() returns once the schedule, its old run included, has ended
    task.start()
    await asyncio.sleep(0.05)
    await task.stop(timeout=None)
    await waiting
    assert peak == 1
    # The same with the stop() itself given up on by its caller while the old run cleans up
    # (a review's find: the second cancellation cut the wait short, and the runs overlapped).
    task.start()
    await asyncio.sleep(0.05)
    waiting = asyncio.ensure_future(task.stop(timeout=None))
    await asyncio.sleep(0)
    task.start()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(task.stop(timeout=0.05), 0.1)
    task.start()
    await asyncio.sleep(0.3)
    await task.stop(timeout=None)
    await waiting
    assert peak == 1


async def test_restart_after_stop_keeps_counters() -> None:
    clock = FakeClock()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1

    task = fake_task(clock, work, 1.0, run_immediately=True)
    task.start()
    for _ in range(3):
        await asyncio.sleep(0)
    await task.stop()
    first = task.stats.runs
    assert first >= 1
    task.start()
    for _ in range(3):
        await asyncio.sleep(0)
    await task.stop()
    assert task.stats.runs > first == runs - (task.stats.runs - first)


class _Overlap:
    """Counts the calls of a plain function in progress at once (from any thread)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.active = 0
        self.peak = 0

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        with self._lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        try:
            yield
        finally:
            with self._lock:
                self.active -= 1


async def test_real_clock_no_overlap_and_skips_when_runs_overrun() -> None:
    overlap = _Overlap()

    def slow() -> None:
        with overlap.running():
            time.sleep(0.05)

    async with PeriodicTask("slow", 0.02, slow, run_immediately=True) as task:
        while task.stats.runs < 4:  # noqa: ASYNC110 - polling the counters is what we test
            await asyncio.sleep(0.01)
    assert overlap.peak == 1
    assert task.stats.skipped >= 1


async def test_real_clock_schedule_positions() -> None:
    loop = asyncio.get_running_loop()
    interval = 0.02
    records: list[tuple[float, float]] = []

    async def work() -> None:
        records.append((loop.time(), task.stats.last_scheduled_time))  # type: ignore[arg-type]

    task = PeriodicTask("real", interval, work, run_immediately=False)
    origin = loop.time()
    task.start()
    while len(records) < 15:  # noqa: ASYNC110 - a run-count event would add a task to the test
        await asyncio.sleep(0.005)
    await task.stop()
    stats = task.stats
    # The origin is read a moment after start(); all positions share it, so use the first.
    base = records[0][1] - interval
    assert base >= origin - 1e-6
    positions = [(when - base) / interval for _, when in records]
    ticks = [round(p) for p in positions]
    assert positions == pytest.approx(ticks, abs=1e-6)
    assert ticks[0] == 1 and all(b > a for a, b in itertools.pairwise(ticks))
    assert ticks[-1] == stats.runs + stats.skipped
    lateness = sorted(actual - when for actual, when in records)
    assert lateness[0] >= -0.001  # never noticeably early
    assert lateness[len(lateness) // 2] < 0.25  # generous: a noisy shared machine


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "1", True, None, timedelta(0)])
def test_invalid_interval(bad: object) -> None:
    with pytest.raises(InvalidIntervalError) as info:
        PeriodicTask("bad", bad, lambda: None)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and isinstance(info.value, PrismQError)


def test_interval_as_timedelta() -> None:
    assert PeriodicTask("td", timedelta(milliseconds=10), lambda: None).interval == 0.01


@pytest.mark.parametrize(
    "options",
    [
        {"jitter": -0.1},
        {"jitter": math.inf},
        # A jitter of a whole interval or more pushes runs past the next ticks, which were then
        # coalesced and counted as skipped: no longer "never moves the grid".
        {"jitter": 1.0},
        {"jitter": 2.5},
        {"max_consecutive_failures": 0},
    ],
)
def test_invalid_options(options: dict[str, object]) -> None:
    with pytest.raises(InvalidLimitError):
        PeriodicTask("bad", 1.0, lambda: None, **options)  # type: ignore[arg-type]


async def test_invalid_stop_timeout() -> None:
    task = PeriodicTask("t", 1.0, lambda: None)
    with pytest.raises(InvalidTimeoutError):
        await task.stop(timeout=-1)


def test_start_without_a_running_loop_raises() -> None:
    # A RuntimeError, as asyncio's, and like every error of ours a PrismQError (a bare one
    # before: the README's promise broken).
    from prismq_subprocess.exceptions import NoRunningLoopError, PrismQError

    with pytest.raises(RuntimeError) as caught:
        PeriodicTask("t", 1.0, lambda: None).start()
    assert isinstance(caught.value, NoRunningLoopError)
    assert isinstance(caught.value, PrismQError)


def test_start_task_without_a_running_loop_raises_ours() -> None:
    from prismq_subprocess import BackgroundTaskManager, Run, RunRegistry
    from prismq_subprocess.exceptions import NoRunningLoopError

    async def work() -> None:
        pass

    with pytest.raises(NoRunningLoopError, match="running event loop"):
        BackgroundTaskManager(RunRegistry()).start_task(Run(module_id="m"), work())


async def test_an_async_generator_function_is_refused_as_task_func() -> None:
    # Found by an adversarial probe: an async generator function was "run" every tick (its
    # call made a generator, which nothing iterated): its body never ran, and no failure was
    # counted.
    async def ticks() -> AsyncIterator[int]:
        yield 1

    with pytest.raises(InvalidTaskError, match="generator"):
        PeriodicTask("t", 1.0, ticks)


# --- the PrismQ guide's defaults and issue 11 (B8, D13) -------------------------------------


async def test_first_run_is_immediate_by_default_as_in_the_guide() -> None:
    clock = FakeClock()
    seen: list[float] = []
    gate = asyncio.Event()

    async def work() -> None:
        seen.append(clock.now)
        await gate.wait()

    task = fake_task(clock, work, 2.0)
    task.start()
    for _ in range(5):
        await asyncio.sleep(0)
    assert seen == [ORIGIN]
    assert task.stats.next_run_time == pytest.approx(ORIGIN + 2.0)
    gate.set()
    await task.stop()


def test_guide_attributes() -> None:
    async def cleanup(days: int, *, dry: bool) -> None:
        return None

    task = PeriodicTask("cleanup", timedelta(hours=1), cleanup, 30, dry=True)
    assert (task.name, task.task_func, task.args, task.kwargs) == (
        "cleanup",
        cleanup,
        (30,),
        {"dry": True},
    )
    assert task.interval == 3600.0


@pytest.mark.parametrize("bad", [None, 5, "cleanup"])
def test_task_func_must_be_callable(bad: object) -> None:
    with pytest.raises(InvalidTaskError) as info:
        PeriodicTask("bad", 1.0, bad)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and isinstance(info.value, PrismQError)
    assert "task_func" in str(info.value)


@pytest.mark.parametrize("option", ["clock", "sleep"])
async def test_a_task_kwarg_named_like_an_option_that_is_not_callable_is_refused(
    option: str,
) -> None:
    # Found by the session 22 review: the guide passes **kwargs through to task_func, so
    # `PeriodicTask("backup", 60, backup, sleep=2.0)` is the guide's shape for a backup(sleep=)
    # function. `clock` and `sleep` were taken as options unchecked: start() returned, the
    # schedule's task died at once with "'float' object is not callable" ("Task exception was
    # never retrieved"), task_func never ran and stop() said nothing.
    async def backup(**kwargs: object) -> None:
        pass

    with pytest.raises(InvalidTaskError, match=rf"{option}.*functools.partial") as info:
        PeriodicTask("backup", 60.0, backup, **{option: 2.0})  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and isinstance(info.value, PrismQError)


def test_a_sleep_hook_that_is_not_asynchronous_or_a_clock_that_gives_no_number_is_refused() -> None:
    # A probe's find: sleep=time.sleep (blocking the loop for an interval first) and a clock
    # returning a str were accepted; the schedule then died at its first tick, only logged.
    import time

    def noop() -> None:
        pass

    with pytest.raises(InvalidTaskError, match="sleep"):
        PeriodicTask("p", 1.0, noop, sleep=time.sleep)  # type: ignore[arg-type]
    with pytest.raises(InvalidTaskError, match="clock"):
        PeriodicTask("p", 1.0, noop, clock=lambda: "x")  # type: ignore[arg-type, return-value]
    PeriodicTask("p", 1.0, noop, clock=time.monotonic, sleep=asyncio.sleep)  # (fine)


async def test_a_cancelled_error_escaping_a_run_is_a_failure_not_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    done = asyncio.Event()

    async def helper() -> None:
        await asyncio.sleep(3600)

    async def work() -> None:
        # Awaits a helper task that someone else cancels: its CancelledError escapes the run.
        if task.stats.runs == 2:
            clock.halt()
            done.set()
        inner = asyncio.create_task(helper())
        asyncio.get_running_loop().call_soon(inner.cancel)
        await inner

    task = fake_task(clock, work, 1.0)
    with caplog.at_level(logging.ERROR, logger="prismq_subprocess._background._periodic"):
        task.start()
        await asyncio.wait_for(done.wait(), 5)
        for _ in range(5):
            await asyncio.sleep(0)
        assert task.is_running  # the schedule went on after each escaped CancelledError
        await task.stop()
    stats = task.stats
    assert stats.runs == 3 and stats.failures == 3
    assert isinstance(stats.last_error, asyncio.CancelledError)
    assert sum("CancelledError" in r.getMessage() for r in caplog.records) == 3


EXITING_CALLBACKS = """
import asyncio, sys
from prismq_subprocess import PeriodicTask

def sync_exit():
    sys.exit(3)

async def async_exit():
    raise SystemExit(4)

def sync_interrupt():
    raise KeyboardInterrupt

async def main():
    tasks = [PeriodicTask(f.__name__, 0.01, f) for f in (sync_exit, async_exit, sync_interrupt)]
    for task in tasks:
        task.start()
    while any(task.stats.runs < 3 for task in tasks):
        await asyncio.sleep(0.01)
    for task in tasks:
        await task.stop()
        print(task.name, task.stats.runs >= 3, task.stats.failures == task.stats.runs,
              type(task.stats.last_error).__name__)
    print("host survived")

asyncio.run(main())
"""


def test_system_exit_from_a_run_does_not_end_the_host(tmp_path: Path) -> None:
    script = tmp_path / "exiting.py"
    script.write_text(EXITING_CALLBACKS)
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "sync_exit True True SystemExit",
        "async_exit True True SystemExit",
        "sync_interrupt True True KeyboardInterrupt",
        "host survived",
    ]


HUNG_CALLBACK = """
import asyncio, threading
from prismq_subprocess import PeriodicTask

started = threading.Event()

def hangs():
    started.set()
    threading.Event().wait()  # never returns

async def main():
    task = PeriodicTask("hangs", 0.01, hangs)
    task.start()
    await asyncio.to_thread(started.wait)
    await task.stop(timeout=0.1)
    print("stopped", task.is_running)

asyncio.run(main())
print("asyncio.run returned")
"""


def test_a_hung_plain_function_does_not_block_asyncio_run_exit(tmp_path: Path) -> None:
    script = tmp_path / "hung.py"
    script.write_text(HUNG_CALLBACK)
    child = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # A hang guard, not a timing goal: without the fix the child never exits.
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == 0, err
    assert out.splitlines() == ["stopped False", "asyncio.run returned"]


# -- review (session 21): adversarial runs, stop/start races, loops --------------------------


async def test_a_plain_function_raising_stop_iteration_is_a_failure_not_a_hang() -> None:
    # ``next(iter([]))`` in a cleanup function: asyncio refuses StopIteration in a future
    # (TypeError in a loop callback on 3.11/3.12), so the run never ended and the schedule hung
    # with run_in_progress True until stop() timed out.
    calls = 0

    def empty_next() -> None:
        nonlocal calls
        calls += 1
        next(iter([]))

    task = PeriodicTask("stopiteration", 0.01, empty_next)
    task.start()
    try:
        async with asyncio.timeout(30):
            while task.stats.failures < 3:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
    finally:
        await task.stop(timeout=1.0)
    stats = task.stats
    assert stats.runs == stats.failures >= 3
    assert isinstance(stats.last_error, RuntimeError)
    assert isinstance(stats.last_error.__cause__, StopIteration)


class _NotAnException(BaseException):
    """A BaseException subclass of a host's own (neither Exception nor an interrupt)."""


@pytest.mark.parametrize("raised", [GeneratorExit, _NotAnException])
@pytest.mark.parametrize("plain", [False, True], ids=["coroutine", "plain"])
async def test_other_base_exceptions_from_a_run_are_failures_not_the_end(
    raised: type[BaseException], plain: bool, caplog: pytest.LogCaptureFixture
) -> None:
    # They ended the schedule silently: not counted, not logged, is_running False.
    def sync_work() -> None:
        raise raised

    async def async_work() -> None:
        raise raised

    work: Callable[[], object] = sync_work if plain else async_work
    task = PeriodicTask("base", 0.01, work)
    with caplog.at_level(logging.ERROR, logger="prismq_subprocess._background._periodic"):
        task.start()
        try:
            async with asyncio.timeout(30):
                while task.stats.failures < 3:
                    assert task.is_running
                    await asyncio.sleep(0.01)
        finally:
            await task.stop(timeout=1.0)
    assert isinstance(task.stats.last_error, raised)
    assert sum(r.exc_info is not None for r in caplog.records) >= 3


async def test_runs_slower_than_the_interval_do_not_starve_the_event_loop() -> None:
    # An async run doing 20 ms of blocking work with a 5 ms interval: every tick is overdue when
    # it returns, and the schedule ran the next one at once without yielding, for ever: nothing
    # else on the loop (stop() included) ever ran again.
    runs = 0
    # The hang guard is a thread (a starved loop runs no timeout of its own); once it fires, the
    # run yields, which frees the loop so the test can fail instead of hanging.
    rescued = threading.Event()

    async def busy() -> None:
        nonlocal runs
        runs += 1
        time.sleep(0.02)  # noqa: ASYNC251 - blocking on purpose
        if rescued.is_set():
            await asyncio.sleep(0.1)

    task = PeriodicTask("busy", 0.005, busy)
    watchdog = threading.Timer(30, rescued.set)
    watchdog.start()
    task.start()
    try:
        await asyncio.sleep(0.2)
    finally:
        watchdog.cancel()
        await task.stop(timeout=5.0)
    assert not rescued.is_set(), "the schedule starved the event loop"
    assert runs >= 2
    assert task.stats.skipped >= 1


@pytest.mark.parametrize("interval", [1e-6, 1e-9])
async def test_a_tiny_interval_does_not_starve_the_event_loop(interval: float) -> None:
    runs = 0
    rescued = threading.Event()

    async def quick() -> None:
        nonlocal runs
        runs += 1
        if rescued.is_set():
            await asyncio.sleep(0.1)

    task = PeriodicTask("tiny", interval, quick)
    watchdog = threading.Timer(30, rescued.set)
    watchdog.start()
    task.start()
    try:
        await asyncio.sleep(0.1)
    finally:
        watchdog.cancel()
        await task.stop(timeout=5.0)
    assert not rescued.is_set(), "the schedule starved the event loop"
    assert runs >= 1 and not task.is_running


async def _stop_through_wait_for(task: PeriodicTask) -> None:
    # On 3.11 wait_for runs stop() in a task of its own.
    await asyncio.wait_for(task.stop(), 30)


async def _stop_through_a_child_task(task: PeriodicTask) -> None:
    await asyncio.create_task(task.stop())


async def _stop_through_gather(task: PeriodicTask) -> None:
    await asyncio.gather(task.stop())


@pytest.mark.parametrize(
    "how", [_stop_through_wait_for, _stop_through_a_child_task, _stop_through_gather]
)
async def test_a_run_can_stop_its_schedule_from_a_task_of_its_own(
    how: Callable[[PeriodicTask], Awaitable[None]],
) -> None:
    # stop() from a task the run awaits waited its whole timeout for the run (which waited for
    # it), then cancelled the run: 5 s and a cancelled run instead of an immediate stop.
    finished = False

    async def work() -> None:
        nonlocal finished
        await how(task)
        finished = True

    task = PeriodicTask("self-stop", 0.01, work)
    task.start()
    assert task._task is not None
    t0 = time.monotonic()
    async with asyncio.timeout(30):
        await asyncio.wait({task._task})
    assert time.monotonic() - t0 < 4.0  # stop()'s own timeout is 5 s
    assert finished and task.stats.runs == 1 and task.stats.failures == 0
    assert not task.is_running


async def test_a_plain_function_can_stop_its_schedule_through_the_loop() -> None:
    loop = asyncio.get_running_loop()
    finished = threading.Event()

    def work() -> None:
        asyncio.run_coroutine_threadsafe(task.stop(), loop).result(timeout=30)
        finished.set()

    task = PeriodicTask("thread-stop", 0.01, work)
    task.start()
    assert task._task is not None
    t0 = time.monotonic()
    async with asyncio.timeout(30):
        await asyncio.wait({task._task})
    assert time.monotonic() - t0 < 4.0
    assert finished.is_set() and task.stats.runs == 1 and task.stats.failures == 0


async def test_stop_from_a_task_started_by_an_earlier_run_still_waits() -> None:
    # Only the run that is going on may stop without waiting for itself: a task it left behind
    # is an ordinary caller once that run is over.
    clock = FakeClock()
    left_behind: list[asyncio.Task[None]] = []
    release = asyncio.Event()
    second_finished = False

    async def stopper() -> None:
        await release.wait()
        await task.stop(timeout=30)

    async def work() -> None:
        nonlocal second_finished
        if task.stats.runs == 0:
            left_behind.append(asyncio.create_task(stopper()))
        else:
            release.set()
            await asyncio.sleep(0.05)
            second_finished = True
            clock.halt()

    task = fake_task(clock, work, 1.0)
    task.start()
    async with asyncio.timeout(30):
        while not left_behind or not left_behind[0].done():  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    # The stopper waited for the second run to finish.
    assert second_finished and not task.is_running
    assert task.stats.runs == 2


async def test_start_while_a_stop_is_under_way_restarts_once_it_ends(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # start() after stop() began (stop() waiting for the run in progress) was ignored as
    # "already running" and the schedule then ended: the last call did not win.
    started = asyncio.Event()
    runs = 0
    active = 0
    max_active = 0

    async def work() -> None:
        nonlocal runs, active, max_active
        runs += 1
        active += 1
        max_active = max(max_active, active)
        started.set()
        await asyncio.sleep(0.2)
        active -= 1

    task = PeriodicTask("restart", 0.01, work)
    task.start()
    await asyncio.wait_for(started.wait(), 5)
    stopping = asyncio.create_task(task.stop(timeout=10))
    await asyncio.sleep(0.05)
    with caplog.at_level(logging.WARNING, logger="prismq_subprocess._background._periodic"):
        task.start()
    assert not any("already running" in r.getMessage() for r in caplog.records)
    await asyncio.wait_for(stopping, 10)
    assert task.is_running
    async with asyncio.timeout(30):
        while runs < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    await task.stop(timeout=10)
    assert max_active == 1  # the new schedule began once the old run had finished
    assert not task.is_running


async def test_a_run_may_stop_then_start_its_own_schedule_again() -> None:
    clock = FakeClock()

    async def work() -> None:
        if task.stats.runs == 1:
            await task.stop()
            task.start()
        if task.stats.runs == 4:
            clock.halt()

    task = fake_task(clock, work, 1.0)
    task.start()
    async with asyncio.timeout(30):
        while task.stats.runs < 4:  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    assert task.is_running
    await task.stop()
    assert task.stats.failures == 0


async def test_stop_while_a_restart_waits_for_the_old_schedule() -> None:
    started = asyncio.Event()
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1
        started.set()
        await asyncio.sleep(0.2)

    task = PeriodicTask("restart-stop", 0.01, work)
    task.start()
    await asyncio.wait_for(started.wait(), 5)
    first = asyncio.create_task(task.stop(timeout=10))
    await asyncio.sleep(0)
    task.start()
    await asyncio.wait_for(task.stop(timeout=10), 15)
    await asyncio.wait_for(first, 15)
    assert not task.is_running and runs == 1


def test_a_schedule_left_on_a_closed_loop_does_not_block_the_next_loop(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A loop closed with the schedule still pending (a hand-made loop, a test fixture): the
    # task looked running for ever, so start() on the next loop was ignored and stop() raised
    # RuntimeError('Event loop is closed').
    runs = 0

    async def work() -> None:
        nonlocal runs
        runs += 1

    task = PeriodicTask("loops", 0.01, work)

    async def briefly() -> None:
        task.start()
        await asyncio.sleep(0.05)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(briefly())
    finally:
        loop.close()
    left = [task._task]
    assert not task.is_running
    before = runs

    async def again() -> None:
        task.start()
        async with asyncio.timeout(30):
            while runs <= before:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await task.stop()

    with caplog.at_level(logging.WARNING, logger="prismq_subprocess._background._periodic"):
        asyncio.run(again())
    assert not any("already running" in r.getMessage() for r in caplog.records)
    assert runs > before and not task.is_running

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(briefly())
    finally:
        loop.close()
    left.append(task._task)
    asyncio.run(task.stop())  # nothing to stop: no error
    for leftover in left:
        # Left pending by the test on purpose: asyncio's "destroyed but pending" note is right.
        leftover._log_destroy_pending = False  # type: ignore[union-attr]


def _leave_in_a_run_on_a_closed_loop(task: PeriodicTask, in_a_run: Callable[[], bool]) -> None:
    """Start ``task`` on a loop of its own and close that loop once ``in_a_run()`` says a run
    has begun: the schedule and its run are left pending there."""

    async def into_a_run() -> None:
        task.start()
        async with asyncio.timeout(30):
            while not in_a_run():  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(into_a_run())
    finally:
        loop.close()


def test_a_run_left_on_a_closed_loop_is_not_taken_for_one_in_progress_on_the_next(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A loop closed in the middle of a run: the schedule counts as stopped, but the run still
    # counted as in progress. On the next loop stop() then waited its whole timeout for a run
    # that was not there (meanwhile starting a new one, after stop() had been called) and
    # warned "run still going ... cancelling it".
    started = 0

    async def work() -> None:
        nonlocal started
        started += 1
        await asyncio.sleep(3600)

    task = PeriodicTask("loops", 2.0, work, run_immediately=False)
    _leave_in_a_run_on_a_closed_loop(task, lambda: started > 0)
    left = task._task
    assert not task.is_running
    assert not task.stats.run_in_progress
    before = started

    async def start_and_stop() -> float:
        task.start()  # its first run is 2 s away
        await asyncio.sleep(0.1)
        began = time.monotonic()
        await task.stop(timeout=10)
        return time.monotonic() - began

    with caplog.at_level(logging.WARNING, logger="prismq_subprocess._background._periodic"):
        took = asyncio.run(start_and_stop())
    assert started == before  # no run after stop()
    assert took < 1.5
    assert not any("still going" in r.getMessage() for r in caplog.records)
    # What collecting the abandoned schedule does, here rather than in a later test: closing
    # its coroutine, outside the context of its run, raised ValueError from the run's clean-up.
    assert left is not None
    left._log_destroy_pending = False  # type: ignore[attr-defined]
    left.get_coro().close()  # type: ignore[union-attr]


def test_collecting_a_run_left_on_a_closed_loop_leaves_the_next_loops_run_in_progress() -> None:
    # The abandoned run's coroutine is finalised by whichever garbage collection finds it, maybe
    # during a run on the next loop; its clean-up cleared "run in progress", so stop() cancelled
    # that run at once instead of letting it finish.
    started = 0
    finished = 0

    async def work() -> None:
        nonlocal started, finished
        started += 1
        await asyncio.sleep(3600 if started == 1 else 0.5)
        finished += 1

    task = PeriodicTask("loops", 60.0, work)
    _leave_in_a_run_on_a_closed_loop(task, lambda: started > 0)
    left = task._task
    assert left is not None
    left._log_destroy_pending = False  # type: ignore[attr-defined]
    del left

    async def run_through_a_collection() -> bool:
        task.start()
        async with asyncio.timeout(30):
            while started < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        gc.collect()  # finalises the first loop's schedule and run
        in_progress = task.stats.run_in_progress
        await task.stop(timeout=10)  # lets the run in progress finish
        return in_progress

    assert asyncio.run(run_through_a_collection())
    assert finished == 1


@pytest.mark.parametrize("how", ["aclose", "async with"])
def test_closed_in_a_cancelled_anyio_scope_the_run_finishes_and_the_schedule_ends(
    how: str,
) -> None:
    """Closed in the ``finally`` of a cancelled anyio scope (or by leaving ``async with``) while
    a run is in progress: as after asyncio's one-shot cancellation, the run is let finish and
    aclose() returns once the schedule has ended; no run starts afterwards. Awaited directly,
    aclose() was cut short at its first await: the run was cancelled halfway and the schedule
    was still winding down when it returned."""
    seen: dict[str, object] = {}
    started = asyncio.Event()
    finished: list[bool] = []

    async def work() -> None:
        started.set()
        await asyncio.sleep(0.2)
        finished.append(True)

    async def main() -> None:
        task = PeriodicTask("shielded", 0.05, work, run_immediately=True)
        schedule = await closed_by_a_cancelled_scope(task, how, seen, started.wait)
        assert schedule is not None
        seen["schedule done"] = schedule.done()
        seen["finished"] = list(finished)
        runs = task.stats.runs
        await anyio.sleep(0.3)  # six intervals
        seen["runs after"] = task.stats.runs - runs

    anyio.run(main, backend="asyncio")
    assert seen["schedule done"] is True
    assert seen["finished"] == [True]
    assert seen["runs after"] == 0
    if how == "aclose":
        assert seen.get("returned") is True


def test_stop_without_a_timeout_in_a_cancelled_anyio_scope_does_not_hold_the_scope() -> None:
    """``stop(timeout=None)`` waits for the run as long as it takes; shielded from a cancelled
    anyio scope that could hold the scope for ever, so there it is a cancelled stop: the run is
    cancelled and the cancellation propagates at once."""
    seen: dict[str, object] = {}
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.sleep(30)

    async def main() -> None:
        task = PeriodicTask("unbounded", 0.05, work, run_immediately=True)
        task.start()
        schedule = task._task
        assert schedule is not None
        begun = time.monotonic()
        with anyio.move_on_after(0.1):
            try:
                await started.wait()
                await anyio.sleep(30)
            finally:
                await task.stop(timeout=None)
        seen["held"] = time.monotonic() - begun
        await asyncio.wait({schedule}, timeout=5)
        seen["cancelled"] = schedule.cancelled()

    anyio.run(main, backend="asyncio")
    assert seen["held"] < 5
    assert seen["cancelled"] is True


async def test_stop_awaited_on_another_loop_hands_the_stop_to_the_schedules_loop() -> None:
    # Found by an adversarial probe: stop() awaited on a second event loop (another thread's
    # asyncio.run) cancelled the schedule's task from that thread and then waited on it, and
    # the task's end, announced on its own loop, never woke the waiting one: stop() hung
    # forever (its thread with it).
    runs: list[float] = []

    async def beat() -> None:
        runs.append(time.monotonic())

    task = PeriodicTask("beat", 0.05, beat)
    task.start()
    await asyncio.sleep(0.12)
    outcome: list[object] = []

    def stop_elsewhere() -> None:
        try:
            asyncio.run(task.stop(timeout=1.0))
            outcome.append("returned")
        except BaseException as exc:
            outcome.append(exc)

    stopper = threading.Thread(target=stop_elsewhere, daemon=True)
    stopper.start()
    await asyncio.to_thread(stopper.join, 10)
    assert not stopper.is_alive(), "stop() from another loop hung"
    assert outcome == ["returned"]
    assert not task.is_running
    count = len(runs)
    await asyncio.sleep(0.15)
    assert len(runs) == count  # the schedule really ended


def test_a_stop_handed_to_a_loop_that_ends_meanwhile_returns() -> None:
    # A review's find on the hand-over above: the schedule's loop ended while the stop handed
    # to it waited (its asyncio.run() returning: the stop, cancelled by the loop's closing,
    # gave the caller a CancelledError nobody asked for; a loop stopped and closed without
    # running it left the caller waiting for ever). Nothing is left to stop then: it returns.
    async def beat() -> None:
        pass

    task = PeriodicTask("beat", 0.05, beat)
    started = threading.Event()

    async def owner() -> None:
        task.start()
        await asyncio.sleep(0.1)
        started.set()
        time.sleep(0.6)  # noqa: ASYNC251 - the loop busy when the hand-over arrives; then it ends

    thread = threading.Thread(target=asyncio.run, args=(owner(),))
    thread.start()
    try:
        assert started.wait(10)

        async def stop() -> float:
            began = time.monotonic()
            await asyncio.wait_for(task.stop(timeout=1.0), 10)
            assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]
            return time.monotonic() - began

        assert asyncio.run(stop()) < 5.0
    finally:
        thread.join(10)
    assert not task.is_running


async def test_a_restart_waits_for_a_plain_run_a_timed_out_stop_left_in_its_thread() -> None:
    # A probe's find: stop(timeout) abandoned a plain function still running in its thread,
    # start() began a new schedule at once, and its first run overlapped the abandoned one
    # ("runs never overlap"); stats said no run was in progress meanwhile.
    overlap = _Overlap()
    release = threading.Event()

    def job() -> None:
        with overlap.running():
            release.wait(10)

    task = PeriodicTask("cleanup", 5.0, job)
    task.start()
    await asyncio.sleep(0.1)
    await task.stop(timeout=0.1)  # the run goes on in its thread
    assert not task.is_running and task.stats.run_in_progress
    task.start()
    await asyncio.sleep(0.3)
    assert overlap.active == 1 and task.stats.run_in_progress
    assert task.stats.runs == 0
    release.set()
    for _ in range(500):
        if task.stats.runs >= 1:
            break
        await asyncio.sleep(0.01)
    await task.stop(timeout=5)
    assert overlap.peak == 1
    assert task.stats.runs == 1  # the new schedule's run; the abandoned one is not counted
    assert not task.stats.run_in_progress


@pytest.mark.parametrize("interval", [1e-320, 5e-324, 1e-12, 0.9e-9])
def test_an_interval_too_short_to_schedule_is_refused(interval: float | timedelta) -> None:
    # A probe's find: 1e-320 was taken as positive and finite; the schedule then died at its
    # first tick (OverflowError), unseen: is_running went False with no run.
    with pytest.raises(InvalidIntervalError, match="at least"):
        PeriodicTask("tiny", interval, lambda: None)


@pytest.mark.parametrize("value", ["no", 1, None])
def test_run_immediately_must_be_a_bool(value: object) -> None:
    # "no" was taken for True (a probe); admission_wait and admit(wait=) refuse it already.
    with pytest.raises(InvalidArgumentTypeError, match="run_immediately"):
        PeriodicTask("t", 1.0, lambda: None, run_immediately=value)  # type: ignore[arg-type]


async def test_a_schedule_that_dies_of_its_own_error_is_logged_once_and_not_left_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A clock of the host's that raises: the schedule's task died, is_running went False, and
    # (stop() finding nothing running) asyncio reported "Task exception was never retrieved".
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    calls = 0

    def clock() -> float:
        nonlocal calls
        calls += 1
        if calls > 3:
            raise OSError("clock source gone")
        return float(calls)

    runs: list[int] = []
    with caplog.at_level(logging.ERROR):
        task = PeriodicTask("ticking", 0.01, lambda: runs.append(1), clock=clock)
        task.start()
        for _ in range(200):
            if not task.is_running:
                break
            await asyncio.sleep(0.01)
        assert not task.is_running
        await task.stop()
        await asyncio.sleep(0)
    gc.collect()
    await asyncio.sleep(0)
    assert loop_errors == []
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "clock source gone" in str(errors[0].exc_info[1])
    assert "ticking" in errors[0].getMessage()
