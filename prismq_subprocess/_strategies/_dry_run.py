"""DRY_RUN mode: never starts a process; records each command and answers from a script.

Like httpx's ``MockTransport``: host applications test their code paths without spawning anything,
then inspect :attr:`DryRunRecorder.calls`.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from .._core._exceptions import (
    InvalidArgumentTypeError,
    InvalidCommandError,
    InvalidTimeoutError,
)
from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._run_process import ChildRun
from .._core._validation import check_timeout
from .._platform import IS_WINDOWS, KILL_SIGNAL, PlatformOps
from ._base import RunStart, SpawnRequest, SubprocessStrategy
from ._process_base import ProcessBase
from ._stdin_buffer import BufferedStdin

__all__ = [
    "DryRunCall",
    "DryRunHandler",
    "DryRunProcess",
    "DryRunRecorder",
    "DryRunResponse",
    "DryRunStrategy",
]

_POSIX = not IS_WINDOWS
_VALID_SIGNALS = frozenset(int(sig) for sig in signal.valid_signals())
# Signals whose default action does not end a POSIX process: ignored, or stopped (a stopped
# process is still running, its returncode None).
_KEEPS_RUNNING = frozenset(
    {0}
    | {
        int(getattr(signal, name))
        for name in (
            "SIGCHLD",
            "SIGCONT",
            "SIGWINCH",
            "SIGURG",
            "SIGSTOP",
            "SIGTSTP",
            "SIGTTIN",
            "SIGTTOU",
        )
        if hasattr(signal, name)
    }
)

logger = logging.getLogger(__name__)


def signal_that_ends(sig: int) -> int | None:
    """``sig`` as a number if it ends a fake run, None if a real process would go on running
    (0, the "still alive?" probe; signals ignored or stopping by default). POSIX only; on
    Windows every signal ends the run.

    Raises:
        OSError: ``EINVAL``, a number that names no signal, as ``os.kill`` would.
    """
    number = int(sig)
    if _POSIX:
        if number != 0 and number not in _VALID_SIGNALS:
            raise OSError(errno.EINVAL, f"invalid signal number {number}")
        if number in _KEEPS_RUNNING:
            return None
    return number


# Above Linux's largest pid_max (2**22) and odd (Windows pids are multiples of 4): a fake pid can
# never name a real process, so a stray os.kill(fake_pid, ...) fails instead of hitting someone.
_FAKE_PID_BASE = 2**22 + 1
_fake_pids = itertools.count(_FAKE_PID_BASE, 2)


@dataclass(frozen=True)
class DryRunResponse:
    """What a dry-run command "does": its exit status, output, and how long it "runs".

    With ``duration > 0`` the fake process stays running that long (so timeouts, cancellation
    and ``terminate()`` can be tested); terminating it ends it with ``-SIGTERM``.
    """

    returncode: int = 0
    stdout: bytes = b""
    stderr: bytes = b""
    duration: float = 0.0

    def __post_init__(self) -> None:
        """Check the answer now: a wrong one would fail only at the spawn, far from its cause
        (a str output), or never end (``returncode=None``).

        Raises:
            InvalidArgumentTypeError: ``returncode`` is not an int, or ``stdout``/``stderr``
                are not bytes (bytearray and memoryview are kept as bytes).
            InvalidTimeoutError: ``duration`` is not a number >= 0 (``inf``: until stopped).
        """
        if isinstance(self.returncode, bool) or not isinstance(self.returncode, int):
            raise InvalidArgumentTypeError(
                f"returncode must be an int, not {self.returncode!r} (a fake process that "
                "should run until it is stopped takes duration=float('inf'))"
            )
        for name in ("stdout", "stderr"):
            value = getattr(self, name)
            if isinstance(value, bytearray | memoryview):
                object.__setattr__(self, name, bytes(value))
            elif not isinstance(value, bytes):
                hint = " (encode it, or use DryRunScript.register, which takes str)"
                raise InvalidArgumentTypeError(
                    f"{name} must be bytes, not {type(value).__name__}"
                    + (hint if isinstance(value, str) else "")
                )
        if self.duration is None:
            raise InvalidTimeoutError("duration must be a number of seconds, not None")
        check_timeout(self.duration, "duration")


@dataclass(frozen=True)
class DryRunCall:
    """One command the code under test asked to run.

    ``args`` is the argument tuple (exec) or the command line (shell); ``input`` what was sent to
    stdin (set once stdin is closed or ``communicate(input)`` was called).
    """

    args: tuple[str, ...] | str
    shell: bool
    cwd: str | None
    env: Mapping[str, str] | None
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    input: bytes | None = None


class DryRunHandler(Protocol):
    """A scripted answer for :class:`DryRunRecorder`: given the :class:`DryRunCall`, return a
    :class:`DryRunResponse`, a returncode, or ``None`` for the recorder's default."""

    def __call__(self, call: DryRunCall, /) -> DryRunResponse | int | None: ...


