"""Reaping the orphans a child subreaper adopts, and only them.

Once this process is a subreaper (``PR_SET_CHILD_SUBREAPER``), a daemon one of our children
double-forks is re-parented to us instead of init, so the stop can find it among our children.
The price: when such an orphan exits, nobody but us will ever reap it. Reaping the wrong child
would be worse (asyncio's child watcher or ``Popen.wait()`` would then report 255 or 0 for a
child of the host), so a zombie child is reaped only when it is provably not one somebody waits
for:

- it was seen, alive or among the descendants a stop found, and it is not a child we spawned
  (its pid and start time were recorded then): a descendant found by a stop, or a live child
  carrying the cookie of a run whose child is another process (a child whose spawn is still
  being registered carries its own run's cookie and is never taken for an orphan); or
- it is in a session that is neither ours nor its own: a child spawned by anyone in this process
  is either in our session or leads a new one (``setsid`` makes the caller the leader), so only a
  descendant of a child can be in a foreign session it does not lead. Ours are two: the one this
  process was in when it loaded this module (or forked), and the one it leads once it calls
  ``setsid()`` itself (a child it started before that stays in the first). A child started
  before this module was loaded, in a session the host then left, would look foreign.

A zombie that is neither (an orphan that stayed in our own session, from a child the host started
itself without a new session; or one that set up its own session and was never seen alive) is
left alone. So is a child of ours that may be the child of a spawn undone before its pid was
known (asyncio's clean-up of a cancelled creation reaps it), found through that spawn's cookie
or sub-group: in our session or leading its own, it is not taken for an orphan.

Sweeps run when a child we spawned exits (its orphans have just come to us; THREADED
and LOCAL children, and ``run()`` in every mode), after every stop, on spawns (at most once a
second) and, while adopted processes are alive, every half second in a short-lived
``prismq-reaper`` thread. A sweep reads one file (our main thread's ``children``: the kernel
hands orphans to the subreaper's first live thread) and the status of the non-spawned children
it lists.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable

from ._fork import after_fork_in_child
from ._table import ProcessEntry, proc_entry, scan_proc

__all__ = ["Reaper"]

logger = logging.getLogger(__name__)

_PERIOD = 0.5
_SPAWN_SWEEP_EVERY = 1.0
_EXIT_SWEEP_EVERY = 0.05
_EXITED_EARLY_KEPT = 1024
# How long such an early exit explains a spawn report: longer, and the pid may be a new child's.
_EXITED_EARLY_FOR = 5.0


def _session() -> int:
    getsid = getattr(os, "getsid", None)  # (this module is imported on Windows too)
    return getsid(0) if getsid is not None else -1


# The session this process was in when it loaded us (or forked): a process changes session
# only by setsid(), which makes it the leader of a session numbered like itself, so children
# the host started since are in this one or that one (or lead their own), whenever the
# reaper was made.
_SESSION_AT_START = _session()


def _forked() -> None:
    global _SESSION_AT_START
    _SESSION_AT_START = _session()


after_fork_in_child(_forked)


class Reaper:
    """Remembers and reaps the orphans adopted by this (subreaper) process."""

    def __init__(
        self,
        orphan_by_cookie: Callable[[ProcessEntry], bool],
        proc_root: str = "/proc",
        leaders_gone: Callable[[set[int]], None] | None = None,
    ) -> None:
        self._orphan_by_cookie = orphan_by_cookie
        self._leaders_gone = leaders_gone
        self._proc_root = proc_root
        self._me = os.getpid()
        self._my_sids = frozenset((_SESSION_AT_START, _session(), self._me))
        self._children_files = os.path.exists(f"{proc_root}/self/task/{self._me}/children")
        self._lock = threading.Lock()
        self._leaders: set[int] = set()
        # Children whose exit was reported before their spawn was (ASYNC: the loop can hear a
        # fast child's exit while its creation is still connecting the pipes); oldest first,
        # a bounded few: the spawn report comes a loop iteration or two later. pid -> when.
        self._exited_early: dict[int, float] = {}
        #: pid -> start time of processes seen that are not children we spawned.
        self._known: dict[int, float] = {}
        self._thread: threading.Thread | None = None
        self._wanted = False
        self._last_sweep = 0.0
        #: How many orphans this reaper reaped (for tests and the report).
        self.reaped = 0

    def spawned(self, pid: int) -> None:
        """``pid`` is a child we spawned: its owner reaps it, never us."""
        now = time.monotonic()
        with self._lock:
            early = self._exited_early.pop(pid, None)
            # An exit reported just before: exited and reaped already, nothing to keep. An old
            # one (a spawn whose report never came, say a cancelled creation) says nothing
            # about the child that has this pid now: never leave our own child unregistered,
            # where a sweep would take it for an orphan and reap it behind its owner.
            if early is None or now - early >= _EXITED_EARLY_FOR:
                self._leaders.add(pid)
            due = now - self._last_sweep >= _SPAWN_SWEEP_EVERY
        if due:
            self._prune_leaders()
            self.sweep()

    def exited(self, pid: int) -> None:
        """The child ``pid`` we spawned has exited: its orphans have just come to us.

        Sweeps at most every ``_EXIT_SWEEP_EVERY`` seconds (a thousand children exiting at once
        would otherwise make a thousand sweeps on the event loop's thread); what a skipped
        sweep would have found is found by the next one, or by the sweep that ends every stop.
        """
        now = time.monotonic()
        with self._lock:
            if pid in self._leaders:
                self._leaders.discard(pid)
            else:
                self._exited_early.pop(pid, None)  # (re-inserted last: the newest)
                self._exited_early[pid] = now
                if len(self._exited_early) > _EXITED_EARLY_KEPT:
                    del self._exited_early[next(iter(self._exited_early))]
            due = now - self._last_sweep >= _EXIT_SWEEP_EVERY
        if self._leaders_gone is not None:
            self._leaders_gone({pid})
        if due:
            self.sweep()

    def _prune_leaders(self) -> None:
        # Children whose exit nobody reported (a raw asyncio process): forget them once gone.
        with self._lock:
            leaders = list(self._leaders)
        gone = set()
        for pid in leaders:
            entry = proc_entry(pid, self._proc_root)
            if entry is None or entry.ppid != self._me:
                gone.add(pid)
        if gone:
            with self._lock:
                self._leaders -= gone
            if self._leaders_gone is not None:
                self._leaders_gone(gone)

    def note(self, entries: Iterable[tuple[int, float]]) -> None:
        """Processes (pid, start time as in ``/proc``) a stop found below a child: if they are
        re-parented to us, they are ours to reap."""
        with self._lock:
            for pid, start in entries:
                if pid not in self._leaders:
                    self._known[pid] = start

    def note_undone(self, entries: Iterable[tuple[int, float]]) -> None:
        """Like :meth:`note`, for what the undo of a spawn whose child was never registered
        found: a child of ours that may be that very child (in our session or leading its own)
        is its spawner's to reap (asyncio's clean-up waits for it), never ours."""
        kept = []
        for pid, start in entries:
            entry = proc_entry(pid, self._proc_root)
            if entry is None or entry.start != start or not self.may_be_spawned(entry):
                kept.append((pid, start))
        self.note(kept)

    def may_be_spawned(self, entry: ProcessEntry) -> bool:
        """``entry``, a child of ours, may be one somebody in this process spawned (and waits
        for): it is in our session or leads its own. Only a descendant of a child can be in a
        foreign session it does not lead. Ours: the one this process was in at start-up (a
        host may leave it with ``setsid()``, its earlier children staying there) or the one it
        leads from then on."""
        return entry.ppid == self._me and (
            entry.sid in (-1, entry.pid) or entry.sid in self._my_sids
        )

    def _children(self) -> list[int]:
        # The kernel hands an orphan to the first live thread of its subreaper: our main thread
        # (the thread group leader). So one read of its children file (zombies stay listed until
        # reaped) lists every orphan; children spawned from other threads are not orphans.
        # Without that file (CONFIG_PROC_CHILDREN off): one full scan.
        if self._children_files:
            try:
                fd = os.open(f"{self._proc_root}/self/task/{self._me}/children", os.O_RDONLY)
            except OSError:
                return []
            try:
                chunks = []
                while chunk := os.read(fd, 65536):
                    chunks.append(chunk)
            except OSError:
                return []
            finally:
                os.close(fd)
            return [int(p) for p in b"".join(chunks).split()]
        return [e.pid for e in scan_proc(self._proc_root).children(self._me)]

    def _adopted(self, entry: ProcessEntry) -> bool:
        if entry.pid in self._known:
            return self._known[entry.pid] == entry.start
        return not self.may_be_spawned(entry)

    def sweep(self) -> int:
        """Reap the adopted zombies; remember the adopted processes still running; return how
        many of those there are. Keeps the reaper thread going while any is alive."""
        alive = self._sweep()
        if alive:
            with self._lock:
                self._wanted = True
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="prismq-reaper", daemon=True
                    )
                    self._thread.start()
        return alive

    def _sweep(self) -> int:
        with self._lock:
            self._last_sweep = time.monotonic()
            leaders = set(self._leaders)
        children = self._children()
        alive = 0
        for pid in children:
            if pid in leaders:
                continue
            entry = proc_entry(pid, self._proc_root)
            if entry is None or entry.ppid != self._me:
                continue
            with self._lock:
                adopted = self._adopted(entry)
            if entry.state == "Z":
                if adopted:
                    self._reap(pid)
                continue
            if adopted or self._orphan_by_cookie(entry):
                with self._lock:
                    self._known[pid] = entry.start
                alive += 1
        present = set(children)
        with self._lock:
            absent = [(p, start) for p, start in self._known.items() if p not in present]
        # Forget what is gone; keep what a stop saw that is still below a child (it may come
        # to us later).
        gone = []
        for pid, start in absent:
            entry = proc_entry(pid, self._proc_root)
            if entry is None or entry.start != start:
                gone.append(pid)
        with self._lock:
            for pid in gone:
                self._known.pop(pid, None)
        return alive

    def _reap(self, pid: int) -> None:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            self.reaped += 1
            with self._lock:
                self._known.pop(pid, None)
            logger.debug("reaped adopted orphan %d", pid)

    def _run(self) -> None:
        while True:
            time.sleep(_PERIOD)
            alive = self._sweep()
            with self._lock:
                if not alive and not self._wanted:
                    self._thread = None
                    return
                self._wanted = False
