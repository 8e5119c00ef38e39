"""A per-run cookie in the child's environment, inherited by every descendant.

Jenkins' ProcessTreeKiller finds a build's processes this way: whatever became of the parent
chain (a double-forked daemon is re-parented to init, or to us), the environment a process was
started with still carries the variable. The variable's name is unique to this host process
(``PRISMQ_RUN_<token>``) and its value numbers the run, so nested hosts (a child that itself runs
children through prismq_subprocess) keep both their cookies.

A process that replaces its environment before ``exec`` (``env -i``, ``clearenv()``) drops the
cookie and can only be found by the other means.
"""

from __future__ import annotations

import itertools
import os
import secrets
import threading
from collections.abc import Mapping

import psutil

from ._procfs import read_small_file

__all__ = ["COOKIE_PREFIX", "Cookies"]

#: Every cookie variable starts with this.
COOKIE_PREFIX = "PRISMQ_RUN_"
_ENVIRON_LIMIT = 1 << 20


def _raw_environ() -> dict[bytes, bytes] | None:
    """A copy of this process's environment as bytes (POSIX), or None (Windows keeps ``str``)."""
    raw = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(raw, dict):
        return None
    return dict(raw)


class Cookies:
    """Issues run numbers under one variable name of this host process, and reads them back."""

    def __init__(self, token: str | None = None, proc_root: str | None = None) -> None:
        #: Unique to this host process (and its part of the variable's name).
        self.token = token or f"{os.getpid():X}{secrets.token_hex(3).upper()}"
        self.name = COOKIE_PREFIX + self.token
        self._needle = (self.name + "=").encode()
        self._proc_root = proc_root
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._name_bytes = self.name.encode("ascii")

    def issue(self) -> str:
        """A cookie value no other run of this host process has."""
        with self._lock:
            return str(next(self._numbers))

    def child_env(
        self, env: Mapping[str, str] | None, value: str
    ) -> dict[str, str] | dict[bytes, bytes]:
        """``env`` (default: this process's environment) plus the cookie.

        The default is the raw environment as this process keeps it, bytes on POSIX (a copy in
        C): ``Popen`` encodes a ``str`` mapping variable by variable in Python (``os.fsencode``
        twice per variable, about a tenth of spawning ``/bin/true``), and the bytes reach the
        child exactly as they would by inheritance, undecodable ones included.
        """
        if env is None:
            raw = _raw_environ()
            if raw is not None:
                raw[self._name_bytes] = value.encode("ascii")
                return raw
            out = dict(os.environ)
        else:
            out = dict(env)
        out[self.name] = value
        return out

    def parse(self, environ: bytes) -> str | None:
        """The cookie value in a raw ``NUL``-separated environment block, or None."""
        if environ.startswith(self._needle):
            start = len(self._needle)
        else:
            at = environ.find(b"\0" + self._needle)
            if at < 0:
                return None
            start = at + 1 + len(self._needle)
        end = environ.find(b"\0", start)
        return environ[start : end if end >= 0 else len(environ)].decode("ascii", "replace")

    def unreadable(self, pid: int) -> bool:
        """Whether ``pid``'s environment reads as nothing now: gone, another user's, a zombie,
        exiting (its memory already released), or started with an empty environment."""
        if self._proc_root is not None:
            return not read_small_file(f"{self._proc_root}/{pid}/environ", _ENVIRON_LIMIT)
        try:
            return not psutil.Process(pid).environ()
        except (psutil.Error, OSError):
            return True

    def read(self, pid: int) -> str | None:
        """The cookie value in ``pid``'s environment; None when absent or unreadable (another
        user's process, a zombie, gone)."""
        if self._proc_root is not None:
            raw = read_small_file(f"{self._proc_root}/{pid}/environ", _ENVIRON_LIMIT)
            return None if raw is None else self.parse(raw)
        try:
            return psutil.Process(pid).environ().get(self.name)
        except (psutil.Error, OSError):
            return None
