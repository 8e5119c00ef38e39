"""ProcessResult and the bounded TailBuffer behind run()."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import prismq_subprocess as pq
from prismq_subprocess._core._result import TailBuffer


@given(st.one_of(st.none(), st.integers(0, 64)), st.lists(st.binary(max_size=40), max_size=20))
def test_tail_buffer_keeps_exactly_the_tail(cap: int | None, chunks: list[bytes]) -> None:
    buffer = TailBuffer(cap)
    everything = b""
    for chunk in chunks:
        buffer.append(chunk)
        everything += chunk
        # memory stays within the cap plus one chunk
        assert cap is None or buffer._size <= cap + max(len(c) for c in chunks)
    expected = everything if cap is None or len(everything) <= cap else everything[-cap:]
    if cap == 0:
        expected = b""
    assert buffer.getvalue() == expected
    assert buffer.getvalue() == expected  # idempotent
    assert buffer.total == len(everything)
    assert buffer.truncated == (cap is not None and len(everything) > cap)


def test_result_helpers() -> None:
    ok = pq.ProcessResult(("x",), 0, b"h\xffi", b"", 1, 0.1, pq.RunMode.ASYNC)
    assert ok.ok and ok.check_returncode() is ok
    assert ok.stdout_text == "h\ufffdi"
    bad = pq.ProcessResult(("x", "y"), 3, b"", b"oops", 1, 0.1, pq.RunMode.ASYNC)
    with pytest.raises(pq.ProcessFailedError, match="exited with status 3") as info:
        bad.check_returncode()
    assert info.value.stderr == b"oops" and info.value.cmd == ("x", "y")


def test_a_failed_command_with_quotes_of_both_kinds_reads_plainly() -> None:
    # A new user's walkthrough: shlex's quoting inside repr's escaping gave
    # 'python -c \'import sys; print(\'"\'"\'oops\'"\'"\'...' for this command.
    code = "import sys; print('oops', file=sys.stderr); sys.exit(3)"
    error = pq.ProcessFailedError(cmd=["python3", "-c", code], returncode=3)
    assert str(error).startswith(f"command {['python3', '-c', code]!r} exited with status 3")
    assert "\\'" not in str(error)
    # Plain commands keep the shell form a user could paste.
    assert str(pq.ProcessFailedError(cmd=["ls", "-l", "my file"], returncode=2)).startswith(
        "command \"ls -l 'my file'\" exited"
    )


async def test_run_output_cap_defaults_to_the_wrappers_and_shows_so() -> None:
    import inspect

    default = inspect.signature(pq.SubprocessWrapper.run).parameters["max_output_bytes"].default
    assert repr(default) == "<the wrapper's>"  # help() showed "= Ellipsis"
    async with pq.SubprocessWrapper(pq.RunMode.ASYNC, max_output_bytes=3) as wrapper:
        for given in ({}, {"max_output_bytes": ...}):  # the old placeholder still works
            result = await wrapper.run("echo", "hello", **given)
            assert result.stdout == b"lo\n" and result.stdout_truncated
        assert (await wrapper.run("echo", "hello", max_output_bytes=None)).stdout == b"hello\n"
