"""Starting tasks as the running loop would, by cheaper routes where asyncio's own loop allows."""

from __future__ import annotations

import asyncio
import inspect
import sys
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["create_task_takes_context", "loop_makes_plain_tasks", "start_task_eagerly"]

_T = TypeVar("_T")
_BASE_CREATE_TASK = asyncio.BaseEventLoop.create_task


def loop_makes_plain_tasks(loop: asyncio.AbstractEventLoop) -> bool:
    """True when ``loop`` makes its tasks with asyncio's own ``create_task`` and no task factory.

    Only then may a caller pass ``context=`` (3.11+; a loop's own ``create_task`` or a factory
    written for older Pythons may not take it) or build the ``asyncio.Task`` itself, as the loop
    would have.
    """
    return loop.get_task_factory() is None and type(loop).create_task is _BASE_CREATE_TASK


def create_task_takes_context(loop: asyncio.AbstractEventLoop) -> bool:
    """True when ``loop.create_task(coro, context=...)`` is sure to work: no task factory (one
    written for older Pythons may not take ``context``) and a ``create_task`` that declares it
    (asyncio's own, or uvloop's since 0.17)."""
    if loop.get_task_factory() is not None:
        return False
    create_task = type(loop).create_task
    known = _DECLARES_CONTEXT.get(create_task)
    if known is None:
        known = _DECLARES_CONTEXT[create_task] = _declares_context(create_task)
    return known


# create_task (the loop class's function) -> whether it takes context=; asked per run.
_DECLARES_CONTEXT: dict[object, bool] = {_BASE_CREATE_TASK: True}


def _declares_context(create_task: object) -> bool:
    try:
        parameters = inspect.signature(create_task).parameters  # type: ignore[arg-type]
    except (TypeError, ValueError):  # a compiled method without a signature: unknown
        return False
    context = parameters.get("context")
    return context is not None and context.kind is inspect.Parameter.KEYWORD_ONLY


def start_task_eagerly(
    loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, _T]
) -> asyncio.Task[_T]:
    """A task for ``coro``, started at once where asyncio can (3.12+ with plain tasks: an eager
    task runs until its first suspension now, not on the next loop iteration)."""
    if sys.version_info >= (3, 12) and loop_makes_plain_tasks(loop):
        return asyncio.Task(coro, loop=loop, eager_start=True)
    return loop.create_task(coro)
