"""POSIX platform operations (``_platform/_posix.py``), with the system calls injected where a
real process cannot show the behaviour."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import psutil
import pytest
from platform_fakes import FakeProc, recorder

from prismq_subprocess._platform import PlatformOps, StopTarget, platform_ops
from prismq_subprocess._platform._cookie import Cookies
from prismq_subprocess._platform._posix_host import PosixHost
from prismq_subprocess._platform._procfs import read_small_file
from prismq_subprocess._platform._table import scan_proc


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


# Eight children of the leader, each a chain of execs (every `env` execs the next): at any
# moment one may be inside an exec, where its /proc/<pid>/environ reads as nothing (between the
# switch to the new memory and the new stack's setup).
_EXEC_CHAINS = (
    "for i in 1 2 3 4 5 6 7 8; do " + "env " * 2000 + "sleep 30 & done; echo ready; exec sleep 30"
)


def _describe(pids: list[int], cookie: str) -> str:
    """What a survivor was: its state, its program, whether its environment shows the cookie."""
    out = []
    for pid in pids:
        facts = []
        for name in ("stat", "cmdline", "environ"):
            try:
                with open(f"/proc/{pid}/{name}", "rb") as file:
                    data = file.read()
            except OSError as exc:
                facts.append(f"{name}: {exc}")
                continue
            if name == "environ":
                facts.append(f"cookie in environ: {cookie.encode() in data} ({len(data)} bytes)")
            else:
                facts.append(f"{name}: {data[:120]!r}")
        out.append(f"pid {pid}: " + "; ".join(facts))
    return "\n".join(out)


def _session_members(sid: int) -> list[int]:
    """Processes (not zombies) of session ``sid``: found whatever their environment reads."""
    return [e.pid for e in scan_proc().entries.values() if e.sid == sid and e.state not in "ZXx"]


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads /proc environments")
def test_kill_contained_finds_descendants_caught_inside_an_exec() -> None:
    # The undo of a cancelled ASYNC spawn: asyncio has killed and reaped the child; what it had
    # forked is found through the cookie alone, in one look. One caught inside an exec used to
    # read as having no environment and live on (about a third of these rounds, before).
    ops = platform_ops("linux")
    for _ in range(12):
        kwargs, containment = ops.prepare_spawn({"start_new_session": True})
        if containment.cookie is None:
            pytest.skip("no cookie containment on this host")
        leader = subprocess.Popen(["/bin/sh", "-c", _EXEC_CHAINS], stdout=subprocess.PIPE, **kwargs)
        assert leader.stdout is not None
        try:
            assert leader.stdout.readline() == b"ready\n"
            leader.kill()
            leader.wait()
            ops.kill_contained(containment)
            deadline = time.monotonic() + 2.0
            while _session_members(leader.pid) and time.monotonic() < deadline:
                time.sleep(0.02)
            left = _session_members(leader.pid)
            assert left == [], _describe(left, containment.cookie or "")
        finally:
            leader.kill()
            leader.wait()
            leader.stdout.close()
            for pid in _session_members(leader.pid):
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads /proc environments")
def test_kill_contained_finds_a_descendant_at_the_pid_of_a_child_we_spawned_earlier() -> None:
    # Seen once in the suite (xdist, pid_max 32768, so pids come round within minutes): the
    # undo of a cancelled spawn left a descendant alive whose pid had been a child of ours,
    # reaped, its process object not yet let go of. Our own children are left out of the cookie
    # search (they carry their own run's cookie), and that stale pid left the descendant out.
    ops = platform_ops("linux")
    host = ops.host  # type: ignore[attr-defined]
    kwargs, containment = ops.prepare_spawn({"start_new_session": True})
    if containment.cookie is None or host is None:
        pytest.skip("no cookie containment on this host")
    leader = subprocess.Popen(
        ["/bin/sh", "-c", "sleep 30 & echo $!; exec sleep 30"], stdout=subprocess.PIPE, **kwargs
    )
    assert leader.stdout is not None
    descendant = int(leader.stdout.readline())
    watched = psutil.Process(descendant)
    stale = "stale-cookie-of-a-reaped-child"
    try:
        with host._lock:
            host._cookie_of[descendant] = stale  # the pid of a child we spawned, long reaped
            host._leader_of[stale] = descendant
        leader.kill()
        leader.wait()
        ops.kill_contained(containment)
        assert psutil.wait_procs([watched], timeout=2.0)[1] == []
    finally:
        with host._lock:
            host._cookie_of.pop(descendant, None)
            host._leader_of.pop(stale, None)
        leader.kill()
        leader.wait()
        leader.stdout.close()
        with contextlib.suppress(OSError):
            os.kill(descendant, signal.SIGKILL)


class _CaughtInExec:
    """A /proc reader that shows ``pid`` inside an exec for its first ``reads`` looks: its
    environment reads as nothing, and (``mid_exec``) its stat shows no environment set up yet,
    or (``laying_out``) an environment whose end is still its start (the kernel sets both to
    the start, then moves the end past each variable); otherwise the stat is the real one (a
    read that raced the exec: the environment is there again by the time the stat is read)."""

    def __init__(self, pid: int, reads: int, mid_exec: bool, laying_out: bool = False) -> None:
        self.pid, self.left, self.mid_exec, self.laying_out = pid, reads, mid_exec, laying_out
        self.environ_reads = 0

    def __call__(self, path: str, limit: int | None = None) -> bytes | None:
        data = read_small_file(path, limit)
        if path == f"/proc/{self.pid}/environ":
            self.environ_reads += 1
            if self.left > 0 and data is not None:
                self.left -= 1
                return b""
        if path == f"/proc/{self.pid}/stat" and self.mid_exec and self.left > 0 and data:
            head, _, tail = data.rpartition(b") ")
            fields = tail.split(b" ")
            fields[47] = fields[48] = b"0"  # env_start, env_end (fields 50 and 51)
            return head + b") " + b" ".join(fields)
        if path == f"/proc/{self.pid}/stat" and self.laying_out and self.left > 0 and data:
            head, _, tail = data.rpartition(b") ")
            fields = tail.split(b" ")
            fields[48] = fields[47]  # env_end still at env_start
            return head + b") " + b" ".join(fields)
        return data


def _cookie_ops(read_file: Callable[[str, int | None], bytes | None]) -> PlatformOps:
    host = PosixHost(use_cgroup=False, use_subreaper=False)
    host.cookies = Cookies(proc_root="/proc", read_file=read_file)
    return platform_ops("linux", host=host)


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads /proc environments")
@pytest.mark.parametrize(
    ("mid_exec", "laying_out"),
    [(False, False), (True, False), (False, True)],
    ids=["raced", "mid-exec", "laying-out"],
)
def test_a_cookie_holder_whose_environment_reads_as_nothing_for_a_moment_is_found(
    mid_exec: bool, laying_out: bool
) -> None:
    # Deterministic: the holder's environment reads as nothing for its first three reads.
    # (laying-out: the survivor of 1 run in 5 of the real-process stress test above.)
    reader = _CaughtInExec(-1, 3, mid_exec, laying_out)
    ops = _cookie_ops(reader)
    kwargs, containment = ops.prepare_spawn({})
    holder = subprocess.Popen(["sleep", "30"], **kwargs)
    reader.pid = holder.pid
    try:
        ops.kill_contained(containment)
        assert holder.wait(10) == -signal.SIGKILL
        assert reader.environ_reads == 4
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads /proc environments")
def test_an_empty_environment_is_waited_for_once_and_a_zombie_never() -> None:
    # An empty environment shows the same bounds as one an exec is laying out: the first look
    # waits a moment for it, later ones read it once (a normal look costs no more). A zombie
    # is never waited for.
    counts: dict[str, int] = {}

    def counting(path: str, limit: int | None = None) -> bytes | None:
        counts[path] = counts.get(path, 0) + 1
        return read_small_file(path, limit)

    ops = _cookie_ops(counting)
    _, containment = ops.prepare_spawn({})
    empty = subprocess.Popen(["/bin/sleep", "30"], env={})
    zombie = subprocess.Popen(["/bin/true"])
    while psutil.Process(zombie.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    try:
        ops.kill_contained(containment)
        assert counts[f"/proc/{empty.pid}/environ"] > 1
        assert counts.get(f"/proc/{zombie.pid}/environ", 0) <= 1
        counts.clear()
        _, containment = ops.prepare_spawn({})
        ops.kill_contained(containment)
        assert counts[f"/proc/{empty.pid}/environ"] == 1
        assert counts.get(f"/proc/{zombie.pid}/environ", 0) <= 1
        assert empty.poll() is None
    finally:
        empty.kill()
        empty.wait()
        zombie.wait()


# Forks a child that lives on each time it gets SIGUSR1.
_FORKS_ON_USR1 = """
import os, signal, time
def fork(*_):
    if os.fork() == 0:
        os.execvp("sleep", ["sleep", "30"])
