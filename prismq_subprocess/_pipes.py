"""Bridges between blocking OS pipes and asyncio streams, driven by threads.

Used by the THREADED strategy, which must work on event loops that cannot watch pipes (Windows'
``SelectorEventLoop``). Readers feed a real ``asyncio.StreamReader`` and honour its flow control,
so a slow consumer pauses the thread instead of growing memory without bound.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import sys
import threading
from typing import IO, Any

__all__ = ["PipeReaderThread", "ThreadedStdinWriter"]

#: Bytes per ``os.read``; large reads are what make line streaming fast.
READ_CHUNK = 256 * 1024
#: ``drain()`` waits while more than this many bytes are queued for the child's stdin...
WRITE_HIGH_WATER = 64 * 1024
#: ...and wakes again once the queue is at or below this.
WRITE_LOW_WATER = 16 * 1024
#: How often a blocked POSIX reader looks up to see whether it was asked to stop.
_STOP_POLL_SECONDS = 0.25

_CAN_POLL = sys.platform != "win32" and hasattr(select, "poll")


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> bool:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop was closed under us: nobody is left to read
        return False
    return True


class _FlowControl:
    """The "transport" a StreamReader pauses and resumes; here it gates the reader thread."""

    def __init__(self) -> None:
        self.resumed = threading.Event()
        self.resumed.set()
        self.closing = False

    def pause_reading(self) -> None:
        self.resumed.clear()

    def resume_reading(self) -> None:
        self.resumed.set()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True
        self.resumed.set()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class PipeReaderThread:
    """Reads a child's pipe in a thread and feeds an ``asyncio.StreamReader`` on ``loop``.

    The thread ends at end of file, or soon after :meth:`stop` (POSIX checks every 0.25 s while
    blocked; on Windows a blocked read ends when the child tree is gone).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        pipe: IO[bytes],
        *,
        limit: int,
        name: str,
    ) -> None:
        self.reader = asyncio.StreamReader(limit=limit, loop=loop)
        self._flow = _FlowControl()
        self.reader.set_transport(self._flow)  # type: ignore[arg-type]
        self._loop = loop
        self._pipe = pipe
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def finished(self) -> bool:
        """True once the thread has delivered end of file (or stopped) and closed the pipe."""
        return self._done.is_set()

    def stop(self) -> None:
        """Ask the thread to stop reading; what it has read is still delivered, then EOF."""
        self._flow.close()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the thread to end."""
        self._thread.join(timeout)

    def _wait_readable(self, fd: int) -> bool:
        """Block until ``fd`` has data or EOF; False when asked to stop first."""
        if not _CAN_POLL:
            return not self._flow.closing
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while not self._flow.closing:
            if poller.poll(_STOP_POLL_SECONDS * 1000):
                return True
        return False

    def _run(self) -> None:
        fd = self._pipe.fileno()
        feed = self.reader.feed_data
        try:
            while True:
                self._flow.resumed.wait()
                if not self._wait_readable(fd):
                    break
                try:
                    data = os.read(fd, READ_CHUNK)
                except OSError:  # e.g. the handle was closed under us on Windows
                    break
                if not data or not _call_soon(self._loop, feed, data):
                    break
        finally:
            with contextlib.suppress(OSError):
                self._pipe.close()
            _call_soon(self._loop, self._feed_eof)
            self._done.set()

    def _feed_eof(self) -> None:
        self.reader.feed_eof()


class ThreadedStdinWriter:
    """A ``StreamWriter``-like stdin whose writes a thread performs.

    Follows asyncio's contract: ``write()`` never blocks, ``drain()`` waits while too much is
    queued and raises ``BrokenPipeError`` once the child has closed its end, ``close()`` flushes
    what is queued then closes, ``wait_closed()`` waits for that.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pipe: IO[bytes], *, name: str) -> None:
        self._loop = loop
        self._pipe = pipe
        self._name = name
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._queue: collections.deque[bytes] = collections.deque()
        self._pending = 0
        self._closing = False
        self._closed = False
        self._exc: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._close_waiters: list[asyncio.Future[None]] = []

    # -- the StreamWriter API -------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for the child; never blocks. Ignored once closing (as asyncio does)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if not data or self._closing or self._exc is not None:
            return
        with self._lock:
            self._queue.append(bytes(data))
            self._pending += len(data)
            self._wakeup.notify()
        self._ensure_thread()

    def writelines(self, data: Any) -> None:
        """Queue every bytes-like item of ``data``."""
        for chunk in data:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        """Always True: closing the pipe is the end-of-file."""
        return True

    def write_eof(self) -> None:
        """Close the child's stdin once what is queued has been written."""
        self.close()

    def is_closing(self) -> bool:
        """True once :meth:`close` was called or the child closed its end."""
        return self._closing or self._exc is not None

    def close(self) -> None:
        """Flush what is queued, then close the pipe. Idempotent."""
        if self._closing:
            return
        self._closing = True
        with self._lock:
            self._wakeup.notify()
            started = self._thread is not None
        if not started:
            self._close_pipe()
            self._closed = True
            self._wake_all()

    async def wait_closed(self) -> None:
        """Wait until the pipe is closed; raises the write error if the child broke the pipe."""
        if not self._closed:
            fut = self._loop.create_future()
            self._close_waiters.append(fut)
            await fut
        if self._exc is not None:
            raise self._exc

    async def drain(self) -> None:
        """Wait until the queue is small enough to write more.

        Raises:
            BrokenPipeError: the child closed its stdin (typically: it has exited).
        """
        if self._exc is not None:
            raise self._exc
        if self._pending > WRITE_HIGH_WATER:
            fut = self._loop.create_future()
            self._drain_waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self._drain_waiters:
                    self._drain_waiters.remove(fut)
            if self._exc is not None:
                raise self._exc
        else:
            await asyncio.sleep(0)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``"pipe"`` gives the underlying file object; anything else ``default``."""
        return self._pipe if name == "pipe" else default

    # -- internals ------------------------------------------------------------------------
    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is not None:
                return
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def _close_pipe(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.close()

    def _run(self) -> None:
        fd = self._pipe.fileno()
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._wakeup.wait()
                if not self._queue:
                    break
                chunk = self._queue.popleft()
            view = memoryview(chunk)
            try:
                while view:
                    written = os.write(fd, view)
                    view = view[written:]
            except OSError as exc:
                broken = (
                    exc
                    if isinstance(exc, BrokenPipeError | ConnectionResetError)
                    else BrokenPipeError(exc.errno, exc.strerror)
                )
                with self._lock:
                    self._queue.clear()
                    self._pending = 0
                    self._exc = broken
                break
            with self._lock:
                self._pending -= len(chunk)
                pending = self._pending
            if pending <= WRITE_LOW_WATER and self._drain_waiters:
                _call_soon(self._loop, self._wake_drainers)
        self._close_pipe()
        self._closed = True
        _call_soon(self._loop, self._wake_all)

    def _wake_drainers(self) -> None:
        for fut in self._drain_waiters:
            if not fut.done():
                fut.set_result(None)
        self._drain_waiters.clear()

    def _wake_all(self) -> None:
        self._wake_drainers()
        for fut in self._close_waiters:
            if not fut.done():
                fut.set_result(None)
        self._close_waiters.clear()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the writer thread (if one was started) to end."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
