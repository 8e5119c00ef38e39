"""Final records a registry failed to store, written again until one works: :class:`RecordRetry`.

A run's last registry write may fail for a while (a full disk, a file locked longer than the busy
timeout). The run is over by then, so nobody else will write it: without another try the
registry says RUNNING for as long as this process lives (crash recovery only acts on runs whose
owner died), and a cancel from another worker waits on it for ever. ``BackgroundTaskManager`` and
``ModuleRunner`` hand such runs to a :class:`RecordRetry`, which writes them again with a growing
delay until the write works, the registry refuses for good, or its owner closes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from .._core._exceptions import PrismQError, RegistryDatabaseError
from ._memory_registry import BaseRunRegistry
from ._run_record import Run

__all__ = ["RecordRetry", "retry_start", "worth_retrying"]

logger = logging.getLogger(__name__)

_FIRST_DELAY = 0.1
_MAX_DELAY = 5.0


# A start record is tried again after these delays (seconds), each try waiting up to the
# registry's own busy timeout first: a short, bounded hold on a start, not a retry for ever.
_START_DELAYS = (0.05, 0.2, 0.5)

_T = TypeVar("_T")


def _environmental(exc: Exception) -> bool:
    """An error of the environment (OSError, sqlite3's errors, a full or locked database),
    which may be gone a moment later. Our other errors are answers (the run is gone or claimed,
    the registry is closed or read-only, the stored run is further on) another try repeats."""
    return isinstance(exc, RegistryDatabaseError) or not isinstance(exc, PrismQError)


def worth_retrying(run: Run, exc: Exception) -> bool:
    """Whether the failed write of ``run`` may work later: a final status, and an error of the
    environment (see :func:`_environmental`)."""
    return run.is_finished and _environmental(exc)


async def retry_start(
    run: Run,
    write: Callable[[], Awaitable[_T]],
    give_up: Callable[[], bool] | None = None,
) -> _T:
    """Await ``write()``, the record that a run starts here (RUNNING, or the claim before
    it), and await it again up to three times on an error of the environment; the last error
    propagates, at once if ``give_up()`` says so (the run is being stopped: its start no
    longer matters, and whoever stops it waits for it). ``write`` must be safe to repeat: a
    try that raised stored nothing.

    Until that record is stored the run is PENDING on file, and another process may pick it
    up and run it a second time; going on after one failed try (a database locked a moment
    longer than its busy timeout) left that window open for the whole run.
    """
    for delay in _START_DELAYS:
        try:
            return await write()
        except Exception as exc:
            if not _environmental(exc) or (give_up is not None and give_up()):
                raise
            logger.info(
                "recording the start of run %s failed (%s: %s); trying again in %g s",
                run.run_id,
                type(exc).__name__,
                exc,
                delay,
            )
        await asyncio.sleep(delay)
    return await write()


class RecordRetry:
    """Runs whose final record failed, written to ``registry`` again until it works.

    Use it from one event loop at a time. :meth:`aclose` makes a last try and gives up on what is
    left (logged); the object may be used again afterwards (a new retry starts with the next
    :meth:`add`).
    """

    def __init__(
        self,
        registry: BaseRunRegistry,
        *,
        first_delay: float = _FIRST_DELAY,
        max_delay: float = _MAX_DELAY,
    ) -> None:
        self.registry = registry
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._runs: dict[str, Run] = {}
        self._task: asyncio.Task[None] | None = None

    def __len__(self) -> int:
        return len(self._runs)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._runs

    def add(self, run: Run) -> None:
        """Write a copy of ``run`` (as it is now) again later, replacing an earlier one of the
        same run. Needs a running event loop."""
        self._runs[run.run_id] = run.copy()
        loop = asyncio.get_running_loop()
        task = self._task
        if task is None or task.done() or task.get_loop() is not loop:
            # A task of a loop that has ended never runs again: a new one on this loop.
            self._task = loop.create_task(self._retry(), name="prismq-record-retry")

    async def _retry(self) -> None:
        delay = self.first_delay
        while self._runs:
            await asyncio.sleep(delay)
            await self.attempt()
            delay = min(delay * 2, self.max_delay)

    async def attempt(self) -> None:
        """Try each waiting run once; keep those that still fail for a reason that may pass."""
        for run_id, run in list(self._runs.items()):
            try:
                await self.registry.update_run(run)
            except Exception as exc:
                if worth_retrying(run, exc):
                    continue  # logged when it first failed; the next try may work
                logger.error("run %s (%s) could not be recorded: %s", run_id, run.status.value, exc)
            else:
                logger.warning("run %s recorded %s after failed tries", run_id, run.status.value)
            if self._runs.get(run_id) is run:
                del self._runs[run_id]

    async def aclose(self, timeout: float) -> None:
        """Stop retrying after one last try of at most ``timeout`` seconds; log what is left.

        Cancellation: stops waiting; the runs left are given up on.
        """
        task, self._task = self._task, None
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            await asyncio.wait([task])  # not `await task`: our own cancellation still counts
        if not self._runs:
            return
        try:
            await asyncio.wait_for(self.attempt(), timeout)
        except TimeoutError:
            pass
        finally:
            left, self._runs = self._runs, {}
            for run_id, run in left.items():
                logger.error(
                    "run %s could not be recorded %s: the registry kept failing",
                    run_id,
                    run.status.value,
                )