signal.signal(signal.SIGUSR1, fork)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads /proc environments")
def test_a_holder_found_after_its_exec_is_looked_at_again_for_what_it_forked_meanwhile() -> None:
    # The look waited for the holder's exec to end; it ran on meanwhile and forked a child the
    # process table (read before) does not show. One more look finds it.
    holder_pid = [-1]
    forked: list[int] = []

    def reader(path: str, limit: int | None = None) -> bytes | None:
        data = read_small_file(path, limit)
        if path == f"/proc/{holder_pid[0]}/environ" and not forked:
            os.kill(holder_pid[0], signal.SIGUSR1)
            deadline = time.monotonic() + 10
            while not forked and time.monotonic() < deadline:
                forked.extend(c.pid for c in psutil.Process(holder_pid[0]).children())
                time.sleep(0.01)
            return b""
        return data

    ops = _cookie_ops(reader)
    kwargs, containment = ops.prepare_spawn({})
    holder = subprocess.Popen(
        [sys.executable, "-c", _FORKS_ON_USR1], stdout=subprocess.PIPE, **kwargs
    )
    assert holder.stdout is not None
    holder_pid[0] = holder.pid
    try:
        assert holder.stdout.readline() == b"ready\n"
        ops.kill_contained(containment)
        assert holder.wait(10) == -signal.SIGKILL
        assert len(forked) == 1
        assert psutil.wait_procs([psutil.Process(forked[0])], timeout=10)[1] == []
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        for pid in forked:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


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
    # The child forks only when told: "held" adopts it first. (It used to fork at once, and a
    # test process descheduled between the spawn and the adopt, as under CI's four workers on
    # two cores, let the grandchild be born outside the sub-group: 4 looks, not 1.)
    code = (
        "import subprocess, sys, time; sys.stdin.readline(); subprocess.Popen(['sleep', '30']);"
        "print('ready', flush=True); time.sleep(30)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, **kwargs
    )
    assert child.stdin is not None and child.stdout is not None

    def fork_and_wait() -> None:
        assert child.stdin is not None and child.stdout is not None
        child.stdin.write(b"go\n")
        child.stdin.flush()
        assert child.stdout.readline() == b"ready\n"

    if forks_before_entering:
        fork_and_wait()
    ops.adopt(child.pid, containment)
    if not forks_before_entering:
        fork_and_wait()
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
        child.stdin.close()
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


