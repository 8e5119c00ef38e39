"""ASYNC mode: the event loop's own subprocess support."""

from __future__ import annotations

import asyncio
import contextlib

from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._tree_stop import kill_tree_now, register_child
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
        except BaseException:
            self.ops.release(containment)
            raise
        self.ops.adopt(process.pid, containment)
        register_child(process, self.ops.started_own_group(kwargs), containment, self.ops)
        return process


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

