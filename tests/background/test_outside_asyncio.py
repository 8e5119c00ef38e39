"""The background layer called from outside asyncio (trio, or anyio's trio backend): every
entry point refuses with NoRunningLoopError before anything is stored or started (a probe
found bare RuntimeErrors from deep inside, and a PENDING run left in the registry for good)."""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psutil
import pytest

import prismq_subprocess as pq
from prismq_subprocess.exceptions import NoRunningLoopError

trio = pytest.importorskip("trio")

CALLS: dict[str, Callable[[Any, Path], Awaitable[object]]] = {
    "runner.execute_module": lambda o, s: o["runner"].execute_module("m", "M", s),
    "runner.execute_command": lambda o, s: o["runner"].execute_command(
        "m", "M", [sys.executable, "-c", "pass"]
    ),
    "runner.start_module": lambda o, s: o["runner"].start_module("m", "M", s),
    "executor.execute_module": lambda o, s: o["executor"].execute_module("m", "M", s),
    "executor.execute_batch": lambda o, s: o["executor"].execute_batch(
        [pq.ModuleSpec("m", "M", s)]
    ),
    "monitor.poll": lambda o, s: o["monitor"].poll(),
    "monitor.check_memory_async": lambda o, s: o["monitor"].check_memory_async(),
    "monitor.monitor_continuously": lambda o, s: o["monitor"].monitor_continuously(),
    "monitor.async_with": lambda o, s: _enter(o["monitor"]),
    "resources.check_resources": lambda o, s: o["resources"].check_resources(),
    "resources.check_resources_detailed": lambda o, s: o["resources"].check_resources_detailed(),
    "resources.admit": lambda o, s: o["resources"].admit(),
}


async def _enter(monitor: pq.MemoryMonitor) -> None:
    async with monitor:
        pass


@pytest.mark.parametrize("call", list(CALLS))
def test_a_call_from_trio_is_refused_before_anything_is_stored_or_started(
    call: str, tmp_path: Path
) -> None:
    script = tmp_path / "module.py"
    script.write_text("print('ran')\n")
    registry = pq.RunRegistry()
    objects = {
        "runner": pq.ModuleRunner(registry),
        "executor": pq.ConcurrentExecutor(1, registry=registry),
        "monitor": pq.MemoryMonitor(),
        "resources": pq.ResourceManager(),
    }
    before = {child.pid for child in psutil.Process().children()}
    got: list[object] = []

    async def main() -> None:
        try:
            got.append(await CALLS[call](objects, script))
        except NoRunningLoopError as exc:
            got.append(exc)

    trio.run(main)
    assert len(got) == 1
    assert isinstance(got[0], NoRunningLoopError), got
    assert "asyncio event loop" in str(got[0])
    assert registry._runs == {}
    assert {child.pid for child in psutil.Process().children()} - before == set()
    assert not objects["monitor"].is_monitoring
