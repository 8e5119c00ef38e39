"""Bridges between a child's OS pipes and asyncio streams, for the THREADED strategy.

THREADED must work on event loops that cannot watch pipes (Windows' ``SelectorEventLoop``), so
the loop never waits on a pipe itself: something else reads the child's stdout/stderr into a real
``asyncio.StreamReader`` and writes its stdin (on POSIX the loop's thread may take bytes that are
already there, with a non-blocking read or write, before it hands the waiting over). This module
holds what both ways of doing that share, and the portable one:

- :class:`PipeBridge`, the interface the strategy talks to (open a reader, open a writer, close);
- :class:`StdinWriterBase`, the ``StreamWriter``-like half shared by every bridge;
- :class:`ThreadPerPipe`, the portable bridge: one blocking thread per pipe. Windows needs it
  (its anonymous pipes cannot be polled); on POSIX :class:`~._io_thread.IOThread`
  does the same work for every child with a single thread.

Flow control, in both bridges: the bytes read from a pipe but not yet handed to its
``StreamReader`` ("in flight") never exceed :data:`MAX_IN_FLIGHT`, and nothing is read while the
reader is paused (its buffer is over ``2 * limit``). So a slow consumer holds at most
``2 * limit + 2 * MAX_IN_FLIGHT`` bytes per stream, and the child blocks on a full pipe.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import select
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from .._platform import CAN_POLL_PIPES, PIPES_SELECTABLE
from ._stdin_transport import StreamWriterMethods, WriterTransport

__all__ = [
    "MAX_IN_FLIGHT",
    "MIN_DIRECT_ROOM",
    "READ_CHUNK",
    "BridgedReader",
    "PipeBridge",
    "PipeReaderThread",
    "StdinWriterBase",
    "ThreadPerPipe",
    "ThreadedStdinWriter",
    "read_available",
    "release_transport_pipes",
]

#: Bytes per ``os.read``; large reads are what make line streaming fast.
READ_CHUNK = 256 * 1024
#: At most this many bytes per pipe are read but not yet fed to the ``StreamReader``.
MAX_IN_FLIGHT = READ_CHUNK
#: ``drain()`` waits while more than this many bytes are queued for the child's stdin...
WRITE_HIGH_WATER = 64 * 1024
#: ...and wakes again once the queue is at or below this.
WRITE_LOW_WATER = 16 * 1024
#: The loop's thread reads a pipe itself (see ``BridgedReader._wait_for_data``) only for
#: readers whose pause threshold, ``2 * limit``, is at least this: below it its reads would be
#: smaller than the I/O thread's.
MIN_DIRECT_ROOM = 64 * 1024
#: How often a blocked POSIX reader looks up to see whether it was asked to stop.
_STOP_POLL_SECONDS = 0.25
#: How long :meth:`ThreadPerPipe.close` waits for its threads, in all.
_JOIN_SECONDS = 2.0


def call_soon(loop: asyncio.AbstractEventLoop, callback: Any, *args: Any) -> bool:
    """``loop.call_soon_threadsafe``, False instead of an error once the loop is closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop was closed under us: nobody is left to read
        return False
    return True


def read_available(fd: int, max_bytes: int = 16 * READ_CHUNK) -> tuple[list[bytes], bool]:
    """Read what the pipe ``fd`` holds right now without blocking (it is made non-blocking).

    Returns the chunks and whether end of file was reached. At most ``max_bytes`` are read, so a
    writer that keeps the pipe full cannot keep us here. Used when we let go of a pipe that
    something else still holds: what it wrote before that moment is kept, not dropped.
    """
    chunks: list[bytes] = []
    size = 0
    try:
        os.set_blocking(fd, False)
        while size < max_bytes:
            data = os.read(fd, READ_CHUNK)
            if not data:
                return chunks, True
            chunks.append(data)
            size += len(data)
    except (BlockingIOError, InterruptedError):
        pass
    except OSError:  # EIO, EBADF: nothing more will come
        return chunks, True
    return chunks, False


