"""Per-run output log files, written on one background thread and read back for replays.

The event loop only puts lines on a queue; a single writer thread takes whatever has accumulated,
writes it and flushes once per batch. So a chatty process costs the loop a queue put per line (or
per batch), never a disk write, and ``tail -f`` on the file sees lines shortly after they arrive.

The file of a run is ``log_dir / <encoded run id>.log`` (see ``run_log_path``): UTF-8, one line of
output per ``\\n``-terminated line, so line ``k`` of the file is the output line with seq ``k``.
For each run it writes, the writer remembers how many lines are on disk and the byte offset of
every 1024th line, so :func:`read_log_lines` can start a replay anywhere without a scan.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .._core._cancel_shield import shielded_if_cancelled
from ._log_names import run_log_path
from ._output_items import bound_line

__all__ = ["INDEX_EVERY", "LogRead", "LogState", "RunLogWriter", "read_log_lines"]

logger = logging.getLogger(__name__)

_BATCH = 1000
#: The writer records the byte offset of every INDEX_EVERY-th line of a run.
INDEX_EVERY = 1024


class LogState:
    """What the writer knows about one run's file; shared with the loop thread (read-only there).

    ``written`` lines are flushed to disk; ``offsets[k]`` is the byte offset of line
    ``k * INDEX_EVERY`` (empty until the file is opened); ``broken`` once a write failed (later
    lines are not written)."""

    __slots__ = ("broken", "offsets", "position", "written")

    def __init__(self) -> None:
        self.written = 0
        self.offsets: list[int] = []
        self.position = 0
        self.broken = False


class _Close:
    __slots__ = ("done", "run_id")

    def __init__(self, run_id: str, done: concurrent.futures.Future[None]) -> None:
        self.run_id = run_id
        self.done = done


class _Forget:
    __slots__ = ("run_id", "state")

    def __init__(self, run_id: str, state: LogState | None) -> None:
        self.run_id = run_id
        self.state = state


class _Stop:
    __slots__ = ("done",)

    def __init__(self, done: concurrent.futures.Future[None]) -> None:
        self.done = done


_Item = tuple[str, str | list[str]] | _Close | _Forget | _Stop
_FlushWaiter = tuple[str, "LogState", int, asyncio.Future[None]]


def _resolve(done: concurrent.futures.Future[None]) -> None:
    # The awaiting side may have been cancelled (which cancels this future); don't fail then.
    if done.set_running_or_notify_cancel():
        done.set_result(None)


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _encode(lines: list[str]) -> bytes:
    # errors="replace": a lone surrogate in the text must not lose the whole line.
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


class RunLogWriter:
    """Appends each run's lines to its log file in ``log_dir`` (see the module docstring).

    A write error (of any kind) is logged once for that run and its later lines are skipped;
    other runs are unaffected. Run ids must have been checked with ``log_file_name`` by the caller.
    """

    def __init__(self, log_dir: str | os.PathLike[str]) -> None:
        self.log_dir = Path(log_dir)
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False
        self._states: dict[str, LogState] = {}
        # Readers waiting for lines to reach the disk: (run id, state, line count, future).
        self._flush_waiters: list[_FlushWaiter] = []
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        """``True`` until :meth:`aclose`: queued lines will still reach the disk."""
        return not self._stopped

    def path_for(self, run_id: str) -> Path:
        """Return the log file path of ``run_id``."""
        return run_log_path(self.log_dir, run_id)

    def state(self, run_id: str) -> LogState | None:
        """Return what the writer knows of ``run_id``'s file (``None``: nothing written yet, or
        forgotten)."""
        return self._states.get(run_id)

    def _ensure_thread(self) -> None:
        if self._thread is None:
            # Daemon: a host that never calls aclose() must still be able to exit.
            self._thread = threading.Thread(
                target=self._work, name="prismq-output-log", daemon=True
            )
            self._thread.start()

    def write(self, run_id: str, text: str | list[str]) -> None:
        """Queue one line, or a list of lines (without newlines), for ``run_id``'s file. Never
        blocks."""
        if self._stopped:
            return
        self._ensure_thread()
        self._queue.put((run_id, text))

    def register(self, run_id: str) -> None:
        """Start bookkeeping for a new run, before its first line is queued: a reader can then
        wait for its lines to be flushed (see :meth:`wait_flushed`) from the start."""
        self._states[run_id] = LogState()

    def forget(self, run_id: str) -> None:
        """Drop what the writer remembers of ``run_id`` (after the lines queued before)."""
        if not self._stopped and self._thread is not None:
            self._queue.put(_Forget(run_id, self._states.get(run_id)))
        else:
            self._states.pop(run_id, None)

    def _flushed(self, run_id: str, state: LogState, count: int) -> bool:
        return (
            state.written >= count
            or state.broken
            or self._stopped
            or self._states.get(run_id) is not state
        )

    async def wait_flushed(self, run_id: str, state: LogState, count: int) -> None:
        """Return once ``count`` lines of ``run_id`` are on disk, or they never will be (its
        file broke, the run was forgotten, or the writer stopped): check ``state`` afterwards.

        Cancellation: only the wait is abandoned.
        """
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        entry = (run_id, state, count, waiter)
        with self._lock:
            if self._flushed(run_id, state, count):
                return
            self._flush_waiters.append(entry)
        try:
            await waiter
        finally:
            with self._lock:
                if entry in self._flush_waiters:
                    self._flush_waiters.remove(entry)

    def _notify_flushed(self) -> None:
        with self._lock:
            ready = [entry for entry in self._flush_waiters if self._flushed(*entry[:3])]
            for entry in ready:
                self._flush_waiters.remove(entry)
        for *_, waiter in ready:
            # RuntimeError: that loop is closed, so nobody waits any more.
            with contextlib.suppress(RuntimeError):
                waiter.get_loop().call_soon_threadsafe(_wake, waiter)

    async def close_run(self, run_id: str) -> None:
        """Wait until every queued line of ``run_id`` is written and its file is closed.

        Cancellation: the file is still closed by the writer thread.
        """
        if self._stopped or self._thread is None:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Close(run_id, done))
        await asyncio.wrap_future(done)

    async def aclose(self) -> None:
        """Write everything queued, close all files and stop the thread. Idempotent.

        Cancellation: the thread still finishes and stops; only the wait is abandoned. Called
        inside an anyio scope that is already cancelled (a ``finally`` block after
        ``move_on_after``), it still waits, shielded from the scope: for lines already queued
        to reach the disk, which no new line can prolong.
        """
        if self._stopped:
            return
        self._stopped = True
        thread = self._thread
        if thread is None:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Stop(done))
        with shielded_if_cancelled():
            await asyncio.wrap_future(done)
        # The thread returns right after resolving `done`, so this join is short.
        thread.join()

    # -- the writer thread ----------------------------------------------------------------------
    def _work(self) -> None:
        files: dict[str, BinaryIO] = {}
        while True:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            pending: dict[str, list[str]] = {}
            stop: _Stop | None = None
            for item in batch:
                if isinstance(item, tuple):
                    run_id, text = item
                    lines = pending.setdefault(run_id, [])
                    if isinstance(text, str):
                        lines.append(text)
                    else:
                        lines.extend(text)
                    continue
                # Control items apply after the lines queued before them.
                self._flush(files, pending)
                if isinstance(item, _Close):
                    self._close_file(files, item.run_id)
                    _resolve(item.done)
                elif isinstance(item, _Forget):
                    self._close_file(files, item.run_id)
                    # Not a state registered since (the run id used again). A run this writer
                    # never knew, or forgot already, has nothing to drop: pop(), not del (a
                    # KeyError here ended the thread, and close_run() then waited for ever).
                    if self._states.get(item.run_id) is item.state:
                        self._states.pop(item.run_id, None)
                else:
                    stop = item
            self._flush(files, pending)
            if stop is not None:
                for run_id in list(files):
                    self._close_file(files, run_id)
            self._notify_flushed()
            if stop is not None:
                _resolve(stop.done)
                return

    def _flush(self, files: dict[str, BinaryIO], pending: dict[str, list[str]]) -> None:
        for run_id, lines in pending.items():
            state = self._states.get(run_id)
            if state is None:
                state = self._states[run_id] = LogState()  # a run nobody registered
            if state.broken:
                continue
            whole = -1  # where the run's last whole line ends in its file, once it is open
            try:
                handle = files.get(run_id)
                if handle is None:
                    handle = files[run_id] = self._open(run_id)
                    if not state.offsets:
                        # Line 0 of this run starts where the file ends now.
                        handle.seek(0, os.SEEK_END)
                        state.position = handle.tell()
                        state.offsets.append(state.position)
                whole = state.position
                self._write(handle, state, lines)
                handle.flush()
                state.written += len(lines)
            except Exception:
                # Not only OSError (a full disk, a read-only directory): a path the OS cannot
                # take raises ValueError, and any error that ended this thread would leave
                # close_run() and aclose() waiting forever.
                logger.exception("cannot write the output log of run %s", run_id)
                state.broken = True
                self._close_file(files, run_id)
                if whole >= 0:
                    self._keep_whole_lines(run_id, state, whole, lines)
        pending.clear()

    def _keep_whole_lines(self, run_id: str, state: LogState, whole: int, lines: list[str]) -> None:
        """After a failed write of ``lines`` from offset ``whole`` on (a full disk writes what
        fits, then fails; the file is closed by now): count the lines that reached the file
        whole as written, and cut the file back to the end of the last of them. A half line at
        the end would be replayed as a line of its own."""
        path = self.path_for(run_id)
        try:
            size = os.stat(path).st_size
            end = whole
            kept = 0
            for line in lines:
                length = len(_encode([line]))  # the bytes this line took in the file
                if end + length > size:
                    break
                end += length
                kept += 1
            if size > end:
                os.truncate(path, end)
        except (OSError, ValueError):
            logger.exception("cannot cut the output log of run %s back to whole lines", run_id)
            return
        state.written += kept
        state.position = end
        # Offsets recorded for lines that did not make it (readers only use those of written
        # lines, so trimming them is for a consistent record).
        del state.offsets[state.written // INDEX_EVERY + 1 :]

    @staticmethod
    def _write(handle: BinaryIO, state: LogState, lines: list[str]) -> None:
        first = state.written
        start = 0
        while start < len(lines):
            # Cut the batch where an indexed line starts, to record that line's offset.
            boundary = (first + start) // INDEX_EVERY * INDEX_EVERY + INDEX_EVERY
            end = min(len(lines), boundary - first)
            data = _encode(lines[start:end])
            handle.write(data)
            state.position += len(data)
            if first + end == boundary:
                state.offsets.append(state.position)
            start = end

    def _open(self, run_id: str) -> BinaryIO:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self.path_for(run_id).open("ab")

    @staticmethod
    def _close_file(files: dict[str, BinaryIO], run_id: str) -> None:
        handle = files.pop(run_id, None)
        if handle is not None:
            try:
                handle.close()
            except OSError:
                logger.exception("cannot close the output log of run %s", run_id)


@dataclass(frozen=True, slots=True)
class LogRead:
    """Lines ``first_seq ...`` read from a log file; ``offset`` is where line ``next_seq``
    starts; ``eof`` when the file ended before the requested count. A file that ended before
    the first line asked for gives no lines and ``first_seq`` the line it ends at: a later read
    can start from there."""

    first_seq: int
    lines: list[str]
    truncated: dict[int, int]
    offset: int
    eof: bool

    @property
    def next_seq(self) -> int:
        """The seq after the last line read."""
        return self.first_seq + len(self.lines)


def read_log_lines(
    path: Path,
    first_seq: int,
    max_lines: int,
    *,
    start: tuple[int, int] = (0, 0),
    max_bytes: int,
    max_line_bytes: int,
    complete_only: bool = False,
) -> LogRead:
    """Read up to ``max_lines`` lines (and about ``max_bytes``) from line ``first_seq`` on.

    ``start`` is a known ``(seq, byte offset)`` at or before ``first_seq`` to begin from (the
    lines between are skipped). Lines are decoded as UTF-8 with ``replace`` and cut to
    ``max_line_bytes`` like live ones. With ``complete_only``, a last line without its newline
    (another process is still writing it) is left for a later read. Blocking: call it in a
    worker thread.

    Raises:
        OSError: the file cannot be opened or read (e.g. it was deleted).
    """
    seq, offset = start
    lines: list[str] = []
    truncated: dict[int, int] = {}
    size = 0
    eof = False
    with path.open("rb") as handle:
        handle.seek(offset)
        while seq < first_seq:
            skipped = handle.readline()
            if not skipped.endswith(b"\n"):
                # Where the file ends (for now): line `seq` starts at `offset`.
                return LogRead(seq, [], {}, offset, True)
            offset += len(skipped)
            seq += 1
        while len(lines) < max_lines and size < max_bytes:
            raw = handle.readline()
            if not raw or (complete_only and not raw.endswith(b"\n")):
                eof = True
                break
            offset += len(raw)
            text = raw.decode("utf-8", "replace").removesuffix("\n")
            text, cut = bound_line(text, max_line_bytes)
            if cut:
                truncated[first_seq + len(lines)] = cut
            lines.append(text)
            size += len(raw)
            if not raw.endswith(b"\n"):
                eof = True  # the last line of a file that does not end with a newline
                break
    return LogRead(first_seq, lines, truncated, offset, eof)
