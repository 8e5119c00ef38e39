"""Acting on cancel requests recorded in a run registry: :class:`CancelRequestWatcher`.

Any process sharing a registry may ask for a run to be cancelled (``request_cancel``); only the
process that drives the run can stop it. Its ``BackgroundTaskManager`` and ``ModuleRunner`` each
keep one watcher: while they have unfinished runs, it asks the registry every ``interval``
seconds which of them have a request (one indexed query on the registry's own thread for
SQLite, whatever the number of runs) and runs the owner's cancel for each request, once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection

from .._core._exceptions import RegistryClosedError
from ._memory_registry import DEFAULT_POLL_INTERVAL, BaseRunRegistry

__all__ = ["CancelRequestWatcher"]

logger = logging.getLogger(__name__)


class CancelRequestWatcher:
    """Polls ``registry`` for cancel requests of the watched runs; runs ``cancel(run_id,
    reason)`` in a task of its own once per requested run (then stops watching it).

    The watched runs are those given to :meth:`watch` and not yet to :meth:`unwatch`, or, with
    ``source``, the run ids ``source()`` returns at each poll (an owner that already keeps its
    active runs then pays nothing per run; it calls :meth:`wake` when it gets its first).

    The poll runs only while some run is watched. A failing poll is logged and retried at the
    next interval; a closed registry ends the polling until the next :meth:`watch` or
    :meth:`wake`. A failing cancel is logged.
    """

    def __init__(
        self,
        registry: BaseRunRegistry,
        cancel: Callable[[str, str], Awaitable[object]],
        *,
        interval: float = DEFAULT_POLL_INTERVAL,
        source: Callable[[], Collection[str]] | None = None,
    ) -> None:
        self.registry = registry
        self.interval = interval
        self._cancel = cancel
        self._source = source
        self._watched: set[str] = set()
        # With a source: the runs whose cancel was started (it stays in the source until the
        # run ends, and must not be cancelled twice).
        self._requested: set[str] = set()
        self._task: asyncio.Task[None] | None = None
        # Cancels in progress: asyncio keeps only weak references to tasks.
        self._cancels: set[asyncio.Future[object]] = set()
        self._closed = False

    def watch(self, run_id: str) -> None:
        """Start looking for requests to cancel ``run_id`` (call from the event loop)."""
        if self._closed:
            return
        self._watched.add(run_id)
        self.wake()

    def wake(self) -> None:
        """Make sure the poll runs (call from the event loop), e.g. when ``source`` got its
        first run, or its first on a new loop."""
        if self._closed:
            return
        task = self._task
        # A poll task of a loop that was closed with its tasks left pending never runs again.
        if task is None or task.done() or task.get_loop().is_closed():
            self._task = asyncio.get_running_loop().create_task(
                self._poll(), name="prismq-cancel-requests"
            )

    def unwatch(self, run_id: str) -> None:
        """Stop looking for ``run_id`` (its run ended here)."""
        self._watched.discard(run_id)

    def _candidates(self) -> frozenset[str] | None:
        """The watched runs whose cancel was not started yet; ``None`` when nothing is
        watched (the poll then ends)."""
        if self._source is None:
            return frozenset(self._watched) or None
        ids = frozenset(self._source())
        if not ids:
            self._requested.clear()
            return None
        self._requested &= ids  # forget the runs that ended
        # Empty while every active run's cancel is under way: the poll goes on, for the runs
        # that start meanwhile.
        return ids - self._requested

    def _take(self, run_id: str) -> bool:
        """Stop watching ``run_id`` for a request; False if it is no longer watched."""
        if self._source is None:
            if run_id not in self._watched:
                return False
            self._watched.discard(run_id)
            return True
        if run_id in self._requested or run_id not in self._source():
            return False
        self._requested.add(run_id)
        return True

    async def _poll(self) -> None:
        while not self._closed:
            candidates = self._candidates()
            if candidates is None:
                return
            if not candidates:
                await asyncio.sleep(self.interval)
                continue
            try:
                requests = await self.registry.cancel_requests(candidates)
            except RegistryClosedError:
                return
            except Exception:
                logger.exception("looking for cancel requests failed; trying again")
                requests = {}
            for run_id, reason in requests.items():
                if self._take(run_id):  # (it may have ended while the registry was asked)
                    cancel = asyncio.ensure_future(self._cancel(run_id, reason))
                    self._cancels.add(cancel)
                    cancel.add_done_callback(self._cancel_done)
            await asyncio.sleep(self.interval)

    def _cancel_done(self, cancel: asyncio.Future[object]) -> None:
        self._cancels.discard(cancel)
        if not cancel.cancelled() and cancel.exception() is not None:
            logger.error("acting on a cancel request failed", exc_info=cancel.exception())

    async def aclose(self) -> None:
        """Stop polling (cancels already started go on). Idempotent.

        Cancellation: the poll is stopped anyway.
        """
        self._closed = True
        self._watched.clear()
        self._requested.clear()
        task = self._task
        self._task = None
        # A poll task of a loop closed with it pending never runs again: it is only dropped.
        if task is not None and not task.done() and not task.get_loop().is_closed():
            task.cancel()
            await asyncio.wait({task})
