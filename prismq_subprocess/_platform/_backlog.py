"""Blocking jobs handed off by the event loop's thread, run in order on one worker thread.

Moving an ASYNC child into its cgroup blocks for 5 to 30 ms in the kernel; on the loop's thread
that is a stall for every task of the host. A :class:`Backlog` takes such jobs without waiting:
its thread exists only while there are jobs and for a short linger after them (an idle host
holds no thread for it, and a host spawning in a steady stream does not start a thread per job:
``Thread.start()`` costs the loop's thread tens of microseconds and waits for the new thread to
run). Jobs submitted while it works join the queue it is draining.

A child forked from the host (gunicorn's ``--preload``, a ``fork`` multiprocessing pool) starts
with every backlog empty and idle: the parent's thread does not exist there, its lock may have
been held at the fork, and its queued jobs concern the parent's children.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator

from ._fork import start_afresh_after_fork

__all__ = ["Backlog"]

logger = logging.getLogger(__name__)

#: Seconds the worker thread waits for another job before it ends.
DEFAULT_LINGER = 0.25


class Backlog:
    """Runs the callables given to :meth:`submit`, in order, on a worker thread named ``name``;
    the thread ends once it has been idle for ``linger`` seconds."""

    def __init__(self, name: str, linger: float = DEFAULT_LINGER) -> None:
        self._name = name
        self._linger = linger
        self._start_empty()
        start_afresh_after_fork(self)

    def _start_empty(self) -> None:
        self._lock = threading.Lock()
        self._more = threading.Condition(self._lock)
        self._jobs: collections.deque[Callable[[], object]] = collections.deque()
        self._busy = False  # a worker thread exists (running or lingering)
        self._idle = threading.Event()
        self._idle.set()
        # Jobs submitted by a thread from inside this backlog's own locked sections: the cyclic
        # GC runs weakref finalizers (containment releases submit here) wherever an allocation
        # happens, the lock is not reentrant, and queue.SimpleQueue's put is (it is made for
        # finalizers). The lock's holder moves them to the queue proper before it lets go.
        self._inside = threading.local()
        self._reentered: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()

    def _forked(self) -> None:
        """In a forked child: no thread, no job; each of the parent's queued jobs that has a
        ``drop()`` method is told it will never run (to release what it holds)."""
        dropped = list(self._jobs)
        while True:
            try:
                dropped.append(self._reentered.get_nowait())
            except queue.Empty:
                break
        self._start_empty()
        for job in dropped:
            drop = getattr(job, "drop", None)
            if drop is not None:
                with contextlib.suppress(Exception):
                    drop()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock:
            self._inside.held = True
            try:
                yield
            finally:
                self._inside.held = False

    def _take_reentered(self) -> None:
        """Move jobs submitted from inside a locked section to the queue (lock held)."""
        while True:
            try:
                job = self._reentered.get_nowait()
            except queue.Empty:
                return
            self._jobs.append(job)
            self._idle.clear()

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job``; returns at once. An exception it raises is logged, never raised.
        A job still queued when the process forks never runs in the child (its ``drop()``, if
        it has one, is called there instead).

        Safe to call from a finalizer, even one the GC runs inside this backlog's own code."""
        if getattr(self._inside, "held", False):
            self._reentered.put(job)
            return
        with self._locked():
            self._jobs.append(job)
            self._idle.clear()
            self._take_reentered()
            if self._busy:
                self._more.notify()
                return
            self._busy = True
        # A daemon: a job left when the interpreter exits concerns a child of a host that is
        # going away (and whose clean-up at exit covers it).
        try:
            threading.Thread(target=self._drain, name=self._name, daemon=True).start()
        except RuntimeError:
            # No new thread (Python 3.12+ at interpreter shutdown, where finalizers still
            # submit jobs): run what is queued here and now.
            self._drain(linger=False)

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every job submitted so far has run (True), or ``timeout`` passed."""
        return self._idle.wait(timeout)

    def _drain(self, linger: bool = True) -> None:
        while True:
            with self._locked():
                self._take_reentered()
                if not self._jobs:
                    self._idle.set()
                    if linger:
                        self._more.wait_for(lambda: bool(self._jobs), self._linger)
                    self._take_reentered()  # (one may have come in during set() or the wait)
                    if not self._jobs:
                        # Decided under the lock: a submit after this starts a new thread.
                        self._busy = False
                        return
                job = self._jobs.popleft()
            try:
                job()
            except Exception:
                logger.exception("%s: a job failed", self._name)
