"""The interface every strategy implements: start a child, say when it exited, let go of its
pipes. Running a child to its end is not a strategy's job; ``_core/_run_process.py`` does it once
for every mode."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO, Any, cast

from .._core._exceptions import StrategyContractError
from .._core._exit_wait import wait_exited
from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._result import TailBuffer
from .._core._run_process import ChildRun
from .._core._tree_stop import kill_tree_now
from .._core._validation import check_limit, preexec_failed, spawn_error
from .._io._pipes import release_transport_pipes
from .._platform import PlatformOps, platform_ops
from ._process_base import ProcessBase

__all__ = ["RunStart", "SpawnRequest", "SubprocessStrategy"]

Stdio = int | IO[Any] | None

#: asyncio's default StreamReader limit.
DEFAULT_LIMIT = 2**16

#: Process objects that satisfy ``ProcessLike`` by construction: not inspected member by member.
_KNOWN_PROCESSES = (ProcessBase, asyncio.subprocess.Process)
#: The members of ``ProcessLike`` that are called.
_PROCESS_METHODS = ("wait", "communicate", "send_signal", "terminate", "kill")
_PROCESS_ATTRIBUTES = ("returncode", "stdin", "stdout", "stderr")


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
    #: Make the child die with this process where the platform can (``die_with_host``).
    die_with_host: bool = False

    def with_run_pipes(self, stdin: Stdio) -> SpawnRequest:
        """This request with ``stdin`` and with stdout and stderr piped: what ``run()`` starts.

        The constructor called directly, at half the cost of ``dataclasses.replace`` (per run);
        test_with_run_pipes_matches_replace keeps it in step with the fields. A subclass (which
        may add fields) goes through ``replace``.
        """
        if type(self) is not SpawnRequest:
            return dataclasses.replace(
                self, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
            )
        return SpawnRequest(
            self.command,
            self.shell,
            stdin,
            subprocess.PIPE,
            subprocess.PIPE,
            self.limit,
            self.kwargs,
            self.added,
            self.die_with_host,
        )

    @property
    def display(self) -> tuple[str, ...] | str:
        """The command as text, for results, logs and errors: the arguments as a tuple of
        ``str`` (exec), or the command line as one ``str`` (``shell=True``); bytes decoded."""
        if isinstance(self.command, str):
            return self.command
        if isinstance(self.command, bytes):
            return self.command.decode(errors="replace")
        return tuple(
            p.decode(errors="replace") if isinstance(p, bytes) else p for p in self.command
        )


@dataclass(frozen=True, slots=True)
class RunStart:
    """One ``run()`` start as a strategy's :meth:`SubprocessStrategy._begin_run` receives it:
    ``request`` with its pipes set (stdin ``PIPE`` when ``input`` is given, else ``DEVNULL``;
    stdout and stderr ``PIPE``), the buffers the output goes to, and the run's stop grace."""

    request: SpawnRequest
    input: bytes | None
    out: TailBuffer
    err: TailBuffer
    grace: float


