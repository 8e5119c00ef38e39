"""Running a module (a Python script) as a tracked, streamed, accounted run: :class:`ModuleRunner`.

One run = one child ``sys.executable script --param value ...``. Its merged stdout/stderr lines
go to an :class:`OutputCapture` as they arrive (and the last ones to ``Run.output_tail``), its
whole process tree is sampled for peak RSS and CPU time, and its status, exit code, error, pid,
mode and timestamps are kept in a run registry from start to finish, however it ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Unpack

from .._core._cancel_shield import shielded_if_cancelled
from .._core._closing import AsyncClosing
from .._core._durations import timeout_seconds
from .._core._event_loop import running_asyncio_loop
from .._core._exceptions import (
    CommandNotFoundError,
    DuplicateRunError,
    InvalidArgumentTypeError,
    InvalidBackendError,
    InvalidRunError,
    InvalidRunModeError,
    OutputClosedError,
    RunClaimedError,
    RunnerClosedError,
    ScriptNotFoundError,
    TaskManagerClosedError,
)
from .._core._host_shutdown import child_identity, take_part_in_host_shutdown
from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._run_process import ChildRun
from .._core._tree_stop import DEFAULT_GRACE_PERIOD, kill_tree_now, kill_trees_now
from .._core._validation import (
    check_cwd,
    check_env,
    check_exec_command,
    check_flag,
    check_limit,
    check_shell_command,
    check_timeout,
    not_found_error,
)
from .._core._wrapper import SubprocessWrapper
from .._platform import IS_WINDOWS
from .._platform._windows import create_process_finds
from .._resources._tree_sampler import ProcessTreeSampler, TreeSample, check_sample_interval
from .._strategies import SubprocessStrategy
from ._backend import ModuleJob, RunBackend, RunContext, check_resources
from ._cancel_result import CancelResult, cancel_elsewhere
from ._cancel_watch import CancelRequestWatcher
from ._line_batches import iter_line_batches
from ._memory_registry import (
    BaseRunRegistry,
    check_registry,
    reason_text,
    run_id_of,
    stopped_for_claim,
)
from ._module_args import check_args, check_parameters, parameters_to_args
from ._output_capture import OutputCapture, check_output, end_code
from ._output_tail import OutputTail
from ._process_manager import ProcessManager
from ._record_retry import RecordRetry, retry_start, worth_retrying
from ._run_record import Run, RunStatus
from ._start_options import CommandStartOptions, ModuleStartOptions, check_options
from ._task_manager import BackgroundTaskManager

__all__ = ["ModuleRunner", "check_run_names"]

logger = logging.getLogger(__name__)

#: A line still without its newline past this many bytes is read in pieces of this size (or
#: the capture's max_line_bytes if larger); see _pump.
_LINE_PIECE_BYTES = 4 * 1024 * 1024

# How long a cancelled run waits for the answer to its start record before it reads what its
# module wrote: a thread-backed store answers within its busy timeout (SQLite's default 10 s).
_START_FATE_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class _Launch:
    """A validated start: everything needed to spawn, decided before anything runs. ``argv``
    is the program and its arguments, or (``shell``) the one command line."""

    argv: tuple[str, ...]
    shell: bool
    parameters: dict[str, Any]
    cwd: str | None
    env: dict[str, str]
    timeout: float | None
    memory_limit_bytes: int | None
    # What a run backend needs besides (it rebuilds argv and env where the child runs): the
    # module's script (None: a command), the raw args, the caller's own env, resource hints.
    script: str | None = None
    raw_args: tuple[str, ...] = ()
    user_env: dict[str, str] = field(default_factory=dict)
    resources: dict[str, float] = field(default_factory=dict)

    def job(self, module_id: str, module_name: str) -> ModuleJob:
        """The backend's view of this start (see :class:`ModuleJob`)."""
        return ModuleJob(
            module_id=module_id,
            module_name=module_name,
            script=self.script or "",
            parameters=self.parameters,
            args=self.raw_args,
            command=() if self.script is not None else self.argv,
            shell=self.shell,
            cwd=self.cwd,
            env=self.user_env,
            timeout=self.timeout,
            memory_limit_bytes=self.memory_limit_bytes,
            resources=self.resources,
        )


def _megabytes(value: int) -> str:
    return f"{value / (1024 * 1024):.1f} MiB"


def _check_memory_limit(memory_limit_bytes: int | None) -> None:
    if memory_limit_bytes is not None:
        check_limit(memory_limit_bytes, "memory_limit_bytes", minimum=1)


def _child_env(env: Mapping[str, str] | None) -> dict[str, str]:
    # Unbuffered UTF-8 for Python children (and Python behind a shell or a launcher), so lines
    # arrive as they are printed; harmless for other programs; the caller's env wins.
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONIOENCODING": "utf-8", **(env or {})}


def _relative_hint(path: str, cwd: str | os.PathLike[str] | None) -> str:
    """Where a relative ``path`` was looked for, for the error that says it is missing: a
    server's current directory is wherever it was started from, so a path that works from one
    directory is missing from another."""
    if os.path.isabs(path):
        return ""
    if cwd is not None:
        return f" (relative to cwd {os.fspath(cwd)!r})"
    return f" (a relative path is taken from the current directory {os.getcwd()!r})"


def _find_program(
    program: str, cwd: str | os.PathLike[str] | None, env: Mapping[str, str] | None
) -> None:
    """Refuse a program that cannot be found, the way the spawn would look for it (on Windows
    CreateProcess's way: no PATHEXT, this process's PATH and current directory)."""
    if IS_WINDOWS:
        if not create_process_finds(program, None if cwd is None else os.fspath(cwd)):
            searched = "searched as CreateProcess does: this process's PATH, not the child's env"
            raise not_found_error(program, FileNotFoundError(errno.ENOENT, searched))
        return
    if os.path.dirname(program):
        path = program
        if not os.path.isabs(path) and cwd is not None:
            path = os.path.join(os.fspath(cwd), path)
        if not os.path.isfile(path):
            raise CommandNotFoundError(program, "no such file" + _relative_hint(program, cwd))
        return
    search = (env or {}).get("PATH", os.environ.get("PATH", os.defpath))
    if shutil.which(program, path=search) is None:
        raise CommandNotFoundError(program, "not on PATH")


