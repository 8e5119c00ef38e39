"""Clean-up inside a cancelled anyio cancel scope (FastAPI/Starlette handlers, ``move_on_after``,
``fail_after``, a task group whose sibling failed): anyio cancels level-triggered, every await in
a cancelled scope raises again, and the clean-up must still run as it does after asyncio's
one-shot cancellation. Real children, checked with psutil; each test runs its own ``anyio.run``
on the asyncio backend.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import signal
import sys
import warnings
from pathlib import Path

import anyio
import psutil
import pytest
from anyio_support import CANCELS, cancelled_after
from conftest import REAL, WRAPPER_FACTORIES
from helpers import py
from lifecycle_helpers import (
    STUBBORN_CHILD,
    TREE_CHILD,
    marked,
    marked_env,
    survivors_after,
    wait_for_marked,
    zombies,
)

import prismq_subprocess as pq
from prismq_subprocess._core._cancel_shield import anyio_cancelled, shielded_if_cancelled

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX trees and signals")

# A child that records the SIGTERM it got (then exits 3), so a test can tell a graceful stop
# from a SIGKILL at once. Prints "ready" once the handler is in place.
SIGTERM_SEEN = (
    "import signal, sys, time\n"
    "def on_term(*_):\n"
    "    open(sys.argv[1], 'w').write('term')\n"
    "    sys.exit(3)\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


def test_only_a_cancelled_anyio_scope_is_shielded() -> None:
    async def plain() -> bool:
        asyncio.current_task().cancel()  # type: ignore[union-attr]
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            return anyio_cancelled()  # asyncio's own cancellation: edge-triggered, no shield
        raise AssertionError("not cancelled")

    async def scoped() -> tuple[bool, bool, bool]:
        with anyio.CancelScope() as scope:
            before = anyio_cancelled()
            scope.cancel()
            inside = anyio_cancelled()
            with shielded_if_cancelled():
                shielded = anyio_cancelled()
                await anyio.sleep(0.01)  # would raise without the shield
        return before, inside, shielded

    assert asyncio.run(plain()) is False
    assert anyio.run(scoped) == (False, True, False)


@pytest.mark.parametrize("kind", CANCELS)
@pytest.mark.parametrize("mode", REAL)
def test_run_cancelled_by_a_scope_stops_the_tree_gracefully(
    mode: str, kind: str, tmp_path: Path
) -> None:
    """As after asyncio's cancellation: SIGTERM and the grace period (the child's handler
    runs), and the tree is gone by the time the scope is left. anyio's level-triggered
    cancellation used to cut the stop short: SIGKILL at once, and run() returned before the
    children were dead."""
    seen = tmp_path / "term"
    mark, env = marked_env()
    alive_at_exit: list[psutil.Process] = []

    async def main() -> None:
        async with WRAPPER_FACTORIES[mode]() as wrapper:
            # A grandchild too, started once the handler is set.
            code = SIGTERM_SEEN.replace(
                "print('ready'",
                "import subprocess\n"
                "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
                "open(sys.argv[1] + '.ready', 'w').close()\n"
                "print('ready'",
            )
            await cancelled_after(
                kind,
                10.0,
                lambda: wrapper.run(*py(code), str(seen), env=env),
                once=tmp_path / "term.ready",
            )
            alive_at_exit.extend(marked(mark))

    anyio.run(main)
    assert survivors_after(mark, 3.0) == []
    assert seen.exists(), "the child was killed without its SIGTERM and grace period"
    assert alive_at_exit == []


@pytest.mark.parametrize("mode", REAL)
def test_stream_left_by_a_cancelled_scope_stops_the_tree_gracefully(
    mode: str, tmp_path: Path
) -> None:
    seen = tmp_path / "term"
    mark, env = marked_env()

    async def main() -> None:
        async with WRAPPER_FACTORIES[mode]() as wrapper:
            with anyio.move_on_after(1.0):
                async with wrapper.stream(*py(SIGTERM_SEEN), str(seen), env=env) as lines:
                    async for _ in lines:
                        pass
            assert marked(mark) == []

    anyio.run(main)
    assert seen.exists()
    assert survivors_after(mark, 3.0) == []


@pytest.mark.parametrize("mode", REAL)
def test_terminate_gracefully_in_the_finally_of_a_cancelled_scope(mode: str) -> None:
    """The usual clean-up, ``finally: await terminate_gracefully(p)``, runs inside the
    cancelled scope: it used to return at once, the SIGTERM sent, a child ignoring it left
    running."""
    mark, env = marked_env()
    statuses: list[int] = []

    async def main() -> None:
        async with WRAPPER_FACTORIES[mode]() as wrapper:
            with anyio.move_on_after(1.0):
                process = await wrapper.create_subprocess_exec(
                    *py(STUBBORN_CHILD), env=env, stdout=asyncio.subprocess.DEVNULL
                )
                try:
                    await process.wait()
                finally:
                    statuses.append(await pq.terminate_gracefully(process, 0.5))
            assert marked(mark) == []  # before the wrapper's own clean-up

    anyio.run(main)
    assert statuses == [-signal.SIGKILL]
    assert survivors_after(mark, 3.0) == []


@pytest.mark.parametrize("mode", REAL)
@pytest.mark.parametrize("how", ["run", "terminate_gracefully"])
def test_an_outer_scope_cancelled_during_a_shielded_clean_up_cuts_it_short(
    mode: str, how: str
) -> None:
    """An adversary's find: an inner scope cancels a run, whose clean-up (a 30 s grace period
    for a child ignoring SIGTERM) runs shielded from it; an outer scope (a request's deadline,
    a client that left) cancelled meanwhile was hidden by that shield too, so the outer scope
    was held for the whole grace period. It is the second cancellation: what is left is
    killed at once, and still waited for."""
    mark, env = marked_env()
    took: list[float] = []
    # Both deadlines count from the moment the whole tree runs (the SIGTERM handler is in
    # place): on a loaded machine a spawn can take longer than a fixed deadline, and a run
    # cancelled during its spawn is killed at once, so the outer scope would never fire.

    async def cancel_both(inner: anyio.CancelScope, outer: anyio.CancelScope) -> None:
        await anyio.to_thread.run_sync(wait_for_marked, mark, 3)
        inner.cancel()
        await anyio.sleep(1.0)
        took.append(anyio.current_time())
        outer.cancel()

    async def main() -> None:
        async with WRAPPER_FACTORIES[mode]() as wrapper, anyio.create_task_group() as tg:
            inner, outer = anyio.CancelScope(), anyio.CancelScope()
            tg.start_soon(cancel_both, inner, outer)
            with outer:
                if how == "run":
                    with inner:
                        await wrapper.run(*py(STUBBORN_CHILD), env=env, grace_period=30.0)
                else:
                    process = await wrapper.create_subprocess_exec(
                        *py(STUBBORN_CHILD), env=env, stdout=asyncio.subprocess.DEVNULL
                    )
                    try:
                        with inner:
                            await process.wait()
                    finally:
                        with anyio.CancelScope() as shielded:
                            shielded.cancel()  # the clean-up runs in a cancelled scope
                            await pq.terminate_gracefully(process, 30.0)
                    assert process.returncode == -signal.SIGKILL
            took[0] = anyio.current_time() - took[0]
            assert outer.cancelled_caught
            assert marked(mark) == []  # killed and waited for before the scope was left

    anyio.run(main)
    assert took[0] < 10.0, f"the outer scope was held {took[0]:.1f} s (grace period 30 s)"
    assert survivors_after(mark, 3.0) == []


@pytest.mark.parametrize("mode", REAL)
def test_terminate_gracefully_cancelled_midway_kills_the_tree(mode: str) -> None:
    """A stop cancelled during its grace period used to abandon the child that ignores SIGTERM;
    now the tree is killed at once, and waited for, before ``CancelledError`` propagates (with
    asyncio's cancellation as with an anyio scope's)."""
    mark, env = marked_env()

    async def main() -> None:
        async with WRAPPER_FACTORIES[mode]() as wrapper:
            process = await wrapper.create_subprocess_exec(
                *py(STUBBORN_CHILD), env=env, stdout=asyncio.subprocess.DEVNULL
            )
            await anyio.to_thread.run_sync(wait_for_marked, mark, 3)  # handler set, tree up
            stop = asyncio.ensure_future(pq.terminate_gracefully(process, 30.0))
            await asyncio.sleep(0.5)
            stop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await stop
            assert process.returncode == -signal.SIGKILL
            assert marked(mark) == []
            process = await wrapper.create_subprocess_exec(
                *py(STUBBORN_CHILD), env=env, stdout=asyncio.subprocess.DEVNULL
            )
            await anyio.to_thread.run_sync(wait_for_marked, mark, 3)
            with anyio.move_on_after(0.5):
                await pq.terminate_gracefully(process, 30.0)
            assert process.returncode == -signal.SIGKILL
            assert marked(mark) == []

    anyio.run(main)
    assert survivors_after(mark, 3.0) == []


@pytest.mark.parametrize("mode", REAL)
def test_wrapper_left_by_a_cancelled_scope_gives_its_children_their_grace(
    mode: str, tmp_path: Path
) -> None:
    """``async with SubprocessWrapper()`` left by a cancelled scope: after asyncio's
    cancellation its aclose() runs undisturbed (SIGTERM, grace, SIGKILL); under anyio it was
    cancelled at its first await and killed everything at once."""
    seen = tmp_path / "term"
    mark, env = marked_env()

    async def main() -> None:
        with anyio.move_on_after(1.0):
            async with WRAPPER_FACTORIES[mode]() as wrapper:
                await wrapper.create_subprocess_exec(
                    *py(SIGTERM_SEEN), str(seen), env=env, stdout=asyncio.subprocess.DEVNULL
                )
                await anyio.sleep(30)

    anyio.run(main)
    assert seen.exists()
    assert survivors_after(mark, 3.0) == []


def test_called_from_an_anyio_worker_thread(tmp_path: Path) -> None:
    """The library called from an anyio worker thread through ``anyio.from_thread.run``, the
    scope of the ``to_thread`` call then cancelled: anyio cancels the call's task through that
    scope; the child gets its grace and is gone when the scope is left."""
    seen = tmp_path / "term"
    mark, env = marked_env()
    errors: list[BaseException] = []

    async def main() -> None:
        async with WRAPPER_FACTORIES["threaded"]() as wrapper:
            call = functools.partial(wrapper.run, *py(SIGTERM_SEEN), str(seen), env=env)

            def in_thread() -> None:
                try:
                    anyio.from_thread.run(call)
                except BaseException as exc:
                    errors.append(exc)

            with anyio.move_on_after(1.0):
                await anyio.to_thread.run_sync(in_thread)
            assert marked(mark) == []

    anyio.run(main)
    assert [type(exc) for exc in errors] == [asyncio.CancelledError]
    assert seen.exists()
    assert survivors_after(mark, 3.0) == []


@pytest.mark.parametrize("mode", REAL)
def test_a_spawn_cancelled_by_a_scope_is_undone_before_the_loop_ends(mode: str) -> None:
    """A scope cancelled while the child is being created, the loop ending right after (a
    request cancelled at shutdown): the undo is waited for. Under anyio it was cut short, and
    in ASYNC the child stayed a zombie with its pipe transport unclosed (ResourceWarning)."""
    for delay in (0.0, 0.001, 0.002, 0.003, 0.004, 0.005):
        mark, env = marked_env()
        wrapper = WRAPPER_FACTORIES[mode]()

        async def main() -> None:
            with anyio.move_on_after(delay):  # noqa: B023 - run at once, in this iteration
                await wrapper.run(*py(TREE_CHILD), env=env)  # noqa: B023

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            anyio.run(main)  # the wrapper is not closed: only the run's own undo counts
            left = zombies()
            gc.collect()
        wrapper.cleanup()
        assert survivors_after(mark, 2.0) == []
        assert left == []
        assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("owner", ["ProcessManager", "ResourcePool"])
def test_an_aclose_in_the_finally_of_a_cancelled_scope_gives_the_children_their_grace(
    owner: str, tmp_path: Path
) -> None:
    """``finally: await owner.aclose()`` inside a cancelled scope (not ``async with``, which was
    shielded already): the wrapper's and the runner's aclose() shield themselves; the process
    manager's and the pool's were cut short at their first await, the children left running
    (the manager's stops went on unwatched) or killed at once (the pool)."""
    seen = tmp_path / "term"
    mark, env = marked_env()
    spawned: list[psutil.Process] = []

    async def main() -> None:
        wrapper = pq.SubprocessWrapper(grace_period=5.0)
        pool = pq.ResourcePool(1, grace_period=5.0)
        manager = pq.ProcessManager(grace_period=5.0)
        closing = manager if owner == "ProcessManager" else pool
        with anyio.move_on_after(1.0):
            try:
                if owner == "ProcessManager":
                    process = await wrapper.create_subprocess_exec(
                        *py(SIGTERM_SEEN), str(seen), env=env, stdout=asyncio.subprocess.DEVNULL
                    )
                    manager.register("run-1", process)
                else:
                    async with pool.acquire_subprocess() as lent:
                        process = await lent.create_subprocess_exec(
                            *py(SIGTERM_SEEN), str(seen), env=env, stdout=asyncio.subprocess.DEVNULL
                        )
                spawned.append(psutil.Process(process.pid))
                await anyio.sleep(30)
            finally:
                await closing.aclose()
                # Reached only if the close ran in full; 3: its SIGTERM handler ran.
                statuses.append(process.returncode)
        await wrapper.aclose()
        await pool.aclose()

    statuses: list[int | None] = []
    anyio.run(main)
    assert statuses == [3]
    assert seen.exists()
    assert survivors_after(mark, 3.0) == []
