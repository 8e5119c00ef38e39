"""Reading a child's output as batches of text lines: :func:`iter_line_batches`.

``ModuleRunner`` hands each batch to ``OutputCapture.append_lines`` in one call, so subscribers
are woken once per read rather than once per line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .._core._lines import DEFAULT_CHUNK_SIZE

__all__ = ["iter_line_batches"]


def _split(text: str) -> list[str]:
    lines = text.split("\n")
    if "\r" in text:
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    return lines


async def iter_line_batches(
    stream: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE
) -> AsyncIterator[list[str]]:
    """Yield, per read of ``stream`` (an object with ``async read(n)``), the complete lines it
    brought, decoded as UTF-8 (invalid bytes become U+FFFD) without their ``\\n`` / ``\\r\\n``.

    A line split across reads comes whole in a later batch; the last line of the stream comes
    even without a newline. A line is held in memory until its newline arrives (no length
    limit: the consumer bounds what it keeps).
    """
    read = stream.read
    partial: list[bytes] = []  # the start of a line still waiting for its newline
    while True:
        chunk = await read(chunk_size)
        if not chunk:
            break
        cut = chunk.rfind(b"\n")
        if cut < 0:
            partial.append(chunk)
            continue
        complete = chunk[:cut]
        if partial:
            partial.append(complete)
            complete = b"".join(partial)
            partial = []
        if cut + 1 < len(chunk):
            partial.append(chunk[cut + 1 :])
        # A b"\n" byte is never inside a UTF-8 sequence, so each batch decodes on its own.
        yield _split(complete.decode("utf-8", "replace"))
    if partial:
        last = b"".join(partial).decode("utf-8", "replace")
        yield [last[:-1] if last.endswith("\r") else last]
