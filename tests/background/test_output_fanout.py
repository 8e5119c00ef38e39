"""Lossless fan-out of a real child's output through ModuleRunner to many subscribers (issue 11
C9), and memory bounded in bytes for huge lines (C10)."""

from __future__ import annotations

import asyncio
import textwrap
import tracemalloc
from pathlib import Path

import pytest

import prismq_subprocess as pq
from prismq_subprocess._background._module_runner import ModuleRunner

LINES = 200_000

# Writes its lines in blocks of 10,000, so each read of the pipe brings thousands of lines at once.
BURSTS = """
    import sys
    n = int(sys.argv[sys.argv.index("--lines") + 1])
    block = 10_000
    for start in range(0, n, block):
        sys.stdout.write("".join(f"line {i}\\n" for i in range(start, min(n, start + block))))
        sys.stdout.flush()
"""


def script(tmp_path: Path, code: str) -> Path:
    path = tmp_path / "child.py"
    path.write_text(textwrap.dedent(code))
    return path


async def read_items(subscription: pq.OutputSubscription) -> tuple[list[str], int]:
    texts: list[str] = []
    gaps = 0
    async with subscription:
        async for item in subscription:
            if isinstance(item, pq.OutputGap):
                gaps += 1
            else:
                texts.append(item.text)
    return texts, gaps


async def read_chunks(subscription: pq.OutputSubscription) -> tuple[list[str], int]:
    texts: list[str] = []
    gaps = 0
    async with subscription:
        async for chunk in subscription.chunks():
            if isinstance(chunk, pq.OutputGap):
                gaps += 1
            else:
                assert chunk.first_seq == len(texts) + 0  # in order, nothing skipped
                texts.extend(chunk.lines)
    return texts, gaps


@pytest.mark.slow
@pytest.mark.parametrize(
    ("mode", "subscribers", "how"),
    [
        ("async", 1, "items"),
        ("async", 10, "items"),
        ("async", 100, "chunks"),
        ("threaded", 1, "items"),
        ("threaded", 100, "chunks"),
    ],
)
async def test_every_subscriber_that_keeps_up_gets_every_line(
    tmp_path: Path, mode: str, subscribers: int, how: str
) -> None:
    path = script(tmp_path, BURSTS)
    reader = read_items if how == "items" else read_chunks
    async with (
        pq.RunRegistry() as registry,
        pq.OutputCapture() as output,  # the default ring: 1000 lines
        ModuleRunner(registry, run_mode=mode, output=output) as runner,
    ):
        run_id = await runner.start_module("burst", "Burst", path, {"lines": LINES})
        readers = [
            asyncio.create_task(reader(output.subscribe(run_id))) for _ in range(subscribers)
        ]
        results = await asyncio.gather(*readers)
        await runner.task_manager.wait_all(timeout=120)
        run = await registry.get_run(run_id)
    assert run is not None and run.status is pq.RunStatus.COMPLETED
    expected = [f"line {i}" for i in range(LINES)]
    for texts, gaps in results:
        assert gaps == 0
        assert len(texts) == LINES
        assert texts == expected
    assert run.output_tail == expected[-50:]


HUGE_LINES = """
    import sys
    for i in range(20):
        sys.stdout.write(chr(ord("a") + i) * (1024 * 1024) + "\\n")
"""


async def test_output_tail_is_bounded_in_bytes(tmp_path: Path) -> None:
    path = script(tmp_path, HUGE_LINES)
    db = tmp_path / "runs.db"
    async with (
        pq.SQLiteRunRegistry(db) as registry,
        pq.OutputCapture() as output,
        ModuleRunner(registry, run_mode="async", output=output) as runner,
    ):
        run = await runner.execute_module("huge", "Huge", path)
        assert run.status is pq.RunStatus.COMPLETED
        stored = await registry.get_run(run.run_id)
        buffered = output.get_lines(run.run_id)
    assert stored is not None
    tail_bytes = sum(len(line.encode()) for line in stored.output_tail)
    assert tail_bytes <= 64 * 1024 + 100  # the bound plus one truncation note
    assert stored.output_tail == [stored.output_tail[-1]]  # one line alone fills the bound
    assert stored.output_tail[-1].startswith("t" * 1000)
    assert stored.output_tail[-1].endswith("more bytes]")
    # The ring: at most max_bytes_per_run + one line of max_line_bytes.
    assert sum(len(line) for line in buffered) <= output.max_bytes_per_run + 64 * 1024 + 100


async def test_a_stalled_subscriber_pins_no_more_than_the_ring() -> None:
    capture = pq.OutputCapture(max_bytes_per_run=1024 * 1024)
    capture.open_run("r")
    stalled = capture.subscribe("r")  # never read
    huge = "x" * (5 * 1024 * 1024)
    tracemalloc.start()
    try:
        for i in range(20):
            await capture.append_lines("r", [f"{i}{huge}"])
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Before: the stalled subscriber's queue kept all 20 lines (100 MB).
    assert held < 4 * 1024 * 1024
    await capture.close_run("r")
    items = [item async for item in stalled]
    # It lost the lines that left the ring (one gap), then reads the rest, each cut to 64 KiB.
    gap, *lines = items
    assert isinstance(gap, pq.OutputGap) and gap.dropped + len(lines) == 20
    for item in lines:
        assert isinstance(item, pq.OutputLine)
        assert item.truncated == len(f"{item.seq}{huge}") - 64 * 1024
        assert item.text.endswith(f"[line truncated: {item.truncated} more bytes]")
