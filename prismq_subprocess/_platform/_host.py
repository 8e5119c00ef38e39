"""Facts about this host that front ends report or act on (the command line, ``doctor``).

Kept apart from the process-stopping operations: nothing here changes how a child is run.
"""

from __future__ import annotations

import os
import platform
import signal
import sys

__all__ = ["HAS_SESSIONS", "SIGPIPE", "host_description", "on_read_only_file_system"]

#: ``setsid()`` and ``killpg()`` exist: children can lead their own session and be signalled as
#: a group (POSIX).
HAS_SESSIONS = hasattr(os, "setsid") and hasattr(os, "killpg")
#: The signal a writer gets when its reader went away (POSIX), or None (Windows).
SIGPIPE: int | None = getattr(signal, "SIGPIPE", None)


def host_description() -> dict[str, str]:
    """The platform name, a readable OS description, the machine type and the Python version."""
    return {
        "sys_platform": sys.platform,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
    }


def on_read_only_file_system(path: str) -> bool:
    """Whether ``path`` lies on a file system mounted read-only (POSIX ``statvfs``; False where
    that cannot be asked, Windows included)."""
    statvfs = getattr(os, "statvfs", None)
    if statvfs is None:
        return False
    try:
        return bool(statvfs(os.path.dirname(os.path.abspath(path))).f_flag & os.ST_RDONLY)
    except OSError:
        return False
