"""The PrismQ guide's code, run against this library (issue 13).

Every class and function the two design documents in the seeds folder show ("Background Tasks
Best Practices" and "Subprocess Execution Modes") is used here as the guide's code uses it: the
same names, call shapes and control flow, including the guide's own helper functions
(``execute_module``, ``execute_long_running_task``, ``execute_with_error_handling``...) written as
a host application would port them. Imports come from ``prismq_subprocess`` instead of
``src.core.*``. The only other changes are the guide's own mistakes, each marked ``GUIDE FIX``
here and listed in docs/GUIDE_PORTING.md.

Modes: the guide chooses the mode with ``PRISMQ_RUN_MODE`` (its "Method 1"), so the ``mode``
fixture sets that variable to each real mode and to ``dry-run``; code that pins a mode
(``SubprocessWrapper(mode=RunMode.THREADED)``) keeps its pin, as in the guide. Every child the
guide's code starts carries a marker in its environment, and each test ends by checking that no
marked process is left running.
"""

# The guide's code is kept as the guide writes it: `process, stdout, stderr = ...` unpacks names
# it does not use, and it cancels with try/except/pass rather than contextlib.suppress.
# ruff: noqa: RUF059, SIM105

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from lifecycle_helpers import MARK_VAR, marked, survivors_after, wait_for_marked, zombies

from prismq_subprocess import (
    BackgroundTaskManager,
    CancelResult,
    ConcurrentExecutor,
    MemoryMonitor,
    ModuleExecutionException,
    ModuleRunner,
    OutputCapture,
    PeriodicTask,
    ProcessManager,
    ResourceLimitException,
    ResourceManager,
    ResourcePool,
    Run,
    RunMode,
    RunNotFoundError,
    RunRegistry,
    RunStatus,
    SubprocessPolicyException,
    SubprocessWrapper,
    execute_with_timeout,
    terminate_gracefully,
)

logger = logging.getLogger(__name__)

MODES = ["async", "threaded", "local", "dry-run"]

SCRIPT = """\
import sys, time
print("hello from script", *sys.argv[1:], flush=True)
print("warn", file=sys.stderr, flush=True)
"""

TEST_SCRIPT = """\
import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--test")
print("test_script got", parser.parse_args().test)
"""

SLOW_SCRIPT = """\
import time
print("started", flush=True)
for i in range(600):
    print("tick", i, flush=True)
    time.sleep(0.1)
"""


@pytest.fixture(autouse=True)
def guide_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The guide runs ``'python', 'script.py'`` from the working directory: provide both, and
    mark every child so the test can check none is left running."""
    (tmp_path / "script.py").write_text(SCRIPT)
    (tmp_path / "test_script.py").write_text(TEST_SCRIPT)
    (tmp_path / "slow.py").write_text(SLOW_SCRIPT)
    monkeypatch.chdir(tmp_path)
    # 'python' is this interpreter (a venv's bin holds one), not whatever PATH finds first.
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])
    mark = f"guide-{os.getpid()}-{tmp_path.name}"
    monkeypatch.setenv(MARK_VAR, mark)
    yield tmp_path
    assert survivors_after(mark, 5.0) == [], "the guide's code left a child running"


@pytest.fixture(autouse=True)
async def let_killed_children_settle() -> AsyncIterator[None]:
    """The guide's ``finally: wrapper.cleanup()`` kills synchronously (on a timeout or a cancel);
    an asyncio child is then reaped by asyncio's watcher thread and its pipes are closed by the
    loop a few iterations later. A server's loop keeps running and does that by itself; a test
    that ends at once would close its loop first (and warn about unclosed transports), so give
    the loop those iterations (bounded: the kill is a SIGKILL)."""
    yield
    async with asyncio.timeout(10):
        while zombies():  # noqa: ASYNC110 - asyncio's watcher thread reaps them
            await asyncio.sleep(0.01)
        for _ in range(20):
            await asyncio.sleep(0)


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The guide's Method 1: ``PRISMQ_RUN_MODE`` picks the mode of every auto-detecting wrapper."""
    monkeypatch.setenv("PRISMQ_RUN_MODE", request.param)
    return str(request.param)


