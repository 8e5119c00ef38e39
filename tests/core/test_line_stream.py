"""LineStream (``_core/_line_stream.py``): a stream owns one child, once."""

from __future__ import annotations

import pytest
from helpers import py

import prismq_subprocess as pq

SLEEPER = "import time; print('ready', flush=True); time.sleep(30)"


async def test_a_stream_cannot_be_entered_again(any_wrapper: pq.SubprocessWrapper) -> None:
    # Entering a used stream again started a second child that leaving the block did not stop:
    # it ran until the wrapper closed (the stream thought itself closed already).
    stream = any_wrapper.stream(*py(SLEEPER))
    async with stream:
        first = stream.process
    assert first.returncode is not None
    with pytest.raises(pq.exceptions.ClosedError):
        async with stream:
            pass
    assert any_wrapper.live_processes == []


async def test_a_stream_open_cannot_be_entered_twice(any_wrapper: pq.SubprocessWrapper) -> None:
    # A nested entry replaced the stream's child by a second one: the first was never stopped.
    stream = any_wrapper.stream(*py(SLEEPER))
    async with stream:
        first = stream.process
        with pytest.raises(pq.exceptions.ClosedError):
            await stream.__aenter__()
        assert stream.process is first
    assert first.returncode is not None
    assert any_wrapper.live_processes == []


async def test_a_stream_closed_before_use_starts_nothing(any_wrapper: pq.SubprocessWrapper) -> None:
    stream = any_wrapper.stream(*py(SLEEPER))
    await stream.aclose()
    with pytest.raises(pq.exceptions.ClosedError):
        async with stream:
            pass
    assert any_wrapper.live_processes == []
