"""`SubprocessWrapper`: the facade host applications hold on to."""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import IO, Any, TypeVar, Unpack, cast, overload

from .._platform import PlatformOps, platform_ops, start_afresh_after_fork
from .._platform._child_watcher import reap_orphaned
from .._strategies import STRATEGIES, SubprocessStrategy
from .._strategies._base import DEFAULT_LIMIT, SpawnRequest
from ._cancel_shield import shielded_if_cancelled
from ._closing import AsyncClosing
from ._detect import ENV_VAR, ModeDecision, ModeSource, resolve_run_mode
from ._event_loop import running_asyncio_loop
from ._exceptions import (
    InvalidArgumentTypeError,
    InvalidCommandError,
    InvalidRunModeError,
    SubprocessPolicyException,
    WrapperClosedError,
)
from ._exit_wait import reap_closed_loop_child
from ._host_shutdown import take_part_in_host_shutdown
from ._line_stream import LineStream
from ._modes import RunMode
from ._offloop import run_in_thread
from ._options import (
    CommandArg,
    EnvMapping,
    ExecOptions,
    PopenOptions,
    ShellOptions,
    SpawnOptions,
)
from ._override import active_override, warn_if_bypassed
from ._process import ProcessLike, StreamReaderLike
from ._result import DEFAULT_MAX_OUTPUT_BYTES, ProcessResult, TailBuffer
from ._run_process import ChildRun, run_to_completion
from ._tree_stop import (
    DEFAULT_GRACE_PERIOD,
    kill_tree_now,
    kill_trees_now,
    may_have_left_running,
    stop_process_trees,
)
from ._validation import (
    check_encoding,
    check_exec_command,
    check_flag,
    check_limit,
    check_popen_kwargs,
    check_shell_command,
    check_stdio,
    check_timeout,
)

__all__ = ["SubprocessWrapper"]

logger = logging.getLogger(__name__)
#: aclose() lets go of this many children's pipes per loop iteration.
_RELEASE_CHUNK = 64

T = TypeVar("T")


class _Default(enum.Enum):
    """A ``run()`` argument left out: the wrapper's own setting applies."""

    WRAPPERS = "the wrapper's"

    def __repr__(self) -> str:
        return "<the wrapper's>"


_PROACTOR_HELP = (
    "make the loop a Proactor loop before it starts: prismq_subprocess.subprocess_loop_factory()"
    " with asyncio.run(..., loop_factory=...) / asyncio.Runner, or "
    "prismq_subprocess.install_subprocess_policy() on Python 3.11-3.13"
)


def _policy_help(source: ModeSource) -> str:
    """What to do about a pinned ASYNC on a loop that cannot spawn: undo the pin where it was
    made (the environment variable is not fixed by an argument the code may not even pass)."""
    if source is ModeSource.ENVIRONMENT:
        return (
            f"set {ENV_VAR}=threaded (THREADED works on any event loop) or unset it (auto-"
            f"detection then falls back to THREADED by itself), or {_PROACTOR_HELP}"
        )
    return f"use mode=RunMode.THREADED (works on any event loop), or {_PROACTOR_HELP}"


