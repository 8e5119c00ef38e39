"""Module-level drop-ins for ``asyncio.create_subprocess_exec``/``_shell``, and ``run``."""

from __future__ import annotations

import threading
from typing import IO, Any, Unpack

from .._strategies._base import DEFAULT_LIMIT
from ._detect import resolve_run_mode
from ._modes import RunMode
from ._options import (
    CommandArg,
    EnvMapping,
    ExecOptions,
    PopenOptions,
    ShellOptions,
)
from ._override import active_override
from ._process import ProcessLike
from ._result import ProcessResult
from ._wrapper import SubprocessWrapper

__all__ = ["create_subprocess_exec", "create_subprocess_shell", "run"]

# One shared wrapper per requested mode (None = auto-detect with fallback). They live for the
# whole process, like asyncio's own machinery; their threads are daemon pool threads.
_shared: dict[RunMode | None, SubprocessWrapper] = {}
_lock = threading.Lock()


def _wrapper(mode: RunMode | str | None) -> SubprocessWrapper:
    override = active_override() if mode is None else None
    if override is not None:
        # Not the shared one: it belongs to the override, which closes it when it ends.
        with _lock:
            if override.dropin is None:
                override.dropin = SubprocessWrapper(max_output_bytes=None)
            return override.dropin
    key = None if mode is None else RunMode(resolve_run_mode(mode).mode)
    with _lock:
        wrapper = _shared.get(key)
        if wrapper is None:
            # Unbounded output, as asyncio: the drop-ins must not change what callers get.
            wrapper = _shared[key] = SubprocessWrapper(key, max_output_bytes=None)
        return wrapper


async def create_subprocess_exec(
    program: CommandArg,
    *args: CommandArg,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    limit: int = DEFAULT_LIMIT,
    mode: RunMode | str | None = None,
    **kwds: Unpack[ExecOptions],
) -> ProcessLike:
    """Drop-in for ``asyncio.create_subprocess_exec`` with one extra keyword, ``mode``
    (``None``: auto-detect, falling back to THREADED where the loop cannot spawn).

    One difference by design: the child starts in its own session/process group (so its whole
    tree can be stopped), which also means a terminal's Ctrl-C does not reach it. Pass
    ``start_new_session=False`` to keep asyncio's default.

    See :meth:`SubprocessWrapper.create_subprocess_exec` for what it raises.
    """
    return await _wrapper(mode).create_subprocess_exec(
        program, *args, stdin=stdin, stdout=stdout, stderr=stderr, limit=limit, **kwds
    )


async def create_subprocess_shell(
    cmd: str | bytes,
    stdin: int | IO[Any] | None = None,
    stdout: int | IO[Any] | None = None,
    stderr: int | IO[Any] | None = None,
    limit: int = DEFAULT_LIMIT,
    mode: RunMode | str | None = None,
    **kwds: Unpack[ShellOptions],
) -> ProcessLike:
    """Drop-in for ``asyncio.create_subprocess_shell`` with one extra keyword, ``mode``; the
    child starts in its own session unless ``start_new_session=False`` is passed."""
    return await _wrapper(mode).create_subprocess_shell(
        cmd, stdin=stdin, stdout=stdout, stderr=stderr, limit=limit, **kwds
    )


async def run(
    *cmd: CommandArg,
    mode: RunMode | str | None = None,
    input: bytes | bytearray | memoryview | None = None,
    timeout: float | None = None,
    check: bool = False,
    cwd: CommandArg | None = None,
    env: EnvMapping | None = None,
    shell: bool = False,
    max_output_bytes: int | None = None,
    grace_period: float | None = None,
    **kwds: Unpack[PopenOptions],
) -> ProcessResult:
    """One-shot :meth:`SubprocessWrapper.run` on a shared wrapper for ``mode`` (``None``:
    auto-detect); the other arguments are :meth:`SubprocessWrapper.run`'s. Output is kept
    whole unless ``max_output_bytes`` says otherwise, as with asyncio."""
    return await _wrapper(mode).run(
        *cmd,
        input=input,
        timeout=timeout,
        check=check,
        cwd=cwd,
        env=env,
        shell=shell,
        max_output_bytes=max_output_bytes,
        grace_period=grace_period,
        **kwds,
    )
