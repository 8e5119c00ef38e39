"""The package's one exception hierarchy.

Every error we raise derives from :class:`PrismQError`. Where users already catch a builtin
(``TimeoutError``, ``FileNotFoundError``, ``ValueError``, ``TypeError``) our subclass inherits it
too, so code written for asyncio keeps working.
"""

from __future__ import annotations

import errno
import shlex
import sqlite3
import subprocess
from collections.abc import Sequence
from typing import Any

__all__ = [
    "BackendClosedError",
    "ClosedError",
    "CommandNotFoundError",
    "CwdNotADirectoryError",
    "CwdNotFoundError",
    "DuplicateRunError",
    "InvalidArgumentTypeError",
    "InvalidBackendError",
    "InvalidCommandError",
    "InvalidCwdError",
    "InvalidEnvironmentError",
    "InvalidIntervalError",
    "InvalidLimitError",
    "InvalidLogDirError",
    "InvalidParametersError",
    "InvalidQueryError",
    "InvalidRunError",
    "InvalidRunModeError",
    "InvalidTaskError",
    "InvalidTimeoutError",
    "ModuleExecutionException",
    "OutputClosedError",
    "PoolClosedError",
    "PrismQError",
    "ProcessFailedError",
    "ProcessTimeoutError",
    "RegistryBusyError",
    "RegistryClosedError",
    "RegistryDatabaseError",
    "RegistryFullError",
    "RegistryOpenError",
    "RegistryReadOnlyError",
    "RegistrySchemaError",
    "ResourceLimitException",
    "ResourceWaitTimeoutError",
    "RunClaimedError",
    "RunNotFoundError",
    "RunStateError",
    "RunnerClosedError",
    "ScriptNotFoundError",
    "SubprocessPolicyException",
    "TaskManagerClosedError",
    "TaskTimeoutError",
    "UnscriptedCommandError",
    "WrapperClosedError",
]


def _tail_text(data: bytes | None, limit: int = 2000) -> str:
    if not data:
        return ""
    return data[-limit:].decode("utf-8", errors="replace")


class PrismQError(Exception):
    """Base class of every exception raised by prismq_subprocess itself."""

    def __reduce__(self) -> str | tuple[Any, ...]:
        # Pickled as builtin exceptions are (their args and attributes), but rebuilt without
        # calling the class's own __init__, whose parameters differ from its args: a
        # ProcessFailedError raised in a ProcessPoolExecutor job could not be rebuilt, and
        # broke the pool ("terminated abruptly"). A class without a constructor of its own
        # pickles as builtin exceptions do (its bases' may not be rebuilt another way).
        cls = type(self)
        if not any("__init__" in vars(k) for k in cls.__mro__ if issubclass(k, PrismQError)):
            return super().__reduce__()
        args: tuple[Any, ...] = self.args
        if isinstance(self, OSError) and self.errno is not None and self.strerror is not None:
            args = (self.errno, self.strerror)
            if self.filename is not None:
                args += (self.filename,)
        return (_rebuilt, (cls, args, dict(self.__dict__)))


