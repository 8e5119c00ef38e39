"""The run model: :class:`RunStatus`, :class:`RunOwner` and :class:`Run`.

A :class:`Run` is one execution of a module (a script or an in-process coroutine) as a web backend
shows it to people: what ran, with which parameters, its status, exit code, timings and the tail of
its output. Status changes go through the ``mark_*`` methods or a plain ``run.status = ...``
assignment; both refuse impossible transitions (see :func:`transition_error`).
"""

from __future__ import annotations

import contextlib
import copy
import enum
import math
import os
import socket
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn

import psutil

from .._core._exceptions import InvalidParametersError, InvalidRunError, RunStateError
from .._platform import after_fork_in_child
from .._platform._start_time import STARTS_MOVE_WITH_THE_CLOCK, same_start

__all__ = [
    "Run",
    "RunOwner",
    "RunStatus",
    "owner_alive",
    "registry_file",
    "transition_error",
    "utc_now",
]

#: Two readings of one start differ by whole seconds to within the rounding of a tick.
_START_ROUNDING = 0.005


def utc_now() -> datetime:
    """Return the current time as a timezone-aware UTC datetime."""
    return datetime.now(UTC)


# The per-run paths below read the clock without utc_now's extra Python call.
_now = datetime.now


# Run ids: the random part of _TAILS_PER_READ ids comes from one os.urandom read (the system
# call was most of the cost of creating a Run); the time and counter are added per id. The top
# two bits of each random part become the RFC 4122 variant bits 10, all at once.
_TAILS_PER_READ = 256
_VARIANT_RFC_4122 = bytes((b & 0x3F) | 0x80 for b in range(256))
# next() on a list iterator is one C call, so threads taking ids at once never get the same
# random part; two threads refilling at once each make a pool of their own.
_tails: Iterator[str] = iter(())
_time_ns = time.time_ns
# The millisecond the ids are stamped with, as hex, and the 12-bit counter within it (RFC 9562,
# method 1). One process's ids only grow: in the same millisecond, or after the clock stepped
# back a little, the counter goes on; past 4,096 ids in one millisecond the stamp moves on by
# one. A clock that stepped back more than _CLOCK_STEP_MS is followed (ids then start lower).
_stamp_ms = 0
_stamp = ""
_count = 0
_CLOCK_STEP_MS = 10_000
_COUNTER_HEX = [f"{k:03x}" for k in range(0x1000)]


def _new_tails() -> Iterator[str]:
    raw = bytearray(os.urandom(8 * _TAILS_PER_READ))
    raw[::8] = raw[::8].translate(_VARIANT_RFC_4122)
    digits = raw.hex()
    return iter([digits[i : i + 16] for i in range(0, len(digits), 16)])


def new_run_id() -> str:
    """Return a fresh run id: a version-7 UUID (RFC 9562) as 32 lower-case hex digits.

    The id starts with the time it was made, in milliseconds, then a counter and 62 random
    bits from ``os.urandom``. One process's new ids sort after its older ones, so they land at
    one end of an index rather than anywhere in it (SQLite's run_id index then no longer
    dirties a random page per insert; see docs/PERFORMANCE.md, registry); ids made by threads
    at the same moment may come in either order. The random part keeps ids unique across
    threads, processes and restarts, and not guessable even next to a known one. The random
    parts are read from the system 256 at a time (a forked child starts a pool of its own, see
    ``_after_fork``).
    """
    global _tails, _stamp_ms, _stamp, _count
    ms = _time_ns() // 1_000_000
    if ms > _stamp_ms or ms < _stamp_ms - _CLOCK_STEP_MS:
        _stamp_ms, _count = ms, 0
        _stamp = f"{ms & 0xFFFF_FFFF_FFFF:012x}7"
    else:
        _count += 1
        if _count > 0xFFF:
            _stamp_ms += 1
            _count = 0
            _stamp = f"{_stamp_ms & 0xFFFF_FFFF_FFFF:012x}7"
    tail = next(_tails, None)
    if tail is None:
        _tails = tails = _new_tails()
        tail = next(tails)
    return _stamp + _COUNTER_HEX[_count] + tail


