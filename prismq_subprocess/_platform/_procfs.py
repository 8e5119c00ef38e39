"""Reading the small kernel files (``/proc``, cgroupfs) a tree stop reads by the thousand."""

from __future__ import annotations

import os

__all__ = ["read_small_file"]


def read_small_file(path: str, limit: int | None = None) -> bytes | None:
    """The bytes of ``path`` (at most about ``limit`` of them: whole reads are kept until the
    total reaches it), or None when it cannot be opened or read (gone, not ours)."""
    # os.read, not open(): no buffered file object for a file read once.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        chunks = []
        size = 0
        while limit is None or size < limit:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)