def _rebuilt(cls: type[BaseException], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    """What unpickling a :class:`PrismQError` makes: ``cls`` with ``args`` and ``state``."""
    error = cls.__new__(cls, *args)
    (OSError if issubclass(cls, OSError) else BaseException).__init__(error, *args)
    error.__dict__.update(state)
    return error


class InvalidRunModeError(PrismQError, ValueError):
    """Raised when text (an argument or ``PRISMQ_RUN_MODE``) names no :class:`RunMode`.

    The message lists the valid spellings.
    """


class SubprocessPolicyException(PrismQError, RuntimeError):
    """Raised when a mode pinned by the caller cannot spawn on the running event loop.

    Typical cause: ASYNC pinned on Windows under a ``SelectorEventLoop`` (``uvicorn --reload``),
    whose ``subprocess_exec`` raises ``NotImplementedError``. Auto-detected modes fall back to
    THREADED instead of raising.
    """


class InvalidCommandError(PrismQError, ValueError):
    """Raised before spawning when a command is empty, contains NUL bytes, or asks for an option
    the asyncio API forbids (text mode, ``shell=True`` on exec, ...)."""


class InvalidArgumentTypeError(PrismQError, TypeError):
    """Raised before spawning when a command argument is not str, bytes or ``os.PathLike``; and
    before anything is done when a public function is given another kind of object than it
    takes (a path that is not str or ``os.PathLike``, an ``env`` that is not a mapping, ...)."""


class InvalidEnvironmentError(PrismQError, TypeError, ValueError):
    """Raised before spawning when ``env`` is not a mapping of str (or bytes) to the same, or a
    key is empty or holds ``=``/NUL (also a ``ValueError``, as asyncio raises for those)."""


class InvalidTimeoutError(PrismQError, ValueError):
    """Raised when a timeout or grace period is negative or not a number."""


class InvalidCwdError(PrismQError, OSError):
    """Raised before spawning when ``cwd`` does not name an existing directory."""


class CwdNotFoundError(InvalidCwdError, FileNotFoundError):
    """``cwd`` does not exist (also a ``FileNotFoundError``, as asyncio would raise)."""


class CwdNotADirectoryError(InvalidCwdError, NotADirectoryError):
    """``cwd`` exists but is not a directory (also a ``NotADirectoryError``)."""


class CommandNotFoundError(PrismQError, FileNotFoundError):
    """Raised when the program to run does not exist or is not on ``PATH``.

    It is a ``FileNotFoundError``, so ``except FileNotFoundError`` written for asyncio still works.
    """

    def __init__(self, program: str, detail: str = "") -> None:
        message = f"program {program!r} was not found"
        if detail:
            message = f"{message}: {detail}"
        super().__init__(errno.ENOENT, message, program)
        self.program = program


class NoRunningLoopError(PrismQError, RuntimeError):
    """Raised when something that schedules work on the running event loop is called where no
    loop runs (``BackgroundTaskManager.start_task`` or ``PeriodicTask.start`` at module level,
    as the PrismQ guide writes them): call it from async code. A ``RuntimeError``, as asyncio's
    own "no running event loop"."""


__all__ += ["NoRunningLoopError"]


class ClosedError(PrismQError, RuntimeError):
    """Base class of the errors raised when an object is used after ``aclose()`` (or one of its
    aliases: ``cleanup()``, ``close()``, ``shutdown()``, or the end of its ``async with`` block).

    Catch this to handle every "already closed" case at once; the subclasses say which object it
    was. It is also a ``RuntimeError``, as it was before the base class existed.
    """


class WrapperClosedError(ClosedError):
    """Raised when a :class:`SubprocessWrapper` is used after ``aclose()`` or ``cleanup()``."""


class ModuleExecutionException(PrismQError):
    """Base class of errors about a command or module that ran and did not succeed.

    Attributes:
        cmd: the command as run.
        returncode: the exit status (negative: killed by that signal), or ``None``.
        stdout, stderr: the captured output (its tail when output was bounded).
    """

    def __init__(
        self,
        message: str,
        *,
        cmd: Sequence[str] | str = (),
        returncode: int | None = None,
        stdout: bytes = b"",
        stderr: bytes = b"",
    ) -> None:
        super().__init__(message)
        self.cmd = cmd
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr

    @property
    def output(self) -> bytes:
        """Alias of :attr:`stdout`, as on :class:`subprocess.CalledProcessError`."""
        return self.stdout


class ProcessFailedError(ModuleExecutionException):
    """Raised by ``run(check=True)`` when the command exits with a non-zero status."""

    returncode: int  # (always known here: the command exited)

    def __init__(
        self,
        *,
        cmd: Sequence[str] | str,
        returncode: int,
        stdout: bytes = b"",
        stderr: bytes = b"",
    ) -> None:
        message = f"command {_describe(cmd)} exited with status {returncode}"
        tail = _tail_text(stderr) or _tail_text(stdout)
        if tail:
            message = f"{message}; output tail:\n{tail}"
        super().__init__(message, cmd=cmd, returncode=returncode, stdout=stdout, stderr=stderr)


class ProcessTimeoutError(ModuleExecutionException, TimeoutError):
    """Raised when a command outlives its timeout.

    The process tree has been stopped when this is raised. ``stdout``/``stderr`` hold what was
    captured before the stop; ``timeout`` the limit in seconds. It is also a ``TimeoutError``.
    """

    def __init__(
        self,
        *,
        cmd: Sequence[str] | str,
        timeout: float,
        returncode: int | None = None,
        stdout: bytes = b"",
        stderr: bytes = b"",
    ) -> None:
        message = f"command {_describe(cmd)} timed out after {timeout:g} s and was stopped"
        super().__init__(message, cmd=cmd, returncode=returncode, stdout=stdout, stderr=stderr)
        self.timeout = timeout


class ResourceLimitException(PrismQError):
    """Raised when a start is refused because memory or CPU is short (see ``ResourceManager``),
    or when a run exceeds its own resource cap."""


class RunStateError(PrismQError, ValueError):
    """Raised on an invalid run status transition (e.g. a finished run back to RUNNING)."""


class RunClaimedError(RunStateError):
    """Raised by ``update_run`` for a run another process owns now: it claimed the run (a
    pick-up, ``claim_run``) after this copy was read. Nothing is changed; the run is that
    process's to run and record. ``BackgroundTaskManager`` then drops its own start of it, and
    ``ModuleRunner`` stops the child it had started for it (also on a cluster) and raises it.
    """

    #: The id of the run claimed (``None`` where unknown).
    run_id: str | None = None


def _describe(cmd: Sequence[str] | str) -> str:
    if isinstance(cmd, str):
        return repr(cmd)
    parts = [str(part) for part in cmd]
    text = shlex.join(parts)
    shown = repr(text if len(text) <= 200 else text[:197] + "...")
    if "\\" in shown and "\\" not in text:
        # Quotes of both kinds: shlex's quoting ('"'"') inside repr's escaping was unreadable;
        # the list's repr, as subprocess.CalledProcessError shows it, is not.
        shown = repr(parts)
        return shown if len(shown) <= 200 else shown[:197] + "..."
    return shown


class InvalidIntervalError(PrismQError, ValueError):
    """Raised when an interval, period or duration (seconds or ``timedelta``) is not a positive,
    finite number, e.g. the ``interval`` of a ``PeriodicTask`` or a sampler's ``interval``."""


class InvalidLimitError(PrismQError, ValueError):
    """Raised when a size or resource limit is out of range: a percentage outside (0, 100], a
    negative byte count (``max_output_bytes``), a non-positive ``limit`` or ``max_workers``, or a
    hysteresis band wider than its threshold."""


class ResourceWaitTimeoutError(ResourceLimitException, TimeoutError):
    """Raised by ``ResourceManager.admit(wait=True, timeout=...)`` when resources stayed short for
    the whole timeout. It is a ``ResourceLimitException`` and also a ``TimeoutError``."""


class InvalidLogDirError(PrismQError, ValueError):
    """Raised by ``OutputCapture`` when its ``log_dir`` cannot hold log files: the path has a NUL
    character, or it exists and is not a directory. (A directory that does not exist yet is
    made with the first line written.)"""


class InvalidRunError(PrismQError, ValueError):
    """Raised when a :class:`Run` is built from bad data (a naive datetime, an unknown status,
    a malformed ``from_dict`` payload)."""


class RunNotFoundError(PrismQError, KeyError):
    """Raised by ``update_run`` when the registry holds no run with that ``run_id``.

    It is a ``KeyError``; ``str()`` gives the plain message.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class DuplicateRunError(PrismQError, ValueError):
    """Raised by ``add_run`` when the registry already holds a run with that ``run_id``."""


class InvalidQueryError(PrismQError, ValueError):
    """Raised when a registry query gets a bad argument (negative ``limit``/``offset``,
    a ``max_runs``/``max_age`` that is not positive)."""


class StdinAlreadySentError(PrismQError, BrokenPipeError):
    """Raised by a LOCAL process's ``stdin.write()`` (or ``communicate(input)``) after the first
    read of its output closed its stdin: LOCAL hands the child what was written in one piece
    when stdin is closed, the process waited for or its output first read, and a later write
    could no longer reach it. A ``BrokenPipeError``, as a write to a child that closed its
    stdin is. (After the caller's own ``stdin.close()`` or a ``wait()``, writes are ignored,
    as asyncio does.)"""


class StreamNotOpenError(PrismQError, RuntimeError):
    """Raised when a ``LineStream`` (``wrapper.stream(...)``) is iterated, waited for or asked
    for its process outside its ``async with`` block: the block is what starts the command."""


class StreamBusyError(PrismQError, RuntimeError):
    """Raised when a task reads a ``LineStream``'s lines while another task is reading them:
    each line goes to one reader, so two readers would each get an arbitrary part."""


class RegistryClosedError(ClosedError):
    """Raised when a run registry is used after ``aclose()`` / ``close()`` (or after its
    ``async with`` block)."""


class RegistrySchemaError(PrismQError, RuntimeError):
    """Raised when a SQLite registry file has a schema newer than this version of the library
    understands, or is not a registry file at all."""


class RegistryOpenError(PrismQError, OSError):
    """Raised when a SQLite registry's file cannot be opened or created: its folder does not
    exist (it is not made for you: a mistyped path would otherwise become a new, empty
    registry), the path is a directory, or the file or its folder is not accessible."""


class RegistryReadOnlyError(PrismQError, PermissionError):
    """Raised when a registry opened with ``read_only=True`` is asked to write (add, update,
    delete, cancel request, recovery); nothing is written."""


class RegistryDatabaseError(PrismQError, sqlite3.OperationalError):
    """Raised when a SQLite registry's database fails a call (SQLite's "operational" errors: a
    disk I/O error, a file made read-only under it...); the message names the file. What the
    call was to write is not in the file.

    It is also the ``sqlite3.OperationalError`` earlier versions raised, with SQLite's own
    ``sqlite_errorcode`` / ``sqlite_errorname``, and SQLite's exception as ``__cause__``."""