class RunStatus(enum.StrEnum):
    """Where a run is in its life.

    ``PENDING`` (created or queued) -> ``RUNNING`` -> one of the finished states ``COMPLETED``,
    ``FAILED``, ``CANCELLED``. ``INTERRUPTED`` is for runs found unfinished after their owner
    process died (crash or restart). A pending run may also finish directly (cancelled while
    queued, failed to start, interrupted).
    """

    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"

    @property
    def is_finished(self) -> bool:
        """``True`` for the final states (everything but PENDING and RUNNING)."""
        return self is not _PENDING and self is not _RUNNING


# Looking a member up on an enum class (RunStatus.PENDING) costs about ten times a global read
# on 3.11; the per-run paths (transitions, registries, the task manager) use these.
_PENDING = RunStatus.PENDING
_RUNNING = RunStatus.RUNNING
_COMPLETED = RunStatus.COMPLETED
_FAILED = RunStatus.FAILED
_CANCELLED = RunStatus.CANCELLED
_INTERRUPTED = RunStatus.INTERRUPTED

ACTIVE_STATUSES = frozenset({RunStatus.PENDING, RunStatus.RUNNING})
FINISHED_STATUSES = frozenset(s for s in RunStatus if s.is_finished)


def transition_error(current: RunStatus, target: RunStatus) -> str | None:
    """Why a run that is ``current`` cannot become ``target``, or ``None`` if it can.

    The one table of legal moves, used by the ``mark_*`` methods and by ``run.status = ...``:
    PENDING -> RUNNING -> COMPLETED; PENDING or RUNNING -> FAILED,
    CANCELLED or INTERRUPTED; a finished run never moves. Staying in the same status is not a
    transition and is not checked here.
    """
    if current is not _PENDING and current is not _RUNNING:
        return f"it is already {current.value}; it cannot become {target.value}"
    if target is _PENDING and current is not _PENDING:
        return f"it is {current.value}; a run cannot go back to pending"
    if target is _RUNNING and current is not _PENDING:
        return f"it is {current.value}; only a pending run can start"
    if target is _COMPLETED and current is not _RUNNING:
        return f"it is {current.value}; only a running run can complete"
    return None


@dataclass(frozen=True, slots=True)
class RunOwner:
    """The process that owns (drives) an unfinished run: host name, pid and process start time.

    The start time (``psutil.Process(pid).create_time()``, seconds since the epoch) tells a live
    owner from an unrelated process that got the same pid later.
    """

    host: str
    pid: int
    started_at: float

    @classmethod
    def current(cls) -> RunOwner:
        """Return the owner record of the calling process (cached; a forked child makes its
        own)."""
        # Registries stamp it on every run they add; os.getpid() is a system call each time, so
        # the record is kept until a fork (see _after_fork) rather than checked against the pid.
        global _current_owner
        owner = _current_owner
        if owner is None:
            pid = os.getpid()
            owner = _current_owner = cls(
                socket.gethostname(), pid, psutil.Process(pid).create_time()
            )
        return owner

    def is_alive(self) -> bool:
        """Return ``True`` if this owner process is still running.

        A different host name counts as gone: SQLite in WAL mode only works between processes of
        one host, so a run owned by another host name comes from an earlier incarnation (e.g. a
        container recreated with a new host name). The calling process itself is judged by its
        own record (:meth:`current`), whatever the clock did since. A zombie
        counts as gone, and so does a live process with this pid but another start time (the
        pid was reused).
        """
        if self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            # This very process: judged by its own record, read once at its start, whatever
            # the clock did since (a VM paused then stepped: its own runs looked orphaned).
            return same_start(RunOwner.current().started_at, self.started_at)
        try:
            proc = psutil.Process(self.pid)
            if proc.status() == psutil.STATUS_ZOMBIE:
                return False
            created = proc.create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            # AccessDenied on create_time means a process of another user: not our owner.
            return False
        # create_time is the boot time (whole seconds, moved by NTP now and then) plus clock
        # ticks: allow for float rounding and for the boot time's moves.
        return same_start(created, self.started_at)


