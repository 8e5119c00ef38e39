"""A host process for tests/background/test_host_shutdown.py: a ModuleRunner on a SQLite file
runs one long-lived module; the test then sends this process SIGTERM.

    python shutdown_host.py DB MODULE (handler|bare) MODE

Prints ``run <run_id>`` once the run is stored, then waits for ever.
"""

from __future__ import annotations

import asyncio
import sys

import prismq_subprocess as pq


async def main(db: str, module: str, how: str, mode: str) -> None:
    async with pq.SQLiteRunRegistry(db) as registry:
        runner = pq.ModuleRunner(registry, run_mode=mode, grace_period=2.0)
        if how == "handler":
            pq.install_shutdown_handler(grace=3.0)
        run_id = await runner.start_module("tree", "Tree", module)
        print("run", run_id, flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