class RegistryFullError(RegistryDatabaseError):
    """Raised when the disk holding a SQLite registry is full (``SQLITE_FULL``): the write is
    not in the file, and every write acknowledged before it still is. Writes work again once
    there is room."""


class RegistryBusyError(RegistryDatabaseError):
    """Raised when another connection (another worker process, a tool) held a SQLite
    registry's lock for longer than its ``busy_timeout`` (``SQLITE_BUSY`` / ``SQLITE_LOCKED``):
    the call did nothing. The file is fine; a later call may succeed."""


class OutputClosedError(ClosedError):
    """Raised by ``OutputCapture.append_line`` for a run whose output was already closed
    (``close_run``), or for any run once the capture itself was closed (``aclose()``)."""


class TaskManagerClosedError(ClosedError):
    """Raised by ``BackgroundTaskManager.start_task`` once ``aclose()`` / ``shutdown()`` has
    begun."""


class UnscriptedCommandError(PrismQError, AssertionError):
    """Raised in DRY_RUN by a strict :class:`DryRunScript` (the ``pq_dry_run`` fixture) when the
    code under test starts a command that no registered rule answers.

    It is an ``AssertionError``: an expectation of the test failed, not the code under test.
    ``command`` is the unexpected command (argument tuple, or the shell command line).
    """

    def __init__(self, message: str, command: tuple[str, ...] | str) -> None:
        super().__init__(message)
        self.command = command


