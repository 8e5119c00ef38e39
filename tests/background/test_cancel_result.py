"""CancelResult from BackgroundTaskManager.cancel_task and ModuleRunner.cancel (issue 12 item 4),
and the output of runs that end without running being closed."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

import prismq_subprocess as pq
from prismq_subprocess._background._module_runner import ModuleRunner


def test_only_cancelled_is_true() -> None:
    assert pq.CancelResult.CANCELLED
    assert not pq.CancelResult.ALREADY_FINISHED
    assert not pq.CancelResult.NOT_FOUND


async def test_task_manager_tells_not_found_from_already_finished() -> None:
    gate = asyncio.Event()

    async def work() -> int:
        await gate.wait()
        return 0

    async with (
        pq.RunRegistry() as registry,
        pq.BackgroundTaskManager(registry) as manager,
    ):
        assert await manager.cancel_task("unknown") is pq.CancelResult.NOT_FOUND
        done = await manager.start_task(pq.Run(), work())
        gate.set()
        await manager.wait_all()
        assert await manager.cancel_task(done) is pq.CancelResult.ALREADY_FINISHED
        gate.clear()
        running = await manager.start_task(pq.Run(), work())
        await asyncio.sleep(0)
        assert await manager.cancel_task(running) is pq.CancelResult.CANCELLED
        assert await manager.cancel_task(running) is pq.CancelResult.ALREADY_FINISHED
        # Stored but not active here (e.g. another worker's run): not found here.
        elsewhere = pq.Run()
        await registry.add_run(elsewhere)
        assert await manager.cancel_task(elsewhere.run_id) is pq.CancelResult.NOT_FOUND


async def test_module_runner_tells_not_found_from_already_finished(tmp_path: Path) -> None:
    path = tmp_path / "quick.py"
    path.write_text("print('done')\n")
    async with (
        pq.RunRegistry() as registry,
        ModuleRunner(registry, run_mode="async") as runner,
    ):
        assert await runner.cancel("unknown") is pq.CancelResult.NOT_FOUND
        run = await runner.execute_module("q", "Quick", path)
        assert await runner.cancel(run.run_id) is pq.CancelResult.ALREADY_FINISHED
        run_id = await runner.start_module("q", "Quick", path)
        await runner.task_manager.wait_all()
        assert await runner.cancel(run_id) is pq.CancelResult.ALREADY_FINISHED


async def test_a_queued_run_cancelled_before_it_starts_closes_its_output(tmp_path: Path) -> None:
    path = tmp_path / "wait.py"
    path.write_text(
        textwrap.dedent(
            """
            import sys, time
            print("first", flush=True)
            time.sleep(60)
            """
        )
    )
    async with (
        pq.RunRegistry() as registry,
        pq.OutputCapture() as output,
        ModuleRunner(
            registry, run_mode="async", output=output, max_concurrent=1, grace_period=1.0
        ) as runner,
    ):
        first = await runner.start_module("w", "Wait", path)
        queued = await runner.start_module("w", "Wait", path)
        # Both can be followed at once, although the second has not started.
        follow_queued = asyncio.create_task(_follow(output.subscribe(queued)))
        async with output.subscribe(first) as sub:
            async for item in sub:
                assert isinstance(item, pq.OutputLine) and item.text == "first"
                break
        assert await runner.cancel(queued, "not needed") is pq.CancelResult.CANCELLED
        # Before: its output stayed open and this subscriber waited forever.
        lines, end = await asyncio.wait_for(follow_queued, 10)
        assert lines == [] and end == pq.OutputEnd("cancelled", None)
        follow_first = asyncio.create_task(_follow(output.subscribe(first)))
        assert await runner.cancel(first) is pq.CancelResult.CANCELLED
        lines, end = await asyncio.wait_for(follow_first, 10)
        assert lines == ["first"]
        assert end is not None and end.status == "cancelled" and end.exit_code is not None


async def _follow(sub: pq.OutputSubscription) -> tuple[list[str], pq.OutputEnd | None]:
    async with sub:
        lines = [item.text async for item in sub if isinstance(item, pq.OutputLine)]
    return lines, sub.end


@pytest.mark.parametrize("status", ["completed", "failed"])
async def test_the_end_of_a_run_carries_its_status(tmp_path: Path, status: str) -> None:
    path = tmp_path / "exit.py"
    path.write_text(f"import sys\nprint('bye')\nsys.exit({0 if status == 'completed' else 4})\n")
    async with (
        pq.RunRegistry() as registry,
        pq.OutputCapture() as output,
        ModuleRunner(registry, run_mode="async", output=output) as runner,
    ):
        background = await runner.start_module("e", "Exit", path)
        lines, end = await _follow(output.subscribe(background))
        foreground = await runner.execute_module("e", "Exit", path)
        assert lines == ["bye"]
        expected = pq.OutputEnd(status, 0 if status == "completed" else 4)
        assert end == expected
        assert (await _follow(output.subscribe(foreground.run_id)))[1] == expected
