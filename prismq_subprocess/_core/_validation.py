"""Checks run before anything is spawned, so bad input never leaves a half-started process."""

from __future__ import annotations

import codecs
import errno
import inspect
import math
import operator
import os
import subprocess
import sys
from collections.abc import Collection, Mapping
from datetime import timedelta
from typing import Any

from .._platform import IS_WINDOWS
from ._exceptions import (
    CommandNotExecutableError,
    CommandNotFoundError,
    CwdNotADirectoryError,
    CwdNotFoundError,
    ExecutableFormatError,
    InvalidArgumentTypeError,
    InvalidCommandError,
    InvalidCwdError,
    InvalidEncodingError,
    InvalidEnvironmentError,
    InvalidLimitError,
    InvalidOptionError,
    InvalidTimeoutError,
    PreexecFnError,
    PrismQError,
    SpawnFailedError,
    UnknownUserError,
)

__all__ = [
    "check_encoding",
    "check_exec_command",
    "check_popen_kwargs",
    "check_process",
    "check_shell_command",
    "check_timeout",
    "encodable",
    "not_found_error",
    "preexec_failed",
    "spawn_error",
]

#: The keyword arguments the asyncio API passes on to ``Popen`` (the three streams are parameters
#: of their own); anything else is refused before spawning, in every mode.
POPEN_OPTIONS = frozenset(inspect.signature(subprocess.Popen).parameters) - {
    "args",
    "stdin",
    "stdout",
    "stderr",
}
_POSIX = not IS_WINDOWS

Arg = str | bytes | os.PathLike[str] | os.PathLike[bytes]


def _check_part(value: object, position: int) -> str | bytes:
    if isinstance(value, str | bytes):
        part: str | bytes = value
    elif isinstance(value, os.PathLike):
        part = _fspath(value, f"command argument {position}")
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
    if isinstance(part, str) and not encodable(part):
        raise InvalidCommandError(
            f"command argument {position} {part!r} cannot be passed to a program: it has a "
            "lone surrogate, which no encoding of the OS holds (decode bytes with "
            "errors='surrogateescape' to pass them through, or pass bytes)"
        )
    return part


def _fspath(value: os.PathLike[str] | os.PathLike[bytes], what: str) -> str | bytes:
    """``os.fspath(value)``; our error for an ``__fspath__`` that gives no path (a bare
    TypeError from deep inside)."""
    try:
        return os.fspath(value)
    except TypeError as exc:
        raise InvalidArgumentTypeError(
            f"{what}: {type(value).__name__}.__fspath__() gave no path ({exc})"
        ) from None


def check_signal(sig: object) -> None:
    """Raise unless ``sig`` is a signal number, as ``os.kill`` takes it (an int, a
    ``signal.Signals``, anything with ``__index__``): a process's ``send_signal``.

    Raises:
        InvalidArgumentTypeError: (a ``TypeError``, as asyncio raises) ``None``, a name...
    """
    if sig.__class__ is int or isinstance(sig, int):
        return
    try:
        operator.index(sig)  # type: ignore[arg-type]
    except TypeError:
        raise InvalidArgumentTypeError(
            f"send_signal() takes a signal number (an int or a signal.Signals such as "
            f"signal.SIGTERM), got {type(sig).__name__} {sig!r:.60}"
        ) from None


def reason_text(reason: object) -> str:
    """``reason`` (a cancel's or a shutdown's), checked: text a registry file can hold.

    Raises:
        InvalidArgumentTypeError: not a str, or a str with a lone surrogate (not UTF-8).
    """
    if not isinstance(reason, str):
        raise InvalidArgumentTypeError(
            f"a cancel reason is a str, not {type(reason).__name__}: {reason!r}"
        )
    if not reason.isascii():
        try:
            reason.encode("utf-8")
        except UnicodeEncodeError:
            # Refused here for every registry: SQLite refused it later, worded as if the run
            # itself could not be stored; the memory registry took it.
            raise InvalidArgumentTypeError(
                f"a cancel reason must be text a registry file can hold (UTF-8), got {reason!r:.80}"
                " with a lone surrogate"
            ) from None
    return reason