class ScriptNotFoundError(PrismQError, FileNotFoundError):
    """Raised by ``ModuleRunner`` (and the executor) before anything starts when a module's
    script does not exist or is not a file (or a directory with ``__main__.py``).

    It is a ``FileNotFoundError``; ``filename`` is the path that was checked.
    """

    def __init__(self, path: str, detail: str = "does not exist") -> None:
        super().__init__(errno.ENOENT, f"module script {path!r} {detail}", path)


class InvalidParametersError(PrismQError, ValueError):
    """Raised before anything starts when a module's parameters cannot be stored as JSON or
    mapped to command-line arguments (a non-str key, a name that is not an option name, a value
    that is not JSON-serialisable)."""


class RunnerClosedError(ClosedError):
    """Raised when a ``ModuleRunner`` is used after ``aclose()``, or a ``ConcurrentExecutor``
    after ``aclose()`` or ``cleanup()``."""


class PoolClosedError(ClosedError):
    """Raised by ``ResourcePool.acquire_subprocess`` after ``aclose()`` or ``cleanup()``."""


class OutputNotFoundError(RunNotFoundError):
    """Raised by ``OutputCapture.subscribe`` (and ``sse_events``) for a run the capture does not
    know: never opened, written to or closed here, and without a log file to replay. Pass
    ``wait=True`` (or a number of seconds) to wait for such a run to appear instead.

    It is a ``RunNotFoundError`` and so a ``KeyError``.
    """


