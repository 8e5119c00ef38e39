"""One I/O thread per THREADED strategy moving every child's pipe bytes (POSIX).

Why a thread at all: THREADED exists for event loops that cannot watch pipes, so the loop must
not be asked to. Why one thread and not one per pipe (what :class:`~._pipes.ThreadPerPipe` does,
and Windows still needs): a thread per pipe makes the thread count grow with the live children
(1,000 threads for 500 ``run()`` calls) and costs a ``Thread.start()`` per pipe on every spawn.
On POSIX pipes can be made non-blocking and multiplexed, so a single thread running a
``selectors`` loop serves all of them:

- **Reading**: each readable pipe gets one ``os.read`` of up to 256 KiB per wake-up. Everything
  read in one pass of the selector (all pipes, all children) goes to the event loop in *one*
  ``call_soon_threadsafe``, and a batch still waiting for the loop absorbs the next ones, so a
  busy loop is woken once, not once per chunk.
- **Reading on the loop's thread**: a ``StreamReader`` that runs dry first takes what its pipe
  holds right now with one non-blocking ``os.read`` on the loop's own thread
  (:meth:`_ReadSource.read_now`), as the stdin writer below tries its write first. While a
  child writes fast the pipe is seldom empty, and this skips the hand-over from the I/O thread
  (which needs the GIL while the loop holds it: a quarter of the streaming time on 2 cores). The
  loop still never waits on a pipe. One reader of a pipe at a time (a claim under the lock),
  and the loop reads only once everything the I/O thread read was delivered, so the bytes keep
  the pipe's order; the pipe is closed only by the claim's holder, after which nobody reads it.
- **Flow control**: a pipe is unregistered from the selector ("parked") while its
  ``StreamReader`` is paused (buffer over ``2 * limit``) or while :data:`~._pipes.MAX_IN_FLIGHT`
  bytes read from it have not yet been fed to the reader; it is registered again when the reader
  resumes or catches up. The child then blocks on its full pipe: memory per stream stays below
  ``2 * limit + 2 * MAX_IN_FLIGHT`` however slow the consumer is.
- **Writing stdin**: ``write()`` first tries a non-blocking ``os.write`` right away on the
  caller's thread (as asyncio's own pipe transport does, so small inputs cost no thread hop);
  only a remainder is queued and written by the I/O thread when the pipe becomes writable.
- **Child exit**, when the loop cannot watch a pidfd: :func:`~._child_exit.watch_exit` can
  register the pidfd here instead of starting a waiter thread.
- **Waking it**: other threads queue commands (register, re-register a resumed pipe, ...) and
  write one byte to a self-pipe the selector watches, only if no byte is pending already.

The thread starts with the first pipe and ends in :meth:`IOThread.close` (strategy close), which
reads what is left in each pipe (non-blocking), delivers it and end of file, and closes every
pipe it still holds, so no thread and no descriptor outlives the strategy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import selectors
import threading
import time
from collections.abc import Callable
from typing import IO, Any, Protocol

from .._platform import start_afresh_after_fork
from ._pipes import (
    MAX_IN_FLIGHT,
    READ_CHUNK,
    BridgedReader,
    StdinWriterBase,
    as_broken_pipe,
    call_soon,
    read_available,
)

__all__ = ["IOThread"]

logger = logging.getLogger(__name__)

#: What the I/O thread hands the loop: (loop, callback, argument), run as ``callback(argument)``.
Delivery = tuple[asyncio.AbstractEventLoop, Callable[[Any], None], Any]
Batch = list[Delivery]
Command = Callable[[Batch], None]

#: At most this much is read from a pipe when draining it at close (non-blocking).
_FINAL_BYTES = 4 * READ_CHUNK
#: How often the last reads of a pipe look again while the loop's ``read_now`` holds it, and
#: for how long (one non-blocking read takes microseconds; past that, e.g. a signal handler
#: running inside it, the loop's thread finishes the pipe itself when it lets go).
_CLAIM_POLL_SECONDS = 0.0001
_CLAIM_WAIT_SECONDS = 1.0
#: A pipe the loop reads itself goes back to the I/O thread once the loop has not read it for
#: this long: a consumer that pauses gets the same read-ahead as with asyncio's transport.
_LEND_SECONDS = 0.05
#: At most this many deliveries run per loop callback; the rest in the next loop iteration.
_FLUSH_CHUNK = 128


class _Handler(Protocol):
    """Something registered in the I/O thread's selector."""

    def on_ready(self, mask: int, out: Batch) -> None:
        """The descriptor is ready; runs on the I/O thread."""

    def shutdown(self, out: Batch) -> None:
        """Release everything; runs on the I/O thread at close (or inline once closed)."""


