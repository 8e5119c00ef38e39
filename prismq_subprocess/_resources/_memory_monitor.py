"""MemoryMonitor: watch system memory and notify when it crosses a threshold (with hysteresis)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import weakref
from collections.abc import Awaitable, Coroutine
from datetime import timedelta
from typing import Any, Protocol, Self

from .._core._closing import AsyncResource, join_stopped_task
from .._core._durations import interval_seconds
from .._core._event_loop import running_asyncio_loop
from .._core._exceptions import InvalidIntervalError, InvalidLimitError, InvalidTaskError
from .._core._maybe_async import call_callback, generator_function_kind
from .._platform import start_afresh_after_fork
from ._readings import (
    PsutilResourceReader,
    ResourceReader,
    ResourceSnapshot,
    check_percent,
    check_reader,
    checked_reader,
    read_in_thread,
)

__all__ = ["MIN_CHECK_INTERVAL", "MemoryCallback", "MemoryMonitor"]

logger = logging.getLogger(__name__)


class MemoryCallback(Protocol):
    """An ``on_high`` / ``on_low`` callback of a :class:`MemoryMonitor`: called with the reading
    that caused the transition. A plain function or an ``async def`` (then awaited)."""

    def __call__(self, snapshot: ResourceSnapshot, /) -> Awaitable[object] | object: ...


#: The shortest ``check_interval`` accepted, in seconds. A psutil reading lists this process's
#: children: 1-4 ms of CPU each (measured on a loaded 2-core machine), so polling 10 times a
#: second already costs up to 4 % of a core, and memory moves on a scale of seconds anyway.
MIN_CHECK_INTERVAL = 0.1

#: The hysteresis used when none is given: 5 percentage points, or half the threshold when the
#: threshold is 10 % or less (so a low threshold works without choosing a hysteresis).
DEFAULT_HYSTERESIS = 5.0


class MemoryMonitor(AsyncResource):
    """Watch system memory use against ``max_memory_percent``.

    The monitor is *high* once memory use reaches ``max_memory_percent`` and becomes *low* again
    only when it falls to ``max_memory_percent - hysteresis`` or below (with a hysteresis of 0:
    below the limit), so a reading hovering around the threshold does not flap. ``on_high`` /
    ``on_low`` (sync or async; exceptions are logged and swallowed) are called with the reading
    on each such transition, by :meth:`monitor_continuously`. The monitor starts *low*: a first
    reading above the limit fires ``on_high``.

    ``async with MemoryMonitor(...) as monitor:`` monitors in a task of its own for the duration
    of the block; :meth:`aclose` (what leaving the block does) stops it.

    The PrismQ guide's spelling works unchanged: ``MemoryMonitor(max_memory_percent=80.0,
    check_interval=5.0)``, ``check_memory()``, ``await monitor_continuously()`` (as a task) and
    ``stop_monitoring()``. One monitor may be used in several ``asyncio.run()`` calls in turn,
    and in a child forked from the host.

    Args:
        max_memory_percent: the threshold, in (0, 100].
        check_interval: seconds (or ``timedelta``) between readings in ``monitor_continuously``;
            at least :data:`MIN_CHECK_INTERVAL` (0.1 s).
        on_high, on_low: transition callbacks. Async ones are cancelled when monitoring stops, so
            one that hangs does not keep :meth:`monitor_continuously` running; sync ones run on
            the event loop and block it while they run, so keep them quick.
        hysteresis: width of the band below the threshold, in percentage points (>= 0, and less
            than ``max_memory_percent``); ``None``: 5, or half the threshold when that is
            smaller.
        reader: returns a :class:`ResourceSnapshot`; defaults to psutil (without CPU; the
            synchronous :meth:`check_memory` then leaves out the children's RSS).

    Raises:
        InvalidLimitError: a percentage or the hysteresis is out of range.
        InvalidIntervalError: ``check_interval`` is not a finite duration of at least
            :data:`MIN_CHECK_INTERVAL`.
        InvalidTaskError: ``on_high``, ``on_low`` or ``reader`` is given and not callable.
    """

    def __init__(
        self,
        max_memory_percent: float = 80.0,
        check_interval: float | timedelta = 5.0,
        *,
        on_high: MemoryCallback | None = None,
        on_low: MemoryCallback | None = None,
        hysteresis: float | None = None,
        reader: ResourceReader | None = None,
    ) -> None:
        self.max_memory_percent = check_percent(max_memory_percent, "max_memory_percent")
        self.check_interval = interval_seconds(check_interval, what="check_interval")
        if self.check_interval < MIN_CHECK_INTERVAL:
            raise InvalidIntervalError(
                f"check_interval must be at least {MIN_CHECK_INTERVAL} s, got {check_interval!r}"
            )
        if hysteresis is None:
            hysteresis = min(DEFAULT_HYSTERESIS, self.max_memory_percent / 2)
        if (
            isinstance(hysteresis, bool)
            or not isinstance(hysteresis, int | float)
            or not 0 <= hysteresis < self.max_memory_percent
        ):
            raise InvalidLimitError(
                f"hysteresis ({hysteresis!r}) must be >= 0 and below max_memory_percent "
                f"({self.max_memory_percent!r}): memory is low again at max_memory_percent - "
                "hysteresis"
            )
        for name, callback in (("on_high", on_high), ("on_low", on_low)):
            if callback is not None and not callable(callback):
                raise InvalidTaskError(f"{name} must be callable or None, got {callback!r}")
            kind = generator_function_kind(callback)
            if kind is not None:  # (its body would never run)
                raise InvalidTaskError(
                    f"{name} must be a function or coroutine function, not a {kind} function: "
                    f"{callback!r}"
                )
        check_reader(reader)
        self.hysteresis = float(hysteresis)
        self._on_high = on_high
        self._on_low = on_low
        self._reader: ResourceReader
        self._quick_reader: ResourceReader
        if reader is None:
            self._reader = PsutilResourceReader(measure_cpu=False)
            # For check_memory(), which runs on the caller's thread, usually the event loop's:
            # summing the children's RSS lists every process (185 ms with 1000 children), for a
            # figure the decision does not use.
            self._quick_reader = PsutilResourceReader(measure_cpu=False, include_children=False)
        else:
            self._reader = self._quick_reader = checked_reader(reader)
        self._latest: ResourceSnapshot | None = None
        self._is_high = False
        # The stop request of the monitoring loop that is polling, None when none is: a loop's
        # clean-up clears only its own (a coroutine left pending in a closed event loop runs its
        # clean-up whenever a garbage collection finalises it, maybe inside a later loop's run).
        self._monitoring: asyncio.Event | None = None
        # Made for each monitoring loop (an asyncio.Event belongs to the loop that first waits
        # on it, and a monitor may be used under several asyncio.run() calls): the current
        # loop's stop request and the event loop it runs on (stop_monitoring() may come from
        # another thread), and the event set when that monitoring loop has ended (a restart
        # waits for it: one monitoring loop at a time).
        self._stop: asyncio.Event | None = None
        self._stop_loop: asyncio.AbstractEventLoop | None = None
        self._ended: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        # One per monitor_continuously() call made and not started yet: a stop that comes
        # before the call's first step (a task created, then a fast shutdown) must still stop
        # it. Weak: a call never awaited holds nothing up. Guarded: stop_monitoring() may come
        # from another thread.
        self._unstarted: weakref.WeakSet[_Call] = weakref.WeakSet()
        self._unstarted_lock = threading.Lock()
        start_afresh_after_fork(self)

    def _forked(self) -> None:
        # A forked child has none of the parent's event loop or tasks: copied, they read as
        # "already monitoring", and the child could never monitor in a loop of its own.
        self._monitoring = None
        self._stop = self._stop_loop = self._ended = None
        self._task = None
        self._unstarted = weakref.WeakSet()
        self._unstarted_lock = threading.Lock()

    @property
    def latest(self) -> ResourceSnapshot | None:
        """The most recent reading (from any method), or ``None`` before the first."""
        return self._latest

    @property
    def is_high(self) -> bool:
        """Hysteresis state: True from crossing the threshold until falling below the band."""
        return self._is_high

    @property
    def is_monitoring(self) -> bool:
        """True while :meth:`monitor_continuously` is running."""
        return self._monitoring is not None

    def check_memory(self) -> bool:
        """Take a reading now; True when memory use is under ``max_memory_percent``.

        Updates :attr:`latest` but neither the hysteresis state nor the callbacks (those belong to
        the monitoring loop). It blocks while it reads; with the default reader that is system
        memory and this process only (well under a millisecond), so ``latest.children_rss_bytes``
        is 0 after it: :meth:`check_memory_async` and :meth:`poll` read the whole tree, in a
        worker thread.
        """
        snapshot = self._quick_reader()
        self._latest = snapshot
        return snapshot.memory_percent < self.max_memory_percent

    async def check_memory_async(self) -> bool:
        """Like :meth:`check_memory`, with the reading taken in a worker thread.

        Cancelling abandons the wait; the (short) reading completes in its thread and is dropped.
        """
        snapshot = await read_in_thread(self._reader)
        self._latest = snapshot
        return snapshot.memory_percent < self.max_memory_percent

    async def poll(self) -> ResourceSnapshot:
        """Take one reading (in a worker thread), update the state and fire a transition callback.

        This is one step of :meth:`monitor_continuously`, public so hosts can drive it from their
        own scheduler (e.g. a ``PeriodicTask``). Reader errors propagate; callback errors are
        logged. Cancelling stops the step; a callback already running is cancelled with it.
        """
        snapshot = await read_in_thread(self._reader)
        self._latest = snapshot
        percent = snapshot.memory_percent
        if not self._is_high and percent >= self.max_memory_percent:
            self._is_high = True
            logger.warning(
                "memory use %.1f%% reached the %.1f%% limit", percent, self.max_memory_percent
            )
            if self._on_high is not None:
                await call_callback(self._on_high, snapshot, logger=logger, what="on_high")
        elif self._is_high and (
            percent <= self.max_memory_percent - self.hysteresis
            if self.hysteresis
            # Without hysteresis, low is below the limit: a reading that stays at the limit
            # flipped high and low at every poll.
            else percent < self.max_memory_percent
        ):
            self._is_high = False
            logger.info("memory use %.1f%% is back under the limit", percent)
            if self._on_low is not None:
                await call_callback(self._on_low, snapshot, logger=logger, what="on_low")
        return snapshot

    def monitor_continuously(self) -> Coroutine[Any, Any, None]:
        """Poll every ``check_interval`` seconds until :meth:`stop_monitoring` is called.

        Run it as a task (``asyncio.create_task(monitor.monitor_continuously())``). A failing
        reading is logged and the loop goes on. Calling it while it already runs logs a warning and
        returns at once; called after :meth:`stop_monitoring` while the stopped loop is still
        ending (cancelling its reading), it starts once that one has ended. Cancelling the task
        ends the loop (the usual way to stop it on shutdown besides ``stop_monitoring``). A stop
        that comes after this call but before its task first ran ends it too (it returns at
        its first step).

        Cancellation: a reading or async callback in progress is cancelled with it; so is one
        in progress when :meth:`stop_monitoring` is called, so a callback that hangs never keeps
        this running.

        Raises:
            NoRunningLoopError: awaited outside asyncio (trio).
        """
        # A plain function returning the coroutine: the call itself is recorded, so that a stop
        # before the coroutine's first step is not lost.
        call = _Call()
        with self._unstarted_lock:
            self._unstarted.add(call)
        return self._monitor_continuously(call)

    async def _monitor_continuously(self, call: _Call) -> None:
        with self._unstarted_lock:
            self._unstarted.discard(call)
        running_asyncio_loop()
        if call.stopped:
            return
        claim = self._claim()
        if claim is None:
            logger.warning("MemoryMonitor is already monitoring; second call ignored")
            return
        await self._monitor(*claim)

    def _claim(self) -> tuple[asyncio.Event, asyncio.Event, asyncio.Event | None] | None:
        """Register a new monitoring loop on the running event loop: its stop request, its end
        and the end of a stopped loop still ending (to wait for). None if one is active."""
        loop = asyncio.get_running_loop()
        current, previous = self._stop, self._ended
        old_loop = self._stop_loop
        if old_loop is not None and old_loop is not loop and old_loop.is_closed():
            # Left behind by an event loop closed with the monitoring task still pending.
            current = previous = None
        if current is not None and not current.is_set():
            return None
        stop, ended = asyncio.Event(), asyncio.Event()
        self._stop, self._stop_loop, self._ended = stop, loop, ended
        return stop, ended, previous

    async def _monitor(
        self, stop: asyncio.Event, ended: asyncio.Event, previous: asyncio.Event | None
    ) -> None:
        try:
            if previous is not None:
                await previous.wait()
            if stop.is_set():
                return
            self._monitoring = stop
            try:
                while not stop.is_set():
                    await self._poll_unless_stopped(stop)
                    if stop.is_set():
                        break
                    try:
                        async with asyncio.timeout(self.check_interval):
                            await stop.wait()
                    except TimeoutError:
                        pass
            finally:
                if self._monitoring is stop:
                    self._monitoring = None
        finally:
            self._release(stop, ended)

    def _release(self, stop: asyncio.Event, ended: asyncio.Event) -> None:
        """A monitoring loop has ended: a restart waiting for it may begin. Idempotent."""
        ended.set()
        if self._stop is stop:
            self._stop = self._stop_loop = None
        if self._ended is ended:
            self._ended = None

    async def _poll_unless_stopped(self, stop: asyncio.Event) -> None:
        poll = asyncio.ensure_future(self.poll())
        stopped = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({poll, stopped}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped.cancel()
            if not poll.done():
                poll.cancel()
                await asyncio.wait({poll})
        if poll.cancelled():
            logger.warning("monitoring stopped during a reading or callback; it was cancelled")
        elif poll.exception() is not None:
            logger.error("memory reading failed", exc_info=poll.exception())

    def stop_monitoring(self) -> None:
        """Ask :meth:`monitor_continuously` to return; it does so without waiting out its
        interval, cancelling a reading or async callback in progress. The PrismQ guide's synchronous
        spelling; ``await aclose()`` also waits for the end.

        Safe to call when not monitoring (it does nothing then: it does not pre-empt a later
        ``monitor_continuously`` call), and from any thread (a synchronous FastAPI endpoint
        runs in a worker thread): the loop is woken at once either way.
        """
        with self._unstarted_lock:
            for call in self._unstarted:
                call.stopped = True
        stop, loop = self._stop, self._stop_loop
        if stop is None or loop is None:
            return
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            stop.set()
        else:
            # Event.set() from another thread does not wake the loop (monitoring went on for up
            # to check_interval) and is refused in debug mode.
            with contextlib.suppress(RuntimeError):  # that loop is closed: nothing to stop
                loop.call_soon_threadsafe(stop.set)

    async def __aenter__(self) -> Self:
        """Run :meth:`monitor_continuously` in a task owned by the monitor; leaving the block
        calls :meth:`aclose`.

        Raises:
            NoRunningLoopError: outside asyncio (trio).
        """
        loop = running_asyncio_loop()
        if self._task is None or self._task.done() or self._task.get_loop() is not loop:
            # Claimed here, not in the task: aclose() right after must find the stop request.
            claim = self._claim()
            if claim is None:
                logger.warning("MemoryMonitor is already monitoring; second call ignored")
            else:
                task = loop.create_task(self._monitor(*claim), name="MemoryMonitor")
                # A task cancelled before its first step never runs _monitor's cleanup.
                stop, ended, _ = claim
                task.add_done_callback(lambda _: self._release(stop, ended))
                self._task = task
        return self

    async def aclose(self) -> None:
        """Stop monitoring (:meth:`stop_monitoring`) and, for the task ``async with`` started,
        wait until it has returned. Idempotent; monitoring may be started again. A loop running
        in a task of the caller's is asked to stop; the caller awaits that task.

        Cancellation: the monitoring task is cancelled too. Called inside an anyio scope that
        is already cancelled (a ``finally`` block after ``move_on_after``), it runs in full,
        shielded from that scope (a reading in progress is cancelled, so that is short).
        """
        task, self._task = self._task, None
        self.stop_monitoring()
        # A task of another event loop (one closed while it ran) can't be awaited here.
        if task is not None and task.get_loop() is asyncio.get_running_loop():
            await join_stopped_task(task, logger, "memory monitoring")


class _Call:
    """A :meth:`MemoryMonitor.monitor_continuously` call not started yet, and whether a stop
    came meanwhile."""

    __slots__ = ("__weakref__", "stopped")

    def __init__(self) -> None:
        self.stopped = False