def real(mode: str, value: Any, dry: Any) -> Any:
    """What the guide's code sees: ``value`` when children really run, ``dry`` under DRY_RUN
    (exit status 0, no output)."""
    return dry if mode == "dry-run" else value


# --- "Subprocess Execution Modes" -------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("async", RunMode.ASYNC),
        ("threaded", RunMode.THREADED),
        ("local", RunMode.LOCAL),
        ("dry-run", RunMode.DRY_RUN),
    ],
)
async def test_prismq_run_mode_values(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: RunMode
) -> None:
    monkeypatch.setenv("PRISMQ_RUN_MODE", value)
    wrapper = SubprocessWrapper()
    try:
        assert wrapper.mode is expected
    finally:
        wrapper.cleanup()


async def test_auto_detection_without_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # "Linux/macOS: ASYNC" (the Windows rules are unit-tested through injected platform calls).
    monkeypatch.delenv("PRISMQ_RUN_MODE", raising=False)
    wrapper = SubprocessWrapper()
    try:
        expected = RunMode.THREADED if sys.platform == "win32" else RunMode.ASYNC
        assert wrapper.mode is expected
    finally:
        wrapper.cleanup()


async def test_programmatic_configuration() -> None:
    registry = RunRegistry()
    process_manager = ProcessManager()
    # Initialize with specific mode
    runner = ModuleRunner(
        registry=registry, process_manager=process_manager, run_mode=RunMode.THREADED
    )
    run = await runner.execute_module("hello", "Hello", Path("script.py"), {})
    assert (run.status, run.exit_code, run.mode) == (RunStatus.COMPLETED, 0, "threaded")
    await runner.aclose()


# --- Core principles --------------------------------------------------------------------------


async def test_isolation_principle(mode: str) -> None:
    wrapper = SubprocessWrapper()  # Auto-detects best mode
    process, stdout, stderr = await wrapper.create_subprocess("python", "script.py")
    logger.debug(f"Using subprocess mode: {wrapper.mode}")
    assert await process.wait() == 0
    assert await stdout.read() == real(mode, b"hello from script\n", b"")
    wrapper.cleanup()  # GUIDE FIX: the guide's snippet never cleans up (its own Anti-pattern 3)


async def test_explicit_resource_management() -> None:
    wrapper = SubprocessWrapper(mode=RunMode.THREADED)
    try:
        process, stdout, stderr = await wrapper.create_subprocess("python", "script.py")
        # ... use process ...
        assert await process.wait() == 0
        assert await stderr.read() == b"warn\n"
    finally:
        wrapper.cleanup()  # Always cleanup


async def execute_with_error_handling(module_id: str, params: dict[str, Any]) -> Any:
    """The guide's "Exception Hierarchy" handler, around the host's own ``execute_module``."""
    try:
        # Attempt execution
        result = await HOST_MODULES[module_id](params)
        return result

    except SubprocessPolicyException as e:
        logger.error(
            f"Event loop policy error for {module_id}: {e}. "
            f"Restart server with: python -m src.uvicorn_runner"
        )
        raise

    except ResourceLimitException as e:
        logger.warning(f"Resource limit for {module_id}: {e}")
        raise

    except ModuleExecutionException as e:
        logger.error(f"Module {module_id} execution failed: {e}")
        raise

    except asyncio.CancelledError:
        logger.info(f"Module {module_id} execution cancelled")
        raise

    except Exception as e:
        logger.exception(f"Unexpected error executing {module_id}")
        raise ModuleExecutionException(f"Unexpected error: {e}") from e


async def _ok(params: dict[str, Any]) -> str:
    return f"ran with {params}"


async def _short(params: dict[str, Any]) -> None:
    await ResourceManager(max_memory_percent=0.001).admit(wait=False)


async def _policy(params: dict[str, Any]) -> None:
    raise SubprocessPolicyException("ASYNC pinned on a SelectorEventLoop")


