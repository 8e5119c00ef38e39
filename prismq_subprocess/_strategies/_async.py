"""ASYNC mode: the event loop's own subprocess support."""

from __future__ import annotations

import asyncio

from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._tree_stop import kill_tree_now, register_child
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
        # asyncio kills a child whose creation is cancelled, but not what that child may already
        # have started in its group. So the creation itself is not cancelled: a caller who gives
        # up leaves it to finish (a few loop iterations), and the child's whole tree is then
        # killed at once. Known gap: if the loop ends before the creation finished, asyncio's
        # shutdown cancels it and only asyncio's own kill of the child happens.
        creation = asyncio.ensure_future(self._create(request))
        try:
            return await asyncio.shield(creation)
        except asyncio.CancelledError:
            creation.add_done_callback(self._discard_created)
            raise

    def _discard_created(self, creation: asyncio.Future[ProcessLike]) -> None:
        if creation.cancelled() or creation.exception() is not None:
            return
        process = creation.result()
        kill_tree_now(process, self.ops)
        self.release_pipes(process)

    async def _create(self, request: SpawnRequest) -> ProcessLike:
        kwargs, containment = self.ops.prepare_spawn(request.kwargs, request.die_with_host)
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
            self.ops.release(containment)
            if request.shell:
                raise
            assert isinstance(request.command, tuple)
            raise not_found_error(request.command[0], exc) from exc
        except BaseException:
            self.ops.release(containment)
            raise
        self.ops.adopt(process.pid, containment)
        register_child(process, self.ops.started_own_group(kwargs), containment, self.ops)
        return process
