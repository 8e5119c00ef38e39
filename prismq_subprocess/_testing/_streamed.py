"""DRY_RUN answers whose output arrives over time, line by line, as a real child's would."""

from __future__ import annotations

import asyncio
import math
import subprocess
from dataclasses import dataclass
from typing import Any

from .._core._process import ProcessLike
from .._core._run_process import ChildRun
from .._strategies._base import RunStart, SpawnRequest, SubprocessStrategy
from .._strategies._dry_run import (
    DryRunProcess,
    DryRunRecorder,
    DryRunResponse,
    DryRunStrategy,
    _fake_pids,
    signal_that_ends,
)
from .._strategies._process_base import ProcessBase
from .._strategies._stdin_buffer import BufferedStdin

__all__ = ["StreamedDryRunProcess", "StreamedResponse", "StreamingDryRunStrategy"]


@dataclass(frozen=True)
class StreamedResponse(DryRunResponse):
    """A :class:`DryRunResponse` whose stdout arrives one line at a time.

    Line ``i`` (0-based) appears ``(i + 1) * line_delay`` seconds after the start; the process
    exits (and stderr, if any, is written) at ``duration``, never earlier than the last line.
    ``stdout`` holds all the lines: what ``run()``, which waits for the end, returns.
    """

    lines: tuple[bytes, ...] = ()
    line_delay: float = 0.0


class StreamedDryRunProcess(ProcessBase):
    """A fake process that writes its scripted lines on a timetable, then exits.

    Each step is scheduled from the previous one (at absolute loop times, so delays do not
    drift), which keeps lines in order even when several fall due at the same moment.
    Terminating or killing it cancels what is left, ends its streams and sets ``-signal``.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: SpawnRequest,
        response: StreamedResponse,
        recorder: DryRunRecorder,
        index: int,
    ) -> None:
        super().__init__(loop, next(_fake_pids))
        self._recorder = recorder
        self._index = index
        self._response = response
        if request.stdin == subprocess.PIPE:
            self.stdin = BufferedStdin(self._record_input)
        self.stdout = self._reader(request.stdout, request.limit)
        self._merged = request.stderr == subprocess.STDOUT
        self.stderr = None if self._merged else self._reader(request.stderr, request.limit)
        self._started = loop.time()
        self._timer: asyncio.TimerHandle | None = None
        self._schedule(0)

    def _reader(self, how: Any, limit: int) -> asyncio.StreamReader | None:
        if how != subprocess.PIPE:
            return None
        return asyncio.StreamReader(limit=limit, loop=self._loop)

    def _record_input(self, data: bytes) -> None:
        self._recorder._set_input(self._index, data)

    def _schedule(self, line: int) -> None:
        response = self._response
        if line < len(response.lines):
            when = self._started + (line + 1) * response.line_delay
            self._timer = self._loop.call_at(when, self._emit, line)
        elif math.isfinite(response.duration):
            self._timer = self._loop.call_at(self._started + response.duration, self._exit)
        else:
            self._timer = None  # runs until it is stopped

    def _emit(self, line: int) -> None:
        if self.stdout is not None:
            self.stdout.feed_data(self._response.lines[line])
        self._schedule(line + 1)

    def _exit(self) -> None:
        self._timer = None
        err = self._response.stderr
        target = self.stdout if self._merged else self.stderr
        if err and target is not None:
            target.feed_data(err)
        self._end_streams()
        self._set_returncode(self._response.returncode)

    def _end_streams(self) -> None:
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.feed_eof()

    def _send_signal(self, sig: int) -> None:
        number = signal_that_ends(sig)  # (the plain fake's rules: 0 and SIGCONT go on, ...)
        if number is None:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._end_streams()
        self._set_returncode(-number)


class StreamingDryRunStrategy(DryRunStrategy):
    """DRY_RUN in which a :class:`StreamedResponse` streams its lines over time (other answers
    behave exactly as in :class:`DryRunStrategy`)."""

    async def _begin_run(self, start: RunStart) -> ChildRun:
        # run() reads the fake's pipes as a real child's (the plain DRY_RUN shortcut puts the
        # whole answer in the buffers at the start): a run cut by its timeout carries the
        # lines streamed so far, as with a real child, not every line of the answer.
        return await SubprocessStrategy._begin_run(self, start)

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        """Record the command; return a fake process that streams a :class:`StreamedResponse`'s
        lines on their timetable (any other answer: a :class:`DryRunProcess`)."""
        index, response = self._record(request)
        loop = asyncio.get_running_loop()
        if isinstance(response, StreamedResponse):
            return StreamedDryRunProcess(loop, request, response, self.recorder, index)
        return DryRunProcess(loop, request, response, self.recorder, index)