def encodable(text: str) -> bool:
    """Whether ``text`` can be handed to the OS as a POSIX argument or environment entry
    (``os.fsencode``: UTF-8, undecodable bytes carried as ``surrogateescape`` code points).
    Windows takes wide strings, lone surrogates included."""
    if text.isascii() or not _POSIX:
        return True
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


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


# subprocess.run() options that Popen does not take: what to do instead here.
_HINTS = {
    "capture_output": "; run() always captures stdout and stderr (ProcessResult.stdout/.stderr)",
    "check": "; check= is an option of run() only (elsewhere, look at returncode)",
    "input": "; input= is an option of run() only (for a process: stdin=PIPE, then "
    "communicate(input))",
    "timeout": "; timeout= is an option of run() and stream() only (elsewhere: asyncio.timeout)",
}


def check_popen_kwargs(kwargs: dict[str, Any], *, shell: bool) -> None:
    """Reject, before anything starts, what asyncio or ``Popen`` would reject at spawn time:
    every strategy (DRY_RUN included) goes through this one check.

    A one-shot iterator given as ``pass_fds`` or ``extra_groups`` is replaced by a tuple in
    ``kwargs`` (checking it must not use it up).

    Raises:
        InvalidCommandError: text mode, ``bufsize`` or ``shell`` asked for (a ``ValueError``, with
            asyncio's own message).
        InvalidOptionError: an unknown keyword argument, or an option of the wrong type or value
            (``pass_fds``, ``umask``, ``pipesize``, ``process_group``, ``preexec_fn``,
            ``executable``, Windows-only options elsewhere, ids or descriptors out of range).
        UnknownUserError: ``user``/``group``/``extra_groups`` names no account.
        CwdNotFoundError / CwdNotADirectoryError: ``cwd`` is not an existing directory.
        InvalidEnvironmentError: ``env`` is not a mapping of str to str (or bytes to bytes).
    """
    if not kwargs:
        return
    unknown = sorted(kwargs.keys() - POPEN_OPTIONS)
    if unknown:
        hints = "".join(_HINTS[name] for name in unknown if name in _HINTS)
        raise InvalidOptionError(
            f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}: not an option of "
            f"subprocess.Popen{hints}"
        )
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
    if kwargs.keys() & _CHECKED_OPTIONS:
        _check_options(kwargs)


#: The options :func:`_check_options` looks at.
_CHECKED_OPTIONS = frozenset(
    {
        "executable",
        "preexec_fn",
        "startupinfo",
        "creationflags",
        "pass_fds",
        "umask",
        "process_group",
        "pipesize",
        "user",
        "group",
        "extra_groups",
        "start_new_session",
        "restore_signals",
    }
)

#: The largest user or group id (``uid_t``/``gid_t`` are 32-bit unsigned on Linux and macOS);
#: ``Popen`` raises a bare ``OverflowError`` beyond.
_MAX_ID = 2**32 - 1
#: Descriptors and Python 3.11's flags are C ints to ``Popen``.
_MAX_C_INT = 2**31 - 1


