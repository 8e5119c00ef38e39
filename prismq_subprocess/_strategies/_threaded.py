"""THREADED mode: ``subprocess.Popen`` from a thread pool, pipes bridged into asyncio streams."""

from __future__ import annotations

import asyncio
import subprocess
from typing import Any, ClassVar

from .._child_exit import watch_exit
from .._lifecycle import register_group
from .._modes import RunMode
from .._pipes import PipeReaderThread, ThreadedStdinWriter
from .._platform import PlatformOps
from .._process import ProcessLike
from .._process_base import ProcessBase
from ._base import SpawnRequest, SubprocessStrategy
from ._popen import ExecutorOwner, spawn_in_executor

__all__ = ["ThreadedProcess", "ThreadedStrategy"]


class ThreadedProcess(ProcessBase):
    """An ``asyncio.subprocess.Process`` look-alike over a ``Popen`` driven by threads.

    ``stdout``/``stderr`` are real ``asyncio.StreamReader`` objects fed by one thread per pipe
    (with flow control: a slow reader pauses the thread); ``stdin`` is a
    :class:`~prismq_subprocess._pipes.ThreadedStdinWriter`.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        popen: subprocess.Popen[bytes],
        *,
        limit: int,
        use_pidfd: bool,
    ) -> None:
        super().__init__(loop, popen.pid)
        self._popen = popen
        self._readers: list[PipeReaderThread] = []
        if popen.stdin is not None:
            self.stdin = ThreadedStdinWriter(loop, popen.stdin, name=f"prismq-stdin-{popen.pid}")
        if popen.stdout is not None:
            self.stdout = self._reader(popen.stdout, limit, "stdout")
        if popen.stderr is not None:
            self.stderr = self._reader(popen.stderr, limit, "stderr")
        watch_exit(loop, popen, self._set_returncode, use_pidfd=use_pidfd)

    def _reader(self, pipe: Any, limit: int, label: str) -> asyncio.StreamReader:
        reader = PipeReaderThread(self._loop, pipe, limit=limit, name=f"prismq-{label}-{self.pid}")
        self._readers.append(reader)
        return reader.reader

    def _send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)

    def terminate(self) -> None:
        """Ask the child to stop (``Popen.terminate``: SIGTERM, ``TerminateProcess`` on Windows)."""
        if self._returncode is not None:
            raise ProcessLookupError(f"process {self.pid} has already exited")
        self._popen.terminate()

    def kill(self) -> None:
        """Kill the child (``Popen.kill``: SIGKILL, ``TerminateProcess`` on Windows)."""
        if self._returncode is not None:
            raise ProcessLookupError(f"process {self.pid} has already exited")
        self._popen.kill()


class ThreadedStrategy(SubprocessStrategy):
    """Runs ``Popen`` in a thread pool of ``max_workers`` threads; works on any event loop.

    Threads: the pool (at most ``max_workers``, busy only while spawning) plus, per live child,
    one reader per piped output stream, one writer while stdin has queued data, and on platforms
    without pidfd (Windows, macOS) one waiter. ``use_pidfd=False`` forces the waiter thread (the
    Windows/macOS route) on Linux too.
    """

    mode: ClassVar[RunMode] = RunMode.THREADED

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        ops: PlatformOps | None = None,
        use_pidfd: bool = True,
    ) -> None:
        super().__init__(max_workers=max_workers, ops=ops)
        self._use_pidfd = use_pidfd
        self._pool = ExecutorOwner(max_workers, "prismq-spawn")

    async def _spawn(self, request: SpawnRequest) -> ProcessLike:
        popen = await spawn_in_executor(self._pool.get(), request, self.ops)
        loop = asyncio.get_running_loop()
        process = ThreadedProcess(loop, popen, limit=request.limit, use_pidfd=self._use_pidfd)
        register_group(process, self.ops.started_own_group(request.kwargs))
        return process

    def close(self) -> None:
        """Shut the spawn pool down (waits for spawns in progress). Idempotent."""
        self._pool.close()
