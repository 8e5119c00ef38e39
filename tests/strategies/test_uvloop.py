"""ASYNC mode on uvloop (what ``uvicorn[standard]`` runs): parity with asyncio's own subprocesses.

Skipped where uvloop is not installed. The whole suite can also run on uvloop:
``PRISMQ_TEST_LOOP=uvloop pytest`` (see tests/conftest.py).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest
from helpers import py

import prismq_subprocess as pq

uvloop = pytest.importorskip("uvloop")

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="uvloop does not run on Windows")

_T = TypeVar("_T")

SLEEPS = "import time; time.sleep(60)"


def on_uvloop(main: Callable[[], Awaitable[_T]]) -> _T:
    """Run ``main()`` in a fresh uvloop loop (the test itself is synchronous)."""

    async def checked() -> _T:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        return await main()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(checked())


@pytest.mark.parametrize("verb", ["terminate", "kill", "send_signal"])
def test_signals_reach_the_child_as_on_asyncio(verb: str) -> None:
    # AsyncProcess looked at asyncio's transport internals (_check_proc), which uvloop's
    # transport lacks: terminate/kill/send_signal raised AttributeError.
    async def main() -> tuple[int, int]:
        async with pq.SubprocessWrapper(pq.RunMode.ASYNC, grace_period=2.0) as w:
            ours = await w.create_subprocess_exec(*py(SLEEPS))
            raw = await asyncio.create_subprocess_exec(*py(SLEEPS))
            for process in (ours, raw):
                method: Any = getattr(process, verb)
                method(15) if verb == "send_signal" else method()
            codes = (
                await asyncio.wait_for(ours.wait(), 30),
                await asyncio.wait_for(raw.wait(), 30),
            )
            # Once exited and let go of, both refuse a signal the same way.
            for process in (ours, raw):
                with pytest.raises(ProcessLookupError):
                    process.kill()
            return codes

    ours, raw = on_uvloop(main)
    assert ours == raw == (-9 if verb == "kill" else -15)
