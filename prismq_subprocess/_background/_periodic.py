"""PeriodicTask: run a function on a fixed cadence from asyncio, without drift or overlap.

Scheduling policy
-----------------
The schedule is a grid on the event loop's clock: tick ``k`` is due at ``origin + k * interval``
where ``origin`` is the clock reading when the task started. The next due time is computed from
the grid, never from when the previous run ended, so late wake-ups and run durations do not
accumulate into drift.

Runs never overlap. When a run (or a late wake-up) makes one or more ticks pass unserved, those
ticks are *coalesced*: the schedule jumps to the latest tick that is already due, runs it once,
right away (after letting the rest of the event loop have one turn), and counts every earlier
tick it jumped over in ``stats.skipped``. Example with a 1 s
interval: a run started at tick 0 that takes 2.5 s ends after ticks 1 and 2 have passed; tick 1
is skipped (``skipped += 1``), tick 2 runs immediately (late), and tick 3 is due at 3 s as usual.

Jitter adds a random delay in ``[0, jitter]`` to each run's start; it never moves the grid.

The first run is at once (tick 0), as in the PrismQ guide; ``run_immediately=False`` starts one
interval later.

What a run may do to the schedule
---------------------------------
Nothing a run raises ends the host or the schedule (unless ``max_consecutive_failures`` says so):
an exception, a ``CancelledError`` that escapes the run without the schedule having been
cancelled (the run awaited a helper task someone else cancelled), ``SystemExit`` (a reused
command-line ``main()`` calling ``sys.exit``), ``GeneratorExit`` and any other ``BaseException``
are each logged, counted as a failure and the schedule goes on (a plain function's
``StopIteration``, which asyncio cannot carry, is recorded as a ``RuntimeError`` caused by it).
``KeyboardInterrupt`` raised on the event loop's thread is a real interrupt and propagates, as
it does anywhere in asyncio; raised by a plain function (in its worker thread) it can only come
from the function itself and is a failure like the others.

Plain functions run in a daemon thread of their own per run, not in the loop's default executor:
one that hangs is abandoned by ``stop()`` after its timeout and then blocks neither
``asyncio.run()`` (which waits for the default executor's threads) nor interpreter exit.

A run may stop its own schedule: ``await task.stop()`` from the run, from a task or thread the
run started (``asyncio.wait_for``, ``gather``, ``run_coroutine_threadsafe`` from a plain
function), returns at once and the schedule ends when the run returns. A
coroutine function that blocks the event loop itself (``time.sleep`` instead of
``asyncio.sleep``) blocks everything, ``stop()`` included; nothing outside it can bound that.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import inspect
import logging
import math
import random
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Self

from .._core._cancel_shield import shielded_if_cancelled
from .._core._closing import AsyncResource
from .._core._daemon_thread import call_in_daemon_thread
from .._core._durations import finite, interval_seconds, timeout_seconds
from .._core._exceptions import (
    InvalidIntervalError,
    InvalidLimitError,
    InvalidTaskError,
    NoRunningLoopError,
)
from .._core._maybe_async import generator_function_kind, is_async_callable
from .._core._validation import check_flag

__all__ = ["PeriodicTask", "PeriodicTaskStats"]

logger = logging.getLogger(__name__)

#: How often a stop awaited on another loop looks whether the schedule's loop is still there.
_HANDOVER_POLL = 0.05
#: How often a new schedule looks whether a run left in its thread by a stop has ended.
_ABANDONED_POLL = 0.02
#: The shortest interval, a nanosecond (the finest any clock here reads): below it a grid
#: means nothing, and a subnormal one overflowed the tick arithmetic (the schedule died at
#: its first tick).
_MIN_INTERVAL = 1e-9

# Module-level so jitter is not re-seeded per task; jitter needs spread, not security.
_jitter_random = random.Random()


class _RunMark:
    """Which task's run the code in this context belongs to, and whether it is still going."""

    __slots__ = ("active", "owner")

    def __init__(self, owner: PeriodicTask) -> None:
        self.owner = owner
        self.active = True


# Set for the duration of a run; the tasks and threads the run starts inherit it, so stop()
# can tell a call the run waits on (waiting for the run would deadlock) from any other caller.
_current_run: contextvars.ContextVar[_RunMark | None] = contextvars.ContextVar(
    "prismq_periodic_run", default=None
)


