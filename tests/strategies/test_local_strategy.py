"""LocalStrategy's one-job fast path (spawn, drain, reap in one worker call)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import subprocess
import sys
import threading
import time
import weakref
from typing import Any

import psutil
import pytest
from helpers import py

import prismq_subprocess as pq
from prismq_subprocess._core._result import TailBuffer
from prismq_subprocess._platform import platform_ops
from prismq_subprocess._strategies import _local
from prismq_subprocess._strategies._base import SpawnRequest
from prismq_subprocess._strategies._local import LocalStrategy


async def test_a_discarded_run_still_reports_its_childs_exit() -> None:
    """Discarding a run cancels its reader (the worker's job); the process must still learn of
    the exit, or a tree stop waiting for it (the wrapper closing while the run was starting)
    waits for ever. Found by CI: aclose() hung on a LOCAL run() it interrupted."""
    strategy = LocalStrategy()
    try:
        run = await strategy._start_run(
            SpawnRequest(command=py("import time; time.sleep(60)"), shell=False),
            input=None,
            out=TailBuffer(None),
            err=TailBuffer(None),
            grace=1.0,
        )
        run.discard()
        async with asyncio.timeout(10):
            returncode = await run.process.wait()
        assert returncode != 0
        assert run.process.returncode == returncode
    finally:
        strategy.close()


async def test_a_failed_drain_still_reaps_the_child_and_reports_its_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker thread moving a raw process's pipes can fail (a MemoryError while a child
    like ``yes`` fills an unbounded buffer). ``wait()`` then waited for ever and the child was
    left a zombie: ``prismq-subprocess run --mode local`` never ended, even on SIGTERM. The
    child must still be reaped and its exit reported; the output, now incomplete, raises."""

    def failing_drain(popen: Any, input: Any, out: Any, err: Any, watch: Any = None) -> None:
        assert popen.stdout is not None
        popen.stdout.read(1024)
        raise MemoryError("injected")

    monkeypatch.setattr(_local, "drain_blocking", failing_drain)
    async with pq.SubprocessWrapper(pq.RunMode.LOCAL) as wrapper:
        process = await wrapper.create_subprocess_exec(
            *py("import sys\nwhile True: sys.stdout.write('y' * 4096)"),
            stdout=pq.PIPE,
            stderr=pq.PIPE,
        )
        async with asyncio.timeout(30):
            returncode = await process.wait()
        assert returncode != 0
        with pytest.raises(MemoryError, match="injected"):
            await process.stdout.read()
        assert not psutil.pid_exists(process.pid) or (
            psutil.Process(process.pid).status() != psutil.STATUS_ZOMBIE
        )


async def test_a_failed_drain_fails_the_run_and_reaps_its_child(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same failure in ``run()``'s one-job path: the run raised nothing and never ended
    (its tree stop waited for an exit nobody reported), even under a timeout."""

    def failing_drain(popen: Any, input: Any, out: Any, err: Any, watch: Any = None) -> None:
        assert popen.stdout is not None
        popen.stdout.read(1024)
        raise MemoryError("injected")

    monkeypatch.setattr(_local, "drain_blocking", failing_drain)
    before = {child.pid for child in psutil.Process().children()}
    async with pq.SubprocessWrapper(pq.RunMode.LOCAL) as wrapper:
        async with asyncio.timeout(30):
            with pytest.raises(MemoryError, match="injected"):
                await wrapper.run(*py("import sys\nwhile True: sys.stdout.write('y' * 4096)"))
        # Reaped by the worker before the run failed: no new child, not even a zombie.
        assert {child.pid for child in psutil.Process().children()} <= before


# --- review: this session's own changes (session 21) ----------------------------------------


async def test_a_run_cancelled_while_its_spawn_fails_leaves_no_unretrieved_error() -> None:
    # The caller gave up while the worker was starting the child, and the start then failed
    # (here: no such command): nobody awaits the worker's job any more, and its error was
    # logged at collection as "Future exception was never retrieved".
    seen: list[str] = []
    asyncio.get_running_loop().set_exception_handler(
        lambda loop, context: seen.append(str(context.get("message")))
    )
    ops = platform_ops(sys.platform)
    real_prepare = ops.prepare_spawn

    def slow_prepare(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.5)  # the cancellation lands while the worker is in here
        return real_prepare(*args, **kwargs)

    ops.prepare_spawn = slow_prepare  # type: ignore[method-assign]
    async with pq.SubprocessWrapper("local", ops=ops) as wrapper:
        task = asyncio.ensure_future(wrapper.run("/nonexistent/prismq-command"))
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(1.0)  # the worker fails meanwhile
        gc.collect()
        await asyncio.sleep(0.1)
    assert seen == []


# A child that leaves a process holding its stdout and exits at once. "tree": the leftover is
# in the child's tree (the drain rule's tree stop ends it); "outside": in a session of its own,
# out of the tree's reach (the run lets go of the pipes). Its pid goes to a file, for clean-up.
_LEAVES_A_HOLDER = """
import pathlib, subprocess, sys
holder = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session={outside}
)
pathlib.Path({pid_file!r}).write_text(str(holder.pid))
print("done", flush=True)
"""


@pytest.mark.parametrize("route", ["select", "threads"])
@pytest.mark.parametrize("holder", ["tree", "outside"])
async def test_a_leftover_holding_the_pipes_does_not_hold_the_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any, route: str, holder: str
) -> None:
    """LOCAL drains in one blocking call. Where pipes cannot be select()ed (Windows; "threads",
    forced here) it read them with a thread each and never looked at its watch: the child's
    exit went unreported while a leftover held the pipes, so the drain rule never started and
    ``run()`` waited for as long as the leftover lived (forever for a daemon); letting go of
    the pipes was ignored too. It now behaves as the select() route."""
    from prismq_subprocess._io import _blocking_io

    if route == "threads":
        monkeypatch.setattr(_blocking_io, "PIPES_SELECTABLE", False)
    pid_file = tmp_path / "holder.pid"
    code = _LEAVES_A_HOLDER.format(outside=holder == "outside", pid_file=str(pid_file))
    try:
        async with pq.SubprocessWrapper(mode="local", grace_period=1.0) as w:
            async with asyncio.timeout(60):
                result = await w.run(*py(code))
            assert (result.returncode, result.stdout) == (0, b"done\n")
            if holder == "tree":  # stopped by the drain rule
                psutil.Process(int(pid_file.read_text())).wait(timeout=30)
    finally:
        if pid_file.exists():
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(int(pid_file.read_text())).kill()


# --- memory of a raw LOCAL process's output (soak finding 2) -----------------------------------

#: A chatty child's output: far more than the bound below, printed in 1 KiB lines.
CHATTY_BYTES = 64 * 2**20
CHATTY = py(
    "import sys\n"
    "line = b'x' * 1023 + b'\\n'\n"
    f"block = line * 256\n"
    f"for _ in range({CHATTY_BYTES} // len(block)):\n"
    "    sys.stdout.buffer.write(block)\n"
)
#: The most host memory the output may take at any moment: a small part of CHATTY_BYTES.
MEMORY_BOUND = 8 * 2**20


async def test_a_raw_local_process_holds_a_bounded_part_of_its_output_in_memory() -> None:
    """LOCAL hands output over only once the child has exited, so it must keep it until then:
    it held all of it in memory (a 64 MiB output cost 64 MiB), then copied it all into the
    reader at the exit (twice that). Past a bound it goes to a temporary file instead, and the
    reader gets it a piece at a time as it reads; every byte still arrives, in order."""
    import tracemalloc

    tracemalloc.start()
    try:
        async with pq.SubprocessWrapper(pq.RunMode.LOCAL) as wrapper:
            process = await wrapper.create_subprocess_exec(*CHATTY, stdout=asyncio.subprocess.PIPE)
            assert process.stdout is not None
            tracemalloc.reset_peak()
            lines = 0
            received = 0
            while chunk := await process.stdout.read(2**20):
                received += len(chunk)
                lines += chunk.count(b"\n")
            del chunk
            _, peak = tracemalloc.get_traced_memory()
            assert await process.wait() == 0
    finally:
        tracemalloc.stop()
    assert received == CHATTY_BYTES
    assert lines == CHATTY_BYTES // 1024
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.1f} MiB for {CHATTY_BYTES / 2**20:.0f} MiB"


async def test_a_raw_local_process_still_gives_its_whole_output_to_readline_and_read() -> None:
    """Handed over a piece at a time, the output reads as before: readline() across the pieces,
    then read() takes the rest at once."""
    async with pq.SubprocessWrapper(pq.RunMode.LOCAL) as wrapper:
        process = await wrapper.create_subprocess_exec(*CHATTY, stdout=asyncio.subprocess.PIPE)
        assert process.stdout is not None
        first = await process.stdout.readline()
        assert first == b"x" * 1023 + b"\n"
        rest = await process.stdout.read()
        assert len(first) + len(rest) == CHATTY_BYTES
        assert process.stdout.at_eof()
        assert await process.wait() == 0


@pytest.mark.parametrize("size", [500_000, 3 * 2**20], ids=["in-memory", "spilled"])
async def test_readexactly_of_more_than_twice_the_limit_gets_its_bytes(size: int) -> None:
    # A review's find: the handover fed the reader as soon as it asked to resume, before the
    # reader had made its waiter; it paused again at twice its limit and nothing ever woke it:
    # readexactly(400_000) with the default 64 KiB limit hung for good (THREADED had the same
    # trap, fixed in _io/_pipes.py).
    script = f"import sys; sys.stdout.buffer.write(bytes(range(256)) * ({size} // 256))"
    async with pq.SubprocessWrapper(pq.RunMode.LOCAL) as wrapper:
        process = await wrapper.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        first = await asyncio.wait_for(process.stdout.readexactly(400_000), 30)
        rest = await asyncio.wait_for(process.stdout.read(), 30)
        assert first + rest == bytes(range(256)) * (size // 256)
        assert await process.wait() == 0


async def test_a_spilled_output_is_read_whole_after_the_default_executor_is_shut_down() -> None:
    # A review's find: the file's pieces are read back in the loop's default executor; once
    # that was shut down (asyncio.run's end, a host's own shutdown) the read raised a bare
    # RuntimeError and lost the piece already taken, or hung. Read on the loop's thread then.
    loop = asyncio.get_running_loop()
    expected = bytes(range(256)) * (3 * 2**12)
    script = "import sys; sys.stdout.buffer.write(bytes(range(256)) * (3 * 2**12))"
    async with pq.SubprocessWrapper(pq.RunMode.LOCAL) as wrapper:
        process = await wrapper.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        got = bytearray(await process.stdout.read(100))
        await loop.shutdown_default_executor()
        while chunk := await asyncio.wait_for(process.stdout.read(65536), 30):
            got += chunk
        assert bytes(got) == expected
        assert await process.wait() == 0


@pytest.mark.parametrize("size", [1000, 3 * 2**20], ids=["in-memory", "spilled"])
async def test_an_output_read_to_its_end_leaves_no_cycle_for_the_collector(size: int) -> None:
    # The handover and its reader referred to each other (the reader's transport, the
    # handover's reader): every LOCAL output read to its end was freed only by a full
    # collection, the work that stalled the loop at scale (PERFORMANCE.md, THREADED close).
    script = f"import sys; sys.stdout.buffer.write(b'x' * {size})"
    async with pq.SubprocessWrapper(pq.RunMode.LOCAL) as wrapper:
        process = await wrapper.create_subprocess_exec(
            sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE
        )
        assert process.stdout is not None
        assert len(await process.stdout.read()) == size
        assert await process.wait() == 0
    # The worker thread reports the exit a moment before it returns (its frame still holds the
    # process): on a loaded machine it may not have returned yet.
    for thread in threading.enumerate():
        if thread.name == f"prismq-local-{process.pid}":
            thread.join(10)
    handover = process.stdout._handover  # type: ignore[attr-defined]
    assert handover is not None
    gone = weakref.ref(handover)
    del handover
    gc.disable()
    try:
        del process  # the wrapper, closed, holds it no more: freed by reference counting
        assert gone() is None
    finally:
        gc.enable()


async def test_a_write_after_a_read_closed_stdin_is_refused_not_dropped() -> None:
    # LOCAL hands the child its stdin in one piece when the process is first waited for or
    # read; a write after that was dropped without a word (ASYNC and THREADED deliver it).
    from prismq_subprocess.exceptions import StdinAlreadySentError

    async with pq.SubprocessWrapper("local") as wrapper:
        process = await wrapper.create_subprocess_exec(
            "cat", stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"first\n")
        assert await asyncio.wait_for(process.stdout.readline(), 10) == b"first\n"
        with pytest.raises(StdinAlreadySentError, match="first read") as raised:
            process.stdin.write(b"second\n")
        assert isinstance(raised.value, BrokenPipeError)  # what callers already catch
        with pytest.raises(StdinAlreadySentError):
            process.stdin.writelines([b"third\n"])
        process.stdin.write(b"")  # nothing to lose
        with pytest.raises(StdinAlreadySentError):
            await process.communicate(b"fourth\n")
        process.stdin.close()  # closing again is fine
        assert await process.wait() == 0
        # Closed by a wait(): later writes are ignored, as asyncio ignores them once it returned.
        waited = await wrapper.create_subprocess_exec("cat", stdin=subprocess.PIPE)
        assert waited.stdin is not None
        assert await waited.wait() == 0
        waited.stdin.write(b"after the end")
        # An explicit close is asyncio's: later writes are ignored, as there.
        again = await wrapper.create_subprocess_exec("cat", stdin=subprocess.PIPE)
        assert again.stdin is not None
        again.stdin.close()
        again.stdin.write(b"ignored")
        assert await again.wait() == 0
