"""A third-party strategy, written only against the public ``prismq_subprocess.abc`` contract.

Two kinds an application might write: one that wraps a built-in strategy (records every command,
then delegates; it reports the wrapped strategy's RunMode) and one that starts children its own
way (plain asyncio) under a mode name of its own. Both are used through
``SubprocessWrapper(strategy=...)`` with ``create_subprocess_exec``, ``run()`` and ``stream()``.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from helpers import py
from lifecycle_helpers import marked_env, survivors_after

import prismq_subprocess as pq
from prismq_subprocess.abc import (
    AsyncStrategy,
    ProcessLike,
    SpawnRequest,
    SubprocessStrategy,
    ThreadedStrategy,
)
from prismq_subprocess.exceptions import InvalidRunModeError


class RecordingStrategy(SubprocessStrategy):
    """Records each command, then lets ``inner`` start it; behaves (and reports) as ``inner``."""

    def __init__(self, inner: SubprocessStrategy) -> None:
        super().__init__(ops=inner.ops)
        self.inner = inner
        self.mode = inner.mode
        self.commands: list[tuple[str, ...] | str] = []

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        self.commands.append(request.display)
        return await self.inner.spawn(request)

    def close(self) -> None:
        self.inner.close()


class PlainAsyncioStrategy(SubprocessStrategy):
    """Starts children with plain asyncio, under a mode name of its own."""

    mode = "plain-asyncio"

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        streams = {"stdin": request.stdin, "stdout": request.stdout, "stderr": request.stderr}
        if request.shell:
            assert isinstance(request.command, str | bytes)
            return await asyncio.create_subprocess_shell(
                request.command, limit=request.limit, **streams, **request.kwargs
            )
        assert isinstance(request.command, tuple)
        return await asyncio.create_subprocess_exec(
            *request.command, limit=request.limit, **streams, **request.kwargs
        )


async def test_a_wrapping_strategy_serves_every_entry_point() -> None:
    strategy = RecordingStrategy(ThreadedStrategy())
    async with pq.SubprocessWrapper(strategy=strategy) as wrapper:
        assert wrapper.strategy is strategy
        assert wrapper.mode is pq.RunMode.THREADED

        result = await wrapper.run(*py("import sys; print(sys.stdin.read()[::-1])"), input=b"abc")
        assert result.stdout.strip() == b"cba"
        assert result.mode is pq.RunMode.THREADED

        async with wrapper.stream(*py("print('one'); print('two')"), encoding="utf-8") as lines:
            seen = [line.strip() async for line in lines]
        assert seen == ["one", "two"]
        assert lines.returncode == 0

        process = await wrapper.create_subprocess_exec(*py("print('hi')"), stdout=pq.PIPE)
        out, _ = await process.communicate()
        assert out.strip() == b"hi"

        assert (await wrapper.run("echo shell", shell=True)).stdout.strip() == b"shell"
    assert [cmd[2] if isinstance(cmd, tuple) else cmd for cmd in strategy.commands] == [
        "import sys; print(sys.stdin.read()[::-1])",
        "print('one'); print('two')",
        "print('hi')",
        "echo shell",
    ]


async def test_a_custom_mode_is_reported_by_name() -> None:
    async with pq.SubprocessWrapper(strategy=PlainAsyncioStrategy()) as wrapper:
        assert wrapper.mode == "plain-asyncio"
        assert str(wrapper.mode) == "plain-asyncio"
        assert wrapper.decision.pinned
        assert "PlainAsyncioStrategy" in wrapper.mode_reason
        assert "plain-asyncio" in repr(wrapper)

        result = await wrapper.run(*py("print('custom')"), check=True)
        assert (result.stdout.strip(), result.mode) == (b"custom", "plain-asyncio")

        async with wrapper.stream(*py("print('a'); print('b')")) as lines:
            assert [line.strip() async for line in lines] == [b"a", b"b"]

        with pytest.raises(pq.ProcessTimeoutError):
            await wrapper.run(*py("import time; time.sleep(30)"), timeout=0.2)


# The child leaves a process that quits its session (beyond any tree stop) holding its pipes.
ESCAPED_HOLDER = (
    "import subprocess, sys\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)'],"
    " start_new_session=True)\n"
    "print('parent done', flush=True)\n"
)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX sessions")
@pytest.mark.parametrize(
    "make", [PlainAsyncioStrategy, lambda: RecordingStrategy(AsyncStrategy())], ids=["own", "wrap"]
)
async def test_the_run_path_ends_a_custom_strategys_run_whoever_holds_the_pipes(
    make: Callable[[], SubprocessStrategy],
) -> None:
    # The default wait_exit/release_pipes hooks serve any asyncio process: the run ends once the
    # child exits (asyncio's wait() on 3.11 would wait for the escaped holder), output kept.
    mark, env = marked_env()
    try:
        async with pq.SubprocessWrapper(strategy=make(), grace_period=0.2) as wrapper:
            for run in (
                lambda: wrapper.run(*py(ESCAPED_HOLDER), env=env),
                lambda: collect(wrapper.stream(*py(ESCAPED_HOLDER), env=env)),
            ):
                result = await asyncio.wait_for(run(), 20)
                assert result == b"parent done\n" or (
                    isinstance(result, pq.ProcessResult)
                    and (result.returncode, result.stdout) == (0, b"parent done\n")
                )
    finally:
        await asyncio.to_thread(survivors_after, mark, 0.0)


async def collect(stream: pq.LineStream[bytes]) -> bytes:
    async with stream as lines:
        return b"".join([line async for line in lines])


async def test_a_module_run_records_the_custom_mode(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("print('job done')\n")
    registry = pq.RunRegistry()
    async with pq.ModuleRunner(registry, run_mode=PlainAsyncioStrategy()) as runner:
        run = await runner.execute_module("job", "Job", script)
    assert (run.status, run.mode) == (pq.RunStatus.COMPLETED, "plain-asyncio")
    stored = await registry.get_run(run.run_id)
    assert stored is not None and stored.mode == "plain-asyncio"


async def test_the_wrapper_tracks_and_stops_what_a_custom_strategy_started() -> None:
    wrapper = pq.SubprocessWrapper(strategy=PlainAsyncioStrategy(), grace_period=1.0)
    process = await wrapper.create_subprocess_exec(*py("import time; time.sleep(60)"))
    child = psutil.Process(process.pid)
    assert wrapper.live_processes == [process]
    await wrapper.aclose()
    assert process.returncode is not None
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


async def test_close_reaches_the_wrapped_strategy() -> None:
    inner = ThreadedStrategy()
    wrapper = pq.SubprocessWrapper(strategy=RecordingStrategy(inner))
    await wrapper.run(*py("pass"))
    closed: list[bool] = []
    original = inner.close

    def close() -> None:
        closed.append(True)
        original()

    inner.close = close  # type: ignore[method-assign]
    await wrapper.aclose()
    assert closed


def test_spawn_is_the_one_method_a_strategy_must_implement() -> None:
    class Incomplete(SubprocessStrategy):
        mode = "incomplete"

    with pytest.raises(TypeError, match="spawn"):
        Incomplete()  # type: ignore[abstract]


@pytest.mark.parametrize("mode", [None, "", "  ", 3])
def test_a_strategy_must_name_its_mode(mode: object) -> None:
    strategy = PlainAsyncioStrategy()
    strategy.mode = mode  # type: ignore[assignment]
    with pytest.raises(InvalidRunModeError, match="mode"):
        pq.SubprocessWrapper(strategy=strategy)


def test_strategy_and_mode_are_exclusive_and_checked() -> None:
    with pytest.raises(InvalidRunModeError, match="not both"):
        pq.SubprocessWrapper(pq.RunMode.ASYNC, strategy=AsyncStrategy())
    with pytest.raises(InvalidRunModeError, match="SubprocessStrategy"):
        pq.SubprocessWrapper(strategy=subprocess.Popen)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pq.SubprocessWrapper(strategy="threaded")  # type: ignore[arg-type]


async def test_passing_the_strategy_as_mode_still_works() -> None:
    strategy = RecordingStrategy(AsyncStrategy())
    async with pq.SubprocessWrapper(strategy) as wrapper:
        assert wrapper.strategy is strategy and wrapper.mode is pq.RunMode.ASYNC
        assert (await wrapper.run(*py("pass"))).returncode == 0
    assert len(strategy.commands) == 1
