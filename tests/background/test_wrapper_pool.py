"""ResourcePool: bounded lending, reuse, closing."""

from __future__ import annotations

import asyncio

import pytest
from helpers import py

import prismq_subprocess as pq
from prismq_subprocess._background._wrapper_pool import ResourcePool
from prismq_subprocess._core._exceptions import PoolClosedError


async def test_wrappers_are_bounded_and_reused() -> None:
    async with ResourcePool(max_workers=2, run_mode="async") as pool:
        peak = 0
        seen: set[int] = set()

        async def job(i: int) -> int:
            nonlocal peak
            async with pool.acquire_subprocess() as wrapper:
                peak = max(peak, pool.in_use)
                seen.add(id(wrapper))
                result = await wrapper.run(*py(f"print({i})"))
                return int(result.stdout)

        assert await asyncio.gather(*(job(i) for i in range(6))) == list(range(6))
        assert peak == 2
        assert pool.created == 2 and len(seen) == 2
        assert pool.in_use == 0 and pool.idle == 2


async def test_acquire_waits_while_all_are_lent_out() -> None:
    async with ResourcePool(max_workers=1, run_mode="threaded") as pool:
        got: list[pq.SubprocessWrapper] = []

        async def borrow() -> None:
            async with pool.acquire_subprocess() as wrapper:
                got.append(wrapper)

        async with pool.acquire_subprocess() as first:
            waiter = asyncio.create_task(borrow())
            await asyncio.sleep(0.05)
            assert not waiter.done() and got == []
        await waiter
        assert got == [first]  # the same wrapper, reused
    assert pool.closed


async def test_closing_stops_children_left_running_and_refuses_new_loans() -> None:
    pool = ResourcePool(max_workers=1, run_mode="async", grace_period=1.0)
    async with pool.acquire_subprocess() as wrapper:
        proc = await wrapper.create_subprocess_exec(*py("import time; time.sleep(60)"))
    await pool.aclose()
    assert proc.returncode is not None
    with pytest.raises(PoolClosedError):
        async with pool.acquire_subprocess():
            pass
    await pool.aclose()


async def test_cancelled_waiter_does_not_take_a_slot() -> None:
    async with ResourcePool(max_workers=1, run_mode="async") as pool:

        async def borrow() -> None:
            async with pool.acquire_subprocess():
                await asyncio.sleep(60)

        holder = asyncio.create_task(borrow())
        await asyncio.sleep(0.01)
        waiter = asyncio.create_task(borrow())
        await asyncio.sleep(0.01)
        waiter.cancel()
        holder.cancel()
        await asyncio.gather(holder, waiter, return_exceptions=True)
        assert pool.in_use == 0
        async with pool.acquire_subprocess() as wrapper:
            assert (await wrapper.run(*py("print('x')"))).stdout.strip() == b"x"


def test_sync_cleanup_and_validation() -> None:
    pool = ResourcePool(max_workers=3)
    pool.cleanup()
    pool.cleanup()
    assert pool.closed
    with pytest.raises(pq.exceptions.InvalidLimitError):
        ResourcePool(max_workers=0)
    with pytest.raises(pq.exceptions.InvalidTimeoutError):
        ResourcePool(grace_period=-1)


async def test_closing_wakes_callers_waiting_for_a_wrapper() -> None:
    # Documented: PoolClosedError when the pool closes while waiting; the waiter stayed
    # blocked until some borrower left its block, which a long-lived one may never do.
    pool = ResourcePool(max_workers=1, run_mode="async")
    release = asyncio.Event()

    async def hold() -> None:
        async with pool.acquire_subprocess():
            await release.wait()

    async def wait_for_one() -> None:
        async with pool.acquire_subprocess():
            pass

    holder = asyncio.create_task(hold())
    await asyncio.sleep(0.02)
    waiter = asyncio.create_task(wait_for_one())
    await asyncio.sleep(0.02)
    await pool.aclose()
    async with asyncio.timeout(2):
        with pytest.raises(PoolClosedError):
            await waiter
    release.set()
    await holder


async def test_a_cancelled_aclose_still_stops_the_children_left_running() -> None:
    # aclose() forgot its wrappers before closing them, and a cancel right after it started
    # cancelled their closes before they ran: the child ran on, out of every retry's reach.
    pool = ResourcePool(max_workers=2, run_mode="async", grace_period=0.5)
    async with pool.acquire_subprocess() as wrapper:
        proc = await wrapper.create_subprocess_exec(*py("import time; time.sleep(60)"))
    closing = asyncio.create_task(pool.aclose())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    try:
        async with asyncio.timeout(5):
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    pool.cleanup()


def test_a_pool_serves_one_event_loop_after_another() -> None:
    pool = ResourcePool(max_workers=1, run_mode="async")

    async def contend() -> None:
        async def borrow() -> None:
            async with pool.acquire_subprocess():
                await asyncio.sleep(0.01)

        await asyncio.gather(*(borrow() for _ in range(3)))

    asyncio.run(contend())
    asyncio.run(contend())
    pool.cleanup()


def test_a_bad_run_mode_is_refused_when_the_pool_is_made() -> None:
    with pytest.raises(pq.exceptions.InvalidRunModeError):
        ResourcePool(run_mode="bogus")
