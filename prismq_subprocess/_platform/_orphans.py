"""Finding and stopping the tree a dead host left running, without ever touching a stranger.

A host killed outright (SIGKILL, a crash, SIGTERM without a handler) leaves its children running:
they lead their own sessions, so nothing reaches them, and their parent is now init. The next
process to open the run registry finds the run still RUNNING with its owner gone. Before it marks
the run INTERRUPTED it stops that tree, but only once three facts agree: the recorded pid is
alive, it was started at the recorded moment (so the pid was not reused), and its environment
holds the run's cookie (so it is the very child the run started). A process failing any check is
left alone. The tree is then every process holding the cookie (a double-forked daemon too) and
everything below them.

The child itself is often gone by then while its descendants are not: it wrote to the pipe its
dead owner read and died of the broken pipe. What still holds the run's cookie is stopped then
too (with everything below it): the variable's name is unique to the dead host process and its
value to the run, so only that run's descendants can hold it.

A host can also die before it recorded its child (between the spawn and the record), or have
started children in a run that records none (a coroutine run). A registry notes each owner's
cookie variable before its first run; what still holds a dead owner's variable, whatever the
value, is what that host started, and is stopped the same way (:func:`stop_left_behind`).
"""

from __future__ import annotations

import contextlib
import enum
import os
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import psutil

from ._cookie import _ENVIRON_LIMIT, COOKIE_PREFIX, Cookies
from ._ops import alive
from ._procfs import read_small_file
from ._start_time import same_start
from ._table import ProcessEntry, ProcessTable, scan_proc, scan_psutil

__all__ = [
    "OrphanCheck",
    "OrphanStop",
    "ProcessIdentity",
    "stop_left_behind",
    "stop_orphan_tree",
    "stop_orphan_trees",
    "stop_orphans",
    "verify_orphan",
    "well_formed_cookie",
    "well_formed_variable",
]

# How long, and how often, a process caught inside its exec is read again (see verify_orphan).
_EXEC_SETTLE = 0.2
_EXEC_POLL = 0.001
# How long the kill's effect is waited for (SIGKILL is not refusable; this bounds a D-state).
_KILL_WAIT = 1.0


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """What tells one process apart from any later process given the same pid: its pid, its
    start time (``psutil.Process.create_time()``; 0.0, no process's start, for a child that was
    gone before it could be read) and the run's containment cookie
    (``"PRISMQ_RUN_<token>=<n>"``, the variable every descendant inherits; ``None`` where the
    child had none, e.g. on Windows).

    A run registry keeps it with each run (``record_child``) so that a later process can stop
    a tree its dead owner left running, and only that tree (see ``recover_orphans``).
    """

    pid: int
    started_at: float
    cookie: str | None = None

    @classmethod
    def of(
        cls, pid: int, cookie_variable: str | None, cookie: str | None
    ) -> ProcessIdentity | None:
        """The identity of the running process ``pid``, given its cookie variable and value;
        None once it is gone."""
        try:
            started = psutil.Process(pid).create_time()
        except psutil.Error:
            return None
        mark = f"{cookie_variable}={cookie}" if cookie_variable and cookie is not None else None
        return cls(pid, started, mark)


class OrphanCheck(enum.Enum):
    """What :func:`verify_orphan` found at the recorded pid."""

    #: The very child the run started: same start time, the run's cookie in its environment.
    VERIFIED = "verified"
    #: No process (or a zombie) with that pid.
    GONE = "gone"
    #: A process with another start time: the pid was reused.
    REUSED = "pid reused"
    #: The start time matches but the cookie is missing, or there is none to check, or the
    #: environment cannot be read (another user's process): not provably ours.
    UNPROVEN = "not provably the run's child"


def _cookie_reader(mark: str, proc_root: str | None) -> tuple[Cookies, str] | None:
    name, sep, value = mark.partition("=")
    if not sep or not name.startswith(COOKIE_PREFIX) or len(name) == len(COOKIE_PREFIX):
        return None
    return Cookies(token=name[len(COOKIE_PREFIX) :], proc_root=proc_root), value


