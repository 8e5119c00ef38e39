"""`LineStream`: start a command and iterate over its output lines, owning the child's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

from ._cancel_shield import shielded_if_cancelled
from ._closing import AsyncResource
from ._event_loop import running_asyncio_loop
from ._exceptions import ClosedError, ProcessTimeoutError, StreamBusyError, StreamNotOpenError
from ._lines import iter_line_batches
from ._process import ProcessLike
from ._result import TailBuffer
from ._run_process import DRAIN_SECONDS, ChildRun, discard_output, start_by

__all__ = ["LineStream"]

_NOT_OPEN = "the stream is not open: use it inside 'async with wrapper.stream(...) as lines:'"

LineT = TypeVar("LineT", bytes, str)


class LineStream(AsyncResource, Generic[LineT]):
    """The lines a command prints, as an async iterator that owns the child.

    Use it as ``async with wrapper.stream(*cmd) as lines: async for line in lines: ...``.
    Leaving the block — normally, by ``break``, by an exception or by cancellation — stops the
    child's whole tree (SIGTERM, grace period, SIGKILL) if it is still running, so an abandoned
    stream never leaves a process behind; :meth:`aclose` does the same without the block. After
    the block, :attr:`returncode` is set.

    With ``timeout`` the whole stream has a deadline: when it passes, the tree is stopped, the
    lines the child printed before the stop are still delivered (by the drain rule: for up to
    ``DRAIN_SECONDS``), then the iteration, and :meth:`wait`, raise
    :class:`ProcessTimeoutError`. Lines are delivered whole whatever their length (see
    :func:`iter_lines`). With ``merge_stderr=False`` stderr is not interleaved; its
    last ``max_stderr_bytes`` are kept in :attr:`stderr`. :meth:`iter_batches` gives the same
    lines a list at a time (see :func:`iter_line_batches`), which is faster.

    A stream runs its command once: entering it again (or entering it after :meth:`aclose`)
    raises :class:`ClosedError`; call ``wrapper.stream(...)`` again for another run.
    """

    def __init__(
        self,
        start: Callable[[], Awaitable[ChildRun]],
        *,
        display: tuple[str, ...] | str,
        encoding: str | None,
        timeout: float | None,
        merge_stderr: bool,
        max_stderr_bytes: int | None,
    ) -> None:
        self._start = start
        self._display = display
        self._encoding = encoding
        self._timeout = timeout
        self._merge = merge_stderr
        self._stderr = TailBuffer(max_stderr_bytes)
        self._run: ChildRun | None = None
        self._batches: AsyncIterator[list[Any]] | None = None
        # The lines of the current batch not handed out yet, the next one last (for pop()).
        self._pending: list[Any] = []
        self._deadline: float | None = None
        # Resolved when the consumer has read to the end: for the run path, the consumer is the
        # reader of stdout.
        self._ended: asyncio.Future[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._stderr_read: asyncio.Future[Any] | None = None
        self._entered = False
        self._closed = False
        self._reading = False  # a task is in _next_batch
        # Set once the deadline passed and the tree was stopped: until when what the child
        # printed before that is still delivered.
        self._drain_until: float | None = None
        # With a deadline, the read of the next batch runs as a task of its own (see _fetch_by).
        self._fetch: asyncio.Future[list[Any]] | None = None
        self._cancelled_fetch: asyncio.Future[list[Any]] | None = None

    @property
    def process(self) -> ProcessLike:
        """The running child (available inside the ``async with`` block)."""
        if self._run is None:
            raise StreamNotOpenError(_NOT_OPEN)
        return self._run.process

    @property
    def returncode(self) -> int | None:
        """The child's exit status once its end has been seen: after the block always; inside
        it, once :meth:`wait` returned (reading every line does not wait for the exit: the
        output may end before the child does). ``None`` until then."""
        return None if self._run is None else self._run.process.returncode

    @property
    def stderr(self) -> bytes:
        """The kept tail of stderr (``merge_stderr=False`` only): whole after the block, or
        inside it once :meth:`wait` returned; until then, what has been read so far."""
        return self._stderr.getvalue()

    async def __aenter__(self) -> LineStream[LineT]:
        """Start the command.

        Raises:
            ClosedError: the stream was entered before or closed: a second child would replace
                the first, and leaving the block would stop neither.
            ProcessTimeoutError: the ``timeout`` passed while the spawn was still waiting for a
                worker (nothing runs). A child already being started then is started: the
                iteration stops it, delivers what it printed, then raises this.
            and what the spawn raises (e.g. :class:`CommandNotFoundError`).
        """
        if self._entered or self._closed:
            raise ClosedError(
                "this LineStream has already been used; call wrapper.stream(...) again to run "
                "the command again"
            )
        loop = running_asyncio_loop()  # (before it counts as entered: nothing started)
        self._entered = True
        if self._timeout is None:
            run = await self._start()
        else:
            # From the call on, as run()'s: a wait for a free worker (LOCAL) counts too. A
            # child already being started at the deadline is let start (start_by): the first
            # read then stops it and still delivers what it printed, as at any deadline.
            self._deadline = loop.time() + self._timeout
            started = await start_by(self._start, self._deadline)
            if started is None:
                # The spawn was dropped or undone: nothing runs.
                raise ProcessTimeoutError(cmd=self._display, timeout=self._timeout, returncode=None)
            run = started
        self._run = run
        if not self._merge:
            self._stderr_read = run.capture(run.process.stderr, self._stderr)
        self._batches = iter_line_batches(run.process.stdout, encoding=self._encoding)
        self._ended = loop.create_future()
        run.read(self._ended)
        self._watcher = loop.create_task(self._finish_when_exited(run))
        return self

    async def _finish_when_exited(self, run: ChildRun) -> None:
        # The drain rule while the block is open: once the child exits, the lines end when its
        # output does, even if something it left running holds the pipe.
        await run.wait_exit()
        await run.finish()

    def _end(self) -> None:
        if self._ended is not None and not self._ended.done():
            self._ended.set_result(None)

    def __aiter__(self) -> AsyncIterator[LineT]:
        return self

    async def __anext__(self) -> LineT:
        pending = self._pending
        if pending:
            line: LineT = pending.pop()
            return line
        batch = await self._next_batch()
        batch.reverse()
        self._pending = batch
        line = batch.pop()
        return line

    def iter_batches(self) -> AsyncIterator[list[LineT]]:
        """The lines a list at a time: joined together, the lists hold exactly the lines
        ``async for line in stream`` gives (from where that iteration stopped, if it was used
        first); a list is never empty. Deadline, end and clean-up are those of line iteration.

        ``async for batch in lines.iter_batches(): ...`` inside the ``async with`` block.
        """
        return self._iter_batches()

    async def _iter_batches(self) -> AsyncIterator[list[LineT]]:
        if self._pending:
            batch = self._pending[::-1]
            self._pending = []
            yield batch
        while True:
            try:
                batch = await self._next_batch()
            except StopAsyncIteration:
                return
            yield batch

    async def _next_batch(self) -> list[LineT]:
        if self._batches is None or self._run is None or self._closed:
            # (After the block too: its unread lines were dropped, and an iteration that just
            # ended would pass for the end of the output.)
            raise StreamNotOpenError(_NOT_OPEN)
        if self._reading:
            raise StreamBusyError(
                "another task is reading this stream's lines; read them from one task (hand "
                "them on through a queue if several need them)"
            )
        self._reading = True
        try:
            return await self._read_batch()
        finally:
            self._reading = False

    async def _read_batch(self) -> list[LineT]:
        assert self._batches is not None and self._run is not None
        if self._drain_until is not None:
            return await self._drained_batch(self._drain_until)
        try:
            if self._deadline is None:
                batch: list[LineT] = await anext(self._batches)
                return batch
            # A deadline already gone by ends the stream here: lines ready without waiting
            # (DRY_RUN's) would otherwise pass it, where the modes that wait for them time out.
            if asyncio.get_running_loop().time() < self._deadline:
                fetched = await self._fetch_by(self._deadline)
                if fetched is not None:
                    return fetched
        except StopAsyncIteration:
            self._end()
            raise
        await self._run.stop()
        # The deadline passed and the tree is stopped. What the child printed is still
        # delivered, by the drain rule (run() keeps it in its error); then the timeout. (LOCAL
        # hands output over only once the child has ended: all of it comes after the stop.)
        self._drain_until = asyncio.get_running_loop().time() + DRAIN_SECONDS
        return await self._drained_batch(self._drain_until)

    async def _fetch_by(self, until: float) -> list[LineT] | None:
        """The next batch if it comes by ``until`` (loop time), else None. The read is not
        cancelled at ``until`` but goes on: cancelled, it would end the lines' generator and
        lose what that held (the start of a line, LOCAL's whole output)."""
        assert self._batches is not None
        fetch = self._fetch
        if fetch is None:
            fetch = self._fetch = asyncio.ensure_future(anext(self._batches))
        if not fetch.done():
            try:
                await asyncio.wait((fetch,), timeout=until - asyncio.get_running_loop().time())
            except asyncio.CancelledError:
                self._fetch = None
                fetch.cancel()  # (awaited by aclose)
                self._cancelled_fetch = fetch
                raise
            if not fetch.done():
                return None
        self._fetch = None
        batch: list[LineT] = fetch.result()
        return batch

    async def _drained_batch(self, until: float) -> list[LineT]:
        """A batch of what the child printed before the stop at the deadline; the stream's
        :class:`ProcessTimeoutError` once that output has ended or ``until`` has passed."""
        if asyncio.get_running_loop().time() < until:
            try:
                fetched = await self._fetch_by(until)
            except StopAsyncIteration:
                self._end()
            else:
                if fetched is not None:
                    return fetched
        await self._drop_fetch()
        raise self._timed_out()

    async def _drop_fetch(self) -> None:
        """Cancel a read still going (or cancelled by a cancellation of ours) and wait for it."""
        fetch = self._fetch or self._cancelled_fetch
        if fetch is None:
            return
        # Kept until it has ended: a cancellation of this wait leaves it for aclose() to await
        # (the lines' generator cannot be closed while the read still runs in it).
        self._fetch, self._cancelled_fetch = None, fetch
        fetch.cancel()
        await asyncio.wait((fetch,))
        self._cancelled_fetch = None
        if not fetch.cancelled():
            fetch.exception()  # (retrieved: never "exception was never retrieved")

    def _timed_out(self) -> ProcessTimeoutError:
        return ProcessTimeoutError(
            cmd=self._display,
            timeout=self._timeout or 0.0,
            returncode=self.returncode,
            stderr=self.stderr,
        )

    async def wait(self) -> int:
        """Wait for the child to exit (cancellation stops its tree) and return its status; with
        ``merge_stderr=False``, also for its stderr to be read to the end (bounded, as the drain
        rule), so :attr:`stderr` is whole when this returns.

        The stream's ``timeout`` holds here too. Lines not read stay in the pipe (nothing is
        dropped): a child that fills it waits for a reader, as with asyncio's own ``wait()``,
        so read the lines first when the child prints more than a pipe holds (64 KiB).

        Raises:
            StreamNotOpenError: called outside the ``async with`` block.
            ProcessTimeoutError: the stream's ``timeout`` passed first (the tree is stopped).
        """
        run = self._run
        if run is None:
            raise StreamNotOpenError(_NOT_OPEN)
        if self._drain_until is not None:
            # The deadline passed while lines were read: the tree was stopped for it.
            await self._wait(run)
            raise self._timed_out()
        deadline = self._deadline
        try:
            if deadline is None:
                return await self._wait(run)
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._wait(run)
            except TimeoutError:
                if asyncio.get_running_loop().time() < deadline:
                    raise  # not the stream's deadline
        except asyncio.CancelledError:
            await run.stop()  # shielded from a cancelled anyio scope: see ChildRun.stop
            raise
        await run.stop()
        raise self._timed_out()

    async def _wait(self, run: ChildRun) -> int:
        status = await run.wait_exit()
        if self._stderr_read is not None:
            await run.wait_read(self._stderr_read)
        return status

    async def aclose(self) -> None:
        """Stop the child's tree if it still runs and release its pipes (what leaving the
        ``async with`` block does). Idempotent.

        Cancellation: the stop that was started is finished before ``CancelledError`` propagates.
        """
        await self.__aexit__(None, None, None)

    def _read_to_the_end(self) -> bool:
        # The lines ended at the end of the output (not at the stream's deadline, whose stop
        # has run).
        return self._ended is not None and self._ended.done() and self._drain_until is None

    async def _let_it_exit(self, run: ChildRun) -> None:
        """The block was left normally after the last line: give the child the drain's time
        (cut to the stream's deadline) to exit by itself. A program closes its output a moment
        before it exits (GNU seq does, as any that flushes and closes its stdout before its
        clean-up); stopped in that gap, a command that completed got -15 and lost its clean-up.
        """
        if run.process.returncode is not None:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + DRAIN_SECONDS
        if self._deadline is not None:
            until = min(until, self._deadline)
        if until <= loop.time():
            return
        exited = asyncio.ensure_future(run.wait_exit())
        try:
            await asyncio.wait((exited,), timeout=until - loop.time())
        finally:
            if not exited.done():
                exited.cancel()
                await asyncio.wait((exited,))
            if not exited.cancelled():
                exited.exception()  # (retrieved: the stop below reports what matters)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run = self._run
        if run is None or self._closed:
            self._closed = True
            return
        self._closed = True
        # Leaving the block because an anyio scope was cancelled (a disconnected client, a
        # move_on_after): shielded from it, or its level-triggered cancellation would cut
        # every await below short (the stop, the drain, the readers' end).
        with shielded_if_cancelled():
            try:
                try:
                    if exc_type is None and self._read_to_the_end():
                        await self._let_it_exit(run)
                finally:
                    # The block owns the tree: stop it if the child still runs, and stop what
                    # an exited child left in its group.
                    await run.stop()
            finally:
                try:
                    self._pending = []
                    await self._drop_fetch()
                    if self._batches is not None:
                        with contextlib.suppress(Exception):
                            await self._batches.aclose()  # type: ignore[attr-defined]
                    if run.process.stdout is not None:
                        # What the consumer left unread: a stdout nobody reads stays paused and
                        # its pipe would never reach end of file.
                        run.read(discard_output(run.process.stdout))
                    self._end()
                    await run.settle()
                finally:
                    watcher = self._watcher
                    if watcher is not None:
                        watcher.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await watcher
                    await run.aclose()
