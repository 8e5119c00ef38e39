"""Small helpers shared by the tests (importable because pyproject puts tests/ on sys.path)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator

PY = sys.executable


def py(code: str) -> tuple[str, str, str]:
    """The argument tuple that runs ``code`` with this interpreter."""
    return (PY, "-c", code)


class LoopTurns:
    """How many times a task that only yields has run: the event loop's turns so far."""

    def __init__(self) -> None:
        self.count = 0


@contextlib.asynccontextmanager
async def counting_loop_turns() -> AsyncIterator[LoopTurns]:
    """``async with counting_loop_turns() as turns:``: ``turns.count`` grows by one per turn of
    the running loop while the block runs (to tell work done in one callback from work spread
    over several)."""
    turns = LoopTurns()
    stop = False

    async def count() -> None:
        while not stop:
            turns.count += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count())
    try:
        yield turns
    finally:
        stop = True
        await counter


#: pytest.ini of the host projects the plugin tests run in a pytester sub-session.
HOST_PYTEST_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings =
    error::ResourceWarning
"""

#: Options of those sub-sessions: no cache files, and no hypothesis plugin, which pytester's
#: in-process runs would otherwise re-import (seconds each) since they unload new modules.
HOST_PYTEST_ARGS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")


# Runs argv[1:] and reaps every process re-parented to it until none is left; SIGTERM and SIGINT
# go on to the command. A child subreaper on Linux.
_REAPER = """
import ctypes, os, signal, subprocess, sys
try:
    ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
except (AttributeError, OSError):
    pass  # not Linux: leftovers go to init as usual
command = subprocess.Popen(sys.argv[1:])
def forward(signum, frame):
    try:
        command.send_signal(signum)
    except ProcessLookupError:
        pass
signal.signal(signal.SIGTERM, forward)
signal.signal(signal.SIGINT, forward)
code = 0
while True:
    try:
        pid, status = os.wait()
    except ChildProcessError:
        break
    if pid == command.pid:
        code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def reaped(*argv: str) -> list[str]:
    """A command line that runs ``argv`` under a small reaper process, so that what the command
        leaves behind (multiprocessing's resource tracker, the children of a killed process) is
        re-parented to the reaper, not to the test process, which the library makes a subreaper
        once it started a child. The reaper ends when everything under it has, with the command's
    exit status (128 + N for a signal N)."""
    return [PY, "-c", _REAPER, *argv]


def clean_one_by_one(lines: list[str]) -> list[str]:
    """The documented meaning of an OutputCapture append, line by line: a trailing "\\n" /
    "\\r\\n" removed, then embedded newlines split (each piece before a "\\n" losing a
    trailing "\\r")."""
    out: list[str] = []
    for line in lines:
        if line.endswith("\n"):
            line = line[:-2] if line.endswith("\r\n") else line[:-1]
        *head, last = line.split("\n")
        out.extend(part[:-1] if part.endswith("\r") else part for part in head)
        out.append(last)
    return out
