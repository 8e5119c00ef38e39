"""Tests of OutputCapture (prismq_subprocess/_background/_output_capture.py) and its log writer."""

from __future__ import annotations

import asyncio
import gc
import threading
import weakref
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from prismq_subprocess._background._output_capture import (
    OutputCapture,
    OutputGap,
    OutputItem,
    OutputLine,
    OutputSubscription,
)
from prismq_subprocess._background._log_names import run_log_path
from prismq_subprocess._core._exceptions import InvalidLimitError, OutputClosedError


async def collect(subscription: OutputSubscription) -> list[OutputItem]:
    return [item async for item in subscription]


def texts(items: list[OutputItem]) -> list[str]:
    return [item.text for item in items if isinstance(item, OutputLine)]


async def test_replay_then_follow_until_closed() -> None:
    capture = OutputCapture()
    await capture.append_line("r", "one\n")
    await capture.append_line("r", "two\r\n")
    reader = asyncio.create_task(collect(capture.subscribe("r")))
    await asyncio.sleep(0)
    await capture.append_line("r", "three")
    await asyncio.sleep(0)
    assert not reader.done()
    await capture.close_run("r")
    items = await reader
    assert items == [OutputLine(0, "one"), OutputLine(1, "two"), OutputLine(2, "three")]
    assert capture.get_lines("r") == ["one", "two", "three"]
    assert capture.is_closed("r") and capture.line_count("r") == 3
    # A late subscriber replays the buffer and ends at once.
    assert texts(await collect(capture.subscribe("r"))) == ["one", "two", "three"]
    with pytest.raises(OutputClosedError):
        await capture.append_line("r", "late")


async def test_subscribe_before_any_output_and_close_without_output() -> None:
    capture = OutputCapture()
    early = asyncio.create_task(collect(capture.subscribe("r", wait=True)))
    silent = asyncio.create_task(collect(capture.subscribe("silent", wait=True)))
    await asyncio.sleep(0)
    await capture.append_line("r", "hello")
    await capture.close_run("r")
    await capture.close_run("silent")
    await capture.close_run("silent")  # idempotent
    assert texts(await early) == ["hello"]
    assert await silent == []
    assert capture.get_lines("unknown") == [] and capture.dropped_count("unknown") == 0


async def test_many_subscribers_each_get_everything() -> None:
    capture = OutputCapture()
    capture.open_run("r")
    readers = [asyncio.create_task(collect(capture.subscribe("r"))) for _ in range(25)]
    await asyncio.sleep(0)
    for i in range(200):
        await capture.append_line("r", f"line {i}")
        if i % 50 == 0:
            await asyncio.sleep(0)
    await capture.close_run("r")
    expected = [f"line {i}" for i in range(200)]
    for reader in readers:
        items = await reader
        assert texts(items) == expected
        assert not any(isinstance(item, OutputGap) for item in items)


async def test_ring_buffer_by_lines_gives_gap_marker_on_replay() -> None:
    capture = OutputCapture(max_lines_per_run=3)
    for i in range(10):
        await capture.append_line("r", str(i))
    assert capture.get_lines("r") == ["7", "8", "9"]
    assert capture.dropped_count("r") == 7
    await capture.close_run("r")
    items = await collect(capture.subscribe("r"))
    assert items == [OutputGap(7), OutputLine(7, "7"), OutputLine(8, "8"), OutputLine(9, "9")]


async def test_ring_buffer_by_bytes_keeps_newest_line() -> None:
    capture = OutputCapture(max_bytes_per_run=10)
    await capture.append_line("r", "ééé")  # 6 bytes
    await capture.append_line("r", "abcd")  # 4 bytes: total 10, fits
    assert capture.get_lines("r") == ["ééé", "abcd"]
    await capture.append_line("r", "x")
    assert capture.get_lines("r") == ["abcd", "x"]
    await capture.append_line("r", "y" * 50)  # larger than the cap alone: still kept
    assert capture.get_lines("r") == ["y" * 50]
    assert capture.dropped_count("r") == 3


async def test_resume_after_seq() -> None:
    capture = OutputCapture(max_lines_per_run=4)
    for i in range(6):
        await capture.append_line("r", str(i))
    await capture.close_run("r")
    resumed = await collect(capture.subscribe("r", after=3))
    assert resumed == [OutputLine(4, "4"), OutputLine(5, "5")]
    # The client saw seq 0; 1 was evicted since, so it gets a gap of one line first.
    assert await collect(capture.subscribe("r", after=0)) == [
        OutputGap(1),
        *[OutputLine(i, str(i)) for i in range(2, 6)],
    ]
    assert await collect(capture.subscribe("r", after=5)) == []


async def test_slow_subscriber_drops_oldest_without_blocking_producer() -> None:
    # The bound is the ring (5 lines), shared by all subscribers: no per-subscriber queue.
    capture = OutputCapture(max_lines_per_run=5)
    capture.open_run("r")
    slow = capture.subscribe("r")
    fast_items: list[OutputItem] = []

    async def fast_reader() -> None:
        async for item in capture.subscribe("r"):
            fast_items.append(item)

    fast = asyncio.create_task(fast_reader())
    await asyncio.sleep(0)
    for i in range(20):
        # append_line never suspends: the slow subscriber reads nothing meanwhile.
        await capture.append_line("r", str(i))
        await asyncio.sleep(0)  # let the fast reader keep up
    await capture.close_run("r")
    await fast
    assert texts(fast_items) == [str(i) for i in range(20)]
    items = await collect(slow)
    assert items == [OutputGap(15), *[OutputLine(i, str(i)) for i in range(15, 20)]]
    assert slow.dropped == 15


