"""Tests of starting tasks as the loop would (prismq_subprocess/_core/_task_start.py)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from conftest import skip_on_uvloop

from prismq_subprocess._core._task_start import loop_makes_plain_tasks, start_task_eagerly


class _OwnCreateTask(asyncio.SelectorEventLoop):
    def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        return super().create_task(coro, **kwargs)


@skip_on_uvloop("its loop makes its own tasks (the test is of asyncio's own loop)")
async def test_plain_tasks_only_with_asyncios_create_task_and_no_factory() -> None:
    loop = asyncio.get_running_loop()
    assert loop_makes_plain_tasks(loop)
    previous = loop.get_task_factory()
    loop.set_task_factory(lambda loop, coro, **kwargs: asyncio.Task(coro, loop=loop, **kwargs))
    try:
        assert not loop_makes_plain_tasks(loop)
    finally:
        loop.set_task_factory(previous)
    own = _OwnCreateTask()
    try:
        assert not loop_makes_plain_tasks(own)
    finally:
        own.close()


async def test_an_eager_start_runs_to_the_first_suspension_at_once_on_312() -> None:
    steps: list[str] = []

    async def work() -> str:
        steps.append("started")
        await asyncio.sleep(0)
        return "done"

    task = start_task_eagerly(asyncio.get_running_loop(), work())
    assert steps == (["started"] if sys.version_info >= (3, 12) else [])
    assert await task == "done"


def test_a_loop_of_its_own_gets_its_own_kind_of_task() -> None:
    made: list[object] = []

    class Counting(asyncio.SelectorEventLoop):
        def create_task(self, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
            task = super().create_task(coro, **kwargs)
            made.append(task)
            return task

    async def work() -> int:
        return 1

    async def main() -> int:
        return await start_task_eagerly(asyncio.get_running_loop(), work())

    loop = Counting()
    try:
        assert loop.run_until_complete(main()) == 1
    finally:
        loop.close()
    assert len(made) == 2  # main's task and the one start_task_eagerly asked the loop for
