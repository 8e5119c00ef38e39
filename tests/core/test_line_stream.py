"""LineStream (``_core/_line_stream.py``): a stream owns one child, once."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import skip_if_async_on_uvloop
from helpers import py

import prismq_subprocess as pq

SLEEPER = "import time; print('ready', flush=True); time.sleep(30)"


async def test_a_stream_cannot_be_entered_again(any_wrapper: pq.SubprocessWrapper) -> None:
    # Entering a used stream again started a second child that leaving the block did not stop:
    # it ran until the wrapper closed (the stream thought itself closed already).
    stream = any_wrapper.stream(*py(SLEEPER))
    async with stream:
        first = stream.process
    assert first.returncode is not None
    with pytest.raises(pq.exceptions.ClosedError):
        async with stream:
            pass
    assert any_wrapper.live_processes == []


async def test_a_stream_open_cannot_be_entered_twice(any_wrapper: pq.SubprocessWrapper) -> None:
    # A nested entry replaced the stream's child by a second one: the first was never stopped.
    stream = any_wrapper.stream(*py(SLEEPER))
    async with stream:
        first = stream.process
        with pytest.raises(pq.exceptions.ClosedError):
            await stream.__aenter__()
        assert stream.process is first
    assert first.returncode is not None
    assert any_wrapper.live_processes == []


async def test_a_stream_closed_before_use_starts_nothing(any_wrapper: pq.SubprocessWrapper) -> None:
    stream = any_wrapper.stream(*py(SLEEPER))
    await stream.aclose()
    with pytest.raises(pq.exceptions.ClosedError):
        async with stream:
            pass
    assert any_wrapper.live_processes == []


# Writes 200 KB to stderr (more than a pipe holds) ending with a marker, one line to stdout, and
# exits 3: at the exit, the end of stderr is still in the pipe.
LOUD_STDERR = (
    "import sys\n"
    "sys.stderr.write(('x' * 99 + '\\n') * 2000 + 'END\\n')\n"
    "sys.stderr.flush()\n"
    "print('out', flush=True)\n"
    "sys.exit(3)\n"
)


async def test_inside_the_block_wait_gives_the_status_and_the_whole_stderr(
    wrapper: pq.SubprocessWrapper,
) -> None:
    # A new user's walkthrough: inside the block, after reading every line, returncode was
    # sometimes None and stderr empty or short; both were right only after the block. wait()
    # now returns once the status is known and stderr has been read to its end.
    for _ in range(3):
        async with wrapper.stream(*py(LOUD_STDERR), merge_stderr=False) as lines:
            assert [line async for line in lines] == [b"out\n"]
            assert await lines.wait() == 3
            assert lines.returncode == 3
            assert lines.stderr.endswith(b"END\n")
        assert lines.stderr.endswith(b"END\n")


@pytest.mark.parametrize("reads", [False, True], ids=["lines-unread", "lines-read"])
async def test_the_stream_timeout_holds_for_wait(
    wrapper: pq.SubprocessWrapper, reads: bool
) -> None:
    # A probe's find: wait() ignored the stream's timeout (a child sleeping 4 s under
    # timeout=1 returned 0 after 4 s), and with lines left unread a child filling its pipe
    # waited for ever (ASYNC, THREADED). Now wait() stops the tree at the deadline.
    code = "import time; [print(i) for i in range(100000)]; time.sleep(30)"
    started = time.monotonic()
    with pytest.raises(pq.ProcessTimeoutError):
        async with asyncio.timeout(30), wrapper.stream(*py(code), timeout=1.0) as lines:
            if reads:
                async for _ in lines.iter_batches():
                    break
            await lines.wait()  # (without the fix: for ever, then the 30 s TimeoutError)
    assert time.monotonic() - started < 15
    assert wrapper.live_processes == []


@pytest.mark.parametrize("closes_its_output", [False, True])
async def test_a_stream_cut_by_its_timeout_still_delivers_what_the_child_printed(
    wrapper: pq.SubprocessWrapper, closes_its_output: bool
) -> None:
    # A probe's find (session 35): in LOCAL, whose output is handed over once the child has
    # ended, stream(timeout=1) of a child that printed 50 lines and slept delivered none of them
    # (run(timeout=1) keeps them in the error's stdout); nor did a child that closed its output
    # and slept on. Now the lines printed before the stop come, then ProcessTimeoutError.
    close = "import os; os.close(1); os.close(2); " if closes_its_output else ""
    code = (
        "for i in range(50): print(i)\n"
        f"import sys; sys.stdout.flush(); {close}import time; time.sleep(30)"
    )
    got: list[str] = []
    timed_out: pq.ProcessTimeoutError | None = None
    started = time.monotonic()
    try:
        async with wrapper.stream(*py(code), timeout=1.5, encoding="utf-8") as lines:
            async for line in lines:
                got.append(line)
    except pq.ProcessTimeoutError as exc:
        timed_out = exc
    assert got == [f"{i}\n" for i in range(50)]
    # (Where output streams, a closed stdout ends the lines before the deadline.)
    if not closes_its_output or wrapper.mode is pq.RunMode.LOCAL:
        assert timed_out is not None and timed_out.timeout == 1.5
    assert time.monotonic() - started < 15
    assert wrapper.live_processes == []


async def test_a_consumer_cancelled_while_a_timed_stream_waits_leaves_nothing_behind(
    wrapper: pq.SubprocessWrapper,
) -> None:
    # With a deadline the read of the next batch runs as a task of its own: a cancelled
    # consumer must end it (and the lines' generator) with the block, not leave it pending.
    got: list[bytes] = []

    async def consume() -> None:
        async with wrapper.stream(*py(SLEEPER), timeout=30) as lines:
            async for line in lines:
                got.append(line)

    task = asyncio.ensure_future(consume())
    local = wrapper.mode is pq.RunMode.LOCAL  # (it hands lines over at the end)
    for _ in range(300):
        if got or task.done() or (local and wrapper.live_processes):
            break
        await asyncio.sleep(0.05)
    assert local or got == [b"ready\n"]
    await asyncio.sleep(0.1)  # the consumer waits for the next batch
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert wrapper.live_processes == []
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task() and not t.done()]


async def test_iterating_after_the_block_is_a_clear_error(
    any_wrapper: pq.SubprocessWrapper,
) -> None:
    # It ended at once with no lines (a probe, session 35), even after a break that dropped
    # lines never read: that passed for the end of the output.
    async with any_wrapper.stream(*py("for i in range(1000): print(i)")) as lines:
        async for _ in lines:
            break
    with pytest.raises(pq.exceptions.StreamNotOpenError, match="async with"):
        async for _ in lines:
            pass
    with pytest.raises(pq.exceptions.StreamNotOpenError):
        await anext(lines.iter_batches())


async def test_a_second_reader_of_one_stream_is_a_clear_error(
    streaming_wrapper: pq.SubprocessWrapper,
) -> None:
    # A bare "anext(): asynchronous generator is already running" (a probe, session 35).
    for timeout in (None, 30.0):
        async with streaming_wrapper.stream(*py(SLEEPER), timeout=timeout) as lines:
            first = asyncio.ensure_future(anext(lines))
            assert await first == b"ready\n"
            reading = asyncio.ensure_future(anext(lines))  # waits: the child prints no more
            await asyncio.sleep(0.1)
            with pytest.raises(pq.exceptions.StreamBusyError, match="another task") as info:
                await anext(lines)
            assert isinstance(info.value, RuntimeError)
            with pytest.raises(pq.exceptions.StreamBusyError):
                await anext(lines.iter_batches())
            reading.cancel()
            with pytest.raises(asyncio.CancelledError):
                await reading
        assert streaming_wrapper.live_processes == []


async def test_iterating_outside_the_block_is_a_clear_error(
    any_wrapper: pq.SubprocessWrapper,
) -> None:
    stream = any_wrapper.stream(*py(SLEEPER))
    for use in (stream.__anext__(), stream.wait()):
        with pytest.raises(pq.exceptions.StreamNotOpenError, match="async with") as info:
            await use
        assert isinstance(info.value, pq.PrismQError)
        assert isinstance(info.value, RuntimeError)
    with pytest.raises(pq.exceptions.StreamNotOpenError):
        stream.process  # noqa: B018
    assert any_wrapper.live_processes == []


async def test_the_timeout_counts_the_wait_for_a_worker() -> None:
    # An adversary's find: with every worker busy, run(timeout=0.5) timed out after 0.5 s,
    # but stream(timeout=0.5) waited for a free worker as long as it took (3.3 s), then ran the
    # command to its end: "timeout= covers the whole stream" did not count the queue.
    # (LOCAL runs each child in a worker thread of its own, from spawn to exit.)
    async with pq.SubprocessWrapper("local", max_workers=1) as wrapper:
        busy = asyncio.ensure_future(wrapper.run(*py("import time; time.sleep(3)")))
        await asyncio.sleep(0.3)
        started = asyncio.get_running_loop().time()
        with pytest.raises(pq.ProcessTimeoutError) as info:
            async with wrapper.stream(*py("print('x')"), timeout=0.5) as lines:
                [line async for line in lines]
        took = asyncio.get_running_loop().time() - started
        assert took < 2.0, f"the stream's timeout waited {took:.1f} s for a worker"
        assert info.value.timeout == 0.5
        await busy
        assert wrapper.live_processes == []


# Prints its lines, closes its output (as GNU seq does at exit, or any program that flushes and
# closes its stdout before its clean-up), then exits 0 a moment later.
CLOSES_OUTPUT_FIRST = (
    "import os, sys, time\n"
    "print('a'); print('b')\n"
    "sys.stdout.flush(); os.close(1); os.close(2)\n"
    "time.sleep(0.05)\n"
    "sys.exit(0)\n"
)


async def test_a_child_that_closes_its_output_before_it_exits_keeps_its_status(
    wrapper: pq.SubprocessWrapper,
) -> None:
    # A soak probe's find: leaving the block right after the lines ended stopped the child at
    # once; one that closes its output a moment before it exits got SIGTERM in that gap, and a
    # command that completed reported -15 (its clean-up cut short). Every line had arrived.
    for _ in range(3):
        async with wrapper.stream(*py(CLOSES_OUTPUT_FIRST), encoding="utf-8") as lines:
            got = [line async for line in lines]
        assert got == ["a\n", "b\n"]
        assert lines.returncode == 0


async def test_leaving_after_the_end_of_the_lines_still_stops_a_child_that_stays(
    wrapper: pq.SubprocessWrapper,
) -> None:
    # The wait for a child that closed its output is bounded (the drain's time): one that goes
    # on running is stopped, as before.
    if wrapper.mode is pq.RunMode.LOCAL:
        pytest.skip("LOCAL hands the lines over once the child has exited")
    skip_if_async_on_uvloop(
        wrapper, "its pipes to a child give no end of file until the child exits (RUN_MODES.md)"
    )
    stays = "import os, time\nprint('a', flush=True)\nos.close(1); os.close(2)\ntime.sleep(30)\n"
    started = time.monotonic()
    async with wrapper.stream(*py(stays), encoding="utf-8") as lines:
        assert [line async for line in lines] == ["a\n"]
    assert lines.returncode is not None and lines.returncode != 0
    assert time.monotonic() - started < 10
    assert wrapper.live_processes == []
