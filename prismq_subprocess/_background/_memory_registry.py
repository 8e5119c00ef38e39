"""The run registry interface (:class:`BaseRunRegistry`) and its in-memory store
(:class:`RunRegistry`).

Every store has the same async interface, so a web backend can switch from memory to SQLite
(``_sqlite_registry.py``) without touching its handlers. Stores hand out copies: changing a
returned :class:`Run` does nothing until it is passed to :meth:`~BaseRunRegistry.update_run`.

Retention: ``max_runs`` keeps at most that many *finished* runs (the newest by ``created_at``);
``max_age`` drops finished runs that finished longer ago than that. Unfinished runs are never
dropped by retention. Both apply after every :meth:`~BaseRunRegistry.add_run` and on demand via
:meth:`~BaseRunRegistry.apply_retention`.
"""

from __future__ import annotations

import abc
import asyncio
import math
import sys
from collections.abc import Collection
from datetime import datetime, timedelta
from typing import Self

from .._core._closing import AsyncResource
from .._core._daemon_thread import call_in_daemon_thread
from .._core._exceptions import (
    DuplicateRunError,
    InvalidArgumentTypeError,
    InvalidIntervalError,
    InvalidQueryError,
    InvalidRunIdError,
    InvalidTimeoutError,
    RegistryClosedError,
    RegistryReadOnlyError,
    RunClaimedError,
    RunNotFoundError,
    RunStateError,
)
from .._core._validation import reason_text
from .._platform._orphans import ProcessIdentity
from ._run_checks import check_storable
from ._run_record import (
    ACTIVE_STATUSES,
    Run,
    RunOwner,
    RunStatus,
    owner_alive,
    registry_file,
    utc_now,
)

__all__ = [
    "DEFAULT_POLL_INTERVAL",
    "OWNER_CHECK_INTERVAL",
    "BaseRunRegistry",
    "RunRegistry",
    "check_filters",
    "check_registry",
    "check_wait",
    "direct_writes",
    "file_of",
    "not_a_run",
    "orphan_reason",
    "owner_lives",
    "reason_text",
    "updates_directly",
]


