"""override_strategy: the hook that gives auto-detected wrappers and the drop-ins a chosen mode."""

from __future__ import annotations

import asyncio
import signal
import threading
import warnings
from pathlib import Path

import psutil
import pytest
from helpers import PY, py

import prismq_subprocess as pq
from prismq_subprocess import ModeSource, RunMode, testing
from prismq_subprocess import exceptions as errors
from prismq_subprocess._core import _dropin
from prismq_subprocess._core._override import active_override
from prismq_subprocess.abc import ThreadedStrategy


def _threads() -> set[threading.Thread]:
    return set(threading.enumerate())


async def test_wrapper_without_mode_uses_the_override() -> None:
    with testing.override_strategy("threaded", reason="because"):
        async with pq.SubprocessWrapper() as wrapper:
            assert wrapper.mode is RunMode.THREADED
            assert wrapper.decision.source is ModeSource.OVERRIDE
            assert wrapper.decision.pinned
            assert wrapper.mode_reason == "because"
            result = await wrapper.run(*py("print('hi')"))
    assert result.stdout.strip() == b"hi" and result.mode is RunMode.THREADED
    async with pq.SubprocessWrapper() as after:
        assert after.decision.source is not ModeSource.OVERRIDE


async def test_explicit_mode_or_strategy_is_not_overridden() -> None:
    with testing.override_strategy(RunMode.DRY_RUN):
        async with (
            pq.SubprocessWrapper(RunMode.LOCAL) as named,
            pq.SubprocessWrapper(ThreadedStrategy()) as given,
        ):
            assert named.mode is RunMode.LOCAL and named.decision.source is ModeSource.ARGUMENT
            assert given.mode is RunMode.THREADED


async def test_override_wins_over_the_environment_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(pq.ENV_VAR, "local")
    with testing.override_strategy("dry-run"):
        async with pq.SubprocessWrapper() as wrapper:
            assert wrapper.mode is RunMode.DRY_RUN


async def test_factory_gives_each_wrapper_a_fresh_strategy_sharing_one_recorder() -> None:
    recorder = testing.DryRunRecorder({(PY, "-V"): 7})
    with testing.override_strategy(lambda: testing.DryRunStrategy(recorder=recorder)):
        async with pq.SubprocessWrapper() as one, pq.SubprocessWrapper() as two:
            assert one.strategy is not two.strategy
            assert (await one.run(PY, "-V")).returncode == 7
            assert (await two.run(PY, "-c", "pass")).returncode == 0
    assert recorder.commands == [(PY, "-V"), (PY, "-c", "pass")]


async def test_innermost_override_wins_and_nesting_unwinds() -> None:
    with testing.override_strategy("local"):
        with testing.override_strategy("dry-run"):
            inner = pq.SubprocessWrapper()
        outer = pq.SubprocessWrapper()
    try:
        assert inner.mode is RunMode.DRY_RUN
        assert outer.mode is RunMode.LOCAL
    finally:
        inner.cleanup()
        outer.cleanup()


async def test_dropins_use_a_wrapper_of_the_override_released_at_its_end() -> None:
    before = _threads()
    recorder = testing.DryRunRecorder()
    with testing.override_strategy(lambda: testing.DryRunStrategy(recorder=recorder)):
        result = await pq.run(PY, "-c", "print(1)")
        process = await pq.create_subprocess_exec(PY, "-V", stdout=pq.PIPE)
        await process.communicate()
    assert result.mode is RunMode.DRY_RUN
    assert recorder.commands == [(PY, "-c", "print(1)"), (PY, "-V")]
    assert None not in _dropin._shared or _dropin._shared[None].mode is not RunMode.DRY_RUN

    with testing.override_strategy("threaded"):
        result = await pq.run(*py("print('real')"))
        override = active_override()
        assert override is not None and override.dropin is not None
        held = override.dropin
        assert held.mode is RunMode.THREADED
    assert result.stdout.strip() == b"real"
    assert override.dropin is None
    # The block's drop-in wrapper was closed: its threads end.
    for thread in _threads() - before:
        if thread.name.startswith("prismq"):
            thread.join(5)
            assert not thread.is_alive(), thread
    with pytest.raises(errors.WrapperClosedError):
        await held.run(*py("pass"))


async def test_a_child_of_the_dropin_wrapper_still_running_is_killed_at_the_end() -> None:
    with testing.override_strategy("async"):
        process = await pq.create_subprocess_exec(*py("import time; time.sleep(60)"))
    assert await asyncio.wait_for(process.wait(), 10) == -signal.SIGKILL


async def test_module_runner_without_mode_follows_the_override(tmp_path: Path) -> None:
    script = tmp_path / "job.py"
    script.write_text("print('never runs')\n")
    recorder = testing.DryRunRecorder()
    with testing.override_strategy(lambda: testing.DryRunStrategy(recorder=recorder)):
        async with pq.RunRegistry() as registry, pq.ModuleRunner(registry) as runner:
            run = await runner.execute_module("job", "Job", script, {"n": 2})
    assert run.status is pq.RunStatus.COMPLETED and run.mode == "dry-run"
    assert recorder.commands[0][-2:] == ("--n", "2")
    assert not psutil.Process().children(recursive=True)


def test_bad_overrides_are_refused() -> None:
    with pytest.raises(errors.InvalidRunModeError, match="not a run mode"):
        testing.override_strategy("warp").__enter__()
    with pytest.raises(errors.InvalidRunModeError, match="callable"):
        testing.override_strategy(3).__enter__()  # type: ignore[arg-type]
    not_a_strategy = testing.override_strategy(lambda: "no")  # type: ignore[arg-type,return-value]
    with (
        not_a_strategy,
        pytest.raises(errors.InvalidRunModeError, match="not a SubprocessStrategy"),
    ):
        pq.SubprocessWrapper()
    shared = testing.DryRunStrategy()
    with testing.override_strategy(lambda: shared):
        first = pq.SubprocessWrapper()
        with pytest.raises(errors.InvalidCommandError, match="already belongs"):
            pq.SubprocessWrapper()
    first.cleanup()


def test_override_is_not_active_outside_a_block() -> None:
    with testing.override_strategy("local"):
        assert active_override() is not None
    assert active_override() is None


async def test_a_wrapper_built_before_the_override_warns_when_it_starts_a_command() -> None:
    async with pq.SubprocessWrapper() as early, pq.SubprocessWrapper(RunMode.ASYNC) as pinned:
        with testing.override_strategy("dry-run", reason="the test's DRY_RUN"):
            with pytest.warns(RuntimeWarning, match="before the test's DRY_RUN began") as seen:
                result = await early.run(*py("print('real')"))
            assert seen[0].filename == __file__  # it points at the caller
            assert result.stdout == b"real\n"  # not overridden: it really ran
            with pytest.warns(RuntimeWarning, match="does not cover") as seen:
                process = await early.create_subprocess_exec(*py("pass"))
            assert seen[0].filename == __file__
            await process.wait()
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                await pinned.run(*py("pass"))  # a mode chosen by the caller is meant
                async with pq.SubprocessWrapper() as inside:
                    await inside.run(PY, "-V")  # built inside: overridden, no warning