async def test_gap_is_reported_where_lines_went_missing() -> None:
    capture = OutputCapture(max_lines_per_run=2)
    capture.open_run("r")
    sub = capture.subscribe("r")
    await capture.append_line("r", "a")
    assert await sub.__anext__() == OutputLine(0, "a")
    for text in "bcde":
        await capture.append_line("r", text)
    await capture.close_run("r")
    assert await collect(sub) == [OutputGap(2), OutputLine(3, "d"), OutputLine(4, "e")]


async def test_cancelled_anext_loses_nothing() -> None:
    capture = OutputCapture()
    capture.open_run("r")
    sub = capture.subscribe("r")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await sub.__anext__()
    await capture.append_line("r", "after heartbeat")
    await capture.close_run("r")
    assert texts(await collect(sub)) == ["after heartbeat"]


async def test_aclose_and_gc_unregister_subscribers() -> None:
    capture = OutputCapture()
    capture.open_run("r")
    async with capture.subscribe("r") as sub:
        await capture.append_line("r", "x")
    assert await collect(sub) == []
    abandoned = capture.subscribe("r")
    gone = weakref.ref(abandoned)
    del abandoned
    gc.collect()
    assert gone() is None  # the capture keeps no reference to its subscribers
    assert capture._runs["r"].subscribers == 0


async def test_forget_frees_and_ends_subscribers() -> None:
    capture = OutputCapture()
    await capture.append_line("r", "x")
    reader = asyncio.create_task(collect(capture.subscribe("r")))
    await asyncio.sleep(0)
    capture.forget("r")
    assert texts(await reader) == ["x"]
    assert capture.get_lines("r") == [] and "r" not in capture._runs
    capture.forget("r")


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_lines_per_run": 0},
        {"max_bytes_per_run": -1},
        {"max_line_bytes": True},
        {"retain_ended_runs": -1},
        {"retain_ended_bytes": 1.5},
    ],
)
def test_bad_sizes(kwargs: dict[str, int]) -> None:
    with pytest.raises(InvalidLimitError):
        OutputCapture(**kwargs)


def log_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prismq-output-log"]


async def test_log_file_has_everything(tmp_path: Path) -> None:
    async with OutputCapture(max_lines_per_run=2, log_dir=tmp_path / "logs") as capture:
        for i in range(500):
            await capture.append_line("run-1", f"line {i} ü")
        await capture.append_line("../evil", "contained")
        await capture.close_run("run-1")
        path = capture.log_path("run-1")
        assert path is not None
        # close_run returned: the file is complete even though the buffer kept only 2 lines.
        assert path.read_text(encoding="utf-8").splitlines() == [
            f"line {i} ü" for i in range(500)
        ]
        assert capture.get_lines("run-1") == ["line 498 ü", "line 499 ü"]
    evil = run_log_path(tmp_path / "logs", "../evil")
    assert evil.parent == tmp_path / "logs"
    assert evil.read_text(encoding="utf-8") == "contained\n"
    assert log_threads() == []


async def test_no_log_thread_without_log_dir() -> None:
    async with OutputCapture() as capture:
        await capture.append_line("r", "x")
        assert capture.log_path("r") is None
        await capture.close_run("r")
    assert log_threads() == []


async def test_log_write_error_is_contained(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    async with OutputCapture(log_dir=blocker) as capture:
        await capture.append_line("r", "x")
        await capture.close_run("r")
        assert capture.get_lines("r") == ["x"]
    assert "cannot write the output log" in caplog.text


@settings(max_examples=60, deadline=None)
@given(
    lines=st.lists(st.text(max_size=20), max_size=60),
    max_lines=st.integers(1, 10),
    max_bytes=st.integers(1, 80),
)
def test_ring_buffer_invariants(lines: list[str], max_lines: int, max_bytes: int) -> None:
    async def scenario() -> None:
        capture = OutputCapture(max_lines_per_run=max_lines, max_bytes_per_run=max_bytes)
        clean = [line.replace("\n", " ").replace("\r", " ") for line in lines]
        for line in clean:
            await capture.append_line("r", line)
        kept = capture.get_lines("r")
        dropped = capture.dropped_count("r")
        assert dropped + len(kept) == len(clean)
        assert kept == clean[dropped:]
        assert len(kept) <= max_lines
        if len(kept) > 1:
            assert sum(len(k.encode()) for k in kept) <= max_bytes
        if clean:
            assert kept  # the newest line is always kept
        await capture.close_run("r")
        items = await collect(capture.subscribe("r"))
        expected: list[OutputItem] = [OutputGap(dropped)] if dropped else []
        expected += [OutputLine(dropped + i, text) for i, text in enumerate(kept)]
        assert items == expected

    asyncio.run(scenario())
