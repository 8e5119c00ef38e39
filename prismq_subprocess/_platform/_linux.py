"""Linux's ``prctl``: becoming a child subreaper, and a parent-death signal for children."""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Callable

__all__ = ["Prctl", "load_prctl", "pre_exec"]

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37

#: ``prctl(option, arg2, arg3, arg4, arg5) -> int`` (-1 and errno on failure).
Prctl = Callable[[int, int, int, int, int], int]


def load_prctl() -> Prctl | None:
    """libc's ``prctl``, or None where there is none (not Linux, no libc)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.prctl
    except (OSError, AttributeError):
        return None
    function.restype = ctypes.c_int
    ulong = ctypes.c_ulong
    function.argtypes = [ctypes.c_int, ulong, ulong, ulong, ulong]
    return function


def become_subreaper(prctl: Prctl) -> bool:
    """Make this process the reaper of its orphaned descendants (they are re-parented to it
    instead of init); True when the kernel agreed."""
    return prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0


def pre_exec(
    prctl: Prctl | None, cgroup_procs: str | None, then: Callable[[], object] | None
) -> Callable[[], None]:
    """A ``preexec_fn`` for ``die_with_host``: ask for SIGKILL when the parent dies, move into
    the run's cgroup (by writing to ``cgroup_procs``) before ``exec``, then call the caller's own
    ``preexec_fn`` (``then``).

    It runs in the child between ``fork`` and ``exec``, so it only makes system calls; the
    values it needs are computed here, in the parent.
    """
    parent = os.getpid()
    sigkill = int(signal.SIGKILL)
    procs = cgroup_procs.encode() if cgroup_procs is not None else None

    def run() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, sigkill, 0, 0, 0)
            if os.getppid() != parent:  # the parent died before the request took effect
                os._exit(1)
        if procs is not None:
            fd = os.open(procs, os.O_WRONLY)
            try:
                os.write(fd, b"0")
            finally:
                os.close(fd)
        if then is not None:
            then()

    return run
