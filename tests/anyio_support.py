"""Driving the library under anyio's level-triggered cancellation, as FastAPI/Starlette hosts do:
the ways a scope gets cancelled, and an event loop that counts its iterations and keeps what it
would report (a task's exception never retrieved, a future destroyed pending).

(pyproject puts tests/ on sys.path, so test modules import this.)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

#: How an anyio scope cancels the body: a deadline passing quietly (``move_on_after``) or
#: raising (``fail_after``), an explicit ``CancelScope.cancel()``, a task-group sibling failing.
CANCELS = ["move_on_after", "fail_after", "cancel_scope", "failing_sibling"]


def _exists(path: Path) -> bool:
    """Whether ``path`` exists (a stat: no need for a thread)."""
    return path.exists()


async def cancelled_after(
    kind: str,
    seconds: float,
    body: Callable[[], Awaitable[object]],
    *,
    once: Path | None = None,
) -> None:
    """Run ``body`` until an anyio scope cancels it after ``seconds``, in the way ``kind`` says.

    With ``once``, the cancellation comes as soon as that file exists (a child saying it is
    ready), ``seconds`` being then only the longest wait: a deadline is moved to now, a scope
    cancelled, a sibling fails, each as ``kind`` says.
    """

    async def trigger() -> None:
        if once is None:
            await anyio.sleep(seconds)
            return
        # (A file another process creates: polled, as nothing here can be woken by it.)
        for _ in range(max(1, int(seconds / 0.01))):
            if _exists(once):
                return
            await anyio.sleep(0.01)

    if kind in ("move_on_after", "fail_after"):
        raises = pytest.raises(TimeoutError) if kind == "fail_after" else contextlib.nullcontext()
        with raises:
            scope_of = anyio.move_on_after if kind == "move_on_after" else anyio.fail_after
            with scope_of(seconds) as scope:
                if once is None:
                    await body()
                else:

                    async def expire() -> None:
                        await trigger()
                        scope.deadline = anyio.current_time()  # the deadline passes now

                    async with anyio.create_task_group() as group:
                        group.start_soon(expire)
                        await body()
    elif kind == "cancel_scope":
        with anyio.CancelScope() as scope:

            async def cancel_later() -> None:
                await trigger()
                scope.cancel()

            async with anyio.create_task_group() as group:
                group.start_soon(cancel_later)
                await body()
    else:

        async def fail_later() -> None:
            await trigger()
            raise LookupError("sibling failed")

        with pytest.raises(ExceptionGroup) as info:
            async with anyio.create_task_group() as group:
                group.start_soon(fail_later)
                await body()
        assert info.group_contains(LookupError)


async def closed_by_a_cancelled_scope(
    resource: Any,
    how: str,
    seen: dict[str, object],
    ready: Callable[[], Awaitable[object]] | None = None,
) -> asyncio.Task[Any] | None:
    """Start ``resource`` (one of ours with a ``_task``) by entering it, wait for ``ready``,
    then let a ``move_on_after`` cancel the body; the resource is closed by leaving its
    ``async with`` (``how == "async with"``) or by ``aclose()`` awaited directly in the
    ``finally`` (then ``seen["returned"]`` is set once that returned). Returns its task."""
    task: asyncio.Task[Any] | None = None
    with anyio.move_on_after(0.1):
        if how == "async with":
            async with resource:
                task = resource._task
                if ready is not None:
                    await ready()
                await anyio.sleep(30)
        else:
            await resource.__aenter__()
            task = resource._task
            try:
                if ready is not None:
                    await ready()
                await anyio.sleep(30)
            finally:
                await resource.aclose()
                seen["returned"] = True
    return task


@dataclass
class LoopReport:
    """What a :func:`run_counted` loop saw."""

    iterations: int = 0
    #: The messages the loop's exception handler got ("Task exception was never retrieved",
    #: "Task was destroyed but it is pending!", ...), the loop closed and collected.
    reported: list[str] = field(default_factory=list)
    #: Warnings raised meanwhile ("coroutine ... was never awaited", ResourceWarning, ...).
    warned: list[str] = field(default_factory=list)
    #: Loop iterations counted by :meth:`mark` / :meth:`since`.
    marks: dict[str, int] = field(default_factory=dict)

    def mark(self, name: str) -> None:
        self.marks[name] = self.iterations

    def since(self, name: str) -> int:
        return self.iterations - self.marks[name]


def run_counted(main: Callable[[LoopReport], Awaitable[Any]]) -> tuple[Any, LoopReport]:
    """``anyio.run(main, report)`` on the asyncio backend, on a loop that counts its iterations
    into ``report`` and records what its exception handler gets; collects garbage after the run
    so that futures dropped with an error or pending are reported too."""
    report = LoopReport()

    class CountingLoop(asyncio.SelectorEventLoop):
        def _run_once(self) -> None:
            report.iterations += 1
            super()._run_once()  # type: ignore[misc]

    def keep(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        report.reported.append(str(context.get("message")))

    def make_loop() -> asyncio.AbstractEventLoop:
        loop = CountingLoop()
        loop.set_exception_handler(keep)
        return loop

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = anyio.run(main, report, backend_options={"loop_factory": make_loop})
        gc.collect()
    report.warned = [f"{w.category.__name__}: {w.message}" for w in caught]
    return result, report
