"""A deadline that passes while the child is still being started (soak finding 3): the child that
did start is stopped as for any timeout, and what it wrote is delivered, in every mode."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any

import pytest
from conftest import skip_if_async_on_uvloop

import prismq_subprocess as pq
from prismq_subprocess._platform import Containment

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="preexec_fn is POSIX only")

#: How long the injected slow start holds the spawn after the child wrote its line.
SPAWN_SECONDS = 0.4
#: The run's timeout: it passes while the spawn is still under way.
TIMEOUT = 0.1
#: The child, once it is started: it never ends by itself.
SLEEPER = ("sleep", "30")


def _slow_start(then: Callable[[], None] | None) -> Callable[[], None]:
    def before_exec() -> None:
        # In the child, its stdout already the pipe: it has run and written before the spawn
        # hands it over, as a child does on a slow or loaded event loop.
        if then is not None:
            then()
        os.write(1, b"start\n")
        os.write(2, b"err\n")
        time.sleep(SPAWN_SECONDS)

    return before_exec


@pytest.fixture
def slow_spawns(wrapper: pq.SubprocessWrapper, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every spawn of ``wrapper`` takes SPAWN_SECONDS after its child wrote to its pipes."""
    skip_if_async_on_uvloop(
        wrapper, "it runs preexec_fn before it connects the child's pipes: nothing is written"
    )
    ops = wrapper.strategy.ops
    real = ops.prepare_spawn

    def prepare_spawn(
        kwargs: Mapping[str, Any], die_with_host: bool = False, *, ahead: bool = False
    ) -> tuple[dict[str, Any], Containment]:
        out, containment = real(kwargs, die_with_host, ahead=ahead)
        out["preexec_fn"] = _slow_start(out.get("preexec_fn"))
        return out, containment

    monkeypatch.setattr(ops, "prepare_spawn", prepare_spawn)


@pytest.mark.usefixtures("slow_spawns")
async def test_a_run_timing_out_during_its_spawn_keeps_what_the_child_wrote(
    wrapper: pq.SubprocessWrapper,
) -> None:
    started = time.monotonic()
    with pytest.raises(pq.exceptions.ProcessTimeoutError) as caught:
        await wrapper.run(*SLEEPER, timeout=TIMEOUT)
    assert caught.value.stdout == b"start\n"
    assert caught.value.stderr == b"err\n"
    # Stopped as for any timeout: SIGTERM, which `sleep` does not survive.
    assert caught.value.returncode == -15
    assert time.monotonic() - started < 10


@pytest.mark.usefixtures("slow_spawns")
async def test_a_stream_timing_out_during_its_spawn_delivers_what_the_child_wrote(
    wrapper: pq.SubprocessWrapper,
) -> None:
    lines: list[str] = []
    with pytest.raises(pq.exceptions.ProcessTimeoutError) as caught:
        async with wrapper.stream(*SLEEPER, encoding="utf-8", timeout=TIMEOUT) as stream:
            async for line in stream:
                lines.append(line)
    assert lines == ["start\n", "err\n"] or sorted(lines) == ["err\n", "start\n"]
    assert caught.value.returncode == -15
    assert stream.returncode == -15


@pytest.mark.usefixtures("slow_spawns")
async def test_an_anyio_scope_cancelling_the_spawn_after_the_deadline_catches_its_own(
    wrapper: pq.SubprocessWrapper,
) -> None:
    # A review's find: the deadline's marker reached the spawn first; the scope's cancellation
    # came while the spawn was undone, and the marker's exception left the run in its place,
    # which the scope did not recognise as its own: a bare CancelledError escaped it.
    anyio = pytest.importorskip("anyio")
    try:
        with anyio.move_on_after(0.25) as scope:
            await wrapper.run(*SLEEPER, timeout=TIMEOUT)
    except pq.exceptions.ProcessTimeoutError as exc:
        # Also right: the run's own deadline came first, and the spawn (ASYNC's, shielded from
        # the scope while it hands the child over) finished; the child was stopped for it.
        assert exc.stdout == b"start\n"
    else:
        assert scope.cancelled_caught
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    assert wrapper.live_processes == []


@pytest.mark.parametrize("how", ["run", "stream"])
@pytest.mark.usefixtures("slow_spawns")
async def test_a_spawn_failing_after_the_deadline_leaves_the_task_cancellation_count_alone(
    wrapper: pq.SubprocessWrapper, how: str
) -> None:
    # A review's find: the wrapper closed while the spawn was under way past the deadline; the
    # run raised WrapperClosedError and the deadline's cancellation stayed counted on the task,
    # so a later asyncio.timeout in it let a bare CancelledError out instead of TimeoutError.
    async def close_soon() -> None:
        await asyncio.sleep(0.05)
        await wrapper.aclose()

    closer = asyncio.create_task(close_soon())
    with pytest.raises(pq.exceptions.PrismQError):
        if how == "run":
            await wrapper.run(*SLEEPER, timeout=TIMEOUT)
        else:
            async with wrapper.stream(*SLEEPER, timeout=TIMEOUT) as stream:
                async for _ in stream:
                    pass
    await closer
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await asyncio.sleep(5)
