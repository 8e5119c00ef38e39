"""`iter_lines` and `iter_line_batches`: fast line streaming from any stdout/stderr stream.

Both read big chunks and split each one in a single C call (``splitlines``); text is decoded a
chunk at a time, not a line at a time. ``iter_line_batches`` hands the consumer each chunk's
lines as one list, so a consumer pays Python's async-iteration step once per chunk instead of
once per line (the step costs more than reading and splitting a line: see docs/PERFORMANCE.md).
"""

from __future__ import annotations

import asyncio
import codecs
import functools
import inspect
import io
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, overload

from ._decoders import incremental_decoder
from ._exceptions import InvalidArgumentTypeError, InvalidLimitError
from ._validation import check_encoding

__all__ = ["DEFAULT_CHUNK_SIZE", "OFF_LOOP_BYTES", "iter_line_batches", "iter_lines"]

T = TypeVar("T")

#: How much ``iter_lines`` asks the stream for at a time.
DEFAULT_CHUNK_SIZE = 256 * 1024
#: A line longer than this is put together (and decoded) in a worker thread, not on the event
#: loop's: joining or decoding megabytes would hold up every other task for milliseconds.
OFF_LOOP_BYTES = 1024 * 1024

# Error handlers whose output never holds a "\n": with them a chunk of whole lines can be
# decoded in one call and split afterwards. (The codecs look these up by name too.)
_BUILTIN_ERRORS = frozenset(
    {"strict", "replace", "ignore", "backslashreplace", "surrogateescape", "surrogatepass"}
)


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

    Yields the same items ``readline()`` would — each line with its ``b"\\n"`` (a ``b"\\r\\n"``
    line keeps both; a lone ``b"\\r"`` does not end a line), the last one without when the stream
    does not end with a newline — but reads ``chunk_size`` bytes at a time and splits them in
    bulk, which is several times faster than a ``readline()`` loop. :func:`iter_line_batches`
    gives the same lines a list at a time, faster still.

    Unlike ``readline()`` there is no line-length limit: a line longer than the stream's
    ``limit`` (64 KiB by default) is delivered whole, never as ``LimitOverrunError``. Memory
    grows with the longest line; time grows linearly with it (its pieces are joined once), and
    a line over :data:`OFF_LOOP_BYTES` is joined and decoded in a worker thread.

    With ``encoding`` lines are ``str``, decoded with ``errors`` (default ``"replace"``: invalid
    bytes become U+FFFD; a character split across reads is decoded whole), each ending after a
    ``"\\n"``. With a codec whose newline is the byte ``b"\\n"`` alone (UTF-8, ASCII, Latin-1,
    cp1252, ...) these are the lines ``readline()`` followed by an incremental decoder gives (a
    ``"\\n"`` that an error handler writes does not end a line); with UTF-16, UTF-32, EBCDIC and
    other codecs, where that byte may be half of a character, lines end at the ``"\\n"``
    characters of the decoded text, as ``TextIOWrapper`` cuts them; UTF-16 and UTF-32 without a
    byte-order mark are read in this machine's byte order, as ``bytes.decode()`` (and so a
    ``ProcessResult``) reads them; a last line that decodes to nothing (only a byte-order mark,
    or bytes ``errors="ignore"`` dropped) is no line. With ``errors="strict"``
    the lines before an undecodable one are delivered, then ``UnicodeDecodeError`` is raised.

    Cancelling the iteration leaves the stream usable; bytes already read past the last
    yielded line are lost to later readers.

    Raises:
        InvalidArgumentTypeError: ``stream`` has no ``read`` (e.g. stdout was not piped).
        InvalidLimitError: ``chunk_size`` is not a positive int.
        InvalidEncodingError: unknown ``encoding`` or ``errors`` handler.
    """
    return _each_line(_batches(stream, encoding, errors, chunk_size))


async def _each_line(batches: AsyncIterator[list[T]]) -> AsyncIterator[T]:
    try:
        async for batch in batches:
            for line in batch:
                yield line
    finally:
        # Not left for the garbage collector: its clean-up would need a running loop.
        await batches.aclose()  # type: ignore[attr-defined]


@overload
def iter_line_batches(
    stream: Any, *, encoding: None = None, errors: str = ..., chunk_size: int = ...
) -> AsyncIterator[list[bytes]]: ...


@overload
def iter_line_batches(
    stream: Any, *, encoding: str, errors: str = ..., chunk_size: int = ...
) -> AsyncIterator[list[str]]: ...


def iter_line_batches(
    stream: Any,
    *,
    encoding: str | None = None,
    errors: str = "replace",
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> AsyncIterator[list[bytes]] | AsyncIterator[list[str]]:
    """Iterate over the lines of ``stream`` a list at a time: the lines each read completed.

    Joined together the lists hold exactly what :func:`iter_lines` yields (same lines, same
    ``encoding``/``errors`` handling, no line-length limit); a list is never empty. Use it when
    the consumer can take lines in bulk (``OutputCapture.append_lines``, one write to a socket
    per list): per line it costs a loop step instead of an async-iteration step, which makes it
    about as fast as a synchronous ``for line in Popen.stdout`` loop.

    Cancelling the iteration leaves the stream usable; bytes already read past the last
    yielded list are lost to later readers.

    Raises:
        InvalidArgumentTypeError: ``stream`` has no ``read`` (e.g. stdout was not piped).
        InvalidLimitError: ``chunk_size`` is not a positive int.
        InvalidEncodingError: unknown ``encoding`` or ``errors`` handler.
    """
    return _batches(stream, encoding, errors, chunk_size)


def _batches(
    stream: Any, encoding: str | None, errors: str, chunk_size: int
) -> AsyncIterator[list[Any]]:
    if stream is None or not callable(getattr(stream, "read", None)):
        if stream is not None and hasattr(stream, "stdout") and hasattr(stream, "pid"):
            hint = "pass process.stdout (or process.stderr), not the process"
        else:
            hint = "was the process started with stdout=PIPE?"
        raise InvalidArgumentTypeError(
            f"iter_lines() needs a stream with an async read(n), not {stream!r}; {hint}"
        )
    if isinstance(stream, io.IOBase):
        # Its read() would block the event loop until data came, then fail (bytes are not
        # awaitable): refused before any read.
        raise InvalidArgumentTypeError(
            f"iter_lines() needs an asynchronous stream (an asyncio StreamReader, the stdout of "
            f"a process this library started), not the synchronous file {stream!r}; read that "
            "one in a thread (asyncio.to_thread), or start the process with this library"
        )
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise InvalidLimitError(f"chunk_size must be a positive int, not {chunk_size!r}")
    check_encoding(encoding, errors)  # fail now, not at the first line
    if encoding is None:
        return _byte_batches(_line_blocks(stream, chunk_size))
    decoder = incremental_decoder(encoding, errors)
    if not _splits_like_bytes(encoding):
        # UTF-16, UTF-32, EBCDIC, ...: a b"\n" byte may be half of a character, or not the
        # newline at all; only the decoded text says where lines end.
        return _decoded_text_batches(stream, chunk_size, decoder)
    blocks = _line_blocks(stream, chunk_size)
    if errors in _BUILTIN_ERRORS:
        return _text_batches(blocks, decoder)
    return _text_batches_line_by_line(blocks, decoder)


async def _line_blocks(stream: Any, chunk_size: int) -> AsyncIterator[tuple[bytes, bytes]]:
    """Per read: ``(head, body)``. ``head`` is the line this read finished that began in an
    earlier read (``b""`` if none); ``body`` the whole lines after it (``b""`` if none). At the
    end of the stream, a last line without its newline comes as a ``head``."""
    read = stream.read
    # The pieces of a line not finished yet, joined once when its end arrives: joining them as
    # they come would copy the line again with every chunk (quadratic in its length).
    parts: list[bytes] = []
    size = 0
    first = True
    while True:
        if first:
            first = False
            chunk = await _first_read(read, chunk_size, stream)
        else:
            chunk = await _next_read(read, chunk_size, stream)
        if chunk.__class__ is not bytes:
            chunk = _as_bytes(chunk, stream)
        if not chunk:
            break
        cut = chunk.rfind(b"\n") + 1
        if not cut:
            parts.append(chunk)
            size += len(chunk)
            continue
        start = 0
        head = b""
        if parts:
            start = chunk.find(b"\n") + 1
            parts.append(chunk[:start])
            head = await _join(parts, size + start)
            parts = []
        body = chunk[start:cut]  # no copy when that is the whole chunk
        if cut < len(chunk):
            parts.append(chunk[cut:])
            size = len(chunk) - cut
        else:
            size = 0
        yield head, body
    if parts:
        yield await _join(parts, size), b""


def _first_read(read: Any, chunk_size: int, stream: Any) -> Any:
    """The first ``stream.read(chunk_size)``, checked: a ``read`` that takes no size, or whose
    result cannot be awaited, is the caller's mistake, said as such (it was a bare
    ``TypeError`` from inside this module)."""
    try:
        result = read(chunk_size)
    except TypeError as exc:
        try:
            inspect.signature(read).bind(chunk_size)
        except TypeError:
            raise InvalidArgumentTypeError(
                f"iter_lines() needs a stream whose read(n) takes a size; "
                f"{type(stream).__name__}.read cannot be called with one ({exc})"
            ) from exc
        except ValueError:
            pass  # no signature to look at (a builtin): the error is read()'s own
        raise
    _refuse_if_not_awaitable(result, stream)
    return result


async def _next_read(read: Any, chunk_size: int, stream: Any) -> Any:
    """A later ``stream.read(chunk_size)``: one whose result cannot be awaited (a stream that
    turned synchronous) is refused as the first read's would be, checked only once awaiting it
    failed (nothing per read)."""
    pending = read(chunk_size)
    try:
        return await pending
    except TypeError:
        _refuse_if_not_awaitable(pending, stream)
        raise


def _refuse_if_not_awaitable(result: Any, stream: Any) -> None:
    """Refuse ``result`` of ``stream.read(n)`` if it cannot be awaited; checked on the first
    read and, on the others, only once awaiting one failed (nothing per read)."""
    if not inspect.isawaitable(result):
        raise InvalidArgumentTypeError(
            f"iter_lines() needs a stream whose read(n) is asynchronous; "
            f"{type(stream).__name__}.read() returned {type(result).__name__}, which cannot be "
            "awaited"
        )


def _as_bytes(chunk: object, stream: Any) -> bytes:
    """A chunk a duck-typed stream's ``read(n)`` gave, as ``bytes``: a ``bytearray`` or
    ``memoryview`` is copied (its lines came out as a mix of types, or it failed with a bare
    ``AttributeError``); ``None`` is the end of the stream; anything else is refused."""
    if chunk is None:
        return b""
    if isinstance(chunk, bytes | bytearray | memoryview):
        return bytes(chunk)
    raise InvalidArgumentTypeError(
        f"iter_lines() reads bytes; {type(stream).__name__}.read() returned "
        f"{type(chunk).__name__} (a text stream? give iter_lines the byte stream and an "
        "encoding)"
    )


async def _join(parts: list[bytes], size: int) -> bytes:
    if len(parts) == 1:
        return parts[0]
    if size <= OFF_LOOP_BYTES:
        return b"".join(parts)
    return await _off_the_loop(b"".join, parts)


async def _off_the_loop(work: Callable[..., T], *args: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(None, work, *args)


def _split_bytes(body: bytes) -> list[bytes]:
    """``body`` (whole lines, ending with ``b"\\n"``) cut after each ``b"\\n"``."""
    # BytesIO shares the bytes (no copy) and its readlines() cuts exactly where readline()
    # does, after b"\n" only, finding each with memchr: a quarter fewer instructions a line than
    # bytes.splitlines(), which tests every byte and also cuts after a lone b"\r".
    return io.BytesIO(body).readlines()


# Where str.splitlines() cuts besides "\n" (readline() and our lines cut at "\n" only).
_OTHER_LINE_ENDS = ("\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029")


def _split_text(text: str) -> list[str]:
    """``text`` (whole lines, ending with ``"\\n"``) cut after each ``"\\n"``."""
    lines = text.splitlines(keepends=True)
    # Looking for each other line end (a memchr each, in ASCII text) costs a fraction of counting
    # the "\n" (which is then needed only when one is there: "\r\n" ends are one cut).
    if not any(end in text for end in _OTHER_LINE_ENDS) or len(lines) == text.count("\n"):
        return lines
    pieces = text.split("\n")
    pieces.pop()
    return [piece + "\n" for piece in pieces]


async def _byte_batches(blocks: AsyncIterator[tuple[bytes, bytes]]) -> AsyncIterator[list[bytes]]:
    async for head, body in blocks:
        lines = _split_bytes(body) if body else []
        if head:
            lines.insert(0, head)
        yield lines


@functools.lru_cache(maxsize=32)
def _splits_like_bytes(encoding: str) -> bool:
    """Whether the decoded text has a "\\n" exactly where the bytes have a ``b"\\n"`` (so
    decoding whole lines at once, then splitting, gives the lines of split-then-decode)."""
    name = codecs.lookup(encoding).name
    if name in ("utf-8", "utf-8-sig", "ascii"):
        return True  # b"\n" is never part of another character's bytes
    # Other stateless single-byte codecs (latin-1, cp1252, ...): one character per byte, and
    # only byte 10 is a "\n" (EBCDIC codecs fail this: their newline is another byte).
    try:
        table = bytes(range(256)).decode(name, "surrogateescape")
    except (LookupError, UnicodeError, TypeError, ValueError):
        return False
    return len(table) == 256 and table[10] == "\n" and table.count("\n") == 1


async def _text_batches(
    blocks: AsyncIterator[tuple[bytes, bytes]], decoder: codecs.IncrementalDecoder
) -> AsyncIterator[list[str]]:
    decode = decoder.decode
    async for head, body in blocks:
        lines = await _decode_head(decode, head) if head else []
        if body:
            state = decoder.getstate()
            try:
                lines += _split_text(decode(body))
            except UnicodeDecodeError:
                # errors="strict": go again line by line, to deliver the lines before the bad
                # one and raise the very error a line-by-line decode raises.
                decoder.setstate(state)
                error = _decode_each(decode, body, lines)
                if error is not None:
                    if lines:
                        yield lines
                    raise error from None
        if lines:
            yield lines


async def _text_batches_line_by_line(
    blocks: AsyncIterator[tuple[bytes, bytes]], decoder: codecs.IncrementalDecoder
) -> AsyncIterator[list[str]]:
    # For error handlers that may write a "\n" (with a codec whose b"\n" byte is always the
    # newline): the lines are cut on the bytes and decoded one by one, so such a "\n" does
    # not end a line.
    decode = decoder.decode
    async for head, body in blocks:
        lines = await _decode_head(decode, head) if head else []
        error = _decode_each(decode, body, lines) if body else None
        if error is not None:
            if lines:
                yield lines
            raise error
        if lines:
            yield lines


async def _decoded_text_batches(
    stream: Any, chunk_size: int, decoder: codecs.IncrementalDecoder
) -> AsyncIterator[list[str]]:
    """The lines of a codec whose newline is not simply the byte b"\\n" (UTF-16, UTF-32,
    EBCDIC, ...): each read is decoded, then cut after each "\\n" of the text, as
    ``TextIOWrapper`` does. With ``errors="strict"`` the whole lines decoded before the bad
    bytes are delivered, then the decoder's error is raised."""
    read = stream.read
    decode = decoder.decode
    # The pieces of a line not finished yet, joined once when its end arrives.
    parts: list[str] = []
    size = 0
    first = True
    while True:
        if first:
            first = False
            chunk = await _first_read(read, chunk_size, stream)
        else:
            chunk = await _next_read(read, chunk_size, stream)
        if chunk.__class__ is not bytes:
            chunk = _as_bytes(chunk, stream)
        final = not chunk
        state = decoder.getstate()
        error: Exception | None = None
        try:
            text = decode(chunk, final)
        except UnicodeDecodeError as exc:
            error = exc
            text = _decoded_before(decoder, state, chunk, exc)
        except Exception as exc:
            # A caller's error handler that raised: the text before the bytes it refused.
            error = exc
            text = _decoded_before_failure(decoder, state, chunk)
        lines: list[str] = []
        cut = text.rfind("\n") + 1
        if cut:
            start = 0
            if parts:
                start = text.find("\n") + 1
                parts.append(text[:start])
                lines.append(await _join_text(parts, size + start))
                parts = []
                size = 0
            if cut > start:
                lines += _split_text(text[start:cut])
        if error is None and cut < len(text):
            parts.append(text[cut:])
            size += len(text) - cut
        if final and parts and error is None:
            lines.append(await _join_text(parts, size))
        if lines:
            yield lines
        if error is not None:
            raise error
        if final:
            return


