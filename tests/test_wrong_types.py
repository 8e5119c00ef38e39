"""Public functions given an object of the wrong kind raise our own error (also a TypeError),
naming what they wanted, before doing anything: not a bare AttributeError or TypeError from deep
inside. Found by a fuzz of every public name (session 20)."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import psutil
import pytest

import prismq_subprocess as pq
from prismq_subprocess.exceptions import (
    InvalidArgumentTypeError,
    InvalidBackendError,
    InvalidTaskError,
)


async def _sse_first(capture: Any) -> None:
    async for _ in pq.sse_events(capture, "r"):
        break


async def _trivial() -> int:
    return 1


async def _sqlite_call(method: str, argument: object) -> None:
    async with pq.SQLiteRunRegistry(":memory:") as registry:
        await getattr(registry, method)(argument)


CALLS: dict[str, tuple[Callable[[], object], type[Exception], str]] = {
    "run_id_from_log_path(None)": (
        lambda: pq.run_id_from_log_path(None),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "path",
    ),
    "OutputCapture(log_dir=1.5)": (
        lambda: pq.OutputCapture(log_dir=1.5),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "log_dir",
    ),
    "detect_run_mode(env=True)": (
        lambda: pq.detect_run_mode(env=True),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "env",
    ),
    "sse_events(object(), ...)": (
        lambda: asyncio.run(_sse_first(object())),
        InvalidArgumentTypeError,
        "OutputCapture",
    ),
    "stop_orphan_tree(object())": (
        lambda: pq.stop_orphan_tree(object()),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "ProcessIdentity",
    ),
    "stop_orphan_tree(identity, proc_root=3)": (
        lambda: pq.stop_orphan_tree(pq.ProcessIdentity(os.getpid(), 0.0, None), proc_root=3),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "proc_root",
    ),
    # A probe's find: these were taken, and the first run failed with a bare AttributeError.
    "ConcurrentExecutor(registry=object())": (
        lambda: pq.ConcurrentExecutor(registry=object()),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "registry must be a BaseRunRegistry",
    ),
    "ConcurrentExecutor(output=object())": (
        lambda: pq.ConcurrentExecutor(output=object()),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "output must be an OutputCapture",
    ),
    "ModuleRunner(object())": (
        lambda: pq.ModuleRunner(object()),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "registry must be a BaseRunRegistry",
    ),
    "ModuleRunner(registry, output=[])": (
        lambda: pq.ModuleRunner(pq.RunRegistry(), output=[]),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "output must be an OutputCapture",
    ),
    "BackgroundTaskManager('runs.db')": (
        lambda: pq.BackgroundTaskManager("runs.db"),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "registry must be a BaseRunRegistry",
    ),
    "BackgroundTaskManager(registry, output=object())": (
        lambda: pq.BackgroundTaskManager(pq.RunRegistry(), output=object()),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "output must be an OutputCapture",
    ),
    # A probe's find (session 34): taken, then the run's child was started and killed, the
    # run recorded FAILED with an AttributeError, and aclose() failed too, leaking threads.
    **{
        f"ModuleRunner(registry, {name}='junk')": (
            lambda name=name: pq.ModuleRunner(pq.RunRegistry(), **{name: "junk"}),  # type: ignore[misc]
            InvalidBackendError if name == "backend" else InvalidArgumentTypeError,
            f"{name} must be a {kind}",
        )
        for name, kind in (
            ("process_manager", "ProcessManager"),
            ("wrapper", "SubprocessWrapper"),
            ("task_manager", "BackgroundTaskManager"),
            ("backend", "RunBackend"),
        )
    },
    "execute_with_timeout(..., task_name=5)": (
        lambda: asyncio.run(pq.execute_with_timeout(_trivial(), 1, task_name=5)),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "task_name must be a str",
    ),
    "ModuleRunner(registry).execute_command(..., shell='yes')": (
        lambda: asyncio.run(
            pq.ModuleRunner(pq.RunRegistry(), run_mode="dry_run").execute_command(
                "m",
                "m",
                "echo hi",
                shell="yes",  # type: ignore[arg-type]
            )
        ),
        InvalidArgumentTypeError,
        "shell must be True or False",
    ),
    "OutputCapture().subscribe('r', registry='runs.db')": (
        lambda: pq.OutputCapture().subscribe("r", registry="runs.db"),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        "registry must be a BaseRunRegistry",
    ),
    # A probe's find: a bare TypeError / AttributeError from inside.
    "RunRegistry().add_run(None)": (
        lambda: asyncio.run(pq.RunRegistry().add_run(None)),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        r"add_run\(\) takes a Run",
    ),
    "RunRegistry().update_run('run-id')": (
        lambda: asyncio.run(pq.RunRegistry().update_run("run-id")),  # type: ignore[arg-type]
        InvalidArgumentTypeError,
        r"update_run\(\) takes a Run",
    ),
    "SQLiteRunRegistry(':memory:').add_run(None)": (
        lambda: asyncio.run(_sqlite_call("add_run", None)),
        InvalidArgumentTypeError,
        r"add_run\(\) takes a Run",
    ),
    "SQLiteRunRegistry(':memory:').update_run('run-id')": (
        lambda: asyncio.run(_sqlite_call("update_run", "run-id")),
        InvalidArgumentTypeError,
        r"update_run\(\) takes a Run",
    ),
    "execute_with_timeout(5, 1)": (
        lambda: asyncio.run(pq.execute_with_timeout(5, 1)),  # type: ignore[arg-type]
        InvalidTaskError,
        "awaitable",
    ),
    "execute_with_timeout(a coroutine function, 1)": (
        lambda: asyncio.run(pq.execute_with_timeout(_trivial, 1)),  # type: ignore[arg-type]
        InvalidTaskError,
        "call it",
    ),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_a_wrong_kind_of_object_gets_our_error(call: str) -> None:
    make, error, says = CALLS[call]
    with pytest.raises(error, match=says) as caught:
        make()
    assert isinstance(caught.value, TypeError)


@pytest.mark.parametrize("grace", [math.nan, -1.0, math.inf, "5"])
def test_stop_orphan_tree_refuses_a_bad_grace_before_any_signal(grace: object) -> None:
    # NaN or -1 was a bare ValueError from time.sleep(), raised after the child had been sent
    # SIGTERM; inf would never kill a child that ignores SIGTERM (a probe, session 34).
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        identity = pq.ProcessIdentity(child.pid, psutil.Process(child.pid).create_time(), None)
        with pytest.raises(pq.exceptions.InvalidTimeoutError, match="grace"):
            pq.stop_orphan_tree(identity, grace=grace)  # type: ignore[arg-type]
        assert child.poll() is None  # nothing was signalled
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("method", ["append_line", "append_lines"])
def test_a_run_id_that_is_no_str_gets_the_run_id_error(method: str) -> None:
    # append_lines(['a'], ...) raised a bare TypeError (unhashable list; a probe); append_line
    # already said InvalidRunIdError (a ValueError, as for any bad run id).
    line: Any = "x" if method == "append_line" else ["x"]
    with pytest.raises(pq.exceptions.InvalidRunIdError, match="run id"):
        asyncio.run(getattr(pq.OutputCapture(), method)(["a"], line))
