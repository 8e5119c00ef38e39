"""`WriterTransport`: what ``StreamWriter.transport`` offers, for our stdin writers."""

from __future__ import annotations

from typing import Any, Protocol

__all__ = ["WriterTransport"]


class _Writer(Protocol):
    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...

    def write_eof(self) -> None: ...

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...


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
