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
from typing import Any

import psutil
import pytest
from helpers import py
from lifecycle_helpers import marked_env, survivors_after

import prismq_subprocess as pq
from prismq_subprocess.abc import (
    AsyncStrategy,
    LocalStrategy,
    ProcessLike,
    SpawnRequest,
    SubprocessStrategy,
    ThreadedStrategy,
)
from prismq_subprocess.exceptions import InvalidRunModeError, StrategyContractError
from prismq_subprocess.testing import DryRunRecorder, DryRunStrategy


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


# -- a strategy that breaks its contract --------------------------------------------------------


class _Bare:
    """Has a pid and little else: not a process object."""

    pid = 4_194_305  # a fake pid above Linux's pid_max: never a real process
    returncode = None


class _NoSignal:
    """A hand-written proxy around an asyncio process that forgot ``send_signal``."""

    def __init__(self, inner: asyncio.subprocess.Process) -> None:
        self._inner = inner
        self.pid = inner.pid
        self.stdin, self.stdout, self.stderr = inner.stdin, inner.stdout, inner.stderr

    @property
    def returncode(self) -> int | None:
        return self._inner.returncode

    async def wait(self) -> int:
        return await self._inner.wait()

    async def communicate(self, input: bytes | None = None) -> tuple[bytes | None, bytes | None]:
        return await self._inner.communicate(input)

    def terminate(self) -> None:
        self._inner.terminate()

    def kill(self) -> None:
        self._inner.kill()


class ReturnsWhat(SubprocessStrategy):
    """Returns ``make(request)`` from spawn (starting a real child first when asked)."""

    mode = "returns-what"

    def __init__(self, make: Callable[[SpawnRequest], object]) -> None:
        super().__init__()
        self.make = make
        self.closed = False

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        return self.make(request)  # type: ignore[return-value]

    def close(self) -> None:
        self.closed = True


class ProxyStrategy(PlainAsyncioStrategy):
    """Starts a real child, returns it behind a proxy that lacks ``send_signal``."""

    mode = "proxy"

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        process = await super().spawn(request)
        assert isinstance(process, asyncio.subprocess.Process)
        return _NoSignal(process)  # type: ignore[return-value]


async def _each_entry_point(
    wrapper: pq.SubprocessWrapper, *cmd: str, **kwargs: Any
) -> list[BaseException]:
    """Start ``cmd`` through create_subprocess_exec, run() and stream(); the errors raised."""
    errors: list[BaseException] = []
    for attempt in (
        lambda: wrapper.create_subprocess_exec(*cmd, stdout=pq.PIPE, **kwargs),
        lambda: wrapper.run(*cmd, **kwargs),
        lambda: collect(wrapper.stream(*cmd, **kwargs)),
    ):
        try:
            await asyncio.wait_for(attempt(), 20)
        except Exception as exc:
            errors.append(exc)
    return errors


@pytest.mark.parametrize(
    ("returned", "missing"),
    [(lambda request: None, "pid"), (lambda request: _Bare(), "send_signal")],
    ids=["none", "bare"],
)
async def test_a_spawn_returning_no_process_object_is_refused_clearly(
    returned: Callable[[SpawnRequest], object], missing: str
) -> None:
    # Before: create_subprocess_exec returned None, run()/stream() raised AttributeError deep in
    # the run path, and the object was tracked, so aclose() raised too and never closed the
    # strategy.
    strategy = ReturnsWhat(returned)
    wrapper = pq.SubprocessWrapper(strategy=strategy, grace_period=0.5)
    errors = await _each_entry_point(wrapper, *py("pass"))
    assert len(errors) == 3
    for error in errors:
        assert isinstance(error, StrategyContractError), repr(error)
        assert isinstance(error, pq.PrismQError) and isinstance(error, TypeError)
        assert "ReturnsWhat.spawn()" in str(error) and missing in str(error)
    assert wrapper.live_processes == []
    await wrapper.aclose()
    assert strategy.closed


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX sessions")
async def test_a_spawn_returning_a_popen_is_refused_and_its_child_killed() -> None:
    # A Popen has every member a process object has, but its wait() and reads block: the run
    # path would block the event loop on its pipe. The child it started is not left running.
    mark, env = marked_env()

    def popen(request: SpawnRequest) -> subprocess.Popen[bytes]:
        assert isinstance(request.command, tuple)
        return subprocess.Popen(
            request.command,
            stdin=request.stdin,
            stdout=request.stdout,
            stderr=request.stderr,
            **request.kwargs,
        )

    try:
        async with pq.SubprocessWrapper(strategy=ReturnsWhat(popen), grace_period=0.5) as wrapper:
            errors = await _each_entry_point(wrapper, *py("import time; time.sleep(30)"), env=env)
            assert [type(error) for error in errors] == [StrategyContractError] * 3
            assert "Popen" in str(errors[0])
            assert wrapper.live_processes == []
    finally:
        assert await asyncio.to_thread(survivors_after, mark, 5.0) == []


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX sessions")
async def test_a_proxy_lacking_a_member_is_refused_and_its_child_killed() -> None:
    mark, env = marked_env()
    try:
        async with pq.SubprocessWrapper(strategy=ProxyStrategy(), grace_period=0.5) as wrapper:
            errors = await _each_entry_point(wrapper, *py("import time; time.sleep(30)"), env=env)
            assert [type(error) for error in errors] == [StrategyContractError] * 3
            assert "send_signal" in str(errors[0])
    finally:
        assert await asyncio.to_thread(survivors_after, mark, 5.0) == []


@pytest.mark.parametrize("inner", [AsyncStrategy, ThreadedStrategy, LocalStrategy])
async def test_a_wrapping_strategys_run_delivers_its_input(
    inner: Callable[[], SubprocessStrategy],
) -> None:
    # Before: wrapping LOCAL, run(input=...) gave the child an empty stdin: the run path waited
    # for the exit before its feeding task had written anything, and a LOCAL process waited for
    # hands its input over (and closes stdin) at that moment.
    data = b"abc" * 50_000  # more than a pipe holds
    async with pq.SubprocessWrapper(strategy=RecordingStrategy(inner())) as wrapper:
        result = await wrapper.run(
            *py("import sys; d = sys.stdin.buffer.read(); print(len(d), d[:3])"), input=data
        )
    assert result.stdout.split() == [str(len(data)).encode(), b"b'abc'"]


async def test_a_wrapping_strategy_over_dry_run_records_the_input() -> None:
    recorder = DryRunRecorder()
    strategy = RecordingStrategy(DryRunStrategy(recorder=recorder))
    async with pq.SubprocessWrapper(strategy=strategy) as wrapper:
        await wrapper.run("git", "apply", input=b"patch")
    assert [call.input for call in recorder.calls] == [b"patch"]
