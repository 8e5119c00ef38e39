"""The keyword options of a tracked run's start, written once.

``ModuleRunner.prepare`` / ``prepare_command`` spell them out and check them; the methods that
only pass them on (``execute_module``, ``start_module``, ``execute_command``, ``start_command``,
``ConcurrentExecutor.execute_module``, the Dask worker) take them as ``**options`` typed by these
dicts, so mypy and editors still know every keyword.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import TypedDict

__all__ = ["CommandStartOptions", "ModuleStartOptions", "StartOptions"]


class StartOptions(TypedDict, total=False):
    """What every start may set: ``timeout`` (seconds or a ``timedelta`` from the child's
    start), ``memory_limit_bytes`` (the tree's RSS cap), ``cwd`` and ``env`` (added to the
    host's environment)."""

    timeout: float | timedelta | None
    memory_limit_bytes: int | None
    cwd: str | os.PathLike[str] | None
    env: Mapping[str, str] | None


class ModuleStartOptions(StartOptions, total=False):
    """A module's start: also raw ``args`` (passed after the parameters' arguments) and
    ``resources`` (hints a cluster backend reserves)."""

    args: Sequence[str | os.PathLike[str]] | None
    resources: Mapping[str, float] | None


class CommandStartOptions(StartOptions, total=False):
    """A command's start: also ``shell`` (the command is one command line) and ``resources``."""

    shell: bool
    resources: Mapping[str, float] | None
