"""Stand-ins for psutil processes and recorders of system calls, for the platform tests."""

from __future__ import annotations

import ctypes
from typing import Any

from prismq_subprocess._platform._job import Accounting, ExtendedLimits


class FakeProc:
    """A descendant that records the signals and kills it receives."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.calls: list[Any] = []

    def send_signal(self, sig: int) -> None:
        self.calls.append(("signal", sig))

    def kill(self) -> None:
        self.calls.append("kill")


def recorder() -> tuple[list[Any], Any]:
    """A ``kill``/``killpg`` stand-in and the list of ``(pid, sig)`` it was called with."""
    calls: list[Any] = []
    return calls, lambda pid, sig: calls.append((pid, sig))


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


class FakeKernel32:
    """Records the Job Object calls; jobs are numbers, processes are pids + 10_000.

    ``active`` is what the accounting query answers for every job, unless ``active_in`` has an
    entry for that job.
    """

    def __init__(self, active: int = 0) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.limit_flags: dict[int, int] = {}
        self.members: dict[int, set[int]] = {}
        self.active = active
        self.active_in: dict[int, int] = {}
        self._next = 100

    def CreateJobObjectW(self, attributes: Any, name: Any) -> int:
        self._next += 1
        self.calls.append(("create", self._next))
        self.members[self._next] = set()
        return self._next

    def SetInformationJobObject(self, job: int, info_class: int, info: Any, size: int) -> int:
        limits = ctypes.cast(info, ctypes.POINTER(ExtendedLimits)).contents
        self.limit_flags[job] = limits.BasicLimitInformation.LimitFlags
        self.calls.append(("set", job, info_class))
        return 1

    def QueryInformationJobObject(
        self, job: int, info_class: int, info: Any, size: int, returned: Any
    ) -> int:
        accounting = ctypes.cast(info, ctypes.POINTER(Accounting)).contents
        accounting.ActiveProcesses = self.active_in.get(job, self.active)
        self.calls.append(("query", job, info_class))
        return 1

    def OpenProcess(self, access: int, inherit: bool, pid: int) -> int:
        self.calls.append(("open", pid, access))
        return pid + 10_000

    def AssignProcessToJobObject(self, job: int, process: int) -> int:
        self.members[job].add(process - 10_000)
        self.calls.append(("assign", job, process))
        return 1

    def TerminateJobObject(self, job: int, exit_code: int) -> int:
        self.calls.append(("terminate", job))
        return 1

    def CloseHandle(self, handle: int) -> int:
        self.calls.append(("close", handle))
        return 1


__all__ = ["FakeKernel32", "FakeProc", "TreeProc", "recorder"]
