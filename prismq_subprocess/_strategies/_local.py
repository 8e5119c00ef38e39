"""LOCAL mode: ``subprocess.run`` semantics without freezing the event loop.

The child runs to completion in a worker thread; its output becomes readable when it has exited.
Trade-offs (see docs/RUN_MODES.md): no real-time output; input written to ``stdin`` is delivered
when stdin is closed (or ``communicate``/``wait`` is called), not as it is written; at most
``max_workers`` LOCAL children make progress at once. Cancellation and timeouts still stop the
child's tree from the loop, which ends the worker's blocking call.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any, ClassVar

from .._blocking_io import Leftovers, drain_blocking
from .._exceptions import ProcessTimeoutError
from .._lifecycle import register_group
from .._modes import RunMode
from .._platform import PlatformOps
from .._process import ProcessLike
from .._process_base import ProcessBase
from .._result import ProcessResult, TailBuffer
from ._base import DEFAULT_LIMIT, RunOptions, SpawnRequest, SubprocessStrategy
from ._popen import ExecutorOwner, spawn_in_executor

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


class _BufferedStdin:
    """A ``StreamWriter`` look-alike that collects input and hands it over when closed."""

    def __init__(self, process: LocalProcess) -> None:
        self._process = process
        self._chunks: list[bytes] = []
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data``; it reaches the child when stdin is closed."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TypeError(
                f"data argument must be a bytes-like object, not {type(data).__name__!r}"
            )
        if not self._closing:
            self._chunks.append(bytes(data))

    def writelines(self, data: Any) -> None:
        """Queue every item of ``data``."""
        for chunk in data:
            self.write(chunk)

    def can_write_eof(self) -> bool:
        """Always True."""
        return True

    def write_eof(self) -> None:
        """Same as :meth:`close`."""
        self.close()

    def is_closing(self) -> bool:
        """True once closed."""
        return self._closing

    def close(self) -> None:
        """Hand the queued input to the child and start it running to completion."""
        if not self._closing:
            self._closing = True
            self._process._start(b"".join(self._chunks))

    async def wait_closed(self) -> None:
        """Return at once: closing hands the input over synchronously."""

    async def drain(self) -> None:
        """Return at once (input is buffered until stdin is closed)."""
        await asyncio.sleep(0)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """Always ``default``."""
        return default


class LocalProcess(ProcessBase):
    """An ``asyncio.subprocess.Process`` look-alike whose child runs to completion in a worker
    thread; see the module docstring for the trade-offs."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        popen: subprocess.Popen[bytes],
        pool: ExecutorOwner,
        *,
        ops: PlatformOps,
        own_group: bool,
        limit: int = DEFAULT_LIMIT,
        max_output_bytes: int | None = None,
        grace: float = 5.0,
    ) -> None:
        super().__init__(loop, popen.pid)
        self._popen = popen
        self._pool = pool
        self._ops = ops
        self._own_group = own_group
        self._leftovers = Leftovers(self._stop_leftovers, grace) if own_group else None
        self._job: asyncio.Future[int] | None = None
        self._out = TailBuffer(max_output_bytes) if popen.stdout is not None else None
        self._err = TailBuffer(max_output_bytes) if popen.stderr is not None else None
        if popen.stdin is not None:
            self.stdin = _BufferedStdin(self)
        if self._out is not None:
            self.stdout = _DeferredReader(self, self._out, limit)
        if self._err is not None:
            self.stderr = _DeferredReader(self, self._err, limit)
        if popen.stdin is None:
            self._start(None)

    def _start(self, input: bytes | None) -> None:
        if self._job is not None:
            return
        self._job = self._loop.run_in_executor(self._pool.get(), self._complete, input)
        self._job.add_done_callback(self._job_done)

    def _complete(self, input: bytes | None) -> int:
        drain_blocking(self._popen, input, self._out, self._err, self._leftovers)
        return self._popen.wait()

    def _stop_leftovers(self, force: bool) -> None:
        # Runs in the worker thread once the child exited but its group still holds the pipes.
        pid = self._popen.pid
        if force:
            self._ops.kill_tree(pid, self._own_group, [])
        elif self._own_group:
            self._ops.signal_group(pid, self._ops.stop_signal(True))

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

    def _send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)

    def terminate(self) -> None:
        """Ask the child to stop (``Popen.terminate``)."""
        if self._returncode is not None:
            raise ProcessLookupError(f"process {self.pid} has already exited")
        self._popen.terminate()

    def kill(self) -> None:
        """Kill the child (``Popen.kill``)."""
        if self._returncode is not None:
            raise ProcessLookupError(f"process {self.pid} has already exited")
        self._popen.kill()


class LocalStrategy(SubprocessStrategy):
    """Blocking ``subprocess.run`` semantics in a pool of ``max_workers`` threads."""

    mode: ClassVar[RunMode] = RunMode.LOCAL

    def __init__(self, *, max_workers: int | None = None, ops: PlatformOps | None = None) -> None:
        super().__init__(max_workers=max_workers, ops=ops)
        self._pool = ExecutorOwner(max_workers, "prismq-local")

    async def _spawn(self, request: SpawnRequest) -> ProcessLike:
        return await self._start(request, None)

    async def _start(
        self, request: SpawnRequest, max_output_bytes: int | None, grace: float = 5.0
    ) -> LocalProcess:
        popen = await spawn_in_executor(self._pool.get(), request, self.ops)
        own_group = self.ops.started_own_group(request.kwargs)
        process = LocalProcess(
            asyncio.get_running_loop(),
            popen,
            self._pool,
            ops=self.ops,
            own_group=own_group,
            limit=request.limit,
            max_output_bytes=max_output_bytes,
            grace=grace,
        )
        register_group(process, own_group)
        return process

    async def run(self, request: SpawnRequest, options: RunOptions) -> ProcessResult:
        """Run to completion in one worker thread, keeping at most ``max_output_bytes`` per
        stream; timeout and cancellation stop the tree from the loop."""
        request = SpawnRequest(
            command=request.command,
            shell=request.shell,
            stdin=subprocess.PIPE if options.input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            limit=request.limit,
            kwargs=request.kwargs,
        )
        started = time.perf_counter()
        process = await self._start(request, options.max_output_bytes, options.grace)
        self._spawned(process)
        if process.stdin is not None:
            process.stdin.write(options.input)
            process.stdin.close()
        scope = asyncio.timeout(options.timeout)
        try:
            async with scope:
                await process.wait()
        except TimeoutError:
            if not scope.expired():
                raise
            await self._stop(process, options.grace)
            raise ProcessTimeoutError(
                cmd=request.display,
                timeout=options.timeout or 0.0,
                returncode=process.returncode,
                stdout=_value(process._out),
                stderr=_value(process._err),
            ) from None
        except BaseException:
            await self._stop(process, options.grace)
            raise
        out, err = process._out, process._err
        assert process.returncode is not None and out is not None and err is not None
        return ProcessResult(
            args=request.display,
            returncode=process.returncode,
            stdout=out.getvalue(),
            stderr=err.getvalue(),
            pid=process.pid,
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


def _value(buffer: TailBuffer | None) -> bytes:
    return buffer.getvalue() if buffer is not None else b""
