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
import time
from collections.abc import Callable, Mapping
from typing import NamedTuple

import psutil

from ._procfs import read_small_file

__all__ = ["COOKIE_PREFIX", "CookieRead", "Cookies"]

#: Every cookie variable starts with this.
COOKIE_PREFIX = "PRISMQ_RUN_"
_ENVIRON_LIMIT = 1 << 20
# Flags of a task (/proc/<pid>/stat, field 9): it is exiting; it is a kernel thread.
_PF_EXITING = 0x4
_PF_KTHREAD = 0x00200000
# A process whose environment's bounds stay equal this long has an empty environment, not one
# an exec is laying out (microseconds, unless it lost its CPU right then).
_LAYOUT_SETTLE = 0.1
# The same for a process that is runnable (waiting for a CPU) or in an uninterruptible wait: it
# may be laying out its environment still, after losing its CPU for longer than _LAYOUT_SETTLE
# on a loaded machine (seen in CI); only this long says it is a busy one with an empty
# environment.
_LAYOUT_SETTLE_RUNNABLE = 2.0
# Processes remembered with equal bounds (the oldest is forgotten first: it is waited for again).
_EQUAL_KEPT = 256


class CookieRead(NamedTuple):
    """What one read of a process's environment showed."""

    #: The cookie value; None when absent or unreadable.
    value: str | None
    #: The environment read as nothing: gone, another user's, a zombie, exiting, inside an
    #: exec, or started with an empty environment.
    empty: bool
    #: It read as nothing only for the moment: the process is alive inside an exec (see
    #: :meth:`Cookies.look`), and a read a moment later shows its environment.
    settling: bool


def _raw_environ() -> dict[bytes, bytes] | None:
    """A copy of this process's environment as bytes (POSIX), or None (Windows keeps ``str``)."""
    raw = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(raw, dict):
        return None
    return dict(raw)


class Cookies:
    """Issues run numbers under one variable name of this host process, and reads them back."""

    def __init__(
        self,
        token: str | None = None,
        proc_root: str | None = None,
        read_file: Callable[[str, int | None], bytes | None] = read_small_file,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        #: Unique to this host process (and its part of the variable's name).
        self.token = token or f"{os.getpid():X}{secrets.token_hex(3).upper()}"
        self.name = COOKIE_PREFIX + self.token
        self._needle = (self.name + "=").encode()
        self._proc_root = proc_root
        #: Reads a file of ``proc_root`` (tests inject one that shows a process mid-exec).
        self._read_file = read_file
        self._clock = clock
        #: pid -> (its start time, when its environment's bounds were first seen equal, whether
        #: they stayed so for _LAYOUT_SETTLE: an empty environment).
        self._equal: dict[int, tuple[bytes, float, bool]] = {}
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
            return not self._read_file(f"{self._proc_root}/{pid}/environ", _ENVIRON_LIMIT)
        try:
            return not psutil.Process(pid).environ()
        except (psutil.Error, OSError):
            return True

    def read(self, pid: int) -> str | None:
        """The cookie value in ``pid``'s environment; None when absent or unreadable (another
        user's process, a zombie, gone)."""
        if self._proc_root is not None:
            raw = self._read_file(f"{self._proc_root}/{pid}/environ", _ENVIRON_LIMIT)
            return None if raw is None else self.parse(raw)
        try:
            return psutil.Process(pid).environ().get(self.name)
        except (psutil.Error, OSError):
            return None

    def look(self, pid: int) -> CookieRead:
        """Read ``pid``'s cookie, telling a process caught inside an exec (whose environment
        reads as nothing for a moment) from one that has none to show.

        An exec switches the process to its new memory some time before it lays out the new
        stack, where the environment lives: in between (microseconds, or as long as the process
        waits for a CPU on a loaded machine), ``/proc/<pid>/environ`` reads as nothing, and so
        does a read that began before the switch. Such a process is ``settling``: alive, not
        exiting, not a kernel thread, and its ``stat`` shows the environment's bounds not set
        yet, not empty (set meanwhile), or equal (being laid out). A process started with an
        empty environment shows equal bounds too: it is waited for once, for
        ``_LAYOUT_SETTLE`` (``_LAYOUT_SETTLE_RUNNABLE`` while it is runnable or in an
        uninterruptible wait: one inside its exec may be waiting for a CPU), and then known (by
        pid and start time) and not waited for again.
        """
        if self._proc_root is None:
            try:
                environ = psutil.Process(pid).environ()
            except (psutil.Error, OSError):
                return CookieRead(None, True, False)
            return CookieRead(environ.get(self.name), not environ, False)
        raw = self._read_file(f"{self._proc_root}/{pid}/environ", _ENVIRON_LIMIT)
        if raw:
            if self._equal:
                self._equal.pop(pid, None)  # (its bounds were an exec's layout)
            return CookieRead(self.parse(raw), False, False)
        # (None: it could not be opened: gone, or not ours to read.)
        return CookieRead(None, True, raw is not None and self._inside_exec(pid))

    def _inside_exec(self, pid: int) -> bool:
        stat = self._read_file(f"{self._proc_root}/{pid}/stat", None)
        if not stat:
            return False
        fields = stat[stat.rfind(b")") + 2 :].split()
        try:
            state, flags = fields[0], int(fields[6])
            env_start, env_end = int(fields[47]), int(fields[48])  # fields 50 and 51
        except (IndexError, ValueError):
            return False  # (Linux before 3.5 shows no bounds: nothing is waited for)
        if state in (b"Z", b"X", b"x") or flags & (_PF_EXITING | _PF_KTHREAD):
            return False
        # (Bounds read as 0 also when the stat hides them: another user's process, which the
        # next read of its environment, refused, settles.)
        if env_end == 0 or env_end > env_start:
            return True
        if env_end != env_start:
            return False
        # Equal bounds: an empty environment, or an exec laying the new one out (the kernel sets
        # both bounds to its start, then moves the end past each variable). Wait a moment the
        # first time; bounds that stay equal that long are an empty environment, remembered so
        # that later looks do not wait for it again.
        start, now = fields[19], self._clock()
        with self._lock:
            seen = self._equal.get(pid)
            if seen is None or seen[0] != start:
                if len(self._equal) >= _EQUAL_KEPT:
                    del self._equal[next(iter(self._equal))]
                self._equal[pid] = (start, now, False)
                return True
            if seen[2]:
                return False
            settle = _LAYOUT_SETTLE_RUNNABLE if state in (b"R", b"D") else _LAYOUT_SETTLE
            if now - seen[1] >= settle:
                self._equal[pid] = (start, seen[1], True)
                return False
            return True