class SubprocessWrapper(AsyncClosing):
    """Runs commands in one :class:`RunMode`, chosen by the caller or detected.

    ``mode`` is a :class:`RunMode`, its name as text, or ``None`` to auto-detect
    (``PRISMQ_RUN_MODE``, platform, event loop; see :func:`detect_run_mode`; an active
    :func:`~prismq_subprocess.testing.override_strategy` comes first). Alternatively pass
    ``strategy=``, a ready strategy instance: a built-in one configured by hand (e.g.
    ``prismq_subprocess.testing.DryRunStrategy(recorder=...)``) or your own
    ``prismq_subprocess.abc.SubprocessStrategy``; :attr:`mode` is then the strategy's ``mode``
    (passing the instance as ``mode`` also works). An auto-detected ASYNC that meets a loop
    unable to spawn (Windows' ``SelectorEventLoop``) logs one warning and uses THREADED from then
    on; a pinned mode raises :class:`SubprocessPolicyException` instead.

    Children start in their own process group/session (``new_process_group=True``) so the whole
    tree can be stopped; pass ``new_process_group=False`` (or ``start_new_session=``/
    ``process_group=`` per call) to opt out. Each child is also contained by the strongest means
    the host has (a cookie in its environment always; a cgroup v2 sub-group and the child
    subreaper on Linux where allowed; see :func:`containment_report`), so even a double-forked
    daemon is stopped with it.

    ``die_with_host=True`` makes children die when this process dies, where the platform can
    (Linux: ``PR_SET_PDEATHSIG`` for the direct child, set by a ``preexec_fn``, which makes each
    spawn slower; see docs/LIFECYCLE.md).

    ``async with SubprocessWrapper() as w:`` stops (tree stop, ``grace_period`` then kill) every
    child it started that is still running when the block exits, and releases its threads.

    Raises:
        InvalidRunModeError: ``mode`` or ``PRISMQ_RUN_MODE`` names no mode; both ``mode`` and
            ``strategy`` given; ``strategy`` is not a ``SubprocessStrategy`` or its ``mode`` is
            neither a :class:`RunMode` nor a non-empty string.
        InvalidCommandError: the strategy already belongs to another wrapper.
        InvalidTimeoutError: ``grace_period`` is negative.
    """

    def __init__(
        self,
        mode: RunMode | str | SubprocessStrategy | None = None,
        *,
        strategy: SubprocessStrategy | None = None,
        max_workers: int | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        new_process_group: bool = True,
        max_output_bytes: int | None = DEFAULT_MAX_OUTPUT_BYTES,
        ops: PlatformOps | None = None,
        die_with_host: bool = False,
    ) -> None:
        if ops is not None and not isinstance(ops, PlatformOps):
            raise InvalidArgumentTypeError(
                f"ops must be a PlatformOps (e.g. from platform_ops()), got {type(ops).__name__}"
            )
        self._ops = ops or platform_ops()
        if strategy is not None and mode is not None:
            raise InvalidRunModeError("pass mode or strategy, not both")
        self._die_with_host = check_flag(die_with_host, "die_with_host")
        check_flag(new_process_group, "new_process_group")
        if isinstance(mode, SubprocessStrategy):
            mode, strategy = None, mode
        override = active_override() if mode is None and strategy is None else None
        if override is not None:
            strategy = override.make_strategy(max_workers, self._ops)
        if strategy is not None:
            if not isinstance(strategy, SubprocessStrategy):
                raise InvalidRunModeError(
                    f"strategy must be a SubprocessStrategy instance, got {strategy!r}"
                )
            if strategy.on_spawn is not None:
                # Its children would be tracked (and stopped on close) by one wrapper only.
                raise InvalidCommandError(
                    f"this {type(strategy).__name__} already belongs to another "
                    "SubprocessWrapper; create one strategy per wrapper"
                )
            self._decision = _strategy_decision(strategy)
            if override is not None:
                self._decision = override.decision(self._decision.mode)
            self._strategy = strategy
        else:
            self._decision = resolve_run_mode(mode)
            self._strategy = self._make_strategy(RunMode(self._decision.mode), max_workers)
        self._max_workers = max_workers
        self._grace = check_timeout(grace_period, "grace_period", finite=True) or 0.0
        self._new_group = new_process_group
        if max_output_bytes is not None:
            check_limit(max_output_bytes, "max_output_bytes", minimum=0)
        if max_workers is not None:
            check_limit(max_workers, "max_workers", minimum=1)
        self._max_output = max_output_bytes
        self._live: set[ProcessLike] = set()
        self._prune_at = 64
        self._closed = False
        # Calls into a strategy still under way, so closing can wait for what is starting;
        # _settled is made by aclose() and resolved when the last of them returns.
        self._starting = 0
        self._settled: asyncio.Future[None] | None = None
        self._retired: list[SubprocessStrategy] = []
        self._strategy.on_spawn = self._track
        take_part_in_host_shutdown(self)
        start_afresh_after_fork(self)

    def _forked(self) -> None:
        # In a forked child (a wrapper made before gunicorn --preload forks its workers, a
        # "fork" multiprocessing pool): the children listed are the parent's. Closing the
        # wrapper here, or a host shutdown here, must not kill them.
        self._live = set()
        self._prune_at = 64
        self._starting = 0
        self._settled = None

    def __repr__(self) -> str:
        return f"<SubprocessWrapper mode={self.mode} ({self.mode_reason})>"

    # -- mode --------------------------------------------------------------------------------
    @property
    def mode(self) -> RunMode | str:
        """The mode in use now (THREADED after a fallback): a :class:`RunMode`, or the name a
        custom strategy gives its mode."""
        return self._strategy.mode

    @property
    def mode_reason(self) -> str:
        """Why :attr:`mode` is in use, for logs and ``doctor`` output."""
        return self._decision.reason

    @property
    def decision(self) -> ModeDecision:
        """The full decision: mode, reason, and whether the caller pinned it."""
        return self._decision

    @property
    def strategy(self) -> SubprocessStrategy:
        """The strategy object doing the work (e.g. a DRY_RUN strategy's ``recorder``)."""
        return self._strategy

    def _make_strategy(self, mode: RunMode, max_workers: int | None) -> SubprocessStrategy:
        return STRATEGIES[mode](max_workers=max_workers, ops=self._ops)

    def _fall_back(self, exc: NotImplementedError) -> None:
        loop = type(asyncio.get_running_loop()).__name__
        reason = (
            f"auto-detected ASYNC but {loop} cannot spawn subprocesses "
            f"({str(exc) or type(exc).__name__}); using THREADED"
        )
        logger.warning("prismq_subprocess: %s", reason)
        self._retired.append(self._strategy)
        self._strategy = self._make_strategy(RunMode.THREADED, self._max_workers)
        self._strategy.on_spawn = self._track
        self._decision = ModeDecision(RunMode.THREADED, reason, self._decision.source)

    def _policy_error(self, exc: NotImplementedError) -> SubprocessPolicyException:
        loop = type(asyncio.get_running_loop()).__name__
        return SubprocessPolicyException(
            f"mode {str(self.mode)!r} was pinned ({self._decision.reason}) but the running event "
            f"loop {loop} cannot spawn subprocesses; {_policy_help(self._decision.source)}"
        )

    # -- tracking ----------------------------------------------------------------------------
    def _track(self, process: ProcessLike) -> None:
        self._live.add(process)
        if len(self._live) >= self._prune_at:
            self._live = {p for p in self._live if p.returncode is None}
            self._prune_at = max(64, 2 * len(self._live))

    @property
    def live_processes(self) -> list[ProcessLike]:
        """Children this wrapper started that have not been seen to exit."""
        return [p for p in self._live if p.returncode is None]

    # -- host shutdown (see _host_shutdown.py) -------------------------------------------------
    def _host_claims(self) -> list[ProcessLike]:
        return []  # a module runner claims the children it records

    async def _host_stop(self, reason: str, claimed: frozenset[int]) -> None:
        live = [p for p in self.live_processes if id(p) not in claimed]
        if live:
            await stop_process_trees(live, grace=self._grace, ops=self._ops)

    def _host_kill(self) -> None:
        kill_trees_now(self.live_processes, self._ops)

    def _check_open(self) -> None:
        if self._closed:
            raise WrapperClosedError("this SubprocessWrapper has been closed; create a new one")

    # -- requests ----------------------------------------------------------------------------
    def _request(
        self,
        command: tuple[str | bytes, ...] | str | bytes,
        shell: bool,
        stdin: Any,
        stdout: Any,
        stderr: Any,
        limit: int,
        kwargs: dict[str, Any],
    ) -> SpawnRequest:
        check_popen_kwargs(kwargs, shell=shell)
        kwargs.pop("shell", None)
        check_limit(limit, "limit", minimum=1)
        check_stdio("stdin", stdin)
        check_stdio("stdout", stdout)
        check_stdio("stderr", stderr)
        grouped = self._ops.group_kwargs(kwargs, self._new_group)
        return SpawnRequest(
            command=command,
            shell=shell,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            limit=limit,
            kwargs=grouped,
            added=frozenset(grouped.keys() - kwargs.keys()),
            die_with_host=self._die_with_host,
        )

    async def _enter(self, call: Callable[[SubprocessStrategy], Awaitable[T]]) -> T:
        """Every way into a strategy: refuse a closed wrapper; fall back from an auto-detected
        ASYNC whose loop cannot spawn (a pinned one raises instead); let :meth:`aclose` know a
        start is under way. The caller checks :attr:`_closed` again once it returns."""
        self._check_open()
        running_asyncio_loop()
        self._starting += 1
        strategy = self._strategy
        try:
            try:
                return await call(strategy)
            except NotImplementedError as exc:
                # Judge by the strategy that raised: a concurrent spawn may have fallen back
                # meanwhile, and this one must then go the same way, not raise the bare error.
                if strategy.mode is not RunMode.ASYNC:
                    raise
                if self._decision.pinned:
                    raise self._policy_error(exc) from exc
                if self._strategy is strategy:
                    self._fall_back(exc)
                self._check_open()
                return await call(self._strategy)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._closed and task is not None and not task.cancelling():
                # Nobody cancelled this task: closing dropped a spawn still queued for the
                # strategy's spawn pool (nothing started). A bare CancelledError would pass for
                # a cancellation of the caller (a TaskGroup would end its siblings).
                raise WrapperClosedError(
                    "the SubprocessWrapper was closed while this process started"
                ) from None
            raise
        finally:
            self._starting -= 1
            settled = self._settled
            if not self._starting and settled is not None and not settled.done():
                settled.set_result(None)

    async def _spawn(self, request: SpawnRequest) -> ProcessLike:
        self._check_open()
        # Its caller's caller is the user's create_subprocess_exec/_shell call.
        warn_if_bypassed(self._decision.source, stacklevel=3)
        process = await self._enter(lambda strategy: strategy._spawn_tracked(request))
        if self._closed:
            # The wrapper was closed while this spawn was under way: nobody would supervise it.
            kill_tree_now(process, self._ops)
            raise WrapperClosedError("the SubprocessWrapper was closed while this process started")
        return process

    async def _open(self, request: SpawnRequest, grace: float) -> ChildRun:
        """Spawn ``request`` as a run the run path takes to its end (``stream()``)."""
        process = await self._spawn(request)
        return ChildRun(process, self._strategy, grace=grace, ops=self._ops)

    async def _start_run(
        self,
        request: SpawnRequest,
        input: bytes | None,
        grace: float,
        out: TailBuffer,
        err: TailBuffer,
    ) -> ChildRun:
        run = await self._enter(
            lambda strategy: strategy._start_run(
                request, input=input, out=out, err=err, grace=grace
            )
        )
        if self._closed:
            run.discard()
            raise WrapperClosedError("the SubprocessWrapper was closed while this process started")
        return run

    # -- the asyncio-shaped API -------------------------------------------------------------
    async def create_subprocess_exec(
        self,
        program: CommandArg,
        *args: CommandArg,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        limit: int = DEFAULT_LIMIT,
        **kwds: Unpack[ExecOptions],
    ) -> ProcessLike:
        """Start ``program`` with ``args``, exactly like ``asyncio.create_subprocess_exec``.

        Returns a process object with the ``asyncio.subprocess.Process`` API. Cancelling the
        returned process's ``wait()``/``communicate()`` does not stop the child (asyncio's
        semantics); use :meth:`run` or :func:`terminate_gracefully` for that.

        Raises:
            InvalidCommandError: empty program, NUL byte, text mode or ``shell=True`` asked for.
            InvalidArgumentTypeError: an argument is not str, bytes or os.PathLike.
            CommandNotFoundError: the program does not exist (a ``FileNotFoundError``).
            CwdNotFoundError / CwdNotADirectoryError: bad ``cwd``.
            InvalidEnvironmentError: ``env`` holds non-string keys or values.
            InvalidOptionError: an unknown keyword argument, or a ``Popen`` option ``Popen``
                would reject (``pass_fds``, ``umask``, ...); UnknownUserError: ``user=``/
                ``group=`` names no account. Checked before anything starts, in every mode.
            CommandNotExecutableError / ExecutableFormatError / SpawnFailedError: the system
                refused to start the program (nothing was left running).
            SubprocessPolicyException: a pinned mode cannot spawn on this event loop.
            WrapperClosedError: the wrapper was closed.
        """
        command = check_exec_command(program, args)
        request = self._request(command, False, stdin, stdout, stderr, limit, _options(kwds))
        return await self._spawn(request)

    async def create_subprocess_shell(
        self,
        cmd: str | bytes,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = None,
        stderr: int | IO[Any] | None = None,
        limit: int = DEFAULT_LIMIT,
        **kwds: Unpack[ShellOptions],
    ) -> ProcessLike:
        """Run ``cmd`` through the shell, exactly like ``asyncio.create_subprocess_shell``.

        Raises: as :meth:`create_subprocess_exec` (an empty command is an
        :class:`InvalidCommandError`).
        """
        command = check_shell_command(cmd)
        request = self._request(command, True, stdin, stdout, stderr, limit, _options(kwds))
        return await self._spawn(request)

    async def create_subprocess(
        self,
        *cmd: CommandArg,
        cwd: CommandArg | None = None,
        env: EnvMapping | None = None,
        stdin: int | IO[Any] | None = None,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
        **kwds: Unpack[PopenOptions],
    ) -> tuple[ProcessLike, StreamReaderLike | None, StreamReaderLike | None]:
        """Start ``cmd`` with stdout and stderr piped; return ``(process, stdout, stderr)``.

        The streams support ``readline()``, ``read()`` and ``async for line in stream``; see also
        :func:`iter_lines` for fast line streaming. Raises as :meth:`create_subprocess_exec`.
        """
        if not cmd:
            raise InvalidCommandError("create_subprocess() needs a command")
        process = await self.create_subprocess_exec(
            *cmd, cwd=cwd, env=env, stdin=stdin, stdout=stdout, stderr=stderr, **kwds
        )
        return process, process.stdout, process.stderr

    # -- the high-level API -----------------------------------------------------------------
    async def run(
        self,
        *cmd: CommandArg,
        input: bytes | bytearray | memoryview | None = None,
        timeout: float | None = None,
        check: bool = False,
        cwd: CommandArg | None = None,
        env: EnvMapping | None = None,
        shell: bool = False,
        max_output_bytes: int | _Default | None = _Default.WRAPPERS,
        grace_period: float | None = None,
        **kwds: Unpack[PopenOptions],
    ) -> ProcessResult:
        """Run a command to completion and return a :class:`ProcessResult`.

        ``cmd`` is the program and its arguments, or one command line with ``shell=True``.
        stdin is ``input`` (or ``/dev/null`` when ``input`` is None: a background command never
        waits on the host's terminal). Output is captured, keeping the last ``max_output_bytes``
        per stream (default: the wrapper's; ``None``: everything).

        After the child exits, members of its process group that are still running are stopped:
        those holding its pipes once the drain time is over (they cannot keep ``run()``
        waiting), the others once its output has ended (a helper it left in the background).

        Timeout (``timeout`` seconds; ``None``, the default, is no limit, and ``0`` times out at
        once, as with ``asyncio.wait_for``): the tree is stopped (SIGTERM, ``grace_period``,
        SIGKILL) and :class:`ProcessTimeoutError` (a ``TimeoutError``) is raised with the output
        so far.
        Cancellation: the tree is stopped the same way before ``CancelledError`` propagates.

        Raises:
            ProcessFailedError: ``check=True`` and the exit status is not 0.
            ProcessTimeoutError: the timeout expired.
            InvalidTimeoutError: negative ``timeout`` or ``grace_period``.
            and everything :meth:`create_subprocess_exec` raises for bad input.
        """
        limit = check_timeout(timeout)
        grace = (
            self._grace
            if grace_period is None
            else check_timeout(grace_period, "grace_period", finite=True)
        )
        check_flag(check, "check")
        check_flag(shell, "shell")
        if input is not None and not isinstance(input, bytes | bytearray | memoryview):
            hint = " (encode it: input=text.encode())" if isinstance(input, str) else ""
            raise InvalidCommandError(f"input must be bytes, not {type(input).__name__}{hint}")
        # (``...`` was the documented placeholder before the sentinel: still the default.)
        given: object = max_output_bytes
        cap = self._max_output
        if given is not _Default.WRAPPERS and given is not ...:
            if given is not None:
                check_limit(given, "max_output_bytes", minimum=0)
            cap = given  # type: ignore[assignment]  # (an int >= 0, checked just above)
        options = _options(kwds)
        _reject_stdio(options, "run")
        if cwd is not None:
            options["cwd"] = cwd
        if env is not None:
            options["env"] = env
        if shell:
            if len(cmd) != 1:
                raise InvalidCommandError("shell=True takes exactly one command line")
            command: tuple[str | bytes, ...] | str | bytes = check_shell_command(cmd[0])
        else:
            if not cmd:
                raise InvalidCommandError("run() needs a command")
            command = check_exec_command(cmd[0], cmd[1:])
        request = self._request(command, shell, None, None, None, DEFAULT_LIMIT, options)
        self._check_open()
        warn_if_bypassed(self._decision.source, stacklevel=2)
        result = await run_to_completion(
            functools.partial(
                self._start_run, request, bytes(input) if input is not None else None, grace or 0.0
            ),
            display=request.display,
            timeout=limit,
            max_output_bytes=cap,
        )
        if check:
            result.check_returncode()
        return result

    @overload
    def stream(
        self,
        *cmd: CommandArg,
        encoding: None = None,
        timeout: float | None = ...,
        merge_stderr: bool = ...,
        cwd: CommandArg | None = ...,
        env: EnvMapping | None = ...,
        grace_period: float | None = ...,
        max_stderr_bytes: int | None = ...,
        **kwds: Unpack[PopenOptions],
    ) -> LineStream[bytes]: ...

    @overload
    def stream(
        self,
        *cmd: CommandArg,
        encoding: str,
        timeout: float | None = ...,
        merge_stderr: bool = ...,
        cwd: CommandArg | None = ...,
        env: EnvMapping | None = ...,
        grace_period: float | None = ...,
        max_stderr_bytes: int | None = ...,
        **kwds: Unpack[PopenOptions],
    ) -> LineStream[str]: ...

    @overload
    def stream(
        self,
        *cmd: CommandArg,
        encoding: str | None,
        timeout: float | None = ...,
        merge_stderr: bool = ...,
        cwd: CommandArg | None = ...,
        env: EnvMapping | None = ...,
        grace_period: float | None = ...,
        max_stderr_bytes: int | None = ...,
        **kwds: Unpack[PopenOptions],
    ) -> LineStream[bytes] | LineStream[str]: ...

    def stream(
        self,
        *cmd: CommandArg,
        encoding: str | None = None,
        timeout: float | None = None,
        merge_stderr: bool = True,
        cwd: CommandArg | None = None,
        env: EnvMapping | None = None,
        grace_period: float | None = None,
        max_stderr_bytes: int | None = DEFAULT_MAX_OUTPUT_BYTES,
        **kwds: Unpack[PopenOptions],
    ) -> LineStream[bytes] | LineStream[str]:
        """Start ``cmd`` and iterate over its output lines; the stream owns the child.

        ::

            async with wrapper.stream("python", "job.py", encoding="utf-8") as lines:
                async for line in lines:
                    print(line, end="")
            print(lines.returncode)

        stderr is merged into the lines unless ``merge_stderr=False``; stdin is ``/dev/null``.
        Leaving the block (break, exception, cancellation) stops the child's tree if it is still
        running; ``timeout`` bounds the whole stream (:class:`ProcessTimeoutError`).

        Raises: at once, :class:`InvalidTimeoutError` (negative timeout or grace period),
        :class:`InvalidLimitError` (``max_stderr_bytes`` not an int >= 0),
        :class:`InvalidEncodingError` (unknown ``encoding``) and what
        :meth:`create_subprocess_exec` raises for bad input; when the block is entered, what the
        spawn raises (e.g. :class:`CommandNotFoundError`).
        """
        limit = check_timeout(timeout)
        grace = (
            self._grace
            if grace_period is None
            else check_timeout(grace_period, "grace_period", finite=True)
        )
        check_flag(merge_stderr, "merge_stderr")
        if max_stderr_bytes is not None:
            check_limit(max_stderr_bytes, "max_stderr_bytes", minimum=0)
        check_encoding(encoding, "replace")
        if not cmd:
            raise InvalidCommandError("stream() needs a command")
        options = _options(kwds)
        _reject_stdio(options, "stream")
        command = check_exec_command(cmd[0], cmd[1:])
        if cwd is not None:
            options["cwd"] = cwd
        if env is not None:
            options["env"] = env
        request = self._request(
            command,
            False,
            subprocess.DEVNULL,
            subprocess.PIPE,
            subprocess.STDOUT if merge_stderr else subprocess.PIPE,
            DEFAULT_LIMIT,
            options,
        )
        return LineStream(
            functools.partial(self._open, request, grace or 0.0),
            display=request.display,
            encoding=encoding,
            timeout=limit,
            merge_stderr=merge_stderr,
            max_stderr_bytes=max_stderr_bytes,
        )

    # -- shutting down ----------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop every child still running (tree stop, all together, bounded by ``grace_period``)
        and what children that already exited left running in their process group or cgroup
        sub-group, then release threads. Idempotent.

        The stop's blocking work runs in a worker thread and looks at the process table a few
        times for all the children together, so closing a wrapper with many children neither
        blocks the event loop nor takes time in proportion to the number of children.

        A spawn or ``run()`` still starting when this is called is waited for (up to
        ``grace_period``); it finds the wrapper closed, kills what it started and raises
        :class:`WrapperClosedError`.

        Cancellation: whatever is still running is killed at once (no grace) and the threads
        are released before ``CancelledError`` propagates. Called inside an anyio scope that is
        already cancelled (a ``finally`` block after ``move_on_after``), the close runs in full,
        shielded from that scope.
        """
        with shielded_if_cancelled():
            await self._aclose()

    async def _aclose(self) -> None:
        self._closed = True
        try:
            if self._starting:
                self._settled = asyncio.get_running_loop().create_future()
                await asyncio.wait((self._settled,), timeout=self._grace)
            live = self.live_processes
            # Children that exited leaving part of their tree running are stopped with the rest.
            stopping = [*live, *await self._exited_with_leftovers_paced()]
            if stopping:
                try:
                    await stop_process_trees(stopping, grace=self._grace, ops=self._ops)
                except Exception:  # the clean-up below still kills and releases
                    logger.exception("stopping the children of %r failed", self)
            # Children that had exited already count too: an asyncio child that wrote more than
            # its reader buffers keeps its pipe paused after its exit just the same.
            stopped = set(live)
            released = [*live, *(p for p in _unread_asyncio(self._live) if p not in stopped)]
            for index, process in enumerate(released, 1):
                # Output nobody read would keep its pipes open (paused) after the child died.
                self._strategy.release_pipes(process)
                _close_transport(process)
                if index % _RELEASE_CHUNK == 0:
                    # A thousand transports closed in one callback stall the loop for tens
                    # of milliseconds: let it run between chunks.
                    await asyncio.sleep(0)
            del live, stopping, stopped, released
            await self._forget_exited()
        except BaseException:
            self.cleanup()
            raise
        # Joining the pools' threads blocks: not on the loop (a cancellation stops the waiting
        # only; the thread still finishes the clean-up).
        await run_in_thread(self.cleanup, "prismq-close")

    async def _forget_exited(self) -> None:
        # Our references may be the last ones to these children's objects (transports,
        # readers, buffers: some fifty each). A thousand of them let go of at once is a single
        # deallocation of ~10 ms that stalls the loop (or, in cleanup()'s thread, holds the
        # GIL from it), so a chunk at a time, with a loop turn between.
        exited = [p for p in self._live if p.returncode is not None]
        while exited:
            chunk = exited[-_RELEASE_CHUNK:]
            del exited[-_RELEASE_CHUNK:]
            self._live.difference_update(chunk)
            del chunk
            await asyncio.sleep(0)

    def _exited_with_leftovers(self) -> list[ProcessLike]:
        """Children that exited but may have left part of their tree running (in their group or
        their sub-group; a raw process's ``sleep 300 &``). Cheap checks only, a signal and a small
        file read per exited child and no look at the process table (see
        :func:`may_have_left_running`), so closing a wrapper whose children all exited cleanly
        costs no stop."""
        return [
            p
            for p in self._live
            if p.returncode is not None and may_have_left_running(p, self._ops)
        ]

    async def _exited_with_leftovers_paced(self) -> list[ProcessLike]:
        # As _exited_with_leftovers(), a chunk at a time with a loop turn between: some 10-20 us
        # per exited child, which a thousand of them would spend in one stall of the loop.
        exited = [p for p in self._live if p.returncode is not None]
        left: list[ProcessLike] = []
        for start in range(0, len(exited), _RELEASE_CHUNK):
            if start:
                await asyncio.sleep(0)
            chunk = exited[start : start + _RELEASE_CHUNK]
            left.extend(p for p in chunk if may_have_left_running(p, self._ops))
        return left

    def cleanup(self) -> None:
        """Synchronous form of :meth:`aclose` (the PrismQ guide's ``wrapper.cleanup()``): kill
        children still running, and what children that exited left running in their group or
        sub-group (no grace: this is synchronous), and shut the thread pools down.
        Idempotent; the wrapper cannot be used afterwards. Prefer ``await aclose()`` from async
        code: it gives children their grace period."""
        self._closed = True
        killed = self.live_processes
        left = self._exited_with_leftovers()
        if killed or left:
            try:
                kill_trees_now([*killed, *left], self._ops)
            except Exception:
                logger.exception("killing the children of %r failed", self)
        _reap_killed(killed, self._ops)
        # The killed children, and those that had exited already with output nobody read.
        killed_ids = set(map(id, killed))
        self._release_unread(
            [*killed, *(p for p in _unread_asyncio(self._live) if id(p) not in killed_ids)]
        )
        self._live.clear()
        self._close_strategies()

    def _release_unread(self, processes: list[ProcessLike]) -> None:
        # As aclose() does: output nobody read keeps an asyncio child's pipe paused by flow
        # control, so its descriptor and transport stayed open after the kill until garbage
        # collection (then a ResourceWarning, or "Event loop is closed" once asyncio.run() has
        # returned). Transports are not thread-safe: only on their loop's thread, or once that
        # loop has closed (release_transport_pipes finishes the close itself then).
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        for process in processes:
            loop = _transport_loop(process)
            if loop is None or not (loop is running or loop.is_closed()):
                continue  # not asyncio's (our Popen-backed modes release their own), or elsewhere
            try:
                self._strategy.release_pipes(process)
            except Exception:
                logger.exception("releasing the pipes of %r failed", process)
            if loop.is_closed():
                # Reaped by _reap_killed. On a live loop the transport closes itself once its
                # watcher reports the exit: closing it first would reap the child behind the
                # watcher's back (Popen.poll), losing the exit status.
                _close_transport(process)

    def _close_strategies(self) -> None:
        for strategy in (*self._retired, self._strategy):
            strategy.close()


def _strategy_decision(strategy: SubprocessStrategy) -> ModeDecision:
    mode = getattr(strategy, "mode", None)
    if isinstance(mode, RunMode):
        return resolve_run_mode(mode)
    if not isinstance(mode, str) or not mode.strip():
        raise InvalidRunModeError(
            f"{type(strategy).__name__}.mode must be a RunMode or a non-empty string naming the "
            f"strategy's mode, got {mode!r}"
        )
    return ModeDecision(
        mode, f"strategy {type(strategy).__name__} passed by the caller", ModeSource.ARGUMENT
    )


#: What each high-level method offers instead of the streams and text options it refuses.
_INSTEAD = {
    "run": (
        "use input= for stdin, or create_subprocess_exec() to choose the streams",
        "run() returns bytes: decode result.stdout (result.stdout_text is UTF-8), or use "
        "stream(..., encoding=...) for text lines",
    ),
    "stream": (
        "stdin is the null device and stderr is merged into the lines (merge_stderr=False keeps "
        "it apart); use create_subprocess_exec() to choose the streams",
        "stream() decodes with its encoding= argument (undecodable bytes become U+FFFD); for "
        "other error handling use iter_lines(process.stdout, encoding=..., errors=...)",
    ),
}


_REFUSED = frozenset(
    ("stdin", "stdout", "stderr", "encoding", "errors", "text", "universal_newlines")
)


def _options(kwds: PopenOptions | SpawnOptions) -> dict[str, Any]:
    """A call's ``**kwds`` as the plain dict it is (the typed dicts exist for its callers)."""
    return cast("dict[str, Any]", kwds)


def _reject_stdio(kwds: Mapping[str, Any], method: str) -> None:
    """Refuse what ``run()``/``stream()`` set themselves, saying what to use instead (asyncio's
    own messages, "encoding must be None", would not)."""
    if not kwds or _REFUSED.isdisjoint(kwds):  # the common case: one set operation per run
        return
    streams, text = _INSTEAD[method]
    given = sorted({"stdin", "stdout", "stderr"} & set(kwds))
    if given:
        raise InvalidCommandError(
            f"{method}() wires stdin/stdout/stderr itself (got {', '.join(given)}); {streams}"
        )
    given = sorted(
        name
        for name in ("encoding", "errors", "text", "universal_newlines")
        if kwds.get(name) not in (None, False)
    )
    if given:
        raise InvalidCommandError(f"{method}() got {', '.join(given)}: {text}")


# How long cleanup() waits, in all, for the children it just SIGKILLed to be reaped.
_REAP_SECONDS = 1.0


def _reap_killed(processes: list[ProcessLike], ops: PlatformOps) -> None:
    # Our Popen-backed children (THREADED, LOCAL) are reaped by a reader on the loop; if the loop
    # closes first (a cleanup() in a finally just before asyncio.run() returns) they would stay
    # zombies and their Popen would warn "still running" when collected. A SIGKILLed child dies
    # at once, so reap it here, bounded. asyncio's children are reaped by its child watcher,
    # except when their loop has closed: a pidfd watcher (3.11's LoopPidfdWatcher, 3.12's own)
    # hears an exit only in the loop that started the child, so those are reaped here too.
    deadline = time.monotonic() + _REAP_SECONDS
    for process in processes:
        popen = getattr(process, "_popen", None)
        transport = None
        if not isinstance(popen, subprocess.Popen):
            transport = getattr(process, "_transport", None)
            loop = _transport_loop(process)
            popen = getattr(transport, "_proc", None)
            if loop is None or not loop.is_closed():
                # Its loop's child watcher reaps it, once it has died and the loop runs an
                # iteration. A SIGKILLed child takes a moment to die, and a loop ending right
                # after this cleanup() (asyncio.run() returning) would otherwise close first and
                # never hear of it: a zombie, its transport left open. Dead by the time this
                # returns, it is reaped in the iterations a closing loop still runs.
                ops.wait_child_dead(process.pid, deadline)
                continue
        if isinstance(popen, subprocess.Popen):
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                popen.wait(timeout=max(0.0, deadline - time.monotonic()))
            if transport is not None and getattr(transport, "_returncode", 0) is None:
                transport._returncode = popen.returncode  # what the exit callback would set
        elif transport is not None and process.returncode is None:
            # Another loop's child (uvloop's: libuv reaps in the loop, which has closed; no
            # Popen to wait with). Nobody else waits for this pid: reap it by pid.
            _reap_pid(process, deadline)
    reap_orphaned()  # closes the pidfds of the children just reaped


def _reap_pid(process: ProcessLike, deadline: float) -> None:
    # Recorded as reaped: its pid is free from now on, and its returncode never comes.
    pause = 0.0005
    while reap_closed_loop_child(process) is None and time.monotonic() < deadline:
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


def _transport_loop(process: ProcessLike) -> asyncio.AbstractEventLoop | None:
    """The loop of an asyncio process whose process transport is still open (None once it has
    finished, and for the other modes' processes)."""
    transport = getattr(process, "_transport", None)
    if transport is None:
        return None
    # asyncio's transport lets go of its loop once finished; another loop's (uvloop's) keeps
    # its loop to itself, and the process object has it.
    loop = transport._loop if hasattr(transport, "_loop") else getattr(process, "_loop", None)
    return loop if isinstance(loop, asyncio.AbstractEventLoop) else None


def _pipes_open(process: ProcessLike) -> bool:
    """Whether the process transport of an asyncio process still holds a pipe open."""
    transport = getattr(process, "_transport", None)
    if transport is None:
        return False
    if hasattr(transport, "_closed"):  # asyncio's closes itself once every pipe has
        return not transport._closed
    # uvloop's closes at the child's exit, its pipes each on their own.
    for fd in (0, 1, 2):
        with contextlib.suppress(Exception):
            pipe = transport.get_pipe_transport(fd)
            if pipe is not None and not pipe.is_closing():
                return True
    return False


def _unread_asyncio(processes: Iterable[ProcessLike]) -> list[ProcessLike]:
    """The asyncio children among ``processes`` that have exited but whose process transport is
    still open (a pipe paused on output nobody read), and that may be touched from here: their
    loop is the one running in this thread, or closed (transports are not thread-safe). Our
    Popen-backed modes release their own pipes once the child has exited."""
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    found = []
    for process in processes:
        loop = _transport_loop(process)
        if (
            loop is not None
            and process.returncode is not None
            and _pipes_open(process)
            and (loop is running or loop.is_closed())
        ):
            found.append(process)
    return found


def _close_transport(process: ProcessLike) -> None:
    # An asyncio process keeps its process transport until its pipes close and it is reaped;
    # close it now rather than at garbage collection, when the loop may be gone.
    transport = getattr(process, "_transport", None)
    if transport is not None:
        with contextlib.suppress(Exception):
            transport.close()
