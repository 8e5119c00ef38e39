"""asyncio compatibility, judged by a list of behaviours we did not write ourselves.

The behaviours are the ones CPython checks for ``asyncio.create_subprocess_exec``/``_shell`` in
``Lib/test/test_asyncio/test_subprocess.py`` (3.11 to 3.13), re-expressed here in our own words,
plus the documented ``StreamReader``/``StreamWriter`` behaviours a caller of the process object
relies on. Transport-level checks (``_proc`` bookkeeping, ``pause_reading`` mocks, child watchers,
``SubprocessProtocol`` events) have no counterpart on a process object and are left out.

Every test runs in every real mode through the conftest ``wrapper`` fixture, parametrised
indirectly so that a mode which cannot express a behaviour carries a strict ``xfail`` with the
reason right on the test: the marks *are* the table of differences. A mark whose reason starts with
``BUG:`` is a library defect to fix, not a trade-off.

Children are ``sys.executable -S -c ...`` (``-S`` skips ``site`` and starts 4x faster).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import os
import pathlib
import shlex
import signal
import sys
import time
import uuid
import warnings
from collections.abc import Mapping
from typing import Any
from unittest import mock

import psutil
import pytest
from conftest import REAL, STREAMING, open_the_loops_own_descriptors, skip_if_async_on_uvloop
from helpers import PY

import prismq_subprocess as pq
from prismq_subprocess import DEVNULL, PIPE, STDOUT

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and fds")

#: Upper bound for anything that should finish promptly; a hang fails instead of stalling CI.
PROMPT = 10.0
#: How soon live output (or an exit) must be seen; the strict xfails of LOCAL wait this long.
LIVE = 0.75

LOCAL_NOT_LIVE = (
    "documented LOCAL trade-off: the child runs to completion before any output is readable, "
    "so output cannot be read while the child is still running"
)
LOCAL_STDIN_ON_CLOSE = (
    "documented LOCAL trade-off: input written to stdin is buffered and delivered when stdin is "
    "closed, so a write cannot meet the child's broken pipe and a line cannot be answered before "
    "the next one is written"
)
NEW_SESSION_BY_DEFAULT = (
    "documented difference (issue 4, README 'No leaks'): every child starts in its own session "
    "(start_new_session=True) unless the caller passes start_new_session=/process_group= or "
    "SubprocessWrapper(new_process_group=False)"
)


def child(code: str) -> tuple[str, ...]:
    """Arguments running ``code`` in a fresh, fast-starting interpreter."""
    return (PY, "-S", "-c", code)


CAT = child("import sys; sys.stdout.buffer.write(sys.stdin.buffer.read())")
COUNT_STDIN = child("import sys; print(len(sys.stdin.buffer.read()))")
SLEEP = child("import time; time.sleep(30)")
#: More than any pipe buffer holds (CPython's ``support.PIPE_MAX_SIZE``).
PIPE_MAX_SIZE = 4 * 1024 * 1024 + 1


def real_modes(
    differences: Mapping[str, str | pytest.MarkDecorator] | None = None,
) -> pytest.MarkDecorator:
    """Parametrise ``wrapper`` over every real mode; ``differences`` maps a mode to the reason it
    cannot express the behaviour (a strict xfail) or to a ready mark (e.g. a conditional xfail)."""
    differences = differences or {}
    params = []
    for mode in REAL:
        mark = differences.get(mode)
        if isinstance(mark, str):
            mark = pytest.mark.xfail(strict=True, reason=mark)
        params.append(pytest.param(mode, marks=[mark] if mark is not None else [], id=mode))
    return pytest.mark.parametrize("wrapper", params, indirect=True)


def streaming_modes() -> pytest.MarkDecorator:
    """Parametrise ``streaming_wrapper`` over the modes whose output streams live."""
    return pytest.mark.parametrize("streaming_wrapper", STREAMING, indirect=True)


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie does not count)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def stop(process: Any) -> None:
    """Kill ``process`` if it still runs and wait for it."""
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
    await asyncio.wait_for(process.wait(), PROMPT)


# -- stdin, stdout, communicate ---------------------------------------------------------------


@real_modes()
async def test_written_stdin_comes_back_on_stdout(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*CAT, stdin=PIPE, stdout=PIPE)
    proc.stdin.write(b"some data")
    await proc.stdin.drain()
    proc.stdin.close()
    assert await asyncio.wait_for(proc.stdout.read(), PROMPT) == b"some data"
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 0


@real_modes()
async def test_communicate_feeds_input_and_collects_output(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*CAT, stdin=PIPE, stdout=PIPE)
    out, err = await asyncio.wait_for(proc.communicate(b"some data"), PROMPT)
    assert (out, err) == (b"some data", None)
    assert proc.returncode == 0


@real_modes(
    {
        "async": pytest.mark.xfail(
            sys.version_info < (3, 12),
            strict=True,
            reason="asyncio before 3.12 leaves a piped stdin open in communicate() without "
            "input, so a child reading stdin never ends; ASYNC inherits it, the other modes "
            "already behave like 3.12+",
        )
    }
)
async def test_communicate_without_input_closes_a_piped_stdin(
    wrapper: pq.SubprocessWrapper,
) -> None:
    proc = await wrapper.create_subprocess_exec(*CAT, stdin=PIPE, stdout=PIPE)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), LIVE)
    finally:
        await stop(proc)
    assert out == b""
    assert proc.returncode == 0


@real_modes()
async def test_communicate_with_empty_input(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*COUNT_STDIN, stdin=PIPE, stdout=PIPE, stderr=PIPE)
    out, err = await asyncio.wait_for(proc.communicate(b""), PROMPT)
    assert (out.rstrip(), err) == (b"0", b"")
    assert await proc.wait() == 0


@real_modes()
async def test_stdin_from_devnull(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(
        *COUNT_STDIN, stdin=DEVNULL, stdout=PIPE, stderr=PIPE
    )
    assert proc.stdin is None
    out, _ = await asyncio.wait_for(proc.communicate(), PROMPT)
    assert out.rstrip() == b"0"
    assert proc.returncode == 0


@real_modes()
async def test_stdout_to_devnull_gives_none(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(
        *COUNT_STDIN, stdin=PIPE, stdout=DEVNULL, stderr=PIPE
    )
    assert proc.stdout is None
    out, err = await asyncio.wait_for(proc.communicate(b"abc"), PROMPT)
    assert (out, err) == (None, b"")
    assert proc.returncode == 0


@real_modes()
async def test_stderr_to_devnull_gives_none(wrapper: pq.SubprocessWrapper) -> None:
    code = "import sys; sys.stderr.write('noise'); print(len(sys.stdin.buffer.read()))"
    proc = await wrapper.create_subprocess_exec(
        *child(code), stdin=PIPE, stdout=PIPE, stderr=DEVNULL
    )
    assert proc.stderr is None
    out, err = await asyncio.wait_for(proc.communicate(b"abc"), PROMPT)
    assert (out.rstrip(), err) == (b"3", None)


@real_modes()
async def test_stderr_to_stdout_merges(wrapper: pq.SubprocessWrapper) -> None:
    code = "import sys; print('out', flush=True); sys.stderr.write('err\\n')"
    proc = await wrapper.create_subprocess_exec(*child(code), stdout=PIPE, stderr=STDOUT)
    assert proc.stderr is None
    out, err = await asyncio.wait_for(proc.communicate(), PROMPT)
    assert (out, err) == (b"out\nerr\n", None)


@real_modes()
async def test_communicate_without_pipes(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*child("pass"))
    assert (proc.stdin, proc.stdout, proc.stderr) == (None, None, None)
    assert await asyncio.wait_for(proc.communicate(), PROMPT) == (None, None)
    assert proc.returncode == 0


@real_modes()
async def test_stdout_and_stderr_are_separate(wrapper: pq.SubprocessWrapper) -> None:
    code = "import sys; sys.stdout.write('to out'); sys.stderr.write('to err'); sys.exit(3)"
    proc = await wrapper.create_subprocess_exec(*child(code), stdout=PIPE, stderr=PIPE)
    assert await asyncio.wait_for(proc.communicate(), PROMPT) == (b"to out", b"to err")
    assert proc.returncode == 3


@real_modes()
async def test_large_input_and_output_at_once_do_not_deadlock(
    wrapper: pq.SubprocessWrapper,
) -> None:
    data = os.urandom(2 * 1024 * 1024)
    proc = await wrapper.create_subprocess_exec(*CAT, stdin=PIPE, stdout=PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(data), PROMPT)
    assert out == data


@real_modes()
async def test_stdin_not_leaked_with_close_fds_false(wrapper: pq.SubprocessWrapper) -> None:
    # If our end of the child's stdin leaked into the child, it would never see end of file.
    proc = await wrapper.create_subprocess_exec(
        *COUNT_STDIN, stdin=PIPE, stdout=PIPE, stderr=PIPE, close_fds=False
    )
    out, _ = await asyncio.wait_for(proc.communicate(b"abc"), PROMPT)
    assert out.rstrip() == b"3"
    assert proc.returncode == 0


@real_modes()
async def test_child_can_open_dev_stdin(wrapper: pq.SubprocessWrapper) -> None:
    skip_if_async_on_uvloop(
        wrapper, "its pipes to a child are socket pairs: /dev/stdin cannot be opened (ENXIO)"
    )
    code = "data = open('/dev/stdin', 'rb').read(); print(len(data))"
    proc = await wrapper.create_subprocess_exec(*child(code), stdin=PIPE, stdout=PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(b"abc"), PROMPT)
    assert out.rstrip() == b"3"


@real_modes()
async def test_communicate_in_parallel_keeps_outputs_apart(wrapper: pq.SubprocessWrapper) -> None:
    async def say(word: str) -> bytes:
        proc = await wrapper.create_subprocess_exec(*child(f"print({word!r})"), stdout=PIPE)
        out, _ = await proc.communicate()
        return bytes(out).strip()

    words = [f"word{i}" for i in range(8)]
    got = await asyncio.wait_for(asyncio.gather(*(say(w) for w in words)), PROMPT)
    assert got == [w.encode() for w in words]


@real_modes()
async def test_output_stays_readable_after_wait(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*child("print('kept')"), stdout=PIPE)
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 0
    assert await asyncio.wait_for(proc.stdout.read(), PROMPT) == b"kept\n"


@real_modes()
async def test_reading_slowly_after_the_child_exited(wrapper: pq.SubprocessWrapper) -> None:
    code = "import sys\nfor _ in range(64): sys.stdout.write('x' * 4096)\nsys.stdout.flush()\n"
    proc = await wrapper.create_subprocess_exec(*child(code + "sys.exit(1)"), stdout=PIPE)
    total = 0
    while chunk := await asyncio.wait_for(proc.stdout.read(65536), PROMPT):
        total += len(chunk)
        await asyncio.sleep(0.02)
    assert total == 64 * 4096
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 1


# -- broken pipes ------------------------------------------------------------------------------


@real_modes({"local": LOCAL_STDIN_ON_CLOSE})
async def test_drain_raises_once_the_child_is_gone(wrapper: pq.SubprocessWrapper) -> None:
    skip_if_async_on_uvloop(
        wrapper, "writing to a closed stdin raises RuntimeError, not BrokenPipeError"
    )
    proc = await wrapper.create_subprocess_exec(*child("pass"), stdin=PIPE)
    try:
        await asyncio.wait_for(proc.wait(), PROMPT)  # the child has closed its stdin
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            proc.stdin.write(b"x" * PIPE_MAX_SIZE)
            await asyncio.wait_for(proc.stdin.drain(), PROMPT)
    finally:
        await asyncio.wait_for(proc.wait(), PROMPT)


@real_modes()
async def test_communicate_ignores_a_broken_stdin(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*child("pass"), stdin=PIPE)
    await asyncio.wait_for(proc.communicate(b"x" * PIPE_MAX_SIZE), PROMPT)
    assert await proc.wait() == 0


# -- the stdin writer ----------------------------------------------------------------------------


@real_modes()
async def test_stdin_write_eof_ends_the_childs_input(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*CAT, stdin=PIPE, stdout=PIPE)
    assert proc.stdin.can_write_eof()
    proc.stdin.writelines([b"ab", b"cd"])
    await proc.stdin.drain()
    proc.stdin.write_eof()
    assert await asyncio.wait_for(proc.stdout.read(), PROMPT) == b"abcd"
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 0


@real_modes()
async def test_stdin_close_and_wait_closed(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*CAT, stdin=PIPE, stdout=PIPE)
    assert not proc.stdin.is_closing()
    proc.stdin.write(b"bye")
    proc.stdin.close()
    assert proc.stdin.is_closing()
    await asyncio.wait_for(proc.stdin.wait_closed(), PROMPT)
    assert await asyncio.wait_for(proc.stdout.read(), PROMPT) == b"bye"
    await asyncio.wait_for(proc.wait(), PROMPT)


@real_modes()
async def test_stdin_get_extra_info_default(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*CAT, stdin=PIPE, stdout=DEVNULL)
    try:
        sentinel = object()
        assert proc.stdin.get_extra_info("no-such-key", sentinel) is sentinel
        assert proc.stdin.get_extra_info("no-such-key") is None
    finally:
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), PROMPT)


@real_modes(
    {
        "local": "documented LOCAL difference: stdin is an in-memory buffer handed over on "
        "close; its get_extra_info() always answers the default, so there is no 'pipe'"
    }
)
async def test_stdin_get_extra_info_pipe(wrapper: pq.SubprocessWrapper) -> None:
    skip_if_async_on_uvloop(wrapper, "its pipe transports have no get_extra_info('pipe')")
    proc = await wrapper.create_subprocess_exec(*CAT, stdin=PIPE, stdout=DEVNULL)
    try:
        pipe = proc.stdin.get_extra_info("pipe")
        assert pipe is not None
        assert isinstance(pipe.fileno(), int)
    finally:
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), PROMPT)


# -- shell and sessions --------------------------------------------------------------------------


@real_modes()
async def test_shell_exit_status(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_shell("exit 7")
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 7


@real_modes()
async def test_shell_with_start_new_session(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_shell("exit 8", start_new_session=True)
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 8


@real_modes()
async def test_shell_output_and_pipes(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_shell(
        "read x; echo got $x; echo oops >&2", stdin=PIPE, stdout=PIPE, stderr=PIPE
    )
    assert await asyncio.wait_for(proc.communicate(b"it\n"), PROMPT) == (b"got it\n", b"oops\n")


@real_modes()
async def test_exec_with_start_new_session(wrapper: pq.SubprocessWrapper) -> None:
    code = "import os; print(os.getsid(0) == os.getpid())"
    proc = await wrapper.create_subprocess_exec(*child(code), stdout=PIPE, start_new_session=True)
    out, _ = await asyncio.wait_for(proc.communicate(), PROMPT)
    assert out == b"True\n"


@real_modes({mode: NEW_SESSION_BY_DEFAULT for mode in REAL})
async def test_child_shares_the_parents_session_by_default(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(
        *child("import os; print(os.getsid(0))"), stdout=PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), PROMPT)
    assert int(out) == os.getsid(0)


@real_modes()
async def test_start_new_session_false_keeps_the_parents_session(
    wrapper: pq.SubprocessWrapper,
) -> None:
    proc = await wrapper.create_subprocess_exec(
        *child("import os; print(os.getsid(0))"), stdout=PIPE, start_new_session=False
    )
    out, _ = await asyncio.wait_for(proc.communicate(), PROMPT)
    assert int(out) == os.getsid(0)


# -- signals and exit status -----------------------------------------------------------------------


@real_modes()
async def test_returncode_is_none_until_exit(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*child("import sys; sys.stdin.read()"), stdin=PIPE)
    assert isinstance(proc.pid, int) and proc.pid > 0
    assert proc.returncode is None
    proc.stdin.close()
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 0
    assert proc.returncode == 0


@real_modes()
async def test_pid_is_the_childs_pid(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(
        *child("import os; print(os.getpid())"), stdout=PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), PROMPT)
    assert int(out) == proc.pid


@real_modes()
async def test_returncode_is_set_without_anyone_waiting(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*child("import sys; sys.exit(5)"))
    async with asyncio.timeout(PROMPT):
        while proc.returncode is None:  # noqa: ASYNC110 - the attribute changing by itself is the behaviour
            await asyncio.sleep(0.02)
    assert proc.returncode == 5


@real_modes(
    {
        "local": "documented LOCAL trade-off (docs/RUN_MODES.md): while stdin is open the "
        "child is not being run to completion yet, so returncode stays None until stdin is "
        "closed or wait()/communicate() is called"
    }
)
async def test_returncode_is_set_while_stdin_is_still_open(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*child("import sys; sys.exit(5)"), stdin=PIPE)
    try:
        async with asyncio.timeout(LIVE):
            while proc.returncode is None:  # noqa: ASYNC110 - the attribute changing by itself is the behaviour
                await asyncio.sleep(0.02)
        assert proc.returncode == 5
    finally:
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), PROMPT)


@real_modes()
async def test_kill(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*SLEEP)
    proc.kill()
    assert await asyncio.wait_for(proc.wait(), PROMPT) == -signal.SIGKILL


@real_modes()
async def test_terminate(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*SLEEP)
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), PROMPT) == -signal.SIGTERM


@real_modes()
async def test_send_signal(wrapper: pq.SubprocessWrapper) -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)  # children inherit ignored signals
    try:
        proc = await wrapper.create_subprocess_exec(*SLEEP)
        proc.send_signal(signal.SIGHUP)
        assert await asyncio.wait_for(proc.wait(), PROMPT) == -signal.SIGHUP
    finally:
        signal.signal(signal.SIGHUP, previous)


@real_modes({"local": LOCAL_NOT_LIVE})
async def test_send_signal_after_the_child_said_it_is_ready(wrapper: pq.SubprocessWrapper) -> None:
    code = "import time; print('sleeping', flush=True); time.sleep(30)"
    proc = await wrapper.create_subprocess_exec(*child(code), stdout=PIPE)
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), LIVE) == b"sleeping\n"
        proc.send_signal(signal.SIGUSR1)
        assert await asyncio.wait_for(proc.wait(), PROMPT) == -signal.SIGUSR1
    finally:
        await stop(proc)


@real_modes()
async def test_kill_a_shell_whose_child_holds_stdout(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_shell("sleep 0.3; sleep 0.3", stdout=PIPE)
    await asyncio.sleep(0.1)
    proc.kill()
    assert await asyncio.wait_for(proc.wait(), PROMPT) == -signal.SIGKILL


@real_modes()
async def test_signalling_an_exited_child_raises_process_lookup_error(
    wrapper: pq.SubprocessWrapper,
) -> None:
    proc = await wrapper.create_subprocess_exec(*child("pass"))
    await asyncio.wait_for(proc.wait(), PROMPT)
    await asyncio.sleep(0.05)  # asyncio lets go of the child one loop turn after the exit
    for act in (proc.kill, proc.terminate, lambda: proc.send_signal(signal.SIGTERM)):
        with pytest.raises(ProcessLookupError):
            act()


@real_modes()
async def test_signal_racing_the_exit_is_harmless(wrapper: pq.SubprocessWrapper) -> None:
    for _ in range(2):
        proc = await wrapper.create_subprocess_exec(*child("import time; time.sleep(0.05)"))
        await asyncio.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGUSR1)
        assert await asyncio.wait_for(proc.wait(), PROMPT) != 255


@real_modes()
async def test_signalling_an_exited_child_whose_grandchild_holds_stdout_is_ignored(
    wrapper: pq.SubprocessWrapper, tmp_path: pathlib.Path
) -> None:
    skip_if_async_on_uvloop(
        wrapper, "a signal raises ProcessLookupError once the child exited, pipes open or not"
    )
    # asyncio keeps its child until every pipe is closed and ignores signals to it meanwhile
    # (Popen's rule), so the usual "communicate() timed out: kill()" must not raise when the
    # child exited but left a grandchild holding stdout. Once the pipes close, a signal raises
    # ProcessLookupError (the test above).
    pid_file = tmp_path / "grandchild.pid"
    code = (
        "import pathlib, subprocess, sys; p = subprocess.Popen([sys.executable, '-S', '-c', "
        "'import time; time.sleep(60)'], start_new_session=True); "
        "pathlib.Path(sys.argv[1]).write_text(str(p.pid)); print('started', flush=True)"
    )
    proc = await wrapper.create_subprocess_exec(*child(code), str(pid_file), stdout=PIPE)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(proc.communicate(), LIVE)
        for _ in range(int(PROMPT / 0.01)):  # a loaded machine: the exit may come later
            if proc.returncode is not None:
                break
            await asyncio.sleep(0.01)
        assert proc.returncode == 0
        for act in (proc.kill, proc.terminate, lambda: proc.send_signal(signal.SIGTERM)):
            act()  # ignored, no ProcessLookupError: the pipe is still open
        assert proc.returncode == 0
    finally:
        for _ in range(int(PROMPT / 0.01)):
            with contextlib.suppress(OSError, ValueError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
                break
            await asyncio.sleep(0.01)
    # What communicate() had read when it was cancelled is lost (asyncio's read() too).
    assert await asyncio.wait_for(proc.stdout.read(), PROMPT) in (b"", b"started\n")
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 0
    await asyncio.sleep(0.05)  # asyncio lets go of the child one loop turn after the pipes close
    with pytest.raises(ProcessLookupError):
        proc.kill()


def _until_zombie(pid: int) -> None:
    """Block (no loop turn, so no child watcher on the loop runs) until ``pid`` has exited:
    unreaped, or reaped by a mode's own thread (THREADED's waiter, LOCAL's runner)."""
    for _ in range(10_000):
        with contextlib.suppress(psutil.NoSuchProcess):
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                time.sleep(0.001)
                continue
        return
    raise AssertionError(f"child {pid} did not exit")


