"""The one run path (``_core/_run_process.py``): the drain rule and the stops, in every mode."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import subprocess
import sys
import threading
from collections.abc import AsyncIterator

import psutil
import pytest
from conftest import WRAPPER_FACTORIES, skip_if_async_on_uvloop
from helpers import py
from lifecycle_helpers import (
    STUBBORN_CHILD,
    marked_env,
    resource_counts,
    settle,
    survivors_after,
    wait_for_marked,
)

import prismq_subprocess as pq
from prismq_subprocess._core._run_process import DRAIN_SECONDS, ChildRun

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX trees and fds")

# The child starts a helper in its group that prints a line and then lingers holding the pipes;
# the child waits until the line is out, then exits.
LINGERING_HELPER = (
    "import os, subprocess, sys, tempfile, time\n"
    "flag = tempfile.mktemp()\n"
    'helper = f\'import pathlib, time; print("helper up", flush=True); '
    "pathlib.Path({flag!r}).touch(); time.sleep(60)'\n"
    "subprocess.Popen([sys.executable, '-c', helper])\n"
    "while not os.path.exists(flag):\n"
    "    time.sleep(0.01)\n"
    "os.unlink(flag)\n"
    "print('parent done', flush=True)\n"
)

# The child starts a process that leaves its session (out of reach of any group stop) and holds
# stdout and stderr, then exits.
ESCAPED_HOLDER = (
    "import subprocess, sys\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'],"
    " start_new_session=True)\n"
    "print('parent done', flush=True)\n"
)


async def kill_marked(mark: str) -> None:
    await asyncio.to_thread(survivors_after, mark, 0.0)


@contextlib.asynccontextmanager
async def no_descriptor_leak(wrapper: pq.SubprocessWrapper, mark: str) -> AsyncIterator[None]:
    """The block leaves no more open descriptors than it found (after a warm-up run); the
    processes carrying ``mark`` are killed afterwards."""
    try:
        await wrapper.run(*py("pass"))
        baseline = resource_counts()
        yield
        now = await asyncio.to_thread(settle, baseline, (3, 2))
        assert now[1] <= baseline[1] + 2, f"descriptors leaked: {baseline} -> {now}"
    finally:
        await kill_marked(mark)


def test_the_drain_rule_is_one_documented_constant() -> None:
    assert 0 < DRAIN_SECONDS <= 1.0


async def test_a_lingering_helper_is_stopped_and_its_output_kept(
    any_wrapper: pq.SubprocessWrapper,
) -> None:
    if any_wrapper.mode is pq.RunMode.DRY_RUN:
        pytest.skip("DRY_RUN starts nothing")
    mark, env = marked_env()
    result = await asyncio.wait_for(
        any_wrapper.run(*py(LINGERING_HELPER), env=env, grace_period=0.5), 30
    )
    assert result.returncode == 0
    assert result.stdout.splitlines() == [b"helper up", b"parent done"]
    assert await asyncio.to_thread(survivors_after, mark, 1.0) == []


async def test_run_lets_go_of_pipes_an_escaped_process_holds(
    wrapper: pq.SubprocessWrapper,
) -> None:
    mark, env = marked_env()
    async with no_descriptor_leak(wrapper, mark):
        for _ in range(3):
            result = await asyncio.wait_for(
                wrapper.run(*py(ESCAPED_HOLDER), env=env, grace_period=0.2), 30
            )
            assert (result.returncode, result.stdout) == (0, b"parent done\n")
        # Containment (the run's environment cookie, a cgroup sub-group, the subreaper) reaches
        # even a process that left the tree; with only process groups it is out of reach and
        # keeps running. Either way our ends of its pipes are let go of.
        contained = pq.containment_report().mechanisms != ("process-group",)
        assert len(await asyncio.to_thread(survivors_after, mark, 2.0)) == (0 if contained else 3)


async def test_stream_lets_go_of_pipes_an_escaped_process_holds(
    wrapper: pq.SubprocessWrapper,
) -> None:
    mark, env = marked_env()
    async with no_descriptor_leak(wrapper, mark):
        async with wrapper.stream(*py(ESCAPED_HOLDER), env=env, grace_period=0.2) as lines:
            got = [line async for line in lines]
        assert got == [b"parent done\n"]
        assert lines.returncode == 0
        with pytest.raises(pq.ProcessTimeoutError):
            async with wrapper.stream(
                *py(ESCAPED_HOLDER + "import time; time.sleep(30)\n"),
                env=env,
                timeout=1.0,
                grace_period=0.2,
            ) as lines:
                async for _ in lines:
                    pass


async def test_stream_ends_when_a_lingering_helper_is_stopped(
    wrapper: pq.SubprocessWrapper,
) -> None:
    mark, env = marked_env()
    async with wrapper.stream(*py(LINGERING_HELPER), env=env, grace_period=0.5) as lines:
        got = [line async for line in lines]
    assert got == [b"helper up\n", b"parent done\n"]
    assert lines.returncode == 0
    assert await asyncio.to_thread(survivors_after, mark, 1.0) == []


async def test_letting_go_keeps_what_a_slow_consumer_has_not_read(
    wrapper: pq.SubprocessWrapper, caplog: pytest.LogCaptureFixture
) -> None:
    skip_if_async_on_uvloop(wrapper, "it refuses pipesize= (test_uvloop.py)")
    caplog.set_level(logging.INFO, logger="prismq_subprocess")
    # A 1 MiB pipe lets the child write 600 KB and exit although nobody reads; the holder out of
    # reach keeps the pipe open, so it is let go of while most of the output still waits in it.
    mark, env = marked_env()
    code = ESCAPED_HOLDER + "sys.stdout.write(''.join('line %06d\\n' % i for i in range(50000)))\n"
    try:
        async with wrapper.stream(
            *py(code), env=env, grace_period=0.2, pipesize=1024 * 1024
        ) as lines:
            # The child exits at once; wait until the drain rule has run out and the pipes
            # were let go of (logged), with most of the output still unread.
            for _ in range(1000):
                if "letting go of them" in caplog.text:
                    break
                await asyncio.sleep(0.01)
            got = [line async for line in lines]
        assert got[0] == b"parent done\n"
        assert got[1:] == [b"line %06d\n" % i for i in range(50000)]
        assert "letting go of them" in caplog.text
    finally:
        await kill_marked(mark)


# 150 KB at once, then the child exits: most of it is still unread when it does.
QUICK_BURST = "import sys; sys.stdout.write(''.join('line %06d\\n' % i for i in range(13637)))"


async def test_a_reader_slower_than_the_child_still_gets_all_its_output(
    wrapper: pq.SubprocessWrapper, caplog: pytest.LogCaptureFixture
) -> None:
    # A reader slower than the child (ModuleRunner's, feeding subscribers): the child exits with
    # part of its output unread, in the pipe and in the reader's buffer; nothing else holds the
    # pipe. The drain rule gave the reader 0.5 s after the pipes were let go of, then cancelled
    # it: ModuleRunner recorded the run COMPLETED without its last lines (2,500 of 200,000 in
    # test_output_fanout on uvloop, whose pipes to a child are socket pairs holding about 200 KB
    # where a pipe holds 64 KiB). A reader that keeps reading now gets to the end.
    caplog.set_level(logging.INFO, logger="prismq_subprocess")
    process = await wrapper.create_subprocess_exec(*py(QUICK_BURST), stdout=subprocess.PIPE)
    got = bytearray()

    async def slow_reader() -> None:
        assert process.stdout is not None
        while chunk := await process.stdout.read(2048):
            got.extend(chunk)
            await asyncio.sleep(0.01)  # about 200 KB/s: reading 150 KB outlasts the drain rule

    child = ChildRun(process, wrapper.strategy, grace=0.5)
    child.read(slow_reader())
    try:
        await asyncio.wait_for(child.wait_exit(), 60)
        await asyncio.wait_for(child.finish(), 60)
    finally:
        await child.aclose()
    assert child.reader_error() is None
    assert bytes(got) == b"".join(b"line %06d\n" % i for i in range(13637))
    assert process.returncode == 0


@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
async def test_a_second_cancellation_kills_at_once(mode: str) -> None:
    mark, env = marked_env()
    async with WRAPPER_FACTORIES[mode]() as wrapper:
        task = asyncio.ensure_future(wrapper.run(*py(STUBBORN_CHILD), env=env, grace_period=60))
        await asyncio.to_thread(wait_for_marked, mark, 3)
        task.cancel()
        await asyncio.sleep(0.2)  # the stop is under way: SIGTERM sent, waiting out the grace
        assert not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 20)  # 60 s of grace if the second one were ignored
        assert await asyncio.to_thread(survivors_after, mark, 0.0) == []


# --- timeout=0 (session 20) ---------------------------------------------------------------------


async def test_a_zero_timeout_runs_nothing_and_times_out_in_every_mode(
    any_wrapper: pq.SubprocessWrapper,
) -> None:
    # A review found DRY_RUN returning a result where the real modes raised (they spawned the
    # child, then killed it at the first suspension): no time at all is a timeout in every mode,
    # and nothing is started for it.
    before = {child.pid for child in psutil.Process().children()}
    with pytest.raises(pq.exceptions.ProcessTimeoutError) as caught:
        await any_wrapper.run("true", timeout=0)
    assert caught.value.returncode is None
    assert {child.pid for child in psutil.Process().children()} <= before


async def test_a_zero_timeout_ends_a_stream_in_every_mode(
    any_wrapper: pq.SubprocessWrapper,
) -> None:
    # The stream's deadline has passed before the first line: its iteration times out in every
    # mode, even where the lines are ready without waiting (DRY_RUN completed the stream).
    with pytest.raises(pq.exceptions.ProcessTimeoutError):
        async with any_wrapper.stream("echo", "x", timeout=0) as lines:
            async for _ in lines:
                pass


# The child starts a helper in its group with its output elsewhere, then exits.
HELPER_LEFT_BEHIND = (
    "import subprocess, sys\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],"
    " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print('parent done', flush=True)\n"
)


class _RecordingOps:
    """The platform's operations, noting the thread each look for a live group member ran in."""

    def __init__(self) -> None:
        from prismq_subprocess._platform import platform_ops

        self._ops = platform_ops()
        self.threads: list[threading.Thread] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._ops, name)

    def groups_alive(self, pids: list[int], pace: object) -> list[bool]:
        self.threads.append(threading.current_thread())
        return list(self._ops.groups_alive(pids, pace))


async def test_the_look_for_what_a_child_left_in_its_group_is_off_the_loop(
    wrapper: pq.SubprocessWrapper,
) -> None:
    # The look reads the whole process table (milliseconds with thousands of processes, for
    # every child that left something behind): it ran on the event loop's thread. (It now
    # goes through the stops' shared look thread: one read for every child asking at once.)
    mark, env = marked_env()
    process = await wrapper.create_subprocess_exec(
        *py(HELPER_LEFT_BEHIND), stdout=subprocess.PIPE, env=env
    )
    ops = _RecordingOps()
    child = ChildRun(process, wrapper.strategy, grace=0.5, ops=ops)  # type: ignore[arg-type]
    try:
        assert process.stdout is not None
        assert await process.stdout.readline() == b"parent done\n"
        await asyncio.to_thread(wait_for_marked, mark, 1)  # the helper (the child may be gone)
        await asyncio.wait_for(child.wait_exit(), 30)
        await asyncio.wait_for(child.finish(), 30)
        await asyncio.wait_for(child.stop_leftovers(), 30)
    finally:
        await child.aclose()
    assert ops.threads and threading.main_thread() not in ops.threads
    assert await asyncio.to_thread(survivors_after, mark, 5.0) == []