def _call_then_set(
    done: threading.Event,
    func: Callable[..., object],
    args: tuple[Any, ...],
    kwargs: Mapping[str, Any],
) -> object:
    """``func(*args, **kwargs)``, then ``done`` set, whatever the call did (in its thread)."""
    try:
        return func(*args, **kwargs)
    finally:
        done.set()


class _Schedule:
    """One start()'s schedule: stop() marks it, the next start() makes a new one."""

    __slots__ = ("stopping",)

    def __init__(self) -> None:
        self.stopping = False


def _current_task_or_none() -> asyncio.Task[Any] | None:
    try:
        return asyncio.current_task()
    except RuntimeError:  # no running loop
        return None


def _report_to(handed: concurrent.futures.Future[None], stopping: asyncio.Task[None]) -> None:
    # The stop on the schedule's loop is over: tell the caller on the other loop. Cancelled
    # there (that loop closing), nothing is left to stop.
    if handed.done():
        return
    if stopping.cancelled() or stopping.exception() is None:
        handed.set_result(None)
    else:
        handed.set_exception(stopping.exception())


def _alive(task: asyncio.Task[None] | None) -> bool:
    # A task left pending on a loop that was closed will never run again.
    return task is not None and not task.done() and not task.get_loop().is_closed()


@dataclass(frozen=True, slots=True)
class PeriodicTaskStats:
    """A consistent snapshot of a :class:`PeriodicTask`'s counters (see ``PeriodicTask.stats``).

    Times are readings of the task's clock (by default the event loop's ``loop.time()``).

    Attributes:
        runs: runs finished so far, successful or not.
        failures: runs that raised.
        consecutive_failures: failures since the last successful run.
        skipped: ticks dropped by coalescing (see the module docstring).
        last_duration: seconds the last finished run took, ``None`` before the first one.
        last_error: the exception of the most recent failed run, ``None`` if none failed yet.
        last_scheduled_time: the grid time of the latest (or current) run, ``None`` before any.
        next_run_time: when the next run is planned (jitter included), ``None`` when not running.
        is_running: the schedule is active (started and not stopped or given up).
        run_in_progress: a run is executing right now.
    """

    runs: int
    failures: int
    consecutive_failures: int
    skipped: int
    last_duration: float | None
    last_error: BaseException | None
    last_scheduled_time: float | None
    next_run_time: float | None
    is_running: bool
    run_in_progress: bool


