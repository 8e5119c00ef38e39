"""POSIX platform operations (``_platform/_posix.py``), with the system calls injected where a
real process cannot show the behaviour."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys

import psutil
import pytest
from platform_fakes import FakeProc, recorder

from prismq_subprocess._platform import StopTarget, platform_ops
from prismq_subprocess._platform._posix_host import PosixHost


def test_posix_group_kwargs_respect_the_caller() -> None:
    ops = platform_ops("linux")
    assert ops.group_kwargs({}, new_group=True) == {"start_new_session": True}
    assert ops.group_kwargs({"start_new_session": False}, True) == {"start_new_session": False}
    assert ops.group_kwargs({"process_group": 0}, True) == {"process_group": 0}
    assert ops.group_kwargs({}, new_group=False) == {}
    assert ops.started_own_group({"process_group": 0})
    assert not ops.started_own_group({})


def test_posix_stop_signals_the_group_then_kills() -> None:
    calls, kill = recorder()
    group_calls, killpg = recorder()
    ops = platform_ops("linux", kill=kill, killpg=killpg)
    assert ops.stop_signal(own_group=True) == signal.SIGTERM
    assert ops.signal_group(99, signal.SIGTERM)
    assert group_calls == [(99, signal.SIGTERM)] and calls == []
    escaped = FakeProc(5)
    ops.kill_tree(99, True, [escaped])
    assert group_calls[-1] == (99, signal.SIGKILL)
    assert escaped.calls == [("signal", signal.SIGKILL)]
    assert not ops.group_alive(99, False)


def test_posix_reports_a_group_that_is_gone() -> None:
    def killpg(pid: int, sig: int) -> None:
        raise ProcessLookupError

    ops = platform_ops("linux", killpg=killpg)
    assert not ops.signal_group(7, signal.SIGTERM)
    assert not ops.group_alive(7, True)


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="Linux pidfd")
def test_a_pinned_child_is_signalled_through_its_pin_never_by_pid() -> None:
    # The stop's worker thread runs a moment after the loop saw the child running; by then the
    # child may be gone and its pid reused. A pinned child is never signalled by pid.
    calls, kill = recorder()
    ops = platform_ops("linux", kill=kill)
    child = subprocess.Popen(["sleep", "30"])
    pin = ops.pin(child.pid)
    assert pin >= 0
    child.kill()
    child.wait()  # reaped: its pid is free for anyone
    [record] = ops.ask_to_stop([StopTarget(child.pid, own_group=False, pin=pin)])
    assert not record.asked  # the caller then asks through the process object
    assert calls == []
    with pytest.raises(OSError):
        os.fstat(pin)  # released by ask_to_stop


def test_the_descendants_of_a_process_that_is_not_our_child_are_left_alone() -> None:
    from prismq_subprocess._platform._table import ProcessEntry, ProcessTable

    # As if our child's pid now named someone else's process, which has a child of its own.
    stranger = os.getpid() + 1_000_000
    table = ProcessTable(
        [
            ProcessEntry(stranger, 1, stranger, "S", 1.0),
            ProcessEntry(stranger + 1, stranger, 0, "S", 2.0),
        ]
    )
    table.handles = lambda entries: [FakeProc(e.pid) for e in entries]  # type: ignore[method-assign]
    ops = platform_ops("linux", kill=recorder()[1], killpg=recorder()[1])
    ops.scan = lambda: table  # type: ignore[method-assign]
    [record] = ops.ask_to_stop([StopTarget(stranger, own_group=True)])
    assert record.descendants == []


def test_the_group_of_a_reaped_child_whose_pid_went_round_is_left_alone() -> None:
    from prismq_subprocess._platform import StopRecord
    from prismq_subprocess._platform._table import ProcessEntry, ProcessTable

    # Our child (pid 4000, leading group 4000) exited and was reaped; its group emptied and a
    # stranger was given pid 4000 and leads a group of that number now. No phase of a stop may
    # signal that group: not the look for what an exited child left, not the polls for
    # leftovers, not the kill.
    child = os.getpid() + 1_000_000
    table = ProcessTable([ProcessEntry(child, 1, child, "S", 5.0)])
    group_calls, killpg = recorder()
    ops = platform_ops("linux", kill=recorder()[1], killpg=killpg, host=None)
    ops.scan = lambda: table  # type: ignore[method-assign]
    [record] = ops.ask_to_stop([StopTarget(child, own_group=True, running=False)])
    assert ops.lingering([record]) == [False]
    ops.kill_trees([record])
    assert [sig for _, sig in group_calls if sig != 0] == []
    # Leftovers of ours keep the number from being given away: the group is ours, signalled.
    table = ProcessTable([ProcessEntry(child + 1, 1, child, "S", 5.0)])
    [record] = ops.ask_to_stop([StopTarget(child, own_group=True, running=False)])
    assert ops.lingering([record]) == [True]
    ops.kill_trees([record])
    assert [sig for _, sig in group_calls if sig != 0] == [signal.SIGTERM, signal.SIGKILL]
    # A child still running is its group's leader: its group is signalled.
    table = ProcessTable([ProcessEntry(child, os.getpid(), child, "S", 5.0)])
    group_calls.clear()
    ops.kill_trees([StopRecord(StopTarget(child, own_group=True))])
    assert group_calls == [(child, signal.SIGKILL)]


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads /proc environments")
def test_kill_contained_finds_a_tree_by_its_cookie_alone() -> None:
    # A spawn undone before its pid was known: only the cookie names what it started.
    calls, kill = recorder()
    group_calls, killpg = recorder()
    ops = platform_ops("linux", kill=kill, killpg=killpg)
    kwargs, containment = ops.prepare_spawn({})
    if containment.cookie is None:
        pytest.skip("no cookie containment on this host")
    env = kwargs.get("env") or os.environ
    ours = subprocess.Popen(["sleep", "30"], env=env)
    stranger = subprocess.Popen(["sleep", "30"])
    try:
        ops.kill_contained(containment)
        assert ours.wait(10) == -signal.SIGKILL
        assert stranger.poll() is None
        # Nothing was sent to pid 0 or group 0 (ourselves) on the way.
        assert all(pid > 0 for pid, _ in calls + group_calls)
    finally:
        stranger.kill()
        stranger.wait()
        ours.kill()
        ours.wait()


def test_kill_contained_without_a_cookie_or_sub_group_only_releases() -> None:
    from prismq_subprocess._platform import Containment

    ops = platform_ops("linux")
    ops.scan = lambda: pytest.fail("no look at the process table")  # type: ignore[method-assign]
    ops.kill_contained(Containment())


def test_signal_unreaped_child_leaves_a_reaped_pid_alone() -> None:
    # The asyncio process's route (CPython gh-87744/gh-127049): signal the child while it is an
    # unreaped child of ours (running, or exited and waiting for the loop), never once reaped.
    calls, kill = recorder()
    ops = platform_ops("linux", kill=kill)
    child = subprocess.Popen(["sleep", "30"])
    try:
        assert ops.signal_unreaped_child(child.pid, signal.SIGUSR1)
        assert calls == [(child.pid, signal.SIGUSR1)]
        os.kill(child.pid, signal.SIGKILL)
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped
        assert ops.signal_unreaped_child(child.pid, None)
        assert calls[-1] == (child.pid, signal.SIGKILL)
        assert child.poll() == -signal.SIGKILL  # the look did not reap it
        calls.clear()
        assert ops.signal_unreaped_child(child.pid, signal.SIGTERM)  # handled: nothing to do
        assert calls == []
    finally:
        child.kill()
        child.wait()


def test_signal_unreaped_child_without_waitid_signals_by_pid() -> None:
    calls, kill = recorder()
    ops = platform_ops("linux", kill=kill, waitid=None)
    assert ops.signal_unreaped_child(4321, signal.SIGTERM)
    assert calls == [(4321, signal.SIGTERM)]


def test_windows_has_no_unreaped_child_route() -> None:
    calls, kill = recorder()
    ops = platform_ops("win32", kill=kill)
    assert not ops.signal_unreaped_child(4321, signal.SIGTERM)
    assert calls == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="cgroup v2")
@pytest.mark.parametrize("forks_before_entering", [False, True], ids=["held", "outside"])
def test_a_tree_held_whole_in_its_frozen_sub_group_takes_one_look(
    forks_before_entering: bool,
) -> None:
    # Each look reads the whole process table (10-30 ms with 1,000 processes, on the stop's
    # worker thread). A tree whose every process is in its frozen sub-group cannot change: one
    # look is the whole tree. A process outside it (forked before the child entered) can fork
    # on until it is seen stopped: the full protocol still runs (the look that finds it, two
    # quiet ones, and one after the SIGTERM).
    host = PosixHost(use_cookie=False, use_subreaper=False)
    host.activate()
    if host.cgroups is None:
        pytest.skip("no writable cgroup v2 directory here")
    ops = platform_ops("linux", host=host)
    kwargs, containment = ops.prepare_spawn({"start_new_session": True})
    code = (
        "import subprocess, time; subprocess.Popen(['sleep', '30']);"
        "print('ready', flush=True); time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, **kwargs)
    assert child.stdout is not None
    if forks_before_entering:
        child.stdout.readline()
    ops.adopt(child.pid, containment)
    if not forks_before_entering:
        child.stdout.readline()
    [grandchild] = psutil.Process(child.pid).children()
    looks = []
    scan = ops.scan
    ops.scan = lambda: looks.append(1) or scan()  # type: ignore[method-assign]
    try:
        [record] = ops.ask_to_stop([StopTarget(child.pid, True, containment=containment)])
        assert grandchild.pid in {p.pid for p in record.descendants}
        assert len(looks) == (4 if forks_before_entering else 1)
        assert child.wait(10) == -signal.SIGTERM
        grandchild.wait(10)
    finally:
        child.kill()
        child.wait()
        child.stdout.close()
        with contextlib.suppress(psutil.Error):
            grandchild.kill()
        ops.release(containment)


# A host that forks after its first run (gunicorn --preload, a "fork" multiprocessing pool):
# the forked worker starts a child, then the parent starts one and stops it.
_FORKED_HOST = """
import asyncio, os, sys
import psutil
import prismq_subprocess as pq
from prismq_subprocess._platform._posix_host import posix_host

