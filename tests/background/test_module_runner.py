"""ModuleRunner: statuses, parameter mapping, live output, cancel, timeout, memory cap."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sqlite3
import sys
import textwrap
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import psutil
import pytest
from anyio_support import cancelled_after
from conftest import REAL, WRAPPER_FACTORIES
from lifecycle_helpers import marked_env, survivors_after

import prismq_subprocess as pq
from prismq_subprocess._background._memory_registry import BaseRunRegistry
from prismq_subprocess._background._module_args import parameters_to_args
from prismq_subprocess._background._module_runner import ModuleRunner
from prismq_subprocess._background._process_manager import ProcessManager
from prismq_subprocess._background._run_checks import check_nesting
from prismq_subprocess._core._exceptions import (
    InvalidIntervalError,
    InvalidParametersError,
    OutputClosedError,
    RegistryBusyError,
    RunClaimedError,
    RunnerClosedError,
    ScriptNotFoundError,
)
from prismq_subprocess._platform._orphans import verify_orphan

MODES = ["async", "threaded"]

ECHO_ARGS = """
import json, sys
print(json.dumps(sys.argv[1:]))
print("to stderr", file=sys.stderr)
"""

FAIL = """
import sys
print("working")
sys.exit("bad input: count must be positive")
"""

# Prints "first", waits for a go-file to appear, prints "second".
WAIT_FOR_FILE = """
import os, sys, time
print("first")
while not os.path.exists(sys.argv[2]):
    time.sleep(0.01)
print("second")
"""

# Prints its own pid and a grandchild's, then sleeps.
TREE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("pids", child.pid, flush=True)
time.sleep(60)
"""

SLEEP = """
import time
print("sleeping")
time.sleep(60)
"""

# Grows by 5 MiB every 20 ms up to 200 MiB (pages written, so they count as RSS), then idles.
ALLOCATE_200_MIB = """
import time
blocks = []
for _ in range(40):
    blocks.append(bytearray(b"x" * (5 * 1024 * 1024)))
    time.sleep(0.02)
print("allocated", flush=True)
time.sleep(30)
"""

BUSY = """
import time
end = time.process_time() + 0.3
while time.process_time() < end:
    pass
print("done")
"""


def script(tmp_path: Path, name: str, code: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(code))
    return path


@pytest.fixture(params=MODES)
async def runner(request: pytest.FixtureRequest) -> AsyncIterator[ModuleRunner]:
    wrapper = WRAPPER_FACTORIES[request.param]()
    async with (
        wrapper,
        pq.RunRegistry() as registry,
        pq.OutputCapture() as output,
        ModuleRunner(
            registry, output=output, wrapper=wrapper, grace_period=1.0, sample_interval=0.05
        ) as r,
    ):
        yield r


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def eventually_gone(pid: int) -> bool:
    # A grandchild is reaped by init, not by us: give that a moment.
    for _ in range(200):
        if gone(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def first_line(output: pq.OutputCapture, run_id: str, prefix: str) -> str:
    # wait: a foreground run started by a task not yet scheduled is not known to the capture yet.
    async with output.subscribe(run_id, wait=30.0) as lines:
        async for item in lines:
            if isinstance(item, pq.OutputLine) and item.text.startswith(prefix):
                return item.text
    raise AssertionError(f"run {run_id} ended without a line starting with {prefix!r}")


# -- parameters -------------------------------------------------------------------------------
def test_parameter_mapping_rule() -> None:
    params = {"count": 3, "verbose": True, "tags": ["a", "b"], "skip": False, "x": None}
    assert parameters_to_args(params) == ["--count", "3", "--verbose", "--tags", "a", "--tags", "b"]
    assert parameters_to_args({"n": -2, "ratio": 0.5, "name": "--x"}) == [
        "--n=-2",
        "--ratio",
        "0.5",
        "--name=--x",
    ]
    assert parameters_to_args({"cfg": {"a": 1}, "flags": [True, 2, [1]]}) == [
        "--cfg",
        '{"a":1}',
        "--flags",
        "true",
        "--flags",
        "2",
        "--flags",
        "[1]",
    ]
    assert parameters_to_args({}) == parameters_to_args(None) == []


@pytest.mark.parametrize(
    "params",
    [
        {"when": object()},
        {"nan": float("nan")},
        {"-bad": 1},
        {"with space": 1},
        {1: "x"},
        {"items": [None]},
        {"text": "a\x00b"},
        {"items": ["ok", "a\x00b"]},
        ["not", "a", "mapping"],
    ],
)
def test_bad_parameters_are_refused(params: Any) -> None:
    with pytest.raises(InvalidParametersError):
        parameters_to_args(params)


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
@pytest.mark.parametrize("levels", [600, 100_000])
async def test_parameters_nested_too_deeply_are_refused_before_anything_is_stored(
    tmp_path: Path, kind: str, levels: int
) -> None:
    # A security probe's finds: 600 levels were stored and run by SQLite (then the run's
    # to_dict() raised a bare RecursionError for every list endpoint); 100,000 levels raised a
    # bare RecursionError from the arguments' mapping.
    value: object = 0
    for _ in range(levels):
        value = [value]
    ok = script(tmp_path, "ok", "pass")
    registry: BaseRunRegistry = (
        pq.RunRegistry() if kind == "memory" else pq.SQLiteRunRegistry(tmp_path / "runs.db")
    )
    async with registry, ModuleRunner(registry) as runner:
        with pytest.raises(InvalidParametersError, match="nested"):
            await runner.start_module("m", "M", ok, {"x": value})
        with pytest.raises(InvalidParametersError, match="nested"):
            parameters_to_args({"x": value})
        # A list holding itself twice (a review's find: the walk doubled at every level and
        # ran out of memory).
        twice: list[object] = []
        twice += [twice, twice]
        with pytest.raises(InvalidParametersError, match=r"Circular|nested"):
            await runner.start_module("m", "M", ok, {"x": twice})
        with pytest.raises(InvalidParametersError, match="nested"):
            check_nesting("parameters", {"x": twice})
        assert await registry.count_runs() == 0


async def test_a_missing_relative_path_says_where_it_was_looked_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A web server's current directory is wherever it was started from, so a relative script
    path that works from one directory is missing from another; the error said only
    "module script 'jobs/count.py' does not exist", not where it had looked."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    async with pq.RunRegistry() as registry, ModuleRunner(registry) as runner:
        with pytest.raises(ScriptNotFoundError) as info:
            await runner.start_module("m", "M", "jobs/count.py")
        assert f"from the current directory {str(tmp_path)!r}" in str(info.value)
        with pytest.raises(ScriptNotFoundError) as info:
            await runner.start_module("m", "M", "jobs/count.py", cwd="data")
        assert "relative to cwd 'data'" in str(info.value)
        with pytest.raises(pq.CommandNotFoundError) as found:
            await runner.start_command("m", "M", ["./build.sh"])
        assert f"from the current directory {str(tmp_path)!r}" in str(found.value)
        # An absolute path needs no hint.
        with pytest.raises(ScriptNotFoundError) as info:
            await runner.start_module("m", "M", tmp_path / "jobs" / "count.py")
        assert "current directory" not in str(info.value)
        assert await registry.count_runs() == 0


async def test_bad_input_raises_before_anything_is_stored(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    with pytest.raises(ScriptNotFoundError) as info:
        await runner.execute_module("m", "M", tmp_path / "missing.py")
    assert isinstance(info.value, FileNotFoundError)
    assert "missing.py" in str(info.value)
    with pytest.raises(ScriptNotFoundError):
        await runner.start_module("m", "M", tmp_path)  # a directory without __main__.py
    ok = script(tmp_path, "ok", "pass")
    with pytest.raises(InvalidParametersError):
        await runner.execute_module("m", "M", ok, {"when": object()})
    with pytest.raises(pq.exceptions.InvalidTimeoutError):
        await runner.execute_module("m", "M", ok, timeout=-1)
    with pytest.raises(pq.exceptions.InvalidLimitError):
        await runner.execute_module("m", "M", ok, memory_limit_bytes=0)
    with pytest.raises(pq.exceptions.CwdNotFoundError):
        await runner.execute_module("m", "M", "ok.py", cwd=tmp_path / "nope")
    # A NUL byte cannot be passed to a program: refused here, not recorded as a failed start.
    with pytest.raises(InvalidParametersError, match="NUL"):
        await runner.execute_module("m", "M", ok, {"text": "a\x00b"})
    with pytest.raises(InvalidParametersError, match="NUL"):
        await runner.start_module("m", "M", ok, {"items": ["a\x00b"]})
    with pytest.raises(pq.exceptions.InvalidCommandError, match="NUL"):
        await runner.execute_module("m", "M", ok, args=["ok", "a\x00b"])
    with pytest.raises(pq.exceptions.InvalidCommandError, match="NUL"):
        await runner.start_module("m", "M", ok, args=[Path("a\x00b")])
    # Nor a lone surrogate (a JSON body may carry "\ud800"; a probe: the run was stored, then
    # recorded FAILED); an undecodable byte carried by surrogateescape is fine.
    with pytest.raises(InvalidParametersError, match="lone surrogate"):
        await runner.start_module("m", "M", ok, {"text": "a\ud800b"})
    with pytest.raises(InvalidParametersError, match="lone surrogate"):
        await runner.execute_module("m", "M", ok, {"items": ["ok", "\udfff"]})
    with pytest.raises(pq.exceptions.InvalidCommandError, match="lone surrogate"):
        await runner.start_module("m", "M", ok, args=["\ud800"])
    # Arguments mixed up (an adversary's find: recorded as module_id 'None' and module_name
    # "{'count': 3}", and run).
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="module_id"):
        await runner.start_module(None, {"count": 3}, ok, {})  # type: ignore[arg-type]
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="module_name"):
        await runner.execute_module("m", None, ok)  # type: ignore[arg-type]
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="module_id"):
        await runner.execute_command(b"m", "M", ["true"])  # type: ignore[arg-type]
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="script_path"):
        await runner.start_module("m", "M", 5)  # type: ignore[arg-type]
    assert await runner.registry.count_runs() == 0


