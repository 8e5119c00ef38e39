"""Issue 11 (A1): containment that does not depend on the parent chain.

A module that daemonizes a helper the classic way (fork, setsid, fork again, the middle process
exits) leaves a process that is neither in the child's group nor below it in the tree. Every
stop must still reach it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
from helpers import py
from lifecycle_helpers import daemonizer, marked_env, survivors_after, wait_for_marked

import prismq_subprocess as pq
from prismq_subprocess._platform import _posix, platform_ops
from prismq_subprocess._platform._cookie import Cookies
from prismq_subprocess._platform._linux import (
    PR_GET_CHILD_SUBREAPER,
    PR_SET_CHILD_SUBREAPER,
    load_prctl,
)
from prismq_subprocess._platform._posix_host import PosixHost

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX fork; see docs/WINDOWS.md")

GRACE = 2.0

# The module daemonizes a helper, then keeps running (so only a stop ends it).
DAEMONIZER = daemonizer(60, "print('ready', flush=True)\ntime.sleep(60)\n")
#: Prepended to a child's code: wait (up to 1 s) until it was moved out of its parent's cgroup.
AFTER_THE_MOVE = (
    "import time\n"
    "_born = open('/proc/self/cgroup').read()\n"
    "_until = time.monotonic() + 1.0\n"
    "while open('/proc/self/cgroup').read() == _born and time.monotonic() < _until:\n"
    "    time.sleep(0.002)\n"
)


async def assert_no_survivors(mark: str) -> None:
    alive = await asyncio.to_thread(survivors_after, mark, 1.0)
    assert alive == [], f"survivors: {[(p.pid, p.ppid()) for p in alive]}"


async def started(mark: str) -> None:
    # The module and its daemon (the middle process has exited).
    await asyncio.to_thread(wait_for_marked, mark, 2)


async def test_a_double_forked_daemon_does_not_survive_a_timeout(
    wrapper: pq.SubprocessWrapper,
) -> None:
    mark, env = marked_env()
    with pytest.raises(pq.ProcessTimeoutError):
        await wrapper.run(*py(DAEMONIZER), env=env, timeout=1.5, grace_period=GRACE)
    await assert_no_survivors(mark)


async def test_a_double_forked_daemon_does_not_survive_a_cancel(
    wrapper: pq.SubprocessWrapper,
) -> None:
    mark, env = marked_env()
    task = asyncio.ensure_future(wrapper.run(*py(DAEMONIZER), env=env, grace_period=GRACE))
    await started(mark)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_no_survivors(mark)


@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
async def test_a_double_forked_daemon_does_not_survive_closing_the_wrapper(mode: str) -> None:
    mark, env = marked_env()
    async with pq.SubprocessWrapper(mode, grace_period=GRACE) as wrapper:
        await wrapper.create_subprocess_exec(*py(DAEMONIZER), env=env, stdout=pq.PIPE)
        await started(mark)
    await assert_no_survivors(mark)


async def test_a_double_forked_daemon_does_not_survive_terminate_gracefully(
    wrapper: pq.SubprocessWrapper,
) -> None:
    mark, env = marked_env()
    proc = await wrapper.create_subprocess_exec(*py(DAEMONIZER), env=env)
    await started(mark)
    await pq.terminate_gracefully(proc, GRACE)
    await assert_no_survivors(mark)


# -- each means alone ---------------------------------------------------------------------------
def _host(kind: str) -> PosixHost:
    if kind == "cookie":
        return PosixHost(use_cgroup=False, use_subreaper=False)
    if kind == "subreaper+cookie":
        return PosixHost(use_cgroup=False, use_subreaper=True)  # opt-in
    host = PosixHost(use_cookie=False, use_subreaper=False)
    host.activate()
    if host.cgroups is None:
        pytest.skip("no writable cgroup v2 directory here")
    return host


MEANS = {
    "cookie": ("cookie", "process-group"),
    "subreaper+cookie": ("subreaper", "cookie", "process-group"),
    "cgroup": ("cgroup", "process-group"),
}


@pytest.fixture
def subreaper_undone() -> Iterator[None]:
    """The subreaper is a property of the whole (pytest) process: turn it off again after the
    test and reap what it adopted, so later tests do not find adopted orphans among their
    children.

    Under ``PRISMQ_SUBREAPER=1`` the process was one already: the library made it one and
    relies on it, so it stays one (turned off, orphans went to init behind the library's back
    and reaper tests that ran later in the same worker failed). What it adopted from this
    test's own host (which has no reaper: the process's own one never saw those trees) is
    reaped all the same."""
    prctl = load_prctl()
    flag = ctypes.c_int(0)
    if prctl is not None and prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(flag), 0, 0, 0) != 0:
        prctl = None
    before = {child.pid for child in psutil.Process().children()}
    yield
    if prctl is not None and not flag.value:
        prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    for child in psutil.Process().children():
        with contextlib.suppress(psutil.Error, ChildProcessError):
            if child.pid not in before and child.status() == psutil.STATUS_ZOMBIE:
                os.waitpid(child.pid, os.WNOHANG)


@pytest.mark.parametrize("kind", list(MEANS))
@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
async def test_each_means_alone_reaches_the_daemon(
    kind: str, mode: str, subreaper_undone: None
) -> None:
    host = _host(kind)
    ops = platform_ops(sys.platform, host=host)
    assert ops.containment_report().mechanisms == MEANS[kind]
    mark, env = marked_env()
    code = DAEMONIZER
    if kind == "cgroup":
        # The child is moved into its sub-group once it runs (ASYNC from a worker thread,
        # THREADED and LOCAL by the spawning thread after Popen returned): the move waits 5-30
        # ms in the kernel, longer on a loaded machine, and what the child forks before it is
        # found by the cookie, which this case turns off (docs/LIFECYCLE.md). The cgroup alone
        # holds what is forked after the move: this child waits for it, then daemonizes. (CI
        # with four workers on two cores: a THREADED child daemonized before its move.)
        code = AFTER_THE_MOVE + DAEMONIZER
    async with pq.SubprocessWrapper(mode, grace_period=GRACE, ops=ops) as wrapper:
        with pytest.raises(pq.ProcessTimeoutError):
            await wrapper.run(*py(code), env=env, timeout=1.5)
    await assert_no_survivors(mark)


# At SIGTERM the module starts a helper in a session of its own and exits at once: the helper
# appears after the stop's snapshot, and its parent is gone before anything looks for leftovers.
SPAWNS_A_HELPER_AT_SIGTERM = (
    "import os, signal, subprocess, sys, time\n"
    "def on_term(*_):\n"
    "    subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'],\n"
    "                     start_new_session=True, stdin=subprocess.DEVNULL,\n"
    "                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
    "    os._exit(0)\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "open(sys.argv[1], 'w').close()\n"
    "time.sleep(60)\n"
)


@pytest.mark.parametrize("kind", list(MEANS))
@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
async def test_a_helper_started_at_sigterm_after_the_snapshot_is_stopped(
    kind: str, mode: str, subreaper_undone: None, tmp_path: Path
) -> None:
    host = _host(kind)
    ops = platform_ops(sys.platform, host=host)
    mark, env = marked_env()
    code = SPAWNS_A_HELPER_AT_SIGTERM
    if mode == "async" and kind == "cgroup":
        code = AFTER_THE_MOVE + code  # (see test_each_means_alone_reaches_the_daemon)
    ready = tmp_path / "ready"
    async with pq.SubprocessWrapper(mode, grace_period=GRACE, ops=ops) as wrapper:
        proc = await wrapper.create_subprocess_exec(*py(code), str(ready), env=env)
        for _ in range(1000):  # (its SIGTERM handler is installed)
            if ready.exists():
                break
            await asyncio.sleep(0.01)
        assert ready.exists()
        assert await pq.terminate_gracefully(proc, GRACE, ops=ops) == 0
    await assert_no_survivors(mark)


async def test_without_containment_the_daemon_escapes(subreaper_undone: None) -> None:
    # The reproduction of issue 11: process groups and the parent chain alone miss it.
    ops = platform_ops(sys.platform, host=None)
    mark, env = marked_env()
    async with pq.SubprocessWrapper("async", grace_period=GRACE, ops=ops) as wrapper:
        with pytest.raises(pq.ProcessTimeoutError):
            await wrapper.run(*py(DAEMONIZER), env=env, timeout=1.5)
    escaped = await asyncio.to_thread(survivors_after, mark, 1.0)  # (and kills them)
    assert len(escaped) == 1


# -- the report ---------------------------------------------------------------------------------
def test_containment_report_names_the_means_in_use(caplog: pytest.LogCaptureFixture) -> None:
    report = pq.containment_report()
    assert isinstance(report, pq.ContainmentReport)
    assert report.mechanisms[-2:] == ("cookie", "process-group")
    assert report.strongest == report.mechanisms[0]
    assert report.cookie_variable and report.cookie_variable.startswith("PRISMQ_RUN_")
    assert "containment:" in str(report) and report.strongest in str(report)
    with caplog.at_level(logging.INFO, logger="prismq_subprocess.containment"):
        PosixHost(use_cgroup=False, use_subreaper=False).activate()
    assert "containment: cookie + process-group" in caplog.text


def test_a_host_without_proc_uses_the_cookie_through_psutil(tmp_path: Path) -> None:
    host = PosixHost(proc_root=str(tmp_path))  # as on macOS: no /proc
    report = platform_ops("darwin", host=host).containment_report()
    assert report.mechanisms == ("cookie", "process-group")
    assert any("no /proc" in note for note in report.notes)
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)"],
        env=host.cookies.child_env(None, "42"),
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        assert host.cookies.read(child.pid) == "42"
        assert Cookies(token="OTHER").read(child.pid) is None
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


def test_cookie_parsing() -> None:
    cookies = Cookies(token="T0K")
    assert cookies.name == "PRISMQ_RUN_T0K"
    assert cookies.parse(b"A=1\0PRISMQ_RUN_T0K=17\0B=2\0") == "17"
    assert cookies.parse(b"PRISMQ_RUN_T0K=3") == "3"
    assert cookies.parse(b"A=1\0XPRISMQ_RUN_T0K=9\0") is None
    assert cookies.parse(b"PRISMQ_RUN_OTHER=5\0") is None
    assert cookies.child_env({"A": "1"}, "4") == {"A": "1", "PRISMQ_RUN_T0K": "4"}
    assert cookies.issue() != cookies.issue()


def test_the_cookie_environment_follows_changes_to_os_environ(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The decoded environment is reused between spawns, but never a stale one.
    cookies = Cookies(token="T0K")
    monkeypatch.setenv("PRISMQ_TEST_VAR", "one")
    first = cookies.child_env(None, "1")
    assert _decoded(first) == {**os.environ, "PRISMQ_RUN_T0K": "1"}
    first["MUTATED_BY_CALLER"] = "x"  # type: ignore[index]  # a copy each time
    assert "MUTATED_BY_CALLER" not in _decoded(cookies.child_env(None, "2"))
    monkeypatch.setenv("PRISMQ_TEST_VAR", "two")
    assert _decoded(cookies.child_env(None, "3"))["PRISMQ_TEST_VAR"] == "two"
    monkeypatch.delenv("PRISMQ_TEST_VAR")
    assert "PRISMQ_TEST_VAR" not in _decoded(cookies.child_env(None, "4"))


def _decoded(env: Mapping[Any, Any]) -> dict[str, str]:
    return {os.fsdecode(k): os.fsdecode(v) for k, v in env.items()}


@pytest.mark.skipif(os.name != "posix", reason="POSIX keeps the environment as bytes")
async def test_a_child_gets_this_process_environment_byte_for_byte_with_the_cookie(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The environment goes to Popen as the raw bytes it is kept in: a str mapping is encoded
    # variable by variable in Python (about 70 calls per spawn), and undecodable bytes must
    # reach the child unchanged either way.
    cookies = Cookies(token="T0K")
    env = cookies.child_env(None, "1")
    assert all(type(k) is bytes and type(v) is bytes for k, v in env.items())
    monkeypatch.setitem(os.environb, b"PRISMQ_TEST_RAW", b"caf\xe9 \xff")
    async with pq.SubprocessWrapper("async") as wrapper:
        result = await wrapper.run(*py("import os, sys; print(repr(dict(os.environb)))"))
    seen = eval(result.stdout)  # a repr of a dict of bytes
    assert seen[b"PRISMQ_TEST_RAW"] == b"caf\xe9 \xff"
    for key, value in os.environb.items():
        assert seen.get(key) == value, key
    added = set(seen) - set(os.environb)
    assert len([k for k in added if k.startswith(b"PRISMQ_RUN_")]) == 1
    assert added <= {k for k in added if k.startswith(b"PRISMQ_RUN_")} | {b"LC_CTYPE"}


# -- dying with the host (A4) -------------------------------------------------------------------
HOST = (
    "import asyncio, sys\n"
    "import prismq_subprocess as pq\n"
    "async def main():\n"
    "    w = pq.SubprocessWrapper(sys.argv[1], die_with_host=sys.argv[2] == 'yes')\n"
    "    p = await w.create_subprocess_exec('sleep', '60', stdout=pq.DEVNULL)\n"
    "    try:\n"
    "        with open(f'/proc/{p.pid}/cgroup') as f:\n"
    "            cgroup = f.read().strip().splitlines()[-1]\n"
    "    except OSError:\n"
    "        cgroup = 'none'\n"
    "    print(p.pid, cgroup, flush=True)\n"
    "    await asyncio.sleep(60)\n"
    "asyncio.run(main())\n"
)


@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
@pytest.mark.parametrize("die_with_host", [True, False])
async def test_children_die_with_a_killed_host_when_asked(mode: str, die_with_host: bool) -> None:
    mark, env = marked_env()
    host = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOST,
        mode,
        "yes" if die_with_host else "no",
        env=env,
        stdout=asyncio.subprocess.PIPE,
    )
    assert host.stdout is not None
    pid, cgroup = (await asyncio.wait_for(host.stdout.readline(), 30)).decode().split(" ", 1)
    if die_with_host and PosixHost().report().cgroup_dir is not None:
        # The child moved itself into its run's sub-group before exec.
        assert "/prismq-" in cgroup, cgroup
    host.kill()  # SIGKILL: no clean-up code of the host runs
    await host.wait()
    survivors = await asyncio.to_thread(survivors_after, mark, 2.0)
    assert [p.pid for p in survivors] == ([] if die_with_host else [int(pid)])
    # The child was re-parented to this test process (a child subreaper) and ended by someone
    # else (its parent-death signal, or the kill above): no run of ours started it and no stop
    # saw it, so the library rightly leaves its reaping alone.
    with contextlib.suppress(ChildProcessError):
        await asyncio.to_thread(os.waitpid, int(pid), 0)


# -- the move into the sub-group, off the loop (ASYNC) ------------------------------------------
class _HeldMoves:
    """Moves into sub-groups that wait for :meth:`release` (the real move follows)."""

    def __init__(self, host: PosixHost) -> None:
        assert host.cgroups is not None
        self._enter = host.cgroups.enter
        self.gate = threading.Event()
        self.calls: list[int] = []
        host.cgroups.enter = self  # type: ignore[method-assign]

    def __call__(self, path: str, pid: int) -> bool:
        self.calls.append(pid)
        self.gate.wait(10)
        return self._enter(path, pid)


async def test_async_spawn_does_not_wait_for_the_move_into_the_sub_group() -> None:
    # Moving a process between cgroups blocks 5-30 ms in the kernel (an RCU grace period): on
    # the loop's thread, every ASYNC spawn stalled the host's other tasks that long.
    host = _host("cgroup")
    moves = _HeldMoves(host)
    ops = platform_ops(sys.platform, host=host)
    async with pq.SubprocessWrapper("async", ops=ops) as wrapper:
        # Were the move on the loop's thread, this spawn would wait for the gate (10 s).
        proc = await asyncio.wait_for(wrapper.create_subprocess_exec("sleep", "30"), timeout=5)
        assert not moves.gate.is_set()
        moves.gate.set()
        assert await asyncio.to_thread(_posix._MOVES.wait_idle, 10)
        assert moves.calls == [proc.pid]
        # This host's sub-groups only (other test processes may have theirs beside them).
        prefix = f"prismq-{host.cookies.token.lower()}-"
        ours = [p for p in os.listdir(host.cgroups.base) if p.startswith(prefix)]
        members = [host.cgroups.members(os.path.join(host.cgroups.base, p)) for p in ours]
        assert members == [[proc.pid]]
        proc.kill()
        await proc.wait()


async def test_an_async_run_makes_and_removes_its_sub_group_off_the_loop() -> None:
    # mkdir and rmdir of a sub-group take the kernel's cgroup mutex: tens of microseconds on a
    # quiet machine, milliseconds under load, on the loop's thread for every ASYNC spawn.
    host = _host("cgroup")
    assert host.cgroups is not None
    calls: list[tuple[str, int]] = []
    create, make, remove = host.cgroups.create, host.cgroups.make, host.cgroups.remove

    def creating(name: str) -> str | None:
        calls.append(("create", threading.get_ident()))
        return create(name)

    def making(path: str) -> bool:
        calls.append(("create", threading.get_ident()))
        return make(path)

    def removing(path: str) -> bool:
        calls.append(("remove", threading.get_ident()))
        return remove(path)

    host.cgroups.create = creating  # type: ignore[method-assign]
    host.cgroups.make = making  # type: ignore[method-assign]
    host.cgroups.remove = removing  # type: ignore[method-assign]
    ops = platform_ops(sys.platform, host=host)
    prefix = f"prismq-{host.cookies.token.lower()}-"

    def ours() -> list[str]:
        assert host.cgroups is not None
        return [p for p in os.listdir(host.cgroups.base) if p.startswith(prefix)]

    async with pq.SubprocessWrapper("async", ops=ops) as wrapper:
        proc = await wrapper.create_subprocess_exec("sleep", "30")
        assert await asyncio.to_thread(_posix._MOVES.wait_idle, 10)
        assert [host.cgroups.members(os.path.join(host.cgroups.base, p)) for p in ours()] == [
            [proc.pid]
        ]
        proc.kill()
        await proc.wait()
        del proc
        result = await wrapper.run("true")
        assert result.returncode == 0
        del result
    gc.collect()  # the wrapper is closed and the process objects go: their runs are over
    assert await asyncio.to_thread(_posix._MOVES.wait_idle, 10)
    assert ours() == []
    # The short run's child may be reaped before its move is tried: then nothing is made.
    assert sorted(op for op, _ in calls).count("remove") == 2
    assert "create" in [op for op, _ in calls]
    assert [op for op, thread in calls if thread == threading.get_ident()] == []


EXIT_WITH_LIVE_PROCESS_OBJECTS = """
import asyncio, os, sys
import prismq_subprocess as pq
from prismq_subprocess._platform import _posix
from prismq_subprocess._platform._posix_host import posix_host
KEPT = []
async def main():
    wrapper = pq.SubprocessWrapper("async")
    for _ in range(3):
        proc = await wrapper.create_subprocess_exec("sleep", "30")
        assert await asyncio.to_thread(_posix._MOVES.wait_idle, 10)  # in its sub-group
        proc.kill()
        await proc.wait()
        KEPT.append(proc)  # still alive when the interpreter exits
    await asyncio.sleep(0.5)  # the containment thread has ended (it lingers 0.25 s)
    host = posix_host()
    print(host.cgroups.base if host.cgroups else "", host.cookies.token.lower(), flush=True)
