"""Waiting for a child's exit itself, not for its pipes.

asyncio's ``Process.wait()`` (3.11) returns only once every pipe is closed too: a grandchild
holding stdout, or a paused unread stdout, keeps it waiting long after the child exited. Its
``returncode`` is set at the exit. This is the one place that works around it; ``run()`` (ASYNC)
and the tree stop both wait here.
"""

from __future__ import annotations

import asyncio
import asyncio.subprocess
import os
import subprocess
import weakref
from collections.abc import Sequence

from .._platform import IS_WINDOWS, pidfd_open, platform_ops
from ._process import ProcessLike

__all__ = [
    "has_exited",
    "popen_of",
    "reap_closed_loop_child",
    "reaped",
    "reaped_status",
    "wait_all_exited",
    "wait_exited",
]

_FIRST_POLL = 0.002
_MAX_POLL = 0.05
# In a batch, processes still running once the polls are this far apart are also wait()ed for.
_WAIT_AFTER = 0.016
# Per-process loop work in a batch is done this many at a time, letting the loop run in between
# (its other tasks wait for at most one chunk: well under a millisecond).
_CHUNK = 64
_AsyncioProcess = asyncio.subprocess.Process
# State letters of a process that has ended (zombie, dead; "X" also when it is gone).
_ENDED = frozenset("ZXx")