@pytest.mark.skipif(not os.path.exists("/proc/self/environ"), reason="reads /proc environments")
def test_kill_now_holds_a_forking_tree_still_before_killing_it() -> None:
    # The synchronous kill of a THREADED/LOCAL spawn's undo looked at the process table once,
    # then killed: what the tree forked in between (a daemon's middle process forking it) lived
    # on wherever no cgroup held the tree (the chaos harness, cookie only: a daemon in 1 round
    # of 3). It now holds the tree still first, as every stop does.
    from lifecycle_helpers import KEEPS_DAEMONIZING, marked_env, survivors_after

    host = PosixHost(use_cgroup=False, use_subreaper=False)
    ops = platform_ops("linux", host=host)
    mark, env = marked_env()
    for _ in range(3):
        kwargs, containment = ops.prepare_spawn({"start_new_session": True, "env": env})
        child = subprocess.Popen(
            [sys.executable, "-c", KEEPS_DAEMONIZING], stdout=subprocess.PIPE, **kwargs
        )
        assert child.stdout is not None
        try:
            assert child.stdout.readline() == b"ready\n"
            ops.kill_now(child.pid, True, containment)
            assert child.wait(10) == -signal.SIGKILL
        finally:
            child.kill()
            child.wait()
            child.stdout.close()
    assert survivors_after(mark, 1.0) == []
