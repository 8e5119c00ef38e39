"""iter_line_batches and iter_lines give exactly the lines of the whole output, however it is cut
into reads, in bytes and in text, in every streaming mode; LineStream.iter_batches."""

from __future__ import annotations

import asyncio
import codecs
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import STREAMING, WRAPPER_FACTORIES
from helpers import py
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import prismq_subprocess as pq
from prismq_subprocess._core._lines import _split_text


class ChunkedStream:
    """A stream whose read(n) hands out the given chunks one by one (never more than n)."""

    def __init__(self, chunks: list[bytes]) -> None:
        self._chunks = [c for c in chunks if c]

    async def read(self, n: int = -1) -> bytes:
        await asyncio.sleep(0)
        if not self._chunks:
            return b""
        chunk = self._chunks.pop(0)
        if 0 < n < len(chunk):
            self._chunks.insert(0, chunk[n:])
            chunk = chunk[:n]
        return chunk


def cut(data: bytes, sizes: list[int]) -> list[bytes]:
    """``data`` in pieces of the given sizes, round and round."""
    chunks, pos, i = [], 0, 0
    while pos < len(data):
        chunks.append(data[pos : pos + sizes[i % len(sizes)]])
        pos += sizes[i % len(sizes)]
        i += 1
    return chunks


