"""ASYNC mode: the event loop's own subprocess support."""

from __future__ import annotations

import asyncio

from .._core._exit_wait import wait_exited
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
        # stdout would keep run() waiting after the child itself exited.
        await wait_exited(process)
