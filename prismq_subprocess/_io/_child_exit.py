"""Learning when a ``subprocess.Popen`` child exits, without blocking the event loop.

On Linux 5.3+ a pidfd becomes readable when the child exits. The THREADED strategy's I/O thread
puts it in its selector next to the child's pipes (no thread per child, and the exit is handed
to the loop together with the pipes' end of file, in one wake-up); without an I/O thread the loop
watches it (``add_reader``). Only where neither works (Windows, macOS,
or a kernel without pidfd) does one short-lived thread per child block in ``Popen.wait()``, as
asyncio's own ``ThreadedChildWatcher`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import subprocess
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from .._platform import pidfd_open

if TYPE_CHECKING:
    from ._io_thread import IOThread

__all__ = ["reap_orphan", "release_orphaned_pidfds", "watch_exit"]

#: The pidfds each event loop watches (``add_reader``) until its child exits. A loop closed
#: before that never reads them, and closing a loop closes none of its watched descriptors:
#: :func:`release_orphaned_pidfds` does. (A strong reference: only closed loops are dropped,
#: and any event loop class can be a key.)
_loop_pidfds: dict[asyncio.AbstractEventLoop, set[int]] = {}
_loop_pidfds_lock = threading.Lock()


def release_orphaned_pidfds() -> None:
    """Close the pidfds of closed event loops (their children's exits will not be heard there).

    Any thread. Called on each new loop-watched child and when a THREADED strategy closes.
    """
    with _loop_pidfds_lock:
        gone = [loop for loop in _loop_pidfds if loop.is_closed()]
        fds = [fd for loop in gone for fd in _loop_pidfds.pop(loop)]
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _forget_pidfd(loop: asyncio.AbstractEventLoop, fd: int) -> bool:
    """Stop tracking ``fd``; True if it was tracked (then the caller closes it, nobody else)."""
    with _loop_pidfds_lock:
        fds = _loop_pidfds.get(loop)
        if fds is None or fd not in fds:
            return False
        fds.discard(fd)
        if not fds:
            del _loop_pidfds[loop]
        return True


def watch_exit(
    loop: asyncio.AbstractEventLoop,
    popen: subprocess.Popen[bytes],
    callback: Callable[[int], None],
    *,
    use_pidfd: bool = True,
    io_thread: IOThread | None = None,
) -> None:
    """Call ``callback(returncode)`` on ``loop`` once ``popen`` has exited and been reaped.

    Tries, in order: a pidfd in ``io_thread``'s selector; the same pidfd watched by ``loop``;
    a waiter thread. ``use_pidfd=False`` forces the thread (tests use it to cover the
    Windows/macOS route).
    """
    # -1: no pidfd here (macOS, Windows, an old kernel, seccomp, or the child already reaped).
    fd = pidfd_open(popen.pid) if use_pidfd else -1
    if fd >= 0:
        # The I/O thread first: its selector already watches the child's pipes, so the exit
        # reaches the loop in the same hand-off as their end of file (one wake-up, and the loop
        # registers and unregisters nothing per child).
        on_exit = functools.partial(_reap, loop, popen, callback)
        orphaned = functools.partial(reap_orphan, popen)
        if io_thread is not None and io_thread.watch_pidfd(loop, fd, on_exit, orphaned):
            return
        release_orphaned_pidfds()
        with _loop_pidfds_lock:
            _loop_pidfds.setdefault(loop, set()).add(fd)
        try:
            loop.add_reader(fd, _on_pidfd_ready, loop, fd, popen, callback)
        except (NotImplementedError, RuntimeError):
            if _forget_pidfd(loop, fd):
                os.close(fd)
        else:
            return
    threading.Thread(
        target=_wait_in_thread,
        args=(loop, popen, callback),
        name=f"prismq-wait-{popen.pid}",
        daemon=True,
    ).start()


def _on_pidfd_ready(
    loop: asyncio.AbstractEventLoop,
    fd: int,
    popen: subprocess.Popen[bytes],
    callback: Callable[[int], None],
) -> None:
    loop.remove_reader(fd)
    if _forget_pidfd(loop, fd):
        os.close(fd)
    _reap(loop, popen, callback)


def _reap(
    loop: asyncio.AbstractEventLoop,
    popen: subprocess.Popen[bytes],
    callback: Callable[[int], None],
) -> None:
    """Loop thread: the pidfd said the child exited; reap it and report its status."""
    returncode = popen.poll()
    if returncode is None:
        # Another thread holds Popen's waitpid lock (e.g. a concurrent wait()), or the I/O
        # thread closed before the child exited: let a thread wait for it.
        threading.Thread(target=_wait_in_thread, args=(loop, popen, callback), daemon=True).start()
        return
    callback(returncode)


def reap_orphan(popen: subprocess.Popen[bytes]) -> None:
    """Any thread: the loop that was to hear ``popen``'s exit has closed, so nobody there will
    reap it; reap it now, or from a thread once it exits (it stayed a zombie for good)."""
    if popen.poll() is None:
        threading.Thread(target=popen.wait, name=f"prismq-reap-{popen.pid}", daemon=True).start()


def _wait_in_thread(
    loop: asyncio.AbstractEventLoop,
    popen: subprocess.Popen[bytes],
    callback: Callable[[int], None],
) -> None:
    returncode = popen.wait()
    with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback, returncode)