def _decoded_before(
    decoder: codecs.IncrementalDecoder,
    state: tuple[bytes, int],
    chunk: bytes,
    error: UnicodeDecodeError,
) -> str:
    """The text ``chunk`` decodes to before the bytes ``error`` is about (``decoder`` back in
    ``state``, where it was before ``chunk``); ``""`` if that cannot be told."""
    pending = state[0]
    # A buffered decoder reports positions in its held-back bytes followed by the chunk.
    if bytes(error.object) != pending + chunk:
        return ""
    good = error.start - len(pending)
    if good <= 0:
        return ""
    decoder.setstate(state)
    try:
        return decoder.decode(chunk[:good])
    except UnicodeDecodeError:
        return ""


def _decoded_before_failure(
    decoder: codecs.IncrementalDecoder, state: tuple[bytes, int], chunk: bytes
) -> str:
    """The text of the longest start of ``chunk`` that ``decoder`` (back in ``state``) decodes
    without raising; for a caller's error handler that raised something else than
    ``UnicodeDecodeError``, so without a position. A start that decodes, decodes in any shorter
    start too, so a bisection finds it in about 16 decodes of a 64 KiB read (the error path
    only)."""
    good, bad, text = 0, len(chunk), ""
    while bad - good > 1:
        middle = (good + bad) // 2
        decoder.setstate(state)
        try:
            attempt = decoder.decode(chunk[:middle])  # (never the whole chunk)
        except Exception:
            bad = middle
        else:
            good, text = middle, attempt
    return text


