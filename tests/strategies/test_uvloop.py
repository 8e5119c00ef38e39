"""ASYNC mode on uvloop (what ``uvicorn[standard]`` runs): parity with asyncio's own subprocesses.

Skipped where uvloop is not installed. The whole suite can also run on uvloop:
``PRISMQ_TEST_LOOP=uvloop pytest`` (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from helpers import py

import prismq_subprocess as pq

uvloop = pytest.importorskip("uvloop")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not run on Windows")

_T = TypeVar("_T")

SLEEPS = "import time; time.sleep(60)"


def on_uvloop(main: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``main()`` in a fresh uvloop loop (the test itself is synchronous)."""

    async def checked() -> _T:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        return await main()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(checked())


@pytest.mark.parametrize("verb", ["terminate", "kill", "send_signal"])
def test_signals_reach_the_child_as_on_asyncio(verb: str) -> None:
    # AsyncProcess looked at asyncio's transport internals (_check_proc), which uvloop's
    # transport lacks: terminate/kill/send_signal raised AttributeError.
    async def main() -> tuple[int, int]:
        async with pq.SubprocessWrapper(pq.RunMode.ASYNC, grace_period=2.0) as w:
            ours = await w.create_subprocess_exec(*py(SLEEPS))
            raw = await asyncio.create_subprocess_exec(*py(SLEEPS))
            for process in (ours, raw):
                method: Any = getattr(process, verb)
                method(15) if verb == "send_signal" else method()
            codes = (
                await asyncio.wait_for(ours.wait(), 30),
                await asyncio.wait_for(raw.wait(), 30),
            )
            # Once exited and let go of, both refuse a signal the same way.
            for process in (ours, raw):
                with pytest.raises(ProcessLookupError):
                    process.kill()
            return codes

    ours, raw = on_uvloop(main)
    assert ours == raw == (-9 if verb == "kill" else -15)


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
@pytest.mark.parametrize("close", ["cleanup", "aclose"])
def test_closing_releases_the_pipes_of_an_exited_child_nobody_read(close: str) -> None:
    # The wrapper found the open pipes of an exited child through asyncio's private transport
    # attributes (_loop, _closed), absent on uvloop's transport: the pipe stayed open, paused,
    # after close (a ResourceWarning when the loop closed), and what it held could not be
    # taken (uvloop names the pipe's descriptor "socket", not "pipe").
    async def main() -> tuple[int, int, int]:
        wrapper = pq.SubprocessWrapper(pq.RunMode.ASYNC)
        # The first spawn on a uvloop loop opens descriptors (/dev/null) kept for its life.
        await wrapper.run(*py("pass"))
        before = _fds()
        process, stdout, _ = await wrapper.create_subprocess(
            *py("import sys; sys.stdout.write('y' * 300000)")
        )
        for _ in range(200):  # it exits; its last bytes wait in the pipe, nobody reading
            if process.returncode is not None:
                break
            await asyncio.sleep(0.05)
        if close == "cleanup":
            wrapper.cleanup()
        else:
            await wrapper.aclose()
        for _ in range(100):
            if _fds() <= before:
                break
            await asyncio.sleep(0.05)
        leaked = _fds() - before
        returncode = await asyncio.wait_for(process.wait(), 10)
        return leaked, returncode, len(await asyncio.wait_for(stdout.read(), 10))

    leaked, returncode, read = on_uvloop(main)
    assert leaked <= 0
    assert returncode == 0
    assert read == 300000  # what the pipe held went to the reader


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="waitid without reaping")
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # (uvloop's handles of a closed loop)
def test_cleanup_after_the_loop_closed_reaps_the_children() -> None:
    # cleanup() reaps an ASYNC child whose loop has closed (its watcher gone): it found the
    # loop through asyncio's transport (_loop), so a uvloop child was left a zombie.
    wrapper = pq.SubprocessWrapper(pq.RunMode.ASYNC)
    pids: list[int] = []
    processes: list[Any] = []

    async def start() -> None:
        processes.append(await wrapper.create_subprocess_exec(*py(SLEEPS)))
        pids.append(processes[0].pid)

    on_uvloop(start)  # the loop closes with the child running
    wrapper.cleanup()
    (pid,) = pids
    with pytest.raises(ChildProcessError):  # reaped: no zombie left
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    # The status read when it was reaped (uvloop's transport of a closed loop never sets it).
    assert processes[0].returncode == -9