class PeriodicTask(AsyncResource):
    """Run ``task_func(*args, **kwargs)`` every ``interval`` on a fixed, drift-free cadence.

    Coroutine functions are awaited on the event loop; plain functions run in a daemon worker
    thread of their own per run, so they never block the loop and a hung one never blocks exit;
    an awaitable a plain function returns is then awaited on the loop. See the module docstring
    for the scheduling and coalescing policy and for what a failing run does.

    The PrismQ guide's spelling works unchanged: ``PeriodicTask(name=..., interval=
    timedelta(hours=1), task_func=cleanup)``, ``start()``, ``await stop()``, and the ``name``,
    ``task_func``, ``args`` and ``kwargs`` attributes (``interval`` is in seconds here).

    Args:
        name: used in log messages and as the asyncio task's name.
        interval: seconds (``int``/``float``) or a ``timedelta``; finite and at least a
            nanosecond.
        task_func: the function to run; its exceptions are logged with their traceback and
            counted, and never stop the schedule unless ``max_consecutive_failures`` is reached.
        *args, **kwargs: passed to ``task_func`` on every run. Keyword arguments named like one
            of the options below are taken as the option; wrap ``task_func`` in
            ``functools.partial`` to pass such names through.
        run_immediately: run at once on ``start()`` (tick 0, the default, as in the guide);
            ``False``: the first run is one interval later.
        jitter: random extra delay in ``[0, jitter]`` seconds before each run (>= 0 and less
            than ``interval``, so that no run is pushed past the next tick).
        max_consecutive_failures: stop the schedule after this many failures in a row;
            ``None`` (default) never gives up.
        clock: returns the current time in seconds; defaults to the running loop's ``time()``.
        sleep: ``await sleep(seconds)`` waits; defaults to ``asyncio.sleep``. ``clock`` and
            ``sleep`` exist so tests can drive the schedule with a fake clock.

    Raises:
        InvalidTaskError: ``task_func`` is not callable (``None``, say), nor ``clock`` or
            ``sleep`` when given.
        InvalidIntervalError: ``interval`` is not a finite duration of at least a nanosecond,
            or ``jitter`` is not a number.
        InvalidArgumentTypeError: ``run_immediately`` is not a bool.
        InvalidLimitError: ``jitter`` is negative, not finite or not less than ``interval``, or
            ``max_consecutive_failures`` is not a positive integer.
    """

    def __init__(
        self,
        name: str,
        interval: float | timedelta,
        task_func: Callable[..., object],
        *args: Any,
        run_immediately: bool = True,
        jitter: float = 0.0,
        max_consecutive_failures: int | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[object]] | None = None,
        **kwargs: Any,
    ) -> None:
        kind = generator_function_kind(task_func)
        if kind is not None:
            # Its call makes a generator that nothing would iterate: the body would never run
            # (and every "run" counted as a success).
            raise InvalidTaskError(
                f"task_func must be a function or coroutine function, not a {kind} "
                f"function: {task_func!r}"
            )
        if not callable(task_func):
            raise InvalidTaskError(
                f"task_func must be a function or coroutine function, got {task_func!r}"
            )
        for option, given in (("clock", clock), ("sleep", sleep)):
            if given is not None and not callable(given):
                # Checked now: the schedule's task would die at its first tick, unseen. The
                # guide passes **kwargs to task_func, so this is likely one meant for it.
                raise InvalidTaskError(
                    f"PeriodicTask {name!r}: {option}= is an option of PeriodicTask and must be "
                    f"callable, got {given!r}; to pass {option}= to task_func, wrap task_func "
                    "in functools.partial"
                )
        if sleep is not None and inspect.isbuiltin(sleep):
            # time.sleep and the like: no awaitable comes back, and the schedule died at its
            # first tick (after blocking the loop for an interval), only logged.
            raise InvalidTaskError(
                f"PeriodicTask {name!r}: sleep= must be asynchronous, e.g. asyncio.sleep, got "
                f"{sleep!r}"
            )
        if clock is not None:
            reading = clock()
            if isinstance(reading, bool) or not isinstance(reading, int | float):
                raise InvalidTaskError(
                    f"PeriodicTask {name!r}: clock= must return seconds (a number), as "
                    f"time.monotonic does; it returned {reading!r:.40}"
                )
        self._interval = interval_seconds(interval)
        if self._interval < _MIN_INTERVAL:
            raise InvalidIntervalError(
                f"PeriodicTask {name!r}: interval must be at least {_MIN_INTERVAL:g} s, got "
                f"{interval!r}"
            )
        if isinstance(jitter, bool) or not isinstance(jitter, int | float):
            raise InvalidIntervalError(f"jitter must be a number of seconds, got {jitter!r}")
        if not finite(jitter) or jitter < 0:
            raise InvalidLimitError(f"jitter must be finite and >= 0, got {jitter!r}")
        if jitter and jitter >= self._interval:
            # A run delayed past the next tick would make that tick coalesce (skipped).
            raise InvalidLimitError(
                f"jitter must be less than the interval ({self._interval} s), got {jitter!r}"
            )
        if max_consecutive_failures is not None and (
            isinstance(max_consecutive_failures, bool)
            or not isinstance(max_consecutive_failures, int)
            or max_consecutive_failures < 1
        ):
            raise InvalidLimitError(
                "max_consecutive_failures must be a positive int or None, "
                f"got {max_consecutive_failures!r}"
            )
        self.name = name
        self._func = task_func
        self._args = args
        self._kwargs = kwargs
        self._is_async = is_async_callable(task_func)
        self._run_immediately = check_flag(run_immediately, "run_immediately")
        self._jitter = float(jitter)
        self._max_failures = max_consecutive_failures
        self._clock = clock
        self._sleep: Callable[[float], Awaitable[object]] = sleep or asyncio.sleep

        self._task: asyncio.Task[None] | None = None
        self._schedule_state = _Schedule()
        # The mark of the run in progress, None between runs: a run's clean-up clears only its
        # own (one abandoned on a closed loop is cleaned up whenever a garbage collection
        # finalises it, maybe during a run on a later loop).
        self._in_run: _RunMark | None = None
        # Set once the latest plain run's call has returned, in its thread: a stop that timed
        # out leaves the call going, and the next run waits for it (runs never overlap).
        self._thread_done: threading.Event | None = None
        self._runs = 0
        self._failures = 0
        self._consecutive_failures = 0
        self._skipped = 0
        self._last_duration: float | None = None
        self._last_error: BaseException | None = None
        self._last_scheduled: float | None = None
        self._next_run: float | None = None

    @property
    def interval(self) -> float:
        """The interval in seconds."""
        return self._interval

    @property
    def task_func(self) -> Callable[..., object]:
        """The function run on every tick."""
        return self._func

    @property
    def args(self) -> tuple[Any, ...]:
        """Positional arguments passed to :attr:`task_func`."""
        return self._args

    @property
    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments passed to :attr:`task_func` (a copy)."""
        return dict(self._kwargs)

    @property
    def is_running(self) -> bool:
        """True while the schedule is active."""
        return _alive(self._task)

    @property
    def stats(self) -> PeriodicTaskStats:
        """A frozen snapshot of the counters; cheap, readable at any time from the loop thread."""
        return PeriodicTaskStats(
            runs=self._runs,
            failures=self._failures,
            consecutive_failures=self._consecutive_failures,
            skipped=self._skipped,
            last_duration=self._last_duration,
            last_error=self._last_error,
            last_scheduled_time=self._last_scheduled,
            next_run_time=self._next_run if self.is_running else None,
            is_running=self.is_running,
            # (a run cut short by its loop's closing never got to clear the flag)
            run_in_progress=(self._in_run is not None and self.is_running)
            or self._thread_running(),
        )

    def _thread_running(self) -> bool:
        done = self._thread_done
        return done is not None and not done.is_set()

    def start(self) -> None:
        """Start the schedule on the running event loop.

        Idempotent: when already running it logs a warning and does nothing. A stopped task can
        be started again; its counters carry on and its grid restarts from now. Called while a
        :meth:`stop` is under way (waiting for a run to finish), the new schedule begins once
        the old one has ended; a plain function a stop that timed out left running in its
        thread is waited for before the first run: runs never overlap.

        Raises:
            NoRunningLoopError: no event loop is running in this thread (e.g. called at module
                level, as the PrismQ guide does); call it from async code. A RuntimeError.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise NoRunningLoopError(
                f"PeriodicTask {self.name!r}: start() needs a running event loop; call it from "
                "async code (e.g. a FastAPI lifespan handler), not at module level"
            ) from None
        previous = self._task if _alive(self._task) else None
        if previous is not None and not self._schedule_state.stopping:
            logger.warning("PeriodicTask %r is already running; start() ignored", self.name)
            return
        if previous is None:
            # No schedule is live: a run flagged as in progress was cut short by its loop's
            # closing, and stop() must not wait for it.
            self._in_run = None
        self._schedule_state = _Schedule()
        self._task = loop.create_task(
            self._schedule(self._schedule_state, previous), name=f"PeriodicTask:{self.name}"
        )

    async def _stop_on(
        self,
        owner: asyncio.AbstractEventLoop,
        timeout: float | timedelta | None,
        limit: float | None,
    ) -> None:
        """:meth:`stop` carried out on ``owner``, the schedule's loop (running in another
        thread), and awaited here. Ends too if that loop stops or closes meanwhile (its
        closing cancels the stop there: nothing is left to stop). The caller's cancellation
        cancels the stop there, which cancels the schedule, as on one loop."""
        handed: concurrent.futures.Future[None] = concurrent.futures.Future()
        there: list[asyncio.Task[None]] = []

        def begin() -> None:  # (made there, so a loop closing first leaves no coroutine)
            if handed.cancelled():
                return
            stopping = owner.create_task(self.stop(timeout))
            there.append(stopping)
            stopping.add_done_callback(functools.partial(_report_to, handed))

        try:
            owner.call_soon_threadsafe(begin)
        except RuntimeError:
            return  # closed meanwhile: nothing runs there any more
        waiter = asyncio.wrap_future(handed)
        # Shielded only when bounded, as on one loop.
        shield = shielded_if_cancelled() if limit is not None else contextlib.nullcontext()
        try:
            with shield:
                while not waiter.done():
                    await asyncio.wait({waiter}, timeout=_HANDOVER_POLL)
                    if not waiter.done() and (owner.is_closed() or not owner.is_running()):
                        handed.cancel()
                        return
        except asyncio.CancelledError:
            if there:
                with contextlib.suppress(RuntimeError):
                    owner.call_soon_threadsafe(there[0].cancel)
            else:
                handed.cancel()
            raise
        if not waiter.cancelled():
            waiter.result()

    async def stop(self, timeout: float | timedelta | None = 5.0) -> None:
        """Stop the schedule and return when it has ended (the PrismQ guide's verb;
        :meth:`aclose` is this with the default ``timeout``).

        No new run starts after this is called. A run in progress is allowed ``timeout`` seconds
        to finish (``None``: wait as long as it takes), then it is cancelled. A plain function
        running in a worker thread cannot be interrupted: on timeout we stop waiting for it and
        it finishes in its thread, its result discarded (``stats.run_in_progress`` stays True
        until it has; a new :meth:`start` waits for it before its first run). Stopping a task
        that is not running does nothing. A run may call ``await task.stop()`` itself (also
        from a task it started, or a thread that carries its context, as ``asyncio.to_thread``
        does): it returns at once and the schedule ends when that run returns. (From a plain
        ``threading.Thread`` the run is not recognised: that stop waits for the run, up to
        ``timeout``.)

        If ``stop()`` itself is cancelled, the schedule is cancelled too and the cancellation
        propagates. Called inside an anyio scope that is already cancelled (a ``finally`` block
        after ``move_on_after``) with a ``timeout``, it runs in full, shielded from that scope
        (for at most about ``timeout`` seconds); with ``timeout=None`` that would be unbounded,
        so there it is a cancelled stop. Awaited on another event loop than the schedule's (a
        thread of the host's), the stop is carried out on the schedule's loop and awaited here.

        Raises:
            InvalidTimeoutError: ``timeout`` is negative or not a number.
        """
        limit = timeout_seconds(timeout)
        task = self._task
        if task is None or not _alive(task):
            return
        owner = task.get_loop()
        if owner is not asyncio.get_running_loop():
            # The schedule runs on another loop (another thread's): its task can be cancelled
            # and waited for only there; from here its end would never wake this loop.
            self._schedule_state.stopping = True
            if owner.is_running():
                await self._stop_on(owner, timeout, limit)
            # (A loop not running starts no run: the flag ends the schedule when it resumes.)
            return
        self._schedule_state.stopping = True
        mark = _current_run.get()
        if asyncio.current_task() is task or (
            mark is not None and mark.owner is self and mark.active
        ):
            # Called from inside a run (or from something it waits on): waiting for the run
            # would deadlock. The flag ends the schedule as soon as this run returns.
            return
        # Shielded only when bounded: a scope held up for as long as a run takes could hang.
        shield = shielded_if_cancelled() if limit is not None else contextlib.nullcontext()
        try:
            with shield:
                if self._in_run is not None:
                    await asyncio.wait({task}, timeout=limit)
                if not task.done():
                    if self._in_run is not None:
                        logger.warning(
                            "PeriodicTask %r: run still going after %s s; cancelling it",
                            self.name,
                            limit,
                        )
                    task.cancel()
                    await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        # Retrieve the outcome so asyncio never reports "exception was never retrieved".
        if not task.cancelled() and task.exception() is not None:
            logger.error(
                "PeriodicTask %r ended with an unexpected error",
                self.name,
                exc_info=task.exception(),
            )

    async def aclose(self) -> None:
        """:meth:`stop` with the default timeout; what leaving ``async with`` does. Idempotent.

        Like :meth:`stop` it leaves no closed state: the task may be started again.
        """
        await self.stop()

    async def __aenter__(self) -> Self:
        """Start the schedule (see :meth:`start`) and return the task; leaving the block calls
        :meth:`aclose`."""
        self.start()
        return self

    def _now(self) -> float:
        if self._clock is not None:
            return self._clock()
        return asyncio.get_running_loop().time()

    async def _schedule(self, state: _Schedule, previous: asyncio.Task[None] | None) -> None:
        try:
            await self._ticks(state, previous)
        except Exception as exc:
            # Not a run's (those are counted and logged by _run_once): the host's clock or
            # sleep raised. Logged here, so the task ends without an unretrieved error.
            logger.error(
                "PeriodicTask %r: the schedule ended with an unexpected error",
                self.name,
                exc_info=exc,
            )

    async def _ticks(self, state: _Schedule, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            # Restarted while a stop() waits for the previous schedule's run: begin after it.
            try:
                await asyncio.wait({previous})
            except asyncio.CancelledError:
                # This stop() gave up waiting: the old run goes too, and this schedule ends
                # only once it has (its clean-up may await): a start() after the stop() must
                # not find the old run still going (runs never overlap).
                previous.cancel()
                while not previous.done():
                    # Given up on again (the stop() itself cancelled): still not before the
                    # old run ended, and without cancelling it again, which would cut its
                    # clean-up short.
                    with contextlib.suppress(asyncio.CancelledError):
                        await asyncio.wait({previous})
                raise
        interval = self._interval
        origin = self._now()
        tick = 0 if self._run_immediately else 1
        while not state.stopping:
            due = origin + tick * interval
            offset = _jitter_random.uniform(0.0, self._jitter) if self._jitter else 0.0
            self._next_run = due + offset
            delay = self._next_run - self._now()
            if delay > 0:
                await self._sleep(delay)
            else:
                # Overdue (the last run overran, or the interval is shorter than a turn of the
                # loop): without this an async run slower than the interval would hold the loop
                # for ever, run after run, and nothing else (stop() included) would ever run.
                await asyncio.sleep(0)
            # A plain run a timed-out stop() left going in its thread: runs never overlap (the
            # ticks due meanwhile are coalesced below). Its thread may outlive the loop it was
            # started from, so its end is looked for rather than awaited.
            while self._thread_running():  # noqa: ASYNC110
                await asyncio.sleep(_ABANDONED_POLL)
            if state.stopping:
                return
            # Coalesce: jump to the latest tick already due, counting the ones jumped over.
            latest_due = math.floor((self._now() - origin) / interval)
            if latest_due > tick:
                self._skipped += latest_due - tick
                tick = latest_due
            self._last_scheduled = origin + tick * interval
            self._next_run = origin + (tick + 1) * interval
            if not await self._run_once():
                return
            tick += 1

    def _record_end(self, started: float) -> None:
        self._runs += 1
        self._last_duration = self._now() - started

    async def _run_once(self) -> bool:
        """Run the function once; return False when the schedule must give up."""
        mark = _RunMark(self)
        self._in_run = mark
        started = self._now()
        failure: BaseException | None = None
        in_thread = False
        context_token = _current_run.set(mark)
        me = asyncio.current_task()
        try:
            if self._is_async:
                result = self._func(*self._args, **self._kwargs)
            else:
                in_thread = True
                done = self._thread_done = threading.Event()
                result = await call_in_daemon_thread(
                    _call_then_set,
                    (done, self._func, self._args, self._kwargs),
                    {},
                    f"PeriodicTask:{self.name}",
                )
                in_thread = False
            # A plain callable may hand back an awaitable (a lambda returning a coroutine, say):
            # await it on the loop rather than drop it un-awaited.
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError as exc:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the schedule itself was cancelled (stop() timed out, or its owner)
            failure = exc  # escaped from something the run awaited; nobody cancelled us
        except KeyboardInterrupt as exc:
            if not in_thread:
                raise  # a real interrupt on the loop's thread ends the host, as anywhere
            failure = exc
        except GeneratorExit as exc:
            if _current_task_or_none() is not me:
                # Not the run's: its coroutine is being closed (the task, abandoned on a
                # closed loop, is collected); nothing may be awaited any more.
                raise
            failure = exc
        except BaseException as exc:  # SystemExit, a host's own BaseException
            failure = exc
        finally:
            # A cancelled run (stop() timed out) is not counted as a run.
            if self._in_run is mark:
                self._in_run = None
            mark.active = False
            # ValueError: a run cut short by its loop's closing is finished here when its
            # coroutine is collected, outside the task's context (the mark is then moot).
            with contextlib.suppress(ValueError):
                _current_run.reset(context_token)
        self._record_end(started)
        if failure is None:
            self._consecutive_failures = 0
        else:
            self._failures += 1
            self._consecutive_failures += 1
            self._last_error = failure
            logger.error(
                "PeriodicTask %r: run failed (%d in a row)%s",
                self.name,
                self._consecutive_failures,
                _FAILURE_NOTES.get(type(failure), ""),
                exc_info=failure,
            )
        if self._max_failures is not None and self._consecutive_failures >= self._max_failures:
            logger.error(
                "PeriodicTask %r: %d consecutive failures; stopping the schedule",
                self.name,
                self._consecutive_failures,
            )
            return False
        return True


_FAILURE_NOTES: dict[type[BaseException], str] = {
    asyncio.CancelledError: (
        ": a CancelledError escaped the run although the schedule was not cancelled"
    ),
    SystemExit: ": SystemExit raised by the run is a failure; it does not end the host",
    KeyboardInterrupt: ": KeyboardInterrupt raised by a plain function is a failure",
    GeneratorExit: ": GeneratorExit raised by the run is a failure; it does not end the schedule",
}