async def _join_text(parts: list[str], size: int) -> str:
    if len(parts) == 1:
        return parts[0]
    if size <= OFF_LOOP_BYTES:
        return "".join(parts)
    return await _off_the_loop("".join, parts)


def _decode_each(decode: Callable[[bytes], str], body: bytes, lines: list[str]) -> Exception | None:
    """Decode the lines of ``body`` one by one onto ``lines``; the error that stopped it (a
    handler of the caller's may raise any error: the lines before it are still delivered)."""
    for line in _split_bytes(body):
        try:
            lines.append(decode(line))
        except Exception as exc:
            return exc
    return None


async def _decode_head(decode: Callable[[bytes, bool], str], head: bytes) -> list[str]:
    """``[head decoded]``; ``[]`` for a last line that decodes to nothing (only a byte-order
    mark, or bytes ``errors="ignore"`` dropped): no text, no newline, so no line (as
    ``TextIOWrapper`` reads it), not an empty one."""
    line = await _decode_line(decode, head)
    return [line] if line else []


async def _decode_line(decode: Callable[[bytes, bool], str], line: bytes) -> str:
    # Only the last line can lack its b"\n": decode it as the end of the stream, so an
    # incomplete character there becomes part of that line, as readline() + decode() gives.
    if len(line) <= OFF_LOOP_BYTES:
        return decode(line, not line.endswith(b"\n"))
    return await _off_the_loop(_decode_in_pieces, decode, line)


def _decode_in_pieces(decode: Callable[[bytes, bool], str], line: bytes) -> str:
    # One decode() call holds the GIL for its whole length (tens of ms for tens of MB), which
    # would stall the loop thread anyway; piece by piece, the loop gets its turns in between.
    step = OFF_LOOP_BYTES
    last = len(line) - 1
    pieces = [decode(line[i : min(i + step, last)], False) for i in range(0, last, step)]
    pieces.append(decode(line[last:], not line.endswith(b"\n")))
    return "".join(pieces)
