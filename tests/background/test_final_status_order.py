"""A run's final status reaches the registry only after its output log is complete and closed,
so a process that follows the log until the registry says "finished" never loses the last lines
(issue 12 item 3)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

import prismq_subprocess as pq


class RecordingRegistry(pq.RunRegistry):
    """Notes, at each final-status write, what the run's log file holds and whether its output
    was closed."""

    def __init__(self, capture: pq.OutputCapture) -> None:
        super().__init__()
        self.capture = capture
        self.at_final: list[tuple[str, bool, int]] = []

    async def update_run(self, run: pq.Run) -> None:
        stored = await self.get_run(run.run_id)
        if run.is_finished and stored is not None and not stored.is_finished:
            path = self.capture.log_path(run.run_id)
            assert path is not None
            lines = path.read_bytes().count(b"\n") if path.exists() else 0
            self.at_final.append((run.status.value, self.capture.is_closed(run.run_id), lines))
        await super().update_run(run)


SCRIPT = textwrap.dedent(
    """
    import sys
    for i in range(3000):
        print("line", i)
    sys.exit({code})
    """
)


@pytest.mark.parametrize(("code", "status"), [(0, "completed"), (3, "failed")])
@pytest.mark.parametrize("background", [False, True], ids=["execute", "start"])
async def test_log_is_complete_when_the_final_status_is_recorded(
    tmp_path: Path, code: int, status: str, background: bool
) -> None:
    script = tmp_path / "many.py"
    script.write_text(SCRIPT.format(code=code))
    async with pq.OutputCapture(log_dir=tmp_path / "logs") as capture:
        registry = RecordingRegistry(capture)
        async with registry, pq.ModuleRunner(registry, output=capture) as runner:
            if background:
                run_id = await runner.start_module("many", "Many", script)
                await runner.task_manager.wait_all(timeout=60)
            else:
                run_id = (await runner.execute_module("many", "Many", script)).run_id
    assert registry.at_final == [(status, True, 3000)], run_id


async def test_command_log_is_complete_when_cancelled(tmp_path: Path) -> None:
    async with pq.OutputCapture(log_dir=tmp_path / "logs") as capture:
        registry = RecordingRegistry(capture)
        async with registry, pq.ModuleRunner(registry, output=capture) as runner:
            code = "import time\nfor i in range(5):\n    print(i, flush=True)\ntime.sleep(60)"
            run_id = await runner.start_command("sleepy", "Sleepy", [sys.executable, "-c", code])
            seen: list[str] = []
            async with capture.subscribe(run_id) as sub:
                async for item in sub:
                    assert isinstance(item, pq.OutputLine)
                    seen.append(item.text)
                    if len(seen) == 5:
                        break
            assert seen == ["0", "1", "2", "3", "4"]
            assert await runner.cancel(run_id) is pq.CancelResult.CANCELLED
    assert registry.at_final == [("cancelled", True, 5)]
