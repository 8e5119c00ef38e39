"""DRY_RUN: nothing starts; commands are recorded and answered from a script."""

from __future__ import annotations

import asyncio
import logging
import signal

import pytest

import prismq_subprocess as pq
from prismq_subprocess import PIPE, RunMode
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
