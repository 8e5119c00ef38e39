"""Starting a ``subprocess.Popen`` off the event loop, shared by THREADED and LOCAL."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import subprocess
import threading
from collections.abc import Callable

from .._core._cancel_shield import shielded_if_cancelled
from .._core._run_process import spawn_past_deadline
from .._platform import Containment, PlatformOps, start_afresh_after_fork
from ._base import SpawnRequest

__all__ = ["ExecutorOwner", "discard_popen", "run_off_loop", "spawn_in_executor", "start_popen"]

logger = logging.getLogger(__name__)


Spawned = tuple[subprocess.Popen[bytes], Containment]


def start_popen(request: SpawnRequest, ops: PlatformOps) -> Spawned:
    """``Popen`` for ``request``, contained (cookie, cgroup, ...: see ``ops.prepare_spawn``);
    the child and its containment record. Blocking: call it from a worker thread."""
    kwargs, containment = ops.prepare_spawn(request.kwargs, request.die_with_host)
    # Unbuffered, as below: the only value asyncio (and so our validation) lets through, which
    # must not reach Popen twice.
    kwargs.pop("bufsize", None)
    try:
        popen = subprocess.Popen(
            request.command,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            shell=request.shell,
            bufsize=0,
            **kwargs,
        )
    except BaseException:
        ops.release(containment)
        raise
    ops.adopt(popen.pid, containment)
    return popen, containment


async def spawn_in_executor(
    executor: concurrent.futures.Executor, request: SpawnRequest, ops: PlatformOps
) -> Spawned:
    """Start ``request`` with ``Popen`` in ``executor``.

    Cancellation: a spawn still queued is dropped; one already running finishes, and the worker
    thread then kills the child and its tree at once (:func:`discard_popen`), without the event
    loop's help, so a cancelled spawn leaves nothing behind even if the loop is gone by then.
    As asyncio does for a cancelled creation, the cancellation reaches the caller once the
    child is dead and reaped (cancelled again meanwhile: at once, the worker thread finishing
    the undo on its own). The cancellation ``run_to_completion``'s deadline sends
    (``spawn_past_deadline``) drops a queued spawn too, but lets one already running finish
    and returns it.

    Raises:
        OSError: the spawn failed (``SubprocessStrategy.spawn`` turns it into our error).
    """
    job = executor.submit(start_popen, request, ops)
    spawned = asyncio.wrap_future(job)
    try:
        return await asyncio.shield(spawned)
    except asyncio.CancelledError as exc:
        spawned.add_done_callback(_retrieve)
        if not job.cancel() and spawn_past_deadline(exc):
            # The run's deadline passed, not a cancellation: the child is being started (and
            # may have written); it is the run path's to stop as for any timeout.
            with contextlib.suppress(asyncio.CancelledError, Exception):
                return await asyncio.shield(spawned)
            # Cancelled again meanwhile (or the spawn failed): undone as below.
        if not job.cancelled():
            loop = asyncio.get_running_loop()
            undone: asyncio.Future[None] = loop.create_future()
            undo = functools.partial(_discard_orphan, ops, request, loop, undone)
            job.add_done_callback(functools.partial(_off_thread, threading.get_ident(), undo))
            with shielded_if_cancelled():  # a cancelled anyio scope: still waited for
                await undone
        raise


def _off_thread(
    caller: int,
    undo: Callable[[concurrent.futures.Future[Spawned]], None],
    job: concurrent.futures.Future[Spawned],
) -> None:
    # concurrent.futures runs a callback added to a finished future at once, in the thread that
    # adds it: a spawn whose worker had returned when its caller was cancelled would be undone
    # on the event loop's thread, which the undo (a look at the process table, the kills)
    # blocks for tens of milliseconds, more under load.
    if threading.get_ident() == caller:
        run_off_loop(functools.partial(undo, job), "prismq-undo")
    else:
        undo(job)


def run_off_loop(work: Callable[[], None], name: str) -> None:
    """Run ``work`` in a new thread named ``name`` (not a daemon: an undo that was begun is
    finished even when the interpreter exits), or here when no thread can be started (an
    interpreter shutting down)."""
    try:
        threading.Thread(target=work, name=name).start()
    except RuntimeError:
        work()


def _retrieve(future: asyncio.Future[Spawned]) -> None:
    # Nobody awaits a cancelled spawn: mark its error as seen (the worker reports nothing).
    if not future.cancelled():
        future.exception()


def _discard_orphan(
    ops: PlatformOps,
    request: SpawnRequest,
    loop: asyncio.AbstractEventLoop,
    undone: asyncio.Future[None],
    job: concurrent.futures.Future[Spawned],
) -> None:
    # Runs in the worker thread as the spawn returns (or at once, if it already has).
    if job.cancelled() or job.exception() is not None:
        _tell(loop, undone)
        return
    popen, containment = job.result()

    def reap() -> None:
        try:
            popen.wait()
            # Reported like every other exit: the child stays registered as spawned (and
            # running) otherwise, and the subreaper skips an orphan later given its pid.
            ops.child_exited(popen.pid)
        except Exception:
            logger.exception("reaping the child %d of a cancelled spawn failed", popen.pid)
        finally:
            # Whatever happened: the cancelled caller waits for this, and must not for ever.
            _tell(loop, undone)

    try:
        discard_popen(ops, request, popen, containment)
        threading.Thread(target=reap, name="prismq-reap", daemon=True).start()
    except BaseException:
        _tell(loop, undone)  # (no thread to reap it: can't start one)
        raise


def _tell(loop: asyncio.AbstractEventLoop, undone: asyncio.Future[None]) -> None:
    # RuntimeError: the loop is closed, and nobody waits any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_set_done, undone)


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():  # (its waiter was cancelled again)
        future.set_result(None)


def discard_popen(
    ops: PlatformOps,
    request: SpawnRequest,
    popen: subprocess.Popen[bytes],
    containment: Containment | None,
    *,
    close_pipes: bool = True,
) -> None:
    """Kill a child nobody will supervise, with its tree, synchronously (as asyncio kills a child
    whose creation was cancelled; we also reach what a fast child already started in its
    group). ``close_pipes``: also close our ends (when no other thread is using them). The
    caller reaps it. An error killing the tree is logged: the child itself is killed anyway,
    and the caller (a cancellation in progress, a worker undoing a spawn) goes on."""
    own_group = ops.started_own_group(request.kwargs)
    try:
        ops.kill_now(popen.pid, own_group, containment)
    except Exception:
        logger.exception("killing the tree of the child %d of a cancelled spawn failed", popen.pid)
    with contextlib.suppress(OSError):
        popen.kill()
    if close_pipes:
        for pipe in (popen.stdin, popen.stdout, popen.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


class ExecutorOwner:
    """Lazily creates, and on :meth:`close` shuts down, a strategy's thread pool."""

    def __init__(self, max_workers: int | None, prefix: str) -> None:
        self._max_workers = max_workers
        self._prefix = prefix
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        self._closed = False
        start_afresh_after_fork(self)

    def _forked(self) -> None:
        # A forked child has none of the pool's threads (fork copies only the forking one), and
        # the pool still counts them: work submitted there would wait forever. A new pool is
        # made on next use; the lock may have been held at the fork.
        self._lock = threading.Lock()
        self._pool = None

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