async def _broken(params: dict[str, Any]) -> None:
    raise ValueError("bad value")


async def _failing(params: dict[str, Any]) -> None:
    await SubprocessWrapper(RunMode.ASYNC).run("python", "-c", "raise SystemExit(3)", check=True)


HOST_MODULES = {
    "ok": _ok,
    "short": _short,
    "policy": _policy,
    "broken": _broken,
    "failing": _failing,
}


async def test_exception_hierarchy_handling() -> None:
    assert await execute_with_error_handling("ok", {"x": 1}) == "ran with {'x': 1}"
    with pytest.raises(ResourceLimitException):
        await execute_with_error_handling("short", {})
    with pytest.raises(SubprocessPolicyException):
        await execute_with_error_handling("policy", {})
    with pytest.raises(ModuleExecutionException, match="exited with status 3") as failed:
        await execute_with_error_handling("failing", {})
    assert failed.value.returncode == 3
    with pytest.raises(ModuleExecutionException, match="Unexpected error: bad value") as info:
        await execute_with_error_handling("broken", {})
    assert isinstance(info.value.__cause__, ValueError)


# --- Pattern 1: simple module execution -------------------------------------------------------


async def execute_module(script_path: Path, args: list[str], cwd: Path) -> tuple[int, str, str]:
    """Execute a module script and capture output (the guide's Pattern 1)."""
    wrapper = SubprocessWrapper()  # Auto-detect mode

    try:
        # Build command
        cmd = ["python", str(script_path), *args]

        # Create subprocess
        process, stdout, stderr = await wrapper.create_subprocess(*cmd, cwd=cwd)

        logger.info(f"Started process PID={process.pid} for {script_path.name}")

        # Collect output
        stdout_data: list[bytes] = []
        stderr_data: list[bytes] = []

        # Read output line by line
        async def read_stream(stream: Any, buffer: list[bytes]) -> None:
            while True:
                line = await stream.readline()
                if not line:
                    break
                buffer.append(line)
                logger.debug(f"Output: {line.decode().strip()}")

        # Read both streams concurrently
        await asyncio.gather(read_stream(stdout, stdout_data), read_stream(stderr, stderr_data))

        # Wait for process completion
        exit_code = await process.wait()

        logger.info(f"Process completed with exit code {exit_code}")

        return (exit_code, b"".join(stdout_data).decode(), b"".join(stderr_data).decode())

    finally:
        wrapper.cleanup()


async def test_pattern_1_simple_module_execution(mode: str, guide_dir: Path) -> None:
    result = await execute_module(Path("script.py"), ["--n", "3"], guide_dir)
    assert result == real(mode, (0, "hello from script --n 3\n", "warn\n"), (0, "", ""))


# --- Pattern 2: long-running background task --------------------------------------------------


async def execute_long_running_task(
    run_id: str, script_path: Path, output_capture: OutputCapture
) -> None:
    """Execute a long-running task with real-time output capture (the guide's Pattern 2)."""
    wrapper = SubprocessWrapper()

    try:
        process, stdout, stderr = await wrapper.create_subprocess(
            "python", str(script_path), cwd=script_path.parent
        )

        logger.info(f"Started long-running task {run_id}, PID={process.pid}")

        async def stream_output() -> None:
            """Stream output to output capture service."""
            while True:
                line = await stdout.readline()
                if not line:
                    break

                # Send to output capture service for SSE streaming
                await output_capture.append_line(run_id, line.decode())

        # Start output streaming as background task
        stream_task = asyncio.create_task(stream_output())

        # Wait for process or cancellation
        try:
            exit_code = await process.wait()
            # GUIDE FIX: let the reader take the last lines before the finally cancels it.
            await stream_task
            logger.info(f"Task {run_id} completed with exit code {exit_code}")
        except asyncio.CancelledError:
            logger.warning(f"Task {run_id} cancelled, terminating process")
            process.terminate()  # GUIDE FIX: terminate() is not a coroutine (no await)
            await asyncio.wait_for(process.wait(), timeout=5.0)
            raise
        finally:
            # Ensure streaming task is cleaned up
            stream_task.cancel()
            try:
                await stream_task
            except asyncio.CancelledError:
                pass

    finally:
        wrapper.cleanup()


