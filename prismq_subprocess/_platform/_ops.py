"""The interface every platform implements: what a spawn and a stop need from the system.

:class:`PlatformOps` is the one abstract class; ``_posix.py`` and ``_windows.py`` implement it and
``__init__.py`` picks one. A stop talks to it through three coarse, blocking operations meant for
a worker thread (:meth:`PlatformOps.ask_to_stop`, :meth:`PlatformOps.kill_trees`,
:meth:`PlatformOps.lingering`), each taking many children at once.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psutil

from ._containment import Containment, ContainmentReport
from ._table import ProcessTable, psutil_state

__all__ = [
    "Pace",
    "PlatformOps",
    "StopRecord",
    "StopTarget",
    "alive",
    "no_pace",
    "paced",
]


@dataclass
class StopTarget:
    """One child to stop, as the platform layer sees it."""

    pid: int
    #: The child leads its own process group (POSIX) / console group (Windows).
    own_group: bool
    #: The child had not exited (nor been reaped) when the stop began; the stop sets it False
    #: once the child has exited, from when its pid may name another process.
    running: bool = True
    #: Wall-clock time the child was started, where known (finds an exited child's leftovers on
    #: Windows, where processes are not re-parented).
    started_at: float | None = None
    #: A handle that names this very process even after its pid is reused (a Linux pidfd, from
    #: :meth:`PlatformOps.pin`), or -1. :meth:`PlatformOps.ask_to_stop` closes it.
    pin: int = -1
    #: What the child was started with to find its tree again (:meth:`PlatformOps.prepare_spawn`).
    containment: Containment | None = None

    @property
    def cookie(self) -> str | None:
        """The child's cookie value, if it was given one."""
        return self.containment.cookie if self.containment is not None else None

    @property
    def cgroup(self) -> str | None:
        """The child's cgroup v2 sub-group, if it has one."""
        return self.containment.cgroup if self.containment is not None else None

    @property
    def job(self) -> int | None:
        """The child's Job Object handle, if it has one."""
        return self.containment.job if self.containment is not None else None


@dataclass(eq=False)
class StopRecord:
    """What one stop learned about one child's tree, passed from one phase to the next."""

    target: StopTarget
    #: Every descendant seen so far (psutil checks creation times before signalling one, so a
    #: reused pid is never hit).
    descendants: list[psutil.Process] = field(default_factory=list)
    #: The polite request reached the child itself; when False the caller sends it through the
    #: process object (a child we cannot signal by pid, e.g. a DRY_RUN stand-in).
    asked: bool = False
    #: pid -> start time (as the process table has it) of every descendant seen.
    seen: dict[int, float] = field(default_factory=dict)

    def add(self, procs: Iterable[psutil.Process]) -> None:
        """Remember ``procs`` as descendants (once each)."""
        known = {p.pid for p in self.descendants}
        self.descendants.extend(p for p in procs if p.pid not in known)


# Signals that end children are sent in bursts, with a call to pace() between them (it waits
# until the event loop had a turn): the children then exit in bursts too, and the loop, which
# handles each exit, serves its other tasks in between. Killing 1,000 children in one go queues
# 1,000 exit callbacks at once and stalls the loop for about 0.2 s (raw asyncio on 3.11 too).
_BURST = 32

R = TypeVar("R")

#: Blocks until the event loops waiting on the work caught up (see ``_core/_offloop.py``).
Pace = Callable[[], None]


def no_pace() -> None:
    """The ``pace()`` of a caller without an event loop to wait for."""


def paced(items: Sequence[R], pace: Pace) -> Iterator[R]:
    """Yield ``items``, calling ``pace()`` after every burst of ``_BURST``."""
    for index, item in enumerate(items):
        if index and index % _BURST == 0:
            pace()
        yield item


def alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
    """Those of ``procs`` still running (not ended, not zombies)."""
    alive = []
    for proc in procs:
        try:
            if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                alive.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return alive


