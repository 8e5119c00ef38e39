"""Tests of MemoryMonitor, ResourceManager and the psutil reader.

Thresholds, hysteresis and admission run on injected fake readings, never on this machine's
real memory; a few tests only check that the default psutil reader returns sane figures.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable
from datetime import timedelta
from pathlib import Path

import anyio
import psutil
import pytest
from anyio_support import closed_by_a_cancelled_scope
from hypothesis import given, settings
from hypothesis import strategies as st

import prismq_subprocess as pq
from prismq_subprocess._core._exceptions import (
    InvalidArgumentTypeError,
    InvalidIntervalError,
    InvalidLimitError,
    InvalidReadingError,
    InvalidTaskError,
    InvalidTimeoutError,
    PrismQError,
    ResourceLimitException,
    ResourceWaitTimeoutError,
)
from prismq_subprocess._resources._memory_monitor import MIN_CHECK_INTERVAL, MemoryMonitor
from prismq_subprocess._resources._readings import PsutilResourceReader, ResourceSnapshot
from prismq_subprocess._resources._resource_manager import ResourceManager

GiB = 1 << 30


class FakeReader:
    """Serves scripted readings; the last one repeats. Safe to call from worker threads."""

    def __init__(
        self,
        percents: Iterable[float] = (50.0,),
        *,
        available: int = 8 * GiB,
        cpu: float | None = None,
    ) -> None:
        self.percents = list(percents)
        self.available = available
        self.cpu = cpu
        self.calls = 0

    def __call__(self) -> ResourceSnapshot:
        index = min(self.calls, len(self.percents) - 1)
        self.calls += 1
        return ResourceSnapshot(
            memory_percent=self.percents[index],
            available_bytes=self.available,
            total_bytes=16 * GiB,
            cpu_percent=self.cpu,
        )


# --- MemoryMonitor ---------------------------------------------------------------------------


def test_check_memory_compares_with_the_limit_and_keeps_the_latest_reading() -> None:
    fired: list[str] = []
    reader = FakeReader([79.9, 80.0, 95.0])
    monitor = MemoryMonitor(80.0, reader=reader, on_high=lambda s: fired.append("high"))
    assert monitor.latest is None
    assert monitor.check_memory() is True
    assert monitor.check_memory() is False
    assert monitor.check_memory() is False
    assert monitor.latest is not None and monitor.latest.memory_percent == 95.0
    # check_memory is a plain query: no state change, no callbacks.
    assert fired == [] and not monitor.is_high


async def test_check_memory_async() -> None:
    monitor = MemoryMonitor(80.0, reader=FakeReader([10.0, 90.0]))
    assert await monitor.check_memory_async() is True
    assert await monitor.check_memory_async() is False


async def test_hysteresis_fires_once_per_crossing_with_sync_and_async_callbacks() -> None:
    events: list[tuple[str, float]] = []

    async def on_high(snapshot: ResourceSnapshot) -> None:
        await asyncio.sleep(0)
        events.append(("high", snapshot.memory_percent))

    def on_low(snapshot: ResourceSnapshot) -> None:
        events.append(("low", snapshot.memory_percent))

    readings = [50, 79.9, 80, 85, 78, 76, 75.5, 75, 79, 81, 60]
    monitor = MemoryMonitor(
        80.0, hysteresis=5.0, on_high=on_high, on_low=on_low, reader=FakeReader(readings)
    )
    states = []
    for _ in readings:
        await monitor.poll()
        states.append(monitor.is_high)
    assert events == [("high", 80), ("low", 75), ("high", 81), ("low", 60)]
    assert states == [False, False, True, True, True, True, True, False, False, True, False]


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.floats(min_value=0, max_value=100), min_size=1, max_size=40),
    st.floats(min_value=0, max_value=20),
)
def test_hysteresis_never_flaps(readings: list[float], hysteresis: float) -> None:
    limit = 70.0
    events: list[tuple[str, float]] = []

    async def scenario() -> None:
        monitor = MemoryMonitor(
            limit,
            hysteresis=hysteresis,
            on_high=lambda s: events.append(("high", s.memory_percent)),
            on_low=lambda s: events.append(("low", s.memory_percent)),
            reader=FakeReader(readings),
        )
        for _ in readings:
            await monitor.poll()

    asyncio.run(scenario())
    kinds = [kind for kind, _ in events]
    assert kinds == ["high", "low"] * (len(kinds) // 2) + ["high"] * (len(kinds) % 2)
    for kind, percent in events:
        if kind == "high":
            assert percent >= limit
        else:
            assert percent <= limit - hysteresis
    # Every transition is caused by a reading on the far side of the band, so the number of
    # transitions is exactly what a reference state machine predicts.
    high = False
    expected = 0
    for percent in readings:
        if (not high and percent >= limit) or (high and percent <= limit - hysteresis):
            high = not high
            expected += 1
    assert len(events) == expected


async def test_monitor_continuously_until_stopped(caplog: pytest.LogCaptureFixture) -> None:
    reader = FakeReader([50, 90, 90, 40])
    highs = asyncio.Event()
    lows = asyncio.Event()
    monitor = MemoryMonitor(
        80.0,
        check_interval=0.1,
        on_high=lambda s: highs.set(),
        on_low=lambda s: lows.set(),
        reader=reader,
    )
    task = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.wait_for(lows.wait(), 5)
    assert highs.is_set() and monitor.is_monitoring
    with caplog.at_level(logging.WARNING, logger="prismq_subprocess._resources._memory_monitor"):
        await monitor.monitor_continuously()  # second call returns at once
    assert any("already monitoring" in r.getMessage() for r in caplog.records)
    monitor.stop_monitoring()
    await asyncio.wait_for(task, 1)
    assert not monitor.is_monitoring
    calls = reader.calls
    await asyncio.sleep(0.3)  # three intervals: no reading after the stop
    assert reader.calls == calls


async def test_stop_monitoring_returns_without_waiting_out_the_interval() -> None:
    monitor = MemoryMonitor(80.0, check_interval=60, reader=FakeReader())
    task = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.sleep(0.05)
    monitor.stop_monitoring()
    await asyncio.wait_for(task, 1)


async def test_failing_reader_and_callback_are_logged_and_monitoring_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0
    done = asyncio.Event()

    def reader() -> ResourceSnapshot:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("no /proc")
        if calls >= 4:
            done.set()
        return ResourceSnapshot(memory_percent=99.0, available_bytes=1, total_bytes=2)

    def on_high(snapshot: ResourceSnapshot) -> None:
        raise RuntimeError("callback bug")

    monitor = MemoryMonitor(80.0, check_interval=0.1, on_high=on_high, reader=reader)
    with caplog.at_level(logging.ERROR):
        task = asyncio.create_task(monitor.monitor_continuously())
        await asyncio.wait_for(done.wait(), 5)
        monitor.stop_monitoring()
        await asyncio.wait_for(task, 1)
    messages = [r.getMessage() for r in caplog.records if r.exc_info]
    assert any("memory reading failed" in m for m in messages)
    assert any("on_high callback" in m for m in messages)
    assert monitor.is_high


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_callback_calling_sys_exit_is_logged_and_does_not_end_the_host(
    caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    # A probe's find: sys.exit() in an alert helper ended the web server (SystemExit went
    # through the monitoring task and asyncio.run); the docs say callback errors are logged
    # (PeriodicTask already treats SystemExit from user code as a failed run).
    readings = iter([99.0, 10.0, 99.0])

    def reader() -> ResourceSnapshot:
        percent = next(readings)
        return ResourceSnapshot(memory_percent=percent, available_bytes=1, total_bytes=2)

    def sync_exit(snapshot: ResourceSnapshot) -> None:
        sys.exit(f"alert helper exited at {snapshot.memory_percent}")

    async def async_exit(snapshot: ResourceSnapshot) -> None:
        await asyncio.sleep(0)
        sys.exit(f"alert helper exited at {snapshot.memory_percent}")

    callback = sync_exit if kind == "sync" else async_exit
    monitor = MemoryMonitor(80.0, on_high=callback, on_low=callback, reader=reader)
    with caplog.at_level(logging.ERROR):
        for expected in (99.0, 10.0, 99.0):
            assert (await monitor.poll()).memory_percent == expected
    messages = [r.getMessage() for r in caplog.records if r.exc_info]
    assert [m.split(" callback")[0] for m in messages] == ["on_high", "on_low", "on_high"]


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"max_memory_percent": 0}, InvalidLimitError),
        ({"max_memory_percent": 100.5}, InvalidLimitError),
        ({"max_memory_percent": math.nan}, InvalidLimitError),
        ({"max_memory_percent": True}, InvalidLimitError),
        ({"hysteresis": -1}, InvalidLimitError),
        ({"hysteresis": 80}, InvalidLimitError),
        ({"check_interval": 0}, InvalidIntervalError),
        ({"check_interval": math.inf}, InvalidIntervalError),
    ],
)
def test_memory_monitor_validation(args: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error) as info:
        MemoryMonitor(reader=FakeReader(), **args)  # type: ignore[arg-type]
    assert isinstance(info.value, PrismQError) and isinstance(info.value, ValueError)


def test_a_low_threshold_needs_no_hysteresis_argument() -> None:
    # MemoryMonitor(max_memory_percent=1.0) used to fail on the default 5-point hysteresis.
    monitor = MemoryMonitor(max_memory_percent=1.0, reader=FakeReader())
    assert monitor.max_memory_percent == 1.0 and 0 <= monitor.hysteresis < 1.0
    assert MemoryMonitor(reader=FakeReader()).hysteresis == 5.0
    with pytest.raises(InvalidLimitError) as info:
        MemoryMonitor(max_memory_percent=1.0, hysteresis=5.0, reader=FakeReader())
    message = str(info.value)
    assert "hysteresis (5.0)" in message and "max_memory_percent (1.0)" in message


@pytest.mark.parametrize("bad", [0.05, 1e-9, timedelta(milliseconds=5)])
def test_check_interval_below_the_floor_is_refused(bad: object) -> None:
    with pytest.raises(InvalidIntervalError, match="at least"):
        MemoryMonitor(check_interval=bad, reader=FakeReader())  # type: ignore[arg-type]
    MemoryMonitor(check_interval=MIN_CHECK_INTERVAL, reader=FakeReader())


@pytest.mark.parametrize("bad", [{"on_high": 5}, {"on_low": "log"}])
def test_callbacks_must_be_callable(bad: dict[str, object]) -> None:
    with pytest.raises(InvalidTaskError) as info:
        MemoryMonitor(reader=FakeReader(), **bad)  # type: ignore[arg-type]
    assert isinstance(info.value, TypeError) and isinstance(info.value, PrismQError)


def test_monitor_is_reusable_across_asyncio_run_calls() -> None:
    monitor = MemoryMonitor(80.0, check_interval=0.1, reader=FakeReader([50.0]))

    async def watch_briefly() -> None:
        task = asyncio.create_task(monitor.monitor_continuously())
        await asyncio.sleep(0.15)
        monitor.stop_monitoring()
        await asyncio.wait_for(task, 5)

    for _ in range(3):
        asyncio.run(watch_briefly())
    assert not monitor.is_monitoring


async def test_a_hanging_callback_does_not_keep_monitoring_alive() -> None:
    entered = asyncio.Event()
    cancelled = asyncio.Event()

    async def on_high(snapshot: ResourceSnapshot) -> None:
        entered.set()
        try:
            await asyncio.Event().wait()  # never returns
        except asyncio.CancelledError:
            cancelled.set()
            raise

    monitor = MemoryMonitor(80.0, check_interval=0.1, on_high=on_high, reader=FakeReader([95.0]))
    task = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.wait_for(entered.wait(), 5)
    monitor.stop_monitoring()
    await asyncio.wait_for(task, 5)  # a hang guard: without the fix this never returns
    assert cancelled.is_set() and not monitor.is_monitoring


# --- ResourceManager -------------------------------------------------------------------------


async def test_check_resources_detailed_names_each_failed_limit_and_by_how_much() -> None:
    reader = FakeReader([93.0], available=GiB // 2, cpu=97.5)
    manager = ResourceManager(
        max_memory_percent=90.0, max_cpu_percent=95.0, min_available_bytes=GiB, reader=reader
    )
    check = await manager.check_resources_detailed()
    assert not check.ok and not check
    found = {v.limit: v for v in check.violations}
    assert set(found) == {"memory_percent", "cpu_percent", "available_bytes"}
    assert found["memory_percent"].excess == pytest.approx(3.0)
    assert found["cpu_percent"].excess == pytest.approx(2.5)
    assert found["available_bytes"].excess == GiB // 2
    assert "memory_percent 93.0 > 90.0" in check.reason
    assert "short by" in check.reason
    assert await manager.check_resources() is False


async def test_check_resources_passes_under_the_limits_and_ignores_unmeasured_cpu() -> None:
    manager = ResourceManager(90.0, max_cpu_percent=50.0, reader=FakeReader([89.9], cpu=None))
    check = await manager.check_resources_detailed()
    assert check.ok and check.violations == () and check.reason == ""
    assert await manager.check_resources() is True


async def test_cpu_limit_is_off_by_default() -> None:
    manager = ResourceManager(90.0, reader=FakeReader([10.0], cpu=100.0))
    assert await manager.check_resources()


async def test_admit_without_waiting_raises_at_once() -> None:
    manager = ResourceManager(80.0, reader=FakeReader([85.0]), poll_interval=10)
    with pytest.raises(ResourceLimitException, match=r"memory_percent 85\.0 > 80\.0") as info:
        await asyncio.wait_for(manager.admit(wait=False), 1)
    assert not isinstance(info.value, TimeoutError)


async def test_admit_waits_until_resources_free_up() -> None:
    reader = FakeReader([95.0, 95.0, 95.0, 60.0])
    manager = ResourceManager(80.0, reader=reader, poll_interval=0.01)
    check = await asyncio.wait_for(manager.admit(timeout=5), 6)
    assert check.ok and check.snapshot.memory_percent == 60.0
    assert reader.calls == 4


async def test_admit_times_out_with_a_timeout_error() -> None:
    manager = ResourceManager(80.0, reader=FakeReader([99.0]), poll_interval=0.01)
    with pytest.raises(ResourceWaitTimeoutError) as info:
        await asyncio.wait_for(manager.admit(wait=True, timeout=0.05), 5)
    assert isinstance(info.value, ResourceLimitException)
    assert isinstance(info.value, TimeoutError)
    assert "memory_percent 99.0" in str(info.value)


async def test_a_reader_timing_out_while_admit_waits_is_its_own_error() -> None:
    # A host's reader (a metrics endpoint, say) raising TimeoutError is not the admission
    # timeout: no timeout was set and none elapsed, so it propagates as itself.
    calls = 0

    def reader() -> ResourceSnapshot:
        nonlocal calls
        calls += 1
        if calls == 1:
            return ResourceSnapshot(memory_percent=99.0, available_bytes=GiB, total_bytes=16 * GiB)
        raise TimeoutError("metrics endpoint did not answer")

    manager = ResourceManager(90.0, reader=reader, poll_interval=0.01)
    for timeout in (None, 30.0):
        calls = 0
        with pytest.raises(TimeoutError, match="metrics endpoint") as info:
            await asyncio.wait_for(manager.admit(timeout=timeout), 5)
        assert not isinstance(info.value, ResourceWaitTimeoutError)


async def test_admit_returns_at_once_when_resources_are_fine() -> None:
    reader = FakeReader([10.0])
    manager = ResourceManager(80.0, reader=reader, poll_interval=10)
    assert (await asyncio.wait_for(manager.admit(timeout=0), 1)).ok
    assert reader.calls == 1


async def test_cancelling_a_waiting_admit() -> None:
    manager = ResourceManager(80.0, reader=FakeReader([99.0]), poll_interval=0.01)
    task = asyncio.create_task(manager.admit())
    await asyncio.sleep(0.05)
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_admit_rejects_a_bad_timeout() -> None:
    manager = ResourceManager(80.0, reader=FakeReader([99.0]))
    with pytest.raises(InvalidTimeoutError):
        await manager.admit(timeout=-1)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"max_memory_percent": 0}, InvalidLimitError),
        ({"max_cpu_percent": 150}, InvalidLimitError),
        ({"min_available_bytes": -1}, InvalidLimitError),
        ({"min_available_bytes": math.inf}, InvalidLimitError),
        ({"poll_interval": -0.5}, InvalidIntervalError),
    ],
)
def test_resource_manager_validation(args: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        ResourceManager(reader=FakeReader(), **args)  # type: ignore[arg-type]


# --- the default psutil reader (sanity only: the machine's figures are not asserted) ---------


async def test_psutil_reader_reads_this_process_and_its_children() -> None:
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(30)"
    )
    try:
        await asyncio.sleep(0.2)  # let the interpreter start so it has some RSS
        snapshot = await asyncio.to_thread(PsutilResourceReader(measure_cpu=False))
    finally:
        child.kill()
        await child.wait()
    assert 0 < snapshot.memory_percent <= 100
    assert 0 < snapshot.available_bytes <= snapshot.total_bytes
    assert snapshot.process_rss_bytes > 1 << 20
    assert snapshot.children_rss_bytes > 1 << 20
    assert snapshot.cpu_percent is None


async def test_default_reader_measures_cpu_with_a_primed_baseline() -> None:
    manager = ResourceManager(max_memory_percent=100, max_cpu_percent=100)
    check = await manager.check_resources_detailed()
    cpu = check.snapshot.cpu_percent
    assert cpu is not None and 0.0 <= cpu <= 100.0
    monitor = MemoryMonitor(100)
    assert isinstance(await monitor.check_memory_async(), bool)
    assert monitor.latest is not None and monitor.latest.cpu_percent is None


# --- review of session 21: restarts, other threads, forks, bad input, the loop's time ---------


def _slow_reading() -> ResourceSnapshot:
    time.sleep(0.2)  # a reading in flight when the stop comes
    return ResourceSnapshot(memory_percent=50.0, available_bytes=GiB, total_bytes=16 * GiB)


async def test_monitoring_restarted_while_the_last_loop_winds_down_runs() -> None:
    # stop_monitoring() cancels a reading in progress; the loop ends a moment later. A restart
    # in that moment was ignored ("already monitoring"), and then nothing monitored at all.
    monitor = MemoryMonitor(80.0, check_interval=0.1, reader=_slow_reading)
    first = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.sleep(0.05)  # inside the first (0.2 s) reading
    monitor.stop_monitoring()
    second = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.wait_for(first, 5)
    await asyncio.sleep(0.5)
    assert monitor.is_monitoring and not second.done()
    monitor.stop_monitoring()
    await asyncio.wait_for(second, 5)
    assert not monitor.is_monitoring


async def test_a_restart_stopped_before_the_last_loop_ended_does_not_run() -> None:
    monitor = MemoryMonitor(80.0, check_interval=0.1, reader=_slow_reading)
    first = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.sleep(0.05)
    monitor.stop_monitoring()
    second = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.sleep(0)  # the restart is waiting for the first loop to end
    monitor.stop_monitoring()  # the last word is "stop"
    await asyncio.wait_for(asyncio.gather(first, second), 5)
    assert not monitor.is_monitoring


async def test_async_with_entered_again_while_aclose_winds_down_monitors() -> None:
    monitor = MemoryMonitor(80.0, check_interval=0.1, reader=_slow_reading)
    await monitor.__aenter__()
    await asyncio.sleep(0.05)
    closing = asyncio.create_task(monitor.aclose())
    await asyncio.sleep(0)
    await monitor.__aenter__()
    await asyncio.wait_for(closing, 5)
    await asyncio.sleep(0.5)
    assert monitor.is_monitoring
    await asyncio.wait_for(monitor.aclose(), 5)
    assert not monitor.is_monitoring


async def test_aclose_right_after_async_with_entry_stops_the_loop_not_yet_started() -> None:
    monitor = MemoryMonitor(80.0, check_interval=0.1, reader=_slow_reading)
    first = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.sleep(0.05)
    monitor.stop_monitoring()
    await monitor.__aenter__()  # queued behind the loop winding down
    await asyncio.wait_for(monitor.aclose(), 5)
    await asyncio.wait_for(first, 5)
    await asyncio.sleep(0.3)
    assert not monitor.is_monitoring


@pytest.mark.parametrize("how", ["stop_monitoring", "aclose", "stop_from_a_thread"])
async def test_a_stop_before_the_monitoring_task_first_ran_ends_it(how: str) -> None:
    # A probe's find: the guide's pattern (a task for monitor_continuously(), later
    # stop_monitoring(), then await the task) hung when the stop came before the task's first
    # step (a fast shutdown, a test): the call had been made, but its stop request was only
    # registered once it ran, so the stop was dropped and monitoring went on for good.
    monitor = MemoryMonitor(80.0, check_interval=0.1, reader=FakeReader())
    task = asyncio.create_task(monitor.monitor_continuously())
    if how == "stop_monitoring":
        monitor.stop_monitoring()
    elif how == "aclose":
        await monitor.aclose()
    else:
        await asyncio.to_thread(monitor.stop_monitoring)
    await asyncio.wait_for(task, 5)
    assert not monitor.is_monitoring
    # A stop does not pre-empt a later call: monitoring starts again, and stops again.
    again = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.sleep(0.2)
    assert monitor.is_monitoring
    monitor.stop_monitoring()
    await asyncio.wait_for(again, 5)


async def test_a_monitoring_call_never_awaited_blocks_nothing() -> None:
    monitor = MemoryMonitor(80.0, check_interval=0.1, reader=FakeReader())
    dropped = monitor.monitor_continuously()
    dropped.close()  # (a coroutine made and thrown away)
    del dropped
    gc.collect()
    task = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.sleep(0.2)
    assert monitor.is_monitoring
    monitor.stop_monitoring()
    await asyncio.wait_for(task, 5)


def test_monitoring_started_by_asyncio_run_itself_is_stopped_by_its_task() -> None:
    monitor = MemoryMonitor(80.0, check_interval=0.1, reader=FakeReader())

    async def stop_soon() -> None:
        await asyncio.sleep(0.3)
        monitor.stop_monitoring()

    async def main() -> None:
        stopper = asyncio.create_task(stop_soon())
        await asyncio.wait_for(monitor.monitor_continuously(), 5)
        await stopper

    asyncio.run(main())
    assert not monitor.is_monitoring


def test_stop_monitoring_from_another_thread_stops_at_once() -> None:
    # A sync FastAPI endpoint runs in a worker thread. Event.set() from there did not wake the
    # loop: monitoring went on for up to check_interval (and debug mode raised RuntimeError).
    async def scenario() -> float:
        monitor = MemoryMonitor(80.0, check_interval=60, reader=FakeReader())
        task = asyncio.create_task(monitor.monitor_continuously())
        await asyncio.sleep(0.2)

        def stop_later() -> None:
            time.sleep(0.3)  # the loop is asleep in its 60 s wait by now
            monitor.stop_monitoring()

        thread = threading.Thread(target=stop_later)
        started = time.monotonic()
        thread.start()
        await asyncio.wait_for(task, 30)
        thread.join()
        assert not monitor.is_monitoring
        return time.monotonic() - started

    assert asyncio.run(scenario()) < 20
    assert asyncio.run(scenario(), debug=True) < 20


def test_a_monitor_left_running_by_a_closed_loop_can_be_stopped_and_used_again() -> None:
    monitor = MemoryMonitor(80.0, check_interval=60, reader=FakeReader())

    async def start() -> asyncio.Task[None]:
        task = asyncio.create_task(monitor.monitor_continuously())
        await asyncio.sleep(0.1)
        return task

    loop = asyncio.new_event_loop()
    try:
        task = loop.run_until_complete(start())
    finally:
        loop.close()  # the monitoring task is left pending
    assert not task.done()
    thread = threading.Thread(target=monitor.stop_monitoring)  # must not raise
    thread.start()
    thread.join()

    async def watch_briefly() -> bool:
        async with monitor:
            await asyncio.sleep(0.2)
            return monitor.is_monitoring

    assert asyncio.run(watch_briefly())


async def test_sync_check_memory_does_not_walk_the_process_tree_on_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # check_memory() (the guide's, called from async code) listed every process to sum the
    # children's RSS: 185 ms on the loop with 1000 children, for a figure it does not use.
    walks: list[int] = []
    real_children = psutil.Process.children

    def counting_children(self: psutil.Process, recursive: bool = False) -> list[psutil.Process]:
        walks.append(self.pid)
        return real_children(self, recursive=recursive)

    monkeypatch.setattr(psutil.Process, "children", counting_children)
    monitor = MemoryMonitor(80.0)
    assert isinstance(monitor.check_memory(), bool)
    assert walks == []
    assert monitor.latest is not None and 0 < monitor.latest.memory_percent <= 100
    assert monitor.latest.process_rss_bytes > 0
    await monitor.check_memory_async()  # in a worker thread: the whole reading
    assert walks == [os.getpid()]


@pytest.mark.parametrize(
    "make",
    [
        lambda: MemoryMonitor(reader=5),  # type: ignore[arg-type]
        lambda: MemoryMonitor(reader="psutil"),  # type: ignore[arg-type]
        lambda: ResourceManager(reader=5),  # type: ignore[arg-type]
    ],
    ids=["monitor-int", "monitor-str", "manager-int"],
)
def test_a_reader_that_is_not_callable_is_refused(make: Callable[[], object]) -> None:
    # Accepted, every reading failed: the monitor logged an error each interval for ever, the
    # manager's checks raised a bare TypeError at the first admission.
    with pytest.raises(InvalidTaskError, match="reader") as info:
        make()
    assert isinstance(info.value, TypeError) and isinstance(info.value, PrismQError)


@pytest.mark.parametrize("bad", [math.inf, math.nan, -1.0, "0.1", True, None])
def test_psutil_reader_refuses_a_bad_min_cpu_interval(bad: object) -> None:
    # inf raised OverflowError from time.sleep in the worker thread; a str a bare TypeError.
    with pytest.raises(InvalidIntervalError, match="min_cpu_interval"):
        PsutilResourceReader(min_cpu_interval=bad)  # type: ignore[arg-type]
    assert PsutilResourceReader(measure_cpu=False, min_cpu_interval=0)().cpu_percent is None


# A worker forked from a host (gunicorn --preload, a "fork" multiprocessing pool) while one of
# the host's threads is inside the first CPU reading (holding the reader's lock, sleeping).
_FORK_READER_SCRIPT = """
import os, subprocess, sys, threading, time
from prismq_subprocess import PsutilResourceReader

