"""The keyword options of a tracked run's start, written once.

``ModuleRunner.prepare`` / ``prepare_command`` spell them out and check them; the methods that
only pass them on (``execute_module``, ``start_module``, ``execute_command``, ``start_command``,
``ConcurrentExecutor.execute_module``, the Dask worker) take them as ``**options`` typed by these
dicts, so mypy and editors still know every keyword.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any, TypedDict

from .._core._exceptions import InvalidOptionError

__all__ = ["CommandStartOptions", "ModuleStartOptions", "StartOptions", "check_options"]


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


def check_options(
    options: Mapping[str, Any], kind: type, where: str, also: tuple[str, ...] = ("run_id",)
) -> None:
    """Raise :class:`InvalidOptionError` (a ``TypeError``) naming ``where`` (the method the
    caller called) if ``options`` has a keyword ``kind`` (one of the dicts above) lacks.

    The methods that pass ``**options`` on were named in no error: an unknown keyword was "a
    bare TypeError from ``ModuleRunner.prepare()``" or "``ModuleSpec.__init__()``", methods the
    caller never called. ``also``: the method's own keywords, named in the message.
    """
    known: frozenset[str] = kind.__required_keys__ | kind.__optional_keys__  # type: ignore[attr-defined]
    for name in options:
        if name not in known:
            every = sorted(known | set(also))
            close = difflib.get_close_matches(name, every, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidOptionError(
                f"{where}() got an unexpected keyword argument {name!r}{hint}; its options are "
                f"{', '.join(every)}"
            )