def split_after_newlines(data: bytes) -> list[bytes]:
    """The whole output cut after each b"\\n" (what readline() gives, line by line)."""
    lines = [piece + b"\n" for piece in data.split(b"\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def split_text_after_newlines(text: str) -> list[str]:
    lines = [piece + "\n" for piece in text.split("\n")]
    lines[-1] = lines[-1][:-1]
    return lines if lines[-1] else lines[:-1]


def decoded_lines(
    lines: list[bytes], encoding: str, errors: str
) -> tuple[list[str], type[Exception] | None]:
    """readline() + an incremental decoder: the documented meaning of text mode (but for a
    last line that decodes to nothing: no text, no newline, no line). Returns the lines and
    the error that stopped the decoding (None if none)."""
    decode = codecs.getincrementaldecoder(encoding)(errors=errors).decode
    out = []
    for line in lines:
        try:
            text = decode(line, not line.endswith(b"\n"))
        except UnicodeDecodeError:
            return out, UnicodeDecodeError
        if text:
            out.append(text)
    return out, None


def text_cut_lines(
    data: bytes, encoding: str, errors: str
) -> tuple[list[str], type[Exception] | None]:
    """The whole output decoded, then cut after each "\\n" (as ``TextIOWrapper`` cuts it): the
    meaning of text mode for codecs whose b"\\n" byte may be half of a character or not the
    newline (UTF-16, EBCDIC). On a decoding error: the whole lines before the bad bytes."""
    try:
        return split_text_after_newlines(codecs.decode(data, encoding, errors)), None
    except UnicodeDecodeError as exc:
        text = codecs.decode(data[: exc.start], encoding, errors)
        lines = split_text_after_newlines(text)
        return [line for line in lines if line.endswith("\n")], UnicodeDecodeError


#: The encodings of ENCODINGS whose b"\\n" byte is not always the "\\n" character.
TEXT_CUT = {"utf-16-le", "cp037"}


async def collect(items: AsyncIterator[Any]) -> tuple[list[Any], type[Exception] | None]:
    got = []
    try:
        async for item in items:
            got.append(item)
    except UnicodeDecodeError:
        return got, UnicodeDecodeError
    return got, None


def flatten(batches: list[list[Any]]) -> list[Any]:
    assert all(batches), f"an empty batch: {batches}"
    return [line for batch in batches for line in batch]


def _custom_newline(exc: UnicodeError) -> tuple[str, int]:
    # A handler that writes a newline: with a codec whose b"\n" byte is the newline, text mode
    # must still cut lines on the bytes' b"\n" (as readline() + decode).
    assert isinstance(exc, UnicodeDecodeError)
    return "\n", exc.end


codecs.register_error("test-newline", _custom_newline)

# Pieces that exercise the corners: line ends of every kind, characters split across reads,
# undecodable bytes, a BOM, and what str.splitlines would (wrongly, for readline) cut at.
PIECES = [
    b"\n",
    b"\r\n",
    b"\r",
    b"abc",
    b" ",
    "é".encode(),
    "€".encode(),
    "𝄞".encode(),
    b"\xff",
    b"\xe2\x82",  # a truncated character
    b"\xed\xa0\x80",  # an encoded surrogate (surrogatepass)
    b"\x0b\x0c\x1c\x1d\x1e",
    "\x85\u2028\u2029".encode(),
    b"\x85",
    codecs.BOM_UTF8,
    b"\x00",
]
output = st.lists(st.sampled_from(PIECES), max_size=60).map(b"".join)
readings = st.lists(st.integers(1, 40), min_size=1, max_size=6)
ENCODINGS = ["utf-8", "utf-8-sig", "latin-1", "cp1252", "ascii", "utf-16-le", "cp037"]
ERRORS = ["replace", "strict", "ignore", "backslashreplace", "surrogateescape", "surrogatepass"]


@settings(max_examples=300, deadline=None)
@given(output, readings, st.integers(1, 40))
@example(b"a\rb\nc\r\n\rd\n", [1, 20], 40)  # lone b"\r" inside lines read whole
def test_bytes_lines_are_the_whole_output_split(data: bytes, sizes: list[int], n: int) -> None:
    async def main() -> None:
        expected = split_after_newlines(data)
        batches = pq.iter_line_batches(ChunkedStream(cut(data, sizes)), chunk_size=n)
        assert flatten((await collect(batches))[0]) == expected
        lines = pq.iter_lines(ChunkedStream(cut(data, sizes)), chunk_size=n)
        assert (await collect(lines))[0] == expected

    asyncio.run(main())


@settings(max_examples=400, deadline=None)
@given(
    output,
    readings,
    st.integers(1, 40),
    st.sampled_from(ENCODINGS),
    st.sampled_from([*ERRORS, "test-newline"]),
)
@example("a\rb\x0bc\x85d\u2028e\n\r\nf\n".encode(), [1, 30], 40, "utf-8", "strict")
@example("a\rb\x0bc\x85d\n\r\nf\n".encode("latin-1"), [1, 30], 40, "latin-1", "strict")
@example("a\n\u0a41b\n".encode("utf-16-le"), [1, 3], 40, "utf-16-le", "strict")
def test_text_lines_are_the_lines_decoded(
    data: bytes, sizes: list[int], n: int, encoding: str, errors: str
) -> None:
    if errors == "surrogatepass" and not encoding.startswith("utf"):
        errors = "replace"  # only the UTF codecs know it

    async def main() -> None:
        if encoding in TEXT_CUT:
            expected = text_cut_lines(data, encoding, errors)
        else:
            expected = decoded_lines(split_after_newlines(data), encoding, errors)
        stream = ChunkedStream(cut(data, sizes))
        batches, error = await collect(
            pq.iter_line_batches(stream, encoding=encoding, errors=errors, chunk_size=n)
        )
        assert (flatten(batches), error) == expected
        stream = ChunkedStream(cut(data, sizes))
        lines = pq.iter_lines(stream, encoding=encoding, errors=errors, chunk_size=n)
        assert await collect(lines) == expected
        # Where a b"\n" byte is always the "\n" character, that is also the whole output
        # decoded, then cut after each "\n" (but for a last line that decodes to nothing).
        if (
            encoding in ("utf-8", "latin-1", "cp1252")
            and errors not in ("ignore", "test-newline")
            and expected[1] is None
        ):
            assert expected[0] == split_text_after_newlines(data.decode(encoding, errors))

    asyncio.run(main())


# The child writes its output in the given pieces, pausing between them so the reads see
# (mostly) those pieces, with characters and lines cut anywhere.
WRITER = py(
    "import os, sys, time\n"
    "data = bytes.fromhex(sys.argv[1])\n"
    "pos = 0\n"
    "for size in map(int, sys.argv[2].split(',')):\n"
    "    os.write(1, data[pos : pos + size])\n"
    "    pos += size\n"
    "    time.sleep(0.002)\n"
)


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(output, readings, st.sampled_from([None, "utf-8", "latin-1"]))
@pytest.mark.parametrize("mode", STREAMING)
def test_every_streaming_mode_gives_the_whole_output_split(
    mode: str, data: bytes, sizes: list[int], encoding: str | None
) -> None:
    chunks = cut(data, sizes)
    args = (data.hex(), ",".join(str(len(c)) for c in chunks) or "0")
    expected: list[Any] = split_after_newlines(data)
    if encoding is not None:
        expected = decoded_lines(expected, encoding, "replace")[0]

    async def main() -> None:
        async with WRAPPER_FACTORIES[mode]() as wrapper:
            proc = await wrapper.create_subprocess_exec(*WRITER, *args, stdout=pq.PIPE)
            batches = [b async for b in pq.iter_line_batches(proc.stdout, encoding=encoding)]
            assert await proc.wait() == 0
            assert flatten(batches) == expected
            proc = await wrapper.create_subprocess_exec(*WRITER, *args, stdout=pq.PIPE)
            lines = [line async for line in pq.iter_lines(proc.stdout, encoding=encoding)]
            assert await proc.wait() == 0
            assert lines == expected
            async with wrapper.stream(*WRITER, *args, encoding=encoding) as stream:
                first = []
                async for line in stream:
                    first.append(line)
                    if len(first) == 2:
                        break
                rest = [b async for b in stream.iter_batches()]
            assert first + flatten(rest) == expected

    asyncio.run(main())


async def test_a_batch_holds_the_lines_one_read_completed() -> None:
    chunks = [b"a\nb", b"c\nd\n", b"e", b"\n", b"no newline"]
    batches = [b async for b in pq.iter_line_batches(ChunkedStream(chunks))]
    assert batches == [[b"a\n"], [b"bc\n", b"d\n"], [b"e\n"], [b"no newline"]]


async def test_strict_decoding_delivers_the_good_lines_then_raises_the_line_error() -> None:
    data = b"ok\nalso ok\nbad \xff here\nnever seen\n"
    lines = pq.iter_lines(ChunkedStream([data]), encoding="utf-8", errors="strict")
    assert [await anext(lines), await anext(lines)] == ["ok\n", "also ok\n"]
    with pytest.raises(UnicodeDecodeError) as raised:
        await anext(lines)
    # The error of decoding that line alone, as readline() + decode() would raise it.
    assert (raised.value.object, raised.value.start) == (b"bad \xff here\n", 4)
    batches = pq.iter_line_batches(ChunkedStream([data]), encoding="utf-8", errors="strict")
    assert await anext(batches) == ["ok\n", "also ok\n"]
    with pytest.raises(UnicodeDecodeError):
        await anext(batches)


async def test_text_is_decoded_a_read_at_a_time_not_a_line_at_a_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = 0
    real = codecs.getincrementaldecoder

    def counting(encoding: str) -> Any:
        cls = real(encoding)

        class Counting(cls):  # type: ignore[misc, valid-type]
            def decode(self, data: bytes, final: bool = False) -> str:
                nonlocal calls
                calls += 1
                return str(super().decode(data, final))

        return Counting

    monkeypatch.setattr(codecs, "getincrementaldecoder", counting)
    data = b"".join(b"line %d\n" % i for i in range(1000))
    lines = [line async for line in pq.iter_lines(ChunkedStream([data]), encoding="utf-8")]
    assert lines == data.decode().splitlines(keepends=True)
    assert calls == 1


async def test_line_stream_batches_after_lines_and_with_a_deadline(
    streaming_wrapper: pq.SubprocessWrapper,
) -> None:
    code = "import sys\nfor i in range(5000): print(i)\nsys.stdout.flush()"
    async with streaming_wrapper.stream(*py(code), encoding="utf-8") as lines:
        first = await anext(lines)
        batches = [batch async for batch in lines.iter_batches()]
        assert [first, *flatten(batches)] == [f"{i}\n" for i in range(5000)]
        assert [line async for line in lines] == []
    assert lines.returncode == 0
    slow = "import sys, time\nprint('early', flush=True)\ntime.sleep(30)"
    async with streaming_wrapper.stream(*py(slow), timeout=0.5) as lines:
        got = []
        with pytest.raises(pq.ProcessTimeoutError):
            async for batch in lines.iter_batches():
                got.extend(batch)
        assert got == [b"early\n"]


async def test_line_stream_batches_need_the_block(any_wrapper: pq.SubprocessWrapper) -> None:
    stream = any_wrapper.stream(*py("print(1)"))
    with pytest.raises(RuntimeError, match="async with"):
        await anext(stream.iter_batches())


@pytest.mark.parametrize(
    "end", ["\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
)
def test_text_is_cut_after_newlines_only_whatever_other_line_end_it_holds(end: str) -> None:
    # str.splitlines() also cuts at these; the quick path takes its result only when none is
    # in the text.
    text = f"a{end}b\nc\n{end}\n"
    assert _split_text(text) == [f"a{end}b\n", "c\n", f"{end}\n"]
    assert _split_text("a\r\nb\n") == ["a\r\n", "b\n"]
