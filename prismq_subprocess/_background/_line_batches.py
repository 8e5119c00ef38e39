"""Reading a child's output as batches of text lines: :func:`iter_line_batches`.

``ModuleRunner`` hands each batch to ``OutputCapture.append_lines`` in one call, so subscribers
are woken once per read rather than once per line.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .._core._lines import DEFAULT_CHUNK_SIZE
from .._core._validation import check_limit

__all__ = ["iter_line_batches"]


def _split(text: str) -> list[str]:
    lines = text.split("\n")
    if "\r" in text:
        lines = [line[:-1] if line.endswith("\r") else line for line in lines]
    return lines


async def iter_line_batches(
    stream: Any, *, chunk_size: int = DEFAULT_CHUNK_SIZE, max_line_bytes: int | None = None
) -> AsyncIterator[list[str]]:
    """Yield, per read of ``stream`` (an object with ``async read(n)``), the complete lines it
    brought, decoded as UTF-8 (invalid bytes become U+FFFD) without their ``\\n`` / ``\\r\\n``.

    A line split across reads comes whole in a later batch; the last line of the stream comes
    even without a newline. A line is held in memory until its newline arrives, except that
    with ``max_line_bytes`` a line still without its newline past that many bytes is handed
    out in pieces of at most that many bytes, cut between characters (a child printing without
    newlines, a progress bar drawn with ``\\r``: nothing is lost, and the host never holds
    more than ``max_line_bytes`` plus one read of it).

    Raises:
        InvalidLimitError: ``max_line_bytes`` is not a positive int.
    """
    if max_line_bytes is not None:
        check_limit(max_line_bytes, "max_line_bytes", minimum=1)
    read = stream.read
    partial: list[bytes] = []  # the start of a line still waiting for its newline
    held = 0  # its bytes
    while True:
        chunk = await read(chunk_size)
        if not chunk:
            break
        cut = chunk.rfind(b"\n")
        if cut < 0:
            partial.append(chunk)
            held += len(chunk)
            if max_line_bytes is not None and held > max_line_bytes:
                pieces, rest = _pieces(b"".join(partial), max_line_bytes)
                partial, held = [rest], len(rest)
                if pieces:
                    yield pieces
            continue
        complete = chunk[:cut]
        if partial:
            partial.append(complete)
            complete = b"".join(partial)
            partial = []
        held = 0
        if cut + 1 < len(chunk):
            partial.append(chunk[cut + 1 :])
            held = len(chunk) - cut - 1
        # A b"\n" byte is never inside a UTF-8 sequence, so each batch decodes on its own.
        yield _split(complete.decode("utf-8", "replace"))
    if partial:
        last = b"".join(partial).decode("utf-8", "replace")
        yield [last[:-1] if last.endswith("\r") else last]


def _pieces(data: bytes, size: int) -> tuple[list[str], bytes]:
    """``data`` (no newline in it) cut into whole pieces of at most ``size`` bytes, each ending
    between two UTF-8 characters, and what is left (shorter than ``size``)."""
    pieces: list[str] = []
    start = 0
    # A last b"\r" stays with what is left: its b"\n" may be in the next read (a CRLF line end).
    limit = len(data) - 1 if data.endswith(b"\r") else len(data)
    while limit - start > size:
        end = start + size
        # Back off from continuation bytes (0b10xxxxxx) to the start of a character; a run of
        # more than three of them is not UTF-8 anyway, and is cut where it is.
        back = end
        while back > end - 3 and back > start + 1 and data[back] & 0xC0 == 0x80:
            back -= 1
        if data[back] & 0xC0 != 0x80:
            end = back
        pieces.append(data[start:end].decode("utf-8", "replace"))
        start = end
    return pieces, data[start:]
