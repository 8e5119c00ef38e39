"""The public contract of a process object: ``asyncio.subprocess.Process``, written down.

Every strategy's process is checked against :class:`ProcessLike` by mypy, and
``asyncio.subprocess.Process`` itself satisfies it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

__all__ = ["ProcessLike", "StreamReaderLike", "StreamWriterLike"]


@runtime_checkable
class StreamReaderLike(Protocol):
    """What callers use of ``asyncio.StreamReader`` on a child's stdout/stderr."""

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (``-1``: until end of file); ``b""`` at end of file."""

    async def readline(self) -> bytes:
        """One line with its ``\\n`` (the last may lack it); ``b""`` at end of file."""

    async def readexactly(self, n: int) -> bytes:
        """Exactly ``n`` bytes; ``asyncio.IncompleteReadError`` at end of file."""

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Data up to and including ``separator``."""

    def at_eof(self) -> bool:
        """True once the buffer is empty and end of file was seen."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...


@runtime_checkable
class StreamWriterLike(Protocol):
    """What callers use of ``asyncio.StreamWriter`` on a child's stdin."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for the child's stdin without waiting (see :meth:`drain`)."""

    def writelines(self, data: Any) -> None:
        """Queue each chunk of ``data``, as :meth:`write`."""

    def can_write_eof(self) -> bool:
        """True when :meth:`write_eof` is supported."""

    def write_eof(self) -> None:
        """Close the write side after the queued data."""

    def close(self) -> None:
        """Close stdin (the child then reads end of file)."""

    def is_closing(self) -> bool:
        """True once :meth:`close` was called or the pipe broke."""

    async def wait_closed(self) -> None:
        """Wait until the pipe is closed."""

    async def drain(self) -> None:
        """Wait until the queued data has gone into the pipe; raises ``BrokenPipeError`` or
        ``ConnectionResetError`` when the child closed it."""

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Transport information, as on ``asyncio.StreamWriter``."""


@runtime_checkable
class ProcessLike(Protocol):
    """Everything ``asyncio.subprocess.Process`` offers; every mode returns one of these.

    ``wait()`` and ``communicate()`` keep asyncio's cancellation semantics: cancelling them does
    not stop the child (use :func:`terminate_gracefully`, or the high-level ``run()``, which do).
    """

    @property
    def pid(self) -> int:
        """The child's process id."""

    @property
    def returncode(self) -> int | None:
        """The exit status once the child has been seen to exit (negative: killed by that signal),
        else ``None``."""

    @property
    def stdin(self) -> StreamWriterLike | None:
        """A :class:`StreamWriterLike` when stdin is ``PIPE``, else ``None``."""

    @property
    def stdout(self) -> StreamReaderLike | None:
        """A :class:`StreamReaderLike` when stdout is ``PIPE``, else ``None``."""

    @property
    def stderr(self) -> StreamReaderLike | None:
        """A :class:`StreamReaderLike` when stderr is ``PIPE``, else ``None``."""

    async def wait(self) -> int:
        """Wait for the child to exit and return its status; cancelling only stops the wait."""

    async def communicate(
        self, input: bytes | bytearray | memoryview | None = None
    ) -> tuple[bytes | None, bytes | None]:
        """Send ``input``, read stdout and stderr to end of file, wait for the exit; return the
        output: ``None`` for a stream that is not ``PIPE`` (asyncio's stubs say ``bytes``, but
        asyncio returns ``None`` there too)."""

    def send_signal(self, signal: int) -> None:
        """Send ``signal`` to the child (not to its tree)."""

    def terminate(self) -> None:
        """Ask the child to stop (SIGTERM; ``TerminateProcess`` on Windows)."""

    def kill(self) -> None:
        """Kill the child (SIGKILL; ``TerminateProcess`` on Windows)."""
