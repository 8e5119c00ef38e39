"""Moving a child's pipes to and from memory in one blocking call (what ``communicate`` does),
but into bounded buffers, for the LOCAL strategy's worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import os
import selectors
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

from .._core._result import TailBuffer
from .._platform import PIPE_BUF, PIPES_SELECTABLE
from ._pipes import read_available

__all__ = ["DrainWatch", "drain_blocking", "wait_unless_host_exits"]

_READ = 256 * 1024
# Writes to a pipe of at most PIPE_BUF bytes never block once select() said "writable".
_WRITE = PIPE_BUF

#: How often a watched drain looks at the child (has it exited?) and at :meth:`DrainWatch.abandon`.
_TICK = 0.05

#: Set when the interpreter starts to exit, before it joins the thread pools' workers (see
#: :func:`_note_host_exit`): a watched drain whose event loop is gone then lets go, so a child
#: that outlives an unclosed wrapper (its loop closed without clean-up) does not keep the host
#: from exiting.
_HOST_EXITING = threading.Event()


def _note_host_exit() -> None:
    # concurrent.futures joins every pool worker at exit, in a "threading atexit" callback that
    # runs before the atexit module's; those callbacks run last-registered first, so this one,
    # registered after concurrent.futures was imported, runs before that join. (A private hook
    # of threading, 3.9+; without it a drain holds exit until its child ends, as before.) It
    # runs when the main thread ends, while other threads may still run loops of their own:
    # those runs go on (see DrainWatch.abandoned).
    _HOST_EXITING.set()


_register = getattr(threading, "_register_atexit", None)
if callable(_register):
    try:
        import concurrent.futures.thread  # noqa: F401  (registered first, so it runs after ours)

        _register(_note_host_exit)
    except RuntimeError:  # imported after the main thread ended: too late to register
        pass


class DrainWatch:
    """Links a blocking drain to the event loop, from the worker thread's side.

    ``on_exit(returncode)`` is called (in the worker thread) as soon as the drain sees that the
    child has exited while its pipes are still open, i.e. when something the child started holds
    them; when the pipes close first, the drain just returns. :meth:`abandon` (any thread) makes
    the drain close the pipes and return within :data:`_TICK` seconds, keeping what it read.
    ``loop`` is the event loop the drain reports to: once the interpreter is exiting, a drain
    whose loop no longer runs is abandoned too.
    """

    def __init__(
        self, on_exit: Callable[[int], None], loop: asyncio.AbstractEventLoop | None = None
    ) -> None:
        self.on_exit = on_exit
        self._abandoned = threading.Event()
        self._loop = loop

    def abandon(self) -> None:
        """Ask the drain to stop reading, close the pipes and return. Idempotent."""
        self._abandoned.set()

    @property
    def abandoned(self) -> bool:
        """Whether :meth:`abandon` was called, or the interpreter is exiting with this drain's
        loop gone (closed, or no longer running: nobody can read what it would deliver)."""
        return self._abandoned.is_set() or self.host_gone

    @property
    def host_gone(self) -> bool:
        """Whether the interpreter is exiting and this drain's loop no longer runs (a loop
        still running in another thread goes on, and so does its drain)."""
        if not _HOST_EXITING.is_set():
            return False
        loop = self._loop
        return loop is None or loop.is_closed() or not loop.is_running()


def wait_unless_host_exits(popen: subprocess.Popen[bytes], watch: DrainWatch) -> int | None:
    """``popen.wait()`` for a worker thread of a pool, except that it returns ``None`` once the
    interpreter is exiting and ``watch``'s loop is gone (the pool's join at exit must not wait
    for a child nobody will supervise; the exit's own clean-up kills its tree)."""
    while True:
        try:
            return popen.wait(_TICK * 10)
        except subprocess.TimeoutExpired:
            if watch.host_gone:
                return None


