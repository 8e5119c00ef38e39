"""A host application in miniature: plain asyncio, no web framework.

It does what a FastAPI backend does with the library: starts 20 modules at once through one
ModuleRunner limited to 5 concurrent runs, records them in a SQLite registry, streams each run's
output to a subscriber (as an SSE endpoint would) while it runs, cancels one midway, and has one
fail and one time out. Afterwards the registry, and a second registry opened on the same file,
hold exactly the right statuses, exit codes and output tails.
"""

from __future__ import annotations

import asyncio
import signal
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import prismq_subprocess as pq
from prismq_subprocess._background._module_runner import ModuleRunner

MODULES = {
    # Prints --lines numbered lines, pausing so a subscriber sees them arrive.
    "ok": """
        import argparse, time
        parser = argparse.ArgumentParser()
        parser.add_argument("--name")
        parser.add_argument("--lines", type=int)
        args = parser.parse_args()
        for k in range(args.lines):
            print(f"{args.name} line {k}")
            time.sleep(0.02)
    """,
    "fail": """
        import sys
        print("fail start")
        print("boom", file=sys.stderr)
        sys.exit(3)
    """,
    "cancel": """
        import time
        print("ready")
        time.sleep(60)
    """,
    "timeout": """
        import time
        print("waiting")
        time.sleep(60)
    """,
}

TERMINATED = (-signal.SIGTERM, -signal.SIGKILL)


@dataclass
class Stream:
    """What one subscriber saw."""

    lines: list[str] = field(default_factory=list)
    live: bool = False  # the first line arrived before the run's output was closed


async def follow(
    output: pq.OutputCapture, run_id: str, stream: Stream, ready: asyncio.Event
) -> None:
    async with output.subscribe(run_id) as items:
        async for item in items:
            assert isinstance(item, pq.OutputLine), item  # no gaps at this volume
            if not stream.lines:
                stream.live = not output.is_closed(run_id)
            stream.lines.append(item.text)
            if item.text == "ready":
                ready.set()


@pytest.mark.parametrize("mode", ["async", "threaded"])
async def test_host_runs_twenty_modules_with_cancel_failure_and_timeout(
    tmp_path: Path, mode: str
) -> None:
    scripts = {}
    for kind, code in MODULES.items():
        scripts[kind] = tmp_path / f"{kind}.py"
        scripts[kind].write_text(textwrap.dedent(code))
    db = tmp_path / "runs.db"

    # (kind, parameters, timeout); the cancel module goes first so it is running early.
    plan: list[tuple[str, dict[str, object], float | None]] = [("cancel", {}, None)]
    plan += [("ok", {"name": f"m{i}", "lines": 3 + i % 4}, None) for i in range(8)]
    plan += [("fail", {}, None), ("timeout", {}, 1.0)]
    plan += [("ok", {"name": f"m{i}", "lines": 3 + i % 4}, None) for i in range(8, 17)]
    assert len(plan) == 20

    async with (
        pq.SQLiteRunRegistry(db) as registry,
        pq.OutputCapture() as output,
        ModuleRunner(
            registry, run_mode=mode, output=output, max_concurrent=5, grace_period=2.0
        ) as runner,
    ):
        peak_running = 0
        stop_watching = asyncio.Event()

        async def watch_concurrency() -> None:
            nonlocal peak_running
            while not stop_watching.is_set():
                peak_running = max(peak_running, runner.task_manager.running_count)
                await asyncio.sleep(0.005)

        ready = asyncio.Event()
        streams: dict[str, Stream] = {}
        async with asyncio.TaskGroup() as tg:
            watcher = tg.create_task(watch_concurrency())
            run_ids: list[str] = []
            for i, (kind, params, timeout) in enumerate(plan):
                run_id = await runner.start_module(
                    kind, f"{kind} module #{i}", scripts[kind], params, timeout=timeout
                )
                run_ids.append(run_id)
                streams[run_id] = Stream()
                tg.create_task(follow(output, run_id, streams[run_id], ready))

            # The host cancels the long module once its output shows it is working.
            await ready.wait()
            assert (
                await runner.cancel(run_ids[0], "cancelled by the host")
                is pq.CancelResult.CANCELLED
            )
            await runner.task_manager.wait_all(timeout=60)
            stop_watching.set()
            await watcher

        assert 1 <= peak_running <= 5
        expected = expected_outcomes(plan, run_ids)
        await check_registry(registry, expected, streams)

        # A second registry on the same file (another worker, or after a restart) sees them.
        async with pq.SQLiteRunRegistry(db) as second:
            await check_registry(second, expected, streams)

    async with pq.SQLiteRunRegistry(db) as reopened:
        await check_registry(reopened, expected, streams)


def expected_outcomes(
    plan: list[tuple[str, dict[str, object], float | None]], run_ids: list[str]
) -> dict[str, tuple[str, pq.RunStatus, list[str]]]:
    expected = {}
    for run_id, (kind, params, _) in zip(run_ids, plan, strict=True):
        if kind == "ok":
            lines = [f"{params['name']} line {k}" for k in range(int(str(params["lines"])))]
            expected[run_id] = (kind, pq.RunStatus.COMPLETED, lines)
        elif kind == "fail":
            expected[run_id] = (kind, pq.RunStatus.FAILED, ["fail start", "boom"])
        elif kind == "cancel":
            expected[run_id] = (kind, pq.RunStatus.CANCELLED, ["ready"])
        else:
            expected[run_id] = (kind, pq.RunStatus.FAILED, ["waiting"])
    return expected


async def check_registry(
    registry: pq.abc.BaseRunRegistry,
    expected: dict[str, tuple[str, pq.RunStatus, list[str]]],
    streams: dict[str, Stream],
) -> None:
    runs = {run.run_id: run for run in await registry.list_runs(limit=100)}
    assert set(runs) == set(expected)
    assert await registry.count_runs(status=pq.RunStatus.COMPLETED) == 17
    assert await registry.count_runs(status=pq.RunStatus.FAILED) == 2
    assert await registry.count_runs(status=pq.RunStatus.CANCELLED) == 1
    for run_id, (kind, status, lines) in expected.items():
        run = runs[run_id]
        assert run.status is status, (kind, run)
        assert run.module_id == kind
        assert run.output_tail == lines, (kind, run.output_tail)
        assert streams[run_id].lines == lines, kind
        assert streams[run_id].live, f"{kind} output was not streamed while the run was live"
        assert run.pid is not None and run.started_at is not None and run.finished_at is not None
        if kind == "ok":
            assert run.exit_code == 0 and run.error_message is None
        elif kind == "fail":
            assert run.exit_code == 3
            assert run.error_message == "exited with status 3: boom"
        elif kind == "cancel":
            assert run.exit_code in TERMINATED
            assert run.error_message == "cancelled by the host"
        else:
            assert run.exit_code in TERMINATED
            assert run.error_message == "timed out after 1 s; process tree stopped"
