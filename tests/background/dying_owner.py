"""A host process for tests/background/test_owner_death.py: it owns one run on a SQLite file and
is SIGKILLed (by itself, at a chosen point, or by the test) while the run's tree is up.

    python dying_owner.py DB MODULE POINT MODE

POINT:

- ``running``: a ModuleRunner run; this process kills itself as the run is about to be
  recorded RUNNING with its child's pid (the child has been spawned; nothing of it is stored);
- ``record``: the same, as the child's identity (start time, cookie) is about to be recorded
  (the pid is stored, nothing that proves the process the run's);
- ``coroutine``: a BackgroundTaskManager run whose coroutine starts MODULE through a
  SubprocessWrapper (a run with no child of its own on record); prints ``run <run_id>`` and
  waits for the test's SIGKILL;
- ``nested``: stores a run that nothing drives, then starts this script with ``serve``
  through a SubprocessWrapper (a nested host: it inherits this process's cookie variable);
  prints ``nested <pid>`` and waits for the test's SIGKILL;
- ``serve``: runs MODULE to its end through a ModuleRunner (a live owner of its own).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import prismq_subprocess as pq


def _die(*args: Any, **kwargs: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


async def main(db: str, module: str, point: str, mode: str) -> None:
    async with pq.SQLiteRunRegistry(db) as registry:
        if point == "coroutine":
            wrapper = pq.SubprocessWrapper(mode)
            async with pq.BackgroundTaskManager(registry) as manager:

                async def work() -> None:
                    process = await wrapper.create_subprocess_exec(sys.executable, module)
                    await process.wait()

                run_id = await manager.start_task(pq.Run(module_id="co"), work())
                print("run", run_id, flush=True)
                await asyncio.Event().wait()
        if point == "nested":
            await registry.add_run(pq.Run(module_id="queued"))
            nested = await pq.SubprocessWrapper(mode).create_subprocess_exec(
                sys.executable, __file__, db, module, "serve", mode
            )
            print("nested", nested.pid, flush=True)
            await asyncio.Event().wait()
        if point == "serve":
            await pq.ModuleRunner(registry, run_mode=mode).execute_module("tree", "Tree", module)
            return
        update_run = registry.update_run

        async def update_then_die(run: pq.Run) -> None:
            if run.status is pq.RunStatus.RUNNING and run.pid is not None:
                _die()
            await update_run(run)

        if point == "running":
            registry.update_run = update_then_die  # type: ignore[method-assign]
        else:
            registry.record_child = _die  # type: ignore[assignment,method-assign]
        runner = pq.ModuleRunner(registry, run_mode=mode, grace_period=2.0)
        await runner.execute_module("tree", "Tree", module)


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:5]))
