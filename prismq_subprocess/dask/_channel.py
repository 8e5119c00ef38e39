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

Memory on the worker is bounded by the forwarder's subscription queue and its send rate (one
batch of at most ``max_batch_lines`` lines / ``max_batch_chars`` characters per ``flush_interval``):
a module printing faster than that loses its oldest queued lines, counted, and the host sees the
gap in the sequence numbers. Locally a subscriber that falls behind is treated the same way.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Any, Final

from .._background._output_capture import OutputGap, OutputLine, OutputSubscription

__all__ = [
    "END",
    "LINES",
    "STARTED",
    "OutputForwarder",
    "cancel_event_name",
    "started_event_name",
    "task_key",
]

STARTED: Final = "started"
"""Message kind: the child started (``pid``, ``mode``, ``create_time``, ``worker``, ``host``)."""
LINES: Final = "lines"
"""Message kind: consecutive lines starting at sequence number ``seq``."""
END: Final = "end"
"""Message kind: the output ended after ``lines`` lines."""

Message = dict[str, Any]


def cancel_event_name(token: str, run_id: str) -> str:
    """The ``distributed.Event`` a host sets to stop one run."""
    return f"prismq-cancel-{token}-{run_id}"


def started_event_name(token: str, run_id: str) -> str:
    """The ``distributed.Event`` the first attempt of a run sets, so a retry on another worker
    (after the first one died) knows the module already started once."""
    return f"prismq-started-{token}-{run_id}"


def task_key(token: str, run_id: str) -> str:
    """The Dask task key of one run (shown on the dashboard)."""
    return f"prismq-run-{token}-{run_id}"


class OutputForwarder:
    """Worker side: sends one run's lines, read from an :class:`OutputSubscription`, in
    order and in batches, through ``send`` (``Worker.log_event`` for the host's topic).

    A batch goes out when it is full, or ``flush_interval`` after the previous one (at once
    after a quiet spell, so the first line of a burst is not delayed). A full batch waits for
    its turn, so at most one batch per ``flush_interval`` leaves: meanwhile the subscription's
    bounded queue takes the lines and drops the oldest if the module prints even faster.
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
        self._batch: list[str] = []
        self._batch_chars = 0
        self._first_seq = 0
        self._last_send = -math.inf
        self.lines_sent = 0
        self.dropped = 0

    def message(self, kind: str, **fields: Any) -> Message:
        """A message of ``kind`` for this run (with the run id and attempt)."""
        return {**self._header, "kind": kind, **fields}

    def _flush(self) -> None:
        if self._batch:
            self._send(self.message(LINES, seq=self._first_seq, lines=self._batch))
            self.lines_sent += len(self._batch)
            self._batch = []
            self._batch_chars = 0
        self._last_send = asyncio.get_running_loop().time()

    def _full(self) -> bool:
        return len(self._batch) >= self._max_lines or self._batch_chars >= self._max_chars

    async def _next(self, wait: float | None) -> OutputLine | OutputGap | None:
        """The next item, ``None`` at the end; ``TimeoutError`` after ``wait`` seconds."""
        try:
            if wait is None:
                return await anext(self._subscription)
            async with asyncio.timeout(wait):
                return await anext(self._subscription)
        except StopAsyncIteration:
            return None

    async def run(self) -> None:
        """Forward until the subscription ends (the run's output is closed), then send what
        is left. Cancellation: stops forwarding; lines not yet sent are not sent."""
        loop = asyncio.get_running_loop()
        while True:
            wait: float | None = None
            if self._batch:
                wait = self._last_send + self._interval - loop.time()
                if self._full():
                    if wait > 0:
                        await asyncio.sleep(wait)
                    self._flush()
                    continue
                if wait <= 0:
                    self._flush()
                    continue
            try:
                item = await self._next(wait)
            except TimeoutError:
                continue
            if item is None:
                break
            if isinstance(item, OutputGap):
                # The next line does not follow this batch: close it (the host counts the gap
                # from the sequence numbers).
                self.dropped += item.dropped
                self._flush()
                continue
            if not self._batch:
                self._first_seq = item.seq
            self._batch.append(item.text)
            self._batch_chars += len(item.text)
        self._flush()
