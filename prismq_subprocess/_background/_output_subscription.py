"""Following one run's output: :class:`OutputSubscription` (made by ``OutputCapture.subscribe``).

A subscription is a cursor (the seq of the next line it wants) over the run's ring buffer. When
the cursor is older than the ring's first line it reads the missing lines from the run's log file
if there is one, else it yields one :class:`OutputGap` with their count and jumps to the ring.
When it has caught up it waits, with the other waiting subscribers, for the next append.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Self

from .._core._closing import AsyncClosing
from .._core._exceptions import (
    InvalidSubscriptionError,
    OutputNotFoundError,
    OutputWaitTimeoutError,
)
from ._log_names import run_log_path
from ._memory_registry import OWNER_CHECK_INTERVAL, BaseRunRegistry, owner_lives, settle_orphan
from ._output_items import (
    NO_TRUNCATION,
    OutputChunk,
    OutputEnd,
    OutputGap,
    OutputItem,
    OutputLine,
)
from ._output_log import INDEX_EVERY, LogRead, LogState, read_log_lines
from ._output_ring import RunRing

if TYPE_CHECKING:
    from ._output_capture import OutputCapture

__all__ = ["DEFAULT_CHUNK_LINES", "OutputChunks", "OutputSubscription"]

logger = logging.getLogger(__name__)

#: Lines per chunk unless ``chunks(max_lines=...)`` says otherwise.
DEFAULT_CHUNK_LINES = 1024


def _retrieve(future: asyncio.Future[LogRead]) -> None:
    # The outcome of a read nobody awaits any more (its subscription was closed) is taken
    # here, so that an error is not reported as never retrieved.
    if not future.cancelled():
        future.exception()


class OutputSubscription(AsyncClosing):
    """Async iterator over one run's output: the lines from its starting seq on, live ones as
    they come, until the run's output is closed.

    Yields :class:`OutputLine` and :class:`OutputGap` items (:meth:`chunks` gives the same as
    :class:`OutputChunk` batches, much cheaper per line). Ends (``StopAsyncIteration``) once the
    run is closed and everything was yielded, or after :meth:`aclose`; then :attr:`end` says how
    the run ended, if the producer told. Use it as ``async with capture.subscribe(run_id) as sub:
    async for item in sub: ...``; an abandoned subscription holds nothing the producer waits for.

    A subscriber that keeps up never misses a line. One that falls more than the ring buffer
    behind reads the missed lines from the run's log file when the capture has a ``log_dir``,
    otherwise it gets one :class:`OutputGap` with their count and carries on with the oldest
    buffered line. The producer never waits for a subscriber.

    A run that another process writes (made with ``registry=``; see
    ``OutputCapture.subscribe``) is followed from its log file: complete lines as they reach
    the file, until the registry records the run's final status; then the rest of the file is
    read and :attr:`end` is that status. Ids (seqs) are the same as in the owner's process.
    Closing the capture ends such a subscription at once, not at its next poll (:attr:`end`
    ``None``).

    Cancellation: cancelling ``__anext__`` (e.g. a heartbeat timeout around it) loses nothing:
    the next call carries on where it left off.

    Raises (from iteration):
        OutputWaitTimeoutError: made with ``wait=<seconds>`` and the run did not appear in time.
        OutputNotFoundError: made with ``registry=`` and ``wait=False``, and the run is neither
            in the registry nor has a log file.
    """

    def __init__(self, capture: OutputCapture, run_id: str, first_seq: int) -> None:
        self._capture = capture
        self._run_id = run_id
        self._cursor = first_seq
        self._ring: RunRing | None = None
        self._log_only = False
        self._deadline: float | None = None
        self._done = False
        self._chunk: OutputChunk | None = None
        self._chunk_pos = 0
        self._log_start: tuple[int, int] | None = None  # (seq, offset) after our last log read
        self._waiter: asyncio.Future[None] | None = None
        # A log read in progress, by (cursor, count, growing): see _read_log.
        self._reading: tuple[tuple[int, int, bool], asyncio.Future[LogRead]] | None = None
        # Following another process's run (see _follow_registry).
        self._registry: BaseRunRegistry | None = None
        self._poll_interval = 0.05
        self._may_wait = False
        self._final: OutputEnd | None = None
        self._final_known = False
        # When to check the owner next (loop time); kept across reads: a read cut short by a
        # heartbeat more often than OWNER_CHECK_INTERVAL must not put the check off for good.
        self._next_owner_check: float | None = None
        self.dropped = 0
        """How many lines this subscriber was told (by :class:`OutputGap` items) it missed."""
        self.end: OutputEnd | None = None
        """How the run ended (from ``close_run``); set once iteration has ended."""

    # -- set up by OutputCapture.subscribe ------------------------------------------------------
    def _attach(self, ring: RunRing) -> None:
        self._ring = ring
        ring.subscribers += 1

    def _follow_log(self) -> None:
        self._log_only = True

    def _wait_until(self, deadline: float | None) -> None:
        self._deadline = deadline

    def _follow_registry(
        self,
        registry: BaseRunRegistry,
        poll_interval: float,
        may_wait: bool,
        deadline: float | None,
    ) -> None:
        self._log_only = True
        self._registry = registry
        self._poll_interval = poll_interval
        self._may_wait = may_wait
        self._deadline = deadline

    def _finish(self, end: OutputEnd | None) -> None:
        if not self._done:
            self._done = True
            self.end = end
        ring = self._ring
        if ring is not None:
            self._ring = None
            ring.subscribers -= 1

    def __del__(self) -> None:
        ring = getattr(self, "_ring", None)
        if ring is not None:
            # Cleared: collected in a reference cycle (a stream a server dropped without
            # closing it), this runs before the generator holding us is closed by its
            # finalizer, whose aclose() then calls _finish, which must not count us again.
            self._ring = None
            ring.subscribers -= 1

    @property
    def run_id(self) -> str:
        """The run followed."""
        return self._run_id

    @property
    def next_seq(self) -> int:
        """The seq of the next line this subscription will yield (a resume point)."""
        chunk = self._chunk
        return self._cursor if chunk is None else chunk.first_seq + self._chunk_pos

    # -- iteration ------------------------------------------------------------------------------
    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> OutputItem:
        chunk = self._chunk
        if chunk is None:
            ring = self._ring
            if ring is not None:
                # Fast path: the next line is in the ring.
                cursor = self._cursor
                index = ring.head + cursor - ring.first_seq
                if ring.head <= index < len(ring.lines):
                    self._cursor = cursor + 1
                    cut = ring.truncated.get(cursor, 0) if ring.truncated else 0
                    return OutputLine(cursor, ring.lines[index], cut)
            fetched = await self._fetch(DEFAULT_CHUNK_LINES)
            if fetched is None:
                raise StopAsyncIteration
            if isinstance(fetched, OutputGap):
                return fetched
            chunk = self._chunk = fetched
            self._chunk_pos = 0
        position = self._chunk_pos
        seq = chunk.first_seq + position
        if position + 1 >= len(chunk.lines):
            self._chunk = None
        else:
            self._chunk_pos = position + 1
        cut = chunk.truncated.get(seq, 0) if chunk.truncated else 0
        return OutputLine(seq, chunk.lines[position], cut)

    def chunks(self, max_lines: int = DEFAULT_CHUNK_LINES) -> OutputChunks:
        """Iterate in batches: :class:`OutputChunk` (up to ``max_lines`` consecutive lines) and
        :class:`OutputGap` items, with the same cancellation guarantee as item iteration. Shares
        this subscription's position (items and chunks can be mixed).

        Raises:
            InvalidSubscriptionError: ``max_lines`` is not an int >= 1.
        """
        if isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines < 1:
            raise InvalidSubscriptionError(f"max_lines must be an int >= 1, got {max_lines!r}")
        return OutputChunks(self, max_lines)

    async def _next_chunk(self, max_lines: int) -> OutputChunk | OutputGap | None:
        chunk = self._chunk
        if chunk is not None:
            position = self._chunk_pos
            self._chunk = None
            if position == 0 and len(chunk.lines) <= max_lines:
                return chunk
            first = chunk.first_seq + position
            rest = OutputChunk(first, chunk.lines[position:], chunk.truncated)
            if len(rest.lines) > max_lines:
                self._chunk = rest
                self._chunk_pos = max_lines
                return OutputChunk(first, rest.lines[:max_lines], chunk.truncated)
            return rest
        return await self._fetch(max_lines)

    async def _fetch(self, limit: int) -> OutputChunk | OutputGap | None:
        """The next lines (at most ``limit``), a gap, or ``None`` at the end. Changes the cursor
        only when it returns, so a cancelled call loses nothing."""
        while not self._done:
            ring = self._ring
            if ring is None:
                if self._registry is not None:
                    return await self._follow_file(self._registry, limit)
                if self._log_only:
                    return await self._read_log_only(limit)
                gap = await self._wait_for_run()
                if gap is not None:
                    return gap
                continue
            cursor = self._cursor
            if cursor < ring.first_seq:
                return await self._catch_up(ring, limit)
            if cursor < ring.next_seq:
                chunk = ring.read(cursor, limit)
                self._cursor = chunk.next_seq
                return chunk
            if ring.closed:
                self._finish(ring.end)
                return None
            await self._wait_for_lines(ring)
        return None

    async def _wait_for_lines(self, ring: RunRing) -> None:
        waiter = asyncio.get_running_loop().create_future()
        ring.waiters.append(waiter)
        self._waiter = waiter
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter in ring.waiters:
                ring.waiters.remove(waiter)
            raise
        finally:
            self._waiter = None

    async def _wait_for_run(self) -> OutputGap | None:
        """Wait for the run to appear, then follow it; an :class:`OutputGap` for what it had if
        it was released before this woke up (the subscription has then ended)."""
        capture = self._capture
        while True:
            source = capture._source(self._run_id)
            if isinstance(source, RunRing):
                self._attach(source)
                return None
            if source:
                self._follow_log()
                return None
            released = capture._released.get(self._run_id)
            if released is not None:
                # Opened, closed and released (a retention of 0, or all in one loop turn)
                # before this task ran, and no log file: what an attached subscriber gets, one
                # gap for the lines it did not read, then the run's end.
                self._finish(released.end)
                missing = released.lines - self._cursor
                if missing > 0:
                    self._cursor += missing
                    self.dropped += missing
                    return OutputGap(missing)
                return None
            if capture.closed:
                self._finish(None)
                return None
            remaining = None if self._deadline is None else self._deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                raise OutputWaitTimeoutError(
                    f"run {self._run_id!r} did not appear in the output capture in time"
                )
            waiter = capture._run_waiter(self._run_id)
            self._waiter = waiter
            try:
                async with asyncio.timeout(remaining):
                    await waiter
            except TimeoutError:
                continue  # the deadline check above raises
            finally:
                self._waiter = None
                capture._drop_run_waiter(self._run_id, waiter)

    # -- reading from the log file --------------------------------------------------------------
    def _start_for(self, state: LogState | None, cursor: int) -> tuple[int, int]:
        best = (0, 0)
        if state is not None and state.offsets:
            slot = min(cursor // INDEX_EVERY, len(state.offsets) - 1)
            best = (slot * INDEX_EVERY, state.offsets[slot])
        mine = self._log_start
        if mine is not None and best[0] <= mine[0] <= cursor:
            best = mine
        return best

    async def _read_log(
        self,
        state: LogState | None,
        cursor: int,
        count: int,
        *,
        growing: bool = False,
        absent_ok: bool = False,
    ) -> OutputChunk | None:
        capture = self._capture
        assert capture.log_dir is not None
        # A read cancelled by a timeout around __anext__ (a heartbeat) goes on in its thread,
        # and the next call from the same line takes its result (at most `count` lines):
        # starting over each time, a read longer than the timeout (a long file to skip
        # through) never finished, and every attempt held a thread of the default executor.
        reading = self._reading
        if (
            reading is None
            or reading[0][0] != cursor
            or reading[0][1] > count
            or reading[0][2] != growing
        ):
            future = asyncio.ensure_future(
                asyncio.to_thread(
                    read_log_lines,
                    run_log_path(capture.log_dir, self._run_id),
                    cursor,
                    count,
                    start=self._start_for(state, cursor),
                    max_bytes=capture.max_bytes_per_run,
                    max_line_bytes=capture.max_line_bytes,
                    complete_only=growing,
                )
            )
            future.add_done_callback(_retrieve)
            reading = self._reading = ((cursor, count, growing), future)
        kept = False
        try:
            result = await asyncio.shield(reading[1])
        except asyncio.CancelledError:
            kept = not reading[1].cancelled()  # we were cancelled, not the read
            raise
        except FileNotFoundError:
            # A growing file may simply not exist yet.
            if not (growing or absent_ok):
                logger.warning("the output log of run %s is gone", self._run_id)
            return None
        except OSError as exc:
            logger.warning("cannot read the output log of run %s: %s", self._run_id, exc)
            return None
        finally:
            if not kept:
                self._reading = None
        # Kept even without lines: a follower polling a quiet run from the end of a long file
        # skipped all of it again from line 0 at every poll.
        self._log_start = (result.next_seq, result.offset)
        if not result.lines:
            return None
        self._cursor = result.next_seq
        return OutputChunk(result.first_seq, result.lines, result.truncated or NO_TRUNCATION)

    async def _catch_up(self, ring: RunRing, limit: int) -> OutputChunk | OutputGap:
        """The cursor is older than the ring: read from the log, or report a gap."""
        cursor = self._cursor
        log = self._capture._log
        if log is not None:
            state = log.state(self._run_id)
            wanted = min(ring.first_seq, cursor + limit)
            if state is not None:
                # The lines left the ring, so they are queued for the file: wait for the flush.
                await log.wait_flushed(self._run_id, state, wanted)
                readable = min(wanted, state.written)
            else:
                # Nothing known: a closed run's file is complete (close_run waited for it).
                readable = wanted if ring.closed else cursor
            if readable > cursor:
                chunk = await self._read_log(state, cursor, readable - cursor)
                if chunk is not None:
                    return chunk
        # The ring may have moved on while we read or waited.
        missing = max(0, ring.first_seq - self._cursor)
        self._cursor += missing
        self.dropped += missing
        return OutputGap(missing)

    async def _read_log_only(self, limit: int) -> OutputChunk | OutputGap | None:
        """Replay a run known only from its log file (released, or from an earlier process).
        Where the file ends before the lines this capture knows the run had (its writes failed:
        a full disk), the rest is one gap rather than a silent end."""
        chunk = await self._read_log(None, self._cursor, limit)
        if chunk is None:
            capture = self._capture
            missing = capture._released_lines(self._run_id) - self._cursor
            if missing > 0:
                self._cursor += missing
                self.dropped += missing
                return OutputGap(missing)
            self._finish(capture._released_end(self._run_id))
        return chunk

    async def _follow_file(self, registry: BaseRunRegistry, limit: int) -> OutputChunk | None:
        """Follow a run written by another process: complete lines from its log file as they
        come, until the registry has its final status; then the rest of the file, then the end.
        Ends at once, without an end, when the capture is closed.

        The owner closes the log before it records the final status (``ModuleRunner``), so the
        read after seeing that status gets every line.
        """
        loop = asyncio.get_running_loop()
        if self._next_owner_check is None:
            self._next_owner_check = loop.time() + OWNER_CHECK_INTERVAL
        while not self._done:
            if self._capture.closed:
                self._finish(None)
                return None
            final = self._final_known
            # Seqs are line numbers in the file: from line 0 on, a missing file may just be
            # that of a run that printed nothing (it never gets one).
            chunk = await self._read_log(
                None, self._cursor, limit, growing=not final, absent_ok=self._cursor == 0
            )
            if chunk is not None:
                return chunk
            if final:
                self._finish(self._final)
                return None
            run = await registry.get_run(self._run_id)
            if run is None:
                if self._capture._source(self._run_id):
                    # Deleted from the registry (retention), but its log is there: replay it.
                    self._final_known = True
                    continue
                self._check_may_wait()
            elif run.is_finished:
                self._final = OutputEnd(run.status.value, run.exit_code)
                self._final_known = True
                continue
            elif loop.time() >= self._next_owner_check:
                self._next_owner_check = loop.time() + OWNER_CHECK_INTERVAL
                owner = run.owner
                if owner is None or not await owner_lives(owner, registry):
                    # Its owner died: mark it INTERRUPTED (whoever notices first does).
                    seen = await settle_orphan(registry, self._run_id)
                    if seen is not None:  # read-only: end with what a writer will record
                        self._final = OutputEnd(seen.status.value, seen.exit_code)
                        self._final_known = True
                    continue
            await self._pause()
        return None

    async def _pause(self) -> None:
        """Wait a poll interval, or less: the capture's ``aclose`` (and ours) wakes run waiters,
        so a host waiting for its streams at shutdown does not wait for the next poll."""
        capture = self._capture
        waiter = capture._run_waiter(self._run_id)
        self._waiter = waiter
        try:
            await asyncio.wait((waiter,), timeout=self._poll_interval)
        finally:
            self._waiter = None
            capture._drop_run_waiter(self._run_id, waiter)

    def _check_may_wait(self) -> None:
        if not self._may_wait:
            raise OutputNotFoundError(
                f"run {self._run_id!r} is not in the registry and has no output log "
                "(pass wait=True to wait for it)"
            )
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise OutputWaitTimeoutError(f"run {self._run_id!r} did not appear in time")

    # -- closing --------------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop following: end the iteration (a pending ``__anext__`` returns at once).
        Idempotent."""
        chunk = self._chunk
        if chunk is not None:
            # Lines fetched but not yielded yet are not consumed: next_seq (the resume point)
            # stays at the first of them.
            self._cursor = chunk.first_seq + self._chunk_pos
            self._chunk = None
        self._finish(self.end)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class OutputChunks:
    """Async iterator of :class:`OutputChunk` / :class:`OutputGap` (see
    :meth:`OutputSubscription.chunks`). Cancelling ``__anext__`` loses nothing."""

    def __init__(self, subscription: OutputSubscription, max_lines: int) -> None:
        self._subscription = subscription
        self._max_lines = max_lines

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> OutputChunk | OutputGap:
        item = await self._subscription._next_chunk(self._max_lines)
        if item is None:
            raise StopAsyncIteration
        return item
