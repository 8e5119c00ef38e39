"""What every command shares: exit codes, the error that carries one, and output formatting."""

from __future__ import annotations

import json
import os
import select
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO

__all__ = [
    "EXIT_CANNOT_RUN",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_NOT_EXECUTABLE",
    "EXIT_NOT_FOUND",
    "EXIT_OK",
    "EXIT_TIMEOUT",
    "EXIT_USAGE",
    "CliError",
    "byte_writer",
    "format_pairs",
    "print_json",
    "shown",
    "signal_exit_code",
]

# The conventions of GNU `timeout` and `env` (124-127) and of shells (128 + N for signal N),
# so scripts written against those tools read our exit codes the same way.
EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_TIMEOUT = 124
EXIT_CANNOT_RUN = 125
EXIT_NOT_EXECUTABLE = 126
EXIT_NOT_FOUND = 127
EXIT_INTERRUPTED = 130


def signal_exit_code(signum: int) -> int:
    """The exit code a shell reports for a process ended by signal ``signum``: 128 + N."""
    return 128 + signum


class CliError(Exception):
    """A failure to report as one line on stderr, ending the command with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# Control characters in text from elsewhere (a module name, an error, output, a command) are
# shown escaped: raw, an escape sequence could rewrite the terminal, and a newline or tab breaks
# the layout.
# The invisible marks that reorder text (bidirectional marks, embeddings, overrides and
# isolates, as in "Trojan Source"), the zero-width space, the invisible operators and word
# joiner, the BOM and the line and paragraph separators are shown escaped too: raw,
# "\u202egnp.exe" reads as "exe.png". Zero-width (non-)joiners are not: emoji sequences and
# Persian or Indic text need them.
_CONTROLS = {
    code: repr(chr(code))[1:-1]
    for code in (
        *range(0x20),
        *range(0x7F, 0xA0),
        0x061C,
        0x200B,
        0x200E,
        0x200F,
        *range(0x2028, 0x202F),
        *range(0x2060, 0x2065),
        *range(0x2066, 0x206A),
        0xFEFF,
    )
}


def shown(text: str) -> str:
    """``text`` with its control characters escaped, as ``repr()`` writes them."""
    return text.translate(_CONTROLS)


def format_pairs(pairs: Iterable[tuple[str, str]], indent: str = "") -> str:
    """Render ``key: value`` lines with the values aligned in one column."""
    items = list(pairs)
    if not items:
        return ""
    width = max(len(key) for key, _ in items)
    return "\n".join(f"{indent}{key.ljust(width)} : {value}" for key, value in items)


def print_json(data: Any, stream: TextIO | None = None) -> None:
    """Write ``data`` as one indented JSON document; keys keep their (logical) insertion order.

    Values JSON does not know (paths, enums) are written as their ``str()``.
    """
    out = sys.stdout if stream is None else stream
    json.dump(data, out, indent=2, default=str)
    out.write("\n")


def _discard(data: bytes) -> None:
    del data


def byte_writer(stream: TextIO | None) -> Callable[[bytes], None]:
    """A blocking, unbuffered byte writer for ``stream`` (its file descriptor when it has one).

    ``None`` (Python's stream for a descriptor closed when it started, as with ``>&-``) drops
    what is written: the command still runs, and its output there goes where ours would.
    """
    if stream is None:
        return _discard
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        binary = stream.buffer

        def write_buffered(data: bytes) -> None:
            binary.write(data)
            binary.flush()

        return write_buffered

    def write_fd(data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:
                # A descriptor its giver left non-blocking (a node or Go parent sharing the
                # pipe), read slowly: wait until it takes more rather than cut the output.
                _wait_writable(fd)

    return write_fd


def _wait_writable(fd: int) -> None:
    try:
        select.select([], [fd], [], 1.0)
    except (OSError, ValueError):  # (Windows' select takes only sockets)
        time.sleep(0.01)
