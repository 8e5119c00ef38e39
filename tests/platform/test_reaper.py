"""The child subreaper: orphans come to us, and we reap them, and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import py
from lifecycle_helpers import daemonizer, marked_env, survivors_after, wait_for_marked, zombies

import prismq_subprocess as pq
from prismq_subprocess._platform._posix_host import posix_host
from prismq_subprocess._platform._reaper import Reaper


def reaper() -> Reaper:
    host = posix_host()
    host.activate()
    if host.reaper is None:
        pytest.skip("this host is not a child subreaper (not Linux, refused, or turned off)")
    return host.reaper


# A double fork whose daemon lives a moment, then exits; the middle process exits at once.
SHORT_DAEMON = daemonizer(0.5, "print('daemon started', flush=True)\n")


def wait_until(predicate: object, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_an_adopted_daemon_is_reaped_when_it_exits() -> None:
    r = reaper()
    mark, env = marked_env()
    starter = subprocess.run(
        [sys.executable, "-c", SHORT_DAEMON],
        env=env,
        check=True,
        capture_output=True,
        start_new_session=True,
    )
    assert starter.stdout == b"daemon started\n"
    [daemon] = wait_for_marked(mark, 1)
    assert daemon.ppid() == os.getpid()  # re-parented to us, not to init
    before = r.reaped
    assert r.sweep() >= 1  # seen alive: the reaper thread now watches it
    assert wait_until(lambda: r.reaped > before)
    assert wait_until(
        lambda: not psutil.pid_exists(daemon.pid) or daemon.status() != psutil.STATUS_ZOMBIE
    )


def test_direct_children_are_never_reaped_by_us() -> None:
    r = reaper()
    same_session = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(7)"])
    own_session = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.exit(5)"], start_new_session=True
    )
    assert wait_until(
        lambda: all(
            psutil.Process(p.pid).status() == psutil.STATUS_ZOMBIE
            for p in (same_session, own_session)
        )
    )
    for _ in range(3):
        r.sweep()
    # Still there for their owner, with their real status.
    assert same_session.wait() == 7
    assert own_session.wait() == 5


async def test_asyncio_statuses_stay_right_while_orphans_come_and_go() -> None:
    reaper()
    code = SHORT_DAEMON + "raise SystemExit(3)\n"
    async with pq.SubprocessWrapper("async") as wrapper:
        results = await asyncio.gather(*(wrapper.run(*py(code)) for _ in range(10)))
    assert [r.returncode for r in results] == [3] * 10  # never 255: nobody stole a child
    # The ten daemons exit after half a second; every one of them is reaped.
    assert await asyncio.to_thread(wait_until, lambda: zombies() == [], 10.0), zombies()


async def test_stopping_a_run_reaps_what_it_killed() -> None:
    reaper()
    code = daemonizer(60)
    mark, env = marked_env()
    async with pq.SubprocessWrapper("threaded", grace_period=1.0) as wrapper:
        with pytest.raises(pq.ProcessTimeoutError):
            await wrapper.run(*py(code), env=env, timeout=1.0)
    assert await asyncio.to_thread(survivors_after, mark, 1.0) == []
    assert await asyncio.to_thread(wait_until, lambda: zombies() == [], 5.0), zombies()


def test_a_child_that_exited_before_it_was_registered_is_not_kept_as_spawned() -> None:
    # ASYNC: the loop can hear a fast child's exit (and report it) while the creation is still
    # connecting its pipes, before the child is registered as spawned.
    r = Reaper(lambda entry: False)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    r.exited(child.pid)
    r.spawned(child.pid)
    assert child.pid not in r._leaders
    r.spawned(child.pid)  # (a later child given the same pid is registered as usual)
    assert child.pid in r._leaders


def test_an_old_early_exit_does_not_hide_a_new_child_with_its_pid() -> None:
    # An exit reported without a spawn report following it (a creation cancelled midway) must
    # not leave the next child given that pid unregistered: a sweep would take that child for
    # an orphan and reap it behind its owner's back.
    r = Reaper(lambda entry: False)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    r.exited(child.pid)
    r._exited_early[child.pid] -= 60.0  # reported a minute ago; the pid came round since
    r.spawned(child.pid)
    assert child.pid in r._leaders


async def test_fast_async_children_do_not_pile_up_as_spawned() -> None:
    # They did: a child whose exit was heard before its registration stayed registered as a
    # running child we spawned (8,000 after 12 s of steady `true` runs; each sweep copied them
    # all, and an orphan later given one of their pids would never be reaped). They were
    # dropped only after a whole second without a sweep, which steady traffic never leaves.
    r = reaper()
    async with pq.SubprocessWrapper("async") as wrapper:
        results = []
        for _ in range(5):
            results += await asyncio.gather(*(wrapper.run("true") for _ in range(20)))
    assert [res.returncode for res in results] == [0] * 100
    assert {res.pid for res in results} & r._leaders == set()


@pytest.mark.parametrize("own_session", [False, True])
def test_the_child_of_a_spawn_undone_before_its_pid_was_known_is_left_to_its_owner(
    own_session: bool,
) -> None:
    # asyncio's creation, cancelled, kills its child and waits for it itself; our undo finds
    # the same child by its cookie alone (CI: the reaper took it first, and Popen.wait said 0).
    from prismq_subprocess._platform import platform_ops

    r = reaper()
    ops = platform_ops()
    kwargs, containment = ops.prepare_spawn({})
    if containment.cookie is None:
        pytest.skip("no cookie containment on this host")
    ours = subprocess.Popen(
        ["sleep", "30"], env=kwargs.get("env") or os.environ, start_new_session=own_session
    )
    try:
        # Its cookie is read while it runs: a sweep before the undo must not claim it either.
        r.sweep()
        ops.kill_contained(containment)
        assert wait_until(lambda: psutil.Process(ours.pid).status() == psutil.STATUS_ZOMBIE)
        for _ in range(3):
            r.sweep()
        assert ours.wait(10) == -signal.SIGKILL
    finally:
        ours.kill()
        ours.wait()


@pytest.mark.parametrize("mode", ["threaded", "local"])
async def test_the_child_of_a_cancelled_pool_spawn_is_not_kept_as_spawned(
    mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A spawn cancelled while its worker runs Popen is undone by that worker, and its child
    # reaped by a thread of its own; that child stayed registered as a running child we
    # spawned (until a later spawn's prune): an orphan given its pid meanwhile is skipped by
    # every sweep, and is never pruned either (its parent is us), so it would stay a zombie.
    from prismq_subprocess._strategies import _popen

    r = reaper()
    discarded: list[int] = []
    original = _popen.discard_popen

    def spy(ops: object, request: object, popen: subprocess.Popen[bytes], *a: object, **k: object):  # type: ignore[no-untyped-def]
        discarded.append(popen.pid)
        return original(ops, request, popen, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(_popen, "discard_popen", spy)
    async with pq.SubprocessWrapper(mode) as wrapper:
        for attempt in range(400):
            if len(discarded) >= 3:
                break
            with pytest.raises((asyncio.TimeoutError, TimeoutError)):
                process = await asyncio.wait_for(
                    wrapper.create_subprocess_exec("sleep", "30"), (attempt % 20) / 2000
                )
                await pq.terminate_gracefully(process, timeout=5)
                raise TimeoutError  # (spawned in time: not the case under test)
    if not discarded:
        pytest.skip("no spawn was cancelled while its worker ran Popen")
    assert await asyncio.to_thread(
        wait_until, lambda: not any(psutil.pid_exists(pid) for pid in discarded)
    )
    assert set(discarded) & r._leaders == set()


# A host that calls setsid() itself (detaching from its terminal) with children of its own
# around: before or after the reaper was made, the children stay its own, whichever session.
SETSID_HOST = """
import os, subprocess, sys, time
from prismq_subprocess._platform._posix_host import posix_host
host = posix_host()
before = subprocess.Popen(["sh", "-c", "exit 7"])  # started in the session we leave
if sys.argv[1] == "early":
    host.activate()
