"""Following output and running batches inside anyio cancel scopes, as FastAPI/Starlette hosts
do: a response cancelled when its client leaves, ``move_on_after``/``fail_after`` around the
work, a task-group sibling failing. anyio cancels level-triggered (every ``await`` in a cancelled
scope raises again), so clean-up that awaits is cut short, and anyio re-delivers the cancellation
at every loop iteration for as long as a task stays in the scope.

Each test runs its own ``anyio.run`` (asyncio backend) on a loop that counts its iterations and
keeps what it would report (see ``anyio_support``); real children are checked with psutil.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import pytest
from anyio_support import CANCELS, LoopReport, cancelled_after, run_counted
from lifecycle_helpers import STUBBORN_CHILD, marked, marked_env, survivors_after

import prismq_subprocess as pq

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX trees and signals")

# A module that prints a line every 20 ms for a minute.
TICKER = (
    "import time\nfor i in range(3000):\n    print('tick', i, flush=True)\n    time.sleep(0.02)\n"
)


def other_tasks() -> list[asyncio.Task[Any]]:
    """The tasks of this loop besides the calling one and a runner's watcher of cancel requests
    (it lives as long as the runner)."""
    return [
        task
        for task in asyncio.all_tasks()
        if task is not asyncio.current_task() and task.get_name() != "prismq-cancel-requests"
    ]


async def spinning(report: LoopReport, seconds: float = 0.3) -> bool:
    """Whether the loop spins through ``seconds`` of sleep: a spin (anyio re-delivering a
    cancellation at every iteration) makes thousands of iterations in 0.3 s even on a loaded
    machine (about 18,000 a second measured here); a live run's output, its sampling and the
    registry's writes, a few hundred at most."""
    report.mark("quiet")
    await anyio.sleep(seconds)
    return report.since("quiet") > 1_000


# -- OutputCapture.subscribe() ---------------------------------------------------------------
SOURCES = ["live", "unknown_run", "log_catch_up", "other_process"]


@pytest.mark.parametrize("source", SOURCES)
@pytest.mark.parametrize("kind", CANCELS)
def test_a_subscription_left_by_a_cancelled_scope_is_released(
    kind: str, source: str, tmp_path: Path
) -> None:
    """Wherever the subscription waits when the scope is cancelled (for the next line, for a
    run to appear, on a log read in its thread, polling another process's run), leaving its
    ``async with`` releases it: no subscriber counted, no waiter left on the ring or the
    capture, no task or thread result left unretrieved, and nothing spinning afterwards."""
    script = tmp_path / "ticker.py"
    script.write_text(TICKER)
    got: list[pq.OutputItem] = []

    async def main(report: LoopReport) -> None:
        async with (
            pq.SQLiteRunRegistry(tmp_path / "runs.db") as registry,
            pq.OutputCapture(max_lines_per_run=4, log_dir=tmp_path / "logs") as output,
            pq.OutputCapture(log_dir=tmp_path / "logs") as other,
            pq.ModuleRunner(registry, output=output) as runner,
        ):
            capture = output
            options: dict[str, Any] = {}
            if source == "unknown_run":
                run_id = "not-yet"
                options["wait"] = True
            else:
                run_id = await runner.start_module("t", "Ticker", script)
                # The child's first line before the 0.5 s starts: on a loaded machine the
                # interpreter alone can take longer than that to start (a CI run on 3.13 got
                # no line). For the log catch-up, far more lines than the ring holds, so the
                # subscription reads the log.
                enough = 20 if source == "log_catch_up" else 1
                with anyio.fail_after(30):
                    while output.line_count(run_id) < enough:  # noqa: ASYNC110
                        await anyio.sleep(0.02)
                if source == "other_process":
                    capture = other
                    options["registry"] = registry

            async def follow() -> None:
                async with capture.subscribe(run_id, **options) as subscription:
                    async for item in subscription:
                        got.append(item)

            await cancelled_after(kind, 0.5, follow)
            ring = capture._runs.get(run_id)
            assert ring is None or (ring.subscribers, ring.waiters) == (0, [])
            assert capture._run_waiters == {}
            assert not await spinning(report)
            if source != "unknown_run":
                await runner.cancel(run_id)
            assert other_tasks() == [] or source != "unknown_run"

    _, report = run_counted(main)
    if source != "unknown_run":
        assert got, "the subscription got no line before the cancel"
    assert report.reported == []
    assert report.warned == []


