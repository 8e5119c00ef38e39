"""A process-wide override of the mode auto-detected wrappers get: the hook that lets a test run a
host application's code in a chosen mode (or in DRY_RUN with a script) without touching it."""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, TypeAlias

from .._platform import PlatformOps
from .._strategies import STRATEGIES, SubprocessStrategy
from ._detect import ModeDecision, ModeSource
from ._exceptions import InvalidArgumentTypeError, InvalidRunModeError
from ._modes import RunMode

if TYPE_CHECKING:
    from ._wrapper import SubprocessWrapper

__all__ = ["StrategyOverride", "active_override", "override_strategy", "warn_if_bypassed"]

#: What an override installs: a mode, or a factory returning a fresh strategy per wrapper.
StrategySource: TypeAlias = RunMode | str | Callable[[], SubprocessStrategy]


def _needs_arguments(func: Callable[..., object]) -> bool:
    try:
        inspect.signature(func).bind()
    except TypeError:
        return True
    except ValueError:  # no signature to look at (a builtin): taken as given
        return False
    return False


class StrategyOverride:
    """One active :func:`override_strategy` block: makes the strategies of the wrappers built
    inside it, and owns the wrapper the module-level drop-ins use meanwhile."""

    def __init__(self, source: StrategySource, reason: str) -> None:
        self.mode: RunMode | None = None
        self._factory: Callable[[], SubprocessStrategy] | None = None
        if isinstance(source, str):
            self.mode = RunMode.parse(source)
        elif callable(source):
            if _needs_arguments(source):
                # A DryRunScript (called with each command) given for script.strategy: it failed
                # later, where the application built a wrapper, with a bare TypeError.
                raise InvalidArgumentTypeError(
                    f"override_strategy takes a callable with no arguments that returns a new "
                    f"SubprocessStrategy; {source!r:.80} needs arguments (a DryRunScript? pass "
                    "script.strategy)"
                )
            self._factory = source
        else:
            raise InvalidRunModeError(
                f"override_strategy takes a RunMode, its name, or a callable returning a new "
                f"SubprocessStrategy, not {source!r}"
            )
        self.reason = reason
        #: The drop-ins' wrapper while this override is active (made on first use, killed and
        #: released when the block ends); set by ``_dropin`` under its lock.
        self.dropin: SubprocessWrapper | None = None

    def make_strategy(self, max_workers: int | None, ops: PlatformOps) -> SubprocessStrategy:
        """A new strategy for one wrapper.

        Raises:
            InvalidRunModeError: the factory returned something that is not a strategy.
        """
        if self.mode is not None:
            return STRATEGIES[self.mode](max_workers=max_workers, ops=ops)
        assert self._factory is not None
        strategy = self._factory()
        if not isinstance(strategy, SubprocessStrategy):
            raise InvalidRunModeError(
                f"the factory given to override_strategy returned {strategy!r}, not a "
                "SubprocessStrategy"
            )
        return strategy

    def decision(self, mode: RunMode | str) -> ModeDecision:
        """The mode decision of a wrapper whose strategy (running ``mode``) this override made."""
        return ModeDecision(mode, self.reason, ModeSource.OVERRIDE)


_lock = threading.Lock()
_stack: list[StrategyOverride] = []


def active_override() -> StrategyOverride | None:
    """The innermost active override, or ``None``."""
    with _lock:
        return _stack[-1] if _stack else None


@contextlib.contextmanager
def override_strategy(strategy: StrategySource, *, reason: str | None = None) -> Iterator[None]:
    """While the block runs, give ``strategy`` to every wrapper that would auto-detect its mode.

    That is every ``SubprocessWrapper()`` built without a ``mode`` (so also the wrappers a
    :class:`ModuleRunner`, :class:`ResourcePool` or :class:`ConcurrentExecutor` make when given no
    mode), and the module-level drop-ins (:func:`create_subprocess_exec`,
    :func:`create_subprocess_shell`, :func:`run`) called without ``mode=``. It is how a test runs
    a host application's code in each real mode, or in DRY_RUN with scripted answers, without
    changing that code; the pytest plugin's ``pq_mode`` and ``pq_dry_run`` fixtures use it.

    ``strategy`` is a :class:`RunMode` (or its name), or a callable returning a *new* strategy
    for each wrapper, e.g. ``lambda: DryRunStrategy(recorder=recorder)`` to share one recorder.

    Precedence: a mode or strategy passed to the wrapper > this override > ``PRISMQ_RUN_MODE`` >
    detection. The decision counts as pinned (``ModeSource.OVERRIDE``): no silent fallback.

    The override is process-wide (not per task or thread), because a test's fixtures, the test
    and the application's tasks and threads all need to see it; blocks nest (the innermost wins).
    Only wrappers built inside the block are affected. When it ends, the drop-ins' wrapper of the
    block is closed: children it started that still run are killed.

    Raises:
        InvalidRunModeError: ``strategy`` names no mode, or is neither a mode nor a callable
            (at once); the callable returned something that is not a strategy (when a wrapper
            is built).
        InvalidArgumentTypeError: a callable that cannot be called without arguments (a
            ``DryRunScript`` given for ``script.strategy``), at once.
    """
    override = StrategyOverride(strategy, reason or f"override_strategy({_name(strategy)})")
    with _lock:
        _stack.append(override)
    try:
        yield
    finally:
        with _lock:
            _stack.remove(override)
            dropin, override.dropin = override.dropin, None
        if dropin is not None:
            dropin.cleanup()


def _name(strategy: StrategySource) -> str:
    if isinstance(strategy, str):
        return repr(RunMode.parse(strategy).value)
    return getattr(strategy, "__qualname__", None) or repr(strategy)


def warn_if_bypassed(source: ModeSource, stacklevel: int) -> None:
    """Warn when a wrapper whose mode was detected (``source``) *before* the active override
    began starts a command: the override does not reach it, so under a test's DRY_RUN it would
    start a real process. The wrapper calls this just before it starts anything; ``stacklevel``
    is that of the user's call as seen from the wrapper's method."""
    if source not in (ModeSource.AUTO, ModeSource.ENVIRONMENT) or not _stack:
        return
    override = active_override()
    if override is not None:
        warnings.warn(
            f"a SubprocessWrapper that detected its mode before {override.reason} began is "
            "starting a command the override does not cover; build the wrapper (or what holds "
            "it, e.g. a ModuleRunner) while the override is active: request the pq_dry_run or "
            "pq_mode fixture before the fixture that builds your application",
            RuntimeWarning,
            stacklevel=stacklevel + 1,
        )
