"""Blocking work run off the event loop, shared by the callers that ask at the same time.

Stopping a process tree reads the process table and waits for signals to land: milliseconds of
blocking work that must not stall the event loop (anyio and trio hand such calls to worker
threads too). And when many children are stopped at once (a wrapper closing, a manager stopping
every run, many timeouts expiring together), one look at the process table can serve them all.
:class:`Coalescer` does both: what is submitted while its worker thread is busy forms the next
batch, handed to the work function in one call.

The work function also gets a ``pace()`` callable: calling it blocks the worker until every
event loop waiting on the batch has had a full turn (bounded by :data:`PACE_TIMEOUT`). A stop
that ends a thousand children calls it between bursts of signals, so their exits reach the event
loop in bursts it can handle between other tasks, instead of all at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
import time
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

__all__ = ["PACE_TIMEOUT", "Coalescer", "Pace", "no_pace", "run_in_thread"]

#: The longest ``pace()`` waits for a busy event loop (the work goes on after it regardless).
PACE_TIMEOUT = 0.1
#: The shortest ``pace()``.
PACE_MINIMUM = 0.002

#: Blocks the calling worker thread until the event loops involved caught up.
Pace = Callable[[], None]


def no_pace() -> None:
    """The ``pace()`` of synchronous callers: there is no loop to wait for."""


In = TypeVar("In")
Out = TypeVar("Out")
T = TypeVar("T")


class Coalescer(Generic[In, Out]):
    """Runs ``work(items, pace) -> results`` (one result per item, in order) in a worker
    thread.

    Every :meth:`submit` made while a batch is being worked on joins the next batch. The thread
    exists only while there is work, so an idle program holds no thread for it. It is not a
    daemon thread: work that was started (e.g. a tree held stopped) is finished even when the
    interpreter is exiting.
    """

    def __init__(self, work: Callable[[list[In], Pace], list[Out]], name: str) -> None:
        self._work = work
        self._name = name
        self._lock = threading.Lock()
        self._pending: list[
            tuple[Sequence[In], asyncio.AbstractEventLoop, asyncio.Future[list[Out]]]
        ] = []
        self._running = False

    async def submit(self, items: Sequence[In]) -> list[Out]:
        """Have ``items`` worked on (with whatever else is pending) and return their results.

        Cancellation: the caller stops waiting; the work, once handed over, is still done.

        Raises:
            whatever the work function raised for the batch.
        """
        if not items:
            return []
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Out]] = loop.create_future()
        with self._lock:
            self._pending.append((items, loop, future))
            start = not self._running
            self._running = True
        if start:
            try:
                threading.Thread(target=self._drain, name=self._name).start()
            except BaseException:
                with self._lock:
                    self._running = False
                raise
        return await future

    def _drain(self) -> None:
        while True:
            with self._lock:
                batch, self._pending = self._pending, []
                if not batch:
                    self._running = False
                    return
            items = [item for submitted, _, _ in batch for item in submitted]
            loops = list({id(loop): loop for _, loop, _ in batch}.values())
            try:
                results = self._work(items, functools.partial(_pace, loops))
            except BaseException as exc:  # handed to every caller of the batch
                for _, loop, future in batch:
                    _deliver(loop, future, None, exc)
                continue
            start = 0
            for submitted, loop, future in batch:
                _deliver(loop, future, results[start : start + len(submitted)], None)
                start += len(submitted)


async def run_in_thread(fn: Callable[[], T], name: str) -> T:
    """Run ``fn()`` in a new thread named ``name`` and return its result.

    Cancellation: the caller stops waiting; ``fn`` still runs to its end (the thread is not a
    daemon, so even an exiting interpreter lets it finish).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def target() -> None:
        try:
            result = fn()
        except BaseException as exc:
            _deliver(loop, future, None, exc)
        else:
            _deliver(loop, future, result, None)

    threading.Thread(target=target, name=name).start()
    return await future


def _pace(loops: list[asyncio.AbstractEventLoop]) -> None:
    # At least PACE_MINIMUM between bursts: on Python 3.11 asyncio learns of each exit from a
    # watcher thread per child, which must get the GIL before the loop even hears of it.
    time.sleep(PACE_MINIMUM)
    for loop in loops:
        turned = threading.Event()
        try:
            # Re-queued once, so it runs after everything the loop found ready in the same
            # iteration (e.g. the exits of the children just signalled).
            loop.call_soon_threadsafe(loop.call_soon, turned.set)
        except RuntimeError:  # closed
            continue
        turned.wait(PACE_TIMEOUT)


def _deliver(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[T],
    result: T | None,
    exc: BaseException | None,
) -> None:
    with contextlib.suppress(RuntimeError):  # the loop was closed: nobody is waiting any more
        loop.call_soon_threadsafe(_settle, future, result, exc)


def _settle(future: asyncio.Future[T], result: T | None, exc: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)  # type: ignore[arg-type]  # None only with exc
