"""Auto-detection with injected platform, loop, policy and environment."""

from __future__ import annotations

import asyncio

import pytest

import prismq_subprocess as pq
from prismq_subprocess import ModeSource, RunMode, detect_run_mode


class ProactorEventLoop(asyncio.SelectorEventLoop):
    """A stand-in: detection goes by class name, so Linux can play Windows' Proactor loop."""


class WindowsProactorEventLoopPolicy:
    """A stand-in for the Windows policy that makes Proactor loops."""


class WindowsSelectorEventLoopPolicy:
    """A stand-in for the Windows policy that makes selector loops."""

    _loop_factory = asyncio.SelectorEventLoop


def test_env_var_wins() -> None:
    decision = detect_run_mode(env={"PRISMQ_RUN_MODE": " Dry_Run "}, platform="win32", loop=None)
    assert decision.mode is RunMode.DRY_RUN
    assert decision.source is ModeSource.ENVIRONMENT
    assert decision.pinned
    assert "PRISMQ_RUN_MODE" in decision.reason


def test_invalid_env_var_is_an_error_naming_it() -> None:
    with pytest.raises(pq.exceptions.InvalidRunModeError) as info:
        detect_run_mode(env={"PRISMQ_RUN_MODE": "fast"})
    assert "PRISMQ_RUN_MODE" in str(info.value)
    assert "'threaded'" in str(info.value)


def test_empty_env_var_means_auto() -> None:
    decision = detect_run_mode(env={"PRISMQ_RUN_MODE": "  "}, platform="linux")
    assert decision.source is ModeSource.AUTO


@pytest.mark.parametrize("platform", ["linux", "darwin", "freebsd13"])
def test_posix_is_async(platform: str) -> None:
    decision = detect_run_mode(env={}, platform=platform)
    assert decision.mode is RunMode.ASYNC
    assert not decision.pinned
    assert platform in decision.reason
    assert str(decision).startswith("async (")


def test_windows_running_proactor_loop_is_async() -> None:
    loop = ProactorEventLoop()
    try:
        decision = detect_run_mode(env={}, platform="win32", loop=loop)
    finally:
        loop.close()
    assert decision.mode is RunMode.ASYNC
    assert "Proactor" in decision.reason


def test_windows_running_selector_loop_is_threaded() -> None:
    loop = asyncio.SelectorEventLoop()
    try:
        decision = detect_run_mode(env={}, platform="win32", loop=loop)
    finally:
        loop.close()
    assert decision.mode is RunMode.THREADED
    assert "SelectorEventLoop" in decision.reason


def test_windows_without_loop_asks_the_policy() -> None:
    proactor = detect_run_mode(
        env={}, platform="win32", loop=None, policy=WindowsProactorEventLoopPolicy()
    )
    assert proactor.mode is RunMode.ASYNC
    selector = detect_run_mode(
        env={}, platform="win32", loop=None, policy=WindowsSelectorEventLoopPolicy()
    )
    assert selector.mode is RunMode.THREADED


async def test_running_loop_is_used_by_default() -> None:
    decision = detect_run_mode(env={}, platform="win32")
    # pytest-asyncio runs a selector loop here: Windows rules would pick THREADED
    assert decision.mode is RunMode.THREADED


def test_wrapper_pinned_by_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PRISMQ_RUN_MODE", "local")
    wrapper = pq.SubprocessWrapper()
    try:
        assert wrapper.mode is RunMode.LOCAL
        assert wrapper.decision.pinned
    finally:
        wrapper.cleanup()
    monkeypatch.setenv("PRISMQ_RUN_MODE", "bogus")
    with pytest.raises(pq.exceptions.InvalidRunModeError):
        pq.SubprocessWrapper()
