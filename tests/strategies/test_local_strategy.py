"""LocalStrategy's one-job fast path (spawn, drain, reap in one worker call)."""

from __future__ import annotations

import asyncio

from helpers import py

from prismq_subprocess._core._result import TailBuffer
from prismq_subprocess._strategies._base import SpawnRequest
from prismq_subprocess._strategies._local import LocalStrategy


async def test_a_discarded_run_still_reports_its_childs_exit() -> None:
    """Discarding a run cancels its reader (the worker's job); the process must still learn of
    the exit, or a tree stop waiting for it (the wrapper closing while the run was starting)
    waits for ever. Found by CI: aclose() hung on a LOCAL run() it interrupted."""
    strategy = LocalStrategy()
    try:
        run = await strategy._start_run(
            SpawnRequest(command=py("import time; time.sleep(60)"), shell=False),
            input=None,
            out=TailBuffer(None),
            err=TailBuffer(None),
            grace=1.0,
        )
        run.discard()
        async with asyncio.timeout(10):
            returncode = await run.process.wait()
        assert returncode != 0
        assert run.process.returncode == returncode
    finally:
        strategy.close()