@pytest.mark.parametrize("source", ["ring", "log"])
def test_reads_cut_short_by_move_on_after_lose_and_repeat_nothing(
    source: str, tmp_path: Path
) -> None:
    """A heartbeat written with anyio (``move_on_after`` around each read) cuts reads short,
    in the ring's wait or in a log read in its thread: the next read carries on where the cut
    one left off, every line once, in order. The reads take turns with no time at all (a log
    read is cut in its thread whatever the machine's speed: with 0.5 ms each, fast log reads
    were sometimes never cut), 0.5 ms (cut while the producer sleeps) and enough to get on."""
    count = 400

    async def main(report: LoopReport) -> tuple[list[int], int]:
        async with pq.OutputCapture(max_lines_per_run=4, log_dir=tmp_path / "logs") as capture:
            capture.open_run("r")
            if source == "log":  # written before: all but the last 4 come from the file
                await capture.append_lines("r", [f"line {i}" for i in range(count)])
                await capture.close_run("r", status=pq.RunStatus.COMPLETED, exit_code=0)

            async def produce() -> None:
                for i in range(count):
                    await capture.append_line("r", f"line {i}")
                    if i % 7 == 0:
                        await asyncio.sleep(0.002)
                await capture.close_run("r", status=pq.RunStatus.COMPLETED, exit_code=0)

            producer = asyncio.ensure_future(produce()) if source == "ring" else None
            seqs: list[int] = []
            cut = 0
            deadlines = itertools.cycle([0.0, 0.0005, 5.0])
            async with capture.subscribe("r") as subscription:
                chunks = subscription.chunks(max_lines=16)
                while True:
                    with anyio.move_on_after(next(deadlines)) as scope:
                        item = await anext(chunks, None)
                        if item is None:
                            break
                        assert isinstance(item, pq.OutputChunk), item  # no gap: a log
                        seqs.extend(range(item.first_seq, item.first_seq + len(item.lines)))
                    cut += scope.cancelled_caught
            assert subscription.end == pq.OutputEnd("completed", 0)
            if producer is not None:
                await producer
            return seqs, cut

    (seqs, cut), report = run_counted(main)
    assert seqs == list(range(count))
    assert cut > 0, "no read was cut short: the test did not test anything"
    assert report.reported == []
    assert report.warned == []


# -- sse_events() ----------------------------------------------------------------------------
@pytest.mark.parametrize("lands", ["in_the_stream", "in_the_consumer"])
@pytest.mark.parametrize("with_stop", [False, True], ids=["no_stop", "stop"])
@pytest.mark.parametrize("kind", CANCELS)
def test_an_sse_stream_cancelled_by_a_scope_is_released(
    kind: str, with_stop: bool, lands: str
) -> None:
    """The scope's cancellation lands inside the stream (waiting for the next line) or in the
    consumer (as in Starlette's ``send``), which then closes the stream inside the cancelled
    scope, as the example app's ``EventStream`` does. Either way the stream ends closed, its
    subscription released, no read task left behind, nothing reported, nothing spinning."""
    chunks: list[str] = []

    async def main(report: LoopReport) -> None:
        capture = pq.OutputCapture()
        capture.open_run("r")

        async def produce() -> None:
            for i in range(10_000):
                await capture.append_line("r", f"line {i}")
                await asyncio.sleep(0.02)

        producer = asyncio.ensure_future(produce())
        stop = asyncio.Event() if with_stop else None
        stream = pq.sse_events(capture, "r", heartbeat=0.05, stop=stop)

        async def consume() -> None:
            try:
                async for chunk in stream:
                    chunks.append(chunk)
                    if lands == "in_the_consumer":
                        await anyio.sleep(30)  # the cancellation comes here, outside the stream
            finally:
                await stream.aclose()

        await cancelled_after(kind, 0.3, consume)
        assert stream.ag_frame is None  # closed
        assert other_tasks() == [producer], other_tasks()
        assert (capture._runs["r"].subscribers, capture._runs["r"].waiters) == (0, [])
        assert not await spinning(report)
        assert other_tasks() == [producer]
        producer.cancel()
        await asyncio.gather(producer, return_exceptions=True)

    _, report = run_counted(main)
    assert chunks
    assert report.reported == []
    assert report.warned == []


