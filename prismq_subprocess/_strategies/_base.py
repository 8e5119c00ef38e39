"""The interface every strategy implements: start a child, say when it exited, let go of its
pipes. Running a child to its end is not a strategy's job; ``_core/_run_process.py`` does it once
for every mode."""

from __future__ import annotations

import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import IO, Any, ClassVar

from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._result import TailBuffer
from .._core._run_process import ChildRun
from .._core._validation import spawn_error
from .._platform import PlatformOps, platform_ops
from ._process_base import ProcessBase

__all__ = ["SpawnRequest", "SubprocessStrategy"]

Stdio = int | IO[Any] | None

#: asyncio's default StreamReader limit.
DEFAULT_LIMIT = 2**16


@dataclass(frozen=True)
class SpawnRequest:
    """A validated request to start one child.

    ``command`` is the argument tuple (exec) or the command line (``shell=True``); ``kwargs`` are
    the remaining ``Popen`` keyword arguments (``cwd``, ``env``, group options, ...).
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


class SubprocessStrategy(ABC):
    """How one :class:`RunMode` starts and runs children.

    Subclasses implement :meth:`_spawn`, and :meth:`wait_exit`/:meth:`release_pipes` where the
    defaults do not fit their process objects; they may override :meth:`start_run` when their
    mode can capture output more cheaply than through a process object (LOCAL and DRY_RUN do).
    """

    mode: ClassVar[RunMode]

    def __init__(self, *, max_workers: int | None = None, ops: PlatformOps | None = None) -> None:
        self.max_workers = max_workers
        self.ops = ops or platform_ops()

    #: Called with every process this strategy starts (the wrapper tracks them to stop them).
    on_spawn: Callable[[ProcessLike], None] | None = None

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        """Start the child described by ``request`` and return its process object.

        Raises:
            CommandNotFoundError: the program does not exist.
            CommandNotExecutableError / ExecutableFormatError / SpawnFailedError: the system
                refused to start it (no execute permission, a directory, not a program, ...).
            NotImplementedError: this event loop cannot run this mode (ASYNC on a Windows
                selector loop); the wrapper decides whether to fall back.
        """
        try:
            process = await self._spawn(request)
        except OSError as exc:
            raise self.spawn_failed(request, exc) from exc
        self._spawned(process)
        return process

    @staticmethod
    def spawn_failed(request: SpawnRequest, exc: OSError) -> OSError:
        """The exception to raise for ``exc``, an ``OSError`` from starting ``request``."""
        program = (
            request.command if isinstance(request.command, str | bytes) else request.command[0]
        )
        return spawn_error(program, exc, request.kwargs.get("cwd"))

    def _spawned(self, process: ProcessLike) -> None:
        if self.on_spawn is not None:
            self.on_spawn(process)

    @abstractmethod
    async def _spawn(self, request: SpawnRequest) -> ProcessLike:
        """Start the child; subclasses implement this, :meth:`spawn` adds the tracking."""

    async def start_run(
        self,
        request: SpawnRequest,
        *,
        input: bytes | None,
        out: TailBuffer,
        err: TailBuffer,
        grace: float,
    ) -> ChildRun:
        """Start ``request`` the way ``run()`` wants it: stdin is ``input`` (``/dev/null`` when
        ``None``), stdout and stderr are read into ``out``/``err``. Returns the started run, its
        readers going; the run path (``_core/_run_process.py``) takes it from there.

        This default spawns through :meth:`spawn` and reads with tasks; a strategy may override
        it with a cheaper route (LOCAL reads in its worker thread, DRY_RUN fills the buffers from
        its script).

        Cancellation: a spawn cancelled midway kills the child it was starting (and its tree).
        """
        process = await self.spawn(
            replace(
                request,
                stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
        )
        run = ChildRun(process, self, grace=grace, ops=self.ops)
        run.capture(process.stdout, out)
        run.capture(process.stderr, err)
        if input is not None:
            run.feed(process.stdin, input)
        return run

    async def wait_exit(self, process: ProcessLike) -> int:
        """Return the exit status once the child itself has exited, whoever still holds its
        pipes. Our own process objects report the exit as it happens, so this is ``wait()``."""
        return await process.wait()

    def release_pipes(self, process: ProcessLike) -> None:
        """Close our ends of the child's pipes (readers get end of file after what was read).

        Called by the run path once the child has exited or been stopped; a strategy whose pipes
        need closing overrides it.
        """
        if isinstance(process, ProcessBase):
            process._release_pipes()

    def close(self) -> None:  # noqa: B027 - most strategies hold nothing to release
        """Release threads and other resources. Idempotent; processes are the wrapper's concern."""
