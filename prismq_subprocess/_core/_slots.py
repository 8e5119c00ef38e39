"""A counting limit that any event loop may wait on and that closing ends: :class:`Slots`.

``asyncio.Semaphore`` would do the counting, but it binds itself to the first loop that waits
on it (an executor or pool made at import time and used by one ``asyncio.run`` after another
then fails in the second), and it has no way to end its waiters when the thing it guards is
closed. Here each waiter is a future of its own loop, and nothing else holds a loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable

__all__ = ["Slots"]


def _fail(future: asyncio.Future[None], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


class Slots:
    """At most ``limit`` holders at once; waiters are served first come, first served.

    Use it from one event loop at a time (not thread-safe), any number of loops one after
    another. :meth:`close` ends every waiter, and later :meth:`acquire` calls, with the
    ``closed`` factory's exception; holders keep their slot until they :meth:`release` it.
    """

    def __init__(self, limit: int, closed: Callable[[], BaseException]) -> None:
        self.limit = limit
        self.held = 0
        self._closed_error = closed
        self._closed = False
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        """Wait for a slot and take it.

        Raises:
            the ``closed`` exception: :meth:`close` was called before or while waiting.
        """
        if self._closed:
            raise self._closed_error()
        if self.held < self.limit and not self._waiters:
            self.held += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # The slot was handed over as this caller was cancelled: pass it on.
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
            raise
        # A slot handed over by release(): ``held`` already counts it.

    def release(self) -> None:
        """Give a slot back (to the first waiter still waiting, if any)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            # (A waiter of a loop closed while it waited is gone with it: skipped.)
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)
                return
        self.held -= 1

    def close(self) -> None:
        """End every waiter with the ``closed`` exception, now and for later calls. Callable
        from any thread (a waiter on another thread's loop is ended through that loop)."""
        self._closed = True
        waiters, self._waiters = self._waiters, deque()
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for waiter in waiters:
            loop = waiter.get_loop()
            if loop is running:
                _fail(waiter, self._closed_error())
            else:
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                    loop.call_soon_threadsafe(_fail, waiter, self._closed_error())