reader = PsutilResourceReader(min_cpu_interval=2.0)
big = subprocess.Popen([sys.executable, "-c", "b = b'x' * (40 << 20); import time; time.sleep(60)"])
time.sleep(1.0)
threading.Thread(target=reader, daemon=True).start()
time.sleep(0.3)  # the thread holds the reader's lock for about 2 s
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    snapshot = reader()
    os.write(w, f"{snapshot.process_rss_bytes > 0} {snapshot.children_rss_bytes}".encode())
    os._exit(0)
deadline = time.monotonic() + 20
while os.waitpid(pid, os.WNOHANG) == (0, 0):
    if time.monotonic() > deadline:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        print("child hung")
        break
    time.sleep(0.05)
else:
    print(os.read(r, 100).decode())
parent = reader()
print(parent.children_rss_bytes > (30 << 20))
big.kill()
big.wait()
"""


def run_forking_script(script: str) -> list[str]:
    """Run ``script`` (it forks: Python 3.12+ warns of that in a threaded process) in a fresh
    interpreter, with a deadline; its first two lines of output."""
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", script],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.split("\n")[:2]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_the_psutil_reader_in_a_forked_child_reads_the_child() -> None:
    # It kept the parent's psutil.Process: the worker reported the parent's RSS and the RSS of
    # the parent's children (every other worker included) as its own; and a lock held at the
    # fork hung its first CPU reading for good.
    first_lines = run_forking_script(_FORK_READER_SCRIPT)
    assert first_lines == ["True 0", "True"]


# A host forking while it monitors (a worker started from inside a running app): the child's
# copies believed the parent's tasks ran, so they refused to start in the child's own loop.
_FORK_MONITOR_SCRIPT = """
import asyncio, os, subprocess, sys, threading, time
import prismq_subprocess as pq

