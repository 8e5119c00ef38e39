"""ASYNC's own exit notice: its protocol reports the child's exit, pipes still open or not."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import warnings

import psutil
import pytest
from helpers import py
from lifecycle_helpers import marked_env, survivors_after

import prismq_subprocess as pq
import prismq_subprocess._core._exit_wait as exit_wait
from prismq_subprocess._strategies._async import AsyncStrategy, ExitProtocol

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX descendants")

# The child leaves a grandchild (in its group) holding stdout, then exits with status 3.
LEAVES_A_HOLDER = (
    "import subprocess, sys\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'])\n"
    "sys.exit(3)\n"
)


def _no_general_watch(*args: object, **kwargs: object) -> object:
    raise AssertionError("ASYNC's own processes need no pidfd/poll watch")


async def test_the_exit_is_known_while_a_grandchild_holds_the_pipes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The protocol reports the exit itself: the general watch (pidfd + add_reader + a wait()
    # task) is never armed for a process ASYNC made.
    monkeypatch.setattr(exit_wait, "wait_exited", _no_general_watch)
    monkeypatch.setattr("prismq_subprocess._strategies._async.wait_exited", _no_general_watch)
    monkeypatch.setattr("prismq_subprocess._strategies._base.wait_exited", _no_general_watch)
    mark, env = marked_env()
    run_mark, run_env = marked_env()
    async with pq.SubprocessWrapper(pq.RunMode.ASYNC, grace_period=0.5) as wrapper:
        strategy = wrapper._strategy
        assert isinstance(strategy, AsyncStrategy)
        process = await wrapper.create_subprocess_exec(
            *py(LEAVES_A_HOLDER), stdout=subprocess.PIPE, env=env
        )
        assert isinstance(process, asyncio.subprocess.Process)
        assert isinstance(process._protocol, ExitProtocol)  # type: ignore[attr-defined]
        assert await asyncio.wait_for(strategy.wait_exit(process), 30) == 3
        # asyncio's own wait() (3.11) still waits for the grandchild's end of the pipe.
        if sys.version_info < (3, 12):
            assert not process.stdout.at_eof()  # type: ignore[union-attr]
        strategy.release_pipes(process)
        # run() takes the same route: the exit, then the drain rule stops the holder.
        result = await asyncio.wait_for(wrapper.run(*py(LEAVES_A_HOLDER), env=run_env), 30)
        assert result.returncode == 3
        assert await asyncio.to_thread(survivors_after, run_mark, 2.0) == []
    await asyncio.to_thread(survivors_after, mark, 0.0)  # the first holder: nobody stopped it


async def test_the_platform_hears_of_the_exit_without_a_waiter(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exited: list[int] = []
    async with pq.SubprocessWrapper(pq.RunMode.ASYNC) as wrapper:
        monkeypatch.setattr(wrapper._strategy.ops, "child_exited", exited.append)
        process = await wrapper.create_subprocess_exec(*py("pass"))
        # Nobody calls wait(): the exit still reaches the platform layer (its reaper).
        for _ in range(3000):
            if exited:
                break
            await asyncio.sleep(0.01)
        assert exited == [process.pid]
        assert await process.wait() == 0


async def test_a_cancelled_exit_wait_leaves_the_process_alone() -> None:
    async with pq.SubprocessWrapper(pq.RunMode.ASYNC) as wrapper:
        strategy = wrapper._strategy
        process = await wrapper.create_subprocess_exec(
            *py("import sys; sys.stdin.read()"), stdin=subprocess.PIPE
        )
        waiter = asyncio.ensure_future(strategy.wait_exit(process))
        await asyncio.sleep(0.05)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert process.returncode is None
        # A later wait still hears the exit.
        second = asyncio.ensure_future(strategy.wait_exit(process))
        assert process.stdin is not None
        process.stdin.close()
        assert await asyncio.wait_for(second, 30) == 0
        assert process._protocol._exit_waiters == []  # type: ignore[attr-defined]


def _our_children(pids: set[int]) -> list[int]:
    """Those of ``pids`` that are still children of this process (running or unreaped)."""
    return [c.pid for c in psutil.Process().children() if c.pid in pids]


@pytest.mark.parametrize("route", ["run", "create_subprocess_exec"])
def test_a_cancelled_spawn_has_ended_and_let_go_of_its_child_when_the_cancel_arrives(
    route: str,
) -> None:
    # As asyncio's own creation does (it kills the child, then waits for it), and as THREADED
    # and LOCAL do: when the cancellation reaches the caller the child is dead and reaped and
    # its transport closed. ASYNC used to kill it and return at once: a loop ending just after
    # (a request cancelled at shutdown) left the child unreaped and its transport unclosed
    # ("unclosed transport ... running" and "subprocess ... is still running" when collected).
    mark, env = marked_env()
    started: list[int] = []
    outcomes: list[str] = []

    async def main(iterations: int) -> None:
        wrapper = pq.SubprocessWrapper("async", grace_period=0.5)
        real_create = AsyncStrategy._create

        async def create(self: AsyncStrategy, request: object) -> object:
            process = await real_create(self, request)  # type: ignore[arg-type]
            started.append(process.pid)
            return process

        AsyncStrategy._create = create  # type: ignore[method-assign]
        try:
            if route == "run":
                task = asyncio.ensure_future(
                    wrapper.run(*py("import time; time.sleep(30)"), env=env)
                )
            else:
                task = asyncio.ensure_future(
                    wrapper.create_subprocess_exec(
                        *py("import time; time.sleep(30)"), env=env, stdout=subprocess.PIPE
                    )
                )
            for _ in range(iterations):
                await asyncio.sleep(0)
            task.cancel()
            try:
                process = await task
            except asyncio.CancelledError:
                outcomes.append("cancelled")
                # Dead and reaped by now: no child of ours is left for it.
                assert _our_children(set(started)) == []
            else:  # the spawn finished before the cancellation came: the caller owns it
                outcomes.append("won")
                await pq.terminate_gracefully(process, 0)  # type: ignore[arg-type]
            await wrapper.aclose()
        finally:
            AsyncStrategy._create = real_create  # type: ignore[method-assign]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for iterations in range(12):
            asyncio.run(main(iterations))
            gc.collect()
    assert "cancelled" in outcomes
    assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
    assert _our_children(set(started)) == []
    assert survivors_after(mark, 2.0) == []