@dataclass(eq=False)
class PlatformOps:
    """Platform-specific process-group and signalling operations.

    Use :func:`platform_ops` to get the one for the running (or an injected) platform.

    A stop is three coarse operations, each blocking and meant for a worker thread, each taking
    many children at once so that one look at the process table serves all of them:
    :meth:`ask_to_stop` (hold the trees still, send the polite request, release),
    :meth:`kill_trees` (kill what is left) and :meth:`lingering` (what is still running).
    """

    name: str
    kill: Callable[[int, int], None] = field(default=os.kill)
    #: Whether :meth:`kill_tree` on a group leader also kills the leader itself.
    group_kill_covers_leader: bool = False

    # -- spawning ------------------------------------------------------------------------------
    def group_kwargs(self, kwargs: Mapping[str, Any], new_group: bool) -> dict[str, Any]:
        """Return Popen keyword arguments that start the child in its own group when asked."""
        raise NotImplementedError

    def started_own_group(self, kwargs: Mapping[str, Any]) -> bool:
        """True when a child spawned with ``kwargs`` leads its own process group."""
        raise NotImplementedError

    def leads_own_group(self, pid: int) -> bool:
        """Ask the system whether ``pid`` leads its own process group (False where unknowable)."""
        return False

    def pin(self, pid: int) -> int:
        """A handle naming the running child ``pid`` itself (see :attr:`StopTarget.pin`), or -1.

        The stop's signals are sent from a worker thread, a moment after the event loop saw the
        child running; by then it may have exited and its pid been reused. A pinned child is
        signalled through the handle, which never reaches another process.
        """
        return -1

    def unpin(self, handle: int) -> None:
        """Release a handle from :meth:`pin`."""

    # -- containment ---------------------------------------------------------------------------
    def prepare_spawn(
        self, kwargs: Mapping[str, Any], die_with_host: bool = False, *, ahead: bool = False
    ) -> tuple[dict[str, Any], Containment]:
        """``Popen`` keyword arguments that let the stop find the child's whole tree later (a
        cookie in its environment, ...), and the record to pass to :meth:`adopt` once it runs.

        ``die_with_host``: also make the child die when this process dies, where the platform
        can (it may cost spawn speed: see docs/LIFECYCLE.md).
        ``ahead``: the caller is the event loop's thread and will adopt the child with
        :meth:`adopt_soon`: what blocks in the kernel is left to that (on another thread).
        """
        return dict(kwargs), Containment()

    def adopt(self, pid: int, containment: Containment) -> None:
        """The child ``pid`` was started with ``containment``: finish containing it (move it
        into its cgroup, assign it to its job)."""

    def adopt_soon(self, pid: int, containment: Containment) -> None:
        """:meth:`adopt`, for a caller on an event loop's thread: what blocks (moving the child
        into its cgroup) is left to a worker thread, and this returns at once."""
        self.adopt(pid, containment)

    def release(self, containment: Containment) -> None:
        """The child's run is over: release what :meth:`prepare_spawn` set up for it."""

    def release_soon(self, containment: Containment) -> None:
        """:meth:`release`, possibly on another thread, after the :meth:`adopt_soon` moves
        already asked for: for the event loop's thread, which must not block on the kernel."""
        self.release(containment)

    def kill_contained(self, containment: Containment) -> None:
        """Kill at once whatever ``containment`` finds, then :meth:`release` it: for a spawn
        undone before its pid was known (asyncio kills the child of a cancelled creation, not
        what that child already started). Blocks for one look at the process table, and only
        where the containment can find something without the pid."""
        self.release(containment)

    def child_exited(self, pid: int) -> None:
        """A child we spawned has exited: what it left running may just have been handed to
        this process (a child subreaper), and what had already exited must be reaped."""

    def containment_report(self) -> ContainmentReport:
        """Which means of finding a child's whole tree this platform uses."""
        return ContainmentReport(platform=self.name, mechanisms=("process-group",))

    def cookie_variable(self) -> str | None:
        """The containment cookie variable every child of this process carries, or None
        (no cookies here). Switches nothing on (unlike :meth:`containment_report`)."""
        return None

    # -- looking -------------------------------------------------------------------------------
    def scan(self) -> ProcessTable:
        """One look at the whole process table."""
        raise NotImplementedError

    def state_of(self, pid: int) -> str:
        """The state letter of ``pid`` (see :data:`STOPPED_STATES`); ``"X"`` once gone."""
        return psutil_state(pid)

    def snapshot_descendants(self, pid: int) -> list[psutil.Process]:
        """Every descendant of ``pid`` now."""
        table = self.scan()
        return table.handles(table.descendants(pid))

    def wait_child_dead(self, pid: int, deadline: float) -> None:
        """Block until our child ``pid`` has exited, without reaping it (its owner reads the
        status), or until ``deadline`` (``time.monotonic()``). Returns at once where this
        cannot be seen (Windows: no zombies; a process handle's owner waits on it)."""

    def peek_exit_status(self, pid: int) -> int | bool | None:
        """The exit status of our child ``pid`` if it has exited, read without reaping it (its
        owner still reads it); False while it runs, None once someone has reaped it (or it is
        not our child), True where this cannot be seen (Windows: a process handle is not
        consumed by reading it)."""
        return True

    # -- signalling ----------------------------------------------------------------------------
    def signal_unreaped_child(self, pid: int, sig: int | None) -> bool:
        """Send ``sig`` (``None``: the platform's kill) to our child ``pid`` without reaping it,
        and only while nobody has reaped it; True once handled (sent, or not sent because the
        pid is no longer an unreaped child of ours). False where the platform has no such
        route (Windows: no zombies, and the caller uses ``Popen``'s own signalling)."""
        return False

    def stop_signal(self, own_group: bool) -> int:
        """The polite stop request: SIGTERM on POSIX, CTRL_BREAK on Windows for a group leader."""
        raise NotImplementedError

    def signal_group(self, pid: int, sig: int) -> bool:
        """Send ``sig`` to the group led by ``pid``; False when that is impossible or no member
        is left (the caller then signals the child itself)."""
        raise NotImplementedError

    def signal_descendants(self, descendants: Iterable[psutil.Process], sig: int) -> None:
        """Send ``sig`` to every still-running process in ``descendants``.

        psutil checks each process's creation time first, so a reused pid is never signalled.
        """
        for proc in descendants:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                proc.send_signal(sig)

    def kill_tree(self, pid: int, own_group: bool, descendants: Iterable[psutil.Process]) -> None:
        """Kill the child's group and every still-running process in ``descendants``.

        The child itself is killed by the caller through its process object.
        """
        raise NotImplementedError

    def group_alive(self, pid: int, own_group: bool) -> bool:
        """True while any member of the child's group is alive (POSIX); False where unknowable."""
        return False

    def groups_alive(self, pids: Sequence[int], pace: Callable[[], None]) -> list[bool]:
        """:meth:`group_alive` for many children leading their own groups, with one look at
        the process table for all where the platform can (a worker-thread operation)."""
        return [self.group_alive(pid, True) for pid in pids]

    def orphans_of(self, pid: int, started_after: float | None) -> list[psutil.Process]:
        """Processes an exited child ``pid`` left running, where the platform cannot find them
        through a process group (Windows); ``[]`` where the group is the tool (POSIX)."""
        return []

    # -- the coarse operations of a stop (blocking: call them from a worker thread) ------------
    def ask_to_stop(self, targets: Sequence[StopTarget], pace: Pace = no_pace) -> list[StopRecord]:
        """Send every target's tree the polite stop request; return what was learned.

        Running targets: hold the trees still where the platform can (so nothing forks past the
        look), find every descendant, signal the child (its group) and the descendants, release.
        Exited targets: find and signal what they left behind. ``pace()`` is called between
        bursts of signals that may end children. The targets' pins are released.
        """
        try:
            return self._ask(targets, pace)
        finally:
            for target in targets:
                self.unpin(target.pin)
                target.pin = -1

    def _ask(self, targets: Sequence[StopTarget], pace: Pace) -> list[StopRecord]:
        raise NotImplementedError

    def kill_trees(self, records: Sequence[StopRecord], pace: Pace = no_pace) -> None:
        """Look once more, then kill each record's group and every descendant seen (the children
        themselves are killed by the caller unless :attr:`group_kill_covers_leader`)."""
        table = self.scan()
        for record in paced(records, pace):
            record.add(table.handles(table.descendants(record.target.pid)))
            self.kill_tree(record.target.pid, record.target.own_group, alive(record.descendants))

    def kill_now(self, pid: int, own_group: bool, containment: Containment | None = None) -> None:
        """Kill the tree of ``pid`` at once (for synchronous clean-up paths)."""
        self.kill_trees([StopRecord(StopTarget(pid, own_group, containment=containment))])

    def lingering(self, records: Sequence[StopRecord], pace: Pace = no_pace) -> list[bool]:
        """For each record: is a group member or a seen descendant still running?"""
        return [bool(alive(record.descendants)) for record in records]