def release_transport_pipes(process: Any) -> None:
    """Close the pipe transports of an ``asyncio.subprocess.Process``: what the pipes hold now
    goes to its readers (past their flow-control limit, so nothing already written is lost; on
    POSIX, where the pipes are read on the loop's thread), then end of file; the descriptors are
    freed and asyncio then closes the process transport. Does nothing for an object without
    asyncio's transports."""
    transport = getattr(process, "_transport", None)
    if transport is None:
        return
    for fd, reader in ((0, None), (1, process.stdout), (2, process.stderr)):
        pipe = None
        with contextlib.suppress(AttributeError):  # a pipe not connected (yet) is None
            pipe = transport.get_pipe_transport(fd)
        if pipe is None or pipe.is_closing():
            continue
        # POSIX: the transport reads on the loop's thread, so what the pipe holds is still in
        # it. Windows (Proactor): the "pipe" is a PipeHandle whose fileno() is a HANDLE, not a
        # descriptor, and the transport's own overlapped read is pending on it; closing the
        # transport is all there is to do.
        if reader is not None and PIPES_SELECTABLE:
            # asyncio names the pipe's file; uvloop hides it behind a socket-like object
            # (libuv's pipes to a child are socket pairs).
            source = pipe.get_extra_info("pipe") or pipe.get_extra_info("socket")
            if source is not None:
                for data in read_available(source.fileno())[0]:
                    # RuntimeError: a read waiting on a loop that was closed could not be woken
                    # (the data is in the reader's buffer all the same).
                    with contextlib.suppress(RuntimeError):
                        reader.feed_data(data)
        try:
            pipe.close()
        except RuntimeError:
            # Its loop is closed (the child outlived the event loop that started it): close()
            # marked it closing, then could not schedule its last step there. Run that step
            # here: it closes the descriptor and ends the reader (else the descriptor stays
            # open until the garbage collector finds the transport, with a ResourceWarning).
            # (Telling the process transport fails the same way, after the descriptor closed.)
            connection_lost = getattr(pipe, "_call_connection_lost", None)
            if connection_lost is None:
                raise
            with contextlib.suppress(RuntimeError):
                connection_lost(None)


def as_broken_pipe(exc: OSError) -> OSError:
    """The error ``drain()`` raises for a failed write: asyncio's two, whatever the OS said."""
    if isinstance(exc, BrokenPipeError | ConnectionResetError):
        return exc
    return BrokenPipeError(exc.errno, exc.strerror)


class _PipeEnd(Protocol):
    """The "transport" behind a :class:`BridgedReader`: flow control, and letting go.

    An end may also offer ``read_now(size) -> bool`` (feed the reader up to ``size`` bytes the
    pipe holds right now, on the loop's thread) and ``give_back()`` (the reader is about to
    wait: watch the pipe again); the reader then uses them (see its ``_wait_for_data``).
    """

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...

    def close(self) -> None: ...


class _FinishedEnd:
    """The end of a pipe that was read to its end and closed: nothing left to control."""

    def pause_reading(self) -> None:
        """Nothing to pause: the pipe is finished."""

    def resume_reading(self) -> None:
        """Nothing to resume: the pipe is finished."""

    def close(self) -> None:
        """Nothing to let go of: the pipe is closed already."""

    def is_closing(self) -> bool:
        return True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


_FINISHED_END = _FinishedEnd()


