"""Helpers for the lifecycle tests: marked process trees and leak accounting."""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
from helpers import PY

MARK_VAR = "PRISMQ_TEST_MARK"

# A child that starts two grandchildren (one of which escapes into its own session, so only the
# psutil sweep can find it), prints "ready", then sleeps.
TREE_CHILD = (
    "import subprocess, sys, time\n"
    "sleeper = [sys.executable, '-c', 'import time; time.sleep(60)']\n"
    "a = subprocess.Popen(sleeper)\n"
    "b = subprocess.Popen(sleeper, start_new_session=True)\n"
    "print('ready', flush=True)\n"
    "for i in range(600):\n"
    "    print('tick', i, flush=True)\n"
    "    time.sleep(0.1)\n"
)

# Same, but the child ignores SIGTERM: only the SIGKILL after the grace period stops it.
STUBBORN_CHILD = "import signal\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n" + TREE_CHILD

# A module for a host that dies: one grandchild in its own session (beyond the reach of the
# host's group) and one in the module's group, then it sleeps; it prints nothing, so a dead
# host's pipe does not end it.
SILENT_TREE = (
    "import subprocess, sys, time\n"
    "sleeper = [sys.executable, '-c', 'import time; time.sleep(120)']\n"
    "subprocess.Popen(sleeper)\n"
    "subprocess.Popen(sleeper, start_new_session=True)\n"
    "time.sleep(120)\n"
)


def daemonizer(daemon_seconds: float, then: str = "time.sleep(60)\n") -> str:
    """Code for a child that daemonizes a helper the classic way (fork, setsid, fork again, the
    middle process exits; the daemon's stdio goes to /dev/null), then runs ``then``. The daemon
    lives ``daemon_seconds``."""
    return (
        "import os, sys, time\n"
        "middle = os.fork()\n"
        "if middle == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        fd = os.open(os.devnull, os.O_RDWR)\n"
        "        for std in (0, 1, 2):\n"
        "            os.dup2(fd, std)\n"
        f"        time.sleep({daemon_seconds})\n"
        "    os._exit(0)\n"
        "os.waitpid(middle, 0)\n" + then
    )


def marked_env() -> tuple[str, dict[str, str]]:
    """A unique marker and an environment that carries it to the whole tree."""
    mark = uuid.uuid4().hex
    return mark, dict(os.environ, **{MARK_VAR: mark})


def marked(mark: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``mark``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(MARK_VAR) == mark and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):  # psutil can let ESRCH through in a race
            continue
    return found


def wait_for_marked(mark: str, count: int, timeout: float = 10.0) -> list[psutil.Process]:
    """Block until at least ``count`` marked processes run (the tree has started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = marked(mark)
        if len(procs) >= count:
            return procs
        time.sleep(0.02)
    raise AssertionError(f"only {len(marked(mark))} of {count} marked processes started")


def survivors_after(mark: str, seconds: float) -> list[psutil.Process]:
    """Marked processes still alive after ``seconds`` (returns early once there are none)."""
    deadline = time.monotonic() + seconds
    while True:
        alive = marked(mark)
        if not alive or time.monotonic() >= deadline:
            for proc in alive:  # don't leak them into other tests
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            return alive
        time.sleep(0.05)


def zombies() -> list[psutil.Process]:
    """Our children that have exited but were never reaped."""
    out = []
    for child in psutil.Process().children():
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                out.append(child)
        except psutil.Error:
            continue
    return out


def resource_counts() -> tuple[int, int]:
    """(threads, open file descriptors) of this process."""
    me = psutil.Process()
    fds = me.num_fds() if hasattr(me, "num_fds") else me.num_handles()
    return threading.active_count(), fds


def settle(
    baseline: tuple[int, int], slack: tuple[int, int], timeout: float = 5.0
) -> tuple[int, int]:
    """Wait (threads finishing, fds closing) until counts are within ``slack`` of ``baseline``."""
    deadline = time.monotonic() + timeout
    while True:
        now = resource_counts()
        ok = all(n <= b + s for n, b, s in zip(now, baseline, slack, strict=True))
        if ok or time.monotonic() >= deadline:
            return now
        time.sleep(0.05)


__all__ = [
    "MARK_VAR",
    "PY",
    "STUBBORN_CHILD",
    "TREE_CHILD",
    "daemonizer",
    "marked",
    "marked_env",
    "resource_counts",
    "settle",
    "survivors_after",
    "wait_for_marked",
    "zombies",
]


# A child whose helper (in the child's group) keeps daemonizing new processes, each in a session
# of its own and carrying the child's cookie: a tree that is forking while it is stopped.
KEEPS_DAEMONIZING = (
    "import os, sys, time\n"
    "if os.fork() == 0:\n"
    "    for _ in range(2000):\n"
    "        if os.fork() == 0:\n"
    "            os.setsid()\n"
    "            time.sleep(30)\n"
    "            os._exit(0)\n"
    "        time.sleep(0.002)\n"
    "    os._exit(0)\n"
    "time.sleep(0.3)\n"
    "print('ready', flush=True)\n"
    "time.sleep(30)\n"
)


@contextlib.contextmanager
def silent_tree_files(tmp_path: Path) -> Iterator[tuple[Path, Path, str, dict[str, str]]]:
    """``(registry file, SILENT_TREE module, marker, environment carrying it)`` for a host that
    dies; whatever carries the marker is killed on the way out."""
    module = tmp_path / "tree_module.py"
    module.write_text(SILENT_TREE)
    mark, env = marked_env()
    try:
        yield tmp_path / "runs.db", module, mark, env
    finally:
        for proc in marked(mark):
            with contextlib.suppress(psutil.Error):
                proc.kill()
