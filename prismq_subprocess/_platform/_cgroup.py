"""cgroup v2 sub-groups for runs (Linux), systemd's ``KillMode=control-group``.

A process cannot leave its cgroup by forking, daemonizing or changing session: every descendant
is born where its parent is. When the cgroup this process lives in can be written to (root, or a
delegated systemd scope), each run gets a sub-group ``prismq-<token>-<n>`` next to us: the stop
freezes it in one write (``cgroup.freeze``: nothing inside can fork past it), reads its members
(``cgroup.procs``), and kills them in one write (``cgroup.kill``, Linux 5.14+; SIGKILL to each
member before that). An empty sub-group is removed.

The child is moved in right after ``exec`` from here, unless it moved itself before ``exec``
(``die_with_host``'s pre-exec step): what it forks in between stays outside, and is found through
the process tree and the cookie instead.
"""

from __future__ import annotations

import contextlib
import errno
import os

from ._procfs import read_small_file

__all__ = ["Cgroups", "find_cgroup_dir"]


def _read(path: str) -> str | None:
    raw = read_small_file(path)
    return None if raw is None else raw.decode("ascii", "replace")


def _write(path: str, text: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY)
    except OSError:
        return False
    try:
        os.write(fd, text.encode())
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def find_cgroup_dir(proc_root: str = "/proc") -> str | None:
    """The directory of this process's cgroup in the mounted cgroup v2 hierarchy, or None.

    ``/proc/self/cgroup`` names the cgroup (the ``0::`` line); ``/proc/self/mountinfo`` says
    where the ``cgroup2`` hierarchy is mounted and which of its cgroups is the mount's root.
    """
    own = _read(f"{proc_root}/self/cgroup")
    mounts = _read(f"{proc_root}/self/mountinfo")
    if own is None or mounts is None:
        return None
    path = next((line[3:] for line in own.splitlines() if line.startswith("0::")), None)
    if path is None:
        return None
    for line in mounts.splitlines():
        pre, sep, post = line.partition(" - ")
        fields = pre.split()
        if not sep or len(fields) < 5 or not post.startswith("cgroup2 "):
            continue
        root, mount_point = fields[3], fields[4]
        if path == root or path.startswith(root.rstrip("/") + "/"):
            rel = path[len(root.rstrip("/")) :].lstrip("/")
            return os.path.join(mount_point, rel) if rel else mount_point
    return None


class Cgroups:
    """Sub-groups of one writable cgroup directory."""

    def __init__(self, base: str, can_kill: bool = True) -> None:
        self.base = base
        #: ``cgroup.kill`` exists (Linux 5.14+).
        self.can_kill = can_kill

    @classmethod
    def probe(cls, proc_root: str = "/proc", name: str = "prismq-probe") -> Cgroups | None:
        """A :class:`Cgroups` when this process may create sub-groups of its own cgroup and move
        processes into them; None otherwise (no cgroup v2, not writable, no freezer)."""
        base = find_cgroup_dir(proc_root)
        if base is None:
            return None
        probe = os.path.join(base, name)
        try:
            os.mkdir(probe)
        except FileExistsError:
            pass
        except OSError:
            return None
        try:
            usable = all(
                os.access(os.path.join(probe, f), os.W_OK)
                for f in ("cgroup.procs", "cgroup.freeze")
            )
            can_kill = os.path.exists(os.path.join(probe, "cgroup.kill"))
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(probe)
        return cls(base, can_kill) if usable else None

    def create(self, name: str) -> str | None:
        """Create sub-group ``name``; its path, or None when that failed."""
        path = os.path.join(self.base, name)
        try:
            os.mkdir(path)
        except OSError:
            return None
        return path

    def make(self, path: str) -> bool:
        """Create the sub-group at ``path`` (one of :attr:`base`'s) unless it exists; whether it
        exists now."""
        try:
            os.mkdir(path)
        except FileExistsError:
            return True
        except OSError:
            return False
        return True

    def enter(self, path: str, pid: int) -> bool:
        """Move process ``pid`` (0: the caller) into the sub-group at ``path``."""
        return _write(os.path.join(path, "cgroup.procs"), str(pid))

    def members(self, path: str) -> list[int]:
        """The processes in the sub-group now."""
        text = _read(os.path.join(path, "cgroup.procs")) or ""
        return [int(line) for line in text.split() if line.isdigit()]

    def _events(self, path: str) -> dict[str, str]:
        text = _read(os.path.join(path, "cgroup.events")) or ""
        return dict(line.split(" ", 1) for line in text.splitlines() if " " in line)

    def freeze(self, path: str, frozen: bool) -> bool:
        """Freeze (or thaw) every process in the sub-group, present and future."""
        return _write(os.path.join(path, "cgroup.freeze"), "1" if frozen else "0")

    def is_frozen(self, path: str) -> bool:
        """The freeze asked for has taken effect (or the sub-group is gone)."""
        events = self._events(path)
        return not events or events.get("frozen") == "1"

    def populated(self, path: str) -> bool:
        """A live process is still in the sub-group."""
        return self._events(path).get("populated") == "1"

    def kill(self, path: str) -> bool:
        """SIGKILL every process in the sub-group in one write; False where the kernel has no
        ``cgroup.kill`` (the caller then kills the members one by one)."""
        return _write(os.path.join(path, "cgroup.kill"), "1")

    def remove(self, path: str) -> bool:
        """Remove the sub-group (no process may be in it); whether it is gone.

        Sub-groups inside it go first when no process is in any of them: a host that ran in the
        run's sub-group (a module that uses this library) makes its own runs' sub-groups there,
        and if it died before removing one, the run's could never be removed (the machine this
        was found on had 89 such pairs left).
        """
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY) or self.populated(path):
                return False
            return _remove_empty_tree(path)
        return True


def _remove_empty_tree(path: str) -> bool:
    """Remove the cgroup at ``path`` and every cgroup below it, deepest first (a cgroup
    directory is removed with its control files; one a process entered meanwhile refuses)."""
    with contextlib.suppress(OSError):
        for below, _, _ in os.walk(path, topdown=False):
            os.rmdir(below)
    return not os.path.lexists(path)