async def test_pattern_2_long_running_task(mode: str, guide_dir: Path) -> None:
    output_capture = OutputCapture()
    await execute_long_running_task("run-1", guide_dir / "script.py", output_capture)
    assert output_capture.get_lines("run-1") == real(mode, ["hello from script"], [])
    await output_capture.aclose()


@pytest.mark.parametrize("mode", ["async", "threaded", "local"], indirect=True)
async def test_pattern_2_cancellation_terminates_the_process(mode: str, guide_dir: Path) -> None:
    # DRY_RUN cannot express this: its process has ended before anyone can cancel.
    output_capture = OutputCapture()
    task = asyncio.create_task(
        execute_long_running_task("run-2", guide_dir / "slow.py", output_capture)
    )
    # LOCAL shows no output before the child exits, so wait for the child itself.
    await asyncio.to_thread(wait_for_marked, os.environ[MARK_VAR], 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert marked(os.environ[MARK_VAR]) == []  # terminated by the guide's cancel path
    await output_capture.aclose()


# --- Pattern 3: concurrent module execution ---------------------------------------------------


async def test_pattern_3_concurrent_executor(mode: str, guide_dir: Path) -> None:
    resource_manager = ResourceManager(max_memory_percent=100.0)
    assert await resource_manager.check_resources() is True
    executor = ConcurrentExecutor(max_concurrent=2, resource_manager=resource_manager)
    try:
        result = await executor.execute_module("single", guide_dir / "script.py", ["a"])
        assert result["module_id"] == "single"
        assert (result["exit_code"], result["success"]) == (0, True)
        results = await executor.execute_batch(
            [(f"mod-{i}", guide_dir / "script.py", [str(i)]) for i in range(4)]
        )
        assert [r["module_id"] for r in results] == [f"mod-{i}" for i in range(4)]
        assert all(r["exit_code"] == 0 and r["success"] for r in results)
        assert results[2]["output_tail"] == real(mode, ["hello from script 2", "warn"], [])
    finally:
        executor.cleanup()


# --- Pattern 4: fire-and-forget with tracking -------------------------------------------------


async def test_pattern_4_background_task_manager(mode: str, guide_dir: Path) -> None:
    registry = RunRegistry()
    manager = BackgroundTaskManager(registry)

    run = Run(module_id="script", module_name="Script")
    run_id = manager.start_task(run, execute_module(Path("script.py"), [], guide_dir))
    assert run_id == run.run_id and run_id in manager.tasks
    logger.info(f"Started background task {run_id}")

    async def fails() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("module crashed")

    failed = manager.start_task(Run(module_id="crash"), fails())

    async def returns_one() -> int:
        return 1

    # The guide's meaning: any normal return is COMPLETED with exit code 0, whatever the value.
    one = manager.start_task(Run(module_id="one"), returns_one())
    slow = manager.start_task(Run(module_id="slow"), asyncio.sleep(3600))

    await asyncio.sleep(0.01)
    # The guide's cancel_task returns a bool; ours returns a CancelResult that is true exactly
    # when the run was cancelled, so the guide's `if await manager.cancel_task(...)` still works.
    assert await manager.cancel_task(slow) == CancelResult.CANCELLED
    assert not await manager.cancel_task(slow)  # already finished now
    assert await manager.cancel_task("no-such-run") == CancelResult.NOT_FOUND
    await manager.wait_all()
    assert manager.tasks == {}

    done = await registry.get_run(run_id)
    assert done is not None and (done.status, done.exit_code) == (RunStatus.COMPLETED, 0)
    returned_one = await registry.get_run(one)
    assert returned_one is not None
    assert (returned_one.status, returned_one.exit_code) == (RunStatus.COMPLETED, 0)
    crashed = await registry.get_run(failed)
    assert crashed is not None and crashed.status is RunStatus.FAILED
    assert crashed.error_message is not None and "module crashed" in crashed.error_message
    cancelled = await registry.get_run(slow)
    assert cancelled is not None and cancelled.status is RunStatus.CANCELLED
    await manager.shutdown()


async def guide_execute_task(registry: RunRegistry, run: Run, coro: Any) -> None:
    """The body of the guide's ``BackgroundTaskManager._execute_task``, on our Run and registry."""
    try:
        # Update status to running
        run.status = RunStatus.RUNNING
        await registry.update_run(run)

        # Execute the actual task
        await coro

        # Update status to completed
        run.status = RunStatus.COMPLETED
        run.exit_code = 0
        await registry.update_run(run)

    except asyncio.CancelledError:
        run.status = RunStatus.CANCELLED
        await registry.update_run(run)
        raise

    except Exception as e:
        run.status = RunStatus.FAILED
        run.error_message = str(e)
        await registry.update_run(run)


async def test_pattern_4_the_guides_own_status_updates() -> None:
    registry = RunRegistry()
    run = Run(module_id="m")
    coro = asyncio.sleep(0)
    # The guide's manager never adds the run; our update_run is not an upsert and says so.
    with pytest.raises(RunNotFoundError, match="add_run"):
        await guide_execute_task(registry, run, coro)
    await coro  # the guide's code never reached it

    run = Run(module_id="m")
    await registry.add_run(run)
    await guide_execute_task(registry, run, asyncio.sleep(0))
    stored = await registry.get_run(run.run_id)
    assert stored is not None and (stored.status, stored.exit_code) == (RunStatus.COMPLETED, 0)
    # Assigning the status stamps the times the mark_* methods would.
    assert stored.started_at is not None and stored.finished_at is not None

    async def boom() -> None:
        raise ValueError("boom")

    failing = Run(module_id="f")
    await registry.add_run(failing)
    await guide_execute_task(registry, failing, boom())
    stored = await registry.get_run(failing.run_id)
    assert stored is not None and (stored.status, stored.error_message) == (
        RunStatus.FAILED,
        "boom",
    )


# --- Pattern 5: periodic background tasks -----------------------------------------------------


async def test_pattern_5_periodic_task() -> None:
    ran = asyncio.Event()

    async def cleanup_old_runs() -> None:
        """Example periodic cleanup task."""
        logger.info("Running cleanup of old runs")
        ran.set()

    # Start periodic cleanup (GUIDE FIX: from async code, not at module level: start() needs a
    # running event loop)
    cleanup_task = PeriodicTask(
        name="cleanup_old_runs", interval=timedelta(hours=1), task_func=cleanup_old_runs
    )
    cleanup_task.start()
    # As in the guide, the first run is at once, not an hour later.
    await asyncio.wait_for(ran.wait(), 10)
    assert cleanup_task.name == "cleanup_old_runs" and cleanup_task.task_func is cleanup_old_runs
    assert (cleanup_task.args, cleanup_task.kwargs) == ((), {})
    await cleanup_task.stop()
    assert cleanup_task.stats.runs == 1 and not cleanup_task.is_running

    # The constructor's *args and **kwargs are passed to task_func on every run.
    calls: list[tuple[str, int]] = []

    async def prune(table: str, keep: int = 0) -> None:
        calls.append((table, keep))

    prune_task = PeriodicTask("prune", timedelta(hours=1), prune, "runs", keep=30)
    prune_task.start()
    async with asyncio.timeout(10):
        while not calls:  # noqa: ASYNC110 - the first run is at once
            await asyncio.sleep(0.01)
    await prune_task.stop()
    assert calls == [("runs", 30)]
    assert (prune_task.args, prune_task.kwargs) == (("runs",), {"keep": 30})


def test_pattern_5_start_at_module_level_says_what_to_do() -> None:
    # The guide calls cleanup_task.start() at module level, where no event loop runs (GUIDE
    # mistake 8): the error says so and what to do, rather than asyncio's bare message.
    async def cleanup_old_runs() -> None:
        logger.info("Running cleanup of old runs")

    cleanup_task = PeriodicTask(
        name="cleanup_old_runs", interval=timedelta(hours=1), task_func=cleanup_old_runs
    )
    with pytest.raises(RuntimeError, match=r"start\(\) needs a running event loop.*async code"):
        cleanup_task.start()
    assert not cleanup_task.is_running


# --- Timeout handling -------------------------------------------------------------------------


async def test_execute_with_timeout(mode: str, guide_dir: Path) -> None:
    result = await execute_with_timeout(
        execute_module(Path("script.py"), [], guide_dir), timeout=60, task_name="script"
    )
    assert result[0] == 0
    with pytest.raises(asyncio.TimeoutError):
        await execute_with_timeout(asyncio.sleep(10), 0.05, "sleeper")
    if mode != "dry-run":  # a dry run ends at once: nothing to time out
        with pytest.raises(asyncio.TimeoutError, match="task 'slow module'"):
            await execute_with_timeout(
                execute_module(Path("slow.py"), [], guide_dir), 1.0, "slow module"
            )


# --- Pattern 6: resource pooling --------------------------------------------------------------


async def test_pattern_6_resource_pool(mode: str) -> None:
    pool = ResourcePool(max_workers=10)

    async def use_pooled_resource() -> int:
        async with pool.acquire_subprocess() as wrapper:
            process, stdout, stderr = await wrapper.create_subprocess("python", "script.py")
            return await process.wait()

    assert await asyncio.gather(*(use_pooled_resource() for _ in range(3))) == [0, 0, 0]
    # Cleanup on shutdown
    pool.cleanup()


# --- Memory management ------------------------------------------------------------------------


async def test_memory_monitor() -> None:
    monitor = MemoryMonitor(max_memory_percent=80.0, check_interval=5.0)
    assert (monitor.max_memory_percent, monitor.check_interval) == (80.0, 5.0)
    assert isinstance(monitor.check_memory(), bool)
    task = asyncio.create_task(monitor.monitor_continuously())
    await asyncio.sleep(0.05)
    monitor.stop_monitoring()
    # Returns without waiting out the 5 s interval (the guide's loop would sleep it out).
    await asyncio.wait_for(task, 4)


# --- Testing background tasks: the guide's own tests ------------------------------------------


@pytest.mark.asyncio
async def test_execute_module_success() -> None:
    """Test successful module execution."""
    wrapper = SubprocessWrapper(mode=RunMode.DRY_RUN)  # Use DRY_RUN for testing

    try:
        process, stdout, stderr = await wrapper.create_subprocess("python", "--version")

        exit_code = await process.wait()
        assert exit_code == 0

    finally:
        wrapper.cleanup()


@pytest.mark.asyncio
async def test_execute_module_timeout() -> None:
    """Test module execution timeout handling."""
    wrapper = SubprocessWrapper(mode=RunMode.LOCAL)

    try:
        process, stdout, stderr = await wrapper.create_subprocess(
            "python", "-c", "import time; time.sleep(10)"
        )

        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), timeout=1.0)

    finally:
        wrapper.cleanup()