def _check_paging(limit: int, offset: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise InvalidQueryError(f"limit must be an int >= 0, got {limit!r}")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise InvalidQueryError(f"offset must be an int >= 0, got {offset!r}")


def check_filters(status: RunStatus | str | None, module_id: str | None) -> RunStatus | None:
    """The status filter as a member (its value, e.g. ``"running"``, is taken too).

    Raises:
        InvalidQueryError: an unknown status, or a ``module_id`` that is not a str: a mistake
            that would otherwise match nothing (or, in SQLite, fail with a bare ValueError).
    """
    if status is not None and status.__class__ is not RunStatus:
        try:
            status = RunStatus(status)
        except ValueError:
            known = ", ".join(member.value for member in RunStatus)
            raise InvalidQueryError(
                f"status must be a RunStatus or one of its values ({known}), got {status!r}"
            ) from None
    if module_id is not None and not isinstance(module_id, str):
        raise InvalidQueryError(f"module_id must be a str or None, got {module_id!r}")
    return status


def age_cutoff(age: timedelta) -> datetime | None:
    """The moment ``age`` before now; ``None`` if that is before the year 1 (``timedelta.max``,
    a "keep for ever"): no run is that old."""
    try:
        return utc_now() - age
    except OverflowError:
        return None


def cutoff_from(age: timedelta | datetime) -> datetime | None:
    """Turn an age (``timedelta``: that long before now) or an aware ``datetime`` into a cutoff;
    ``None`` for an age older than any date (nothing is that old).

    Raises:
        InvalidQueryError: a negative age, a naive datetime or another type.
    """
    if isinstance(age, timedelta):
        if age < timedelta(0):
            raise InvalidQueryError(f"age must not be negative, got {age!r}")
        return age_cutoff(age)
    if isinstance(age, datetime):
        if age.tzinfo is None or age.utcoffset() is None:
            raise InvalidQueryError(f"cutoff datetime must be timezone-aware, got {age!r}")
        return age
    raise InvalidQueryError(f"age must be a timedelta or datetime, got {age!r}")


#: How often a process that waits for another one's run looks at the registry (seconds).
DEFAULT_POLL_INTERVAL = 0.05
#: Cancel requests a store keeps in memory before request_cancel first drops those of finished
#: runs (then at twice what is left).
_CANCEL_SWEEP_MIN = 64
#: How often such a waiter checks that the run's owner process is still alive (seconds).
OWNER_CHECK_INTERVAL = 1.0


def file_of(registry: object) -> str | None:
    """The file ``registry`` keeps its runs in, however it was spelled (a path, or a ``file:``
    URI, as SQLite reads one); None for none (memory)."""
    path = getattr(registry, "path", None)
    return registry_file(path) if isinstance(path, str) else None


async def owner_lives(owner: RunOwner, registry: object) -> bool:
    """Whether ``owner`` lives, a renamed host and a step of the wall clock allowed for (see
    :func:`owner_alive`): what every check of a run's owner asks, not ``RunOwner.is_alive``
    alone (a read-only viewer after such a step ended a live owner's run as INTERRUPTED).
    Asked in a thread: after a step of the clock it reads the owner's open files (a stat per
    descriptor), milliseconds the event loop would stand still."""
    alive = await call_in_daemon_thread(
        owner_alive, (owner, file_of(registry)), {}, "prismq-owner-check"
    )
    return bool(alive)


def orphan_reason(run: Run) -> str:
    """The ``error_message`` of a run found unfinished with its owner gone."""
    owner = run.owner
    if owner is None:
        return "run has no recorded owner process; it cannot still be running"
    return (
        f"owner process {owner.pid} on host {owner.host!r} is gone; the run was "
        f"left {run.status.value} (crash or restart)"
    )


async def settle_orphan(registry: BaseRunRegistry, run_id: str) -> Run | None:
    """The owner of the unfinished run ``run_id`` is gone: mark it INTERRUPTED through
    ``registry.recover_orphans()`` and return ``None`` (look at the registry again). A registry
    opened read-only cannot record it: return the run as stored when it finished meanwhile (or
    ``None`` when it is gone), else a copy marked INTERRUPTED, what a writer will record (not
    stored), so a reader that noticed the death still ends.

    Raises:
        what ``registry.recover_orphans`` raises, but ``RegistryReadOnlyError``.
    """
    try:
        await registry.recover_orphans()
    except RegistryReadOnlyError:
        # Read after the owner was seen dead: it writes nothing more, so this is the last word
        # until a writer recovers the run.
        run = await registry.get_run(run_id)
        if run is not None and not run.is_finished:
            run.mark_interrupted(orphan_reason(run))
        return run
    return None


# An int wait longer than this cannot be a float (asyncio's clock): a bare OverflowError.
_LONGEST_INT_WAIT = int(sys.float_info.max)


def check_wait(timeout: float | None, poll_interval: float = DEFAULT_POLL_INTERVAL) -> None:
    """Refuse a bad ``timeout`` / ``poll_interval`` of a wait on the registry.

    Raises:
        InvalidTimeoutError: a negative or non-number ``timeout``.
        InvalidIntervalError: ``poll_interval`` is not a positive number.
    """
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not timeout >= 0  # also refuses NaN
        or (isinstance(timeout, int) and timeout > _LONGEST_INT_WAIT)  # (no float holds it)
    ):
        raise InvalidTimeoutError(f"timeout must be seconds >= 0 or None, got {timeout!r:.40}")
    if (
        isinstance(poll_interval, bool)
        or not isinstance(poll_interval, int | float)
        or (isinstance(poll_interval, int) and poll_interval > _LONGEST_INT_WAIT)
        or not math.isfinite(poll_interval)
        or poll_interval <= 0
    ):
        raise InvalidIntervalError(f"poll_interval must be seconds > 0, got {poll_interval!r:.40}")


def not_registered(run_id: str) -> RunNotFoundError:
    """The error ``update_run`` raises for a run that was never added (or was deleted)."""
    return RunNotFoundError(
        f"no run with run_id {run_id!r} is registered; add it first with add_run() "
        "(BackgroundTaskManager.start_task adds the runs it is given)"
    )


def _sources(target: RunStatus) -> frozenset[RunStatus]:
    if target is RunStatus.PENDING:
        return frozenset({RunStatus.PENDING})
    if target is RunStatus.RUNNING:
        return frozenset({RunStatus.PENDING, RunStatus.RUNNING})
    return frozenset({RunStatus.PENDING, RunStatus.RUNNING, target})


_SOURCES = {target: _sources(target) for target in RunStatus}
# A global read is about ten times cheaper than RunStatus.COMPLETED on 3.11 (checked per write).
_COMPLETED = RunStatus.COMPLETED


