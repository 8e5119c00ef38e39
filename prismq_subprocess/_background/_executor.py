"""Many modules at once, bounded and admission-checked: :class:`ConcurrentExecutor`.

A batch is a list of :class:`ModuleSpec` (or dicts with the same keys, or the PrismQ guide's
``(module_id, script_path, args)`` tuples). Each item runs as a module run (see
``ModuleRunner``) once a slot is free and the resource manager admits it, and gives back one
plain result dict, so a batch never fails because one item did.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Unpack, cast, overload

from .._core._cancel_shield import shielded_if_cancelled, wait_all_or_cancel
from .._core._closing import AsyncClosing
from .._core._durations import timeout_seconds
from .._core._event_loop import running_asyncio_loop
from .._core._exceptions import (
    InvalidArgumentTypeError,
    InvalidLimitError,
    InvalidParametersError,
    RunnerClosedError,
)
from .._core._modes import RunMode
from .._core._slots import Slots
from .._core._tree_stop import DEFAULT_GRACE_PERIOD
from .._core._validation import check_flag
from .._resources._resource_manager import ResourceManager, check_resource_manager
from .._resources._resource_manager import admission as admission_of
from .._strategies import SubprocessStrategy
from ._memory_registry import BaseRunRegistry, RunRegistry, check_registry
from ._module_runner import ModuleRunner, check_run_names
from ._output_capture import OutputCapture, check_output
from ._run_record import Run
from ._start_options import ModuleStartOptions, StartOptions, check_options

__all__ = ["ConcurrentExecutor", "ModuleSpec"]

#: Finished runs the executor's own registry keeps (when none is passed): each call returns its
#: result, and a host that keeps one executor for weeks must not keep every run it ever ran.
_OWN_REGISTRY_MAX_RUNS = 1000

logger = logging.getLogger(__name__)


StrPath = str | os.PathLike[str]
#: The PrismQ guide's batch item: ``(module_id, script_path, args)``.
GuideItem = tuple[str, StrPath, Sequence[StrPath]]


def _is_one_guide_item(specs: object) -> bool:
    """``specs`` has the shape of one guide ``(module_id, script_path, args)`` item: a str and a
    path can never be batch items themselves, and its args are a list (or None); a list of
    three script paths is three (bad) items, as two or four are."""
    return (
        isinstance(specs, tuple | list)
        and len(specs) == 3
        and isinstance(specs[0], str)
        and isinstance(specs[1], str | os.PathLike)
        and (specs[2] is None or isinstance(specs[2], list | tuple))
    )


def _check_script_path(script_path: object) -> StrPath:
    if isinstance(script_path, str | os.PathLike):
        return script_path
    raise InvalidArgumentTypeError(
        f"script_path must be a str or os.PathLike, got {type(script_path).__name__} "
        f"{script_path!r}"
    )


@dataclass(frozen=True, slots=True)
class ModuleSpec:
    """One module to run: the arguments of ``ModuleRunner.execute_module`` as data.

    ``args`` are raw command-line arguments passed after the ones made from ``parameters``.
    """

    module_id: str
    module_name: str
    script_path: StrPath
    parameters: Mapping[str, Any] | None = None
    run_id: str | None = None
    timeout: float | timedelta | None = None
    memory_limit_bytes: int | None = None
    cwd: StrPath | None = None
    env: Mapping[str, str] | None = None
    args: Sequence[StrPath] | None = None

    def start_options(self) -> ModuleStartOptions:
        """The keywords ``ModuleRunner.prepare`` / ``execute_module`` take from this spec."""
        return ModuleStartOptions(
            timeout=self.timeout,
            memory_limit_bytes=self.memory_limit_bytes,
            cwd=self.cwd,
            env=self.env,
            args=self.args,
        )

    @classmethod
    def from_guide(
        cls, module_id: str, script_path: StrPath, args: Sequence[StrPath] | None = None
    ) -> ModuleSpec:
        """The spec of the PrismQ guide's ``(module_id, script_path, args)``: ``module_name``
        is ``module_id``, and the script runs in its own folder (``cwd``), as in the guide.
        A relative ``script_path`` is taken from the current directory.

        Raises:
            InvalidArgumentTypeError: ``script_path`` is not a str or ``os.PathLike``.
        """
        script = os.path.abspath(_check_script_path(script_path))
        return cls(module_id, str(module_id), script, args=args, cwd=str(Path(script).parent))

    @classmethod
    def from_any(cls, spec: ModuleSpec | Mapping[str, Any] | GuideItem) -> ModuleSpec:
        """Return ``spec`` itself, a spec built from a mapping with the same keys, or from the
        guide's ``(module_id, script_path, args)`` tuple (see :meth:`from_guide`).

        Raises:
            InvalidParametersError: a missing required key or an unknown key, a tuple of
                another length.
            InvalidArgumentTypeError: not a spec, mapping or tuple, or a tuple's
                ``script_path`` is not a path.
        """
        if isinstance(spec, ModuleSpec):
            return spec
        if isinstance(spec, tuple | list):
            if len(spec) != 3:
                raise InvalidParametersError(
                    f"a batch tuple must be (module_id, script_path, args), got {len(spec)} items"
                )
            module_id, script_path, args = spec
            return cls.from_guide(module_id, script_path, args)
        if not isinstance(spec, Mapping):
            # A TypeError, as for a batch that is no iterable of items.
            raise InvalidArgumentTypeError(
                "a batch item must be a ModuleSpec or a mapping (or the guide's (module_id, "
                f"script_path, args) tuple), not {type(spec).__name__}"
            )
        if not all(isinstance(key, str) for key in spec):
            raise InvalidParametersError(
                f"module spec keys must be str, got {sorted(map(repr, spec))}"
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(spec) - known)
        if unknown:
            raise InvalidParametersError(f"unknown module spec keys: {', '.join(unknown)}")
        try:
            return cls(**spec)
        except TypeError as exc:
            raise InvalidParametersError(f"incomplete module spec: {exc}") from None


def _set_if_pending(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def _result(run: Run) -> dict[str, Any]:
    return {
        "run_id": run.run_id,
        "module_id": run.module_id,
        "module_name": run.module_name,
        "status": run.status.value,
        "success": run.status.value == "completed",
        "exit_code": run.exit_code,
        "error": run.error_message,
        "error_type": None,
        "duration": run.duration,
        "pid": run.pid,
        "peak_rss_bytes": run.peak_rss_bytes,
        "cpu_time_seconds": run.cpu_time_seconds,
        "output_tail": list(run.output_tail),
    }


def _error_result(spec: object, exc: BaseException) -> dict[str, Any]:
    def get(name: str) -> Any:
        if isinstance(spec, Mapping):
            return spec.get(name)
        if isinstance(spec, tuple | list):  # the guide's (module_id, script_path, args)
            return spec[0] if spec else None
        return getattr(spec, name, None)

    return {
        "run_id": None,
        "module_id": get("module_id"),
        "module_name": get("module_name"),
        "status": "failed",
        "success": False,
        "exit_code": None,
        "error": f"{type(exc).__name__}: {exc}",
        "error_type": type(exc).__name__,
        "duration": None,
        "pid": None,
        "peak_rss_bytes": None,
        "cpu_time_seconds": None,
        "output_tail": [],
    }


class ConcurrentExecutor(AsyncClosing):
    """Run modules with at most ``max_concurrent`` at a time, each admitted by a resource check.

    Every module runs through a :class:`ModuleRunner` (so it is recorded in ``registry``, its
    output goes to ``output``, its tree is stopped on timeout/cancel/memory cap) and is reported
    as a dict::

        {"run_id", "module_id", "module_name", "status", "success", "exit_code", "error",
         "error_type", "duration", "pid", "peak_rss_bytes", "cpu_time_seconds", "output_tail"}

    ``status`` is a :class:`RunStatus` value. An item that never became a run (bad input,
    refused admission) has ``run_id`` ``None``, ``status`` ``"failed"`` and ``error_type`` the
    exception's class name.

    Admission: before each start, once a slot is free, ``resource_manager.admit()`` is asked.
    When resources are short, ``admission_wait=True`` waits (re-checking) up to
    ``admission_timeout`` seconds (``None``: as long as it takes) and ``admission_wait=False``
    refuses at once; a refusal is :class:`ResourceLimitException` (or
    :class:`ResourceWaitTimeoutError`) from :meth:`execute_module` and an error result in
    :meth:`execute_batch`. Without a resource manager every start is admitted.

    Args:
        max_concurrent: modules running (or waiting for admission) at once; >= 1.
        resource_manager: admission control; ``None``: none.
        run_mode: the mode children start in (``None``: detect).
        admission_wait, admission_timeout: see above.
        registry: where runs are recorded (yours to open and close); ``None``: an in-memory
            :class:`RunRegistry` of the executor's own, keeping the newest 1000 finished runs
            (``max_runs=1000``; each call returns its result, so a long-running host does not
            keep every run it ever ran).
        output: an :class:`OutputCapture` receiving every run's lines; ``None``: tails only.
        grace_period: seconds between SIGTERM and SIGKILL when a tree is stopped.
        sample_interval: seconds between process-tree samples (at least 0.01).

    Raises:
        InvalidLimitError: ``max_concurrent`` is not an int >= 1.
    """

    def __init__(
        self,
        max_concurrent: int = 10,
        resource_manager: ResourceManager | None = None,
        *,
        run_mode: RunMode | str | SubprocessStrategy | None = None,
        admission_wait: bool = True,
        admission_timeout: float | timedelta | None = None,
        registry: BaseRunRegistry | None = None,
        output: OutputCapture | None = None,
        grace_period: float = DEFAULT_GRACE_PERIOD,
        sample_interval: float | timedelta = 0.5,
    ) -> None:
        if (
            isinstance(max_concurrent, bool)
            or not isinstance(max_concurrent, int)
            or (max_concurrent < 1)
        ):
            raise InvalidLimitError(f"max_concurrent must be an int >= 1, got {max_concurrent!r}")
        self.max_concurrent = max_concurrent
        self.resource_manager = check_resource_manager(resource_manager, "ConcurrentExecutor")
        self.admission_wait = check_flag(admission_wait, "admission_wait")
        timeout_seconds(admission_timeout, what="admission_timeout")  # refused now, not per call
        self.admission_timeout = admission_timeout
        self.registry = (
            check_registry(registry, "ConcurrentExecutor")
            if registry is not None
            else RunRegistry(max_runs=_OWN_REGISTRY_MAX_RUNS)
        )
        check_output(output, "ConcurrentExecutor")
        self.runner = ModuleRunner(
            self.registry,
            run_mode=run_mode,
            output=output,
            grace_period=grace_period,
            sample_interval=sample_interval,
        )
        # Not an asyncio.Semaphore: that binds to the first loop that waits on it, and an
        # executor may serve one asyncio.run() after another.
        self._slots = Slots(max_concurrent, self._closed_error)
        # The loop of each call holding a slot, by a token of the call: a loop closed with such
        # a call pending (run_until_complete() then close()) never gives its slot back itself.
        self._holders: dict[object, asyncio.AbstractEventLoop] = {}
        # Futures set by aclose()/cleanup(), one per call waiting for admission.
        self._close_signals: set[asyncio.Future[Any]] = set()
        self._closed = False

    @staticmethod
    def _closed_error() -> RunnerClosedError:
        return RunnerClosedError("this ConcurrentExecutor is closed; create a new one")

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    async def _admit(self, manager: ResourceManager) -> None:
        """``manager.admit(...)``, ended with RunnerClosedError if the executor closes first
        (resources may stay short for ever, and nothing else would end the wait)."""
        closed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._close_signals.add(closed)
        admission: asyncio.Future[Any] = asyncio.ensure_future(
            admission_of(manager, self.admission_wait, self.admission_timeout)
        )
        try:
            await asyncio.wait({admission, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._close_signals.discard(closed)
            if not admission.done():
                admission.cancel()
                # Its end is ours to take; a cancel of this caller meanwhile goes on anyway.
                # Shielded from a cancelled anyio scope, which cut this wait short at once: the
                # call returned while the check's own clean-up still ran, unawaited.
                with shielded_if_cancelled():
                    await asyncio.wait({admission})
        if admission.cancelled():  # the executor closed (aclose or cleanup)
            raise self._closed_error()
        admission.result()  # ResourceLimitException, ResourceWaitTimeoutError, reader errors

    def _signal_closed(self) -> None:
        signals, self._close_signals = self._close_signals, set()
        for signal in signals:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits
                signal.get_loop().call_soon_threadsafe(_set_if_pending, signal)

    async def _run(self, spec: ModuleSpec) -> dict[str, Any]:
        self._check_open()
        # Fail on bad input, or outside asyncio, before queueing for a slot or admission (both
        # may wait for ever: resources that stay short).
        running_asyncio_loop()
        check_run_names(spec.module_id, spec.module_name, spec.run_id)
        options = spec.start_options()
        self.runner.prepare(_check_script_path(spec.script_path), spec.parameters, **options)
        await self._reclaim_slots()
        await self._slots.acquire()  # raises RunnerClosedError if closed meanwhile
        token = object()
        self._holders[token] = asyncio.get_running_loop()
        try:
            self._check_open()
            if self.resource_manager is not None:
                await self._admit(self.resource_manager)
            run = await self.runner.execute_module(
                spec.module_id,
                spec.module_name,
                spec.script_path,
                spec.parameters,
                run_id=spec.run_id,
                **options,
            )
        finally:
            # Not if reclaimed meanwhile: this is then the dead loop's call, closed when
            # collected, and the slot is someone else's now.
            if self._holders.pop(token, None) is not None:
                self._slots.release()
        return _result(run)

    async def _reclaim_slots(self) -> None:
        """Give back the slots held by calls of event loops that were closed with them pending
        (they never run again), once their runs are stopped and recorded: the limit counts
        children, and theirs may still run."""
        dead = [token for token, loop in self._holders.items() if loop.is_closed()]
        if not dead:
            return
        await self.runner._stop_all_left_behind("its event loop was closed")
        for token in dead:
            if self._holders.pop(token, None) is not None:  # (not reclaimed meanwhile)
                self._slots.release()

    @overload
    async def execute_module(
        self,
        module_id: str,
        module_name: str,
        script_path: StrPath,
        parameters: Mapping[str, Any] | None = None,
        *,
        args: Sequence[StrPath] | None = None,
        run_id: str | None = None,
        **options: Unpack[StartOptions],
    ) -> dict[str, Any]: ...

    @overload
    async def execute_module(
        self,
        module_id: str,
        *,
        script_path: StrPath,
        args: Sequence[StrPath] | None = None,
        run_id: str | None = None,
        **options: Unpack[StartOptions],
    ) -> dict[str, Any]: ...

    @overload
    async def execute_module(
        self,
        module_id: str,
        script_path: StrPath,
        args: Sequence[StrPath] | None = None,
        /,
        *,
        run_id: str | None = None,
        **options: Unpack[StartOptions],
    ) -> dict[str, Any]: ...

    async def execute_module(
        self,
        module_id: str,
        module_name: StrPath | None = None,
        script_path: StrPath | Sequence[StrPath] | None = None,
        parameters: Mapping[str, Any] | None = None,
        *,
        args: Sequence[StrPath] | None = None,
        run_id: str | None = None,
        **options: Unpack[StartOptions],
    ) -> dict[str, Any]:
        """Run one module when a slot is free and it is admitted; return its result dict.

        Two call shapes:

        - ``execute_module(module_id, module_name, script_path, parameters=None, *, args=None,
          ...)``: ``parameters`` become options (see ``parameters_to_args``), then ``args`` are
          passed as given;
        - the PrismQ guide's ``execute_module(module_id, script_path, args)`` (also
          ``execute_module(module_id, script_path=..., args=...)``): ``module_name`` is
          ``module_id``, ``args`` (a list of str) are passed as given and the script runs in
          its own folder unless ``cwd`` says otherwise (a relative ``script_path`` is then
          taken from ``cwd``, as in the other shape; without it, from the current directory).
          The guide's shape is recognised by its
          third argument being a list or tuple or missing, or its second being a ``Path`` (not
          a str); ``execute_module(module_id, path)`` runs the script without arguments.

        ``options`` (``run_id``, ``timeout``, ``memory_limit_bytes``, ``cwd``, ``env``) are as
        in ``ModuleRunner.execute_module``. A module that fails, times out or exceeds its memory
        cap is a result, not an exception.

        Cancellation: a queued call just stops waiting; a running module's tree is stopped and
        its run recorded CANCELLED before ``CancelledError`` propagates.

        Raises:
            InvalidArgumentTypeError: ``script_path`` is not a path, ``args`` is not a list of
                str, ``args`` given twice, or ``parameters`` with the guide's shape.
            ResourceLimitException: resources short and ``admission_wait=False``.
            ResourceWaitTimeoutError: still short after ``admission_timeout``.
            RunnerClosedError: after :meth:`aclose` / :meth:`cleanup`.
            and what ``ModuleRunner.execute_module`` raises for bad input.
        """
        check_options(
            options, StartOptions, "ConcurrentExecutor.execute_module", also=("args", "run_id")
        )
        guide = (
            module_name is None
            or script_path is None
            or isinstance(script_path, list | tuple)
            or (isinstance(module_name, os.PathLike) and not isinstance(module_name, str))
        )
        if guide:
            if module_name is not None and script_path is not None:
                # Positional guide call (module_id, script_path, args).
                if args is not None:
                    raise InvalidArgumentTypeError(
                        "execute_module() got args twice: as its third argument and as args="
                    )
                path: object = module_name
                raw: object = script_path
            else:
                path = script_path if module_name is None else module_name
                raw = args
            if path is None:
                raise InvalidArgumentTypeError("execute_module() needs a script_path")
            if parameters is not None:
                raise InvalidArgumentTypeError(
                    "execute_module(module_id, script_path, args) takes no parameters; use "
                    "execute_module(module_id, module_name, script_path, parameters, args=...)"
                )
            script = _check_script_path(path)
            cwd = options.get("cwd")
            if isinstance(cwd, str | os.PathLike) and not os.path.isabs(script):
                # Taken from cwd, as the full shape does (ModuleRunner.prepare): the same
                # arguments must name the same script whatever the call's shape.
                script = os.path.join(cwd, script)
            # ``raw`` is checked (a list of str) by ModuleRunner.prepare, before anything starts.
            spec = ModuleSpec.from_guide(module_id, script, cast("Sequence[StrPath] | None", raw))
            if options.get("cwd") is None:
                options["cwd"] = spec.cwd
            return await self._run(dataclasses.replace(spec, run_id=run_id, **options))
        assert module_name is not None  # guide is True otherwise
        return await self._run(
            ModuleSpec(
                module_id,
                cast("str", module_name),  # (checked by _run as the runner checks it)
                _check_script_path(script_path),
                parameters,
                run_id=run_id,
                args=args,
                **options,
            )
        )

    async def execute_batch(
        self, specs: Iterable[ModuleSpec | Mapping[str, Any] | GuideItem]
    ) -> list[dict[str, Any]]:
        """Run every spec (at most ``max_concurrent`` at a time); return one result dict per
        spec, in input order. Never raises because of one item: its error becomes its result.

        An item is a :class:`ModuleSpec`, a mapping with its keys, or the PrismQ guide's
        ``(module_id, script_path, args)`` tuple (see :meth:`ModuleSpec.from_guide`).

        Cancellation: every running module's tree is stopped and its run recorded CANCELLED,
        then ``CancelledError`` propagates.

        Raises:
            InvalidArgumentTypeError: ``specs`` is not an iterable of items (one spec, one
                mapping or one ``(module_id, script_path, args)`` tuple given alone, a str,
                ``None``); nothing runs.
            NoRunningLoopError: called outside asyncio (trio); nothing runs.
        """
        running_asyncio_loop()
        # One spec or mapping alone would otherwise be iterated: its keys (or a str's
        # characters, or a guide tuple's fields) would each become an error result, and
        # nothing would run.
        if _is_one_guide_item(specs):
            raise InvalidArgumentTypeError(
                "execute_batch() takes an iterable of specs; this is one (module_id, "
                "script_path, args) item: put it in a list"
            )
        if isinstance(specs, ModuleSpec | Mapping | str | bytes) or not isinstance(specs, Iterable):
            raise InvalidArgumentTypeError(
                "execute_batch() takes an iterable of specs (a list of ModuleSpec, mappings or "
                f"(module_id, script_path, args) tuples), not {type(specs).__name__}"
            )
        items = list(specs)
        results: list[dict[str, Any]] = [{} for _ in items]

        async def one(index: int, item: ModuleSpec | Mapping[str, Any] | GuideItem) -> None:
            try:
                results[index] = await self._run(ModuleSpec.from_any(item))
            except Exception as exc:
                logger.info("batch item %d did not run: %s", index, exc)
                results[index] = _error_result(item, exc)

        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(one(index, item)) for index, item in enumerate(items)]
            # Waited for here, not by the group's exit: cancelled inside an anyio scope, that
            # exit spun the loop while the runs' trees were stopped (see wait_all_or_cancel).
            await wait_all_or_cancel(tasks)
        return results

    async def aclose(self) -> None:
        """Stop running modules (trees stopped, runs recorded CANCELLED) and release the
        executor's wrapper and threads. Idempotent; the executor cannot be used afterwards.

        Calls waiting for a slot or for admission raise ``RunnerClosedError`` (in a batch: that
        item's result).

        Cancellation: stops waiting; the stops already sent go on.
        """
        self._closed = True
        self._slots.close()
        self._signal_closed()
        await self.runner.aclose()

    def cleanup(self) -> None:
        """Synchronous form of :meth:`aclose` (the PrismQ guide's ``executor.cleanup()``), a last
        resort: kill running children's trees at once (no grace) and release threads. Prefer
        :meth:`aclose` from async code: it records the runs properly. Idempotent."""
        self._closed = True
        self._slots.close()
        self._signal_closed()
        self.runner.wrapper.cleanup()