def _check_options(kwargs: dict[str, Any]) -> None:
    """The checks ``Popen`` makes on its other options (as of CPython 3.11-3.13), made early."""
    executable = kwargs.get("executable")
    if executable is not None:
        if not isinstance(executable, str | bytes | os.PathLike):
            raise InvalidOptionError(
                f"executable must be a path, not {type(executable).__name__} {executable!r}"
            )
        try:
            path = os.fspath(executable)
        except TypeError as exc:  # a __fspath__ that returned neither str nor bytes
            raise InvalidOptionError(f"executable {executable!r}: {exc}") from None
        if (b"\0" if isinstance(path, bytes) else "\0") in path:
            raise InvalidOptionError(f"executable {path!r} contains a NUL byte")
        if isinstance(path, str) and not encodable(path):
            raise InvalidOptionError(
                f"executable {path!r} cannot be passed to the OS: it has a lone surrogate"
            )
    preexec_fn = kwargs.get("preexec_fn")
    if preexec_fn is not None and not callable(preexec_fn):
        raise InvalidOptionError(f"preexec_fn must be callable, not {preexec_fn!r}")
    if not _POSIX:
        return
    if kwargs.get("startupinfo") is not None:
        raise InvalidOptionError("startupinfo is only supported on Windows")
    if kwargs.get("creationflags", 0) != 0:
        raise InvalidOptionError("creationflags is only supported on Windows")
    if "pass_fds" in kwargs:
        kwargs["pass_fds"] = _check_pass_fds(kwargs["pass_fds"])
    for name in ("umask", "process_group"):
        value = kwargs.get(name)
        if value is not None:
            try:
                number = operator.index(value)
            except TypeError:
                raise InvalidOptionError(
                    f"{name} must be an int, not {type(value).__name__} {value!r}"
                ) from None
            if not -_MAX_C_INT - 1 <= number <= _MAX_C_INT:
                # (Popen passes both to C as ints: a bare OverflowError beyond.)
                raise InvalidOptionError(f"{name}={value!r} is out of range for a C int")
    if sys.version_info < (3, 12):
        # 3.11's Popen passes these two to C as ints (3.12+ takes any object's truth value).
        for name in ("start_new_session", "restore_signals"):
            if name in kwargs:
                _check_c_int(name, kwargs[name])
    pipesize = kwargs.get("pipesize", -1)
    if isinstance(pipesize, bool) or not isinstance(pipesize, int):
        raise InvalidOptionError(f"pipesize must be an int, not {pipesize!r}")
    _check_account("user", kwargs.get("user"))
    _check_account("group", kwargs.get("group"))
    extra_groups = kwargs.get("extra_groups")
    if extra_groups is not None:
        if isinstance(extra_groups, str | bytes) or not _iterable(extra_groups):
            raise InvalidOptionError(
                f"extra_groups must be an iterable of group names or ids, not {extra_groups!r}"
            )
        if not isinstance(extra_groups, Collection):
            kwargs["extra_groups"] = extra_groups = tuple(extra_groups)
        for group in extra_groups:
            _check_account("extra_groups", group, kind="group")


def _check_c_int(name: str, value: Any) -> None:
    try:
        number = operator.index(value)
    except TypeError:
        raise InvalidOptionError(
            f"{name} must be a bool or an int, not {type(value).__name__} {value!r}"
        ) from None
    if not -_MAX_C_INT - 1 <= number <= _MAX_C_INT:
        raise InvalidOptionError(f"{name}={value!r} is out of range for a C int")


def _iterable(value: Any) -> bool:
    try:
        iter(value)
    except TypeError:
        return False
    return True


def _check_pass_fds(value: Any) -> Any:
    if not _iterable(value):
        raise InvalidOptionError(
            f"pass_fds must be an iterable of file descriptors, not {type(value).__name__}"
        )
    fds = value if isinstance(value, Collection) else tuple(value)
    for fd in fds:
        try:
            number = int(fd)  # what Popen does with each
        except (TypeError, ValueError):
            raise InvalidOptionError(f"pass_fds holds {fd!r}, not a file descriptor") from None
        if not 0 <= number <= _MAX_C_INT:
            raise InvalidOptionError(f"pass_fds holds {fd!r}, not a file descriptor")
        try:
            os.fstat(number)
        except OSError:
            raise InvalidOptionError(
                f"pass_fds holds {number}, which is not an open file descriptor"
            ) from None
    return fds


def check_stdio(name: str, value: object) -> None:
    """Raise :class:`InvalidOptionError` unless ``value`` is what ``Popen`` takes for the
    stream ``name`` (``"stdin"``, ``"stdout"`` or ``"stderr"``): ``None``, ``PIPE``,
    ``DEVNULL``, ``STDOUT`` (``stderr`` only), an open file descriptor or an object whose
    ``fileno()`` gives one. Checked in every mode, so DRY_RUN refuses what a real spawn would."""
    if value is None:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        if value in (subprocess.PIPE, subprocess.DEVNULL):
            return
        if value == subprocess.STDOUT and name == "stderr":
            return
        if not 0 <= value <= _MAX_C_INT:
            raise InvalidOptionError(f"{name}={value!r} is not a file descriptor or stream")
        try:
            os.fstat(value)
        except OSError:
            raise InvalidOptionError(f"{name}={value} is not an open file descriptor") from None
        return
    fileno = getattr(value, "fileno", None)
    if isinstance(value, bool) or not callable(fileno):
        raise InvalidOptionError(
            f"{name} must be None, PIPE, DEVNULL, a file descriptor or a file object, not "
            f"{type(value).__name__}"
        )
    try:
        fileno()
    except (OSError, ValueError) as exc:  # io.UnsupportedOperation is both
        raise InvalidOptionError(f"{name} has no file descriptor behind it: {exc}") from None


