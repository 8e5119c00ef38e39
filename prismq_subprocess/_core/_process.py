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

    async def read(self, n: int = -1) -> bytes: ...

    async def readline(self) -> bytes: ...

    async def readexactly(self, n: int) -> bytes: ...

    async def readuntil(self, separator: bytes = b"\n") -> bytes: ...

    def at_eof(self) -> bool: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...


@runtime_checkable
class StreamWriterLike(Protocol):
    """What callers use of ``asyncio.StreamWriter`` on a child's stdin."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def writelines(self, data: Any) -> None: ...

    def can_write_eof(self) -> bool: ...

    def write_eof(self) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...

    async def wait_closed(self) -> None: ...

    async def drain(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


@runtime_checkable
class ProcessLike(Protocol):
    """Everything ``asyncio.subprocess.Process`` offers; every mode returns one of these.

    ``wait()`` and ``communicate()`` keep asyncio's cancellation semantics: cancelling them does
    not stop the child (use :func:`terminate_gracefully`, or the high-level ``run()``, which do).
    """

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def stdin(self) -> Any: ...

    @property
    def stdout(self) -> Any: ...

    @property
    def stderr(self) -> Any: ...

    async def wait(self) -> int: ...

    async def communicate(
        self, input: bytes | None = None
    ) -> tuple[bytes | None, bytes | None]: ...

    def send_signal(self, signal: int) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...