@real_modes()
@pytest.mark.parametrize("act", ["send_signal", "terminate", "kill"])
async def test_signalling_an_exited_unreaped_child_keeps_its_status(
    wrapper: pq.SubprocessWrapper, act: str
) -> None:
    # The race above, made certain (CPython gh-87744, fixed in 3.13 only): the child has exited
    # but the loop has not reaped it yet. Popen.send_signal polls first, which reaps the child
    # behind asyncio's child watcher, and the watcher then reports 255 instead of the status.
    proc = await wrapper.create_subprocess_exec(*child("raise SystemExit(7)"))
    _until_zombie(proc.pid)
    signals = {"send_signal": lambda: proc.send_signal(signal.SIGUSR1)}
    with contextlib.suppress(ProcessLookupError):
        signals.get(act, getattr(proc, act))()
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 7


# -- wait() -------------------------------------------------------------------------------------


@real_modes()
async def test_wait_after_exit_returns_at_once(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*CAT, stdin=PIPE, stdout=PIPE)
    await asyncio.wait_for(proc.communicate(b"data"), PROMPT)
    task = asyncio.ensure_future(proc.wait())
    await asyncio.sleep(0)
    assert task.done() and task.result() == proc.returncode == 0
    assert await proc.wait() == 0


@real_modes()
async def test_many_concurrent_waits(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(
        *child("import time, sys; time.sleep(0.05); sys.exit(4)")
    )
    codes = await asyncio.wait_for(asyncio.gather(*(proc.wait() for _ in range(10))), PROMPT)
    assert codes == [4] * 10


# -- cancellation -------------------------------------------------------------------------------


@real_modes()
async def test_cancelled_wait_leaves_the_child_running(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*SLEEP)
    task = asyncio.ensure_future(proc.wait())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert proc.returncode is None and alive(proc.pid)
    proc.kill()
    assert await asyncio.wait_for(proc.wait(), PROMPT) == -signal.SIGKILL


@real_modes()
async def test_cancelled_communicate_leaves_the_child_running(
    wrapper: pq.SubprocessWrapper,
) -> None:
    proc = await wrapper.create_subprocess_exec(*SLEEP, stdout=PIPE, stderr=PIPE)
    task = asyncio.ensure_future(proc.communicate())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.05)
    assert proc.returncode is None and alive(proc.pid)
    proc.kill()
    assert await asyncio.wait_for(proc.wait(), PROMPT) == -signal.SIGKILL