def fake():
    return pq.ResourceSnapshot(memory_percent=50.0, available_bytes=1, total_bytes=2)

sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
monitor = pq.MemoryMonitor(check_interval=0.1, reader=fake)
sampler = pq.ProcessTreeSampler(sleeper.pid, interval=0.05)

async def in_child() -> str:
    task = asyncio.create_task(monitor.monitor_continuously())
    sampler.start()
    before = sampler.samples
    await asyncio.sleep(0.5)
    sampled = sampler.samples > before
    result = f"{monitor.is_monitoring} {task.done()} {sampler.is_running} {sampled}"
    monitor.stop_monitoring()
    await sampler.stop()
    await asyncio.wait_for(task, 5)
    return result

async def parent() -> None:
    task = asyncio.create_task(monitor.monitor_continuously())
    sampler.start()
    await asyncio.sleep(0.3)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        out = []
        thread = threading.Thread(target=lambda: out.append(asyncio.run(in_child())))
        thread.start()
        thread.join()
        os.write(w, (out[0] if out else "failed").encode())
        os._exit(0)
    deadline = time.monotonic() + 20
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.write(w, b"child hung")
            break
        await asyncio.sleep(0.05)
    print(os.read(r, 100).decode())
    print(monitor.is_monitoring, sampler.is_running)
    monitor.stop_monitoring()
    await sampler.stop()
    await asyncio.wait_for(task, 5)

