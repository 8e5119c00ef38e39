"""ASYNC mode: the event loop's own subprocess support."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import ClassVar

from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._tree_stop import kill_tree_now, register_group
from .._io._pipes import read_available
from ._base import SpawnRequest, SubprocessStrategy

__all__ = ["AsyncStrategy"]


class AsyncStrategy(SubprocessStrategy):
    """Spawns with ``asyncio.create_subprocess_exec``/``_shell``; the process object *is*
    ``asyncio.subprocess.Process``.

    On a loop without subprocess support (Windows' ``SelectorEventLoop``) :meth:`spawn` raises
    ``NotImplementedError``, which the wrapper turns into a fallback or a policy error.
    """

    mode: ClassVar[RunMode] = RunMode.ASYNC

    async def _spawn(self, request: SpawnRequest) -> ProcessLike:
        # asyncio kills a child whose creation is cancelled, but not what that child may already
        # have started in its group. So the creation runs in a task of its own that our caller's
        # cancellation does not reach: when the caller gives up, we wait for the creation (a few
        # loop iterations, as asyncio's own clean-up waits for the child) and kill the whole tree.
        creation = asyncio.ensure_future(self._create(request))
        try:
            return await asyncio.shield(creation)
        except asyncio.CancelledError:
            process = await _abandon(creation)
            if process is not None:
                kill_tree_now(process, self.ops)
                self.release_pipes(process)
            raise

    async def _create(self, request: SpawnRequest) -> ProcessLike:
        kwargs = request.kwargs
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
        register_group(process, self.ops.started_own_group(kwargs))
        return process

    async def wait_exit(self, process: ProcessLike) -> int:
        """Return the exit status as soon as the child has exited.

        asyncio's ``wait()`` (3.11) returns only once every pipe is closed, so a grandchild
        holding stdout would keep us waiting after the child itself exited. The status asyncio's
        child watcher records at exit is what we wait for: woken by a pidfd on Linux, else by
        polling (5 ms, doubling to 100 ms).
        """
        if process.returncode is not None:
            return process.returncode
        loop = asyncio.get_running_loop()
        waiter = asyncio.ensure_future(process.wait())
        exited: asyncio.Future[None] = loop.create_future()
        fd = _pidfd(process.pid)
        watching = False
        if fd >= 0:
            try:
                loop.add_reader(fd, _exited, loop, fd, exited)
                watching = True
            except (NotImplementedError, RuntimeError):
                pass
        try:
            delay = 0.005
            while process.returncode is None and not waiter.done():
                if watching and not exited.done():
                    await asyncio.wait((waiter, exited), return_when=asyncio.FIRST_COMPLETED)
                    delay = 0.001  # exited: the watcher reports the status within moments
                else:
                    await asyncio.wait((waiter,), timeout=delay)
                    delay = min(delay * 2, 0.1)
        finally:
            if watching:
                loop.remove_reader(fd)
            if fd >= 0:
                os.close(fd)
            if not waiter.done():
                waiter.cancel()
            await asyncio.gather(waiter, return_exceptions=True)
        returncode = process.returncode
        return returncode if returncode is not None else waiter.result()

    def release_pipes(self, process: ProcessLike) -> None:
        """Close the pipe transports of an asyncio process: what the pipes hold now goes to the
        readers (past their flow-control limit, so nothing already written is lost), then end of
        file; the descriptors are freed and asyncio then closes the process transport."""
        transport = getattr(process, "_transport", None)
        if transport is None:
            return
        for fd, reader in ((0, None), (1, process.stdout), (2, process.stderr)):
            pipe = None
            with contextlib.suppress(AttributeError):  # a pipe not connected (yet) is None
                pipe = transport.get_pipe_transport(fd)
            if pipe is None or pipe.is_closing():
                continue
            if reader is not None:
                source = pipe.get_extra_info("pipe")
                if source is not None:
                    for data in read_available(source.fileno())[0]:
                        reader.feed_data(data)
            pipe.close()


async def _abandon(creation: asyncio.Task[ProcessLike]) -> ProcessLike | None:
    """Wait for a creation our caller gave up on and return the child (``None`` if there is
    none to undo).

    When the creation itself was cancelled (``asyncio.run()`` shutting down cancels every task)
    or we are cancelled again meanwhile, the child cannot be had: asyncio's clean-up of a
    cancelled creation kills it, then waits for pipes a shutting-down loop never connects, so
    the creation is cancelled again until it gives up (or that shutdown would wait forever).
    """
    try:
        if not creation.cancelling():
            await asyncio.shield(creation)
            return creation.result()
    except asyncio.CancelledError:
        pass
    except Exception:
        return None
    for _ in range(100):
        if creation.done():
            break
        creation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
    if creation.done() and not creation.cancelled():
        creation.exception()  # seen: nobody else will look
    return None


def _pidfd(pid: int) -> int:
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return -1
    try:
        return int(pidfd_open(pid))
    except OSError:
        return -1


def _exited(loop: asyncio.AbstractEventLoop, fd: int, future: asyncio.Future[None]) -> None:
    loop.remove_reader(fd)  # a pidfd stays readable: once is enough
    if not future.done():
        future.set_result(None)
