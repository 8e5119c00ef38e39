"""One closing protocol: every object that holds resources has ``aclose()`` (idempotent) and
``async with``; the PrismQ guide's verbs stay as aliases; closed objects raise a ClosedError.

Each resource is described once in CASES; the same four checks run over all of them.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import py

import prismq_subprocess as pq
from prismq_subprocess.abc import AsyncResource
from prismq_subprocess.exceptions import (
    BackendClosedError,
    ClosedError,
    OutputClosedError,
    PoolClosedError,
    PrismQError,
    RegistryClosedError,
    RunnerClosedError,
    TaskManagerClosedError,
    WrapperClosedError,
)

CLOSED_ERRORS = [
    BackendClosedError,
    OutputClosedError,
    PoolClosedError,
    RegistryClosedError,
    RunnerClosedError,
    TaskManagerClosedError,
    WrapperClosedError,
]


async def _noop() -> None:
    return None


def _reading() -> pq.ResourceSnapshot:
    return pq.ResourceSnapshot(memory_percent=10.0, available_bytes=1, total_bytes=2)


@dataclass
class Case:
    """How to make one resource, call its old verb, and use it once closed."""

    make: Callable[[Path], Any]
    #: The pre-0.2 / guide verb, called on the object (sync or async); None: aclose() only.
    alias: Callable[[Any], object] | None
    #: Uses the object after closing; must raise ``error``. None: the object has no closed state.
    use: Callable[[Any], Awaitable[object]] | None
    error: type[ClosedError] | None = None
    #: For objects without a closed state: true once the object has released what it ran.
    idle: Callable[[Any], bool] | None = None


async def _start_module(runner: pq.ModuleRunner) -> object:
    return await runner.execute_module("m", "M", __file__)


async def _borrow(pool: pq.ResourcePool) -> None:
    async with pool.acquire_subprocess():
        pass


def _run(status: pq.RunStatus = pq.RunStatus.PENDING) -> pq.Run:
    return pq.Run(module_id="m", module_name="M", status=status)


async def _start_task(manager: pq.BackgroundTaskManager) -> object:
    return await manager.start_task(_run(), _noop())


CASES: dict[str, Case] = {
    "SubprocessWrapper": Case(
        make=lambda _: pq.SubprocessWrapper(pq.RunMode.THREADED),
        alias=lambda w: w.cleanup(),
        use=lambda w: w.run(*py("pass")),
        error=WrapperClosedError,
    ),
    "ModuleRunner": Case(
        make=lambda _: pq.ModuleRunner(pq.RunRegistry(), run_mode=pq.RunMode.DRY_RUN),
        alias=None,
        use=_start_module,
        error=RunnerClosedError,
    ),
    "ConcurrentExecutor": Case(
        make=lambda _: pq.ConcurrentExecutor(run_mode=pq.RunMode.DRY_RUN),
        alias=lambda e: e.cleanup(),
        use=lambda e: e.execute_module("m", "M", __file__),
        error=RunnerClosedError,
    ),
    "ResourcePool": Case(
        make=lambda _: pq.ResourcePool(2, run_mode=pq.RunMode.DRY_RUN),
        alias=lambda p: p.cleanup(),
        use=_borrow,
        error=PoolClosedError,
    ),
    "RunRegistry": Case(
        make=lambda _: pq.RunRegistry(),
        alias=lambda r: r.close(),
        use=lambda r: r.get_run("x"),
        error=RegistryClosedError,
    ),
    "SQLiteRunRegistry": Case(
        make=lambda tmp: pq.SQLiteRunRegistry(tmp / "runs.db"),
        alias=lambda r: r.close(),
        use=lambda r: r.get_run("x"),
        error=RegistryClosedError,
    ),
    "BackgroundTaskManager": Case(
        make=lambda _: pq.BackgroundTaskManager(pq.RunRegistry()),
        alias=lambda m: m.shutdown(),
        use=_start_task,
        error=TaskManagerClosedError,
    ),
    "OutputCapture": Case(
        make=lambda tmp: pq.OutputCapture(log_dir=tmp),
        alias=None,
        use=lambda c: c.append_line("run-1", "late line"),
        error=OutputClosedError,
    ),
    "ProcessManager": Case(
        make=lambda _: pq.ProcessManager(),
        alias=lambda m: m.stop_all(),
        use=None,
        idle=lambda m: not m.live(),
    ),
    "PeriodicTask": Case(
        make=lambda _: pq.PeriodicTask("tick", 60.0, _noop),
        alias=lambda t: t.stop(),
        use=None,
        idle=lambda t: not t.is_running,
    ),
    "ProcessTreeSampler": Case(
        make=lambda _: pq.ProcessTreeSampler(os.getpid(), interval=60.0),
        alias=lambda s: s.stop(),
        use=None,
        idle=lambda s: not s.is_running,
    ),
    "MemoryMonitor": Case(
        make=lambda _: pq.MemoryMonitor(check_interval=60.0, reader=_reading),
        alias=lambda m: m.stop_monitoring(),
        use=None,
        idle=lambda m: not m.is_monitoring,
    ),
}


async def _call(result: object) -> None:
    if inspect.isawaitable(result):
        await result


async def _assert_closed(case: Case, obj: Any) -> None:
    if case.use is not None:
        assert case.error is not None
        with pytest.raises(case.error) as info:
            await case.use(obj)
        assert isinstance(info.value, ClosedError)
    else:
        assert case.idle is not None
        # A stop request may need one loop turn to be seen (the guide's sync stop_monitoring).
        for _ in range(100):
            if case.idle(obj):
                break
            await asyncio.sleep(0.01)
        assert case.idle(obj)


async def _started(name: str, obj: Any) -> Any:
    """Give the object something to release, so closing has work to do."""
    if name in ("PeriodicTask", "ProcessTreeSampler"):
        obj.start()
    elif name == "MemoryMonitor":
        await obj.__aenter__()
    elif name == "ProcessManager":
        process = await asyncio.create_subprocess_exec(
            *py("import time; time.sleep(60)"), start_new_session=sys.platform != "win32"
        )
        obj.register("run-1", process)
    return obj


@pytest.fixture(params=sorted(CASES))
def case_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_every_resource_is_an_async_resource(case_name: str, tmp_path: Path) -> None:
    obj = CASES[case_name].make(tmp_path)
    try:
        assert isinstance(obj, AsyncResource)
        assert inspect.iscoroutinefunction(type(obj).aclose)
        assert inspect.getdoc(type(obj).aclose)
    finally:
        await obj.aclose()


async def test_aclose_is_idempotent(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    obj = await _started(case_name, case.make(tmp_path))
    await obj.aclose()
    await obj.aclose()
    await _assert_closed(case, obj)


async def test_async_with_closes(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    async with case.make(tmp_path) as obj:
        await _started(case_name, obj)
    await _assert_closed(case, obj)


async def test_the_old_verb_still_closes(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    if case.alias is None:
        pytest.skip(f"{case_name} never had another closing verb")
    obj = await _started(case_name, case.make(tmp_path))
    await _call(case.alias(obj))
    try:
        await _assert_closed(case, obj)
    finally:
        await obj.aclose()


async def test_entering_a_closed_resource_raises(case_name: str, tmp_path: Path) -> None:
    case = CASES[case_name]
    if case.error is None:
        pytest.skip(f"{case_name} has no closed state: it may be started again")
    obj = case.make(tmp_path)
    await obj.aclose()
    with pytest.raises(case.error):
        async with obj:
            pass


def test_closed_errors_share_one_base() -> None:
    assert issubclass(ClosedError, PrismQError) and issubclass(ClosedError, RuntimeError)
    for error in CLOSED_ERRORS:
        assert issubclass(error, ClosedError), error
        assert issubclass(error, RuntimeError), error
    assert pq.ClosedError is ClosedError


def test_every_closed_error_is_a_closed_error() -> None:
    named = {
        getattr(pq.exceptions, name)
        for name in pq.exceptions.__all__
        if name.endswith("ClosedError") and name != "ClosedError"
    }
    assert named == set(CLOSED_ERRORS)


#: Public classes with a closing-like method that are not resources, and why.
NOT_RESOURCES = {
    # close() is the hook SubprocessWrapper.aclose()/cleanup() calls, not a user-facing verb.
    "SubprocessStrategy": "hook",
    "AsyncStrategy": "hook",
    "ThreadedStrategy": "hook",
    "LocalStrategy": "hook",
    "DryRunStrategy": "hook",
    # close() of asyncio's StreamWriter, which the protocol copies.
    "StreamWriterLike": "asyncio",
}


def test_every_public_class_with_a_closing_verb_is_an_async_resource() -> None:
    verbs = {"aclose", "cleanup", "close", "shutdown", "stop_all", "stop_monitoring", "stop"}
    resources = set()
    for module in (pq, pq.abc, pq.testing):
        for name in module.__all__:
            obj = getattr(module, name)
            if not inspect.isclass(obj) or issubclass(obj, BaseException):
                continue
            if name in NOT_RESOURCES or not verbs & set(dir(obj)):
                continue
            assert issubclass(obj, AsyncResource), name
            resources.add(name)
    # Abstract bases (and the Dask backend, tested with its cluster in tests/dask/).
    abstract = {"AsyncResource", "BaseRunRegistry", "RunBackend"}
    covered = set(CASES) | {"LineStream", "OutputSubscription"} | abstract
    assert resources == covered


async def test_a_subscription_ends_when_closed() -> None:
    capture = pq.OutputCapture()
    capture.open_run("run-1")
    async with capture.subscribe("run-1") as subscription:
        await capture.append_line("run-1", "first")
        assert await anext(subscription) == pq.OutputLine(0, "first")
    await subscription.aclose()  # idempotent
    with pytest.raises(StopAsyncIteration):
        await anext(subscription)
    await capture.aclose()


async def test_a_capture_closed_first_ends_new_subscriptions_at_once() -> None:
    capture = pq.OutputCapture()
    await capture.append_line("seen", "kept")
    await capture.aclose()
    assert [item async for item in capture.subscribe("seen")] == [pq.OutputLine(0, "kept")]
    with pytest.raises(pq.OutputNotFoundError):  # unknown runs raise, closed capture or not
        capture.subscribe("never-seen")
    assert capture.get_lines("seen") == ["kept"]


async def test_a_line_stream_closes_its_child() -> None:
    async with pq.SubprocessWrapper(pq.RunMode.ASYNC, grace_period=1.0) as wrapper:
        stream = wrapper.stream(*py("print('up', flush=True); import time; time.sleep(60)"))
        await stream.__aenter__()
        assert await anext(stream) == b"up\n"
        child = psutil.Process(stream.process.pid)
        await stream.aclose()
        assert stream.returncode is not None
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        await stream.aclose()


async def test_a_stopped_scheduler_may_be_started_again() -> None:
    ticks: list[int] = []

    async def tick() -> None:
        ticks.append(1)

    task = pq.PeriodicTask("tick", 60.0, tick, run_immediately=True)
    async with task:
        await asyncio.sleep(0)
    task.start()
    assert task.is_running
    await task.aclose()
    assert not task.is_running


async def test_a_monitor_closed_before_its_task_ran_stops() -> None:
    monitor = pq.MemoryMonitor(check_interval=60.0, reader=_reading)
    await monitor.__aenter__()
    await monitor.aclose()  # the monitoring task had not started yet
    assert not monitor.is_monitoring
    async with monitor:
        for _ in range(100):
            if monitor.latest is not None:
                break
            await asyncio.sleep(0.01)
        assert monitor.is_monitoring and monitor.latest is not None
    assert not monitor.is_monitoring


@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
async def test_aclose_stops_a_child_that_run_is_waiting_for(mode: str) -> None:
    """run() reports its child to the wrapper like every other entry point, so closing the
    wrapper stops it (a strategy's run() must start children through the tracked path)."""
    wrapper = pq.SubprocessWrapper(mode, grace_period=1.0)
    running = asyncio.create_task(wrapper.run(*py("import time; time.sleep(60)")))
    for _ in range(1000):
        if wrapper.live_processes or running.done():
            break
        await asyncio.sleep(0.01)
    [process] = wrapper.live_processes
    await wrapper.aclose()
    assert process.returncode is not None
    async with asyncio.timeout(10):
        await asyncio.wait({running})
    if not running.cancelled() and running.exception() is None:
        assert running.result().returncode != 0
