"""MemoryMonitor: watch system memory and notify when it crosses a threshold (with hysteresis)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import timedelta
from typing import Protocol, Self

from .._core._closing import AsyncResource, join_stopped_task
from .._core._durations import interval_seconds
from .._core._exceptions import InvalidIntervalError, InvalidLimitError, InvalidTaskError
from .._core._maybe_async import call_callback
from ._readings import PsutilResourceReader, ResourceReader, ResourceSnapshot, check_percent

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
    only when it falls to ``max_memory_percent - hysteresis`` or below, so a reading hovering
    around the threshold does not flap. ``on_high`` / ``on_low`` (sync or async; exceptions are
    logged and swallowed) are called with the reading on each such transition, by
    :meth:`monitor_continuously`. The monitor starts *low*: a first reading above the limit
    fires ``on_high``.

    ``async with MemoryMonitor(...) as monitor:`` monitors in a task of its own for the duration
    of the block; :meth:`aclose` (what leaving the block does) stops it.

    The PrismQ guide's spelling works unchanged: ``MemoryMonitor(max_memory_percent=80.0,
    check_interval=5.0)``, ``check_memory()``, ``await monitor_continuously()`` (as a task) and
    ``stop_monitoring()``. One monitor may be used in several ``asyncio.run()`` calls in turn.

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
        reader: returns a :class:`ResourceSnapshot`; defaults to psutil (without CPU).

    Raises:
        InvalidLimitError: a percentage or the hysteresis is out of range.
        InvalidIntervalError: ``check_interval`` is not a finite duration of at least
            :data:`MIN_CHECK_INTERVAL`.
        InvalidTaskError: ``on_high`` or ``on_low`` is given and not callable.
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
        self.hysteresis = float(hysteresis)
        self._on_high = on_high
        self._on_low = on_low
        self._reader: ResourceReader = reader or PsutilResourceReader(measure_cpu=False)
        self._latest: ResourceSnapshot | None = None
        self._is_high = False
        self._monitoring = False
        # Made by each monitor_continuously() call: an asyncio.Event belongs to the loop that
        # first waits on it, and a monitor may be used under several asyncio.run() calls.
        self._stop: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None

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
        return self._monitoring

    def check_memory(self) -> bool:
        """Take a reading now; True when memory use is under ``max_memory_percent``.

        Updates :attr:`latest` but neither the hysteresis state nor the callbacks (those belong to
        the monitoring loop). The default reader blocks briefly (it lists this process's
        children); from async code prefer ``await check_memory_async()``.
        """
        snapshot = self._reader()
        self._latest = snapshot
        return snapshot.memory_percent < self.max_memory_percent

    async def check_memory_async(self) -> bool:
        """Like :meth:`check_memory`, with the reading taken in a worker thread.

        Cancelling abandons the wait; the (short) reading completes in its thread and is dropped.
        """
        snapshot = await asyncio.to_thread(self._reader)
        self._latest = snapshot
        return snapshot.memory_percent < self.max_memory_percent

    async def poll(self) -> ResourceSnapshot:
        """Take one reading (in a worker thread), update the state and fire a transition callback.

        This is one step of :meth:`monitor_continuously`, public so hosts can drive it from their
        own scheduler (e.g. a ``PeriodicTask``). Reader errors propagate; callback errors are
        logged. Cancelling stops the step; a callback already running is cancelled with it.
        """
        snapshot = await asyncio.to_thread(self._reader)
        self._latest = snapshot
        percent = snapshot.memory_percent
        if not self._is_high and percent >= self.max_memory_percent:
            self._is_high = True
            logger.warning(
                "memory use %.1f%% reached the %.1f%% limit", percent, self.max_memory_percent
            )
            if self._on_high is not None:
                await call_callback(self._on_high, snapshot, logger=logger, what="on_high")
        elif self._is_high and percent <= self.max_memory_percent - self.hysteresis:
            self._is_high = False
            logger.info("memory use %.1f%% is back under the limit", percent)
            if self._on_low is not None:
                await call_callback(self._on_low, snapshot, logger=logger, what="on_low")
        return snapshot

    async def monitor_continuously(self) -> None:
        """Poll every ``check_interval`` seconds until :meth:`stop_monitoring` is called.

        Run it as a task (``asyncio.create_task(monitor.monitor_continuously())``). A failing
        reading is logged and the loop goes on. Calling it while it already runs logs a warning and
        returns at once. Cancelling the task ends the loop (the usual way to stop it on shutdown
        besides ``stop_monitoring``).

        Cancellation: a reading or async callback in progress is cancelled with it; so is one
        in progress when :meth:`stop_monitoring` is called, so a callback that hangs never keeps
        this running.
        """
        if self._monitoring:
            logger.warning("MemoryMonitor is already monitoring; second call ignored")
            return
        stop = asyncio.Event()
        self._stop = stop
        self._monitoring = True
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
            self._monitoring = False
            if self._stop is stop:
                self._stop = None

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
        ``monitor_continuously`` call). Must be called from the event loop's thread.
        """
        if self._stop is not None:
            self._stop.set()

    async def __aenter__(self) -> Self:
        """Run :meth:`monitor_continuously` in a task owned by the monitor; leaving the block
        calls :meth:`aclose`."""
        if self._task is None or self._task.done():
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self.monitor_continuously(), name="MemoryMonitor")
        return self

    async def aclose(self) -> None:
        """Stop monitoring (:meth:`stop_monitoring`) and, for the task ``async with`` started,
        wait until it has returned. Idempotent; monitoring may be started again. A loop running
        in a task of the caller's is asked to stop; the caller awaits that task.

        Cancellation: the monitoring task is cancelled too.
        """
        task, self._task = self._task, None
        if task is not None and not self._monitoring:
            # Not started yet: it would clear the stop request on entry, so cancel it instead
            # (none of its code has run).
            task.cancel()
        self.stop_monitoring()
        if task is not None:
            await join_stopped_task(task, logger, "memory monitoring")
