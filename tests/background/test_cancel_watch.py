"""CancelRequestWatcher: acting on cancel requests recorded in a registry."""

from __future__ import annotations

import asyncio

from prismq_subprocess import Run, RunRegistry
from prismq_subprocess._background._cancel_watch import CancelRequestWatcher


async def test_a_watcher_with_a_source_cancels_each_requested_run_once() -> None:
    # The task manager's form: the watched runs are its active ones, read at each poll. A run
    # stays active while its cancel works, and must not be cancelled again meanwhile.
    registry = RunRegistry()
    runs = [Run(module_id="m") for _ in range(2)]
    for run in runs:
        await registry.add_run(run)
    active = {run.run_id for run in runs}
    calls: list[tuple[str, str]] = []

    async def cancel(run_id: str, reason: str) -> None:
        calls.append((run_id, reason))
        await asyncio.sleep(0.05)
        active.discard(run_id)

    watcher = CancelRequestWatcher(registry, cancel, interval=0.005, source=lambda: active)
    watcher.wake()
    await registry.request_cancel(runs[0].run_id, "asked")
    await asyncio.sleep(0.15)
    assert calls == [(runs[0].run_id, "asked")]
    assert active == {runs[1].run_id}
    active.clear()
    await asyncio.sleep(0.05)
    assert watcher._task is not None and watcher._task.done()  # nothing active: no polling
    watcher.wake()  # a new busy spell polls again
    assert not watcher._task.done()
    await watcher.aclose()