@pytest.mark.asyncio
async def test_concurrent_execution(mode: str) -> None:
    """Test concurrent module execution."""
    wrapper = SubprocessWrapper()

    try:
        # Start multiple processes
        processes = []
        for i in range(3):
            process, stdout, stderr = await wrapper.create_subprocess(
                "python", "-c", f'print("{i}")'
            )
            processes.append(process)

        # Wait for all
        exit_codes = await asyncio.gather(*[p.wait() for p in processes])

        assert all(code == 0 for code in exit_codes)

    finally:
        wrapper.cleanup()


@pytest.mark.parametrize("mode", ["async", "threaded", "local"], indirect=True)
async def test_the_guides_timeout_test_in_every_real_mode(mode: str) -> None:
    wrapper = SubprocessWrapper()
    try:
        process, stdout, stderr = await wrapper.create_subprocess(
            "python", "-c", "import time; time.sleep(10)"
        )
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(process.wait(), timeout=1.0)
    finally:
        wrapper.cleanup()


@pytest.mark.asyncio
async def test_full_module_execution_flow(mode: str) -> None:
    """Test complete module execution flow."""
    # Setup
    registry = RunRegistry()
    process_manager = ProcessManager()
    runner = ModuleRunner(registry=registry, process_manager=process_manager)

    # Execute module
    module_id = "test-module"
    script_path = Path("test_script.py")
    params = {"test": "value"}

    run = await runner.execute_module(
        module_id=module_id, module_name="Test Module", script_path=script_path, parameters=params
    )

    # Verify
    assert run is not None
    assert run.status == RunStatus.COMPLETED
    assert run.exit_code == 0
    assert run.output_tail == real(mode, ["test_script got value"], [])
    await runner.aclose()


