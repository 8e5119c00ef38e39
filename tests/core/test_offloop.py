"""Coalescer: blocking work off the loop, shared by the callers that ask at the same time."""

from __future__ import annotations

import asyncio
import threading

import pytest

from prismq_subprocess._core._offloop import Coalescer, Pace, run_in_thread


async def test_work_runs_off_the_loop_and_concurrent_submits_share_a_batch() -> None:
    gate = threading.Event()
    batches: list[list[int]] = []
    threads: list[threading.Thread] = []

    def work(items: list[int], pace: Pace) -> list[int]:
        threads.append(threading.current_thread())
        gate.wait(5)
        batches.append(list(items))
        return [i * 10 for i in items]

    coalescer: Coalescer[int, int] = Coalescer(work, "test-coalescer")
    first = asyncio.ensure_future(coalescer.submit([1]))
    while not threads:  # noqa: ASYNC110 - the worker thread appends; polling is the test
        await asyncio.sleep(0.005)
    # These arrive while the first batch is being worked on: they form one batch together.
    rest = [asyncio.ensure_future(coalescer.submit(items)) for items in ([2, 3], [4])]
    await asyncio.sleep(0.02)
    gate.set()
    assert await first == [10]
    assert [await r for r in rest] == [[20, 30], [40]]
    assert batches == [[1], [2, 3, 4]]
    assert threading.main_thread() not in threads
    assert await coalescer.submit([]) == []


async def test_an_error_reaches_every_caller_of_the_batch_and_the_next_batch_runs() -> None:
    calls = 0

    def work(items: list[int], pace: Pace) -> list[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("boom")
        return items

    coalescer: Coalescer[int, int] = Coalescer(work, "test-coalescer")
    with pytest.raises(OSError, match="boom"):
        await coalescer.submit([1])
    assert await coalescer.submit([2]) == [2]


async def test_cancelling_the_caller_does_not_abandon_the_work() -> None:
    started = threading.Event()
    release = threading.Event()
    done: list[int] = []

    def work(items: list[int], pace: Pace) -> list[int]:
        started.set()
        release.wait(5)
        done.extend(items)
        return items

    coalescer: Coalescer[int, int] = Coalescer(work, "test-coalescer")
    task = asyncio.ensure_future(coalescer.submit([7]))
    await asyncio.to_thread(started.wait, 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set()
    await asyncio.to_thread(_join_named, "test-coalescer")
    assert done == [7]


async def test_pace_waits_for_the_loop_to_take_a_turn() -> None:
    order: list[str] = []

    def work(items: list[int], pace: Pace) -> list[int]:
        loop.call_soon_threadsafe(order.append, "queued before pace")
        pace()
        order.append("after pace")
        return items

    loop = asyncio.get_running_loop()
    coalescer: Coalescer[int, int] = Coalescer(work, "test-coalescer")
    await coalescer.submit([1])
    assert order == ["queued before pace", "after pace"]


async def test_run_in_thread_returns_or_raises() -> None:
    here = threading.current_thread()
    assert await run_in_thread(threading.current_thread, "test-run") is not here

    def fail() -> None:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        await run_in_thread(fail, "test-run")


def _join_named(name: str) -> None:
    for thread in threading.enumerate():
        if thread.name == name:
            thread.join(5)
