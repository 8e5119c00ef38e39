"""Starting tasks as the running loop would, by cheaper routes where asyncio's own loop allows."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["loop_makes_plain_tasks", "start_task_eagerly"]

_T = TypeVar("_T")
_BASE_CREATE_TASK = asyncio.BaseEventLoop.create_task


def loop_makes_plain_tasks(loop: asyncio.AbstractEventLoop) -> bool:
    """True when ``loop`` makes its tasks with asyncio's own ``create_task`` and no task factory.

    Only then may a caller pass ``context=`` (3.11+; a loop's own ``create_task`` or a factory
    written for older Pythons may not take it) or build the ``asyncio.Task`` itself, as the loop
    would have.
    """
    return loop.get_task_factory() is None and type(loop).create_task is _BASE_CREATE_TASK


def start_task_eagerly(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T]
) -> asyncio.Task[_T]:
    """A task for ``coro``, started at once where asyncio can (3.12+ with plain tasks: an eager
    task runs until its first suspension now, not on the next loop iteration)."""
    if sys.version_info >= (3, 12) and loop_makes_plain_tasks(loop):
        return asyncio.Task(coro, loop=loop, eager_start=True)
    return loop.create_task(coro)
