"""The fast path of ``OutputCapture.append_line`` (a run nobody follows collects raw lines in a
pending batch, added to the ring in C passes): no reader can tell the batch is there."""

from __future__ import annotations

import asyncio
import inspect
import tempfile
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import clean_one_by_one
from hypothesis import given, settings
from hypothesis import strategies as st

from prismq_subprocess._background import _output_capture
from prismq_subprocess._background._output_capture import (
    OutputCapture,
    OutputGap,
    OutputItem,
    OutputLine,
    OutputSubscription,
)
from prismq_subprocess._background._output_items import bound_line
from prismq_subprocess._core._exceptions import InvalidRunIdError, OutputClosedError

TEXT = st.one_of(
    st.text(alphabet="ab\r\né", max_size=6),
    st.text(alphabet="ab\r\né", max_size=6).map(lambda text: text + "\n"),
    st.sampled_from(["x" * 40 + "\n", "é" * 30, "line\r\n"]),
)
LINE_OP = st.tuples(st.just("line"), TEXT)
# Appends weigh more than the rest: sequences of them fill, flush and interleave batches.
OP = st.one_of(
    LINE_OP,
    LINE_OP,
    LINE_OP,
    LINE_OP,
    st.tuples(st.just("lines"), st.lists(TEXT, max_size=5)),
    st.tuples(st.just("subscribe"), st.integers(0, 3)),
    st.tuples(st.just("read"), st.integers(0, 3), st.integers(1, 8)),
    st.tuples(st.just("unsubscribe"), st.integers(0, 3)),
    st.tuples(st.just("check"), st.integers(0, 6)),
    st.tuples(st.just("yield"), st.just(0)),
)


@dataclass
class Reader:
    subscription: OutputSubscription
    first: int
    items: list[OutputItem] = field(default_factory=list)


def check_items(reader: Reader, model: list[str], max_line_bytes: int, gaps: bool) -> None:
    """Items in seq order, each line the model's (cut as the ring cuts it); gaps only where
    allowed, and the whole model from ``first`` on accounted for."""
    seq = reader.first
    for item in reader.items:
        if isinstance(item, OutputGap):
            assert gaps and item.dropped > 0
            seq += item.dropped
            continue
        text, cut = bound_line(model[seq], max_line_bytes)
        assert item == OutputLine(seq, text, cut)
        seq += 1
    assert seq == max(reader.first, len(model))