class BridgedReader(asyncio.StreamReader):
    """The ``asyncio.StreamReader`` a bridge feeds; :meth:`release` lets go of its pipe."""

    def __init__(self, end: _PipeEnd, *, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self._end = end
        self.set_transport(end)  # type: ignore[arg-type]
        # The I/O thread's pipes (POSIX) can be read on the loop's thread when the reader runs
        # dry (see _wait_for_data); a thread per pipe (Windows) cannot.
        self._read_now: Callable[[int], bool] | None = None
        self._give_back: Callable[[], None] | None = None
        if 2 * limit >= MIN_DIRECT_ROOM:
            self._read_now = getattr(end, "read_now", None)
            self._give_back = getattr(end, "give_back", None)
        #: Called once, on the loop's thread, right after end of file was fed.
        self.on_eof: Callable[[], None] | None = None

    def feed_eof(self) -> None:
        """End the stream (``StreamReader.feed_eof``), then run :attr:`on_eof` once."""
        super().feed_eof()
        callback, self.on_eof = self.on_eof, None
        if callback is not None:
            callback()

    def feed_pipe_eof(self) -> None:
        """:meth:`feed_eof` from the bridge, once it has closed the pipe: the reader also lets
        go of the pipe's end, which refers back to it. Otherwise only the garbage collector
        frees the pair, and one collection freeing a thousand children's pipes at once stalls
        the loop for tens of ms. (A caller's own ``feed_eof()`` keeps the end: the pipe may
        still be open, and :meth:`release` must still close it.)"""
        self._end = _FINISHED_END
        self._transport = _FINISHED_END
        self._read_now = self._give_back = None
        self.feed_eof()

    async def _wait_for_data(self, func_name: str) -> None:
        # asyncio's StreamReader calls this when its buffer cannot serve a read. While a child
        # writes fast its pipe seldom runs empty: taking the bytes here, with one non-blocking
        # read, beats waiting for the I/O thread to read and hand them over (it needs the GIL,
        # which this thread holds until it waits). The reader's own checks stay with asyncio:
        # a second waiter, a paused reader (resumed there) and a full buffer take its path,
        # as does any interpreter whose StreamReader lacks these private attributes.
        read_now = self._read_now
        if read_now is not None:
            room = 0
            if getattr(self, "_waiter", False) is None and getattr(self, "_paused", True) is False:
                room = 2 * getattr(self, "_limit", 0) - len(getattr(self, "_buffer", b""))
            if room > 0:
                if read_now(room):
                    # Let other tasks run, as waiting would: a child that never stops writing
                    # must not keep its reader's task from ever giving up the loop.
                    await asyncio.sleep(0)
                    return
                # Declined: read_now has left the pipe to the I/O thread, or the thread's
                # bytes are on their way.
            elif self._give_back is not None:
                # Waiting for the I/O thread without asking for bytes (a paused reader, or
                # readexactly(n > 2 * limit) with a full buffer): it must watch the pipe,
                # which the loop may have kept, or it takes it back only after a while.
                self._give_back()
        await super()._wait_for_data(func_name)  # type: ignore[misc]

    def release(self) -> None:
        """Stop reading the pipe and close it: what was read is delivered, then end of file.

        For a pipe that something outside the child's tree keeps open after the child exited.
        """
        self._end.close()


class PipeBridge(Protocol):
    """Moves bytes between a child's pipes and asyncio streams without the loop's help."""

    def open_reader(
        self, loop: asyncio.AbstractEventLoop, pipe: IO[bytes], *, limit: int, name: str
    ) -> BridgedReader:
        """A ``StreamReader`` on ``loop`` fed from ``pipe`` until end of file; owns ``pipe``."""

    def open_writer(
        self, loop: asyncio.AbstractEventLoop, pipe: IO[bytes], *, name: str
    ) -> StdinWriterBase:
        """A ``StreamWriter``-like object writing to ``pipe``; owns ``pipe``."""

    def close(self) -> None:
        """Stop moving bytes, close every pipe still open and end the bridge's threads."""


class StdinWriterBase(StreamWriterMethods):
    """A ``StreamWriter``-like stdin; subclasses decide who performs the writes.

    Follows asyncio's contract: ``write()`` never blocks, ``drain()`` waits while more than
    64 KiB is queued and raises ``BrokenPipeError`` (or ``ConnectionResetError``) once the child
    has closed its end, ``close()`` flushes what is queued then closes, ``wait_closed()`` waits
    for that.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, pipe: IO[bytes]) -> None:
        self._loop = loop
        self._pipe = pipe
        self._lock = threading.Lock()
        self._closing = False
        self._closed = False
        self._exc: OSError | None = None
        # Closed because the child's side is gone (:meth:`close_gone`), not by the caller.
        self._gone = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._close_waiters: list[asyncio.Future[None]] = []

    # -- the StreamWriter API -------------------------------------------------------------
    @property
    def transport(self) -> WriterTransport:
        """The write transport (``get_write_buffer_size()``, ``is_closing()``, ...)."""
        return WriterTransport(self, self._pending)

    def _take(self, data: bytes | bytearray | memoryview) -> None:
        if not data or self._closing or self._exc is not None:
            return
        self._enqueue(data)

    def is_closing(self) -> bool:
        """True once :meth:`close` was called or the child closed its end."""
        return self._closing or self._exc is not None

    def close(self) -> None:
        """Flush what is queued, then close the pipe. Idempotent."""
        if self._closing:
            return
        self._closing = True
        self._start_close()

    def close_gone(self) -> None:
        """Close because the child's side is gone (it exited and its output pipes ended):
        :meth:`close`, and from then on :meth:`drain` raises ``ConnectionResetError``, as
        asyncio's does once it has lost the pipe. Nothing if the caller closed it already."""
        if not self._closing:
            self._gone = True
            self.close()

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

        Cancelling it only stops the wait; queued bytes are still written.

        Raises:
            BrokenPipeError: the child closed its stdin (typically: it has exited) while bytes
                were queued for it.
            ConnectionResetError: the pipe was closed because the child exited and its output
                pipes ended (:meth:`close_gone`), as asyncio's ``drain()`` says then. Not after
                the caller's own :meth:`close`: asyncio's first ``drain()`` after it returns
                (it learns of the lost pipe loop iterations later), and code written so must
                not fail here.
        """
        if self._exc is not None:
            raise self._exc
        if self._gone and self._closed:
            raise ConnectionResetError("Connection lost")
        with self._lock:
            fut = None
            if self._pending() > WRITE_HIGH_WATER:
                fut = self._loop.create_future()
                self._drain_waiters.append(fut)
        if fut is None:
            await asyncio.sleep(0)
            return
        try:
            await fut
        finally:
            with self._lock:
                if fut in self._drain_waiters:
                    self._drain_waiters.remove(fut)
        if self._exc is not None:
            raise self._exc

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``"pipe"`` gives the underlying file object; anything else ``default``."""
        return self._pipe if name == "pipe" else default

    # -- for subclasses -------------------------------------------------------------------
    def _enqueue(self, data: bytes | bytearray | memoryview) -> None:
        raise NotImplementedError

    def _pending(self) -> int:
        """Bytes queued but not yet written; called with ``_lock`` held."""
        raise NotImplementedError

    def _start_close(self) -> None:
        """Close once the queue is written (``_closing`` is already set)."""
        raise NotImplementedError

    def _close_pipe(self) -> None:
        with contextlib.suppress(OSError):
            self._pipe.close()

    def _wants_drain_wakeup(self) -> bool:
        """Whether a drain() waits and the queue is low enough to wake it; ``_lock`` held."""
        return bool(self._drain_waiters) and self._pending() <= WRITE_LOW_WATER

    def _wake_drainers(self, _: object = None) -> None:
        with self._lock:
            waiters, self._drain_waiters = self._drain_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def _wake_all(self, _: object = None) -> None:
        """Loop thread: the pipe is closed (or broken); wake every waiter."""
        self._closed = True
        self._wake_drainers()
        waiters, self._close_waiters = self._close_waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)


