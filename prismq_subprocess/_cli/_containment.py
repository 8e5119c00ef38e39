"""Which mechanisms could keep a child's descendants contained on this host (for ``doctor``).

One function, :func:`probe_containment`, returns plain data, so it can be swapped for the
library's own probe once the library has one. It only looks: it never creates a cgroup, never
changes this process's subreaper flag and never creates a Job Object.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._platform import is_windows, platform_name
from .._platform._host import HAS_SESSIONS

__all__ = ["Mechanism", "probe_containment"]

# <linux/prctl.h>
_PR_GET_CHILD_SUBREAPER = 37


@dataclass(frozen=True)
class Mechanism:
    """One containment mechanism and whether this host offers it.

    ``available`` is ``None`` where the mechanism does not exist on this platform at all.
    """

    name: str
    label: str
    available: bool | None
    detail: str

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def _process_groups(platform: str) -> Mechanism:
    label = "process groups/sessions"
    if is_windows(platform):
        return Mechanism(
            "process-groups",
            label,
            None,
            "POSIX only (Windows console process groups only carry CTRL_BREAK)",
        )
    ok = HAS_SESSIONS
    detail = "setsid() and killpg() present" if ok else "setsid()/killpg() missing"
    return Mechanism("process-groups", label, ok, detail)


def _call_prctl_get_subreaper() -> int:
    """Ask the kernel whether this process is a child subreaper (read-only; raises OSError)."""
    libc = ctypes.CDLL(None, use_errno=True)
    prctl = getattr(libc, "prctl", None)
    if prctl is None:
        raise OSError("the C library has no prctl()")
    flag = ctypes.c_int(0)
    if prctl(_PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))
    return flag.value


def _subreaper(platform: str, get_subreaper: Callable[[], int]) -> Mechanism:
    label = "child subreaper (prctl)"
    if not platform.startswith("linux"):
        return Mechanism("child-subreaper", label, None, "Linux only")
    try:
        current = get_subreaper()
    except OSError as exc:
        # Calling the getter is how we learn the setter exists: both arrived in Linux 3.4.
        return Mechanism("child-subreaper", label, False, f"prctl() not usable: {exc}")
    state = "is" if current else "is not"
    return Mechanism(
        "child-subreaper",
        label,
        True,
        f"prctl(PR_SET_CHILD_SUBREAPER) callable; this process {state} a subreaper",
    )


def _cgroup2_mounts(proc_root: Path) -> list[str]:
    """The mount points of cgroup2 file systems."""
    try:
        mounts = (proc_root / "self" / "mounts").read_text()
    except OSError:
        return []
    found = []
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            found.append(fields[1])
    return found


def _current_cgroup(proc_root: Path) -> str | None:
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        # cgroup v2 is the "0::<path>" entry; v1 hierarchies have a controller list in between.
        if line.startswith("0::"):
            return line[3:]
    return None


def _cgroup_v2(
    platform: str,
    proc_root: Path,
    cgroup_root: Path,
    access: Callable[[str, int], bool],
) -> Mechanism:
    label = "cgroup v2 sub-group"
    if not platform.startswith("linux"):
        return Mechanism("cgroup-v2", label, None, "Linux only")
    mounts = _cgroup2_mounts(proc_root)
    if str(cgroup_root) not in mounts:
        # Only a unified /sys/fs/cgroup counts here. A hybrid host's cgroup2 tree (.../unified,
        # without controllers) could still track a process tree, so the detail names it.
        where = f"; cgroup2 is mounted at {', '.join(mounts)}" if mounts else ""
        return Mechanism(
            "cgroup-v2",
            label,
            False,
            f"{cgroup_root} is not a cgroup2 mount (cgroup v1, hybrid or absent){where}",
        )
    path = _current_cgroup(proc_root)
    if path is None:
        return Mechanism("cgroup-v2", label, False, "this process's cgroup v2 path is unknown")
    directory = cgroup_root / path.lstrip("/")
    # A sub-group needs mkdir here, and moving a child into it needs write access to the
    # cgroup.procs of the common ancestor, which is this very group (cgroup v2 delegation rules).
    procs = directory / "cgroup.procs"
    if not directory.is_dir():
        return Mechanism("cgroup-v2", label, False, f"{directory} is not visible here")
    if not (access(str(directory), os.W_OK) and access(str(procs), os.W_OK)):
        return Mechanism("cgroup-v2", label, False, f"{directory} is not writable")
    return Mechanism("cgroup-v2", label, True, f"{directory} is writable")


def _job_objects(platform: str) -> Mechanism:
    label = "Windows Job Objects"
    if not is_windows(platform):
        return Mechanism("job-objects", label, None, "Windows only")
    windll = getattr(ctypes, "windll", None)
    kernel32 = getattr(windll, "kernel32", None) if windll is not None else None
    ok = kernel32 is not None and hasattr(kernel32, "CreateJobObjectW")
    detail = "CreateJobObjectW present" if ok else "kernel32.CreateJobObjectW not found"
    return Mechanism("job-objects", label, ok, detail)


def probe_containment(
    *,
    platform: str | None = None,
    proc_root: str | os.PathLike[str] = "/proc",
    cgroup_root: str | os.PathLike[str] = "/sys/fs/cgroup",
    access: Callable[[str, int], bool] = os.access,
    get_subreaper: Callable[[], int] = _call_prctl_get_subreaper,
) -> list[Mechanism]:
    """Report which descendant-containment mechanisms this host offers.

    Returns, in this order: process groups/sessions (POSIX), the Linux child subreaper
    (``prctl(PR_SET_CHILD_SUBREAPER)``, checked by calling its read-only twin), a writable
    cgroup v2 sub-group (``/sys/fs/cgroup`` is cgroup2 and this process's group directory and its
    ``cgroup.procs`` are writable), and Windows Job Objects. Every input can be injected so the
    rules are testable on any host. Nothing is changed on the host.
    """
    name = platform_name(platform)
    return [
        _process_groups(name),
        _subreaper(name, get_subreaper),
        _cgroup_v2(name, Path(proc_root), Path(cgroup_root), access),
        _job_objects(name),
    ]
