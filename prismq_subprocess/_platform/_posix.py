"""Linux and macOS: process groups, signals, SIGSTOP to hold a tree still, ``/proc`` or psutil
to look at it."""

from __future__ import annotations

import contextlib
import functools
import os
import select
import signal
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import psutil

from ._backlog import Backlog
from ._child_watcher import returncode_of
from ._containment import Containment, ContainmentReport
from ._cookie import CookieRead
from ._gil import GilShare
from ._ops import Pace, PlatformOps, StopRecord, StopTarget, alive, no_pace, paced
from ._posix_host import PosixHost, posix_host
from ._table import (
    STOPPED_STATES,
    ProcessEntry,
    ProcessTable,
    proc_state,
    psutil_state,
    scan_proc,
    scan_psutil,
)

__all__ = ["PosixOps", "pidfd_open"]


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (Linux 5.3+): readable once the process has exited, and a handle that
    never names another process. -1 where unavailable (other systems, old kernels, seccomp, the
    process already reaped, no descriptor left)."""
    opener = getattr(os, "pidfd_open", None)
    if opener is None or pid <= 0:
        return -1
    try:
        return int(opener(pid))
    except OSError:
        return -1


@dataclass(eq=False)
class PosixOps(PlatformOps):
    """Linux and macOS: ``start_new_session`` groups, SIGTERM then SIGKILL to the group."""

    group_kill_covers_leader: bool = True

    killpg: Callable[[int, int], None] = field(default=getattr(os, "killpg", lambda _p, _s: None))
    getpgid: Callable[[int], int] | None = field(default=getattr(os, "getpgid", None))
    #: ``os.waitid`` (None where the platform lacks it: our children are then signalled by pid
    #: until asyncio reports their exit, as asyncio 3.13 does).
    waitid: Callable[..., Any] | None = field(default=getattr(os, "waitid", None))
    #: Where ``/proc`` is when the fast Linux scan applies; None: scan through psutil.
    proc_root: str | None = field(
        default_factory=lambda: "/proc" if os.path.exists("/proc/self/stat") else None
    )
    #: This process's containment (cookie, cgroup, subreaper); None: process groups only.
    host: PosixHost | None = field(default_factory=posix_host)

    # -- containment -------------------------------------------------------------------------
    def prepare_spawn(
        self, kwargs: Mapping[str, Any], die_with_host: bool = False, *, ahead: bool = False
    ) -> tuple[dict[str, Any], Containment]:
        if self.host is None:
            return dict(kwargs), Containment()
        return self.host.prepare(kwargs, die_with_host, ahead=ahead)

    def adopt(self, pid: int, containment: Containment) -> None:
        if self.host is not None:
            self.host.adopt(pid, containment)

    def adopt_soon(self, pid: int, containment: Containment) -> None:
        host = self.host
        if host is None or not host.adopt(pid, containment, enter=False):
            return
        # The move names the child by pid, and the loop's child watcher may reap the child
        # meanwhile (its pid then free for anyone): pinned now, while it cannot have been
        # reaped, the child is moved only if the pin shows it still running. (Between that
        # look and the move, the pid could only name someone else if the child exited, was
        # reaped and the pid numbers went round in those microseconds.)
        if not self._unreaped_child(pid):
            return  # the loop's child watcher reaped it already: the pid may be anyone's
        pin = self.pin(pid)
        if pin < 0:  # no pidfd (macOS has no cgroups; an old kernel, no descriptor left)
            host.enter(pid, containment)
            return
        _MOVES.submit(_Move(host, pid, pin, containment))

    def release(self, containment: Containment) -> None:
        if self.host is not None:
            self.host.release(containment)

    def release_soon(self, containment: Containment) -> None:
        # weakref.finalize marks its run at exit: a thread started then may never finish, and
        # there is no loop left to protect.
        exiting = getattr(weakref.finalize, "_shutdown", False)
        if self.host is not None and containment.cgroup is not None and not exiting:
            # Behind the moves in the same queue: a sub-group is never removed before its
            # child's move was tried (the move would then make it again, for nobody).
            _MOVES.submit(functools.partial(self.host.release, containment))
        else:
            self.release(containment)

    def kill_contained(self, containment: Containment) -> None:
        if containment.cookie is None and containment.cgroup is None:
            self.release(containment)
            return
        # No pid: the record finds its tree through the cookie and the sub-group alone (pid 0
        # is never signalled: see signal_group and _signal_child).
        self.kill_trees(
            [StopRecord(StopTarget(0, own_group=False, running=False, containment=containment))]
        )

    def child_exited(self, pid: int) -> None:
        if self.host is not None and self.host.reaper is not None:
            self.host.reaper.exited(pid)

    def containment_report(self) -> ContainmentReport:
        if self.host is None:
            return super().containment_report()
        self.host.activate()
        return self.host.report()

    def cookie_variable(self) -> str | None:
        return None if self.host is None else self.host.cookie_variable()

    def group_kwargs(self, kwargs: Mapping[str, Any], new_group: bool) -> dict[str, Any]:
        out = dict(kwargs)
        # Popen's own defaults passed explicitly (a caller forwarding ``process_group=None``)
        # choose nothing: the child still gets its group.
        caller_chose = out.get("start_new_session") is not None or out.get(
            "process_group", -1
        ) not in (None, -1)
        if new_group and not caller_chose:
            out["start_new_session"] = True
        return out

    def started_own_group(self, kwargs: Mapping[str, Any]) -> bool:
        return bool(kwargs.get("start_new_session")) or kwargs.get("process_group") == 0

    def pin(self, pid: int) -> int:
        # Without a pidfd (macOS, old kernels, out of descriptors) the child is signalled by pid.
        return pidfd_open(pid)

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

    def _unreaped_child(self, pid: int) -> bool:
        """True while ``pid`` is a child of ours nobody has reaped (running, or exited and
        waiting for its status to be read); a pid reaped already may name another process by
        now. Looks without reaping (``waitid`` with ``WNOWAIT``); True where it cannot look."""
        if self.waitid is None:
            return True
        try:
            self.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return False
        return True

    def wait_child_dead(self, pid: int, deadline: float) -> None:
        if self.waitid is None:
            return
        pause = 0.0005
        while True:
            try:
                if self.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return  # exited, its status left for its owner
            except ChildProcessError:
                return  # reaped already (a watcher thread), or not ours
            if time.monotonic() >= deadline:
                return
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def peek_exit_status(self, pid: int) -> int | bool | None:
        if self.waitid is None:
            return True
        try:
            info = self.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return None  # reaped already (its owner's watcher), or not ours
        if info is None:
            return False  # running
        return returncode_of(info)

    def signal_unreaped_child(self, pid: int, sig: int | None) -> bool:
        sig = signal.SIGKILL if sig is None else sig
        # The pidfd first, then the look: a pid that is our unreaped child after the pidfd was
        # opened was that child when it was opened, and the pidfd names it for good, so the
        # owner's watcher reaping it in another thread between the look and the signal (its
        # pid then free for anyone) cannot turn the signal on a stranger.
        # (An injected ``kill``, a test's or a host's hook, is called by pid as ever.)
        pinned = self.pin(pid) if self.kill is os.kill else -1
        try:
            if not self._unreaped_child(pid):
                return True
            with contextlib.suppress(ProcessLookupError):
                if pinned >= 0:
                    signal.pidfd_send_signal(pinned, sig)
                else:
                    self.kill(pid, sig)
        finally:
            self.unpin(pinned)
        return True

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
        if target.own_group:
            if self.signal_group(target.pid, sig):
                return True
            if target.pin < 0:
                # No member left: the child is gone (a session leader cannot leave its group;
                # the rare child that joined another group is asked through its process
                # object), and its pid may name someone else already.
                return False
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
        return own_group and self._groups_running([StopTarget(pid, own_group)])[0]

    def groups_alive(self, pids: Sequence[int], pace: Callable[[], None]) -> list[bool]:
        return self._groups_running([StopTarget(pid, True) for pid in pids])

    def group_has_runner(self, pgid: int) -> bool:
        """True when a non-zombie process belongs to process group ``pgid``."""
        return pgid in self.scan().groups_with_runners([pgid])

    def _groups_running(self, targets: Sequence[StopTarget]) -> list[bool]:
        """For each target (leading its own group): does a member of its group still run?"""
        # signal 0 succeeds on zombies too (re-parented grandchildren that nobody reaped yet), so
        # a positive answer is confirmed by one look for a group member that still runs.
        answered = [t.pid for t in targets if self.signal_group(t.pid, 0)]
        if not answered:
            return [False] * len(targets)
        table = self.scan()
        runners = table.groups_with_runners(answered)
        return [t.pid in runners and _group_is_the_childs(t, table) for t in targets]

    def _ask(self, targets: Sequence[StopTarget], pace: Pace) -> list[StopRecord]:
        records = [StopRecord(t) for t in targets]
        finder = _Finder(self)
        running = [r for r in records if r.target.running and r.target.pid > 0]
        if running:
            held = self._freeze_cgroups(running, finder)
            try:
                self._freeze(running, finder, held)
                for record in paced(running, pace):
                    record.asked = self._signal_child(record.target, signal.SIGTERM)
                    self.signal_descendants(record.descendants, signal.SIGTERM)
                # One more look while the trees are held: nothing could fork since the last one,
                # but a child that died at once from SIGTERM released its children, and they
                # must have been seen before that (members of a frozen sub-group were: it
                # keeps them when their parent dies).
                if not _held_whole(running, held):
                    self._look(running, signal.SIGTERM, finder)
            finally:
                cgroups = self.host.cgroups if self.host is not None else None
                for record in paced(running, pace):
                    self._signal_child(record.target, signal.SIGCONT)
                    self.signal_descendants(record.descendants, signal.SIGCONT)
                    if cgroups is not None and record.target.cgroup is not None:
                        cgroups.freeze(record.target.cgroup, False)
        exited = [r for r in records if not r.target.running]
        if exited:
            # What an exited child left running: its group, and what containment still finds.
            self._look(exited, signal.SIGTERM, finder)
            grouped = [r for r in exited if r.target.own_group]
            groups = self._groups_running([r.target for r in grouped])
            for record, group_running in zip(grouped, groups, strict=True):
                if group_running:
                    self.signal_group(record.target.pid, signal.SIGTERM)
        return records

    def _look(
        self,
        records: Sequence[StopRecord],
        sig: int | None,
        finder: _Finder,
        table: ProcessTable | None = None,
    ) -> list[psutil.Process]:
        """One look (at ``table``, default: a new scan) for processes of the records' trees not
        seen yet; signal them with ``sig`` (None: do not); return them.

        A record's tree is what descends from its child (while the child is still ours: a pid
        that names another process now is none of our business) plus what its containment
        finds (cgroup members, cookie holders) and what descends from those.
        """
        table = table if table is not None else self.scan()
        finder.start(table, records)
        me = os.getpid()
        fresh_all: list[psutil.Process] = []
        for record in records:
            pid = record.target.pid
            wanted: dict[int, ProcessEntry] = {}
            root = table.entries.get(pid) if record.target.running else None
            if root is not None and root.ppid == me:
                # (An exited child's pid may already name another child of ours.)
                wanted.update((e.pid, e) for e in table.descendants(pid))
            for entry in finder.contained(record):
                wanted[entry.pid] = entry
                wanted.update((e.pid, e) for e in table.descendants(entry.pid))
            wanted.pop(pid, None)
            known = {p.pid for p in record.descendants}
            fresh_entries = [e for p, e in wanted.items() if p not in known]
            fresh = table.handles(fresh_entries)
            record.seen.update((e.pid, e.start) for e in fresh_entries)
            if fresh:
                record.descendants.extend(fresh)
                if sig is not None:
                    self.signal_descendants(fresh, sig)
                fresh_all.extend(fresh)
        return fresh_all

    def _freeze(
        self,
        records: Sequence[StopRecord],
        finder: _Finder,
        held: Mapping[str, AbstractSet[int]] | None = None,
    ) -> None:
        """SIGSTOP every child (its group) and every process of its tree found, looking again
        until no new one appears. Stopped processes cannot fork; a signal is delivered
        asynchronously, so each look waits until what was signalled has really stopped (or else
        it could fork just after the look). The tree is accepted as complete only after two
        looks in a row, a moment apart, find nothing new (a fork in flight when the leader
        stopped surfaces a little later). All the waits share one 0.5 s bound.

        ``held``: the members of each frozen sub-group. They never show as stopped and are not
        waited for: nothing in a frozen sub-group can run, let alone fork, and what a task
        forked in flight joined the sub-group before it reported frozen. So when every child
        and everything found of its tree are members, the first look is the whole tree (each
        look costs a read of the whole process table: 10 to 30 ms with 1,000 processes)."""
        held = held or {}
        members = set().union(*held.values())
        pending = set()
        for record in records:
            if self._signal_child(record.target, signal.SIGSTOP):
                pending.add(record.target.pid)
        deadline = time.monotonic() + 0.5
        quiet = 0
        for _ in range(40):
            pending = self._await_stopped(pending - members, deadline)
            fresh = self._look(records, signal.SIGSTOP, finder)
            if _held_whole(records, held):
                return
            if not fresh:
                quiet += 1
                if quiet == 2:
                    return
                time.sleep(0.002)
                continue
            quiet = 0
            pending.update(p.pid for p in fresh)

    def _freeze_cgroups(
        self, records: Sequence[StopRecord], finder: _Finder
    ) -> dict[str, set[int]]:
        """Freeze the records' sub-groups (one write each holds a whole sub-group still,
        including what is forked in it afterwards; thawed with the SIGCONTs, in ``_ask``);
        return the members of those that froze (which ``finder`` then need not read again)."""
        cgroups = self.host.cgroups if self.host is not None else None
        if cgroups is None:
            return {}
        paths = [r.target.cgroup for r in records if r.target.cgroup is not None]
        for path in paths:
            cgroups.freeze(path, True)
        deadline = time.monotonic() + 0.5
        pending = list(paths)
        while pending and time.monotonic() < deadline:
            pending = [p for p in pending if not cgroups.is_frozen(p)]
            if pending:
                time.sleep(0.0005)
        frozen = {path: set(cgroups.members(path)) for path in paths if path not in pending}
        finder.frozen_members.update(frozen)
        return frozen

    def _await_stopped(self, pids: set[int], deadline: float) -> set[int]:
        """Block (until ``deadline`` at most; usually well under a millisecond) until every
        process in ``pids`` has stopped, ended or vanished; return those that have not."""
        while pids:
            pids = {pid for pid in pids if self.state_of(pid) not in STOPPED_STATES}
            if not pids or time.monotonic() >= deadline:
                return pids
            time.sleep(0.0005)
        return pids

    def kill_now(self, pid: int, own_group: bool, containment: Containment | None = None) -> None:
        # Held still first (SIGSTOP, looked at until nothing new appears), as a stop is: killed
        # after one look, a tree loses what it forks between the look and the kill (a daemon's
        # middle process forking it) wherever no frozen sub-group holds it. This is the undo of
        # a THREADED/LOCAL spawn, run off the event loop; the hold costs two looks or more.
        records = [StopRecord(StopTarget(pid, own_group, containment=containment))]
        if pid <= 0:
            self.kill_trees(records)
            return
        finder = _Finder(self)
        held = self._freeze_cgroups(records, finder)
        try:
            self._freeze(records, finder, held)
            self.kill_trees(records)
        finally:
            cgroups = self.host.cgroups if self.host is not None else None
            path = records[0].target.cgroup
            if cgroups is not None and path is not None:
                cgroups.freeze(path, False)

    def kill_trees(self, records: Sequence[StopRecord], pace: Pace = no_pace) -> None:
        table = self.scan()
        finder = _Finder(self)
        self._look(records, None, finder, table)
        cgroups = self.host.cgroups if self.host is not None else None
        for record in paced(records, pace):
            target = record.target
            if cgroups is not None and target.cgroup is not None and cgroups.can_kill:
                cgroups.kill(target.cgroup)
            group = target.own_group and _group_is_the_childs(target, table)
            self.kill_tree(target.pid, group, alive(record.descendants))
        # A holder found only once its exec had ended ran meanwhile, and what it forked since is
        # in no table read so far: one more look (rare: it follows such a wait) finds that.
        for _ in range(3):
            if not finder.found_late:
                break
            finder.found_late = False
            self._look(records, signal.SIGKILL, finder)
        self._after(records)

    def lingering(self, records: Sequence[StopRecord], pace: Pace = no_pace) -> list[bool]:
        grouped = [r.target for r in records if r.target.own_group]
        running = dict(zip((t.pid for t in grouped), self._groups_running(grouped), strict=True))
        cgroups = self.host.cgroups if self.host is not None else None
        flags = [
            running.get(r.target.pid, False)
            or bool(alive(r.descendants))
            or (
                cgroups is not None
                and r.target.cgroup is not None
                and cgroups.populated(r.target.cgroup)
            )
            for r in records
        ]
        # What a tree started after the snapshot into a session of its own, and whose parent
        # has exited since (a helper a SIGTERM handler starts before it exits), is in no group
        # of ours and below nothing seen: without a sub-group to hold it, only its cookie
        # finds it. So a record that seems done gets one more look through its cookie (a done
        # record leaves the polls: one look per record, unless it finds something).
        unsure = [
            r
            for r, flag in zip(records, flags, strict=True)
            if not flag and r.target.cookie is not None and r.target.cgroup is None
        ]
        if unsure:
            self._look(unsure, signal.SIGTERM, _Finder(self))
            found = {r for r in unsure if alive(r.descendants)}
            flags = [flag or r in found for r, flag in zip(records, flags, strict=True)]
        done = [r for r, flag in zip(records, flags, strict=True) if not flag]
        if done:
            self._after(done)
        return flags

    def _after(self, records: Sequence[StopRecord]) -> None:
        """The stop of ``records`` is over or nearly: what it saw below the children may come
        to us as orphans (ours to reap then), and empty sub-groups go."""
        if self.host is None:
            return
        for record in records:
            if record.target.containment is not None:
                # pid 0: the undo of a spawn whose child was never registered (kill_contained).
                self.host.release(record.target.containment, leader_known=record.target.pid > 0)
        self.host.after_stop(
            [pair for r in records if r.target.pid > 0 for pair in r.seen.items()],
            [pair for r in records if r.target.pid <= 0 for pair in r.seen.items()],
        )


#: Moves of ASYNC children into their sub-groups (see ``PosixOps.adopt_soon``).
#: The worker thread that moves ASYNC children into their cgroups; like asyncio's executor
#: threads it outlives its jobs (0.25 s), which a leak check must not count as the test's.
CGROUP_ENTER_THREAD = "prismq-cgroup-enter"
_MOVES = Backlog(CGROUP_ENTER_THREAD)


@dataclass(eq=False)
class _Move:
    """Move the child ``pid`` into its sub-group if its pidfd ``pin`` shows it still running;
    the pin is closed either way (``drop()``: in a forked child, where the move never runs)."""

    host: PosixHost
    pid: int
    pin: int
    containment: Containment

    def __call__(self) -> None:
        try:
            poller = select.poll()
            poller.register(self.pin, select.POLLIN)
            if not poller.poll(0):  # a pidfd turns readable when its process exits
                self.host.enter(self.pid, self.containment)
        finally:
            os.close(self.pin)

    def drop(self) -> None:
        os.close(self.pin)


def _group_is_the_childs(target: StopTarget, table: ProcessTable) -> bool:
    """Whether the process group numbered like ``target``'s child (which leads its own) can
    still be that child's group, as ``table`` shows the system.

    While the child runs, it is. Once it has exited and been reaped, its group lives on only
    while a member does, and so long the kernel gives its number to no new process; a process
    that has that number now was given it after the group emptied, and a group of that number
    is a stranger's (a pid that went round: signalling it would hit whoever leads it now).
    """
    return target.running or target.pid not in table.entries


def _held_whole(records: Sequence[StopRecord], held: Mapping[str, AbstractSet[int]]) -> bool:
    """True when each record's child and every process found of its tree are members of the
    record's frozen sub-group (``held``: members by sub-group): then nothing of those trees can
    fork or leave until thawed."""
    for record in records:
        path = record.target.cgroup
        members = held.get(path) if path is not None else None
        if members is None or record.target.pid not in members:
            return False
        if any(proc.pid not in members for proc in record.descendants):
            return False
    return True


#: How long one look waits, at most, for the processes it caught inside an exec to show their
#: environments (see ``Cookies.look``); usually well under a millisecond, but a process waiting
#: for a CPU on a loaded machine stays inside its exec that long (0.2 s was too short in CI: one
#: was taken for cookie-less and outlived the stop of its tree). A process still inside its exec
#: then (blocked reading its program from a hung disk) is taken as having no cookie, and is not
#: waited for again in the same operation (its read is kept, as every read is).
_EXEC_SETTLE = 1.0


class _Finder:
    """What containment finds during one operation of a stop: sub-group members and cookie
    holders, by record. Environments are read once per process per operation."""

    def __init__(self, ops: PosixOps) -> None:
        self._host = ops.host
        self._reads: dict[tuple[int, float], CookieRead] = {}
        self._table: ProcessTable | None = None
        self._holders: dict[str, list[ProcessEntry]] = {}
        #: Members of sub-groups frozen for this operation: nothing can join them meanwhile.
        self.frozen_members: dict[str, set[int]] = {}
        #: A look found a holder only after waiting for its exec: it ran meanwhile, and what it
        #: forked since is not in that look's table (reset by whoever acts on it).
        self.found_late = False

    def start(self, table: ProcessTable, records: Sequence[StopRecord]) -> None:
        """A new look: index the cookie holders among the candidates of ``table``."""
        self._table = table
        self._holders = {}
        host = self._host
        wanted = {r.target.cookie for r in records if r.target.cookie is not None}
        if host is None or not wanted:
            return
        # Children that runs started are not candidates: they carry their own run's cookie.
        # Only while they are those children: the pid of one reaped before its run was let go
        # of may name anybody by now (pids come round within minutes where pid_max is 32768),
        # even an orphan handed to us as the subreaper, which its own cookie tells apart.
        me = os.getpid()
        entries = table.entries
        leaders = {r.target.pid for r in records}
        for pid, cookie in host.spawned_children().items():
            entry = entries.get(pid)
            if (
                entry is not None
                and entry.ppid == me
                and (not host.subreaper or host.cookies.read(pid) == cookie)
            ):
                leaders.add(pid)
        if host.subreaper:
            # Orphans come to us, not to init: the candidates are our own children.
            candidates = [e for e in table.children(me) if e.pid not in leaders]
        else:
            candidates = [e for e in table.entries.values() if e.pid not in leaders and e.pid != me]
        share = GilShare()
        looked = {e.pid for e in candidates}
        # Processes caught inside an exec read as having no environment: read again in a moment
        # (the undo of a cancelled spawn: the child's `cmd &` may be just exec'ing `cmd`).
        inside_exec: list[ProcessEntry] = []
        deadline = 0.0
        pause = 0.0005
        while True:
            for entry in candidates:  # (grows: see below)
                share()
                key = (entry.pid, entry.start)
                read = self._reads.get(key)
                fresh = read is None
                if read is None:
                    read = host.cookies.look(entry.pid)
                    if read.settling and (not deadline or time.monotonic() < deadline):
                        inside_exec.append(entry)
                        continue
                    # (Kept for the operation's later looks, even one that never settled.)
                    self._reads[key] = read
                    if deadline and read.value in wanted:
                        self.found_late = True
                value = read.value
                if value is not None and value in wanted:
                    self._holders.setdefault(value, []).append(entry)
                elif host.subreaper and (
                    read.empty if fresh else value is None and host.cookies.unreadable(entry.pid)
                ):
                    # A child that is exiting has released its memory (its environment reads
                    # empty) before its children are handed to us: they are still its own, and
                    # only their own cookies find them (the undo of a cancelled spawn: asyncio
                    # has just killed the child, whose `cmd &` lives on). (Read again in each
                    # look: it may have begun exiting since an earlier one.)
                    for below in table.descendants(entry.pid):
                        if below.pid not in looked and below.pid not in leaders:
                            looked.add(below.pid)
                            candidates.append(below)
            if not inside_exec:
                return
            deadline = deadline or time.monotonic() + _EXEC_SETTLE
            time.sleep(pause)
            pause = min(pause * 2, 0.005)
            candidates, inside_exec = inside_exec, []

    def contained(self, record: StopRecord) -> list[ProcessEntry]:
        """The processes containment attributes to ``record`` in the current look."""
        table = self._table
        assert table is not None
        found = list(self._holders.get(record.target.cookie or "", ()))
        cgroups = self._host.cgroups if self._host is not None else None
        path = record.target.cgroup
        if cgroups is not None and path is not None:
            members = self.frozen_members.get(path)
            for pid in members if members is not None else cgroups.members(path):
                entry = table.entries.get(pid)
                if entry is not None:
                    found.append(entry)
        return found