def stored_statuses_for(target: RunStatus) -> frozenset[RunStatus]:
    """The statuses a stored run may have for an update to ``target`` to be accepted.

    Updates only move forward (PENDING, then RUNNING, then a final status) and a finished run
    never changes status. Steps may be skipped: a caller may store a run only when it is added
    and when it ends.
    """
    return _SOURCES[target]


def run_id_of(run_id: object) -> str:
    """``run_id`` if it can name a run; else the documented error before any look-up (a list
    gave ``sqlite3.ProgrammingError`` or a bare ``TypeError`` from the first dict it met)."""
    if run_id.__class__ is str or isinstance(run_id, str):
        return run_id
    raise InvalidRunIdError(f"a run id is a str, got {type(run_id).__name__}: {run_id!r}")


def run_ids_of(run_ids: object) -> list[str]:
    """:func:`run_id_of` for each of a collection of run ids (a str itself is refused)."""
    if isinstance(run_ids, str | bytes) or not isinstance(run_ids, Collection):
        raise InvalidRunIdError(f"expected a collection of run ids, got {run_ids!r}")
    return [run_id_of(run_id) for run_id in run_ids]


def check_identity(identity: object) -> None:
    if not isinstance(identity, ProcessIdentity):
        raise InvalidArgumentTypeError(
            f"record_child() takes a ProcessIdentity, not {type(identity).__name__}"
        )


def claimed_by_another(run_id: str, owner: RunOwner | None) -> RunClaimedError:
    """The error of an update whose copy names another owner than the stored run's."""
    where = "another process" if owner is None else f"pid {owner.pid} on {owner.host}"
    error = RunClaimedError(
        f"cannot store run {run_id}: {where} claimed it since this copy was read; it is that "
        "process's to run and record (nothing was changed)"
    )
    error.run_id = run_id
    return error


def stopped_for_claim(run_id: str, pid: int | None) -> RunClaimedError:
    """The error of a runner that started a child for ``run_id`` and then found the run
    claimed by another process (its RUNNING record refused): the child was stopped."""
    what = "its child here" if pid is None else f"its child here (pid {pid})"
    error = RunClaimedError(
        f"run {run_id} was claimed by another process before it was recorded running here; "
        f"{what} was stopped, and nothing more is recorded here (the run is that process's)"
    )
    error.run_id = run_id
    return error


def not_a_run(method: str, run: object) -> InvalidArgumentTypeError:
    """The error of a registry ``method`` given something else than a :class:`Run` (it failed
    with a bare ``AttributeError`` from inside)."""
    return InvalidArgumentTypeError(f"{method}() takes a Run, not {type(run).__name__}")


def _check_claim(run: Run, owner: RunOwner | None) -> None:
    if not isinstance(run, Run):
        raise InvalidArgumentTypeError(f"claim_run() takes a Run, not {type(run).__name__}")
    if owner is not None and not isinstance(owner, RunOwner):
        raise InvalidArgumentTypeError(
            f"claim_run()'s owner is a RunOwner or None, not {type(owner).__name__}"
        )
    if run._status is not RunStatus.PENDING:
        raise RunStateError(
            f"claim_run() stores a PENDING run (its new owner's copy); run {run.run_id} is "
            f"{run._status.value}"
        )


def unstorable(run: Run) -> RunStateError | None:
    """The error for a run no update may store whatever is stored (COMPLETED, never started)."""
    if run._status is _COMPLETED and run.started_at is None:
        return RunStateError(
            f"cannot store run {run.run_id} as completed: it never started (no started_at); use "
            "mark_running() then mark_completed(), or assign RUNNING before COMPLETED"
        )
    return None


def refused_update(run_id: str, stored: RunStatus, run: Run) -> RunStateError | None:
    """The error for an update of a run stored as ``stored`` to ``run``, or ``None`` if fine."""
    status = run._status
    if status is _COMPLETED and run.started_at is None:
        return unstorable(run)
    return refused_status(run_id, stored, status)


def refused_status(run_id: str, stored: RunStatus, status: RunStatus) -> RunStateError | None:
    """The error for an update of a run stored as ``stored`` to a run whose status is
    ``status`` (and which :func:`unstorable` accepts), or ``None`` if fine."""
    if stored in _SOURCES[status]:
        return None
    return RunStateError(
        f"cannot store run {run_id} as {status.value}: it is stored as {stored.value}, "
        "and a run only moves forward (pending, running, then one final status)"
    )


