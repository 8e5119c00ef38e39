"""ProcessManager: live children by run id, shared tree stops."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import AsyncIterator

import psutil
import pytest
from helpers import py

import prismq_subprocess as pq
from prismq_subprocess._background._process_manager import ProcessManager

# Starts a grandchild (same process group), prints both pids, then sleeps.
PARENT_WITH_GRANDCHILD = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(child.pid, flush=True)
    time.sleep(60)
    """
)


@pytest.fixture(params=["async", "threaded"])
async def wrapper(request: pytest.FixtureRequest) -> AsyncIterator[pq.SubprocessWrapper]:
    async with pq.SubprocessWrapper(request.param, grace_period=2.0) as w:
        yield w


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_stop_stops_the_whole_tree_and_is_recorded(wrapper: pq.SubprocessWrapper) -> None:
    pm = ProcessManager(grace_period=2.0)
    proc = await wrapper.create_subprocess_exec(*py(PARENT_WITH_GRANDCHILD), stdout=pq.PIPE)
    assert proc.stdout is not None
    grandchild = int(await proc.stdout.readline())
    pm.register("r1", proc)
    assert "r1" in pm and len(pm) == 1
    assert pm.live() == {"r1": proc}
    assert not pm.stop_requested("r1")

    assert await pm.stop("r1") is True
    assert proc.returncode is not None
    assert pm.stop_requested("r1")
    for _ in range(100):  # the grandchild is reaped by init; give it a moment
        if gone(grandchild):
            break
        await asyncio.sleep(0.02)
    assert gone(grandchild)
    assert pm.live() == {}
    # Still registered until its owner lets go; a second stop finds nothing running.
    assert pm.get("r1") is proc
    assert await pm.stop("r1") is False
    assert pm.unregister("r1") is proc
    assert not pm.stop_requested("r1")
    assert pm.unregister("r1") is None


async def test_concurrent_stops_share_one_tree_stop(wrapper: pq.SubprocessWrapper) -> None:
    pm = ProcessManager()
    proc = await wrapper.create_subprocess_exec(*py("import time; time.sleep(60)"))
    pm.register("r", proc)
    results = await asyncio.gather(*(pm.stop("r", grace=1.0) for _ in range(5)))
    assert results == [True] * 5
    assert proc.returncode is not None
    pm.unregister("r")


async def test_stop_unknown_run_is_false() -> None:
    assert await ProcessManager().stop("nope") is False
    assert await ProcessManager().stop_all() == 0


async def test_register_refuses_a_second_live_process(wrapper: pq.SubprocessWrapper) -> None:
    async with ProcessManager(grace_period=1.0) as pm:
        a = await wrapper.create_subprocess_exec(*py("import time; time.sleep(60)"))
        b = await wrapper.create_subprocess_exec(*py("pass"))
        pm.register("r", a)
        pm.register("r", a)  # same process again: fine
        with pytest.raises(pq.exceptions.DuplicateRunError):
            pm.register("r", b)
        pm.register("other", b)
        await b.wait()
        assert set(pm.live()) == {"r"}
    # Leaving the block stopped the live one.
    assert a.returncode is not None


async def test_stop_all_stops_every_live_process(wrapper: pq.SubprocessWrapper) -> None:
    pm = ProcessManager(grace_period=1.0)
    sleeper = py("import time; time.sleep(60)")
    procs = [await wrapper.create_subprocess_exec(*sleeper) for _ in "abc"]
    for name, proc in zip("abc", procs, strict=True):
        pm.register(name, proc)
    assert await pm.stop_all() == 3
    assert all(p.returncode is not None for p in procs)
    assert all(pm.stop_requested(name) for name in "abc")


async def test_cancelling_a_stop_does_not_abandon_it(wrapper: pq.SubprocessWrapper) -> None:
    pm = ProcessManager()
    proc = await wrapper.create_subprocess_exec(*py("import time; time.sleep(60)"))
    pm.register("r", proc)
    waiter = asyncio.ensure_future(pm.stop("r", grace=1.0))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert await proc.wait() is not None


def test_negative_grace_is_refused() -> None:
    with pytest.raises(pq.exceptions.InvalidTimeoutError):
        ProcessManager(grace_period=-1)


# The parent ends on SIGTERM; a member of its group ignores it, so the parent's tree stop goes on
# until its grace period is over, after the parent itself has exited.
PARENT_WITH_STUBBORN_MEMBER = textwrap.dedent(
    """
    import subprocess, sys, time
    subprocess.Popen([sys.executable, "-c",
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"])
    print("ready", flush=True)
    time.sleep(60)
    """
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
async def test_a_new_process_under_the_same_run_id_gets_a_stop_of_its_own() -> None:
    async with pq.SubprocessWrapper(grace_period=2.0) as wrapper:
        pm = ProcessManager(grace_period=2.0)
        old = await wrapper.create_subprocess_exec(*py(PARENT_WITH_STUBBORN_MEMBER), stdout=pq.PIPE)
        assert old.stdout is not None
        await old.stdout.readline()
        pm.register("r", old)
        first = asyncio.ensure_future(pm.stop("r"))
        await old.wait()
        assert not first.done()  # the old tree's stop waits for its stubborn member
        # Its owner sees it end and starts a new attempt under the same run id.
        pm.unregister("r")
        new = await wrapper.create_subprocess_exec(*py("import time; time.sleep(60)"))
        pm.register("r", new)
        assert await pm.stop("r") is True
        assert new.returncode is not None
        assert await first is True


async def test_register_refuses_what_is_not_a_process_or_a_run_id(
    wrapper: pq.SubprocessWrapper,
) -> None:
    pm = ProcessManager(grace_period=1.0)
    for bad in (None, 12345, "pid"):
        with pytest.raises(pq.exceptions.InvalidArgumentTypeError):
            pm.register("bad", bad)  # type: ignore[arg-type]
    proc = await wrapper.create_subprocess_exec(*py("import time; time.sleep(60)"))
    for run_id in ("", None, 7):
        with pytest.raises(pq.exceptions.InvalidRunIdError):
            pm.register(run_id, proc)  # type: ignore[arg-type]
    assert len(pm) == 0
    pm.register("good", proc)
    assert await pm.stop_all() == 1  # nothing bad was kept to break it
    assert proc.returncode is not None