def _coerce(answer: DryRunResponse | int | None) -> DryRunResponse | None:
    if answer is None or isinstance(answer, DryRunResponse):
        return answer
    if isinstance(answer, int) and not isinstance(answer, bool):
        return DryRunResponse(returncode=answer)
    raise InvalidArgumentTypeError(
        f"a dry-run answer must be a DryRunResponse, an int returncode or None, not {answer!r}"
    )


def _table_key(key: object) -> tuple[str, ...] | str:
    """A table key spelled as commands are recorded (:attr:`SpawnRequest.display`): a shell
    line as str, arguments as a tuple of str (bytes decoded, paths as text).

    Raises:
        InvalidArgumentTypeError: not a command line nor a tuple of str/bytes/paths.
        InvalidCommandError: an empty command.
    """
    if isinstance(key, str | bytes):
        line = key if isinstance(key, str) else key.decode(errors="replace")
        if not line:
            raise InvalidCommandError("a DryRunRecorder table key must not be empty")
        return line
    if not isinstance(key, tuple):
        raise InvalidArgumentTypeError(
            "a DryRunRecorder table key is the argument tuple or the shell command line (str), "
            f"not {type(key).__name__} {key!r}"
        )
    parts: list[str] = []
    for position, part in enumerate(key):
        if isinstance(part, bytes):
            parts.append(part.decode(errors="replace"))
        elif isinstance(part, str | os.PathLike):
            parts.append(os.fsdecode(part))
        else:
            raise InvalidArgumentTypeError(
                f"DryRunRecorder table key {key!r}: argument {position} is "
                f"{type(part).__name__}; expected str, bytes or os.PathLike"
            )
    if not parts:
        raise InvalidCommandError("a DryRunRecorder table key must not be empty")
    return tuple(parts)


class DryRunRecorder:
    """Records dry-run commands and scripts their results.

    ``responses`` is either a table mapping a command (argument tuple, or the command line for
    shell commands; bytes and paths in it are read as the text commands are recorded as) to a
    :class:`DryRunResponse` or a returncode, or a callable
    ``handler(call) -> DryRunResponse | int | None``. Commands the table or handler does not
    answer get ``default`` (returncode 0, no output).

    Thread-safe; :attr:`calls` lists every command in the order it was started.

    Raises:
        InvalidArgumentTypeError: a table key or answer of the wrong kind (``None`` included).
        InvalidCommandError: an empty table key.
    """

    def __init__(
        self,
        responses: (
            Mapping[tuple[str, ...] | str, DryRunResponse | int] | DryRunHandler | None
        ) = None,
        *,
        default: DryRunResponse | None = None,
    ) -> None:
        self._table: dict[tuple[str, ...] | str, DryRunResponse] = {}
        self._handler: DryRunHandler | None = None
        if callable(responses):
            self._handler = responses
        elif responses is not None:
            if not isinstance(responses, Mapping):
                # (It failed at once with a bare AttributeError: a list has no items().)
                raise InvalidArgumentTypeError(
                    "DryRunRecorder takes a mapping of command -> answer, or a handler called "
                    f"with each DryRunCall; not {type(responses).__name__}"
                )
            for key, answer in responses.items():
                coerced = _coerce(answer)
                if coerced is None:
                    raise InvalidArgumentTypeError(
                        f"the answer for {key!r} is None; a table answer is a DryRunResponse "
                        "or an int returncode (leave the command out for the default)"
                    )
                self._table[_table_key(key)] = coerced
        self.default = default or DryRunResponse()
        self._lock = threading.Lock()
        self._calls: list[DryRunCall] = []

    @property
    def calls(self) -> list[DryRunCall]:
        """A copy of the recorded calls, oldest first."""
        with self._lock:
            return list(self._calls)

    @property
    def commands(self) -> list[tuple[str, ...] | str]:
        """Just the ``args`` of each recorded call."""
        return [call.args for call in self.calls]

    def clear(self) -> None:
        """Forget the recorded calls."""
        with self._lock:
            self._calls.clear()

    def record(self, call: DryRunCall) -> tuple[int, DryRunResponse]:
        """Record ``call``; return its index and its scripted response."""
        answer = _coerce(self._handler(call)) if self._handler else self._table.get(call.args)
        with self._lock:
            self._calls.append(call)
            index = len(self._calls) - 1
        return index, answer or self.default

    def _set_input(self, index: int, data: bytes) -> None:
        with self._lock:
            call = self._calls[index]
            self._calls[index] = DryRunCall(
                call.args, call.shell, call.cwd, call.env, call.kwargs, data
            )