def _check_account(option: str, value: object, *, kind: str | None = None) -> None:
    if value is None:
        return
    kind = kind or option
    if isinstance(value, str):
        try:
            if kind == "user":
                import pwd

                pwd.getpwnam(value)
            else:
                import grp

                grp.getgrnam(value)
        except KeyError:
            raise UnknownUserError(f"{option}={value!r}: no such {kind} on this system") from None
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidOptionError(
            f"{option} must be a {kind} name or a numeric id, not {type(value).__name__} {value!r}"
        )
    if value < 0:
        raise InvalidOptionError(f"{option}: a {kind} id cannot be negative, got {value}")
    if value > _MAX_ID:
        raise InvalidOptionError(f"{option}: {value} is larger than any {kind} id ({_MAX_ID})")


# Built-in error handlers that let decoding go on past any bad byte, and those that stop it.
_LENIENT_ERRORS = frozenset({"replace", "ignore", "backslashreplace", "surrogateescape"})
_STRICT_ERRORS = frozenset({"strict", "surrogatepass"})


def check_encoding(encoding: object, errors: object = "strict") -> None:
    """Raise unless bytes can be decoded to text with ``encoding`` (``None``: no decoding) and
    the error handler ``errors``.

    Raises:
        InvalidEncodingError: unknown codec or error handler, a codec that does not decode bytes
            to text (``rot13``, ``hex``, ``zlib``: ``bytes.decode`` refuses them too), or one
            that refuses ``errors`` (``idna`` takes only ``"strict"``) or ignores it (``punycode``
            fails on a bad byte whatever the handler), or a handler that cannot decode
            (``xmlcharrefreplace``, ``namereplace``: they only encode) (a ``LookupError``).
        InvalidArgumentTypeError: either is not a str.
    """
    if encoding is not None and not isinstance(encoding, str):
        raise InvalidArgumentTypeError(f"encoding must be a str, not {encoding!r}")
    if not isinstance(errors, str):
        raise InvalidArgumentTypeError(f"errors must be a str, not {errors!r}")
    try:
        codecs.lookup_error(errors)
    except (LookupError, ValueError):  # ValueError: a NUL in the name
        raise InvalidEncodingError(
            f"unknown error handler {errors!r} (e.g. 'strict', 'replace', 'ignore')"
        ) from None
    if encoding is None:
        return
    try:
        info = codecs.lookup(encoding)
    except (LookupError, ValueError):
        raise InvalidEncodingError(f"unknown encoding {encoding!r}") from None
    if not getattr(info, "_is_text_encoding", True):
        raise InvalidEncodingError(
            f"{encoding!r} is not a text encoding (it does not decode bytes to str)"
        )
    # Some codecs refuse an error handler only when they first decode (idna: "strict" only);
    # decoding nothing finds out now, before any child starts, rather than at its first line.
    if info.incrementaldecoder is None:
        raise InvalidEncodingError(f"{encoding!r} has no incremental decoder to decode a stream")
    try:
        text = info.incrementaldecoder(errors=errors).decode(b"")
    except Exception as exc:
        raise InvalidEncodingError(
            f"encoding {encoding!r} cannot decode with errors={errors!r}: {exc}"
        ) from None
    if not isinstance(text, str):
        raise InvalidEncodingError(f"{encoding!r} does not decode bytes to str")
    if errors not in _STRICT_ERRORS:
        # A bad byte, decoded now rather than at the stream's first one, which would end the
        # stream with the lines read with it: some codecs ignore a lenient handler (punycode
        # decodes as strict ASCII), and some handlers only encode (xmlcharrefreplace,
        # namereplace: "don't know how to handle UnicodeDecodeError", a bare TypeError).
        try:
            info.incrementaldecoder(errors=errors).decode(b"\xff", True)
        except UnicodeError as exc:
            if errors in _LENIENT_ERRORS:
                raise InvalidEncodingError(
                    f"encoding {encoding!r} does not honour errors={errors!r} (it failed on a "
                    f"bad byte all the same: {exc}); use errors='strict' or another codec"
                ) from None
            # (A handler of the caller's that raises: it asked for strict decoding.)
        except Exception as exc:
            raise InvalidEncodingError(
                f"errors={errors!r} cannot handle a byte {encoding!r} cannot decode "
                f"({type(exc).__name__}: {exc}); decoding needs a handler such as 'replace', "
                "'ignore', 'backslashreplace', 'surrogateescape' or 'strict' "
                "('xmlcharrefreplace' and 'namereplace' only encode)"
            ) from None


