"""The Windows event-loop helpers, on any platform."""

from __future__ import annotations

import asyncio
import sys

import pytest

import prismq_subprocess as pq


def test_loop_factory_on_posix_is_the_default_loop() -> None:
    factory = pq.subprocess_loop_factory(platform="linux")
    with asyncio.Runner(loop_factory=factory) as runner:

        async def main() -> bytes:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", "print(1)", stdout=asyncio.subprocess.PIPE
            )
            out, _ = await proc.communicate()
            return out

        assert runner.run(main()).strip() == b"1"


@pytest.mark.skipif(sys.platform == "win32", reason="checks the non-Windows error path")
def test_windows_helpers_explain_themselves_off_windows() -> None:
    with pytest.raises(RuntimeError, match="only on Windows"):
        pq.subprocess_loop_factory(platform="win32")
    with pytest.raises(RuntimeError, match="only on Windows"):
        pq.install_subprocess_policy(platform="win32")


def test_policy_install_is_a_no_op_off_windows() -> None:
    assert pq.install_subprocess_policy(platform="linux") is False
