"""DryRunScript: per-command scripted answers, strictness, and lines streamed over time."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
from pathlib import Path

import pytest
from helpers import PY

import prismq_subprocess as pq
from prismq_subprocess import exceptions as errors
from prismq_subprocess import testing
from prismq_subprocess._testing._streamed import StreamedDryRunProcess, StreamedResponse


def wrapper_for(script: testing.DryRunScript) -> pq.SubprocessWrapper:
    return pq.SubprocessWrapper(script.strategy())


async def test_exact_prefix_regex_and_predicate_matches() -> None:
    script = testing.DryRunScript()
    exact = script.register((PY, "-V"), stdout="Python 3\n")
    head = script.register(prefix=(PY, "-m"), returncode=4)
    pattern = script.register(regex=r"-c .*boom", returncode=9, stderr=b"boom\n")
    chosen = script.register(match=lambda call: call.cwd is not None, stdout=b"in a dir")
    shell = script.register("echo hi | cat", stdout="hi\n")
    async with wrapper_for(script) as w:
        assert (await w.run(PY, "-V")).stdout == b"Python 3\n"
        assert (await w.run(PY, "-m", "pip", "list")).returncode == 4
        failed = await w.run(PY, "-c", "raise SystemExit('boom')")
        assert (failed.returncode, failed.stderr) == (9, b"boom\n")
        assert (await w.run(PY, "-c", "pass", cwd=".")).stdout == b"in a dir"
        assert (await w.run("echo hi | cat", shell=True)).stdout == b"hi\n"
    assert [len(rule.calls) for rule in (exact, head, pattern, chosen, shell)] == [1] * 5
    assert script.calls_matching(prefix=(PY, "-m"))[0].args == (PY, "-m", "pip", "list")
    assert len(script.calls_matching(regex=re.compile(r"^\S+ -"))) == 4
    assert script.commands[-1] == "echo hi | cat"


async def test_first_matching_rule_answers_and_one_shot_rules_make_a_sequence() -> None:
    script = testing.DryRunScript()
    for code in (1, 2):
        script.register((PY, "-V"), returncode=code, times=1)
    script.register(prefix=(PY,), returncode=5)
    async with wrapper_for(script) as w:
        codes = [(await w.run(PY, "-V")).returncode for _ in range(4)]
    assert codes == [1, 2, 5, 5]
    assert [rule.used_up for rule in script.rules] == [True, True, False]


async def test_strict_script_refuses_an_unscripted_command_with_a_clear_message() -> None:
    script = testing.DryRunScript()
    script.register((PY, "-V"), times=1)
    async with wrapper_for(script) as w:
        await w.run(PY, "-V")
        with pytest.raises(errors.UnscriptedCommandError) as caught:
            await w.run(PY, "-V")
        with pytest.raises(AssertionError):
            await w.create_subprocess_exec(PY, "-c", "pass")
    message = str(caught.value)
    assert repr((PY, "-V")) in message and "used up" in message and "register(" in message
    assert caught.value.command == (PY, "-V")
    assert [call.args for call in script.unscripted] == [(PY, "-V"), (PY, "-c", "pass")]
    assert script.commands == [(PY, "-V")]  # refused commands were not answered
    report = script.unscripted_report()
    assert report is not None and report.startswith("2 command(s)")
    assert script.unscripted_report(start=2) is None


async def test_non_strict_script_answers_unscripted_commands_with_the_default() -> None:
    script = testing.DryRunScript(strict=False, default=testing.DryRunResponse(returncode=3))
    async with wrapper_for(script) as w:
        assert (await w.run(PY, "-c", "anything")).returncode == 3
    assert script.unscripted == [] and len(script.unmatched) == 1


async def test_lines_stream_in_order_and_not_before_their_time() -> None:
    script = testing.DryRunScript()
    delay = 0.05
    script.register(
        (PY, "job.py"), lines=["one", b"two\n", "three"], line_delay=delay, returncode=2
    )
    loop = asyncio.get_running_loop()
    seen: list[tuple[str, float, int | None]] = []
    async with wrapper_for(script) as w:
        started = loop.time()
        async with w.stream(PY, "job.py", encoding="utf-8") as lines:
            async for line in lines:
                seen.append((line, loop.time() - started, lines.process.returncode))
        assert lines.returncode == 2
        result = await w.run(PY, "job.py")
    assert [text for text, _, _ in seen] == ["one\n", "two\n", "three\n"]
    for position, (_, at, _) in enumerate(seen):
        assert at >= (position + 1) * delay - 0.01  # a timer never fires early
    assert seen[0][2] is None  # the first line arrived while the fake child was still running
    assert result.stdout == b"one\ntwo\nthree\n" and result.returncode == 2
    assert result.duration >= 3 * delay - 0.01


async def test_streamed_process_merges_stderr_at_the_end_and_records_input() -> None:
    script = testing.DryRunScript()
    script.register((PY, "-"), lines=["out"], stderr="err\n", duration=0.05)
    async with wrapper_for(script) as w:
        process = await w.create_subprocess_exec(
            PY, "-", stdin=pq.PIPE, stdout=pq.PIPE, stderr=pq.STDOUT
        )
        assert isinstance(process, StreamedDryRunProcess)
        out, err = await process.communicate(b"data")
    assert (out, err, process.returncode) == (b"out\nerr\n", None, 0)
    assert script.calls[0].input == b"data"


async def test_stopping_a_streaming_fake_ends_it_with_the_signal() -> None:
    script = testing.DryRunScript()
    script.register((PY, "forever"), lines=["tick"] * 3, line_delay=0.01, duration=float("inf"))
    async with wrapper_for(script) as w:
        async with w.stream(PY, "forever", encoding="utf-8") as lines:
            async for _ in lines:
                break
        assert lines.returncode == -signal.SIGTERM
        with pytest.raises(pq.ProcessTimeoutError):
            await w.run(PY, "forever", timeout=0.05)


@pytest.mark.parametrize("lines", [None, ["a", "b"]], ids=["plain", "lines"])
async def test_a_fake_goes_on_after_a_signal_a_real_process_survives(
    lines: list[str] | None,
) -> None:
    # A probe's find: a fake streaming lines ended on any signal (0, the "still alive?" probe,
    # even made it look exited with 0) and took numbers no signal has; the plain fake and the
    # real modes did neither.
    script = testing.DryRunScript()
    options = {"lines": lines, "line_delay": 0.5} if lines else {}
    script.register((PY, "serve"), duration=float("inf"), **options)  # type: ignore[arg-type]
    async with wrapper_for(script) as w:
        process = await w.create_subprocess_exec(PY, "serve", stdout=asyncio.subprocess.PIPE)
        for sig in (0, signal.SIGCONT, signal.SIGCHLD, signal.SIGSTOP):
            process.send_signal(sig)
            await asyncio.sleep(0)
            assert process.returncode is None, sig
        with pytest.raises(OSError):
            process.send_signal(12345)
        process.terminate()
        assert await process.wait() == -signal.SIGTERM


async def test_a_run_cut_by_its_timeout_carries_the_lines_streamed_so_far() -> None:
    # A probe's find: run() put a streamed answer's every line in its buffer at the start, so
    # the ProcessTimeoutError of a run cut short carried lines the "child" never printed (a
    # host's "show the partial output" path was tested against output that does not exist).
    script = testing.DryRunScript()
    script.register((PY, "slow"), lines=["a", "b", "c", "d"], line_delay=0.5)
    async with wrapper_for(script) as w:
        with pytest.raises(pq.ProcessTimeoutError) as caught:
            await w.run(PY, "slow", timeout=0.7)  # only "a" is out by then
        assert caught.value.stdout == b"a\n"
        assert (await w.run(PY, "slow", timeout=10)).stdout == b"a\nb\nc\nd\n"


def test_register_refuses_bad_input_clearly() -> None:
    script = testing.DryRunScript()
    with pytest.raises(errors.InvalidCommandError, match="exactly one"):
        script.register()
    with pytest.raises(errors.InvalidCommandError, match="exactly one"):
        script.register((PY,), prefix=(PY,))
    with pytest.raises(errors.InvalidCommandError, match="empty"):
        script.register(())
    with pytest.raises(errors.InvalidArgumentTypeError, match="argument 1"):
        script.register((PY, 3))  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidCommandError, match="does not compile"):
        script.register(regex="(")
    with pytest.raises(errors.InvalidArgumentTypeError, match="callable"):
        script.register(match="yes")  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidCommandError, match="not both"):
        script.register((PY,), stdout="x", lines=["y"])
    with pytest.raises(errors.InvalidArgumentTypeError, match="list of lines"):
        script.register((PY,), lines="one line")
    with pytest.raises(errors.InvalidCommandError, match="needs lines"):
        script.register((PY,), line_delay=1)
    with pytest.raises(errors.InvalidTimeoutError):
        script.register((PY,), duration=-1)
    with pytest.raises(errors.InvalidArgumentTypeError, match="returncode"):
        script.register((PY,), returncode=True)
    with pytest.raises(errors.InvalidLimitError, match="times"):
        script.register((PY,), times=0)
    assert script.rules == []


def test_a_streamed_response_is_a_dry_run_response() -> None:
    script = testing.DryRunScript()
    rule = script.register((PY,), lines=["a", "b"], line_delay=0.5, duration=0.1)
    response = rule.response
    assert isinstance(response, StreamedResponse) and isinstance(response, testing.DryRunResponse)
    assert response.duration == 1.0 and response.stdout == b"a\nb\n"


def test_a_match_predicate_may_look_at_the_script() -> None:
    script = testing.DryRunScript()
    script.register(match=lambda call: not script.unmatched and len(script.rules) == 1)
    call = testing.DryRunCall(args=(PY, "-V"), shell=False, cwd=None, env=None)
    answers: list[testing.DryRunResponse] = []
    # In a thread, so that a lock the predicate cannot take fails the test instead of hanging it.
    worker = threading.Thread(target=lambda: answers.append(script(call)), daemon=True)
    worker.start()
    worker.join(5)
    assert answers == [testing.DryRunResponse()]


async def test_arguments_are_checked_but_the_program_is_not_looked_up(tmp_path: Path) -> None:
    # docs/TESTING.md: the arguments are validated as in the real modes; whether the program
    # exists on this machine is not (a test may script `git` where git is not installed).
    script = testing.DryRunScript()
    script.register(prefix=("no-such-program-here",), stdout="scripted\n")
    async with wrapper_for(script) as w:
        result = await w.run("no-such-program-here", "--flag")
        assert result.stdout == b"scripted\n"
        with pytest.raises(errors.InvalidArgumentTypeError):
            await w.run("no-such-program-here", 3)  # type: ignore[arg-type]
        with pytest.raises(errors.CwdNotFoundError):
            await w.run("no-such-program-here", cwd=tmp_path / "missing")
    async with pq.SubprocessWrapper(pq.RunMode.THREADED) as real:
        with pytest.raises(errors.CommandNotFoundError):
            await real.run("no-such-program-here", "--flag")
    assert script.commands == [("no-such-program-here", "--flag")]


# -- misuses found by a probe (session 36) ------------------------------------------------------
async def test_a_match_predicate_that_raises_is_a_scripting_error_the_test_cannot_swallow() -> None:
    # It raised the predicate's bare error into the application, which could catch it and
    # pass; the call was neither recorded nor listed as unscripted.
    script = testing.DryRunScript()
    script.register(match=lambda call: call.args[5] == "x", stdout="never")
    async with wrapper_for(script) as w:
        with pytest.raises(errors.UnscriptedCommandError, match="match predicate") as caught:
            await w.run(PY, "-V")
    assert isinstance(caught.value.__cause__, IndexError)
    assert [call.args for call in script.unscripted] == [(PY, "-V")]


def test_an_async_match_predicate_is_refused() -> None:
    # Its result (a coroutine) is always true: the rule answered every command.
    async def wanted(call: testing.DryRunCall) -> bool:
        return call.args[0] == "git"

    script = testing.DryRunScript()
    with pytest.raises(errors.InvalidArgumentTypeError, match="async"):
        script.register(match=wanted, stdout="x")


def test_a_bytes_regex_is_refused() -> None:
    # Accepted, then every run raised a bare TypeError (a bytes pattern on text).
    script = testing.DryRunScript()
    for regex in (re.compile(rb"git"), rb"git"):
        with pytest.raises(errors.InvalidArgumentTypeError, match="str"):
            script.register(regex=regex, stdout="x")  # type: ignore[arg-type]


def test_recorders_and_strategies_of_the_wrong_kind_are_refused() -> None:
    # Accepted, then the first run failed with a bare AttributeError (a list for the
    # recorder's results, a dict or a DryRunScript as a strategy's recorder).
    with pytest.raises(errors.InvalidArgumentTypeError):
        testing.DryRunRecorder([(("git",), 0)])  # type: ignore[arg-type]
    for recorder in ({("git",): 0}, testing.DryRunScript()):
        with pytest.raises(errors.InvalidArgumentTypeError, match="recorder"):
            testing.DryRunStrategy(recorder=recorder)  # type: ignore[arg-type]


def test_override_strategy_given_a_script_rather_than_its_strategy_is_refused() -> None:
    # override_strategy(script) (forgetting .strategy) failed later, where the application
    # built a wrapper, with a bare TypeError.
    with (
        pytest.raises(errors.InvalidArgumentTypeError, match=r"script\.strategy"),
        testing.override_strategy(testing.DryRunScript()),  # type: ignore[arg-type]
    ):
        pq.SubprocessWrapper()