os.setsid()
host.activate()
if host.reaper is None:
    print("skip"); raise SystemExit
after = subprocess.Popen(["sh", "-c", "exit 5"])  # started in our new session
time.sleep(0.5)
for _ in range(3):
    host.reaper.sweep()
print(before.wait(), after.wait())
"""


@pytest.mark.parametrize("activated", ["early", "late"])
def test_children_of_a_host_that_starts_its_own_session_are_left_to_it(activated: str) -> None:
    # The reaper took a child in a session that was neither the one it was made in nor the
    # child's own for an orphan: after the host's own setsid() (or before the reaper was
    # made), its children were reaped behind Popen's back and Popen.wait() said 0.
    reaper()
    env = dict(os.environ, PRISMQ_SUBREAPER="1")
    # (A child of ours leads no process group: setsid() is allowed there.)
    out = subprocess.run(
        [sys.executable, "-c", SETSID_HOST, activated],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.split()
    if out == ["skip"]:
        pytest.skip("this host is not a child subreaper")
    assert out == ["7", "5"]


# Forks a grandchild (which keeps the environment, cookie included), then replaces itself with
# a program whose environment is empty: to a reader of /proc it looks like a child that is
# exiting (its memory released, so its environment reads empty, while its children are still
# its own and not yet handed to us).
EMPTY_ENVIRON_PARENT = """
import os, sys, time
if os.fork() == 0:
    time.sleep(30)
    os._exit(0)
os.execve("/bin/sleep", ["sleep", "30"], {})
"""


def test_the_undo_finds_a_grandchild_below_a_child_whose_environment_reads_empty() -> None:
    # CI-like failure (test_a_spawn_cancelled_twice_leaves_no_tree[run-async], 1 in 4 under
    # load): asyncio killed the child of a cancelled creation; while it was exiting, its
    # environment read empty and its `sleep &` grandchild was not ours yet, so the undo (the
    # cookie among our own children only, with the subreaper) found nothing and the
    # grandchild survived. Without the subreaper every process is a candidate.
    from prismq_subprocess._platform import platform_ops

    reaper()
    ops = platform_ops()
    kwargs, containment = ops.prepare_spawn({})
    if containment.cookie is None:
        pytest.skip("no cookie containment on this host")
    child = subprocess.Popen([sys.executable, "-c", EMPTY_ENVIRON_PARENT], env=kwargs["env"])
    try:
        assert wait_until(
            lambda: (
                psutil.Process(child.pid).exe().endswith("sleep")
                and len(psutil.Process(child.pid).children()) == 1
            )
        )
        [grandchild] = psutil.Process(child.pid).children()
        ops.kill_contained(containment)
        assert wait_until(
            lambda: not grandchild.is_running() or grandchild.status() == psutil.STATUS_ZOMBIE
        )
    finally:
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(child.pid).children():
                proc.kill()
        child.kill()
        child.wait()
