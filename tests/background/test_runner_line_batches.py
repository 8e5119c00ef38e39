"""The module runner's line reader: complete lines per read, and a bound on a line that never
ends (a child printing without newlines must not make the host hold all of it)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest

import prismq_subprocess as pq
from prismq_subprocess._background._line_batches import iter_line_batches


class Chunks:
    """An ``async read(n)`` stream handing out the given chunks."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = list(chunks)
        self.reads = 0

    async def read(self, n: int) -> bytes:
        self.reads += 1
        return self._chunks.pop(0) if self._chunks else b""


async def collect(stream: Chunks, **kwargs: int) -> list[list[str]]:
    return [batch async for batch in iter_line_batches(stream, **kwargs)]


async def test_lines_across_reads_come_whole() -> None:
    batches = await collect(Chunks([b"a\nb", b"c\r\nd", b"e"]))
    assert [line for batch in batches for line in batch] == ["a", "bc", "de"]


async def test_a_line_without_newline_is_handed_out_in_pieces_once_past_the_bound() -> None:
    data = b"x" * (1024 * 1024)
    stream = Chunks(data[i : i + 65536] for i in range(0, len(data), 65536))
    pieces: list[str] = []
    reads_at_first_piece = None
    async for batch in iter_line_batches(stream, max_line_bytes=4096):
        if reads_at_first_piece is None:
            reads_at_first_piece = stream.reads
        pieces += batch
    assert "".join(pieces) == data.decode()  # nothing lost
    assert all(len(piece.encode()) <= 4096 for piece in pieces)
    assert reads_at_first_piece == 1  # as the bytes come, not at the end of the stream


async def test_pieces_are_cut_between_characters() -> None:
    text = "é€😀" * 20_000  # 2-, 3- and 4-byte characters
    data = text.encode()
    stream = Chunks(data[i : i + 1000] for i in range(0, len(data), 1000))
    pieces = [line for batch in await collect(stream, max_line_bytes=777) for line in batch]
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert all(len(piece.encode()) <= 777 for piece in pieces)


async def test_the_bound_must_be_positive() -> None:
    with pytest.raises(pq.exceptions.InvalidLimitError):
        await collect(Chunks([b"a\n"]), max_line_bytes=0)


async def test_a_module_printing_without_newlines_is_read_in_pieces(tmp_path: Path) -> None:
    """10 MB without a newline: the runner hands it on in 4 MiB pieces (so it never holds
    all of it); the log has every byte, a piece per line, and shorter lines stay whole."""
    script = tmp_path / "no_newline.py"
    script.write_text("import sys\nprint('a' * 100_000)\nsys.stdout.write('y' * 10_000_000)\n")
    capture = pq.OutputCapture(log_dir=tmp_path / "logs")
    async with pq.RunRegistry() as registry, pq.ModuleRunner(registry, output=capture) as runner:
        run = await runner.execute_module("m", "m", str(script))
        assert run.status is pq.RunStatus.COMPLETED
    await capture.aclose()
    logged = pq.run_log_path(tmp_path / "logs", run.run_id).read_text().split("\n")
    if logged[-1] == "":
        logged.pop()
    piece = 4 * 1024 * 1024
    assert logged == ["a" * 100_000, "y" * piece, "y" * piece, "y" * (10_000_000 - 2 * piece)]


async def test_a_crlf_line_of_the_bound_split_between_reads_stays_one_line() -> None:
    """A line of exactly the bound ended by \\r\\n, the \\r and the \\n in two reads: the \\r
    must not be left alone as a piece (it became an extra empty line)."""
    split = await collect(Chunks([b"a" * 10 + b"\r", b"\nnext\n"]), max_line_bytes=10)
    whole = await collect(Chunks([b"a" * 10 + b"\r\nnext\n"]), max_line_bytes=10)
    assert [line for batch in split for line in batch] == ["a" * 10, "next"]
    assert [line for batch in whole for line in batch] == ["a" * 10, "next"]
    assert all(batch for batch in split)  # never an empty batch