@settings(max_examples=150, deadline=None)
@given(
    ops=st.lists(OP, min_size=1, max_size=60),
    max_lines=st.sampled_from([2, 5, 1000]),
    max_bytes=st.sampled_from([40, 1024 * 1024]),
    max_line_bytes=st.sampled_from([12, 64 * 1024]),
    batch_lines=st.sampled_from([1, 2, 3, 7, 256]),
    fast_chars=st.sampled_from([None, 0, 5, 100]),
    with_log=st.booleans(),
)
def test_batched_appends_lose_and_reorder_nothing(
    ops: list[tuple[Any, ...]],
    max_lines: int,
    max_bytes: int,
    max_line_bytes: int,
    batch_lines: int,
    fast_chars: int | None,
    with_log: bool,
) -> None:
    async def scenario(log_dir: Path | None) -> None:
        capture = OutputCapture(
            max_lines,
            max_bytes,
            max_line_bytes=max_line_bytes,
            log_dir=log_dir,
        )
        # Any line length on the fast path (and small batches, below), so that short scenarios
        # fill, flush and interleave batches (and cut lines inside a batch).
        if fast_chars is not None:
            capture._fast_chars = fast_chars
        capture.open_run("r")
        model: list[str] = []
        readers: dict[int, Reader] = {}
        for op in ops:
            kind, arg, *more = op
            if kind == "line":
                assert isinstance(arg, str)
                await capture.append_line("r", arg)
                model.extend(clean_one_by_one([arg]))
            elif kind == "lines":
                assert isinstance(arg, list)
                await capture.append_lines("r", arg)
                model.extend(clean_one_by_one(arg))
            elif kind == "subscribe":
                assert isinstance(arg, int)
                if arg not in readers:
                    first = min(arg, len(model))
                    readers[arg] = Reader(capture.subscribe("r", from_seq=first), first)
            elif kind == "read":
                reader = readers.get(arg)
                for _ in range(more[0] if reader is not None else 0):
                    assert reader is not None
                    if reader.subscription.next_seq >= len(model):
                        break  # caught up: the next read would wait
                    reader.items.append(await reader.subscription.__anext__())
            elif kind == "unsubscribe":
                gone = readers.pop(arg, None)
                if gone is not None:
                    await gone.subscription.aclose()
                    check_items(gone, model[: gone.subscription.next_seq], max_line_bytes, True)
            elif kind == "check":
                assert isinstance(arg, int)
                assert capture.line_count("r") == len(model)
                kept = capture.get_lines("r")
                dropped = capture.dropped_count("r")
                assert dropped + len(kept) == len(model)
                assert kept == [bound_line(text, max_line_bytes)[0] for text in model[dropped:]]
                assert len(kept) <= max_lines
                if len(kept) > 1:
                    assert sum(len(text.encode("utf-8", "surrogatepass")) for text in kept) <= (
                        max_bytes
                    )
                if arg:
                    expected = kept[-arg:] if len(kept) >= arg else kept
                    assert capture.tail("r", arg, max_bytes=10**6) == expected
            else:
                await asyncio.sleep(0)
        await capture.close_run("r")
        for reader in readers.values():
            reader.items.extend([item async for item in reader.subscription])
            # With a log file a reader behind the ring reads it there: no gap ever.
            check_items(reader, model, max_line_bytes, gaps=log_dir is None)
        late = Reader(capture.subscribe("r"), 0)
        late.items.extend([item async for item in late.subscription])
        check_items(late, model, max_line_bytes, gaps=log_dir is None)
        await capture.aclose()
        if log_dir is not None:
            path = capture.log_path("r")
            assert path is not None
            # The file has every line whole ("\r" inside a line kept: no newline translation).
            data = path.read_bytes().decode("utf-8") if path.exists() else ""
            assert data == "".join(text + "\n" for text in model)

    saved = _output_capture._BATCH_LINES
    _output_capture._BATCH_LINES = batch_lines
    try:
        if with_log:
            with tempfile.TemporaryDirectory() as tmp:
                asyncio.run(scenario(Path(tmp) / "logs"))
        else:
            asyncio.run(scenario(None))
    finally:
        _output_capture._BATCH_LINES = saved


def test_append_line_stays_a_coroutine_function() -> None:
    assert inspect.iscoroutinefunction(OutputCapture.append_line)
    assert inspect.iscoroutinefunction(OutputCapture().append_line)


async def test_lines_take_the_batch_and_reach_the_ring_within_one_loop_turn(
    tmp_path: Path,
) -> None:
    async with OutputCapture(log_dir=tmp_path) as capture:
        for i in range(10):
            await capture.append_line("r", f"line {i}\n")
        assert capture._pending == {"r": [f"line {i}\n" for i in range(10)]}
        assert capture._runs["r"].lines == []
        await asyncio.sleep(0)  # the flush scheduled with the batch runs
        assert capture._pending == {}
        ring = capture._runs["r"]
        assert ring.lines[ring.head :] == [f"line {i}" for i in range(10)]
        # ... and on its way to the log file, without a close or a read.
        log = capture._log
        assert log is not None
        state = log.state("r")
        assert state is not None
        async with asyncio.timeout(10):
            await log.wait_flushed("r", state, 10)
        path = capture.log_path("r")
        assert path is not None
        assert path.read_text(encoding="utf-8") == "".join(f"line {i}\n" for i in range(10))


async def test_a_full_batch_is_added_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_output_capture, "_BATCH_LINES", 4)
    capture = OutputCapture()
    for i in range(9):
        await capture.append_line("r", str(i))
    ring = capture._runs["r"]
    assert ring.lines == [str(i) for i in range(8)]  # two full batches, no read, no yield
    assert capture._pending == {"r": ["8"]}
    assert capture.line_count("r") == 9 and capture._pending == {}