@real_modes()
async def test_cancelled_spawn_leaves_no_child(wrapper: pq.SubprocessWrapper) -> None:
    marker = uuid.uuid4().hex
    task = asyncio.ensure_future(
        wrapper.create_subprocess_exec(*child(f"import time; time.sleep(30)  # {marker}"))
    )
    asyncio.get_running_loop().call_soon(task.cancel)
    try:
        proc = await task
    except asyncio.CancelledError:
        pass
    else:  # the spawn won the race: nothing to check
        await stop(proc)
        pytest.skip("the spawn finished before the cancellation reached it")

    def survivors() -> list[psutil.Process]:
        found = []
        for p in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if marker in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        return found

    async with asyncio.timeout(3.0):
        while survivors():  # noqa: ASYNC110 - polling the OS for leftovers
            await asyncio.sleep(0.05)


# -- spawning errors ------------------------------------------------------------------------------


@real_modes()
@pytest.mark.parametrize("stdin", [None, PIPE], ids=["no-stdin", "stdin-pipe"])
async def test_popen_failure_propagates_and_leaks_nothing(
    wrapper: pq.SubprocessWrapper, stdin: int | None
) -> None:
    skip_if_async_on_uvloop(
        wrapper, "it spawns through libuv, not subprocess.Popen (what the test patches)"
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with (
            mock.patch("subprocess.Popen", side_effect=ZeroDivisionError),
            pytest.raises(ZeroDivisionError),
        ):
            await wrapper.create_subprocess_exec(*child("pass"), stdin=stdin)
        gc.collect()
    assert [str(w.message) for w in caught] == []


@real_modes()
async def test_missing_program_is_file_not_found(wrapper: pq.SubprocessWrapper) -> None:
    await open_the_loops_own_descriptors()
    fds = psutil.Process().num_fds()
    with pytest.raises(FileNotFoundError):
        await wrapper.create_subprocess_exec(
            "/no/such/program-xyz", stdin=PIPE, stdout=PIPE, stderr=PIPE
        )
    with pytest.raises(FileNotFoundError):
        await wrapper.create_subprocess_exec("no-such-program-xyz-on-path")
    gc.collect()
    assert psutil.Process().num_fds() == fds


@real_modes()
async def test_missing_program_in_shell_is_exit_127(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_shell("no-such-program-xyz", stderr=DEVNULL)
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 127


@real_modes()
async def test_empty_program_fails_to_start(wrapper: pq.SubprocessWrapper) -> None:
    # asyncio raises PermissionError (from execve); we raise InvalidCommandError (a ValueError)
    # before spawning. Either way nothing starts; code catching OSError would miss ours.
    with pytest.raises((OSError, ValueError)):
        await wrapper.create_subprocess_exec("")


@real_modes(
    {
        mode: "documented difference: an empty or blank shell command is rejected with "
        "InvalidCommandError (a ValueError) where asyncio runs `sh -c ''` and returns 0"
        for mode in REAL
    }
)
async def test_empty_shell_command_runs_and_succeeds(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_shell("")
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 0


@real_modes()
@pytest.mark.parametrize(
    "option",
    [{"text": True}, {"encoding": "utf-8"}, {"errors": "strict"}, {"universal_newlines": True}],
    ids=lambda o: next(iter(o)),
)
async def test_text_mode_is_rejected(wrapper: pq.SubprocessWrapper, option: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        await wrapper.create_subprocess_exec(PY, **option)
    with pytest.raises(ValueError):
        await wrapper.create_subprocess_shell(PY, **option)


@real_modes()
async def test_bad_arguments_raise_what_asyncio_raises(
    wrapper: pq.SubprocessWrapper, tmp_path: pathlib.Path
) -> None:
    with pytest.raises(ValueError):  # embedded null byte
        await wrapper.create_subprocess_exec(PY, "a\0b")
    with pytest.raises(TypeError):
        await wrapper.create_subprocess_exec(PY, 1)
    with pytest.raises(TypeError):
        await wrapper.create_subprocess_exec(*child("pass"), env={"A": 1})
    with pytest.raises(FileNotFoundError):
        await wrapper.create_subprocess_exec(*child("pass"), cwd=tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        await wrapper.create_subprocess_exec(*child("pass"), cwd=tmp_path / "file")


@real_modes()
async def test_env_key_with_equals_sign_is_a_value_error(wrapper: pq.SubprocessWrapper) -> None:
    with pytest.raises(ValueError):
        await wrapper.create_subprocess_exec(*child("pass"), env={"A=B": "1"})


# -- arguments, env, cwd, fds ----------------------------------------------------------------------


@real_modes()
async def test_path_like_program_and_arguments(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(
        pathlib.Path(PY),
        "-S",
        "-c",
        "import sys; print(sys.argv[1])",
        pathlib.Path("."),
        stdout=PIPE,
    )
    assert await asyncio.wait_for(proc.communicate(), PROMPT) == (b".\n", None)


@real_modes()
async def test_env_reaches_exec_child(wrapper: pq.SubprocessWrapper) -> None:
    env = {**os.environ, "FOO": "baz"}
    code = "import os, sys; sys.stdout.write(os.environ['FOO'])"
    proc = await wrapper.create_subprocess_exec(*child(code), env=env, stdout=PIPE)
    assert await asyncio.wait_for(proc.communicate(), PROMPT) == (b"baz", None)


@real_modes()
async def test_env_reaches_shell_child(wrapper: pq.SubprocessWrapper) -> None:
    env = {**os.environ, "FOO": "bar"}
    cmd = shlex.join(child("import os, sys; sys.stdout.write(os.environ['FOO'])"))
    proc = await wrapper.create_subprocess_shell(cmd, env=env, stdout=PIPE)
    assert await asyncio.wait_for(proc.communicate(), PROMPT) == (b"bar", None)


@real_modes()
async def test_cwd(wrapper: pq.SubprocessWrapper, tmp_path: pathlib.Path) -> None:
    proc = await wrapper.create_subprocess_exec(
        *child("import os; print(os.getcwd())"), cwd=tmp_path, stdout=PIPE
    )
    out, _ = await asyncio.wait_for(proc.communicate(), PROMPT)
    assert out.decode().strip() == str(tmp_path)  # pytest's tmp_path is already resolved


@real_modes()
async def test_pass_fds(wrapper: pq.SubprocessWrapper) -> None:
    r, w = os.pipe()
    try:
        proc = await wrapper.create_subprocess_exec(
            *child(f"import os; os.write({w}, b'via fd')"), pass_fds=(w,)
        )
        assert await asyncio.wait_for(proc.wait(), PROMPT) == 0
        os.close(w)
        w = -1
        assert os.read(r, 100) == b"via fd"
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@real_modes()
@pytest.mark.parametrize("close_fds", [True, False])
async def test_close_fds(wrapper: pq.SubprocessWrapper, close_fds: bool) -> None:
    if close_fds:
        skip_if_async_on_uvloop(
            wrapper, "it ignores close_fds: inheritable descriptors reach the child"
        )
    r, w = os.pipe()
    os.set_inheritable(w, True)
    code = f"import os\ntry: os.write({w}, b'x'); print('open')\nexcept OSError: print('closed')"
    try:
        proc = await wrapper.create_subprocess_exec(*child(code), stdout=PIPE, close_fds=close_fds)
        out, _ = await asyncio.wait_for(proc.communicate(), PROMPT)
    finally:
        os.close(r)
        os.close(w)
    assert out == (b"closed\n" if close_fds else b"open\n")


# -- the stdout/stderr readers --------------------------------------------------------------------


@real_modes()
async def test_readline_longer_than_limit_raises_value_error(
    wrapper: pq.SubprocessWrapper,
) -> None:
    proc = await wrapper.create_subprocess_exec(*child("print('x' * 100)"), stdout=PIPE, limit=10)
    with pytest.raises(ValueError):
        await asyncio.wait_for(proc.stdout.readline(), PROMPT)
    await stop(proc)


@real_modes()
async def test_small_limit_still_delivers_everything(wrapper: pq.SubprocessWrapper) -> None:
    code = "import sys; sys.stdout.write('x' * 21); sys.stdout.flush()"
    proc = await wrapper.create_subprocess_exec(*child(code), stdin=PIPE, stdout=PIPE, limit=10)
    assert await asyncio.wait_for(proc.communicate(), PROMPT) == (b"x" * 21, None)


@real_modes()
async def test_readuntil_past_limit_raises_limit_overrun(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*child("print('y' * 100)"), stdout=PIPE, limit=10)
    with pytest.raises(asyncio.LimitOverrunError):
        await asyncio.wait_for(proc.stdout.readuntil(b"\n"), PROMPT)
    # The data stays in the buffer (and asyncio's wait() needs the pipe drained).
    assert await asyncio.wait_for(proc.stdout.read(), PROMPT) == b"y" * 100 + b"\n"
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 0


@real_modes()
async def test_read_readexactly_readuntil(wrapper: pq.SubprocessWrapper) -> None:
    code = "import sys; sys.stdout.write('head|abcdef')"
    proc = await wrapper.create_subprocess_exec(*child(code), stdout=PIPE)
    out = proc.stdout
    assert await asyncio.wait_for(out.readuntil(b"|"), PROMPT) == b"head|"
    assert await out.readexactly(2) == b"ab"
    assert len(await out.read(1)) == 1
    with pytest.raises(asyncio.IncompleteReadError) as info:
        await out.readexactly(10)
    assert (info.value.partial, info.value.expected) == (b"def", 10)
    assert out.at_eof()
    assert await out.read() == b""
    assert await out.readline() == b""
    await asyncio.wait_for(proc.wait(), PROMPT)


@real_modes()
async def test_async_iteration_over_lines(wrapper: pq.SubprocessWrapper) -> None:
    code = "import sys; sys.stdout.write('a\\nb\\n\\nc')"
    proc = await wrapper.create_subprocess_exec(*child(code), stdout=PIPE)
    lines = [line async for line in proc.stdout]
    assert lines == [b"a\n", b"b\n", b"\n", b"c"]
    await asyncio.wait_for(proc.wait(), PROMPT)


@real_modes()
async def test_repr_names_the_pid(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*child("pass"))
    assert str(proc.pid) in repr(proc)
    await asyncio.wait_for(proc.wait(), PROMPT)


# -- descendants and threads -------------------------------------------------------------------


@real_modes()
async def test_output_of_a_backgrounded_grandchild_is_not_lost(
    wrapper: pq.SubprocessWrapper,
) -> None:
    proc = await wrapper.create_subprocess_shell(
        "(sleep 0.15; echo late) & echo early", stdout=PIPE
    )
    assert await asyncio.wait_for(proc.communicate(), PROMPT) == (b"early\nlate\n", None)
    assert proc.returncode == 0


@real_modes()
async def test_more_running_children_than_worker_threads(wrapper: pq.SubprocessWrapper) -> None:
    count = min(32, (os.cpu_count() or 1) + 4) + 1  # one more than a default thread pool
    procs: list[Any] = []
    try:
        async with asyncio.timeout(LIVE + 0.02 * count):
            for _ in range(count):
                procs.append(await wrapper.create_subprocess_exec(*SLEEP))
    finally:
        for proc in procs:
            await stop(proc)


@real_modes()
async def test_stdin_has_a_transport(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(*CAT, stdin=PIPE, stdout=DEVNULL)
    try:
        transport = proc.stdin.transport
        assert transport.get_write_buffer_size() >= 0
        assert not transport.is_closing()
    finally:
        proc.stdin.close()
        await asyncio.wait_for(proc.wait(), PROMPT)


# -- live output (what LOCAL cannot do) ----------------------------------------------------------


@real_modes({"local": LOCAL_NOT_LIVE})
async def test_output_is_readable_while_the_child_runs(wrapper: pq.SubprocessWrapper) -> None:
    code = "import time; print('ready', flush=True); time.sleep(30)"
    proc = await wrapper.create_subprocess_exec(*child(code), stdout=PIPE)
    try:
        assert await asyncio.wait_for(proc.stdout.readline(), LIVE) == b"ready\n"
        assert proc.returncode is None
    finally:
        await stop(proc)


@real_modes({"local": LOCAL_STDIN_ON_CLOSE})
async def test_line_by_line_dialogue(wrapper: pq.SubprocessWrapper) -> None:
    code = "import sys\nfor line in sys.stdin: print(line.strip().upper(), flush=True)"
    proc = await wrapper.create_subprocess_exec(*child(code), stdin=PIPE, stdout=PIPE)
    try:
        for word in (b"one", b"two", b"three"):
            proc.stdin.write(word + b"\n")
            await proc.stdin.drain()
            assert await asyncio.wait_for(proc.stdout.readline(), LIVE) == word.upper() + b"\n"
        proc.stdin.close()
        assert await asyncio.wait_for(proc.wait(), PROMPT) == 0
    finally:
        await stop(proc)


@streaming_modes()
async def test_streaming_modes_deliver_lines_as_they_come(
    streaming_wrapper: pq.SubprocessWrapper,
) -> None:
    code = "import sys\nfor line in sys.stdin: print(len(line), flush=True)"
    proc = await streaming_wrapper.create_subprocess_exec(*child(code), stdin=PIPE, stdout=PIPE)
    try:
        proc.stdin.write(b"abc\n")
        await proc.stdin.drain()
        assert await asyncio.wait_for(proc.stdout.readline(), LIVE) == b"4\n"
        proc.stdin.close()
        assert await asyncio.wait_for(proc.wait(), PROMPT) == 0
    finally:
        await stop(proc)


# -- the module-level drop-ins ------------------------------------------------------------------


def test_signatures_accept_what_asyncio_accepts() -> None:
    for ours, theirs in (
        (pq.create_subprocess_exec, asyncio.create_subprocess_exec),
        (pq.create_subprocess_shell, asyncio.create_subprocess_shell),
    ):
        our_params = inspect.signature(ours).parameters
        for name, param in inspect.signature(theirs).parameters.items():
            assert name in our_params, name
            assert our_params[name].kind == param.kind, name
            assert our_params[name].default == param.default, name
    assert (pq.PIPE, pq.STDOUT, pq.DEVNULL) == (
        asyncio.subprocess.PIPE,
        asyncio.subprocess.STDOUT,
        asyncio.subprocess.DEVNULL,
    )


@pytest.mark.parametrize("mode", ["async", "threaded", "local", " Threaded ", pq.RunMode.LOCAL])
async def test_module_level_drop_ins_in_every_mode(mode: Any) -> None:
    proc = await pq.create_subprocess_exec(*CAT, stdin=PIPE, stdout=PIPE, mode=mode)
    assert await asyncio.wait_for(proc.communicate(b"ping"), PROMPT) == (b"ping", None)
    proc = await pq.create_subprocess_shell("exit 3", mode=mode)
    assert await asyncio.wait_for(proc.wait(), PROMPT) == 3
    proc = await pq.create_subprocess_exec(*SLEEP, mode=mode)
    proc.terminate()
    assert await asyncio.wait_for(proc.wait(), PROMPT) == -signal.SIGTERM


# -- a probe's finds (session 37) -------------------------------------------------------------
@pytest.mark.parametrize("mode", [*REAL, "dry-run"])
@pytest.mark.parametrize("bad", [None, "TERM", 1.5], ids=["None", "str", "float"])
async def test_send_signal_with_no_signal_number_is_a_type_error_and_the_child_lives(
    mode: str, bad: object
) -> None:
    # ASYNC took None for "the platform's kill" (its internal meaning): a signal looked up in a
    # dict that returned None killed the child with SIGKILL. asyncio raises TypeError.
    from conftest import WRAPPER_FACTORIES

    async with WRAPPER_FACTORIES[mode]() as wrapper:
        process = await wrapper.create_subprocess_exec(
            PY, "-c", "import time; time.sleep(30)", stdin=asyncio.subprocess.DEVNULL
        )
        try:
            with pytest.raises(TypeError, match="signal") as caught:
                process.send_signal(bad)  # type: ignore[arg-type]
            assert isinstance(caught.value, pq.exceptions.InvalidArgumentTypeError)
            if mode == "dry-run":
                return  # (its fake child has ended already)
            assert process.returncode is None
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), 0.2)
        finally:
            with contextlib.suppress(ProcessLookupError):  # (DRY_RUN's has gone)
                process.kill()
            await process.wait()


@pytest.mark.parametrize("mode", REAL)
async def test_a_second_concurrent_communicate_is_refused_as_in_asyncio(mode: str) -> None:
    # LOCAL gave the second caller empty output, as if the child printed nothing; asyncio (and
    # ASYNC, THREADED) refuse a second reader waiting at once with RuntimeError. (DRY_RUN's
    # default answer has its output, and its end, there at once: as asyncio with a finished
    # child's output all read in, the second reader gets b"" without waiting.)
    from conftest import WRAPPER_FACTORIES

    async with WRAPPER_FACTORIES[mode]() as wrapper:
        # The child prints only after a while, so both readers are waiting by then in every
        # mode (a CI run on uvloop started them after a quick child had ended: the first then
        # read it all without waiting and the second got b"", as asyncio's would).
        process = await wrapper.create_subprocess_exec(
            PY, "-c", "import time; time.sleep(0.5); print('hi')", stdout=asyncio.subprocess.PIPE
        )
        first, second = await asyncio.gather(
            process.communicate(), process.communicate(), return_exceptions=True
        )
        await process.wait()
    assert first == (b"hi\n", None)
    assert isinstance(second, RuntimeError), second
    assert "already waiting" in str(second)


class _BadPath:
    def __fspath__(self) -> object:
        return 5


@pytest.mark.parametrize("mode", [*REAL, "dry-run"])
@pytest.mark.parametrize("where", ["argument", "cwd"])
async def test_a_pathlike_that_gives_no_path_is_our_type_error(mode: str, where: str) -> None:
    from conftest import WRAPPER_FACTORIES

    async with WRAPPER_FACTORIES[mode]() as wrapper:
        with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="__fspath__"):
            if where == "argument":
                await wrapper.run(PY, "-c", "pass", _BadPath())  # type: ignore[arg-type]
            else:
                await wrapper.run(PY, "-c", "pass", cwd=_BadPath())  # type: ignore[arg-type]