# --- Anti-patterns: the "DO THIS" code --------------------------------------------------------


async def test_anti_pattern_fixes(mode: str) -> None:
    # Anti-pattern 1
    wrapper = SubprocessWrapper()
    process, stdout, stderr = await wrapper.create_subprocess("python", "script.py")
    assert await process.wait() == 0
    wrapper.cleanup()  # GUIDE FIX: the "DO THIS" never cleans up (its own Anti-pattern 3)

    # Anti-pattern 2
    async def good_async_function() -> int:
        wrapper = SubprocessWrapper()
        try:
            process, stdout, stderr = await wrapper.create_subprocess("python", "script.py")
            exit_code = await process.wait()
            return exit_code
        finally:
            wrapper.cleanup()

    assert await good_async_function() == 0

    # Anti-pattern 3
    async def proper_function() -> None:
        wrapper = SubprocessWrapper(mode=RunMode.THREADED)
        try:
            process, stdout, stderr = await wrapper.create_subprocess("python", "script.py")
            await process.wait()
        finally:
            wrapper.cleanup()

    await proper_function()

    # Anti-pattern 5
    semaphore = asyncio.Semaphore(2)  # Max 2 concurrent
    running = 0
    peak = 0

    async def execute_with_limit(module: str) -> tuple[int, str, str]:
        nonlocal running, peak
        async with semaphore:
            running += 1
            peak = max(peak, running)
            try:
                return await execute_module(Path(module), [], Path.cwd())
            finally:
                running -= 1

    modules = ["script.py"] * 5
    tasks = [execute_with_limit(m) for m in modules]
    results = await asyncio.gather(*tasks)
    assert [code for code, _, _ in results] == [0] * 5 and peak <= 2


