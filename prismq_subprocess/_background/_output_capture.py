"""Fan-out of run output to any number of live subscribers: :class:`OutputCapture`.

A producer (the code reading a child's stdout) calls :meth:`OutputCapture.append_lines` (or
``append_line``); a web endpoint iterates :meth:`OutputCapture.subscribe`, which yields the run's
lines from a given seq on and then follows live ones until :meth:`OutputCapture.close_run`.

Each run has one ring buffer of its newest lines, bounded by count and by UTF-8 bytes, and each
subscriber is just a cursor into it (see ``_output_ring`` and ``_output_subscription``): appending
is O(1) per line whatever the number of subscribers, a subscriber that keeps up never misses a
line, and a stalled one costs nothing but its cursor. With a ``log_dir`` every line also goes to a
per-run log file, from which subscribers that fell behind, or that come after the buffer was
released, read what the ring no longer has.

A run nobody follows takes lines on a fast path: ``append_line`` only puts the raw line on the
run's pending batch, and the per-line bookkeeping (newline stripping, sizes, seqs, eviction, the
log hand-off) is done for the whole batch in C-level passes when it is full, at the end of the
loop iteration, or as soon as anything reads the run (see ``OutputCapture._flush``).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import math
import operator
import os
import reprlib
import time
from collections import OrderedDict
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

from .._core._closing import AsyncClosing
from .._core._durations import finite, interval_seconds
from .._core._exceptions import (
    InvalidArgumentTypeError,
    InvalidLimitError,
    InvalidLogDirError,
    InvalidRunIdError,
    InvalidSubscriptionError,
    OutputClosedError,
    OutputNotFoundError,
)
from ._log_names import log_file_name, run_log_path
from ._memory_registry import DEFAULT_POLL_INTERVAL, BaseRunRegistry, check_registry
from ._output_items import (
    OutputChunk,
    OutputEnd,
    OutputGap,
    OutputItem,
    OutputLine,
    bound_line,
    utf8_size,
)
from ._output_log import RunLogWriter
from ._output_ring import RunRing
from ._output_subscription import OutputChunks, OutputSubscription
from ._output_tail import DEFAULT_TAIL_BYTES, OutputTail
from ._run_record import RunStatus

__all__ = [
    "OutputCapture",
    "OutputChunk",
    "OutputChunks",
    "OutputEnd",
    "OutputGap",
    "OutputItem",
    "OutputLine",
    "OutputSubscription",
    "check_output",
]

#: How many released run ids are remembered (so a late append is refused, not a new run).
_REMEMBER_RELEASED = 10_000
#: Lines a run's pending batch (the fast path of ``append_line``) holds before it is added to
#: the ring; the batch's fixed cost (a join, a few C passes, one eviction) is spread over these.
_BATCH_LINES = 256


class _Released(NamedTuple):
    """What is remembered of a run whose buffer was released."""

    end: OutputEnd | None
    lines: int  # how many it produced: none means it never had a log file


def check_output(value: object, owner: str) -> OutputCapture | None:
    """``value`` if it is an :class:`OutputCapture` or None, for ``owner``'s ``output=``.

    Raises:
        InvalidArgumentTypeError: anything else (it failed each run instead, with a bare
            ``AttributeError``).
    """
    if value is None or isinstance(value, OutputCapture):
        return value
    raise InvalidArgumentTypeError(
        f"{owner}: output must be an OutputCapture or None, got {type(value).__name__}"
    )


def _count(name: str, value: int, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidLimitError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _optional_count(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidLimitError(f"{name} must be an int >= 0 or None, got {value!r}")
    return value


def _usable_log_dir(path: Path) -> Path:
    """``path`` if it can hold log files (it is a directory, or nothing is there yet: made with
    the first line). Refused at once otherwise: the writer thread would fail on every run,
    each run's lines would stay in memory only, and the caller would get no error."""
    if "\0" in str(path):
        raise InvalidLogDirError(f"log_dir must not contain a NUL character: {str(path)!r}")
    try:
        # The nearest part of it that exists must be a directory (a file on the way would fail
        # the mkdir of the first line just the same).
        there = path
        while not there.exists() and there != there.parent:
            there = there.parent
        blocked = there.exists() and not there.is_dir()
    except (OSError, ValueError) as exc:  # a name too long, a permission denied on the way
        raise InvalidLogDirError(f"log_dir {str(path)!r} cannot be looked at: {exc}") from exc
    if blocked:
        where = "" if there == path else f" ({str(there)!r} is a file)"
        raise InvalidLogDirError(
            f"log_dir {str(path)!r} is not a directory{where}; log files go in a directory"
        )
    return path