# -- ConcurrentExecutor ----------------------------------------------------------------------
@pytest.mark.parametrize("kind", CANCELS)
def test_a_batch_cancelled_by_a_scope_waits_for_its_runs_without_spinning(
    kind: str, tmp_path: Path
) -> None:
    """Two modules that ignore SIGTERM, stopped when the scope is cancelled: each gets its grace
    period, then SIGKILL, and is recorded CANCELLED with that exit status, before the batch
    returns. While the runs' clean-up went on, anyio re-cancelled the waiting batch at every
    loop iteration and asyncio's TaskGroup waited again each time: about 21,900 loop iterations
    (0.48 s of CPU) for a 1 s grace period, against 204 (0.12 s) after asyncio's own
    cancellation."""
    mark, env = marked_env()
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN_CHILD)
    grace = 1.0

    async def main(report: LoopReport) -> tuple[list[pq.Run], int, datetime]:
        async with (
            pq.SQLiteRunRegistry(tmp_path / "runs.db") as registry,
            pq.ConcurrentExecutor(4, registry=registry, grace_period=grace) as executor,
        ):
            specs = [pq.ModuleSpec(f"m{i}", f"M{i}", script, env=env) for i in range(2)]

            async def batch() -> None:
                try:
                    await executor.execute_batch(specs)
                finally:
                    report.mark("stopped")
                    # The stops ran to their end before the batch returned.
                    assert marked(mark) == []

            report.mark("start")
            not_before = datetime.now(UTC) + timedelta(seconds=1.0)  # the scope's cancel
            await cancelled_after(kind, 1.0, batch)
            # From the start to the cancel (1 s, runs starting and printing), then the grace.
            spent = report.marks["stopped"] - report.marks["start"]
            assert other_tasks() == []
            return await registry.list_runs(), spent, not_before

    (runs, spent, cancelled_at), report = run_counted(main)
    assert survivors_after(mark, 3.0) == []
    assert [(run.status, run.exit_code) for run in runs] == [
        (pq.RunStatus.CANCELLED, -signal.SIGKILL)
    ] * 2
    for run in runs:
        assert run.finished_at is not None
        assert run.finished_at >= cancelled_at + timedelta(seconds=grace * 0.9)
    # A loop that does not spin sleeps through most of these two seconds.
    assert spent < 2_000, f"{spent} loop iterations for a batch stopped with a {grace} s grace"
    assert report.reported == []
    assert report.warned == []


@pytest.mark.parametrize("kind", CANCELS)
def test_calls_queued_for_a_slot_or_admission_leave_nothing_when_cancelled(
    kind: str, tmp_path: Path
) -> None:
    """One call runs, one waits for the slot, one for admission (a resource manager that never
    admits): cancelled by the scope, the slot and the admission waits leave nothing behind and
    the executor serves the next call."""
    sleeper = tmp_path / "sleeper.py"
    sleeper.write_text("import time\ntime.sleep(30)\n")
    quick = tmp_path / "quick.py"
    quick.write_text("print('ok')\n")

    cleaned: list[str] = []

    class NeverAdmits(pq.ResourceManager):
        async def admit(self, *, wait: bool = True, timeout: Any = None) -> Any:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                await asyncio.sleep(0.3)  # its own clean-up, e.g. a reservation given back
                cleaned.append("admission")
                raise

    async def main(report: LoopReport) -> dict[str, Any]:
        async with (
            pq.ConcurrentExecutor(1, grace_period=0.5) as queued,
            pq.ConcurrentExecutor(1, NeverAdmits(), grace_period=0.5) as refused,
        ):

            async def three() -> None:
                async with anyio.create_task_group() as group:
                    for _ in range(2):
                        group.start_soon(lambda: queued.execute_module("s", sleeper))
                    group.start_soon(lambda: refused.execute_module("r", sleeper))

            await cancelled_after(kind, 0.5, three)
            assert cleaned == ["admission"]  # waited for, as after asyncio's cancellation
            assert (queued._slots.held, list(queued._slots._waiters)) == (0, [])
            assert (refused._slots.held, refused._close_signals) == (0, set())
            assert other_tasks() == []
            assert not await spinning(report)
            with anyio.fail_after(30):
                return await queued.execute_module("ok", quick)

    result, report = run_counted(main)
    assert result["status"] == "completed"
    assert report.reported == []
    assert report.warned == []
