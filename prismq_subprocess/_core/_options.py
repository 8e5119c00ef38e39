"""The keyword options the process-starting calls pass on to ``subprocess.Popen``, typed.

``create_subprocess_exec`` / ``_shell``, ``create_subprocess``, ``run`` and ``stream`` (the
wrapper's and the module-level drop-ins) take them as ``**kwds`` typed by these dicts, so a
misspelt keyword or a value of the wrong type is a type checker's error in the caller's code,
as with asyncio's own functions; at run time the same calls are checked by
``check_popen_kwargs`` (``InvalidOptionError`` and its kin), whatever the caller's typing.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Literal, TypedDict

__all__ = [
    "CommandArg",
    "EnvMapping",
    "ExecOptions",
    "PopenOptions",
    "ShellOptions",
    "SpawnOptions",
]

#: A program or one of its arguments: a string, bytes or a path.
CommandArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]
#: A child's whole environment: str to str (or, on POSIX, bytes to bytes).
EnvMapping = Mapping[str, str] | Mapping[bytes, bytes]


class PopenOptions(TypedDict, total=False):
    """The ``subprocess.Popen`` options a child's start passes on, besides its streams,
    ``cwd``, ``env`` and text mode (the pipes are binary): the ``**kwds`` of ``run()``,
    ``stream()`` and ``create_subprocess()``. Type your own pass-through wrappers with
    ``**kwds: Unpack[PopenOptions]``.
    """

    executable: CommandArg | None
    preexec_fn: Callable[[], object] | None
    close_fds: bool
    startupinfo: Any
    creationflags: int
    restore_signals: bool
    start_new_session: bool
    pass_fds: Collection[int]
    user: str | int | None
    group: str | int | None
    extra_groups: Iterable[str | int] | None
    umask: int
    pipesize: int
    process_group: int | None


class SpawnOptions(PopenOptions, total=False):
    """:class:`PopenOptions` plus ``cwd`` and ``env``: the ``**kwds`` of
    ``create_subprocess_exec`` and ``create_subprocess_shell``, as in asyncio; also asyncio's
    binary-pipe options, typed (as in asyncio's own stubs) with the only values accepted."""

    cwd: CommandArg | None
    env: EnvMapping | None
    bufsize: Literal[0]
    universal_newlines: Literal[False] | None
    text: Literal[False] | None
    encoding: None
    errors: None


class ExecOptions(SpawnOptions, total=False):
    """:class:`SpawnOptions` plus ``shell=False``, the one value ``create_subprocess_exec``
    accepts (asyncio's stubs take it too): the ``**kwds`` of the exec calls."""

    shell: Literal[False]


class ShellOptions(SpawnOptions, total=False):
    """:class:`SpawnOptions` plus ``shell=True``, the one value ``create_subprocess_shell``
    accepts: the ``**kwds`` of the shell calls."""

    shell: Literal[True]
