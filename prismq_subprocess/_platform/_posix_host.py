"""The POSIX host's containment: the cookie always, a cgroup v2 sub-group per run and the child
subreaper where Linux allows them. Chosen once, on first use, and logged.

``PRISMQ_CGROUP=0`` turns the sub-groups off. The subreaper is opt-in, ``PRISMQ_SUBREAPER=1``
(or ``use_subreaper=True``): it changes a process-wide property of the host (orphans of every
descendant, including ones the host started without us, are re-parented to it and become its
zombies when they exit), which a library should not do behind the host's back; the cookie and
the cgroup find double-forked daemons without it. ``PRISMQ_COOKIE=0`` leaves children's
environments alone.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import logging
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from ._cgroup import Cgroups
from ._containment import Containment, ContainmentReport
from ._cookie import Cookies
from ._fork import after_fork_in_child, start_afresh_after_fork
from ._linux import Prctl, become_subreaper, load_prctl, pre_exec
from ._reaper import Reaper
from ._table import ProcessEntry

__all__ = ["PosixHost", "posix_host"]

logger = logging.getLogger("prismq_subprocess.containment")

_CGROUP_SWEEP_EVERY = 1.0
# Undone spawns remembered (their cookies): a child of one is reaped by its spawner within ms.
_UNKNOWN_LEADERS_KEPT = 1024


def _enabled(environ: Mapping[str, str], name: str, default: str = "1") -> bool:
    return environ.get(name, default).strip().lower() not in ("0", "false", "no", "off")


class PosixHost:
    """Containment of this process's children on Linux and macOS."""

    def __init__(
        self,
        *,
        proc_root: str | None = "/proc",
        environ: Mapping[str, str] | None = None,
        use_cgroup: bool | None = None,
        use_subreaper: bool | None = None,
        use_cookie: bool | None = None,
        prctl: Prctl | None = None,
    ) -> None:
        env = os.environ if environ is None else environ
        linux = proc_root is not None and os.path.exists(f"{proc_root}/self/stat")
        self._proc_root = proc_root if linux else None
        self._want_cgroup = linux and (
            _enabled(env, "PRISMQ_CGROUP") if use_cgroup is None else use_cgroup
        )
        self._want_subreaper = linux and (
            _enabled(env, "PRISMQ_SUBREAPER", "0") if use_subreaper is None else use_subreaper
        )
        self._use_cookie = _enabled(env, "PRISMQ_COOKIE") if use_cookie is None else use_cookie
        self._prctl_override = prctl
        self._start_afresh()
        start_afresh_after_fork(self)

    def _forked(self) -> None:
        self._start_afresh()

    def _start_afresh(self) -> None:
        """Nothing chosen yet, no run: a new host, or a forked child of one.

        A forked child (gunicorn's ``--preload``, a ``fork`` multiprocessing pool) must not go
        on with the parent's state: with the parent's cookie variable and run numbers, its runs
        carried the very cookies of the parent's, and a stop in either process stopped the
        other's children; with the parent's sub-group names, they shared sub-groups; the
        subreaper setting is not inherited by ``fork``, the parent's children are not ours, and
        the parent's lock may have been held at the fork."""
        self.cookies = Cookies(proc_root=self._proc_root)
        self.cgroups: Cgroups | None = None
        self.prctl: Prctl | None = None
        self.subreaper = False
        self.reaper: Reaper | None = None
        self._notes: list[str] = []
        self._active = False
        # Re-entrant: release() also runs from garbage collection, possibly in a thread that
        # is inside another method of this object.
        self._lock = threading.RLock()
        # Run sub-groups by path: True once the child is in (only then may an empty one go).
        self._run_cgroups: dict[str, bool] = {}
        # Cookie values issued whose child is not registered yet, and the child of each run
        # that is (while it runs).
        self._pending: set[str] = set()
        self._leader_of: dict[str, int] = {}
        self._cookie_of: dict[int, str] = {}
        # Cookie values of spawns undone before their child was registered (newest last): that
        # child, if there is one, is its spawner's to reap (see _orphan_by_cookie).
        self._unknown_leaders: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._runs = 0
        self._last_cgroup_sweep = 0.0

    # -- choosing, once ----------------------------------------------------------------------
    def activate(self) -> None:
        """Probe and switch on what this host allows (first call only)."""
        with self._lock:
            if self._active:
                return
            self._active = True
            if self._proc_root is not None:
                self.prctl = self._prctl_override or load_prctl()
            if self._want_cgroup and self._proc_root is not None:
                self.cgroups = Cgroups.probe(self._proc_root, f"prismq-probe-{os.getpid()}")
                if self.cgroups is None:
                    self._notes.append("no writable cgroup v2 directory for sub-groups")
                else:
                    if not self.cgroups.can_kill:
                        self._notes.append(
                            "no cgroup.kill (Linux < 5.14): members killed one by one"
                        )
                    self._remove_stale_cgroups()
                    atexit.register(self._sweep_cgroups, due_only=False, all_runs=True)
            if self._want_subreaper and self.prctl is not None:
                self.subreaper = become_subreaper(self.prctl)
                if self.subreaper:
                    self.reaper = Reaper(
                        self._orphan_by_cookie, self._proc_root or "/proc", self._forget
                    )
                else:
                    self._notes.append("the kernel refused PR_SET_CHILD_SUBREAPER")
        logger.info("prismq_subprocess %s", str(self.report()).replace("\n", ";"))

    def cookie_variable(self) -> str | None:
        """The cookie variable this process's children carry (None with cookies off)."""
        return self.cookies.name if self._use_cookie else None

    def report(self) -> ContainmentReport:
        """Which means are in use (see :class:`ContainmentReport`)."""
        mechanisms = []
        if self.cgroups is not None:
            mechanisms.append("cgroup")
        if self.subreaper:
            mechanisms.append("subreaper")
        if self._use_cookie:
            mechanisms.append("cookie")
        mechanisms.append("process-group")
        notes = list(self._notes)
        if self._proc_root is None:
            notes.append("no /proc: no cgroup, no subreaper; cookies are read through psutil")
        if self._use_cookie:
            notes.append(
                "a process that replaces its environment before exec loses the cookie"
                + ("" if self.cgroups else " and is then found only through the process tree")
            )
        if self.cgroups is not None:
            notes.append(
                "a child is moved into its sub-group just after exec (before exec with "
                "die_with_host=True); what it forks in between is found by tree and cookie"
            )
        return ContainmentReport(
            platform=sys.platform,
            mechanisms=tuple(mechanisms),
            cgroup_dir=self.cgroups.base if self.cgroups else None,
            cookie_variable=self.cookies.name if self._use_cookie else None,
            die_with_host=(
                "opt-in: SubprocessWrapper(die_with_host=True) sets PR_SET_PDEATHSIG (SIGKILL) "
                "for the direct child, tied to the spawning thread"
                if self.prctl is not None
                else "none"
            ),
            notes=tuple(notes),
        )

    # -- spawning ----------------------------------------------------------------------------
    def prepare(
        self, kwargs: Mapping[str, Any], die_with_host: bool, *, ahead: bool = False
    ) -> tuple[dict[str, Any], Containment]:
        """``Popen`` keyword arguments that contain the child, and its containment record.

        ``ahead``: the caller is the event loop's thread and adopts with ``enter=False``: the
        child's sub-group is made by :meth:`enter`, with the move, on another thread.
        """
        self.activate()
        out = dict(kwargs)
        cookie = None
        if self._use_cookie:
            cookie = self.cookies.issue()
            with self._lock:
                self._pending.add(cookie)
            out["env"] = self.cookies.child_env(out.get("env"), cookie)
        cgroup = None
        if self.cgroups is not None:
            if ahead and not die_with_host:
                # The event loop's thread: mkdir takes the kernel's cgroup mutex (milliseconds
                # while other moves hold it), so enter() makes the sub-group with the move, on
                # the worker thread, and a child that is gone by then never gets one (until
                # then a stop finds no such sub-group, as it finds an empty one). Made ahead
                # instead, every spawn paid a mkdir (measured 1.4-1.6x against 1.3x raw
                # asyncio per /bin/true run).
                cgroup = os.path.join(self.cgroups.base, self._name())
            else:
                # Made before the spawn: the child is moved in as soon as it runs, before it
                # can fork much (and with die_with_host it moves itself in before exec).
                cgroup = self.cgroups.create(self._name())
            if cgroup is not None:
                with self._lock:
                    self._run_cgroups[cgroup] = False
        entered = False
        if die_with_host and (self.prctl is not None or cgroup is not None):
            procs = os.path.join(cgroup, "cgroup.procs") if cgroup else None
            out["preexec_fn"] = pre_exec(self.prctl, procs, out.get("preexec_fn"))
            entered = cgroup is not None
        return out, Containment(cookie=cookie, cgroup=cgroup, entered=entered)

    def adopt(self, pid: int, containment: Containment, *, enter: bool = True) -> bool:
        """The child ``pid`` started: move it into its sub-group (unless it did so itself).

        ``enter=False``: everything but the move, which is left to the caller (it blocks for 5
        to 30 ms: see :meth:`enter`); returns whether a move is left to do.
        """
        if containment.cookie is not None:
            with self._lock:
                self._pending.discard(containment.cookie)
                # Until the run is released (its stop ended, or its process object is gone).
                self._leader_of[containment.cookie] = pid
                self._cookie_of[pid] = containment.cookie
        left = False
        if containment.cgroup is not None and self.cgroups is not None:
            if containment.entered or enter:
                self.enter(pid, containment)
            else:
                left = True  # (until then the sub-group is empty, and must not be removed)
        if self.reaper is not None:
            self.reaper.spawned(pid)
        self._sweep_cgroups(due_only=True)
        return left

    def enter(self, pid: int, containment: Containment) -> None:
        """Create the child's sub-group and move the child ``pid`` into it (unless it moved
        itself before exec); the sub-group may go once empty from then on.

        Blocks in the kernel for 5 to 30 ms: moving a process between cgroups waits for an RCU
        grace period (``cgroup_threadgroup_rwsem``), unless the hierarchy is mounted with
        ``favordynmods``.
        """
        path = containment.cgroup
        if path is None or self.cgroups is None:
            return
        if not containment.entered:
            made = self.cgroups.make(path)
            with self._lock:
                wanted = path in self._run_cgroups  # (not released meanwhile)
                if not made:
                    self._run_cgroups.pop(path, None)
            if not made:
                return
            if not wanted:  # the run ended before its move: nothing will remove this one
                self.cgroups.remove(path)
                return
            self.cgroups.enter(path, pid)
        with self._lock:
            if path in self._run_cgroups:  # (not released meanwhile)
                self._run_cgroups[path] = True

    def release(self, containment: Containment, *, leader_known: bool = True) -> None:
        """The run is over (its spawn failed, or its stop finished): remove its sub-group if
        empty. ``leader_known=False``: its spawn was undone before its child was registered."""
        if containment.cookie is not None:
            with self._lock:
                self._pending.discard(containment.cookie)
                if not leader_known:
                    self._unknown_leaders[containment.cookie] = None
                    if len(self._unknown_leaders) > _UNKNOWN_LEADERS_KEPT:
                        self._unknown_leaders.popitem(last=False)
                pid = self._leader_of.pop(containment.cookie, None)
                if pid is not None:
                    self._cookie_of.pop(pid, None)
        path = containment.cgroup
        if path is None or self.cgroups is None:
            return
        with self._lock:
            if path not in self._run_cgroups:  # removed already (e.g. by its stop)
                return
        if self.cgroups.remove(path):
            with self._lock:
                self._run_cgroups.pop(path, None)

    def spawned_children(self) -> dict[int, str]:
        """The children this process spawned whose runs are not let go of yet, by pid, with
        their runs' cookies. (A child reaped meanwhile leaves a pid that may name anybody.)"""
        with self._lock:
            return dict(self._cookie_of)

    def _remove_stale_cgroups(self) -> None:
        # Sub-groups of hosts that died before removing them (killed, or their last children
        # outlived them). The name carries the owner's pid; a live owner's are left alone, an
        # empty one of a dead owner goes (a populated one refuses).
        assert self.cgroups is not None
        with contextlib.suppress(OSError):
            for name in os.listdir(self.cgroups.base):
                owner = _owner_pid(name)
                if owner is not None and owner != os.getpid() and not _pid_exists(owner):
                    self.cgroups.remove(os.path.join(self.cgroups.base, name))

    def _name(self) -> str:
        return f"prismq-{self.cookies.token.lower()}-{self._next()}"

    def _next(self) -> int:
        with self._lock:
            self._runs += 1
            return self._runs

    def _orphan_by_cookie(self, entry: ProcessEntry) -> bool:
        """``entry`` (our child, not one we spawned) carries the cookie of a run of ours whose
        own child is registered and is another process: it was adopted from that run's tree."""
        value = self.cookies.read(entry.pid)
        if value is None:
            return False
        with self._lock:
            # A run whose child is not registered yet: this may be that very child.
            if value in self._pending or self._leader_of.get(value) == entry.pid:
                return False
            # A spawn undone before its child was registered: one that may be that child is
            # left to its spawner.
            undone = value in self._unknown_leaders
        return not (undone and self.reaper is not None and self.reaper.may_be_spawned(entry))

    def _forget(self, pids: set[int]) -> None:
        # Children reaped by their owners: their pids may name someone else from now on.
        with self._lock:
            for pid in pids:
                value = self._cookie_of.pop(pid, None)
                if value is not None:
                    self._leader_of.pop(value, None)

    def after_stop(
        self, seen: Iterable[tuple[int, float]], undone: Iterable[tuple[int, float]] = ()
    ) -> None:
        """A stop found these processes (pid, start) below its children (``undone``: through
        the cookie or sub-group of a spawn undone before its child was registered): if they come
        to us as orphans, they are ours to reap. Reap what has already come, drop empty
        sub-groups."""
        if self.reaper is not None:
            self.reaper.note(seen)
            self.reaper.note_undone(undone)
            self.reaper.sweep()
        self._sweep_cgroups(due_only=False)

    def _sweep_cgroups(self, *, due_only: bool, all_runs: bool = False) -> None:
        # Runs that ended without a stop leave their (empty) sub-group behind: remove those now
        # and then, and at exit. A populated one refuses (EBUSY), which is the test.
        if self.cgroups is None:
            return
        with self._lock:
            now = time.monotonic()
            if due_only and now - self._last_cgroup_sweep < _CGROUP_SWEEP_EVERY:
                return
            self._last_cgroup_sweep = now
            ready = [p for p, adopted in self._run_cgroups.items() if adopted or all_runs]
        for path in ready:
            with contextlib.suppress(OSError):
                if self.cgroups.remove(path):
                    with self._lock:
                        self._run_cgroups.pop(path, None)


def _new_host_lock() -> None:
    global _HOST_LOCK
    _HOST_LOCK = threading.Lock()  # (it may have been held at the fork)


def _owner_pid(name: str) -> int | None:
    # "prismq-<pid in hex><6 hex digits>-<n>"
    parts = name.split("-")
    if len(parts) != 3 or parts[0] != "prismq" or len(parts[1]) <= 6:
        return None
    try:
        return int(parts[1][:-6], 16)
    except ValueError:
        return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_HOST: PosixHost | None = None
_HOST_LOCK = threading.Lock()
after_fork_in_child(_new_host_lock)


def posix_host() -> PosixHost:
    """The containment of this process (one per process)."""
    global _HOST
    with _HOST_LOCK:
        if _HOST is None:
            _HOST = PosixHost()
        return _HOST
