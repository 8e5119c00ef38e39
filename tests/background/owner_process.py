"""A second process sharing a SQLite registry and a log directory with the test: it owns runs.

Usage: ``python owner_process.py DB LOG_DIR``, then one command per stdin line, each answered
with one stdout line:

- ``module SCRIPT JSON`` starts SCRIPT with the JSON parameters through a ModuleRunner:
  ``RUN <run_id>``;
- ``command JSON`` starts the JSON argv through ModuleRunner.start_command: ``RUN <run_id>``;
- ``coroutine`` starts a sleeping coroutine through a BackgroundTaskManager: ``RUN <run_id>``;
- ``raw`` stores an unfinished run that nothing drives: ``RUN <run_id>``;
- ``quit`` (or end of input) closes everything and exits: ``BYE``.
"""

from __future__ import annotations

import asyncio
import json
import sys

import prismq_subprocess as pq


async def main(db: str, log_dir: str) -> None:
    loop = asyncio.get_running_loop()
    async with (
        pq.SQLiteRunRegistry(db) as registry,
        pq.OutputCapture(log_dir=log_dir) as capture,
        pq.ModuleRunner(registry, output=capture, grace_period=2.0) as runner,
        pq.BackgroundTaskManager(registry) as manager,
    ):
        print("READY", flush=True)
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            words = line.split(maxsplit=1)
            if not words or words[0] == "quit":
                break
            if words[0] == "module":
                script, params = words[1].split(maxsplit=1)
                run_id = await runner.start_module("m", "Module", script, json.loads(params))
            elif words[0] == "command":
                run_id = await runner.start_command("c", "Command", json.loads(words[1]))
            elif words[0] == "coroutine":
                run_id = await manager.start_task(pq.Run(module_id="co"), asyncio.sleep(60))
            else:
                run = pq.Run(module_id="raw")
                await registry.add_run(run)
                run_id = run.run_id
            print("RUN", run_id, flush=True)
    print("BYE", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
