"""The wire between a worker running a module and the host that started it.

Channel choice: Dask's event topics (``Worker.log_event`` -> scheduler -> ``Client.subscribe_topic``
handlers). A worker's messages to the scheduler, and the scheduler's to a client, travel over one
ordered batched stream each, and the client handles them in order, before it learns that the
task finished; so lines arrive in order and the last ones before the result. Each message carries
the run id, the attempt and a line sequence number, so the host can still prove nothing is
missing: the final ``end`` message states how many lines there were. The scheduler keeps only the
newest ``distributed.admin.low-level-log-length`` messages of a topic (1,000 by default), so
nothing grows there. A Dask ``Queue`` would cost two scheduler calls per batch; pub/sub is
marked experimental.

Memory on the worker is bounded by the run's ring buffer there (``OutputCapture`` bounds, in lines
and bytes) and the send rate (one batch per ``flush_interval``): a module printing faster than
that loses the oldest lines the ring no longer holds, counted, and the host sees the gap in the
sequence numbers. Locally a subscriber that falls behind the ring is treated the same way.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable
from typing import Any, Final

from .._background._output_capture import (
    OutputCapture,
    OutputChunk,
    OutputGap,
    OutputSubscription,
)
from .._background._output_items import utf8_size
from .._background._output_ring import RunRing

__all__ = [
    "CHILD",
    "END",
    "LINES",
    "STARTED",
    "ForwardedOutput",
    "OutputForwarder",
    "cancel_event_name",
    "kill_event_name",
    "started_event_name",
    "task_key",
]

STARTED: Final = "started"
"""Message kind: the child started (``pid``, ``mode``, ``create_time``, ``worker``, ``host``)."""
CHILD: Final = "child"
"""Message kind: the child's identity (``pid``, ``create_time``, ``cookie``: its containment
cookie), sent after ``started``; what lets another worker stop the tree if this one dies."""
LINES: Final = "lines"
"""Message kind: consecutive lines starting at sequence number ``seq``. With ``more`` true it
holds one piece of line ``seq`` alone, whose next pieces follow in the next ``lines`` messages
of the run, the last one without ``more``: a line longer than a batch travels in pieces, so no
message (the scheduler keeps the newest of a topic) is larger than a batch."""
END: Final = "end"
"""Message kind: the output ended after ``lines`` lines."""

Message = dict[str, Any]


# Every name below is per execution (``execution`` counts the backend's executions), not per
# run id: a run id may come back on the same backend (its record deleted, another registry),
# and the scheduler may still hold the names of its earlier execution (a task key until the
# host's housekeeping releases it, the events of a run lost or withdrawn until the backend
# closes), which would hand the new run the old result or stop it before it starts. The
# execution comes before the run id, which may contain dashes: no two pairs give one name.


def cancel_event_name(token: str, execution: int, run_id: str) -> str:
    """The ``distributed.Event`` a host sets to stop one execution of a run."""
    return f"prismq-cancel-{token}-{execution}-{run_id}"


def kill_event_name(token: str, execution: int, run_id: str) -> str:
    """The ``distributed.Event`` a host sets, after the run's cancel event, to have its tree
    killed at once instead of after the rest of its grace period (the host shutdown's own
    grace is over)."""
    return f"prismq-kill-{token}-{execution}-{run_id}"


def started_event_name(token: str, execution: int, run_id: str) -> str:
    """The ``distributed.Event`` the first attempt of an execution sets, so a retry on another
    worker (after the first one died) knows the module already started once."""
    return f"prismq-started-{token}-{execution}-{run_id}"


def task_key(token: str, execution: int, run_id: str) -> str:
    """The Dask task key of one execution of a run (shown on the dashboard)."""
    return f"prismq-run-{token}-{execution}-{run_id}"


class ForwardedOutput(OutputCapture):
    """Worker side: the buffer of one run's output on its way to the host, which an
    :class:`OutputForwarder` reads. Bounded in lines (``max_lines``) and bytes like any
    capture, but it never cuts a line: the host's own capture cuts it to its
    ``max_line_bytes`` (with the right count in its note) and its log file keeps it whole, as
    for a local run. ``max_line_bytes`` is the host's: all it sets here is the size of the
    pieces the worker's runner reads a line without newline in, the same as the host's runner
    would; so the ring holds its bytes plus at most one such piece and one read. Nothing
    outlives the task, so no retention."""

    def __init__(self, max_lines: int, max_line_bytes: int) -> None:
        super().__init__(
            max_lines_per_run=max_lines,
            max_line_bytes=max_line_bytes,
            retain_ended_runs=None,
            retain_ended_bytes=None,
            retain_ended_seconds=None,
        )

    def _cut(self, ring: RunRing, line: str, seq: int) -> tuple[str, int]:
        # What the capture calls for each line longer than max_line_bytes.
        return line, utf8_size(line)


class OutputForwarder:
    """Worker side: sends one run's lines, read from an :class:`OutputSubscription` in chunks,
    in order, through ``send`` (``Worker.log_event`` for the host's topic).

    At most one batch leaves per ``flush_interval``: the first line after a quiet spell goes at
    once, and lines printed meanwhile wait in the run's ring buffer and go together in the next
    batch (split at ``max_batch_lines`` lines / ``max_batch_chars`` characters; a longer line
    goes whole, in pieces of ``max_batch_chars``: see :data:`LINES`). A module that
    prints faster than that loses the oldest lines the ring no longer holds; they are counted in
    :attr:`dropped` and the host sees the gap in the sequence numbers.
    """

    def __init__(
        self,
        subscription: OutputSubscription,
        send: Callable[[Message], None],
        header: Message,
        *,
        max_batch_lines: int,
        max_batch_chars: int,
        flush_interval: float,
    ) -> None:
        self._subscription = subscription
        self._send = send
        self._header = header
        self._max_lines = max_batch_lines
        self._max_chars = max_batch_chars
        self._interval = flush_interval
        self._last_send = -math.inf
        self._finishing = asyncio.Event()
        self.lines_sent = 0
        self.dropped = 0

    def message(self, kind: str, **fields: Any) -> Message:
        """A message of ``kind`` for this run (with the run id and attempt)."""
        return {**self._header, "kind": kind, **fields}

    def finish(self) -> None:
        """The run's output is closed: send what is left without waiting for the next turn."""
        self._finishing.set()

    def _send_chunk(self, chunk: OutputChunk) -> None:
        lines, first = chunk.lines, chunk.first_seq
        start = 0
        while start < len(lines):
            if len(lines[start]) > self._max_chars:
                self._send_pieces(first + start, lines[start])
                start += 1
                continue
            end, chars = start, 0
            limit = min(len(lines), start + self._max_lines)
            while end < limit and chars + len(lines[end]) <= self._max_chars:
                chars += len(lines[end])
                end += 1
            self._send(self.message(LINES, seq=first + start, lines=list(lines[start:end])))
            start = end
        self.lines_sent += len(lines)

    def _send_pieces(self, seq: int, line: str) -> None:
        size = self._max_chars
        last = (len(line) - 1) // size * size
        for start in range(0, last, size):
            self._send(self.message(LINES, seq=seq, lines=[line[start : start + size]], more=True))
        self._send(self.message(LINES, seq=seq, lines=[line[last:]]))

    async def run(self) -> None:
        """Forward until the subscription ends (the run's output is closed).

        Cancellation: stops forwarding; lines not yet sent are not sent.
        """
        loop = asyncio.get_running_loop()
        chunks = self._subscription.chunks(self._max_lines)
        while True:
            wait = self._last_send + self._interval - loop.time()
            if wait > 0 and not self._finishing.is_set():
                # Lines printed meanwhile gather in the ring and leave together.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._finishing.wait(), wait)
            try:
                item = await anext(chunks)
            except StopAsyncIteration:
                return
            if isinstance(item, OutputGap):
                self.dropped += item.dropped
                continue
            self._send_chunk(item)
            self._last_send = loop.time()