asyncio.run(main())
"""


def test_process_objects_alive_at_exit_release_their_sub_groups_quietly() -> None:
    # Their finalizers run at exit, where Python 3.12+ refuses new threads.
    _host("cgroup")  # skips where there are no sub-groups to make
    done = subprocess.run(
        [sys.executable, "-c", EXIT_WITH_LIVE_PROCESS_OBJECTS],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    base, token = done.stdout.split()
    assert [p for p in os.listdir(base) if p.startswith(f"prismq-{token}-")] == []


@pytest.mark.parametrize("mode", ["threaded", "local"])
async def test_a_spawn_thread_makes_the_sub_group_before_the_child_starts(mode: str) -> None:
    # Off the loop already, THREADED and LOCAL make the sub-group before Popen, so the move
    # follows the spawn at once: making it after (as ASYNC must when none was made ahead) let
    # a daemon fork outside it on a busy machine (found by CI: local-cgroup).
    host = _host("cgroup")
    assert host.cgroups is not None
    events: list[str] = []
    create, enter = host.cgroups.create, host.cgroups.enter

    def creating(name: str) -> str | None:
        events.append("create")
        return create(name)

    def entering(path: str, pid: int) -> bool:
        events.append("enter")
        return enter(path, pid)

    host.cgroups.create = creating  # type: ignore[method-assign]
    host.cgroups.enter = entering  # type: ignore[method-assign]
    real_popen = subprocess.Popen

    class Recorded(real_popen):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            events.append("spawn")
            super().__init__(*args, **kwargs)

    ops = platform_ops(sys.platform, host=host)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess, "Popen", Recorded)
        async with pq.SubprocessWrapper(mode, ops=ops) as wrapper:
            proc = await wrapper.create_subprocess_exec("sleep", "30")
            proc.kill()
            await proc.wait()
    assert events[:3] == ["create", "spawn", "enter"]


async def test_a_child_reaped_before_its_move_is_not_moved() -> None:
    # The move names the child by pid; once asyncio has reaped it, that pid may be anyone's.
    host = _host("cgroup")
    moves = _HeldMoves(host)
    ops = platform_ops(sys.platform, host=host)
    async with pq.SubprocessWrapper("async", ops=ops) as wrapper:
        first = await wrapper.create_subprocess_exec("sleep", "30")  # holds the worker
        second = await wrapper.create_subprocess_exec("true")
        assert await second.wait() == 0
        moves.gate.set()
        assert await asyncio.to_thread(_posix._MOVES.wait_idle, 10)
        assert moves.calls == [first.pid]
        first.kill()
        await first.wait()
