"""Everything that differs between Windows and POSIX, in one corner.

``_ops.py`` declares the interface (:class:`PlatformOps`), ``_posix.py`` and ``_windows.py``
implement it, ``_table.py`` looks at the process table; this module picks the implementation once
and states the few facts about the host the rest of the package needs (:data:`IS_WINDOWS`,
:data:`PIPES_SELECTABLE`, ...). No other module of the package asks ``sys.platform`` or
``os.name`` (a test enforces it). Every system call of an implementation can be injected, so the
Windows branches are unit-tested on Linux; see ``docs/WINDOWS.md`` for what is verified where.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from typing import Any

from ._child_watcher import prefer_pidfd_watcher
from ._containment import Containment, ContainmentReport
from ._fork import after_fork_in_child, start_afresh_after_fork
from ._ops import Pace, PlatformOps, StopRecord, StopTarget, no_pace
from ._posix import CGROUP_ENTER_THREAD, PosixOps, pidfd_open
from ._windows import (
    CREATE_NEW_PROCESS_GROUP,
    CTRL_BREAK_EVENT,
    WindowsOps,
    is_proactor_loop,
    policy_uses_proactor,
    proactor_loop_class,
    proactor_policy_class,
)

__all__ = [
    "CAN_POLL_PIPES",
    "CGROUP_ENTER_THREAD",
    "CREATE_NEW_PROCESS_GROUP",
    "CTRL_BREAK_EVENT",
    "IS_WINDOWS",
    "KILL_SIGNAL",
    "PIPES_SELECTABLE",
    "PIPE_BUF",
    "Containment",
    "ContainmentReport",
    "Pace",
    "PlatformOps",
    "PosixOps",
    "StopRecord",
    "StopTarget",
    "WindowsOps",
    "after_fork_in_child",
    "is_proactor_loop",
    "is_windows",
    "no_pace",
    "pidfd_open",
    "platform_name",
    "platform_ops",
    "policy_uses_proactor",
    "prefer_pidfd_watcher",
    "proactor_loop_class",
    "proactor_policy_class",
    "start_afresh_after_fork",
]


def platform_name(platform: str | None = None) -> str:
    """``platform``, or this machine's ``sys.platform`` when it is None."""
    return platform or sys.platform


def is_windows(platform: str | None = None) -> bool:
    """True when ``platform`` (default: this machine) is Windows.

    Only ``win32``: Cygwin's Python is POSIX for everything we use (``subprocess`` spawns with
    ``fork``/``exec`` and rejects ``creationflags``; asyncio uses the Unix event loops).
    """
    return platform_name(platform) == "win32"


#: This machine runs Windows.
IS_WINDOWS = is_windows()
#: Pipes can be waited on with ``select``/selectors (POSIX; Windows pipes are not sockets).
PIPES_SELECTABLE = not IS_WINDOWS
#: ``select.poll`` is there to wait on one pipe with a timeout.
CAN_POLL_PIPES = PIPES_SELECTABLE and hasattr(select, "poll")
#: Writes of at most this many bytes to a pipe are atomic (and never block once it is writable).
PIPE_BUF: int = getattr(os, "PIPE_BUF", 512)
#: The signal that ends a process outright: SIGKILL, or SIGTERM (``TerminateProcess``) on Windows.
KILL_SIGNAL: int = int(getattr(signal, "SIGKILL", signal.SIGTERM))

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
            _DEFAULT = platform_ops(platform_name())
        return _DEFAULT
    name = platform_name(platform)
    if is_windows(name):
        return WindowsOps(name=name, **overrides)
    return PosixOps(name=name, **overrides)