class OutputWaitTimeoutError(OutputNotFoundError, TimeoutError):
    """Raised by a subscription made with ``wait=<seconds>`` when the run did not appear in time.

    It is also a ``TimeoutError``.
    """


class InvalidRunIdError(PrismQError, ValueError):
    """Raised when a run id cannot name a log file (not a str, empty, or longer than a file name
    may be once encoded; see ``run_log_path``), or when a file name was not made by
    ``run_log_path``."""


class InvalidSubscriptionError(PrismQError, ValueError):
    """Raised by ``OutputCapture.subscribe`` and ``sse_events`` before anything starts when
    ``from_seq``/``after``/``last_event_id``/``wait`` is malformed, or both ``from_seq`` and
    ``after`` are given."""


__all__ += [
    "InvalidRunIdError",
    "InvalidSubscriptionError",
    "OutputNotFoundError",
    "OutputWaitTimeoutError",
]


class InvalidSSEEventError(PrismQError, ValueError):
    """Raised when an ``SSEEvent`` field cannot be framed: a ``data``, ``event`` or ``id`` that
    is neither a ``str`` nor ``None`` or cannot be sent as UTF-8 (a lone surrogate), an
    ``event`` or ``id`` with a line break (or an ``id`` with NUL, which browsers ignore), or a
    ``retry`` that is not an int >= 0."""


__all__ += ["InvalidSSEEventError"]


class InvalidTaskError(PrismQError, TypeError):
    """Raised before anything starts when background work is given the wrong kind of object: a
    ``BackgroundTaskManager.start_task`` given something that is not a coroutine object (a
    Task, a Future, a coroutine function not called), or a ``PeriodicTask`` / ``MemoryMonitor``
    given a ``task_func`` or callback that is not callable. It is a ``TypeError``."""


class InvalidReadingError(PrismQError, TypeError, ValueError):
    """Raised when a ``reader=`` of ``ResourceManager`` or ``MemoryMonitor`` returned what
    cannot be judged against a limit: not a ``ResourceSnapshot``, or one with a field that is
    not a finite number >= 0 (a NaN compares False with any limit, which would have turned the
    limits off without a word)."""


__all__ += ["InvalidReadingError"]


class TaskTimeoutError(ProcessTimeoutError):
    """Raised by ``execute_with_timeout`` when the awaited work outlived its timeout; the work
    has been cancelled. ``task_name`` names it. It is a :class:`ProcessTimeoutError` (so
    handlers written for timed-out commands still catch it) and a ``TimeoutError``."""

    def __init__(self, *, task_name: str, timeout: float) -> None:
        super().__init__(cmd=task_name, timeout=timeout)
        self.args = (f"task {task_name!r} timed out after {timeout:g} s and was cancelled",)
        self.task_name = task_name


