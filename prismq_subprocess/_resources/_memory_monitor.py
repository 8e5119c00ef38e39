"""MemoryMonitor: watch system memory and notify when it crosses a threshold (with hysteresis)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from datetime import timedelta
from typing import Protocol, Self

from .._core._closing import AsyncResource, join_stopped_task
from .._core._durations import interval_seconds
from .._core._exceptions import InvalidLimitError
from .._core._maybe_async import call_callback
from ._readings import (
    PsutilResourceReader,
    ResourceReader,
    ResourceSnapshot,
    check_percent,
)

__all__ = ["MemoryCallback", "MemoryMonitor"]

logger = logging.getLogger(__name__)

class MemoryCallback(Protocol):
    """An ``on_high`` / ``on_low`` callback of a :class:`MemoryMonitor`: called with the reading
    that caused the transition. A plain function or an ``async def`` (then awaited)."""

    def __call__(self, snapshot: ResourceSnapshot, /) -> Awaitable[object] | object: ...


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

    Args:
        max_memory_percent: the threshold, in (0, 100].
        check_interval: seconds (or ``timedelta``) between readings in ``monitor_continuously``.
        on_high, on_low: transition callbacks; sync ones run on the event loop, keep them quick.
        hysteresis: width of the band below the threshold, in percentage points (>= 0, and less
            than ``max_memory_percent``).
        reader: returns a :class:`ResourceSnapshot`; defaults to psutil (without CPU).

    Raises:
        InvalidLimitError: a percentage or the hysteresis is out of range.
        InvalidIntervalError: ``check_interval`` is not a positive, finite duration.
    """

    def __init__(
        self,
        max_memory_percent: float = 80.0,
        check_interval: float | timedelta = 5.0,
        *,
        on_high: MemoryCallback | None = None,
        on_low: MemoryCallback | None = None,
        hysteresis: float = 5.0,
        reader: ResourceReader | None = None,
    ) -> None:
        self.max_memory_percent = check_percent(max_memory_percent, "max_memory_percent")
        self.check_interval = interval_seconds(check_interval, what="check_interval")
        if (
            isinstance(hysteresis, bool)
            or not isinstance(hysteresis, int | float)
            or not 0 <= hysteresis < self.max_memory_percent
        ):
            raise InvalidLimitError(
                f"hysteresis must be >= 0 and below max_memory_percent, got {hysteresis!r}"
            )
        self.hysteresis = float(hysteresis)
        self._on_high = on_high
        self._on_low = on_low
        self._reader: ResourceReader = reader or PsutilResourceReader(measure_cpu=False)
        self._latest: ResourceSnapshot | None = None
        self._is_high = False
        self._monitoring = False
        self._stop = asyncio.Event()
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
        """
        if self._monitoring:
            logger.warning("MemoryMonitor is already monitoring; second call ignored")
            return
        self._monitoring = True
        self._stop.clear()
        try:
            while not self._stop.is_set():
                try:
                    await self.poll()
                except Exception:
                    logger.exception("memory reading failed")
                try:
                    async with asyncio.timeout(self.check_interval):
                        await self._stop.wait()
                except TimeoutError:
                    pass
        finally:
            self._monitoring = False

    def stop_monitoring(self) -> None:
        """Ask :meth:`monitor_continuously` to return; it does so without waiting out its interval.
        The PrismQ guide's synchronous spelling; ``await aclose()`` also waits for the end.

        Safe to call when not monitoring (it does nothing then: it does not pre-empt a later
        ``monitor_continuously`` call). Must be called from the event loop's thread.
        """
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