# -- the portable bridge: one thread per pipe ---------------------------------------------------
class _ThreadFlowControl:
    """The "transport" a StreamReader pauses and resumes; here it gates a reader thread.

    The thread may read only while the reader is not paused and fewer than
    :data:`MAX_IN_FLIGHT` bytes are on their way to the loop.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.paused = False
        self.in_flight = 0
        self.closing = False

    # Loop thread (the StreamReader calls these).
    def pause_reading(self) -> None:
        with self._cond:
            self.paused = True

    def resume_reading(self) -> None:
        with self._cond:
            self.paused = False
            self._cond.notify()

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        with self._cond:
            self.closing = True
            self._cond.notify()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def delivered(self, size: int) -> None:
        with self._cond:
            self.in_flight -= size
            self._cond.notify()

    # Reader thread.
    def room(self) -> int:
        """Block until reading is allowed; how many bytes may be read (0: stop)."""
        with self._cond:
            while not self.closing and (self.paused or self.in_flight >= MAX_IN_FLIGHT):
                self._cond.wait()
            if self.closing:
                return 0
            return min(READ_CHUNK, MAX_IN_FLIGHT - self.in_flight)

    def sent(self, size: int) -> None:
        with self._cond:
            self.in_flight += size


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
        self._flow = _ThreadFlowControl()
        self.reader = BridgedReader(self._flow, limit=limit, loop=loop)
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
        if not CAN_POLL_PIPES:
            return not self._flow.closing
        poller = select.poll()
        poller.register(fd, select.POLLIN | select.POLLHUP | select.POLLERR)
        while not self._flow.closing:
            if poller.poll(_STOP_POLL_SECONDS * 1000):
                return True
        return False

    def _run(self) -> None:
        fd = self._pipe.fileno()
        flow = self._flow
        eof = False
        try:
            while True:
                room = flow.room()
                if not room or not self._wait_readable(fd):
                    break
                try:
                    data = os.read(fd, room)
                except OSError:  # e.g. the handle was closed under us on Windows
                    eof = True
                    break
                if not data:
                    eof = True
                    break
                flow.sent(len(data))
                if not call_soon(self._loop, self._deliver, data):
                    eof = True
                    break
            if not eof and CAN_POLL_PIPES:
                # Asked to stop (the pipe is let go of): keep what is already in it.
                for data in read_available(fd)[0]:
                    flow.sent(len(data))
                    call_soon(self._loop, self._deliver, data)
        finally:
            with contextlib.suppress(OSError):
                self._pipe.close()
            call_soon(self._loop, self._feed_eof)
            self._done.set()

    def _deliver(self, data: bytes) -> None:
        self.reader.feed_data(data)
        self._flow.delivered(len(data))

    def _feed_eof(self) -> None:
        self.reader.feed_pipe_eof()


class ThreadedStdinWriter(StdinWriterBase):
    """A stdin whose writes one thread performs, started on the first write."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pipe: IO[bytes], *, name: str) -> None:
        super().__init__(loop, pipe)
        self._name = name
        self._wakeup = threading.Condition(self._lock)
        self._queue: collections.deque[bytes] = collections.deque()
        self._queued = 0
        self._thread: threading.Thread | None = None

    def _pending(self) -> int:
        return self._queued

    def _enqueue(self, data: bytes | bytearray | memoryview) -> None:
        with self._lock:
            self._queue.append(bytes(data))
            self._queued += len(data)
            self._wakeup.notify()
            start = self._thread is None
            if start:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        if start:
            assert self._thread is not None
            self._thread.start()

    def _start_close(self) -> None:
        with self._lock:
            self._wakeup.notify()
            started = self._thread is not None
        if not started:
            self._close_pipe()
            self._wake_all()

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
                    view = view[os.write(fd, view) :]
            except OSError as exc:
                with self._lock:
                    self._queue.clear()
                    self._queued = 0
                    self._exc = as_broken_pipe(exc)
                break
            with self._lock:
                self._queued -= len(chunk)
                wake = self._wants_drain_wakeup()
            if wake:
                call_soon(self._loop, self._wake_drainers)
        self._close_pipe()
        call_soon(self._loop, self._wake_all)

    def stop(self) -> None:
        """Drop what is queued and let the thread close the pipe and end."""
        with self._lock:
            self._queue.clear()
            self._queued = 0
            self._closing = True
            self._wakeup.notify()
            started = self._thread is not None
        if not started:
            self._close_pipe()

    def join(self, timeout: float | None = None) -> None:
        """Wait for the writer thread (if one was started) to end."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)


class ThreadPerPipe:
    """The portable :class:`PipeBridge`: a thread per output pipe, one per stdin with data.

    Works with any pipe the OS can read blockingly (Windows included). Threads end at end of
    file; :meth:`close` asks the ones still running to stop and waits for them.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._readers: list[PipeReaderThread] = []
        self._writers: list[ThreadedStdinWriter] = []

    def open_reader(
        self, loop: asyncio.AbstractEventLoop, pipe: IO[bytes], *, limit: int, name: str
    ) -> BridgedReader:
        """Start a :class:`PipeReaderThread` on ``pipe`` and return its reader."""
        reader = PipeReaderThread(loop, pipe, limit=limit, name=name)
        with self._lock:
            self._readers = [r for r in self._readers if not r.finished]
            self._readers.append(reader)
        return reader.reader

    def open_writer(
        self, loop: asyncio.AbstractEventLoop, pipe: IO[bytes], *, name: str
    ) -> ThreadedStdinWriter:
        """A :class:`ThreadedStdinWriter` on ``pipe``."""
        writer = ThreadedStdinWriter(loop, pipe, name=name)
        with self._lock:
            self._writers = [w for w in self._writers if not w._closed]
            self._writers.append(writer)
        return writer

    def close(self) -> None:
        """Stop every thread still running and wait (up to 2 s in all) for them to end.

        A POSIX reader notices within 0.25 s; a Windows reader blocked on a pipe that a
        surviving descendant holds open cannot be interrupted, and is left to end with it.
        """
        with self._lock:
            readers, self._readers = self._readers, []
            writers, self._writers = self._writers, []
        for reader in readers:
            reader.stop()
        for writer in writers:
            writer.stop()
        deadline = time.monotonic() + _JOIN_SECONDS
        for reader in readers:
            reader.join(max(0.0, deadline - time.monotonic()))
        for writer in writers:
            writer.join(max(0.0, deadline - time.monotonic()))
