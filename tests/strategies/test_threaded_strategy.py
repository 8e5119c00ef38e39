"""ThreadedStrategy: which bridge it picks, how many threads it uses, what close releases."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import subprocess
import sys
import threading
import time

import pytest
from conftest import ON_UVLOOP
from helpers import py

import prismq_subprocess as pq
from prismq_subprocess._io._io_thread import IOThread
from prismq_subprocess._io._pipes import ThreadPerPipe


def named(prefix: str, exclude: frozenset[int | None] = frozenset()) -> list[threading.Thread]:
    """Live threads whose name starts with ``prefix``, except those in ``exclude``."""
    return [
        t for t in threading.enumerate() if t.name.startswith(prefix) and t.ident not in exclude
    ]


def idents() -> frozenset[int | None]:
    """Threads alive now (e.g. the I/O thread of the drop-ins' shared wrapper)."""
    return frozenset(t.ident for t in threading.enumerate())


def test_io_choice() -> None:
    auto = pq.abc.ThreadedStrategy()
    forced = pq.abc.ThreadedStrategy(io="threads")
    try:
        expected = "threads" if sys.platform == "win32" else "selector"
        assert auto.io == expected
        assert forced.io == "threads"
        assert isinstance(forced._bridge, ThreadPerPipe)
        assert "threads" in repr(forced)
        with pytest.raises(pq.exceptions.InvalidOptionError, match="io must be"):
            pq.abc.ThreadedStrategy(io="fibers")  # type: ignore[arg-type]
    finally:
        auto.close()
        forced.close()


@pytest.mark.skipif(sys.platform == "win32", reason="the selector bridge is POSIX only")
async def settled_idents(quiet: float = 0.3, limit: float = 3.0) -> frozenset[int | None]:
    """The threads alive once earlier tests' stragglers are gone: garbage collected first (a
    dropped process's finalizer may start the containment worker, which lingers 0.25 s), then
    no change for ``quiet`` seconds (at most ``limit``)."""
    gc.collect()
    deadline = time.monotonic() + limit
    seen, since = idents(), time.monotonic()
    while time.monotonic() - since < quiet and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
        now = idents()
        if now != seen:
            seen, since = now, time.monotonic()
    return seen


async def test_threads_do_not_grow_with_children() -> None:
    before = await settled_idents()
    strategy = pq.abc.ThreadedStrategy(max_workers=4)
    assert isinstance(strategy._bridge, IOThread)
    peak = 0
    async with pq.SubprocessWrapper(strategy) as w:

        async def one(i: int) -> bytes:
            result = await w.run(*py(f"import time; time.sleep(0.5); print({i})"))
            return result.stdout

        tasks = [asyncio.ensure_future(one(i)) for i in range(60)]
        while not all(t.done() for t in tasks):
            peak = max(peak, len({t.ident for t in threading.enumerate()} - before))
            await asyncio.sleep(0.02)
        outs = await asyncio.gather(*tasks)
        assert outs == [b"%d\n" % i for i in range(60)]
        if hasattr(os, "pidfd_open"):
            # Formula: spawn pool + 1 I/O thread, whatever the number of children.
            assert peak <= 4 + 1
            assert len(named("prismq-io", before)) == 1
            assert not named("prismq-stdout") and not named("prismq-wait")
    assert not named("prismq-io", before)
    assert not named("prismq-spawn", before)


async def test_forced_thread_route_runs_and_releases_its_threads() -> None:
    before = idents()
    async with pq.SubprocessWrapper(pq.abc.ThreadedStrategy(io="threads", use_pidfd=False)) as w:
        proc = await w.create_subprocess_exec(
            *py("import sys; sys.stdout.write(sys.stdin.read().upper())"),
            stdin=pq.PIPE,
            stdout=pq.PIPE,
        )
        assert named(f"prismq-stdout-{proc.pid}")
        assert not named("prismq-io", before)
        out, _ = await proc.communicate(b"abc" * 100_000)
        assert out == b"ABC" * 100_000
        result = await w.run(*py("print('x' * 100_000)"))
        assert result.stdout == b"x" * 100_000 + b"\n"
    # A waiter thread hands the exit status over just before it returns: give it a moment.
    for thread in named("prismq-"):
        if thread.ident not in before:
            await asyncio.to_thread(thread.join, 5)
    # Only this test's threads: a waiter of an earlier test's child may still be finishing.
    assert not named("prismq-stdout", before) and not named("prismq-stdin", before)
    assert not named("prismq-wait", before)


async def test_close_stops_the_io_thread_with_a_child_still_running() -> None:
    before = idents()
    w = pq.SubprocessWrapper(pq.abc.ThreadedStrategy())
    proc = await w.create_subprocess_exec(
        *py("import time; print('up', flush=True); time.sleep(30)"), stdout=pq.PIPE
    )
    assert await proc.stdout.readline() == b"up\n"
    await w.aclose()  # stops the child, then the strategy
    assert proc.returncode is not None
    assert await proc.stdout.read() == b""
    assert not named("prismq-io", before)


async def test_spawn_after_close_refuses() -> None:
    strategy = pq.abc.ThreadedStrategy()
    strategy.close()
    strategy.close()
    from prismq_subprocess._strategies._base import SpawnRequest

    with pytest.raises(RuntimeError):
        await strategy.spawn(SpawnRequest(command=py("pass"), shell=False))


async def test_waiter_route_uses_one_waiter_per_child() -> None:
    async with pq.SubprocessWrapper(pq.abc.ThreadedStrategy(use_pidfd=False)) as w:
        proc = await w.create_subprocess_exec(*py("import time; time.sleep(0.3)"))
        assert named(f"prismq-wait-{proc.pid}")
        assert await proc.wait() == 0


@pytest.mark.skipif(sys.platform == "win32", reason="the selector route is POSIX")
async def test_the_exit_notice_comes_from_the_io_thread_not_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The I/O thread's selector watches the pidfd next to the pipes, so the exit reaches the
    # loop in the same hand-off as the end of file: the loop itself watches no descriptor.
    loop = asyncio.get_running_loop()
    watched: list[int] = []
    add_reader = loop.add_reader

    def counting_add_reader(fd: int, *args: object) -> None:
        watched.append(fd)
        add_reader(fd, *args)

    monkeypatch.setattr(loop, "add_reader", counting_add_reader)
    async with pq.SubprocessWrapper(pq.abc.ThreadedStrategy(io="selector")) as w:
        for _ in range(3):
            result = await asyncio.wait_for(w.run(*py("print('hi')")), 30)
            assert (result.returncode, result.stdout) == (0, b"hi\n")
        proc = await w.create_subprocess_exec(*py("import sys; sys.exit(4)"))
        assert await asyncio.wait_for(proc.wait(), 30) == 4
    assert watched == []


def _stdin_wrapper(kind: str) -> pq.SubprocessWrapper:
    if kind == "async":
        return pq.SubprocessWrapper(pq.RunMode.ASYNC)
    return pq.SubprocessWrapper(pq.abc.ThreadedStrategy(io=kind))  # type: ignore[arg-type]


_OUTLIVES = """
import asyncio, contextlib, json, sys, time
import psutil
from conftest import WRAPPER_FACTORIES
from helpers import py

wrapper = WRAPPER_FACTORIES[sys.argv[1]]()
code = "import os, time; print('x', flush=True); os.close(1); time.sleep(0.3)"

async def start():
    proc = await wrapper.create_subprocess_exec(*py(code), stdout=asyncio.subprocess.PIPE)
    await proc.stdout.read()
    return proc

procs = [asyncio.run(start()) for _ in range(3)]  # (kept, as a host's records would keep them)
if sys.argv[1] == "async" and sys.version_info < (3, 12):
    # (3.11's pidfd watcher hears of a closed loop at the next start: the last ones wait
    # for it. 3.12+ use asyncio's own watcher, as raw asyncio does: see LIFECYCLE.md.)
    procs.append(asyncio.run(start()))
    procs.pop()
deadline = time.monotonic() + 15
while True:
    left = {}  # the children not reaped yet, and their state
    for proc in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            left[proc.pid] = psutil.Process(proc.pid).status()
    if not left or time.monotonic() > deadline:
        break
    time.sleep(0.05)
asyncio.run(wrapper.aclose())
print(json.dumps(left))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX zombies")
@pytest.mark.parametrize(
    "mode",
    [
        "threaded",
        "threaded-waiter",
        "threaded-threads",
        "local",
        pytest.param(
            "async",
            marks=pytest.mark.skipif(
                sys.version_info >= (3, 12),
                reason="asyncio's own pidfd watcher: its loop's children, as raw asyncio's",
            ),
        ),
    ],
)
def test_a_child_that_outlives_its_event_loop_is_reaped(mode: str) -> None:
    # A probe's find: a THREADED child whose loop closed a moment before it exited (its output
    # read to the end, no wait(): a fire-and-forget helper, or a loop shut down while children
    # run) stayed a zombie for the life of the host: its exit, heard by the I/O thread, was
    # handed to the closed loop and dropped, and a loop-watched pidfd was closed unread.
    # asyncio's child watcher reaps it. (A fresh interpreter: what this one ran before, a
    # subreaper's sweep say, must not reap them for the library.)
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-c", _OUTLIVES, mode],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout.splitlines()[-1]) == {}


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
@pytest.mark.parametrize("kind", ["async", "selector", "threads"])
async def test_stdin_left_open_is_closed_once_the_child_has_exited(kind: str) -> None:
    # asyncio closes its end of stdin when the child's end closes (the child exited), even if
    # nobody calls close(); THREADED kept the descriptor (and, io="threads", the writer thread
    # waiting for more bytes) until the wrapper closed: one of each per child, without bound.
    if kind == "async" and ON_UVLOOP:
        pytest.skip("on uvloop: its pipe transports have no get_extra_info('pipe')")
    async with _stdin_wrapper(kind) as w:
        procs = []
        for _ in range(3):
            proc = await w.create_subprocess_exec(
                *py("import sys; sys.stdin.buffer.read(3)"), stdin=pq.PIPE
            )
            proc.stdin.write(b"abc")
            await proc.stdin.drain()
            assert await asyncio.wait_for(proc.wait(), 30) == 0
            procs.append(proc)
        deadline = time.monotonic() + 10
        while not all(p.stdin.get_extra_info("pipe").closed for p in procs):
            assert time.monotonic() < deadline, "stdin stayed open after the child exited"
            await asyncio.sleep(0.02)
        for proc in procs:
            assert proc.stdin.is_closing()
            await asyncio.wait_for(proc.stdin.wait_closed(), 10)  # closed cleanly: no error
            proc.stdin.write(b"late")  # ignored, as asyncio does once the pipe is gone
            with pytest.raises((BrokenPipeError, ConnectionResetError)):
                await proc.stdin.drain()
        # The writer thread closes the pipe as its last step, then ends: on a busy machine it
        # may still be returning when the close is seen.
        while any(named(f"prismq-stdin-{proc.pid}") for proc in procs):
            assert time.monotonic() < deadline + 10, "a stdin writer thread did not end"
            await asyncio.sleep(0.02)


@pytest.mark.skipif(sys.platform == "win32", reason="a POSIX grandchild sharing the pipes")
@pytest.mark.parametrize("kind", ["async", "selector", "threads"])
async def test_stdin_stays_open_while_an_output_pipe_is_held_after_the_child_exits(
    kind: str,
) -> None:
    # The other half of asyncio's rule: stdin is closed once the child has exited *and* its
    # output pipes ended; a grandchild holding them (here: echoing stdin) still gets input.
    grandchild = "import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())"
    code = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {grandchild!r}])"
    async with _stdin_wrapper(kind) as w:
        proc = await w.create_subprocess_exec(*py(code), stdin=pq.PIPE, stdout=pq.PIPE)
        # (not wait(): asyncio's waits for the output pipes to close too)
        deadline = time.monotonic() + 30
        while proc.returncode is None:
            assert time.monotonic() < deadline, "the child never exited"
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)  # time for a wrong close to happen
        assert not proc.stdin.is_closing()
        proc.stdin.write(b"for the grandchild")
        await proc.stdin.drain()
        proc.stdin.close()
        await asyncio.wait_for(proc.stdin.wait_closed(), 10)
        assert await asyncio.wait_for(proc.stdout.read(), 30) == b"for the grandchild"


def _pidfds_of(pid: int) -> list[str]:
    """Our descriptors that are pidfds of ``pid`` (their fdinfo names the pid)."""
    found = []
    for fd in os.listdir("/proc/self/fdinfo"):
        try:
            with open(f"/proc/self/fdinfo/{fd}") as info:
                if f"Pid:\t{pid}\n" in info.read():
                    found.append(fd)
        except OSError:
            continue  # closed meanwhile (the listing's own descriptor, say)
    return found


@pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="Linux pidfds")
def test_a_pidfd_its_loop_watched_is_closed_when_that_loop_closed_before_the_child_exited() -> None:
    # With io="threads" the loop watches each child's pidfd (add_reader). A loop that closed
    # before the child exited never read it, and nothing closed it: a descriptor leaked per
    # such child, even after the wrapper was closed from the next loop.
    wrapper = pq.SubprocessWrapper(pq.abc.ThreadedStrategy(io="threads"))

    async def start() -> list[str]:
        proc = await wrapper.create_subprocess_exec(*py("import time; time.sleep(0.3)"))
        return _pidfds_of(proc.pid)

    watched = asyncio.run(start())
    assert watched  # the route under test: a pidfd the loop watches
    time.sleep(0.6)  # the child exits after its loop closed
    asyncio.run(wrapper.aclose())
    still_open = []
    for fd in watched:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[pidfd]":
                still_open.append(fd)
    assert still_open == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes")
@pytest.mark.parametrize("kind", ["async", "selector", "threads"])
async def test_drain_right_after_the_callers_own_close_does_not_raise(kind: str) -> None:
    # Found by the session 20 review of the auto-close above: `write(); close(); await drain()`
    # raised ConnectionResetError in THREADED (the pipe was closed at once, nothing queued),
    # where asyncio's drain() returns (it hears of the lost connection only loop iterations
    # later) and THREADED returned before. Code written for one mode must not fail in another.
    async with _stdin_wrapper(kind) as w:
        for _ in range(3):
            proc = await w.create_subprocess_exec(
                *py("import sys; sys.stdin.buffer.read()"), stdin=pq.PIPE
            )
            proc.stdin.write(b"abc")
            proc.stdin.close()
            await proc.stdin.drain()
            await asyncio.wait_for(proc.stdin.wait_closed(), 10)
            assert await asyncio.wait_for(proc.wait(), 30) == 0
