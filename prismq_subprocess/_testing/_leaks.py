"""Finding what a test left behind: child processes, threads and file descriptors.

A :class:`LeakCheck` takes a baseline before the test and compares after it, giving the leftovers
a moment to go (threads finishing, children being reaped, descriptors closing) before it reports.
Processes are found three ways: as descendants of this process; by an environment cookie set
for the duration of the check, which every child inherits (unless given an explicit ``env=``
without it); and by the containment cookie prismq_subprocess puts in the environment of every
child it starts (explicit ``env=`` included), for the runs started during the check. So a
grandchild that escaped into its own session is found even once re-parented.
"""

from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import psutil

from .._platform import CGROUP_ENTER_THREAD, IS_WINDOWS, PosixOps, platform_ops
from .._platform._start_time import same_start

__all__ = ["COOKIE_VAR", "DEFAULT_IGNORED_THREADS", "LeakCheck", "LeakReport"]

#: The environment variable carrying the check's cookie to every child started during the test.
COOKIE_VAR = "PRISMQ_PYTEST_COOKIE"

#: Thread-name prefixes that belong to worker pools, not to the test: asyncio's default
#: executor, anyio's worker threads and this library's cgroup mover (all outlive a task by
#: design; the last ends 0.25 s after its last job).
DEFAULT_IGNORED_THREADS = ("asyncio_", "AnyIO worker thread", "Trio thread ", CGROUP_ENTER_THREAD)

_POLL = 0.05
# Linux can list this process's descriptors with what each one is; elsewhere we count them.
_FD_DIR = "/proc/self/fd"


@dataclass
class LeakReport:
    """What was still there after the test: one description per leaked item."""

    processes: list[str] = field(default_factory=list)
    threads: list[str] = field(default_factory=list)
    fds: list[str] = field(default_factory=list)
    waited: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.processes or self.threads or self.fds)

    def __str__(self) -> str:
        if not self:
            return "no leaks"
        parts = [f"the test leaked (still there {self.waited:.1f} s after its teardown):"]
        for title, items in (
            ("child processes (killed now)", self.processes),
            ("threads", self.threads),
            ("file descriptors", self.fds),
        ):
            if items:
                parts.append(f"  {title}:")
                parts += [f"    - {item}" for item in items]
        return "\n".join(parts)


def _process_key(proc: psutil.Process) -> tuple[int, float] | None:
    try:
        return proc.pid, proc.create_time()
    except psutil.Error:
        return None


def _among(keys: set[tuple[int, float]], pid: int, start: float) -> bool:
    """Whether the process (``pid``, ``start``) is one of ``keys``: its start time read again may
    differ by whole seconds (the boot time psutil adds moves when NTP slews the clock), which
    made a fixture's process look new, and killed as a leak."""
    return (pid, start) in keys or any(p == pid and same_start(s, start) for p, s in keys)


def _describe_process(proc: psutil.Process) -> str:
    try:
        with proc.oneshot():
            try:
                command = " ".join(proc.cmdline()) or proc.name()
            except psutil.ZombieProcess:  # (an exited child nobody reaped has no command line)
                command = proc.name()
            status = proc.status()
            parent = proc.ppid()
    except psutil.Error as exc:
        return f"pid {proc.pid} ({type(exc).__name__})"
    if len(command) > 200:
        command = command[:197] + "..."
    return f"pid {proc.pid} [{status}, parent {parent}]: {command}"


def _describe_thread(thread: threading.Thread) -> str:
    target = getattr(thread, "_target", None)
    where = getattr(target, "__qualname__", None) or type(thread).__qualname__
    kind = "daemon" if thread.daemon else "non-daemon"
    return f"{thread.name!r} ({kind}, runs {where})"


def _open_fds() -> dict[int, str]:
    """This process's descriptors and what each names (Linux), or {} where that is unknown."""
    found: dict[int, str] = {}
    try:
        names = os.listdir(_FD_DIR)
    except OSError:
        return found
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            # The descriptor listdir itself used is closed by now: readlink fails, skip it.
            found[int(name)] = os.readlink(os.path.join(_FD_DIR, name))
    return found


