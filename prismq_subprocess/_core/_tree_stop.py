"""Stopping a child and everything it started, within a bounded time.

The model is systemd's ``KillMode=control-group``: ask the whole group to stop (SIGTERM, or
CTRL_BREAK on Windows), wait up to a grace period, then kill whatever is left (SIGKILL / the psutil
tree). Descendants that left the group are found while the tree is still intact.

The event loop only waits here. The platform's part of a stop is three coarse operations
(:meth:`~prismq_subprocess._platform.PlatformOps.ask_to_stop`, ``kill_trees``, ``lingering``),
each run in a worker thread and each shared by every stop in progress at that moment, so that
stopping a thousand children costs a few looks at the process table, not thousands.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from .._platform import (
    Containment,
    ContainmentReport,
    PlatformOps,
    StopRecord,
    StopTarget,
    platform_ops,
)
from .._platform._ops import alive
from ._cancel_shield import shielded_if_cancelled
from ._exceptions import InvalidArgumentTypeError, InvalidTaskError, TaskTimeoutError
from ._exit_wait import has_exited, popen_of, reap_closed_loop_child, reaped, wait_all_exited
from ._offloop import Coalescer, run_in_thread
from ._process import ProcessLike
from ._validation import check_process, check_timeout

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "containment_report",
    "execute_with_timeout",
    "kill_tree_now",
    "kill_trees_now",
    "stop_process_tree",
    "stop_process_trees",
    "terminate_gracefully",
    "terminate_many",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Seconds between the polite request and the kill.
DEFAULT_GRACE_PERIOD = 5.0
_POLL = 0.02
# How long a stop waits for the exit status of a child it saw end (see _exit_status).
_STATUS_WAIT = 5.0
# asyncio's exit status for a child whose status another waiter took.
_STATUS_UNKNOWN = 255
# How long a stop waits, after its last SIGKILL, for what it killed to be gone: a killed
# process ends once the kernel runs it again, on a loaded machine milliseconds later.
_KILLED_SETTLE = 1.0


@dataclass(frozen=True)
class _Child:
    """What we know about a child we spawned, that the system cannot tell us afterwards."""

    #: It leads its own process group (Windows cannot say; a POSIX child that already exited
    #: can no longer be asked).
    own_group: bool
    #: Wall-clock time of the spawn.
    started_at: float
    #: Its cookie, cgroup, job: how its tree is found whatever became of the parent chain.
    containment: Containment | None


_CHILDREN: weakref.WeakKeyDictionary[object, _Child] = weakref.WeakKeyDictionary()


def register_child(
    process: object,
    own_group: bool,
    containment: Containment | None = None,
    ops: PlatformOps | None = None,
) -> None:
    """Remember how ``process`` was started (its group, when, its containment). Once the
    process object is gone, ``ops`` releases the containment (a Job Object handle, an empty
    cgroup; off the calling thread where that blocks), since nothing can stop that child
    through us any more."""
    with contextlib.suppress(TypeError):
        _CHILDREN[process] = _Child(own_group, time.time(), containment)
        if containment is not None and ops is not None and containment != Containment():
            weakref.finalize(process, ops.release_soon, containment)


def leads_own_group(process: object) -> bool:
    """Whether we started ``process`` as the leader of its own process group (False for a
    process we did not start, or a platform without groups)."""
    child = _known(process)
    return child is not None and child.own_group


def _known(process: object) -> _Child | None:
    try:
        return _CHILDREN.get(process)
    except TypeError:
        return None


def _running(process: ProcessLike) -> bool:
    """Whether ``process`` may still hold its pid: no ``returncode``, and (a child of a closed
    event loop) not reaped by its ``Popen`` either, when a stranger may hold the pid."""
    return process.returncode is None and not reaped(process)


def _target(process: ProcessLike, ops: PlatformOps, *, pin: bool = False) -> StopTarget:
    running = _running(process)
    child = _known(process)
    own_group = child.own_group if child is not None else ops.leads_own_group(process.pid)
    return StopTarget(
        pid=process.pid,
        own_group=own_group,
        running=running,
        started_at=child.started_at if child is not None else None,
        # Only a child signalled by pid needs pinning: a group is reached by its id, which no
        # new process can take while any member lives.
        pin=ops.pin(process.pid) if pin and running and not own_group else -1,
        containment=child.containment if child is not None else None,
    )


@dataclass(eq=False)
class _Workers:
    """The worker-thread operations of one :class:`PlatformOps`, shared by concurrent stops."""

    ask: Coalescer[StopTarget, StopRecord]
    kill: Coalescer[StopRecord, None]
    lingering: Coalescer[StopRecord, bool]
    killed_alive: Coalescer[StopRecord, bool]
    groups_alive: Coalescer[int, bool]


_WORKERS: weakref.WeakKeyDictionary[PlatformOps, _Workers] = weakref.WeakKeyDictionary()


def _workers(ops: PlatformOps) -> _Workers:
    workers = _WORKERS.get(ops)
    if workers is None:

        def kill(records: list[StopRecord], pace: Callable[[], None]) -> list[None]:
            ops.kill_trees(records, pace)
            return [None] * len(records)

        workers = _WORKERS[ops] = _Workers(
            ask=Coalescer(ops.ask_to_stop, "prismq-stop"),
            kill=Coalescer(kill, "prismq-kill"),
            lingering=Coalescer(ops.lingering, "prismq-look"),
            killed_alive=Coalescer(_killed_alive, "prismq-look"),
            groups_alive=Coalescer(ops.groups_alive, "prismq-look"),
        )
    return workers


async def group_members_alive(pid: int, ops: PlatformOps) -> bool:
    """Whether a member of the process group that ``pid`` leads still runs: a look at the
    process table in a worker thread, shared with the other children asking at the same time
    (many children ending together would otherwise each read the whole table)."""
    return (await _workers(ops).groups_alive.submit([pid]))[0]


def may_have_left_running(process: ProcessLike, ops: PlatformOps) -> bool:
    """For a child that has exited: whether members of the process group it led may still run
    (signal 0 to the group; no look at the process table), as ``run()`` asks after its child.

    A false positive (a group left with zombies only, or whose number a stranger's group took
    since) costs a stop that finds nothing: the stop tells a stranger's group apart. A helper
    that left the child's group (a daemon in a session of its own) is not looked for: it left
    on purpose, and outlives ``run()`` and the wrapper alike (see docs/LIFECYCLE.md)."""
    return leads_own_group(process) and ops.signal_group(process.pid, 0)


def _killed_alive(records: list[StopRecord], pace: Callable[[], None]) -> list[bool]:
    return [bool(alive(record.descendants)) for record in records]


async def _until_killed_gone(
    workers: _Workers, records: list[StopRecord], loop: asyncio.AbstractEventLoop
) -> None:
    """Wait (bounded) until the descendants just SIGKILLed have ended, so that nothing of a
    tree is seen running once its stop returned."""
    deadline = loop.time() + _KILLED_SETTLE
    while True:
        flags = await workers.killed_alive.submit(records)
        records = [record for record, flag in zip(records, flags, strict=True) if flag]
        if not records:
            return
        if loop.time() >= deadline:
            # (The pids from the worker's answer's records: one more look, rare, on the loop.)
            pids = [p.pid for r in records for p in alive(r.descendants)]
            logger.warning(
                "%d process(es) of a stopped tree still ran %.3g s after SIGKILL: %s",
                len(pids),
                _KILLED_SETTLE,
                pids,
            )
            return
        await asyncio.sleep(_POLL)


async def stop_process_trees(
    processes: Sequence[ProcessLike],
    *,
    grace: float = DEFAULT_GRACE_PERIOD,
    ops: PlatformOps | None = None,
) -> list[int]:
    """Stop every process in ``processes`` and everything each one started, all together;
    return their exit statuses, in order.

    1. Hold each tree still and find its descendants while it is intact (POSIX: SIGSTOP to the
       group and every descendant found, looking again until nothing new appears).
    2. Ask politely: SIGTERM to the child's process group (POSIX) or CTRL_BREAK (Windows), and
       SIGTERM to descendants that left the group; then release the trees.
    3. Wait up to ``grace`` seconds for the children.
    4. Kill what is left: SIGKILL to the group and the descendants (POSIX), kill the tree
       (Windows).
    5. Group members and descendants still running once the child is gone are polled until the
       grace period ends, then killed.

    Steps 1, 2 and 4 run in a worker thread, shared by every stop in progress, so the event loop
    is never blocked and N children cost a few looks at the process table, not N.

    Safe to call on processes that already exited: what they left behind is still stopped.
    Cancellation: the wait is abandoned, but a request handed to the worker thread (step 1-2 or
    4) is carried out in full, so the trees are never left stopped nor the children unsignalled.

    Raises:
        InvalidTimeoutError: ``grace`` is negative.
    """
    grace = check_timeout(grace, "grace", finite=True) or 0.0
    ops = ops or platform_ops()
    if not processes:
        return []
    workers = _workers(ops)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    records = await workers.ask.submit([_target(p, ops, pin=True) for p in processes])
    for process, record in zip(processes, records, strict=True):
        if record.target.running and not record.asked:
            _signal(process, ops.stop_signal(record.target.own_group), ops)
    running = [(p, r) for p, r in zip(processes, records, strict=True) if r.target.running]
    await wait_all_exited([p for p, _ in running], deadline)
    overdue = [(p, r) for p, r in running if not has_exited(p, loop)]
    if overdue:
        for process, _ in overdue:
            logger.info(
                "pid %d outlived its %.3g s grace period; killing its tree", process.pid, grace
            )
        await workers.kill.submit([r for _, r in overdue])
        for process, record in overdue:
            if not (record.target.own_group and ops.group_kill_covers_leader):
                _signal(process, None, ops)  # (a group kill did not reach it)
        await wait_all_exited([p for p, _ in overdue], None)
    # The children are gone; members of their groups (or escaped descendants) may linger.
    # Nothing notifies us when a grandchild exits, so poll.
    for record in records:
        # Exited and reaped: from now on a child's pid (and the number of its group, once that
        # is empty) may be given to another process, which the stop must not take for it.
        record.target.running = False
    lingering = list(records)
    while lingering:
        flags = await workers.lingering.submit(lingering)
        lingering = [r for r, flag in zip(lingering, flags, strict=True) if flag]
        if not lingering or loop.time() >= deadline:
            break
        await asyncio.sleep(_POLL)
    if lingering:
        await workers.kill.submit(lingering)
        await _until_killed_gone(workers, lingering, loop)
    return [await _exit_status(process, loop, ops) for process in processes]


async def _exit_status(
    process: ProcessLike, loop: asyncio.AbstractEventLoop, ops: PlatformOps
) -> int:
    """The exit status of a child the stop saw end. One of another event loop (see
    ``_exit_wait._elsewhere``) has no ``returncode`` from its loop: its ``Popen`` is asked,
    which reaps it where nobody did (0 where another waiter took the status: ``Popen``'s rule);
    without a ``Popen`` (uvloop's children) and once its loop has closed, it is reaped by pid;
    while that loop still runs (in another thread), its status is read without reaping it (255,
    asyncio's "taken by another waiter", if that loop reaped it and has not run since to tell).
    But an asyncio child whose loop still runs (in another thread) is that loop's watcher's to
    reap, by pid: the status is read without reaping it (POSIX); once that watcher has reaped
    it (one reaping in a thread of its own), the status is waited for on its loop, and if it
    does not come by then, ``Popen``'s rule answers (0).

    A thread of the child's mode may be blocked in ``Popen.wait()`` for it: that holds the
    ``Popen``'s wait lock, and until the thread runs again after the exit (late, on a busy
    machine) ``poll()`` answers None. So the status is waited for, up to ``_STATUS_WAIT``.
    """
    deadline = loop.time() + _STATUS_WAIT
    popen = popen_of(process)
    while True:
        code = process.returncode
        if code is not None:
            return code
        if popen is not None and _owner_watches(process):
            peeked = ops.peek_exit_status(process.pid)
            if peeked is True or (peeked is None and loop.time() >= deadline):
                # (True: where a status is not consumed by reading it; None at the deadline:
                # the owner's watcher reaped it and its loop has not told: Popen's rule.)
                with contextlib.suppress(OSError):
                    code = popen.poll()
            elif peeked is not False and peeked is not None:
                code = peeked
        elif popen is not None:
            with contextlib.suppress(OSError):
                code = popen.poll()
        elif _loop_runs_elsewhere(process):
            # uvloop's child (no Popen) of a loop running in another thread: libuv reaps it
            # there, when that loop next runs; the status is read without reaping it, so the
            # owner's own wait() still gets it.
            peeked = ops.peek_exit_status(process.pid)
            if not isinstance(peeked, bool) and peeked is not None:
                code = peeked
            elif loop.time() >= deadline:
                # Reaped there, and that loop has not run since to say what it read.
                code = _STATUS_UNKNOWN
        else:
            code = reap_closed_loop_child(process)
        if code is not None:
            return code
        if loop.time() >= deadline:
            raise AssertionError(f"the stop of pid {process.pid} ended without its exit status")
        await asyncio.sleep(_POLL)


async def stop_process_tree(
    process: ProcessLike,
    *,
    grace: float = DEFAULT_GRACE_PERIOD,
    ops: PlatformOps | None = None,
) -> int:
    """Stop ``process`` and every process it started; return its exit status.

    :func:`stop_process_trees` for one child (see there for the steps). Safe to call on a
    process that already exited: group members it left behind are still stopped. Cancelling
    this coroutine abandons the wait but never leaves the child unsignalled for longer than the
    cancellation takes.

    Raises:
        InvalidTimeoutError: ``grace`` is negative.
    """
    return (await stop_process_trees([process], grace=grace, ops=ops))[0]


def _signal(process: ProcessLike, sig: int | None, ops: PlatformOps) -> None:
    """Send ``sig`` (None: the platform's kill) to the child itself, never reaping it.

    asyncio's ``Process`` signals through its ``Popen``, which polls first (bpo-38630): a child
    that has just died is reaped there, before asyncio's child watcher (which reads the status
    by pid) hears of it, and the watcher then reports 255. So a child whose status a watcher
    reads is signalled by pid while it is an unreaped child of ours (POSIX; a zombie's pid
    cannot be anyone else's); the others through their own route.
    """
    # OSError too: on Windows CTRL_BREAK fails with other errors (e.g. a host without a console);
    # the kill after the grace period still comes.
    with contextlib.suppress(OSError):
        if (
            process.returncode is None
            and _status_read_by_watcher(process)
            and ops.signal_unreaped_child(process.pid, sig)
        ):
            return
        if sig is None:
            process.kill()
        else:
            process.send_signal(sig)


def _owner_watches(process: ProcessLike) -> bool:
    # An asyncio child whose own loop runs (in another thread): its child watcher reaps it
    # there, by pid, and a status read here first would be lost to it (255).
    owner = getattr(process, "_loop", None)
    return (
        isinstance(owner, asyncio.AbstractEventLoop)
        and owner.is_running()
        and _status_read_by_watcher(process)
    )


def _loop_runs_elsewhere(process: ProcessLike) -> bool:
    # A child (of a transport without a Popen: uvloop's) whose own loop has not closed, so is
    # still to reap it; the loop is not this one, which would have set its returncode.
    owner = getattr(process, "_loop", None)
    return (
        isinstance(owner, asyncio.AbstractEventLoop)
        and not owner.is_closed()
        and getattr(process, "_transport", None) is not None
        and popen_of(process) is None
    )


def _status_read_by_watcher(process: ProcessLike) -> bool:
    # asyncio's process objects: a transport holding the Popen, and no Popen of their own (ours
    # of THREADED and LOCAL reap through it, so its poll is the reap).
    return getattr(process, "_popen", None) is None and popen_of(process) is not None


def kill_trees_now(processes: Sequence[ProcessLike], ops: PlatformOps | None = None) -> None:
    """Kill every process in ``processes`` and its tree at once, without waiting (for
    synchronous clean-up). Blocks for one look at the process table.

    A process that has already exited still has its tree killed (what it left in its group,
    and what its containment finds, e.g. a daemon holding its pipes), as
    :func:`stop_process_trees` does.
    """
    ops = ops or platform_ops()
    if not processes:
        return
    records = [StopRecord(_target(p, ops)) for p in processes]
    ops.kill_trees(records)
    for process, record in zip(processes, records, strict=True):
        if record.target.running and not (record.target.own_group and ops.group_kill_covers_leader):
            _signal(process, None, ops)


def kill_tree_now(process: ProcessLike, ops: PlatformOps | None = None) -> None:
    """Kill ``process`` and its tree at once, without waiting (for synchronous clean-up)."""
    kill_trees_now([process], ops)


async def terminate_gracefully(
    process: ProcessLike, timeout: float = DEFAULT_GRACE_PERIOD, *, ops: PlatformOps | None = None
) -> int:
    """Stop ``process`` and its whole tree: SIGTERM (CTRL_BREAK on Windows), then SIGKILL after
    ``timeout`` seconds. Returns the child's exit status (negative: the signal that ended it).

    Works on the processes of every mode and on plain ``asyncio.subprocess.Process`` objects.

    Cancellation: the tree is killed at once (no more grace) and the child waited for, then
    ``CancelledError`` propagates: a child that ignores SIGTERM is never left running. Called
    inside an anyio scope that is already cancelled (a ``finally`` block of a cancelled request
    handler or ``move_on_after``), the stop runs in full as asked, shielded from that scope.

    Raises:
        InvalidTimeoutError: ``timeout`` is negative.
        InvalidArgumentTypeError: ``process`` is not an asyncio-style process object (a
            ``subprocess.Popen``, whose ``wait()`` blocks, included).
    """
    check_process(process)
    check_timeout(timeout, "timeout", finite=True)
    return (await _stop_or_kill([process], timeout, ops))[0]


async def terminate_many(
    processes: Sequence[ProcessLike],
    timeout: float = DEFAULT_GRACE_PERIOD,
    *,
    ops: PlatformOps | None = None,
) -> list[int]:
    """Stop every process in ``processes`` and its whole tree, all together: SIGTERM (CTRL_BREAK
    on Windows), then SIGKILL to what is left after ``timeout`` seconds. Returns the exit
    statuses, in order.

    Equivalent to :func:`terminate_gracefully` on each, but the blocking work is shared: a
    thousand children cost a few looks at the process table, and none of it runs on the event
    loop.

    Cancellation: as :func:`terminate_gracefully`: every tree is killed at once and the
    children waited for, then ``CancelledError`` propagates.

    Raises:
        InvalidTimeoutError: ``timeout`` is negative or infinite.
        InvalidArgumentTypeError: ``processes`` is not a sequence of process objects.
    """
    if isinstance(processes, str | bytes) or not isinstance(processes, Iterable):
        raise InvalidArgumentTypeError(
            f"terminate_many() needs a sequence of process objects, got {type(processes).__name__}"
        )
    processes = list(processes)
    for process in processes:
        check_process(process)
    check_timeout(timeout, "timeout", finite=True)
    return await _stop_or_kill(processes, timeout, ops)


async def _stop_or_kill(
    processes: Sequence[ProcessLike], grace: float | None, ops: PlatformOps | None
) -> list[int]:
    """:func:`stop_process_trees`, with the caller's cancellation turned into a kill.

    A cancelled stop used to stop waiting only: the SIGTERM was sent, but the SIGKILL after the
    grace period never came, so a child ignoring SIGTERM kept running. And an anyio scope
    already cancelled (the ``finally`` block of a cancelled request) cancelled the stop at its
    first await, every time.
    """
    with shielded_if_cancelled():
        stopper = asyncio.ensure_future(stop_process_trees(processes, grace=grace or 0.0, ops=ops))
        try:
            return await asyncio.shield(stopper)
        except asyncio.CancelledError:
            # Shielded: a cancelled anyio scope would cancel these waits too. Cancelled again
            # by asyncio meanwhile, the kill still happens (its thread finishes it).
            with shielded_if_cancelled(), contextlib.suppress(BaseException):
                await run_in_thread(
                    functools.partial(kill_trees_now, processes, ops), "prismq-kill"
                )
                await stopper
            if not stopper.done():
                stopper.add_done_callback(_retrieve)
            raise


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A stop left running after a second cancellation: its error is seen, not logged unhandled.
    if not future.cancelled():
        future.exception()


def containment_report() -> ContainmentReport:
    """Which means this host uses to find a child's whole tree when it is stopped, strongest
    first: a cgroup v2 sub-group per run and the child subreaper (Linux, where allowed), a Job
    Object per run (Windows), a cookie in every child's environment, the process group.

    The first call (or the first spawn) chooses them and logs the choice once (logger
    ``prismq_subprocess.containment``, level INFO). See docs/LIFECYCLE.md for the guarantees.
    """
    return platform_ops().containment_report()


async def execute_with_timeout(
    coro: Awaitable[T], timeout: float | None, task_name: str = "task"
) -> T:
    """Await ``coro`` for at most ``timeout`` seconds (``None``: no limit).

    On timeout ``coro`` is cancelled (a ``run()`` inside it then stops its process tree) and a
    :class:`TaskTimeoutError` (a :class:`ProcessTimeoutError` and a ``TimeoutError``) naming
    ``task_name`` is raised.
    Cancelling the caller cancels ``coro``.

    Raises:
        InvalidTimeoutError: ``timeout`` is negative.
        InvalidTaskError: ``coro`` is not awaitable.
        TaskTimeoutError: ``coro`` did not finish in time.
    """
    if not inspect.isawaitable(coro):
        hint = " (a coroutine function: call it)" if inspect.iscoroutinefunction(coro) else ""
        raise InvalidTaskError(
            f"execute_with_timeout needs an awaitable, not {type(coro).__name__}{hint}"
        )
    try:
        limit = check_timeout(timeout)
        if not isinstance(task_name, str):
            # (Used only in the error of a timeout: it failed then, with a bare TypeError.)
            raise InvalidArgumentTypeError(f"task_name must be a str, not {task_name!r}")
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
        raise TaskTimeoutError(task_name=task_name, timeout=limit) from exc
