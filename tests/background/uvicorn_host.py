"""A FastAPI host under uvicorn for tests/background/test_host_shutdown.py, set up as
docs/LIFECYCLE.md ("Host shutdown") shows: the shutdown handler is installed in the lifespan,
after uvicorn's own signal handlers, and chains to them.

    python uvicorn_host.py DB MODULE MARKER

Prints ``run <run_id>`` once the module's run is stored; writes MARKER when the lifespan exits
(uvicorn's graceful shutdown ran).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import uvicorn
from fastapi import FastAPI

import prismq_subprocess as pq

DB, MODULE, MARKER = sys.argv[1:4]


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    registry = pq.SQLiteRunRegistry(DB)
    async with registry, pq.ModuleRunner(registry, grace_period=2.0) as runner:
        with pq.install_shutdown_handler(grace=3.0):
            run_id = await runner.start_module("tree", "Tree", MODULE)
            print("run", run_id, flush=True)
            yield
    await asyncio.to_thread(Path(MARKER).write_text, "lifespan exited")


app = FastAPI(lifespan=lifespan)

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=0, log_level="warning")
