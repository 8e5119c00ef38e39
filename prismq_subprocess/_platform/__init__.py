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
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import psutil

__all__ = [
    "CREATE_NEW_PROCESS_GROUP",
    "PlatformOps",
    "PosixOps",
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


_NOT_RUNNING = {
    psutil.STATUS_STOPPED,
    psutil.STATUS_TRACING_STOP,
    psutil.STATUS_ZOMBIE,
    psutil.STATUS_DEAD,
}


def _await_stopped(procs: Iterable[psutil.Process], deadline: float) -> None:
    """Block (until ``deadline`` at most; usually well under a millisecond) until every process
    in ``procs`` has stopped, ended or vanished."""
    pending = list(procs)
    while pending:
        still = []
        for proc in pending:
            try:
                if proc.status() not in _NOT_RUNNING:
                    still.append(proc)
            except psutil.Error:
                continue
        pending = still
        if not pending or time.monotonic() >= deadline:
            return
        time.sleep(0.0005)


def _snapshot_descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []


@dataclass
class PlatformOps:
    """Platform-specific process-group and signalling operations.

    Use :func:`platform_ops` to get the one for the running (or an injected) platform.
    """

    name: str
    kill: Callable[[int, int], None] = field(default=os.kill)
    #: Whether :meth:`kill_tree` on a group leader also kills the leader itself.
    group_kill_covers_leader: bool = False
    snapshot_descendants: Callable[[int], list[psutil.Process]] = field(
        default=_snapshot_descendants
    )

    def group_kwargs(self, kwargs: Mapping[str, Any], new_group: bool) -> dict[str, Any]:
        """Return Popen keyword arguments that start the child in its own group when asked."""
        raise NotImplementedError

    def started_own_group(self, kwargs: Mapping[str, Any]) -> bool:
        """True when a child spawned with ``kwargs`` leads its own process group."""
        raise NotImplementedError

    def stop_signal(self, own_group: bool) -> int:
        """The polite stop request: SIGTERM on POSIX, CTRL_BREAK on Windows for a group leader."""
        raise NotImplementedError

    def signal_group(self, pid: int, sig: int) -> bool:
        """Send ``sig`` to the group led by ``pid``; False when that is impossible or no member
        is left (the caller then signals the child itself)."""
        raise NotImplementedError

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

    def freeze(self, pid: int, own_group: bool) -> list[psutil.Process]:
        """Hold the child's tree still (where the platform can) and return its descendants.

        Without this, a descendant forked while the stop is under way (after the snapshot, before
        the child dies) and escaping into its own session would be missed for good.
        """
        return self.snapshot_descendants(pid)

    def thaw(self, pid: int, own_group: bool, descendants: Iterable[psutil.Process]) -> None:
        """Undo :meth:`freeze` (after the stop signals were sent, so they act at once)."""

    def signal_descendants(self, descendants: Iterable[psutil.Process], sig: int) -> None:
        """Send ``sig`` to every still-running process in ``descendants``.

        psutil checks each process's creation time first, so a reused pid is never signalled.
        """
        for proc in descendants:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
                proc.send_signal(sig)


@dataclass
class PosixOps(PlatformOps):
    """Linux and macOS: ``start_new_session`` groups, SIGTERM then SIGKILL to the group."""

    group_kill_covers_leader: bool = True

    killpg: Callable[[int, int], None] = field(default=getattr(os, "killpg", lambda _p, _s: None))

    def group_kwargs(self, kwargs: Mapping[str, Any], new_group: bool) -> dict[str, Any]:
        out = dict(kwargs)
        caller_chose = "start_new_session" in out or "process_group" in out
        if new_group and not caller_chose:
            out["start_new_session"] = True
        return out

    def started_own_group(self, kwargs: Mapping[str, Any]) -> bool:
        return bool(kwargs.get("start_new_session")) or kwargs.get("process_group") == 0

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

    def kill_tree(self, pid: int, own_group: bool, descendants: Iterable[psutil.Process]) -> None:
        if own_group:
            self.signal_group(pid, signal.SIGKILL)
        self.signal_descendants(descendants, signal.SIGKILL)

    def freeze(self, pid: int, own_group: bool) -> list[psutil.Process]:
        if pid <= 0:
            return []
        if not (own_group and self.signal_group(pid, signal.SIGSTOP)):
            with contextlib.suppress(OSError):
                self.kill(pid, signal.SIGSTOP)
        # Stopped processes cannot fork: stop every descendant found, look again, until no new
        # one appears. A signal is delivered asynchronously, so each look waits until what was
        # signalled has really stopped; otherwise it could fork just after the last look.
        seen: dict[int, psutil.Process] = {}
        leader: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            leader.append(psutil.Process(pid))
        deadline = time.monotonic() + 0.5
        quiet = 0
        for _ in range(40):
            # Look only once everything signalled so far has really stopped, and accept the
            # tree as complete only after two looks in a row, a moment apart, find nothing new
            # (a fork in flight when the leader stopped surfaces a little later).
            _await_stopped([*leader, *seen.values()], deadline)
            fresh = [p for p in self.snapshot_descendants(pid) if p.pid not in seen]
            if not fresh:
                quiet += 1
                if quiet == 2:
                    break
                time.sleep(0.002)
                continue
            quiet = 0
            for proc in fresh:
                seen[proc.pid] = proc
            self.signal_descendants(fresh, signal.SIGSTOP)
        return list(seen.values())

    def thaw(self, pid: int, own_group: bool, descendants: Iterable[psutil.Process]) -> None:
        if pid <= 0:
            return
        if not (own_group and self.signal_group(pid, signal.SIGCONT)):
            with contextlib.suppress(OSError):
                self.kill(pid, signal.SIGCONT)
        self.signal_descendants(descendants, signal.SIGCONT)

    def group_alive(self, pid: int, own_group: bool) -> bool:
        # signal 0 succeeds on zombies too (reparented grandchildren that nobody reaped yet), so
        # a positive answer is confirmed by looking for a group member that still runs.
        if not own_group or not self.signal_group(pid, 0):
            return False
        return self.group_has_runner(pid)

    def group_has_runner(self, pgid: int) -> bool:
        """True when a non-zombie process belongs to process group ``pgid``."""
        getpgid = getattr(os, "getpgid", None)
        if getpgid is None:
            return False
        for proc in psutil.process_iter():
            try:
                if getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                    return True
            except (OSError, psutil.Error):
                continue
        return False


@dataclass
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
        # Windows does not reparent: the children of an exited process keep its pid as their
        # parent pid. Only processes created after the child started can be its children (a
        # process that later reused the pid is told apart by psutil's creation-time checks).
        found: list[psutil.Process] = []
        for proc in self.process_iter():
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

    def kill_tree(self, pid: int, own_group: bool, descendants: Iterable[psutil.Process]) -> None:
        # No process groups to signal: kill the descendants found while the tree was intact.
        for proc in descendants:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.kill()


def platform_ops(platform: str | None = None, **overrides: Any) -> PlatformOps:
    """Return the :class:`PlatformOps` for ``platform`` (default: this machine).

    ``overrides`` replace the operating-system calls (``kill``, ``killpg``,
    ``snapshot_descendants``) so tests can record what would be done.
    """
    name = platform or sys.platform
    if is_windows(name):
        return WindowsOps(name=name, **overrides)
    return PosixOps(name=name, **overrides)
