"""What an output subscription yields (:class:`OutputLine`, :class:`OutputGap`,
:class:`OutputChunk`, :class:`OutputEnd`) and how over-long lines are cut (:func:`bound_line`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

__all__ = [
    "NO_TRUNCATION",
    "OutputChunk",
    "OutputEnd",
    "OutputGap",
    "OutputItem",
    "OutputLine",
    "bound_line",
    "utf8_size",
]

NO_TRUNCATION: Mapping[int, int] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class OutputLine:
    """One line of output. ``seq`` counts the run's lines from 0 (an SSE event id; resume with
    ``subscribe(run_id, after=seq)``); ``text`` has no line ending. ``truncated`` is how many
    UTF-8 bytes were cut from a line longer than the capture's ``max_line_bytes`` (``text`` then
    ends with a ``… [line truncated: N more bytes]`` note; the log file has the whole line)."""

    seq: int
    text: str
    truncated: int = 0


@dataclass(frozen=True, slots=True)
class OutputGap:
    """Marker: ``dropped`` lines are missing here (they left the run's ring buffer before this
    subscriber read them, and there was no log file to read them from, or writing them to it
    failed, e.g. on a full disk)."""

    dropped: int


OutputItem = OutputLine | OutputGap
"""What iterating a subscription yields: tell them apart with ``isinstance``."""


@dataclass(frozen=True, slots=True)
class OutputChunk:
    """Consecutive lines, as ``OutputSubscription.chunks()`` yields them: ``lines[i]`` is line
    ``first_seq + i``. ``truncated`` maps the seq of each cut line to the bytes cut (see
    :class:`OutputLine`). Reading in chunks costs no object per line."""

    first_seq: int
    lines: Sequence[str]
    truncated: Mapping[int, int] = field(default_factory=lambda: NO_TRUNCATION)

    @property
    def next_seq(self) -> int:
        """The seq after the last line of this chunk."""
        return self.first_seq + len(self.lines)

    def __len__(self) -> int:
        return len(self.lines)

    def items(self) -> list[OutputLine]:
        """Return the chunk as :class:`OutputLine` objects."""
        first, cut = self.first_seq, self.truncated
        return [
            OutputLine(first + i, text, cut.get(first + i, 0)) for i, text in enumerate(self.lines)
        ]


@dataclass(frozen=True, slots=True)
class OutputEnd:
    """How a run ended, as given to ``OutputCapture.close_run`` (``None`` where not given)."""

    status: str | None = None
    exit_code: int | None = None


def utf8_size(text: str) -> int:
    """Return the UTF-8 size of ``text`` in bytes (lone surrogates count as 3)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def bound_line(text: str, max_bytes: int) -> tuple[str, int]:
    """Return ``text`` cut to at most ``max_bytes`` UTF-8 bytes (at a character boundary) plus a
    note saying how much was cut, and the number of bytes cut (0: ``text`` unchanged)."""
    size = utf8_size(text)
    if size <= max_bytes:
        return text, 0
    if text.isascii():
        kept = text[:max_bytes]
    else:
        data = text.encode("utf-8", "surrogatepass")
        # Back up over the continuation bytes of a character split by the cut, to its start.
        # Not decode(errors="ignore"): that also dropped every lone surrogate (encoded here
        # with surrogatepass, which "ignore" does not read back), so the kept text was not a
        # prefix of the line.
        end = max_bytes
        while end > 0 and data[end] & 0xC0 == 0x80:
            end -= 1
        kept = data[:end].decode("utf-8", "surrogatepass")
    cut = size - utf8_size(kept)
    return f"{kept}… [line truncated: {cut} more bytes]", cut
