"""Fan-out of run output to any number of live subscribers: :class:`OutputCapture`.

A producer (the code reading a child's stdout) calls :meth:`OutputCapture.append_line`; an SSE
endpoint iterates :meth:`OutputCapture.subscribe`, which first replays the buffered lines and then
follows live ones until :meth:`OutputCapture.close_run`. Memory per run is bounded twice: a ring
buffer of the newest lines (by count and by UTF-8 bytes) and, per subscriber, a bounded queue.

Slow subscriber policy: the producer never waits for anyone. When a subscriber's queue is full
its *oldest* queued line is dropped and the subscriber later receives an :class:`OutputGap`
saying how many lines it missed; other subscribers are not affected.
"""

from __future__ import annotations

import asyncio
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from .._core._closing import AsyncClosing
from .._core._exceptions import InvalidLimitError, OutputClosedError
from ._output_log import RunLogWriter

__all__ = ["OutputCapture", "OutputGap", "OutputItem", "OutputLine", "OutputSubscription"]


@dataclass(frozen=True, slots=True)
class OutputLine:
    """One line of output. ``seq`` counts the run's lines from 0 (usable as an SSE event id to
    resume with ``subscribe(run_id, after=seq)``); ``text`` has no line ending."""

    seq: int
    text: str


@dataclass(frozen=True, slots=True)
class OutputGap:
    """Marker: ``dropped`` lines are missing here (evicted from the ring buffer before this
    subscriber replayed them, or dropped because this subscriber fell behind)."""

    dropped: int


OutputItem = OutputLine | OutputGap
"""What a subscription yields: tell them apart with ``isinstance``."""


