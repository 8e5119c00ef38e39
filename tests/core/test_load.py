"""Leak freedom and correctness under load, and big output without deadlock (slow-marked; CI
runs them).

Per-mode slack (documented in docs/LIFECYCLE.md): after the load and a short settle, threads and
fds are back within SLACK of the warmed-up baseline. Warm-up fills the strategies' lazily grown
thread pools first, so the slack covers only timing (a reader thread finishing its last wake-up).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys

import psutil
import pytest
from conftest import REAL, WRAPPER_FACTORIES
from helpers import py
from lifecycle_helpers import resource_counts, settle, zombies

import prismq_subprocess as pq

pytestmark = pytest.mark.slow

TRUE = shutil.which("true") or ""
ECHO = shutil.which("echo") or ""
SLACK = (2, 4)  # threads, fds


def cheap(i: int) -> tuple[str, ...]:
    # /bin/echo keeps 1,000 spawns quick; elsewhere fall back to the interpreter.
    if ECHO and sys.platform != "win32":
        return (ECHO, f"run-{i}")
    return py(f"print('run-{i}')")


@pytest.mark.parametrize("mode", REAL)
async def test_thousands_of_runs_leak_nothing(mode: str) -> None:
    async with WRAPPER_FACTORIES[mode]() as wrapper:
        sem = asyncio.Semaphore(50)

        async def one(i: int) -> None:
            async with sem:
                result = await wrapper.run(*cheap(i), timeout=60)
            assert result.returncode == 0
            assert result.stdout.strip() == f"run-{i}".encode()  # each its own output

        await asyncio.gather(*(one(i) for i in range(60)))  # warm up pools
        baseline = await asyncio.to_thread(settle, resource_counts(), (0, 0), 1.0)
        for i in range(1000):
            await one(i)
        await asyncio.gather(*(one(i) for i in range(1000)))
        after = await asyncio.to_thread(settle, baseline, SLACK)
        assert after[0] <= baseline[0] + SLACK[0], f"threads {baseline} -> {after}"
        assert after[1] <= baseline[1] + SLACK[1], f"fds {baseline} -> {after}"
        assert zombies() == []
        assert wrapper.live_processes == []


@pytest.mark.parametrize("mode", REAL)
async def test_200mb_on_each_stream_without_deadlock_in_bounded_memory(mode: str) -> None:
    code = (
        "import sys, threading\n"
        "block = b'x' * (1 << 20)\n"
        "def spew(stream):\n"
        "    for _ in range(200):\n"
        "        stream.write(block)\n"
        "    stream.flush()\n"
        "t = threading.Thread(target=spew, args=(sys.stderr.buffer,))\n"
        "t.start(); spew(sys.stdout.buffer); t.join()\n"
    )
    me = psutil.Process()
    peak = start = me.memory_info().rss
    done = False

    async def sample() -> None:
        nonlocal peak
        while not done:
            peak = max(peak, me.memory_info().rss)
            await asyncio.sleep(0.01)

    sampler = asyncio.ensure_future(sample())
    try:
        async with WRAPPER_FACTORIES[mode]() as wrapper:
            result = await wrapper.run(*py(code), timeout=120, max_output_bytes=4 << 20)
    finally:
        done = True
        await sampler
    assert result.returncode == 0
    assert result.stdout_total_bytes == result.stderr_total_bytes == 200 << 20
    assert result.stdout_truncated and result.stderr_truncated
    assert len(result.stdout) == len(result.stderr) == 4 << 20
    # 400 MB went through; far less than that may stay resident.
    assert peak - start < 100 << 20, f"RSS grew by {(peak - start) >> 20} MiB"


@pytest.mark.skipif(sys.platform == "win32", reason="fd accounting is POSIX")
async def test_shutdown_with_running_children_is_quiet(tmp_path: object) -> None:
    """Closing the wrapper (and the loop) with children still running leaves no warnings."""
    script = (
        "import asyncio, sys\n"
        "import prismq_subprocess as pq\n"
        "async def main():\n"
        "    for mode in ('async', 'threaded', 'local'):\n"
        "        async with pq.SubprocessWrapper(mode, grace_period=1) as w:\n"
        "            for _ in range(5):\n"
        "                await w.create_subprocess_exec(sys.executable, '-c',\n"
        "                    'import time; time.sleep(30)', stdout=pq.PIPE, stderr=pq.PIPE)\n"
        "            asyncio.ensure_future(\n"
        "                w.run(sys.executable, '-c', 'import time; time.sleep(30)'))\n"
        "            await asyncio.sleep(0.3)\n"
        "asyncio.run(main())\n"
        "print('clean exit')\n"
    )
    result = await pq.run(
        sys.executable,
        "-X",
        "dev",
        "-W",
        "error::ResourceWarning",
        "-c",
        script,
        timeout=60,
        env=dict(os.environ, PYTHONASYNCIODEBUG="1"),
        mode="async",
    )
    err = result.stderr_text
    assert result.stdout_text.strip() == "clean exit", err
    for bad in ("Task was destroyed", "Event loop is closed", "ResourceWarning", "Traceback"):
        assert bad not in err, err
