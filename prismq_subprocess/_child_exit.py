"""Learning when a ``subprocess.Popen`` child exits, without blocking the event loop.

On Linux 5.3+ a pidfd becomes readable when the child exits: the loop watches it, no thread is
needed. Elsewhere (Windows, macOS, loops that cannot watch descriptors) one short-lived thread per
child blocks in ``Popen.wait()``, as asyncio's own ``ThreadedChildWatcher`` does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import threading
from collections.abc import Callable

__all__ = ["watch_exit"]

_HAS_PIDFD = hasattr(os, "pidfd_open")


def watch_exit(
    loop: asyncio.AbstractEventLoop,
    popen: subprocess.Popen[bytes],
    callback: Callable[[int], None],
    *,
    use_pidfd: bool = True,
) -> None:
    """Call ``callback(returncode)`` on ``loop`` once ``popen`` has exited and been reaped.

    ``use_pidfd=False`` forces the thread path (tests use it to cover the Windows/macOS route).
    """
    if use_pidfd and _HAS_PIDFD:
        try:
            fd = os.pidfd_open(popen.pid)
        except OSError:  # old kernel, seccomp, or the child is already reaped
            fd = -1
        if fd >= 0:
            try:
                loop.add_reader(fd, _on_pidfd_ready, loop, fd, popen, callback)
            except (NotImplementedError, RuntimeError):
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
    os.close(fd)
    returncode = popen.poll()
    if returncode is None:
        # Another thread holds Popen's waitpid lock (e.g. a concurrent wait()); let it finish.
        threading.Thread(
            target=_wait_in_thread, args=(loop, popen, callback), daemon=True
        ).start()
        return
    callback(returncode)


def _wait_in_thread(
    loop: asyncio.AbstractEventLoop,
    popen: subprocess.Popen[bytes],
    callback: Callable[[int], None],
) -> None:
    returncode = popen.wait()
    with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback, returncode)
