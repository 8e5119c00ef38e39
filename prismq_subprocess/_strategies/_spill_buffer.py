"""`SpillBuffer`: the whole of a LOCAL child's output, in memory only up to a bound.

LOCAL hands a raw process's output over once the child has exited (see ``_local.py``), so it
must keep all of it until then; a chatty child (a module printing progress for hours) would grow
the host without end. Past :data:`SPILL_AFTER` bytes the output goes to an anonymous temporary
file instead, as ``tempfile.SpooledTemporaryFile`` does, and the reader takes it back a piece at
a time (:meth:`SpillBuffer.take_held`, :meth:`SpillBuffer.take_spilled`).
"""

from __future__ import annotations

import tempfile
import weakref
from typing import IO

from .._core._result import TailBuffer

__all__ = ["SPILL_AFTER", "SpillBuffer"]

#: Bytes of a child's output kept in memory; the rest waits in a temporary file.
SPILL_AFTER = 1024 * 1024


class SpillBuffer(TailBuffer):
    """A :class:`TailBuffer` that keeps every byte (no cap, nothing dropped), holding at most
    ``memory_bytes`` of them in memory (plus one appended chunk) and the rest in a temporary
    file, made only when needed and closed once its bytes were taken, or with the buffer.

    One thread appends (the drain); once it has finished, the reader takes the bytes back in
    order, each once: first those in memory (:meth:`take_held`, cheap), then those in the file
    (:meth:`take_spilled`, which blocks on the file: call it off the event loop).
    """

    __slots__ = ("__weakref__", "_closer", "_file", "_memory_bytes", "_rewound", "taken")

    def __init__(self, memory_bytes: int = SPILL_AFTER) -> None:
        super().__init__(None)
        self._memory_bytes = memory_bytes
        self._file: IO[bytes] | None = None
        self._closer: weakref.finalize[[], SpillBuffer] | None = None
        self._rewound = False
        #: Bytes taken back so far.
        self.taken = 0

    def append(self, data: bytes) -> None:
        """Keep ``data``: in memory while the bytes there stay within the bound (and nothing
        went to the file yet, so the order holds), in the file after that."""
        if not data:
            return
        if self._file is None and self._size + len(data) <= self._memory_bytes:
            super().append(data)
            return
        if self._file is None:
            # Not a `with`: the file outlives this call, until taken back or dropped (close()).
            self._file = tempfile.TemporaryFile()  # noqa: SIM115
            # Closed with the buffer at the latest: a reader that stops early leaves it open.
            self._closer = weakref.finalize(self, self._file.close)
        self._file.write(data)
        self.total += len(data)

    def getvalue(self) -> bytes:
        """Everything appended, in one piece (blocking when some of it is in the file). Only
        before anything was taken: the reader takes the bytes a piece at a time instead."""
        data = super().getvalue()
        file = self._file
        if file is None:
            return data
        file.seek(0)
        return data + file.read()

    def take_held(self) -> bytes | None:
        """Remove and return the next piece kept in memory; ``None`` when what comes next is
        in the file, ``b""`` when everything was taken."""
        if self._chunks:
            chunk = self._chunks.popleft()
            self._size -= len(chunk)
            self.taken += len(chunk)
            return chunk
        return None if self._file is not None else b""

    def take_spilled(self, size: int) -> bytes:
        """Remove and return up to ``size`` of the next bytes in the file (those in memory come
        first); ``b""`` when none are left, the file then closed. Blocking."""
        file = self._file
        if file is None:
            return b""
        if not self._rewound:
            self._rewound = True
            file.seek(0)
        data = file.read(size)
        if data:
            self.taken += len(data)
        else:
            self.close()
        return data

    def close(self) -> None:
        """Drop what is left in the file, and the file. Idempotent."""
        self._file = None
        if self._closer is not None:
            self._closer()
