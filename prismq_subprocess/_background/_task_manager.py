"""Fire-and-forget background work with tracking: :class:`BackgroundTaskManager`.

Every coroutine started through the manager is tied to a :class:`Run` in a run registry: the run
is stored PENDING, becomes RUNNING when the coroutine starts (after a concurrency slot and, with a
resource manager, admission) and gets its final status when it ends, however it ends. The
manager keeps strong references to its tasks (asyncio only keeps weak ones) and consumes every
exception itself, so there is never a "Task exception was never retrieved" message and never a
silently vanished task.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Coroutine
from datetime import timedelta
from typing import Any

from .._core._closing import AsyncResource
from .._core._durations import timeout_seconds
from .._core._exceptions import (
    DuplicateRunError,
    InvalidLimitError,
    InvalidTimeoutError,
    ResourceLimitException,
    RunStateError,
    TaskManagerClosedError,
)
from .._resources._resource_manager import ResourceManager
from ._cancel_result import CancelResult, not_active_result
from ._memory_registry import BaseRunRegistry
from ._output_capture import OutputCapture
from ._run_record import Run, RunStatus

__all__ = ["BackgroundTaskManager"]

logger = logging.getLogger(__name__)

# Entry phases. Only QUEUED and RUNNING entries can be cancelled; once RECORDING, the outcome
# is decided and the manager never interrupts the registry write.
_ADDING = "adding"
_QUEUED = "queued"
_RUNNING = "running"
_RECORDING = "recording"


class _Entry:
    __slots__ = (
        "abandoned",
        "cancel_reason",
        "coro",
        "marks_running",
        "phase",
        "run",
        "started",
        "task",
    )

    def __init__(
        self, run: Run, coro: Coroutine[Any, Any, object], marks_running: bool = False
    ) -> None:
        self.run = run
        self.coro = coro
        self.marks_running = marks_running
        self.phase = _ADDING
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason: str | None = None
        self.abandoned = False
        # False until _drive's first step: cancelling a task before then would skip its body
        # (and so its bookkeeping), so such runs are cancelled through cancel_reason instead.
        self.started = False


class BackgroundTaskManager(AsyncResource):
    """Runs coroutines in the background, each tracked as a :class:`Run` in ``registry``.

    What a coroutine's outcome means for its run:

    - returns an ``int`` (not ``bool``): it is the exit code; ``0`` -> COMPLETED, anything else ->
      FAILED with that ``exit_code``;
    - returns anything else (``None`` included) -> COMPLETED with ``exit_code`` ``None``;
    - raises an exception -> FAILED, ``error_message`` ``"<Type>: <message>"``, logged with its
      traceback on this module's logger;
    - is cancelled (``cancel_task``, ``shutdown``) -> CANCELLED with the reason;
    - already put the run in a final state itself (it may hold the same :class:`Run` object and
      call e.g. ``mark_failed("timed out", exit_code=-9)``) -> that status is kept.

    The coroutine may also fill fields such as ``pid``, ``output_tail`` or ``peak_rss_bytes`` on
    the same ``Run`` object; they are saved with the final status.

    Admission: with a ``resource_manager``, each run, once it has a concurrency slot, asks
    ``resource_manager.admit(wait=admission_wait, timeout=admission_timeout)`` before its
    coroutine starts; it stays PENDING (and holds its slot) meanwhile. When resources are short,
    ``admission_wait=True`` waits, re-checking, up to ``admission_timeout`` seconds (``None``: as
    long as it takes) and ``admission_wait=False`` refuses at once. A refused run (the
    :class:`ResourceLimitException` or :class:`ResourceWaitTimeoutError` from ``admit``) is
    recorded FAILED with the exception's message (which names the failed limit) as its
    ``error_message``, its coroutine is closed without running, and the refusal is logged as a
    warning; ``start_task`` has already returned, so nothing is raised to the caller. Cancelling
    (``cancel_task``, ``shutdown``) a run waiting for admission records it CANCELLED, never
    started, like a queued run. Without a resource manager every run is admitted.

    Args:
        registry: where runs are recorded (in memory or SQLite).
        max_concurrent: at most this many coroutines run at once; later ones wait, PENDING, in
            a FIFO queue and their coroutine is not started until a slot frees. ``None``: no limit.
        output: an :class:`OutputCapture`; when given, a run's output is closed when its
            coroutine ends (so subscribers finish) and, if the run has no ``output_tail`` yet,
            the last ``output_tail_lines`` buffered lines are stored as its tail.
        output_tail_lines: see ``output``.
        resource_manager: admission control; ``None``: none.
        admission_wait, admission_timeout: see "Admission" above.

    Raises:
        InvalidLimitError: ``max_concurrent`` or ``output_tail_lines`` is not an int >= 1
            (``output_tail_lines`` may be 0).
        InvalidTimeoutError: ``admission_timeout`` is negative or not a number.
    """

    def __init__(
        self,
        registry: BaseRunRegistry,
        *,
        max_concurrent: int | None = None,
        output: OutputCapture | None = None,
        output_tail_lines: int = 50,
        resource_manager: ResourceManager | None = None,
        admission_wait: bool = True,
        admission_timeout: float | timedelta | None = None,
    ) -> None:
        if max_concurrent is not None and (
            isinstance(max_concurrent, bool)
            or not isinstance(max_concurrent, int)
            or max_concurrent < 1
        ):
            raise InvalidLimitError(
                f"max_concurrent must be an int >= 1 or None, got {max_concurrent!r}"
            )
        if (
            isinstance(output_tail_lines, bool)
            or not isinstance(output_tail_lines, int)
            or output_tail_lines < 0
        ):
            raise InvalidLimitError(
                f"output_tail_lines must be an int >= 0, got {output_tail_lines!r}"
            )
        self.registry = registry
        self.max_concurrent = max_concurrent
        self.output = output
        self.output_tail_lines = output_tail_lines
        self.resource_manager = resource_manager
        self.admission_wait = admission_wait
        # Checked now so a bad value fails here, not later inside every background run.
        self.admission_timeout = timeout_seconds(admission_timeout, what="admission_timeout")
        self._entries: dict[str, _Entry] = {}
        self._queue: deque[_Entry] = deque()
        self._running = 0
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        # Tasks given up on by shutdown() still need a strong reference until they end.
        self._abandoned: set[asyncio.Task[None]] = set()

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`aclose` / :meth:`shutdown` has begun."""
        return self._closing

    def _check_open(self) -> None:
        if self._closing:
            raise TaskManagerClosedError("the task manager is shut down; it starts no new runs")

    @property
    def running_count(self) -> int:
        """How many coroutines are running now."""
        return self._running

    @property
    def queued_count(self) -> int:
        """How many runs wait for a free slot."""
        return len(self._queue)

    def active_runs(self) -> list[Run]:
        """Return copies of this manager's unfinished runs (queued and running), oldest first."""
        return [entry.run.copy() for entry in self._entries.values()]

    async def start_task(
        self, run: Run, coro: Coroutine[Any, Any, object], *, marks_running: bool = False
    ) -> str:
        """Record ``run`` (PENDING) in the registry and run ``coro`` in the background for it.

        The manager marks the run RUNNING when ``coro`` starts, unless ``marks_running``: then
        the coroutine does it itself when the work really begins (e.g. when a cluster worker
        picks the run up), and the run stays PENDING until then.

        Returns ``run.run_id`` once the run is stored; the coroutine starts at once, or later if
        ``max_concurrent`` is reached. The manager owns ``run`` from now on and updates that
        object as the run progresses (the registry holds copies).

        On any error ``coro`` is closed, so it never triggers "coroutine was never awaited".

        Cancellation: if cancelled while the run is being stored, the coroutine is closed and,
        if the run made it into the registry, it is recorded CANCELLED.

        Raises:
            TaskManagerClosedError: :meth:`aclose` / :meth:`shutdown` has begun.
            RunStateError: ``run`` is not PENDING.
            DuplicateRunError: a run with this ``run_id`` is already active here or stored.
        """
        if self._closing:
            coro.close()
            raise TaskManagerClosedError("the task manager is shut down; it starts no new runs")
        if run.status is not RunStatus.PENDING:
            coro.close()
            raise RunStateError(
                f"run {run.run_id} is {run.status.value}; only a pending run can be started"
            )
        if run.run_id in self._entries:
            coro.close()
            raise DuplicateRunError(f"run {run.run_id!r} is already active in this manager")
        entry = _Entry(run, coro, marks_running)
        self._entries[run.run_id] = entry
        self._idle.clear()
        opened = False
        try:
            # Subscribers may follow the run as soon as start_task returns.
            opened = self.output is not None and self.output.open_run(run.run_id)
            await self.registry.add_run(run)
        except BaseException:
            self._entries.pop(run.run_id, None)
            coro.close()
            self._check_idle()
            if opened and self.output is not None:
                self.output.forget(run.run_id)
            raise
        if self._closing or entry.cancel_reason is not None:
            # shutdown() or cancel_task() came while the run was being stored.
            reason = entry.cancel_reason or "task manager shut down before the run started"
            await self._finish_unstarted(entry, reason)
            if self._closing:
                raise TaskManagerClosedError("the task manager shut down while the run was added")
            return run.run_id
        if self.max_concurrent is None or self._running < self.max_concurrent:
            self._launch(entry)
        else:
            entry.phase = _QUEUED
            self._queue.append(entry)
        return run.run_id

    def _launch(self, entry: _Entry) -> None:
        entry.phase = _RUNNING
        self._running += 1
        task = asyncio.create_task(self._drive(entry), name=f"prismq-run-{entry.run.run_id}")
        entry.task = task
        task.add_done_callback(functools.partial(self._task_done, entry))

    def _interrupt(self, entry: _Entry, reason: str) -> None:
        if entry.cancel_reason is None:
            entry.cancel_reason = reason
        if entry.started and entry.task is not None:
            entry.task.cancel()

    def _task_done(self, entry: _Entry, task: asyncio.Task[None]) -> None:
        self._abandoned.discard(task)
        if task.cancelled():
            if entry.phase == _RUNNING and not entry.started:
                # Cancelled from outside (e.g. loop teardown) before its first step: _drive's
                # bookkeeping never ran, so record the run here.
                self._release(entry)
                recorder = asyncio.ensure_future(
                    self._record_unstarted(entry, entry.cancel_reason or "cancelled")
                )
                self._abandoned.add(recorder)
                recorder.add_done_callback(self._abandoned.discard)
            return
        # _drive records every Exception itself; this only consumes what escaped it (a
        # BaseException such as KeyboardInterrupt, which asyncio re-raises anyway).
        task.exception()

    async def _record_unstarted(self, entry: _Entry, reason: str) -> None:
        entry.coro.close()
        if not entry.run.is_finished:
            entry.run.mark_cancelled(reason)
        await self._collect_output(entry.run)
        await self._save(entry.run)

    async def _drive(self, entry: _Entry) -> None:
        run = entry.run
        outcome: tuple[RunStatus, str | None, int | None]
        reraise: BaseException | None = None
        refusal: str | None = None
        result: object = None
        entry.started = True
        try:
            if entry.cancel_reason is not None:
                raise asyncio.CancelledError  # cancel_task() came before this first step
            refusal = await self._admit(run)
            if refusal is None:
                if not entry.marks_running:
                    run.mark_running(pid=None)
                    await self._save(run)
                result = await entry.coro
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            outcome = (RunStatus.CANCELLED, entry.cancel_reason or "cancelled", None)
        except Exception as exc:
            logger.error(
                "background run %s (%s) failed", run.run_id, run.module_name or "?", exc_info=exc
            )
            outcome = (RunStatus.FAILED, f"{type(exc).__name__}: {exc}", None)
        except BaseException as exc:
            outcome = (RunStatus.FAILED, f"{type(exc).__name__}: {exc}", None)
            reraise = exc
        else:
            if refusal is not None:
                outcome = (RunStatus.FAILED, refusal, None)
            elif isinstance(result, int) and not isinstance(result, bool):
                if result == 0:
                    outcome = (RunStatus.COMPLETED, None, 0)
                else:
                    outcome = (RunStatus.FAILED, f"exited with status {result}", result)
            else:
                outcome = (RunStatus.COMPLETED, None, None)
        # No-op once the coroutine has run; otherwise (cancelled or refused before it started,
        # or admit() itself failed) it never started and must not warn "never awaited".
        entry.coro.close()
        entry.phase = _RECORDING
        try:
            if not entry.abandoned:
                self._apply(run, outcome)
                await self._collect_output(run)
                await self._save(run)
        finally:
            self._release(entry)
        if reraise is not None:
            raise reraise

    async def _admit(self, run: Run) -> str | None:
        """Ask the resource manager to admit ``run``; return ``None`` or the refusal reason."""
        if self.resource_manager is None:
            return None
        try:
            await self.resource_manager.admit(
                wait=self.admission_wait, timeout=self.admission_timeout
            )
        except ResourceLimitException as exc:
            logger.warning(
                "background run %s (%s) refused admission: %s",
                run.run_id,
                run.module_name or "?",
                exc,
            )
            return str(exc)
        return None

    @staticmethod
    def _apply(run: Run, outcome: tuple[RunStatus, str | None, int | None]) -> None:
        if run.is_finished:
            return  # the coroutine decided its run's outcome itself
        status, message, exit_code = outcome
        if status is RunStatus.COMPLETED:
            if run.status is RunStatus.PENDING:
                run.mark_running(pid=None)  # a coroutine that was to mark it running did not
            run.mark_completed(exit_code)
        elif status is RunStatus.FAILED:
            run.mark_failed(message or "failed", exit_code=exit_code)
        else:
            run.mark_cancelled(message or "cancelled")

    async def _collect_output(self, run: Run) -> None:
        if self.output is None:
            return
        try:
            await self.output.close_run(run.run_id, status=run.status, exit_code=run.exit_code)
        except Exception:
            logger.exception("closing the output of run %s failed", run.run_id)
        if not run.output_tail and self.output_tail_lines:
            run.output_tail = self.output.tail(run.run_id, self.output_tail_lines)

    async def _save(self, run: Run) -> None:
        try:
            await self.registry.update_run(run)
        except Exception:
            # The run itself must go on; a registry failure is reported, not propagated.
            logger.exception("recording run %s (%s) failed", run.run_id, run.status.value)

    def _release(self, entry: _Entry) -> None:
        self._running -= 1
        if self._entries.get(entry.run.run_id) is entry:
            del self._entries[entry.run.run_id]
        while self._queue and not self._closing and (
            self.max_concurrent is None or self._running < self.max_concurrent
        ):
            self._launch(self._queue.popleft())
        self._check_idle()

    def _check_idle(self) -> None:
        if not self._entries:
            self._idle.set()

    async def _finish_unstarted(self, entry: _Entry, reason: str) -> None:
        entry.phase = _RECORDING
        entry.coro.close()
        entry.run.mark_cancelled(reason)
        try:
            await self._collect_output(entry.run)
            await self._save(entry.run)
        finally:
            if self._entries.get(entry.run.run_id) is entry:
                del self._entries[entry.run.run_id]
            self._check_idle()

    async def cancel_task(
        self, run_id: str, reason: str = "cancelled by request"
    ) -> CancelResult:
        """Cancel a queued or running run and wait until its CANCELLED status is recorded.

        A run that is queued or waiting for admission is recorded CANCELLED and its coroutine
        closed without ever starting. A running one is cancelled and may clean up (e.g. stop
        its child process); its final status is whatever it ends with (CANCELLED unless it
        swallows the cancellation and returns).

        Returns :class:`CancelResult` ``CANCELLED`` (true), or, when the run is not active in
        this manager, ``ALREADY_FINISHED`` (ending, being cancelled already, or finished in the
        registry) or ``NOT_FOUND`` (both false).

        Cancellation: stops waiting; the run's cancellation still goes ahead.

        Raises:
            RegistryClosedError: the run is not active here and the registry is closed.
        """
        entry = self._entries.get(run_id)
        if entry is None:
            return await not_active_result(self.registry, run_id)
        if entry.phase == _RECORDING or entry.cancel_reason is not None:
            return CancelResult.ALREADY_FINISHED
        entry.cancel_reason = reason
        if entry.phase == _ADDING:
            return CancelResult.CANCELLED  # start_task records it CANCELLED once stored
        if entry.phase == _QUEUED:
            self._queue.remove(entry)
            await self._finish_unstarted(entry, reason)
            return CancelResult.CANCELLED
        assert entry.task is not None
        self._interrupt(entry, reason)
        await asyncio.wait({entry.task})
        return CancelResult.CANCELLED

    async def wait_all(self, timeout: float | None = None) -> None:
        """Wait until no run is queued or running (including runs started meanwhile).

        Cancellation and timeout leave the runs alone.

        Raises:
            TimeoutError: they were not all done within ``timeout`` seconds.
            InvalidTimeoutError: ``timeout`` is negative.
        """
        if timeout is not None and timeout < 0:
            raise InvalidTimeoutError(f"timeout must be >= 0 or None, got {timeout!r}")
        async with asyncio.timeout(timeout):
            while self._entries:
                await self._idle.wait()

    async def shutdown(self, grace: float = 5.0, reason: str = "task manager shut down") -> None:
        """Stop: refuse new runs, cancel queued and running ones, and return once every run is
        recorded in the registry. This is :meth:`aclose` with a chosen ``grace`` and ``reason``.

        Queued runs are recorded CANCELLED without starting. Running coroutines are cancelled
        and get ``grace`` seconds to finish their cleanup; one still going after that is left
        to itself (its task keeps a reference until it ends, but its outcome is no longer
        recorded) and its run is recorded CANCELLED now. Idempotent.

        Cancellation: stops waiting; the cancellations already sent stay in effect.

        Raises:
            InvalidTimeoutError: ``grace`` is negative.
        """
        if grace < 0:
            raise InvalidTimeoutError(f"grace must be >= 0, got {grace!r}")
        self._closing = True
        queued = list(self._queue)
        self._queue.clear()
        for entry in queued:
            entry.cancel_reason = reason
            await self._finish_unstarted(entry, reason)
        tasks: set[asyncio.Task[None]] = set()
        for entry in list(self._entries.values()):
            if entry.phase == _RUNNING:
                self._interrupt(entry, reason)
            if entry.task is not None:
                tasks.add(entry.task)
        if tasks:
            _, stubborn = await asyncio.wait(tasks, timeout=grace)
            for entry in list(self._entries.values()):
                if entry.task in stubborn and entry.phase == _RUNNING:
                    await self._abandon(entry, reason)
        while self._entries:
            await self._idle.wait()

    async def _abandon(self, entry: _Entry, reason: str) -> None:
        assert entry.task is not None
        logger.warning(
            "run %s did not stop within the shutdown grace period; recording it cancelled",
            entry.run.run_id,
        )
        entry.abandoned = True
        self._abandoned.add(entry.task)
        del self._entries[entry.run.run_id]
        if not entry.run.is_finished:
            entry.run.mark_cancelled(f"{reason} (did not stop within the grace period)")
        await self._collect_output(entry.run)
        await self._save(entry.run)
        self._check_idle()

    async def aclose(self) -> None:
        """:meth:`shutdown` with its defaults (5 s grace); what leaving ``async with`` does.
        Idempotent; :meth:`start_task` then raises :class:`TaskManagerClosedError`.

        Cancellation: stops waiting; the cancellations already sent stay in effect.
        """
        await self.shutdown()