asyncio.run(parent())
sleeper.kill()
sleeper.wait()
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_can_monitor_and_sample_in_its_own_loop() -> None:
    first_lines = run_forking_script(_FORK_MONITOR_SCRIPT)
    # The child: monitoring and sampling; the parent: its own still running, untouched.
    assert first_lines == ["True False True True", "True True"]


async def test_a_monitor_whose_task_was_cancelled_before_it_ran_can_monitor_again() -> None:
    monitor = MemoryMonitor(80.0, check_interval=0.1, reader=FakeReader())
    await monitor.__aenter__()
    assert monitor._task is not None
    task = monitor._task
    task.cancel()  # e.g. the host's shutdown cancelling every task
    await asyncio.wait({task})
    await asyncio.sleep(0)  # its done callbacks
    async with monitor:
        await asyncio.sleep(0.3)
        assert monitor.is_monitoring
    assert not monitor.is_monitoring


def test_a_monitor_entered_in_a_loop_closed_inside_the_block_monitors_in_the_next() -> None:
    monitor = MemoryMonitor(80.0, check_interval=60, reader=FakeReader())
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(monitor.__aenter__())  # the block never left: the host died
        loop.run_until_complete(asyncio.sleep(0.1))
    finally:
        loop.close()

    async def watch_briefly() -> bool:
        async with monitor:
            await asyncio.sleep(0.2)
            return monitor.is_monitoring

    assert asyncio.run(watch_briefly())
    assert not monitor.is_monitoring