async def test_a_subscriber_turns_the_batch_off_and_sees_every_line() -> None:
    capture = OutputCapture()
    reader = capture.subscribe("r", wait=True)
    got: list[OutputItem] = []

    async def follow() -> None:
        async for item in reader:
            got.append(item)

    task = asyncio.create_task(follow())
    await asyncio.sleep(0)
    for i in range(5):
        await capture.append_line("r", f"{i}\n")  # batched: the reader is not attached yet
    await asyncio.sleep(0)  # the reader attaches (flushing the batch) and reads
    await asyncio.sleep(0)
    assert [item.seq for item in got if isinstance(item, OutputLine)] == [0, 1, 2, 3, 4]
    await capture.append_line("r", "live")  # followed now: straight into the ring
    assert capture._pending == {}
    assert capture._runs["r"].lines[-1] == "live"
    await capture.close_run("r")
    await task
    assert got == [*(OutputLine(i, str(i)) for i in range(5)), OutputLine(5, "live")]
    # Once nobody follows it again, appends batch again (until the run is closed).
    await capture.append_line("s", "before")
    assert capture._pending == {"s": ["before"]}
    async with capture.subscribe("s") as follower:
        assert capture._pending == {}  # subscribing added the batch to the ring
        await capture.append_line("s", "a")
        assert capture._pending == {}
        assert [await follower.__anext__() for _ in range(2)] == [
            OutputLine(0, "before"),
            OutputLine(1, "a"),
        ]
    await capture.append_line("s", "b")
    assert capture._pending == {"s": ["b"]}
    assert capture.get_lines("s") == ["before", "a", "b"]


async def test_call_time_errors_with_a_batch_pending(tmp_path: Path) -> None:
    capture = OutputCapture()
    await capture.append_line("r", "kept 1")
    await capture.append_line("r", "kept 2")
    assert capture._pending
    for bad in (b"bytes", 7, None):
        with pytest.raises(TypeError):
            await capture.append_line("r", bad)  # type: ignore[arg-type]
    with pytest.raises((TypeError, AttributeError)):
        await capture.append_line("r", ["a list"])  # type: ignore[arg-type]
    assert capture.get_lines("r")[:2] == ["kept 1", "kept 2"]
    await capture.append_line("r", "kept 3")
    await capture.close_run("r")
    with pytest.raises(OutputClosedError):
        await capture.append_line("r", "late")
    assert capture.get_lines("r")[-1] == "kept 3"
    for bad_id in ("", 7):
        with pytest.raises(InvalidRunIdError):
            await capture.append_line(bad_id, "x")  # type: ignore[arg-type]
    await capture.aclose()
    with pytest.raises(OutputClosedError):
        await capture.append_line("new", "x")
    async with OutputCapture(log_dir=tmp_path) as logged:
        with pytest.raises(InvalidRunIdError):
            await logged.append_line("x" * 300, "x")


async def test_forget_and_aclose_add_the_batch_first(tmp_path: Path) -> None:
    async with OutputCapture(log_dir=tmp_path) as capture:
        await capture.append_line("gone", "to the log")
        await capture.append_line("open", "at close")
        capture.forget("gone")
        assert "gone" not in capture._pending
    assert capture.get_lines("open") == ["at close"]
    assert capture._pending == {}
    for run_id, text in (("gone", "to the log"), ("open", "at close")):
        path = capture.log_path(run_id)
        assert path is not None and path.read_text(encoding="utf-8") == text + "\n"


async def test_long_lines_skip_the_batch_so_memory_stays_bounded() -> None:
    capture = OutputCapture(max_bytes_per_run=1024 * 1024)
    huge = "x" * (5 * 1024 * 1024)
    tracemalloc.start()
    try:
        for i in range(20):
            await capture.append_line("r", f"{i}{huge}")
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert held < 4 * 1024 * 1024  # each line was cut and the older ones evicted at once
    assert capture._pending == {}
    # Lines at the limit take the batch; a full batch is at most a quarter of the byte bound.
    limit = capture._fast_chars
    assert limit == 1024 * 1024 // 1024
    for _ in range(_output_capture._BATCH_LINES - 1):
        await capture.append_line("r", "y" * limit)
    pending = capture._pending["r"]
    assert sum(map(len, pending)) <= capture.max_bytes_per_run // 4
    await capture.append_line("r", "z" * (limit + 1))  # too long: the batch goes first
    assert capture._pending == {}
    assert capture.get_lines("r")[-2:] == ["y" * limit, "z" * (limit + 1)]


