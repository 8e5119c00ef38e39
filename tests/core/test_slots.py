"""Slots: the counting limit of ResourcePool and ConcurrentExecutor."""

from __future__ import annotations

import asyncio

import pytest

from prismq_subprocess._core._slots import Slots


class Closed(Exception):
    pass


async def test_waiters_are_served_in_order_and_a_cancelled_one_passes_its_slot_on() -> None:
    slots = Slots(1, Closed)
    await slots.acquire()
    order: list[str] = []

    async def take(name: str) -> None:
        await slots.acquire()
        order.append(name)
        slots.release()

    first, second, third = (asyncio.create_task(take(n)) for n in "abc")
    await asyncio.sleep(0)
    second.cancel()
    slots.release()
    await asyncio.gather(first, third)
    assert order == ["a", "c"]
    assert slots.held == 0
    with pytest.raises(asyncio.CancelledError):
        await second


async def test_a_waiter_cancelled_as_it_was_handed_the_slot_gives_it_back() -> None:
    slots = Slots(1, Closed)
    await slots.acquire()
    waiter = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # handed over to the waiter...
    waiter.cancel()  # ...which is cancelled before it resumes
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.held == 0


async def test_close_ends_the_waiters_and_later_calls() -> None:
    slots = Slots(1, Closed)
    await slots.acquire()
    waiters = [asyncio.create_task(slots.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    slots.close()
    for waiter in waiters:
        with pytest.raises(Closed):
            await waiter
    with pytest.raises(Closed):
        await slots.acquire()
    slots.release()  # the holder leaves as usual
    assert slots.held == 0


def test_one_event_loop_after_another() -> None:
    slots = Slots(1, Closed)

    async def contend() -> None:
        async def hold() -> None:
            await slots.acquire()
            await asyncio.sleep(0.001)
            slots.release()

        await asyncio.gather(*(hold() for _ in range(4)))

    asyncio.run(contend())
    asyncio.run(contend())
    assert slots.held == 0