def test_a_monitor_keeps_monitoring_when_the_closed_loops_task_is_collected() -> None:
    # The task left pending in the closed loop is a reference cycle; when a garbage collection
    # finalises its coroutine, the coroutine's clean-up runs, and it must not end the new loop's
    # monitoring (CI saw is_monitoring False inside the new block when that collection happened).
    monitor = MemoryMonitor(80.0, check_interval=60, reader=FakeReader())
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(monitor.__aenter__())
        loop.run_until_complete(asyncio.sleep(0.1))
    finally:
        loop.close()
    del loop

    async def watch_through_a_collection() -> bool:
        async with monitor:
            await asyncio.sleep(0.1)
            gc.collect()
            await asyncio.sleep(0.1)
            return monitor.is_monitoring

    assert asyncio.run(watch_through_a_collection())
    assert not monitor.is_monitoring


@pytest.mark.parametrize("how", ["aclose", "async with"])
def test_closed_in_a_cancelled_anyio_scope_monitoring_has_ended(how: str) -> None:
    """Closed in the ``finally`` of a cancelled anyio scope (or by leaving ``async with``) during
    a reading: aclose() returns once the monitoring task has ended, as after asyncio's one-shot
    cancellation; no reading follows. Awaited directly, it was cut short at its first await and
    returned with the task still running."""
    seen: dict[str, object] = {}
    calls = 0

    def reading() -> ResourceSnapshot:
        nonlocal calls
        calls += 1
        return _slow_reading()

    async def main() -> None:
        monitor = MemoryMonitor(80.0, check_interval=0.1, reader=reading)
        # The scope is cancelled inside the first (0.2 s) reading.
        task = await closed_by_a_cancelled_scope(monitor, how, seen)
        assert task is not None
        seen["task done"] = task.done()
        seen["monitoring"] = monitor.is_monitoring
        before = calls
        await anyio.sleep(0.5)  # five intervals
        seen["readings after"] = calls - before

    anyio.run(main, backend="asyncio")
    assert seen["task done"] is True
    assert seen["monitoring"] is False
    assert seen["readings after"] == 0
    if how == "aclose":
        assert seen.get("returned") is True


