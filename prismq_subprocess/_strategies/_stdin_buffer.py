"""`BufferedStdin`: a stdin that collects what is written and hands it over in one piece on
close (LOCAL delivers it to the child then; DRY_RUN records it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .._core._exceptions import StdinAlreadySentError
from .._io._stdin_transport import StreamWriterMethods, WriterTransport

__all__ = ["BufferedStdin"]


class BufferedStdin(StreamWriterMethods):
    """A ``StreamWriter`` look-alike whose bytes go to ``on_close`` when it is closed."""

    def __init__(self, on_close: Callable[[bytes], None]) -> None:
        self._on_close = on_close
        self._chunks: list[bytes] = []
        self._closing = False
        # Why stdin was closed without the caller closing it or waiting (LOCAL's first read of
        # the output), for the error of a later write; None after the caller's own close().
        self._closed_by: str | None = None

    @property
    def transport(self) -> WriterTransport:
        """The write transport (``get_write_buffer_size()``: bytes held back so far)."""
        return WriterTransport(self, lambda: sum(map(len, self._chunks)))

    def _take(self, data: bytes | bytearray | memoryview) -> None:
        # Kept until stdin is closed; ignored after the caller's own close (as asyncio does).
        if not self._closing:
            self._chunks.append(bytes(data))
        elif data and self._closed_by is not None:
            # The caller neither closed it nor waited (after which asyncio ignores writes too):
            # a write dropped silently here was input lost without a word.
            raise StdinAlreadySentError(
                f"stdin was closed by the process's {self._closed_by}: in LOCAL mode the child "
                "gets its input in one piece then, and later writes cannot reach it; write all "
                "of it before waiting for or reading the process (or use ASYNC or THREADED for "
                "a conversation with the child)"
            )

    def close_for(self, why: str) -> None:
        """Close as :meth:`close` does, on the process's own account (``why``: e.g. "first
        read"), so that a later write of data raises :class:`StdinAlreadySentError` instead of
        being ignored."""
        if not self._closing:
            self._closed_by = why
            self.close()

    def is_closing(self) -> bool:
        """True once closed."""
        return self._closing

    def close(self) -> None:
        """Hand everything written over (once)."""
        if not self._closing:
            self._closing = True
            data = b"".join(self._chunks)
            self._chunks.clear()
            self._on_close(data)

    async def wait_closed(self) -> None:
        """Return at once: closing hands the input over synchronously."""

    async def drain(self) -> None:
        """Return at once (nothing is written until close)."""
        await asyncio.sleep(0)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Always ``default``: there is no pipe until the input is handed over."""
        return default
