"""Checks run before anything is spawned, so bad input never leaves a half-started process."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import Any

from ._exceptions import (
    CommandNotFoundError,
    CwdNotADirectoryError,
    CwdNotFoundError,
    InvalidArgumentTypeError,
    InvalidCommandError,
    InvalidEnvironmentError,
    InvalidLimitError,
    InvalidTimeoutError,
)

__all__ = [
    "check_exec_command",
    "check_popen_kwargs",
    "check_shell_command",
    "check_timeout",
    "not_found_error",
]

Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _check_part(value: object, position: int) -> str | bytes:
    if isinstance(value, str | bytes):
        part: str | bytes = value
    elif isinstance(value, os.PathLike):
        part = os.fspath(value)
    elif isinstance(value, list | tuple):
        raise InvalidArgumentTypeError(
            f"command argument {position} is a {type(value).__name__}; pass the program and its "
            "arguments separately: run(*cmd), not run(cmd)"
        )
    else:
        raise InvalidArgumentTypeError(
            f"command argument {position} is {type(value).__name__} {value!r}; expected str, bytes "
            "or os.PathLike (convert numbers with str())"
        )
    if (b"\0" if isinstance(part, bytes) else "\0") in part:  # type: ignore[operator]
        raise InvalidCommandError(f"command argument {position} {part!r} contains a NUL byte")
    return part


def check_exec_command(program: object, args: tuple[object, ...]) -> tuple[str | bytes, ...]:
    """Validate an exec-style command and return it with path-like parts turned into text.

    Raises:
        InvalidCommandError: the program is empty or a part holds a NUL byte.
        InvalidArgumentTypeError: a part is not str, bytes or os.PathLike.
    """
    parts = tuple(_check_part(value, i) for i, value in enumerate((program, *args)))
    if not parts[0]:
        raise InvalidCommandError("the program to run is an empty string")
    return parts


def check_shell_command(cmd: object) -> str | bytes:
    """Validate a shell command line.

    Raises:
        InvalidArgumentTypeError: ``cmd`` is not str or bytes.
        InvalidCommandError: ``cmd`` is empty/blank or holds a NUL byte.
    """
    if not isinstance(cmd, str | bytes):
        raise InvalidArgumentTypeError(
            f"a shell command must be str or bytes, not {type(cmd).__name__}"
        )
    if not cmd.strip():
        raise InvalidCommandError("the shell command is empty")
    return _check_part(cmd, 0)


def check_popen_kwargs(kwargs: Mapping[str, Any], *, shell: bool) -> None:
    """Reject what asyncio rejects (text mode, buffering, ``shell``) and a bad ``cwd``/``env``.

    Raises:
        InvalidCommandError: text mode, ``bufsize`` or ``shell`` asked for (a ``ValueError``, with
            asyncio's own message).
        CwdNotFoundError / CwdNotADirectoryError: ``cwd`` is not an existing directory.
        InvalidEnvironmentError: ``env`` is not a mapping of str to str (or bytes to bytes).
    """
    if kwargs.get("universal_newlines"):
        raise InvalidCommandError("universal_newlines must be False")
    if kwargs.get("text"):
        raise InvalidCommandError("text must be False")
    if kwargs.get("encoding") is not None:
        raise InvalidCommandError("encoding must be None")
    if kwargs.get("errors") is not None:
        raise InvalidCommandError("errors must be None")
    if kwargs.get("bufsize", 0) != 0:
        raise InvalidCommandError("bufsize must be 0")
    if "shell" in kwargs:
        if shell and not kwargs["shell"]:
            raise InvalidCommandError("shell must be True")
        if not shell and kwargs["shell"]:
            raise InvalidCommandError("shell must be False")
    cwd = kwargs.get("cwd")
    if cwd is not None:
        check_cwd(cwd)
    env = kwargs.get("env")
    if env is not None:
        check_env(env)


def check_cwd(cwd: object) -> None:
    """Raise unless ``cwd`` names an existing directory."""
    if not isinstance(cwd, str | bytes | os.PathLike):
        raise InvalidArgumentTypeError(f"cwd must be a path, not {type(cwd).__name__}")
    path = os.fspath(cwd)
    if not os.path.exists(path):
        raise CwdNotFoundError(2, f"working directory {path!r} does not exist", path)
    if not os.path.isdir(path):
        raise CwdNotADirectoryError(20, f"working directory {path!r} is not a directory", path)


def check_env(env: object) -> None:
    """Raise :class:`InvalidEnvironmentError` unless ``env`` maps str to str (or bytes to bytes)."""
    if not isinstance(env, Mapping):
        raise InvalidEnvironmentError(f"env must be a mapping, not {type(env).__name__}")
    for key, value in env.items():
        if not isinstance(key, str | bytes) or not isinstance(value, str | bytes):
            raise InvalidEnvironmentError(
                f"env[{key!r}] = {value!r}: environment keys and values must be str "
                f"(got {type(key).__name__} -> {type(value).__name__}; convert with str())"
            )
        text_key = os.fsdecode(key)
        if not text_key or "=" in text_key or "\0" in text_key:
            raise InvalidEnvironmentError(
                f"illegal environment variable name {key!r}: empty, or contains '=' or NUL"
            )
        if "\0" in os.fsdecode(value):
            raise InvalidEnvironmentError(f"env[{key!r}] contains a NUL byte")


def check_limit(value: object, name: str, *, minimum: int) -> None:
    """Raise :class:`InvalidLimitError` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidLimitError(f"{name} must be an int >= {minimum}, not {value!r}")


def check_timeout(value: float | None, name: str = "timeout") -> float | None:
    """Return ``value`` if it is ``None`` or a number >= 0 (``inf`` means no limit, as ``None``).

    Raises:
        InvalidTimeoutError: negative, NaN, or not a number.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidTimeoutError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if math.isnan(value) or value < 0:
        raise InvalidTimeoutError(f"{name} must be >= 0 seconds, got {value!r}")
    return float(value)


def not_found_error(program: str | bytes, exc: FileNotFoundError) -> CommandNotFoundError:
    """Wrap the spawn's ``FileNotFoundError`` into our more helpful one."""
    name = os.fsdecode(program)
    detail = "not on PATH" if os.sep not in name else "no such file"
    if " " in name.strip():
        detail += (
            "; it contains spaces: pass the arguments separately (run('ls', '-l')) or use "
            "shell=True for a command line"
        )
    return CommandNotFoundError(name, f"{detail} ({exc.strerror or exc})")
