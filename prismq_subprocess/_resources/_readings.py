"""Reading system memory, CPU and process-tree RSS through psutil, tolerant of vanishing processes.

Readers are plain callables returning a :class:`ResourceSnapshot`, so tests (and hosts with their
own metrics) can inject readings. The psutil reader blocks briefly (it reads ``/proc`` and may
list every process to find children), so async callers run readers in a thread
(:func:`read_in_thread`).
"""

from __future__ import annotations

import inspect
import math
import numbers
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, cast

import psutil

from .._core._daemon_thread import call_in_daemon_thread
from .._core._durations import finite
from .._core._exceptions import (
    InvalidIntervalError,
    InvalidLimitError,
    InvalidReadingError,
    InvalidTaskError,
)
from .._platform import start_afresh_after_fork

__all__ = [
    "PsutilResourceReader",
    "ResourceReader",
    "ResourceSnapshot",
    "check_percent",
    "check_reader",
    "check_snapshot",
    "checked_reader",
    "read_in_thread",
    "tree_rss_bytes",
]


def check_percent(value: object, what: str) -> float:
    """Return ``value`` as a float; raise :class:`InvalidLimitError` unless it is in (0, 100]."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not finite(value)
        or not 0 < value <= 100
    ):
        raise InvalidLimitError(f"{what} must be a percentage in (0, 100], got {value!r}")
    return float(value)


#: The psutil errors meaning "this process is gone or not ours to read": skip it.
VANISHED = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


@dataclass(frozen=True, slots=True)
class ResourceSnapshot:
    """One reading of the machine and of this process tree.

    Attributes:
        memory_percent: system memory in use, percent (psutil ``virtual_memory().percent``).
        available_bytes: memory available to new processes without swapping.
        total_bytes: total physical memory.
        cpu_percent: system-wide CPU use since the previous reading, percent; ``None`` when not
            measured.
        process_rss_bytes: resident memory of this process.
        children_rss_bytes: resident memory of all its descendants together (shared pages are
            counted once per process, so this over-estimates trees that share memory).
        timestamp: ``time.monotonic()`` when the reading was taken.
    """

    memory_percent: float
    available_bytes: int
    total_bytes: int
    cpu_percent: float | None = None
    process_rss_bytes: int = 0
    children_rss_bytes: int = 0
    timestamp: float = 0.0


def check_reader(reader: object) -> None:
    """Raise :class:`InvalidTaskError` unless ``reader`` is ``None`` or a plain callable (a
    reader that is not would fail every reading, long after the mistake; one that is a
    coroutine function would only return a coroutine, from its worker thread)."""
    if reader is not None and not callable(reader):
        raise InvalidTaskError(f"reader must be callable or None, got {reader!r}")
    if inspect.iscoroutinefunction(reader) or inspect.isasyncgenfunction(reader):
        raise InvalidTaskError(
            f"reader must be a plain function returning a ResourceSnapshot (it is called in a "
            f"worker thread), not a coroutine function: {reader!r}"
        )


def checked_reader(reader: ResourceReader) -> ResourceReader:
    """``reader`` (a host's), its every reading checked: a NaN percentage compares False with
    any limit, so a reading that cannot be judged would turn the limits off unseen.

    Raises (from the returned reader):
        InvalidReadingError: not a :class:`ResourceSnapshot`, or a field of the wrong kind.
    """

    def read() -> ResourceSnapshot:
        snapshot = reader()
        problem = _problem(snapshot)
        if problem is not None:
            raise InvalidReadingError(f"the reader {reader!r} returned {problem}")
        return snapshot

    return read


async def read_in_thread(reader: ResourceReader) -> ResourceSnapshot:
    """Take a reading with ``reader`` in a daemon thread of its own and await it.

    Not in the loop's default executor (``asyncio.to_thread``): a reading that never returns (a
    host's metrics endpoint that stalls) is abandoned when the awaiting task is cancelled, and
    holds up neither ``asyncio.run()``, which waits for that executor on exit, nor the
    interpreter's exit. The reader's errors are raised here.
    """
    reading = await call_in_daemon_thread(reader, (), {}, "prismq-resource-reading")
    return cast(ResourceSnapshot, reading)


def check_snapshot(snapshot: object, what: str) -> ResourceSnapshot:
    """``snapshot`` if it is a :class:`ResourceSnapshot` of real numbers, for ``what``.

    Raises:
        InvalidReadingError: anything else (``None``, a NaN that every limit would pass).
    """
    problem = _problem(snapshot)
    if problem is not None:
        raise InvalidReadingError(f"{what} needs a ResourceSnapshot of real numbers, got {problem}")
    return cast(ResourceSnapshot, snapshot)


def _problem(snapshot: object) -> str | None:
    # Any real number is taken (a float or a numpy integer from a host's metrics library): the
    # limits compare, they do not need an int; what cannot be compared (NaN, text) is refused.
    if not isinstance(snapshot, ResourceSnapshot):
        return f"{snapshot!r}, not a ResourceSnapshot"
    for name in (
        "memory_percent",
        "cpu_percent",
        "available_bytes",
        "total_bytes",
        "process_rss_bytes",
        "children_rss_bytes",
    ):
        value = getattr(snapshot, name)
        if value is None and name == "cpu_percent":
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return f"{name}={value!r}: not a number"
        if not finite(value) or value < 0:
            return f"{name}={value!r}: must be a finite number >= 0"
    return None


class ResourceReader(Protocol):
    """A source of readings (``reader=`` of ``MemoryMonitor`` and ``ResourceManager``): any
    callable returning a :class:`ResourceSnapshot`, e.g. :class:`PsutilResourceReader` or a
    host's own metrics. The async APIs call it in a daemon thread (:func:`read_in_thread`)."""

    def __call__(self) -> ResourceSnapshot: ...


def tree_rss_bytes(processes: Iterable[psutil.Process]) -> int:
    """Sum the RSS of ``processes``, skipping those that vanished or can't be read."""
    total = 0
    for proc in processes:
        try:
            total += proc.memory_info().rss
        except VANISHED:
            continue
    return total


class PsutilResourceReader:
    """The default reader: system memory, optionally CPU, and this process tree's RSS.

    CPU percent needs two samples. The reader primes psutil's non-blocking
    ``cpu_percent(interval=None)`` baseline when it is created; a later reading that comes less
    than ``min_cpu_interval`` seconds after the previous one returns the previous value rather than
    a noisy figure over a tiny window, except for the first reading, which sleeps (in the calling
    worker thread) until the window is long enough. psutil keeps that baseline per process, so
    other code in the process calling ``psutil.cpu_percent(None)`` shortens our windows.

    "This process" is the one reading: in a child forked after the reader was made (a worker of
    gunicorn ``--preload``), the child, its own children and a fresh CPU baseline.

    Args:
        measure_cpu: read CPU percent (otherwise ``cpu_percent`` is ``None``).
        include_children: sum the RSS of this process's descendants (lists all processes).
        min_cpu_interval: shortest window over which CPU percent is computed, seconds (>= 0).

    Raises:
        InvalidIntervalError: ``min_cpu_interval`` is not a finite number >= 0.
    """

    def __init__(
        self,
        *,
        measure_cpu: bool = True,
        include_children: bool = True,
        min_cpu_interval: float = 0.1,
    ) -> None:
        if (
            isinstance(min_cpu_interval, bool)
            or not isinstance(min_cpu_interval, int | float)
            or not math.isfinite(min_cpu_interval)
            or min_cpu_interval < 0
        ):
            # Unchecked, inf raised OverflowError from time.sleep in a worker thread.
            raise InvalidIntervalError(
                "min_cpu_interval must be a finite number of seconds >= 0, got "
                f"{min_cpu_interval!r}"
            )
        self._measure_cpu = measure_cpu
        self._include_children = include_children
        self._min_cpu_interval = float(min_cpu_interval)
        self._start_afresh()
        start_afresh_after_fork(self)

    def _start_afresh(self) -> None:
        self._self = psutil.Process()
        # Readers may be called from several worker threads at once; the CPU state is shared.
        self._lock = threading.Lock()
        self._cpu_value: float | None = None
        self._cpu_read_at = time.monotonic()
        if self._measure_cpu:
            psutil.cpu_percent(interval=None)

    def _forked(self) -> None:
        # In a forked child: the parent's psutil.Process would make its RSS and its children
        # (every sibling worker) ours, and a lock a parent's thread held at the fork is held
        # for ever here (that thread does not exist in the child).
        self._start_afresh()

    def _cpu_percent(self) -> float:
        with self._lock:
            elapsed = time.monotonic() - self._cpu_read_at
            if self._cpu_value is not None and elapsed < self._min_cpu_interval:
                return self._cpu_value
            if self._cpu_value is None and elapsed < self._min_cpu_interval:
                time.sleep(self._min_cpu_interval - elapsed)
            self._cpu_value = psutil.cpu_percent(interval=None)
            self._cpu_read_at = time.monotonic()
            return self._cpu_value

    def __call__(self) -> ResourceSnapshot:
        """Take a reading. Blocking (usually well under a few ms); call it off the event loop."""
        memory = psutil.virtual_memory()
        try:
            own_rss = self._self.memory_info().rss
        except VANISHED:
            own_rss = 0
        children_rss = 0
        if self._include_children:
            try:
                children = self._self.children(recursive=True)
            except VANISHED:
                children = []
            children_rss = tree_rss_bytes(children)
        return ResourceSnapshot(
            memory_percent=float(memory.percent),
            available_bytes=int(memory.available),
            total_bytes=int(memory.total),
            cpu_percent=self._cpu_percent() if self._measure_cpu else None,
            process_rss_bytes=own_rss,
            children_rss_bytes=children_rss,
            timestamp=time.monotonic(),
        )