def registry_file(path: str) -> str | None:
    """The file a SQLite registry opened at ``path`` keeps its runs in (a path, or a ``file:``
    URI, as SQLite reads one); None for none (``:memory:``)."""
    if path == ":memory:":
        return None
    if path.startswith("file:"):
        uri = urllib.parse.urlsplit(path)
        if "memory" in urllib.parse.parse_qs(uri.query).get("mode", ()):
            return None
        path = urllib.parse.unquote(uri.path)
        if path in ("", ":memory:"):
            return None
        if len(path) > 2 and path[0] == "/" and path[2] == ":" and path[1].isalpha():
            path = path[1:]  # file:///C:/runs.db names C:/runs.db (Windows)
    return path


def owner_alive(owner: RunOwner, registry_path: str | None) -> bool:
    """Whether ``owner`` lives: :meth:`RunOwner.is_alive`, and two cases it cannot see.

    - **A renamed host.** An owner under another host name whose pid is a live process here
      with the recorded start: this host's process, renamed since (a container recreated with a
      new name starts its pids afresh; a start that matches is not a coincidence).
    - **A step of the wall clock** (Linux). A start time is read as the boot time plus the ticks
      since boot, the boot time being worked out from the wall clock: a step (a VM resumed,
      ``chronyc makestep``) moves every start read after it, and a live owner looked dead (the
      next process to open the registry stopped its runs' trees). An owner whose pid is a live
      process with a start a whole number of seconds off, and that holds the registry file
      (``registry_path``) open, counts as alive. A process that took a dead owner's pid would
      have to start a whole number of seconds after it (1 in 100 at a tick's precision) and
      open the same registry file.

    Our own pid is judged by our own record, which is exact.
    """
    if owner.is_alive():
        return True
    if owner.pid == os.getpid():
        return owner.started_at == RunOwner.current().started_at  # (a renamed host: us)
    try:
        if not math.isfinite(owner.started_at):
            return False
        proc = psutil.Process(owner.pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        created = proc.create_time()
        if owner.host != socket.gethostname():
            return same_start(created, owner.started_at)
        path = None if registry_path is None else registry_file(registry_path)
        if path is None or not STARTS_MOVE_WITH_THE_CLOCK:
            return False
        apart = created - owner.started_at
        if abs(apart - round(apart)) >= _START_ROUNDING:
            return False
        target = os.stat(path)
        for opened in proc.open_files():
            with contextlib.suppress(OSError):
                found = os.stat(opened.path)
                if (found.st_dev, found.st_ino) == (target.st_dev, target.st_ino):
                    return True
    except (psutil.Error, OSError, ArithmeticError, ValueError, TypeError):
        return False
    return False


# The calling process's owner record, once made.
_current_owner: RunOwner | None = None


def _after_fork() -> None:
    """In a forked child: forget the parent's owner record and its unused run ids."""
    global _current_owner, _tails
    _current_owner = None
    _tails = iter(())


after_fork_in_child(_after_fork)


def _as_status(value: object) -> RunStatus:
    if isinstance(value, RunStatus):
        return value
    if isinstance(value, str):
        try:
            return RunStatus(value)
        except ValueError:
            pass
    raise InvalidRunError(f"unknown run status {value!r}")


def _as_utc(name: str, value: datetime) -> datetime:
    if value.__class__ is datetime and value.tzinfo is UTC:
        return value
    if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
        raise InvalidRunError(f"{name} must be a timezone-aware datetime, got {value!r}")
    return value.astimezone(UTC)


@dataclass(slots=True, eq=True, init=False)
class Run:
    """One execution of a module, as stored in a run registry and shown to users.

    Fields are plain data, except ``status``: change it through the ``mark_*`` methods (which
    also record the pid, exit code or reason) or by assigning it (``run.status =
    RunStatus.RUNNING``, as the PrismQ guide does). Both check the move against
    :func:`transition_error` and raise :class:`RunStateError` on an impossible one (a pending run
    assigned COMPLETED, a finished run assigned anything else), and both stamp ``started_at``
    (on RUNNING) and ``finished_at`` (on a final status) when they are not set yet. Assigning
    the current status again does nothing; an unknown status raises :class:`InvalidRunError`.
    The constructor and :meth:`from_dict` accept any status (history being imported).
    Datetimes are timezone-aware (naive ones raise :class:`InvalidRunError`) and normalised
    to UTC.

    ``output_tail`` is a list of the last output lines, without their line endings (a list rather
    than one string so a UI can show lines without re-splitting). ``peak_rss_bytes`` and
    ``cpu_time_seconds`` are filled by per-run resource accounting when it is enabled.
    ``owner`` is the process driving the run; registries stamp the current process when a run
    without an owner is added, and use it to find runs orphaned by a crash. ``worker`` is the
    address of the cluster worker the module ran on (``None`` for a run on this host; see
    ``prismq_subprocess.dask``); ``pid`` is then the child's pid on that worker's machine.
    """

    module_id: str = ""
    module_name: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)
    run_id: str = field(default_factory=new_run_id)
    status: RunStatus = RunStatus.PENDING
    exit_code: int | None = None
    error_message: str | None = None
    created_at: datetime = field(default_factory=utc_now)
    started_at: datetime | None = None
    finished_at: datetime | None = None
    pid: int | None = None
    mode: str = "async"
    output_tail: list[str] = field(default_factory=list)
    peak_rss_bytes: int | None = None
    cpu_time_seconds: float | None = None
    owner: RunOwner | None = None
    worker: str | None = None

    if TYPE_CHECKING:
        # ``status``'s own slot under a second name (set up below the class): reading or
        # assigning ``run._status`` is a plain slot access (about a sixth of the cost of the
        # property's call), without the transition check. For the per-run paths only: this
        # module's transitions and copies, the in-memory registry and the task manager.
        @property
        def _status(self) -> RunStatus: ...

        @_status.setter
        def _status(self, value: RunStatus) -> None: ...

    # Written out rather than generated by the dataclass (init=False above): a run is created per
    # task, and the generated one assigned ``status`` through its checking property (whose
    # "not set yet" case costs an exception) and then validated in __post_init__. The fields
    # above keep their defaults for fields() and the documentation;
    # test_constructor_matches_fields keeps the two lists in step.
    def __init__(
        self,
        module_id: str = "",
        module_name: str = "",
        parameters: dict[str, Any] | None = None,
        run_id: str | None = None,
        status: RunStatus = RunStatus.PENDING,
        exit_code: int | None = None,
        error_message: str | None = None,
        created_at: datetime | None = None,
        started_at: datetime | None = None,
        finished_at: datetime | None = None,
        pid: int | None = None,
        mode: str = "async",
        output_tail: list[str] | None = None,
        peak_rss_bytes: int | None = None,
        cpu_time_seconds: float | None = None,
        owner: RunOwner | None = None,
        worker: str | None = None,
    ) -> None:
        """Create a run; ``None`` for ``parameters``, ``run_id``, ``created_at`` or
        ``output_tail`` means the default (``{}``, a new random id, now, ``[]``).

        Raises:
            InvalidRunError: an empty or non-str ``run_id``, an unknown ``status``, a
                datetime that is naive or not a datetime, or an ``owner`` that is not a
                :class:`RunOwner`.
        """
        if run_id is None:
            run_id = new_run_id()
        elif not isinstance(run_id, str) or not run_id:
            raise InvalidRunError(f"run_id must be a non-empty str, got {run_id!r}")
        self.module_id = module_id
        self.module_name = module_name
        self.parameters = {} if parameters is None else parameters
        self.run_id = run_id
        self._status = status if status.__class__ is RunStatus else _as_status(status)
        self.exit_code = exit_code
        self.error_message = error_message
        self.created_at = _now(UTC) if created_at is None else _as_utc("created_at", created_at)
        self.started_at = None if started_at is None else _as_utc("started_at", started_at)
        self.finished_at = None if finished_at is None else _as_utc("finished_at", finished_at)
        self.pid = pid
        self.mode = mode
        self.output_tail = [] if output_tail is None else output_tail
        self.peak_rss_bytes = peak_rss_bytes
        self.cpu_time_seconds = cpu_time_seconds
        if owner is not None and not isinstance(owner, RunOwner):
            # (It broke every registry write later, with an AttributeError.)
            raise InvalidRunError(f"owner must be a RunOwner or None, got {owner!r}")
        self.owner = owner
        self.worker = worker

    @property
    def is_finished(self) -> bool:
        """``True`` once the run reached a final status."""
        status = self._status
        return status is not _PENDING and status is not _RUNNING

    @property
    def duration(self) -> float | None:
        """Seconds from start to finish; while running, from start to now; ``None`` if never
        started."""
        if self.started_at is None:
            return None
        end = self.finished_at if self.finished_at is not None else utc_now()
        return max(0.0, (end - self.started_at).total_seconds())

    def _assign_status(self, current: RunStatus, target: RunStatus) -> None:
        if target is current:
            return
        self._transition(target)
        now = utc_now()
        if target is _RUNNING and self.started_at is None:
            self.started_at = now
        if target.is_finished and self.finished_at is None:
            self.finished_at = now

    def _transition(self, target: RunStatus) -> None:
        why = transition_error(self._status, target)
        if why is not None:
            raise RunStateError(f"run {self.run_id}: {why}")
        self._status = target

    def _refuse(self, target: RunStatus) -> NoReturn:
        why = transition_error(self._status, target)
        raise RunStateError(f"run {self.run_id}: {why or 'transition refused'}")

    # The mark_* methods check their one legal source state inline (the same rule as
    # transition_error, which words the refusal): the task manager calls two per run.
    def _finish(self, target: RunStatus) -> None:
        status = self._status
        if status is not _PENDING and status is not _RUNNING:
            self._refuse(target)
        self._status = target
        self.finished_at = _now(UTC)

    def mark_running(self, pid: int | None = None) -> None:
        """PENDING -> RUNNING; records ``pid`` (``None`` for in-process work) and the start time.

        Raises:
            RunStateError: the run is not pending.
        """
        if self._status is not _PENDING:
            self._refuse(_RUNNING)
        self._status = _RUNNING
        self.pid = pid
        self.started_at = _now(UTC)

    def mark_completed(self, exit_code: int | None = 0) -> None:
        """RUNNING -> COMPLETED with ``exit_code`` (``0``, or ``None`` when there is no exit code).

        Raises:
            RunStateError: the run is not running, or ``exit_code`` is non-zero (a non-zero exit
                is a failure: use :meth:`mark_failed`).
        """
        if exit_code != 0 and exit_code is not None:
            raise RunStateError(
                f"exit code {exit_code} is a failure; use mark_failed() for run {self.run_id}"
            )
        if self._status is not _RUNNING:
            self._refuse(_COMPLETED)
        self._status = _COMPLETED
        self.finished_at = _now(UTC)
        self.exit_code = exit_code

    def mark_failed(self, error: str, exit_code: int | None = None) -> None:
        """PENDING/RUNNING -> FAILED with an error message and optional exit code.

        Raises:
            RunStateError: the run is already finished.
        """
        self._finish(_FAILED)
        self.error_message = error
        self.exit_code = exit_code

    def mark_cancelled(self, reason: str = "cancelled") -> None:
        """PENDING/RUNNING -> CANCELLED; ``reason`` goes to ``error_message``.

        Raises:
            RunStateError: the run is already finished.
        """
        self._finish(_CANCELLED)
        self.error_message = reason

    def mark_interrupted(self, reason: str) -> None:
        """PENDING/RUNNING -> INTERRUPTED (its owner died before it finished).

        Raises:
            RunStateError: the run is already finished.
        """
        self._finish(_INTERRUPTED)
        self.error_message = reason

    def copy(self) -> Run:
        """Return a deep copy (registries hand these out so callers can't alter the store)."""
        return self._copy_into(_new_instance(Run), list(self.output_tail))

    def _copy_into(self, new: Run, output_tail: list[str]) -> Run:
        """Make ``new`` a deep copy of this run, with ``output_tail`` as its tail; return it.

        ``new`` may be a fresh ``object.__new__(Run)`` (what :meth:`copy` passes) or an
        existing run nobody else holds (the in-memory registry refreshes its stored copies in
        place). Nothing of ``new`` changes if this raises.
        """
        # Registries copy on every write and read, so this is written out field by field (about
        # 5x faster than a loop over the fields, and far faster than copy.deepcopy): only the two
        # containers are mutable (datetimes, enums and RunOwner are immutable). The parameters
        # are copied first: deepcopy is the one step that can fail.
        # test_copy_covers_every_field keeps the list complete.
        parameters = self.parameters
        new.parameters = _copied_parameters(self.run_id, parameters) if parameters else {}
        new.module_id = self.module_id
        new.module_name = self.module_name
        new.run_id = self.run_id
        new._status = self._status
        new.exit_code = self.exit_code
        new.error_message = self.error_message
        new.created_at = self.created_at
        new.started_at = self.started_at
        new.finished_at = self.finished_at
        new.pid = self.pid
        new.mode = self.mode
        new.output_tail = output_tail
        new.peak_rss_bytes = self.peak_rss_bytes
        new.cpu_time_seconds = self.cpu_time_seconds
        new.owner = self.owner
        new.worker = self.worker
        return new

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict: datetimes as ISO 8601 strings, status as its value, and the
        computed ``duration``. :meth:`from_dict` reverses it (ignoring ``duration``)."""

        def iso(value: datetime | None) -> str | None:
            return None if value is None else value.isoformat()

        owner = self.owner
        return {
            "run_id": self.run_id,
            "module_id": self.module_id,
            "module_name": self.module_name,
            "parameters": _copied_parameters(self.run_id, self.parameters),
            "status": self.status.value,
            "exit_code": self.exit_code,
            "error_message": self.error_message,
            "created_at": iso(self.created_at),
            "started_at": iso(self.started_at),
            "finished_at": iso(self.finished_at),
            "duration": self.duration,
            "pid": self.pid,
            "mode": self.mode,
            "output_tail": list(self.output_tail),
            "peak_rss_bytes": self.peak_rss_bytes,
            "cpu_time_seconds": self.cpu_time_seconds,
            "owner": None
            if owner is None
            else {"host": owner.host, "pid": owner.pid, "started_at": owner.started_at},
            "worker": self.worker,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Run:
        """Build a run from :meth:`to_dict` output (unknown keys and ``duration`` are ignored).

        Raises:
            InvalidRunError: a required key is missing or a value has the wrong shape.
            InvalidParametersError: parameters that cannot be copied (nested too deeply).
        """
        if not isinstance(data, Mapping):
            raise InvalidRunError(
                f"Run.from_dict() needs a mapping (what to_dict() returns), got "
                f"{type(data).__name__}"
            )

        def when(key: str) -> datetime | None:
            value = data.get(key)
            if value is None:
                return None
            if isinstance(value, datetime):
                return value
            try:
                return datetime.fromisoformat(value)
            except (TypeError, ValueError):
                raise InvalidRunError(f"{key}: not an ISO 8601 datetime: {value!r}") from None

        parameters = data.get("parameters")
        if parameters is not None and not isinstance(parameters, Mapping):
            raise InvalidRunError(f"parameters: not a mapping: {parameters!r}")
        output_tail = data.get("output_tail")
        if output_tail is not None and (
            not isinstance(output_tail, list | tuple)
            or not all(isinstance(line, str) for line in output_tail)
        ):
            raise InvalidRunError(f"output_tail: not a list of str: {output_tail!r}")
        try:
            owner_data = data.get("owner")
            owner = (
                None
                if owner_data is None
                else RunOwner(
                    str(owner_data["host"]),
                    int(owner_data["pid"]),
                    float(owner_data["started_at"]),
                )
            )
            created_at = when("created_at")
            if data["run_id"] is None:
                # (Run(run_id=None) makes a new id: a record without its id is malformed.)
                raise InvalidRunError("malformed run data: run_id is None")
            return cls(
                run_id=data["run_id"],
                module_id=data.get("module_id", ""),
                module_name=data.get("module_name", ""),
                parameters=_copied_parameters(str(data["run_id"]), dict(parameters or {})),
                status=data.get("status", RunStatus.PENDING),
                exit_code=data.get("exit_code"),
                error_message=data.get("error_message"),
                created_at=created_at if created_at is not None else utc_now(),
                started_at=when("started_at"),
                finished_at=when("finished_at"),
                pid=data.get("pid"),
                mode=data.get("mode", "async"),
                output_tail=list(output_tail or ()),
                peak_rss_bytes=data.get("peak_rss_bytes"),
                cpu_time_seconds=data.get("cpu_time_seconds"),
                owner=owner,
                worker=data.get("worker"),
            )
        except (KeyError, TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, InvalidRunError | InvalidParametersError):
                raise  # (parameters too deep to copy: said as such, as by to_dict())
            raise InvalidRunError(f"malformed run data: {exc!r}") from exc


def _copied_parameters(run_id: str, parameters: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of a run's parameters.

    Raises:
        InvalidParametersError: parameters nested too deeply to copy (a bare RecursionError,
            where JSON, which needs half the depth, had taken them), or holding something
            that cannot be copied (a lock: a bare TypeError).
    """
    try:
        return copy.deepcopy(parameters)
    except (RecursionError, TypeError, copy.Error) as exc:
        raise InvalidParametersError(
            f"run {run_id!r:.80}: its parameters cannot be copied ({type(exc).__name__}: "
            f"{exc}); keep them plain JSON data, not too deeply nested"
        ) from None


_FIELD_NAMES = tuple(f.name for f in fields(Run))

_STATUS_SLOT: Any = Run.__dict__["status"]
_get_status_slot = _STATUS_SLOT.__get__
_set_status_slot = _STATUS_SLOT.__set__
setattr(Run, "_status", _STATUS_SLOT)  # noqa: B010 (see the TYPE_CHECKING block in Run)
_new_instance = object.__new__


def _set_status(run: Run, value: object) -> None:
    """``run.status = value``: assignments go through the transition rules (see :class:`Run`)."""
    try:
        current = _get_status_slot(run)
    except AttributeError:
        # Not set yet: an object made without __init__ (unpickling sets its fields one by one).
        _set_status_slot(run, _as_status(value))
        return
    run._assign_status(current, _as_status(value))


# Replacing the class attribute after the dataclass is built keeps ``status`` a normal field
# (constructor argument, __eq__, __repr__, fields()) while checking assignments to it. The
# getter is the slot's own (C) one, so reading ``run.status``, which registries and the task
# manager do many times per run, costs no Python call; only assignments pay for the check.
setattr(  # noqa: B010
    Run, "status", property(_get_status_slot, _set_status, doc="Where the run is in its life.")
)
