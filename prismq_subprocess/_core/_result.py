"""`ProcessResult`: what ``run()`` returns, and the bounded buffer that fills it."""

from __future__ import annotations

import collections
import itertools
from dataclasses import dataclass

from ._exceptions import ProcessFailedError
from ._modes import RunMode

__all__ = ["DEFAULT_MAX_OUTPUT_BYTES", "ProcessResult", "TailBuffer"]

#: Default cap on the bytes ``run()`` keeps per stream (the tail is kept).
DEFAULT_MAX_OUTPUT_BYTES = 8 * 1024 * 1024


class TailBuffer:
    """Keeps the last ``max_bytes`` bytes appended to it, and how many were dropped.

    Memory stays below ``max_bytes`` plus one appended chunk.
    """

    __slots__ = ("_chunks", "_size", "dropped", "max_bytes", "total")

    def __init__(self, max_bytes: int | None) -> None:
        self.max_bytes = max_bytes
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0
        self.total = 0
        self.dropped = 0

    def append(self, data: bytes) -> None:
        """Add ``data`` and drop the oldest whole chunks that fall outside the cap."""
        if not data:
            return
        self._chunks.append(data)
        self._size += len(data)
        self.total += len(data)
        limit = self.max_bytes
        if limit is None:
            return
        while len(self._chunks) > 1 and self._size - len(self._chunks[0]) >= limit:
            gone = self._chunks.popleft()
            self._size -= len(gone)
            self.dropped += len(gone)

    @property
    def truncated(self) -> bool:
        """True when some output was dropped to respect the cap."""
        return self.max_bytes is not None and self.total > self.max_bytes

    def getvalue(self) -> bytes:
        """The kept bytes: everything, or exactly the last ``max_bytes``."""
        excess = 0 if self.max_bytes is None else self._size - self.max_bytes
        if excess > 0:
            # Join from inside the first chunk: one copy of the kept bytes, not two.
            first = memoryview(self._chunks[0])[excess:]
            data = b"".join([first, *itertools.islice(self._chunks, 1, None)])
        else:
            data = b"".join(self._chunks)
        if len(self._chunks) > 1 or excess > 0:
            self._chunks.clear()
            self._chunks.append(data)
            self._size = len(data)
        return data


@dataclass(frozen=True)
class ProcessResult:
    """The outcome of ``SubprocessWrapper.run()``.

    ``stdout``/``stderr`` hold the whole output, or its last ``max_output_bytes`` when
    ``stdout_truncated``/``stderr_truncated`` say so; ``*_total_bytes`` count everything the child
    wrote. ``duration`` is wall seconds from spawn to exit.
    """

    args: tuple[str, ...] | str
    returncode: int
    stdout: bytes
    stderr: bytes
    pid: int
    duration: float
    mode: RunMode | str
    stdout_truncated: bool = False
    stderr_truncated: bool = False
    stdout_total_bytes: int = 0
    stderr_total_bytes: int = 0

    @property
    def ok(self) -> bool:
        """True when the command exited with status 0."""
        return self.returncode == 0

    @property
    def stdout_text(self) -> str:
        """``stdout`` decoded as UTF-8 (invalid bytes replaced)."""
        return self.stdout.decode("utf-8", errors="replace")

    @property
    def stderr_text(self) -> str:
        """``stderr`` decoded as UTF-8 (invalid bytes replaced)."""
        return self.stderr.decode("utf-8", errors="replace")

    def check_returncode(self) -> ProcessResult:
        """Return ``self``, or raise :class:`ProcessFailedError` if the exit status is non-zero."""
        if self.returncode != 0:
            raise ProcessFailedError(
                cmd=self.args, returncode=self.returncode, stdout=self.stdout, stderr=self.stderr
            )
        return self
