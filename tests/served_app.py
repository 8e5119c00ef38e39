"""A web app served for real in a child process (``python -m prismq_subprocess serve ...`` on
127.0.0.1, port 0): its stderr collected by a thread, its address read from uvicorn's log, and
every process it started killed at the end. The example app's tests (``tests/webapp``) and the
doc app's test (``tests/docs``) build on it."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
STARTUP = re.compile(r"Application startup complete")


class ServedApp:
    """``command`` run in ``cwd`` with ``env`` (``PRISMQ_RUN_MODE`` left out, so the app picks
    its own mode); returns once ``workers`` workers have started up."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        cwd: Path,
        env: Mapping[str, str] | None = None,
        workers: int = 1,
    ) -> None:
        self.workers = workers
        base = {k: v for k, v in os.environ.items() if k != "PRISMQ_RUN_MODE"}
        self.proc = subprocess.Popen(
            list(command),
            cwd=cwd,
            env={**base, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        match = RUNNING.search(self.wait_for(RUNNING)[0])
        assert match is not None
        self.url = f"http://127.0.0.1:{match.group(1)}"
        self.wait_for(STARTUP, count=workers)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._queue.put(raw.decode(errors="replace").rstrip("\n"))
        self._queue.put(None)

    def _drain(self, timeout: float) -> bool:
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            return True
        if line is None:
            return False
        self.lines.append(line)
        return True

    def wait_for(self, pattern: re.Pattern[str], count: int = 1, timeout: float = 60) -> list[str]:
        """Wait until ``count`` stderr lines match ``pattern``; return them."""
        deadline = time.monotonic() + timeout
        while sum(1 for line in self.lines if pattern.search(line)) < count:
            assert time.monotonic() < deadline, "\n".join(self.lines)
            assert self._drain(0.2), "server ended:\n" + "\n".join(self.lines)
        return [line for line in self.lines if pattern.search(line)]

    def logged(self, quiet: float = 0.3) -> list[str]:
        """Every stderr line so far, once none has come for ``quiet`` seconds."""
        while True:
            try:
                line = self._queue.get(timeout=quiet)
            except queue.Empty:
                return self.lines
            if line is None:
                return self.lines
            self.lines.append(line)

    def worker_processes(self) -> list[psutil.Process]:
        """The server's worker processes (its children)."""
        return psutil.Process(self.proc.pid).children()

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM the server (uvicorn's graceful shutdown) and wait for it to exit."""
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._reader.join(timeout=10)
        while self._drain(0):
            if self._queue.empty():
                break
        return code

    def close(self) -> None:
        """Clean-up: kill whatever is left of the server, its workers and their children."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