MODE = sys.argv[1]

async def first():
    async with pq.SubprocessWrapper(MODE) as w:
        await w.run("true")

asyncio.run(first())  # containment chosen and in use before the fork
r, w = os.pipe()
done_r, done_w = os.pipe()
worker = os.fork()
if worker == 0:
    async def serve():
        async with pq.SubprocessWrapper(MODE) as wrapper:
            child = await wrapper.create_subprocess_exec("sleep", "60")
            os.write(w, f"{child.pid} {posix_host().cookies.name}\\n".encode())
            await asyncio.to_thread(os.read, done_r, 1)  # until the parent's stop is over
            print("worker's child", child.returncode, flush=True)
    asyncio.run(serve())
    os._exit(0)
victim, worker_cookie = os.read(r, 200).decode().split()

async def stop_one():
    async with pq.SubprocessWrapper(MODE) as wrapper:
        await wrapper.create_subprocess_exec("sleep", "60")
    # (leaving the wrapper stopped its child's whole tree)

asyncio.run(stop_one())
print("same cookie variable", worker_cookie == posix_host().cookies.name, flush=True)
os.write(done_w, b"x")
os.waitpid(worker, 0)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
@pytest.mark.parametrize("mode", ["async", "threaded", "local"])
def test_a_stop_in_a_forked_host_leaves_the_other_processs_children_alone(mode: str) -> None:
    # The forked worker kept the parent's cookie variable and run numbers: its first child
    # carried the very cookie of the parent's next run, and the parent's stop killed it.
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", _FORKED_HOST, mode],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "same cookie variable False" in lines, done.stdout
    assert "worker's child None" in lines, done.stdout  # still running when the stop ended
