"""What a strictly typed user's code sees of the public API: checked by ``mypy --strict`` (CI's
mypy step covers this folder), never run.

Each ``assert_type`` states the precise type a call gives; each ``# type: ignore[code]`` marks
a misuse the checkers must refuse (``warn_unused_ignores``, part of ``--strict``, fails the
check if one is accepted). Real runs of the same calls are in the mirrored test modules.
"""

from __future__ import annotations

import os
import pathlib
import sys
from collections.abc import Mapping
from typing import assert_type

import prismq_subprocess as pq
from prismq_subprocess import abc as pq_abc
from prismq_subprocess.exceptions import *  # noqa: F403


async def streams(wrapper: pq.SubprocessWrapper) -> None:
    # stream(): bytes lines without an encoding, str lines with one.
    async with wrapper.stream(sys.executable, "-c", "print(1)") as raw:
        assert_type(raw, pq.LineStream[bytes])
        async for line in raw:
            assert_type(line, bytes)
        async for batch in raw.iter_batches():
            assert_type(batch, list[bytes])
    async with wrapper.stream(sys.executable, "-c", "print(1)", encoding="utf-8") as text:
        assert_type(text, pq.LineStream[str])
        async for text_line in text:
            assert_type(text_line, str)
            text_line.decode()  # type: ignore[attr-defined]
    encoding: str | None = None
    either = wrapper.stream(sys.executable, encoding=encoding)
    assert_type(either, pq.LineStream[bytes] | pq.LineStream[str])


async def processes(wrapper: pq.SubprocessWrapper) -> None:
    proc = await wrapper.create_subprocess_exec(sys.executable, stdout=pq.PIPE)
    assert_type(proc.stdout, pq_abc.StreamReaderLike | None)
    assert_type(proc.stderr, pq_abc.StreamReaderLike | None)
    assert_type(proc.stdin, pq_abc.StreamWriterLike | None)
    await proc.stdout.readline()  # type: ignore[union-attr]
    if proc.stdout is not None:
        assert_type(await proc.stdout.readline(), bytes)
    await proc.communicate(bytearray(b"input"))
    await proc.communicate(memoryview(b"input"))
    process, out, err = await wrapper.create_subprocess(sys.executable, "-V")
    assert_type(process, pq_abc.ProcessLike)
    assert_type(out, pq_abc.StreamReaderLike | None)
    assert_type(err, pq_abc.StreamReaderLike | None)


async def runs(wrapper: pq.SubprocessWrapper, env: Mapping[str, str]) -> None:
    where = pathlib.Path(".")
    result = await wrapper.run(pathlib.Path(sys.executable), "-V", cwd=where, env=env)
    assert_type(result, pq.ProcessResult)
    assert_type(result.stdout, bytes)
    await wrapper.run(sys.executable, input=bytearray(b"x"))
    await wrapper.run(sys.executable, input=memoryview(b"x"))
    await wrapper.run(sys.executable, env=os.environ, start_new_session=True, umask=0o22)
    await wrapper.run(sys.executable, input="text")  # type: ignore[arg-type]
    await wrapper.run(sys.executable, 42)  # type: ignore[arg-type]
    await wrapper.run(sys.executable, timout=3)  # type: ignore[call-arg]
    await pq.run(sys.executable, "-V", timeout=5, check=True, mode="threaded")
    await pq.run(sys.executable, tiemout=5)  # type: ignore[call-arg]
    await pq.create_subprocess_exec(sys.executable, stdout=pq.PIPE, cwd=where, env=env)
    await pq.create_subprocess_exec(sys.executable, close_fds=False, process_group=0)
    await pq.create_subprocess_exec(sys.executable, cwdd=where)  # type: ignore[call-arg]
    await pq.create_subprocess_shell("echo hi", stdout=pq.PIPE, cwd=where)
    await wrapper.create_subprocess_exec(sys.executable, text=True)  # type: ignore[arg-type]
    # asyncio's stubs take shell= with the one value each call accepts; so do ours.
    await pq.create_subprocess_exec(sys.executable, shell=False)
    await wrapper.create_subprocess_shell("echo hi", shell=True)
    await pq.create_subprocess_exec(sys.executable, shell=True)  # type: ignore[arg-type]
    await wrapper.create_subprocess_shell("echo hi", shell=False)  # type: ignore[arg-type]
    async with wrapper.stream(sys.executable, cwd=where, env=env, start_new_session=True):
        pass


def errors(exc: pq.ProcessFailedError) -> None:
    assert_type(exc.returncode, int)
    # The star import above brings the exceptions in.
    assert_type(InvalidOptionError("x"), InvalidOptionError)  # noqa: F405


def capture(log_dir: os.PathLike[str]) -> pq.OutputCapture:
    return pq.OutputCapture(log_dir=log_dir)


class RecordingStrategy(pq_abc.AsyncStrategy):
    """A user's strategy with a mode of its own, as docs/ARCHITECTURE.md shows."""

    mode = "recording"