def finished_moment(run: Run) -> datetime:
    """The moment retention measures a finished run's age from."""
    return run.finished_at if run.finished_at is not None else run.created_at


class BaseRunRegistry(AsyncResource):
    """Async interface of a run store.

    Use it as ``async with registry:`` (opens, then closes); stores that need no setup also work
    without it. After :meth:`aclose` (alias :meth:`close`) every method raises
    :class:`RegistryClosedError`; a closed registry cannot be reopened (make a new one).

    To write a store, subclass this and implement the abstract methods; a store that holds
    resources overrides :meth:`open` and :meth:`aclose` (calling ``super().aclose()``).

    Cancelling a call stops the caller waiting; a store whose work runs in a thread (SQLite) still
    finishes the statement it started.

    Args:
        max_runs: keep at most this many finished runs (``None``: no cap).
        max_age: drop finished runs older than this (``None``: keep them).

    Raises:
        InvalidQueryError: ``max_runs`` < 1 or ``max_age`` not positive.
    """

    def __init__(self, *, max_runs: int | None = None, max_age: timedelta | None = None) -> None:
        if max_runs is not None and (
            isinstance(max_runs, bool) or not isinstance(max_runs, int) or max_runs < 1
        ):
            raise InvalidQueryError(f"max_runs must be an int >= 1 or None, got {max_runs!r}")
        if max_age is not None and (not isinstance(max_age, timedelta) or max_age <= timedelta(0)):
            raise InvalidQueryError(
                f"max_age must be a positive timedelta or None, got {max_age!r}"
            )
        self.max_runs = max_runs
        self.max_age = max_age
        self._closed = False
        # Cancel requests of stores that keep them in memory (one process); see request_cancel.
        self._cancel_requests: dict[str, str] = {}
        # request_cancel sweeps the requests of finished runs once there are this many.
        self._cancel_sweep_at = _CANCEL_SWEEP_MIN

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`aclose`."""
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise RegistryClosedError(f"{type(self).__name__} is closed")

    async def open(self) -> None:
        """Prepare the store (no-op by default). Idempotent.

        Raises:
            RegistryClosedError: the registry was closed.
        """
        self._check_open()

    async def aclose(self) -> None:
        """Release the store's resources; later calls raise :class:`RegistryClosedError`.
        Idempotent."""
        self._closed = True

    async def close(self) -> None:
        """Alias of :meth:`aclose` (the name used before 0.2)."""
        await self.aclose()

    async def __aenter__(self) -> Self:
        """Open the store (see :meth:`open`); leaving the block calls :meth:`aclose`."""
        await self.open()
        return self

    @abc.abstractmethod
    async def add_run(self, run: Run) -> None:
        """Store a new run (a copy of it). A run without ``owner`` gets the current process as
        owner, on the passed object too, so later updates keep it.

        Raises:
            DuplicateRunError: a run with this ``run_id`` is already stored.
            RegistryClosedError: the registry is closed.
        """

    @abc.abstractmethod
    async def update_run(self, run: Run) -> None:
        """Replace the stored run that has ``run.run_id`` with (a copy of) ``run``.

        It is not an upsert: the run must have been added (``BackgroundTaskManager.start_task``
        and ``ModuleRunner`` add theirs), so a mistyped id or a run already removed by retention
        is an error, not a new row. Statuses only move forward (pending, running, then one final
        status; steps may be skipped), so a stale copy cannot move a finished run back; and a
        run stored COMPLETED must have started (``started_at`` set). The stored owner stays:
        only :meth:`add_run` and :meth:`claim_run` set it (a copy without owner keeps it).

        Raises:
            RunNotFoundError: no run with this ``run_id`` is stored.
            RunClaimedError: ``run.owner`` is another process than the stored owner (it
                claimed the run since this copy was read); nothing is changed.
            RunStateError: the stored run cannot move to ``run.status``; nothing is changed.
            RegistryClosedError: the registry is closed.
        """

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> Run | None:
        """Return a copy of the run, or ``None`` if it is not stored.

        Raises:
            RegistryClosedError: the registry is closed.
        """

    @abc.abstractmethod
    async def list_runs(
        self,
        status: RunStatus | None = None,
        module_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Run]:
        """Return copies of matching runs, newest (``created_at``) first, then paged.

        Raises:
            InvalidQueryError: ``limit`` or ``offset`` is negative (or not an int), ``status``
                is not a :class:`RunStatus` (or one of its values), ``module_id`` not a str.
            RegistryClosedError: the registry is closed.
        """

    @abc.abstractmethod
    async def count_runs(
        self, status: RunStatus | None = None, module_id: str | None = None
    ) -> int:
        """Return how many runs match.

        Raises:
            InvalidQueryError: ``status`` is not a :class:`RunStatus` (or one of its values),
                ``module_id`` not a str.
            RegistryClosedError: the registry is closed.
        """

    @abc.abstractmethod
    async def delete_older_than(self, age: timedelta | datetime) -> int:
        """Delete finished runs that finished before ``now - age`` (or before the given aware
        datetime); unfinished runs are kept. Returns how many were deleted.

        Raises:
            InvalidQueryError: a negative age or a naive datetime.
            RegistryClosedError: the registry is closed.
        """

    @abc.abstractmethod
    async def apply_retention(self) -> int:
        """Apply ``max_age`` and ``max_runs`` now; return how many runs were deleted.

        Raises:
            RegistryClosedError: the registry is closed.
        """

    # -- working across processes ---------------------------------------------------------------
    async def request_cancel(self, run_id: str, reason: str = "cancelled by request") -> bool:
        """Record that ``run_id`` should be cancelled, for whichever process owns it.

        The process that drives the run (its ``BackgroundTaskManager`` or ``ModuleRunner``)
        looks for requests every 50 ms and cancels the run itself; follow it with
        :meth:`wait_finished`. A second request keeps the first reason. ``SQLiteRunRegistry``
        stores the request in the file, so it reaches other processes; this default keeps it in
        this object, so it reaches owners in this process only.

        Returns ``True`` if the run is unfinished (the request is recorded), ``False`` if it is
        finished or unknown.

        Raises:
            RegistryClosedError: the registry is closed.
        """
        reason = reason_text(reason)
        run = await self.get_run(run_id_of(run_id))
        if run is None or run.is_finished:
            return False
        if len(self._cancel_requests) >= self._cancel_sweep_at:
            await self._sweep_cancel_requests()
        self._cancel_requests.setdefault(run_id, reason)
        return True

    async def _sweep_cancel_requests(self) -> None:
        """Drop the requests of runs finished or removed since: their owner asks for a run's
        requests only while it runs, so nothing else would ever drop them (one entry per
        request for good, in a host that stays up for weeks)."""
        requests = self._cancel_requests
        for run_id in list(requests):
            run = await self.get_run(run_id)
            if run is None or run.is_finished:
                requests.pop(run_id, None)
        self._cancel_sweep_at = max(_CANCEL_SWEEP_MIN, 2 * len(requests))

    async def cancel_requests(self, run_ids: Collection[str]) -> dict[str, str]:
        """Return the cancel requests (run id -> reason) recorded for unfinished runs among
        ``run_ids``. What an owner polls; a request stays until its run finishes.

        Raises:
            RegistryClosedError: the registry is closed.
        """
        self._check_open()
        run_ids = run_ids_of(run_ids)
        if not self._cancel_requests:
            return {}
        found: dict[str, str] = {}
        for run_id in run_ids:
            reason = self._cancel_requests.get(run_id)
            if reason is None:
                continue
            run = await self.get_run(run_id)
            if run is None or run.is_finished:
                del self._cancel_requests[run_id]
            else:
                found[run_id] = reason
        return found

    async def claim_run(self, run: Run, owner: RunOwner | None) -> bool:
        """Store ``run`` (PENDING, with its new ``owner``) in place of the stored run if that
        is still PENDING and still has the ``owner`` read before; return whether it was stored.

        A ``run`` without owner gets the current process as owner, on the passed object too
        (as :meth:`add_run` does). The step that makes one process, of several picking up the
        same PENDING run (server workers sharing a SQLite file), its only driver:
        ``BackgroundTaskManager`` takes a stored run over through it, and a ``False`` means
        someone else got there first.

        This default reads, compares and calls :meth:`update_run` with the new owner: it fits a
        store whose ``update_run`` replaces the whole run. A store that keeps the stored owner
        on update, as the built-in ones do, or that several processes share, overrides it with
        one step that checks and sets the owner (:class:`RunRegistry` does it without awaiting,
        :class:`SQLiteRunRegistry` with one conditional ``UPDATE``).

        Raises:
            RunStateError: ``run`` is not PENDING.
            RegistryClosedError: the registry is closed.
        """
        _check_claim(run, owner)
        stored = await self.get_run(run.run_id)
        if stored is None or stored.status is not RunStatus.PENDING or stored.owner != owner:
            return False
        if run.owner is None:
            run.owner = RunOwner.current()  # as add_run stamps it
        await self.update_run(run)
        return True

    async def record_child(self, run_id: str, identity: ProcessIdentity) -> bool:
        """Keep the identity of ``run_id``'s child process (pid, start time, containment cookie;
        ``ModuleRunner`` records it once the child runs), so that a later process recovering
        the run after its owner died can stop the tree still running, and only that tree.

        Returns whether it was kept. A store that dies with its owner (this in-memory one)
        never meets such a run and keeps nothing; :class:`SQLiteRunRegistry` keeps it with the
        run. A store of your own that outlives its owner should keep it too and, in
        :meth:`recover_orphans`, call ``prismq_subprocess.stop_orphan_tree(identity)`` before
        marking the run INTERRUPTED.

        Raises:
            RegistryClosedError: the registry is closed.
        """
        self._check_open()
        run_id_of(run_id)
        check_identity(identity)
        return False

    async def recover_orphans(self) -> list[str]:
        """Mark unfinished runs whose owner process is gone INTERRUPTED (with the reason in
        ``error_message``) and return their ids. Opening a ``SQLiteRunRegistry`` does this;
        call it again whenever you notice a dead owner (``wait_finished`` and live output
        followers do). Runs owned by live processes are left alone.

        Raises:
            RegistryClosedError: the registry is closed.
        """
        recovered: list[str] = []
        alive: dict[RunOwner, bool] = {}  # (most runs share a few owners: one look each)
        for status in sorted(ACTIVE_STATUSES):
            total = await self.count_runs(status=status)
            for run in await self.list_runs(status=status, limit=total):
                owner = run.owner
                if owner is not None:
                    lives = alive.get(owner)
                    if lives is None:
                        lives = alive[owner] = await owner_lives(owner, self)
                    if lives:
                        continue
                # Stores without transactions: look again right before writing, so a run that
                # just finished is not overwritten (SQLiteRunRegistry does it in one transaction).
                fresh = await self.get_run(run.run_id)
                if fresh is None or fresh.is_finished:
                    continue
                fresh.mark_interrupted(orphan_reason(fresh))
                await self.update_run(fresh)
                recovered.append(run.run_id)
        return recovered

    async def wait_finished(
        self,
        run_id: str,
        *,
        timeout: float | None = None,
        poll_interval: float = DEFAULT_POLL_INTERVAL,
    ) -> Run | None:
        """Wait until ``run_id`` has a final status, looking every ``poll_interval`` seconds,
        and return it (``None`` if the run is unknown or was deleted meanwhile). Works for runs
        of any process sharing the store. If the run's owner process is gone (checked at the
        first look, then every second), the run is marked INTERRUPTED (see
        :meth:`recover_orphans`) and returned; a registry opened read-only cannot record that,
        and returns a copy marked INTERRUPTED (not stored).

        Cancellation and timeout leave the run alone.

        Raises:
            TimeoutError: the run did not finish within ``timeout`` seconds.
            InvalidTimeoutError: a negative ``timeout``.
            InvalidIntervalError: ``poll_interval`` is not a positive number.
            RegistryClosedError: the registry is closed.
        """
        check_wait(timeout, poll_interval)
        run_id = run_id_of(run_id)
        loop = asyncio.get_running_loop()
        # The first unfinished look checks the owner too: a wait shorter than the interval
        # (runner.cancel(timeout=0.5), say, called again and again) would never check it.
        next_owner_check = loop.time()
        # The first look is not timed: a run that has finished (or is unknown) is answered
        # whatever the timeout (SQLite's look takes a trip to its thread: timeout=0 raised
        # TimeoutError for a finished run).
        run = await self.get_run(run_id)
        async with asyncio.timeout(timeout):  # (a past deadline cancels at the next await)
            while True:
                if run is None or run.is_finished:
                    return run
                if loop.time() >= next_owner_check:
                    next_owner_check = loop.time() + OWNER_CHECK_INTERVAL
                    owner = run.owner
                    if owner is None or not await owner_lives(owner, self):
                        seen = await settle_orphan(self, run_id)
                        if seen is not None:  # a read-only registry's answer
                            return seen
                        run = await self.get_run(run_id)
                        continue
                await asyncio.sleep(poll_interval)
                run = await self.get_run(run_id)


# The output tail of every stored run that has none (see RunRegistry._add_run_now): never
# changed, and never handed out (Run.copy makes a new list).
_NO_LINES: list[str] = []
_blank = object.__new__


def check_registry(value: object, owner: str) -> BaseRunRegistry:
    """``value`` if it is a run registry (a :class:`BaseRunRegistry`), for ``owner``'s use.

    Raises:
        InvalidArgumentTypeError: anything else (it failed the first run instead, with a bare
            ``AttributeError`` from deep inside, after the object had been taken).
    """
    if not isinstance(value, BaseRunRegistry):
        raise InvalidArgumentTypeError(
            f"{owner}: registry must be a BaseRunRegistry (RunRegistry, SQLiteRunRegistry or a "
            f"subclass of your own), got {type(value).__name__}"
        )
    return value


def direct_writes(registry: BaseRunRegistry) -> RunRegistry | None:
    """``registry`` if its ``add_run`` and ``update_run`` are :class:`RunRegistry`'s own, so a
    caller may use :meth:`RunRegistry._add_run_now` / :meth:`RunRegistry._update_run_now`
    instead (same effect and errors, no coroutine); ``None`` otherwise (SQLite, or a subclass or
    instance that replaces either method and so must be called through it)."""
    if isinstance(registry, RunRegistry):
        cls = type(registry)
        if cls.add_run is _MEMORY_ADD and cls.update_run is _MEMORY_UPDATE:
            overrides = registry.__dict__
            if "add_run" not in overrides and "update_run" not in overrides:
                return registry
    return None


def updates_directly(registry: RunRegistry) -> bool:
    """Whether ``registry``, found by :func:`direct_writes` earlier, still has our own
    ``update_run``: a host (its tests, say) may patch the class or the instance while a run
    works, and the run's later writes must then go through the patch."""
    return type(registry).update_run is _MEMORY_UPDATE and "update_run" not in registry.__dict__