def _reading(percent: float = 50.0, **fields: object) -> object:
    from prismq_subprocess import ResourceSnapshot

    values: dict[str, object] = {
        "memory_percent": percent,
        "available_bytes": 1 << 30,
        "total_bytes": 4 << 30,
    }
    values.update(fields)
    return ResourceSnapshot(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "reading",
    [
        lambda: _reading(math.nan),
        lambda: _reading(cpu_percent=math.nan),
        lambda: _reading(available_bytes=-1),
        lambda: _reading(total_bytes="4G"),
        lambda: _reading(available_bytes=math.inf),
        lambda: None,
        lambda: {"memory_percent": 99.0},
    ],
    ids=["nan-memory", "nan-cpu", "negative-bytes", "str-bytes", "inf-bytes", "none", "dict"],
)
@pytest.mark.parametrize("user", ["admit", "monitor poll", "check_memory"])
async def test_a_reading_that_cannot_be_judged_is_refused_not_passed(
    reading: Callable[[], object], user: str
) -> None:
    # Found by an adversarial probe: a host's reader returning NaN turned admission control
    # and the monitor off without a word (NaN >= limit is False: every start admitted, memory
    # never "high"); None or a dict failed with a bare AttributeError.
    from prismq_subprocess import MemoryMonitor, ResourceManager
    from prismq_subprocess.exceptions import InvalidReadingError, PrismQError

    with pytest.raises(InvalidReadingError, match="reader") as caught:
        if user == "admit":
            await ResourceManager(90.0, reader=reading, max_cpu_percent=90.0).admit(wait=False)
        elif user == "monitor poll":
            await MemoryMonitor(80.0, reader=reading).poll()
        else:
            MemoryMonitor(80.0, reader=reading).check_memory()
    assert isinstance(caught.value, PrismQError)