def _clean(lines: Iterable[str], text: str | None = None) -> list[str]:
    """One str per line: a trailing ``\\n``/``\\r\\n`` removed, embedded newlines split.
    ``text``, if given, is ``"".join(lines)`` (the caller had it already)."""
    batch = lines if isinstance(lines, list) else list(lines)
    if not batch:
        return batch
    if text is None:
        text = "".join(batch)
    if "\n" not in text:
        return batch  # the common case: no line has a newline (a memchr, no count)
    if _all_end_with_newline(batch):
        # The other common case, lines as read from a pipe: every one ends with "\n", so
        # joining and splitting keeps the line boundaries, in C passes rather than a Python loop.
        parts = text.split("\n")
        parts.pop()  # after the last "\n"
        if "\r" in text:
            parts = [part[:-1] if part.endswith("\r") else part for part in parts]
        return parts
    out: list[str] = []
    for line in batch:
        if line.endswith("\n"):
            line = line[:-2] if line.endswith("\r\n") else line[:-1]
        if "\n" in line:
            *head, last = line.split("\n")
            out.extend(part[:-1] if part.endswith("\r") else part for part in head)
            out.append(last)
        else:
            out.append(line)
    return out


_last_char = operator.itemgetter(-1)


def _all_end_with_newline(batch: list[str]) -> bool:
    # C passes only: 1-character strs are cached (no allocation per line) and list.count
    # compares them by identity first. An empty line ends with nothing.
    try:
        return list(map(_last_char, batch)).count("\n") == len(batch)
    except IndexError:
        return False


def end_code(exit_code: object) -> int | None:
    """A run's ``exit_code`` as :meth:`OutputCapture.close_run` takes it: what the library
    closes a run with must never be refused there (the run's output would stay open, and its
    subscribers wait for ever), so a code a host set oddly (``0.0``) is passed as an int when it
    is a whole number, else left out."""
    if isinstance(exit_code, bool):
        return None
    if isinstance(exit_code, int) or (isinstance(exit_code, float) and exit_code.is_integer()):
        return int(exit_code)
    return None


def _run_id(run_id: object) -> str:
    """``run_id`` if it can be one; the documented error before any look-up (an unhashable
    one, a list say, gave a bare ``TypeError`` from the first dict it met)."""
    if run_id.__class__ is str or isinstance(run_id, str):
        return run_id
    raise InvalidRunIdError(f"a run id must be a non-empty str, got {run_id!r}")


