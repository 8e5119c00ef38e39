"""Simulated Windows: a loop whose subprocess support raises NotImplementedError."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from helpers import py

import prismq_subprocess as pq
from prismq_subprocess import RunMode


class NoSubprocessLoop(asyncio.SelectorEventLoop):
    """Like Windows' SelectorEventLoop: everything works but spawning."""

    async def _make_subprocess_transport(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def run_on_selector_like_windows(coro_factory: Any) -> Any:
    with asyncio.Runner(loop_factory=NoSubprocessLoop) as runner:
        return runner.run(coro_factory())


def test_plain_asyncio_cannot_spawn_on_this_loop() -> None:
    async def main() -> None:
        await asyncio.create_subprocess_exec(*py("pass"))

    with pytest.raises(NotImplementedError):
        run_on_selector_like_windows(main)


def test_auto_detected_async_falls_back_to_threaded(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PRISMQ_RUN_MODE", raising=False)

    async def main() -> tuple[list[RunMode], bytes, int]:
        async with pq.SubprocessWrapper() as w:
            modes = [w.mode]
            result = await w.run(*py("print('via threads')"))
            modes.append(w.mode)
            proc = await w.create_subprocess_exec(*py("print(2)"), stdout=pq.PIPE)
            out, _ = await proc.communicate()
            modes.append(w.mode)
            assert "NoSubprocessLoop" in w.mode_reason
            return modes, result.stdout + out, len(caplog.records)

    with caplog.at_level(logging.WARNING, logger="prismq_subprocess"):
        modes, out, _ = run_on_selector_like_windows(main)
    assert modes == [RunMode.ASYNC, RunMode.THREADED, RunMode.THREADED]
    assert out == b"via threads\n2\n"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # one warning, then THREADED from then on
    assert "THREADED" in warnings[0].getMessage()


def test_module_level_drop_in_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PRISMQ_RUN_MODE", raising=False)

    async def main() -> bytes:
        w = pq.SubprocessWrapper()
        try:
            proc = await w.create_subprocess_exec(*py("print('ok')"), stdout=pq.PIPE)
            out, _ = await proc.communicate()
            assert out is not None
            return out
        finally:
            await w.aclose()

    assert run_on_selector_like_windows(main) == b"ok\n"


@pytest.mark.parametrize("pin", ["argument", "environment"])
def test_pinned_async_raises_policy_error(pin: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if pin == "environment":
        monkeypatch.setenv("PRISMQ_RUN_MODE", "async")
        make = pq.SubprocessWrapper
    else:
        monkeypatch.delenv("PRISMQ_RUN_MODE", raising=False)

        def make() -> pq.SubprocessWrapper:
            return pq.SubprocessWrapper(RunMode.ASYNC)

    async def main() -> None:
        async with make() as w:
            with pytest.raises(pq.SubprocessPolicyException) as info:
                await w.run(*py("pass"))
            message = str(info.value)
            assert "THREADED" in message and "loop_factory" in message
            with pytest.raises(pq.SubprocessPolicyException):
                await w.create_subprocess_exec(*py("pass"))
            assert w.mode is RunMode.ASYNC  # never silently switched

    run_on_selector_like_windows(main)


def test_threaded_works_on_a_loop_that_cannot_spawn() -> None:
    async def main() -> bytes:
        async with pq.SubprocessWrapper(RunMode.THREADED) as w:
            return (await w.run(*py("print('fine')"))).stdout

    assert run_on_selector_like_windows(main) == b"fine\n"


class SuspendingNoSubprocessLoop(asyncio.SelectorEventLoop):
    """A loop (uvloop-like, not asyncio's own) that finds out it cannot spawn only after a
    suspension, so concurrent first spawns overlap on every Python version."""

    async def _make_subprocess_transport(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.01)
        raise NotImplementedError


@pytest.mark.parametrize("loop_factory", [NoSubprocessLoop, SuspendingNoSubprocessLoop])
def test_concurrent_first_spawns_all_fall_back(
    loop_factory: type[asyncio.AbstractEventLoop], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A web app's first requests often spawn together. Every spawn that was already under way in
    # ASYNC when the first of them fell back must fall back too, not hand the loop's bare
    # NotImplementedError to its caller (on 3.11 even asyncio's own loop, raising at once,
    # overlaps them: the creation task starts on the next loop iteration).
    monkeypatch.delenv("PRISMQ_RUN_MODE", raising=False)

    async def main() -> list[object]:
        async with pq.SubprocessWrapper() as w:
            runs = [w.run(*py("print('run')")) for _ in range(3)]
            spawns = [w.create_subprocess_exec(*py("print('exec')"), stdout=pq.PIPE)]
            results = await asyncio.gather(*runs, *spawns, return_exceptions=True)
            outputs: list[object] = []
            for result in results:
                if isinstance(result, pq.ProcessResult):
                    outputs.append(result.stdout)
                elif isinstance(result, BaseException):
                    outputs.append(result)
                else:
                    outputs.append((await result.communicate())[0])
            assert w.mode is RunMode.THREADED
            return outputs

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        outputs = runner.run(main())
    assert outputs == [b"run\n"] * 3 + [b"exec\n"]


@pytest.mark.parametrize("loop_factory", [NoSubprocessLoop, SuspendingNoSubprocessLoop])
def test_concurrent_spawns_in_a_pinned_async_all_raise_the_policy_error(
    loop_factory: type[asyncio.AbstractEventLoop],
) -> None:
    async def main() -> list[BaseException]:
        async with pq.SubprocessWrapper(RunMode.ASYNC) as w:
            return await asyncio.gather(
                *(w.run(*py("pass")) for _ in range(3)), return_exceptions=True
            )

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        errors = runner.run(main())
    assert all(isinstance(e, pq.SubprocessPolicyException) for e in errors), errors