def drain_blocking(
    popen: subprocess.Popen[bytes],
    input: bytes | None,
    out: TailBuffer | None,
    err: TailBuffer | None,
    watch: DrainWatch | None = None,
) -> None:
    """Write ``input`` to the child's stdin (then close it) while reading stdout/stderr into the
    buffers, until both reach end of file. Blocks; run it in a worker thread.

    A child that closes stdin early is not an error (``communicate()`` ignores it too). With a
    ``watch``, the child's exit is reported while its pipes are still held open (checked on a
    clock, so a leftover that keeps writing cannot hide it) and the drain can be abandoned; the
    decisions (how long to wait, what to stop) are the event loop's (``_core/_run_process.py``).
    On Windows, whose pipes cannot be select()ed, a thread moves each pipe (see
    :func:`_drain_with_threads`).
    """
    if not PIPES_SELECTABLE:
        _drain_with_threads(popen, input, out, err, watch)
        return
    exited = False
    with selectors.DefaultSelector() as selector:
        view = memoryview(input or b"")
        if popen.stdin is not None:
            if view:
                selector.register(popen.stdin, selectors.EVENT_WRITE)
            else:
                _close(popen.stdin)
        sinks: dict[int, TailBuffer | None] = {}
        for output, sink in ((popen.stdout, out), (popen.stderr, err)):
            if output is not None:
                selector.register(output, selectors.EVENT_READ)
                sinks[output.fileno()] = sink
        next_check = time.monotonic() + _TICK
        while selector.get_map():
            ready = selector.select(_TICK if watch is not None else None)
            if watch is not None and time.monotonic() >= next_check:
                next_check = time.monotonic() + _TICK
                if not exited:
                    exited = _report_exit(popen, watch)
                if watch.abandoned:
                    for key in list(selector.get_map().values()):
                        selector.unregister(key.fd)
                        sink = sinks.get(key.fd)
                        if sink is not None:  # keep what is in the pipe already
                            for data in read_available(key.fd)[0]:
                                sink.append(data)
                        _close(key.fileobj)  # type: ignore[arg-type]
                    break
            for key, _ in ready:
                pipe = key.fileobj
                fd = key.fd
                if pipe is popen.stdin:
                    try:
                        view = view[os.write(fd, view[:_WRITE]) :]
                    except (BrokenPipeError, ConnectionResetError):
                        view = view[:0]
                    if not view:
                        selector.unregister(fd)
                        _close(popen.stdin)
                    continue
                data = os.read(fd, _READ)
                if not data:
                    selector.unregister(fd)
                    _close(pipe)  # type: ignore[arg-type]
                    continue
                sink = sinks[fd]
                if sink is not None:
                    sink.append(data)


def _close(pipe: IO[bytes]) -> None:
    with contextlib.suppress(OSError):
        pipe.close()


def _report_exit(popen: subprocess.Popen[bytes], watch: DrainWatch) -> bool:
    """Tell ``watch`` the child's exit status if it has exited (both drain routes ask on their
    clock); True once told."""
    returncode = popen.poll()
    if returncode is None:
        return False
    watch.on_exit(returncode)
    return True


def _drain_with_threads(
    popen: subprocess.Popen[bytes],
    input: bytes | None,
    out: TailBuffer | None,
    err: TailBuffer | None,
    watch: DrainWatch | None,
) -> None:
    """:func:`drain_blocking` with a thread per pipe (Windows). The calling thread keeps the
    ``watch`` as the select() route does: it reports the child's exit while the pipes are held
    open and returns when abandoned. A thread blocked in a read cannot be interrupted there (and
    closing its pipe under it could hand the number to another file), so an abandoned drain
    leaves its threads to end when the last writer closes the pipe, dropping what they still
    read; each closes its own pipe."""
    lock = threading.Lock()
    let_go = False  # (under lock) the drain has returned: nothing more goes to the sinks

    def read(pipe: IO[bytes], sink: TailBuffer | None) -> None:
        try:
            while data := pipe.read(_READ):
                with lock:
                    if let_go:
                        continue  # drain it all the same: a writer must not block on us
                    if sink is not None:
                        sink.append(data)
        except (OSError, ValueError):
            pass  # the pipe broke or was closed: nothing more will come
        finally:
            _close(pipe)

    def write(pipe: IO[bytes]) -> None:
        # A thread of its own: a child that does not read its stdin must not keep the calling
        # thread from the watch.
        with contextlib.suppress(OSError, ValueError):
            if input:
                pipe.write(input)
        _close(pipe)

    threads = [
        threading.Thread(target=read, args=(pipe, sink), daemon=True)
        for pipe, sink in ((popen.stdout, out), (popen.stderr, err))
        if pipe is not None
    ]
    if popen.stdin is not None:
        threads.append(threading.Thread(target=write, args=(popen.stdin,), daemon=True))
    for thread in threads:
        thread.start()
    exited = False
    while True:
        alive = [thread for thread in threads if thread.is_alive()]
        if not alive:
            return
        alive[0].join(_TICK if watch is not None else None)
        if watch is None:
            continue
        if not exited:
            exited = _report_exit(popen, watch)
        if watch.abandoned:
            with lock:
                let_go = True
            return
