"""What a child is given at spawn so its whole tree can be found again, and the report of which
means this host has.

The parent chain alone loses a double-forked daemon (re-parented to init) and anything started in
a new session. Stronger means, strongest first:

- ``cgroup``: a cgroup v2 sub-group per run (Linux, when writable). Nothing leaves it.
- ``job-object``: a Windows Job Object per run, killed on close. Nothing started after the child
  was assigned leaves it.
- ``subreaper``: this process is a child subreaper (Linux): orphans come to us, not to init, so
  they are found among our children.
- ``cookie``: a per-run variable in the child's environment, inherited by every descendant that
  does not replace its environment (all platforms).
- ``process-group``: the child's process group / session and its descendants by parent pid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Containment", "ContainmentReport"]


@dataclass(frozen=True)
class Containment:
    """The means one child was started with, for the stop to find its tree again."""

    #: Value of the host's cookie variable in the child's environment.
    cookie: str | None = None
    #: Its cgroup v2 sub-group (Linux).
    cgroup: str | None = None
    #: The child moved itself into the sub-group before ``exec`` (``die_with_host``).
    entered: bool = False
    #: Its Job Object handle (Windows).
    job: int | None = None


@dataclass(frozen=True)
class ContainmentReport:
    """Which means of finding a child's whole tree this host uses, strongest first.

    Printed by the ``doctor`` command; returned by :func:`prismq_subprocess.containment_report`.
    """

    #: ``sys.platform``.
    platform: str
    #: The means in use, strongest first (e.g. ``("cgroup", "subreaper", "cookie",
    #: "process-group")``).
    mechanisms: tuple[str, ...]
    #: The cgroup v2 directory runs get sub-groups in, when ``cgroup`` is in use.
    cgroup_dir: str | None = None
    #: The environment variable that carries the cookie.
    cookie_variable: str | None = None
    #: How children can be made to die with this process (``die_with_host``), or ``"none"``.
    die_with_host: str = "none"
    #: Why a stronger means is not in use, and other limits worth knowing.
    notes: tuple[str, ...] = field(default=())

    @property
    def strongest(self) -> str:
        """The strongest means in use."""
        return self.mechanisms[0] if self.mechanisms else "none"

    def __str__(self) -> str:
        lines = [
            f"containment: {' + '.join(self.mechanisms) or 'none'} (strongest: {self.strongest})",
            f"  platform: {self.platform}",
        ]
        if self.cgroup_dir:
            lines.append(f"  cgroup v2 sub-groups in: {self.cgroup_dir}")
        if self.cookie_variable:
            lines.append(f"  cookie variable: {self.cookie_variable}")
        lines.append(f"  children die with this process: {self.die_with_host}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)
