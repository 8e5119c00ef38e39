"""Tests of OutputCapture (prismq_subprocess/_background/_output_capture.py) and its log writer."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, BinaryIO

import anyio
import pytest
from helpers import clean_one_by_one
from hypothesis import given, settings
from hypothesis import strategies as st

from prismq_subprocess._background._log_names import (
    log_file_name,
    run_id_from_log_path,
    run_log_path,
)
from prismq_subprocess._background._output_capture import (
    OutputCapture,
    OutputChunk,
    OutputEnd,
    OutputGap,
    OutputItem,
    OutputLine,
    OutputSubscription,
    _clean,
)
from prismq_subprocess._background._output_log import RunLogWriter
from prismq_subprocess._background._output_tail import OutputTail
from prismq_subprocess._background._run_record import RunStatus
from prismq_subprocess._core._exceptions import (
    InvalidArgumentTypeError,
    InvalidLimitError,
    InvalidLogDirError,
    InvalidRunIdError,
    InvalidSubscriptionError,
    OutputClosedError,
    OutputNotFoundError,
    OutputWaitTimeoutError,
)


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


async def test_a_stream_collected_in_a_cycle_unregisters_its_subscriber_once() -> None:
    """Starlette drops a disconnected client's body iterator without closing it. Collected in
    a reference cycle, the subscription's ``__del__`` runs and then the generator's finalizer
    closes it (``aclose``): the subscriber count was decremented twice (-1 per stream), so a
    run nobody followed looked followed (no fast path, yields every half ring)."""
    capture = OutputCapture()
    capture.open_run("r")
    await capture.append_lines("r", ["a", "b"])

    async def body() -> AsyncIterator[str]:  # what sse_events is, reduced
        async with capture.subscribe("r") as sub:
            async for item in sub:
                assert isinstance(item, OutputLine)
                yield item.text

    for _ in range(5):
        stream = body()
        assert await anext(stream) == "a"
        assert capture._runs["r"].subscribers == 1
        holder: list[Any] = [stream]
        holder.append(holder)  # a cycle, as a frame kept by a traceback makes
        del stream, holder
        gc.collect()
        for _ in range(5):
            await asyncio.sleep(0)  # the aclose() the loop's async generator hook scheduled
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


@pytest.mark.parametrize("forgotten", ["twice", "never written"])
async def test_forgetting_a_run_the_log_writer_does_not_know_keeps_it_writing(
    tmp_path: Path, forgotten: str
) -> None:
    # A probe's find: forget() of an id the log writer no longer knew (forgotten already, or
    # never written here: another worker's run) raised KeyError in its thread, which ended;
    # every later close_run() then waited for ever, and so did a runner's final records and
    # the host's shutdown.
    capture = OutputCapture(log_dir=tmp_path / "logs")
    await capture.append_line("done", "x")
    await capture.close_run("done", exit_code=0)
    if forgotten == "twice":
        capture.forget("done")
        await asyncio.sleep(0.05)
        capture.forget("done")
    else:
        capture.forget("run-of-another-worker")
    await capture.append_line("next", "y")
    await asyncio.sleep(0.1)
    # (Checked before anything waits on the writer: with it gone, close_run() never returns.)
    assert len(log_threads()) == 1, "the log writer thread ended"
    await asyncio.wait_for(capture.close_run("next", exit_code=0), 10)
    await asyncio.wait_for(capture.aclose(), 10)
    log = tmp_path / "logs"
    assert "y" in "".join(p.read_text() for p in log.rglob("*") if p.is_file())


async def test_log_file_has_everything(tmp_path: Path) -> None:
    async with OutputCapture(max_lines_per_run=2, log_dir=tmp_path / "logs") as capture:
        for i in range(500):
            await capture.append_line("run-1", f"line {i} ü")
        await capture.append_line("../evil", "contained")
        await capture.close_run("run-1")
        path = capture.log_path("run-1")
        assert path is not None
        # close_run returned: the file is complete even though the buffer kept only 2 lines.
        assert path.read_text(encoding="utf-8").splitlines() == [f"line {i} ü" for i in range(500)]
        assert capture.get_lines("run-1") == ["line 498 ü", "line 499 ü"]
    evil = run_log_path(tmp_path / "logs", "../evil")
    assert evil.parent == tmp_path / "logs"
    assert evil.read_text(encoding="utf-8") == "contained\n"
    assert log_threads() == []


@pytest.mark.parametrize("what", ["a file", "below a file", "a NUL"])
def test_a_log_dir_that_cannot_hold_log_files_is_refused_at_once(tmp_path: Path, what: str) -> None:
    # Taken before (a probe, session 34): every run's lines then stayed in memory only, and the
    # writer thread logged "cannot write the output log" once per run, with no error to the
    # caller who had asked for the files.
    if what == "a file":
        bad = tmp_path / "runs.log"
        bad.write_text("")
        says = "not a directory"
    elif what == "below a file":
        (tmp_path / "runs.log").write_text("")
        bad = tmp_path / "runs.log" / "logs"
        says = "is a file"
    else:
        bad = tmp_path / "lo\0gs"
        says = "NUL"
    with pytest.raises(InvalidLogDirError, match=says):
        OutputCapture(log_dir=bad)
    with pytest.raises(InvalidLogDirError, match=says):
        OutputCapture(log_dir=str(bad))
    assert log_threads() == []


async def test_a_log_dir_still_to_be_made_is_made_with_the_first_line(tmp_path: Path) -> None:
    log_dir = tmp_path / "not" / "yet"
    async with OutputCapture(log_dir=log_dir) as capture:
        await capture.append_line("r", "x")
        await capture.close_run("r")
    assert (log_dir / run_log_path(log_dir, "r").name).read_text() == "x\n"


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
    async with OutputCapture(log_dir=blocker) as capture:
        blocker.write_text("")  # a file where the directory was to be made (refused up front)
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


# -- log file names (issue 11 C11) ------------------------------------------------------------
async def test_log_files_of_similar_run_ids_do_not_collide(tmp_path: Path) -> None:
    ids = ["job.1", "job_1", "job/1", "job 1", "Job_1", "JOB_1", "..", "nul", "a\\b"]
    async with OutputCapture(log_dir=tmp_path) as capture:
        for run_id in ids:
            await capture.append_line(run_id, f"output of {run_id}")
            await capture.close_run(run_id)
        paths = {run_id: capture.log_path(run_id) for run_id in ids}
    assert len({str(path).lower() for path in paths.values()}) == len(ids)  # also case-blind
    for run_id, path in paths.items():
        assert path is not None and path.parent == tmp_path
        assert path.read_text(encoding="utf-8") == f"output of {run_id}\n"
        assert run_id_from_log_path(path) == run_id
    assert sorted(os.listdir(tmp_path)) == sorted(p.name for p in paths.values())


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=1, max_size=60), st.text(min_size=1, max_size=60))
def test_log_names_are_safe_distinct_and_reversible(first: str, second: str) -> None:
    encoded = sum(
        1 if b in b"abcdefghijklmnopqrstuvwxyz0123456789-_" else 3
        for b in first.encode("utf-8", "surrogatepass")
    )
    if encoded + 4 > 255:
        with pytest.raises(InvalidRunIdError, match="too long"):
            log_file_name(first)
        return
    name = log_file_name(first)
    assert name.isascii() and name.endswith(".log")
    assert "/" not in name and "\\" not in name and not name.startswith(".")
    assert run_id_from_log_path(Path("/some/dir") / name) == first
    if first != second and len(second) <= 20:
        assert name.lower() != log_file_name(second).lower()


@pytest.mark.parametrize("bad", ["", "x" * 300, 7])
def test_run_ids_that_cannot_name_a_log_file(tmp_path: Path, bad: object) -> None:
    with pytest.raises(InvalidRunIdError):
        run_log_path(tmp_path, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["job_1.txt", "%61.log", "a%2f.log", "A.log", ".log", "%ZZ.log"])
def test_names_not_made_by_run_log_path_are_refused(name: str) -> None:
    with pytest.raises(InvalidRunIdError):
        run_id_from_log_path(name)


async def test_a_bad_run_id_is_refused_before_any_output(tmp_path: Path) -> None:
    async with OutputCapture(log_dir=tmp_path) as capture:
        with pytest.raises(InvalidRunIdError):
            await capture.append_line("x" * 300, "never written")
        with pytest.raises(InvalidRunIdError):
            capture.open_run("")
    assert os.listdir(tmp_path) == []


# -- unknown runs, waiting, arguments (issue 12 item 4) ---------------------------------------
async def test_subscribing_to_an_unknown_run_raises_unless_asked_to_wait() -> None:
    capture = OutputCapture()
    with pytest.raises(OutputNotFoundError) as info:
        capture.subscribe("nope")
    assert isinstance(info.value, KeyError)
    sub = capture.subscribe("nope", wait=0.05)
    with pytest.raises(OutputWaitTimeoutError) as timed_out:
        await sub.__anext__()
    assert isinstance(timed_out.value, TimeoutError)
    waiting = asyncio.create_task(collect(capture.subscribe("later", wait=True)))
    await asyncio.sleep(0.02)
    assert not waiting.done()
    assert capture.open_run("later") is True
    assert capture.open_run("later") is False
    await capture.append_line("later", "hi")
    await capture.close_run("later", status=RunStatus.COMPLETED, exit_code=0)
    assert texts(await waiting) == ["hi"]


@pytest.mark.parametrize(
    "settings", [{"retain_ended_runs": 0}, {"retain_ended_bytes": 0}, {"log_dir": True}]
)
@pytest.mark.parametrize("lines", [0, 2])
async def test_a_subscriber_waiting_for_a_run_released_before_it_woke_ends(
    tmp_path: Path, settings: dict[str, Any], lines: int
) -> None:
    # A fuzzer's find: the run appeared and was released (retention of 0, or in the same loop
    # turn) before the waiting subscriber's task ran; it then waited for good (an SSE request
    # that never ends). Like a subscriber that had attached: its lines as a gap (or from the
    # log file), then the run's end.
    if settings.get("log_dir"):
        settings = {"log_dir": tmp_path, "retain_ended_runs": 0}
    capture = OutputCapture(**settings)
    sub = capture.subscribe("r", wait=True)
    waiting = asyncio.create_task(collect(sub))
    await asyncio.sleep(0)
    capture.open_run("r")
    for i in range(lines):
        await capture.append_line("r", f"line {i}")
    await capture.close_run("r", status=RunStatus.COMPLETED, exit_code=0)
    items = await asyncio.wait_for(waiting, 5)
    if lines and "log_dir" in settings:
        assert texts(items) == ["line 0", "line 1"]
    elif lines:
        assert items == [OutputGap(lines)]
    else:
        assert items == []
    assert sub.end == OutputEnd("completed", 0)
    await capture.aclose()


@pytest.mark.parametrize("how", ["append_lines", "append_line", "open_run"])
async def test_a_subscriber_waiting_for_the_run_gets_a_first_burst_bigger_than_the_ring(
    how: str,
) -> None:
    # The run appears with a subscriber waiting for it (wait=True): until that subscriber's
    # task ran and attached, the run counted as unfollowed, so a producer that did not wait
    # pushed past the ring and the subscriber that had "kept up" got a gap (3,062 of 4,000
    # lines of a first append_lines of 4,000 lines, ring of 1,000).
    capture = OutputCapture(max_lines_per_run=100)
    waiting = [asyncio.create_task(collect(capture.subscribe("r", wait=True))) for _ in range(3)]
    await asyncio.sleep(0)
    lines = [f"line {i}" for i in range(1000)]
    if how == "append_lines":
        await capture.append_lines("r", lines)
    else:
        if how == "open_run":
            capture.open_run("r")
        for line in lines:
            await capture.append_line("r", line)
    await capture.close_run("r")
    for task in waiting:
        items = await task
        assert not [item for item in items if isinstance(item, OutputGap)]
        assert texts(items) == lines


async def test_a_waiting_subscriber_that_gives_up_does_not_keep_the_run_followed() -> None:
    capture = OutputCapture(max_lines_per_run=100)
    subscription = capture.subscribe("r", wait=True)
    waiting = asyncio.create_task(collect(subscription))
    await asyncio.sleep(0)
    capture.open_run("r")  # wakes it
    waiting.cancel()  # ... but it is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert capture._runs["r"].subscribers == 0
    await capture.append_line("r", "x")
    assert "r" in capture._pending  # the unfollowed fast path again


async def test_closing_the_capture_ends_everything() -> None:
    capture = OutputCapture()
    waiting = asyncio.create_task(collect(capture.subscribe("never", wait=True)))
    capture.open_run("live")
    following = asyncio.create_task(collect(capture.subscribe("live")))
    await asyncio.sleep(0.01)
    await capture.aclose()
    assert await waiting == [] and await following == []
    with pytest.raises(OutputClosedError):
        await capture.append_line("new", "x")
    assert capture.open_run("new") is False


@pytest.mark.parametrize(
    "kwargs",
    [{"from_seq": -1}, {"after": "3"}, {"from_seq": 1, "after": 0}, {"wait": -1}, {"wait": "1"}],
)
def test_bad_subscribe_arguments(kwargs: dict[str, object]) -> None:
    capture = OutputCapture()
    capture.open_run("r")
    with pytest.raises(InvalidSubscriptionError):
        capture.subscribe("r", **kwargs)  # type: ignore[arg-type]


# -- positions, chunks, ends ------------------------------------------------------------------
async def test_from_seq_chunks_and_items_share_one_position() -> None:
    capture = OutputCapture()
    for i in range(10):
        await capture.append_line("r", str(i))
    sub = capture.subscribe("r", from_seq=4)
    chunks = sub.chunks(max_lines=3)
    assert await anext(chunks) == OutputChunk(4, ["4", "5", "6"])
    assert await sub.__anext__() == OutputLine(7, "7")
    assert sub.next_seq == 8
    await capture.close_run("r", status=RunStatus.FAILED, exit_code=2)
    assert [chunk async for chunk in chunks] == [OutputChunk(8, ["8", "9"])]
    assert sub.end == OutputEnd("failed", 2)
    assert [item async for item in sub] == []
    with pytest.raises(InvalidSubscriptionError):
        sub.chunks(max_lines=0)


async def test_lines_with_newlines_inside_become_several_lines() -> None:
    capture = OutputCapture()
    await capture.append_lines("r", ["a\nb", "c\r\n", "d\r\ne\n", "", "f\r"])
    await capture.append_line("r", "x\ny\n")
    assert capture.get_lines("r") == ["a", "b", "c", "d", "e", "", "f\r", "x", "y"]
    await capture.append_lines("r", iter(["from", "a generator"]))
    await capture.append_lines("r", [])
    assert capture.line_count("r") == 11


async def test_long_lines_are_cut_in_memory_and_whole_in_the_log(tmp_path: Path) -> None:
    async with OutputCapture(max_line_bytes=10, log_dir=tmp_path) as capture:
        await capture.append_line("r", "é" * 8)  # 16 bytes; the cut falls inside no character
        await capture.append_lines("r", ["a" + "é" * 6, "short"])  # 13 bytes; cut mid-character
        await capture.close_run("r")
        items = await collect(capture.subscribe("r"))
        assert items == [
            OutputLine(0, "ééééé… [line truncated: 6 more bytes]", 6),
            OutputLine(1, "aéééé… [line truncated: 4 more bytes]", 4),
            OutputLine(2, "short"),
        ]
        assert capture.tail("r", 5, max_bytes=12) == ["short"]
        path = capture.log_path("r")
    assert path is not None
    assert path.read_text(encoding="utf-8").splitlines() == ["é" * 8, "a" + "é" * 6, "short"]


# -- retention and replay from the log ---------------------------------------------------------
async def test_ended_runs_are_released_by_count() -> None:
    capture = OutputCapture(retain_ended_runs=2, retain_ended_seconds=None)
    for run_id in "abc":
        await capture.append_line(run_id, f"{run_id} output")
        await capture.close_run(run_id)
    assert capture.get_lines("a") == [] and capture.is_closed("a")
    assert capture.get_lines("b") == ["b output"] and capture.get_lines("c") == ["c output"]
    with pytest.raises(OutputNotFoundError, match="released"):
        capture.subscribe("a")
    with pytest.raises(OutputClosedError):
        await capture.append_line("a", "late")
    assert capture.open_run("a") is False
    capture.open_run("open")  # a live run is never released
    await capture.append_line("open", "still here")
    for run_id in "de":
        await capture.close_run(run_id)
    assert capture.get_lines("open") == ["still here"]


async def test_ended_runs_are_released_by_bytes_and_by_age() -> None:
    capture = OutputCapture(retain_ended_bytes=10, retain_ended_seconds=None)
    await capture.append_line("a", "123456")
    await capture.close_run("a")
    await capture.append_line("b", "123456")
    await capture.close_run("b")  # 12 bytes ended: a goes
    assert capture.get_lines("a") == [] and capture.get_lines("b") == ["123456"]

    aging = OutputCapture(retain_ended_seconds=0.05)
    await aging.append_line("r", "x")
    await aging.close_run("r")
    assert aging.get_lines("r") == ["x"]
    await asyncio.sleep(0.3)
    assert aging.get_lines("r") == [] and aging.is_closed("r")
    await aging.aclose()


async def test_a_released_run_is_replayed_from_its_log(tmp_path: Path) -> None:
    lines = [f"line {i} ü" for i in range(3000)]
    async with OutputCapture(max_lines_per_run=5, log_dir=tmp_path, retain_ended_runs=0) as capture:
        await capture.append_lines("r", lines)
        await capture.close_run("r", status="completed", exit_code=0)
        assert capture.get_lines("r") == []  # released at once
        sub = capture.subscribe("r")
        assert texts(await collect(sub)) == lines
        assert sub.end == OutputEnd("completed", 0)
        resumed = await collect(capture.subscribe("r", after=2994))
        assert resumed == [OutputLine(i, lines[i]) for i in range(2995, 3000)]
    # A new capture (say, after a restart) on the same directory replays it too.
    async with OutputCapture(log_dir=tmp_path) as later:
        chunks = [c async for c in later.subscribe("r", from_seq=1000).chunks(max_lines=700)]
        assert [len(c) for c in chunks] == [700, 700, 600]
        assert [text for c in chunks for text in c.lines] == lines[1000:]


async def test_a_subscriber_behind_the_ring_reads_the_log_instead_of_a_gap(
    tmp_path: Path,
) -> None:
    async with OutputCapture(max_lines_per_run=10, log_dir=tmp_path) as capture:
        capture.open_run("r")
        got: list[OutputItem] = []

        async def slow_reader() -> None:
            async for chunk in capture.subscribe("r").chunks(max_lines=100):
                got.extend(chunk.items() if isinstance(chunk, OutputChunk) else [chunk])
                await asyncio.sleep(0.01)  # far slower than the producer

        reader = asyncio.create_task(slow_reader())
        for i in range(5000):
            await capture.append_line("r", f"line {i}")
            if i % 500 == 0:
                await asyncio.sleep(0)
        await capture.close_run("r")
        await reader
    assert got == [OutputLine(i, f"line {i}") for i in range(5000)]


async def test_a_broken_log_falls_back_to_a_gap(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    async with OutputCapture(max_lines_per_run=3, log_dir=blocker) as capture:
        blocker.write_text("")  # a file where the directory was to be made (refused up front)
        capture.open_run("r")
        sub = capture.subscribe("r")
        for i in range(10):
            await capture.append_line("r", str(i))
        await capture.close_run("r")
        items = await collect(sub)
    assert items == [OutputGap(7), *[OutputLine(i, str(i)) for i in range(7, 10)]]
    assert "cannot write the output log" in caplog.text


@settings(max_examples=60, deadline=None)
@given(
    ring=st.integers(1, 8),
    steps=st.lists(st.tuples(st.integers(0, 12), st.integers(0, 12)), max_size=25),
)
def test_a_reader_sees_lines_in_order_and_a_gap_for_each_jump(
    ring: int, steps: list[tuple[int, int]]
) -> None:
    async def scenario() -> None:
        capture = OutputCapture(max_lines_per_run=ring)
        capture.open_run("r")
        sub = capture.subscribe("r")
        seen: list[OutputItem] = []
        produced = 0
        for write, read in steps:
            await capture.append_lines("r", [str(produced + k) for k in range(write)])
            produced += write
            for _ in range(read):
                if sub.next_seq >= produced:
                    break
                seen.append(await sub.__anext__())
        await capture.close_run("r")
        seen.extend(await collect(sub))
        expected_seq = 0
        for item in seen:
            if isinstance(item, OutputGap):
                assert item.dropped > 0
                expected_seq += item.dropped
            else:
                assert item == OutputLine(expected_seq, str(expected_seq))
                expected_seq += 1
        assert expected_seq == produced
        assert sub.dropped == sum(i.dropped for i in seen if isinstance(i, OutputGap))

    asyncio.run(scenario())


async def test_a_reader_behind_the_ring_waits_for_a_slow_log_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The writer thread has not even opened the file when the reader needs the evicted lines
    # (seen under CPU load): the reader must wait for it, not report a gap.
    opening = RunLogWriter._open

    def slow_open(self: RunLogWriter, run_id: str) -> BinaryIO:
        time.sleep(0.3)
        return opening(self, run_id)

    monkeypatch.setattr(RunLogWriter, "_open", slow_open)
    async with OutputCapture(max_lines_per_run=4, log_dir=tmp_path) as capture:
        capture.open_run("r")
        sub = capture.subscribe("r")
        await capture.append_line("r", "0")
        assert await sub.__anext__() == OutputLine(0, "0")
        for i in range(1, 100):
            await capture.append_line("r", str(i))
        reader = asyncio.create_task(collect(sub))  # needs 1..95 while the writer sleeps
        await asyncio.sleep(0.05)
        await capture.close_run("r")
        assert await reader == [OutputLine(i, str(i)) for i in range(1, 100)]


async def test_run_ids_must_be_non_empty_strings_even_without_a_log() -> None:
    capture = OutputCapture()
    for bad in ("", 7):
        with pytest.raises(InvalidRunIdError):
            await capture.append_line(bad, "x")  # type: ignore[arg-type]


def test_output_tail_bounds_lines_and_bytes() -> None:
    tail = OutputTail(3, max_bytes=10)
    tail.extend(["a", "b", "c", "d"])
    assert list(tail) == ["b", "c", "d"]
    tail.append("123456789")  # 9 + 1 + 1 > 10: older lines go
    assert list(tail) == ["d", "123456789"]
    tail.append("é" * 20)  # one line over the bound alone: cut, and it says so
    assert list(tail) == ["ééééé… [line truncated: 30 more bytes]"]
    assert len(tail) == 1
    nothing = OutputTail(0)
    nothing.extend(["x"])
    assert list(nothing) == []


@given(st.lists(st.text(alphabet="ab\r\n", max_size=6), max_size=8))
def test_clean_batches_match_line_by_line_cleaning(batch: list[str]) -> None:
    # _clean takes C-level shortcuts for batches without newlines and for batches whose every
    # line ends with "\n"; every batch must come out as cleaning each line alone would.
    assert _clean(list(batch)) == clean_one_by_one(batch)
    assert _clean([line + "\n" for line in batch]) == clean_one_by_one(
        [line + "\n" for line in batch]
    )


# A real write failure part-way through a batch: the file size limit (RLIMIT_FSIZE) makes the
# kernel write what fits and then fail with EFBIG, as a full disk does with ENOSPC. Process-wide,
# so it runs in a child of its own.
_FULL_DISK_SCRIPT = r"""
import asyncio, json, resource, signal, sys
from pathlib import Path
from prismq_subprocess import OutputCapture, OutputGap

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, resource.RLIM_INFINITY))
log_dir = Path(sys.argv[1])