class IOThread:
    """One thread and one selector serving the pipes of every child of a strategy.

    Thread-safe: :meth:`open_reader`, :meth:`open_writer` and :meth:`watch_pidfd` may be called
    from any event loop's thread; each stream is fed on the loop it was opened for.
    """

    def __init__(self, name: str = "prismq-io") -> None:
        self._name = name
        self._lock = threading.Lock()
        self._commands: list[Command] = []
        self._woken = False
        self._closed = False
        self._thread: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r = self._wake_w = -1
        self._outbox: dict[asyncio.AbstractEventLoop, Batch] = {}
        #: Handlers holding a descriptor; touched by the I/O thread only.
        self._live: set[_Handler] = set()
        #: Pipes parked while their loop reads them itself (I/O thread only), taken back
        #: after _LEND_SECONDS without a read.
        self._lent: set[_ReadSource] = set()
        start_afresh_after_fork(self)

    def _forked(self) -> None:
        """In a forked child: the thread does not exist there, and the parent's pipes and
        exits are not this process's to serve. Start afresh (a new thread and selector on
        next use), without touching the selector: an epoll instance is shared with the
        parent, and unregistering would take the parent's pipes out of its own thread's set.
        """
        selector, self._selector = self._selector, None
        if selector is not None:
            with contextlib.suppress(OSError):
                selector.close()  # (closes this process's descriptor only)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        self._lock = threading.Lock()
        self._commands = []
        self._woken = False
        self._thread = None
        self._outbox = {}
        self._live = set()
        self._lent = set()

    @property
    def running(self) -> bool:
        """Whether the thread is alive."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    # -- public API (any thread) ------------------------------------------------------------
    def open_reader(
        self, loop: asyncio.AbstractEventLoop, pipe: IO[bytes], *, limit: int, name: str = ""
    ) -> BridgedReader:
        """A ``StreamReader`` on ``loop`` fed from ``pipe`` until end of file; owns ``pipe``."""
        source = _ReadSource(self, loop, pipe, limit)
        self._register(source)
        return source.reader

    def open_writer(
        self, loop: asyncio.AbstractEventLoop, pipe: IO[bytes], *, name: str = ""
    ) -> StdinWriterBase:
        """A ``StreamWriter``-like stdin writing to ``pipe``; owns ``pipe``."""
        return _PumpStdinWriter(self, loop, pipe)

    def watch_pidfd(
        self,
        loop: asyncio.AbstractEventLoop,
        pidfd: int,
        callback: Callable[[], None],
        orphaned: Callable[[], None] | None = None,
    ) -> bool:
        """Call ``callback()`` on ``loop`` once ``pidfd`` is readable (the child exited).

        Takes ownership of ``pidfd``. Returns False (and closes nothing) once closed. If the
        thread is closed before the child exits, ``callback`` runs anyway: it must check.
        ``orphaned()`` runs instead, on this thread, if ``loop`` has closed by then (nobody
        there would reap the child: it stayed a zombie for the life of the host).
        """
        with self._lock:
            if self._closed:
                return False
        self._register(_ExitWatch(self, loop, pidfd, callback, orphaned))
        return True

    def close(self) -> None:
        """Deliver what the pipes hold, close them, and end the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            thread = self._thread
            if thread is not None:
                self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    # -- plumbing ---------------------------------------------------------------------------
    def _register(self, handler: _ReadSource | _ExitWatch) -> None:
        if not self.submit(handler.arm):
            out: Batch = []
            handler.shutdown(out)
            self._post(out)

    def submit(self, command: Command) -> bool:
        """Run ``command(batch)`` on the I/O thread soon; False (not run) once closed."""
        with self._lock:
            if self._closed:
                return False
            self._commands.append(command)
            if self._thread is None:
                self._start()
            if not self._woken:
                self._wake()
        return True

    def _wake(self) -> None:
        """Write the wake-up byte; ``_lock`` held (so the pipe cannot be closed meanwhile)."""
        self._woken = True
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"\0")

    def _start(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    @property
    def selector(self) -> selectors.BaseSelector:
        """The selector (I/O thread only)."""
        assert self._selector is not None
        return self._selector

    def _run(self) -> None:
        selector = self.selector
        out: Batch = []
        try:
            while not self._closed:
                for key, mask in selector.select(_LEND_SECONDS if self._lent else None):
                    handler = key.data
                    if handler is None:
                        self._run_commands(out)
                        continue
                    try:
                        handler.on_ready(mask, out)
                    except Exception:  # a bug must not stall every other child's pipes
                        logger.exception("prismq I/O thread: handler %r failed", handler)
                        self._forget(handler, out)
                if self._lent:
                    now = time.monotonic()
                    for source in list(self._lent):
                        try:
                            source.take_back(now, out)
                        except Exception:
                            logger.exception("prismq I/O thread: handler %r failed", source)
                            self._forget(source, out)
                if out:
                    self._post(out)
                    out = []
        finally:
            self._run_commands(out)
            for handler in list(self._live):
                self._forget(handler, out)
            self._post(out)
            with self._lock:
                self._drop_closed_loops()
                selector.close()
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1

    def _forget(self, handler: _Handler, out: Batch) -> None:
        try:
            handler.shutdown(out)
        except Exception:
            logger.exception("prismq I/O thread: shutting %r down failed", handler)
        self._live.discard(handler)

    def _run_commands(self, out: Batch) -> None:
        with contextlib.suppress(OSError):
            while os.read(self._wake_r, 4096):
                pass
        with self._lock:
            self._woken = False
            commands, self._commands = self._commands, []
        for command in commands:
            try:
                command(out)
            except Exception:
                logger.exception("prismq I/O thread: command %r failed", command)

    def _post(self, out: Batch) -> None:
        """Hand ``out`` to the loops: one ``call_soon_threadsafe`` per loop, if none pending."""
        if not out:
            return
        first = out[0][0]
        groups: dict[asyncio.AbstractEventLoop, Batch]
        if all(item[0] is first for item in out):
            groups = {first: out}
        else:
            groups = {}
            for item in out:
                groups.setdefault(item[0], []).append(item)
        schedule = []
        with self._lock:
            self._drop_closed_loops()
            for loop, items in groups.items():
                pending = self._outbox.get(loop)
                if pending is None:
                    self._outbox[loop] = items
                    schedule.append(loop)
                else:
                    pending.extend(items)
        for loop in schedule:
            if not call_soon(loop, self._flush, loop):
                with self._lock:
                    _abandon(self._outbox.pop(loop, []))

    def _drop_closed_loops(self) -> None:
        """``_lock`` held: forget the hand-overs of loops closed before they ran them (their
        ``_flush`` never comes), with the readers and the bytes they would keep alive; the
        exits among them are reaped here."""
        if self._outbox:
            for loop in [loop for loop in self._outbox if loop.is_closed()]:
                _abandon(self._outbox.pop(loop))

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        """Loop thread: run what the I/O thread delivered, in order."""
        with self._lock:
            items = self._outbox.pop(loop, [])
            if len(items) > _FLUSH_CHUNK and not self._closed:
                # A thousand children stopped together end two thousand pipes at once: their
                # ends of file in one callback would stall the loop for tens of ms. The rest
                # stays first in the outbox (what the thread posts meanwhile goes after it).
                # Not once closed: a loop that is ending (cleanup() as asyncio.run() returns)
                # runs only a few more iterations, and the rest would never be delivered.
                self._outbox[loop] = items[_FLUSH_CHUNK:]
                del items[_FLUSH_CHUNK:]
                loop.call_soon(self._flush, loop)
        for _, callback, arg in items:
            try:
                callback(arg)
            except Exception:
                logger.exception("prismq I/O thread: delivering to %r failed", callback)


class _ReadSource:
    """One output pipe: reads it on the I/O thread, feeds its ``StreamReader`` on the loop.

    It is also the reader's "transport", so ``pause_reading``/``resume_reading`` arrive here.
    ``_paused``, ``_in_flight``, ``_parked``, ``_claimed_by``, ``_loop_owned``, ``_handover``
    and ``_done`` are shared by the two threads (written under the pump's lock); ``_registered``
    belongs to the I/O thread. ``_claimed_by``: the thread reading the pipe now (the I/O thread,
    or the loop's in :meth:`read_now`), 0 for none. ``_loop_owned``: the loop's last
    :meth:`read_now` found bytes, so it will read the pipe itself while they keep coming; the
    I/O thread stops watching it meanwhile. ``_handover``: the pipe's last reads and its close
    are left to the ``read_now`` holding it (see :meth:`_claim_last`).
    """

    def __init__(
        self, pump: IOThread, loop: asyncio.AbstractEventLoop, pipe: IO[bytes], limit: int
    ) -> None:
        self._pump = pump
        self._lock = pump._lock
        self._loop = loop
        self._pipe = pipe
        self._fd = pipe.fileno()
        os.set_blocking(self._fd, False)
        self.reader = BridgedReader(self, limit=limit, loop=loop)
        self._paused = False
        self._in_flight = 0
        self._parked = False
        self._registered = False
        self._claimed_by = 0
        self._handover = False
        self._loop_owned = False
        self._taken_at = 0.0  # time.monotonic() of the loop's last read_now that found bytes
        self._in_lent = False  # in (or on its way into) the pump's _lent set
        self._done = False

    def __repr__(self) -> str:
        return f"<_ReadSource fd={self._fd}>"

    # -- the transport API the StreamReader uses (loop thread) -----------------------------
    def pause_reading(self) -> None:
        with self._lock:
            self._paused = True

    def resume_reading(self) -> None:
        with self._lock:
            self._paused = False
            self._loop_owned = False  # a reader that paused may wait next: the thread reads
            rearm = self._unpark()
        if rearm:
            self._pump.submit(self.arm)

    def give_back(self) -> None:
        """Loop thread: its reader is about to wait for the I/O thread; make sure the thread
        watches the pipe (the loop may have kept it)."""
        with self._lock:
            self._loop_owned = False
            rearm = self._unpark()
        if rearm:
            self._pump.submit(self.arm)

    def is_closing(self) -> bool:
        return self._done

    def close(self) -> None:
        """Let go of the pipe (:meth:`BridgedReader.release`): the I/O thread delivers what it
        holds now, then end of file, and closes it."""
        self._pump.submit(self._release)

    def _release(self, out: Batch) -> None:
        self._pump._forget(self, out)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._pipe if name == "pipe" else default

    def _unpark(self) -> bool:
        """Lock held: whether a parked pipe may be read again (and claim re-registering it)."""
        if (
            self._parked
            and not self._paused
            and not self._loop_owned
            and self._in_flight < MAX_IN_FLIGHT
        ):
            self._parked = False
            return True
        return False

    def _deliver(self, data: bytes) -> None:
        self.reader.feed_data(data)
        with self._lock:
            self._in_flight -= len(data)
            rearm = self._unpark()
        if rearm:
            self._pump.submit(self.arm)

    def _eof(self, _: object) -> None:
        self.reader.feed_pipe_eof()

    def read_now(self, size: int) -> bool:
        """Loop thread, its reader out of bytes: feed it up to ``size`` bytes the pipe holds
        right now, without the I/O thread. True if it fed bytes (or, rarely, end of file: see
        :meth:`_claim_last`); False: the reader must wait for the I/O thread.

        Declines while the I/O thread reads the pipe or holds bytes it read and the loop has
        not been handed yet (these would come after them), while the reader is paused, and
        once the pipe is finished. An empty pipe, end of file and read errors are left to the
        I/O thread, which reports them as always.

        While bytes keep coming the loop keeps the pipe: the I/O thread parks it instead of
        waking (and wanting the GIL) for bytes the loop will take anyway, until a
        ``read_now`` finds nothing, the reader waits for another reason
        (:meth:`give_back`), or the loop has not read for ``_LEND_SECONDS``
        (:meth:`take_back`).
        """
        me = threading.get_ident()
        claimed = lend = rearm = handover = False
        data = b""
        try:
            with self._lock:
                busy = bool(self._claimed_by) or self._done or self._paused
                if not busy and self._in_flight:
                    # The I/O thread's bytes are on their way (they wake the reader): the loop
                    # can read the next ones itself, so the thread leaves the pipe alone now.
                    lend = self._keep(True)
                elif not busy:
                    self._claimed_by = me
                    claimed = True
            if claimed:
                try:
                    data = os.read(self._fd, min(size, READ_CHUNK))
                except OSError:  # BlockingIOError: nothing there yet
                    data = b""
        finally:
            # Whatever escapes (a KeyboardInterrupt from a signal handler, say), the claim is
            # let go and the pipe watched again, or the pipe finished if the I/O thread left
            # that to us: a claim left behind would keep the thread off the pipe for good.
            with self._lock:
                if self._claimed_by == me:
                    handover = self._handover
                    if not handover:
                        self._claimed_by = 0
                        lend = self._keep(bool(data))
                        rearm = not data and self._unpark()
            if handover:
                self._finish_here(data)
            if lend:
                self._pump.submit(self._lend)
            if rearm:
                self._pump.submit(self.arm)
        if handover:
            return True
        if not data:
            return False
        self.reader.feed_data(data)
        return True

    def _finish_here(self, data: bytes) -> None:
        """Loop thread, still holding the claim the I/O thread gave up waiting for: do the
        pipe's last reads, close it and end the reader, as :meth:`shutdown` would have."""
        try:
            if data:
                self.reader.feed_data(data)
            for chunk in read_available(self._fd, _FINAL_BYTES)[0]:
                self.reader.feed_data(chunk)
        finally:
            with contextlib.suppress(OSError):
                self._pipe.close()
            self.reader.feed_pipe_eof()

    def _keep(self, keep: bool) -> bool:
        """Lock held: the loop keeps reading the pipe itself (or gives it back). True if the
        I/O thread must be told to time the loan (the pipe is parked already, for another
        reason, so the thread will not see it become the loop's)."""
        self._loop_owned = keep
        if not keep:
            return False
        self._taken_at = time.monotonic()
        if self._parked and not self._in_lent:
            self._in_lent = True
            return True
        return False

    def _lend(self, out: Batch) -> None:
        """I/O thread: time the loop's use of this pipe (see :meth:`take_back`)."""
        self._pump._lent.add(self)

    # -- the I/O thread ----------------------------------------------------------------------
    def arm(self, out: Batch) -> None:
        with self._lock:
            self._in_lent = False
        self._pump._lent.discard(self)
        if self._done or self._registered:
            return
        self._pump.selector.register(self._fd, selectors.EVENT_READ, self)
        self._registered = True
        self._pump._live.add(self)

    def _park(self) -> None:
        self._pump.selector.unregister(self._fd)
        self._registered = False

    def on_ready(self, mask: int, out: Batch) -> None:
        if self._done or not self._registered:
            return  # an event from the same select() as the command that finished the pipe
        with self._lock:
            # Parked, not read: a paused reader, a full hand-over, a pipe the loop keeps
            # (timed in _lent), or one the loop is reading right now (read_now re-arms or
            # lends it as it lets go; returning instead would be woken again and again).
            owned = self._loop_owned
            if self._paused or owned or self._claimed_by:
                room = 0
            else:
                room = MAX_IN_FLIGHT - self._in_flight
            if room <= 0:
                self._parked = True
                self._in_lent = self._in_lent or owned
            else:
                self._claimed_by = threading.get_ident()
        if room <= 0:
            self._park()
            if owned:
                self._pump._lent.add(self)
            return
        try:
            data: bytes | None = os.read(self._fd, min(room, READ_CHUNK))
        except BlockingIOError:  # read_now took them first
            data = None
        except OSError:  # EIO and friends: treat as end of file
            data = b""
        except BaseException:
            with self._lock:
                self._claimed_by = 0
            raise
        if data is not None and not data:
            self._finish(out)  # still claimed: nobody reads the pipe it closes
            return
        with self._lock:
            self._claimed_by = 0
            if data is None:
                return
            self._in_flight += len(data)
            park = self._paused or self._in_flight >= MAX_IN_FLIGHT
            if park:
                self._parked = True
        if park:
            self._park()
        out.append((self._loop, self._deliver, data))

    def take_back(self, now: float, out: Batch) -> None:
        """I/O thread: watch the pipe again if the loop has not read it for _LEND_SECONDS."""
        with self._lock:
            if self._loop_owned and now - self._taken_at < _LEND_SECONDS:
                return
            self._loop_owned = False
            self._in_lent = False
            rearm = self._unpark()
        self._pump._lent.discard(self)
        if rearm:
            self.arm(out)

    def _finish(self, out: Batch) -> None:
        """The pipe is done: close it and deliver end of file. The caller holds the claim, so
        no ``read_now`` is reading it, and none will once ``_done`` is set."""
        self._pump._lent.discard(self)
        if self._registered:
            self._park()
        with self._lock:
            self._done = True
        self._pump._live.discard(self)
        with contextlib.suppress(OSError):
            self._pipe.close()
        out.append((self._loop, self._eof, None))

    def _claim_last(self) -> bool:
        """Claim the pipe for its last reads and its close, for good; True if claimed.

        Waits out a ``read_now`` in progress (one non-blocking read: microseconds). One that
        holds on past ``_CLAIM_WAIT_SECONDS`` (its thread is held up inside it, by a signal
        handler, say) is left to finish the pipe itself as it lets go (False): the descriptor
        must not be closed under a read, which could then read another file's bytes.
        """
        me = threading.get_ident()
        deadline = time.monotonic() + _CLAIM_WAIT_SECONDS
        while True:
            with self._lock:
                if self._claimed_by in (0, me):
                    self._claimed_by = me
                    self._done = True  # no read_now from now on
                    return True
                if time.monotonic() > deadline:
                    self._handover = True
                    self._done = True
                    return False
            time.sleep(_CLAIM_POLL_SECONDS)

    def shutdown(self, out: Batch) -> None:
        """Read what the pipe holds now (ignoring flow control), deliver it, then EOF."""
        if self._done:
            return
        if self._registered:
            self._park()  # before the claim: once handed over, the descriptor is not ours
        if not self._claim_last():
            self._pump._lent.discard(self)
            self._pump._live.discard(self)
            return
        for chunk in read_available(self._fd, _FINAL_BYTES)[0]:
            out.append((self._loop, self.reader.feed_data, chunk))
        self._finish(out)


class _PumpStdinWriter(StdinWriterBase):
    """A stdin written directly when the pipe has room, else by the I/O thread.

    ``_buffer``, ``_armed`` (the I/O thread owns the pipe) and ``_shut`` (someone is closing the
    pipe) are guarded by ``_lock``, so exactly one thread ever closes the pipe.
    """

    def __init__(self, pump: IOThread, loop: asyncio.AbstractEventLoop, pipe: IO[bytes]) -> None:
        super().__init__(loop, pipe)
        self._pump = pump
        self._fd = pipe.fileno()
        os.set_blocking(self._fd, False)
        self._buffer = bytearray()
        self._armed = False
        self._shut = False

    def __repr__(self) -> str:
        return f"<_PumpStdinWriter fd={self._fd}>"

    def _pending(self) -> int:
        return len(self._buffer)

    def _enqueue(self, data: bytes | bytearray | memoryview) -> None:
        error: OSError | None = None
        with self._lock:
            if self._shut:
                return
            if self._armed:
                self._buffer += data
                return
            # Nothing queued: write now, as asyncio's pipe transport does.
            try:
                written = os.write(self._fd, data)
            except BlockingIOError:
                written = 0  # the pipe is full: everything goes to the queue
            except OSError as exc:
                error = as_broken_pipe(exc)
                self._exc = error
                self._shut = True
            if error is None:
                if written == len(data):
                    return
                self._buffer += data[written:]
                self._armed = True
        if error is not None:
            self._close_pipe()
            self._wake_all()
        elif not self._pump.submit(self.arm):
            self._fail(BrokenPipeError("the THREADED strategy was closed"))

    def _fail(self, error: OSError) -> None:
        """Loop thread: the pipe cannot be written any more."""
        with self._lock:
            self._buffer.clear()
            self._armed = False
            if self._exc is None:
                self._exc = error
            shut, self._shut = self._shut, True
        if not shut:
            self._close_pipe()
        self._wake_all()

    def _start_close(self) -> None:
        with self._lock:
            if self._armed or self._shut:
                return  # the I/O thread closes once the queue is written
            self._shut = True
        self._close_pipe()
        self._wake_all()

    # -- the I/O thread ----------------------------------------------------------------------
    def arm(self, out: Batch) -> None:
        with self._lock:
            if not self._armed or self._shut:
                return
        self._pump.selector.register(self._fd, selectors.EVENT_WRITE, self)
        self._pump._live.add(self)

    def on_ready(self, mask: int, out: Batch) -> None:
        error: OSError | None = None
        with self._lock:
            buffer = self._buffer
            try:
                while buffer:
                    del buffer[: os.write(self._fd, buffer)]
            except BlockingIOError:
                pass
            except OSError as exc:
                error = as_broken_pipe(exc)
                self._exc = error
                buffer.clear()
            finished = not buffer
            if finished:
                self._armed = False
                self._pump.selector.unregister(self._fd)
                self._pump._live.discard(self)
            close = finished and (self._closing or error is not None) and not self._shut
            if close:
                self._shut = True
            wake_drainers = not close and self._wants_drain_wakeup()
        if close:
            self._close_pipe()
            out.append((self._loop, self._wake_all, None))
        elif wake_drainers:
            out.append((self._loop, self._wake_drainers, None))

    def shutdown(self, out: Batch) -> None:
        """The strategy is closing: drop the queue, close the pipe, fail pending drains."""
        with self._lock:
            registered = self._armed
            self._buffer.clear()
            self._armed = False
            if self._exc is None:
                self._exc = BrokenPipeError("the THREADED strategy was closed")
            shut, self._shut = self._shut, True
        if registered and self._pump._selector is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._pump.selector.unregister(self._fd)
        if not shut:
            self._close_pipe()
        out.append((self._loop, self._wake_all, None))


def _abandon(items: Batch) -> None:
    """I/O thread: ``items`` will never run (their loop closed); reap the exits among them."""
    for _, callback, _ in items:
        watch = getattr(callback, "__self__", None)
        if isinstance(watch, _ExitWatch):
            watch.abandoned()


class _ExitWatch:
    """A pidfd in the I/O thread's selector: tells the loop when the child has exited."""

    def __init__(
        self,
        pump: IOThread,
        loop: asyncio.AbstractEventLoop,
        pidfd: int,
        callback: Callable[[], None],
        orphaned: Callable[[], None] | None = None,
    ) -> None:
        self._pump = pump
        self._loop = loop
        self._pidfd = pidfd
        self._callback = callback
        self._orphaned = orphaned
        self._registered = False
        self._done = False

    def arm(self, out: Batch) -> None:
        if self._done:
            return
        self._pump.selector.register(self._pidfd, selectors.EVENT_READ, self)
        self._registered = True
        self._pump._live.add(self)

    def on_ready(self, mask: int, out: Batch) -> None:
        self.shutdown(out)

    def shutdown(self, out: Batch) -> None:
        """Close the pidfd and run the callback (which checks whether the child really exited)."""
        if self._done:
            return
        self._done = True
        if self._registered:
            self._pump.selector.unregister(self._pidfd)
            self._registered = False
        self._pump._live.discard(self)
        os.close(self._pidfd)
        if self._loop.is_closed():
            self.abandoned()
        else:
            out.append((self._loop, self._run_callback, None))

    def abandoned(self) -> None:
        """I/O thread: the loop closed before it heard the exit; reap the child here."""
        orphaned, self._orphaned = self._orphaned, None
        if orphaned is not None:
            try:
                orphaned()
            except Exception:
                logger.exception("prismq I/O thread: reaping an orphaned child failed")

    def _run_callback(self, _: object) -> None:
        self._callback()
