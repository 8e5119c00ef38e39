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

from .._background._output_capture import OutputChunk, OutputGap, OutputSubscription

__all__ = [
    "CHILD",
    "END",
    "LINES",
    "STARTED",
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
"""Message kind: consecutive lines starting at sequence number ``seq``."""
END: Final = "end"
"""Message kind: the output ended after ``lines`` lines."""

Message = dict[str, Any]


def cancel_event_name(token: str, run_id: str) -> str:
    """The ``distributed.Event`` a host sets to stop one run."""
    return f"prismq-cancel-{token}-{run_id}"


def kill_event_name(token: str, run_id: str) -> str:
    """The ``distributed.Event`` a host sets, after the run's cancel event, to have its tree
    killed at once instead of after the rest of its grace period (the host shutdown's own
    grace is over)."""
    return f"prismq-kill-{token}-{run_id}"


def started_event_name(token: str, run_id: str) -> str:
    """The ``distributed.Event`` the first attempt of a run sets, so a retry on another worker
    (after the first one died) knows the module already started once."""
    return f"prismq-started-{token}-{run_id}"


def task_key(token: str, run_id: str) -> str:
    """The Dask task key of one run (shown on the dashboard)."""
    return f"prismq-run-{token}-{run_id}"


class OutputForwarder:
    """Worker side: sends one run's lines, read from an :class:`OutputSubscription` in chunks,
    in order, through ``send`` (``Worker.log_event`` for the host's topic).

    At most one batch leaves per ``flush_interval``: the first line after a quiet spell goes at
    once, and lines printed meanwhile wait in the run's ring buffer and go together in the next
    batch (split at ``max_batch_lines`` lines / ``max_batch_chars`` characters). A module that
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
            end, chars = start, 0
            limit = min(len(lines), start + self._max_lines)
            while end < limit and (end == start or chars + len(lines[end]) <= self._max_chars):
                chars += len(lines[end])
                end += 1
            self._send(self.message(LINES, seq=first + start, lines=list(lines[start:end])))
            start = end
        self.lines_sent += len(lines)

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
