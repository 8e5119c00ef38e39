"""One strategy class per :class:`RunMode`; :data:`STRATEGIES` is the registry."""

from __future__ import annotations

from .._core._modes import RunMode
from ._async import AsyncStrategy
from ._base import SpawnRequest, SubprocessStrategy
from ._dry_run import DryRunStrategy
from ._local import LocalStrategy
from ._threaded import ThreadedStrategy

__all__ = [
    "STRATEGIES",
    "AsyncStrategy",
    "DryRunStrategy",
    "LocalStrategy",
    "SpawnRequest",
    "SubprocessStrategy",
    "ThreadedStrategy",
]

#: Adding a mode = one module in this package + one line here.
STRATEGIES: dict[RunMode, type[SubprocessStrategy]] = {
    RunMode.ASYNC: AsyncStrategy,
    RunMode.THREADED: ThreadedStrategy,
    RunMode.LOCAL: LocalStrategy,
    RunMode.DRY_RUN: DryRunStrategy,
}
