"""Blocking jobs handed off by the event loop's thread, run in order on one worker thread.

Moving an ASYNC child into its cgroup blocks for 5 to 30 ms in the kernel; on the loop's thread
that is a stall for every task of the host. A :class:`Backlog` takes such jobs without waiting:
its thread exists only while there are jobs (an idle host holds no thread for it), and jobs
submitted while it works join the queue it is draining.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

__all__ = ["Backlog"]

logger = logging.getLogger(__name__)


class Backlog:
    """Runs the callables given to :meth:`submit`, in order, on a worker thread named ``name``."""

    def __init__(self, name: str) -> None:
        self._name = name
        self._lock = threading.Lock()
        self._jobs: collections.deque[Callable[[], object]] = collections.deque()
        self._busy = False
        self._idle = threading.Event()
        self._idle.set()

    def submit(self, job: Callable[[], object]) -> None:
        """Queue ``job``; returns at once. An exception it raises is logged, never raised."""
        with self._lock:
            self._jobs.append(job)
            self._idle.clear()
            if self._busy:
                return
            self._busy = True
        # A daemon: a job left when the interpreter exits concerns a child of a host that is
        # going away (and whose clean-up at exit covers it).
        threading.Thread(target=self._drain, name=self._name, daemon=True).start()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until every job submitted so far has run (True), or ``timeout`` passed."""
        return self._idle.wait(timeout)

    def _drain(self) -> None:
        while True:
            with self._lock:
                if not self._jobs:
                    self._busy = False
                    self._idle.set()
                    return
                job = self._jobs.popleft()
            try:
                job()
            except Exception:
                logger.exception("%s: a job failed", self._name)
