"""A bounded pool of reusable :class:`SubprocessWrapper` objects: :class:`ResourcePool`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from .._core._cancel_shield import shielded_if_cancelled
from .._core._closing import AsyncClosing
from .._core._exceptions import InvalidLimitError, PoolClosedError
from .._core._modes import RunMode
from .._core._slots import Slots
from .._core._tree_stop import DEFAULT_GRACE_PERIOD
from .._core._validation import check_timeout
from .._core._wrapper import SubprocessWrapper

__all__ = ["ResourcePool"]


class ResourcePool(AsyncClosing):
    """Lend out at most ``max_workers`` :class:`SubprocessWrapper` objects at a time.

    ``async with pool.acquire_subprocess() as wrapper:`` waits while ``max_workers`` wrappers
    are lent out, then gives one (an idle one if there is one, else a new one, made lazily) for
    the block; it goes back to the pool when the block ends. Use it to bound how many parts of
    a program spawn at once; for a bound on modules use ``ConcurrentExecutor``.

    Do not close a lent wrapper: the pool closes them all in :meth:`aclose` / :meth:`cleanup`.
    Children a block leaves running stay with their wrapper and are stopped when the pool
    closes. Use the pool from one event loop at a time (one ``asyncio.run`` after another is
    fine).

    Args:
        max_workers: wrappers lent out at once; >= 1.
        run_mode: mode of the wrappers (``None``: detect); a ``RunMode`` or its name.
        grace_period: the wrappers' grace period when stopping a tree.

    Raises:
        InvalidLimitError: ``max_workers`` is not an int >= 1.
        InvalidTimeoutError: ``grace_period`` is negative.
        InvalidRunModeError: ``run_mode`` names no mode.
    """

    def __init__(
        self,
        max_workers: int = 10,
        *,
        run_mode: RunMode | str | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD,
    ) -> None:
        if isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1:
            raise InvalidLimitError(f"max_workers must be an int >= 1, got {max_workers!r}")
        self.max_workers = max_workers
        # Checked now, not at the first loan.
        self.run_mode = None if run_mode is None else RunMode.parse(run_mode)
        self.grace_period = check_timeout(grace_period, "grace_period", finite=True) or 0.0
        self._slots = Slots(max_workers, self._closed_error)
        self._idle: list[SubprocessWrapper] = []
        self._wrappers: list[SubprocessWrapper] = []
        self._in_use = 0
        self._closed = False

    @property
    def in_use(self) -> int:
        """Wrappers lent out now."""
        return self._in_use

    @property
    def idle(self) -> int:
        """Wrappers waiting in the pool to be reused."""
        return len(self._idle)

    @property
    def created(self) -> int:
        """Wrappers made so far (never more than ``max_workers``)."""
        return len(self._wrappers)

    @property
    def closed(self) -> bool:
        """``True`` after :meth:`aclose` or :meth:`cleanup`."""
        return self._closed

    @staticmethod
    def _closed_error() -> PoolClosedError:
        return PoolClosedError("this ResourcePool is closed; create a new one")

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    @contextlib.asynccontextmanager
    async def acquire_subprocess(self) -> AsyncIterator[SubprocessWrapper]:
        """Borrow a wrapper for the ``async with`` block (waiting while all are lent out).

        Cancellation: while waiting, just stops waiting; inside the block, the wrapper goes
        back to the pool as the block is left.

        Raises:
            PoolClosedError: the pool is closed (or closes while waiting).
        """
        self._check_open()
        await self._slots.acquire()  # raises PoolClosedError if the pool closes meanwhile
        try:
            self._check_open()
            if self._idle:
                wrapper = self._idle.pop()
            else:
                wrapper = SubprocessWrapper(self.run_mode, grace_period=self.grace_period)
                self._wrappers.append(wrapper)
            self._in_use += 1
            try:
                yield wrapper
            finally:
                self._in_use -= 1
                if not self._closed:
                    self._idle.append(wrapper)
        finally:
            self._slots.release()

    async def aclose(self) -> None:
        """Close every wrapper (stopping their children's trees, in parallel), including ones
        lent out (their next use raises ``WrapperClosedError``). Idempotent.

        Callers waiting for a wrapper get ``PoolClosedError``.

        Cancellation: the children still running are killed at once (no grace), then
        ``CancelledError`` propagates. Called inside an anyio scope that is already cancelled
        (a ``finally`` block after ``move_on_after``), the close runs in full, shielded from
        that scope.
        """
        with shielded_if_cancelled():
            await self._aclose()

    async def _aclose(self) -> None:
        self._closed = True
        self._slots.close()
        wrappers = list(self._wrappers)
        try:
            if wrappers:
                await asyncio.gather(*(w.aclose() for w in wrappers))
        except BaseException:
            # Some closes may not even have started (gather's tasks cancelled before their
            # first step): every wrapper is cleaned up here, so no child outlives the pool.
            for wrapper in wrappers:
                wrapper.cleanup()
            raise
        finally:
            # Forgotten only once closed or cleaned up: until then a retry can still reach them.
            self._wrappers = [w for w in self._wrappers if w not in wrappers]
            self._idle = []

    def cleanup(self) -> None:
        """Synchronous form of :meth:`aclose` (the PrismQ guide's ``pool.cleanup()``): kill the
        wrappers' children at once (no grace) and release their threads. Idempotent. Prefer
        :meth:`aclose` from async code."""
        self._closed = True
        self._slots.close()
        wrappers, self._wrappers, self._idle = self._wrappers, [], []
        for wrapper in wrappers:
            wrapper.cleanup()
