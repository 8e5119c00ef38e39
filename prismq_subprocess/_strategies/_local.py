"""LOCAL mode: ``subprocess.run`` semantics without freezing the event loop.

The child runs to completion in a worker thread; its output becomes readable when it has exited.
Trade-offs (see docs/RUN_MODES.md): no real-time output; input written to ``stdin`` is delivered
when stdin is closed (or ``communicate``/``wait`` is called), not as it is written; at most
``max_workers`` LOCAL children make progress at once. Cancellation and timeouts still stop the
child's tree from the loop, which ends the worker's blocking call.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable

from .._core._exceptions import ProcessTimeoutError
from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._result import ProcessResult, TailBuffer
from .._core._tree_stop import register_group
from .._core._validation import not_found_error
from .._io._blocking_io import Leftovers, drain_blocking
from .._platform import PlatformOps
from ._base import DEFAULT_LIMIT, RunOptions, SpawnRequest, SubprocessStrategy
from ._popen import ExecutorOwner, spawn_in_executor, start_popen
from ._process_base import PopenProcess
from ._stdin_buffer import BufferedStdin

__all__ = ["LocalProcess", "LocalStrategy"]


class _DeferredReader:
    """A ``StreamReader`` look-alike whose data appears once the child has finished."""

    def __init__(self, process: LocalProcess, sink: TailBuffer, limit: int) -> None:
        self._process = process
        self._sink = sink
        self._inner = asyncio.StreamReader(limit=limit)
        self._filled = False

    async def _ready(self) -> asyncio.StreamReader:
        if not self._filled:
            await self._process._finished()
            if not self._filled:
                self._filled = True
                self._inner.feed_data(self._sink.getvalue())
                self._inner.feed_eof()
        return self._inner

    async def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all when ``n`` is -1), waiting for the child to finish first."""
        return await (await self._ready()).read(n)

    async def readline(self) -> bytes:
        """Read one line, as ``StreamReader.readline``."""
        return await (await self._ready()).readline()

    async def readexactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes, as ``StreamReader.readexactly``."""
        return await (await self._ready()).readexactly(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Read up to and including ``separator``, as ``StreamReader.readuntil``."""
        return await (await self._ready()).readuntil(separator)

    def at_eof(self) -> bool:
        """True once the child finished and every byte was read."""
        return self._filled and self._inner.at_eof()

    def exception(self) -> BaseException | None:
        """Always ``None``: a LOCAL stream does not fail on its own."""
        return None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


