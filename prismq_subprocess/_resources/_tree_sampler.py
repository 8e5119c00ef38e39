"""ProcessTreeSampler: per-run accounting of a child's whole process tree (peak RSS, CPU time).

The tree is sampled, so the figures are estimates: memory peaks shorter than the interval and
descendants that start and end between two samples are missed. A descendant seen at least once
keeps contributing its last CPU time after it exits, so the total does not drop when children end.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol, Self

import psutil

from .._core._closing import AsyncResource, join_stopped_task
from .._core._durations import interval_seconds
from .._core._exceptions import InvalidArgumentTypeError, InvalidIntervalError, InvalidTaskError
from .._core._maybe_async import call_callback
from .._core._validation import check_limit
from .._platform import start_afresh_after_fork
from ._readings import VANISHED

__all__ = ["MIN_SAMPLE_INTERVAL", "LimitCallback", "ProcessTreeSampler", "TreeSample"]

#: The shortest interval between samples: a sample of a tree takes a worker thread about a
#: millisecond, so anything shorter would keep a core busy sampling back to back.
MIN_SAMPLE_INTERVAL = 0.01

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class TreeSample:
    """One reading of a process tree.

    Attributes:
        rss_bytes: RSS summed over the root and its live descendants (shared pages count once per
            process, so this over-estimates trees that share memory).
        cpu_time_seconds: user + system CPU time of every process seen in the tree so far (the
            last known figure for those that ended).
        process_count: live processes read in this sample.
        timestamp: ``time.monotonic()`` when it was taken.
    """

    rss_bytes: int
    cpu_time_seconds: float
    process_count: int
    timestamp: float


class LimitCallback(Protocol):
    """The ``on_limit`` callback of a :class:`ProcessTreeSampler`: called once, with the first
    sample over ``memory_limit_bytes``. A plain function or an ``async def`` (then awaited)."""

    def __call__(self, sample: TreeSample, /) -> Awaitable[object] | object: ...


# A psutil process identity: (pid, create_time), so a reused pid is a new process.
_Ident = tuple[int, float]


def check_sample_interval(value: float | timedelta, what: str) -> float:
    """``value`` in seconds, refused unless finite and at least :data:`MIN_SAMPLE_INTERVAL`."""
    seconds = interval_seconds(value, what=what)
    if seconds < MIN_SAMPLE_INTERVAL:
        raise InvalidIntervalError(
            f"{what} must be at least {MIN_SAMPLE_INTERVAL} s (sampling a process tree takes "
            f"about a millisecond of a worker thread), got {value!r}"
        )
    return seconds


class ProcessTreeSampler(AsyncResource):
    """Sample the process tree rooted at ``pid`` every ``interval`` seconds.

    Records the peak RSS of the whole tree (sum over the root and all descendants) and its total
    CPU time. When ``memory_limit_bytes`` is set and a sample exceeds it, ``on_limit`` is called
    once with that sample (the sampler does not stop anything itself; the callback typically stops
    the tree and records the reason). Readings are taken in a worker thread; processes vanishing
    mid-read are skipped, and so are those that exited but were not waited for yet (zombies:
    their CPU time counts, they are not live). Sampling ends by itself when the root process is
    gone or a zombie.

    Use as ``async with ProcessTreeSampler(pid, ...) as sampler:`` or ``start()`` / ``await
    stop()``. The figures are readable at any time and stay after stopping.

    Args:
        pid: the root process (normally the child you spawned).
        interval: seconds (or ``timedelta``) between samples; at least
            :data:`MIN_SAMPLE_INTERVAL` (0.01 s).
        memory_limit_bytes: tree RSS above which ``on_limit`` fires; ``None``: no limit.
        on_limit: sync or async callable taking the :class:`TreeSample`; its exceptions are
            logged.

    Raises:
        InvalidIntervalError: ``interval`` is not a finite duration of at least
            :data:`MIN_SAMPLE_INTERVAL`.
        InvalidLimitError: ``memory_limit_bytes`` or ``pid`` is not a positive integer.
        InvalidArgumentTypeError: ``pid`` is not an int.
        InvalidTaskError: ``on_limit`` is given and not callable.
    """

    def __init__(
        self,
        pid: int,
        *,
        interval: float | timedelta = 0.5,
        memory_limit_bytes: int | None = None,
        on_limit: LimitCallback | None = None,
    ) -> None:
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise InvalidArgumentTypeError(f"pid must be an int, not {type(pid).__name__}")
        check_limit(pid, "pid", minimum=1)
        self.pid = pid
        self.interval = check_sample_interval(interval, "interval")
        if memory_limit_bytes is not None:
            check_limit(memory_limit_bytes, "memory_limit_bytes", minimum=1)
        if on_limit is not None and not callable(on_limit):
            raise InvalidTaskError(f"on_limit must be callable or None, got {on_limit!r}")
        self.memory_limit_bytes = memory_limit_bytes
        self._on_limit = on_limit
        self._root: psutil.Process | None = None
        # CPU seconds by process, for the processes that may still run; those known to have
        # ended are folded into _ended_cpu (a run that starts many short processes would
        # otherwise keep, and sum at every sample, one entry per process it ever had).
        self._cpu_by_ident: dict[_Ident, float] = {}
        self._ended_cpu = 0.0
        self._peak_rss = 0
        self._samples = 0
        self._last: TreeSample | None = None
        self._limit_sample: TreeSample | None = None
        # Made again by each start(): an asyncio primitive that was ever waited on belongs to
        # that loop, and a stopped sampler may be started again in another one.
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        start_afresh_after_fork(self)

    def _forked(self) -> None:
        # A forked child has none of the parent's event loop or tasks: a copied task reads as
        # running, so start() did nothing and stop() waited for it for ever.
        self._task = None
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()

    @property
    def peak_rss_bytes(self) -> int:
        """The highest tree RSS seen so far, in bytes (0 before the first sample)."""
        return self._peak_rss

    @property
    def cpu_time_seconds(self) -> float:
        """Total user + system CPU seconds of every process seen in the tree."""
        return self._ended_cpu + sum(self._cpu_by_ident.values())

    @property
    def samples(self) -> int:
        """Number of samples taken (including ones that found the root gone)."""
        return self._samples

    @property
    def last_sample(self) -> TreeSample | None:
        """The latest sample with the root alive, or ``None``."""
        return self._last

    @property
    def limit_exceeded(self) -> TreeSample | None:
        """The sample that exceeded ``memory_limit_bytes`` (``on_limit`` was called with it)."""
        return self._limit_sample

    @property
    def is_running(self) -> bool:
        """True while the sampling task is active."""
        return self._task is not None and not self._task.done()

    def _read(
        self, known: list[_Ident]
    ) -> tuple[int, int, dict[_Ident, float], list[_Ident]] | None:
        """Read the tree (blocking; runs in a worker thread): RSS, live count, CPU per process,
        and which of the ``known`` processes not in the tree now have ended.

        Returns None when the root is gone. Touches no shared state but the cached root handle,
        so the figures are only ever updated on the event loop.
        """
        try:
            if self._root is None:
                self._root = psutil.Process(self.pid)
            root = self._root
            if not root.is_running() or root.status() == psutil.STATUS_ZOMBIE:
                # A zombie has exited; only its parent's wait() is missing.
                return None
            procs = [root, *root.children(recursive=True)]
        except VANISHED:
            return None
        rss = 0
        alive = 0
        cpu: dict[_Ident, float] = {}
        for proc in procs:
            try:
                # oneshot() caches /proc reads so memory and CPU come from one pass.
                with proc.oneshot():
                    zombie = proc.status() == psutil.STATUS_ZOMBIE
                    mem = proc.memory_info().rss
                    times = proc.cpu_times()
                cpu[(proc.pid, proc.create_time())] = times.user + times.system
            except VANISHED:
                continue
            if zombie:
                continue
            rss += mem
            alive += 1
        # Not in the tree any more: ended, or left it (re-parented by a parent that exited).
        # Only a pid that no longer exists is surely ended; it can never be read again, so its
        # CPU time is final. (One that left the tree is kept, as it was before.)
        ended = [ident for ident in known if ident not in cpu and not psutil.pid_exists(ident[0])]
        return rss, alive, cpu, ended

    async def sample(self) -> TreeSample | None:
        """Take one sample now (in a worker thread) and update the figures.

        Returns ``None`` when the root process is gone. May fire ``on_limit`` (awaited here).
        Cancelling abandons the wait; the reading finishes in its thread and is dropped.
        """
        async with self._lock:
            reading = await asyncio.to_thread(self._read, list(self._cpu_by_ident))
            self._samples += 1
            if reading is None:
                return None
            rss, alive, cpu, ended = reading
            by_ident = self._cpu_by_ident
            by_ident.update(cpu)
            for ident in ended:
                self._ended_cpu += by_ident.pop(ident, 0.0)
            sample = TreeSample(rss, self.cpu_time_seconds, alive, time.monotonic())
            self._last = sample
            self._peak_rss = max(self._peak_rss, rss)
            limit = self.memory_limit_bytes
            fire = limit is not None and rss > limit and self._limit_sample is None
            if fire:
                self._limit_sample = sample
        if fire:
            logger.warning(
                "process tree of pid %d uses %d bytes, over its %s-byte limit",
                self.pid,
                rss,
                limit,
            )
            if self._on_limit is not None:
                await call_callback(self._on_limit, sample, logger=logger, what="on_limit")
        return sample

    async def _loop(self, stop: asyncio.Event, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            # Stopped and finishing its sample: one sampling task at a time.
            await asyncio.wait({previous})
        while not stop.is_set():
            try:
                if await self.sample() is None:
                    return
            except Exception:
                logger.exception("sampling the process tree of pid %d failed", self.pid)
            try:
                async with asyncio.timeout(self.interval):
                    await stop.wait()
            except TimeoutError:
                pass

    def start(self) -> None:
        """Start sampling in a task on the running loop (first sample at once).

        Idempotent: a second call while running does nothing. Called while a :meth:`stop` is
        under way, it samples again once the stopping task has ended.

        Raises:
            RuntimeError: no event loop is running in this thread.
        """
        loop = asyncio.get_running_loop()
        previous = self._task
        if previous is not None and (previous.done() or previous.get_loop() is not loop):
            previous = None  # ended, or left behind by an event loop that is gone
        if previous is not None and not self._stop.is_set():
            return
        if previous is None:
            self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._task = loop.create_task(
            self._loop(self._stop, previous), name=f"ProcessTreeSampler:{self.pid}"
        )

    async def stop(self) -> None:
        """Stop sampling and return when the sampling task has ended.

        A sample in progress is allowed to finish, so this returns within about one reading
        (plus an ``on_limit`` callback that is running). If ``stop()`` is cancelled, the
        sampling task is cancelled too. Called inside an anyio scope that is already cancelled
        (a ``finally`` block after ``move_on_after``), it runs in full, shielded from that
        scope, for at most a few seconds (then the task is cancelled). A sampling task left by
        an event loop closed while it ran is forgotten.
        """
        task = self._task
        if task is None:
            return
        if task.get_loop() is not asyncio.get_running_loop():
            # Left by an event loop that is gone (closed with the task pending): nothing runs
            # it any more, its stop event belongs to that loop, and it can't be awaited here.
            self._task = None
            return
        self._stop.set()
        await join_stopped_task(task, logger, "process tree sampler")

    async def aclose(self) -> None:
        """Alias of :meth:`stop`; what leaving ``async with`` does. Idempotent; the sampler may
        be started again."""
        await self.stop()

    async def __aenter__(self) -> Self:
        """Start sampling (see :meth:`start`); leaving the block calls :meth:`aclose`."""
        self.start()
        return self
