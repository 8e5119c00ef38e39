"""Detection and its fallback where Windows differs: no event-loop policy API (Python 3.16
removes it), the fallback warning of a bare ``NotImplementedError``, and the advice of a mode
pinned by ``PRISMQ_RUN_MODE``. Windows' selector loop is played by a loop that cannot spawn."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from helpers import py

import prismq_subprocess as pq
from prismq_subprocess import ModeSource, RunMode, detect_run_mode


class NoSubprocessLoop(asyncio.SelectorEventLoop):
    """Like Windows' SelectorEventLoop: everything works but spawning (a bare
    ``NotImplementedError``, as ``BaseEventLoop._make_subprocess_transport`` raises)."""

    async def _make_subprocess_transport(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


def test_windows_without_a_policy_api_decides_from_the_platform(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # No loop runs and asyncio has no policy to ask: asyncio.run() then makes Windows' default
    # loop, a Proactor loop; a wrong guess is corrected on the first spawn.
    monkeypatch.delattr(asyncio, "get_event_loop_policy")
    decision = detect_run_mode(env={}, platform="win32", loop=None)
    assert decision.mode is RunMode.ASYNC
    assert decision.source is ModeSource.AUTO and not decision.pinned
    assert "policy" in decision.reason
    assert detect_run_mode(env={}, platform="linux", loop=None).mode is RunMode.ASYNC


def test_the_fallback_warning_names_a_bare_not_implemented_error(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PRISMQ_RUN_MODE", raising=False)

    async def main() -> str:
        async with pq.SubprocessWrapper() as w:
            await w.run(*py("pass"))
            return w.mode_reason

    with (
        caplog.at_level(logging.WARNING, logger="prismq_subprocess"),
        asyncio.Runner(loop_factory=NoSubprocessLoop) as runner,
    ):
        reason = runner.run(main())
    assert "()" not in reason, reason
    assert "(NotImplementedError)" in reason, reason
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "(NotImplementedError)" in warning.getMessage()


@pytest.mark.parametrize("pin", ["argument", "environment"])
def test_the_policy_error_advises_what_pinned_the_mode(
    pin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if pin == "environment":
        monkeypatch.setenv("PRISMQ_RUN_MODE", "async")
        mode: RunMode | None = None
    else:
        monkeypatch.delenv("PRISMQ_RUN_MODE", raising=False)
        mode = RunMode.ASYNC

    async def main() -> str:
        async with pq.SubprocessWrapper(mode) as w:
            with pytest.raises(pq.SubprocessPolicyException) as info:
                await w.run(*py("pass"))
            return str(info.value)

    with asyncio.Runner(loop_factory=NoSubprocessLoop) as runner:
        message = runner.run(main())
    assert "loop_factory" in message  # the Proactor route is advised either way
    if pin == "environment":
        assert "PRISMQ_RUN_MODE=threaded" in message and "unset" in message, message
        assert "mode=" not in message, message
    else:
        assert "mode=RunMode.THREADED" in message, message
        assert "PRISMQ_RUN_MODE=threaded" not in message, message
