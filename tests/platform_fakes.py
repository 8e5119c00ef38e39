"""Stand-ins for psutil processes and recorders of system calls, for the platform tests."""

from __future__ import annotations

from typing import Any


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


__all__ = ["FakeProc", "TreeProc", "recorder"]