class LocalProcess(PopenProcess):
    """An ``asyncio.subprocess.Process`` look-alike whose child runs to completion in a worker
    thread; see the module docstring for the trade-offs."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        popen: subprocess.Popen[bytes],
        pool: ExecutorOwner,
        *,
        limit: int = DEFAULT_LIMIT,
        max_output_bytes: int | None = None,
        job: asyncio.Future[int] | None = None,
        buffers: tuple[TailBuffer | None, TailBuffer | None] | None = None,
    ) -> None:
        super().__init__(loop, popen)
        self._pool = pool
        self._job: asyncio.Future[int] | None = None
        if buffers is None:
            buffers = (
                TailBuffer(max_output_bytes) if popen.stdout is not None else None,
                TailBuffer(max_output_bytes) if popen.stderr is not None else None,
            )
        self._out, self._err = buffers
        if popen.stdin is not None and job is None:
            self.stdin = BufferedStdin(self._start)
        if self._out is not None:
            self.stdout = _DeferredReader(self, self._out, limit)
        if self._err is not None:
            self.stderr = _DeferredReader(self, self._err, limit)
        if job is not None:
            self._adopt(job)
        elif popen.stdin is None:
            self._start(None)

    def _start(self, input: bytes | None) -> None:
        if self._job is not None:
            return
        # A thread of its own, not the pool: a child that runs for hours must not hold a worker
        # the next spawn needs (the pool would run dry and spawning would wait forever).
        job: asyncio.Future[int] = self._loop.create_future()
        self._adopt(job)
        threading.Thread(
            target=self._complete_in_thread,
            args=(input, job),
            name=f"prismq-local-{self.pid}",
            daemon=True,
        ).start()

    def _complete_in_thread(self, input: bytes | None, job: asyncio.Future[int]) -> None:
        try:
            returncode = self._complete(input)
        except BaseException as exc:
            _call_soon(self._loop, functools.partial(_settle, job, None, exc))
        else:
            _call_soon(self._loop, functools.partial(_settle, job, returncode, None))

    def _adopt(self, job: asyncio.Future[int]) -> None:
        self._job = job
        job.add_done_callback(self._job_done)

    def _complete(self, input: bytes | None) -> int:
        # The raw process keeps asyncio's semantics: descendants holding the pipes are waited
        # for, not stopped (run() stops them; see _Launch).
        drain_blocking(self._popen, input, self._out, self._err)
        return self._popen.wait()

    def _job_done(self, job: asyncio.Future[int]) -> None:
        if not job.cancelled() and job.exception() is None:
            self._set_returncode(job.result())

    def _on_wait(self) -> None:
        if self._job is None:
            # Waiting with stdin still open: give the child what was written so far and EOF.
            self.stdin.close()

    async def _finished(self) -> None:
        self._on_wait()
        assert self._job is not None
        await asyncio.shield(self._job)

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        """Hand ``input`` to the child, let it run to completion, return ``(stdout, stderr)``."""
        if self.stdin is not None and self._job is None:
            if input:
                self.stdin.write(input)
            self.stdin.close()
        return await super().communicate(None)

    async def _feed_stdin(self, input: bytes | None) -> None:
        self.stdin.close()


class LocalStrategy(SubprocessStrategy):
    """Blocking ``subprocess.run`` semantics in a pool of ``max_workers`` threads."""

    mode = RunMode.LOCAL

    def __init__(self, *, max_workers: int | None = None, ops: PlatformOps | None = None) -> None:
        super().__init__(max_workers=max_workers, ops=ops)
        self._pool = ExecutorOwner(max_workers, "prismq-local")

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        return await self._start(request, None)

    async def _start(self, request: SpawnRequest, max_output_bytes: int | None) -> LocalProcess:
        popen = await spawn_in_executor(self._pool.get(), request, self.ops)
        own_group = self.ops.started_own_group(request.kwargs)
        process = LocalProcess(
            asyncio.get_running_loop(),
            popen,
            self._pool,
            limit=request.limit,
            max_output_bytes=max_output_bytes,
        )
        register_group(process, own_group)
        return process

    async def run(self, request: SpawnRequest, options: RunOptions) -> ProcessResult:
        """Spawn, drain and reap in one worker job (as ``subprocess.run`` does in its thread),
        keeping at most ``max_output_bytes`` per stream; timeout and cancellation stop the tree
        from the loop."""
        request = SpawnRequest(
            command=request.command,
            shell=request.shell,
            stdin=subprocess.PIPE if options.input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            limit=request.limit,
            kwargs=request.kwargs,
        )
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        own_group = self.ops.started_own_group(request.kwargs)
        launch = _Launch(loop, self, request, options, own_group)
        job = launch.job = loop.run_in_executor(self._pool.get(), launch.run)
        scope = asyncio.timeout(options.timeout)
        try:
            async with scope:
                await asyncio.shield(job)
        except FileNotFoundError as exc:
            if request.shell or not isinstance(request.command, tuple):
                raise
            raise not_found_error(request.command[0], exc) from exc
        except TimeoutError:
            process = await launch.abort()
            if process is not None:
                await self._stop(process, options.grace)
            if not scope.expired():
                raise  # a TimeoutError from elsewhere: the tree is stopped all the same
            raise ProcessTimeoutError(
                cmd=request.display,
                timeout=options.timeout or 0.0,
                returncode=None if process is None else process.returncode,
                stdout=launch.out.getvalue(),
                stderr=launch.err.getvalue(),
            ) from None
        except BaseException:
            process = await launch.abort()
            if process is not None:
                await self._stop(process, options.grace)
            raise
        out, err = launch.out, launch.err
        popen = launch.popen
        assert popen is not None
        return ProcessResult(
            args=request.display,
            returncode=job.result(),
            stdout=out.getvalue(),
            stderr=err.getvalue(),
            pid=popen.pid,
            duration=time.perf_counter() - started,
            mode=self.mode,
            stdout_truncated=out.truncated,
            stderr_truncated=err.truncated,
            stdout_total_bytes=out.total,
            stderr_total_bytes=err.total,
        )

    async def _stop(self, process: LocalProcess, grace: float) -> None:
        await self._abort(process, [], grace)

    def close(self) -> None:
        """Shut the worker pool down (waits for running children to finish). Idempotent."""
        self._pool.close()


class _Launch:
    """One ``run()`` in one worker job: spawn, drain, reap.

    The loop learns the child exists through one ``call_soon_threadsafe`` (it then tracks a
    :class:`LocalProcess` for shutdown and stop); a stop requested before the spawn finished is
    honoured by the worker as soon as the child exists.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        strategy: LocalStrategy,
        request: SpawnRequest,
        options: RunOptions,
        own_group: bool,
    ) -> None:
        self._loop = loop
        self._strategy = strategy
        self._request = request
        self._options = options
        self._own_group = own_group
        self.out = TailBuffer(options.max_output_bytes)
        self.err = TailBuffer(options.max_output_bytes)
        self.popen: subprocess.Popen[bytes] | None = None
        self.process: LocalProcess | None = None
        self.job: asyncio.Future[int] | None = None
        self._lock = threading.Lock()
        self._aborted = False

    def run(self) -> int:
        """The worker's part (blocking)."""
        popen = start_popen(self._request)
        with self._lock:
            self.popen = popen
            aborted = self._aborted
        ops = self._strategy.ops
        if aborted:
            ops.kill_now(popen.pid, self._own_group)
            popen.kill()
        else:
            _call_soon(self._loop, self._on_spawned)
        leftovers = (
            Leftovers(functools.partial(_stop_leftovers, ops, popen.pid), self._options.grace)
            if self._own_group
            else None
        )
        drain_blocking(popen, self._options.input, self.out, self.err, leftovers)
        return popen.wait()

    def _on_spawned(self) -> None:
        with self._lock:
            if self._aborted:
                return
        self._strategy._spawned(self.adopt())

    async def abort(self) -> LocalProcess | None:
        """Stop the run: before the spawn, make the worker kill the child at once; after it,
        return a process object the caller stops gracefully (tree stop)."""
        with self._lock:
            self._aborted = True
            popen = self.popen
        if popen is None:
            return None
        return self.adopt()

    def adopt(self) -> LocalProcess:
        """A :class:`LocalProcess` view of the running child (for tracking and stopping)."""
        if self.process is None:
            popen = self.popen
            assert popen is not None and self.job is not None
            self.process = LocalProcess(
                self._loop,
                popen,
                self._strategy._pool,
                job=self.job,
                buffers=(self.out, self.err),
            )
            register_group(self.process, self._own_group)
        return self.process


def _settle(job: asyncio.Future[int], result: int | None, exc: BaseException | None) -> None:
    if job.done():
        return
    if exc is not None:
        job.set_exception(exc)
    else:
        assert result is not None
        job.set_result(result)


def _stop_leftovers(ops: PlatformOps, pid: int, force: bool) -> None:
    if force:
        ops.kill_tree(pid, True, [])
    else:
        ops.signal_group(pid, ops.stop_signal(True))


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback)
