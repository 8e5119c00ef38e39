"""Running a module (a Python script) as a tracked, streamed, accounted run: :class:`ModuleRunner`.

One run = one child ``sys.executable script --param value ...``. Its merged stdout/stderr lines
go to an :class:`OutputCapture` as they arrive (and the last ones to ``Run.output_tail``), its
whole process tree is sampled for peak RSS and CPU time, and its status, exit code, error, pid,
mode and timestamps are kept in a run registry from start to finish, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from .._core._closing import AsyncClosing
from .._core._durations import interval_seconds, timeout_seconds
from .._core._exceptions import (
    InvalidLimitError,
    InvalidRunModeError,
    OutputClosedError,
    RunnerClosedError,
    ScriptNotFoundError,
)
from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._tree_stop import DEFAULT_GRACE_PERIOD, kill_tree_now, terminate_gracefully
from .._core._validation import check_cwd, check_env, check_timeout
from .._core._wrapper import SubprocessWrapper
from .._resources._tree_sampler import ProcessTreeSampler, TreeSample
from .._strategies import SubprocessStrategy
from ._backend import ModuleJob, RunBackend, RunContext, check_resources
from ._cancel_result import CancelResult, not_active_result
from ._line_batches import iter_line_batches
from ._memory_registry import BaseRunRegistry
from ._module_args import check_args, check_parameters, parameters_to_args
from ._output_capture import OutputCapture
from ._output_tail import OutputTail
from ._process_manager import ProcessManager
from ._run_record import Run, RunStatus
from ._task_manager import BackgroundTaskManager

__all__ = ["ModuleRunner"]

logger = logging.getLogger(__name__)

# After the child exits, how long its output may keep arriving before we conclude that a
# descendant holds the pipe open and stop the rest of its group.
_DRAIN_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class _Launch:
    """A validated module start: everything needed to spawn, decided before anything runs."""

    argv: tuple[str, ...]
    parameters: dict[str, Any]
    cwd: str | None
    env: dict[str, str]
    timeout: float | None
    memory_limit_bytes: int | None
    user_env: dict[str, str]
    raw_args: tuple[str, ...]
    resources: dict[str, float]

    def job(self, module_id: str, module_name: str) -> ModuleJob:
        """The backend's view of this start (see :class:`ModuleJob`)."""
        return ModuleJob(
            module_id=module_id,
            module_name=module_name,
            script=self.argv[1],
            parameters=self.parameters,
            args=self.raw_args,
            cwd=self.cwd,
            env=self.user_env,
            timeout=self.timeout,
            memory_limit_bytes=self.memory_limit_bytes,
            resources=self.resources,
        )


