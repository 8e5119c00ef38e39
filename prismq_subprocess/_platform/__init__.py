"""Everything that differs between Windows and POSIX, in one corner.

The rest of the package asks :func:`platform_ops` for a :class:`PlatformOps` and never branches on
``sys.platform`` itself. Every input (platform name, ``os.kill``, ``os.killpg``) can be injected, so
the Windows branches are unit-tested on Linux; see ``docs/WINDOWS.md`` for what is verified where.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import psutil

from ._table import (
    STOPPED_STATES,
    ProcessTable,
    proc_state,
    psutil_state,
    scan_proc,
    scan_psutil,
)

__all__ = [
    "CREATE_NEW_PROCESS_GROUP",
    "PlatformOps",
    "PosixOps",
    "StopRecord",
    "StopTarget",
    "WindowsOps",
    "is_proactor_loop",
    "is_windows",
    "platform_ops",
    "policy_uses_proactor",
]

#: ``subprocess.CREATE_NEW_PROCESS_GROUP``; spelled out so Linux can build Windows arguments.
CREATE_NEW_PROCESS_GROUP = 0x00000200
#: ``signal.CTRL_BREAK_EVENT`` on Windows.
CTRL_BREAK_EVENT = 1


def is_windows(platform: str | None = None) -> bool:
    """True when ``platform`` (default ``sys.platform``) names Windows."""
    return (platform or sys.platform).startswith(("win32", "cygwin"))


_PROACTOR_NAMES = {"ProactorEventLoop", "BaseProactorEventLoop"}


def _class_names(obj: object) -> set[str]:
    return {klass.__name__ for klass in type(obj).__mro__}


def is_proactor_loop(loop: asyncio.AbstractEventLoop | None) -> bool:
    """True when ``loop`` is a Proactor event loop (the Windows loop that can spawn processes).

    Decided by class name along the MRO, so a test on Linux can pass a stand-in class named
    ``ProactorEventLoop``.
    """
    return loop is not None and bool(_class_names(loop) & _PROACTOR_NAMES)


def policy_uses_proactor(policy: object) -> bool:
    """True when the event-loop policy makes Proactor loops (``WindowsProactorEventLoopPolicy``)."""
    if _class_names(policy) & {"WindowsProactorEventLoopPolicy"}:
        return True
    factory = getattr(policy, "_loop_factory", None)
    return isinstance(factory, type) and bool(
        {k.__name__ for k in factory.__mro__} & _PROACTOR_NAMES
    )


@dataclass
class StopTarget:
    """One child to stop, as the platform layer sees it."""

    pid: int
    #: The child leads its own process group (POSIX) / console group (Windows).
    own_group: bool
    #: The child had not exited when the stop began.
    running: bool = True
    #: Wall-clock time the child was started, where known (finds an exited child's leftovers on
    #: Windows, where processes are not re-parented).
    started_at: float | None = None
    #: A handle that names this very process even after its pid is reused (a Linux pidfd, from
    #: :meth:`PlatformOps.pin`), or -1. :meth:`PlatformOps.ask_to_stop` closes it.
    pin: int = -1


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

    def add(self, procs: Iterable[psutil.Process]) -> None:
        """Remember ``procs`` as descendants (once each)."""
        known = {p.pid for p in self.descendants}
        self.descendants.extend(p for p in procs if p.pid not in known)


# Signals that end children are sent in bursts, with a call to pace() between them (it waits
# until the event loop had a turn): the children then exit in bursts too, and the loop, which
# handles each exit, serves its other tasks in between. Killing 1,000 children in one go queues
# 1,000 exit callbacks at once and stalls the loop for about 0.2 s (raw asyncio on 3.11 too).
_BURST = 16

R = TypeVar("R")

#: Blocks until the event loops waiting on the work caught up (see ``_core/_offloop.py``).
Pace = Callable[[], None]


def _no_pace() -> None:
    return None


def paced(items: Sequence[R], pace: Pace) -> Iterator[R]:
    """Yield ``items``, calling ``pace()`` after every burst of ``_BURST``."""
    for index, item in enumerate(items):
        if index and index % _BURST == 0:
            pace()
        yield item


def _alive(procs: Iterable[psutil.Process]) -> list[psutil.Process]:
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

    # -- signalling ----------------------------------------------------------------------------
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

    def orphans_of(self, pid: int, started_after: float | None) -> list[psutil.Process]:
        """Processes an exited child ``pid`` left running, where the platform cannot find them
        through a process group (Windows); ``[]`` where the group is the tool (POSIX)."""
        return []

    # -- the coarse operations of a stop (blocking: call them from a worker thread) ------------
    def ask_to_stop(
        self, targets: Sequence[StopTarget], pace: Pace = _no_pace
    ) -> list[StopRecord]:
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

    def kill_trees(self, records: Sequence[StopRecord], pace: Pace = _no_pace) -> None:
        """Look once more, then kill each record's group and every descendant seen (the children
        themselves are killed by the caller unless :attr:`group_kill_covers_leader`)."""
        table = self.scan()
        for record in paced(records, pace):
            record.add(table.handles(table.descendants(record.target.pid)))
            self.kill_tree(record.target.pid, record.target.own_group, _alive(record.descendants))

    def kill_now(self, pid: int, own_group: bool) -> None:
        """Kill the tree of ``pid`` at once (for synchronous clean-up paths)."""
        self.kill_trees([StopRecord(StopTarget(pid, own_group))])

    def lingering(self, records: Sequence[StopRecord], pace: Pace = _no_pace) -> list[bool]:
        """For each record: is a group member or a seen descendant still running?"""
        return [bool(_alive(record.descendants)) for record in records]


@dataclass(eq=False)
class PosixOps(PlatformOps):
    """Linux and macOS: ``start_new_session`` groups, SIGTERM then SIGKILL to the group."""

    group_kill_covers_leader: bool = True

    killpg: Callable[[int, int], None] = field(default=getattr(os, "killpg", lambda _p, _s: None))
    getpgid: Callable[[int], int] | None = field(default=getattr(os, "getpgid", None))
    #: Where ``/proc`` is when the fast Linux scan applies; None: scan through psutil.
    proc_root: str | None = field(
        default_factory=lambda: "/proc" if os.path.exists("/proc/self/stat") else None
    )

    def group_kwargs(self, kwargs: Mapping[str, Any], new_group: bool) -> dict[str, Any]:
        out = dict(kwargs)
        caller_chose = "start_new_session" in out or "process_group" in out
        if new_group and not caller_chose:
            out["start_new_session"] = True
        return out

    def started_own_group(self, kwargs: Mapping[str, Any]) -> bool:
        return bool(kwargs.get("start_new_session")) or kwargs.get("process_group") == 0

    def pin(self, pid: int) -> int:
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is None or pid <= 0:
            return -1
        try:
            return int(pidfd_open(pid))
        except OSError:  # gone, an old kernel, or out of descriptors: signal by pid
            return -1

    def unpin(self, handle: int) -> None:
        if handle >= 0:
            with contextlib.suppress(OSError):
                os.close(handle)

    def leads_own_group(self, pid: int) -> bool:
        if self.getpgid is None:
            return False
        try:
            return bool(self.getpgid(pid) == pid)
        except OSError:
            return False

    def scan(self) -> ProcessTable:
        if self.proc_root is not None:
            return scan_proc(self.proc_root)
        return scan_psutil(getpgid=self.getpgid)

    def state_of(self, pid: int) -> str:
        if self.proc_root is not None:
            return proc_state(pid, self.proc_root)
        return psutil_state(pid)

    def stop_signal(self, own_group: bool) -> int:
        return int(signal.SIGTERM)

    def signal_group(self, pid: int, sig: int) -> bool:
        if pid <= 0:  # killpg(0) would signal our own group
            return False
        try:
            self.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return False
        return True

    def _signal_child(self, target: StopTarget, sig: int) -> bool:
        """Signal the child's group, or the child alone; False if neither could be reached."""
        if target.own_group and self.signal_group(target.pid, sig):
            return True
        if target.pid <= 0:
            return False
        try:
            if target.pin >= 0:
                signal.pidfd_send_signal(target.pin, sig)
            else:
                self.kill(target.pid, sig)
        except OSError:
            return False
        return True

    def kill_tree(self, pid: int, own_group: bool, descendants: Iterable[psutil.Process]) -> None:
        if own_group:
            self.signal_group(pid, signal.SIGKILL)
        self.signal_descendants(descendants, signal.SIGKILL)

    def group_alive(self, pid: int, own_group: bool) -> bool:
        return self._groups_running([pid] if own_group else [])[0] if own_group else False

    def group_has_runner(self, pgid: int) -> bool:
        """True when a non-zombie process belongs to process group ``pgid``."""
        return pgid in self.scan().groups_with_runners([pgid])

    def _groups_running(self, pgids: Sequence[int]) -> list[bool]:
        # signal 0 succeeds on zombies too (re-parented grandchildren that nobody reaped yet), so
        # a positive answer is confirmed by one look for a group member that still runs.
        answered = [pgid for pgid in pgids if self.signal_group(pgid, 0)]
        runners = self.scan().groups_with_runners(answered) if answered else set()
        return [pgid in runners for pgid in pgids]

    def _ask(self, targets: Sequence[StopTarget], pace: Pace) -> list[StopRecord]:
        records = [StopRecord(t) for t in targets]
        running = [r for r in records if r.target.running and r.target.pid > 0]
        if running:
            self._freeze(running)
            try:
                for record in paced(running, pace):
                    record.asked = self._signal_child(record.target, signal.SIGTERM)
                    self.signal_descendants(record.descendants, signal.SIGTERM)
                # One more look while the trees are held: nothing could fork since the last one,
                # but a child that died at once from SIGTERM released its children, and they
                # must have been seen before that.
                self._look(running, signal.SIGTERM)
            finally:
                for record in paced(running, pace):
                    self._signal_child(record.target, signal.SIGCONT)
                    self.signal_descendants(record.descendants, signal.SIGCONT)
        exited = [r for r in records if not r.target.running and r.target.own_group]
        if exited:
            alive = self._groups_running([r.target.pid for r in exited])
            for record, group_alive in zip(exited, alive, strict=True):
                if group_alive:
                    self.signal_group(record.target.pid, signal.SIGTERM)
        return records

    def _look(self, records: Sequence[StopRecord], sig: int) -> list[psutil.Process]:
        """One look for descendants not seen yet; signal them with ``sig``; return them."""
        table = self.scan()
        fresh_all: list[psutil.Process] = []
        me = os.getpid()
        for record in records:
            root = table.entries.get(record.target.pid)
            if root is None or root.ppid != me:
                # Gone, or no longer our child: its pid may already name another process,
                # whose children are none of our business.
                continue
            known = {p.pid for p in record.descendants}
            fresh = table.handles(
                e for e in table.descendants(record.target.pid) if e.pid not in known
            )
            if fresh:
                record.descendants.extend(fresh)
                self.signal_descendants(fresh, sig)
                fresh_all.extend(fresh)
        return fresh_all

    def _freeze(self, records: Sequence[StopRecord]) -> None:
        """SIGSTOP every child (its group) and every descendant found, looking again until no new
        one appears. Stopped processes cannot fork; a signal is delivered asynchronously, so each
        look waits until what was signalled has really stopped (or else it could fork just after
        the look). The tree is accepted as complete only after two looks in a row, a moment
        apart, find nothing new (a fork in flight when the leader stopped surfaces a little
        later). All the waits share one 0.5 s bound."""
        pending = set()
        for record in records:
            if self._signal_child(record.target, signal.SIGSTOP):
                pending.add(record.target.pid)
        deadline = time.monotonic() + 0.5
        quiet = 0
        for _ in range(40):
            pending = self._await_stopped(pending, deadline)
            fresh = self._look(records, signal.SIGSTOP)
            if not fresh:
                quiet += 1
                if quiet == 2:
                    return
                time.sleep(0.002)
                continue
            quiet = 0
            pending.update(p.pid for p in fresh)

    def _await_stopped(self, pids: set[int], deadline: float) -> set[int]:
        """Block (until ``deadline`` at most; usually well under a millisecond) until every
        process in ``pids`` has stopped, ended or vanished; return those that have not."""
        while pids:
            pids = {pid for pid in pids if self.state_of(pid) not in STOPPED_STATES}
            if not pids or time.monotonic() >= deadline:
                return pids
            time.sleep(0.0005)
        return pids

    def lingering(self, records: Sequence[StopRecord], pace: Pace = _no_pace) -> list[bool]:
        groups = [r.target.pid for r in records if r.target.own_group]
        running = dict(zip(groups, self._groups_running(groups), strict=True))
        return [
            running.get(r.target.pid, False) or bool(_alive(r.descendants)) for r in records
        ]