_POLITE = """
import pathlib, signal, sys, time
def bye(*_):
    pathlib.Path(sys.argv[1]).write_text("asked")
    sys.exit(3)
signal.signal(signal.SIGTERM, bye)
pathlib.Path(sys.argv[2]).write_text("ready")
time.sleep(60)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="waitid without reaping")
@pytest.mark.filterwarnings("ignore::ResourceWarning")  # (uvloop's handles of a closed loop)
def test_closing_from_the_next_loop_stops_and_reaps_the_children(
    tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A child started in a uvloop loop that ended with it running, the wrapper closed from the
    # next loop: the stop asked it politely, saw it end, then asserted ("ended without its exit
    # status": no returncode from the closed loop, no Popen to ask) and logged an ERROR; the
    # child stayed a zombie until cleanup() reaped it.
    wrapper = pq.SubprocessWrapper(pq.RunMode.ASYNC, grace_period=5.0)
    asked, ready = tmp_path / "asked", tmp_path / "ready"
    started: list[Any] = []

    async def start() -> None:
        started.append(await wrapper.create_subprocess_exec(*py(_POLITE), str(asked), str(ready)))
        for _ in range(600):
            if ready.exists():
                break
            await asyncio.sleep(0.05)

    async def stop() -> int:
        (process,) = started
        status = await asyncio.wait_for(pq.terminate_gracefully(process, 5.0), 30)
        await asyncio.wait_for(wrapper.aclose(), 30)
        return status

    on_uvloop(start)  # the loop closes with the child running
    with caplog.at_level("ERROR", logger="prismq_subprocess"):
        status = on_uvloop(stop)
    # Ours only: asyncio's "Task was destroyed but it is pending!" for a task an earlier test
    # left on a loop it closed on purpose comes whenever a collection frees that task (CI).
    ours = [r for r in caplog.records if r.name.startswith("prismq_subprocess")]
    assert [r.getMessage() for r in ours if r.levelname == "ERROR"] == []
    assert status == 3 and started[0].returncode == 3
    assert asked.read_text() == "asked"
    with pytest.raises(ChildProcessError):  # reaped: no zombie left
        os.waitid(os.P_PID, started[0].pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)


# Popen's own defaults, which a caller may forward (a helper with `umask: int = -1`).
POPEN_DEFAULTS: dict[str, Any] = {
    "process_group": None,
    "umask": -1,
    "pipesize": -1,
    "user": None,
    "group": None,
    "extra_groups": None,
}


@pytest.mark.parametrize("name", [*POPEN_DEFAULTS, "process_group=-1"])
def test_popen_defaults_passed_explicitly_are_accepted(name: str) -> None:
    # uvloop's subprocess_exec refuses these keywords whatever their value ("unexpected
    # kwargs"): a caller forwarding Popen's defaults (or our own pass-through of
    # process_group=None) could not start anything on uvloop, while asyncio accepts them.
    option = {"process_group": -1} if name == "process_group=-1" else {name: POPEN_DEFAULTS[name]}

    async def main() -> bytes:
        async with pq.SubprocessWrapper(pq.RunMode.ASYNC) as wrapper:
            result = await wrapper.run(
                *py("import os; print(os.getpgid(0) == os.getpid())"), timeout=30, **option
            )
            return result.stdout.strip()

    assert on_uvloop(main) == b"True"  # and the child still leads its own group


@pytest.mark.parametrize(
    "option",
    [
        {"umask": 0o22},
        {"process_group": 0},
        {"pipesize": 1 << 16},
        {"user": os.getuid()},
        {"group": os.getgid()},
        {"extra_groups": []},
    ],
    ids=lambda option: next(iter(option)),
)
def test_options_uvloop_cannot_honour_are_refused_by_name(option: dict[str, Any]) -> None:
    # uvloop raised a bare "ValueError: unexpected kwargs" naming neither the option nor
    # uvloop; a caller could not tell what to change.
    (name,) = option

    async def main() -> tuple[str, int]:
        async with pq.SubprocessWrapper(pq.RunMode.ASYNC) as wrapper:
            with pytest.raises(pq.exceptions.InvalidOptionError) as info:
                await wrapper.run(*py("pass"), timeout=30, **option)
            return str(info.value), len(wrapper.live_processes)

    message, live = on_uvloop(main)
    assert "uvloop" in message and f"{name}=" in message
    assert "THREADED" in message  # what to do instead
    assert live == 0


def test_a_failed_spawn_names_the_program_and_says_why(tmp_path: Any) -> None:
    # libuv's spawn errors carry no file name (Popen's do): the error named the command's
    # first word instead of executable=, and a file that is not executable (or a directory)
    # came out as a bare SpawnFailedError, not CommandNotExecutableError ("not executable").
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o600)

    async def main() -> list[tuple[type[BaseException], str]]:
        errors = []
        async with pq.SubprocessWrapper(pq.RunMode.ASYNC) as wrapper:
            for call in (
                lambda: wrapper.run(*py("pass"), executable="/nonexistent/interpreter"),
                lambda: wrapper.run(script),
                lambda: wrapper.create_subprocess_exec(tmp_path),
            ):
                with pytest.raises(OSError) as info:
                    await call()
                errors.append((type(info.value), str(info.value)))
        return errors

    missing, not_executable, directory = on_uvloop(main)
    assert missing[0] is pq.CommandNotFoundError and "/nonexistent/interpreter" in missing[1]
    assert issubclass(not_executable[0], pq.exceptions.CommandNotExecutableError)
    assert "not executable" in not_executable[1] and str(script) in not_executable[1]
    assert issubclass(directory[0], pq.exceptions.CommandNotExecutableError)
    assert "is a directory" in directory[1]


def test_the_shutdown_handler_chains_to_a_loop_signal_handler_installed_before() -> None:
    # uvicorn (before 0.29) and others install their SIGTERM handler with
    # loop.add_signal_handler. The ShutdownHandler found it in asyncio's private table
    # (loop._signal_handlers), which uvloop does not expose: installing replaced it for good,
    # so after the stop the host was never told to shut down (nor after uninstall). On uvloop
    # the loop tells its handler at once, while the children are being stopped (once only).
    import signal

    async def main() -> list[str]:
        loop = asyncio.get_running_loop()
        calls: list[str] = []
        loop.add_signal_handler(signal.SIGTERM, calls.append, "host")
        try:
            async with pq.SubprocessWrapper(pq.RunMode.ASYNC, grace_period=2.0) as wrapper:
                process = await wrapper.create_subprocess_exec(*py(SLEEPS))
                with pq.ShutdownHandler(grace=2.0):
                    os.kill(os.getpid(), signal.SIGTERM)
                    for _ in range(400):
                        if calls and process.returncode is not None:
                            break
                        await asyncio.sleep(0.05)
                    assert process.returncode is not None  # the children were stopped
                    await asyncio.sleep(0.5)
                    assert calls == ["host"]  # and the host was told once
                os.kill(os.getpid(), signal.SIGTERM)  # restored: the host's handler alone
                for _ in range(400):
                    if len(calls) == 2:
                        break
                    await asyncio.sleep(0.05)
        finally:
            loop.remove_signal_handler(signal.SIGTERM)
        return calls

    assert on_uvloop(main) == ["host", "host"]