class RunRegistry(BaseRunRegistry):
    """In-memory run registry (the default store). History is lost when the process exits.

    Not thread-safe: use it from one event loop. See :class:`BaseRunRegistry` for the interface,
    retention and errors.
    """

    def __init__(self, *, max_runs: int | None = None, max_age: timedelta | None = None) -> None:
        super().__init__(max_runs=max_runs, max_age=max_age)
        # Insertion order is the tie-break for equal created_at, as rowid is in SQLite.
        self._runs: dict[str, Run] = {}

    async def add_run(self, run: Run) -> None:
        if run.__class__ is not Run and not isinstance(run, Run):
            raise not_a_run("add_run", run)
        self._add_run_now(run)

    async def update_run(self, run: Run) -> None:
        if run.__class__ is not Run and not isinstance(run, Run):
            raise not_a_run("update_run", run)
        self._update_run_now(run)

    async def claim_run(self, run: Run, owner: RunOwner | None) -> bool:
        # Atomic: nothing here awaits between the look and the write.
        _check_claim(run, owner)
        self._check_open()
        stored = self._runs.get(run.run_id)
        if stored is None or stored._status is not RunStatus.PENDING or stored.owner != owner:
            return False
        if run.owner is None:
            run.owner = RunOwner.current()  # as add_run stamps it
        previous, stored.owner = stored.owner, run.owner  # (the one write that changes it)
        try:
            self._update_run_now(run)
        except BaseException:
            stored.owner = previous  # (a copy that failed: nothing changed)
            raise
        return True

    # The writes themselves, synchronous: nothing in them waits, and BackgroundTaskManager calls
    # them directly (see direct_writes) to save a coroutine per write on its per-run path.
    #
    # The stored runs are this registry's own copies, never handed out (reads copy them again),
    # so an update refreshes the stored copy in place rather than allocating a new one, and a
    # run with no output tail shares _NO_LINES: fewer objects per run for the cyclic GC to
    # allocate and trace.
    def _add_run_now(self, run: Run) -> None:
        """:meth:`add_run` without the coroutine: the same checks, copy and errors."""
        if self._closed:
            self._check_open()
        run_id = run.run_id
        runs = self._runs
        if run_id in runs:
            raise DuplicateRunError(f"a run with run_id {run_id!r} is already registered")
        check_storable(run, adding=True)
        if run.owner is None:
            run.owner = RunOwner.current()
        tail = run.output_tail
        runs[run_id] = run._copy_into(_blank(Run), list(tail) if tail else _NO_LINES)
        if self.max_runs is not None or self.max_age is not None:
            self._retain()

    def _update_run_now(self, run: Run) -> None:
        """:meth:`update_run` without the coroutine: the same checks, copy and errors."""
        check_storable(run, adding=False)  # (first, as SQLite checks the row it builds)
        stored = self._stored_to_update(run)
        owner = stored.owner
        tail = run.output_tail
        run._copy_into(stored, list(tail) if tail else _NO_LINES)
        stored.owner = owner  # (set only by add_run and claim_run)
        if self._cancel_requests and stored.is_finished:
            # Its request (if any) is done with: owners ask only about unfinished runs.
            self._cancel_requests.pop(run.run_id, None)

    def _stored_to_update(self, run: Run) -> Run:
        """The stored copy an update of ``run`` may overwrite; the update's errors otherwise."""
        if self._closed:
            self._check_open()
        run_id = run.run_id
        stored = self._runs.get(run_id)
        if stored is None:
            raise not_registered(run_id)
        owner = run.owner
        if owner is not stored.owner and owner is not None and owner != stored.owner:
            raise claimed_by_another(run_id, stored.owner)
        status = run._status
        # refused_update's usual "fine" answer without its call; it words any refusal.
        if stored._status not in _SOURCES[status] or (
            status is _COMPLETED and run.started_at is None
        ):
            refused = refused_update(run_id, stored._status, run)
            if refused is not None:
                raise refused
        return stored

    def _update_started_now(self, run: Run) -> None:
        """:meth:`_update_run_now` for a run that changed only through ``mark_running()``
        since it was last written here: only what that changes (status, pid, start time) is
        refreshed, which leaves the stored copy as a full copy would. The same checks and
        errors. The caller vouches for the precondition (the task manager right after adding
        the run, in the same step).
        """
        stored = self._stored_to_update(run)
        stored._status = run._status
        stored.pid = run.pid
        stored.started_at = run.started_at

    async def get_run(self, run_id: str) -> Run | None:
        self._check_open()
        run = self._runs.get(run_id_of(run_id))
        return None if run is None else run.copy()

    def _matching(self, status: RunStatus | None, module_id: str | None) -> list[Run]:
        return [
            run
            for run in self._runs.values()
            if (status is None or run.status == status)
            and (module_id is None or run.module_id == module_id)
        ]

    async def list_runs(
        self,
        status: RunStatus | None = None,
        module_id: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Run]:
        self._check_open()
        _check_paging(limit, offset)
        matching = self._matching(check_filters(status, module_id), module_id)
        # Reverse insertion order first so the stable sort keeps "later added first" for ties.
        matching.reverse()
        matching.sort(key=lambda run: run.created_at, reverse=True)
        return [run.copy() for run in matching[offset : offset + limit]]

    async def count_runs(
        self, status: RunStatus | None = None, module_id: str | None = None
    ) -> int:
        self._check_open()
        return len(self._matching(check_filters(status, module_id), module_id))

    def _delete_finished_before(self, cutoff: datetime) -> int:
        doomed = [
            run_id
            for run_id, run in self._runs.items()
            if run.is_finished and finished_moment(run) < cutoff
        ]
        for run_id in doomed:
            del self._runs[run_id]
        return len(doomed)

    async def delete_older_than(self, age: timedelta | datetime) -> int:
        self._check_open()
        cutoff = cutoff_from(age)
        return 0 if cutoff is None else self._delete_finished_before(cutoff)

    def _retain(self) -> int:
        deleted = 0
        cutoff = None if self.max_age is None else age_cutoff(self.max_age)
        if cutoff is not None:
            deleted += self._delete_finished_before(cutoff)
        if self.max_runs is not None:
            finished = [run for run in self._runs.values() if run.is_finished]
            excess = len(finished) - self.max_runs
            if excess > 0:
                finished.sort(key=lambda run: run.created_at)
                for run in finished[:excess]:
                    del self._runs[run.run_id]
                deleted += excess
        return deleted

    async def apply_retention(self) -> int:
        self._check_open()
        return self._retain()


_MEMORY_ADD = RunRegistry.add_run
_MEMORY_UPDATE = RunRegistry.update_run