def check_process(process: object) -> None:
    """Raise :class:`InvalidArgumentTypeError` unless ``process`` looks like a process object
    (``pid``, ``returncode``, ``wait()``) of asyncio's kind."""
    if isinstance(process, subprocess.Popen):
        # It has all three, but its wait() blocks: awaited on the loop, it froze the loop for
        # the child's whole life and then failed with a bare TypeError.
        raise InvalidArgumentTypeError(
            f"expected an asyncio process object (from create_subprocess_exec or a "
            f"SubprocessWrapper), not a subprocess.Popen (pid {process.pid}): its wait() "
            "blocks the event loop"
        )
    if (
        process is None
        or not isinstance(getattr(process, "pid", None), int)
        or not hasattr(process, "returncode")
        or not callable(getattr(process, "wait", None))
    ):
        raise InvalidArgumentTypeError(
            f"expected a process object (e.g. from create_subprocess_exec), not {process!r}"
        )


def check_cwd(cwd: object) -> None:
    """Raise unless ``cwd`` names an existing directory."""
    if not isinstance(cwd, str | bytes | os.PathLike):
        raise InvalidArgumentTypeError(f"cwd must be a path, not {type(cwd).__name__}")
    path = _fspath(cwd, "cwd") if isinstance(cwd, os.PathLike) else cwd
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
        if not (isinstance(key, bytes) or encodable(key)) or not (
            isinstance(value, bytes) or encodable(value)
        ):
            raise InvalidEnvironmentError(
                f"env[{key!r}] = {value!r} cannot be passed to a program: a lone surrogate, "
                "which no encoding of the OS holds"
            )


def check_limit(value: object, name: str, *, minimum: int) -> None:
    """Raise :class:`InvalidLimitError` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidLimitError(f"{name} must be an int >= {minimum}, not {value!r}")


#: The largest int a timeout can be: beyond, it is no float (``None`` or ``inf`` mean no limit).
_MAX_SECONDS = int(sys.float_info.max)


def check_flag(value: object, name: str) -> bool:
    """Return ``value`` if it is a bool.

    Raises:
        InvalidArgumentTypeError: anything else ("yes", "no", 0, None): a string such as "no"
            is true, and would silently turn the option on.
    """
    if value.__class__ is not bool:
        raise InvalidArgumentTypeError(f"{name} must be True or False, not {value!r}")
    return value is True


def check_timeout(
    value: float | None, name: str = "timeout", *, finite: bool = False
) -> float | None:
    """Return ``value`` if it is ``None`` or a number >= 0 (``inf`` means no limit, as ``None``).

    ``finite``: a grace period, after which a stop kills: ``inf`` would never kill a child that
    ignores SIGTERM, so the stop (and whatever waits for it) would never end.

    Raises:
        InvalidTimeoutError: negative, NaN, or not a number (with ``finite``, also ``inf``).
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        hint = ""
        if isinstance(value, timedelta):
            hint = f" (pass {name}=delta.total_seconds())"
        raise InvalidTimeoutError(
            f"{name} must be a number of seconds, not {type(value).__name__}{hint}"
        )
    if isinstance(value, int) and not -_MAX_SECONDS <= value <= _MAX_SECONDS:
        # float() of it (or formatting it) would raise a bare OverflowError.
        if value < 0:
            raise InvalidTimeoutError(f"{name} must be >= 0 seconds, got a huge negative int")
        raise InvalidTimeoutError(f"{name} is too large a number of seconds; None means no limit")
    if math.isnan(value) or value < 0:
        raise InvalidTimeoutError(f"{name} must be >= 0 seconds, got {value!r}")
    if finite and math.isinf(value):
        raise InvalidTimeoutError(
            f"{name} must be a finite number of seconds: after it the stop kills, and with "
            f"{value!r} a child that ignores SIGTERM would never be stopped"
        )
    return float(value)


