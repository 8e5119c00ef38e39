"""DRY_RUN: nothing starts; commands are recorded and answered from a script."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import pytest

import prismq_subprocess as pq
from prismq_subprocess import PIPE, RunMode
from prismq_subprocess.exceptions import (
    InvalidArgumentTypeError,
    InvalidCommandError,
    InvalidTimeoutError,
)
from prismq_subprocess.testing import DryRunCall, DryRunRecorder, DryRunResponse


def make(responses: object = None, **kwargs: object) -> tuple[pq.SubprocessWrapper, DryRunRecorder]:
    recorder = DryRunRecorder(responses, **kwargs)  # type: ignore[arg-type]
    return pq.SubprocessWrapper(pq.testing.DryRunStrategy(recorder=recorder)), recorder


async def test_default_answer_and_recording(caplog: pytest.LogCaptureFixture) -> None:
    wrapper, recorder = make()
    with caplog.at_level(logging.INFO, logger="prismq_subprocess"):
        result = await wrapper.run("git", "status", cwd=".", env={"A": "1"})
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    assert result.mode is RunMode.DRY_RUN
    [call] = recorder.calls
    assert call.args == ("git", "status")
    assert call.cwd == "." and call.env == {"A": "1"} and not call.shell
    assert "git status" in caplog.text
    assert wrapper.mode is RunMode.DRY_RUN
    await wrapper.aclose()


async def test_table_answers_per_command() -> None:
    wrapper, recorder = make(
        {
            ("git", "status"): DryRunResponse(stdout=b"clean\n"),
            ("make",): 2,
            "ls | wc -l": DryRunResponse(stdout=b"7\n"),
        }
    )
    assert (await wrapper.run("git", "status")).stdout == b"clean\n"
    with pytest.raises(pq.ProcessFailedError) as info:
        await wrapper.run("make", check=True)
    assert info.value.returncode == 2
    assert (await wrapper.run("ls | wc -l", shell=True)).stdout == b"7\n"
    assert (await wrapper.run("other")).returncode == 0
    assert recorder.commands == [("git", "status"), ("make",), "ls | wc -l", ("other",)]
    await wrapper.aclose()


async def test_handler_callable_and_process_api() -> None:
    def handler(call: DryRunCall) -> DryRunResponse | int | None:
        if call.args[0] == "fail":
            return 5
        if call.args[0] == "echo":
            return DryRunResponse(stdout=" ".join(call.args[1:]).encode() + b"\n", stderr=b"w\n")
        return None

    wrapper, recorder = make(handler, default=DryRunResponse(returncode=9))
    proc = await wrapper.create_subprocess_exec("echo", "a", "b", stdout=PIPE, stderr=PIPE)
    assert proc.pid > 2**22  # never a real pid
    assert await proc.stdout.readline() == b"a b\n"
    assert await proc.stderr.read() == b"w\n"
    assert await proc.wait() == 0
    assert (await wrapper.run("fail")).returncode == 5
    assert (await wrapper.run("unknown")).returncode == 9
    _, out, _ = await wrapper.create_subprocess("echo", "x")
    assert [line async for line in out] == [b"x\n"]
    assert len(recorder.calls) == 4
    recorder.clear()
    assert recorder.calls == []
    await wrapper.aclose()


async def test_stdin_is_recorded() -> None:
    wrapper, recorder = make()
    proc = await wrapper.create_subprocess_exec("cat", stdin=PIPE, stdout=PIPE)
    assert await proc.communicate(b"payload") == (b"", None)
    await wrapper.run("cat", input=b"via run")
    assert [c.input for c in recorder.calls] == [b"payload", b"via run"]
    await wrapper.aclose()


async def test_duration_allows_timeouts_and_termination() -> None:
    wrapper, _ = make({("slow",): DryRunResponse(duration=30.0, stdout=b"late")})
    with pytest.raises(pq.ProcessTimeoutError) as info:
        await wrapper.run("slow", timeout=0.05)
    assert isinstance(info.value, TimeoutError)
    proc = await wrapper.create_subprocess_exec("slow", stdout=PIPE)
    assert proc.returncode is None
    assert await pq.terminate_gracefully(proc, timeout=1) == -signal.SIGTERM
    proc = await wrapper.create_subprocess_exec("slow")
    task = asyncio.ensure_future(proc.wait())
    await asyncio.sleep(0)
    proc.kill()
    assert await task == -signal.SIGKILL
    await wrapper.aclose()


async def test_stderr_merged_into_stdout() -> None:
    wrapper, _ = make({("x",): DryRunResponse(stdout=b"o", stderr=b"e")})
    proc = await wrapper.create_subprocess_exec("x", stdout=PIPE, stderr=pq.STDOUT)
    assert await proc.communicate() == (b"oe", None)
    await wrapper.aclose()


def test_bad_handler_answer_is_a_type_error() -> None:
    recorder = DryRunRecorder(lambda call: "nope")  # type: ignore[arg-type,return-value]

    async def main() -> None:
        async with pq.SubprocessWrapper(pq.testing.DryRunStrategy(recorder=recorder)) as w:
            await w.run("x")

    with pytest.raises(TypeError, match="DryRunResponse"):
        asyncio.run(main())


async def test_output_cap_applies() -> None:
    wrapper, _ = make({("big",): DryRunResponse(stdout=b"a" * 100 + b"END")})
    result = await wrapper.run("big", max_output_bytes=10)
    assert result.stdout == b"aaaaaaaEND" and result.stdout_truncated
    assert result.stdout_total_bytes == 103
    await wrapper.aclose()


async def test_recorded_kwargs_are_the_callers() -> None:
    wrapper, recorder = make()
    await wrapper.create_subprocess_exec("x", close_fds=False)
    await wrapper.run("y")
    assert [c.kwargs for c in recorder.calls] == [{"close_fds": False}, {}]
    await wrapper.aclose()


@pytest.mark.skipif(not hasattr(signal, "SIGWINCH"), reason="POSIX signals")
async def test_signals_that_leave_a_real_process_running_leave_the_fake_one_running() -> None:
    # send_signal(0) is the usual "still alive?" probe; SIGCONT and SIGWINCH are ignored by
    # default. Each ended the fake run (returncode 0, -18, -28), which production never does.
    wrapper, _ = make({("sleep", "60"): DryRunResponse(duration=60.0)})
    async with wrapper:
        proc = await wrapper.create_subprocess_exec("sleep", "60")
        for sig in (0, signal.SIGCONT, signal.SIGWINCH, signal.SIGCHLD, signal.SIGURG):
            proc.send_signal(sig)
            assert proc.returncode is None, sig
        with pytest.raises(OSError):  # as os.kill says of a number that names no signal
            proc.send_signal(-1)
        with pytest.raises(OSError):
            proc.send_signal(100_000)
        assert proc.returncode is None
        proc.send_signal(signal.SIGHUP)  # ends a real process by default
        assert await proc.wait() == -signal.SIGHUP


@pytest.mark.parametrize(
    ("fields", "error", "match"),
    [
        ({"stdout": "clean\n"}, InvalidArgumentTypeError, "stdout"),
        ({"stderr": 1}, InvalidArgumentTypeError, "stderr"),
        ({"returncode": None}, InvalidArgumentTypeError, "returncode"),
        ({"returncode": True}, InvalidArgumentTypeError, "returncode"),
        ({"returncode": 1.5}, InvalidArgumentTypeError, "returncode"),
        ({"duration": -1.0}, InvalidTimeoutError, "duration"),
        ({"duration": float("nan")}, InvalidTimeoutError, "duration"),
        ({"duration": "1"}, InvalidTimeoutError, "duration"),
    ],
)
def test_a_response_that_cannot_be_answered_is_refused_when_made(
    fields: dict[str, object], error: type[Exception], match: str
) -> None:
    # Before: accepted, then a str output failed at the spawn with "'str' object cannot be
    # interpreted as an integer", and returncode=None made a fake process that never ended.
    with pytest.raises(error, match=match) as info:
        DryRunResponse(**fields)  # type: ignore[arg-type]
    assert isinstance(info.value, pq.PrismQError)


def test_a_response_keeps_bytes_like_output_as_bytes() -> None:
    response = DryRunResponse(stdout=bytearray(b"out"), stderr=memoryview(b"err"))  # type: ignore[arg-type]
    assert (response.stdout, response.stderr) == (b"out", b"err")
    assert DryRunResponse(duration=float("inf")).duration == float("inf")  # until stopped


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({("git",): None}, InvalidArgumentTypeError),
        ({("git",): "0"}, InvalidArgumentTypeError),
        ({("git", 3): 0}, InvalidArgumentTypeError),
        ({(): 0}, InvalidCommandError),
        ({"": 0}, InvalidCommandError),
    ],
)
def test_a_table_that_cannot_be_answered_from_is_refused(
    table: dict[object, object], error: type[Exception]
) -> None:
    # Before: None gave a bare AssertionError, the others a TypeError or a key never matched.
    with pytest.raises(error):
        DryRunRecorder(table)  # type: ignore[arg-type]


async def test_table_keys_are_matched_as_the_command_is_recorded(tmp_path: Path) -> None:
    # A path or bytes in a key is recorded as text: the key is spelled the same way, so it
    # answers (before, it silently never matched and the command got the default answer).
    script = tmp_path / "job.py"
    wrapper, _ = make(
        {("python", script): 3, (b"python", b"y.py"): 4, b"echo hi": 5, ("make", "all"): 6}
    )
    async with wrapper:
        assert (await wrapper.run("python", str(script))).returncode == 3
        assert (await wrapper.run("python", "y.py")).returncode == 4
        assert (await wrapper.run("echo hi", shell=True)).returncode == 5
        assert (await wrapper.run("make", "all")).returncode == 6


async def test_a_handler_answer_of_the_wrong_kind_is_a_prismq_error() -> None:
    wrapper, _ = make(lambda call: "nope")
    async with wrapper:
        with pytest.raises(InvalidArgumentTypeError, match="DryRunResponse"):
            await wrapper.run("git")
