"""Property: random interleavings of start / read / cancel / timeout / terminate on a pool of
children never leave a live descendant or a leaked thread."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import pytest
from conftest import REAL, WRAPPER_FACTORIES
from helpers import py
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lifecycle_helpers import TREE_CHILD, marked_env, resource_counts, settle, survivors_after

import prismq_subprocess as pq

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX trees")

ACTIONS = ["start_stream", "start_run", "start_raw", "read", "cancel", "timeout", "terminate"]


class Slot:
    """One child and the task or process that owns it."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.process: Any = None
        self.lines = 0


async def scenario(mode: str, steps: list[tuple[int, str]], env: dict[str, str]) -> None:
    async with WRAPPER_FACTORIES[mode]() as wrapper:
        slots = [Slot() for _ in range(3)]

        async def stream(slot: Slot) -> None:
            async with wrapper.stream(*py(TREE_CHILD), env=env, grace_period=0.5) as lines:
                async for _ in lines:
                    slot.lines += 1

        for index, action in steps:
            slot = slots[index]
            busy = (slot.task is not None and not slot.task.done()) or slot.process is not None
            if action == "start_stream" and not busy:
                slot.task = asyncio.ensure_future(stream(slot))
            elif action == "start_run" and not busy:
                slot.task = asyncio.ensure_future(
                    wrapper.run(*py(TREE_CHILD), env=env, grace_period=0.5)
                )
            elif action == "start_raw" and not busy:
                slot.process = await wrapper.create_subprocess_exec(
                    *py(TREE_CHILD), env=env, stdout=pq.PIPE
                )
            elif action == "read":
                await asyncio.sleep(0.05)
                if slot.process is not None and mode != "local":
                    await asyncio.wait_for(slot.process.stdout.readline(), 10)
            elif action == "cancel" and slot.task is not None:
                slot.task.cancel()
                await asyncio.gather(slot.task, return_exceptions=True)
                slot.task = None
            elif action == "timeout" and not busy:
                with contextlib.suppress(pq.ProcessTimeoutError):
                    await wrapper.run(*py(TREE_CHILD), env=env, timeout=0.2, grace_period=0.5)
            elif action == "terminate" and slot.process is not None:
                await pq.terminate_gracefully(slot.process, timeout=0.5)
                slot.process = None
        # whatever is left is stopped by leaving the wrapper; tasks see their child stopped
        leftover = [s.task for s in slots if s.task is not None]
    for task in leftover:
        task.cancel()
    await asyncio.gather(*leftover, return_exceptions=True)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    mode=st.sampled_from(REAL),
    steps=st.lists(st.tuples(st.integers(0, 2), st.sampled_from(ACTIONS)), min_size=1, max_size=10),
)
def test_random_interleavings_leave_nothing_behind(mode: str, steps: list[tuple[int, str]]) -> None:
    baseline = resource_counts()
    mark, env = marked_env()
    asyncio.run(scenario(mode, steps, env))
    assert survivors_after(mark, 1.5) == []
    threads, _ = settle(baseline, (1, 4))
    assert threads <= baseline[0] + 1