async def test_an_unknown_option_names_the_method_called(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    # It was a bare TypeError naming ModuleRunner.prepare() or ModuleSpec.__init__(), methods
    # the caller never called (a probe, session 34); a command's shell= to a module too.
    ok = script(tmp_path, "ok", "pass")
    executor = pq.ConcurrentExecutor(2, registry=runner.registry)
    calls: dict[str, Callable[[], Any]] = {
        "ModuleRunner.execute_module": lambda: runner.execute_module("m", "M", ok, shell=True),
        "ModuleRunner.start_module": lambda: runner.start_module("m", "M", ok, timout=3),
        "ModuleRunner.execute_command": lambda: runner.execute_command("m", "M", ["true"], x=1),
        "ModuleRunner.start_command": lambda: runner.start_command("m", "M", ["true"], args=[]),
        "ConcurrentExecutor.execute_module": lambda: executor.execute_module("m", ok, [], y=1),
    }
    try:
        for where, call in calls.items():
            with pytest.raises(pq.exceptions.InvalidOptionError, match=re.escape(where)) as info:
                await call()
            assert isinstance(info.value, TypeError)
            assert "its options are" in str(info.value)
        with pytest.raises(pq.exceptions.InvalidOptionError, match="did you mean 'timeout'"):
            await runner.start_module("m", "M", ok, timout=3)  # type: ignore[call-arg]
    finally:
        await executor.aclose()
    assert await runner.registry.count_runs() == 0


# -- statuses ---------------------------------------------------------------------------------
async def test_completed_run_is_recorded_with_arguments_and_output(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    path = script(tmp_path, "echo", ECHO_ARGS)
    params = {"count": 3, "verbose": True, "tags": ["a", "b"], "skip": False, "x": None}
    run = await runner.execute_module("echo", "Echo", path, params, run_id="r-echo")
    assert run.run_id == "r-echo"
    assert run.status is pq.RunStatus.COMPLETED
    assert run.exit_code == 0 and run.error_message is None
    assert json.loads(run.output_tail[0]) == [
        "--count", "3", "--verbose", "--tags", "a", "--tags", "b"
    ]  # fmt: skip
    assert run.output_tail[1] == "to stderr"
    assert run.pid is not None and run.mode == runner.mode.value
    assert run.started_at is not None and run.finished_at is not None
    assert run.parameters == params
    assert await runner.registry.get_run("r-echo") == run
    assert runner.output is not None
    assert runner.output.is_closed("r-echo")


async def test_relative_script_is_found_from_cwd(runner: ModuleRunner, tmp_path: Path) -> None:
    script(tmp_path, "echo", ECHO_ARGS)
    run = await runner.execute_module("echo", "Echo", "echo.py", {"a": 1}, cwd=tmp_path)
    assert run.status is pq.RunStatus.COMPLETED


async def test_non_zero_exit_is_failed_with_the_last_line(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    run = await runner.execute_module("f", "Fail", script(tmp_path, "fail", FAIL))
    assert run.status is pq.RunStatus.FAILED
    assert run.exit_code == 1
    assert run.error_message == "exited with status 1: bad input: count must be positive"
    assert run.output_tail == ["working", "bad input: count must be positive"]


async def test_output_reaches_a_subscriber_while_the_module_runs(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    path = script(tmp_path, "wait", WAIT_FOR_FILE)
    run_id = await runner.start_module("w", "Wait", path, {"go": str(go)})
    assert runner.output is not None
    seen: list[str] = []
    async with runner.output.subscribe(run_id) as lines:
        async for item in lines:
            assert isinstance(item, pq.OutputLine)
            seen.append(item.text)
            if item.text == "first":
                stored = await runner.registry.get_run(run_id)
                assert stored is not None and stored.status is pq.RunStatus.RUNNING
                go.touch()
    assert seen == ["first", "second"]
    await runner.task_manager.wait_all()
    stored = await runner.registry.get_run(run_id)
    assert stored is not None and stored.status is pq.RunStatus.COMPLETED
    assert stored.output_tail == ["first", "second"]


async def test_resource_usage_is_recorded(runner: ModuleRunner, tmp_path: Path) -> None:
    run = await runner.execute_module("b", "Busy", script(tmp_path, "busy", BUSY))
    assert run.status is pq.RunStatus.COMPLETED
    assert run.peak_rss_bytes is not None and run.peak_rss_bytes > 1024 * 1024
    assert run.cpu_time_seconds is not None and run.cpu_time_seconds > 0


# Starts a helper that inherits stdout and outlives the module, then exits 0.
LEAVES_A_HELPER = """
import subprocess, sys
subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
print("parent done", flush=True)
"""


@pytest.mark.parametrize("mode", REAL)
async def test_a_helper_holding_the_pipe_does_not_keep_the_run_open(
    mode: str, tmp_path: Path
) -> None:
    # The run path's drain rule: the module is COMPLETED (not RUNNING until the helper exits, nor
    # "timed out" with exit 0), and the helper is stopped with the rest of the tree.
    mark, env = marked_env()
    wrapper = WRAPPER_FACTORIES[mode]()
    async with (
        wrapper,
        pq.RunRegistry() as registry,
        ModuleRunner(registry, wrapper=wrapper, grace_period=1.0) as runner,
    ):
        path = script(tmp_path, "helper", LEAVES_A_HELPER)
        run = await asyncio.wait_for(
            runner.execute_module("h", "Helper", path, env=env, timeout=15), 30
        )
    assert run.status is pq.RunStatus.COMPLETED, run.error_message
    assert run.exit_code == 0
    assert run.output_tail == ["parent done"]
    assert await asyncio.to_thread(survivors_after, mark, 1.0) == []


# -- stopping ---------------------------------------------------------------------------------
async def test_cancel_stops_the_tree_of_a_background_run(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    run_id = await runner.start_module("t", "Tree", script(tmp_path, "tree", TREE))
    assert runner.output is not None
    grandchild = int((await first_line(runner.output, run_id, "pids")).split()[1])
    stored = await runner.registry.get_run(run_id)
    assert stored is not None and stored.pid is not None
    assert await runner.cancel(run_id, "user pressed stop") is pq.CancelResult.CANCELLED
    stored = await runner.registry.get_run(run_id)
    assert stored is not None
    assert stored.status is pq.RunStatus.CANCELLED
    assert stored.error_message == "user pressed stop"
    assert stored.output_tail == [f"pids {grandchild}"]
    assert stored.pid is not None and gone(stored.pid)
    assert await eventually_gone(grandchild)
    assert await runner.cancel(run_id) is pq.CancelResult.ALREADY_FINISHED
    assert await runner.cancel("no-such-run") is pq.CancelResult.NOT_FOUND


async def test_cancelling_the_awaiting_task_stops_the_tree_first(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    path = script(tmp_path, "tree", TREE)
    task = asyncio.create_task(runner.execute_module("t", "Tree", path, run_id="fg"))
    assert runner.output is not None
    grandchild = int((await first_line(runner.output, "fg", "pids")).split()[1])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    stored = await runner.registry.get_run("fg")
    assert stored is not None and stored.status is pq.RunStatus.CANCELLED
    assert stored.pid is not None and gone(stored.pid)
    assert await eventually_gone(grandchild)
    assert runner.processes.live() == {}


async def test_cancel_of_a_foreground_run_returns_it_cancelled(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    path = script(tmp_path, "sleep", SLEEP)
    task = asyncio.create_task(runner.execute_module("s", "Sleep", path, run_id="fg2"))
    assert runner.output is not None
    await first_line(runner.output, "fg2", "sleeping")
    assert await runner.cancel("fg2", "no longer needed") is pq.CancelResult.CANCELLED
    run = await task
    assert run.status is pq.RunStatus.CANCELLED
    assert run.error_message == "no longer needed"
    assert run.exit_code is not None and run.exit_code < 0


async def test_timeout_fails_the_run_and_stops_the_tree(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    run = await runner.execute_module("t", "Tree", script(tmp_path, "tree", TREE), timeout=1.0)
    assert run.status is pq.RunStatus.FAILED
    assert run.error_message == "timed out after 1 s; process tree stopped"
    assert run.exit_code is not None and run.exit_code < 0
    grandchild = int(run.output_tail[0].split()[1])
    assert run.pid is not None and gone(run.pid)
    assert await eventually_gone(grandchild)


async def test_memory_cap_stops_the_tree_and_fails_the_run(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    cap = 100 * 1024 * 1024
    path = script(tmp_path, "hog", ALLOCATE_200_MIB)
    run = await runner.execute_module("h", "Hog", path, memory_limit_bytes=cap, timeout=30)
    assert run.status is pq.RunStatus.FAILED
    assert run.error_message is not None
    assert run.error_message.startswith("memory limit exceeded: the process tree used ")
    assert "(limit 100.0 MiB); process tree stopped" in run.error_message
    assert run.peak_rss_bytes is not None and run.peak_rss_bytes > cap
    assert run.cpu_time_seconds is not None
    assert "allocated" not in run.output_tail  # stopped before it got to 200 MiB
    assert run.pid is not None and gone(run.pid)


async def test_stop_through_the_process_manager_is_a_cancel(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    path = script(tmp_path, "sleep", SLEEP)
    task = asyncio.create_task(runner.execute_module("s", "Sleep", path, run_id="pm"))
    assert runner.output is not None
    await first_line(runner.output, "pm", "sleeping")
    assert await runner.processes.stop("pm") is True
    run = await task
    assert run.status is pq.RunStatus.CANCELLED
    assert run.error_message == "stopped by the process manager"


@pytest.mark.parametrize("mode", MODES)
async def test_a_run_claimed_elsewhere_before_its_running_record_is_stopped_here(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Another process picked the run up (a deliberate pick-up: ``claim_run``) between its add
    and the record of its child here: the record was refused, and the module ran on here all
    the same, one run id with two jobs. Now its tree is stopped, nothing more is recorded, the
    caller learns why, and nothing the child wrote reaches the run's output or its log file
    (a log directory shared with the claimer: review)."""
    elsewhere = pq.RunOwner("another-host", 4242, 1_700_000_000.5)
    logs = tmp_path / "logs"
    async with (
        WRAPPER_FACTORIES[mode]() as wrapper,
        pq.RunRegistry() as registry,
        pq.OutputCapture(log_dir=logs) as output,
        ModuleRunner(registry, output=output, wrapper=wrapper, grace_period=1.0) as runner,
    ):
        update_run = registry.update_run

        async def claimed_first(run: pq.Run) -> None:
            if run.status is pq.RunStatus.RUNNING:
                await asyncio.sleep(0.5)  # the child has written its first line meanwhile
                copy = await registry.get_run(run.run_id)
                assert copy is not None
                read_owner, copy.owner = copy.owner, elsewhere
                assert await registry.claim_run(copy, read_owner)
            await update_run(run)

        registry.update_run = claimed_first  # type: ignore[method-assign]
        mark, env = marked_env()
        caplog.set_level(logging.WARNING)
        with pytest.raises(RunClaimedError, match="claimed") as caught:
            await runner.execute_module(
                "tree", "Tree", script(tmp_path, "tree", TREE), run_id="r1", env=env
            )
        assert caught.value.run_id == "r1"
        assert await asyncio.to_thread(survivors_after, mark, 10) == []
        stored = await registry.get_run("r1")
        assert stored is not None
        assert (stored.status, stored.owner) == (pq.RunStatus.PENDING, elsewhere)
        assert runner.active_run_ids() == []
        assert output.get_lines("r1") == []
    written = [f.read_text() for f in logs.rglob("*") if f.is_file()] if logs.exists() else []
    assert "".join(written) == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


async def test_a_start_under_way_when_the_runner_closes_says_the_runner_closed(
    tmp_path: Path,
) -> None:
    # An adversary's find: such a start raised the inner TaskManagerClosedError, without the id
    # of the run it had already stored (recorded CANCELLED, so the history has a run nobody was
    # told about). Now the runner's own error, naming that run.
    path = script(tmp_path, "ok", "pass")
    async with pq.SQLiteRunRegistry(tmp_path / "runs.db") as registry:
        runner = ModuleRunner(registry)
        starts = [
            asyncio.create_task(runner.start_module("m", "M", path, {"i": i})) for i in range(3)
        ]
        await asyncio.sleep(0)  # the starts are storing their runs
        await runner.aclose()
        results = await asyncio.gather(*starts, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        assert errors, results
        for error in errors:
            assert type(error) is pq.exceptions.RunnerClosedError, error
        named = {run_id for error in errors for run_id in re.findall(r"run '(\w+)'", str(error))}
        stored = {run.run_id: run for run in await registry.list_runs()}
        assert named <= set(stored)
        assert all(stored[run_id].status is pq.RunStatus.CANCELLED for run_id in named)


async def test_a_module_s_helper_left_in_its_group_is_stopped_when_it_exits(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    # As run(): a helper started in the background, its output elsewhere, outlived the run.
    mark, env = marked_env()
    path = script(
        tmp_path,
        "bg",
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
        "                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,\n"
        "                 stderr=subprocess.DEVNULL)\n"
        "print('done')\n",
    )
    run = await runner.execute_module("bg", "Background", path, env=env)
    assert run.status is pq.RunStatus.COMPLETED
    assert await asyncio.to_thread(survivors_after, mark, 3.0) == []


async def test_aclose_cancels_background_runs(tmp_path: Path) -> None:
    path = script(tmp_path, "sleep", SLEEP)
    output = pq.OutputCapture()
    async with pq.RunRegistry() as registry:
        runner = ModuleRunner(registry, output=output, run_mode="async", grace_period=1.0)
        run_ids = [await runner.start_module("s", "Sleep", path) for _ in range(2)]
        for run_id in run_ids:
            await first_line(output, run_id, "sleeping")
        await runner.aclose()
        for run_id in run_ids:
            stored = await registry.get_run(run_id)
            assert stored is not None and stored.status is pq.RunStatus.CANCELLED
            assert stored.pid is not None and gone(stored.pid)
        with pytest.raises(RunnerClosedError):
            await runner.start_module("s", "Sleep", path)
    await output.aclose()


async def test_max_concurrent_queues_runs_as_pending(tmp_path: Path) -> None:
    go = tmp_path / "go"
    path = script(tmp_path, "wait", WAIT_FOR_FILE)
    async with (
        pq.RunRegistry() as registry,
        pq.OutputCapture() as output,
        ModuleRunner(registry, output=output, max_concurrent=1, run_mode="async") as runner,
    ):
        first = await runner.start_module("w", "Wait", path, {"go": str(go)})
        second = await runner.start_module("w", "Wait", path, {"go": str(go)})
        await first_line(output, first, "first")
        queued = await registry.get_run(second)
        assert queued is not None and queued.status is pq.RunStatus.PENDING
        go.touch()
        await runner.task_manager.wait_all()
        for run_id in (first, second):
            stored = await registry.get_run(run_id)
            assert stored is not None and stored.status is pq.RunStatus.COMPLETED


async def test_dry_run_starts_nothing(tmp_path: Path) -> None:
    recorder = pq.testing.DryRunRecorder()
    path = script(tmp_path, "echo", ECHO_ARGS)
    async with (
        pq.RunRegistry() as registry,
        ModuleRunner(registry, run_mode=pq.testing.DryRunStrategy(recorder=recorder)) as runner,
    ):
        run = await runner.execute_module("e", "Echo", path, {"n": 1})
    assert run.status is pq.RunStatus.COMPLETED
    assert run.mode == "dry-run"
    assert len(recorder.calls) == 1
    assert list(recorder.calls[0].args)[-2:] == ["--n", "1"]


def test_run_mode_and_wrapper_are_exclusive() -> None:
    wrapper = pq.SubprocessWrapper("threaded")
    try:
        with pytest.raises(pq.exceptions.InvalidRunModeError):
            ModuleRunner(pq.RunRegistry(), run_mode="async", wrapper=wrapper)
    finally:
        wrapper.cleanup()


async def test_shared_process_manager_sees_the_live_child(tmp_path: Path) -> None:
    pm = ProcessManager()
    path = script(tmp_path, "sleep", SLEEP)
    async with (
        pq.RunRegistry() as registry,
        pq.OutputCapture() as output,
        ModuleRunner(registry, pm, "threaded", output=output, grace_period=1.0) as runner,
    ):
        run_id = await runner.start_module("s", "Sleep", path)
        await first_line(output, run_id, "sleeping")
        assert list(pm.live()) == [run_id]
        assert runner.active_run_ids() == [run_id]
    assert pm.live() == {}


async def test_a_closed_output_does_not_stall_the_module(
    runner: ModuleRunner, tmp_path: Path
) -> None:
    go = tmp_path / "go"
    path = script(tmp_path, "wait", WAIT_FOR_FILE)
    task = asyncio.create_task(runner.execute_module("w", "W", path, {"go": str(go)}, run_id="c"))
    assert runner.output is not None
    await first_line(runner.output, "c", "first")
    await runner.output.close_run("c")  # the host closed it early
    go.touch()
    run = await task
    assert run.status is pq.RunStatus.COMPLETED
    assert run.output_tail == ["first", "second"]


# --- review of the model user's path (2026-12-01) --------------------------------------------

_IGNORES_TERM = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
time.sleep(60)
"""


async def test_a_foreground_run_cancelled_twice_is_recorded_cancelled(tmp_path: Path) -> None:
    """The caller is cancelled, and cancelled again while the tree is being stopped (a
    shutdown that cancels, then times out): the run used to stay RUNNING for good."""
    script = tmp_path / "stubborn.py"
    script.write_text(_IGNORES_TERM)
    async with pq.RunRegistry() as registry, ModuleRunner(registry, grace_period=1.0) as runner:
        task = asyncio.ensure_future(runner.execute_module("m", "m", str(script), run_id="twice"))
        await _stored_when(registry, "twice", lambda run: run.pid is not None)
        task.cancel()
        await asyncio.sleep(0.2)
        task.cancel()  # while the tree's stop waits out the grace period
        with pytest.raises(asyncio.CancelledError):
            await task
        # The record may end just after the caller's cancellation.
        stored = await _stored_when(registry, "twice", lambda run: run.is_finished)
        assert stored.status is pq.RunStatus.CANCELLED, stored
        assert stored.pid is not None and _gone(stored.pid)


async def _stored_when(
    registry: pq.RunRegistry, run_id: str, ready: Callable[[pq.Run], bool]
) -> pq.Run:
    """The stored run once ``ready`` holds for it (up to 5 s)."""
    for _ in range(100):
        stored = await registry.get_run(run_id)
        if stored is not None and ready(stored):
            return stored
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never got there: {stored}")


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _until_closed(capture: pq.OutputCapture, run_id: str) -> None:
    for _ in range(1_000_000):  # a loop iteration at a time: the moment matters
        if capture.is_closed(run_id):
            return
        await asyncio.sleep(0)
    raise AssertionError(f"the output of {run_id} was never closed")


_MANY_LINES = "import sys\nw = sys.stdout.write\nfor i in range(200000): w('line %d\\n' % i)\n"


@pytest.mark.parametrize("how", ["caller cancelled", "runner.cancel()"])
async def test_a_run_finished_while_it_is_cancelled_is_recorded_as_it_ended(
    tmp_path: Path, how: str
) -> None:
    """The child exited and the runner is recording it (closing its output, whose log is being
    written) when the caller is cancelled, or cancel() is called: the run is still recorded
    COMPLETED (it stayed RUNNING), and cancel() says so (it said CANCELLED)."""
    script = tmp_path / "lines.py"
    script.write_text(_MANY_LINES)
    capture = pq.OutputCapture(log_dir=tmp_path / "logs")
    async with pq.RunRegistry() as registry, ModuleRunner(registry, output=capture) as runner:
        task = asyncio.ensure_future(runner.execute_module("m", "m", str(script), run_id="r"))
        await _until_closed(capture, "r")
        if how == "runner.cancel()":
            assert await runner.cancel("r") is pq.CancelResult.ALREADY_FINISHED
            assert (await task).status is pq.RunStatus.COMPLETED
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        # The record may end just after the caller's cancellation.
        stored = await _stored_when(registry, "r", lambda run: run.is_finished)
        assert stored.status is pq.RunStatus.COMPLETED, stored
    await capture.aclose()


def test_a_script_whose_interpreter_is_missing_says_so(tmp_path: Path) -> None:
    from prismq_subprocess._core._validation import not_found_error

    script = tmp_path / "bad.sh"
    script.write_text("#!/nonexistent/interp -x\necho hi\n")
    script.chmod(0o755)
    error = not_found_error(str(script), FileNotFoundError(2, "No such file or directory"))
    assert "interpreter" in str(error) and "/nonexistent/interp" in str(error), str(error)
    assert isinstance(error, pq.CommandNotFoundError)


# --- review: module runs (session 19) ---------------------------------------------------------


class _SlowInsertRegistry(pq.RunRegistry):
    """A registry whose inserts wait for ``gate`` (a SQLite registry's insert takes its own
    thread's time, and a busy disk longer): a run's store window held open."""

    def __init__(self) -> None:
        super().__init__()
        self.inserting = asyncio.Event()
        self.gate = asyncio.Event()
        # Set by the test to hold a run's RUNNING write too (it stays PENDING when stored).
        self.running_gate: asyncio.Event | None = None

    async def add_run(self, run: pq.Run) -> None:
        self.inserting.set()
        await self.gate.wait()
        await super().add_run(run)

    async def update_run(self, run: pq.Run) -> None:
        if self.running_gate is not None and run.status is pq.RunStatus.RUNNING:
            await self.running_gate.wait()
        await super().update_run(run)


@pytest.mark.parametrize("mode", MODES)
async def test_cancel_while_a_foreground_run_is_stored_cancels_it(
    tmp_path: Path, mode: str
) -> None:
    """cancel() came while execute_module() was storing its run: it said NOT_FOUND and the
    module then ran to its end."""
    path = script(tmp_path, "sleep", SLEEP)
    async with (
        _SlowInsertRegistry() as registry,
        ModuleRunner(registry, run_mode=mode, grace_period=1.0) as runner,
    ):
        task = asyncio.ensure_future(runner.execute_module("s", "S", path, run_id="stored"))
        await registry.inserting.wait()
        cancel = asyncio.ensure_future(runner.cancel("stored", "changed my mind"))
        await asyncio.sleep(0.1)
        assert not cancel.done()  # it waits for the run to be recorded
        registry.gate.set()
        assert await asyncio.wait_for(cancel, 30) is pq.CancelResult.CANCELLED
        run = await asyncio.wait_for(task, 30)
        assert run.status is pq.RunStatus.CANCELLED
        assert run.error_message == "changed my mind"
        assert run.pid is None  # nothing was started
        stored = await registry.get_run("stored")
        assert stored is not None and stored.status is pq.RunStatus.CANCELLED
        assert runner.processes.live() == {}


async def test_aclose_while_a_foreground_run_is_stored_records_it_cancelled(
    tmp_path: Path,
) -> None:
    """aclose() came while execute_module() was storing its run: it returned at once, and the
    run then met the closed wrapper and was recorded FAILED ("could not start the module")."""
    path = script(tmp_path, "sleep", SLEEP)
    async with _SlowInsertRegistry() as registry:
        runner = ModuleRunner(registry, grace_period=1.0)
        task = asyncio.ensure_future(runner.execute_module("s", "S", path, run_id="closing"))
        await registry.inserting.wait()
        closing = asyncio.ensure_future(runner.aclose())
        await asyncio.sleep(0.1)
        assert not closing.done()  # it waits for every run to be recorded
        registry.gate.set()
        await asyncio.wait_for(closing, 30)
        assert task.done()
        run = task.result()
        assert run.status is pq.RunStatus.CANCELLED, run.error_message
        assert run.error_message == "module runner closed"
        stored = await registry.get_run("closing")
        assert stored is not None and stored.status is pq.RunStatus.CANCELLED


async def test_a_run_id_active_in_the_runner_is_refused_at_once(tmp_path: Path) -> None:
    """A second execute_module() with the id of a run still being stored is refused before it
    touches the first run's bookkeeping; the first run is unaffected."""
    path = script(tmp_path, "ok", "print('ok')")
    async with _SlowInsertRegistry() as registry, ModuleRunner(registry) as runner:
        first = asyncio.ensure_future(runner.execute_module("s", "S", path, run_id="same"))
        await registry.inserting.wait()
        with pytest.raises(pq.exceptions.DuplicateRunError):
            await asyncio.wait_for(runner.execute_module("s", "S", path, run_id="same"), 10)
        assert runner.active_run_ids() == ["same"]
        registry.running_gate = asyncio.Event()
        registry.gate.set()
        # Stored and still PENDING: a background run with its id took it over and ran the
        # module a second time.
        stored = await _stored_when(registry, "same", lambda run: True)
        assert stored.status is pq.RunStatus.PENDING
        try:
            with pytest.raises(pq.exceptions.DuplicateRunError):
                await runner.start_module("s", "S", path, run_id="same")
        finally:
            registry.running_gate.set()
        run = await asyncio.wait_for(first, 30)
        assert run.status is pq.RunStatus.COMPLETED, run.error_message
        assert run.output_tail == ["ok"]
        await runner.task_manager.wait_all(timeout=30)
        stored = await registry.get_run("same")
        assert stored is not None and stored.output_tail == ["ok"] and stored.pid == run.pid


# --- review: background runs (session 20) -----------------------------------------------------


class _SlowFinalRegistry(pq.RunRegistry):
    """A registry whose writes of a finished run wait for ``gate``: the moment a module has
    exited and its outcome is being recorded, held open."""

    def __init__(self) -> None:
        super().__init__()
        self.finishing = asyncio.Event()
        self.gate = asyncio.Event()

    async def update_run(self, run: pq.Run) -> None:
        if run.is_finished:
            self.finishing.set()
            await self.gate.wait()
        await super().update_run(run)


@pytest.mark.parametrize("mode", MODES)
async def test_cancel_of_a_background_run_that_ended_meanwhile_says_already_finished(
    tmp_path: Path, mode: str
) -> None:
    """cancel() of a background run whose module had exited and was being recorded returned
    CANCELLED although the run is recorded COMPLETED (a foreground run said ALREADY_FINISHED)."""
    path = script(tmp_path, "ok", "print('ok')")
    async with (
        WRAPPER_FACTORIES[mode]() as wrapper,
        _SlowFinalRegistry() as registry,
        ModuleRunner(registry, wrapper=wrapper) as runner,
    ):
        run_id = await runner.start_module("m", "M", path)
        await asyncio.wait_for(registry.finishing.wait(), 30)
        cancelling = asyncio.ensure_future(runner.cancel(run_id))
        await asyncio.sleep(0.1)
        registry.gate.set()
        assert await asyncio.wait_for(cancelling, 30) is pq.CancelResult.ALREADY_FINISHED
        stored = await registry.get_run(run_id)
        assert stored is not None and stored.status is pq.RunStatus.COMPLETED, stored
        assert stored.exit_code == 0 and stored.output_tail == ["ok"]


class _FullDiskRegistry(pq.RunRegistry):
    """A registry whose writes of a finished run fail ``failures`` times (a full disk)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def update_run(self, run: pq.Run) -> None:
        if run.is_finished and self.failures > 0:
            self.failures -= 1
            raise OSError(28, "No space left on device")
        await super().update_run(run)


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
async def test_a_module_run_whose_final_record_failed_is_recorded_later(
    tmp_path: Path, background: bool
) -> None:
    """The registry failed the final write of a module run for a moment: the run stayed RUNNING
    in the registry for good (a cross-worker cancel of it then waited for ever)."""
    path = script(tmp_path, "ok", "print('ok')")
    async with _FullDiskRegistry(failures=4) as registry, ModuleRunner(registry) as runner:
        if background:
            run_id = await runner.start_module("m", "M", path)
            await runner.task_manager.wait_all(timeout=30)
        else:
            run_id = (await runner.execute_module("m", "M", path)).run_id
        stored = await _stored_when(registry, run_id, lambda run: run.is_finished)
        assert stored.status is pq.RunStatus.COMPLETED and stored.output_tail == ["ok"]


def test_a_sample_interval_under_the_samplers_floor_is_refused() -> None:
    # Refused at construction, not at the first run (which would start its child first).
    with pytest.raises(InvalidIntervalError, match=r"at least 0\.01"):
        ModuleRunner(pq.RunRegistry(), sample_interval=0.001)


# A child that records the SIGTERM it got, then exits 3 (a stop with grace, not a SIGKILL).
SIGTERM_SEEN = """
import signal, sys, time
def on_term(*_):
    open(sys.argv[1], "w").write("term")
    sys.exit(3)
signal.signal(signal.SIGTERM, on_term)
open(sys.argv[1] + ".ready", "w").close()
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", REAL)
@pytest.mark.parametrize("registry_kind", ["memory", "sqlite"])
def test_a_run_cancelled_by_an_anyio_scope_is_stopped_and_recorded_before_it_is_left(
    mode: str, registry_kind: str, tmp_path: Path
) -> None:
    """A FastAPI handler awaiting execute_command, its scope cancelled (``move_on_after``, a
    client gone): the tree gets SIGTERM and its grace period, and the run is recorded CANCELLED
    with the child's exit status before the scope is left. anyio's level-triggered
    cancellation used to cut the clean-up short: SIGKILL at once, ``exit_code`` None (the child
    not waited for), the record written after the caller had moved on."""
    seen = tmp_path / "term"
    mark, env = marked_env()
    found: list[tuple[pq.RunStatus, int | None]] = []

    async def main() -> None:
        registry = (
            pq.RunRegistry()
            if registry_kind == "memory"
            else pq.SQLiteRunRegistry(tmp_path / "r.db")
        )
        async with registry, ModuleRunner(registry, wrapper=WRAPPER_FACTORIES[mode]()) as runner:
            await cancelled_after(
                "move_on_after",
                10.0,
                lambda: runner.execute_command(
                    "m", "m", [sys.executable, "-c", SIGTERM_SEEN, str(seen)], run_id="r1", env=env
                ),
                once=tmp_path / "term.ready",  # the child's handler is in place
            )
            run = await registry.get_run("r1")
            assert run is not None
            found.append((run.status, run.exit_code))
            await runner.wrapper.aclose()

    anyio.run(main)
    assert survivors_after(mark, 3.0) == []
    assert seen.exists(), "the child was killed without its SIGTERM and grace period"
    assert found == [(pq.RunStatus.CANCELLED, 3)]


# --- review: cancelled during the RUNNING record (session 32) ---------------------------------


class _HeldRunningRegistry(pq.RunRegistry):
    """A registry whose record of a run's child (RUNNING with a pid) takes 2 s and goes on
    when its caller is cancelled, as a thread-backed store's does (a busy SQLite file): the
    moment a cancel lands while a module's start is being recorded, held open."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = asyncio.Event()

    async def update_run(self, run: pq.Run) -> None:
        if run.status is pq.RunStatus.RUNNING and run.pid is not None:
            self.recording.set()
            await asyncio.shield(self._slow_write(run))
        else:
            await super().update_run(run)

    async def _slow_write(self, run: pq.Run) -> None:
        await asyncio.sleep(2.0)
        await super().update_run(run)


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
@pytest.mark.parametrize("mode", [*MODES, "local"])
async def test_a_run_cancelled_while_its_child_is_recorded_keeps_what_the_child_wrote(
    tmp_path: Path, mode: str, background: bool
) -> None:
    """A review's find: the output is read only once the run is recorded RUNNING, so a cancel
    during that record stopped the child before anything read its pipe, and the lines it had
    written were missing from the CANCELLED run's tail and from its subscribers."""
    path = script(tmp_path, "talk", "import time\nprint('first', flush=True)\ntime.sleep(60)\n")
    mark, env = marked_env()
    async with (
        WRAPPER_FACTORIES[mode]() as wrapper,
        _HeldRunningRegistry() as registry,
        pq.OutputCapture() as output,
        ModuleRunner(registry, output=output, wrapper=wrapper, grace_period=1.0) as runner,
    ):
        if background:
            run_id = await runner.start_module("t", "T", path, run_id="r1", env=env)
        else:
            task = asyncio.ensure_future(
                runner.execute_module("t", "T", path, run_id="r1", env=env)
            )
        await asyncio.wait_for(registry.recording.wait(), 30)
        await asyncio.sleep(1.0)  # the child has written its line meanwhile
        if background:
            assert await asyncio.wait_for(runner.cancel(run_id), 30) is pq.CancelResult.CANCELLED
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 30)
        stored = await registry.get_run("r1")
        assert stored is not None and stored.status is pq.RunStatus.CANCELLED, stored
        assert stored.output_tail == ["first"]
        assert output.get_lines("r1") == ["first"]
    assert await asyncio.to_thread(survivors_after, mark, 10) == []


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
@pytest.mark.parametrize("mode", [*MODES, "local"])
async def test_a_start_record_refused_by_a_locked_database_is_tried_again(
    tmp_path: Path, mode: str, background: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A review's find: a run whose RUNNING record met a database locked a moment longer than
    its busy timeout went on with the stored run PENDING, so another process could pick it up
    and run the module a second time. The start record is now tried again; the stored run is
    RUNNING while its module runs."""
    path = script(tmp_path, "up", "import time\nprint('up', flush=True)\ntime.sleep(30)\n")
    db = tmp_path / "r.db"
    mark, env = marked_env()
    caplog.set_level(logging.INFO)
    async with (
        WRAPPER_FACTORIES[mode]() as wrapper,
        pq.SQLiteRunRegistry(db, busy_timeout=0.2) as registry,
        ModuleRunner(registry, wrapper=wrapper, grace_period=1.0) as runner,
    ):
        other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
        update_run = registry.update_run
        locked: list[pq.Run] = []

        async def locked_first(run: pq.Run) -> None:
            if run.status is pq.RunStatus.RUNNING and not locked:
                locked.append(run)
                other.execute("BEGIN IMMEDIATE")  # another process writes for 0.6 s
                threading.Timer(0.6, other.rollback).start()
            await update_run(run)

        registry.update_run = locked_first  # type: ignore[method-assign]
        try:
            if background:
                await runner.start_module("u", "U", path, run_id="r1", env=env)
            else:
                task = asyncio.ensure_future(
                    runner.execute_module("u", "U", path, run_id="r1", env=env)
                )
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                stored = await registry.get_run("r1")
                if stored is not None and stored.status is not pq.RunStatus.PENDING:
                    break
                assert asyncio.get_running_loop().time() < deadline, "still PENDING"
                await asyncio.sleep(0.05)
            assert stored.status is pq.RunStatus.RUNNING
            assert await runner.cancel("r1") is pq.CancelResult.CANCELLED
            if not background:
                assert (await task).status is pq.RunStatus.CANCELLED
        finally:
            other.close()
    assert await asyncio.to_thread(survivors_after, mark, 10) == []
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert any("trying again" in r.getMessage() for r in caplog.records)


class _ClaimedWhileRecordingRegistry(pq.RunRegistry):
    """A registry whose RUNNING record (with a pid) waits for ``gate``, then finds the run
    picked up by another process (its claim landed first) and is refused. The write goes on
    when its caller is cancelled, as a thread-backed store's does (SQLite's worker)."""

    def __init__(self) -> None:
        super().__init__()
        self.recording = asyncio.Event()
        self.gate = asyncio.Event()

    async def update_run(self, run: pq.Run) -> None:
        if run.status is pq.RunStatus.RUNNING and run.pid is not None:
            self.recording.set()
            await asyncio.shield(self._claimed_then_write(run))
        else:
            await super().update_run(run)

    async def _claimed_then_write(self, run: pq.Run) -> None:
        await self.gate.wait()
        copy = await self.get_run(run.run_id)
        assert copy is not None
        read_owner, copy.owner = copy.owner, pq.RunOwner("another-host", 4242, 1.5)
        assert await self.claim_run(copy, read_owner)
        await super().update_run(run)  # refused: RunClaimedError


@pytest.mark.parametrize("mode", [*MODES, "local"])
async def test_a_run_cancelled_while_a_refused_start_record_is_under_way_reads_nothing(
    tmp_path: Path, mode: str
) -> None:
    """A review's find: a cancel during the RUNNING record read the child's output into the
    run even when that record was then refused (the run claimed by another process), so the
    child's lines reached the claimer's run and a log directory shared with it. The cancel
    now waits for the record under way before it reads anything."""
    path = script(tmp_path, "talk", "import time\nprint('first', flush=True)\ntime.sleep(60)\n")
    logs = tmp_path / "logs"
    mark, env = marked_env()
    async with (
        WRAPPER_FACTORIES[mode]() as wrapper,
        _ClaimedWhileRecordingRegistry() as registry,
        pq.OutputCapture(log_dir=logs) as output,
        ModuleRunner(registry, output=output, wrapper=wrapper, grace_period=1.0) as runner,
    ):
        task = asyncio.ensure_future(runner.execute_module("t", "T", path, run_id="r1", env=env))
        await asyncio.wait_for(registry.recording.wait(), 30)
        await asyncio.sleep(1.0)  # the child has written its line
        task.cancel()
        asyncio.get_running_loop().call_later(0.3, registry.gate.set)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 30)
        stored = await registry.get_run("r1")
        assert stored is not None and stored.status is pq.RunStatus.PENDING
        assert stored.owner == pq.RunOwner("another-host", 4242, 1.5)
        assert output.get_lines("r1") == []
    assert await asyncio.to_thread(survivors_after, mark, 10) == []
    written = [f.read_text() for f in logs.rglob("*") if f.is_file()] if logs.exists() else []
    assert "".join(written) == ""


class _LockedStartRegistry(pq.RunRegistry):
    """A registry whose RUNNING records (with a pid) fail as a database locked for good does,
    each try after ``gate``."""

    def __init__(self) -> None:
        super().__init__()
        self.tries = 0
        self.recording = asyncio.Event()
        self.gate = asyncio.Event()

    async def update_run(self, run: pq.Run) -> None:
        if run.status is pq.RunStatus.RUNNING and run.pid is not None:
            self.tries += 1
            self.recording.set()
            await self.gate.wait()
            raise RegistryBusyError("locked by another connection")
        await super().update_run(run)


@pytest.mark.parametrize("mode", [*MODES, "local"])
async def test_cancel_during_a_failing_start_record_does_not_wait_for_its_retries(
    tmp_path: Path, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A review's find: cancel() of a foreground run whose start record was failing waited
    while that record was tried again (about five busy timeouts in all, 51 s by default),
    although the run was being stopped. The start record is not tried again once a stop was
    asked for."""
    path = script(tmp_path, "sleep", SLEEP)
    async with (
        WRAPPER_FACTORIES[mode]() as wrapper,
        _LockedStartRegistry() as registry,
        ModuleRunner(registry, wrapper=wrapper, grace_period=1.0) as runner,
    ):
        task = asyncio.ensure_future(runner.execute_module("s", "S", path, run_id="r1"))
        await asyncio.wait_for(registry.recording.wait(), 30)
        cancelling = asyncio.ensure_future(runner.cancel("r1", "changed my mind"))
        await asyncio.sleep(0.1)
        registry.gate.set()
        assert await asyncio.wait_for(cancelling, 30) is pq.CancelResult.CANCELLED
        run = await asyncio.wait_for(task, 30)
        assert run.status is pq.RunStatus.CANCELLED and run.error_message == "changed my mind"
    assert registry.tries == 1


class _RecordsOnceReapedRegistry(pq.RunRegistry):
    """A registry whose RUNNING record (with a pid) is answered only once the child has exited
    and been reaped (a module that exits at once: ``sh -c 'daemon & exit'``); it keeps what
    ``record_child`` is given."""

    def __init__(self) -> None:
        super().__init__()
        self.children: list[pq.ProcessIdentity] = []

    async def update_run(self, run: pq.Run) -> None:
        if run.status is pq.RunStatus.RUNNING and run.pid is not None:
            for _ in range(500):
                if not psutil.pid_exists(run.pid):
                    break
                await asyncio.sleep(0.02)
        await super().update_run(run)

    async def record_child(self, run_id: str, identity: pq.ProcessIdentity) -> bool:
        self.children.append(identity)
        return await super().record_child(run_id, identity)


@pytest.mark.parametrize("mode", [*MODES, "local"])
async def test_a_child_gone_before_it_is_recorded_is_recorded_with_its_cookie(
    tmp_path: Path, mode: str
) -> None:
    """A module that exits at once (a shell starting a daemon) was gone before its identity
    was read, and no identity was recorded: what it left running (the daemon holds the cookie)
    could not be found after its host or worker died (a Dask host got no ``child`` message).
    It is recorded with the cookie and the start 0.0 (no process's: a stranger given the pid
    is never taken for it); a check of the pid then finds it gone (or reused) and the cookie
    finds what it left."""
    path = script(tmp_path, "quick", "print('bye')\n")
    async with (
        WRAPPER_FACTORIES[mode]() as wrapper,
        _RecordsOnceReapedRegistry() as registry,
        ModuleRunner(registry, wrapper=wrapper, grace_period=1.0) as runner,
    ):
        run = await asyncio.wait_for(runner.execute_module("q", "Q", path, run_id="r1"), 30)
    assert run.status is pq.RunStatus.COMPLETED
    [identity] = registry.children
    assert identity.pid == run.pid
    assert identity.cookie is not None and identity.cookie.startswith("PRISMQ_RUN_")
    assert identity.started_at == 0.0
    assert verify_orphan(identity) is pq.OrphanCheck.GONE
    # A stranger at the pid (here: this process) is another process, never the run's child.
    stranger = pq.ProcessIdentity(os.getpid(), identity.started_at, identity.cookie)
    assert verify_orphan(stranger) is pq.OrphanCheck.REUSED


@pytest.mark.parametrize("how", ["execute_module", "start_module", "execute_command"])
async def test_a_closed_output_is_refused_before_anything_is_stored_or_started(
    tmp_path: Path, how: str
) -> None:
    """A probe's find: with its OutputCapture closed before the call, execute_module stored
    the run, ran the module, recorded it COMPLETED and only then raised OutputClosedError (a
    caller retrying ran the module twice); start_module ran it and only logged."""
    marker = tmp_path / "ran"
    path = script(tmp_path, "mark", f"open({str(marker)!r}, 'a').write('x')\n")
    output = pq.OutputCapture()
    await output.aclose()
    async with pq.RunRegistry() as registry, ModuleRunner(registry, output=output) as runner:
        with pytest.raises(OutputClosedError, match="not started"):
            if how == "execute_module":
                await runner.execute_module("m", "M", path, run_id="r1")
            elif how == "start_module":
                await runner.start_module("m", "M", path, run_id="r1")
            else:
                await runner.execute_command("m", "M", [sys.executable, path], run_id="r1")
        assert await registry.get_run("r1") is None
        assert runner.active_run_ids() == []
    assert not marker.exists()


async def test_a_huge_grace_period_still_closes_the_runner(tmp_path: Path) -> None:
    # The review's find: aclose() shut its task manager down with twice the grace period plus
    # one, which overflows to inf for a finite grace of 1e308; shutdown() refuses inf, so
    # aclose() raised before it stopped anything.
    script = tmp_path / "quick.py"
    script.write_text("print('hi')\n")
    runner = ModuleRunner(pq.RunRegistry(), run_mode="async", grace_period=1e308)
    run_id = await runner.start_module("m", "M", script)
    await runner.task_manager.wait_all(30)
    await runner.aclose()
    run = await runner.registry.get_run(run_id)
    assert run is not None and run.status is pq.RunStatus.COMPLETED


class _RefusingBackend(pq.abc.RunBackend):
    """A backend that refuses every run after the runner stored it (as a closed DaskBackend,
    one whose client belongs to another loop, or a run id already executing on it, did)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    async def execute(self, run: pq.Run, job: Any, context: Any) -> pq.Run:
        raise self.error

    async def cancel(self, run_id: str) -> bool:
        return False

    async def aclose(self) -> None:
        pass


@pytest.mark.parametrize("background", [False, True], ids=["foreground", "background"])
async def test_a_run_the_backend_refuses_is_recorded_failed_not_left_pending(
    tmp_path: Path, background: bool
) -> None:
    # A probe's find: a foreground run the backend refused stayed PENDING for good (the
    # caller got the error, but wait_finished() never returned); a background one was
    # recorded FAILED.
    path = script(tmp_path, "m.py", "print('hi')\n")
    error = pq.exceptions.ClosedError("this backend is closed")
    async with (
        pq.RunRegistry() as registry,
        ModuleRunner(registry, backend=_RefusingBackend(error)) as runner,
    ):
        if background:
            await runner.start_module("m", "M", path, run_id="r")
            await runner.task_manager.wait_all()
        else:
            with pytest.raises(pq.exceptions.ClosedError, match="this backend is closed"):
                await runner.execute_module("m", "M", path, run_id="r")
        run = await registry.wait_finished("r", timeout=10)
        assert run is not None and run.status is pq.RunStatus.FAILED
        assert run.error_message is not None and "this backend is closed" in run.error_message


async def test_a_foreground_run_cancelled_inside_a_backend_that_did_not_record_it(
    tmp_path: Path,
) -> None:
    path = script(tmp_path, "m.py", "print('hi')\n")

    entered = asyncio.Event()

    class _Hanging(_RefusingBackend):
        async def execute(self, run: pq.Run, job: Any, context: Any) -> pq.Run:
            entered.set()
            await asyncio.Event().wait()  # cancelled, and records nothing
            raise AssertionError("unreachable")

    async with (
        pq.RunRegistry() as registry,
        ModuleRunner(registry, backend=_Hanging(RuntimeError())) as runner,
    ):
        task = asyncio.create_task(runner.execute_module("m", "M", path, run_id="r"))
        await entered.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        run = await registry.wait_finished("r", timeout=10)
        assert run is not None and run.status is pq.RunStatus.CANCELLED
