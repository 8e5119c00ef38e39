"""What a cancel request found: :class:`CancelResult`."""

from __future__ import annotations

import enum

from ._memory_registry import DEFAULT_POLL_INTERVAL, BaseRunRegistry, check_wait
from ._run_record import RunOwner, RunStatus

__all__ = ["CancelResult", "cancel_elsewhere", "not_active_result"]


class CancelResult(enum.Enum):
    """The answer of ``ModuleRunner.cancel`` and ``BackgroundTaskManager.cancel_task``.

    Only ``CANCELLED`` is true, so ``if await runner.cancel(run_id): ...`` reads as before, when
    these methods returned a bool; compare with the members to tell the other two apart.
    """

    CANCELLED = "cancelled"
    """The run was active here; it was cancelled and its outcome is recorded."""
    ALREADY_FINISHED = "already_finished"
    """The run had already ended (or was ending); nothing was done."""
    NOT_FOUND = "not_found"
    """No such run is active here, and the registry holds no finished run with this id (it is
    unknown, or stored unfinished by this process without being active in the object asked)."""
    REQUESTED = "requested"
    """The run is active in another process: the cancel request is recorded in the registry,
    but the run had not finished when the caller's ``timeout`` ran out. Its owner acts on the
    request; follow it with ``registry.wait_finished``."""

    def __bool__(self) -> bool:
        return self is CancelResult.CANCELLED


async def not_active_result(registry: BaseRunRegistry, run_id: str) -> CancelResult:
    """Tell ``ALREADY_FINISHED`` from ``NOT_FOUND`` for a run that is not active here, by looking
    it up in ``registry``.

    Raises:
        what ``registry.get_run`` raises (e.g. ``RegistryClosedError``).
    """
    run = await registry.get_run(run_id)
    if run is not None and run.is_finished:
        return CancelResult.ALREADY_FINISHED
    return CancelResult.NOT_FOUND


async def cancel_elsewhere(
    registry: BaseRunRegistry,
    run_id: str,
    reason: str,
    timeout: float | None,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> CancelResult:
    """Cancel a run that is not active in the calling object: if another process owns it,
    record a cancel request in ``registry`` and wait until the run is finished.

    Returns ``CANCELLED`` when the run ended CANCELLED, ``ALREADY_FINISHED`` when it was finished
    or ended otherwise (completed meanwhile, or INTERRUPTED because its owner died),
    ``REQUESTED`` when ``timeout`` ran out first, and ``NOT_FOUND`` for an unknown run or one
    this process owns (its cancel is local; the object asked does not drive it).

    Cancellation: stops waiting; the request stays recorded.

    Raises:
        RegistryClosedError: the registry is closed.
        InvalidTimeoutError: a negative ``timeout``.
    """
    check_wait(timeout, poll_interval)
    run = await registry.get_run(run_id)
    if run is None:
        return CancelResult.NOT_FOUND
    if run.is_finished:
        return CancelResult.ALREADY_FINISHED
    if run.owner == RunOwner.current():
        return CancelResult.NOT_FOUND
    if not await registry.request_cancel(run_id, reason):
        # It finished (or was deleted) between the two statements.
        return await not_active_result(registry, run_id)
    try:
        final = await registry.wait_finished(run_id, timeout=timeout, poll_interval=poll_interval)
    except TimeoutError:
        return CancelResult.REQUESTED
    if final is None:
        return CancelResult.NOT_FOUND
    return (
        CancelResult.CANCELLED
        if final.status is RunStatus.CANCELLED
        else CancelResult.ALREADY_FINISHED
    )
