"""The last lines of a run, bounded by count and by bytes: :class:`OutputTail` (what becomes
``Run.output_tail``, which is stored in one registry row and so must stay small)."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator

from .._core._exceptions import InvalidLimitError
from ._output_items import bound_line, utf8_size

__all__ = ["DEFAULT_TAIL_BYTES", "OutputTail"]

#: Default byte bound of a run's output tail.
DEFAULT_TAIL_BYTES = 64 * 1024


class OutputTail:
    """The newest ``max_lines`` lines, at most ``max_bytes`` UTF-8 bytes in all: older lines are
    dropped first, and a single line longer than ``max_bytes`` is cut (its text says so)."""

    __slots__ = ("_lines", "_nbytes", "max_bytes", "max_lines")

    def __init__(self, max_lines: int, max_bytes: int = DEFAULT_TAIL_BYTES) -> None:
        """
        Raises:
            InvalidLimitError: ``max_lines`` is not an int >= 0, or ``max_bytes`` not >= 1.
        """
        if isinstance(max_lines, bool) or not isinstance(max_lines, int) or max_lines < 0:
            raise InvalidLimitError(f"max_lines must be an int >= 0, got {max_lines!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise InvalidLimitError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
        self.max_lines = max_lines
        self.max_bytes = max_bytes
        self._lines: deque[tuple[str, int]] = deque()
        self._nbytes = 0

    def append(self, line: str) -> None:
        """Add one line (without its line ending)."""
        self.extend((line,))

    def extend(self, lines: Iterable[str]) -> None:
        """Add lines (without their line endings), oldest first."""
        keep = self.max_lines
        if not keep:
            return
        batch = lines if isinstance(lines, list | tuple) else list(lines)
        kept = self._lines
        for line in batch[-keep:]:  # older ones would be dropped at once
            size = utf8_size(line)
            if size > self.max_bytes:
                line, _ = bound_line(line, self.max_bytes)
                size = utf8_size(line)
            kept.append((line, size))
            self._nbytes += size
        while len(kept) > keep or (len(kept) > 1 and self._nbytes > self.max_bytes):
            self._nbytes -= kept.popleft()[1]

    def __iter__(self) -> Iterator[str]:
        return (line for line, _ in self._lines)

    def __len__(self) -> int:
        return len(self._lines)