def _run_cookie_baseline() -> tuple[str, int] | None:
    """This host's containment cookie variable and a run number below every run started from
    now on, or None where children get no cookie (Windows, ``PRISMQ_COOKIE=0``)."""
    ops = platform_ops()
    if not isinstance(ops, PosixOps) or ops.host is None:
        return None
    # report(), not containment_report(): the latter activates the host (cgroup probe...) and
    # a leak check must not change what it checks.
    variable = ops.host.report().cookie_variable
    if variable is None:
        return None
    return variable, _run_number_now()


def _run_number_now() -> int:
    """A run number above every run started so far and below every later one (run numbers
    only grow; this one is issued and never used)."""
    ops = platform_ops()
    assert isinstance(ops, PosixOps) and ops.host is not None  # (a baseline was made)
    return int(ops.host.cookies.issue())


def _carries_a_new_run_cookie(
    environ: dict[str, str], baseline: tuple[str, int], exempt: list[tuple[int, int]]
) -> bool:
    variable, below = baseline
    value = environ.get(variable)
    if value is None or not value.isdigit():
        return False
    number = int(value)
    # The runs of a wider fixture set up during the test (see exempt()) are not the test's.
    return number > below and not any(first < number < last for first, last in exempt)


def _fd_count() -> int | None:
    me = psutil.Process()
    num_fds = getattr(me, "num_fds", None)
    return num_fds() if num_fds is not None else None


