"""Runs their host abandons: a loop closed with the run's task still pending (a second Ctrl-C in
``asyncio.run``'s clean-up, a host that closes its loop without cancelling its tasks), and the
interpreter exiting with such a run's child still alive."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import skip_if_async_on_uvloop

import prismq_subprocess as pq

REAL_MODES = ["async", "threaded", "local"]

#: A child that ignores SIGTERM (so a stop waits out its grace), with a grandchild, both
#: writing their pids to the file named by argv[1]; then it sleeps.
STUBBORN = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    with open(sys.argv[1], "w") as pids:
        pids.write(f"{os.getpid()} {helper.pid}")
    print("started", flush=True)
    time.sleep(300)
    """
)


def _pids(path: Path) -> list[int]:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if len(text.split()) == 2:
            return [int(word) for word in text.split()]
        time.sleep(0.05)
    raise AssertionError("the child did not write its pids")


def _gone(pids: list[int], within: float = 10.0) -> list[int]:
    """The pids still alive (zombies count as gone) after waiting up to ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.05)


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


@pytest.mark.parametrize("mode", REAL_MODES)
@pytest.mark.parametrize("how", ["running", "stopping", "cancelled"])
def test_a_run_whose_task_is_destroyed_with_its_loop_kills_its_tree(
    mode: str, how: str, tmp_path: Path
) -> None:
    # The loop is closed with run()'s task pending (as a second Ctrl-C during asyncio.run's
    # clean-up leaves it), so the coroutine is closed (GeneratorExit) when the task goes: no
    # await can run then, and the child, whether running or in its stop's grace period (it
    # ignores SIGTERM), was left with its helper, the coroutine "ignoring GeneratorExit".
    pid_file = tmp_path / "pids"
    wrapper = pq.SubprocessWrapper(mode, grace_period=60)
    skip_if_async_on_uvloop(
        wrapper, "closing a uvloop loop that still has a child's transport waits for the child"
    )
    loop = asyncio.new_event_loop()
    pids: list[int] = []
    try:
        timeout = 0.5 if how == "stopping" else None
        task = loop.create_task(
            wrapper.run(sys.executable, "-c", STUBBORN, str(pid_file), timeout=timeout)
        )
        loop.run_until_complete(asyncio.sleep(0.2))
        pids = _pids(pid_file)
        if how == "cancelled":
            task.cancel()  # its stop then waits in the grace period (the child ignores SIGTERM)
        # Past the timeout, so the stop waits in its grace period; or still running.
        loop.run_until_complete(asyncio.sleep(1.5 if how == "stopping" else 0.3))
        assert not task.done()
        loop.close()
        # What destroying the pending task does to its coroutine (here at once: the task is
        # still referenced by what it waits for, which the wrapper holds). No clean-up step
        # may try to await then ("coroutine ignored GeneratorExit", "Event loop is closed").
        task.get_coro().close()
        assert _gone(pids) == []
    finally:
        _kill(pids)
        wrapper.cleanup()
        if not loop.is_closed():
            loop.close()


@pytest.mark.parametrize("mode", REAL_MODES)
def test_the_interpreter_exits_with_an_abandoned_run_and_stops_its_tree(
    mode: str, tmp_path: Path
) -> None:
    # A LOCAL run's worker is a thread of a pool, which the interpreter joins at exit: with the
    # run's loop closed under it and its child alive, the host never exited.
    pid_file = tmp_path / "pids"
    script = textwrap.dedent(
        f"""
        import asyncio, sys
        import prismq_subprocess as pq

        async def main():
            wrapper = pq.SubprocessWrapper({mode!r})
            command = (sys.executable, "-c", {STUBBORN!r}, {str(pid_file)!r})
            asyncio.ensure_future(wrapper.run(*command))
            await asyncio.sleep(1.0)

        loop = asyncio.new_event_loop()
        loop.run_until_complete(main())
        loop.close()
        print("main code done", flush=True)
        """
    )
    host = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    pids: list[int] = []
    try:
        pids = _pids(pid_file)
        out, err = host.communicate(timeout=30)
        assert "main code done" in out, err
        assert host.returncode == 0, err
        assert "ignored GeneratorExit" not in err, err
        assert _gone(pids) == []
    finally:
        if host.poll() is None:
            host.kill()
            host.communicate()
        _kill(pids)


def _host(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


@pytest.mark.parametrize("mode", REAL_MODES)
def test_a_loop_in_a_thread_that_outlives_the_main_thread_runs_on(mode: str) -> None:
    # The interpreter's exit begins when the main thread ends, while other (non-daemon) threads
    # still run loops of their own: their runs must go on, whole (a review of the exit fix found
    # LOCAL's cut off, and its run() waiting for ever). (Both start before the main thread ends:
    # after that, Python refuses new work to every thread pool, THREADED's and LOCAL's too.)
    done = _host(
        f"""
        import asyncio, sys, threading, time
        import prismq_subprocess as pq

        CHILD = "import time; print('early', flush=True); time.sleep(1.5); print('late')"

        async def main():
            async with pq.SubprocessWrapper({mode!r}) as wrapper:
                process = await wrapper.create_subprocess_exec(
                    sys.executable, "-c", CHILD, stdout=pq.PIPE
                )
                result, (out, _) = await asyncio.gather(
                    wrapper.run(sys.executable, "-c", CHILD), process.communicate()
                )
                print(result.returncode, result.stdout, process.returncode, out, flush=True)

        threading.Thread(target=asyncio.run, args=(main(),)).start()
        time.sleep(0.5)  # both children have started; the main thread ends mid-run
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "0 b'early\\nlate\\n' 0 b'early\\nlate\\n'\n", done.stderr


def test_the_api_loads_in_a_thread_after_the_main_thread_ended() -> None:
    # The exit hook is registered when the API loads: too late once the exit has begun, which
    # must not stop the API from loading there.
    done = _host(
        """
        import asyncio, sys, threading, time

        def later():
            time.sleep(0.5)
            import prismq_subprocess as pq

            async def main():
                async with pq.SubprocessWrapper("async") as wrapper:
                    print((await wrapper.run(sys.executable, "-c", "print('hi')")).stdout)

            asyncio.run(main())

        threading.Thread(target=later).start()
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "b'hi\\n'\n", done.stderr