class InvalidBackendError(PrismQError, TypeError):
    """Raised before anything starts when a run backend is given something it cannot work with
    (e.g. a synchronous Dask ``Client``, which would block the event loop, or an empty scheduler
    address)."""


class BackendClosedError(ClosedError):
    """Raised when a run backend is used after ``aclose()``."""


# -- strategies written outside the package ----------------------------------------------------
__all__ += ["StrategyContractError"]


class StrategyContractError(PrismQError, TypeError):
    """Raised when a strategy passed by the caller (``SubprocessWrapper(strategy=...)``) breaks
    the contract of ``prismq_subprocess.abc.SubprocessStrategy``: its ``spawn()`` returned
    something that is not a process object (``ProcessLike``: ``asyncio.subprocess.Process``'s
    members, with awaitable ``wait()``/``communicate()``), e.g. ``None`` or a
    ``subprocess.Popen``. The child it may have started is killed; nothing is tracked."""


# -- spawn failures and option checks (issue 11 D13, D14) ----------------------------------------
__all__ += [
    "CommandNotExecutableError",
    "ExecutableFormatError",
    "InvalidEncodingError",
    "InvalidOptionError",
    "PreexecFnError",
    "SpawnFailedError",
    "StdinAlreadySentError",
    "StreamBusyError",
    "StreamNotOpenError",
    "UnknownUserError",
]


class SpawnFailedError(PrismQError, OSError):
    """Raised when the operating system refused to start the program; nothing was left running.

    ``errno``, ``strerror`` and ``filename`` are those of the failure. The subclasses name the
    common causes; :class:`CommandNotFoundError` covers a program that does not exist.
    """


class CommandNotExecutableError(SpawnFailedError, PermissionError):
    """Raised when the program exists but cannot be executed: a file without execute permission,
    or a directory. It is a ``PermissionError``, as the failed spawn itself would raise."""


class ExecutableFormatError(SpawnFailedError):
    """Raised when the program is a file the system cannot execute (``ENOEXEC``): a binary for
    another platform, or a script without a ``#!`` line."""


class PreexecFnError(SpawnFailedError, subprocess.SubprocessError):
    """Raised when the ``preexec_fn`` passed to a spawn raised in the child, before the
    program was executed; nothing was left running. Its exception cannot cross from the child
    (``Popen`` knows only that there was one); it is also the ``subprocess.SubprocessError``
    ``Popen`` and asyncio raise then."""


class InvalidOptionError(PrismQError, TypeError, ValueError):
    """Raised before spawning when a ``Popen`` keyword argument is unknown, or has a type or
    value ``Popen`` would reject (``pass_fds`` that are not open descriptors, a ``umask`` that
    is not an int, ``creationflags`` outside Windows, ...). Also a ``TypeError`` (what an
    unexpected keyword argument raises) and a ``ValueError``."""


class UnknownUserError(PrismQError, KeyError):
    """Raised before spawning when ``user=``, ``group=`` or ``extra_groups=`` names no account on
    this system (a ``KeyError``, as ``Popen``'s own lookup raises)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class InvalidEncodingError(PrismQError, LookupError):
    """Raised before anything starts when an ``encoding`` or ``errors`` handler name is unknown
    (a ``LookupError``, as ``codecs.lookup`` raises)."""


# -- host shutdown (issue 11 A4) -------------------------------------------------------------------
__all__ += ["ShutdownHandlerError"]


class ShutdownHandlerError(PrismQError, RuntimeError):
    """Raised when the shutdown handler cannot be installed: no running event loop, not the main
    thread (Python sets signal handlers from the main thread only), or another one is installed;
    when it is made for a signal that cannot be handled (SIGKILL, SIGSTOP, not a signal of this
    platform); or when it is uninstalled from another thread than the main one.
    """