def shape(items):
    return [["gap", i.dropped] if isinstance(i, OutputGap) else [i.seq, i.text] for i in items]

async def main():
    async with OutputCapture(max_lines_per_run=5, log_dir=log_dir, retain_ended_runs=0) as cap:
        for i in range(3000):
            await cap.append_line("r", f"line {i:05d}")
            if i % 100 == 0:
                await asyncio.sleep(0)
        await cap.close_run("r", status="completed", exit_code=0)
        replayed = shape([item async for item in cap.subscribe("r")])
    async with OutputCapture(log_dir=log_dir) as again:
        restarted = shape([item async for item in again.subscribe("r")])
    print(json.dumps({"replayed": replayed, "restarted": restarted}))

asyncio.run(main())
"""


@pytest.mark.skipif(os.name == "nt", reason="RLIMIT_FSIZE is POSIX")
def test_a_write_that_fails_part_way_leaves_no_half_line_and_replays_a_gap(
    tmp_path: Path,
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _FULL_DISK_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "cannot write the output log of run r" in done.stderr
    data = (tmp_path / "r.log").read_bytes()
    # Only whole lines stay in the file (the failed batch's bytes that fit were cut back).
    assert data.endswith(b"\n")
    kept = data.decode().splitlines()
    assert 0 < len(kept) < 3000
    assert kept == [f"line {i:05d}" for i in range(len(kept))]
    result = json.loads(done.stdout)
    # The capture knew 3000 lines: what never reached the file is a gap, not a silent end.
    assert result["replayed"] == [
        *([i, f"line {i:05d}"] for i in range(len(kept))),
        ["gap", 3000 - len(kept)],
    ]
    assert result["restarted"] == [[i, f"line {i:05d}"] for i in range(len(kept))]


async def test_a_log_error_that_is_not_an_oserror_is_contained_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A NUL in the path makes the writer thread's mkdir/open raise ValueError: it killed the
    # thread, and close_run() and aclose() then waited forever. (OutputCapture refuses such a
    # log_dir now; the writer is given one behind its back.)
    capture = OutputCapture(log_dir=tmp_path / "logs")
    assert capture._log is not None
    capture._log.log_dir = tmp_path / "bad\x00dir"
    await capture.append_line("r", "x")
    await capture.append_lines("r", ["y", "z"])
    async with asyncio.timeout(30):
        await capture.close_run("r")
        assert capture.get_lines("r") == ["x", "y", "z"]
        await capture.aclose()
    assert "cannot write the output log of run r" in caplog.text
    assert log_threads() == []


# -- review of the output fan-out (session 20) ----------------------------------------------------
async def test_a_log_read_longer_than_the_callers_timeouts_still_arrives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replay from the log file that takes longer than the timeout around each __anext__ (a
    heartbeat): the timed-out call's read goes on, and the next call takes its result. Each
    call used to start the read over in a new worker thread, so none ever finished (and the
    default executor filled up with them)."""
    import prismq_subprocess._background._output_subscription as subscription_module

    real = subscription_module.read_log_lines
    calls = 0

    def slow_read(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        time.sleep(0.5)  # a big file on a slow disk: longer than the caller waits
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(subscription_module, "read_log_lines", slow_read)
    async with OutputCapture(log_dir=tmp_path, retain_ended_runs=0) as capture:
        await capture.append_lines("r", [f"line {i}" for i in range(10)])
        await capture.close_run("r", status="completed")  # released: replayed from the log
        for make in (lambda s: s, lambda s: s.chunks(max_lines=3)):
            calls = 0
            sub = capture.subscribe("r", after=5)
            source = make(sub)
            got: list[object] = []
            async with asyncio.timeout(60):
                while True:
                    try:
                        async with asyncio.timeout(0.05):
                            got.append(await anext(source))
                    except TimeoutError:
                        continue
                    except StopAsyncIteration:
                        break
            lines = [
                x
                for item in got
                for x in (item.items() if isinstance(item, OutputChunk) else [item])
            ]
            assert lines == [OutputLine(i, f"line {i}") for i in range(6, 10)]
            assert calls <= 3  # one read per chunk (and the end), not one per timeout
            assert sub.end == OutputEnd("completed")


async def test_a_run_closed_during_append_lines_logs_only_the_lines_it_took(
    tmp_path: Path,
) -> None:
    """append_lines raises OutputClosedError for the lines left when the run was closed while
    it yielded to a subscriber: those lines are not the run's, in memory or in the log file
    (a replay from the file used to have them, live subscribers never did)."""
    async with OutputCapture(max_lines_per_run=10, log_dir=tmp_path) as capture:
        capture.open_run("r")
        reader = asyncio.create_task(collect(capture.subscribe("r")))
        await asyncio.sleep(0)

        # Runs at the producer's first yield to the reader, half a ring in.
        closer = asyncio.create_task(capture.close_run("r"))
        with pytest.raises(OutputClosedError, match="during the append"):
            await capture.append_lines("r", [f"line {i}" for i in range(100)])
        await closer  # the log file is complete
        live = texts(await reader)
        taken = capture.line_count("r")
        assert 0 < taken < 100 and live == [f"line {i}" for i in range(taken)]
        capture.forget("r")
        assert texts(await collect(capture.subscribe("r"))) == live  # from the file now
        assert capture.log_path("r").read_text().splitlines() == live  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda c: c.append_line("r", b"x\n"), "str"),
        (lambda c: c.append_line("r", 5), "str"),
        (lambda c: c.append_lines("r", "abc"), "not a str"),
        (lambda c: c.append_lines("r", [b"x"]), "str"),
        (lambda c: c.append_lines("r", ["ok", 5]), "str"),
        (lambda c: c.append_lines("r", 5), "iterable"),
    ],
)
async def test_lines_of_the_wrong_kind_get_our_error(call: Any, says: str) -> None:
    """A bytes line or a non-str is refused with InvalidArgumentTypeError (a TypeError), not a
    bare TypeError from inside, and a str passed as the lines of append_lines is refused rather
    than split into one line per character. Nothing is added."""
    async with OutputCapture() as capture:
        await capture.append_line("r", "before")
        with pytest.raises(InvalidArgumentTypeError, match=says):
            await call(capture)
        await capture.append_line("r", "after")
        assert capture.get_lines("r") == ["before", "after"]


