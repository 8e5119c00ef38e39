"""The issue-15 scenarios on a literal ``distributed.LocalCluster(n_workers=2, processes=True)``.

Run as a script by tests/dask/test_dask_local_cluster.py, in a child interpreter of its own: a
LocalCluster's worker processes are spawned through multiprocessing, whose resource tracker then
lives as long as the interpreter that spawned them, so the cluster, its nannies and that tracker
all end with this process. The main module is re-imported by every spawned worker, hence the
``__main__`` guard and no work at import time.

``python local_cluster_scenarios.py DIRECTORY``: ``DIRECTORY`` holds the test's module scripts
``lines.py`` and ``gated.py`` (tests/dask/test_dask_backend.py's) and receives the scenarios' own
files. The script prints one line ``RESULT <json>`` on stdout: what each scenario observed (the
runs as ``Run.to_dict()``, live lines, psutil findings on the worker processes), or the
traceback that ended it, and every process this interpreter started; the test asserts on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing.resource_tracker
import os
import sys
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import distributed
import psutil

from prismq_subprocess import (
    ModuleRunner,
    OutputCapture,
    OutputLine,
    RunRegistry,
    SQLiteRunRegistry,
)
from prismq_subprocess.dask import DaskBackend

SLOTS = 4  # each worker offers {"slots": 4}
WAIT = 60.0  # upper bound for anything a scenario awaits (never reached unless broken)
SCENARIO_SECONDS = 90.0


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def until(predicate: Callable[[], bool], timeout: float = WAIT) -> bool:
    """Whether ``predicate`` became true within ``timeout`` seconds."""
    try:
        async with asyncio.timeout(timeout):
            while not predicate():  # noqa: ASYNC110 - process state has no event to wait on
                await asyncio.sleep(0.02)
    except TimeoutError:
        return predicate()
    return True


class Scenarios:
    """The four scenarios, sharing one cluster; ``seen`` collects every process observed under
    this interpreter (pid -> create time) for the caller's leftover check."""

    def __init__(self, cluster: Any, client: Any, directory: Path) -> None:
        self.cluster = cluster
        self.client = client
        self.directory = directory
        self.lines = str(directory / "lines.py")
        self.gated = str(directory / "gated.py")
        self.seen: dict[int, float] = {}

    # -- helpers ---------------------------------------------------------------------------------

    def note_processes(self) -> None:
        for proc in psutil.Process().children(recursive=True):
            try:
                self.seen[proc.pid] = proc.create_time()
            except psutil.Error:
                continue

    def worker_pids(self) -> dict[str, int]:
        """Worker address -> pid of its worker process, from the cluster's nannies."""
        pids = {}
        for nanny in self.cluster.workers.values():
            if nanny.worker_address and nanny.process is not None and nanny.process.pid:
                pids[str(nanny.worker_address)] = int(nanny.process.pid)
        return pids

    def tree_of(self, pid: int) -> list[int]:
        """The living processes under ``pid`` (zombies are gone for this purpose)."""
        try:
            children = psutil.Process(pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        return sorted(child.pid for child in children if alive(child.pid))

    def runner(self, backend: Any, registry: Any = None) -> Any:
        return ModuleRunner(
            registry if registry is not None else RunRegistry(),
            output=OutputCapture(),
            backend=backend,
            grace_period=1.0,
            output_tail_lines=5,
            sample_interval=0.1,
        )

    def backend(self) -> Any:
        return DaskBackend(self.cluster.scheduler_address)

    @staticmethod
    async def collect(capture: Any, run_id: str) -> list[str]:
        """Every item the run's subscription yields, gaps included (as '<gap n>')."""
        items = []
        async with capture.subscribe(run_id, wait=True) as lines:
            async for item in lines:
                items.append(item.text if isinstance(item, OutputLine) else f"<gap {item.dropped}>")
        return items

    @staticmethod
    async def wait_for_line(capture: Any, run_id: str, prefix: str) -> str:
        async with asyncio.timeout(WAIT), capture.subscribe(run_id, wait=True) as lines:
            async for item in lines:
                if isinstance(item, OutputLine) and item.text.startswith(prefix):
                    return str(item.text)
        raise AssertionError(f"the run ended without a line starting with {prefix!r}")

    @staticmethod
    async def finished(runner: Any, run_id: str) -> Any:
        run = None
        try:
            async with asyncio.timeout(WAIT):
                while True:
                    run = await runner.registry.get_run(run_id)
                    active = runner.active_run_ids()
                    if run is not None and run.is_finished and run_id not in active:
                        return run
                    await asyncio.sleep(0.02)
        except TimeoutError:
            state = None if run is None else run.to_dict()
            raise AssertionError(f"run {run_id} not finished after {WAIT} s: {state}") from None

    # -- the scenarios ---------------------------------------------------------------------------

    async def spread(self) -> dict[str, Any]:
        """20 modules over both workers, every line delivered live to subscribers that
        subscribed before the start; the runs recorded in a SQLite registry."""
        database = self.directory / "runs.db"
        registry = SQLiteRunRegistry(database)
        runner = self.runner(self.backend(), registry)
        async with registry, runner:
            run_ids = [f"spread-{i}" for i in range(20)]
            readers = [asyncio.create_task(self.collect(runner.output, r)) for r in run_ids]
            for i, run_id in enumerate(run_ids):
                await runner.start_module(
                    f"m{i}",
                    "lines",
                    self.lines,
                    {"count": 40, "prefix": f"m{i}", "pause": 0.005},
                    run_id=run_id,
                )
            lines = await asyncio.wait_for(asyncio.gather(*readers), WAIT)
            runs = [await self.finished(runner, r) for r in run_ids]
        async with SQLiteRunRegistry(database) as reopened:
            listed = await reopened.list_runs(limit=100)
        return {
            "workers": sorted(self.worker_pids()),
            "lines": dict(zip(run_ids, lines, strict=True)),
            "runs": [run.to_dict() for run in runs],
            "reopened": [run.to_dict() for run in sorted(listed, key=lambda r: r.run_id)],
        }

    async def cancel(self) -> dict[str, Any]:
        """A module with a grandchild, cancelled mid-run: its tree checked under the worker
        process before and after."""
        runner = self.runner(self.backend())
        async with runner:
            run_id = await runner.start_module(
                "c",
                "gated",
                self.gated,
                {"gate": str(self.directory / "never"), "grandchild": True},
            )
            grandchild = int(
                (await self.wait_for_line(runner.output, run_id, "grandchild")).split()[1]
            )
            await self.wait_for_line(runner.output, run_id, "ready")  # the tail's last line
            running = await runner.registry.get_run(run_id)
            worker_pid = self.worker_pids().get(str(running.worker))
            tree_before = [] if worker_pid is None else self.tree_of(worker_pid)
            self.note_processes()
            cancelled = bool(await runner.cancel(run_id, "stop it"))
            run = await runner.registry.get_run(run_id)
            tree_after = [] if worker_pid is None else self.tree_of(worker_pid)
        return {
            "running": running.to_dict(),
            "grandchild": grandchild,
            "worker_pid": worker_pid,
            "tree_before": tree_before,
            "cancel_returned": cancelled,
            "run": run.to_dict(),
            "tree_after": tree_after,
            "alive_after": [pid for pid in (running.pid, grandchild) if alive(pid)],
        }

    async def identical(self) -> dict[str, Any]:
        """The same modules and commands with backend=None and on the cluster."""
        hog = self.directory / "hog.py"
        hog.write_text(
            # Its one line comes before it grows past the cap: the sampler may stop it at any
            # time after that (mid-allocation too), and both backends must show the same output.
            "import time\nprint('allocating', flush=True)\nb = bytearray(256 * 1024 * 1024)\n"
            "b[::4096] = b'x' * len(b[::4096])\ntime.sleep(60)\n"
        )
        env_echo = self.directory / "env_echo.py"
        env_echo.write_text(
            "import os, sys\nprint(os.environ['PRISMQ_TEST_VALUE'], os.getcwd(), sys.argv[1:])\n"
        )
        cases: list[tuple[str, dict[str, Any]]] = [
            ("ok", {"script_path": self.lines, "parameters": {"count": 3}}),
            ("spread-like", {"script_path": self.lines, "parameters": {"count": 40}}),
            ("many", {"script_path": self.lines, "parameters": {"count": 500}}),
            ("fails", {"script_path": self.lines, "parameters": {"count": 2, "code": 3}}),
            (
                "timeout",
                {"script_path": self.gated, "parameters": {"gate": "/nonexistent"}, "timeout": 1},
            ),
            ("memory", {"script_path": hog, "memory_limit_bytes": 64 * 1024 * 1024}),
            (
                "env-cwd-args",
                {
                    "script_path": env_echo,
                    "parameters": {"tags": ["a", "b"], "flag": True, "n": 2},
                    "args": ["raw", "--x=1"],
                    "env": {"PRISMQ_TEST_VALUE": "v1"},
                    "cwd": self.directory,
                },
            ),
        ]
        commands: list[tuple[str, dict[str, Any]]] = [
            (
                "argv",
                {"command": [sys.executable, "-c", "print('from argv'); raise SystemExit(4)"]},
            ),
            ("shell", {"command": "echo one; echo two >&2", "shell": True}),
        ]

        async def outcomes(backend: Any) -> dict[str, Any]:
            async with self.runner(backend) as runner:
                runs = await asyncio.gather(
                    *(runner.execute_module(name, name, **kw) for name, kw in cases),
                    *(runner.execute_command(name, name, **kw) for name, kw in commands),
                )
            return {run.module_id: run.to_dict() for run in runs}

        return {"local": await outcomes(None), "remote": await outcomes(self.backend())}

    async def kill(self) -> dict[str, Any]:
        """The worker process running a module (with a grandchild) is killed mid-run; Dask's
        default would re-run its task elsewhere, which must not happen."""
        marker = self.directory / "starts"
        runner = self.runner(self.backend())
        async with runner:
            run_id = await runner.start_module(
                "k",
                "gated",
                self.gated,
                {"gate": str(self.directory / "never"), "marker": str(marker), "grandchild": True},
            )
            grandchild = int(
                (await self.wait_for_line(runner.output, run_id, "grandchild")).split()[1]
            )
            running = await runner.registry.get_run(run_id)
            worker_pid = self.worker_pids()[str(running.worker)]
            in_worker_tree = {running.pid, grandchild} <= set(self.tree_of(worker_pid))
            self.note_processes()
            psutil.Process(worker_pid).kill()
            run = await self.finished(runner, run_id)
            # The nanny starts a new worker; what the dead one left behind is stopped from the
            # other worker of this host.
            await self.client.wait_for_workers(2, timeout=WAIT)
            # (The scheduler may still count the dead worker, and its nanny still name it, for
            # a moment on a busy machine.)
            await until(
                lambda: (
                    len(self.worker_pids()) == 2 and str(running.worker) not in self.worker_pids()
                )
            )
            orphans_stopped = await until(lambda: not alive(running.pid) and not alive(grandchild))
        self.note_processes()
        return {
            "running": running.to_dict(),
            "grandchild": grandchild,
            "killed_worker_pid": worker_pid,
            "in_worker_tree": in_worker_tree,
            "killed_worker_alive": alive(worker_pid),
            "run": run.to_dict(),
            "orphans_stopped": orphans_stopped,
            "starts": len(marker.read_text().split()) if marker.exists() else 0,
            "workers_after": sorted(self.worker_pids()),
        }


async def main(directory: Path) -> dict[str, Any]:
    result: dict[str, Any] = {"pid": os.getpid(), "scenarios": {}, "errors": {}}
    async with (
        distributed.LocalCluster(
            n_workers=2,
            processes=True,
            threads_per_worker=6,
            resources={"slots": SLOTS},
            host="127.0.0.1",
            scheduler_port=0,
            dashboard_address=None,
            memory_limit=0,  # no memory pausing on a busy machine; the modules have their caps
            asynchronous=True,
        ) as cluster,
        distributed.Client(cluster, asynchronous=True, set_as_default=False) as client,
    ):
        await client.wait_for_workers(2, timeout=WAIT)
        scenarios = Scenarios(cluster, client, directory)
        scenarios.note_processes()
        result["address"] = cluster.scheduler_address
        result["worker_pids"] = scenarios.worker_pids()
        steps: list[tuple[str, Callable[[], Awaitable[dict[str, Any]]]]] = [
            ("spread", scenarios.spread),
            ("cancel", scenarios.cancel),
            ("identical", scenarios.identical),
            ("kill", scenarios.kill),  # last: it costs a worker, which the nanny restarts
        ]
        for name, step in steps:
            try:
                async with asyncio.timeout(SCENARIO_SECONDS):
                    result["scenarios"][name] = await step()
            except Exception:  # reported to the test, which fails with it
                result["errors"][name] = traceback.format_exc()
                break  # the cluster may be in a bad state: the later scenarios are not run
        scenarios.note_processes()
    tracker = multiprocessing.resource_tracker._resource_tracker._pid
    if tracker is not None:
        with contextlib.suppress(psutil.NoSuchProcess):
            scenarios.seen[tracker] = psutil.Process(tracker).create_time()
    result["tracker_pid"] = tracker
    result["processes"] = sorted(scenarios.seen.items())
    return result


if __name__ == "__main__":
    outcome = asyncio.run(main(Path(sys.argv[1])))
    print("RESULT " + json.dumps(outcome), flush=True)