class SubprocessStrategy(ABC):
    """How one mode starts and runs children; ``SubprocessWrapper(strategy=...)`` takes one.

    A subclass implements :meth:`spawn` (start a child, return an object satisfying
    ``ProcessLike``) and sets :attr:`mode`; everything else (``run()``, ``stream()``, tree stop,
    tracking, the drain rule) is built on ``spawn`` and written once for every mode. Two more
    hooks answer what only the strategy knows about the process objects it returns; their
    defaults fit ``asyncio.subprocess.Process`` and the built-in process objects, so most
    strategies (and every one that delegates to a built-in strategy's ``spawn``) keep them:

    - :meth:`wait_exit`: the exit status once the child itself has exited, even while something
      it started still holds its pipes open;
    - :meth:`release_pipes`: let go of the child's pipes (readers keep what was written, then
      get end of file) when something outside its tree still holds them.

    It may override :meth:`close` when it holds threads or other resources.

    :attr:`mode` names the strategy's mode: a :class:`RunMode` for the built-in strategies (and
    for one that wraps a built-in strategy and behaves as it does), any other non-empty string
    for a new kind of strategy (e.g. ``"recording"``). Since ``RunMode`` is a ``StrEnum``, every
    mode is a ``str``: ``str(wrapper.mode)`` and ``Run.mode`` give its name either way.
    """

    #: This strategy's mode (see the class docstring); subclasses set it.
    mode: RunMode | str

    def __init__(self, *, max_workers: int | None = None, ops: PlatformOps | None = None) -> None:
        """``max_workers``: the size of the strategy's thread pool, if it has one (``None``: the
        pool's default); ``ops``: platform hooks (tests inject them).

        Raises:
            InvalidLimitError: ``max_workers`` is not an int >= 1 (here, not at the first spawn).
        """
        if max_workers is not None:
            check_limit(max_workers, "max_workers", minimum=1)
        self.max_workers = max_workers
        self.ops = ops or platform_ops()

    #: Called with every process this strategy starts (the wrapper tracks them to stop them).
    on_spawn: Callable[[ProcessLike], None] | None = None

    async def _spawn_tracked(self, request: SpawnRequest) -> ProcessLike:
        """:meth:`spawn` plus the tracking and our spawn errors: what the wrapper and the run
        path call (an untracked child would be missed when the wrapper closes).

        Raises:
            CommandNotFoundError: the program does not exist.
            CommandNotExecutableError / ExecutableFormatError / SpawnFailedError: the system
                refused to start it (no execute permission, a directory, not a program, ...).
            NotImplementedError: this event loop cannot run this mode (ASYNC on a Windows
                selector loop); the wrapper decides whether to fall back.
            StrategyContractError: :meth:`spawn` returned something that is not a process
                object.
        """
        try:
            process = await self.spawn(request)
        except OSError as exc:
            raise self.spawn_failed(request, exc) from exc
        except subprocess.SubprocessError as exc:
            if preexec_failed(exc):
                raise self.spawn_failed(request, exc) from exc
            raise
        if not isinstance(process, _KNOWN_PROCESSES):
            self._check_spawned(process)
        self._spawned(process)
        return process

    def _check_spawned(self, process: object) -> None:
        """Refuse what a strategy written elsewhere returned from :meth:`spawn` unless it is a
        process object: the run path, the tree stop and the wrapper's tracking would otherwise
        fail later on a missing member (or block the loop on a ``Popen``'s pipes), leaving the
        child running.

        Raises:
            StrategyContractError: ``process`` is not a process object (the child it stands
                for is killed first, as far as it can be).
        """
        where = f"{type(self).__name__}.spawn()"
        if isinstance(process, subprocess.Popen):
            # A real child of ours, in its own group: kill its tree, reap it (it dies at once).
            with contextlib.suppress(Exception):
                # The tree kill reads only pid, returncode and kill(), which a Popen has.
                kill_tree_now(cast(ProcessLike, process), self.ops)
            with contextlib.suppress(Exception):
                process.wait(timeout=1.0)
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            raise StrategyContractError(
                f"{where} returned a subprocess.Popen, whose wait() and pipes block; return an "
                "asyncio process (asyncio.create_subprocess_exec) or delegate to a built-in "
                "strategy (ThreadedStrategy bridges Popen to asyncio); the child was killed"
            )
        pid = getattr(process, "pid", None)
        missing = [] if isinstance(pid, int) and not isinstance(pid, bool) else ["pid"]
        missing += [name for name in _PROCESS_ATTRIBUTES if not hasattr(process, name)]
        missing += [name for name in _PROCESS_METHODS if not callable(getattr(process, name, None))]
        if not missing:
            return
        # Only its own kill(): a pid we cannot vouch for may name a stranger's process.
        kill = getattr(process, "kill", None)
        if callable(kill):
            with contextlib.suppress(Exception):
                kill()
        raise StrategyContractError(
            f"{where} returned {process!r}, which is not a process object (ProcessLike, "
            f"e.g. an asyncio.subprocess.Process): it lacks {', '.join(missing)}"
        )

    @staticmethod
    def spawn_failed(request: SpawnRequest, exc: OSError | subprocess.SubprocessError) -> OSError:
        """The exception to raise for ``exc``, an ``OSError`` (or the ``SubprocessError`` of a
        failed ``preexec_fn``) from starting ``request``."""
        program = (
            request.command if isinstance(request.command, str | bytes) else request.command[0]
        )
        return spawn_error(program, exc, request.kwargs.get("cwd"))

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

    async def _start_run(
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

        The pipes are set here for every mode; how the child is then started is
        :meth:`_begin_run`, the one a strategy overrides (it is private because
        :class:`ChildRun` is).

        Cancellation: a spawn cancelled midway kills the child it was starting (and its tree).
        """
        piped = request.with_run_pipes(subprocess.PIPE if input is not None else subprocess.DEVNULL)
        return await self._begin_run(RunStart(piped, input, out, err, grace))

    async def _begin_run(self, start: RunStart) -> ChildRun:
        """Start ``start.request`` (its pipes already set) for :meth:`_start_run`.

        This default spawns through :meth:`spawn` and reads with tasks. Built-in strategies
        override it with a cheaper route (LOCAL reads in its worker thread, DRY_RUN fills the
        buffers from its script).

        Cancellation: as :meth:`_start_run`.
        """
        process = await self._spawn_tracked(start.request)
        run = ChildRun(process, self, grace=start.grace, ops=self.ops)
        run.capture(process.stdout, start.out)
        run.capture(process.stderr, start.err)
        if start.input is not None:
            run.feed(process.stdin, start.input)
        return run

    async def wait_exit(self, process: ProcessLike) -> int:
        """Return the exit status once the child itself has exited, whoever still holds its
        pipes (``run()`` and ``stream()`` wait here, then apply the drain rule to the pipes).

        The default fits the process objects this package makes (they report the exit as it
        happens: their ``wait()``) and ``asyncio.subprocess.Process``, whose ``wait()`` (3.11)
        also waits for every pipe to close: for any other object its ``returncode`` is watched
        (a pidfd where there is one, else polling). Override it only for a process object whose
        ``returncode`` is not set at the exit.

        Cancellation: only the waiting stops.
        """
        if not isinstance(process, ProcessBase):
            await wait_exited(process)
            # Our own process objects report their exit to the platform layer themselves.
            self.ops.child_exited(process.pid)
        returncode = process.returncode
        return returncode if returncode is not None else await process.wait()

    def release_pipes(self, process: ProcessLike) -> None:
        """Close our ends of the child's pipes: what they hold now goes to the readers, then end
        of file, and the descriptors are freed.

        Called by the run path once the child has exited or been stopped and its pipes are
        still open after the drain time (a process outside its tree holds them). The default
        handles the built-in process objects and ``asyncio.subprocess.Process``; a strategy
        whose process objects hold pipes some other way overrides it. Must not block.
        """
        if isinstance(process, ProcessBase):
            process._release_pipes()
        else:
            release_transport_pipes(process)

    def close(self) -> None:  # noqa: B027 - most strategies hold nothing to release
        """Release threads and other resources. Idempotent; processes are the wrapper's concern."""