@pytest.mark.parametrize("follower", [False, True])
async def test_a_list_the_producer_reuses_after_append_lines_is_logged_whole(
    tmp_path: Path, follower: bool
) -> None:
    """append_lines may be given the same list again and again, cleared in between (a read
    buffer): the log file gets every line. The writer thread used to read the caller's list
    when it got to it, by then empty, so the file had none of them, and a reader behind the
    ring waited forever for lines that would never be written."""
    # Batches of less than half a ring: each goes into the ring in one piece.
    async with OutputCapture(max_lines_per_run=200, log_dir=tmp_path) as capture:
        capture.open_run("r")
        # One that never reads while the lines come: it falls behind the ring.
        sub = capture.subscribe("r") if follower else None
        buffer: list[str] = []
        for i in range(1000):
            buffer.append(f"line {i}")
            if len(buffer) == 50:
                await capture.append_lines("r", buffer)
                buffer.clear()
        await capture.close_run("r")
        expected = [f"line {i}" for i in range(1000)]
        assert capture.log_path("r").read_text().splitlines() == expected  # type: ignore[union-attr]
        async with asyncio.timeout(30):
            got = await collect(sub or capture.subscribe("r"))
        assert got == [OutputLine(i, text) for i, text in enumerate(expected)]


@pytest.mark.parametrize("with_log", [False, True])
async def test_an_id_no_run_can_have_is_not_found_with_or_without_a_log_dir(
    tmp_path: Path, with_log: bool
) -> None:
    """A client-supplied id (the URL of an SSE endpoint) too long to name a log file, or empty,
    is a run this capture cannot have: OutputNotFoundError (a 404 in the documented endpoint),
    as without a log_dir, not InvalidRunIdError (a 500 there); waiting for it is pointless too.
    An id that is not a str at all is the caller's bug: InvalidRunIdError either way."""
    import prismq_subprocess as pq

    async with OutputCapture(log_dir=tmp_path if with_log else None) as capture:
        for run_id in ("x" * 300, ""):
            with pytest.raises(OutputNotFoundError, match="no output of run"):
                capture.subscribe(run_id)
            with pytest.raises(OutputNotFoundError, match="no output of run"):
                pq.sse_events(capture, run_id)
            if with_log or not run_id:  # without a log_dir, a long id is a run's like any other
                with pytest.raises(OutputNotFoundError, match="no output of run"):
                    capture.subscribe(run_id, wait=True)
        with pytest.raises(InvalidRunIdError, match="non-empty str"):
            capture.subscribe(5)  # type: ignore[arg-type]