def check_run_names(module_id: object, module_name: object, run_id: object) -> None:
    """Refuse what a run cannot be named by, as the runner's starts do (the executor checks
    before it queues for a slot or admission).

    Raises:
        InvalidArgumentTypeError: ``module_id`` or ``module_name`` is neither a str nor an int
            (arguments mixed up: None, the parameters' dict...).
        InvalidRunError: ``run_id`` is given and is not a non-empty str.
    """
    for what, value in (("module_id", module_id), ("module_name", module_name)):
        # An int id is written as text, as before; anything else is a mistake, not a name.
        if not isinstance(value, str | int) or isinstance(value, bool):
            raise InvalidArgumentTypeError(
                f"{what} must be a str, got {type(value).__name__} {value!r:.80} (the first "
                "two arguments are module_id and module_name)"
            )
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise InvalidRunError(f"run_id must be a non-empty str, got {run_id!r:.80}")


class ModuleRunner(AsyncClosing):
    """Run Python modules (scripts) as tracked runs: registry, live output, cancel, limits.

    ``await runner.execute_module(...)`` runs one module to its end and returns its :class:`Run`;
    ``await runner.start_module(...)`` starts it in the background (through a
    :class:`BackgroundTaskManager`) and returns its ``run_id`` at once, which is what a web
    handler wants; ``await runner.cancel(run_id)`` stops either kind.

    The child is ``sys.executable <script> <arguments>`` with stdin ``/dev/null``, stdout and
    stderr merged into one stream of lines, and the host's environment plus ``env`` plus
    ``PYTHONUNBUFFERED=1`` and ``PYTHONIOENCODING=utf-8`` (so lines arrive as they are printed;
    ``env`` may override both).

    Parameters become arguments by this rule, per ``name: value`` in order: ``True`` ->
    ``--name``; ``False``/``None`` -> nothing; str/int/float -> ``--name value``; list/tuple ->
    ``--name item`` per item; dict -> ``--name <JSON>``. A value starting with ``-`` is passed as
    ``--name=value``. So ``{"count": 3, "verbose": True, "tags": ["a", "b"], "skip": False,
    "x": None}`` gives ``--count 3 --verbose --tags a --tags b``. Names are kept as given.

    How a run ends:

    - exit status 0: COMPLETED, ``exit_code`` 0;
    - another status: FAILED, ``exit_code`` that status, ``error_message`` ``"exited with status
      N: <last output line>"``;
    - ``timeout`` seconds after the child started: tree stopped, FAILED, ``"timed out after T s;
      process tree stopped"``, ``exit_code`` the status of the stopped child;
    - the tree's RSS above ``memory_limit_bytes`` (sampled every ``sample_interval`` s): tree
      stopped, FAILED, ``"memory limit exceeded: ..."`` with the figures;
    - :meth:`cancel`, ``ProcessManager.stop`` or cancelling the awaiting task: tree stopped, then
      CANCELLED (when the task was cancelled, ``CancelledError`` propagates after the run is
      recorded);
    - the child could not be started: FAILED with the reason (nothing was left running).

    ``peak_rss_bytes`` and ``cpu_time_seconds`` of the whole tree are stored on every run that
    was sampled at least once (they are estimates: see :class:`ProcessTreeSampler`).

    Args:
        registry: where runs are recorded; opened and closed by the caller.
        process_manager: tracks the children by run id; one is made if ``None``.
        run_mode: the mode of the wrapper this runner makes (``None``: detect). Not together
            with ``wrapper``.
        output: an :class:`OutputCapture` receiving every line (subscribe to a ``run_id`` to
            stream it); ``None``: lines only feed ``output_tail``. A run's output is closed when
            it ends.
        wrapper: a :class:`SubprocessWrapper` to spawn with (yours to close); ``None``: the
            runner makes one and closes it in :meth:`aclose`.
        task_manager: runs :meth:`start_module` work (yours to shut down; give it the same
            registry); ``None``: one is made on first use with ``max_concurrent``.
        grace_period: seconds between SIGTERM and SIGKILL when a tree is stopped.
        max_concurrent: limit of the task manager the runner makes (queued runs stay PENDING;
            a run's ``timeout`` counts from its start, not from queueing).
        output_tail_lines: how many last lines ``Run.output_tail`` keeps (at most 64 KiB in all,
            plus the note of a line cut to fit; a longer line is cut and says so).
        sample_interval: seconds between process-tree samples.
        backend: where modules and commands run (a :class:`RunBackend`, e.g.
            ``prismq_subprocess.dask.DaskBackend``); ``None``: here, as children of this
            process. The runner closes it in :meth:`aclose`. Everything above works the same
            with any backend; ``wrapper``/``run_mode`` and ``process_manager`` only concern
            local runs.

    Raises:
        InvalidRunModeError: both ``run_mode`` and ``wrapper`` given, or an unknown mode.
        InvalidTimeoutError: ``grace_period`` is negative.
        InvalidLimitError: ``output_tail_lines`` < 0 or ``max_concurrent`` < 1.
        InvalidIntervalError: ``sample_interval`` is not a finite duration of at least 0.01 s
            (see :class:`ProcessTreeSampler`).
        InvalidArgumentTypeError: ``process_manager``, ``wrapper`` or ``task_manager`` is not
            of its type.
        InvalidBackendError: ``backend`` is not a :class:`RunBackend`.
    """

    def __init__(
        self,
        registry: BaseRunRegistry,
        process_manager: ProcessManager | None = None,
        run_mode: RunMode | str | SubprocessStrategy | None = None,
        *,
        output: OutputCapture | None = None,
        wrapper: SubprocessWrapper | None = None,
        task_manager: BackgroundTaskManager | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        max_concurrent: int | None = None,
        output_tail_lines: int = 50,
        sample_interval: float | timedelta = 0.5,
        backend: RunBackend | None = None,
    ) -> None:
        if wrapper is not None and run_mode is not None:
            raise InvalidRunModeError("pass run_mode or wrapper, not both")
        # Checked before anything is made: a wrong object was taken, and the first run failed
        # with a bare AttributeError after its child had started (then aclose() too, leaving
        # the runner's own wrapper's threads behind).
        for name, value, kind in (
            ("process_manager", process_manager, ProcessManager),
            ("wrapper", wrapper, SubprocessWrapper),
            ("task_manager", task_manager, BackgroundTaskManager),
            ("backend", backend, RunBackend),
        ):
            if value is not None and not isinstance(value, kind):
                # A wrong backend is the error the backends raise for what they cannot use.
                error = InvalidBackendError if name == "backend" else InvalidArgumentTypeError
                raise error(
                    f"ModuleRunner: {name} must be a {kind.__name__} or None, got "
                    f"{type(value).__name__}"
                )
        check_limit(output_tail_lines, "output_tail_lines", minimum=0)
        if max_concurrent is not None:
            check_limit(max_concurrent, "max_concurrent", minimum=1)
        self.grace_period = check_timeout(grace_period, "grace_period", finite=True) or 0.0
        self.sample_interval = check_sample_interval(sample_interval, "sample_interval")
        self.registry = check_registry(registry, "ModuleRunner")
        # Not ``or``: an empty ProcessManager is falsy (it has a length).
        self.processes = (
            process_manager
            if process_manager is not None
            else ProcessManager(grace_period=self.grace_period)
        )
        self.output = check_output(output, "ModuleRunner")
        self.output_tail_lines = output_tail_lines
        self.max_concurrent = max_concurrent
        self._owns_wrapper = wrapper is None
        self.wrapper = (
            wrapper
            if wrapper is not None
            else SubprocessWrapper(run_mode, grace_period=self.grace_period)
        )
        self._task_manager = task_manager
        self._owns_task_manager = task_manager is None
        # run_id -> set once the run's outcome is recorded (foreground and background runs).
        self._active: dict[str, asyncio.Event] = {}
        self._active_runs: dict[str, Run] = {}  # the same runs: what cancel() reports
        # The loop each active run is driven on: one closed with the run pending (a host's
        # run_until_complete() then close()) never ends it, so cancel() and aclose() do.
        self._run_loops: dict[str, asyncio.AbstractEventLoop] = {}
        self._cancel_reasons: dict[str, str] = {}
        # Runs whose RUNNING record another process's claim refused (see _save): theirs now.
        self._claimed: set[str] = set()
        self._closed = False
        self.backend = backend
        # Foreground runs take cancel requests from other processes through the registry (a
        # background run's task manager watches its own).
        self._watcher = CancelRequestWatcher(registry, self.cancel)
        # Final records the registry failed to store (a full disk): written again until stored.
        self._unsaved = RecordRetry(registry)
        take_part_in_host_shutdown(self)

    # -- properties ---------------------------------------------------------------------------
    @property
    def mode(self) -> RunMode | str:
        """The mode children are started in (THREADED after an auto-detected fallback)."""
        return self.wrapper.mode

    @property
    def task_manager(self) -> BackgroundTaskManager:
        """The manager running :meth:`start_module` work (made on first use)."""
        if self._task_manager is None:
            self._task_manager = BackgroundTaskManager(
                self.registry,
                max_concurrent=self.max_concurrent,
                output=self.output,
                output_tail_lines=self.output_tail_lines,
            )
        return self._task_manager

    def active_run_ids(self) -> list[str]:
        """Run ids whose module is running in this runner (being stored, its child starting or
        started)."""
        return list(self._active)

    # -- validation ---------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise RunnerClosedError("this ModuleRunner is closed; create a new one")

    def prepare(
        self,
        script_path: str | os.PathLike[str],
        parameters: Mapping[str, Any] | None,
        *,
        timeout: float | timedelta | None = None,
        memory_limit_bytes: int | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str | os.PathLike[str]] | None = None,
        resources: Mapping[str, float] | None = None,
    ) -> _Launch:
        """Validate a module start without starting anything (``execute_module`` and
        ``start_module`` call it first; the executor uses it to fail early).

        A relative ``script_path`` is taken relative to ``cwd`` when given, as the child would.

        Raises:
            ScriptNotFoundError: the script does not exist, or is a directory without
                ``__main__.py``.
            InvalidParametersError: parameters not JSON-serialisable or not mappable, or a str
                value holding a NUL byte.
            InvalidTimeoutError: negative ``timeout``.
            InvalidLimitError: ``memory_limit_bytes`` not a positive int.
            CwdNotFoundError / CwdNotADirectoryError: bad ``cwd``.
            InvalidEnvironmentError: ``env`` is not a mapping of str to str.
            InvalidArgumentTypeError: ``args`` (raw arguments passed after the parameters'
                ones) is not a list of str.
            InvalidCommandError: an item of ``args`` holds a NUL byte.
            InvalidLimitError: ``resources`` is not a mapping of str to a positive number.
        """
        if cwd is not None:
            check_cwd(cwd)
        if not isinstance(script_path, str | os.PathLike):
            raise InvalidArgumentTypeError(
                f"script_path must be a str or os.PathLike, got {type(script_path).__name__} "
                f"{script_path!r:.60}"
            )
        path = Path(os.fspath(script_path))
        if not path.is_absolute() and cwd is not None:
            path = Path(os.fspath(cwd)) / path
        if not path.exists():
            hint = _relative_hint(os.fspath(script_path), cwd)
            raise ScriptNotFoundError(str(path), "does not exist" + hint)
        if path.is_dir():
            if not (path / "__main__.py").is_file():
                raise ScriptNotFoundError(str(path), "is a directory without __main__.py")
        elif not path.is_file():
            raise ScriptNotFoundError(str(path), "is not a regular file")
        stored = check_parameters(parameters)
        raw_args = check_args(args)
        arguments = (*parameters_to_args(stored), *raw_args)
        limit = timeout_seconds(timeout)
        _check_memory_limit(memory_limit_bytes)
        if env is not None:
            check_env(env)
        hints = check_resources(resources)
        script = os.path.abspath(path)
        return _Launch(
            argv=(sys.executable, script, *arguments),
            shell=False,
            parameters=stored,
            cwd=None if cwd is None else os.fspath(cwd),
            env=_child_env(env),
            timeout=limit,
            memory_limit_bytes=memory_limit_bytes,
            script=script,
            raw_args=raw_args,
            user_env=dict(env or {}),
            resources=hints,
        )

    def prepare_command(
        self,
        command: Sequence[str | os.PathLike[str]] | str,
        parameters: Mapping[str, Any] | None = None,
        *,
        shell: bool = False,
        timeout: float | timedelta | None = None,
        memory_limit_bytes: int | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        resources: Mapping[str, float] | None = None,
    ) -> _Launch:
        """Validate a command start without starting anything (``execute_command`` and
        ``start_command`` call it first).

        Raises:
            InvalidArgumentTypeError: ``command`` is not a sequence of str/path (``shell=False``)
                or not a str (``shell=True``).
            InvalidCommandError: an empty command, or a NUL byte in it.
            CommandNotFoundError: the program is not on ``PATH`` (``env``'s ``PATH`` when it
                has one) or, given as a path, does not exist (relative to ``cwd`` if given);
                not in DRY_RUN, where nothing is started.
            and what :meth:`prepare` raises for the other arguments.
        """
        if cwd is not None:
            check_cwd(cwd)
        if env is not None:
            check_env(env)
        if check_flag(shell, "shell"):
            if not isinstance(command, str):
                raise InvalidArgumentTypeError(
                    f"with shell=True the command is one str, not {type(command).__name__}"
                )
            argv: tuple[str, ...] = (str(check_shell_command(command)),)
            recorded: dict[str, Any] = {"shell": command}
        else:
            if isinstance(command, str | bytes) or not isinstance(command, Sequence):
                raise InvalidArgumentTypeError(
                    "the command is a sequence of the program and its arguments, e.g. "
                    f"['ls', '-l'] (or one str with shell=True), not {type(command).__name__}"
                )
            if not command:
                raise InvalidArgumentTypeError("the command is empty: name a program to run")
            parts = check_exec_command(command[0], tuple(command[1:]))
            if any(isinstance(part, bytes) for part in parts):
                raise InvalidArgumentTypeError("command parts must be str or paths, not bytes")
            argv = tuple(str(part) for part in parts)
            if self.backend is not None or self.wrapper.mode is not RunMode.DRY_RUN:
                # DRY_RUN starts nothing: a test may script a program this machine lacks, as
                # the wrapper's own run() allows (docs/TESTING.md).
                _find_program(argv[0], cwd, env)
            recorded = {"argv": list(argv)}
        stored = check_parameters(recorded if parameters is None else parameters)
        limit = timeout_seconds(timeout)
        _check_memory_limit(memory_limit_bytes)
        hints = check_resources(resources)
        return _Launch(
            argv=argv,
            shell=shell,
            parameters=stored,
            cwd=None if cwd is None else os.fspath(cwd),
            env=_child_env(env),
            timeout=limit,
            memory_limit_bytes=memory_limit_bytes,
            user_env=dict(env or {}),
            resources=hints,
        )

    def _new_run(
        self, module_id: str, module_name: str, launch: _Launch, run_id: str | None
    ) -> Run:
        check_run_names(module_id, module_name, run_id)
        fields: dict[str, Any] = {} if run_id is None else {"run_id": run_id}
        return Run(
            module_id=str(module_id),
            module_name=str(module_name),
            parameters=launch.parameters,
            mode=self._run_mode_label(),
            **fields,
        )

    # -- public API ---------------------------------------------------------------------------
    async def execute_module(
        self,
        module_id: str,
        module_name: str,
        script_path: str | os.PathLike[str],
        parameters: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        **options: Unpack[ModuleStartOptions],
    ) -> Run:
        """Run the module to its end and return its final :class:`Run` (also in the registry).

        A failing, timed-out or over-limit module is not an exception: the returned run says
        FAILED and why (see the class docstring). Bad input raises before anything is stored
        or started. ``options`` are the keywords of :meth:`prepare`: ``timeout``,
        ``memory_limit_bytes``, ``cwd``, ``env``, ``args`` (a list of str, passed as given
        after the arguments made from ``parameters``) and ``resources`` (``{"name": amount}``,
        hints a cluster backend reserves on a worker for the run; unused locally).

        Cancellation: the child's tree is stopped (SIGTERM, ``grace_period``, SIGKILL), the run
        is recorded CANCELLED with its output tail, then ``CancelledError`` propagates.

        Raises:
            RunnerClosedError: after :meth:`aclose`.
            OutputClosedError: the runner's ``output`` is closed (nothing is stored).
            DuplicateRunError: ``run_id`` is already in the registry or active here.
            RunClaimedError: another process claimed the run (a pick-up) before its child
                could be recorded RUNNING here; that child was stopped, the run is the other
                process's.
            and what :meth:`prepare` raises.
        """
        self._check_open()
        check_options(options, ModuleStartOptions, "ModuleRunner.execute_module")
        launch = self.prepare(script_path, parameters, **options)
        return await self._execute_new(module_id, module_name, launch, run_id)

    async def start_module(
        self,
        module_id: str,
        module_name: str,
        script_path: str | os.PathLike[str],
        parameters: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        **options: Unpack[ModuleStartOptions],
    ) -> str:
        """Start the module in the background and return its ``run_id`` once the run is stored
        (PENDING; RUNNING once a slot is free, as the child is being started: its ``pid`` is
        stored a moment later, so a RUNNING run may still show ``pid`` None).

        The run then behaves as in :meth:`execute_module`; follow it through the registry and
        ``output.subscribe(run_id)``, stop it with :meth:`cancel`.

        Cancellation: if cancelled while the run is being stored, the run is recorded
        CANCELLED and nothing starts.

        Raises:
            RunnerClosedError: after :meth:`aclose`.
            OutputClosedError: the runner's ``output`` is closed (nothing is stored).
            TaskManagerClosedError: the task manager was shut down.
            DuplicateRunError: ``run_id`` is already active or stored.
            and what :meth:`prepare` raises.
        """
        self._check_open()
        check_options(options, ModuleStartOptions, "ModuleRunner.start_module")
        launch = self.prepare(script_path, parameters, **options)
        return await self._start_new(module_id, module_name, launch, run_id)

    async def execute_command(
        self,
        module_id: str,
        module_name: str,
        command: Sequence[str | os.PathLike[str]] | str,
        parameters: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        **options: Unpack[CommandStartOptions],
    ) -> Run:
        """Run any command to its end as a tracked run and return its final :class:`Run`: a
        program and its arguments (``command=["node", "build.js"]``), or with ``shell=True``
        one command line for the shell (``"sort data.txt | uniq -c"``; ``/bin/sh`` or
        ``cmd.exe``).

        ``options`` are the keywords of :meth:`prepare_command` (``shell``, ``timeout``,
        ``memory_limit_bytes``, ``cwd``, ``env``, ``resources``). Everything else is as in
        :meth:`execute_module`: the registry record, merged output
        lines to ``output`` and ``output_tail``, ``timeout``, ``memory_limit_bytes``, pid, peak
        RSS and CPU time of the whole tree, cancellation and the way the run ends (a non-zero
        exit is FAILED with ``"exited with status N: <last line>"``). ``parameters`` is only
        recorded (nothing is added to the command); ``None`` records the command itself, as
        ``{"argv": [...]}`` or ``{"shell": "..."}``.

        Cancellation: the child's tree is stopped (a shell's children too), the run is recorded
        CANCELLED, then ``CancelledError`` propagates.

        Raises:
            RunnerClosedError: after :meth:`aclose`.
            OutputClosedError: the runner's ``output`` is closed (nothing is stored).
            DuplicateRunError: ``run_id`` is already in the registry or active here.
            RunClaimedError: as for :meth:`execute_module`.
            and what :meth:`prepare_command` raises.
        """
        self._check_open()
        check_options(options, CommandStartOptions, "ModuleRunner.execute_command")
        launch = self.prepare_command(command, parameters, **options)
        return await self._execute_new(module_id, module_name, launch, run_id)

    async def start_command(
        self,
        module_id: str,
        module_name: str,
        command: Sequence[str | os.PathLike[str]] | str,
        parameters: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        **options: Unpack[CommandStartOptions],
    ) -> str:
        """Start any command (see :meth:`execute_command`) in the background and return its
        ``run_id`` once the run is stored, as :meth:`start_module` does.

        Cancellation: if cancelled while the run is being stored, the run is recorded
        CANCELLED and nothing starts.

        Raises:
            RunnerClosedError: after :meth:`aclose`.
            OutputClosedError: the runner's ``output`` is closed (nothing is stored).
            TaskManagerClosedError: the task manager was shut down.
            DuplicateRunError: ``run_id`` is already active or stored.
            and what :meth:`prepare_command` raises.
        """
        self._check_open()
        check_options(options, CommandStartOptions, "ModuleRunner.start_command")
        launch = self.prepare_command(command, parameters, **options)
        return await self._start_new(module_id, module_name, launch, run_id)

    async def _execute_new(
        self, module_id: str, module_name: str, launch: _Launch, run_id: str | None
    ) -> Run:
        running_asyncio_loop()  # under trio: refused before the run is stored
        run = self._new_run(module_id, module_name, launch, run_id)
        if run.run_id in self._active:
            # Refused here: the registry may not have the other one yet (it is being stored).
            raise DuplicateRunError(f"run {run.run_id!r} is already active in this runner")
        opened = self._open_output(run.run_id)
        # Active from now on, not once stored: a cancel() or aclose() that comes while the run
        # is being stored (a SQLite insert takes its thread's time) must find it and wait.
        done = self._begin(run)
        try:
            await self.registry.add_run(run)
        except BaseException as exc:
            try:
                self._drop_output(run.run_id, opened)
                if isinstance(exc, asyncio.CancelledError):
                    # The insert may have landed (a thread-backed store finishes its statement).
                    run.mark_cancelled(
                        self._cancel_reasons.get(run.run_id, "cancelled before the module started")
                    )
                    with shielded_if_cancelled():  # a cancelled anyio scope: still recorded
                        await self._save(run, missing_ok=True)
            finally:
                self._end(run, done)
            raise
        return await self._execute(run, launch, background=False, done=done)

    def _begin(self, run: Run) -> asyncio.Event:
        """Make ``run`` active here (cancel() and aclose() see it); return its done event."""
        done = asyncio.Event()
        self._active[run.run_id] = done
        self._active_runs[run.run_id] = run
        self._run_loops[run.run_id] = asyncio.get_running_loop()
        return done

    def _end(self, run: Run, done: asyncio.Event) -> None:
        """The run's outcome is recorded (or it never got stored): it is no longer active."""
        if self._active.get(run.run_id) is done:
            del self._active[run.run_id]
            self._active_runs.pop(run.run_id, None)
            self._run_loops.pop(run.run_id, None)
            self._cancel_reasons.pop(run.run_id, None)
            self._claimed.discard(run.run_id)
        done.set()

    async def _start_new(
        self, module_id: str, module_name: str, launch: _Launch, run_id: str | None
    ) -> str:
        running_asyncio_loop()  # under trio: refused before the run is stored
        run = self._new_run(module_id, module_name, launch, run_id)
        if run.run_id in self._active:
            # A foreground run stored but still PENDING would otherwise be taken over.
            raise DuplicateRunError(f"run {run.run_id!r} is already active in this runner")
        opened = self._open_output(run.run_id)
        try:
            return await self.task_manager.start_task(
                run,
                self._execute(run, launch, background=True),
                marks_running=self.backend is not None,
            )
        except TaskManagerClosedError as exc:
            self._drop_output(run.run_id, opened)
            if not self._closed:
                raise
            # Our aclose() shut the manager down while the run was being stored: the caller
            # learns it from the runner, with the run's id (stored, it is recorded CANCELLED).
            raise RunnerClosedError(
                f"this ModuleRunner was closed while run {run.run_id!r} was starting; the run "
                f"did not start ({exc})"
            ) from exc
        except BaseException:
            self._drop_output(run.run_id, opened)
            raise

    async def cancel(
        self, run_id: str, reason: str = "cancelled by request", *, timeout: float | None = None
    ) -> CancelResult:
        """Cancel a queued or running run and return once it is recorded CANCELLED (its
        child's tree stopped first).

        A run of this runner is stopped at once. A run that another process owns (another
        uvicorn worker sharing a SQLite registry) is cancelled through the registry: the request
        is recorded, the owning runner acts on it within about 50 ms, and this call waits up to
        ``timeout`` seconds (``None``: as long as it takes) until the registry shows the run
        finished; a run whose owner died is marked INTERRUPTED.

        Returns :class:`CancelResult` ``CANCELLED`` (true), or (all false) ``ALREADY_FINISHED``
        / ``NOT_FOUND``, told apart by the registry, or ``REQUESTED`` (another process's run did
        not finish within ``timeout``; it will).

        Cancellation: stops waiting; the cancellation (or the recorded request) goes ahead.

        Raises:
            RegistryClosedError: the run is not active here and the registry is closed.
            InvalidTimeoutError: a negative ``timeout``.
            InvalidRunIdError: ``run_id`` is not a str.
            InvalidArgumentTypeError: ``reason`` is not a str.
        """
        run_id, reason = run_id_of(run_id), reason_text(reason)
        if self._left_behind(run_id):
            return await self._stop_left_behind(run_id, reason)
        manager = self._task_manager
        if manager is not None and manager.is_active(run_id):
            return await manager.cancel_task(run_id, reason)
        done = self._active.get(run_id)
        run = self._active_runs.get(run_id)
        if done is None or run is None:
            return await cancel_elsewhere(self.registry, run_id, reason, timeout)
        if run.is_finished:  # being recorded already
            await done.wait()
            return CancelResult.ALREADY_FINISHED
        self._cancel_reasons.setdefault(run_id, reason)
        if self.backend is not None:
            await self.backend.cancel(run_id)
        else:
            await self.processes.stop(run_id, self.grace_period)
        await done.wait()
        # A run that finished by itself just before the stop reached it keeps its outcome.
        if run.status is RunStatus.CANCELLED:
            return CancelResult.CANCELLED
        if not run.is_finished:  # it could not be stored, so it never ran
            return CancelResult.NOT_FOUND
        return CancelResult.ALREADY_FINISHED

    def _left_behind(self, run_id: str) -> bool:
        """Whether ``run_id`` is active on an event loop that was closed meanwhile."""
        loop = self._run_loops.get(run_id)
        return loop is not None and loop.is_closed()

    async def _stop_left_behind(self, run_id: str, reason: str) -> CancelResult:
        """Stop and record a run whose loop was closed with it pending: its task never runs
        again, so neither its stop on cancel nor its record would happen otherwise."""
        run, done = self._active_runs[run_id], self._active[run_id]
        self._cancel_reasons.setdefault(run_id, reason)
        if self.backend is not None:
            await self.backend.cancel(run_id)
        else:
            await self.processes.stop(run_id, self.grace_period)
        self.processes.unregister(run_id)
        manager = self._task_manager
        if manager is not None and manager.is_active(run_id):
            # A background run: its manager records it (and closes its output).
            result = await manager.cancel_task(run_id, reason)
        else:
            result = CancelResult.ALREADY_FINISHED
            if not run.is_finished:
                run.mark_cancelled(reason)
                result = CancelResult.CANCELLED
            await self._record_final(run)
        # (Set from here, a waiter of the closed loop fails: nobody is left there to wake.)
        with contextlib.suppress(RuntimeError):
            self._end(run, done)
        return result

    # -- one run ------------------------------------------------------------------------------
    def _open_output(self, run_id: str) -> bool:
        # Subscribers may follow the run as soon as start_module/execute_module has it stored.
        output = self.output
        if output is None:
            return False
        if output.closed:
            # Refused before anything is stored or started: the run's end could not be written
            # (its close_run raised once the module had run, so a caller retrying ran it twice).
            raise OutputClosedError(
                f"this ModuleRunner's output (an OutputCapture) is closed; run {run_id!r} was "
                "not started"
            )
        return output.open_run(run_id)

    def _drop_output(self, run_id: str, opened: bool) -> None:
        if opened and self.output is not None:
            self.output.forget(run_id)

    async def _save(
        self,
        run: Run,
        *,
        missing_ok: bool = False,
        start: bool = False,
        stopping: Callable[[], bool] | None = None,
    ) -> bool:
        """Record ``run``; ``False`` only if another process claimed it (a pick-up while it
        was PENDING here): it is that process's to run and record now.

        ``start``: the write that takes the stored run from PENDING to RUNNING, tried again on
        an error of the environment (:func:`retry_start`) unless the run is being stopped
        (cancel(), aclose(), or ``stopping()``)."""
        try:
            if start and run.status is RunStatus.RUNNING:
                run_id = run.run_id

                def give_up() -> bool:
                    return (
                        self._closed
                        or run_id in self._cancel_reasons
                        or (stopping is not None and stopping())
                    )

                await retry_start(run, functools.partial(self.registry.update_run, run), give_up)
            else:
                await self.registry.update_run(run)
        except RunClaimedError as exc:
            self._claimed.add(run.run_id)
            # The start's refusal is acted on (the child stopped, RunClaimedError raised) and
            # reported once, by whoever catches that; a final record's is only reported here.
            logger.log(
                logging.WARNING if run.is_finished else logging.DEBUG,
                "run %s (%s) not recorded here: %s",
                run.run_id,
                run.status.value,
                exc,
            )
            return False
        except Exception as exc:
            # The run itself must go on; a registry failure is reported, not propagated.
            if not missing_ok:
                logger.exception("recording run %s (%s) failed", run.run_id, run.status.value)
                if worth_retrying(run, exc):
                    # Nobody writes a finished run again: it would stay RUNNING for good.
                    self._unsaved.add(run)
        return True

    async def _record_final(self, run: Run) -> None:
        """Close the run's output (so its log file is complete), then record its final status:
        a process that follows the log until the registry says the run finished (another
        uvicorn worker) then has every line. A run another process claimed meanwhile (its
        RUNNING record was refused) is that process's: its output is released without an end
        and nothing is recorded."""
        if run.run_id in self._claimed:
            if self.output is not None:
                self.output.forget(run.run_id)
            return
        if self.output is not None:
            try:
                await self.output.close_run(
                    run.run_id, status=run.status, exit_code=end_code(run.exit_code)
                )
            except Exception:
                logger.exception("closing the output of run %s failed", run.run_id)
        await self._save(run)

    async def _execute(
        self, run: Run, launch: _Launch, *, background: bool, done: asyncio.Event | None = None
    ) -> Run:
        if done is None:
            done = self._begin(run)
        if not background:
            self._watcher.watch(run.run_id)
        try:
            reason = self._cancel_reasons.get(run.run_id)
            if reason is not None:
                # cancel() or aclose() came while the run was being stored: nothing starts.
                run.mark_cancelled(reason)
                await asyncio.shield(self._record_final(run))
                return run
            if self.backend is not None:
                try:
                    return await self.backend.execute(
                        run,
                        launch.job(run.module_id, run.module_name),
                        self._context(run.run_id, background),
                    )
                except (Exception, asyncio.CancelledError) as exc:
                    # A backend that refused the run after it was stored (closed, a client of
                    # another loop, the id already executing there) left it PENDING for good:
                    # the caller got the error, but wait_finished() never returned. (The
                    # background path's task manager records it FAILED the same way.)
                    if not background and not run.is_finished:
                        self._end_unfinished(run, exc)
                        with shielded_if_cancelled():  # a cancelled anyio scope: still recorded
                            await self._record_final(run)
                    raise
            return await self._supervise(run, launch, background=background)
        finally:
            claimed = run.run_id in self._claimed
            self._watcher.unwatch(run.run_id)
            try:
                manager = self._task_manager
                # A background run's manager closes the output itself, with the final status.
                if self.output is not None and not (
                    background and manager is not None and manager.output is self.output
                ):
                    if claimed:
                        # Released without an end: the run goes on in the process that
                        # claimed it, whose lines a shared log directory holds.
                        self.output.forget(run.run_id)
                    else:
                        finished = run.is_finished
                        with shielded_if_cancelled():  # a cancelled anyio scope: still closed
                            await self.output.close_run(
                                run.run_id,
                                status=run.status if finished else None,
                                exit_code=end_code(run.exit_code) if finished else None,
                            )
            finally:
                self._end(run, done)

    def _end_unfinished(self, run: Run, exc: BaseException) -> None:
        if isinstance(exc, asyncio.CancelledError):
            run.mark_cancelled(self._cancel_reasons.get(run.run_id, "cancelled"))
        else:
            run.mark_failed(f"{type(exc).__name__}: {exc}")

    def _run_mode_label(self) -> str:
        if self.backend is not None and self.backend.mode is not None:
            return self.backend.mode
        return str(self.wrapper.mode)

    def _context(self, run_id: str, background: bool) -> RunContext:
        return RunContext(
            output=self.output,
            save=functools.partial(self._save, start=True),
            finish=self._record_final,
            cancel_reason=lambda: self._cancel_reasons.get(run_id),
            background=background,
            grace_period=self.grace_period,
            sample_interval=self.sample_interval,
            output_tail_lines=self.output_tail_lines,
        )

    async def _supervise(self, run: Run, launch: _Launch, *, background: bool) -> Run:
        try:
            if launch.shell:
                process = await self.wrapper.create_subprocess_shell(
                    launch.argv[0],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=launch.cwd,
                    env=launch.env,
                )
            else:
                process = await self.wrapper.create_subprocess_exec(
                    *launch.argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    cwd=launch.cwd,
                    env=launch.env,
                )
        except asyncio.CancelledError:
            if not background:
                run.mark_cancelled(self._cancel_reasons.get(run.run_id, "cancelled"))
                with shielded_if_cancelled():  # a cancelled anyio scope: still recorded
                    await self._record_final(run)
            raise
        except Exception as exc:
            logger.warning("module %s (run %s) did not start: %s", run.module_name, run.run_id, exc)
            run.mark_failed(f"could not start the module: {type(exc).__name__}: {exc}")
            await self._record_final(run)
            return run
        try:
            self.processes.register(run.run_id, process)
        except BaseException as exc:
            kill_tree_now(process)
            run.mark_failed(f"could not track the module: {type(exc).__name__}: {exc}")
            await self._record_final(run)
            raise
        try:
            return await self._follow(run, launch, process, background=background)
        finally:
            self.processes.unregister(run.run_id)

    async def _follow(
        self, run: Run, launch: _Launch, process: ProcessLike, *, background: bool
    ) -> Run:
        run_id = run.run_id
        tail = OutputTail(self.output_tail_lines)
        # The one run path (drain rule, stop on cancel) with our stop: through the process
        # manager, so a cancel() from elsewhere and ours share one tree stop.
        child = ChildRun(
            process,
            self.wrapper.strategy,
            grace=self.grace_period,
            stop=functools.partial(self.processes.stop, run_id, self.grace_period),
        )

        async def on_limit(sample: TreeSample) -> None:
            await self.processes.stop(run_id, self.grace_period)

        sampler = ProcessTreeSampler(
            process.pid,
            interval=self.sample_interval,
            memory_limit_bytes=launch.memory_limit_bytes,
            on_limit=on_limit,
        )
        timed_out = False
        reading = False
        stopping = False
        saving: asyncio.Future[bool] | None = None
        try:
            run.mode = str(self.wrapper.mode)
            starting = run.status is RunStatus.PENDING
            if starting:
                run.mark_running(process.pid)
            else:
                run.pid = process.pid  # a background run is marked RUNNING by its task manager
            if run_id in self._cancel_reasons:
                # cancel() came while the child was being spawned, before it could be stopped.
                await self.processes.stop(run_id, self.grace_period)
            # A task of its own, so a cancel that lands meanwhile can still learn its answer
            # (a thread-backed store finishes the write): whether the run was claimed.
            saving = asyncio.ensure_future(
                self._save(run, start=starting, stopping=lambda: stopping)
            )
            if not await asyncio.shield(saving):
                # Another process picked the run up between its add and this record (a
                # deliberate pick-up of a PENDING run): the run is its job now, not ours, and
                # so is its output (nothing of this child's is read into it).
                await child.abort()
                raise stopped_for_claim(run_id, process.pid)
            # Read from the record on (the pipe holds what the child wrote meanwhile): a line
            # never shows before its run is recorded RUNNING, as on a cluster.
            child.read(self._pump(run_id, process.stdout, tail))
            reading = True
            await self._record_child(run_id, process)
            sampler.start()
            try:
                async with asyncio.timeout(launch.timeout):
                    await child.wait_exit()
            except TimeoutError:
                timed_out = True
                await child.abort()
            else:
                await child.finish()
                await child.stop_leftovers()
            returncode = process.returncode
        except asyncio.CancelledError:
            # Shielded from a cancelled anyio scope, whose level-triggered cancellation would
            # cut every await short: the tree killed with no grace and the run recorded without
            # its exit status, or after the caller had moved on.
            with shielded_if_cancelled():
                stopping = True
                # A second cancellation while the tree is stopped (it is then killed and waited
                # for: ChildRun.stop) must not skip the record: the run would stay RUNNING.
                with contextlib.suppress(asyncio.CancelledError):
                    await child.stop()
                if not reading and await self._unclaimed(run_id, saving):
                    # Cancelled while its start was being recorded: what the child wrote
                    # meanwhile is still in the pipe, and is the run's.
                    child.read(self._pump(run_id, process.stdout, tail))
                with contextlib.suppress(asyncio.CancelledError):
                    await child.settle()
                with contextlib.suppress(asyncio.CancelledError):
                    await sampler.stop()
                self._settle(run, tail, sampler, process.returncode)
                if not background:
                    # A background run's task manager records CANCELLED with its own reason.
                    run.mark_cancelled(self._cancel_reasons.get(run_id, "cancelled"))
                    await asyncio.shield(self._record_final(run))
            raise
        finally:
            with shielded_if_cancelled():
                await sampler.stop()
                await child.aclose()
            error = child.reader_error()
            if error is not None:
                logger.error("reading the output of pid %d failed", process.pid, exc_info=error)

        self._settle(run, tail, sampler, returncode)
        exceeded = sampler.limit_exceeded
        if exceeded is not None:
            run.mark_failed(
                f"memory limit exceeded: the process tree used {_megabytes(exceeded.rss_bytes)}"
                f" (limit {_megabytes(launch.memory_limit_bytes or 0)}); process tree stopped",
                exit_code=returncode,
            )
        elif timed_out:
            run.mark_failed(
                f"timed out after {launch.timeout:g} s; process tree stopped",
                exit_code=returncode,
            )
        elif self.processes.stop_requested(run_id) or run_id in self._cancel_reasons:
            run.mark_cancelled(self._cancel_reasons.get(run_id, "stopped by the process manager"))
            run.exit_code = returncode
        elif returncode == 0:
            run.mark_completed(0)
        else:
            message = f"exited with status {returncode}"
            if run.output_tail and run.output_tail[-1].strip():
                message = f"{message}: {run.output_tail[-1].strip()[:500]}"
            run.mark_failed(message, exit_code=returncode)
        # Shielded: a caller cancelled now must not leave a finished run RUNNING in the registry.
        await asyncio.shield(self._record_final(run))
        return run

    async def _record_child(self, run_id: str, process: ProcessLike) -> None:
        # What lets a later process stop this tree if this one dies without stopping it, and
        # only this tree (see SQLiteRunRegistry's recovery).
        # Reads /proc (or asks psutil): not on the loop.
        identity = await asyncio.to_thread(child_identity, process)
        if identity is None:
            return
        try:
            await self.registry.record_child(run_id, identity)
        except Exception:
            logger.exception("recording the child of run %s failed", run_id)

    def _settle(
        self, run: Run, tail: OutputTail, sampler: ProcessTreeSampler, returncode: int | None
    ) -> None:
        run.output_tail = list(tail)
        run.exit_code = returncode
        if sampler.last_sample is not None:
            run.peak_rss_bytes = sampler.peak_rss_bytes
            run.cpu_time_seconds = sampler.cpu_time_seconds

    async def _unclaimed(self, run_id: str, saving: asyncio.Future[bool] | None) -> bool:
        """Cancelled before the child's output was read: whether the run is still known to be
        ours, so its output may be read into it. Waits for the start record under way (no
        more tries once the run is stopping), up to :data:`_START_FATE_SECONDS`; a record
        still unanswered then, or a second cancellation meanwhile, leaves it unknown, and the
        output is not read (never into a run another process may own)."""
        if saving is not None and not saving.done():
            try:
                await asyncio.wait({saving}, timeout=_START_FATE_SECONDS)
            except asyncio.CancelledError:
                return False
            if not saving.done():
                logger.warning(
                    "run %s cancelled while its start record went unanswered for %g s: what "
                    "its module wrote is not kept",
                    run_id,
                    _START_FATE_SECONDS,
                )
                return False
        return saving is None or (not saving.cancelled() and saving.result())

    async def _pump(self, run_id: str, stream: Any, tail: OutputTail) -> None:
        if stream is None:
            return
        output = self.output
        # A line that never ends (output without newlines) comes in pieces: the host holds at
        # most one piece of it. Long enough that real lines stay whole (the log keeps them so).
        longest = max(_LINE_PIECE_BYTES, output.max_line_bytes if output is not None else 0)
        async for lines in iter_line_batches(stream, max_line_bytes=longest):
            tail.extend(lines)
            if output is not None:
                try:
                    await output.append_lines(run_id, lines)
                except OutputClosedError:
                    # Someone closed this run's output (e.g. the host closed the capture first).
                    # Keep reading: a child blocked on a full pipe would never finish.
                    output = None

    # -- shutting down ------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop everything: refuse new runs, cancel background runs (if the runner made the task
        manager), stop the trees of foreground runs (recorded CANCELLED), wait until every run
        is recorded, and close the wrapper if the runner made it, and its backend. Idempotent.

        Cancellation: stops waiting; the stops already sent go on. Called inside an anyio scope
        that is already cancelled, the close runs in full, shielded from that scope.
        """
        with shielded_if_cancelled():
            await self._aclose()

    async def _stop_all_left_behind(self, reason: str) -> None:
        """Stop and record every run left behind by a closed event loop (see
        ``_stop_left_behind``)."""
        left = [run_id for run_id in self._active if self._left_behind(run_id)]
        if left:
            await asyncio.gather(*(self._stop_left_behind(run_id, reason) for run_id in left))

    async def _aclose(self) -> None:
        self._closed = True
        await self._stop_all_left_behind("module runner closed")
        if self._owns_task_manager and self._task_manager is not None:
            # (Capped: twice a huge finite grace period overflows to inf, which shutdown refuses.)
            grace = min(2 * self.grace_period + 1.0, sys.float_info.max)
            await self._task_manager.shutdown(grace=grace)
        for run_id in list(self._active):
            self._cancel_reasons.setdefault(run_id, "module runner closed")
            if self.backend is not None:
                await self.backend.cancel(run_id)
        await self.processes.stop_all(self.grace_period)
        pending = [event.wait() for event in self._active.values()]
        if pending:
            await asyncio.gather(*pending)
        await self._watcher.aclose()
        if self._unsaved:
            await self._unsaved.aclose(max(self.grace_period, 1.0))
        if self._owns_wrapper:
            await self.wrapper.aclose()
        if self.backend is not None:
            await self.backend.aclose()

    # -- host shutdown (see _core/_host_shutdown.py) --------------------------------------------
    def _host_claims(self) -> list[ProcessLike]:
        return list(self.processes.live().values())

    async def _host_stop(self, reason: str, claimed: frozenset[int]) -> None:
        run_ids = set(self._active)
        if self._task_manager is not None:
            run_ids.update(self._task_manager.tasks)
        await asyncio.gather(*(self.cancel(rid, reason) for rid in run_ids), return_exceptions=True)

    def _host_kill(self) -> None:
        kill_trees_now(list(self.processes.live().values()))
        if self.backend is not None:
            self.backend.kill_now()
