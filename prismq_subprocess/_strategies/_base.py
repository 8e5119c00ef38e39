"""The interface every strategy implements, and the mode-neutral ``run()`` built on it."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import IO, Any

from .._core._exceptions import ProcessTimeoutError
from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._result import ProcessResult, TailBuffer
from .._core._tree_stop import stop_process_tree
from .._platform import PlatformOps, platform_ops

__all__ = ["RunOptions", "SpawnRequest", "SubprocessStrategy"]

Stdio = int | IO[Any] | None

#: asyncio's default StreamReader limit.
DEFAULT_LIMIT = 2**16
_RUN_CHUNK = 256 * 1024


@dataclass(frozen=True)
class SpawnRequest:
    """A validated request to start one child, as :meth:`SubprocessStrategy.spawn` receives it.

    ``command`` is the argument tuple (exec) or the command line (``shell=True``); ``stdin``,
    ``stdout``, ``stderr`` are ``PIPE``/``DEVNULL``/``STDOUT``/a file/``None`` as in asyncio;
    ``limit`` is the ``StreamReader`` buffer limit; ``kwargs`` are the remaining ``Popen``
    keyword arguments (``cwd``, ``env``, process-group options, ...), already checked; ``added``
    names the ``kwargs`` keys the wrapper added itself rather than the caller.
    """

    command: tuple[str | bytes, ...] | str | bytes
    shell: bool
    stdin: Stdio = None
    stdout: Stdio = None
    stderr: Stdio = None
    limit: int = DEFAULT_LIMIT
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: The ``kwargs`` keys the wrapper added itself (process-group options), not the caller.
    added: frozenset[str] = frozenset()

    @property
    def display(self) -> tuple[str, ...] | str:
        """The command as text, for results, logs and errors."""
        if isinstance(self.command, str):
            return self.command
        if isinstance(self.command, bytes):
            return self.command.decode(errors="replace")
        return tuple(
            p.decode(errors="replace") if isinstance(p, bytes) else p for p in self.command
        )


@dataclass(frozen=True)
class RunOptions:
    """How :meth:`SubprocessStrategy.run` treats one command: ``input`` for stdin, ``timeout``
    in seconds, ``grace`` before the kill when stopping, ``max_output_bytes`` kept per stream."""

    input: bytes | None = None
    timeout: float | None = None
    grace: float = 5.0
    max_output_bytes: int | None = None


class SubprocessStrategy(ABC):
    """How one mode starts and runs children; ``SubprocessWrapper(strategy=...)`` takes one.

    A subclass implements :meth:`spawn` (start a child, return an object satisfying
    ``ProcessLike``) and sets :attr:`mode`; everything else (``run()``, ``stream()``, tree stop,
    tracking) is built on ``spawn``. It may override :meth:`run` when its mode can run a
    command to completion more cheaply than through a process object (LOCAL and DRY_RUN do),
    and :meth:`close` when it holds threads or other resources.

    :attr:`mode` names the strategy's mode: a :class:`RunMode` for the built-in strategies (and
    for one that wraps a built-in strategy and behaves as it does), any other non-empty string
    for a new kind of strategy (e.g. ``"recording"``). Since ``RunMode`` is a ``StrEnum``, every
    mode is a ``str``: ``str(wrapper.mode)`` and ``Run.mode`` give its name either way.
    """

    #: This strategy's mode (see the class docstring); subclasses set it.
    mode: RunMode | str

    def __init__(self, *, max_workers: int | None = None, ops: PlatformOps | None = None) -> None:
        self.max_workers = max_workers
        self.ops = ops or platform_ops()

    #: Called with every process this strategy starts (the wrapper tracks them to stop them).
    on_spawn: Callable[[ProcessLike], None] | None = None

    async def _spawn_tracked(self, request: SpawnRequest) -> ProcessLike:
        """:meth:`spawn` plus the tracking: what the wrapper and :meth:`run` call."""
        process = await self.spawn(request)
        self._spawned(process)
        return process

    def _spawned(self, process: ProcessLike) -> None:
        if self.on_spawn is not None:
            self.on_spawn(process)

    @abstractmethod
    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        """Start the child described by ``request`` and return its process object (anything
        satisfying ``ProcessLike``, e.g. an ``asyncio.subprocess.Process``). The wrapper tracks
        and stops what this returns; a strategy that delegates to another calls its ``spawn``.

        Raises:
            CommandNotFoundError: the program does not exist.
            NotImplementedError: this event loop cannot run this mode (ASYNC on a Windows
                selector loop); the wrapper decides whether to fall back.
        """

    async def run(self, request: SpawnRequest, options: RunOptions) -> ProcessResult:
        """Run ``request`` to completion, keeping at most ``options.max_output_bytes`` per stream.

        Timeout: the tree is stopped and :class:`ProcessTimeoutError` carries the output so far.
        Cancellation: the tree is stopped (bounded by ``options.grace``) before ``CancelledError``
        propagates.
        """
        request = replace(
            request,
            stdin=subprocess.PIPE if options.input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        started = time.perf_counter()
        process = await self._spawn_tracked(request)
        out = TailBuffer(options.max_output_bytes)
        err = TailBuffer(options.max_output_bytes)
        loop = asyncio.get_running_loop()
        pumps = [
            loop.create_task(_pump(process.stdout, out)),
            loop.create_task(_pump(process.stderr, err)),
        ]
        if options.input is not None:
            pumps.append(loop.create_task(_feed(process.stdin, options.input)))
        scope = asyncio.timeout(options.timeout)
        try:
            async with scope:
                await self._wait_exit(process)
                await self._finish_pumps(process, pumps, options.grace)
                await process.wait()
        except TimeoutError:
            await self._abort(process, pumps, options.grace)
            if not scope.expired():
                raise  # a TimeoutError from elsewhere: the tree is stopped all the same
            raise ProcessTimeoutError(
                cmd=request.display,
                timeout=options.timeout or 0.0,
                returncode=process.returncode,
                stdout=out.getvalue(),
                stderr=err.getvalue(),
            ) from None
        except BaseException:
            await self._abort(process, pumps, options.grace)
            raise
        assert process.returncode is not None
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

    async def _wait_exit(self, process: ProcessLike) -> None:
        """Return once the child has exited (even if its pipes are still held open)."""
        await process.wait()

    async def _finish_pumps(
        self, process: ProcessLike, pumps: list[asyncio.Task[None]], grace: float
    ) -> None:
        """After the child exited: let the readers reach end of file.

        A descendant still holding the pipes open would keep them waiting forever, so the
        leftover group is stopped first (``KillMode=control-group`` semantics).
        """
        if all(p.done() for p in pumps):
            for p in pumps:
                p.result()
            return
        done, pending = await asyncio.wait(pumps, timeout=0.05)
        if pending:
            await stop_process_tree(process, grace=grace, ops=self.ops)
            done, pending = await asyncio.wait(pumps, timeout=grace + 1.0)
            for p in pending:  # a descendant that escaped us still holds the pipe
                p.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        for p in done:
            p.result()

    async def _abort(
        self, process: ProcessLike, pumps: list[asyncio.Task[None]], grace: float
    ) -> None:
        """Stop the tree and the readers; keep whatever the readers already captured."""
        stopper = asyncio.ensure_future(stop_process_tree(process, grace=grace, ops=self.ops))
        try:
            await asyncio.shield(stopper)
        except asyncio.CancelledError:
            # Cancelled again while stopping: finish the stop anyway, then give in.
            with contextlib.suppress(BaseException):
                await stopper
            raise
        finally:
            _, pending = await asyncio.wait(pumps, timeout=0.5) if pumps else (set(), set())
            for p in pending:
                p.cancel()
            await asyncio.gather(*pumps, return_exceptions=True)

    def close(self) -> None:  # noqa: B027 - most strategies hold nothing to release
        """Release threads and other resources. Idempotent; processes are the wrapper's concern."""


async def _pump(stream: Any, buffer: TailBuffer) -> None:
    read = stream.read
    while True:
        chunk = await read(_RUN_CHUNK)
        if not chunk:
            return
        buffer.append(chunk)


async def _feed(stdin: Any, data: bytes) -> None:
    try:
        stdin.write(data)
        await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child does not want more input; as communicate() does, ignore it
    finally:
        stdin.close()
