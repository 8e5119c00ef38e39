"""Platform operations, with the operating-system calls injected (Windows branches run here)."""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import pytest

from prismq_subprocess._platform import (
    CREATE_NEW_PROCESS_GROUP,
    CTRL_BREAK_EVENT,
    PosixOps,
    StopTarget,
    WindowsOps,
    is_proactor_loop,
    is_windows,
    platform_ops,
    policy_uses_proactor,
)


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.calls: list[Any] = []

    def send_signal(self, sig: int) -> None:
        self.calls.append(("signal", sig))

    def kill(self) -> None:
        self.calls.append("kill")


def recorder() -> tuple[list[Any], Any]:
    calls: list[Any] = []
    return calls, lambda pid, sig: calls.append((pid, sig))


def test_platform_choice() -> None:
    assert isinstance(platform_ops("win32"), WindowsOps)
    assert isinstance(platform_ops("linux"), PosixOps)
    assert isinstance(platform_ops("darwin"), PosixOps)
    assert is_windows("win32") and is_windows("cygwin") and not is_windows("linux")


def test_windows_group_kwargs() -> None:
    ops = platform_ops("win32")
    kwargs = ops.group_kwargs({"creationflags": 0x10}, new_group=True)
    assert kwargs["creationflags"] == 0x10 | CREATE_NEW_PROCESS_GROUP
    assert ops.started_own_group(kwargs)
    assert ops.group_kwargs({}, new_group=False) == {}
    assert "start_new_session" not in ops.group_kwargs({}, new_group=True)


def test_posix_group_kwargs_respect_the_caller() -> None:
    ops = platform_ops("linux")
    assert ops.group_kwargs({}, new_group=True) == {"start_new_session": True}
    assert ops.group_kwargs({"start_new_session": False}, True) == {"start_new_session": False}
    assert ops.group_kwargs({"process_group": 0}, True) == {"process_group": 0}
    assert ops.group_kwargs({}, new_group=False) == {}
    assert ops.started_own_group({"process_group": 0})
    assert not ops.started_own_group({})


def test_windows_stop_sends_ctrl_break_then_kills_the_tree() -> None:
    calls, kill = recorder()
    ops = platform_ops("win32", kill=kill)
    assert ops.stop_signal(own_group=True) == CTRL_BREAK_EVENT
    assert ops.stop_signal(own_group=False) == signal.SIGTERM  # TerminateProcess on Windows
    assert ops.signal_group(1234, CTRL_BREAK_EVENT)
    assert calls == [(1234, CTRL_BREAK_EVENT)]
    assert not ops.signal_group(1234, signal.SIGTERM)  # no other group-wide signal
    children = [FakeProc(1), FakeProc(2)]
    ops.kill_tree(1234, True, children)
    assert [c.calls for c in children] == [["kill"], ["kill"]]
    assert calls == [(1234, CTRL_BREAK_EVENT)]
    assert not ops.group_alive(1234, True)


def test_posix_stop_signals_the_group_then_kills() -> None:
    calls, kill = recorder()
    group_calls, killpg = recorder()
    ops = platform_ops("linux", kill=kill, killpg=killpg)
    assert ops.stop_signal(own_group=True) == signal.SIGTERM
    assert ops.signal_group(99, signal.SIGTERM)
    assert group_calls == [(99, signal.SIGTERM)] and calls == []
    escaped = FakeProc(5)
    ops.kill_tree(99, True, [escaped])
    assert group_calls[-1] == (99, signal.SIGKILL)
    assert escaped.calls == [("signal", signal.SIGKILL)]
    assert not ops.group_alive(99, False)


def test_posix_reports_a_group_that_is_gone() -> None:
    def killpg(pid: int, sig: int) -> None:
        raise ProcessLookupError

    ops = platform_ops("linux", killpg=killpg)
    assert not ops.signal_group(7, signal.SIGTERM)
    assert not ops.group_alive(7, True)


def test_loop_and_policy_detection_by_class_name() -> None:
    class ProactorEventLoop:
        pass

    class Sub(ProactorEventLoop):
        pass

    class WindowsProactorEventLoopPolicy:
        pass

    class Policy:
        _loop_factory = Sub

    assert is_proactor_loop(Sub())  # type: ignore[arg-type]
    assert not is_proactor_loop(None)
    assert policy_uses_proactor(WindowsProactorEventLoopPolicy())
    assert policy_uses_proactor(Policy())
    assert not policy_uses_proactor(object())