def _elsewhere(process: ProcessLike, loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``process`` belongs to another event loop than ``loop``: typically one that
    ended with the child still running (a CLI's ``asyncio.run`` per command, a wrapper kept
    across the per-test loops of a test suite). Its ``wait()`` cannot be awaited here and the
    ``returncode`` its loop would set never comes, so its exit is read from its pid."""
    owner = getattr(process, "_loop", None)
    return owner is not None and owner is not loop


def popen_of(process: ProcessLike) -> subprocess.Popen[bytes] | None:
    """The ``Popen`` behind ``process``: its own (THREADED, LOCAL) or its transport's (asyncio's
    process objects); ``None`` for others (DRY_RUN, a host's stand-in)."""
    popen = getattr(process, "_popen", None)
    if popen is None:
        popen = getattr(getattr(process, "_transport", None), "_proc", None)
    return popen if isinstance(popen, subprocess.Popen) else None


# The exit statuses of children of a closed loop reaped by pid (see reap_closed_loop_child):
# their returncode never comes, and their pid may be given to another process.
_REAPED_BY_PID: weakref.WeakKeyDictionary[object, int] = weakref.WeakKeyDictionary()


def reaped(process: ProcessLike) -> bool:
    """Whether ``process``'s exit status was read already though its ``returncode`` is not set:
    its ``Popen`` was reaped by a thread of its mode whose event loop then could not be told
    (it was closed), or it was reaped by :func:`reap_closed_loop_child`. Its pid may name
    another process by now, so nothing may be signalled or waited for by that number."""
    popen = popen_of(process)
    if popen is not None:
        return popen.returncode is not None
    try:
        return process in _REAPED_BY_PID
    except TypeError:
        return False


def reaped_status(process: object) -> int | None:
    """The exit status :func:`reap_closed_loop_child` read for ``process`` (None: it did not)."""
    if not _REAPED_BY_PID:  # the common case, asked at every returncode of a running child
        return None
    try:
        return _REAPED_BY_PID.get(process)
    except TypeError:
        return None


def reap_closed_loop_child(process: ProcessLike) -> int | None:
    """Reap ``process``, a child of an event loop that has closed and whose transport has no
    ``Popen`` (uvloop's: libuv reaps in its loop, which will never run again), if it has exited;
    return its exit status (``None``: still running, or not such a child).

    Nobody else waits for that pid: unreaped, it stays a zombie, and its ``returncode`` is never
    set. The status is remembered (:func:`reaped`), since the pid is free from now on.
    """
    try:
        known = _REAPED_BY_PID.get(process)
    except TypeError:
        return None
    if known is not None:
        return known
    loop = getattr(process, "_loop", None)
    if (
        process.returncode is not None
        or popen_of(process) is not None
        or getattr(process, "_transport", None) is None
        or not isinstance(loop, asyncio.AbstractEventLoop)
        or not loop.is_closed()
        or IS_WINDOWS  # (no zombies there: a process handle holds the status)
    ):
        return None
    try:
        pid, status = os.waitpid(process.pid, os.WNOHANG)
    except ChildProcessError:
        code = 255  # reaped by someone else: its status is lost (asyncio's rule)
    else:
        if pid == 0:
            return None
        code = os.waitstatus_to_exitcode(status)
    _REAPED_BY_PID[process] = code
    return code


def _pid_ended(process: ProcessLike) -> bool:
    # Reaped first: the pid's state then describes whoever holds the pid now.
    return reaped(process) or platform_ops().state_of(process.pid) in _ENDED


def has_exited(process: ProcessLike, loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``process`` is known to have exited, as seen from ``loop``: its ``returncode``
    is set, or it belongs to another loop and its pid shows it ended."""
    if process.returncode is not None:
        return True
    return _elsewhere(process, loop) and _pid_ended(process)


async def wait_exited(process: ProcessLike, deadline: float | None = None) -> bool:
    """Return True once ``process`` has exited, False at ``deadline`` (loop time; None: never).

    "Exited" means its ``returncode`` is set (the child watcher sets it at exit) or ``wait()``
    returned. A pidfd, where the platform has one (Linux 5.3+, watched by the loop: no thread),
    says when to look; without one ``returncode`` is polled. ``wait()`` is awaited too: some
    processes only run to their end once waited for (a LOCAL child whose stdin is still open).
    Cancellation: only the waiting stops.
    """
    if process.returncode is not None:
        return True
    loop = asyncio.get_running_loop()
    if _elsewhere(process, loop):
        return await _wait_pid_ended(process, loop, deadline)
    waiter = asyncio.ensure_future(process.wait())
    exited: asyncio.Future[None] = loop.create_future()
    fd = pidfd_open(process.pid)
    if fd >= 0:
        try:
            loop.add_reader(fd, _set_done, exited)
        except (NotImplementedError, RuntimeError):  # a loop that cannot watch descriptors
            os.close(fd)
            fd = -1
    try:
        delay = _FIRST_POLL
        while process.returncode is None and not waiter.done():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            watching = fd >= 0
            step = None if watching else delay
            if remaining is not None:
                step = remaining if step is None else min(step, remaining)
            await asyncio.wait(
                (waiter, exited) if watching else (waiter,),
                timeout=step,
                return_when=asyncio.FIRST_COMPLETED,
            )
            if watching and exited.done():
                # The child is gone; the watcher sets returncode in a moment: poll for it.
                fd = _unwatch(loop, fd)
                delay = _FIRST_POLL
            elif not watching:
                delay = min(delay * 2, _MAX_POLL)
        return True
    finally:
        if loop.is_closed():
            # Closed with this wait pending (its coroutine is being closed now): only the
            # descriptor is still ours to free; nothing can be awaited or scheduled.
            if fd >= 0:
                os.close(fd)
        else:
            _unwatch(loop, fd)
            if not waiter.done():
                waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)


async def _wait_pid_ended(
    process: ProcessLike, loop: asyncio.AbstractEventLoop, deadline: float | None
) -> bool:
    """:func:`wait_exited` for a process of another loop: by its pidfd where there is one
    (readable once the child has exited, reaped or not), else by polling its state."""
    exited: asyncio.Future[None] = loop.create_future()
    fd = pidfd_open(process.pid)
    if fd >= 0:
        try:
            loop.add_reader(fd, _set_done, exited)
        except (NotImplementedError, RuntimeError):
            os.close(fd)
            fd = -1
    try:
        delay = _FIRST_POLL
        while not has_exited(process, loop) and not exited.done():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            step = None if fd >= 0 else delay
            if remaining is not None:
                step = remaining if step is None else min(step, remaining)
            await asyncio.wait((exited,), timeout=step)
            delay = min(delay * 2, _MAX_POLL)
        return True
    finally:
        _unwatch(loop, fd)


def _unwatch(loop: asyncio.AbstractEventLoop, fd: int) -> int:
    if fd >= 0:
        loop.remove_reader(fd)
        os.close(fd)
    return -1


async def wait_all_exited(processes: Sequence[ProcessLike], deadline: float | None) -> None:
    """Return once every process has exited, or at ``deadline`` (loop time; None: never).

    One child: :func:`wait_exited`. Many: one loop of ``returncode`` polls serves them all, and
    only those still running after a few polls are also ``wait()``-ed for (a thousand wait tasks
    or descriptors would cost the loop more than the polls).
    """
    loop = asyncio.get_running_loop()
    pending = [p for p in processes if not has_exited(p, loop)]
    if len(pending) <= 1:
        if pending:
            await wait_exited(pending[0], deadline)
        return
    waiters: dict[ProcessLike, asyncio.Future[int]] = {}
    delay = _FIRST_POLL
    try:
        while pending:
            if delay >= _WAIT_AFTER:
                created = 0
                for process in pending:
                    # asyncio's own process objects have their returncode set at the exit by
                    # the loop's child watcher: polling is enough, and a thousand wait() tasks
                    # started (then cancelled) in one loop iteration would stall it.
                    if (
                        process not in waiters
                        and not isinstance(process, _AsyncioProcess)
                        and not _elsewhere(process, loop)
                    ):
                        waiters[process] = asyncio.ensure_future(process.wait())
                        created += 1
                        if created % _CHUNK == 0:
                            await asyncio.sleep(0)
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return
            await asyncio.sleep(delay if remaining is None else min(delay, remaining))
            delay = min(delay * 2, _MAX_POLL)
            pending = [
                p
                for p in pending
                if not (has_exited(p, loop) or (p in waiters and waiters[p].done()))
            ]
    finally:
        for index, waiter in enumerate(waiters.values(), 1):
            waiter.cancel()
            if index % _CHUNK == 0:  # each cancelled task runs a step: spread them
                await asyncio.sleep(0)
        await asyncio.gather(*waiters.values(), return_exceptions=True)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
