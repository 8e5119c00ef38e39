"""Live children by run id, so a run can be stopped from anywhere: :class:`ProcessManager`.

A web backend starts a module in one request and cancels it from another, or stops everything at
shutdown. The manager is the one place that knows which process belongs to which run. Stopping is
always a tree stop (:func:`terminate_gracefully`: SIGTERM to the group, grace, SIGKILL), and two
callers stopping the same run share one stop instead of signalling twice.
"""

from __future__ import annotations

import asyncio
import logging

from .._core._cancel_shield import shielded_if_cancelled
from .._core._closing import AsyncResource
from .._core._exceptions import DuplicateRunError, InvalidRunIdError
from .._core._process import ProcessLike
from .._core._tree_stop import DEFAULT_GRACE_PERIOD, terminate_gracefully
from .._core._validation import check_process, check_timeout

__all__ = ["ProcessManager"]

logger = logging.getLogger(__name__)


class ProcessManager(AsyncResource):
    """Track the live child process of each run by ``run_id``; stop one run or all of them.

    The code that starts a child calls :meth:`register` right after spawning and
    :meth:`unregister` once it has finished with it (``ModuleRunner`` does both). Anyone may call
    :meth:`stop` meanwhile; :meth:`stop_requested` then tells the owner that the exit it sees
    was asked for, so it can record the run as cancelled rather than failed.

    Safe for any number of tasks on one event loop: concurrent stops of one run share a single
    tree stop. ``async with ProcessManager() as pm:`` (or ``await pm.aclose()``) stops whatever
    is still registered. The manager holds nothing of its own, so it has no closed state: it
    stays usable after :meth:`aclose`.

    Args:
        grace_period: default seconds between the polite stop request and the kill.

    Raises:
        InvalidTimeoutError: ``grace_period`` is negative.
    """

    def __init__(self, *, grace_period: float = DEFAULT_GRACE_PERIOD) -> None:
        self.grace_period = check_timeout(grace_period, "grace_period", finite=True) or 0.0
        self._processes: dict[str, ProcessLike] = {}
        # Keyed by the process, not the run id: a run id whose process exited may be given a new
        # one while the old tree's stop still runs, and a stop of the new one must not join it.
        self._stops: dict[int, asyncio.Task[int]] = {}
        self._stop_requested: set[str] = set()

    def __len__(self) -> int:
        return len(self._processes)

    def __contains__(self, run_id: object) -> bool:
        return run_id in self._processes

    def register(self, run_id: str, process: ProcessLike) -> None:
        """Record ``process`` as the child of ``run_id``.

        Re-registering the same process is a no-op; a run id whose previous process has exited
        may be given a new one.

        Raises:
            InvalidRunIdError: ``run_id`` is not a non-empty str.
            InvalidArgumentTypeError: ``process`` is not a process object (``pid``,
                ``returncode``, ``wait()``).
            DuplicateRunError: ``run_id`` already has another process that is still running.
        """
        if not isinstance(run_id, str) or not run_id:
            raise InvalidRunIdError(f"a run id must be a non-empty str, got {run_id!r}")
        check_process(process)
        current = self._processes.get(run_id)
        if current is not None and current is not process and current.returncode is None:
            raise DuplicateRunError(
                f"run {run_id!r} already has a live process (pid {current.pid})"
            )
        self._processes[run_id] = process
        if current is not process:
            self._stop_requested.discard(run_id)

    def unregister(self, run_id: str) -> ProcessLike | None:
        """Forget ``run_id``'s process and return it (``None`` if none was registered).

        A stop already under way goes on; it is not cancelled.
        """
        self._stop_requested.discard(run_id)
        return self._processes.pop(run_id, None)

    def get(self, run_id: str) -> ProcessLike | None:
        """Return ``run_id``'s registered process, running or not, or ``None``."""
        return self._processes.get(run_id)

    def live(self) -> dict[str, ProcessLike]:
        """Return ``{run_id: process}`` for registered processes that have not been seen to exit
        (a snapshot: later registrations do not change it)."""
        return {rid: p for rid, p in self._processes.items() if p.returncode is None}

    def stop_requested(self, run_id: str) -> bool:
        """``True`` if :meth:`stop` (or :meth:`stop_all`) was called for ``run_id``'s current
        process. The run's owner uses it to tell a requested stop from a crash."""
        return run_id in self._stop_requested

    async def stop(self, run_id: str, grace: float | None = None) -> bool:
        """Stop ``run_id``'s process and its whole tree; return once it has exited.

        SIGTERM (CTRL_BREAK on Windows) to the child's process group, up to ``grace`` seconds
        (default: :attr:`grace_period`), then SIGKILL to what is left. A stop already under way
        for this run's current process is joined rather than repeated (one still stopping the
        tree of a previous process of the run is not: the current one gets its own). The process
        stays registered: its owner unregisters it.

        Returns ``True`` if a running process was stopped, ``False`` if ``run_id`` is unknown
        or its process had already exited (stray members of its group are still stopped).

        Cancellation: stops waiting; the stop itself goes on (it is shared with other callers)
        and ends within ``grace`` seconds.

        Raises:
            InvalidTimeoutError: ``grace`` is negative.
        """
        limit = (
            self.grace_period
            if grace is None
            else check_timeout(grace, "grace", finite=True) or 0.0
        )
        process = self._processes.get(run_id)
        if process is None:
            return False
        was_running = process.returncode is None
        if was_running:
            self._stop_requested.add(run_id)
        task = self._stops.get(id(process))
        if task is None or task.get_loop().is_closed():
            # (A stop begun on a loop that was closed under it never ends there: begun again.)
            task = asyncio.ensure_future(self._stop_tree(run_id, process, limit))
            self._stops[id(process)] = task
        await asyncio.shield(task)
        return was_running

    async def _stop_tree(self, run_id: str, process: ProcessLike, grace: float) -> int:
        try:
            returncode = await terminate_gracefully(process, grace)
            logger.debug("run %s (pid %d) stopped with status %s", run_id, process.pid, returncode)
            return returncode
        finally:
            # The task holds the process, so its id cannot be reused while the entry exists.
            # (Only this stop's own entry: one begun again on a new loop, after this one's loop
            # was closed under it, is not this one's to remove.)
            if self._stops.get(id(process)) is asyncio.current_task():
                del self._stops[id(process)]

    async def stop_all(self, grace: float | None = None) -> int:
        """Stop every registered live process (in parallel, each as :meth:`stop`); return how many
        were running. :meth:`aclose` is this with the default ``grace``.

        Cancellation: stops waiting; the stops go on.
        """
        run_ids = list(self.live())
        if not run_ids:
            return 0
        results = await asyncio.gather(
            *(self.stop(run_id, grace) for run_id in run_ids), return_exceptions=True
        )
        stopped = 0
        for run_id, result in zip(run_ids, results, strict=True):
            if isinstance(result, BaseException):
                logger.error("stopping run %s failed", run_id, exc_info=result)
            elif result:
                stopped += 1
        return stopped

    async def aclose(self) -> None:
        """:meth:`stop_all` with the default grace period; what leaving ``async with`` does.
        Idempotent.

        Cancellation: stops waiting; the stops go on. Called inside an anyio scope that is
        already cancelled (a ``finally`` block after ``move_on_after``), it runs in full,
        shielded from that scope, as after asyncio's one-shot cancellation.
        """
        with shielded_if_cancelled():
            await self.stop_all()