def _megabytes(value: int) -> str:
    return f"{value / (1024 * 1024):.1f} MiB"


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
        output_tail_lines: how many last lines ``Run.output_tail`` keeps (at most 64 KiB in all;
            a longer line is cut and says so).
        sample_interval: seconds between process-tree samples.
        backend: where modules run (a :class:`RunBackend`, e.g.
            ``prismq_subprocess.dask.DaskBackend``); ``None``: here, as children of this
            process. The runner closes it in :meth:`aclose`. Everything above works the same
            with any backend; ``wrapper``/``run_mode`` and ``process_manager`` only concern
            local runs.

    Raises:
        InvalidRunModeError: both ``run_mode`` and ``wrapper`` given, or an unknown mode.
        InvalidTimeoutError: ``grace_period`` is negative.
        InvalidLimitError: ``output_tail_lines`` < 0 or ``max_concurrent`` < 1.
        InvalidIntervalError: ``sample_interval`` is not positive.
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
        if (
            isinstance(output_tail_lines, bool)
            or not isinstance(output_tail_lines, int)
            or (output_tail_lines < 0)
        ):
            raise InvalidLimitError(
                f"output_tail_lines must be an int >= 0, got {output_tail_lines!r}"
            )
        if max_concurrent is not None and (
            isinstance(max_concurrent, bool)
            or not isinstance(max_concurrent, int)
            or max_concurrent < 1
        ):
            raise InvalidLimitError(
                f"max_concurrent must be an int >= 1 or None, got {max_concurrent!r}"
            )
        self.grace_period = check_timeout(grace_period, "grace_period") or 0.0
        self.sample_interval = interval_seconds(sample_interval, what="sample_interval")
        self.registry = registry
        # Not ``or``: an empty ProcessManager is falsy (it has a length).
        self.processes = (
            process_manager
            if process_manager is not None
            else ProcessManager(grace_period=self.grace_period)
        )
        self.output = output
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
        self._cancel_reasons: dict[str, str] = {}
        self._closed = False
        self.backend = backend

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
        """Run ids whose module is running (child started or starting) in this runner."""
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
            InvalidParametersError: parameters not JSON-serialisable or not mappable.
            InvalidTimeoutError: negative ``timeout``.
            InvalidLimitError: ``memory_limit_bytes`` not a positive int.
            CwdNotFoundError / CwdNotADirectoryError: bad ``cwd``.
            InvalidEnvironmentError: ``env`` is not a mapping of str to str.
            InvalidArgumentTypeError: ``args`` (raw arguments passed after the parameters'
                ones) is not a list of str.
            InvalidLimitError: ``resources`` is not a mapping of str to a positive number.
        """
        if cwd is not None:
            check_cwd(cwd)
        path = Path(os.fspath(script_path))
        if not path.is_absolute() and cwd is not None:
            path = Path(os.fspath(cwd)) / path
        if not path.exists():
            raise ScriptNotFoundError(str(path))
        if path.is_dir():
            if not (path / "__main__.py").is_file():
                raise ScriptNotFoundError(str(path), "is a directory without __main__.py")
        elif not path.is_file():
            raise ScriptNotFoundError(str(path), "is not a regular file")
        stored = check_parameters(parameters)
        raw_args = tuple(check_args(args))
        arguments = (*parameters_to_args(stored), *raw_args)
        limit = timeout_seconds(timeout)
        if memory_limit_bytes is not None and (
            isinstance(memory_limit_bytes, bool)
            or not isinstance(memory_limit_bytes, int)
            or memory_limit_bytes <= 0
        ):
            raise InvalidLimitError(
                f"memory_limit_bytes must be a positive int or None, got {memory_limit_bytes!r}"
            )
        if env is not None:
            check_env(env)
        hints = check_resources(resources)
        child_env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "PYTHONIOENCODING": "utf-8",
            **(env or {}),
        }
        return _Launch(
            argv=(sys.executable, os.path.abspath(path), *arguments),
            parameters=stored,
            cwd=None if cwd is None else os.fspath(cwd),
            env=child_env,
            timeout=limit,
            memory_limit_bytes=memory_limit_bytes,
            user_env=dict(env or {}),
            raw_args=raw_args,
            resources=hints,
        )

    def _new_run(
        self, module_id: str, module_name: str, launch: _Launch, run_id: str | None
    ) -> Run:
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
        timeout: float | timedelta | None = None,
        memory_limit_bytes: int | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str | os.PathLike[str]] | None = None,
        resources: Mapping[str, float] | None = None,
    ) -> Run:
        """Run the module to its end and return its final :class:`Run` (also in the registry).

        A failing, timed-out or over-limit module is not an exception: the returned run says
        FAILED and why (see the class docstring). Bad input raises before anything is stored
        or started. ``args`` (a list of str) are passed as given after the arguments made
        from ``parameters``.

        Cancellation: the child's tree is stopped (SIGTERM, ``grace_period``, SIGKILL), the run
        is recorded CANCELLED with its output tail, then ``CancelledError`` propagates.

        Raises:
            RunnerClosedError: after :meth:`aclose`.
            DuplicateRunError: ``run_id`` is already in the registry.
            and what :meth:`prepare` raises.
        """
        self._check_open()
        launch = self.prepare(
            script_path,
            parameters,
            timeout=timeout,
            memory_limit_bytes=memory_limit_bytes,
            cwd=cwd,
            env=env,
            args=args,
            resources=resources,
        )
        run = self._new_run(module_id, module_name, launch, run_id)
        opened = self._open_output(run.run_id)
        try:
            await self.registry.add_run(run)
        except BaseException as exc:
            self._drop_output(run.run_id, opened)
            if isinstance(exc, asyncio.CancelledError):
                # The insert may have landed (a thread-backed store finishes its statement).
                run.mark_cancelled("cancelled before the module started")
                await self._save(run, missing_ok=True)
            raise
        return await self._execute(run, launch, background=False)

    async def start_module(
        self,
        module_id: str,
        module_name: str,
        script_path: str | os.PathLike[str],
        parameters: Mapping[str, Any] | None = None,
        *,
        run_id: str | None = None,
        timeout: float | timedelta | None = None,
        memory_limit_bytes: int | None = None,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        args: Sequence[str | os.PathLike[str]] | None = None,
        resources: Mapping[str, float] | None = None,
    ) -> str:
        """Start the module in the background and return its ``run_id`` once the run is stored
        (PENDING; RUNNING once a slot is free and the child started).

        The run then behaves as in :meth:`execute_module`; follow it through the registry and
        ``output.subscribe(run_id)``, stop it with :meth:`cancel`.

        Cancellation: if cancelled while the run is being stored, the run is recorded
        CANCELLED and nothing starts.

        Raises:
            RunnerClosedError: after :meth:`aclose`.
            TaskManagerClosedError: the task manager was shut down.
            DuplicateRunError: ``run_id`` is already active or stored.
            and what :meth:`prepare` raises.
        """
        self._check_open()
        launch = self.prepare(
            script_path,
            parameters,
            timeout=timeout,
            memory_limit_bytes=memory_limit_bytes,
            cwd=cwd,
            env=env,
            args=args,
            resources=resources,
        )
        run = self._new_run(module_id, module_name, launch, run_id)
        opened = self._open_output(run.run_id)
        try:
            return await self.task_manager.start_task(
                run,
                self._execute(run, launch, background=True),
                marks_running=self.backend is not None,
            )
        except BaseException:
            self._drop_output(run.run_id, opened)
            raise

    async def cancel(self, run_id: str, reason: str = "cancelled by request") -> CancelResult:
        """Cancel a queued or running run of this runner and return once it is recorded
        CANCELLED (its child's tree stopped first).

        Returns :class:`CancelResult` ``CANCELLED`` (true), or ``ALREADY_FINISHED`` /
        ``NOT_FOUND`` (both false) when no such run is active here, told apart by the registry.

        Cancellation: stops waiting; the cancellation goes ahead.

        Raises:
            RegistryClosedError: the run is not active here and the registry is closed.
        """
        manager = self._task_manager
        result: CancelResult = CancelResult.NOT_FOUND
        if manager is not None:
            result = await manager.cancel_task(run_id, reason)
            if result is CancelResult.CANCELLED:
                return result
        done = self._active.get(run_id)
        if done is None:
            if manager is not None:
                return result  # the manager already looked the run up
            return await not_active_result(self.registry, run_id)
        self._cancel_reasons.setdefault(run_id, reason)
        if self.backend is not None:
            await self.backend.cancel(run_id)
        else:
            await self.processes.stop(run_id, self.grace_period)
        await done.wait()
        return CancelResult.CANCELLED

    # -- one run ------------------------------------------------------------------------------
    def _open_output(self, run_id: str) -> bool:
        # Subscribers may follow the run as soon as start_module/execute_module has it stored.
        return self.output is not None and self.output.open_run(run_id)

    def _drop_output(self, run_id: str, opened: bool) -> None:
        if opened and self.output is not None:
            self.output.forget(run_id)

    async def _save(self, run: Run, *, missing_ok: bool = False) -> None:
        try:
            await self.registry.update_run(run)
        except Exception:
            # The run itself must go on; a registry failure is reported, not propagated.
            if not missing_ok:
                logger.exception("recording run %s (%s) failed", run.run_id, run.status.value)

    async def _execute(self, run: Run, launch: _Launch, *, background: bool) -> Run:
        done = asyncio.Event()
        self._active[run.run_id] = done
        try:
            if self.backend is not None:
                return await self.backend.execute(
                    run,
                    launch.job(run.module_id, run.module_name),
                    self._context(run.run_id, background),
                )
            return await self._supervise(run, launch, background=background)
        finally:
            try:
                manager = self._task_manager
                # A background run's manager closes the output itself, with the final status.
                if self.output is not None and not (
                    background and manager is not None and manager.output is self.output
                ):
                    finished = run.is_finished
                    await self.output.close_run(
                        run.run_id,
                        status=run.status if finished else None,
                        exit_code=run.exit_code if finished else None,
                    )
            finally:
                self._active.pop(run.run_id, None)
                self._cancel_reasons.pop(run.run_id, None)
                done.set()

    def _run_mode_label(self) -> str:
        if self.backend is not None and self.backend.mode is not None:
            return self.backend.mode
        return str(self.wrapper.mode)

    def _context(self, run_id: str, background: bool) -> RunContext:
        return RunContext(
            output=self.output,
            save=self._save,
            cancel_reason=lambda: self._cancel_reasons.get(run_id),
            background=background,
            grace_period=self.grace_period,
            sample_interval=self.sample_interval,
            output_tail_lines=self.output_tail_lines,
        )

    async def _supervise(self, run: Run, launch: _Launch, *, background: bool) -> Run:
        try:
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
                await self._save(run)
            raise
        except Exception as exc:
            logger.warning("module %s (run %s) did not start: %s", run.module_name, run.run_id, exc)
            run.mark_failed(f"could not start the module: {type(exc).__name__}: {exc}")
            await self._save(run)
            return run
        try:
            self.processes.register(run.run_id, process)
        except BaseException as exc:
            kill_tree_now(process)
            run.mark_failed(f"could not track the module: {type(exc).__name__}: {exc}")
            await self._save(run)
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
        pump = asyncio.ensure_future(self._pump(run_id, process.stdout, tail))

        async def on_limit(sample: TreeSample) -> None:
            await self.processes.stop(run_id, self.grace_period)

        sampler = ProcessTreeSampler(
            process.pid,
            interval=self.sample_interval,
            memory_limit_bytes=launch.memory_limit_bytes,
            on_limit=on_limit,
        )
        timed_out = False
        try:
            run.mode = str(self.wrapper.mode)
            if run.status is RunStatus.PENDING:
                run.mark_running(process.pid)
            else:
                run.pid = process.pid  # a background run is marked RUNNING by its task manager
            if run_id in self._cancel_reasons:
                # cancel() came while the child was being spawned, before it could be stopped.
                await self.processes.stop(run_id, self.grace_period)
            await self._save(run)
            sampler.start()
            try:
                async with asyncio.timeout(launch.timeout):
                    returncode = await process.wait()
            except TimeoutError:
                timed_out = True
                await self.processes.stop(run_id, self.grace_period)
                returncode = await process.wait()
            await self._drain(process, pump)
        except asyncio.CancelledError:
            await self._stop_on_cancel(run_id, process, pump)
            await sampler.stop()
            self._settle(run, tail, sampler, process.returncode)
            if not background:
                # A background run's task manager records CANCELLED with its own reason.
                run.mark_cancelled(self._cancel_reasons.get(run_id, "cancelled"))
                await self._save(run)
            raise
        finally:
            await sampler.stop()
            if not pump.done():
                pump.cancel()
                await asyncio.wait({pump})

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
        await self._save(run)
        return run

    def _settle(
        self, run: Run, tail: OutputTail, sampler: ProcessTreeSampler, returncode: int | None
    ) -> None:
        run.output_tail = list(tail)
        run.exit_code = returncode
        if sampler.last_sample is not None:
            run.peak_rss_bytes = sampler.peak_rss_bytes
            run.cpu_time_seconds = sampler.cpu_time_seconds

    async def _pump(self, run_id: str, stream: Any, tail: OutputTail) -> None:
        if stream is None:
            return
        output = self.output
        async for lines in iter_line_batches(stream):
            tail.extend(lines)
            if output is not None:
                try:
                    await output.append_lines(run_id, lines)
                except OutputClosedError:
                    # Someone closed this run's output (e.g. the host closed the capture first).
                    # Keep reading: a child blocked on a full pipe would never finish.
                    output = None

    async def _drain(self, process: ProcessLike, pump: asyncio.Future[None]) -> None:
        """Let the rest of the output arrive after the child exited; if a descendant keeps the
        pipe open, stop what is left of the tree so the run can end."""
        await asyncio.wait({pump}, timeout=_DRAIN_SECONDS)
        if not pump.done():
            logger.info("pid %d exited but its pipe is still open; stopping its group", process.pid)
            await terminate_gracefully(process, self.grace_period)
            await asyncio.wait({pump}, timeout=_DRAIN_SECONDS)
        if pump.done() and not pump.cancelled() and pump.exception() is not None:
            logger.error(
                "reading the output of pid %d failed", process.pid, exc_info=pump.exception()
            )

    async def _stop_on_cancel(
        self, run_id: str, process: ProcessLike, pump: asyncio.Future[None]
    ) -> None:
        try:
            await self.processes.stop(run_id, self.grace_period)
            # Keep what the child printed up to its end, but do not wait on stray descendants.
            await asyncio.wait({pump}, timeout=_DRAIN_SECONDS)
        except asyncio.CancelledError:
            kill_tree_now(process)  # cancelled again: no more grace
            raise

    # -- shutting down ------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Stop everything: refuse new runs, cancel background runs (if the runner made the task
        manager), stop the trees of foreground runs (recorded CANCELLED), wait until every run
        is recorded, and close the wrapper if the runner made it. Idempotent.

        Cancellation: stops waiting; the stops already sent go on.
        """
        self._closed = True
        if self._owns_task_manager and self._task_manager is not None:
            await self._task_manager.shutdown(grace=2 * self.grace_period + 1.0)
        for run_id in list(self._active):
            self._cancel_reasons.setdefault(run_id, "module runner closed")
            if self.backend is not None:
                await self.backend.cancel(run_id)
        await self.processes.stop_all(self.grace_period)
        pending = [event.wait() for event in self._active.values()]
        if pending:
            await asyncio.gather(*pending)
        if self._owns_wrapper:
            await self.wrapper.aclose()
        if self.backend is not None:
            await self.backend.aclose()

