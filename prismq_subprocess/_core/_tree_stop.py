"""Stopping a child and everything it started, within a bounded time.

The model is systemd's ``KillMode=control-group``: ask the whole group to stop (SIGTERM, or
CTRL_BREAK on Windows), wait up to a grace period, then kill whatever is left (SIGKILL / the psutil
tree). Descendants that left the group are found with psutil while the tree is still intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import time
import weakref
from collections.abc import Awaitable
from typing import TypeVar

import psutil

from .._platform import PlatformOps, platform_ops
from ._exceptions import ProcessTimeoutError
from ._process import ProcessLike
from ._validation import check_process, check_timeout

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "execute_with_timeout",
    "stop_process_tree",
    "terminate_gracefully",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between the polite request and the kill.
DEFAULT_GRACE_PERIOD = 5.0
_POLL = 0.02

# Which of our children lead their own group. Windows cannot tell afterwards; on POSIX we could
# ask getpgid, but a child that already exited can no longer be asked.
_OWN_GROUP: weakref.WeakKeyDictionary[object, bool] = weakref.WeakKeyDictionary()
_STARTED: weakref.WeakKeyDictionary[object, float] = weakref.WeakKeyDictionary()


def register_group(process: object, own_group: bool) -> None:
    """Remember whether ``process`` leads its own process group, and when it was started."""
    with contextlib.suppress(TypeError):
        _OWN_GROUP[process] = own_group
        _STARTED[process] = time.time()


def _registered_at(process: object) -> float | None:
    try:
        return _STARTED.get(process)
    except TypeError:
        return None


def _own_group(process: ProcessLike, ops: PlatformOps) -> bool:
    known = _OWN_GROUP.get(process)
    if known is not None:
        return known
    getpgid = getattr(os, "getpgid", None)
    if getpgid is None:
        return False
    try:
        return bool(getpgid(process.pid) == process.pid)
    except OSError:
        return False


def _alive(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return alive


async def _wait_until(deadline: float | None, process: ProcessLike) -> bool:
    """Wait for ``process`` to exit until ``deadline`` (loop.time(); None: no limit); True if it
    did.

    Watches ``returncode`` as well as ``wait()``: asyncio's ``wait()`` (3.11) returns only once
    every pipe is closed, which a paused, unread stdout never is; ``returncode`` is set at exit.
    """
    if process.returncode is not None:
        return True
    loop = asyncio.get_running_loop()
    waiter = asyncio.ensure_future(process.wait())
    delay = 0.002
    try:
        while process.returncode is None and not waiter.done():
            remaining = None if deadline is None else deadline - loop.time()
            if remaining is not None and remaining <= 0:
                return False
            step = delay if remaining is None else min(delay, remaining)
            await asyncio.wait((waiter,), timeout=step)
            delay = min(delay * 2, 0.05)
        return True
    finally:
        if not waiter.done():
            waiter.cancel()
        await asyncio.gather(waiter, return_exceptions=True)


async def stop_process_tree(
    process: ProcessLike,
    *,
    grace: float = DEFAULT_GRACE_PERIOD,
    ops: PlatformOps | None = None,
) -> int:
    """Stop ``process`` and every process it started; return its exit status.

    1. Snapshot the descendants (psutil) while the tree is intact.
    2. Ask politely: SIGTERM to the child's process group (POSIX) or CTRL_BREAK (Windows), and
       SIGTERM to descendants that left the group.
    3. Wait up to ``grace`` seconds for the child and the descendants.
    4. Kill what is left: SIGKILL to the group and the descendants (POSIX), kill the tree (Windows).

    Safe to call on a process that already exited: group members it left behind are still
    stopped. Cancelling this coroutine abandons the wait but never leaves the child unsignalled
    for longer than the cancellation takes.
    """
    grace = check_timeout(grace, "grace") or 0.0
    ops = ops or platform_ops()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    own_group = _own_group(process, ops)
    pid = process.pid
    descendants: list[psutil.Process] = []
    if process.returncode is None:
        # Freeze, signal, thaw: no await in between, so a cancellation cannot leave the tree
        # stopped, and the tree cannot fork new members past the snapshot.
        descendants = ops.freeze(pid, own_group)
        sig = ops.stop_signal(own_group)
        if not (own_group and ops.signal_group(pid, sig)):
            _signal(process, sig)
        ops.signal_descendants(descendants, signal.SIGTERM)
        # One more look while the child is still held (it cannot die, so nothing it started
        # has been re-parented out of reach yet).
        known = {p.pid for p in descendants}
        late = [p for p in ops.snapshot_descendants(pid) if p.pid not in known]
        ops.signal_descendants(late, signal.SIGTERM)
        descendants += late
        ops.thaw(pid, own_group, descendants)
        if not await _wait_until(deadline, process):
            descendants += ops.snapshot_descendants(pid)
            logger.info("pid %d outlived its %.3g s grace period; killing its tree", pid, grace)
            ops.kill_tree(pid, own_group, descendants)
            if not (own_group and ops.group_kill_covers_leader):
                _kill(process)
        await _wait_until(None, process)
        returncode = process.returncode
        assert returncode is not None
    else:
        returncode = process.returncode
        # Where there are no process groups to ask (Windows), find what the child left running
        # by its parent pid; psutil checks creation times, so a reused pid is not taken.
        descendants = ops.orphans_of(pid, _registered_at(process))
        ops.signal_descendants(descendants, signal.SIGTERM)
        if ops.group_alive(pid, own_group):
            ops.signal_group(pid, ops.stop_signal(own_group))
    # The leader is gone; members of its group (or escaped descendants) may linger.
    # Nothing notifies us when a grandchild exits, so poll (cheap: one signal-0 per tick).
    while _lingering(ops, pid, own_group, descendants) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(_POLL)
    if _lingering(ops, pid, own_group, descendants):
        ops.kill_tree(pid, own_group, _alive(descendants))
    return returncode


def _lingering(ops: PlatformOps, pid: int, own_group: bool, procs: list[psutil.Process]) -> bool:
    return ops.group_alive(pid, own_group) or bool(_alive(procs))


def _signal(process: ProcessLike, sig: int) -> None:
    # OSError too: on Windows CTRL_BREAK fails with other errors (e.g. a host without a console);
    # the kill after the grace period still comes.
    with contextlib.suppress(OSError):
        process.send_signal(sig)


def _kill(process: ProcessLike) -> None:
    # Only when the group kill did not reach the child: on an asyncio process, kill() polls the
    # Popen first (bpo-38630), which can reap a child the group kill just ended, before asyncio's
    # own child watcher does, so the watcher reports 255 instead of -SIGKILL.
    with contextlib.suppress(OSError):
        process.kill()


def kill_tree_now(process: ProcessLike, ops: PlatformOps | None = None) -> None:
    """Kill ``process`` and its tree at once, without waiting (for synchronous clean-up)."""
    ops = ops or platform_ops()
    if process.returncode is None:
        own_group = _own_group(process, ops)
        ops.kill_tree(process.pid, own_group, ops.snapshot_descendants(process.pid))
        if not (own_group and ops.group_kill_covers_leader):
            _kill(process)


async def terminate_gracefully(
    process: ProcessLike, timeout: float = DEFAULT_GRACE_PERIOD, *, ops: PlatformOps | None = None
) -> int:
    """Stop ``process`` and its whole tree: SIGTERM (CTRL_BREAK on Windows), then SIGKILL after
    ``timeout`` seconds. Returns the child's exit status (negative: the signal that ended it).

    Works on the processes of every mode and on plain ``asyncio.subprocess.Process`` objects.

    Raises:
        InvalidTimeoutError: ``timeout`` is negative.
        InvalidArgumentTypeError: ``process`` is not a process object.
    """
    check_process(process)
    check_timeout(timeout, "timeout")
    return await stop_process_tree(process, grace=timeout, ops=ops)


async def execute_with_timeout(
    coro: Awaitable[T], timeout: float | None, task_name: str = "task"
) -> T:
    """Await ``coro`` for at most ``timeout`` seconds (``None``: no limit).

    On timeout ``coro`` is cancelled (a ``run()`` inside it then stops its process tree) and a
    :class:`ProcessTimeoutError` (also a ``TimeoutError``) naming ``task_name`` is raised.
    Cancelling the caller cancels ``coro``.

    Raises:
        InvalidTimeoutError: ``timeout`` is negative.
        ProcessTimeoutError: ``coro`` did not finish in time.
    """
    try:
        limit = check_timeout(timeout)
    except BaseException:
        if inspect.iscoroutine(coro):
            coro.close()  # rejected before it ran: no "coroutine was never awaited" warning
        raise
    scope = asyncio.timeout(limit)
    try:
        async with scope:
            return await coro
    except TimeoutError as exc:
        if limit is None or not scope.expired():
            raise  # a TimeoutError raised by the coroutine itself, not by our limit
        raise ProcessTimeoutError(cmd=task_name, timeout=limit) from exc
