"""`BufferedStdin`: a stdin that collects what is written and hands it over in one piece on
close (LOCAL delivers it to the child then; DRY_RUN records it)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from .._io._stdin_transport import StreamWriterMethods, WriterTransport

__all__ = ["BufferedStdin"]


class BufferedStdin(StreamWriterMethods):
    """A ``StreamWriter`` look-alike whose bytes go to ``on_close`` when it is closed."""

    def __init__(self, on_close: Callable[[bytes], None]) -> None:
        self._on_close = on_close
        self._chunks: list[bytes] = []
        self._closing = False

    @property
    def transport(self) -> WriterTransport:
        """The write transport (``get_write_buffer_size()``: bytes held back so far)."""
        return WriterTransport(self, lambda: sum(map(len, self._chunks)))

    def _take(self, data: bytes | bytearray | memoryview) -> None:
        # Kept until stdin is closed; ignored after that (as asyncio does).
        if not self._closing:
            self._chunks.append(bytes(data))

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