def spawn_error(
    program: str | bytes, exc: OSError | subprocess.SubprocessError, cwd: Any = None
) -> OSError:
    """Our exception for an ``OSError`` (or ``Popen``'s ``SubprocessError`` for a failed
    ``preexec_fn``) a spawn raised (``program``: what was to be run). The spawn failed, so
    nothing is running; the original error is kept as ``__cause__``."""
    if isinstance(exc, PrismQError) and isinstance(exc, OSError):
        return exc
    if not isinstance(exc, OSError):  # (only Popen's own: see preexec_failed)
        return PreexecFnError(
            f"could not start {os.fsdecode(program)!r}: its preexec_fn raised in the child "
            "before the program was executed (the child cannot report the exception); nothing "
            "was started"
        )
    target = os.fsdecode(exc.filename) if exc.filename is not None else os.fsdecode(program)
    if cwd is not None and exc.filename is not None and target == os.fsdecode(cwd):
        return InvalidCwdError(
            exc.errno, f"cannot enter working directory {target!r}: {exc.strerror}", target
        )
    if isinstance(exc, FileNotFoundError):
        return not_found_error(target, exc)
    if exc.errno in (errno.EACCES, errno.EPERM) and exc.filename is not None:
        why = "is a directory" if os.path.isdir(target) else "is not executable by this user"
        return CommandNotExecutableError(
            exc.errno, f"cannot execute {target!r}: it {why} ({exc.strerror})", target
        )
    if exc.errno == errno.ENOEXEC:
        return ExecutableFormatError(
            exc.errno,
            f"cannot execute {target!r}: not a program this system can run (a binary for "
            "another platform, or a script without a #! line naming its interpreter)",
            target,
        )
    # Named by the program: the file the error names may be another (out of descriptors while
    # opening /dev/null for stdin); it stays the error's filename.
    return SpawnFailedError(
        exc.errno, f"could not start {os.fsdecode(program)!r}: {exc.strerror or exc}", exc.filename
    )


def preexec_failed(exc: BaseException) -> bool:
    """Whether ``exc`` is ``Popen``'s report of a ``preexec_fn`` that raised in the child (its
    bare ``SubprocessError``; any other error of a spawn keeps its own type)."""
    return type(exc) is subprocess.SubprocessError and "preexec_fn" in str(exc)


def not_found_error(program: str | bytes, exc: FileNotFoundError) -> CommandNotFoundError:
    """Wrap the spawn's ``FileNotFoundError`` into our more helpful one."""
    name = os.fsdecode(program)
    interpreter = _missing_interpreter(name)
    if interpreter is not None:
        return CommandNotFoundError(
            name, f"its interpreter {interpreter!r} (its #! line) was not found"
        )
    # Windows takes "/" as well as "\\" ("C:/tools/x.exe", "./build.bat"); POSIX only "/".
    separators = ("\\", "/") if IS_WINDOWS else (os.sep, "/")
    detail = "no such file" if any(sep in name for sep in separators) else "not on PATH"
    if IS_WINDOWS and not os.path.splitext(name)[1]:
        # CreateProcess adds ".exe" to a bare name, never PATHEXT's other suffixes.
        detail += (
            "; Windows adds only '.exe' to a name without one: a .cmd/.bat program (npm, yarn) "
            f"needs its full name ('{name}.cmd') or shell=True"
        )
    if " " in name.strip():
        detail += (
            "; it contains spaces: pass the program and its arguments separately ('ls', '-l'), "
            "or run the line through a shell: create_subprocess_shell('ls -l') or "
            "run('ls -l', shell=True)"
        )
    return CommandNotFoundError(name, f"{detail} ({exc.strerror or exc})")


def _missing_interpreter(name: str) -> str | None:
    """The interpreter named by ``name``'s ``#!`` line when ``name`` is a file and that
    interpreter does not exist (the kernel then reports the script itself as not found)."""
    if os.sep not in name or not os.path.isfile(name):
        return None
    try:
        with open(name, "rb") as script:
            first = script.readline(256)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    parts = first[2:].split()
    if not parts:
        return None
    interpreter = os.fsdecode(parts[0])
    return None if os.path.exists(interpreter) else interpreter
