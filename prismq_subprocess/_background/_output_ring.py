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


class RunRing:
    """The newest lines of one run plus its state; lines ``first_seq ..`` are
    ``lines[head:]``. The owner (``OutputCapture``) appends and evicts; subscribers only read.
    """

    __slots__ = (
        "closed",
        "end",
        "first_seq",
        "head",
        "lines",
        "nbytes",
        "released",
        "since_yield_bytes",
        "since_yield_lines",
        "subscribers",
        "truncated",
        "waiters",
    )

    def __init__(self) -> None:
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
        self.since_yield_lines = 0
        self.since_yield_bytes = 0

    @property
    def next_seq(self) -> int:
        """The seq the next appended line gets (= the number of lines so far)."""
        return self.first_seq + len(self.lines) - self.head

    def evict(self, max_lines: int, max_bytes: int) -> None:
        """Drop the oldest lines until at most ``max_lines`` and ``max_bytes`` are kept; the newest
        line is always kept."""
        lines = self.lines
        head = self.head
        count = len(lines) - head
        nbytes = self.nbytes
        while count > 1 and (count > max_lines or nbytes > max_bytes):
            nbytes -= utf8_size(lines[head])
            lines[head] = ""  # free the text now: the byte bound is about memory
            head += 1
            count -= 1
        self.first_seq += head - self.head
        self.nbytes = nbytes
        if head >= _COMPACT_AFTER and head >= count:
            del lines[:head]
            head = 0
        self.head = head
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
        """Wake every waiting subscriber."""
        waiters = self.waiters
        self.waiters = []
        for waiter in waiters:
            if not waiter.done():
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
        self.nbytes = 0
        self.truncated = {}
        self.released = True
        self.closed = True
        self.wake()