# --- Troubleshooting: process doesn't terminate -----------------------------------------------


async def guide_terminate_gracefully(process: Any) -> None:
    """The guide's own ``terminate_gracefully``."""
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout=5.0)
    except TimeoutError:
        logger.warning("Process didn't terminate, killing it")
        process.kill()
        await process.wait()


@pytest.mark.parametrize("mode", ["async", "threaded", "local"], indirect=True)
async def test_terminate_gracefully(mode: str) -> None:
    # DRY_RUN cannot express this: its process has already ended.
    wrapper = SubprocessWrapper()
    try:
        for stop in (guide_terminate_gracefully, terminate_gracefully):
            process, stdout, stderr = await wrapper.create_subprocess("python", "slow.py")
            await asyncio.to_thread(wait_for_marked, os.environ[MARK_VAR], 1)
            await stop(process)
            assert process.returncode is not None and process.returncode != 0
            assert marked(os.environ[MARK_VAR]) == []
    finally:
        wrapper.cleanup()


async def test_terminate_gracefully_on_a_dry_run_process() -> None:
    wrapper = SubprocessWrapper(mode=RunMode.DRY_RUN)
    try:
        process, stdout, stderr = await wrapper.create_subprocess("python", "slow.py")
        assert await terminate_gracefully(process) == 0
    finally:
        wrapper.cleanup()
