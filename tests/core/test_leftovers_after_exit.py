"""What a child left running when it exited by itself, outside the reach of its output pipes.

``run()`` and ``ModuleRunner`` stop what an exited child left in its process group, and what its
containment (the run's cgroup sub-group) still holds, once its output has ended: a classic
daemon, helpers that each started a session of their own, a helper of a child that runs in the
caller's own group. Closing the wrapper does the same for a raw child
(``create_subprocess_exec``/``_shell``) that exited leaving something running. The common case,
a child that left nothing, costs no look at the process table (see docs/LIFECYCLE.md, "Leftovers
after the child exits" and "Closing the wrapper").
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

SETSID_FORKS = 200
# Helpers that each lead a session of their own, their stdio on /dev/null.
SETSID_HELPERS = AFTER_THE_MOVE + (
    "import os\n"
    f"for _ in range({SETSID_FORKS}):\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"
    "        fd = os.open(os.devnull, os.O_RDWR)\n"
    "        for std in (0, 1, 2):\n"
    "            os.dup2(fd, std)\n"
    "        time.sleep(300)\n"
    "        os._exit(0)\n"
    "print('forked', flush=True)\n"
)

# A helper in the child's own group (and session), its output elsewhere.
BACKGROUND_HELPER = AFTER_THE_MOVE + (
    "import subprocess, sys\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)'],"
    " stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "print('parent done', flush=True)\n"
)


def _has_cgroup() -> bool:
    return "cgroup" in pq.containment_report().mechanisms


needs_cgroup = pytest.mark.skipif(
    not _has_cgroup(),
    reason="needs a run's cgroup sub-group: without one, a helper that left the child's group "
    "is not looked for after a normal exit (docs/LIFECYCLE.md)",
)


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


# -- run() --------------------------------------------------------------------------------------
@needs_cgroup
async def test_run_stops_a_daemon_its_child_left(wrapper: pq.SubprocessWrapper) -> None:
    mark, env = marked_env()
    try:
        result = await asyncio.wait_for(wrapper.run(*py(DAEMON), env=env), 30)
        assert result.returncode == 0
        assert result.stdout == b"parent done\n"
        await assert_none_left(mark)
    finally:
        await kill_marked(mark)


@needs_cgroup
async def test_run_stops_helpers_that_each_left_for_a_session_of_their_own(
    wrapper: pq.SubprocessWrapper,
) -> None:
    mark, env = marked_env()
    try:
        result = await asyncio.wait_for(wrapper.run(*py(SETSID_HELPERS), env=env), 60)
        assert result.stdout == b"forked\n"
        await assert_none_left(mark)
    finally:
        await kill_marked(mark)


@needs_cgroup
async def test_run_stops_a_helper_of_a_child_started_in_the_callers_group(
    wrapper: pq.SubprocessWrapper,
) -> None:
    # start_new_session=False: the child shares our group, so no group can be asked; its
    # sub-group holds the helper.
    mark, env = marked_env()
    try:
        result = await asyncio.wait_for(
            wrapper.run(*py(BACKGROUND_HELPER), env=env, start_new_session=False), 30
        )
        assert result.stdout == b"parent done\n"
        await assert_none_left(mark)
    finally:
        await kill_marked(mark)


@needs_cgroup
async def test_a_leftover_that_ignores_sigterm_does_not_hold_run_past_its_timeout(
    wrapper: pq.SubprocessWrapper,
) -> None:
    # The daemon ignores SIGTERM: only the kill at the end of the (cut) grace period ends it.
    ignore_term = "    import signal; signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    daemon = daemonizer(300, "print('parent done', flush=True)\n")
    stubborn = AFTER_THE_MOVE + daemon.replace("os.setsid()\n", "os.setsid()\n" + ignore_term)
    mark, env = marked_env()
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        result = await asyncio.wait_for(
            wrapper.run(*py(stubborn), env=env, timeout=3.0, grace_period=30.0), 30
        )
        assert result.returncode == 0
        assert loop.time() - started < 6.0  # the grace period was cut to the timeout
        await assert_none_left(mark)
    finally:
        await kill_marked(mark)


# -- ModuleRunner -------------------------------------------------------------------------------
@needs_cgroup
@pytest.mark.parametrize("mode", MODES)
async def test_module_runner_stops_a_daemon_its_child_left(mode: str) -> None:
    mark, env = marked_env()
    try:
        async with (
            wrapper_for(mode, grace_period=GRACE) as wrapper,
            pq.RunRegistry() as registry,
            pq.ModuleRunner(registry, wrapper=wrapper, grace_period=GRACE) as runner,
        ):
            run = await asyncio.wait_for(
                runner.execute_command("m", "daemon", py(DAEMON), env=env), 30
            )
            assert run.exit_code == 0
            await assert_none_left(mark)
    finally:
        await kill_marked(mark)


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


@needs_cgroup
@pytest.mark.parametrize("how", ["aclose", "cleanup"])
@pytest.mark.parametrize("mode", MODES)
async def test_closing_stops_a_daemon_an_exited_raw_child_left(mode: str, how: str) -> None:
    mark, env = marked_env()
    wrapper = wrapper_for(mode, grace_period=GRACE)
    try:
        process = await wrapper.create_subprocess_exec(*py(DAEMON), stdout=pq.PIPE, env=env)
        assert await asyncio.wait_for(process.communicate(), 30) == (b"parent done\n", None)
        await asyncio.to_thread(wait_for_marked, mark, 1)
        await _close(wrapper, how)
        await assert_none_left(mark)
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
