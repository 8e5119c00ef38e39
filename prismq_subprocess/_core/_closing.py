"""`AsyncResource`: the package's one closing protocol, ``aclose()`` plus ``async with``."""

from __future__ import annotations

import asyncio
import logging
from abc import ABC, abstractmethod
from types import TracebackType
from typing import Any, Self

from ._cancel_shield import cleaning_up_after_a_cancel, shielded_if_cancelled

__all__ = ["AsyncClosing", "AsyncResource", "join_stopped_task"]


class AsyncResource(ABC):
    """Something that holds resources (children, threads, files, tasks) until it is closed.

    Every such object in prismq_subprocess closes the same way, as anyio's ``AsyncResource``
    does: ``await obj.aclose()``, or an ``async with obj:`` block, which calls :meth:`aclose`
    however the block ends (inside a cancelled anyio scope too: the close is shielded from it).
    ``aclose()`` is idempotent. Objects that can be closed for good then
    refuse further use with a :class:`ClosedError` subclass; the schedulers (``PeriodicTask``,
    ``ProcessTreeSampler``, ``MemoryMonitor``) hold nothing once stopped and may be started
    again. Older verbs (``cleanup()``, ``stop()``, ``close()``, ...) remain as documented aliases.

    Subclasses implement :meth:`aclose`; those with a closed state override :meth:`_check_open`
    so entering a closed object raises at once. Entering may do more (a registry opens, a
    scheduler starts); such subclasses override :meth:`__aenter__`.
    """

    def _check_open(self) -> None:  # noqa: B027 - only objects with a closed state override it
        """Raise if the object can no longer be used; subclasses that can be closed override."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release everything the object holds. Idempotent."""

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # A block left because an anyio scope was cancelled (a disconnected client, a
        # move_on_after): aclose() runs as it does after asyncio's one-shot cancellation,
        # shielded from the scope's level-triggered one, which would cut it short at its first
        # await (children killed without their grace period, threads left to finish alone).
        with shielded_if_cancelled():
            await self.aclose()


#: The earlier, private name of :class:`AsyncResource`.
AsyncClosing = AsyncResource


#: How long :func:`join_stopped_task`, shielded from a cancelled anyio scope, lets the task
#: finish what it is doing before it cancels it.
SHIELDED_JOIN_SECONDS = 5.0


async def join_stopped_task(task: asyncio.Task[Any], log: logging.Logger, what: str) -> None:
    """Wait until ``task``, already asked to stop, has ended; log an unexpected error it ended
    with (so asyncio never reports it as never retrieved).

    Called inside an anyio scope that is already cancelled (a ``finally`` block after
    ``move_on_after``), or inside a clean-up shielded from one (an ``async with`` exit), the
    wait runs in full, shielded from that scope, as after asyncio's one-shot cancellation;
    bounded there: after :data:`SHIELDED_JOIN_SECONDS` the task is cancelled (a callback it
    awaits may take any time) and then waited for.

    Cancellation: ``task`` is cancelled too, then ``CancelledError`` propagates.
    """
    shielded = cleaning_up_after_a_cancel()
    try:
        with shielded_if_cancelled():
            await asyncio.wait({task}, timeout=SHIELDED_JOIN_SECONDS if shielded else None)
            if not task.done():
                log.warning(
                    "%s still going %s s after it was asked to stop; cancelling it",
                    what,
                    SHIELDED_JOIN_SECONDS,
                )
                task.cancel()
                await asyncio.wait({task})
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not task.cancelled() and task.exception() is not None:
        log.error("%s failed", what, exc_info=task.exception())
