"""What a cancel request found: :class:`CancelResult`."""

from __future__ import annotations

import enum

from ._memory_registry import BaseRunRegistry

__all__ = ["CancelResult", "not_active_result"]


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
    unknown, or active in another process)."""

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