@pytest.mark.parametrize("make", ["ResourceManager", "MemoryMonitor"])
def test_a_coroutine_function_as_reader_is_refused_at_once(make: str) -> None:
    # A reader runs in a worker thread, so an async one only returned a coroutine (never
    # awaited) and failed every reading with a bare AttributeError.
    import prismq_subprocess as pq

    async def reader() -> object:
        return _reading()

    with pytest.raises(InvalidTaskError, match="reader"):
        getattr(pq, make)(80.0, reader=reader)


async def test_a_reading_with_float_byte_counts_is_judged() -> None:
    # Byte counts from a host's metrics library may be floats (or numpy numbers): compared
    # with the limits as they are, not refused.
    from prismq_subprocess import ResourceManager

    reading = _reading(95.0, available_bytes=1.5e9, total_bytes=4e9)
    check = await ResourceManager(90.0, reader=lambda: reading).check_resources_detailed()
    assert not check.ok and [v.limit for v in check.violations] == ["memory_percent"]


@pytest.mark.parametrize("call", ["monitoring", "poll", "check_memory_async", "check_resources"])
def test_a_reading_that_never_returns_does_not_hold_up_the_event_loops_end(call: str) -> None:
    """A probe's find: a reader that hangs (a host's metrics endpoint, an NFS-backed /proc)
    ran in the loop's default executor (``asyncio.to_thread``), which ``asyncio.run`` waits for
    on exit, without limit on 3.11: the monitor was stopped and the reading abandoned, yet
    ``asyncio.run`` never returned. Readings now run in a daemon thread each, as
    ``PeriodicTask``'s plain functions do."""
    release = threading.Event()
    entered = threading.Event()

    def hanging() -> ResourceSnapshot:
        entered.set()
        release.wait(30)
        return ResourceSnapshot(memory_percent=10.0, available_bytes=GiB, total_bytes=2 * GiB)

    async def main() -> None:
        if call == "monitoring":
            async with MemoryMonitor(80.0, check_interval=0.1, reader=hanging):
                await asyncio.to_thread(entered.wait, 10)
            return
        if call == "check_resources":
            step = ResourceManager(80.0, reader=hanging).check_resources()
        else:
            step = getattr(MemoryMonitor(80.0, reader=hanging), call)()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(step, 0.2)

    ended = threading.Event()
    runner = threading.Thread(target=lambda: (asyncio.run(main()), ended.set()), daemon=True)
    runner.start()
    try:
        assert ended.wait(10), "asyncio.run() waited for the abandoned reading"
    finally:
        release.set()
        runner.join(10)
    assert entered.is_set()


