"""`iter_lines`: fast line streaming from any stdout/stderr stream."""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, overload

from ._exceptions import InvalidArgumentTypeError, InvalidLimitError
from ._validation import check_encoding

__all__ = ["DEFAULT_CHUNK_SIZE", "OFF_LOOP_BYTES", "iter_lines"]

T = TypeVar("T")

#: How much ``iter_lines`` asks the stream for at a time.
DEFAULT_CHUNK_SIZE = 256 * 1024
#: A line longer than this is put together (and decoded) in a worker thread, not on the event
#: loop's: joining or decoding megabytes would hold up every other task for milliseconds.
OFF_LOOP_BYTES = 1024 * 1024


@overload
def iter_lines(
    stream: Any, *, encoding: None = None, errors: str = ..., chunk_size: int = ...
) -> AsyncIterator[bytes]: ...


@overload
def iter_lines(
    stream: Any, *, encoding: str, errors: str = ..., chunk_size: int = ...
) -> AsyncIterator[str]: ...


def iter_lines(
    stream: Any,
    *,
    encoding: str | None = None,
    errors: str = "replace",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> AsyncIterator[bytes] | AsyncIterator[str]:
    """Iterate over the lines of ``stream`` (any object with ``async read(n)``: our streams,
    ``asyncio.StreamReader``).

    Yields the same items ``readline()`` would — each line with its ``b"\\n"``, the last one
    without when the stream does not end with a newline — but reads ``chunk_size`` bytes at a
    time and splits them in bulk, which is several times faster than a ``readline()`` loop.

    Unlike ``readline()`` there is no line-length limit: a line longer than the stream's
    ``limit`` (64 KiB by default) is delivered whole, never as ``LimitOverrunError``. Memory
    grows with the longest line; time grows linearly with it (its pieces are joined once), and
    a line over :data:`OFF_LOOP_BYTES` is joined and decoded in a worker thread.

    With ``encoding`` lines are ``str``, decoded incrementally (a character split across chunks
    is decoded whole) with ``errors`` (default ``"replace"``: invalid bytes become U+FFFD).

    Cancelling the iteration leaves the stream usable; bytes already read past the last
    yielded line are lost to later readers.

    Raises:
        InvalidArgumentTypeError: ``stream`` has no ``read`` (e.g. stdout was not piped).
        InvalidLimitError: ``chunk_size`` is not a positive int.
        InvalidEncodingError: unknown ``encoding`` or ``errors`` handler.
    """
    if stream is None or not callable(getattr(stream, "read", None)):
        raise InvalidArgumentTypeError(
            f"iter_lines() needs a stream with an async read(n), not {stream!r}; was the process "
            "started with stdout=PIPE?"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InvalidLimitError(f"chunk_size must be a positive int, not {chunk_size!r}")
    check_encoding(encoding, errors)  # fail now, not at the first line
    if encoding is None:
        return _iter_bytes(stream, chunk_size)
    return _iter_text(stream, chunk_size, encoding, errors)


async def _iter_bytes(stream: Any, chunk_size: int) -> AsyncIterator[bytes]:
    read = stream.read
    # The pieces of a line not finished yet, joined once when its end arrives: joining them as
    # they come would copy the line again with every chunk (quadratic in its length).
    parts: list[bytes] = []
    size = 0
    while True:
        chunk = await read(chunk_size)
        if not chunk:
            break
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            parts.append(chunk)
            size += len(chunk)
            continue
        start = 0
        if parts:
            start = chunk.find(b"\n") + 1
            parts.append(chunk[:start])
            yield await _join(parts, size + start)
            parts = []
        if start < cut:
            body = chunk[start:cut] if start or cut < len(chunk) else chunk
            lines = body.splitlines(keepends=True)
            # splitlines also splits on \r, \v, \f, \x1c-\x1e and \x85; readline() splits on
            # \n only.
            if len(lines) == body.count(b"\n"):
                for line in lines:
                    yield line
            else:
                begin = 0
                end = len(body)
                while begin < end:
                    stop = body.index(b"\n", begin) + 1
                    yield body[begin:stop]
                    begin = stop
        if cut < len(chunk):
            parts.append(chunk[cut:])
            size = len(chunk) - cut
        else:
            size = 0
    if parts:
        yield await _join(parts, size)


async def _join(parts: list[bytes], size: int) -> bytes:
    if len(parts) == 1:
        return parts[0]
    if size <= OFF_LOOP_BYTES:
        return b"".join(parts)
    return await _off_the_loop(b"".join, parts)


async def _off_the_loop(work: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, work, *args)


async def _iter_text(
    stream: Any, chunk_size: int, encoding: str, errors: str
) -> AsyncIterator[str]:
    decode = codecs.getincrementaldecoder(encoding)(errors=errors).decode
    limit = OFF_LOOP_BYTES
    async for line in _iter_bytes(stream, chunk_size):
        # Only the last line can lack its b"\n": decode it as the end of the stream, so an
        # incomplete character there becomes part of that line, as readline() + decode() gives.
        if len(line) <= limit:
            yield decode(line, not line.endswith(b"\n"))
        else:
            yield await _off_the_loop(_decode_in_pieces, decode, line)


def _decode_in_pieces(decode: Callable[[bytes, bool], str], line: bytes) -> str:
    # One decode() call holds the GIL for its whole length (tens of ms for tens of MB), which
    # would stall the loop thread anyway; piece by piece, the loop gets its turns in between.
    step = OFF_LOOP_BYTES
    last = len(line) - 1
    pieces = [decode(line[i : min(i + step, last)], False) for i in range(0, last, step)]
    pieces.append(decode(line[last:], not line.endswith(b"\n")))
    return "".join(pieces)
