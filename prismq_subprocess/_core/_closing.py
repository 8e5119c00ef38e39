"""`AsyncClosing`: the ``async with`` protocol for objects that have ``aclose()``."""

from __future__ import annotations

from types import TracebackType
from typing import Self

__all__ = ["AsyncClosing"]


class AsyncClosing:
    """Mixin: entering checks the object is still open (:meth:`_check_open`, a no-op unless
    overridden), leaving awaits :meth:`aclose` however the block ends."""

    def _check_open(self) -> None:
        """Raise if the object can no longer be used; subclasses that can be closed override."""

    async def aclose(self) -> None:
        """Release everything the object holds; subclasses implement it."""
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._check_open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
