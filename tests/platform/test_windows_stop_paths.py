"""The Windows stop where the CTRL_BREAK cannot work (a host without a console, a child detached
from ours), the per-call opt-out of the child's group, and a process-table scan that never asks
the host's real process table about a stand-in pid. Everything is injected: it runs on any OS."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from platform_fakes import TreeProc, recorder

from prismq_subprocess._core._tree_stop import register_child, stop_process_tree
from prismq_subprocess._platform import (
    CREATE_NEW_PROCESS_GROUP,
    CTRL_BREAK_EVENT,
    StopTarget,
    platform_ops,
)

DETACHED_PROCESS = 0x00000008
CREATE_NEW_CONSOLE = 0x00000010
CREATE_NO_WINDOW = 0x08000000
#: No pid of any real host (Linux caps pids at 2**22, macOS at 99,999): the stand-in tree must
#: be found from the injected process list alone.
NO_SUCH_PID = 2**30


class WindowsChild:
    """A process object that behaves like ``Popen`` on Windows: ``send_signal(CTRL_BREAK_EVENT)``
    is ``os.kill`` (GenerateConsoleCtrlEvent), which fails in a host without a console;
    ``send_signal(SIGTERM)``, ``terminate()`` and ``kill()`` are TerminateProcess (status 1)."""

    def __init__(self, pid: int, *, console: bool) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.console = console
        self.calls: list[object] = []
        self._done = asyncio.Event()

    def _end(self, code: int) -> None:
        if self.returncode is None:
            self.returncode = code
            self._done.set()

    def send_signal(self, sig: int) -> None:
        self.calls.append(sig)
        if sig == CTRL_BREAK_EVENT:
            if not self.console:
                raise OSError(22, "The handle is invalid", None, 6)
            return  # delivered; this child ignores it
        self._end(1)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.calls.append("kill")
        self._end(1)

    async def wait(self) -> int:
        await self._done.wait()
        assert self.returncode is not None
        return self.returncode


class WindowsTreeProc(TreeProc):
    """A descendant as psutil has it on Windows: ``send_signal(SIGTERM)`` is TerminateProcess."""

    def send_signal(self, sig: int) -> None:
        super().send_signal(sig)
        self.killed = True


def _no_console(pid: int, sig: int) -> None:
    raise OSError(22, "The handle is invalid", None, 6)  # GenerateConsoleCtrlEvent, no console


async def test_without_a_console_the_stop_terminates_the_child_and_its_tree_at_once() -> None:
    # pythonw, a service, a GUI host: os.kill(pid, CTRL_BREAK_EVENT) raises. The stop used to
    # TerminateProcess the descendants at once, send the failing CTRL_BREAK again through the
    # process object, and kill the child itself only when the grace period ran out.
    descendant = WindowsTreeProc(NO_SUCH_PID + 1, NO_SUCH_PID, 10**10)
    ops = platform_ops(
        "win32",
        jobs=None,
        kill=_no_console,
        process_iter=lambda: [descendant] if descendant.is_running() else [],
    )
    kwargs = ops.group_kwargs({}, new_group=True)
    child = WindowsChild(NO_SUCH_PID, console=False)
    register_child(child, ops.started_own_group(kwargs))
    started = time.monotonic()
    code = await stop_process_tree(child, grace=5.0, ops=ops)  # type: ignore[arg-type]
    assert time.monotonic() - started < 2.0  # not the grace period
    assert code == 1
    assert child.calls == [signal.SIGTERM]  # TerminateProcess; no second CTRL_BREAK
    assert descendant.signals == [signal.SIGTERM]


def test_a_group_the_ctrl_break_cannot_reach_is_stopped_as_no_group() -> None:
    descendant = TreeProc(NO_SUCH_PID + 1, NO_SUCH_PID, 100.0)
    ops = platform_ops("win32", jobs=None, kill=_no_console, process_iter=lambda: [descendant])
    (record,) = ops.ask_to_stop([StopTarget(NO_SUCH_PID, True)])
    assert not record.asked
    assert not record.target.own_group  # the caller's request is TerminateProcess, not CTRL_BREAK
    assert ops.stop_signal(record.target.own_group) == signal.SIGTERM
    assert descendant.signals == [signal.SIGTERM]


@pytest.mark.parametrize("flag", [DETACHED_PROCESS, CREATE_NEW_CONSOLE, CREATE_NO_WINDOW])
async def test_a_child_detached_from_our_console_gets_no_ctrl_break(flag: int) -> None:
    # Such a child cannot receive a CTRL_BREAK from our console (the call may even report
    # success): it is stopped as a child without a group, at once, with its descendants.
    calls, kill = recorder()
    descendant = WindowsTreeProc(NO_SUCH_PID + 1, NO_SUCH_PID, 10**10)
    ops = platform_ops(
        "win32",
        jobs=None,
        kill=kill,
        process_iter=lambda: [descendant] if descendant.is_running() else [],
    )
    kwargs = ops.group_kwargs({"creationflags": flag}, new_group=True)
    # Not put in a new group either: that would only turn Ctrl+C off in its own console.
    assert kwargs["creationflags"] == flag
    assert not ops.started_own_group(kwargs)
    assert not ops.started_own_group({"creationflags": flag | CREATE_NEW_PROCESS_GROUP})
    child = WindowsChild(NO_SUCH_PID, console=True)
    register_child(child, ops.started_own_group(kwargs))
    started = time.monotonic()
    assert await stop_process_tree(child, grace=5.0, ops=ops) == 1  # type: ignore[arg-type]
    assert time.monotonic() - started < 2.0
    assert calls == []  # no CTRL_BREAK sent
    assert child.calls == [signal.SIGTERM]
    assert descendant.signals == [signal.SIGTERM]


def test_start_new_session_false_keeps_the_child_out_of_a_new_group() -> None:
    # As on POSIX (and as the drop-ins' docstrings say): an explicit start_new_session=False is
    # the caller's choice; Popen's own defaults passed explicitly choose nothing.
    ops = platform_ops("win32", jobs=None)
    out = ops.group_kwargs({"start_new_session": False}, new_group=True)
    assert int(out.get("creationflags", 0)) & CREATE_NEW_PROCESS_GROUP == 0
    assert not ops.started_own_group(out)
    out = ops.group_kwargs({"start_new_session": False, "creationflags": 0x4000}, True)
    assert out["creationflags"] == 0x4000
    for default in ({}, {"process_group": None}, {"start_new_session": None}):
        out = ops.group_kwargs(default, new_group=True)
        assert out["creationflags"] == CREATE_NEW_PROCESS_GROUP, default
        assert ops.started_own_group(out)
    # The caller's explicit wish for a group of its own holds too (Windows' Popen ignores it).
    out = ops.group_kwargs({"start_new_session": True}, new_group=False)
    assert out["creationflags"] == CREATE_NEW_PROCESS_GROUP


def test_the_scan_finds_stand_in_pids_the_host_does_not_have() -> None:
    # Windows has no os.getsid: the scan must not ask the host's real table about these pids
    # (on Linux it did, and dropped every pid the host lacked, so the tests depended on it).
    grandchild = TreeProc(NO_SUCH_PID + 2, NO_SUCH_PID + 1, 101.0)
    child = TreeProc(NO_SUCH_PID + 1, NO_SUCH_PID, 100.0)
    ops = platform_ops("win32", jobs=None, process_iter=lambda: [child, grandchild])
    table = ops.scan()
    assert sorted(e.pid for e in table.descendants(NO_SUCH_PID)) == [
        NO_SUCH_PID + 1,
        NO_SUCH_PID + 2,
    ]
