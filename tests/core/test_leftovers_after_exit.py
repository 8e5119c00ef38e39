"""What a child left running when it exited by itself, outside the reach of its output pipes.

``run()`` and ``ModuleRunner`` stop what an exited child left in its process group once its
output has ended; closing the wrapper now does the same for a raw child
(``create_subprocess_exec``/``_shell``) that exited leaving something in its group. A daemon that
left the child's session on purpose is left running by both. The common case, a child that left
nothing, costs no look at the process table (see docs/LIFECYCLE.md, "Leftovers after the child
exits" and "Closing the wrapper").
"""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from conftest import wrapper_for
from helpers import py
from lifecycle_helpers import daemonizer, marked_env, survivors_after, wait_for_marked

import prismq_subprocess as pq
from prismq_subprocess._core._result import TailBuffer
from prismq_subprocess._core._run_process import ChildRun
from prismq_subprocess._platform import PlatformOps, StopRecord, StopTarget
from prismq_subprocess._platform._posix import PosixOps

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX sessions and daemons")

MODES = ["async", "threaded", "local"]
GRACE = 2.0

#: Prepended to a child's code: wait (up to 2 s) until it was moved into its run's sub-group, so
#: that what it starts is born there (what a child forks before its move is outside it: see
#: docs/LIFECYCLE.md, "Containment").
AFTER_THE_MOVE = (
    "import time\n"
    "_born = open('/proc/self/cgroup').read()\n"
    "_until = time.monotonic() + 2.0\n"
    "while open('/proc/self/cgroup').read() == _born and time.monotonic() < _until:\n"
    "    time.sleep(0.002)\n"
)

# A classic daemon (fork, setsid, fork, stdio on /dev/null), then the child prints and exits.
DAEMON = AFTER_THE_MOVE + daemonizer(300, "print('parent done', flush=True)\n")


@pytest.fixture(params=MODES)
async def wrapper(request: pytest.FixtureRequest) -> AsyncIterator[pq.SubprocessWrapper]:
    async with wrapper_for(request.param, grace_period=GRACE) as w:
        yield w


async def assert_none_left(mark: str) -> None:
    """No process carrying ``mark`` runs (a moment's slack for a killed one to be reaped)."""
    alive = await asyncio.to_thread(survivors_after, mark, 0.5)
    assert alive == [], f"left running: {[(p.pid, p.name()) for p in alive]}"


async def kill_marked(mark: str) -> None:
    await asyncio.to_thread(survivors_after, mark, 0.0)


# -- closing the wrapper ------------------------------------------------------------------------
async def _exited(process: pq.abc.ProcessLike) -> None:
    """Until the child itself has exited (its pipes may stay open: a raw process's ``wait()``
    waits for them on 3.11)."""
    loop = asyncio.get_running_loop()
    until = loop.time() + 10.0
    while process.returncode is None:
        assert loop.time() < until, "the child did not exit"
        await asyncio.sleep(0.02)


async def _close(wrapper: pq.SubprocessWrapper, how: str) -> None:
    if how == "aclose":
        await wrapper.aclose()
    else:
        wrapper.cleanup()


@pytest.mark.parametrize("how", ["aclose", "cleanup"])
@pytest.mark.parametrize("mode", MODES)
async def test_closing_stops_what_an_exited_shell_left_in_its_group(mode: str, how: str) -> None:
    # The shell exits at once; `sleep` is in its group and sub-group, carries its cookie, and
    # holds its stdout.
    mark, env = marked_env()
    wrapper = wrapper_for(mode, grace_period=GRACE)
    try:
        process = await wrapper.create_subprocess_shell(
            "sleep 300 & echo done", stdout=pq.PIPE, env=env
        )
        # (Nothing is read: LOCAL hands output over once the pipe ends, which `sleep` holds.)
        await asyncio.to_thread(wait_for_marked, mark, 1)
        await _exited(process)
        assert wrapper.live_processes == []
        await _close(wrapper, how)
        await assert_none_left(mark)
    finally:
        await wrapper.aclose()
        await kill_marked(mark)


@pytest.mark.parametrize("mode", MODES)
async def test_a_daemon_that_left_the_childs_session_outlives_run_and_the_wrapper(
    mode: str,
) -> None:
    # By design (docs/LIFECYCLE.md): a daemon a command starts on purpose (fork, setsid, fork)
    # left the tree, and is left running by run() and by closing the wrapper; a stop on
    # timeout, cancellation or leaving a stream() block does stop it.
    mark, env = marked_env()
    wrapper = wrapper_for(mode, grace_period=GRACE)
    try:
        result = await asyncio.wait_for(wrapper.run(*py(DAEMON), env=env), 30)
        assert result.stdout == b"parent done\n"
        await asyncio.to_thread(wait_for_marked, mark, 1)
        await wrapper.aclose()
        assert len(await asyncio.to_thread(survivors_after, mark, 0.0)) == 1  # (and killed)
    finally:
        await wrapper.aclose()
        await kill_marked(mark)


# -- what the common case costs -----------------------------------------------------------------
@dataclass(eq=False)
class _Looks:
    """The stop's worker-thread operations called, and the threads they ran in."""

    calls: list[str] = field(default_factory=list)
    threads: list[threading.Thread] = field(default_factory=list)

    def note(self, name: str) -> None:
        self.calls.append(name)
        self.threads.append(threading.current_thread())


@dataclass(eq=False)
class _CountingOps(PosixOps):
    """The POSIX operations, noting each look at the process table a stop asks for."""

    looks: _Looks = field(default_factory=_Looks)

    def scan(self) -> Any:
        self.looks.note("scan")
        return super().scan()

    def groups_alive(self, pids: Sequence[int], pace: Callable[[], None]) -> list[bool]:
        self.looks.note("groups_alive")
        return super().groups_alive(pids, pace)

    def ask_to_stop(self, targets: Sequence[StopTarget], pace: Any = None) -> list[StopRecord]:
        self.looks.note("ask_to_stop")
        return super().ask_to_stop(targets) if pace is None else super().ask_to_stop(targets, pace)


async def test_a_run_that_left_nothing_looks_at_no_process_table(
    wrapper: pq.SubprocessWrapper,
) -> None:
    ops = _CountingOps(name=sys.platform)
    assert isinstance(ops, PlatformOps)
    process = await wrapper.create_subprocess_exec(*py("print('hi')"), stdout=pq.PIPE)
    child = ChildRun(process, wrapper.strategy, grace=1.0, ops=ops)
    try:
        child.capture(process.stdout, TailBuffer(None))
        await asyncio.wait_for(child.wait_exit(), 30)
        await asyncio.wait_for(child.finish(), 30)
        await asyncio.wait_for(child.stop_leftovers(), 30)
    finally:
        await child.aclose()
    assert ops.looks.calls == []


@pytest.mark.parametrize("mode", MODES)
async def test_closing_with_exited_children_that_left_nothing_stops_nothing(mode: str) -> None:
    ops = _CountingOps(name=sys.platform)
    wrapper = pq.SubprocessWrapper(mode, grace_period=GRACE, ops=ops)
    try:
        for _ in range(5):
            process = await wrapper.create_subprocess_exec(*py("print('hi')"), stdout=pq.PIPE)
            assert (await process.communicate())[0] == b"hi\n"
        await asyncio.sleep(0.1)  # (a killed group's last member being reaped by init)
        ops.looks.calls.clear()
        await wrapper.aclose()
        assert "ask_to_stop" not in ops.looks.calls
        assert "scan" not in ops.looks.calls
    finally:
        await wrapper.aclose()
