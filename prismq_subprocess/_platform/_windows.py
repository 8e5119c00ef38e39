"""Windows: console process groups (``CREATE_NEW_PROCESS_GROUP``, CTRL_BREAK), psutil to find and
kill the tree, and recognising the event loops that can spawn (Proactor).

Nothing here calls a Windows-only API directly: every system call is a field that tests replace,
so this whole module runs and is tested on Linux.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psutil

from ._containment import Containment, ContainmentReport
from ._job import JobObjects
from ._ops import Pace, PlatformOps, StopRecord, StopTarget, no_pace, paced
from ._table import ProcessTable, scan_psutil

__all__ = [
    "CREATE_NEW_PROCESS_GROUP",
    "CTRL_BREAK_EVENT",
    "WindowsOps",
    "create_process_finds",
    "current_event_loop_policy",
    "is_proactor_loop",
    "policy_uses_proactor",
    "proactor_loop_class",
    "proactor_policy_class",
]

#: ``subprocess.CREATE_NEW_PROCESS_GROUP``; spelled out so Linux can build Windows arguments.
CREATE_NEW_PROCESS_GROUP = 0x00000200
# DETACHED_PROCESS, CREATE_NEW_CONSOLE, CREATE_NO_WINDOW: the child is not on our console, and
# GenerateConsoleCtrlEvent reaches only processes on the caller's console (it may even report
# success for one that is not), so no CTRL_BREAK of ours can ever stop it.
_OFF_OUR_CONSOLE = 0x00000008 | 0x00000010 | 0x08000000
#: ``signal.CTRL_BREAK_EVENT`` on Windows.
CTRL_BREAK_EVENT = 1

_PROACTOR_NAMES = {"ProactorEventLoop", "BaseProactorEventLoop"}


def _class_names(obj: object) -> set[str]:
    return {klass.__name__ for klass in type(obj).__mro__}


def proactor_loop_class() -> type[asyncio.AbstractEventLoop]:
    """``asyncio.ProactorEventLoop``.

    Raises:
        RuntimeError: not on Windows (e.g. a "win32" platform injected on a POSIX machine).
    """
    proactor: type[asyncio.AbstractEventLoop] | None = getattr(asyncio, "ProactorEventLoop", None)
    if proactor is None:
        raise RuntimeError("asyncio.ProactorEventLoop exists only on Windows")
    return proactor


def proactor_policy_class() -> type[asyncio.AbstractEventLoopPolicy]:
    """``asyncio.WindowsProactorEventLoopPolicy``.

    Raises:
        RuntimeError: not on Windows.
    """
    policy: type[asyncio.AbstractEventLoopPolicy] | None = getattr(
        asyncio, "WindowsProactorEventLoopPolicy", None
    )
    if policy is None:
        raise RuntimeError("asyncio.WindowsProactorEventLoopPolicy exists only on Windows")
    return policy


def is_proactor_loop(loop: asyncio.AbstractEventLoop | None) -> bool:
    """True when ``loop`` is a Proactor event loop (the Windows loop that can spawn processes).

    Decided by class name along the MRO, so a test on Linux can pass a stand-in class named
    ``ProactorEventLoop``.
    """
    return loop is not None and bool(_class_names(loop) & _PROACTOR_NAMES)


def current_event_loop_policy() -> object | None:
    """asyncio's current event-loop policy; None where asyncio has no policy API any more
    (deprecated in Python 3.14, removed in 3.16)."""
    # While it exists, reading the current policy is the only way to know what loop
    # asyncio.run() would build when none is running.
    get_policy: Callable[[], object] | None = getattr(asyncio, "get_event_loop_policy", None)
    if get_policy is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return get_policy()


def policy_uses_proactor(policy: object) -> bool:
    """True when the event-loop policy makes Proactor loops (``WindowsProactorEventLoopPolicy``)."""
    if _class_names(policy) & {"WindowsProactorEventLoopPolicy"}:
        return True
    factory = getattr(policy, "_loop_factory", None)
    return isinstance(factory, type) and bool(
        {k.__name__ for k in factory.__mro__} & _PROACTOR_NAMES
    )


def create_process_finds(program: str, cwd: str | None = None) -> bool:
    """Whether ``CreateProcess`` (what ``Popen`` uses on Windows, in every mode) would find
    ``program``, the first item of a command run without a shell (``cwd``: the child's).

    Its rules, not ``shutil.which``'s: ".exe" is the only suffix added, and only to a name
    without one (no PATHEXT: a bare "npm" is not npm.cmd); a bare name is looked for in
    Python's own directory, the current directory, the Windows system directories, then this
    process's PATH (never the child's ``env``). Where the search is not certain (a relative
    name with a directory: CreateProcess takes it from this process's current directory, which
    ``cwd`` may be meant to change; the directory the interpreter image runs from, in a venv),
    it leans to "found": the spawn itself reports a miss.
    """
    exe = program if os.path.splitext(program)[1] else program + ".exe"
    if os.path.dirname(program):
        bases = [""] if os.path.isabs(program) or cwd is None else ["", cwd]
        return any(
            os.path.isfile(os.path.join(base, name)) for base in bases for name in (exe, program)
        )
    root = os.environ.get("SYSTEMROOT")  # (Windows environment names ignore case)
    system = [os.path.join(root, "System32"), os.path.join(root, "System"), root] if root else []
    path = os.environ.get("PATH", "")
    folders = [
        os.path.dirname(sys.executable),
        os.path.dirname(getattr(sys, "_base_executable", sys.executable)),
        os.getcwd(),
        *system,
        *(folder.strip('"') for folder in path.split(os.pathsep) if folder),
    ]
    return any(os.path.isfile(os.path.join(folder, exe)) for folder in folders)


@dataclass(eq=False)
class WindowsOps(PlatformOps):
    """Windows: ``CREATE_NEW_PROCESS_GROUP``, CTRL_BREAK first, then kill the psutil tree."""

    process_iter: Callable[[], Iterable[psutil.Process]] = field(default=psutil.process_iter)
    #: Job Objects (None off Windows, where tests inject a stand-in ``kernel32``).
    jobs: JobObjects | None = field(default_factory=JobObjects.load)

    # -- containment -------------------------------------------------------------------------
    def prepare_spawn(
        self, kwargs: Mapping[str, Any], die_with_host: bool = False, *, ahead: bool = False
    ) -> tuple[dict[str, Any], Containment]:
        job = self.jobs.create(kill_on_close=die_with_host) if self.jobs is not None else None
        return dict(kwargs), Containment(job=job)

    def adopt(self, pid: int, containment: Containment) -> None:
        if self.jobs is not None and containment.job is not None:
            self.jobs.assign(containment.job, pid)

    def release(self, containment: Containment) -> None:
        # Only once nothing can stop this child again (its process object is gone): a closed
        # handle's number is soon given to another object. A kill-on-close job still holding
        # processes stays open (see JobObjects.retire).
        if self.jobs is not None and containment.job is not None:
            self.jobs.retire(containment.job)

    def containment_report(self) -> ContainmentReport:
        if self.jobs is None:
            return ContainmentReport(
                platform=self.name,
                mechanisms=("process-group",),
                notes=("no Job Objects (kernel32 unavailable)",),
            )
        return ContainmentReport(
            platform=self.name,
            mechanisms=("job-object", "process-group"),
            die_with_host=(
                "opt-in: SubprocessWrapper(die_with_host=True) marks each run's Job Object "
                "kill-on-close"
            ),
            notes=(
                "a child is assigned to its job right after it starts: what it starts in "
                "between is found through the process tree only",
            ),
        )

    def group_kwargs(self, kwargs: Mapping[str, Any], new_group: bool) -> dict[str, Any]:
        out = dict(kwargs)
        flags = int(out.get("creationflags", 0))
        # Windows' Popen accepts and ignores start_new_session and process_group, so they are
        # read here, as on POSIX: an explicit choice decides, Popen's own defaults passed
        # explicitly (a caller forwarding ``process_group=None``) choose nothing.
        caller_chose = out.get("start_new_session") is not None or out.get(
            "process_group", -1
        ) not in (None, -1)
        if caller_chose:
            wanted = bool(out.get("start_new_session")) or out.get("process_group") == 0
        else:
            wanted = new_group
        # Off our console a new group buys nothing (no CTRL_BREAK of ours reaches the child)
        # and would turn Ctrl+C off in the console it gets.
        if wanted and not flags & _OFF_OUR_CONSOLE:
            out["creationflags"] = flags | CREATE_NEW_PROCESS_GROUP
        return out

    def started_own_group(self, kwargs: Mapping[str, Any]) -> bool:
        # Only the spawn flags make a child a group leader; it is never guessed for a process
        # we did not start (leads_own_group stays False). That matters: a CTRL_BREAK to a pid
        # that leads no group goes to the caller's whole console group, this host included.
        flags = int(kwargs.get("creationflags", 0))
        return bool(flags & CREATE_NEW_PROCESS_GROUP) and not flags & _OFF_OUR_CONSOLE

    def scan(self) -> ProcessTable:
        # Windows has neither process groups nor sessions to read (the defaults would ask the
        # host's real os.getpgid/os.getsid about stand-in pids when this runs on Linux).
        return scan_psutil(self.process_iter, getpgid=None, getsid=None)

    def stop_signal(self, own_group: bool) -> int:
        # CTRL_BREAK reaches only a process that leads its own console group; without a group,
        # TerminateProcess (what SIGTERM means on Windows) is the only request available.
        return CTRL_BREAK_EVENT if own_group else int(signal.SIGTERM)

    def signal_group(self, pid: int, sig: int) -> bool:
        if sig != CTRL_BREAK_EVENT:
            return False  # Windows has no other group-wide signal
        try:
            self.kill(pid, sig)
        except (ProcessLookupError, PermissionError, OSError):
            return False
        return True

    def orphans_of(self, pid: int, started_after: float | None) -> list[psutil.Process]:
        return self._orphans_among(self.process_iter(), pid, started_after)

    def _orphans_among(
        self, procs: Iterable[psutil.Process], pid: int, started_after: float | None
    ) -> list[psutil.Process]:
        # Windows does not reparent: the children of an exited process keep its pid as their
        # parent pid. Only processes created after the child started can be its children (a
        # process that later reused the pid is told apart by psutil's creation-time checks).
        found: list[psutil.Process] = []
        for proc in procs:
            try:
                if proc.ppid() != pid:
                    continue
                if started_after is not None and proc.create_time() < started_after - 1.0:
                    continue
                found.append(proc)
                found.extend(proc.children(recursive=True))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return found

    def _ask(self, targets: Sequence[StopTarget], pace: Pace) -> list[StopRecord]:
        # No SIGSTOP: the trees cannot be held still, so they are looked at twice (before and
        # after the request), as close together as possible.
        # Windows has one polite request, the CTRL_BREAK to a console group; psutil's SIGTERM
        # is TerminateProcess. So a tree whose group got the CTRL_BREAK is left to handle it
        # (what is outside the group is killed after the grace period); one without it is
        # ended at once, as its child is (terminate() is TerminateProcess too).
        records = [StopRecord(t) for t in targets]
        running = [r for r in records if r.target.running]
        if running:
            table = self.scan()
            for record in paced(running, pace):
                record.add(table.handles(table.descendants(record.target.pid)))
                sig = self.stop_signal(record.target.own_group)
                record.asked = record.target.own_group and self.signal_group(record.target.pid, sig)
                if not record.asked:
                    # A group the CTRL_BREAK cannot reach (a host without a console, where
                    # os.kill raises) is no group for this stop: the caller then ends the
                    # child at once (TerminateProcess), as its descendants are here, instead
                    # of repeating a request that cannot arrive and waiting out the grace.
                    record.target.own_group = False
                    self.signal_descendants(record.descendants, signal.SIGTERM)
            table = self.scan()
            for record in running:
                known = {p.pid for p in record.descendants}
                late = table.handles(
                    e for e in table.descendants(record.target.pid) if e.pid not in known
                )
                record.add(late)
                if not record.asked:
                    self.signal_descendants(late, signal.SIGTERM)
        exited = [r for r in records if not r.target.running]
        if exited:
            procs = list(self.process_iter())
            for record in exited:
                record.add(self._orphans_among(procs, record.target.pid, record.target.started_at))
                self.signal_descendants(record.descendants, signal.SIGTERM)
        return records

    def kill_tree(self, pid: int, own_group: bool, descendants: Iterable[psutil.Process]) -> None:
        # No process groups to signal: kill the descendants found while the tree was intact.
        for proc in descendants:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                proc.kill()

    def kill_trees(self, records: Sequence[StopRecord], pace: Pace = no_pace) -> None:
        # The job holds the whole tree, however it was started: one call kills it.
        if self.jobs is not None:
            for record in records:
                if record.target.job is not None:
                    self.jobs.terminate(record.target.job)
        super().kill_trees(records, pace)

    def lingering(self, records: Sequence[StopRecord], pace: Pace = no_pace) -> list[bool]:
        flags = super().lingering(records, pace)
        if self.jobs is None:
            return flags
        return [
            flag or (r.target.job is not None and self.jobs.active(r.target.job) > 0)
            for r, flag in zip(records, flags, strict=True)
        ]