@dataclass(eq=False)
class WindowsOps(PlatformOps):
    """Windows: ``CREATE_NEW_PROCESS_GROUP``, CTRL_BREAK first, then kill the psutil tree."""

    process_iter: Callable[[], Iterable[psutil.Process]] = field(default=psutil.process_iter)

    def group_kwargs(self, kwargs: Mapping[str, Any], new_group: bool) -> dict[str, Any]:
        out = dict(kwargs)
        if new_group:
            out["creationflags"] = int(out.get("creationflags", 0)) | CREATE_NEW_PROCESS_GROUP
        return out

    def started_own_group(self, kwargs: Mapping[str, Any]) -> bool:
        return bool(int(kwargs.get("creationflags", 0)) & CREATE_NEW_PROCESS_GROUP)

    def scan(self) -> ProcessTable:
        return scan_psutil(self.process_iter, getpgid=None)

    def stop_signal(self, own_group: bool) -> int:
        # CTRL_BREAK reaches only a process that leads its own console group; without a group,
        # TerminateProcess (what SIGTERM means on Windows) is the only request available.
        return CTRL_BREAK_EVENT if own_group else int(signal.SIGTERM)

    def signal_group(self, pid: int, sig: int) -> bool:
        if sig != CTRL_BREAK_EVENT:
            return False  # Windows has no other group-wide signal
        try:
            self.kill(pid, sig)
        except (ProcessLookupError, PermissionError, OSError):
            return False
        return True

    def orphans_of(self, pid: int, started_after: float | None) -> list[psutil.Process]:
        return self._orphans_among(self.process_iter(), pid, started_after)

    def _orphans_among(
        self, procs: Iterable[psutil.Process], pid: int, started_after: float | None
    ) -> list[psutil.Process]:
        # Windows does not reparent: the children of an exited process keep its pid as their
        # parent pid. Only processes created after the child started can be its children (a
        # process that later reused the pid is told apart by psutil's creation-time checks).
        found: list[psutil.Process] = []
        for proc in procs:
            try:
                if proc.ppid() != pid:
                    continue
                if started_after is not None and proc.create_time() < started_after - 1.0:
                    continue
                found.append(proc)
                found.extend(proc.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def _ask(self, targets: Sequence[StopTarget], pace: Pace) -> list[StopRecord]:
        # No SIGSTOP: the trees cannot be held still, so they are looked at twice (before and
        # after the request), as close together as possible.
        records = [StopRecord(t) for t in targets]
        running = [r for r in records if r.target.running]
        if running:
            table = self.scan()
            for record in paced(running, pace):
                record.add(table.handles(table.descendants(record.target.pid)))
                sig = self.stop_signal(record.target.own_group)
                record.asked = record.target.own_group and self.signal_group(record.target.pid, sig)
                self.signal_descendants(record.descendants, signal.SIGTERM)
            table = self.scan()
            for record in running:
                known = {p.pid for p in record.descendants}
                late = table.handles(
                    e for e in table.descendants(record.target.pid) if e.pid not in known
                )
                record.add(late)
                self.signal_descendants(late, signal.SIGTERM)
        exited = [r for r in records if not r.target.running]
        if exited:
            procs = list(self.process_iter())
            for record in exited:
                record.add(self._orphans_among(procs, record.target.pid, record.target.started_at))
                self.signal_descendants(record.descendants, signal.SIGTERM)
        return records

    def kill_tree(self, pid: int, own_group: bool, descendants: Iterable[psutil.Process]) -> None:
        # No process groups to signal: kill the descendants found while the tree was intact.
        for proc in descendants:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.kill()


_DEFAULT: PlatformOps | None = None


def platform_ops(platform: str | None = None, **overrides: Any) -> PlatformOps:
    """Return the :class:`PlatformOps` for ``platform`` (default: this machine).

    ``overrides`` replace the operating-system calls (``kill``, ``killpg``, ``process_iter``,
    ...) so tests can record what would be done. Without arguments the same instance is returned
    every time, so stops started through different wrappers share their looks at the process
    table.
    """
    global _DEFAULT
    if platform is None and not overrides:
        if _DEFAULT is None:
            _DEFAULT = platform_ops(sys.platform)
        return _DEFAULT
    name = platform or sys.platform
    if is_windows(name):
        return WindowsOps(name=name, **overrides)
    return PosixOps(name=name, **overrides)