class DryRunProcess(ProcessBase):
    """A fake process: finished at once (or after the response's ``duration``), with the scripted
    returncode and output on its streams. Its ``pid`` can never name a real process.

    ``streams=False`` builds no stream objects (``run()``'s fast path takes the output directly).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        request: SpawnRequest,
        response: DryRunResponse,
        recorder: DryRunRecorder,
        index: int,
        *,
        streams: bool = True,
    ) -> None:
        super().__init__(loop, next(_fake_pids))
        self._recorder = recorder
        self._index = index
        self._timer: asyncio.TimerHandle | None = None
        if streams:
            self._open_streams(request, response)
        if response.duration > 0:
            self._timer = loop.call_later(
                response.duration, self._set_returncode, response.returncode
            )
        else:
            self._set_returncode(response.returncode)

    def _open_streams(self, request: SpawnRequest, response: DryRunResponse) -> None:
        if request.stdin == subprocess.PIPE:
            self.stdin = BufferedStdin(self._record_input)
        self.stdout = self._stream(request.stdout, response.stdout, request.limit)
        merged = request.stderr == subprocess.STDOUT
        self.stderr = (
            None if merged else self._stream(request.stderr, response.stderr, request.limit)
        )
        if merged and self.stdout is not None:
            self.stdout.feed_data(response.stderr)
        for stream in (self.stdout, self.stderr):
            if stream is not None:
                stream.feed_eof()

    def _stream(self, how: Any, data: bytes, limit: int) -> asyncio.StreamReader | None:
        if how != subprocess.PIPE:
            return None
        reader = asyncio.StreamReader(limit=limit, loop=self._loop)
        reader.feed_data(data)
        return reader

    def _record_input(self, data: bytes) -> None:
        self._recorder._set_input(self._index, data)

    def _send_signal(self, sig: int) -> None:
        number = signal_that_ends(sig)
        if number is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._set_returncode(-number)

    def terminate(self) -> None:
        """End the fake run with ``-SIGTERM``."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """End the fake run with ``-SIGKILL``."""
        self.send_signal(KILL_SIGNAL)


class DryRunStrategy(SubprocessStrategy):
    """Records commands in :attr:`recorder` and returns :class:`DryRunProcess` objects."""

    mode: RunMode | str = RunMode.DRY_RUN

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        ops: PlatformOps | None = None,
        recorder: DryRunRecorder | None = None,
    ) -> None:
        super().__init__(max_workers=max_workers, ops=ops)
        if recorder is not None and not isinstance(recorder, DryRunRecorder):
            # A table or a DryRunScript (itself a handler *for* a recorder) failed the first
            # run with a bare AttributeError.
            raise InvalidArgumentTypeError(
                f"recorder must be a DryRunRecorder, not {type(recorder).__name__} (a table or "
                "handler goes in DryRunRecorder(...); a DryRunScript gives its own strategy: "
                "script.strategy())"
            )
        self.recorder = recorder or DryRunRecorder()

    def _record(
        self, request: SpawnRequest, input: bytes | None = None
    ) -> tuple[int, DryRunResponse]:
        cwd = request.kwargs.get("cwd")
        call = DryRunCall(
            args=request.display,
            shell=request.shell,
            cwd=os.fsdecode(cwd) if cwd is not None else None,
            env=request.kwargs.get("env"),
            kwargs={
                k: v
                for k, v in request.kwargs.items()
                if k not in ("cwd", "env") and k not in request.added
            },
            input=input,
        )
        if logger.isEnabledFor(logging.INFO):  # saves joining the command when it is off
            logger.info("dry run: %s", _show(call.args))
        return self.recorder.record(call)

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        index, response = self._record(request)
        return DryRunProcess(asyncio.get_running_loop(), request, response, self.recorder, index)

    async def _begin_run(self, start: RunStart) -> ChildRun:
        """Answer from the script: the output goes straight into the buffers, no stream objects
        are built (cheap enough for load tests); the fake process then "runs" for the answer's
        ``duration``."""
        request = start.request
        index, response = self._record(request, start.input)
        process = DryRunProcess(
            asyncio.get_running_loop(), request, response, self.recorder, index, streams=False
        )
        self._spawned(process)
        start.out.append(response.stdout)
        start.err.append(response.stderr)
        return ChildRun(process, self, grace=start.grace, ops=self.ops)


def _show(args: Sequence[str] | str) -> str:
    return args if isinstance(args, str) else " ".join(args)