@pytest.mark.parametrize("followed", [False, True])
async def test_a_line_ending_in_two_newlines_is_two_lines(followed: bool) -> None:
    # Before: the full path stripped one "\n", then cleaned "x\n" again and lost the empty line.
    capture = OutputCapture()
    capture.open_run("r")
    follower = capture.subscribe("r") if followed else None
    await capture.append_line("r", "x\n\n")
    await capture.append_line("r", "\r\n\r\n")
    assert capture.get_lines("r") == ["x", "", "", ""]
    if follower is not None:
        await follower.aclose()


async def test_a_log_write_failing_in_the_loops_flush_loses_no_line_and_is_reported(
    tmp_path: Path,
) -> None:
    # The end-of-iteration flush runs in a loop callback, where nobody awaits: the batch's
    # lines must still reach the ring, the error the run's next call, and the other runs'
    # batches their log files.
    capture = OutputCapture(log_dir=tmp_path)
    assert capture._log is not None
    written: list[tuple[str, list[str]]] = []
    real_write = capture._log.write

    def write(run_id: str, lines: list[str]) -> None:
        if run_id == "a" and not any(r == "a" for r, _ in written):
            written.append((run_id, []))
            raise RuntimeError("can't start new thread")
        written.append((run_id, list(lines)))
        real_write(run_id, lines)

    capture._log.write = write  # type: ignore[method-assign]
    await capture.append_line("a", "a1\n")
    await capture.append_line("a", "a2\n")
    await capture.append_line("b", "b1\n")
    await asyncio.sleep(0)  # the loop runs the flush
    await asyncio.sleep(0)
    assert capture.get_lines("a") == ["a1", "a2"]
    assert ("b", ["b1"]) in written
    with pytest.raises(RuntimeError, match="new thread"):
        await capture.append_line("a", "a3\n")
    await capture.append_line("a", "a4\n")  # reported once
    await capture.close_run("a")
    await capture.close_run("b")
    await capture.aclose()
    assert capture.get_lines("a") == ["a1", "a2", "a4"]


def test_append_line_driven_without_a_loop_still_completes() -> None:
    # A coroutine driven by hand (no running loop) cannot have a batch flushed for it: its
    # line takes the full path, as before the fast path existed.
    capture = OutputCapture()
    for text in ("one\n", "two"):
        coro = capture.append_line("r", text)
        with pytest.raises(StopIteration):
            coro.send(None)
    assert capture.get_lines("r") == ["one", "two"]
    assert capture._pending == {}


async def test_next_seq_after_aclose_is_the_first_line_not_yielded(tmp_path: Path) -> None:
    """A subscriber behind the ring reads the log file a chunk at a time and yields its lines
    one by one; closed after the first, its ``next_seq`` (the documented resume point) is the
    second, not the end of the chunk it had fetched (found by the property test above, seed 1:
    resuming from there lost a line)."""
    capture = OutputCapture(2, 40, max_line_bytes=12, log_dir=tmp_path / "logs")
    capture.open_run("r")
    await capture.append_lines("r", ["a", "b"])
    subscription = capture.subscribe("r", from_seq=0)
    await capture.append_lines("r", ["c", "d"])  # "a" and "b" leave the ring: read from the log
    assert await subscription.__anext__() == OutputLine(0, "a", 0)
    assert subscription.next_seq == 1
    await subscription.aclose()
    assert subscription.next_seq == 1
    resumed = capture.subscribe("r", from_seq=subscription.next_seq)
    await capture.close_run("r")
    assert [item async for item in resumed] == [
        OutputLine(1, "b", 0),
        OutputLine(2, "c", 0),
        OutputLine(3, "d", 0),
    ]
    await capture.aclose()
