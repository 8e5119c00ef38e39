"""Fire-and-forget background work with tracking: :class:`BackgroundTaskManager`.

Every coroutine started through the manager is tied to a :class:`Run` in a run registry: the run
is stored PENDING, becomes RUNNING when the coroutine starts (after a concurrency slot and, with a
resource manager, admission) and gets its final status when it ends, however it ends. Each run is
driven by one asyncio task from ``start_task`` to its last registry write; the manager keeps
strong references to those tasks (asyncio only keeps weak ones) and consumes every exception
itself, so there is never a "Task exception was never retrieved" message and never a silently
vanished task.

``start_task`` is a plain function, as in the PrismQ guide: it checks its arguments, schedules
the work and returns the run id at once. The id it returns is a :class:`TaskHandle`, a ``str``
that can also be awaited to wait until the run is stored, so ``await manager.start_task(...)``
(which confirms the registry write and raises its errors) works as well.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import math
import os
import types
import weakref
from collections import deque
from collections.abc import Callable, Coroutine, Generator, Mapping
from datetime import timedelta
from typing import Any

from .._core._cancel_shield import shielded_if_cancelled
from .._core._closing import AsyncResource
from .._core._durations import timeout_seconds
from .._core._exceptions import (
    DuplicateRunError,
    InvalidLimitError,
    InvalidTaskError,
    InvalidTimeoutError,
    NoRunningLoopError,
    OutputClosedError,
    ResourceLimitException,
    RunClaimedError,
    RunNotFoundError,
    RunStateError,
    TaskManagerClosedError,
)
from .._core._result import ProcessResult
from .._core._task_start import create_task_takes_context, loop_makes_plain_tasks
from .._core._validation import check_flag, check_timeout
from .._resources._resource_manager import (
    ResourceManager,
    admission,
    check_resource_manager,
)
from ._cancel_result import CancelResult, cancel_elsewhere
from ._cancel_watch import CancelRequestWatcher
from ._memory_registry import (
    BaseRunRegistry,
    check_registry,
    direct_writes,
    file_of,
    owner_lives,
    reason_text,
    run_id_of,
    updates_directly,
)
from ._output_capture import OutputCapture, check_output, end_code
from ._record_retry import RecordRetry, retry_start, worth_retrying
from ._run_record import Run, RunOwner, RunStatus

__all__ = ["BackgroundTaskManager", "ExitCode", "TaskHandle"]

logger = logging.getLogger(__name__)

# Entry phases. Only QUEUED and RUNNING entries are cancelled through their task; an ADDING one
# is cancelled once its run is stored (so the registry write is never cut in half), and once
# RECORDING the outcome is decided and the manager never interrupts the registry write.
_ADDING = "adding"
_QUEUED = "queued"
_RUNNING = "running"
_RECORDING = "recording"

# However short the shutdown grace, abandoned runs get this long to be recorded CANCELLED.
_MIN_RECORD_WAIT = 1.0

_Outcome = tuple[RunStatus, str | None, int | None]
_new_str = str.__new__
_COMPLETED: _Outcome = (RunStatus.COMPLETED, None, 0)
_PENDING_STATUS = RunStatus.PENDING
_RUNNING_STATUS = RunStatus.RUNNING


class ExitCode(int):
    """An exit status returned by a coroutine run through :class:`BackgroundTaskManager`.

    Any plain return value means success (COMPLETED, ``exit_code`` 0), as in the PrismQ guide,
    even an ``int``: ``return 1`` from a helper that counts things is not a failure. To record a
    real exit status, return ``ExitCode(n)``: ``ExitCode(0)`` is COMPLETED, any other value is
    FAILED with that ``exit_code`` and ``error_message`` ``"exited with status n"``. Returning a
    :class:`ProcessResult` (from ``SubprocessWrapper.run``) does the same with its
    ``returncode``.
    """

    __slots__ = ()


class TaskHandle(str):
    """The run id returned by :meth:`BackgroundTaskManager.start_task`: a ``str`` equal to
    ``run.run_id`` that can also be awaited.

    Use it as the plain id the guide returns (a dict key, JSON, a URL part). ``await handle``
    waits until the run is stored in the registry and returns the id as a plain ``str``; it
    raises what storing raised (:class:`DuplicateRunError` for a run already stored and no
    longer pending, a registry error, :class:`TaskManagerClosedError` when the manager shut down
    meanwhile). Without an ``await`` such errors are logged by the manager and the work never
    starts. It may be awaited any number of times. It pickles as a plain ``str``.

    Cancellation: cancelling an ``await handle`` that is still waiting for the registry write
    cancels the run: it is recorded CANCELLED once stored and its coroutine never starts. Once
    the run is stored, cancelling the wait changes nothing.
    """

    __slots__ = ("_entry",)

    _entry: _Entry

    def __new__(cls, run_id: str, entry: _Entry) -> TaskHandle:
        handle = super().__new__(cls, run_id)
        handle._entry = entry
        return handle

    @property
    def stored(self) -> bool:
        """``True`` once the run is in the registry (and stays so whatever happens next)."""
        entry = self._entry
        return entry.store_done and entry.store_error is None

    def __await__(self) -> Generator[Any, None, str]:
        return self._wait().__await__()

    async def _wait(self) -> str:
        entry = self._entry
        if not entry.store_done:
            # Each await waits on a future of its own, so cancelling one waiter never touches
            # another or the outcome, and no stored exception can go "never retrieved".
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            if entry.store_waiters is None:
                entry.store_waiters = []
            entry.store_waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if not entry.store_done:
                    entry.store_waiters.remove(waiter)
                    if entry.phase == _ADDING and entry.cancel_reason is None:
                        entry.cancel_reason = "start_task was cancelled before the run was stored"
                raise
        if entry.store_error is not None:
            raise entry.store_error
        return str(self)

    def __reduce__(self) -> tuple[type[str], tuple[str]]:
        return (str, (str(self),))


def _picked_up(run: Run) -> bool:
    """Whether ``run`` is a copy of another process's run, as read from a registry: its start
    is a pick-up of the stored run (claimed, never added again: retention may have removed it
    since it was read, and the job would run a second time)."""
    return run.owner is not None and run.owner != RunOwner.current()


def _as_pending(run: Run) -> Run:
    """A copy of ``run`` as it was stored before it was marked (PENDING, nothing recorded)."""
    pending = run.copy()
    pending._status = RunStatus.PENDING
    pending.started_at = pending.finished_at = None
    pending.exit_code = pending.error_message = None
    return pending


class _Entry:
    """One run's state in the manager, from ``start_task`` to its last registry write.

    It also holds whether the run made it into the registry (``store_*``: settled once by the
    manager, read by the run's :class:`TaskHandle`), so a run costs one such object; and it is
    its task's done callback itself (no bound method or partial per run).
    """

    __slots__ = (
        "abandoned",
        "cancel_reason",
        "claimed",
        "coro",
        "has_slot",
        "manager",
        "marks_running",
        "opened_output",
        "phase",
        "released",
        "released_waiter",
        "run",
        "slot",
        "started",
        "store_done",
        "store_error",
        "store_waiters",
        "task",
    )

    def __init__(
        self,
        manager: BackgroundTaskManager,
        run: Run,
        coro: Coroutine[Any, Any, object],
        marks_running: bool,
        opened_output: bool,
    ) -> None:
        # None once the run's last callback is done: a TaskHandle kept by the application
        # (it is the run id, a str) must not keep the manager and its registry alive.
        self.manager: BackgroundTaskManager | None = manager
        self.run = run
        self.coro = coro
        self.marks_running = marks_running
        self.store_done = False
        self.store_error: BaseException | None = None
        # Futures of ``await handle`` calls waiting for the store; made by the first one.
        self.store_waiters: list[asyncio.Future[None]] | None = None
        self.phase = _ADDING
        self.task: asyncio.Task[None] | None = None
        self.cancel_reason: str | None = None
        # The manager declared the run in its OutputCapture (forgotten again if never stored).
        self.opened_output = opened_output
        self.abandoned = False
        # False until _drive's first step: a task cancelled before then never runs its body
        # (and so its bookkeeping); _task_done does that bookkeeping instead.
        self.started = False
        self.has_slot = False
        self.slot: asyncio.Future[None] | None = None
        # Set by _release, when the run's last registry write is done here; the future is made
        # only for those who wait (cancel_task, shutdown).
        self.released = False
        self.released_waiter: asyncio.Future[None] | None = None
        # Another process claimed the run (a pick-up) before this one ran it: not recorded
        # here, and a cancel of it goes to that process.
        self.claimed = False

    def wait_released(self) -> asyncio.Future[None]:
        """A future done once the run is released (its record final here): whichever task
        writes it, _drive or the recorder of a run cancelled before its first step."""
        waiter = self.released_waiter
        if waiter is None:
            waiter = self.released_waiter = asyncio.get_running_loop().create_future()
            if self.released:
                waiter.set_result(None)
        return waiter

    def recorded_elsewhere(self, save: asyncio.Future[Any]) -> None:
        """Done callback of the write of an abandoned run (see ``_abandon``): its record is
        final, so whoever waits for it (``cancel_task``) need not wait for its task."""
        waiter = self.released_waiter
        if waiter is not None and not waiter.done() and not waiter.get_loop().is_closed():
            waiter.set_result(None)

    def __call__(self, task: asyncio.Task[None]) -> None:
        """The done callback of the run's task (see ``BackgroundTaskManager._task_done``)."""
        manager = self.manager
        if manager is not None:
            manager._task_done(self, task)

    def settle(self, error: BaseException | None) -> None:
        """Record whether storing the run worked (the first call counts); wake the waiters."""
        if self.store_done:
            return
        self.store_done = True
        self.store_error = error
        waiters = self.store_waiters
        if waiters:
            for waiter in waiters:
                # (One of a loop that was closed while it waited has nobody left to wake.)
                if not waiter.done() and not waiter.get_loop().is_closed():
                    waiter.set_result(None)
            waiters.clear()


def _close(coro: Coroutine[Any, Any, object]) -> None:
    """Close a coroutine that has ended or never started, never letting close() escape."""
    try:
        coro.close()
    except Exception:
        # Only a coroutine that was started and then suspended can fail here (it awaits in a
        # finally on GeneratorExit); it must not cost the run its final record.
        logger.exception("closing coroutine %r failed", coro)


def _left_behind(entry: _Entry) -> bool:
    """Whether ``entry``'s task belongs to an event loop that was closed while the run was
    active (a host's ``run_until_complete()`` then ``close()``, its tasks never cancelled): that
    task never runs again, so nothing but the manager's cancel, wait and close paths can record
    and release the run."""
    task = entry.task
    return task is not None and task.get_loop().is_closed()


def _cancelled_before_stored(run: Run) -> RunStateError:
    return RunStateError(f"run {run.run_id} was cancelled before it was known to be stored")


# Results that carry an exit status (see _outcome_of).
_STATUS_RESULTS = (ExitCode, ProcessResult)

#: Every manager of this process, for a takeover's look at the runs the others hold.
_MANAGERS: weakref.WeakSet[BackgroundTaskManager] = weakref.WeakSet()


def _same_store(one: BaseRunRegistry, other: BaseRunRegistry) -> bool:
    """Whether two registries keep their runs in the same place: one object, or one file."""
    if one is other:
        return True
    path, other_path = file_of(one), file_of(other)
    if path is None or other_path is None:
        return False
    try:
        return os.path.samefile(path, other_path)  # (hard links too)
    except OSError:
        return os.path.realpath(path) == os.path.realpath(other_path)


def _interrupted(run: Run) -> None:
    run.mark_interrupted("its event loop was closed before the run ended")


def _outcome_of(result: object) -> _Outcome:
    if isinstance(result, ExitCode):
        code = int(result)
    elif isinstance(result, ProcessResult):
        code = result.returncode
    else:
        return _COMPLETED
    if code == 0:
        return _COMPLETED
    return (RunStatus.FAILED, f"exited with status {code}", code)


class BackgroundTaskManager(AsyncResource):
    """Runs coroutines in the background, each tracked as a :class:`Run` in ``registry``.

    What a coroutine's outcome means for its run:

    - returns normally -> COMPLETED with ``exit_code`` 0, whatever it returns (as in the PrismQ
      guide); to record an exit status, return :class:`ExitCode` ``(n)`` or a
      :class:`ProcessResult`: 0 -> COMPLETED, anything else -> FAILED with that ``exit_code``
      and ``"exited with status n"``;
    - raises an exception -> FAILED, ``error_message`` ``"<Type>: <message>"``, logged with its
      traceback on this module's logger;
    - is cancelled (``cancel_task``, ``shutdown``, or cancelling its task in :attr:`tasks`) ->
      CANCELLED with the reason;
    - already put the run in a final state itself (it may hold the same :class:`Run` object and
      call e.g. ``mark_failed("timed out", exit_code=-9)`` or assign ``run.status``) -> that
      status is kept.

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
        self.registry = check_registry(registry, "BackgroundTaskManager")
        self.max_concurrent = max_concurrent
        self.output = check_output(output, "BackgroundTaskManager")
        self.output_tail_lines = output_tail_lines
        self.resource_manager = check_resource_manager(resource_manager, "BackgroundTaskManager")
        self.admission_wait = check_flag(admission_wait, "admission_wait")
        # Checked now so a bad value fails here, not later inside every background run.
        self.admission_timeout = timeout_seconds(admission_timeout, what="admission_timeout")
        self._entries: dict[str, _Entry] = {}
        self._queue: deque[_Entry] = deque()
        self._running = 0
        self._closing = False
        self._idle = asyncio.Event()
        self._idle.set()
        # Tasks given up on by shutdown() still need a strong reference until they end.
        self._abandoned: set[asyncio.Future[Any]] = set()
        # Cancel requests recorded in the registry by other processes (request_cancel).
        # Its watched runs are the active ones (no call per run).
        self._watch_loop: asyncio.AbstractEventLoop | None = None  # where it was last woken
        self._watcher = CancelRequestWatcher(registry, self.cancel_task, source=self._entries.keys)
        # Final records the registry failed to store (a full disk): written again until stored.
        self._unsaved = RecordRetry(registry)
        _MANAGERS.add(self)

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`aclose` / :meth:`shutdown` has begun."""
        return self._closing

    def _check_open(self) -> None:
        if self._closing:
            raise TaskManagerClosedError("the task manager is shut down; it starts no new runs")

    @property
    def running_count(self) -> int:
        """How many runs hold a concurrency slot (running, or waiting for admission)."""
        return self._running

    @property
    def queued_count(self) -> int:
        """How many runs wait for a free slot."""
        return len(self._queue)

    @property
    def tasks(self) -> Mapping[str, asyncio.Task[None]]:
        """The unfinished runs' tasks by run id, as in the PrismQ guide (a snapshot: changing it
        changes nothing).

        Each task drives its run from storing it to recording its outcome, so ``task.done()``
        means the outcome is in the registry, ``await task`` waits for that, and
        ``task.cancel()`` cancels the run like :meth:`cancel_task` (recorded CANCELLED).
        """
        return {run_id: entry.task for run_id, entry in self._entries.items() if entry.task}

    def active_runs(self) -> list[Run]:
        """Return copies of this manager's unfinished runs (queued and running), oldest first."""
        return [entry.run.copy() for entry in self._entries.values()]

    def start_task(
        self, run: Run, coro: Coroutine[Any, Any, object], *, marks_running: bool = False
    ) -> TaskHandle:
        """Run ``coro`` in the background for ``run``; return ``run.run_id`` at once.

        A plain function, as in the PrismQ guide: it checks its arguments, schedules the work on
        the running event loop and returns. The work then stores ``run`` in the registry as
        PENDING (a run the caller already added and that is still PENDING there is taken over,
        not refused, unless another manager has it queued), waits for a slot and admission, and
        runs ``coro``. The manager owns ``run`` from now on and updates that object as the run
        progresses (the registry holds copies). The manager marks the run RUNNING when ``coro``
        starts, unless ``marks_running``: then the coroutine does it itself when the work
        really begins (e.g. when a cluster worker picks the run up), and the run stays PENDING
        until then.

        The returned :class:`TaskHandle` is the run id (a ``str``) and is also awaitable:
        ``await manager.start_task(run, coro)`` returns once the run is stored and raises what
        storing raised. Without the ``await``, a failure to store is logged on this module's
        logger and the coroutine is closed unstarted.

        On any error ``coro`` is closed, so it never triggers "coroutine was never awaited".

        Raises (at once, before anything is scheduled):
            InvalidTaskError: ``coro`` is not a coroutine object (a Task, a Future, a coroutine
                function that was not called...), or ``run`` is not a :class:`Run`.
            TaskManagerClosedError: :meth:`aclose` / :meth:`shutdown` has begun.
            RunStateError: ``run`` is not PENDING.
            DuplicateRunError: a run with this ``run_id`` is already active in this manager.
            NoRunningLoopError: no event loop is running in this thread (a RuntimeError).
            OutputClosedError: the manager's ``output`` is closed.

        Raises (from ``await handle``):
            DuplicateRunError: a run with this ``run_id`` is stored and no longer PENDING, or
                is PENDING in another manager (of this process, or of another live process on
                the same registry file) that will run it.
            TaskManagerClosedError: the manager shut down while the run was being stored (it
                is recorded CANCELLED).
            and what the registry's ``add_run`` raises.
        """
        if not isinstance(coro, types.CoroutineType):
            raise InvalidTaskError(
                f"start_task() needs a coroutine object, e.g. work() rather than work, got "
                f"{type(coro).__name__}; to track an existing task or future, pass a coroutine "
                "that awaits it"
            )
        if not isinstance(run, Run):
            coro.close()
            raise InvalidTaskError(f"start_task() needs a Run, got {type(run).__name__}")
        if self._closing:
            coro.close()
            raise TaskManagerClosedError("the task manager is shut down; it starts no new runs")
        if run._status is not _PENDING_STATUS:
            coro.close()
            raise RunStateError(
                f"run {run.run_id} is {run.status.value}; only a pending run can be started"
            )
        run_id = run.run_id
        entries = self._entries
        if run_id in entries:
            coro.close()
            raise DuplicateRunError(f"run {run_id!r} is already active in this manager")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            coro.close()
            raise NoRunningLoopError(
                "start_task() needs a running event loop; call it from async code"
            ) from None
        opened = False
        output = self.output
        if output is not None:
            if output.closed:
                # Refused before anything runs: the run's output and its end would be lost
                # (the work ran and was recorded COMPLETED, with only an ERROR logged).
                coro.close()
                raise OutputClosedError(
                    f"this BackgroundTaskManager's output (an OutputCapture) is closed; run "
                    f"{run_id!r} was not started"
                )
            try:
                # Subscribers may follow the run as soon as start_task returns.
                opened = output.open_run(run_id)
            except BaseException:
                coro.close()
                raise
        entry = _Entry(self, run, coro, marks_running, opened)
        wake = not entries or loop is not self._watch_loop
        if not entries:
            # A fresh event, not clear(): an asyncio.Event binds to the loop that first waits on
            # it, and an idle manager (one built at import time, say) may next serve another
            # loop (a host's tests, a restarted server). Nobody waits on the old one: wait_all()
            # waits only while runs are active, and re-reads the attribute each time.
            self._idle = asyncio.Event()
        entries[run_id] = entry
        name = f"prismq-run-{run_id}"
        drive = self._drive(entry)
        try:
            if loop_makes_plain_tasks(loop):
                # What asyncio's own create_task would make, without its Python-level call
                # (per run). The done callback runs in the run's own context instead of a
                # second copy of the caller's: one Context fewer per live run for the cyclic GC.
                context = contextvars.copy_context()
                task = asyncio.tasks.Task(drive, loop=loop, name=name, context=context)
                task.add_done_callback(entry, context=context)
            elif create_task_takes_context(loop):
                # (The same, where create_task is sure to take ``context``: uvloop's.)
                context = contextvars.copy_context()
                task = loop.create_task(drive, name=name, context=context)
                task.add_done_callback(entry, context=context)
            else:
                task = loop.create_task(drive, name=name)
                task.add_done_callback(entry)
        except BaseException:
            # Nothing was scheduled (a loop or task factory that refused): undo start_task.
            drive.close()
            coro.close()
            if entries.get(run_id) is entry:
                del entries[run_id]
            if opened and self.output is not None:
                self.output.forget(run_id)
            entry.manager = None
            self._check_idle()
            raise
        entry.task = task
        if wake:
            # The cancel-request poll runs while runs are active, and ends only when none is;
            # on a new loop it may have died with the last one (which left a run behind).
            self._watch_loop = loop
            self._watcher.wake()
        if logger.isEnabledFor(logging.DEBUG):  # saves the debug() call per run when off
            logger.debug("started background run %s", run_id)
        # TaskHandle(run_id, entry) without the Python-level __new__ call (hot path).
        handle: TaskHandle = _new_str(TaskHandle, run_id)
        handle._entry = entry
        return handle

    # -- the life of one run --------------------------------------------------------------------
    # _drive is the per-run hot path (benchmarks/bench_background.py): the common case (no
    # concurrency limit, no resource manager, registry writes that succeed) is written inline
    # rather than through the helper coroutines, each of which would cost a coroutine object
    # per call; the helpers handle the rest.
    async def _drive(self, entry: _Entry) -> None:
        run = entry.run
        registry = self.registry
        # The in-memory registry's writes never wait: made directly, without a coroutine each.
        direct = direct_writes(registry)
        outcome: _Outcome = _COMPLETED
        reraise: BaseException | None = None
        ended = False
        claimed = False  # by another process while queued here: not run, not recorded
        entry.started = True
        if entry.task is None:
            # An eager task (3.12+ task factories) makes this first step inside create_task,
            # before start_task could note the task: the run's own cancel_task() (and tasks)
            # must find it.
            entry.task = asyncio.current_task()
        try:
            try:
                try:
                    if _picked_up(run):
                        await self._take_over(run)
                    elif direct is None:
                        await registry.add_run(run)
                    else:
                        direct._add_run_now(run)
                except DuplicateRunError:
                    await self._take_over(run)
            except Exception as exc:
                self._store_failed(entry, exc)
                return
            if self._closing:
                if entry.cancel_reason is None:
                    entry.cancel_reason = "task manager shut down before the run started"
                entry.settle(
                    TaskManagerClosedError("the task manager shut down while the run was added")
                )
            elif entry.store_waiters is None:
                entry.store_done = True  # entry.settle(None) with nobody to wake
            else:
                entry.settle(None)
            if entry.cancel_reason is not None:
                raise asyncio.CancelledError  # cancel_task() or shutdown() came while storing
            # Without a concurrency limit or a resource manager nothing from the PENDING write
            # to the RUNNING one awaits, so nobody else can have changed the run in between:
            # the memory registry then refreshes only what mark_running() changes.
            waits = False
            if self.max_concurrent is None:
                self._running += 1
                entry.has_slot = True
                entry.phase = _RUNNING
            else:
                waits = True
                await self._take_slot(entry)
            if self.resource_manager is None:
                refusal = None
            else:
                waits = True
                refusal = await self._admit(run)
            if refusal is None:
                if not entry.marks_running:
                    run.mark_running(pid=None)
                    try:
                        if direct is None:
                            await retry_start(run, functools.partial(registry.update_run, run))
                        elif not waits:
                            direct._update_started_now(run)
                        elif updates_directly(direct):
                            direct._update_run_now(run)
                        else:  # patched while the run waited for its slot or admission
                            await retry_start(run, functools.partial(registry.update_run, run))
                    except RunClaimedError:
                        claimed = True
                    except Exception as exc:
                        self._save_failed(run, exc)
                else:
                    # The runner records RUNNING itself (a cluster backend, once the job is
                    # there): whether this process still drives the run is asked first.
                    try:
                        claimed = not await retry_start(
                            run, functools.partial(registry.claim_run, run, RunOwner.current())
                        )
                    except Exception as exc:
                        self._save_failed(run, exc)
                if claimed:
                    # Another process picked the run up while it was queued here: it runs it
                    # and records it; this process neither (one run id, one job).
                    logger.warning(
                        "background run %s not started here: another process claimed it",
                        run.run_id,
                    )
                    if entry.opened_output and self.output is not None:
                        self.output.forget(run.run_id)
                else:
                    result = await entry.coro
                    ended = True
                    if isinstance(result, _STATUS_RESULTS):  # any other value: COMPLETED, 0
                        outcome = _outcome_of(result)
            else:
                outcome = (RunStatus.FAILED, refusal, None)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            outcome = (RunStatus.CANCELLED, entry.cancel_reason or "cancelled", None)
        except Exception as exc:
            if (
                isinstance(exc, RunClaimedError)
                and exc.run_id == run.run_id
                and entry.marks_running
                and await self._claimed_elsewhere(run.run_id)
            ):
                # Its runner found the run claimed by another process as it started it (a
                # cluster job picked up while queued there) and stopped its child: the run is
                # that process's to record. (Only a run whose runner records RUNNING can be
                # claimed once it started, and only this registry's word counts.)
                claimed = True
                logger.warning("background run %s stopped: %s", run.run_id, exc)
                if entry.opened_output and self.output is not None:
                    self.output.forget(run.run_id)
            else:
                logger.error(
                    "background run %s (%s) failed",
                    run.run_id,
                    run.module_name or "?",
                    exc_info=exc,
                )
                outcome = (RunStatus.FAILED, f"{type(exc).__name__}: {exc}", None)
        except BaseException as exc:
            outcome = (RunStatus.FAILED, f"{type(exc).__name__}: {exc}", None)
            reraise = exc
        finally:
            # A coroutine that did not return (cancelled, refused or failed before it started,
            # or raised) is closed: one that never started must not warn "never awaited".
            if not ended:
                _close(entry.coro)
        entry.claimed = claimed
        entry.phase = _RECORDING
        # Abandoned by a shutdown before this point, the run is recorded by the shutdown; from
        # here on the shutdown leaves the record to this task (see _abandon), which must then
        # write it even if it is abandoned while it awaits below.
        abandoned = entry.abandoned
        try:
            if (
                direct is None  # (first: the memory registry has no other process to claim it)
                and outcome is not _COMPLETED
                and outcome[0] is RunStatus.CANCELLED
                and run._status is _PENDING_STATUS
                and not claimed
                and not abandoned
                and entry.store_done
                and await self._claimed_while_queued(run.run_id)
            ):
                # Cancelled while queued here, after another process picked it up and began
                # running it: it is that process's run. Recorded CANCELLED here (refused by the
                # registry, only logged) it was reported cancelled, and its followers here got
                # that end, while it went on there.
                claimed = entry.claimed = True
                logger.warning(
                    "background run %s was claimed by another process while queued here; the "
                    "cancel goes to that process",
                    run.run_id,
                )
                if entry.opened_output and self.output is not None:
                    self.output.forget(run.run_id)
            if not abandoned and not claimed:
                # A run cancelled while it was being stored (SQLite finishes the insert in its
                # thread) may or may not be in the registry; record it if it is.
                if outcome is _COMPLETED and run._status is _RUNNING_STATUS:
                    run.mark_completed(0)  # self._apply(run, outcome) without the call
                else:
                    self._apply(run, outcome)
                if self.output is not None:
                    await self._collect_output(run)
                try:
                    # Checked again: the run's own code may have patched the registry.
                    if direct is not None and updates_directly(direct):
                        direct._update_run_now(run)
                    else:
                        await registry.update_run(run)
                except Exception as exc:
                    self._save_failed(run, exc, missing_ok=not entry.store_done)
        finally:
            if not entry.store_done:  # cancelled while being stored: awaiters must not hang
                entry.settle(_cancelled_before_stored(run))
            self._release(entry)
        if reraise is not None:
            raise reraise
        if not entry.abandoned and entry.task is not None:
            # Ending normally, the task leaves its done callback nothing to do (it matters for
            # a task cancelled before its first step, an abandoned one, or a BaseException):
            # removing it saves a loop callback per run.
            entry.task.remove_done_callback(entry)
            entry.manager = None

    async def _store(self, run: Run) -> None:
        """Add ``run`` to the registry, or take over the PENDING run the caller added (or the
        stored run a copy of which was passed: a pick-up, never added again)."""
        if _picked_up(run):
            await self._take_over(run)
            return
        try:
            await self.registry.add_run(run)
        except DuplicateRunError:
            await self._take_over(run)

    async def _take_over(self, run: Run) -> None:
        """Take over the run the caller added before ``start_task``, if it is still PENDING and
        nobody else is about to run it; this process becomes its owner.

        A PENDING run queued by another manager (of this process, or of another live process
        on the same file: another server worker) is that manager's to run: taken over, one run
        id would run two jobs. A run read from the registry (its stored owner with it) may be
        started by another process than the one that added it: that is a deliberate pick-up.

        Raises:
            DuplicateRunError: it is gone again, no longer PENDING, or queued elsewhere.
        """
        run_id = run.run_id
        stored = await self.registry.get_run(run_id)
        if stored is None:
            raise DuplicateRunError(
                f"run {run_id!r} is not stored (never added, or removed since by retention or "
                "a delete); a Run naming another process as owner is started only as the "
                "pick-up of a stored pending run"
            ) from None
        if stored.status is not RunStatus.PENDING:
            raise DuplicateRunError(
                f"run {run_id!r} is already stored ({stored.status.value}); only a run that is "
                "still pending can be started"
            ) from None
        for other in list(_MANAGERS):
            if (
                other is not self
                and run_id in other._entries
                and _same_store(other.registry, self.registry)
            ):
                raise DuplicateRunError(
                    f"run {run_id!r} is pending in another BackgroundTaskManager of this "
                    "process, which will run it"
                )
        owner, here = stored.owner, RunOwner.current()
        if (
            owner is not None
            and owner != here
            and run.owner != owner
            and await owner_lives(owner, self.registry)
        ):
            raise DuplicateRunError(
                f"run {run_id!r} is pending in another process (pid {owner.pid} on "
                f"{owner.host}), which is alive and will run it; to start a run another process "
                "added for this one, pass the Run as read from the registry"
            )
        run.owner = here  # (a copy read before another claim carries a stale owner)
        # One step, not a write after the look above: of several processes picking up this
        # run with the owner they all read, only one may become its driver. A run cancelled
        # before its first step (already CANCELLED here) is claimed as it is stored, PENDING,
        # then recorded.
        claim = run if run.status is RunStatus.PENDING else _as_pending(run)
        if not await self.registry.claim_run(claim, owner):
            raise await self._claimed_meanwhile(run_id)
        if claim is not run:
            await self.registry.update_run(run)

    async def _claimed_meanwhile(self, run_id: str) -> DuplicateRunError:
        """The error for a take-over another process won between our look and our claim."""
        now = await self.registry.get_run(run_id)
        if now is None or now.status is not RunStatus.PENDING:
            state = "gone" if now is None else now.status.value
            return DuplicateRunError(
                f"run {run_id!r} changed while it was being taken over (now {state}); only a "
                "run that is still pending can be started"
            )
        owner = now.owner
        where = "" if owner is None else f" (pid {owner.pid} on {owner.host})"
        return DuplicateRunError(
            f"run {run_id!r} was claimed by another process{where} while it was being taken "
            "over; that process runs it"
        )

    def _store_failed(self, entry: _Entry, exc: Exception) -> None:
        run = entry.run
        if not entry.store_waiters:
            # Nobody awaits the handle (yet): the log is where the failure shows. One who does
            # gets the exception instead (and a log line too would report it twice).
            if isinstance(exc, DuplicateRunError):
                logger.error("background run %s not started: %s", run.run_id, exc)
            else:
                logger.error(
                    "background run %s not started: storing it failed", run.run_id, exc_info=exc
                )
        entry.settle(exc)
        if entry.opened_output and self.output is not None:
            self.output.forget(run.run_id)
        entry.phase = _RECORDING
        _close(entry.coro)
        self._release(entry)

    async def _take_slot(self, entry: _Entry) -> None:
        if self.max_concurrent is None or (self._running < self.max_concurrent and not self._queue):
            self._running += 1
            entry.has_slot = True
            entry.phase = _RUNNING
            return
        slot: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry.slot = slot
        entry.phase = _QUEUED
        self._queue.append(entry)
        try:
            await slot
        except asyncio.CancelledError:
            if slot.done() and not slot.cancelled():
                entry.has_slot = True  # handed over just as we were cancelled: pass it on
            else:
                # _release may have taken it off the queue already (it skips a cancelled
                # slot), when another run ended in the same loop iteration.
                with contextlib.suppress(ValueError):
                    self._queue.remove(entry)
            raise
        entry.has_slot = True  # _release counted it for us when it handed it over
        entry.phase = _RUNNING

    async def _admit(self, run: Run) -> str | None:
        """Ask the resource manager to admit ``run``; return ``None`` or the refusal reason."""
        if self.resource_manager is None:
            return None
        try:
            await admission(self.resource_manager, self.admission_wait, self.admission_timeout)
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
    def _apply(run: Run, outcome: _Outcome) -> None:
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
            await self.output.close_run(
                run.run_id, status=run.status, exit_code=end_code(run.exit_code)
            )
        except Exception:
            logger.exception("closing the output of run %s failed", run.run_id)
        if not run.output_tail and self.output_tail_lines:
            run.output_tail = self.output.tail(run.run_id, self.output_tail_lines)

    async def _save(self, run: Run, *, missing_ok: bool = False) -> None:
        try:
            await self.registry.update_run(run)
        except Exception as exc:
            self._save_failed(run, exc, missing_ok=missing_ok)

    async def _claimed_elsewhere(self, run_id: str) -> bool:
        """Whether this registry says another process owns ``run_id`` now."""
        try:
            stored = await self.registry.get_run(run_id)
        except Exception:
            return False
        return stored is not None and stored.owner not in (None, RunOwner.current())

    async def _claimed_while_queued(self, run_id: str) -> bool:
        """:meth:`_claimed_elsewhere` for a run cancelled while queued. A second cancellation
        during the look (a registry read) is the same cancellation: the run is then recorded
        here as it would have been without the look (it escaped the recording, and the run was
        never released: its ``cancel_task()`` waited for good)."""
        try:
            return await self._claimed_elsewhere(run_id)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None:
                current.uncancel()
            return False

    def _save_failed(self, run: Run, exc: Exception, *, missing_ok: bool = False) -> None:
        # The run itself must go on; a registry failure is reported, not propagated.
        if missing_ok and isinstance(exc, RunNotFoundError):
            return
        if isinstance(exc, RunClaimedError):
            # Not a registry failure: the run is another process's now (nothing to retry).
            logger.warning("run %s (%s) not recorded here: %s", run.run_id, run.status.value, exc)
            return
        logger.error("recording run %s (%s) failed", run.run_id, run.status.value, exc_info=exc)
        if worth_retrying(run, exc):
            # Nobody writes a finished run again: left alone, it would stay RUNNING for good.
            self._unsaved.add(run)

    def _release(self, entry: _Entry) -> None:
        entry.released = True
        watching = entry.released_waiter
        if watching is not None and not watching.done():
            watching.set_result(None)
        if entry.has_slot:
            entry.has_slot = False
            self._running -= 1
        run_id = entry.run.run_id
        entries = self._entries
        if entries.get(run_id) is entry:
            del entries[run_id]
        queue = self._queue
        while (
            queue
            and not self._closing
            and (self.max_concurrent is None or self._running < self.max_concurrent)
        ):
            waiter = queue.popleft()
            if waiter.slot is not None and not waiter.slot.done():
                self._running += 1
                waiter.slot.set_result(None)
        if not entries:
            self._idle.set()

    def _check_idle(self) -> None:
        if not self._entries:
            self._idle.set()

    def _task_done(self, entry: _Entry, task: asyncio.Task[None]) -> None:
        if entry.abandoned:
            self._abandoned.discard(task)
        if task.cancelled():
            if not entry.started:
                # Cancelled before its first step (tasks[id].cancel() at once, loop teardown):
                # _drive's body never ran, so store the run CANCELLED from a task of its own.
                recorder = asyncio.ensure_future(self._record_unstarted(entry))
                entry.task = recorder
                recorder.add_done_callback(entry)
                return
        else:
            # _drive records every Exception itself; this only consumes what escaped it (a
            # BaseException such as KeyboardInterrupt, which asyncio re-raises anyway).
            task.exception()
        entry.manager = None  # the run's last callback

    async def _record_unstarted(self, entry: _Entry) -> None:
        run = entry.run
        entry.started = True
        entry.phase = _RECORDING
        _close(entry.coro)
        error: BaseException | None = None
        try:
            if not run.is_finished:
                run.mark_cancelled(entry.cancel_reason or "cancelled before it started")
            await self._store(run)
        except Exception as exc:
            logger.exception("recording cancelled run %s failed", run.run_id)
            error = exc
        finally:
            entry.settle(error)
            self._release(entry)

    # -- control --------------------------------------------------------------------------------
    def is_active(self, run_id: str) -> bool:
        """Return ``True`` while ``run_id`` is being stored, queued, running or being recorded
        here."""
        return run_id in self._entries

    def _interrupt(self, entry: _Entry, reason: str) -> None:
        if entry.cancel_reason is None:
            entry.cancel_reason = reason
        if (
            entry.phase in (_QUEUED, _RUNNING)
            and entry.task is not None
            and not entry.task.get_loop().is_closed()  # (cancel() would raise: see _give_up)
        ):
            entry.task.cancel()

    async def cancel_task(
        self, run_id: str, reason: str = "cancelled by request", *, timeout: float | None = None
    ) -> CancelResult:
        """Cancel a queued or running run and wait until its CANCELLED status is recorded.

        A run that is being stored, queued or waiting for admission is recorded CANCELLED and
        its coroutine closed without ever starting. A running one is cancelled and may clean up
        (e.g. stop its child process); its final status is whatever it ends with (CANCELLED
        unless it swallows the cancellation and returns, or had just ended), and the answer
        says which.

        A run that another process owns (another uvicorn worker sharing a SQLite registry) is
        cancelled through the registry: the request is recorded (``registry.request_cancel``),
        that process's manager acts on it within about 50 ms, and this call waits, up to
        ``timeout`` seconds (``None``: as long as it takes), until the registry shows the run
        finished. If that owner died, the run is marked INTERRUPTED instead. A run queued here
        that another process picked up meanwhile (it runs there now) is cancelled the same way.

        Returns :class:`CancelResult` ``CANCELLED`` (true: the run is recorded CANCELLED), or
        (all false) ``ALREADY_FINISHED`` (ending, being cancelled already, finished in the
        registry, or ended otherwise after a request), ``REQUESTED`` (another process's run did
        not finish within ``timeout``) or ``NOT_FOUND`` (unknown, stored by this process without
        being active here, or its storing failed). A run active here, even one being cancelled
        already or ending, is recorded when this returns.

        Cancellation: stops waiting; the run's cancellation (or the recorded request) still goes
        ahead.

        Raises:
            RegistryClosedError: the run is not active here and the registry is closed.
            InvalidTimeoutError: a negative ``timeout``.
            InvalidRunIdError: ``run_id`` is not a str.
            InvalidArgumentTypeError: ``reason`` is not a str.
        """
        run_id, reason = run_id_of(run_id), reason_text(reason)
        entry = self._entries.get(run_id)
        if entry is None:
            return await cancel_elsewhere(self.registry, run_id, reason, timeout)
        if _left_behind(entry):
            await self._give_up([entry], functools.partial(Run.mark_cancelled, reason=reason))
            if entry.run.status is RunStatus.CANCELLED:
                return CancelResult.CANCELLED
            return CancelResult.ALREADY_FINISHED
        if entry.phase == _RECORDING or entry.cancel_reason is not None:
            # Still waits for the record: a caller reading the registry next must not find
            # the run RUNNING (a second cancel of a run whose clean-up takes a grace period).
            # Not from the run's own task (its clean-up cancelling itself): it would wait for
            # itself.
            if asyncio.current_task() is not entry.task:
                await asyncio.shield(entry.wait_released())
            return CancelResult.ALREADY_FINISHED
        self._interrupt(entry, reason)
        # Not the task: a run cancelled before its first step is recorded by another one.
        await asyncio.shield(entry.wait_released())
        if entry.claimed:
            # Another process picked the run up while it was queued here: the request goes
            # to that process, and the answer is what it records.
            return await cancel_elsewhere(self.registry, run_id, reason, timeout)
        # The answer follows what was recorded: a coroutine may catch the cancellation and
        # return (COMPLETED / FAILED), or have ended just as the cancel came, and a run whose
        # insert failed is in no registry.
        run = entry.run
        if run.status is RunStatus.CANCELLED:
            return CancelResult.CANCELLED
        if not run.is_finished:  # it could not be stored, so it never ran
            return CancelResult.NOT_FOUND
        return CancelResult.ALREADY_FINISHED

    async def wait_all(self, timeout: float | None = None) -> None:
        """Wait until no run is queued or running (including runs started meanwhile).

        Runs left behind by an event loop that was closed while they were active (its tasks
        never cancelled: they never run again) are first recorded INTERRUPTED and released.

        Cancellation and timeout leave the runs alone.

        Raises:
            TimeoutError: they were not all done within ``timeout`` seconds.
            InvalidTimeoutError: ``timeout`` is negative, NaN or not a number.
        """
        timeout = check_timeout(timeout)
        async with asyncio.timeout(None if timeout == math.inf else timeout):
            left = [entry for entry in self._entries.values() if _left_behind(entry)]
            if left:
                await self._give_up(left, _interrupted)
            while self._entries:
                await self._idle.wait()

    async def shutdown(self, grace: float = 5.0, reason: str = "task manager shut down") -> None:
        """Stop: refuse new runs, cancel queued and running ones, and return once every run is
        recorded in the registry, or given up on. This is :meth:`aclose` with a chosen ``grace``
        and ``reason``.

        Queued runs are recorded CANCELLED without starting. Running coroutines are cancelled
        and get ``grace`` seconds to finish their cleanup. A run still going after that
        (a coroutine that ignores cancellation, or a registry write that hangs) is abandoned:
        it is recorded CANCELLED now, with at most ``max(grace, 1)`` more seconds for that
        write, and its later outcome is not recorded (its task keeps a reference until it
        ends). A final record the registry failed to store (a full disk; such records are
        written again in the background until stored) gets a last try, as long. So shutdown
        returns within about ``3 * grace`` (at least 2 s more) whatever the runs and the
        registry do, unless a coroutine blocks the event loop itself. Idempotent.

        Cancellation: stops waiting; the cancellations already sent stay in effect. Called
        inside an anyio scope that is already cancelled (a ``finally`` block after
        ``move_on_after``), the shutdown runs in full, shielded from that scope: it used to be
        cut short at its first await, before any run was cancelled.

        Raises:
            InvalidTimeoutError: ``grace`` is negative, NaN, infinite or not a number (a
                shutdown that waits for ever for a coroutine ignoring its cancellation would
                never return).
        """
        if grace is None:
            raise InvalidTimeoutError("grace must be a number of seconds >= 0, got None")
        grace = check_timeout(grace, "grace", finite=True)  # type: ignore[assignment]
        with shielded_if_cancelled():
            await self._shutdown(grace, reason)

    async def _shutdown(self, grace: float, reason: str) -> None:
        self._closing = True
        await self._watcher.aclose()
        left = [entry for entry in self._entries.values() if _left_behind(entry)]
        if left:
            # Recorded at once: nothing can stop them, and the grace would only be waited out.
            await self._give_up(
                left,
                functools.partial(Run.mark_cancelled, reason=f"{reason} (its event loop closed)"),
                max(grace, _MIN_RECORD_WAIT),
            )
        for entry in list(self._entries.values()):
            self._interrupt(entry, reason)
        # Each run's release, not its task: a run cancelled before its first step is recorded
        # by a task of its own, started when the first one ended.
        waits = [entry.wait_released() for entry in self._entries.values()]
        if waits:
            await asyncio.wait(waits, timeout=grace)
            left = [entry for entry in self._entries.values() if not entry.released]
            if left:
                await self._abandon(left, reason, max(grace, _MIN_RECORD_WAIT))
        if self._unsaved:
            await self._unsaved.aclose(max(grace, _MIN_RECORD_WAIT))

    async def _abandon(self, entries: list[_Entry], reason: str, wait: float) -> None:
        saves: set[asyncio.Future[None]] = set()
        for entry in entries:
            assert entry.task is not None
            logger.warning(
                "run %s did not stop within the shutdown grace period; recording it cancelled",
                entry.run.run_id,
            )
            entry.abandoned = True
            self._abandoned.add(entry.task)
            del self._entries[entry.run.run_id]
            if entry.has_slot:
                # No longer in flight here (active_runs() and tasks say so too); the task's
                # own release, when it ends, finds the slot given back.
                entry.has_slot = False
                self._running -= 1
            run = entry.run
            if entry.phase == _RECORDING:
                # Its task writes its outcome (being written, or about to be: _drive writes it
                # whatever happens from here); shutdown waits for that write like for its own.
                saves.add(entry.wait_released())
                continue
            if not run.is_finished:
                run.mark_cancelled(f"{reason} (did not stop within the grace period)")
            save = self._start_record_abandoned(run, missing_ok=entry.phase == _ADDING)
            # A cancel_task() waiting for this run returns once it is recorded, not when the
            # coroutine that ignored the cancellation ends (maybe never).
            save.add_done_callback(entry.recorded_elsewhere)
            saves.add(save)
        self._check_idle()
        await self._wait_recorded(saves, wait, "abandoned run(s)")

    async def _give_up(
        self, entries: list[_Entry], mark: Callable[[Run], None], wait: float | None = None
    ) -> None:
        """Record and release runs whose task belongs to a closed event loop (see
        ``_left_behind``), as ``_abandon`` does: ``mark`` gives an unfinished run its final
        status; waits up to ``wait`` seconds (``None``: as long as it takes) for the writes."""
        # The idle event may be bound to the closed loop (a wait_all() was waiting there): then
        # a fresh one, as start_task makes. One bound to a live loop keeps its waiters (a
        # wait_all() of another loop still waits on it). (``_loop``: asyncio's own binding.)
        bound = getattr(self._idle, "_loop", None)
        if bound is not None and bound.is_closed():
            self._idle = asyncio.Event()
        for entry in entries:
            # Taken off the queue first: handing a freed slot to one of them would set a
            # future of the closed loop.
            with contextlib.suppress(ValueError):
                self._queue.remove(entry)
        saves: set[asyncio.Future[None]] = set()
        for entry in entries:
            run = entry.run
            logger.warning(
                "run %s was left behind by an event loop closed while it was active; "
                "recording it now",
                run.run_id,
            )
            # Its coroutine, closed when the dead task is collected, must record nothing.
            entry.abandoned = True
            waiter = entry.released_waiter
            if waiter is not None and waiter.get_loop().is_closed():
                entry.released_waiter = None
            missing_ok = entry.phase == _ADDING or not entry.store_done
            if not entry.store_done:
                entry.settle(RunStateError(f"run {run.run_id} was left behind by a closed loop"))
            if entry.phase != _RECORDING and not run.is_finished:
                mark(run)
            state = inspect.getcoroutinestate(entry.coro)
            if state in (inspect.CORO_CREATED, inspect.CORO_SUSPENDED):
                # Never started (queued): must not warn "never awaited". Started: closed now,
                # its clean-up for a close runs (a run() kills its child's tree), where the
                # dead task, kept alive by what it waits for (a child watcher), would never
                # close it.
                _close(entry.coro)
            self._release(entry)
            if entry.claimed:
                continue  # another process's run: it records it
            saves.add(self._start_record_abandoned(run, missing_ok=missing_ok))
        self._check_idle()
        await self._wait_recorded(saves, wait, "run(s) left behind by a closed event loop")

    def _start_record_abandoned(self, run: Run, *, missing_ok: bool) -> asyncio.Future[None]:
        """Write ``run``'s final record in a task of its own, kept until it is done."""
        save = asyncio.ensure_future(self._record_abandoned(run, missing_ok=missing_ok))
        self._abandoned.add(save)
        save.add_done_callback(self._abandoned.discard)
        return save

    @staticmethod
    async def _wait_recorded(
        saves: set[asyncio.Future[None]], wait: float | None, what: str
    ) -> None:
        """Wait up to ``wait`` seconds (``None``: as long as it takes) for ``saves``; log those
        that did not end."""
        if not saves:
            return
        _, hung = await asyncio.wait(saves, timeout=wait)
        if hung:
            logger.error(
                "%d %s could not be recorded within %s s; the registry hangs", len(hung), what, wait
            )

    async def _record_abandoned(self, run: Run, *, missing_ok: bool) -> None:
        await self._collect_output(run)
        await self._save(run, missing_ok=missing_ok)

    async def aclose(self) -> None:
        """:meth:`shutdown` with its defaults (5 s grace); what leaving ``async with`` does.
        Idempotent; :meth:`start_task` then raises :class:`TaskManagerClosedError`.

        Cancellation: stops waiting; the cancellations already sent stay in effect.
        """
        await self.shutdown()
