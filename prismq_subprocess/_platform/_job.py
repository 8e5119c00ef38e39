"""Windows Job Objects, through ctypes: one job per run.

A process created by a process in a job is in that job too, so the job holds the run's whole
tree whatever becomes of the parent pids: the stop kills it in one call
(``TerminateJobObject``) and asks it whether anything still runs (its accounting). With
``die_with_host`` the job is also marked ``JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE``: when this process
dies, Windows closes its handles and so kills every run's tree. Closing such a job's handle
kills what is left in it too, so once a run is over (:meth:`JobObjects.retire`) a kill-on-close
job that still holds processes (a helper the run left running on purpose) is kept open until it
is empty, or until the host dies and takes it along: the processes die with the host, not when
the garbage collector happens to collect the run's process object.

The child is assigned right after ``CreateProcess`` returns (Python cannot create it suspended):
what it starts in between is not in the job. Every call goes through an injectable ``kernel32``
so this module is unit-tested on any OS.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import Any, Protocol

__all__ = ["JobObjects", "Kernel32"]

JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE = 0x2000
JOB_OBJECT_BASIC_ACCOUNTING_INFORMATION = 1
JOB_OBJECT_EXTENDED_LIMIT_INFORMATION = 9
PROCESS_TERMINATE = 0x0001
PROCESS_SET_QUOTA = 0x0100


class _BasicLimits(ctypes.Structure):
    _fields_ = [
        ("PerProcessUserTimeLimit", ctypes.c_int64),
        ("PerJobUserTimeLimit", ctypes.c_int64),
        ("LimitFlags", ctypes.c_uint32),
        ("MinimumWorkingSetSize", ctypes.c_size_t),
        ("MaximumWorkingSetSize", ctypes.c_size_t),
        ("ActiveProcessLimit", ctypes.c_uint32),
        ("Affinity", ctypes.c_size_t),
        ("PriorityClass", ctypes.c_uint32),
        ("SchedulingClass", ctypes.c_uint32),
    ]


class _IoCounters(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "ReadOperationCount",
            "WriteOperationCount",
            "OtherOperationCount",
            "ReadTransferCount",
            "WriteTransferCount",
            "OtherTransferCount",
        )
    ]


class ExtendedLimits(ctypes.Structure):
    """``JOBOBJECT_EXTENDED_LIMIT_INFORMATION``."""

    _fields_ = [
        ("BasicLimitInformation", _BasicLimits),
        ("IoInfo", _IoCounters),
        ("ProcessMemoryLimit", ctypes.c_size_t),
        ("JobMemoryLimit", ctypes.c_size_t),
        ("PeakProcessMemoryUsed", ctypes.c_size_t),
        ("PeakJobMemoryUsed", ctypes.c_size_t),
    ]


class Accounting(ctypes.Structure):
    """``JOBOBJECT_BASIC_ACCOUNTING_INFORMATION``."""

    _fields_ = [
        ("TotalUserTime", ctypes.c_int64),
        ("TotalKernelTime", ctypes.c_int64),
        ("ThisPeriodTotalUserTime", ctypes.c_int64),
        ("ThisPeriodTotalKernelTime", ctypes.c_int64),
        ("TotalPageFaultCount", ctypes.c_uint32),
        ("TotalProcesses", ctypes.c_uint32),
        ("ActiveProcesses", ctypes.c_uint32),
        ("TotalTerminatedProcesses", ctypes.c_uint32),
    ]


class Kernel32(Protocol):
    """The ``kernel32`` functions used (``ctypes.WinDLL("kernel32")``, or a test's stand-in)."""

    def CreateJobObjectW(self, attributes: Any, name: Any) -> int: ...
    def SetInformationJobObject(self, job: int, info_class: int, info: Any, size: int) -> int: ...
    def QueryInformationJobObject(
        self, job: int, info_class: int, info: Any, size: int, returned: Any
    ) -> int: ...
    def OpenProcess(self, access: int, inherit: bool, pid: int) -> int: ...
    def AssignProcessToJobObject(self, job: int, process: int) -> int: ...
    def TerminateJobObject(self, job: int, exit_code: int) -> int: ...
    def CloseHandle(self, handle: int) -> int: ...


class JobObjects:
    """Creates, fills, queries, kills and closes Job Objects."""

    def __init__(self, kernel32: Kernel32) -> None:
        self._k = kernel32
        self._lock = threading.Lock()
        #: Jobs created kill-on-close and not yet retired.
        self._kill_on_close: set[int] = set()
        #: Retired kill-on-close jobs kept open because processes still ran in them.
        self._kept: set[int] = set()

    @classmethod
    def load(cls) -> JobObjects | None:
        """Job Objects through the real ``kernel32``; None off Windows."""
        windll = getattr(ctypes, "WinDLL", None)
        if windll is None:
            return None
        try:
            kernel32 = windll("kernel32", use_last_error=True)
        except OSError:
            return None
        for name in ("CreateJobObjectW", "OpenProcess"):  # handles are pointer-sized
            getattr(kernel32, name).restype = ctypes.c_void_p
        return cls(kernel32)

    def create(self, kill_on_close: bool) -> int | None:
        """A new job (None when Windows refused); with ``kill_on_close`` its processes die when
        its last handle closes (at the latest, when this process dies)."""
        job = self._k.CreateJobObjectW(None, None)
        if not job:
            return None
        if kill_on_close:
            limits = ExtendedLimits()
            limits.BasicLimitInformation.LimitFlags = JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE
            ok = self._k.SetInformationJobObject(
                job,
                JOB_OBJECT_EXTENDED_LIMIT_INFORMATION,
                ctypes.byref(limits),
                ctypes.sizeof(limits),
            )
            if not ok:
                self._k.CloseHandle(job)
                return None
            with self._lock:
                self._kill_on_close.add(int(job))
        return int(job)

    def assign(self, job: int, pid: int) -> bool:
        """Put process ``pid`` (and so whatever it starts from now on) into ``job``."""
        process = self._k.OpenProcess(PROCESS_SET_QUOTA | PROCESS_TERMINATE, False, pid)
        if not process:
            return False
        try:
            return bool(self._k.AssignProcessToJobObject(job, process))
        finally:
            self._k.CloseHandle(process)

    def terminate(self, job: int) -> bool:
        """Kill every process in ``job``."""
        return bool(self._k.TerminateJobObject(job, 1))

    def active(self, job: int) -> int:
        """How many processes in ``job`` still run (0 when it cannot be asked)."""
        info = Accounting()
        ok = self._k.QueryInformationJobObject(
            job,
            JOB_OBJECT_BASIC_ACCOUNTING_INFORMATION,
            ctypes.byref(info),
            ctypes.sizeof(info),
            None,
        )
        return int(info.ActiveProcesses) if ok else 0

    def close(self, job: int) -> None:
        """Release ``job`` (kills its processes if it was created ``kill_on_close``)."""
        with self._lock:
            self._kill_on_close.discard(job)
            self._kept.discard(job)
        with contextlib.suppress(OSError):
            self._k.CloseHandle(job)

    def retire(self, job: int) -> None:
        """The run of ``job`` is over (nothing will stop it through us any more): close it, but
        keep a kill-on-close job open while processes still run in it, since closing it would
        kill them now rather than with the host. Jobs kept earlier are looked at again here
        and closed once empty, so only jobs that still hold processes stay open."""
        with self._lock:
            kill_on_close = job in self._kill_on_close
            kept = list(self._kept)
        for old in kept:
            if self.active(old) == 0:
                with self._lock:
                    # Claimed under the lock: a retire on another thread (releases come from
                    # the garbage collector, on any thread) must not close it a second time,
                    # by then perhaps another object's handle number.
                    if old not in self._kept:
                        continue
                    self._kept.discard(old)
                self.close(old)
        if kill_on_close and self.active(job) > 0:
            with self._lock:
                self._kept.add(job)
            return
        self.close(job)
