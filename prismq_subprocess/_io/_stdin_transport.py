"""What our stdin writers share: `StreamWriterMethods` (the ``StreamWriter`` methods that do not
depend on where the bytes go) and `WriterTransport` (what ``StreamWriter.transport`` offers)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Protocol

__all__ = ["StreamWriterMethods", "WriterTransport"]


class _Writer(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...

    def write_eof(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


class StreamWriterMethods(ABC):
    """``write()``'s type check, ``writelines()``, ``can_write_eof()`` and ``write_eof()`` as
    ``asyncio.StreamWriter`` has them; a subclass says what becomes of the bytes (:meth:`_take`)
    and what closing does."""

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Take ``data`` for the child; never blocks. Ignored once closing (as asyncio does).

        Raises:
            TypeError: ``data`` is not bytes-like (asyncio's message).
        """
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        self._take(data)

    def writelines(self, data: Any) -> None:
        """Take every bytes-like item of ``data``."""
        for chunk in data:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        """Always True: closing stdin is the end-of-file."""
        return True

    def write_eof(self) -> None:
        """Same as :meth:`close`."""
        self.close()

    @abstractmethod
    def _take(self, data: bytes | bytearray | memoryview) -> None:
        """Keep or queue ``data`` (bytes-like), unless stdin is closing."""

    @abstractmethod
    def close(self) -> None:
        """Close stdin once what was taken is delivered."""


class WriterTransport:
    """The write-side transport API (``asyncio.WriteTransport``'s everyday methods) over one of
    our stdin writers, so code that reaches for ``proc.stdin.transport`` keeps working."""

    def __init__(self, writer: _Writer, buffered: Any) -> None:
        self._writer = writer
        self._buffered = buffered

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` (as ``StreamWriter.write``)."""
        self._writer.write(data)

    def writelines(self, data: Any) -> None:
        """Queue every item of ``data``."""
        for chunk in data:
            self._writer.write(chunk)

    def write_eof(self) -> None:
        """Close the child's stdin once the queue is written."""
        self._writer.write_eof()

    def can_write_eof(self) -> bool:
        """Always True."""
        return True

    def close(self) -> None:
        """Close the child's stdin once the queue is written."""
        self._writer.close()

    def abort(self) -> None:
        """Close the child's stdin (queued bytes may still be written first)."""
        self._writer.close()

    def is_closing(self) -> bool:
        """True once closed or broken."""
        return self._writer.is_closing()

    def get_write_buffer_size(self) -> int:
        """Bytes queued but not yet written to the pipe."""
        return int(self._buffered())

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """As the writer's ``get_extra_info``."""
        return self._writer.get_extra_info(name, default)
