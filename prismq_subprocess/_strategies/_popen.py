"""Starting a ``subprocess.Popen`` off the event loop, shared by THREADED and LOCAL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import subprocess
import threading

from .._core._validation import not_found_error
from .._platform import PlatformOps
from ._base import SpawnRequest

__all__ = ["ExecutorOwner", "spawn_in_executor", "start_popen"]


def start_popen(request: SpawnRequest) -> subprocess.Popen[bytes]:
    """``Popen`` for ``request`` (blocking: call it from a worker thread)."""
    return subprocess.Popen(
        request.command,
        stdin=request.stdin,
        stdout=request.stdout,
        stderr=request.stderr,
        shell=request.shell,
        bufsize=0,
        **request.kwargs,
    )


async def spawn_in_executor(
    executor: concurrent.futures.Executor, request: SpawnRequest, ops: PlatformOps
) -> subprocess.Popen[bytes]:
    """Start ``request`` with ``Popen`` in ``executor``.

    If the caller is cancelled while the worker is spawning, the child it starts is killed
    and reaped, so a cancelled spawn never leaves a process behind.

    Raises:
        CommandNotFoundError: the program does not exist.
    """
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(executor, start_popen, request)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(functools.partial(_discard_orphan, ops, request))
        raise
    except FileNotFoundError as exc:
        if request.shell or isinstance(request.command, str | bytes):
            raise
        raise not_found_error(request.command[0], exc) from exc


def _discard_orphan(
    ops: PlatformOps, request: SpawnRequest, future: asyncio.Future[subprocess.Popen[bytes]]
) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    popen = future.result()
    own_group = ops.started_own_group(request.kwargs)
    ops.kill_now(popen.pid, own_group)
    with contextlib.suppress(OSError):
        popen.kill()
    for pipe in (popen.stdin, popen.stdout, popen.stderr):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()
    threading.Thread(target=popen.wait, name="prismq-reap", daemon=True).start()


class ExecutorOwner:
    """Lazily creates, and on :meth:`close` shuts down, a strategy's thread pool."""

    def __init__(self, max_workers: int | None, prefix: str) -> None:
        self._max_workers = max_workers
        self._prefix = prefix
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False

    def get(self) -> concurrent.futures.ThreadPoolExecutor:
        """The pool, created on first use.

        Raises:
            RuntimeError: after :meth:`close`.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError("this strategy has been closed")
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=self._max_workers, thread_name_prefix=self._prefix
                )
            return self._pool

    def close(self) -> None:
        """Shut the pool down, waiting for work in progress. Idempotent."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