class OutputCapture(AsyncClosing):
    """Buffers each run's output lines and fans them out to subscribers.

    Args:
        max_lines_per_run: ring buffer size in lines.
        max_bytes_per_run: ring buffer size in UTF-8 bytes; the newest line is always kept, so a
            run holds at most ``max_bytes_per_run + max_line_bytes`` bytes of text, plus a
            pending batch of at most 256 lines of at most ``max_bytes_per_run // 1024``
            characters each (a quarter of ``max_bytes_per_run`` for ASCII text) while nobody
            follows the run (longer lines skip the batch).
        max_line_bytes: longer lines are cut to this many bytes in memory (the text says so and
            :attr:`OutputLine.truncated` counts the cut bytes); the log file keeps them whole.
        log_dir: if given, every line of every run is also appended to
            ``run_log_path(log_dir, run_id)`` by a background thread; subscribers read from it
            what the ring no longer holds. Call :meth:`aclose` to flush and stop the thread.
        retain_ended_runs: how many ended (closed) runs keep their buffer in memory; beyond it
            the oldest ended run's buffer is released. ``None``: no limit.
        retain_ended_bytes: the same bound in buffered bytes over all ended runs.
        retain_ended_seconds: an ended run's buffer is released this long after it ended
            (seconds or ``timedelta``); ``None``: never for age.

    A run exists from its first :meth:`open_run`, append or :meth:`close_run`. Once released
    (by retention or :meth:`forget`) its buffer is gone; :meth:`subscribe` then replays it from
    its log file if there is one (a run that printed nothing has none, and with a ``log_dir``
    is replayed as empty). Use from one event loop.

    Raises:
        InvalidLimitError: a size is not an int in range (>= 1; the retention counts >= 0).
        InvalidIntervalError: ``retain_ended_seconds`` is not positive.
        InvalidArgumentTypeError: ``log_dir`` is not a path.
        InvalidLogDirError: ``log_dir`` has a NUL character, or exists and is not a directory.
    """

    def __init__(
        self,
        max_lines_per_run: int = 1000,
        max_bytes_per_run: int = 1024 * 1024,
        *,
        max_line_bytes: int = 64 * 1024,
        log_dir: str | os.PathLike[str] | None = None,
        retain_ended_runs: int | None = 1000,
        retain_ended_bytes: int | None = 64 * 1024 * 1024,
        retain_ended_seconds: float | timedelta | None = 3600.0,
    ) -> None:
        self.max_lines_per_run = _count("max_lines_per_run", max_lines_per_run)
        self.max_bytes_per_run = _count("max_bytes_per_run", max_bytes_per_run)
        self.max_line_bytes = _count("max_line_bytes", max_line_bytes)
        self.retain_ended_runs = _optional_count("retain_ended_runs", retain_ended_runs)
        self.retain_ended_bytes = _optional_count("retain_ended_bytes", retain_ended_bytes)
        self.retain_ended_seconds = (
            None
            if retain_ended_seconds is None
            else interval_seconds(retain_ended_seconds, what="retain_ended_seconds")
        )
        if log_dir is not None and not isinstance(log_dir, str | os.PathLike):
            raise InvalidArgumentTypeError(
                f"log_dir must be a str, an os.PathLike or None, not {type(log_dir).__name__}"
            )
        self.log_dir = None if log_dir is None else _usable_log_dir(Path(log_dir))
        self._log = None if self.log_dir is None else RunLogWriter(self.log_dir)
        # Producers yield to the loop every half ring while someone reads, so readers keep up.
        self._half_lines = max(1, self.max_lines_per_run // 2)
        self._half_bytes = max(1, self.max_bytes_per_run // 2)
        self._runs: dict[str, RunRing] = {}
        self._ended: OrderedDict[str, int] = OrderedDict()  # closed runs in memory -> bytes
        self._ended_bytes = 0
        self._expiry: dict[str, asyncio.TimerHandle] = {}
        self._released: OrderedDict[str, _Released] = OrderedDict()
        self._run_waiters: dict[str, list[asyncio.Future[None]]] = {}
        self._closed = False
        # The fast path of append_line: the raw lines of runs nobody follows, not yet in their
        # ring. A run is here only while its batch is not empty (an absent run makes the next
        # append take the full path, which starts a batch and schedules its flush).
        self._pending: dict[str, list[str]] = {}
        # Longer lines skip the batch, so that it stays small in bytes (4 bytes a character at
        # worst) and none of its lines needs cutting to max_line_bytes.
        self._fast_chars = min(
            self.max_bytes_per_run // (4 * _BATCH_LINES), self.max_line_bytes // 4
        )
        self._flush_handle: asyncio.Handle | None = None
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        # Errors a flush met in the loop's callback (a log write), by run, for its next call.
        self._failed: dict[str, Exception] = {}

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`aclose`."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise OutputClosedError("this OutputCapture is closed; create a new one")

    # -- runs -----------------------------------------------------------------------------------
    def _open(self, run_id: str) -> RunRing:
        if self._closed:
            raise OutputClosedError("this OutputCapture is closed")
        if self._log is not None:
            log_file_name(run_id)  # refuse an id that cannot name a file, before any output
            self._log.register(run_id)
        elif not isinstance(run_id, str) or not run_id:
            raise InvalidRunIdError(f"a run id must be a non-empty str, got {run_id!r}")
        ring = self._runs[run_id] = RunRing(self.max_lines_per_run, self.max_bytes_per_run)
        waiters = self._run_waiters.pop(run_id, None)
        if waiters:
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
                    # Counted as following from now: until its task runs and attaches, a
                    # producer that does not wait would otherwise take the run for unfollowed
                    # and push past the ring what this subscriber is about to read.
                    ring.arriving.add(waiter)
            ring.subscribers += len(ring.arriving)
        return ring

    def _writable(self, run_id: str) -> RunRing:
        ring = self._runs.get(run_id)
        if ring is None:
            if run_id in self._released:
                raise OutputClosedError(f"output of run {run_id!r} is closed (and released)")
            return self._open(run_id)
        if ring.closed:
            raise OutputClosedError(f"output of run {run_id!r} is closed")
        return ring

    def open_run(self, run_id: str) -> bool:
        """Declare ``run_id`` so it can be subscribed to before its first line (``ModuleRunner``
        and ``BackgroundTaskManager`` do it when they start a run). Returns ``True`` if the run
        was new here; no effect on a known or released run, or once the capture is closed.

        Raises:
            InvalidRunIdError: with a ``log_dir``, ``run_id`` cannot name a log file.
        """
        run_id = _run_id(run_id)
        if self._closed or run_id in self._runs or run_id in self._released:
            return False
        self._open(run_id)
        return True

    async def append_line(self, run_id: str, line: str) -> None:
        """Add one line of ``run_id``'s output; a trailing ``\\n`` / ``\\r\\n`` is removed (a
        ``line`` with more newlines in it becomes several lines).

        Never waits for subscribers or the disk. While someone follows the run it yields to the
        event loop once per half ring of appended lines, so that subscribers that keep up get
        every line even from a producer that never waits. While nobody follows it, the line
        joins a pending batch that every reader of the run (and the end of the current loop
        iteration) adds to the buffer first, so no reader can tell.

        Raises:
            OutputClosedError: :meth:`close_run` was already called for this run, or the
                capture is closed.
            InvalidRunIdError: with a ``log_dir``, ``run_id`` cannot name a log file.
            InvalidArgumentTypeError: ``line`` is not a ``str``.
        """
        # The fast path: a run with a pending batch is open, known and followed by nobody (a
        # close or a subscriber flushes and removes the batch first), so a short str needs no
        # check; everything else is for the batch, in C passes (see _flush).
        # .get, not a subscript in try: a followed run has no batch, and a KeyError per line
        # would cost its appends more than .get costs these.
        try:
            pending = self._pending.get(run_id)
        except TypeError:
            raise InvalidRunIdError(f"a run id must be a non-empty str, got {run_id!r}") from None
        if pending is not None and line.__class__ is str and len(line) <= self._fast_chars:
            pending.append(line)
            if len(pending) >= _BATCH_LINES:  # a global: one attribute lookup less
                self._flush(run_id)
            return
        # The full path: the run has no batch (new, followed, or its batch was just added), or
        # the line cannot join it.
        if not isinstance(line, str):
            raise InvalidArgumentTypeError(
                f"a line must be a str (decode bytes first), not {type(line).__name__}"
            )
        if run_id.__class__ is not str:  # (inline: this path runs per line while followed)
            run_id = _run_id(run_id)
        try:
            ring = self._runs[run_id]
        except KeyError:
            ring = self._writable(run_id)
        if ring.closed:
            ring = self._writable(run_id)  # raises
        if self._failed:
            self._raise_failed(run_id)
        if pending is not None:
            self._flush(run_id)  # the lines before this one go first
        if (
            not ring.subscribers
            and line.__class__ is str
            and len(line) <= self._fast_chars
            and not self._closed
            and self._start_batch(run_id, line)
        ):
            return
        if "\n" in line:
            whole = line
            if line[-1] == "\n":
                line = line[:-1]
                # Indexing, not a second scan of the line for "\r".
                if line and line[-1] == "\r":
                    line = line[:-1]
            if "\n" in line:
                # The line as given: cleaning the stripped one would strip a second newline
                # ("x\n\n" is "x" and "", not "x" alone).
                await self.append_lines(run_id, [whole])
                return
        log = self._log
        if log is not None:
            log.write(run_id, line)
        size = len(line) if line.isascii() else utf8_size(line)
        if size > self.max_line_bytes:
            line, size = self._cut(ring, line, ring.next_seq)
        lines = ring.lines
        lines.append(line)
        nbytes = ring.nbytes = ring.nbytes + size
        if nbytes > ring.max_bytes or len(lines) > ring.limit:
            ring.evict()
        if ring.subscribers:
            if ring.waiters:
                ring.wake()
            # _maybe_yield's test, inline: a coroutine call per line costs a followed run's
            # producer more than the test itself.
            lines_since = ring.since_yield_lines = ring.since_yield_lines + 1
            bytes_since = ring.since_yield_bytes = ring.since_yield_bytes + size
            if lines_since >= self._half_lines or bytes_since >= self._half_bytes:
                ring.since_yield_lines = ring.since_yield_bytes = 0
                # Woken subscribers run before us, while the ring still holds what they missed.
                await asyncio.sleep(0)

    async def append_lines(self, run_id: str, lines: Iterable[str]) -> None:
        """Add several lines of ``run_id``'s output at once (each as in :meth:`append_line`),
        waking subscribers once per batch rather than per line. This is what ``ModuleRunner``
        uses for each read from the child's pipe.

        Raises:
            OutputClosedError: the run's output is (or, during the call, was) closed; the lines
                not added by then are not in the log file either.
            InvalidRunIdError: ``run_id`` is not a str, or with a ``log_dir`` it cannot name a
                log file.
            InvalidArgumentTypeError: ``lines`` is a ``str`` or not iterable, or a line is not
                a ``str``; nothing is added.
        """
        if not isinstance(run_id, str):
            run_id = _run_id(run_id)  # raises (a list failed as unhashable, a TypeError)
        # Checked first, so that nothing is done with lines of the wrong kind (a str would be
        # taken as one line per character).
        if isinstance(lines, str) or not isinstance(lines, Iterable):
            raise InvalidArgumentTypeError(
                f"lines must be an iterable of str (not a str), not {type(lines).__name__}"
            )
        # A copy even of a list: the log's writer thread reads the batch later, and a producer
        # may clear and refill its list for the next call (then the file lost those lines).
        given = list(lines)
        try:
            batch = _clean(given)
        except TypeError:
            wrong = next(line for line in given if not isinstance(line, str))
            raise InvalidArgumentTypeError(
                f"each line must be a str (decode bytes first), not {type(wrong).__name__}"
            ) from None
        ring = self._writable(run_id)
        if self._failed:
            self._raise_failed(run_id)
        self._flush(run_id)
        if not batch:
            return
        log = self._log
        done = 0
        while done < len(batch):
            start = done
            done = self._push(ring, batch, done)
            if log is not None:
                # What the ring took, before a subscriber can see it leave the ring (a reader
                # behind the ring waits for the file to have it). Not the whole batch at
                # once: the run may be closed while we yield below, and the lines not taken
                # then must not be in the file either (a replay would have lines that live
                # subscribers never got and that the append reported as refused).
                log.write(run_id, batch if start == 0 and done == len(batch) else batch[start:done])
            if ring.waiters:
                ring.wake()
            await self._maybe_yield(ring)
            if ring.closed and done < len(batch):
                raise OutputClosedError(f"output of run {run_id!r} was closed during the append")

    def _start_batch(self, run_id: str, line: str) -> bool:
        """Start ``run_id``'s pending batch with ``line``; False (nothing done) where no loop
        runs to flush it (a coroutine driven by hand): the line then takes the full path."""
        # Flush at the end of this loop iteration: a producer that waits between lines has its
        # lines in the ring (and on their way to the log file) within one loop turn.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        self._pending[run_id] = [line]
        if self._flush_handle is None or self._flush_loop is not loop:
            self._flush_loop = loop
            self._flush_handle = loop.call_soon(self._flush_all)
        return True

    def _flush_all(self) -> None:
        """Add every pending batch to its ring (run by the loop once per iteration with
        batches, and before the capture closes). A batch whose log write fails is still in its
        ring; the error is kept for that run's next append or close (nobody is awaiting here)
        and the other runs' batches are flushed all the same."""
        self._flush_handle = None
        for run_id in list(self._pending):
            try:
                self._flush(run_id)
            except Exception as exc:
                self._failed[run_id] = exc

    def _raise_failed(self, run_id: str) -> None:
        """Raise the error a flush of ``run_id``'s batch met in the loop's callback, once."""
        error = self._failed.pop(run_id, None)
        if error is not None:
            raise error

    def _flush(self, run_id: str) -> None:
        """Add ``run_id``'s pending batch, if any, to its ring: what every reader of the ring
        calls first. The per-line bookkeeping of the fast path happens here, per batch."""
        batch = self._pending.pop(run_id, None)
        if not batch:
            return
        ring = self._runs[run_id]
        text = "".join(batch)
        if "\n" in text:
            if "\r" not in text and _all_end_with_newline(batch):
                # Lines as read from a pipe: one split strips them all.
                batch = text.split("\n")
                batch.pop()
                size = (len(text) if text.isascii() else utf8_size(text)) - len(batch)
            else:
                batch = _clean(batch, text)
                size = utf8_size("".join(batch))
        else:
            size = len(text) if text.isascii() else utf8_size(text)
        log = self._log
        if self._fast_chars * 4 > self.max_line_bytes:
            # A batch line may need cutting (only if _fast_chars was raised, as tests do).
            done = 0
            while done < len(batch):
                done = self._push(ring, batch, done)
        else:
            ring.lines.extend(batch)
            ring.nbytes += size
            if ring.nbytes > ring.max_bytes or len(ring.lines) > ring.limit:
                ring.evict()
        if ring.waiters:
            ring.wake()
        if log is not None:  # last: a write that fails leaves the lines in the ring
            log.write(run_id, batch)

    def _cut(self, ring: RunRing, line: str, seq: int) -> tuple[str, int]:
        text, cut = bound_line(line, self.max_line_bytes)
        ring.truncated[seq] = cut
        return text, utf8_size(text)

    def _push(self, ring: RunRing, batch: list[str], start: int) -> int:
        """Append lines from ``batch[start]`` on to the ring; while someone reads the run, stop
        after half a ring (in lines or bytes) so that they get a turn. Returns where it stopped.
        """
        end = len(batch)
        if ring.subscribers:
            end = min(end, start + max(1, self._half_lines - ring.since_yield_lines))
        part = batch if start == 0 and end == len(batch) else batch[start:end]
        # Whole-list passes in C rather than a Python loop per line.
        if all(map(str.isascii, part)):
            sizes = list(map(len, part))
        else:
            sizes = [utf8_size(line) for line in part]
        total = sum(sizes)
        if ring.subscribers:
            budget = self._half_bytes - ring.since_yield_bytes
            if total > budget:
                # Stop after the line that uses up the budget (always at least one line).
                cut = bisect.bisect_left(list(itertools.accumulate(sizes)), budget) + 1
                part, sizes = part[:cut], sizes[:cut]
                end = start + cut
                total = sum(sizes)
            ring.since_yield_lines += len(part)
            ring.since_yield_bytes += total
        if max(sizes) > self.max_line_bytes:
            part = list(part)
            first = ring.next_seq
            for index, size in enumerate(sizes):
                if size > self.max_line_bytes:
                    part[index], sizes[index] = self._cut(ring, part[index], first + index)
            total = sum(sizes)
        ring.lines.extend(part)
        ring.nbytes += total
        ring.evict()
        return end

    async def _maybe_yield(self, ring: RunRing) -> None:
        if ring.subscribers and (
            ring.since_yield_lines >= self._half_lines or ring.since_yield_bytes >= self._half_bytes
        ):
            ring.since_yield_lines = 0
            ring.since_yield_bytes = 0
            # Woken subscribers run before us, while the ring still holds what they missed.
            await asyncio.sleep(0)

    async def close_run(
        self, run_id: str, *, status: RunStatus | str | None = None, exit_code: int | None = None
    ) -> None:
        """Mark the end of ``run_id``'s output: subscribers finish once they have read it all,
        later subscribers replay it and finish. ``status`` (a ``RunStatus`` or text) and
        ``exit_code`` are passed on to subscribers (:attr:`OutputSubscription.end`, the SSE
        ``end`` event); a later call may add them. With a ``log_dir``, returns once the run's log
        file is complete and closed. Starts the run's retention period. Idempotent.

        Cancellation: the run is closed anyway; the log file is closed by the writer thread.

        Raises:
            InvalidArgumentTypeError: ``status`` is not a ``RunStatus``, a str or None, or
                ``exit_code`` not an int or None: the SSE ``end`` event, sent to a browser as
                JSON, could not carry them (the run stays open).
        """
        if status is not None and not isinstance(status, str):  # (a RunStatus is a str)
            raise InvalidArgumentTypeError(
                f"close_run(): status must be a RunStatus, a str or None, got {status!r}"
            )
        if exit_code is not None and (type(exit_code) is bool or not isinstance(exit_code, int)):
            raise InvalidArgumentTypeError(
                f"close_run(): exit_code must be an int or None, got {exit_code!r}"
            )
        run_id = _run_id(run_id)
        text = status.value if isinstance(status, RunStatus) else status
        end = None if text is None and exit_code is None else OutputEnd(text, exit_code)
        ring = self._runs.get(run_id)
        if ring is None:
            released = self._released.get(run_id)
            if released is not None:
                if end is not None and released.end is None:
                    self._released[run_id] = released._replace(end=end)
                return
            ring = self._open(run_id)
        failed = self._failed.pop(run_id, None) if self._failed else None
        try:
            self._flush(run_id)
        except Exception as exc:  # the log write: the lines are in the ring, the run closes
            failed = failed or exc
        first_close = not ring.closed
        ring.close(end)
        try:
            if self._log is not None:
                await self._log.close_run(run_id)
        finally:
            if first_close and self._runs.get(run_id) is ring:
                self._retire(run_id, ring)
        if failed is not None:
            raise failed  # the run is closed all the same

    # -- retention ------------------------------------------------------------------------------
    def _retire(self, run_id: str, ring: RunRing) -> None:
        self._ended[run_id] = ring.nbytes
        self._ended_bytes += ring.nbytes
        count, size = self.retain_ended_runs, self.retain_ended_bytes
        while self._ended and (
            (count is not None and len(self._ended) > count)
            or (size is not None and self._ended_bytes > size)
        ):
            self._release(next(iter(self._ended)))
        if self.retain_ended_seconds is not None and run_id in self._ended:
            loop = asyncio.get_running_loop()
            self._expiry[run_id] = loop.call_later(self.retain_ended_seconds, self._release, run_id)

    def _release(self, run_id: str, *, remember: bool = True) -> None:
        if run_id in self._pending:
            self._flush(run_id)  # its lines still go to the log file
        ring = self._runs.pop(run_id, None)
        self._ended_bytes -= self._ended.pop(run_id, 0)
        timer = self._expiry.pop(run_id, None)
        if timer is not None:
            timer.cancel()
        if ring is not None:
            ring.release()
            if remember:
                self._released[run_id] = _Released(ring.end, ring.next_seq)
                while len(self._released) > _REMEMBER_RELEASED:
                    self._released.popitem(last=False)
        if self._log is not None:
            self._log.forget(run_id)

    def forget(self, run_id: str) -> None:
        """Free ``run_id``'s buffer now and forget the id (it may be used again); its live
        subscribers finish after what they already read. Its log file stays."""
        run_id = _run_id(run_id)
        self._released.pop(run_id, None)
        self._release(run_id, remember=False)

    # -- subscribing ----------------------------------------------------------------------------
    def _source(self, run_id: str) -> RunRing | bool:
        """The ring of ``run_id``, else ``True`` if it has a log file to replay, else ``False``.
        A ring is returned with its pending batch added: the caller attaches a subscriber
        (which turns the fast path off for the run)."""
        ring = self._runs.get(run_id)
        if ring is not None:
            self._flush(run_id)
            return ring
        return self.log_dir is not None and run_log_path(self.log_dir, run_id).is_file()

    def _released_end(self, run_id: str) -> OutputEnd | None:
        released = self._released.get(run_id)
        return None if released is None else released.end

    def _released_lines(self, run_id: str) -> int:
        """How many lines released ``run_id`` had (0 if this capture does not know)."""
        released = self._released.get(run_id)
        return 0 if released is None else released.lines

    def _run_waiter(self, run_id: str) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        self._run_waiters.setdefault(run_id, []).append(waiter)
        return waiter

    def _drop_run_waiter(self, run_id: str, waiter: asyncio.Future[None]) -> None:
        """The subscription that made ``waiter`` stops waiting for ``run_id`` (it attaches
        next, or gives up)."""
        ring = self._runs.get(run_id)
        if ring is not None and waiter in ring.arriving:
            ring.arriving.discard(waiter)
            ring.subscribers -= 1
        waiters = self._run_waiters.get(run_id)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._run_waiters[run_id]

    def subscribe(
        self,
        run_id: str,
        *,
        from_seq: int | None = None,
        after: int | None = None,
        wait: bool | float = False,
        registry: BaseRunRegistry | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> OutputSubscription:
        """Return an async iterator of ``run_id``'s output (see :class:`OutputSubscription`).

        It yields the lines from ``from_seq`` (default 0, the first line) on, then follows live
        lines until the run is closed. ``after`` is the other way to say it: the last ``seq`` a
        client saw (e.g. SSE ``Last-Event-ID``), so ``after=n`` is ``from_seq=n + 1``. Lines no
        longer in memory come from the run's log file when there is one; else one
        :class:`OutputGap` stands for them.

        A run the capture does not know (not opened, written or closed here, and no log file) is
        an error unless ``wait`` is ``True`` (wait for it as long as it takes) or a number of
        seconds (then iterating raises ``OutputWaitTimeoutError`` if it did not appear in time).

        **Runs of other processes.** With ``registry`` (the run registry the processes share)
        and a ``log_dir`` (the same directory as the owner's capture), a run this capture does
        not hold (another uvicorn worker runs it, or it ran before a restart) is followed from
        its log file: every ``poll_interval`` seconds the new complete lines are read, until the
        registry records the run's final status; then the rest of the file is read and the
        subscription ends with that status. Seqs are line numbers in the file, the same as the
        owner's, so ``after`` (``Last-Event-ID``) works across processes. If the run's owner
        dies, the run is marked INTERRUPTED and the subscription ends (with a read-only
        registry, which cannot record it, it ends with that status all the same). A run
        neither in the registry nor with a log file raises ``OutputNotFoundError`` from
        iteration (unless ``wait``). Without a ``log_dir``, ``registry`` is not used.

        Raises:
            OutputNotFoundError: unknown run and ``wait`` is false, or the run's buffer was
                released and there is no log file (a run that printed nothing has none: with
                a ``log_dir`` it is replayed as empty, with its end); also, whatever ``wait``,
                an id no run can have here (empty, or, with a ``log_dir``, one that cannot
                name a log file).
            InvalidRunIdError: ``run_id`` is not a ``str``.
            InvalidSubscriptionError: a negative or non-int ``from_seq``/``after``, both given,
                or a bad ``wait`` or ``poll_interval``.
        """
        first = self._first_seq(from_seq, after)
        if isinstance(wait, bool):
            deadline = None
        elif isinstance(wait, int | float) and wait >= 0 and (finite(wait) or wait == math.inf):
            deadline = time.monotonic() + wait
        else:
            raise InvalidSubscriptionError(
                f"wait must be a bool or a number of seconds >= 0, got {wait!r}"
            )
        if (
            isinstance(poll_interval, bool)
            or not isinstance(poll_interval, int | float)
            or not finite(poll_interval)
            or poll_interval <= 0
        ):
            raise InvalidSubscriptionError(
                f"poll_interval must be seconds > 0, got {poll_interval!r}"
            )
        if not isinstance(run_id, str):
            raise InvalidRunIdError(f"a run id must be a non-empty str, got {run_id!r}")
        if registry is not None:
            check_registry(registry, "OutputCapture.subscribe()")
        if not self._possible(run_id):
            # Client-supplied, as often as not (a URL): an unknown run, whatever the reason,
            # and no point in waiting for it.
            raise OutputNotFoundError(
                f"no output of run {reprlib.repr(run_id)} here: no run can have that id "
                + ("(it cannot name a log file)" if run_id else "(empty)")
            )
        subscription = OutputSubscription(self, run_id, first)
        source = self._source(run_id)
        released = self._released.get(run_id)
        if isinstance(source, RunRing):
            subscription._attach(source)
        elif released is not None:
            # Its end is known here: no registry needed.
            if source:
                subscription._follow_log()
            elif self.log_dir is not None and not released.lines:
                # A run that printed nothing never had a log file; there is nothing to replay.
                subscription._finish(released.end)
            else:
                raise OutputNotFoundError(
                    f"the buffered output of run {run_id!r} was released and there is no log file"
                )
        elif registry is not None and self.log_dir is not None:
            subscription._follow_registry(registry, poll_interval, wait is not False, deadline)
        elif source:
            subscription._follow_log()
        elif wait is False or self._closed:
            raise OutputNotFoundError(self._not_found_message(run_id, registry))
        else:
            subscription._wait_until(deadline)
        return subscription

    def _not_found_message(self, run_id: str, registry: BaseRunRegistry | None) -> str:
        """Why ``run_id`` is unknown here, with what to do about it: "wait" alone sent people
        into requests that never end when the run is written elsewhere."""
        head = f"no output of run {run_id!r} in this OutputCapture"
        if self._closed:
            return f"{head}: the capture is closed"
        if registry is not None:
            # self.log_dir is None here, or the registry would have been followed.
            return (
                f"{head}: registry= follows another process's run through its log file, so "
                "it needs an OutputCapture with the same log_dir as that process's"
            )
        return (
            f"{head}: a ModuleRunner or BackgroundTaskManager writes only to the capture given "
            "as its output=; a run of another process (uvicorn --workers) needs registry= and "
            "a shared log_dir; a run not started yet needs wait=True"
        )

    def _possible(self, run_id: str) -> bool:
        """Whether a run of this capture can have ``run_id`` (see :meth:`_open`)."""
        if self.log_dir is None:
            return bool(run_id)
        try:
            log_file_name(run_id)
        except InvalidRunIdError:
            return False
        return True

    @staticmethod
    def _first_seq(from_seq: int | None, after: int | None) -> int:
        for name, value in (("from_seq", from_seq), ("after", after)):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 0
            ):
                raise InvalidSubscriptionError(f"{name} must be an int >= 0, got {value!r}")
        if from_seq is not None and after is not None:
            raise InvalidSubscriptionError("pass from_seq or after, not both")
        if from_seq is not None:
            return from_seq
        return 0 if after is None else after + 1

    # -- reading the buffer ---------------------------------------------------------------------
    def get_lines(self, run_id: str) -> list[str]:
        """Return the buffered lines of ``run_id`` (empty for an unknown or released run)."""
        run_id = _run_id(run_id)
        self._flush(run_id)
        ring = self._runs.get(run_id)
        return [] if ring is None else ring.lines[ring.head :]

    def tail(self, run_id: str, max_lines: int, max_bytes: int = DEFAULT_TAIL_BYTES) -> list[str]:
        """Return the last buffered lines of ``run_id``: at most ``max_lines`` and ``max_bytes``
        UTF-8 bytes in all (a single longer line is cut, and says so)."""
        run_id = _run_id(run_id)
        tail = OutputTail(max_lines, max_bytes)
        self._flush(run_id)
        ring = self._runs.get(run_id)
        if ring is not None and max_lines:
            tail.extend(ring.lines[max(ring.head, len(ring.lines) - max_lines) :])
        return list(tail)

    def dropped_count(self, run_id: str) -> int:
        """Return how many of ``run_id``'s lines are no longer buffered."""
        run_id = _run_id(run_id)
        self._flush(run_id)
        ring = self._runs.get(run_id)
        return 0 if ring is None else ring.first_seq

    def line_count(self, run_id: str) -> int:
        """Return how many lines ``run_id`` produced in total (0 once released)."""
        run_id = _run_id(run_id)
        self._flush(run_id)
        ring = self._runs.get(run_id)
        return 0 if ring is None else ring.next_seq

    def is_closed(self, run_id: str) -> bool:
        """Return ``True`` once :meth:`close_run` was called for ``run_id``."""
        ring = self._runs.get(_run_id(run_id))
        return run_id in self._released if ring is None else ring.closed

    def log_path(self, run_id: str) -> Path | None:
        """Return the path of ``run_id``'s log file, or ``None`` without a ``log_dir``.

        Raises:
            InvalidRunIdError: ``run_id`` cannot name a log file.
        """
        return None if self.log_dir is None else run_log_path(self.log_dir, run_id)

    async def aclose(self) -> None:
        """End every subscription and, with a ``log_dir``, flush and close all log files and stop
        the writer thread. Later appends raise ``OutputClosedError``. Idempotent. Buffers stay
        readable through :meth:`get_lines`.

        Cancellation: the writer thread still finishes writing and stops. Called inside an
        anyio scope that is already cancelled (a ``finally`` block after ``move_on_after``), it
        waits for that, shielded from the scope.
        """
        self._flush_all()
        handle = self._flush_handle
        if handle is not None:
            handle.cancel()
            self._flush_handle = None
        self._closed = True
        for ring in self._runs.values():
            ring.close(None)
        for timer in self._expiry.values():
            timer.cancel()
        self._expiry.clear()
        waiting = [w for waiters in self._run_waiters.values() for w in waiters]
        self._run_waiters.clear()
        for waiter in waiting:
            if not waiter.done():
                waiter.set_result(None)
        if self._log is not None:
            await self._log.aclose()