@pytest.mark.parametrize(
    "snapshot",
    [
        None,
        "90%",
        ResourceSnapshot(memory_percent=math.nan, available_bytes=1, total_bytes=2),
        ResourceSnapshot(memory_percent=10.0, available_bytes=-1, total_bytes=2),
    ],
    ids=["None", "str", "nan", "negative"],
)
def test_evaluate_refuses_what_is_no_reading(snapshot: object) -> None:
    # A probe's find: evaluate(None) raised a bare AttributeError, and a NaN reading passed
    # every limit (ok=True), where the reader path refuses both.
    manager = ResourceManager(max_memory_percent=50)
    with pytest.raises(InvalidReadingError):
        manager.evaluate(snapshot)  # type: ignore[arg-type]
    ok = ResourceSnapshot(memory_percent=60.0, available_bytes=1, total_bytes=2)
    assert manager.evaluate(ok).ok is False


class _SyncAdmit:
    """A host's own admission control whose admit() is synchronous (not awaitable)."""

    def admit(self, *, wait: bool = True, timeout: float | None = None) -> None:
        return None


@pytest.mark.parametrize("owner", ["executor", "task_manager"])
def test_the_resource_manager_class_itself_is_refused_at_construction(owner: str) -> None:
    # A probe's find: resource_manager=ResourceManager (the class, not an instance) was
    # accepted, and every start then failed with a bare TypeError about admit()'s self.
    with pytest.raises(InvalidArgumentTypeError, match="instance"):
        if owner == "executor":
            pq.ConcurrentExecutor(1, pq.ResourceManager)  # type: ignore[arg-type]
        else:
            pq.BackgroundTaskManager(pq.RunRegistry(), resource_manager=pq.ResourceManager)  # type: ignore[arg-type]


async def test_an_admit_that_is_not_awaitable_is_a_clear_error(tmp_path: Path) -> None:
    # ...and one whose admit() is synchronous failed each start with asyncio's bare TypeError.
    script = tmp_path / "hello.py"
    script.write_text("print('hi')\n")
    async with pq.ConcurrentExecutor(1, _SyncAdmit()) as executor:  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentTypeError, match="awaitable"):
            await executor.execute_module("m", "M", script)
    async with pq.RunRegistry() as registry:
        manager = pq.BackgroundTaskManager(registry, resource_manager=_SyncAdmit())  # type: ignore[arg-type]

        async def work() -> None:
            return None

        run = pq.Run(module_id="m")
        await manager.start_task(run, work())
        await manager.wait_all()
        stored = await registry.get_run(run.run_id)
        assert stored is not None and stored.status is pq.RunStatus.FAILED
        assert "InvalidArgumentTypeError" in (stored.error_message or "")
        assert "awaitable" in (stored.error_message or "")
        await manager.shutdown()


async def test_without_hysteresis_a_reading_at_the_limit_stays_high() -> None:
    # A probe's find: with hysteresis=0, a reading that stayed exactly at the limit flipped
    # high and low at every poll (high at >= the limit, low at <= the same value).
    events: list[str] = []
    monitor = MemoryMonitor(
        80.0,
        hysteresis=0,
        reader=FakeReader([80.0]),
        on_high=lambda s: events.append("high"),
        on_low=lambda s: events.append("low"),
    )
    for _ in range(4):
        await monitor.poll()
    assert events == ["high"] and monitor.is_high
    monitor._reader = FakeReader([79.9])
    await monitor.poll()
    assert events == ["high", "low"] and not monitor.is_high


def _generator(*_: object) -> Iterable[None]:
    yield None


async def _async_generator(*_: object) -> AsyncIterator[None]:
    yield None


@pytest.mark.parametrize("func", [_generator, _async_generator], ids=["generator", "async-gen"])
def test_generator_functions_are_refused_as_callbacks_and_task_functions(
    func: Callable[..., object],
) -> None:
    # A probe's find: their bodies never ran (a generator made and dropped), and every
    # PeriodicTask "run" counted as a success.
    for name in ("on_high", "on_low"):
        with pytest.raises(InvalidTaskError, match="generator"):
            MemoryMonitor(80.0, **{name: func})  # type: ignore[arg-type]
    with pytest.raises(InvalidTaskError, match="generator"):
        pq.PeriodicTask("p", 1.0, func)


async def test_a_cpu_limit_the_readings_cannot_check_is_said_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A probe's find: with max_cpu_percent set, a reader that leaves cpu_percent out turned
    # the CPU limit off without a word.
    manager = ResourceManager(90.0, max_cpu_percent=50.0, reader=FakeReader([10.0]))
    with caplog.at_level(logging.WARNING, logger="prismq_subprocess._resources._resource_manager"):
        assert await manager.check_resources()
        assert await manager.check_resources()
    warned = [r for r in caplog.records if "max_cpu_percent=50.0 is not checked" in r.getMessage()]
    assert len(warned) == 1
