"""One run's buffered output: :class:`RunRing`, a ring of the newest lines bounded by count and
UTF-8 bytes, read by any number of subscribers through their own cursors (as ``journalctl -f``
readers share one journal). Appending touches no per-subscriber state."""

from __future__ import annotations

import asyncio

from ._output_items import NO_TRUNCATION, OutputChunk, OutputEnd, utf8_size

__all__ = ["RunRing"]

# Compact the line list once this many evicted slots have piled up at its front (and they are
# at least as many as the kept lines), so eviction stays O(1) amortised.
_COMPACT_AFTER = 256
# An eviction frees 1/16 of the ring at once, so that a full ring is not trimmed on every
# append; with fewer than 16 lines (or bytes) the bounds are exact.
_SLACK_DIVISOR = 16


class RunRing:
    """The newest lines of one run plus its state; lines ``first_seq ..`` are
    ``lines[head:]``. The owner (``OutputCapture``) appends and, once ``len(lines) > limit`` or
    ``nbytes > max_bytes``, calls :meth:`evict`; subscribers only read.

    The ring never holds more than ``max_lines`` lines, nor more than ``max_bytes`` bytes unless
    that is its newest line alone.
    """

    __slots__ = (
        "arriving",
        "closed",
        "end",
        "first_seq",
        "head",
        "keep_bytes",
        "keep_lines",
        "limit",
        "lines",
        "max_bytes",
        "max_lines",
        "nbytes",
        "released",
        "since_yield_bytes",
        "since_yield_lines",
        "subscribers",
        "truncated",
        "waiters",
    )

    def __init__(self, max_lines: int, max_bytes: int) -> None:
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self.keep_lines = max_lines - max_lines // _SLACK_DIVISOR
        self.keep_bytes = max_bytes - max_bytes // _SLACK_DIVISOR
        self.limit = max_lines  # evict once len(lines) exceeds this (head + max_lines)
        self.lines: list[str] = []
        self.head = 0
        self.first_seq = 0
        self.nbytes = 0
        # seq -> bytes cut, for the (rare) lines longer than max_line_bytes still in the ring.
        self.truncated: dict[int, int] = {}
        self.closed = False
        self.released = False
        self.end: OutputEnd | None = None
        # Futures of subscribers waiting for more; all are woken (and dropped) together.
        self.waiters: list[asyncio.Future[None]] = []
        # Subscriptions reading this ring; while there are any, the producer yields to the event
        # loop every half ring so that they can keep up.
        self.subscribers = 0
        # The run-appearance futures of subscriptions woken by the run's opening that have not
        # attached yet; each is counted in ``subscribers`` until it does (or gives up).
        self.arriving: set[asyncio.Future[None]] = set()
        self.since_yield_lines = 0
        self.since_yield_bytes = 0

    @property
    def next_seq(self) -> int:
        """The seq the next appended line gets (= the number of lines so far)."""
        return self.first_seq + len(self.lines) - self.head

    def evict(self) -> None:
        """If over a bound, drop the oldest lines down to 15/16 of both bounds; the newest line
        is always kept."""
        lines = self.lines
        old_head = head = self.head
        count = len(lines) - head
        nbytes = self.nbytes
        if count <= self.max_lines and nbytes <= self.max_bytes:
            return
        drop = count - self.keep_lines
        if drop > 0:
            # One join, then O(1) isascii and len: cheaper than a size per dropped line (the
            # UTF-8 size of a concatenation is the sum of the parts' sizes).
            nbytes -= utf8_size("".join(lines[head : head + drop]))
            head += drop
            count -= drop
        while count > 1 and nbytes > self.keep_bytes:
            nbytes -= utf8_size(lines[head])
            head += 1
            count -= 1
        self.first_seq += head - old_head
        self.nbytes = nbytes
        if head >= _COMPACT_AFTER and head >= count:
            del lines[:head]
            head = 0
        else:
            lines[old_head:head] = [""] * (head - old_head)  # free the texts now: bytes bound
        self.head = head
        self.limit = head + self.max_lines
        truncated = self.truncated
        if truncated:
            first = self.first_seq
            for seq in [seq for seq in truncated if seq < first]:
                del truncated[seq]

    def read(self, cursor: int, limit: int) -> OutputChunk:
        """Return up to ``limit`` lines from seq ``cursor`` (which must be in the ring)."""
        start = self.head + cursor - self.first_seq
        lines = self.lines[start : start + limit]
        truncated = self.truncated
        if truncated:
            stop = cursor + len(lines)
            cut = {seq: n for seq, n in truncated.items() if cursor <= seq < stop}
            return OutputChunk(cursor, lines, cut or NO_TRUNCATION)
        return OutputChunk(cursor, lines)

    def wake(self) -> None:
        """Wake every waiting subscriber; a waiter of an event loop that was closed (with its
        subscriber's task left pending) is dropped: it would fail the producer."""
        waiters = self.waiters
        self.waiters = []
        for waiter in waiters:
            if not waiter.done() and not waiter.get_loop().is_closed():
                waiter.set_result(None)

    def close(self, end: OutputEnd | None) -> None:
        """Mark the end of the output (with how the run ended, if known) and wake everyone."""
        self.closed = True
        if end is not None and (self.end is None or self.end.status is None):
            self.end = end
        self.wake()

    def release(self) -> None:
        """Free the buffered lines (the run stays closed); readers behind fall back to the log
        file or get a gap."""
        self.first_seq = self.next_seq
        self.lines = []
        self.head = 0
        self.limit = self.max_lines
        self.nbytes = 0
        self.truncated = {}
        self.released = True
        self.closed = True
        self.wake()