@given(
    st.text(alphabet=st.sampled_from(["a", "é", "✓", "😀", "\udc80", "\ud800"]), max_size=60),
    st.integers(min_value=1, max_value=100),
)
def test_a_cut_line_keeps_a_prefix_of_itself_lone_surrogates_too(text: str, limit: int) -> None:
    """bound_line keeps the longest prefix of whole characters within the limit: a lone
    surrogate (text decoded with surrogateescape) is a character like any other. They were all
    dropped from the kept part (the "ignore" meant for the character split by the cut), so the
    kept text was not the line's start."""
    from prismq_subprocess._background._output_items import bound_line, utf8_size

    kept, cut = bound_line(text, limit)
    if utf8_size(text) <= limit:
        assert (kept, cut) == (text, 0)
        return
    prefix = kept.removesuffix(f"… [line truncated: {cut} more bytes]")
    assert text.startswith(prefix) and utf8_size(prefix) <= limit
    assert utf8_size(prefix) + cut == utf8_size(text)
    assert utf8_size(text[: len(prefix) + 1]) > limit  # no whole character more would fit


async def test_following_a_foreign_run_from_the_end_of_its_log_does_not_rescan_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another worker's run, resumed (``after=``, a browser's Last-Event-ID) at the end of a
    long log while the run is quiet: each poll read the whole file again from line 0 to skip
    to the cursor, as a read that found no new line did not keep the offset it skipped to
    (seen: 45% of a core for one such client of a 1,000,000-line log)."""
    import prismq_subprocess as pq
    import prismq_subprocess._background._output_subscription as subscription_module

    real = subscription_module.read_log_lines
    starts: list[tuple[int, int]] = []

    def recording_read(*args: Any, **kwargs: Any) -> Any:
        starts.append(kwargs["start"])
        return real(*args, **kwargs)

    monkeypatch.setattr(subscription_module, "read_log_lines", recording_read)
    script = tmp_path / "quiet.py"
    script.write_text(
        "import sys, time\n"
        "print('\\n'.join(f'line {i}' for i in range(3000)), flush=True)\n"
        "time.sleep(1.5)\n"
        "print('last', flush=True)\n"
    )
    async with (
        pq.RunRegistry() as registry,
        OutputCapture(log_dir=tmp_path / "logs") as owner_output,
        OutputCapture(log_dir=tmp_path / "logs") as other_output,
        pq.ModuleRunner(registry, output=owner_output) as runner,
    ):
        run_id = await runner.start_module("q", "Quiet", script)
        async with owner_output.subscribe(run_id) as sub:  # until the 3000 lines are in
            async for item in sub:
                if isinstance(item, OutputLine) and item.seq == 2999:
                    break
        await asyncio.sleep(0.2)  # and in the file
        sub = other_output.subscribe(run_id, after=2999, registry=registry, poll_interval=0.02)
        async with asyncio.timeout(60):
            got = [item async for item in sub]
    assert got == [OutputLine(3000, "last")]
    assert sub.end == OutputEnd("completed", 0)
    assert len(starts) > 10  # it polled while the run was quiet
    assert starts[0] == (0, 0)
    # Every later read starts where the last one ended (line 3000, then 3001), not at line 0.
    assert all(seq >= 3000 for seq, _ in starts[1:]), starts


@pytest.mark.parametrize(
    "how", ["OutputCapture.aclose", "async with OutputCapture", "RunLogWriter"]
)
def test_closed_in_a_cancelled_anyio_scope_the_logs_are_whole_and_the_thread_ended(
    how: str, tmp_path: Path
) -> None:
    """Closed in the ``finally`` of a cancelled anyio scope (or by leaving ``async with``) with
    many lines still queued for the writer thread: the close returns once every line is in its
    file and the thread has ended, as after asyncio's one-shot cancellation. Awaited directly,
    the writer's aclose() (and so the capture's) was cut short at its first await and returned
    with the thread still writing."""
    count = 200_000
    lines = [f"line {i}" for i in range(count)]
    seen: dict[str, object] = {}

    async def main() -> None:
        capture = OutputCapture(log_dir=tmp_path)
        writer = RunLogWriter(tmp_path)

        async def queue_lines() -> None:
            # Just before the close: the writer thread has all of them still to write when
            # aclose() begins. (Shielded: an append may yield to the loop, which the scope
            # would cut short.)
            with anyio.CancelScope(shield=True):
                if how == "RunLogWriter":
                    writer.write("run-1", lines)
                else:
                    await capture.append_lines("run-1", lines)

        with anyio.move_on_after(0.05):
            if how == "async with OutputCapture":
                async with capture:
                    try:
                        await anyio.sleep(30)
                    finally:
                        await queue_lines()
            else:
                try:
                    await anyio.sleep(30)
                finally:
                    await queue_lines()
                    await (writer if how == "RunLogWriter" else capture).aclose()
                    seen["returned"] = True
        seen["threads"] = log_threads()
        log = run_log_path(tmp_path, "run-1")
        seen["written"] = log.read_text().count("\n") if log.exists() else 0
        await capture.aclose()
        await writer.aclose()

    anyio.run(main, backend="asyncio")
    assert seen["threads"] == []
    assert seen["written"] == count
    if how != "async with OutputCapture":
        assert seen.get("returned") is True


@pytest.mark.parametrize(
    ("status", "exit_code"),
    [(object(), None), (3, None), ("completed", float("nan")), ("failed", "1"), (None, True)],
)
async def test_close_run_refuses_an_end_a_browser_could_not_read(
    status: Any, exit_code: Any
) -> None:
    # Found by an adversarial probe: close_run() took any status and exit code; the SSE stream
    # of the run then died at its end event, after the response had begun (a bare TypeError
    # from json.dumps: no end event, so the browser's EventSource reconnected for ever), or
    # sent `"exit_code":NaN`, which JSON.parse refuses. Refused at the call now, the run open.
    capture = OutputCapture()
    await capture.append_line("r", "hello")
    with pytest.raises(InvalidArgumentTypeError, match=r"status|exit_code"):
        await capture.close_run("r", status=status, exit_code=exit_code)
    assert not capture.is_closed("r")
    await capture.close_run("r", status=RunStatus.COMPLETED, exit_code=0)
    assert capture.is_closed("r")
    await capture.aclose()


_HUGE = 10**400  # an int no float can hold


@pytest.mark.parametrize(
    "call",
    [
        "subscribe(wait)",
        "subscribe(poll_interval)",
        "sse_events(heartbeat)",
        "sse_events(wait)",
        "PeriodicTask(jitter)",
        "MemoryMonitor",
        "ResourceManager",
    ],
)
async def test_an_int_too_large_for_a_float_is_refused_as_bad_input(call: str) -> None:
    # Found by an adversarial probe: each of these raised a bare OverflowError ("int too large
    # to convert to float") where any other bad number gets the library's own error.
    import prismq_subprocess as pq

    capture = OutputCapture()
    capture.open_run("r")
    attempts: dict[str, Any] = {
        "subscribe(wait)": lambda: capture.subscribe("r", wait=_HUGE),
        "subscribe(poll_interval)": lambda: capture.subscribe("r", poll_interval=_HUGE),
        "sse_events(heartbeat)": lambda: pq.sse_events(capture, "r", heartbeat=_HUGE),
        "sse_events(wait)": lambda: pq.sse_events(capture, "r", wait=_HUGE),
        "PeriodicTask(jitter)": lambda: pq.PeriodicTask("t", 1, print, jitter=_HUGE),
        "MemoryMonitor": lambda: pq.MemoryMonitor(_HUGE),
        "ResourceManager": lambda: pq.ResourceManager(_HUGE),
    }
    try:
        with pytest.raises(pq.exceptions.PrismQError):
            made = attempts[call]()
            if hasattr(made, "__anext__"):
                await made.__anext__()  # (a generator checks its arguments when first run)
    finally:
        await capture.aclose()


@pytest.mark.parametrize(
    "call",
    ["append_line", "open_run", "close_run", "get_lines", "tail", "is_closed", "forget"],
)
async def test_a_run_id_that_is_not_a_str_is_refused_everywhere(call: str) -> None:
    # Found by an adversarial probe: an unhashable id (a list) raised a bare TypeError from the
    # dict look-up that came before the check (None got InvalidRunIdError on some of these and
    # passed unseen on the others).
    capture = OutputCapture()
    await capture.append_line("r", "kept")
    calls: dict[str, Any] = {
        "append_line": lambda rid: capture.append_line(rid, "x"),
        "open_run": capture.open_run,
        "close_run": capture.close_run,
        "get_lines": capture.get_lines,
        "tail": lambda rid: capture.tail(rid, 5),
        "is_closed": capture.is_closed,
        "forget": capture.forget,
    }
    try:
        for bad in (["r"], None, 7):
            with pytest.raises(InvalidRunIdError):
                result = calls[call](bad)
                if asyncio.iscoroutine(result):
                    await result
        assert capture.get_lines("r") == ["kept"]
    finally:
        await capture.aclose()


@pytest.mark.parametrize(("max_lines", "max_bytes"), [(-1, 100), (None, 100), (5, -1), (True, 9)])
async def test_tail_refuses_limits_that_are_not_counts(max_lines: Any, max_bytes: Any) -> None:
    # tail("r", -1) raised IndexError ("pop from an empty deque"); tail("r", None) said [].
    capture = OutputCapture()
    await capture.append_line("r", "line")
    try:
        with pytest.raises(InvalidLimitError, match=r"max_lines|max_bytes"):
            capture.tail("r", max_lines, max_bytes)
    finally:
        await capture.aclose()
