"""Linux and macOS: process groups, signals, SIGSTOP to hold a tree still, ``/proc`` or psutil
to look at it."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from ._ops import Pace, PlatformOps, StopRecord, StopTarget, alive, no_pace, paced
from ._table import STOPPED_STATES, ProcessTable, proc_state, psutil_state, scan_proc, scan_psutil

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
            groups = self._groups_running([r.target.pid for r in exited])
            for record, group_running in zip(exited, groups, strict=True):
                if group_running:
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

    def lingering(self, records: Sequence[StopRecord], pace: Pace = no_pace) -> list[bool]:
        groups = [r.target.pid for r in records if r.target.own_group]
        running = dict(zip(groups, self._groups_running(groups), strict=True))
        return [
            running.get(r.target.pid, False) or bool(alive(r.descendants)) for r in records
        ]
