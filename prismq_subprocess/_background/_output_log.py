"""Per-run output log files written on one background thread (used by ``OutputCapture``).

The event loop only puts lines on a queue; a single writer thread takes whatever has accumulated,
writes it and flushes once per batch. So a chatty process costs the loop a queue put per line,
never a disk write, and ``tail -f`` on the file sees lines shortly after they arrive.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import re
import threading
from pathlib import Path
from typing import TextIO

__all__ = ["RunLogWriter"]

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_BATCH = 1000


class _Close:
    __slots__ = ("done", "run_id")

    def __init__(self, run_id: str, done: concurrent.futures.Future[None]) -> None:
        self.run_id = run_id
        self.done = done


class _Stop:
    __slots__ = ("done",)

    def __init__(self, done: concurrent.futures.Future[None]) -> None:
        self.done = done


_Item = tuple[str, str] | _Close | _Stop


def _resolve(done: concurrent.futures.Future[None]) -> None:
    # The awaiting side may have been cancelled (which cancels this future); don't fail then.
    if done.set_running_or_notify_cancel():
        done.set_result(None)


class RunLogWriter:
    """Appends each run's lines to ``log_dir/<run_id>.log`` (UTF-8, one line per line).

    Characters of ``run_id`` other than letters, digits, ``-`` and ``_`` become ``_`` in the file
    name, so an id can never point outside ``log_dir``. A write error is logged once for that run
    and its later lines are skipped; other runs are unaffected.
    """

    def __init__(self, log_dir: str | Path) -> None:
        self.log_dir = Path(log_dir)
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopped = False

    def path_for(self, run_id: str) -> Path:
        """Return the log file path of ``run_id``."""
        return self.log_dir / f"{_UNSAFE.sub('_', run_id)}.log"

    def _ensure_thread(self) -> None:
        if self._thread is None:
            # Daemon: a host that never calls aclose() must still be able to exit.
            self._thread = threading.Thread(
                target=self._work, name="prismq-output-log", daemon=True
            )
            self._thread.start()

    def write(self, run_id: str, text: str) -> None:
        """Queue one line (without its newline) for ``run_id``'s file. Never blocks."""
        if self._stopped:
            return
        self._ensure_thread()
        self._queue.put((run_id, text))

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

        Cancellation: the thread still finishes and stops; only the wait is abandoned.
        """
        if self._stopped:
            return
        self._stopped = True
        thread = self._thread
        if thread is None:
            return
        done: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._queue.put(_Stop(done))
        await asyncio.wrap_future(done)
        # The thread returns right after resolving `done`, so this join is short.
        thread.join()

    def _work(self) -> None:
        files: dict[str, TextIO] = {}
        broken: set[str] = set()
        while True:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            touched: set[str] = set()
            stop: _Stop | None = None
            for item in batch:
                if isinstance(item, tuple):
                    run_id, text = item
                    if run_id in broken:
                        continue
                    try:
                        handle = files.get(run_id)
                        if handle is None:
                            handle = self._open(run_id)
                            files[run_id] = handle
                        handle.write(text)
                        handle.write("\n")
                        touched.add(run_id)
                    except OSError:
                        logger.exception("cannot write the output log of run %s", run_id)
                        broken.add(run_id)
                        self._close_file(files, run_id)
                elif isinstance(item, _Close):
                    touched.discard(item.run_id)
                    self._close_file(files, item.run_id)
                    broken.discard(item.run_id)
                    _resolve(item.done)
                else:
                    stop = item
            for run_id in touched:
                try:
                    files[run_id].flush()
                except OSError:
                    logger.exception("cannot flush the output log of run %s", run_id)
            if stop is not None:
                for run_id in list(files):
                    self._close_file(files, run_id)
                _resolve(stop.done)
                return

    def _open(self, run_id: str) -> TextIO:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # errors="replace": a lone surrogate in decoded output must not lose the whole line.
        return self.path_for(run_id).open("a", encoding="utf-8", errors="replace", newline="\n")

    @staticmethod
    def _close_file(files: dict[str, TextIO], run_id: str) -> None:
        handle = files.pop(run_id, None)
        if handle is not None:
            try:
                handle.close()
            except OSError:
                logger.exception("cannot close the output log of run %s", run_id)
