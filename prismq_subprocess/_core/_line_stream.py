"""`LineStream`: start a command and iterate over its output lines, owning the child's lifetime."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Generic, TypeVar

from .._platform import PlatformOps
from ._closing import AsyncResource
from ._exceptions import ProcessTimeoutError
from ._lines import iter_lines
from ._process import ProcessLike
from ._result import TailBuffer
from ._tree_stop import stop_process_tree

__all__ = ["LineStream"]

LineT = TypeVar("LineT", bytes, str)


class LineStream(AsyncResource, Generic[LineT]):
    """The lines a command prints, as an async iterator that owns the child.

    Use it as ``async with wrapper.stream(*cmd) as lines: async for line in lines: ...``.
    Leaving the block — normally, by ``break``, by an exception or by cancellation — stops the
    child's whole tree (SIGTERM, grace period, SIGKILL) if it is still running, so an abandoned
    stream never leaves a process behind; :meth:`aclose` does the same without the block. After
    the block, :attr:`returncode` is set.

    With ``timeout`` the whole stream has a deadline: when it passes, the tree is stopped and the
    iteration raises :class:`ProcessTimeoutError`. Lines are delivered whole whatever their
    length (see :func:`iter_lines`). With ``merge_stderr=False`` stderr is not interleaved; its
    last ``max_stderr_bytes`` are kept in :attr:`stderr`.
    """

    def __init__(
        self,
        start: Callable[[], Awaitable[ProcessLike]],
        *,
        display: tuple[str, ...] | str,
        encoding: str | None,
        timeout: float | None,
        grace: float,
        ops: PlatformOps,
        merge_stderr: bool,
        max_stderr_bytes: int | None,
    ) -> None:
        self._start = start
        self._display = display
        self._encoding = encoding
        self._timeout = timeout
        self._grace = grace
        self._ops = ops
        self._merge = merge_stderr
        self._stderr = TailBuffer(max_stderr_bytes)
        self._stderr_task: asyncio.Task[None] | None = None
        self._process: ProcessLike | None = None
        self._lines: AsyncIterator[Any] | None = None
        self._deadline: float | None = None

    @property
    def process(self) -> ProcessLike:
        """The running child (available inside the ``async with`` block)."""
        if self._process is None:
            raise RuntimeError("the stream is not open; use 'async with wrapper.stream(...)'")
        return self._process

    @property
    def returncode(self) -> int | None:
        """The child's exit status once it has ended."""
        return None if self._process is None else self._process.returncode

    @property
    def stderr(self) -> bytes:
        """The kept tail of stderr (``merge_stderr=False`` only)."""
        return self._stderr.getvalue()

    async def __aenter__(self) -> LineStream[LineT]:
        process = await self._start()
        self._process = process
        loop = asyncio.get_running_loop()
        if self._timeout is not None:
            self._deadline = loop.time() + self._timeout
        if not self._merge and process.stderr is not None:
            self._stderr_task = loop.create_task(_drain(process.stderr, self._stderr))
        self._lines = iter_lines(process.stdout, encoding=self._encoding)
        return self

    def __aiter__(self) -> AsyncIterator[LineT]:
        return self

    async def __anext__(self) -> LineT:
        if self._lines is None:
            raise RuntimeError("iterate inside 'async with wrapper.stream(...)'")
        if self._deadline is None:
            line: LineT = await anext(self._lines)
            return line
        try:
            async with asyncio.timeout_at(self._deadline):
                line = await anext(self._lines)
                return line
        except TimeoutError:
            if asyncio.get_running_loop().time() < self._deadline:
                raise
            await self._stop()
            raise ProcessTimeoutError(
                cmd=self._display,
                timeout=self._timeout or 0.0,
                returncode=self.returncode,
                stderr=self.stderr,
            ) from None

    async def wait(self) -> int:
        """Wait for the child to exit (cancellation stops its tree) and return its status."""
        process = self.process
        try:
            return await process.wait()
        except asyncio.CancelledError:
            await self._stop()
            raise

    async def _stop(self) -> None:
        process = self._process
        if process is None:
            return
        stopper = asyncio.ensure_future(
            stop_process_tree(process, grace=self._grace, ops=self._ops)
        )
        try:
            await asyncio.shield(stopper)
        except asyncio.CancelledError:
            with contextlib.suppress(BaseException):
                await stopper
            raise

    async def aclose(self) -> None:
        """Stop the child's tree if it still runs and release its pipes (what leaving the
        ``async with`` block does). Idempotent.

        Cancellation: the stop that was started is finished before ``CancelledError`` propagates.
        """
        await self.__aexit__(None, None, None)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            process = self._process
            if process is not None:
                if process.returncode is None:
                    await self._stop()
                else:
                    await stop_process_tree(process, grace=self._grace, ops=self._ops)
        finally:
            if self._lines is not None:
                with contextlib.suppress(Exception):
                    await self._lines.aclose()  # type: ignore[attr-defined]
            if process is not None and process.stdout is not None:
                # Read what is left (bounded): a stdout the consumer stopped reading stays paused,
                # and its pipe would never reach end of file and close.
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(self._grace + 1.0):
                        while await process.stdout.read(256 * 1024):
                            pass
            if self._stderr_task is not None:
                if not self._stderr_task.done():
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(self._stderr_task), self._grace + 1)
                    self._stderr_task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._stderr_task


async def _drain(stream: Any, buffer: TailBuffer) -> None:
    while chunk := await stream.read(256 * 1024):
        buffer.append(chunk)