def _positive(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidLimitError(f"{name} must be an int >= 1, got {value!r}")
    return value


class _RunOutput:
    """The buffered tail and live subscribers of one run."""

    __slots__ = ("buffered_bytes", "closed", "lines", "next_seq", "subscribers")

    def __init__(self) -> None:
        self.lines: deque[tuple[OutputLine, int]] = deque()  # (line, its UTF-8 size)
        self.buffered_bytes = 0
        self.next_seq = 0
        self.closed = False
        # Weak, so a subscription the caller abandons without aclose() is still freed.
        self.subscribers: weakref.WeakSet[OutputSubscription] = weakref.WeakSet()

    @property
    def dropped(self) -> int:
        return self.lines[0][0].seq if self.lines else self.next_seq


class OutputSubscription(AsyncClosing):
    """Async iterator over one run's output: replay, then live lines, until the run is closed.

    Yields :class:`OutputLine` and :class:`OutputGap` items. Ends (``StopAsyncIteration``) once the
    run is closed and everything queued was yielded, or after :meth:`aclose`. Use it as
    ``async with capture.subscribe(run_id) as lines: async for item in lines: ...`` so it is
    unregistered promptly; an abandoned subscription is unregistered when garbage collected.

    Cancelling ``__anext__`` (e.g. a heartbeat timeout around it) loses nothing: the next call
    carries on where it left off.
    """

    def __init__(self, replay: list[OutputItem], queue_size: int, closed: bool) -> None:
        self._replay: deque[OutputItem] = deque(replay)
        self._queue: deque[OutputLine] = deque()
        self._queue_size = queue_size
        self._dropped = 0
        self._dropped_total = 0
        self._ended = closed
        self._wakeup = asyncio.Event()
        self._state: _RunOutput | None = None

    def _push(self, line: OutputLine) -> None:
        if len(self._queue) >= self._queue_size:
            self._queue.popleft()
            self._dropped += 1
        self._queue.append(line)
        self._wakeup.set()

    def _end(self) -> None:
        self._ended = True
        self._wakeup.set()

    @property
    def dropped(self) -> int:
        """Lines this subscriber lost because it fell behind (not counting ring-buffer gaps)."""
        return self._dropped_total + self._dropped

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> OutputItem:
        while True:
            if self._replay:
                return self._replay.popleft()
            if self._dropped:
                # Drops always remove the oldest queued lines, so the gap precedes the queue.
                gap = OutputGap(self._dropped)
                self._dropped_total += self._dropped
                self._dropped = 0
                return gap
            if self._queue:
                return self._queue.popleft()
            if self._ended:
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def aclose(self) -> None:
        """Stop following: unregister and end the iteration. Idempotent."""
        self._ended = True
        self._replay.clear()
        self._queue.clear()
        self._dropped = 0
        if self._state is not None:
            self._state.subscribers.discard(self)
            self._state = None
        self._wakeup.set()



class OutputCapture(AsyncClosing):
    """Buffers each run's output lines and fans them out to subscribers.

    Args:
        max_lines_per_run: ring buffer size in lines (older lines are evicted and counted).
        max_bytes_per_run: ring buffer size in UTF-8 bytes; the newest line is always kept even
            if it alone is larger.
        subscriber_queue_size: how many live lines a subscriber may lag behind before its oldest
            queued lines are dropped (it then gets an :class:`OutputGap`).
        log_dir: if given, every line of every run is also appended to ``log_dir/<run_id>.log``
            by a background thread (see ``RunLogWriter``); call :meth:`aclose` to flush and stop it.

    Runs are created on first use (``append_line``, ``subscribe`` or ``close_run``) and kept
    until :meth:`forget`; call it once a run's output is no longer needed. Use from one event loop.

    Raises:
        InvalidLimitError: a size is not an int >= 1.
    """

    def __init__(
        self,
        max_lines_per_run: int = 1000,
        max_bytes_per_run: int = 1024 * 1024,
        subscriber_queue_size: int = 1000,
        log_dir: str | Path | None = None,
    ) -> None:
        self.max_lines_per_run = _positive("max_lines_per_run", max_lines_per_run)
        self.max_bytes_per_run = _positive("max_bytes_per_run", max_bytes_per_run)
        self.subscriber_queue_size = _positive("subscriber_queue_size", subscriber_queue_size)
        self._runs: dict[str, _RunOutput] = {}
        self._log = None if log_dir is None else RunLogWriter(log_dir)
        self._closed = False

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`aclose`."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise OutputClosedError("this OutputCapture is closed; create a new one")

    def _state(self, run_id: str) -> _RunOutput:
        state = self._runs.get(run_id)
        if state is None:
            state = self._runs[run_id] = _RunOutput()
            # A run first seen after aclose() gets no more output: its subscribers must not wait.
            state.closed = self._closed
        return state

    async def append_line(self, run_id: str, line: str) -> None:
        """Add one line of ``run_id``'s output; a trailing ``\\n`` / ``\\r\\n`` is removed.

        Never waits for subscribers or the disk (it does not suspend at all).

        Raises:
            OutputClosedError: :meth:`close_run` was already called for this run, or
                :meth:`aclose` for the capture.
        """
        self._check_open()
        state = self._state(run_id)
        if state.closed:
            raise OutputClosedError(f"output of run {run_id!r} is closed")
        if line.endswith("\n"):
            line = line[:-2] if line.endswith("\r\n") else line[:-1]
        item = OutputLine(state.next_seq, line)
        state.next_seq += 1
        size = len(line.encode("utf-8", errors="replace"))
        state.lines.append((item, size))
        state.buffered_bytes += size
        while len(state.lines) > 1 and (
            len(state.lines) > self.max_lines_per_run
            or state.buffered_bytes > self.max_bytes_per_run
        ):
            _, evicted = state.lines.popleft()
            state.buffered_bytes -= evicted
        for subscriber in state.subscribers:
            subscriber._push(item)
        if self._log is not None:
            self._log.write(run_id, line)

    async def close_run(self, run_id: str) -> None:
        """Mark the end of ``run_id``'s output: subscribers finish after what they have queued,
        later subscribers replay the buffer and finish. Idempotent. With a ``log_dir``, returns
        once the run's log file is complete and closed.

        Cancellation: the run is closed anyway; the log file is closed by the writer thread.
        """
        state = self._state(run_id)
        if not state.closed:
            state.closed = True
            for subscriber in state.subscribers:
                subscriber._end()
        if self._log is not None:
            await self._log.close_run(run_id)

    def subscribe(self, run_id: str, *, after: int | None = None) -> OutputSubscription:
        """Return an async iterator of ``run_id``'s output (see :class:`OutputSubscription`).

        It replays the buffered lines (starting with an :class:`OutputGap` when older lines were
        evicted), then follows live lines until the run is closed. With ``after`` (the last
        ``seq`` a client saw, e.g. SSE ``Last-Event-ID``) only later lines are replayed.
        Subscribing to a run with no output yet waits for it.
        """
        state = self._state(run_id)
        first_wanted = 0 if after is None else after + 1
        replay: list[OutputItem] = []
        missing = state.dropped - first_wanted
        if missing > 0:
            replay.append(OutputGap(missing))
        replay.extend(line for line, _ in state.lines if line.seq >= first_wanted)
        subscription = OutputSubscription(replay, self.subscriber_queue_size, state.closed)
        if not state.closed:
            subscription._state = state
            state.subscribers.add(subscription)
        return subscription

    def get_lines(self, run_id: str) -> list[str]:
        """Return the buffered tail of ``run_id``'s output (empty for an unknown run)."""
        state = self._runs.get(run_id)
        return [] if state is None else [line.text for line, _ in state.lines]

    def dropped_count(self, run_id: str) -> int:
        """Return how many of ``run_id``'s lines were evicted from its ring buffer."""
        state = self._runs.get(run_id)
        return 0 if state is None else state.dropped

    def line_count(self, run_id: str) -> int:
        """Return how many lines ``run_id`` produced in total."""
        state = self._runs.get(run_id)
        return 0 if state is None else state.next_seq

    def is_closed(self, run_id: str) -> bool:
        """Return ``True`` once :meth:`close_run` was called for ``run_id``."""
        state = self._runs.get(run_id)
        return state is not None and state.closed

    def log_path(self, run_id: str) -> Path | None:
        """Return the path of ``run_id``'s log file, or ``None`` without a ``log_dir``."""
        return None if self._log is None else self._log.path_for(run_id)

    def forget(self, run_id: str) -> None:
        """Free ``run_id``'s buffer; its live subscribers finish (after what they have queued)."""
        state = self._runs.pop(run_id, None)
        if state is not None:
            for subscriber in state.subscribers:
                subscriber._end()

    async def aclose(self) -> None:
        """End every subscription and, with a ``log_dir``, flush and close all log files and stop
        the writer thread. Idempotent. Buffers stay readable through :meth:`get_lines` and
        :meth:`subscribe` (which then replays and ends); :meth:`append_line` raises
        :class:`OutputClosedError`.

        Cancellation: the writer thread still finishes writing and stops.
        """
        self._closed = True
        for state in self._runs.values():
            state.closed = True
            for subscriber in state.subscribers:
                subscriber._end()
        if self._log is not None:
            await self._log.aclose()

