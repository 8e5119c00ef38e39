"""Choosing a :class:`RunMode` automatically, and saying why."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

from .._platform import is_proactor_loop, is_windows, platform_name, policy_uses_proactor
from .._platform._windows import current_event_loop_policy
from ._exceptions import InvalidArgumentTypeError, InvalidRunModeError
from ._modes import RunMode, valid_values

__all__ = ["ENV_VAR", "ModeDecision", "ModeSource", "detect_run_mode", "resolve_run_mode"]

#: The environment variable that pins the mode for a whole process.
ENV_VAR = "PRISMQ_RUN_MODE"

_UNSET = object()


class ModeSource(StrEnum):
    """Where a mode decision came from."""

    ARGUMENT = "argument"
    ENVIRONMENT = "environment"
    #: Set by :func:`override_strategy` (a test fixture) for wrappers built without a mode.
    OVERRIDE = "override"
    AUTO = "auto"


@dataclass(frozen=True)
class ModeDecision:
    """The mode chosen, why, and whether the caller pinned it.

    A pinned mode (``source`` is ``ARGUMENT``, ``ENVIRONMENT`` or ``OVERRIDE``) never falls back
    silently. ``mode`` is a :class:`RunMode`, or the name a custom strategy gives its mode.
    """

    mode: RunMode | str
    reason: str
    source: ModeSource

    @property
    def pinned(self) -> bool:
        """True when the caller chose the mode (argument, environment variable or override)."""
        return self.source is not ModeSource.AUTO

    def __str__(self) -> str:
        return f"{self.mode} ({self.reason})"


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def detect_run_mode(
    *,
    env: Mapping[str, str] | None = None,
    platform: str | None = None,
    loop: asyncio.AbstractEventLoop | object | None = _UNSET,
    policy: object = _UNSET,
) -> ModeDecision:
    """Pick a :class:`RunMode` for this process and explain the choice.

    Order: ``PRISMQ_RUN_MODE`` in ``env`` wins; otherwise on Windows ASYNC when the running loop
    (or, with none running, the loop the event-loop policy would create; without a policy API,
    Windows' default loop, a Proactor loop) is a Proactor loop, else THREADED; on every other
    platform ASYNC.

    Every input can be injected (``env`` defaults to ``os.environ``, ``platform`` to this
    machine's ``sys.platform``, ``loop`` to the running loop, ``policy`` to asyncio's current
    policy), so the Windows rules are testable anywhere.

    Raises:
        InvalidRunModeError: ``PRISMQ_RUN_MODE`` is set to something that names no mode.
        InvalidArgumentTypeError: ``env`` is not a mapping.
    """
    if env is not None and not isinstance(env, Mapping):
        raise InvalidArgumentTypeError(f"env must be a mapping or None, not {type(env).__name__}")
    environ = os.environ if env is None else env
    raw = environ.get(ENV_VAR)
    if raw is not None and raw.strip():
        try:
            mode = RunMode.parse(raw)
        except InvalidRunModeError:
            raise InvalidRunModeError(
                f"environment variable {ENV_VAR}={raw!r} names no run mode; valid values: "
                f"{valid_values()} (or unset it to auto-detect)"
            ) from None
        return ModeDecision(mode, f"{ENV_VAR}={raw!r}", ModeSource.ENVIRONMENT)

    name = platform_name(platform)
    if not is_windows(name):
        return ModeDecision(
            RunMode.ASYNC, f"platform {name!r} supports asyncio subprocesses", ModeSource.AUTO
        )

    running = _running_loop() if loop is _UNSET else loop
    if running is not None:
        kind = type(running).__name__
        if is_proactor_loop(running):  # type: ignore[arg-type]
            return ModeDecision(
                RunMode.ASYNC, f"Windows with a Proactor event loop ({kind})", ModeSource.AUTO
            )
        return ModeDecision(
            RunMode.THREADED,
            f"Windows event loop {kind} cannot spawn subprocesses; Popen runs in threads",
            ModeSource.AUTO,
        )
    pol = current_event_loop_policy() if policy is _UNSET else policy
    if pol is None:
        # Without policies asyncio.run() builds Windows' default loop, a Proactor loop; a
        # host that builds a selector loop instead is caught on the first spawn (one warning,
        # then THREADED).
        return ModeDecision(
            RunMode.ASYNC,
            "Windows, no running loop, no event-loop policy API: asyncio.run() makes "
            "Proactor loops (the default)",
            ModeSource.AUTO,
        )
    if policy_uses_proactor(pol):
        return ModeDecision(
            RunMode.ASYNC,
            f"Windows, no running loop, policy {type(pol).__name__} makes Proactor loops",
            ModeSource.AUTO,
        )
    return ModeDecision(
        RunMode.THREADED,
        f"Windows, no running loop, policy {type(pol).__name__} makes loops that cannot spawn",
        ModeSource.AUTO,
    )


def resolve_run_mode(
    mode: RunMode | str | None,
    *,
    env: Mapping[str, str] | None = None,
    platform: str | None = None,
) -> ModeDecision:
    """Turn a caller's ``mode`` argument into a decision: explicit modes are pinned, ``None``
    auto-detects (see :func:`detect_run_mode`).

    Raises:
        InvalidRunModeError: ``mode`` or ``PRISMQ_RUN_MODE`` names no mode.
    """
    if mode is None:
        return detect_run_mode(env=env, platform=platform)
    chosen = RunMode.parse(mode)
    return ModeDecision(chosen, f"mode={chosen.value!r} passed by the caller", ModeSource.ARGUMENT)
