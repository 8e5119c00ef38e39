"""ASYNC mode: the event loop's own subprocess support."""

from __future__ import annotations

import asyncio
import os

from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._tree_stop import register_group
from .._core._validation import not_found_error
from ._base import SpawnRequest, SubprocessStrategy

__all__ = ["AsyncStrategy"]


class AsyncStrategy(SubprocessStrategy):
    """Spawns with ``asyncio.create_subprocess_exec``/``_shell``; the process object *is*
    ``asyncio.subprocess.Process``.

    On a loop without subprocess support (Windows' ``SelectorEventLoop``) :meth:`spawn` raises
    ``NotImplementedError``, which the wrapper turns into a fallback or a policy error.
    """

    mode = RunMode.ASYNC

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        kwargs = request.kwargs
        try:
            if request.shell:
                process = await asyncio.create_subprocess_shell(
                    request.command,  # type: ignore[arg-type]
                    stdin=request.stdin,
                    stdout=request.stdout,
                    stderr=request.stderr,
                    limit=request.limit,
                    **kwargs,
                )
            else:
                assert isinstance(request.command, tuple)
                program, *args = request.command
                process = await asyncio.create_subprocess_exec(
                    program,
                    *args,
                    stdin=request.stdin,
                    stdout=request.stdout,
                    stderr=request.stderr,
                    limit=request.limit,
                    **kwargs,
                )
        except FileNotFoundError as exc:
            if request.shell:
                raise
            assert isinstance(request.command, tuple)
            raise not_found_error(request.command[0], exc) from exc
        register_group(process, self.ops.started_own_group(kwargs))
        return process

    async def _wait_exit(self, process: ProcessLike) -> None:
        # asyncio's wait() (3.11) returns only once every pipe is closed, so a grandchild holding
        # stdout would keep run() waiting after the child itself exited. Watch the exit directly:
        # a pidfd on Linux, else poll the returncode the child watcher sets at exit.
        if process.returncode is not None:
            return
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(process.wait())
        exited: asyncio.Future[None] = loop.create_future()
        fd = _pidfd(process.pid)
        if fd >= 0:
            try:
                loop.add_reader(fd, _set_done, exited)
            except (NotImplementedError, RuntimeError):
                os.close(fd)
                fd = -1
        try:
            delay = 0.005
            while process.returncode is None and not waiter.done() and not exited.done():
                await asyncio.wait(
                    (waiter, exited),
                    timeout=None if fd >= 0 else delay,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                delay = min(delay * 2, 0.1)
        finally:
            if fd >= 0:
                loop.remove_reader(fd)
                os.close(fd)
            if not waiter.done():
                waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)


def _pidfd(pid: int) -> int:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return -1
    try:
        return int(pidfd_open(pid))
    except OSError:
        return -1


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