@pytest.mark.parametrize("platform", ["linux", "win32"])
def test_signal_descendants_tolerates_vanished(platform: str) -> None:
    import psutil

    class Gone:
        def send_signal(self, sig: int) -> None:
            raise psutil.NoSuchProcess(1)

    platform_ops(platform).signal_descendants([Gone()], signal.SIGTERM)  # type: ignore[list-item]


class TreeProc:
    """A psutil.Process stand-in for the orphan search."""

    def __init__(
        self, pid: int, ppid: int, created: float, kids: tuple[TreeProc, ...] = ()
    ) -> None:
        self.pid = pid
        self._ppid = ppid
        self._created = created
        self._kids = kids
        self.signals: list[int] = []
        self.killed = False

    def ppid(self) -> int:
        return self._ppid

    def create_time(self) -> float:
        return self._created

    def children(self, recursive: bool = False) -> list[TreeProc]:
        return list(self._kids)

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill(self) -> None:
        self.killed = True

    def is_running(self) -> bool:
        return not self.killed

    def status(self) -> str:
        return "running"


def test_windows_finds_what_an_exited_child_left_running() -> None:
    grandchild = TreeProc(3, 2, 100.0)
    left_behind = TreeProc(2, 1234, 100.0, (grandchild,))
    unrelated = TreeProc(5, 999, 100.0)
    stale = TreeProc(6, 1234, 10.0)  # older than our child: a previous owner of that pid
    ops = platform_ops("win32", process_iter=lambda: [left_behind, unrelated, stale])
    assert ops.orphans_of(1234, started_after=50.0) == [left_behind, grandchild]
    assert platform_ops("linux").orphans_of(1234, None) == []


async def test_windows_stop_of_an_exited_child_kills_its_leftovers() -> None:
    from prismq_subprocess._core._tree_stop import register_group, stop_process_tree

    class Exited:
        pid = 1234
        returncode = 0

        async def wait(self) -> int:
            return 0

        def send_signal(self, sig: int) -> None:
            raise ProcessLookupError

        def kill(self) -> None:
            raise ProcessLookupError

    leftover = TreeProc(2, 1234, 10**10)  # created "after" the child
    _, kill = recorder()
    ops = platform_ops("win32", kill=kill, process_iter=lambda: [leftover])
    child = Exited()
    register_group(child, True)
    assert await stop_process_tree(child, grace=0.05, ops=ops) == 0  # type: ignore[arg-type]
    assert leftover.signals == [signal.SIGTERM]  # asked first
    assert leftover.killed  # it ignored the request: killed after the grace period


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="Linux pidfd")
def test_a_pinned_child_is_signalled_through_its_pin_never_by_pid() -> None:
    # The stop's worker thread runs a moment after the loop saw the child running; by then the
    # child may be gone and its pid reused. A pinned child is never signalled by pid.
    calls, kill = recorder()
    ops = platform_ops("linux", kill=kill)
    child = subprocess.Popen(["sleep", "30"])
    pin = ops.pin(child.pid)
    assert pin >= 0
    child.kill()
    child.wait()  # reaped: its pid is free for anyone
    [record] = ops.ask_to_stop([StopTarget(child.pid, own_group=False, pin=pin)])
    assert not record.asked  # the caller then asks through the process object
    assert calls == []
    with pytest.raises(OSError):
        os.fstat(pin)  # released by ask_to_stop


def test_the_descendants_of_a_process_that_is_not_our_child_are_left_alone() -> None:
    from prismq_subprocess._platform._table import Entry, ProcessTable

    # As if our child's pid now named someone else's process, which has a child of its own.
    stranger = os.getpid() + 1_000_000
    table = ProcessTable(
        [Entry(stranger, 1, stranger, "S", 1.0), Entry(stranger + 1, stranger, 0, "S", 2.0)]
    )
    table.handles = lambda entries: [FakeProc(e.pid) for e in entries]  # type: ignore[method-assign]
    ops = platform_ops("linux", kill=recorder()[1], killpg=recorder()[1])
    ops.scan = lambda: table  # type: ignore[method-assign]
    [record] = ops.ask_to_stop([StopTarget(stranger, own_group=True)])
    assert record.descendants == []