class LeakCheck:
    """A baseline of this process's children, threads and descriptors, compared after a test.

    Use :meth:`start` before the test (before its fixtures) and :meth:`finish` after its
    teardown. ``timeout`` bounds how long leftovers get to go away; a clean test costs one look.
    Threads whose names start with ``ignore_threads`` (added to
    :data:`DEFAULT_IGNORED_THREADS`) are not reported. Descriptors are listed on Linux, counted
    on other POSIX systems, and not checked on Windows (handle counts move on their own there).
    """

    def __init__(
        self,
        *,
        processes: bool = True,
        threads: bool = True,
        fds: bool = True,
        ignore_threads: Iterable[str] = (),
        timeout: float = 5.0,
    ) -> None:
        self.processes = processes
        self.threads = threads
        self.fds = fds and not IS_WINDOWS
        self.ignore_threads = (*DEFAULT_IGNORED_THREADS, *ignore_threads)
        self.timeout = timeout
        self.cookie = uuid.uuid4().hex
        #: True once :meth:`start` has taken the baseline.
        self.started = False
        self._saved_cookie: str | None = None
        self._run_cookie: tuple[str, int] | None = None
        #: The run numbers issued inside exempt() blocks (first, last), both exclusive.
        self._exempt_runs: list[tuple[int, int]] = []
        self._started = 0.0
        self._children: set[tuple[int, float]] = set()
        self._thread_set: set[threading.Thread] = set()
        self._fd_map: dict[int, str] = {}
        self._fd_total: int | None = None

    def start(self) -> None:
        """Take the baseline and set the environment cookie."""
        self.started = True
        self._started = time.time()
        self._children = self._descendant_keys()
        self._thread_set = set(threading.enumerate())
        self._fd_map = _open_fds()
        self._fd_total = _fd_count()
        if self.processes:
            self._saved_cookie = os.environ.get(COOKIE_VAR)
            os.environ[COOKIE_VAR] = self.cookie
            self._run_cookie = _run_cookie_baseline()

    @contextlib.contextmanager
    def exempt(self) -> Iterator[None]:
        """Leave out what appears while the block runs: the resources of a fixture of wider
        scope set up during the test (pytest-asyncio's module- or session-scoped event loop, a
        session fixture requested through ``getfixturevalue``), which outlive the test by
        design. Its children do not get the check's cookie. A no-op before :meth:`start`."""
        if not self.started:
            yield
            return
        threads = set(threading.enumerate())
        fds = _open_fds()
        total = _fd_count()
        children = self._descendant_keys()
        restore = self.processes and os.environ.get(COOKIE_VAR) == self.cookie
        first_run = _run_number_now() if self._run_cookie is not None else None
        if restore:
            if self._saved_cookie is None:
                os.environ.pop(COOKIE_VAR, None)
            else:
                os.environ[COOKIE_VAR] = self._saved_cookie
        try:
            yield
        finally:
            if restore:
                os.environ[COOKIE_VAR] = self.cookie
            if first_run is not None:
                self._exempt_runs.append((first_run, _run_number_now()))
            self._thread_set |= set(threading.enumerate()) - threads
            self._fd_map.update((fd, target) for fd, target in _open_fds().items() if fd not in fds)
            after = _fd_count()
            if self._fd_total is not None and total is not None and after is not None:
                self._fd_total += max(0, after - total)
            self._children |= self._descendant_keys() - children

    @staticmethod
    def _descendant_keys() -> set[tuple[int, float]]:
        children = psutil.Process().children(recursive=True)
        return {key for key in map(_process_key, children) if key is not None}

    def finish(self) -> LeakReport:
        """Wait up to ``timeout`` for leftovers to go, restore the environment, kill leaked
        processes, and return what leaked (empty: nothing)."""
        try:
            deadline = time.monotonic() + self.timeout
            began = time.monotonic()
            collected = False
            while True:
                report = self._look()
                if not report or time.monotonic() >= deadline:
                    break
                if not collected:
                    # Objects in reference cycles may hold descriptors until collected.
                    gc.collect()
                    collected = True
                time.sleep(_POLL)
            report.waited = time.monotonic() - began
            return report
        finally:
            if self.processes:
                if self._saved_cookie is None:
                    os.environ.pop(COOKIE_VAR, None)
                else:
                    os.environ[COOKIE_VAR] = self._saved_cookie
                self._kill(self._leaked_processes())

    def _look(self) -> LeakReport:
        report = LeakReport()
        if self.processes:
            report.processes = [_describe_process(p) for p in self._leaked_processes()]
        if self.threads:
            report.threads = [_describe_thread(t) for t in self._leaked_threads()]
        if self.fds:
            report.fds = self._leaked_fds()
        return report

    def _leaked_processes(self) -> list[psutil.Process]:
        found: dict[int, psutil.Process] = {}
        for proc in psutil.Process().children(recursive=True):
            key = _process_key(proc)
            if key is not None and not _among(self._children, *key):
                found[proc.pid] = proc  # zombies too: exited, but nobody reaped them
        for proc in psutil.process_iter(["create_time"]):
            if proc.pid in found or proc.info["create_time"] is None:
                continue
            if _among(self._children, proc.pid, proc.info["create_time"]):
                continue  # started by a wider fixture meanwhile (see exempt())
            if proc.info["create_time"] < self._started - 1.0:
                continue
            try:
                environ = proc.environ()
                carries = environ.get(COOKIE_VAR) == self.cookie or (
                    self._run_cookie is not None
                    and _carries_a_new_run_cookie(environ, self._run_cookie, self._exempt_runs)
                )
                if carries and proc.status() != psutil.STATUS_ZOMBIE:
                    found[proc.pid] = proc
            except psutil.Error:
                continue
        return list(found.values())

    def _leaked_threads(self) -> list[threading.Thread]:
        return [
            thread
            for thread in threading.enumerate()
            if thread not in self._thread_set
            and thread.is_alive()
            and not thread.name.startswith(self.ignore_threads)
        ]

    def _leaked_fds(self) -> list[str]:
        now = _open_fds()
        if now or self._fd_map:
            # New descriptor numbers only: pytest's output capture re-points 0-2 (and whatever
            # was open before) between the phases of a test with dup2, which is no leak.
            return [
                f"fd {fd} -> {target}"
                for fd, target in sorted(now.items())
                if fd not in self._fd_map and fd > 2
            ]
        total, before = _fd_count(), self._fd_total
        if total is None or before is None or total <= before:
            return []
        return [f"{total - before} more open than before the test ({before} -> {total})"]

    @staticmethod
    def _kill(procs: list[psutil.Process]) -> None:
        if not procs:
            return
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        # A Popen the test still holds would warn "subprocess N is still running" when it is
        # collected, in whichever later test that happens: reap through it, so it knows.
        pids = {proc.pid for proc in procs}
        for obj in gc.get_objects():
            if isinstance(obj, subprocess.Popen) and obj.pid in pids and obj.returncode is None:
                with contextlib.suppress(Exception):
                    obj.wait(3.0)
        # Reaps the other children among them, so no zombie is left for the next test.
        psutil.wait_procs(procs, timeout=3.0)
