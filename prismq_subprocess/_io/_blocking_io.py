"""Moving a child's pipes to and from memory in one blocking call (what ``communicate`` does),
but into bounded buffers, for the LOCAL strategy's worker threads."""

from __future__ import annotations

import contextlib
import os
import selectors
import subprocess
import threading
import time
from collections.abc import Callable
from typing import IO

from .._core._result import TailBuffer
from .._platform import PIPE_BUF, PIPES_SELECTABLE

__all__ = ["LINGER", "Leftovers", "drain_blocking"]

_READ = 256 * 1024
# Writes to a pipe of at most PIPE_BUF bytes never block once select() said "writable".
_WRITE = PIPE_BUF


#: How long the pipes may stay open after the child exited before its leftovers are stopped.
LINGER = 0.05
_TICK = 0.05


class Leftovers:
    """What to do when the child has exited but something it started still holds its pipes:
    ``stop(force)`` signals the leftovers (SIGTERM first, SIGKILL when ``force``)."""

    def __init__(self, stop: Callable[[bool], None], grace: float) -> None:
        self.stop = stop
        self.grace = grace


def drain_blocking(
    popen: subprocess.Popen[bytes],
    input: bytes | None,
    out: TailBuffer | None,
    err: TailBuffer | None,
    leftovers: Leftovers | None = None,
) -> None:
    """Write ``input`` to the child's stdin (then close it) while reading stdout/stderr into the
    buffers, until both reach end of file. Blocks; run it in a worker thread.

    A child that closes stdin early is not an error (``communicate()`` ignores it too). When the
    child has exited but descendants keep the pipes open, ``leftovers.stop`` is called (polite,
    then forced after ``leftovers.grace``); pipes still open a second after that are abandoned.
    """
    if not PIPES_SELECTABLE:  # pragma: no cover - Windows pipes cannot be select()ed
        _drain_with_threads(popen, input, out, err)
        return
    exited_at: float | None = None
    stage = 0
    with selectors.DefaultSelector() as selector:
        view = memoryview(input or b"")
        if popen.stdin is not None:
            if view:
                selector.register(popen.stdin, selectors.EVENT_WRITE)
            else:
                _close(popen.stdin)
        sinks: dict[int, TailBuffer | None] = {}
        for output, sink in ((popen.stdout, out), (popen.stderr, err)):
            if output is not None:
                selector.register(output, selectors.EVENT_READ)
                sinks[output.fileno()] = sink
        next_check = time.monotonic() + _TICK
        while selector.get_map():
            ready = selector.select(_TICK if leftovers is not None else None)
            if leftovers is not None and time.monotonic() >= next_check:
                # On a clock, not only when idle: a leftover that keeps writing must not keep
                # us from noticing that the child itself has exited.
                now = next_check = time.monotonic()
                next_check += _TICK
                if exited_at is None:
                    if popen.poll() is not None:
                        exited_at = now
                else:
                    waited = now - exited_at
                    if stage == 0 and waited >= LINGER:
                        leftovers.stop(False)
                        stage = 1
                    elif stage == 1 and waited >= LINGER + leftovers.grace:
                        leftovers.stop(True)
                        stage = 2
                    elif stage == 2 and waited >= LINGER + leftovers.grace + 1.0:
                        for key in list(selector.get_map().values()):
                            selector.unregister(key.fd)
                            _close(key.fileobj)  # type: ignore[arg-type]
                        break
            for key, _ in ready:
                pipe = key.fileobj
                fd = key.fd
                if pipe is popen.stdin:
                    try:
                        view = view[os.write(fd, view[:_WRITE]) :]
                    except (BrokenPipeError, ConnectionResetError):
                        view = view[:0]
                    if not view:
                        selector.unregister(fd)
                        _close(popen.stdin)
                    continue
                data = os.read(fd, _READ)
                if not data:
                    selector.unregister(fd)
                    _close(pipe)  # type: ignore[arg-type]
                    continue
                sink = sinks[fd]
                if sink is not None:
                    sink.append(data)


def _close(pipe: IO[bytes]) -> None:
    with contextlib.suppress(OSError):
        pipe.close()


def _drain_with_threads(
    popen: subprocess.Popen[bytes],
    input: bytes | None,
    out: TailBuffer | None,
    err: TailBuffer | None,
) -> None:
    def read(pipe: IO[bytes], sink: TailBuffer | None) -> None:
        try:
            while data := pipe.read(_READ):
                if sink is not None:
                    sink.append(data)
        finally:
            _close(pipe)

    threads = [
        threading.Thread(target=read, args=(pipe, sink), daemon=True)
        for pipe, sink in ((popen.stdout, out), (popen.stderr, err))
        if pipe is not None
    ]
    for thread in threads:
        thread.start()
    if popen.stdin is not None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError, OSError):
            if input:
                popen.stdin.write(input)
        _close(popen.stdin)
    for thread in threads:
        thread.join()
