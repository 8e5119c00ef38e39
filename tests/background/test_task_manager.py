"""Tests of BackgroundTaskManager (prismq_subprocess/_background/_task_manager.py)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import gc
import inspect
import json
import logging
import os
import pickle
import subprocess
import sys
import textwrap
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from conftest import skip_on_uvloop

from prismq_subprocess._background._cancel_result import CancelResult
from prismq_subprocess._background._memory_registry import (
    BaseRunRegistry,
    RunRegistry,
    stopped_for_claim,
)
from prismq_subprocess._background._output_capture import OutputCapture
from prismq_subprocess._background._run_record import Run, RunOwner, RunStatus
from prismq_subprocess._background._sqlite_registry import SQLiteRunRegistry
from prismq_subprocess._background._task_manager import BackgroundTaskManager, ExitCode
from prismq_subprocess._core._exceptions import (
    DuplicateRunError,
    InvalidArgumentTypeError,
    InvalidLimitError,
    InvalidRunIdError,
    InvalidTaskError,
    InvalidTimeoutError,
    OutputClosedError,
    PrismQError,
    RegistryDatabaseError,
    RunStateError,
    TaskManagerClosedError,
)
from prismq_subprocess._core._modes import RunMode
from prismq_subprocess._core._result import ProcessResult
from prismq_subprocess._resources._readings import ResourceSnapshot
from prismq_subprocess._resources._resource_manager import ResourceManager


@pytest.fixture(params=["memory", "sqlite"])
async def registry(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[BaseRunRegistry]:
    store: BaseRunRegistry = (
        RunRegistry() if request.param == "memory" else SQLiteRunRegistry(tmp_path / "r.db")
    )
    async with store:
        yield store


async def stored(registry: BaseRunRegistry, run_id: str) -> Run:
    run = await registry.get_run(run_id)
    assert run is not None
    return run


async def returns(value: object) -> object:
    await asyncio.sleep(0)
    return value


async def test_outcomes_recorded(registry: BaseRunRegistry) -> None:
    async def boom() -> None:
        await asyncio.sleep(0)
        raise ValueError("bad input")

    result = ProcessResult(
        args=("x",), returncode=2, stdout=b"", stderr=b"", pid=1, duration=0.0, mode=RunMode.ASYNC
    )
    async with BackgroundTaskManager(registry) as manager:
        ok = await manager.start_task(Run(module_id="a"), returns(None))
        zero = await manager.start_task(Run(), returns(0))
        # As in the PrismQ guide, any normal return is success, a plain int included.
        three = await manager.start_task(Run(), returns(3))
        true = await manager.start_task(Run(), returns(True))
        # An explicit exit status is an ExitCode or a ProcessResult.
        exit_three = await manager.start_task(Run(), returns(ExitCode(3)))
        exit_zero = await manager.start_task(Run(), returns(ExitCode(0)))
        process = await manager.start_task(Run(), returns(result))
        failed = await manager.start_task(Run(module_name="Boom"), boom())
        await manager.wait_all()
    expect = {
        ok: (RunStatus.COMPLETED, 0, None),
        zero: (RunStatus.COMPLETED, 0, None),
        three: (RunStatus.COMPLETED, 0, None),
        true: (RunStatus.COMPLETED, 0, None),
        exit_three: (RunStatus.FAILED, 3, "exited with status 3"),
        exit_zero: (RunStatus.COMPLETED, 0, None),
        process: (RunStatus.FAILED, 2, "exited with status 2"),
        failed: (RunStatus.FAILED, None, "ValueError: bad input"),
    }
    for run_id, (status, exit_code, message) in expect.items():
        run = await stored(registry, run_id)
        assert (run.status, run.exit_code, run.error_message) == (status, exit_code, message)
        assert run.started_at is not None and run.finished_at is not None


async def test_pending_then_running_visible_in_registry(registry: BaseRunRegistry) -> None:
    gate = asyncio.Event()
    looked = asyncio.Event()
    seen: list[RunStatus] = []

    async def work(run_id: str) -> int:
        seen.append((await stored(registry, run_id)).status)
        looked.set()
        await gate.wait()
        return 0

    async with BackgroundTaskManager(registry) as manager:
        run = Run()
        await manager.start_task(run, work(run.run_id))
        assert (await stored(registry, run.run_id)).status in (
            RunStatus.PENDING,
            RunStatus.RUNNING,
        )
        await looked.wait()
        assert seen == [RunStatus.RUNNING]
        assert [r.run_id for r in manager.active_runs()] == [run.run_id]
        gate.set()
        await manager.wait_all()
        assert manager.active_runs() == []
    assert run.status is RunStatus.COMPLETED  # the caller's object is kept up to date


async def test_a_coroutine_that_marks_its_run_running_itself(registry: BaseRunRegistry) -> None:
    # marks_running: the run stays PENDING while the coroutine waits (e.g. queued on a cluster)
    # and becomes RUNNING only when the coroutine says so.
    picked_up = asyncio.Event()
    looked = asyncio.Event()
    seen: list[RunStatus] = []

    async def remote(run: Run) -> int:
        seen.append((await stored(registry, run.run_id)).status)
        await picked_up.wait()
        run.mark_running(pid=4242)
        await registry.update_run(run)
        seen.append((await stored(registry, run.run_id)).status)
        looked.set()
        return 0

    async def silent() -> None:
        return None  # never marks its run: the manager still records it COMPLETED

    async with BackgroundTaskManager(registry) as manager:
        run, other = Run(), Run()
        await manager.start_task(run, remote(run), marks_running=True)
        await manager.start_task(other, silent(), marks_running=True)
        await asyncio.sleep(0)
        assert (await stored(registry, run.run_id)).status is RunStatus.PENDING
        picked_up.set()
        await looked.wait()
        await manager.wait_all()
    assert seen == [RunStatus.PENDING, RunStatus.RUNNING]
    assert run.status is RunStatus.COMPLETED and run.pid == 4242
    assert (await stored(registry, other.run_id)).status is RunStatus.COMPLETED


async def test_exception_logged_with_traceback_and_never_unretrieved(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))

    async def boom() -> None:
        raise RuntimeError("kaput")

    registry = RunRegistry()
    manager = BackgroundTaskManager(registry)
    with caplog.at_level(logging.ERROR, logger="prismq_subprocess._background._task_manager"):
        run_id = await manager.start_task(Run(), boom())
        await manager.wait_all()
    records = [r for r in caplog.records if run_id in r.getMessage()]
    assert records and records[0].exc_info is not None
    assert "kaput" in caplog.text
    gc.collect()
    await asyncio.sleep(0)
    assert loop_errors == []
    await manager.shutdown()


async def test_strong_references_survive_gc() -> None:
    registry = RunRegistry()
    manager = BackgroundTaskManager(registry)
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 0

    ids = [await manager.start_task(Run(), work()) for _ in range(20)]
    gc.collect()
    await asyncio.sleep(0)
    gc.collect()
    assert manager.running_count == 20
    gate.set()
    await manager.wait_all()
    for run_id in ids:
        assert (await stored(registry, run_id)).status is RunStatus.COMPLETED
    await manager.shutdown()


async def test_cancel_running(registry: BaseRunRegistry) -> None:
    cleaned = asyncio.Event()
    started = asyncio.Event()

    async def work() -> int:
        started.set()
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()
        return 0

    async with BackgroundTaskManager(registry) as manager:
        run_id = await manager.start_task(Run(), work())
        await started.wait()
        assert await manager.cancel_task(run_id, reason="user pressed stop")
        assert cleaned.is_set()
        run = await stored(registry, run_id)
        assert (run.status, run.error_message) == (RunStatus.CANCELLED, "user pressed stop")
        assert not await manager.cancel_task(run_id)
        assert not await manager.cancel_task("unknown")


async def test_cancel_before_coroutine_runs_closes_it(registry: BaseRunRegistry) -> None:
    coro = returns(0)
    async with BackgroundTaskManager(registry) as manager:
        # Called without await (the guide's style): the task exists but has not run a step yet.
        run_id = manager.start_task(Run(), coro)
        assert await manager.cancel_task(run_id)
    run = await stored(registry, run_id)
    assert run.status is RunStatus.CANCELLED and run.started_at is None
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


async def test_max_concurrent_fifo_queue_and_cancel_queued(registry: BaseRunRegistry) -> None:
    gates = [asyncio.Event() for _ in range(5)]
    order: list[int] = []
    peak = 0
    active = 0

    async def work(i: int) -> int:
        nonlocal peak, active
        active += 1
        peak = max(peak, active)
        order.append(i)
        await gates[i].wait()
        active -= 1
        return 0

    async with BackgroundTaskManager(registry, max_concurrent=2) as manager:
        runs = [Run(module_id=str(i)) for i in range(5)]
        coros = [work(i) for i in range(5)]
        queued_coro = coros[3]
        for run, coro in zip(runs, coros, strict=True):
            await manager.start_task(run, coro)
        await asyncio.sleep(0)
        assert (manager.running_count, manager.queued_count) == (2, 3)
        for run in runs[2:]:
            assert (await stored(registry, run.run_id)).status is RunStatus.PENDING
        # Cancelling a queued run: CANCELLED, never started, its coroutine closed.
        assert await manager.cancel_task(runs[3].run_id)
        assert inspect.getcoroutinestate(queued_coro) == inspect.CORO_CLOSED
        queued = await stored(registry, runs[3].run_id)
        assert queued.status is RunStatus.CANCELLED and queued.started_at is None
        for gate in gates:
            gate.set()
        await manager.wait_all()
    assert order == [0, 1, 2, 4]
    assert peak == 2
    statuses = [(await stored(registry, run.run_id)).status for run in runs]
    assert statuses == [RunStatus.COMPLETED] * 3 + [RunStatus.CANCELLED, RunStatus.COMPLETED]


async def test_shutdown_cancels_running_and_queued(registry: BaseRunRegistry) -> None:
    manager = BackgroundTaskManager(registry, max_concurrent=2)
    runs = [Run() for _ in range(4)]
    for run in runs:
        await manager.start_task(run, asyncio.sleep(3600))
    await asyncio.sleep(0)
    await manager.shutdown(grace=5.0)
    assert manager.closed and manager.active_runs() == []
    for run in runs:
        got = await stored(registry, run.run_id)
        assert got.status is RunStatus.CANCELLED
        assert got.error_message == "task manager shut down"
    assert [r.started_at is not None for r in runs] == [True, True, False, False]
    await manager.shutdown()  # idempotent
    coro = returns(0)
    with pytest.raises(TaskManagerClosedError):
        await manager.start_task(Run(), coro)


@pytest.mark.parametrize("limit", [None, 1])
async def test_shutdown_with_no_grace_records_every_run_before_it_returns(
    tmp_path: Path, limit: int | None
) -> None:
    # A fuzzer's find: with SQLite, a run cancelled while queued was, at its record, asking
    # the registry whether another process had claimed it; shutdown(grace=0) abandoned it
    # then (taking its record to be under way) and the run never recorded itself (abandoned):
    # it stayed PENDING for good (13 of 15 tries). running_count also stayed above 0.
    async def job() -> int:
        return 42

    for attempt in range(8):
        async with SQLiteRunRegistry(tmp_path / f"runs{attempt}.db") as registry:
            manager = BackgroundTaskManager(registry, max_concurrent=limit)
            run_ids = []
            for i in range(3):
                run_ids.append(manager.start_task(Run(module_id=f"j{i}"), job()))
                await asyncio.sleep(0)
            await manager.shutdown(grace=0.0)
            assert manager.running_count == 0 and manager.queued_count == 0
            assert manager.active_runs() == [] and not manager.tasks
            # Recorded when shutdown returns, as it promises, not later.
            for run_id in run_ids:
                run = await stored(registry, run_id)
                assert run.is_finished, (attempt, run.module_id, run.status)
    # Runs stored and running when abandoned: no longer counted (they were still, while
    # active_runs() and tasks said nothing was in flight).
    async with SQLiteRunRegistry(tmp_path / "counts.db") as registry:
        manager = BackgroundTaskManager(registry, max_concurrent=limit)
        first = manager.start_task(Run(module_id="a"), job())
        second = manager.start_task(Run(module_id="b"), job())
        await second
        await manager.shutdown(grace=0.0)
        assert manager.running_count == 0 and manager.active_runs() == []
        for run_id in (first, second):
            assert (await stored(registry, run_id)).is_finished


async def test_runs_a_shutdown_abandons_give_back_their_slots() -> None:
    # A review's find: the test above passed without the give-back.
    async def stubborn() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)  # ignores its cancellation for a while

    manager = BackgroundTaskManager(RunRegistry(), max_concurrent=1)
    for name in ("a", "b"):
        manager.start_task(Run(module_id=name), stubborn())
    await asyncio.sleep(0.05)
    await manager.shutdown(grace=0.05)
    assert manager.running_count == 0 and manager.queued_count == 0
    assert manager.active_runs() == []


class _SlowFinalWrite(RunRegistry):
    async def update_run(self, run: Run) -> None:
        if run.is_finished:
            await asyncio.sleep(0.4)
        await super().update_run(run)


async def test_shutdown_waits_for_a_final_record_its_run_began_writing() -> None:
    # A review's find: the test above passed without that wait (SQLite queues its reads behind
    # the pending write); here the write is slow and the registry answers at once.
    async def quick() -> int:
        return 0

    registry = _SlowFinalWrite()
    manager = BackgroundTaskManager(registry)
    run_id = manager.start_task(Run(module_id="r"), quick())
    await asyncio.sleep(0.05)  # the run is done; its final write is under way
    await manager.shutdown(grace=0.05)
    assert (await stored(registry, run_id)).status is RunStatus.COMPLETED


async def test_shutdown_abandons_a_task_that_ignores_cancellation() -> None:
    registry = RunRegistry()
    release = asyncio.Event()

    async def stubborn() -> int:
        while True:
            try:
                await release.wait()
                return 0
            except asyncio.CancelledError:
                continue  # refuses to stop

    manager = BackgroundTaskManager(registry)
    run_id = await manager.start_task(Run(), stubborn())
    await asyncio.sleep(0)
    await manager.shutdown(grace=0.05)
    run = await stored(registry, run_id)
    assert run.status is RunStatus.CANCELLED
    assert run.error_message is not None and "grace" in run.error_message
    release.set()
    for _ in range(5):
        await asyncio.sleep(0)
    assert (await stored(registry, run_id)).status is RunStatus.CANCELLED


async def test_wait_all_timeout_leaves_runs_alone() -> None:
    registry = RunRegistry()
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 0

    async with BackgroundTaskManager(registry) as manager:
        run_id = await manager.start_task(Run(), work())
        with pytest.raises(TimeoutError):
            await manager.wait_all(timeout=0.01)
        assert (await stored(registry, run_id)).status is RunStatus.RUNNING
        with pytest.raises(InvalidTimeoutError):
            await manager.wait_all(timeout=-1)
        gate.set()
        await manager.wait_all(timeout=None)
        assert (await stored(registry, run_id)).status is RunStatus.COMPLETED


async def test_coroutine_may_decide_its_own_outcome() -> None:
    registry = RunRegistry()

    async with BackgroundTaskManager(registry) as manager:
        run = Run()

        async def work() -> int:
            run.pid = 4242
            run.mark_failed("timed out after 1 s", exit_code=-9)
            return -9

        await manager.start_task(run, work())
        await manager.wait_all()
    got = await stored(registry, run.run_id)
    assert (got.status, got.exit_code, got.error_message, got.pid) == (
        RunStatus.FAILED,
        -9,
        "timed out after 1 s",
        4242,
    )


async def test_bad_starts_close_the_coroutine() -> None:
    registry = RunRegistry()
    async with BackgroundTaskManager(registry) as manager:
        gate = asyncio.Event()
        run = Run()
        await manager.start_task(run, gate.wait())
        refused = [returns(0) for _ in range(3)]
        with pytest.raises(DuplicateRunError):
            await manager.start_task(Run(run_id=run.run_id), refused[0])
        done = Run()
        done.mark_cancelled()
        with pytest.raises(RunStateError):
            await manager.start_task(done, refused[1])
        old = Run()
        await registry.add_run(old)
        old.mark_cancelled()
        await registry.update_run(old)
        with pytest.raises(DuplicateRunError):  # stored and no longer pending
            await manager.start_task(Run(run_id=old.run_id), refused[2])
        assert [r.run_id for r in manager.active_runs()] == [run.run_id]
        gate.set()
    # Closed, so garbage collection never warns "coroutine ... was never awaited".
    assert [inspect.getcoroutinestate(c) for c in refused] == [inspect.CORO_CLOSED] * 3


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_bad_max_concurrent(bad: object) -> None:
    with pytest.raises(InvalidLimitError):
        BackgroundTaskManager(RunRegistry(), max_concurrent=bad)  # type: ignore[arg-type]


async def test_output_is_closed_and_tail_stored() -> None:
    registry = RunRegistry()
    output = OutputCapture()
    async with BackgroundTaskManager(registry, output=output, output_tail_lines=2) as manager:
        run = Run()

        async def work() -> int:
            for i in range(5):
                await output.append_line(run.run_id, f"line {i}")
            return 0

        subscription = output.subscribe(run.run_id, wait=True)  # the run is not started yet
        await manager.start_task(run, work())
        lines = [item async for item in subscription]  # ends because the manager closes it
        assert len(lines) == 5
        await manager.wait_all()
    assert (await stored(registry, run.run_id)).output_tail == ["line 3", "line 4"]


async def test_many_tasks_concurrently_with_sqlite(tmp_path: Path) -> None:
    async with (
        SQLiteRunRegistry(tmp_path / "many.db") as registry,
        BackgroundTaskManager(registry, max_concurrent=8) as manager,
    ):
        for i in range(100):
            await manager.start_task(Run(module_id=str(i % 3)), returns(ExitCode(i % 2)))
        await manager.wait_all()
        assert await registry.count_runs(status=RunStatus.COMPLETED) == 50
        assert await registry.count_runs(status=RunStatus.FAILED) == 50


# --- admission through a ResourceManager ------------------------------------------------------

GiB = 1 << 30


class Memory:
    """A fake reader: reports ``level`` percent memory use (settable at any time) and counts calls.

    With ``script``, the first readings come from it, then ``level`` is reported.
    """

    def __init__(self, level: float, *script: float) -> None:
        self.level = level
        self.script = list(script)
        self.calls = 0

    def __call__(self) -> ResourceSnapshot:
        self.calls += 1
        percent = self.script.pop(0) if self.script else self.level
        return ResourceSnapshot(
            memory_percent=percent, available_bytes=8 * GiB, total_bytes=16 * GiB
        )

    def manager(self) -> ResourceManager:
        return ResourceManager(max_memory_percent=90.0, reader=self, poll_interval=0.01)


async def until(condition: Callable[[], bool], what: str) -> None:
    """Yield to the loop until ``condition()`` holds; fail after a generous deadline."""
    try:
        async with asyncio.timeout(5):
            while not condition():  # noqa: ASYNC110 - the reader runs in a worker thread
                await asyncio.sleep(0.005)
    except TimeoutError:
        pytest.fail(f"timed out waiting for {what}")


async def test_admitted_runs_proceed(registry: BaseRunRegistry) -> None:
    memory = Memory(50.0)
    async with BackgroundTaskManager(
        registry, max_concurrent=2, resource_manager=memory.manager(), admission_wait=False
    ) as manager:
        ids = [await manager.start_task(Run(), returns(ExitCode(i % 2))) for i in range(4)]
        await manager.wait_all()
    statuses = [(await stored(registry, run_id)).status for run_id in ids]
    assert statuses == [RunStatus.COMPLETED, RunStatus.FAILED] * 2
    assert memory.calls == 4  # one admission check per run


async def test_refused_without_waiting_fails_the_run_and_never_starts_it(
    registry: BaseRunRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    ran: list[str] = []

    async def work(name: str) -> int:
        ran.append(name)
        return 0

    # The first check reads 95 % (over the 90 % limit), later ones 50 %.
    memory = Memory(50.0, 95.0)
    refused_coro = work("refused")
    with caplog.at_level(logging.WARNING, logger="prismq_subprocess._background._task_manager"):
        async with BackgroundTaskManager(
            registry, max_concurrent=1, resource_manager=memory.manager(), admission_wait=False
        ) as manager:
            refused = await manager.start_task(Run(module_name="Big"), refused_coro)
            admitted = await manager.start_task(Run(), work("admitted"))
            await manager.wait_all()
            assert (manager.running_count, manager.queued_count) == (0, 0)
    run = await stored(registry, refused)
    assert run.status is RunStatus.FAILED
    assert run.error_message is not None
    assert "not enough resources" in run.error_message
    assert "memory_percent 95.0 > 90.0" in run.error_message
    assert run.started_at is None and run.finished_at is not None
    assert inspect.getcoroutinestate(refused_coro) == inspect.CORO_CLOSED
    # The slot was released: the queued run behind it was admitted and ran.
    assert (await stored(registry, admitted)).status is RunStatus.COMPLETED
    assert ran == ["admitted"]
    assert any(refused in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
    gc.collect()
    await asyncio.sleep(0)
    assert loop_errors == []


async def test_waits_pending_until_memory_frees(registry: BaseRunRegistry) -> None:
    memory = Memory(95.0)
    started = asyncio.Event()

    async def work() -> int:
        started.set()
        return 0

    async with BackgroundTaskManager(
        registry, resource_manager=memory.manager(), admission_wait=True
    ) as manager:
        run_id = await manager.start_task(Run(), work())
        await until(lambda: memory.calls >= 3, "a few refused checks")
        assert not started.is_set()
        waiting = await stored(registry, run_id)
        assert waiting.status is RunStatus.PENDING and waiting.started_at is None
        assert manager.running_count == 1  # it holds its slot while it waits
        memory.level = 50.0
        await manager.wait_all()
    assert started.is_set()
    assert (await stored(registry, run_id)).status is RunStatus.COMPLETED


async def test_wait_times_out_and_fails_the_run(registry: BaseRunRegistry) -> None:
    coro = returns(0)
    async with BackgroundTaskManager(
        registry, resource_manager=Memory(95.0).manager(), admission_timeout=0.05
    ) as manager:
        run_id = await manager.start_task(Run(), coro)
        await manager.wait_all()
    run = await stored(registry, run_id)
    assert run.status is RunStatus.FAILED
    assert run.error_message is not None
    assert "still short after waiting 0.05 s" in run.error_message
    assert "memory_percent 95.0 > 90.0" in run.error_message
    assert run.started_at is None
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


@pytest.mark.parametrize("how", ["cancel_task", "shutdown"])
async def test_cancel_while_waiting_for_admission(registry: BaseRunRegistry, how: str) -> None:
    memory = Memory(95.0)
    coro = returns(0)
    manager = BackgroundTaskManager(registry, resource_manager=memory.manager())
    run_id = await manager.start_task(Run(), coro)
    await until(lambda: memory.calls >= 2, "waiting for admission")
    if how == "cancel_task":
        assert await manager.cancel_task(run_id, reason="user pressed stop")
        expected = "user pressed stop"
    else:
        expected = "task manager shut down"
    await manager.shutdown()
    run = await stored(registry, run_id)
    assert (run.status, run.error_message) == (RunStatus.CANCELLED, expected)
    assert run.started_at is None
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert manager.active_runs() == [] and manager.running_count == 0


async def test_failing_reader_fails_the_run_and_closes_the_coroutine(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken() -> ResourceSnapshot:
        raise OSError("no /proc")

    registry = RunRegistry()
    coro = returns(0)
    with caplog.at_level(logging.ERROR, logger="prismq_subprocess._background._task_manager"):
        async with BackgroundTaskManager(
            registry, resource_manager=ResourceManager(reader=broken)
        ) as manager:
            run_id = await manager.start_task(Run(), coro)
            await manager.wait_all()
    run = await stored(registry, run_id)
    assert (run.status, run.error_message) == (RunStatus.FAILED, "OSError: no /proc")
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert any(run_id in r.getMessage() and r.exc_info for r in caplog.records)


@pytest.mark.parametrize("bad", [-1, float("nan"), "soon"])
def test_bad_admission_timeout(bad: object) -> None:
    with pytest.raises(InvalidTimeoutError):
        BackgroundTaskManager(RunRegistry(), admission_timeout=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "1", None])
async def test_bad_shutdown_grace_and_wait_all_timeout_are_refused(bad: object) -> None:
    # A probe's find: shutdown(nan) waited for ever for a coroutine that ignores its
    # cancellation (no comparison with NaN is true), shutdown("1") and wait_all("1") raised a
    # bare TypeError, and wait_all(nan) returned at once with the run still going.
    registry = RunRegistry()
    gate = asyncio.Event()

    async def stubborn() -> int:
        while True:
            try:
                await gate.wait()
                return 0
            except asyncio.CancelledError:
                continue

    async with BackgroundTaskManager(registry) as manager:
        run_id = await manager.start_task(Run(), stubborn())
        if bad is not None and bad != float("inf"):  # (no limit: valid wait_all timeouts)
            with pytest.raises(InvalidTimeoutError):
                await manager.wait_all(bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidTimeoutError):
            await asyncio.wait_for(manager.shutdown(bad), 5)  # type: ignore[arg-type]
        assert manager.is_active(run_id) and not manager.closed
        gate.set()
        await manager.wait_all(float("inf"))
    assert (await stored(registry, run_id)).status is RunStatus.COMPLETED


# --- the PrismQ guide's call shape (issue 13) -------------------------------------------------


async def test_start_task_called_without_await_runs_the_work(
    registry: BaseRunRegistry, recwarn: pytest.WarningsRecorder
) -> None:
    ran = asyncio.Event()

    async def work() -> None:
        ran.set()

    manager = BackgroundTaskManager(registry)
    run = Run(module_id="guide")
    run_id = manager.start_task(run, work())  # the guide: a plain call returning the id
    assert run_id == run.run_id and isinstance(run_id, str)
    assert {run_id: 1}[run.run_id] == 1  # usable as the plain id
    await manager.wait_all()
    assert ran.is_set()
    got = await stored(registry, run_id)
    assert (got.status, got.exit_code) == (RunStatus.COMPLETED, 0)
    gc.collect()
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
    await manager.shutdown()


async def test_handle_is_a_plain_id_that_can_be_awaited(registry: BaseRunRegistry) -> None:
    gate = asyncio.Event()
    async with BackgroundTaskManager(registry) as manager:
        run = Run()
        handle = manager.start_task(run, gate.wait())
        assert await handle == run.run_id
        assert type(await handle) is str  # awaiting twice is fine; gives a plain str
        assert handle.stored
        assert (await stored(registry, run.run_id)).status in (
            RunStatus.PENDING,
            RunStatus.RUNNING,
        )
        assert pickle.loads(pickle.dumps(handle)) == run.run_id
        assert json.dumps({"run_id": handle}) == json.dumps({"run_id": run.run_id})
        gate.set()


async def test_a_run_the_caller_added_is_taken_over(registry: BaseRunRegistry) -> None:
    run = Run(module_id="added-first")
    await registry.add_run(run)  # the guide's caller may add the run itself
    async with BackgroundTaskManager(registry) as manager:
        assert await manager.start_task(run, returns(None)) == run.run_id
        copy_added = Run(module_id="copy")
        await registry.add_run(copy_added)
        manager.start_task(copy_added.copy(), returns(None))  # not the same object: fine too
        await manager.wait_all()
    for run_id in (run.run_id, copy_added.run_id):
        assert (await stored(registry, run_id)).status is RunStatus.COMPLETED
    assert await registry.count_runs() == 2


async def test_a_run_queued_in_another_manager_is_not_taken_over(
    registry: BaseRunRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    # An adversary's find: a second manager on the same registry "took over" a run another
    # manager had queued (PENDING behind its concurrency limit), so one run id ran two jobs.
    ran: list[str] = []

    async def job(label: str) -> None:
        ran.append(label)
        await asyncio.sleep(0)

    gate = asyncio.Event()
    async with (
        BackgroundTaskManager(registry, max_concurrent=1) as first,
        BackgroundTaskManager(registry) as second,
    ):
        await first.start_task(Run(module_id="busy"), gate.wait())
        await first.start_task(Run(run_id="job1", module_id="A"), job("A"))
        with (
            caplog.at_level(logging.ERROR),
            pytest.raises(DuplicateRunError, match="another BackgroundTaskManager"),
        ):
            await second.start_task(Run(run_id="job1", module_id="B"), job("B"))
        # The caller awaited and got the error: no log line reports it a second time.
        assert [r for r in caplog.records if "not started" in r.getMessage()] == []
        gate.set()
        await first.wait_all()
        await second.wait_all()
    assert ran == ["A"]
    done = await stored(registry, "job1")
    assert (done.module_id, done.status) == ("A", RunStatus.COMPLETED)


@pytest.mark.parametrize("spelling", ["uri", "symlink"])
async def test_a_run_queued_in_a_manager_of_the_same_file_spelled_otherwise_is_not_taken_over(
    tmp_path: Path, spelling: str
) -> None:
    # The same file opened as a path and as a ``file:`` URI (or through a symlink) was taken
    # for two stores: the second manager took the first one's queued run over, and one run id
    # ran two jobs, as with one registry object above.
    ran: list[str] = []

    async def job(label: str) -> None:
        ran.append(label)
        await asyncio.sleep(0)

    path = tmp_path / "runs db" / "r%1.db"  # (a space and a % for the URI's quoting)
    path.parent.mkdir()
    if spelling == "uri":
        other = path.as_uri() + "?cache=private"
    else:
        (tmp_path / "link").symlink_to(path.parent)
        other = str(tmp_path / "link" / path.name)
    gate = asyncio.Event()
    async with (
        SQLiteRunRegistry(path) as one,
        SQLiteRunRegistry(other) as two,
        BackgroundTaskManager(one, max_concurrent=1) as first,
        BackgroundTaskManager(two) as second,
    ):
        await first.start_task(Run(module_id="busy"), gate.wait())
        await first.start_task(Run(run_id="job1", module_id="A"), job("A"))
        with pytest.raises(DuplicateRunError, match="another BackgroundTaskManager"):
            await second.start_task(Run(run_id="job1", module_id="B"), job("B"))
        gate.set()
        await first.wait_all()
        await second.wait_all()
    assert ran == ["A"]


_QUEUES_A_RUN = textwrap.dedent(
    """
    import asyncio, sys
    import prismq_subprocess as pq

    async def main():
        async with pq.SQLiteRunRegistry(sys.argv[1]) as registry:
            async with pq.BackgroundTaskManager(registry, max_concurrent=1) as manager:
                gate = asyncio.Event()
                await manager.start_task(pq.Run(module_id="busy"), gate.wait())
                await manager.start_task(pq.Run(run_id="job1", module_id="A"), asyncio.sleep(0))
                print("queued", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                gate.set()
                await manager.wait_all()

    asyncio.run(main())
    """
)


@contextlib.contextmanager
def _another_worker(script: str, path: Path, ready: str) -> Iterator[subprocess.Popen[str]]:
    """A second process on the registry file at ``path`` (another server worker), running
    ``script`` until the block ends: its first line is ``ready``; a line on its stdin lets it
    finish, and it must then exit 0."""
    other = subprocess.Popen(
        [sys.executable, "-c", script, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert other.stdout is not None and other.stdin is not None
        assert other.stdout.readline().strip() == ready
        yield other
        other.stdin.write("\n")
        other.stdin.flush()
        assert other.wait(timeout=30) == 0
    finally:
        if other.poll() is None:
            other.kill()
        other.communicate()


async def test_a_run_queued_by_another_live_process_is_not_taken_over(tmp_path: Path) -> None:
    # The same across server workers sharing one SQLite file: worker B's start of "job1" while
    # worker A has it queued ran B's job under A's run id (A's own record then refused).
    path = tmp_path / "runs.db"
    ran: list[str] = []

    async def job() -> None:
        ran.append("B")

    with _another_worker(_QUEUES_A_RUN, path, "queued") as other:
        async with SQLiteRunRegistry(path) as registry, BackgroundTaskManager(registry) as manager:
            with pytest.raises(DuplicateRunError, match=f"pid {other.pid}"):
                await manager.start_task(Run(run_id="job1", module_id="B"), job())
            # A deliberate pick-up: the run as read from the registry (its owner included).
            picked = await stored(registry, "job1")
            assert picked.owner is not None and picked.owner.pid == other.pid
    assert ran == []
    async with SQLiteRunRegistry(path) as registry:
        done = await stored(registry, "job1")
        assert (done.module_id, done.status) == ("A", RunStatus.COMPLETED)


async def test_the_look_at_another_owner_is_made_off_the_event_loop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Whether a stored run's owner lives may read that process's open files (after a step of
    # the clock: /proc/<pid>/fd, one stat each), which took milliseconds on the loop's thread.
    import threading

    from prismq_subprocess._background import _memory_registry

    looked_from: list[int] = []

    def owner_alive(owner: RunOwner, registry_path: str | None) -> bool:
        looked_from.append(threading.get_ident())
        return False  # gone: the run is taken over

    monkeypatch.setattr(_memory_registry, "owner_alive", owner_alive)
    async with SQLiteRunRegistry(tmp_path / "runs.db") as registry:
        gone = RunOwner(host="elsewhere", pid=1, started_at=1.0)
        await registry.add_run(Run(run_id="left", module_id="m", owner=gone))
        async with BackgroundTaskManager(registry) as manager:
            await manager.start_task(Run(run_id="left", module_id="m"), returns(None))
            await manager.wait_all()
        assert (await stored(registry, "left")).status is RunStatus.COMPLETED
    assert looked_from and threading.get_ident() not in looked_from


_ADDS_A_RUN = textwrap.dedent(
    """
    import asyncio, sys
    import prismq_subprocess as pq

    async def main():
        async with pq.SQLiteRunRegistry(sys.argv[1]) as registry:
            await registry.add_run(pq.Run(run_id="queued", module_id="m"))
            print("added", flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)

    asyncio.run(main())
    """
)


async def test_a_pending_run_of_another_process_read_from_the_registry_is_taken_over(
    tmp_path: Path,
) -> None:
    # The pick-up pattern: one process (an API worker) adds PENDING runs, another reads them
    # from the registry and starts them; the driver becomes the run's owner.
    path = tmp_path / "runs.db"
    with _another_worker(_ADDS_A_RUN, path, "added"):
        async with SQLiteRunRegistry(path) as registry:
            picked = await stored(registry, "queued")
            async with BackgroundTaskManager(registry) as manager:
                await manager.start_task(picked, returns(None))
                await manager.wait_all()
            done = await stored(registry, "queued")
            assert done.status is RunStatus.COMPLETED
            assert done.owner == RunOwner.current()


async def test_two_processes_picking_up_one_pending_run_do_not_both_run_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two server workers pick up the same PENDING run (each as read from the registry). The
    # take-over read the run, checked it, then wrote itself as owner: a rival that claimed it
    # in between was overwritten, and both ran the job under one run id. The rival here is a
    # second registry on the file writing a live other process as owner, right after our read.
    path = tmp_path / "runs.db"
    rival = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)"
    )
    ran: list[str] = []

    async def job() -> None:
        ran.append("us")

    try:
        started = psutil.Process(rival.pid).create_time()
        rival_owner = RunOwner(RunOwner.current().host, rival.pid, started)
        with _another_worker(_ADDS_A_RUN, path, "added"):
            async with SQLiteRunRegistry(path) as registry, SQLiteRunRegistry(path) as other:
                picked = await stored(registry, "queued")
                read = registry.get_run

                async def read_then_rival_claims(run_id: str) -> Run | None:
                    found = await read(run_id)
                    claimed = await stored(other, run_id)
                    read_owner, claimed.owner = claimed.owner, rival_owner
                    assert await other.claim_run(claimed, read_owner)
                    return found

                monkeypatch.setattr(registry, "get_run", read_then_rival_claims)
                async with BackgroundTaskManager(registry) as manager:
                    with pytest.raises(DuplicateRunError, match=f"pid {rival.pid}"):
                        await manager.start_task(picked, job())
                monkeypatch.undo()
                after = await stored(registry, "queued")
                assert (after.status, after.owner) == (RunStatus.PENDING, rival_owner)
    finally:
        rival.kill()
        await rival.wait()
    assert ran == []


_QUEUES_A_RUN_THAT_MARKS = textwrap.dedent(
    """
    import asyncio, sys
    import prismq_subprocess as pq

    async def job():
        with open(sys.argv[1] + ".ran", "a") as f:
            f.write("A\\n")

    async def main():
        async with pq.SQLiteRunRegistry(sys.argv[1]) as registry:
            async with pq.BackgroundTaskManager(registry, max_concurrent=1) as manager:
                gate = asyncio.Event()
                await manager.start_task(pq.Run(module_id="busy"), gate.wait())
                await manager.start_task(pq.Run(run_id="job1", module_id="A"), job())
                print("queued", flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                gate.set()
                await manager.wait_all()

    asyncio.run(main())
    """
)


async def test_a_run_picked_up_while_queued_in_a_live_process_runs_only_once(
    tmp_path: Path,
) -> None:
    # Worker A has job1 queued behind a busy slot; we pick it up as read from the registry
    # (the deliberate pick-up) and run it. A then got its slot and ran job1 too, and its record
    # was refused (probe): now A's start finds the run claimed and drops it.
    path = tmp_path / "runs.db"
    marks = Path(f"{path}.ran")  # what A ran
    ran: list[str] = []

    async def job() -> None:
        ran.append("B")

    with _another_worker(_QUEUES_A_RUN_THAT_MARKS, path, "queued") as other:
        async with SQLiteRunRegistry(path) as registry:
            picked = await stored(registry, "job1")
            assert picked.owner is not None and picked.owner.pid == other.pid
            async with BackgroundTaskManager(registry) as manager:
                await manager.start_task(picked, job())
                await manager.wait_all()
    # (A has exited: its queue reached job1, which it found claimed.)
    assert ran == ["B"]
    assert not await asyncio.to_thread(marks.exists), "A ran it too"
    async with SQLiteRunRegistry(path) as registry:
        done = await stored(registry, "job1")
        assert (done.status, done.owner) == (RunStatus.COMPLETED, RunOwner.current())


@pytest.mark.parametrize("marks_running", [False, True], ids=["manager-marks", "runner-marks"])
async def test_a_queued_run_claimed_elsewhere_is_dropped_here_with_its_output(
    tmp_path: Path, marks_running: bool
) -> None:
    # Another process claims job1 while it waits here for a slot. Dropped: not run (a runner
    # that records RUNNING itself, ModuleRunner with a cluster backend, ran it all the same),
    # and its output released (a follower hung for good; review).
    path = tmp_path / "runs.db"
    ran: list[str] = []

    async def job() -> None:
        ran.append("here")

    output = OutputCapture()
    async with SQLiteRunRegistry(path) as registry, SQLiteRunRegistry(path) as other:
        async with BackgroundTaskManager(registry, max_concurrent=1, output=output) as manager:
            gate = asyncio.Event()
            await manager.start_task(Run(module_id="busy"), gate.wait())
            await manager.start_task(
                Run(run_id="job1", module_id="m"), job(), marks_running=marks_running
            )
            copy = await stored(other, "job1")
            read_owner, copy.owner = copy.owner, ELSEWHERE
            assert await other.claim_run(copy, read_owner)
            async with asyncio.timeout(10), output.subscribe("job1", wait=True) as follower:
                gate.set()
                async for _ in follower:
                    pass  # ends: the run's output was released here
            await manager.wait_all()
        after = await stored(registry, "job1")
        assert (after.status, after.owner) == (RunStatus.PENDING, ELSEWHERE)
    assert ran == []


async def test_a_run_its_runner_found_claimed_is_neither_failed_nor_closed_here(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A runner that records RUNNING itself (ModuleRunner on a cluster) learns only when its job
    # starts that another process picked the run up while it waited in the cluster's queue; it
    # stops its child and raises RunClaimedError. The manager logged that as a failed run
    # (ERROR) and closed the run's output as FAILED, an end a shared log directory would show
    # the followers of the run the other process is running.
    path = tmp_path / "runs.db"
    output = OutputCapture(log_dir=tmp_path / "logs")
    async with SQLiteRunRegistry(path) as registry, SQLiteRunRegistry(path) as other:
        async with BackgroundTaskManager(registry, output=output) as manager:

            async def job() -> None:
                copy = await stored(other, "job1")
                read_owner, copy.owner = copy.owner, ELSEWHERE
                assert await other.claim_run(copy, read_owner)
                raise stopped_for_claim("job1", None)

            with caplog.at_level(logging.WARNING):
                await manager.start_task(
                    Run(run_id="job1", module_id="m"), job(), marks_running=True
                )
                await manager.wait_all()
        after = await stored(registry, "job1")
        assert (after.status, after.owner) == (RunStatus.PENDING, ELSEWHERE)
    await output.aclose()
    assert [r.levelname for r in caplog.records] == ["WARNING"], caplog.records
    assert "another process" in caplog.records[0].getMessage()
    log_text = "".join(p.read_text() for p in (tmp_path / "logs").rglob("*") if p.is_file())
    assert "failed" not in log_text.lower(), log_text


@pytest.mark.parametrize("marks_running", [False, True], ids=["manager-marks", "runner-marks"])
async def test_a_claim_error_for_a_run_nobody_else_claimed_fails_it_as_any_error(
    registry: BaseRunRegistry, marks_running: bool
) -> None:
    # A RunClaimedError naming the run that comes from elsewhere (the coroutine mirrors its run
    # into another store, where the id is another's): taken for a claim, the run was left
    # RUNNING for good, owned by this live process with nobody driving it (review).
    async def job() -> None:
        raise stopped_for_claim("job1", None)

    async with BackgroundTaskManager(registry) as manager:
        run = Run(run_id="job1", module_id="m")
        await manager.start_task(run, job(), marks_running=marks_running)
        await manager.wait_all()
    done = await stored(registry, "job1")
    assert done.status is RunStatus.FAILED and "RunClaimedError" in (done.error_message or "")


async def test_a_run_taken_over_and_cancelled_before_its_first_step_is_recorded_cancelled(
    registry: BaseRunRegistry,
) -> None:
    # The caller added the run, then start_task; its task cancelled before the first step
    # (a loop's teardown, a task group): the take-over claimed a CANCELLED run, which a claim
    # refuses, and the run stayed PENDING for good with an ERROR logged (review).
    await registry.add_run(Run(run_id="r", module_id="m"))
    async with BackgroundTaskManager(registry) as manager:
        handle = manager.start_task(Run(run_id="r", module_id="m"), asyncio.sleep(10))
        task = manager.tasks[handle]
        task.cancel()  # before its first step
        await handle
        await manager.wait_all()
    done = await stored(registry, "r")
    assert done.status is RunStatus.CANCELLED, done


async def test_a_stale_copy_picked_up_after_a_dead_claimer_records_this_process_as_owner(
    tmp_path: Path,
) -> None:
    # A copy read before another process claimed the run (and then died) kept the adder as
    # owner when picked up: the run ran here recorded under a process that did not run it
    # (marked INTERRUPTED once that one exited; probe).
    path = tmp_path / "runs.db"
    host = RunOwner.current().host
    parent = psutil.Process(os.getppid())
    adder = RunOwner(host, parent.pid, parent.create_time())  # alive, not us
    dead = RunOwner(host, 2**22 + 1, 1_000_000.0)  # no such process
    async with SQLiteRunRegistry(path) as registry, SQLiteRunRegistry(path) as other:
        await registry.add_run(Run(run_id="r", module_id="m", owner=adder))
        copy = await stored(registry, "r")
        claimed = await stored(other, "r")
        claimed.owner = dead
        assert await other.claim_run(claimed, adder)
        async with BackgroundTaskManager(registry) as manager:
            await manager.start_task(copy, returns(None))
            await manager.wait_all()
        done = await stored(registry, "r")
        assert (done.status, done.owner) == (RunStatus.COMPLETED, RunOwner.current())


async def test_a_picked_up_run_removed_meanwhile_is_not_run_again(tmp_path: Path) -> None:
    # A PENDING copy listed earlier; the run then ran elsewhere and retention removed it. Its
    # start here inserted it again and ran the job a second time (probe).
    ran: list[str] = []

    async def job() -> None:
        ran.append("again")

    elsewhere = RunOwner("another-host", 4242, 1_700_000_000.5)
    async with SQLiteRunRegistry(tmp_path / "runs.db") as registry:
        await registry.add_run(Run(run_id="r", module_id="m", owner=elsewhere))
        listed = await stored(registry, "r")
        done = await stored(registry, "r")
        done.mark_running(pid=None)
        done.mark_completed(0)
        await registry.update_run(done)
        assert await registry.delete_older_than(timedelta(0)) == 1
        async with BackgroundTaskManager(registry) as manager:
            with pytest.raises(DuplicateRunError, match="not stored"):
                await manager.start_task(listed, job())
            # Nor when its task is cancelled before the first step (recorded CANCELLED: it was
            # added again so).
            handle = manager.start_task(listed.copy(), job())
            manager.tasks[handle].cancel()
            with pytest.raises(DuplicateRunError, match="not stored"):
                await handle
        assert await registry.get_run("r") is None
    assert ran == []


ELSEWHERE = RunOwner("another-host", 4242, 1_700_000_000.5)


async def test_store_failure_without_await_is_logged_not_lost(
    registry: BaseRunRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    loop_errors: list[dict[str, object]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    done = Run()
    await registry.add_run(done)
    done.mark_cancelled("earlier")
    await registry.update_run(done)
    coro = returns(None)
    with caplog.at_level(logging.ERROR, logger="prismq_subprocess._background._task_manager"):
        async with BackgroundTaskManager(registry) as manager:
            handle = manager.start_task(Run(run_id=done.run_id), coro)
            await manager.wait_all()
            assert not handle.stored
            with pytest.raises(DuplicateRunError, match="cancelled"):
                await handle
    assert any(done.run_id in r.getMessage() for r in caplog.records)
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    assert (await stored(registry, done.run_id)).error_message == "earlier"
    del handle
    gc.collect()
    await asyncio.sleep(0)
    assert loop_errors == []


async def test_tasks_maps_active_run_ids_to_their_tasks(registry: BaseRunRegistry) -> None:
    gate = asyncio.Event()
    async with BackgroundTaskManager(registry) as manager:
        first = manager.start_task(Run(), gate.wait())
        second = manager.start_task(Run(), gate.wait())
        tasks = manager.tasks
        assert set(tasks) == {first, second}
        assert all(isinstance(t, asyncio.Task) and not t.done() for t in tasks.values())
        await second  # stored
        tasks[second].cancel()  # cancels the run like cancel_task(): recorded CANCELLED
        await asyncio.wait({tasks[second]})
        assert set(manager.tasks) == {first}
        assert (await stored(registry, second)).status is RunStatus.CANCELLED
        gate.set()
        await manager.tasks[first]  # done means recorded
        assert (await stored(registry, first)).status is RunStatus.COMPLETED
        assert manager.tasks == {}
        # Cancelled before its task ran a single step: still recorded CANCELLED.
        coro = gate.wait()
        third = manager.start_task(Run(), coro)
        manager.tasks[third].cancel()
        await manager.wait_all()
        assert (await stored(registry, third)).status is RunStatus.CANCELLED
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED


async def test_cancelling_an_awaited_start_cancels_the_run(tmp_path: Path) -> None:
    # SQLite stores in its worker thread, so the starter's cancellation lands while storing.
    async with SQLiteRunRegistry(tmp_path / "r.db") as registry:
        manager = BackgroundTaskManager(registry)
        run = Run()
        coro = returns(None)

        async def start() -> str:
            return await manager.start_task(run, coro)

        starter = asyncio.create_task(start())
        await asyncio.sleep(0)  # the starter now waits for the store
        starter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starter
        await manager.wait_all()
        got = await stored(registry, run.run_id)
        assert got.status is RunStatus.CANCELLED and got.started_at is None
        assert got.error_message == "start_task was cancelled before the run was stored"
        assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
        await manager.shutdown()


# --- issue 11, B7: non-coroutines, and a shutdown bounded whatever a run does ------------------


async def test_non_coroutines_are_refused_before_anything_starts() -> None:
    registry = RunRegistry()
    manager = BackgroundTaskManager(registry)

    async def work() -> None:
        await asyncio.sleep(0)

    task = asyncio.ensure_future(work())
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    for bad in (task, future, work, lambda: None, None):
        run = Run()
        with pytest.raises(InvalidTaskError) as info:
            manager.start_task(run, bad)  # type: ignore[arg-type]
        assert isinstance(info.value, TypeError) and isinstance(info.value, PrismQError)
        assert await registry.get_run(run.run_id) is None
    assert manager.active_runs() == [] and manager.tasks == {}
    await asyncio.wait_for(manager.wait_all(), 5)  # nothing left RUNNING to hang on
    await task  # not ours: it was left alone
    future.cancel()
    coro = work()
    with pytest.raises(InvalidTaskError):
        manager.start_task("not a run", coro)  # type: ignore[arg-type]
    assert inspect.getcoroutinestate(coro) == inspect.CORO_CLOSED
    await asyncio.wait_for(manager.shutdown(), 5)


class HangingRegistry(RunRegistry):
    """A memory registry whose writes hang forever once ``hang`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.hang = False

    async def update_run(self, run: Run) -> None:
        if self.hang:
            await asyncio.Event().wait()
        await super().update_run(run)


async def test_shutdown_is_bounded_when_recording_hangs(caplog: pytest.LogCaptureFixture) -> None:
    registry = HangingRegistry()
    manager = BackgroundTaskManager(registry)
    started = asyncio.Event()

    async def work() -> None:
        started.set()
        await asyncio.sleep(3600)

    run_id = await manager.start_task(Run(), work())
    await started.wait()
    registry.hang = True  # the CANCELLED write of the cancelled run never returns
    with caplog.at_level(logging.WARNING, logger="prismq_subprocess._background._task_manager"):
        # Generous bound: the promise is about 2 x grace + 1 s; this guards against a hang.
        await asyncio.wait_for(manager.shutdown(grace=0.05), 30)
    assert manager.active_runs() == []
    assert any(run_id in r.getMessage() for r in caplog.records)
    await asyncio.wait_for(manager.wait_all(), 5)


async def test_each_await_of_a_handle_waits_on_its_own(tmp_path: Path) -> None:
    async with SQLiteRunRegistry(tmp_path / "r.db") as registry:
        manager = BackgroundTaskManager(registry)
        run = Run()
        handle = manager.start_task(run, returns(None))

        async def confirm() -> str:
            return await handle

        first = asyncio.create_task(confirm())
        second = asyncio.create_task(confirm())
        await asyncio.sleep(0)  # both wait for the store
        first.cancel()  # cancels the start, but not the other waiter's wait
        assert await second == run.run_id
        with pytest.raises(asyncio.CancelledError):
            await first
        await manager.wait_all()
        assert (await stored(registry, run.run_id)).status is RunStatus.CANCELLED
        assert handle.stored and await handle == run.run_id
        await manager.shutdown()


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_a_manager_made_at_import_time_serves_one_event_loop_after_another(
    kind: str, tmp_path: Path
) -> None:
    # A host builds its manager at module level; its tests (one event loop each) and a server
    # restarted in the same process use it from successive loops, idle in between.
    store: BaseRunRegistry = (
        RunRegistry() if kind == "memory" else SQLiteRunRegistry(tmp_path / "r.db")
    )
    manager = BackgroundTaskManager(store)

    async def one_loop(value: int) -> RunStatus:
        run_id = manager.start_task(Run(module_id=f"loop-{value}"), returns(value))
        await manager.wait_all()
        return (await stored(store, run_id)).status

    assert asyncio.run(one_loop(1)) is RunStatus.COMPLETED
    assert asyncio.run(one_loop(2)) is RunStatus.COMPLETED

    async def close() -> None:
        await manager.shutdown()
        await store.aclose()

    asyncio.run(close())


class WriteLog(RunRegistry):
    """A memory registry that notes every write the manager makes through its async methods."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[tuple[str, RunStatus]] = []

    async def add_run(self, run: Run) -> None:
        self.writes.append(("add", run.status))
        await super().add_run(run)

    async def update_run(self, run: Run) -> None:
        self.writes.append(("update", run.status))
        await super().update_run(run)


class UpdateLog(RunRegistry):
    """Overrides update_run only: its add_run is the memory registry's own."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: list[RunStatus] = []

    async def update_run(self, run: Run) -> None:
        self.updates.append(run.status)
        await super().update_run(run)


async def test_registry_subclasses_see_every_write_through_their_methods() -> None:
    # The manager writes to a plain RunRegistry without a coroutine per write; a subclass (or
    # an instance) that replaces a write method must still be called through it, each time.
    logged, partly = WriteLog(), UpdateLog()
    patched = RunRegistry()
    patched_writes: list[tuple[str, RunStatus]] = []
    plain_add, plain_update = patched.add_run, patched.update_run

    async def add_run(run: Run) -> None:
        patched_writes.append(("add", run.status))
        await plain_add(run)

    async def update_run(run: Run) -> None:
        patched_writes.append(("update", run.status))
        await plain_update(run)

    patched.add_run = add_run  # type: ignore[method-assign]
    patched.update_run = update_run  # type: ignore[method-assign]
    expected = [
        ("add", RunStatus.PENDING),
        ("update", RunStatus.RUNNING),
        ("update", RunStatus.COMPLETED),
    ]
    for store in (logged, partly, patched):
        async with BackgroundTaskManager(store) as manager:
            run_id = await manager.start_task(Run(), returns(None))
            await manager.wait_all()
        assert (await stored(store, run_id)).status is RunStatus.COMPLETED
    assert logged.writes == expected
    assert partly.updates == [RunStatus.RUNNING, RunStatus.COMPLETED]
    assert patched_writes == expected


@pytest.mark.parametrize("where", ["instance", "class"])
async def test_a_write_method_replaced_while_a_run_works_is_used_for_its_later_writes(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What a host's test does: start a run, then patch the registry (on the instance or the
    # class) to watch or fail the writes that follow. Those must go through the patch.
    registry = RunRegistry()
    seen: list[RunStatus] = []
    plain_update = RunRegistry.update_run

    async def update_run(self: RunRegistry, run: Run) -> None:
        seen.append(run.status)
        await plain_update(self, run)

    async def work() -> None:
        if where == "instance":
            monkeypatch.setattr(registry, "update_run", update_run.__get__(registry))
        else:
            monkeypatch.setattr(RunRegistry, "update_run", update_run)
        await asyncio.sleep(0)

    async with BackgroundTaskManager(registry) as manager:
        await manager.start_task(Run(), work())
        await manager.wait_all()
    assert seen == [RunStatus.COMPLETED]


async def test_a_write_method_replaced_while_a_run_waits_for_its_slot_is_used(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With a concurrency limit the second run waits; the first one patches the registry
    # meanwhile. The second run's RUNNING write (after its wait) goes through the patch.
    registry = RunRegistry()
    seen: list[tuple[str, RunStatus]] = []
    plain_update = RunRegistry.update_run

    async def update_run(self: RunRegistry, run: Run) -> None:
        seen.append((run.module_id, run.status))
        await plain_update(self, run)

    go = asyncio.Event()

    async def first() -> None:
        await go.wait()  # until the second run is stored and queued behind this one
        monkeypatch.setattr(RunRegistry, "update_run", update_run)

    async with BackgroundTaskManager(registry, max_concurrent=1) as manager:
        await manager.start_task(Run(module_id="first"), first())
        await manager.start_task(Run(module_id="second"), returns(None))
        go.set()
        await manager.wait_all()
    assert ("second", RunStatus.RUNNING) in seen
    assert ("second", RunStatus.COMPLETED) in seen


async def test_the_registry_keeps_copies_never_the_callers_run() -> None:
    registry = RunRegistry()
    gate = asyncio.Event()
    looked = asyncio.Event()

    async def work() -> int:
        looked.set()
        await gate.wait()
        return 0

    async with BackgroundTaskManager(registry) as manager:
        run = Run(parameters={"n": [1]})
        await manager.start_task(run, work())
        await looked.wait()
        run.parameters["n"].append(2)  # the caller's object, changed while RUNNING is stored
        run.output_tail.append("not saved")
        running = await stored(registry, run.run_id)
        assert running.status is RunStatus.RUNNING and running.started_at == run.started_at
        assert running.parameters == {"n": [1]} and running.output_tail == []
        gate.set()
        await manager.wait_all()
    run.output_tail.append("after the end")
    final = await stored(registry, run.run_id)
    assert final.status is RunStatus.COMPLETED and final.finished_at == run.finished_at
    assert final.output_tail == ["not saved"] and final.parameters == {"n": [1, 2]}
    assert final.created_at == run.created_at and final.owner == run.owner is not None


@pytest.mark.parametrize("added_first", [False, True], ids=["new", "taken-over"])
async def test_the_running_record_is_the_whole_run(
    registry: BaseRunRegistry, added_first: bool
) -> None:
    # While the coroutine runs, the registry holds the whole run as it was when it started,
    # including changes the caller made after start_task returned, not only the RUNNING fields.
    seen: list[Run | None] = []

    async def work(run: Run) -> int:
        seen.append(await registry.get_run(run.run_id))
        seen.append(run.copy())
        return 0

    async with BackgroundTaskManager(registry) as manager:
        run = Run(module_id="m", parameters={"a": [1]})
        if added_first:
            await registry.add_run(run)
        manager.start_task(run, work(run))
        run.module_name = "named after start_task"
        run.parameters["a"].append(2)
        run.output_tail = ["early line"]
        await manager.wait_all()
    stored, own = seen
    assert stored == own and stored is not None
    assert stored.status is RunStatus.RUNNING and stored.started_at is not None
    assert stored.module_name == "named after start_task" and stored.parameters == {"a": [1, 2]}
    assert stored.output_tail == ["early line"]


async def test_a_run_changed_while_queued_is_stored_whole_when_it_starts(
    registry: BaseRunRegistry,
) -> None:
    gate = asyncio.Event()
    seen: list[Run | None] = []

    async def first() -> int:
        await gate.wait()
        return 0

    async def second(run: Run) -> int:
        seen.append(await registry.get_run(run.run_id))
        return 0

    async with BackgroundTaskManager(registry, max_concurrent=1) as manager:
        await manager.start_task(Run(), first())
        queued = Run(module_id="m")
        await manager.start_task(queued, second(queued))  # stored PENDING, waits for a slot
        assert manager.queued_count == 1
        queued.module_name = "changed while queued"
        queued.parameters["late"] = True
        gate.set()
        await manager.wait_all()
    (stored,) = seen
    assert stored is not None and stored.status is RunStatus.RUNNING
    assert stored.module_name == "changed while queued" and stored.parameters == {"late": True}


async def test_a_kept_handle_does_not_keep_the_manager_alive() -> None:
    # A TaskHandle is the run id (a str) and is kept as one (dict keys, caches); once its run
    # is over it must not hold the manager, its registry and every stored run.
    registry = RunRegistry()
    manager = BackgroundTaskManager(registry)

    async def work() -> int:
        return 1

    # (No failing run here: the logged traceback would hold this frame, and so the manager.)
    kept = [manager.start_task(Run(module_id="m"), work()) for _ in range(4)]
    cancelled = manager.start_task(Run(module_id="m"), work())
    manager.tasks[cancelled].cancel()  # before its first step
    kept.append(cancelled)
    await manager.wait_all()
    for handle in kept[:3]:
        await handle
    await manager.shutdown()
    await asyncio.sleep(0)  # the last done callbacks run
    gone = weakref.ref(manager), weakref.ref(registry)
    del manager, registry
    gc.collect()
    assert [ref() for ref in gone] == [None, None]
    assert len(kept) == 5


_REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


async def test_a_run_sees_the_callers_context_and_keeps_its_own(
    registry: BaseRunRegistry,
) -> None:
    manager = BackgroundTaskManager(registry)
    seen: list[str] = []

    async def work() -> None:
        seen.append(_REQUEST_ID.get())
        _REQUEST_ID.set("changed by the run")

    token = _REQUEST_ID.set("request 7")
    try:
        run = Run(module_id="m")
        manager.start_task(run, work())
        _REQUEST_ID.set("changed by the caller")
        await manager.wait_all()
    finally:
        _REQUEST_ID.reset(token)
    assert seen == ["request 7"]
    assert _REQUEST_ID.get() == "-"
    assert (await stored(registry, run.run_id)).status is RunStatus.COMPLETED
    await manager.shutdown()


@skip_on_uvloop(
    "uvloop calls a task factory with context= always, so a two-argument factory breaks every "
    "create_task there (asyncio.create_task too), not only ours"
)
async def test_a_task_factory_of_the_old_two_argument_form_still_works() -> None:
    loop = asyncio.get_running_loop()
    made: list[str] = []

    def factory(loop: asyncio.AbstractEventLoop, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.Task(coro, loop=loop)
        made.append(task.get_name())
        return task

    previous = loop.get_task_factory()
    loop.set_task_factory(factory)
    try:
        async with RunRegistry() as registry:
            manager = BackgroundTaskManager(registry)
            run = Run(module_id="m")
            await manager.start_task(run, returns(None))
            await manager.wait_all()
            assert (await stored(registry, run.run_id)).status is RunStatus.COMPLETED
            await manager.shutdown()
    finally:
        loop.set_task_factory(previous)
    assert made


@pytest.mark.skipif(
    not hasattr(asyncio, "eager_task_factory"), reason="eager tasks are Python 3.12+"
)
async def test_a_run_that_cancels_itself_in_its_eager_first_step_is_recorded_cancelled() -> None:
    # An eager task factory (3.12+) runs a task's first step inside create_task: a run that
    # looked itself up or cancelled itself there found no task of its own, and cancel_task()
    # then waited for its own end for good.
    loop = asyncio.get_running_loop()
    previous = loop.get_task_factory()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
    seen: dict[str, object] = {}
    try:
        async with RunRegistry() as registry:
            manager = BackgroundTaskManager(registry)
            run = Run(module_id="self-cancel")

            async def job() -> int:
                seen["in_tasks"] = run.run_id in manager.tasks
                seen["answer"] = await manager.cancel_task(run.run_id, reason="bad input")
                return 0

            manager.start_task(run, job())
            await asyncio.wait_for(manager.wait_all(), 10)
            record = await stored(registry, run.run_id)
            assert (record.status, record.error_message) == (RunStatus.CANCELLED, "bad input")
            assert seen == {"in_tasks": True}  # its cancel_task() was cancelled with it
            await manager.shutdown()
    finally:
        loop.set_task_factory(previous)


class _OldCreateTaskLoop(asyncio.SelectorEventLoop):
    """A loop whose create_task predates 3.11's ``context`` argument."""

    def create_task(self, coro: Any, *, name: str | None = None) -> asyncio.Task[Any]:  # type: ignore[override]
        return super().create_task(coro, name=name)


class _RefusingLoop(asyncio.SelectorEventLoop):
    """A loop that refuses new tasks (as one shutting down might)."""

    refuse = False

    def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        if self.refuse:
            raise RuntimeError("this loop takes no new tasks")
        return super().create_task(coro, **kwargs)


def _run_on(loop: asyncio.AbstractEventLoop, main: Coroutine[Any, Any, RunStatus]) -> RunStatus:
    """Run ``main`` to completion on ``loop`` (a loop class of the test's own), then close it."""
    try:
        return loop.run_until_complete(main)
    finally:
        loop.close()


def test_a_loop_whose_create_task_takes_no_context_still_runs_runs() -> None:
    async def main() -> RunStatus:
        async with RunRegistry() as registry:
            manager = BackgroundTaskManager(registry)
            run = Run(module_id="m")
            await manager.start_task(run, returns(None))
            await manager.wait_all()
            await manager.shutdown()
            return (await stored(registry, run.run_id)).status

    assert _run_on(_OldCreateTaskLoop(), main()) is RunStatus.COMPLETED


def test_a_refused_task_leaves_nothing_behind(recwarn: pytest.WarningsRecorder) -> None:
    # The loop refuses the run's task: start_task raises, and the run is not left "active",
    # its output not left open, no coroutine left unawaited; the same run can start later.
    async def main() -> RunStatus:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, _RefusingLoop)
        async with RunRegistry() as registry:
            output = OutputCapture()
            manager = BackgroundTaskManager(registry, output=output)
            run = Run(module_id="m")
            loop.refuse = True
            with pytest.raises(RuntimeError, match="no new tasks"):
                manager.start_task(run, returns(None))
            loop.refuse = False
            assert manager.active_runs() == []
            await asyncio.wait_for(manager.wait_all(), 5)
            await manager.start_task(run, returns(None))
            await manager.wait_all()
            await manager.shutdown()
            await output.aclose()
            return (await stored(registry, run.run_id)).status

    assert _run_on(_RefusingLoop(), main()) is RunStatus.COMPLETED
    gc.collect()
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


async def _contexts_made_by_ten_runs() -> int:
    async with RunRegistry() as registry:
        manager = BackgroundTaskManager(registry)
        # The first run starts the cancel-request poll (a task, so a context, per busy spell).
        manager.start_task(Run(module_id="m"), returns(None))
        gc.collect()
        # Kept alive, so that no new Context can take an old one's address.
        before = [o for o in gc.get_objects() if type(o) is contextvars.Context]
        known = {id(o) for o in before}
        for _ in range(10):
            manager.start_task(Run(module_id="m"), returns(None))
        made = [
            o for o in gc.get_objects() if type(o) is contextvars.Context and id(o) not in known
        ]
        del before
        await manager.wait_all()
        await manager.shutdown()
        return len(made)


async def test_a_run_copies_the_callers_context_once() -> None:
    # The done callback runs in the run's own context rather than in a second copy of the
    # caller's (one Context object fewer per live run for the cyclic GC to trace).
    assert await _contexts_made_by_ten_runs() == 10


def test_a_run_copies_the_callers_context_once_on_uvloop() -> None:
    # uvloop's create_task takes context= too (since 0.17), but only asyncio's own loops were
    # trusted with it: on uvloop each run made two Contexts (20 for 10 runs).
    uvloop = pytest.importorskip("uvloop")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        assert runner.run(_contexts_made_by_ten_runs()) == 10


# --- review of the fast paths (2026-12-01) ---------------------------------------------------


async def test_a_queued_run_cancelled_as_a_slot_frees_is_recorded_cancelled() -> None:
    """The queued run's slot is cancelled, and in the same loop iteration another run's end
    pops it from the queue: it used to fail on its own removal (ValueError, FAILED)."""
    registry = RunRegistry()
    manager = BackgroundTaskManager(registry, max_concurrent=1)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def first() -> None:
        await gate

    async def second() -> None:
        return None

    a, b = Run(), Run()
    manager.start_task(a, first())
    manager.start_task(b, second())
    await asyncio.sleep(0.01)
    gate.set_result(None)  # a ends in the next iteration, b's cancellation lands in the same
    assert await manager.cancel_task(b.run_id) is CancelResult.CANCELLED
    await manager.wait_all(timeout=5)
    stored_a, stored_b = await registry.get_run(a.run_id), await registry.get_run(b.run_id)
    assert stored_a is not None and stored_a.status is RunStatus.COMPLETED
    assert stored_b is not None and stored_b.status is RunStatus.CANCELLED, stored_b
    assert manager.running_count == 0 and manager.queued_count == 0
    await manager.shutdown()


class _SlowRegistry(RunRegistry):
    """A store whose writes take a moment (a subclass, a network store...)."""

    async def add_run(self, run: Run) -> None:
        await asyncio.sleep(0.02)
        await super().add_run(run)

    async def update_run(self, run: Run) -> None:
        await asyncio.sleep(0.02)
        await super().update_run(run)


async def _never() -> None:
    await asyncio.Event().wait()


@pytest.mark.parametrize("how", ["cancel_task", "shutdown"])
async def test_a_run_cancelled_before_its_first_step_is_recorded_before_the_call_returns(
    how: str,
) -> None:
    """cancel_task() and shutdown() return once the run is recorded CANCELLED, also when its
    task was cancelled before its first step (a task of its own then records it)."""
    registry = _SlowRegistry()
    manager = BackgroundTaskManager(registry)
    run = Run()
    manager.start_task(run, _never())
    manager.tasks[run.run_id].cancel()
    if how == "cancel_task":
        await manager.cancel_task(run.run_id)
    else:
        await manager.shutdown()
    stored = await RunRegistry.get_run(registry, run.run_id)
    assert stored is not None and stored.status is RunStatus.CANCELLED
    assert not manager.is_active(run.run_id)
    await manager.shutdown()


def test_cancel_requests_are_heard_on_the_next_loop_after_one_closed_with_tasks_left() -> None:
    """A manager serving a second event loop after the first was closed without cancelling
    its tasks (run_until_complete, then close()): its watcher's poll task was that loop's."""
    registry = RunRegistry()
    manager = BackgroundTaskManager(registry)

    async def phase() -> RunStatus:
        release = asyncio.Event()

        async def work() -> None:
            await release.wait()

        run = Run()
        await manager.start_task(run, work())
        await registry.request_cancel(run.run_id, "from elsewhere")
        try:
            await asyncio.wait_for(manager.wait_all(), 5)
        finally:
            release.set()
            await manager.wait_all()
        stored = await registry.get_run(run.run_id)
        assert stored is not None
        return stored.status

    for _ in range(2):
        loop = asyncio.new_event_loop()
        try:
            assert loop.run_until_complete(phase()) is RunStatus.CANCELLED
        finally:
            loop.close()


# --- cancel requests with the watcher reading the active runs (2026-12-01, night review) -----


async def _until_finished(registry: BaseRunRegistry, run_id: str, limit: float = 5.0) -> Run:
    async with asyncio.timeout(limit):
        while True:
            run = await registry.get_run(run_id)
            assert run is not None
            if run.is_finished:
                return run
            await asyncio.sleep(0.01)


async def test_a_run_started_while_another_one_stops_still_hears_its_cancel_request() -> None:
    # Run A's cancel takes a while; B starts meanwhile (so it is not the manager's first run)
    # and is asked to stop. The poll ended once every active run had a cancel under way, and
    # nothing started it again while runs were active: B ran on, its request never acted on.
    registry = RunRegistry()
    manager = BackgroundTaskManager(registry)

    async def slow_to_stop() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(0.5)
            raise

    a = Run(module_id="m")
    b = Run(module_id="m")
    manager.start_task(a, slow_to_stop())
    await asyncio.sleep(0.05)
    await registry.request_cancel(a.run_id, "stop A")
    await asyncio.sleep(0.15)  # A's cancel is under way
    manager.start_task(b, asyncio.sleep(30))
    await asyncio.sleep(0.05)
    await registry.request_cancel(b.run_id, "stop B")
    stopped = await _until_finished(registry, b.run_id, limit=0.4)  # A is still stopping
    assert stopped.status is RunStatus.CANCELLED and stopped.error_message == "stop B"
    assert (await _until_finished(registry, a.run_id)).status is RunStatus.CANCELLED
    await manager.shutdown()


def test_cancel_requests_are_heard_in_a_later_event_loop_with_a_run_left_behind() -> None:
    # A loop closed with a run of the manager still pending leaves that run active; the runs of
    # the next loop are then never the manager's first, and its poll task died with the old
    # loop: their cancel requests were never acted on.
    registry = RunRegistry()
    manager = BackgroundTaskManager(registry)
    left = asyncio.new_event_loop()
    try:

        async def leave_one() -> None:
            manager.start_task(Run(module_id="m"), asyncio.sleep(30))
            await asyncio.sleep(0.05)

        left.run_until_complete(leave_one())
    finally:
        left.close()  # the run's task never ends: it stays among the manager's runs

    async def later() -> RunStatus:
        run = Run(module_id="m")
        manager.start_task(run, asyncio.sleep(30))
        await asyncio.sleep(0.05)
        await registry.request_cancel(run.run_id, "asked")
        return (await _until_finished(registry, run.run_id, limit=2)).status

    assert asyncio.run(later()) is RunStatus.CANCELLED


# --- review: module runs (session 19) ---------------------------------------------------------


async def test_a_second_cancel_returns_once_the_run_is_recorded(registry: BaseRunRegistry) -> None:
    """Two cancel_task() calls for one run (a double click on "stop"): the second returned
    ALREADY_FINISHED at once, while the first was still waiting for the coroutine's clean-up
    and the registry still said RUNNING. It now returns once the outcome is recorded."""
    cleaning = asyncio.Event()
    started = asyncio.Event()  # the run is stored RUNNING before its coroutine starts

    async def slow_to_stop() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cleaning.set()
            await asyncio.sleep(0.3)  # stopping a child's tree takes its grace period
            raise

    async with BackgroundTaskManager(registry) as manager:
        run = Run(module_id="m", module_name="m")
        await manager.start_task(run, slow_to_stop())
        await started.wait()
        assert (await stored(registry, run.run_id)).status is RunStatus.RUNNING
        first = asyncio.ensure_future(manager.cancel_task(run.run_id, "first"))
        await cleaning.wait()
        assert await manager.cancel_task(run.run_id, "second") is CancelResult.ALREADY_FINISHED
        now = await stored(registry, run.run_id)
        assert now.status is RunStatus.CANCELLED, now
        assert now.error_message == "first"
        assert await first is CancelResult.CANCELLED


async def test_a_run_cancelling_itself_again_in_its_clean_up_does_not_wait_for_itself(
    registry: BaseRunRegistry,
) -> None:
    manager = BackgroundTaskManager(registry)
    run = Run(module_id="m", module_name="m")
    answers: list[CancelResult] = []

    async def stops_itself() -> None:
        try:
            await manager.cancel_task(run.run_id, "itself")
        finally:
            answers.append(await manager.cancel_task(run.run_id, "again"))

    await manager.start_task(run, stops_itself())
    await asyncio.wait_for(manager.wait_all(), 10)
    assert answers == [CancelResult.ALREADY_FINISHED]
    assert (await stored(registry, run.run_id)).status is RunStatus.CANCELLED
    await manager.aclose()


# --- review: background runs (session 20) -----------------------------------------------------


@pytest.mark.parametrize(
    ("returned", "status"),
    [(None, RunStatus.COMPLETED), (ExitCode(3), RunStatus.FAILED)],
)
async def test_cancel_of_a_run_that_ends_otherwise_is_not_reported_cancelled(
    registry: BaseRunRegistry, returned: object, status: RunStatus
) -> None:
    """A coroutine that catches the cancellation and returns keeps the outcome it returns (as
    documented), but cancel_task() said CANCELLED, true, of a run recorded COMPLETED or FAILED."""
    started = asyncio.Event()

    async def finishes_anyway() -> object:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(0)
        return returned

    async with BackgroundTaskManager(registry) as manager:
        run = Run(module_id="m", module_name="m")
        await manager.start_task(run, finishes_anyway())
        await started.wait()
        answer = await asyncio.wait_for(manager.cancel_task(run.run_id), 10)
        assert answer is CancelResult.ALREADY_FINISHED
        assert (await stored(registry, run.run_id)).status is status


async def test_cancel_of_a_run_that_could_not_be_stored_says_not_found(tmp_path: Path) -> None:
    """cancel_task() of a run whose insert was under way and then failed said CANCELLED, true,
    of a run that is in no registry and never ran."""

    class FailingInsert(RunRegistry):
        def __init__(self) -> None:
            super().__init__()
            self.inserting = asyncio.Event()
            self.gate = asyncio.Event()

        async def add_run(self, run: Run) -> None:
            self.inserting.set()
            await self.gate.wait()
            raise OSError(28, "No space left on device")

    async with FailingInsert() as registry, BackgroundTaskManager(registry) as manager:
        run = Run(module_id="m", module_name="m")
        handle = manager.start_task(run, asyncio.sleep(0))
        await registry.inserting.wait()
        cancelling = asyncio.ensure_future(manager.cancel_task(run.run_id))
        await asyncio.sleep(0.05)
        registry.gate.set()
        assert await asyncio.wait_for(cancelling, 10) is CancelResult.NOT_FOUND
        with pytest.raises(OSError, match="No space"):
            await handle
        assert await registry.get_run(run.run_id) is None


def _failing_final_writes(base: type[BaseRunRegistry], failures: int) -> type[BaseRunRegistry]:
    """``base`` whose writes of a finished run fail ``failures`` times, as on a full disk."""

    class FullDisk(base):  # type: ignore[valid-type,misc]
        left = failures

        async def update_run(self, run: Run) -> None:
            if run.is_finished and self.left > 0:
                self.left -= 1
                raise OSError(28, "No space left on device")
            await super().update_run(run)

    return FullDisk


@pytest.fixture(params=["memory", "sqlite"])
def store_class(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[int], BaseRunRegistry]:
    def make(failures: int) -> BaseRunRegistry:
        if request.param == "memory":
            return _failing_final_writes(RunRegistry, failures)()
        return _failing_final_writes(SQLiteRunRegistry, failures)(tmp_path / "r.db")

    return make


async def test_a_final_record_that_failed_is_written_again(
    store_class: Callable[[int], BaseRunRegistry],
) -> None:
    """The final write of a run failed (a full disk for a moment): the run stayed RUNNING in the
    registry for as long as the process lived, since nobody writes a finished run again."""
    async with store_class(3) as registry:
        manager = BackgroundTaskManager(registry)
        done = Run(module_id="m", module_name="m")
        cancelled = Run(module_id="m", module_name="m")
        await manager.start_task(done, returns(None))
        await manager.start_task(cancelled, asyncio.sleep(60))
        await asyncio.sleep(0.05)
        await manager.cancel_task(cancelled.run_id)
        await manager.wait_all(timeout=10)
        for run_id, status in ((done.run_id, RunStatus.COMPLETED), (cancelled.run_id, None)):
            for _ in range(200):
                now = await stored(registry, run_id)
                if now.is_finished:
                    break
                await asyncio.sleep(0.05)
            assert now.is_finished, now
            assert status is None or now.status is status
        assert (await stored(registry, cancelled.run_id)).status is RunStatus.CANCELLED
        await manager.aclose()


async def test_shutdown_makes_a_last_try_for_failed_final_records(
    store_class: Callable[[int], BaseRunRegistry], caplog: pytest.LogCaptureFixture
) -> None:
    """A final record still failing at shutdown gets one last try there, within the grace; one
    that keeps failing is given up on, logged, and shutdown still returns."""
    async with store_class(1) as registry:
        manager = BackgroundTaskManager(registry)
        run = Run(module_id="m", module_name="m")
        await manager.start_task(run, returns(None))
        await manager.wait_all(timeout=10)
        await asyncio.wait_for(manager.shutdown(grace=0.5), 10)  # before the first retry
        assert (await stored(registry, run.run_id)).status is RunStatus.COMPLETED
    async with store_class(10**6) as registry:
        manager = BackgroundTaskManager(registry)
        run = Run(module_id="m", module_name="m")
        await manager.start_task(run, returns(None))
        await manager.wait_all(timeout=10)
        with caplog.at_level(logging.ERROR):
            await asyncio.wait_for(manager.shutdown(grace=0.5), 10)
        assert "could not be recorded completed" in caplog.text
        assert (await stored(registry, run.run_id)).status is RunStatus.RUNNING


async def test_a_cancel_waiting_for_a_run_that_shutdown_abandons_returns_once_recorded(
    registry: BaseRunRegistry,
) -> None:
    """A cancel_task() in progress for a coroutine that ignores cancellation kept waiting after
    shutdown() had given up on the run and recorded it CANCELLED (for as long as the coroutine
    went on; a second cancel_task() then answered at once)."""
    stop = asyncio.Event()
    started = asyncio.Event()

    async def stubborn() -> None:
        started.set()
        while not stop.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await stop.wait()

    manager = BackgroundTaskManager(registry)
    run = Run(module_id="m", module_name="m")
    await manager.start_task(run, stubborn())
    await started.wait()
    cancelling = asyncio.ensure_future(manager.cancel_task(run.run_id, "by request"))
    await asyncio.sleep(0.05)
    try:
        await asyncio.wait_for(manager.shutdown(grace=0.2), 10)
        assert (await stored(registry, run.run_id)).status is RunStatus.CANCELLED
        assert await asyncio.wait_for(cancelling, 10) is CancelResult.CANCELLED
    finally:
        stop.set()
        cancelling.cancel()
    for task in list(manager._abandoned):
        await asyncio.wait_for(asyncio.wait([task]), 10)


def test_a_task_manager_shut_down_inside_a_cancelled_anyio_scope_cancels_its_runs() -> None:
    """``finally: await manager.shutdown()`` inside a cancelled scope was cut short at its
    first await, before any run was cancelled: the runs went on after the manager said it was
    shut down."""
    ended: list[str] = []

    async def main() -> None:
        registry = RunRegistry()
        manager = BackgroundTaskManager(registry)

        async def work() -> None:
            try:
                await anyio.sleep(60)
            finally:
                ended.append("cancelled")

        with anyio.move_on_after(0.3):
            try:
                await manager.start_task(Run(module_id="m", module_name="m", run_id="r1"), work())
                await anyio.sleep(60)
            finally:
                await manager.shutdown(grace=5.0)
        run = await registry.get_run("r1")
        assert run is not None and run.status is RunStatus.CANCELLED

    anyio.run(main)
    assert ended == ["cancelled"]


@pytest.mark.parametrize("exit_code", [0.0, 3.0, 2.5, float("nan")])
async def test_a_run_ended_with_an_odd_exit_code_still_closes_its_output(exit_code: float) -> None:
    # A review's find: close_run() now refuses a non-int exit code, and the manager closed a
    # run's output with whatever the run held (Run.mark_completed(0.0) is accepted): the close
    # failed (logged), and the run's subscribers waited for ever.
    capture = OutputCapture()
    run = Run(module_id="m")

    async def work() -> None:
        await capture.append_line(run.run_id, "working")
        run.mark_completed(exit_code)  # type: ignore[arg-type]

    async with BackgroundTaskManager(RunRegistry(), output=capture) as manager:
        await manager.start_task(run, work())
        await manager.wait_all()
    assert capture.is_closed(run.run_id)
    subscription = capture.subscribe(run.run_id)
    assert [item async for item in subscription]  # ends (it waited for ever)
    assert subscription.end is not None
    allowed = (None, int(exit_code)) if exit_code.is_integer() else (None,)
    assert subscription.end.exit_code in allowed
    await capture.aclose()


def test_a_windows_file_uri_names_its_drive_path() -> None:
    # A review's find: file:///C:/x/runs.db parsed to /C:/x/runs.db, never the same file as
    # C:\\x\\runs.db (Windows is not runnable here: the parse is what is checked).
    from prismq_subprocess._background._memory_registry import file_of as _file_of

    class Stored:
        def __init__(self, path: str) -> None:
            self.path = path

    assert _file_of(Stored("file:///C:/x/runs%20db.db?mode=rw")) == "C:/x/runs db.db"  # type: ignore[arg-type]
    assert _file_of(Stored("file:/srv/runs.db")) == "/srv/runs.db"  # type: ignore[arg-type]
    assert _file_of(Stored("file::memory:?cache=shared")) is None  # type: ignore[arg-type]
    assert _file_of(Stored("file:x.db?mode=memory")) is None  # type: ignore[arg-type]


async def test_cancel_task_refuses_a_run_id_or_reason_of_the_wrong_type(
    registry: BaseRunRegistry,
) -> None:
    # A list gave a bare "unhashable" TypeError (probe); the reason None was stored as "None".
    async with BackgroundTaskManager(registry) as manager:
        with pytest.raises(InvalidRunIdError):
            await manager.cancel_task([1])  # type: ignore[arg-type]
        with pytest.raises(InvalidArgumentTypeError):
            await manager.cancel_task("r", None)  # type: ignore[arg-type]


class _LostClaimReplies(SQLiteRunRegistry):
    """A store whose first ``claim_runs`` claims answer with an error of the environment: the
    first ``landed`` of them after the claim was made (its reply was lost), the rest before."""

    def __init__(self, path: Path, *, failures: int, landed: int) -> None:
        super().__init__(path)
        self.failures = failures
        self.landed = landed
        self.claims = 0

    async def claim_run(self, run: Run, owner: RunOwner | None) -> bool:
        self.claims += 1
        if self.claims > self.failures:
            return await super().claim_run(run, owner)
        if self.claims <= self.landed:
            assert await super().claim_run(run, owner)
        raise RegistryDatabaseError(f"{self.path}: database is locked (try {self.claims})")


@pytest.mark.parametrize(
    ("failures", "landed"), [(1, 1), (2, 0), (3, 1)], ids=["reply-lost", "refused", "both"]
)
async def test_a_claim_that_failed_for_the_environment_is_tried_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, failures: int, landed: int
) -> None:
    # A cluster run's claim (marks_running: the runner records RUNNING itself) that failed on
    # a locked database left the run as if claimed by nobody, or (reply lost) as if another
    # process had it; it is tried again like the manager's own RUNNING write (retry_start),
    # and a claim that landed before its reply was lost is answered True on the next try (the
    # stored owner is this process's, as the claim expects).
    ran: list[RunStatus] = []
    async with _LostClaimReplies(tmp_path / "r.db", failures=failures, landed=landed) as registry:

        async def job() -> None:
            ran.append((await stored(registry, "job1")).status)

        async with BackgroundTaskManager(registry) as manager:
            with caplog.at_level(logging.INFO, logger="prismq_subprocess"):
                await manager.start_task(
                    Run(run_id="job1", module_id="m"), job(), marks_running=True
                )
                await manager.wait_all()
        after = await stored(registry, "job1")
        assert registry.claims == failures + 1
    assert ran == [RunStatus.PENDING]  # run once, by this process, the claim its own
    assert (after.status, after.owner) == (RunStatus.COMPLETED, RunOwner.current())
    assert [r.levelname for r in caplog.records if r.levelno >= logging.INFO] == ["INFO"] * failures


async def test_a_closed_output_is_refused_before_the_work_runs() -> None:
    # A review's find (ModuleRunner's fix missed the manager): with its OutputCapture closed,
    # start_task ran the work and recorded it COMPLETED, and only logged an ERROR; the run's
    # output and its end were lost.
    ran: list[int] = []

    async def work() -> None:
        ran.append(1)

    output = OutputCapture()
    await output.aclose()
    coro = work()
    async with RunRegistry() as registry, BackgroundTaskManager(registry, output=output) as manager:
        with pytest.raises(OutputClosedError, match="not started"):
            manager.start_task(Run(run_id="r1"), coro)
        await manager.wait_all()
        assert await registry.get_run("r1") is None
    assert ran == [] and coro.cr_frame is None  # closed, never run