def _default_proc_root() -> str | None:
    return "/proc" if os.path.exists("/proc/self/stat") else None


def verify_orphan(identity: ProcessIdentity, proc_root: str | None = None) -> OrphanCheck:
    """Check that ``identity.pid`` is still the child recorded (see :class:`OrphanCheck`)."""
    try:
        proc = psutil.Process(identity.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return OrphanCheck.GONE
        started = proc.create_time()
    except psutil.NoSuchProcess:
        return OrphanCheck.GONE
    except psutil.Error:
        return OrphanCheck.UNPROVEN
    if not same_start(started, identity.started_at):
        return OrphanCheck.REUSED
    reader = _cookie_reader(identity.cookie or "", proc_root or _default_proc_root())
    if reader is None:
        return OrphanCheck.UNPROVEN
    cookies, value = reader
    # A process caught inside its exec reads as having no environment for a moment (Popen
    # returns once the exec is past its point of no return, before the new stack is laid out):
    # read again until it settles, bounded, rather than call the run's own child unproven.
    read = cookies.look(identity.pid)
    deadline = time.monotonic() + _EXEC_SETTLE
    while read.settling and time.monotonic() < deadline:
        time.sleep(_EXEC_POLL)
        read = cookies.look(identity.pid)
    if read.value != value:
        return OrphanCheck.UNPROVEN
    return OrphanCheck.VERIFIED


def _environ_cookies(pid: int, names: Collection[str], proc_root: str | None) -> dict[str, str]:
    """The values of the cookie variables ``names`` in ``pid``'s environment (read once)."""
    found: dict[str, str] = {}
    if proc_root is not None:
        raw = read_small_file(f"{proc_root}/{pid}/environ", _ENVIRON_LIMIT)
        if raw is None:
            return found
        for name in names:
            value = Cookies(token=name[len(COOKIE_PREFIX) :]).parse(raw)
            if value is not None:
                found[name] = value
        return found
    try:
        environ = psutil.Process(pid).environ()
    except (psutil.Error, OSError):
        return found
    return {name: environ[name] for name in names if name in environ}


def _trees(
    marks: Sequence[tuple[int | None, str, str | None]],
    proc_root: str | None,
    roots_seen: list[float | None],
    *,
    first: bool,
    spare_variables: Collection[str] = (),
    spare_pids: Collection[int] = (),
) -> list[list[psutil.Process]]:
    """For each mark ``(pid, variable, value)``: the child at ``pid`` (``None``: it is gone),
    every holder of its cookie (of ``variable`` with any value where ``value`` is ``None``),
    and everything below them; one look at the process table for all.

    ``roots_seen``: the start (the table's unit) of each mark's child, as the first look saw
    it, which records it; a later look takes the process at ``pid`` only if it is that one (the
    child may have exited since and its pid been given to a stranger, whose tree would be
    killed).

    A mark of a whole variable (``value`` None) never takes what is alive for a live host:
    this process, its ancestors and everything below it; the processes ``spare_pids`` (live
    owners) and everything below them; what holds one of ``spare_variables`` (live owners'
    children) and everything below it. A dead host's variable is inherited by all of those
    when they descend from it (a nested host), and they are not its leftovers."""
    table: ProcessTable = scan_proc(proc_root) if proc_root is not None else scan_psutil()
    me = os.getpid()
    names = {name for _, name, _ in marks}
    whole = any(value is None for _, _, value in marks)
    read = names | set(spare_variables) if whole else names
    index: dict[tuple[str, str | None], list[int]] = {}
    for i, (_, name, value) in enumerate(marks):
        index.setdefault((name, value), []).append(i)
    roots: list[list[ProcessEntry]] = [[] for _ in marks]
    spared_roots: list[ProcessEntry] = []
    for entry in table.entries.values():
        if entry.pid == me:
            continue
        held = _environ_cookies(entry.pid, read, proc_root)
        if whole and any(name in held for name in spare_variables):
            spared_roots.append(entry)
        for name, value in held.items():
            for i in (*index.get((name, value), ()), *index.get((name, None), ())):
                roots[i].append(entry)
    spared: set[int] = set()
    if whole:
        spared_roots += [e for e in map(table.entries.get, (me, *spare_pids)) if e is not None]
        for entry in spared_roots:
            spared.add(entry.pid)
            spared.update(e.pid for e in table.descendants(entry.pid))
        ancestor = table.entries.get(me)
        while ancestor is not None and ancestor.ppid not in spared and ancestor.ppid > 1:
            spared.add(ancestor.ppid)
            ancestor = table.entries.get(ancestor.ppid)
    for i, (pid, _, _) in enumerate(marks):
        child = table.entries.get(pid) if pid is not None else None
        if child is None:
            continue
        if first:
            roots_seen[i] = child.start
        elif roots_seen[i] != child.start:
            continue
        roots[i].append(child)
    trees: list[list[psutil.Process]] = []
    for (_, _, value), group in zip(marks, roots, strict=True):
        left_alone = spared if value is None else {me}
        wanted: dict[int, ProcessEntry] = {}
        for entry in group:
            if entry.pid in left_alone:
                continue
            wanted[entry.pid] = entry
            wanted.update(
                (e.pid, e) for e in table.descendants(entry.pid) if e.pid not in left_alone
            )
        trees.append(table.handles(wanted.values()))
    return trees


def _signal(procs: list[psutil.Process], kill: bool) -> None:
    for proc in procs:
        with contextlib.suppress(psutil.Error, OSError):
            if kill:
                proc.kill()
            else:
                proc.terminate()


def _wait(procs: list[psutil.Process], seconds: float) -> list[psutil.Process]:
    deadline = time.monotonic() + seconds
    left = alive(procs)
    while left and time.monotonic() < deadline:
        time.sleep(0.02)
        left = alive(left)
    return left


@dataclass(frozen=True, slots=True)
class OrphanStop:
    """What :func:`stop_orphans` found for one identity: the check of its recorded pid and how
    many processes of its tree were signalled (for a GONE child: its descendants that still
    held the run's cookie)."""

    check: OrphanCheck
    stopped: int


def _well_formed(cookie: str | None) -> tuple[str, str] | None:
    name, sep, value = (cookie or "").partition("=")
    if not sep or not value or not name.startswith(COOKIE_PREFIX) or name == COOKIE_PREFIX:
        return None
    return name, value


def well_formed_cookie(cookie: str) -> bool:
    """Whether ``cookie`` has the form of a run's containment cookie,
    ``PRISMQ_RUN_<token>=<value>`` (what :class:`ProcessIdentity` carries)."""
    return _well_formed(cookie) is not None


def well_formed_variable(variable: str) -> bool:
    """Whether ``variable`` has the form of a host process's cookie variable,
    ``PRISMQ_RUN_<token>`` (the token: letters and digits)."""
    token = variable[len(COOKIE_PREFIX) :] if variable.startswith(COOKIE_PREFIX) else ""
    return token.isascii() and token.isalnum()


def stop_orphans(
    identities: Sequence[ProcessIdentity], grace: float = 5.0, proc_root: str | None = None
) -> list[OrphanStop]:
    """Stop what the runs of ``identities`` left running: the tree of each VERIFIED child, and,
    where the child is GONE, what still holds its cookie and everything below that. One grace
    period and a few looks at the process table for all; returns one :class:`OrphanStop` per
    identity, in order. Blocking."""
    return stop_left_behind(identities, (), grace, proc_root)[0]


def stop_left_behind(
    identities: Sequence[ProcessIdentity],
    variables: Sequence[str],
    grace: float = 5.0,
    proc_root: str | None = None,
    *,
    spare_variables: Collection[str] = (),
    spare_pids: Collection[int] = (),
) -> tuple[list[OrphanStop], list[int]]:
    """:func:`stop_orphans` for ``identities`` and, in the same grace period, every process
    holding one of the cookie ``variables`` (``PRISMQ_RUN_<token>``, any value) and everything
    below it: what a dead host process started, whatever became of its records. Call it only
    for variables of hosts known to be dead. What is alive for a live host is left alone (see
    :func:`_trees`): this process and its lineage, the live owners ``spare_pids`` and what is
    below them, and the holders of ``spare_variables`` (the live owners' cookie variables) and
    what is below them. Returns the stops of ``identities`` and the number of processes stopped
    for each variable, in order (0 for a malformed one). Blocking."""
    for identity in identities:
        if not isinstance(identity, ProcessIdentity):
            raise TypeError(f"expected a ProcessIdentity, not {type(identity).__name__}")
    root = proc_root or _default_proc_root()
    checks = [verify_orphan(identity, root) for identity in identities]
    marks: list[tuple[int | None, str, str | None]] = []
    owners: list[int] = []  # the identity (or, past len(identities), the variable) of each mark
    for i, (identity, check) in enumerate(zip(identities, checks, strict=True)):
        cookie = _well_formed(identity.cookie)
        if cookie is None:
            continue
        if check is OrphanCheck.VERIFIED:
            marks.append((identity.pid, *cookie))
        elif check is OrphanCheck.GONE:
            # A REUSED pid is left alone with whatever holds the cookie (a stranger at the
            # recorded pid is never touched, whatever its environment says).
            marks.append((None, *cookie))
        else:
            continue
        owners.append(i)
    for i, variable in enumerate(variables, len(identities)):
        if isinstance(variable, str) and well_formed_variable(variable):
            marks.append((None, variable, None))
            owners.append(i)
    stopped = [0] * (len(identities) + len(variables))
    if not marks:
        return [OrphanStop(check, 0) for check in checks], stopped[len(identities) :]
    roots_seen: list[float | None] = [None] * len(marks)
    trees = _trees(
        marks, root, roots_seen, first=True, spare_variables=spare_variables, spare_pids=spare_pids
    )
    procs = [p for tree in trees for p in tree]
    _signal(procs, kill=False)
    left = _wait(procs, grace)
    known = {p.pid for p in procs}
    late_trees = _trees(
        marks, root, roots_seen, first=False, spare_variables=spare_variables, spare_pids=spare_pids
    )
    late = [p for tree in late_trees for p in tree if p.pid not in known]
    _signal([*left, *late], kill=True)
    _wait([*left, *late], _KILL_WAIT)
    for i, tree, late_tree in zip(owners, trees, late_trees, strict=True):
        stopped[i] = len({p.pid for p in (*tree, *late_tree)})
    stops = [OrphanStop(check, n) for check, n in zip(checks, stopped, strict=False)]
    return stops, stopped[len(identities) :]


def stop_orphan_trees(
    identities: Sequence[ProcessIdentity], grace: float = 5.0, proc_root: str | None = None
) -> list[OrphanCheck]:
    """:func:`stop_orphan_tree` for many at once: one grace period and a few looks at the
    process table for all of them; returns each one's check, in order."""
    return [stop.check for stop in stop_orphans(identities, grace, proc_root)]


def stop_orphan_tree(
    identity: ProcessIdentity, grace: float = 5.0, proc_root: str | None = None
) -> OrphanCheck:
    """Stop the tree of a dead host's run if ``identity`` still names its child.

    Verifies first (:func:`verify_orphan`). VERIFIED: SIGTERM (``TerminateProcess`` on
    Windows) to the child, to every process holding its cookie and to their descendants; up to
    ``grace`` seconds; then one more look (for what was forked meanwhile) and SIGKILL to what is
    left. GONE (the child has exited): the same for every process still holding its cookie and
    their descendants. REUSED, UNPROVEN: nothing is signalled. Every signal goes through a
    psutil handle, which checks the start time first. Blocking: call it from a worker thread.
    Returns within about ``grace + 1`` seconds.
    """
    return stop_orphan_trees([identity], grace, proc_root)[0]
