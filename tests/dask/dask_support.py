"""A real Dask cluster for the tests: ``dask scheduler`` and ``dask worker`` as child processes.

Not a ``LocalCluster`` in the test process: its worker processes are started through
multiprocessing, whose resource tracker then lives as long as the test run does, and tests
elsewhere check that nothing outlives them. Here everything the cluster starts is a descendant
of the two commands and ends with them.

(pytest puts this directory on sys.path for the test modules next to it.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil

STARTUP_SECONDS = 90.0


class SubprocessCluster:
    """A scheduler on 127.0.0.1 and ``n_workers`` worker processes (each under a nanny, which
    restarts it if it dies), ``nthreads`` task threads and ``resources`` each.

    The scheduler's HTTP endpoint listens on a free port (the default 8787 may be taken).
    """

    def __init__(
        self, directory: Path, *, n_workers: int, nthreads: int, resources: str | None = None
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        scheduler_file = directory / "scheduler.json"
        self._logs = [open(directory / name, "wb") for name in ("scheduler.log", "workers.log")]  # noqa: SIM115 - closed in close()
        self.scheduler = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                "0",
                "--no-dashboard",
                "--dashboard-address",
                "127.0.0.1:0",
                "--scheduler-file",
                str(scheduler_file),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._logs[0],
            stderr=subprocess.STDOUT,
        )
        self.workers: subprocess.Popen[bytes] | None = None
        try:
            self.address = self._wait_for_address(scheduler_file)
            worker_args = [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                self.address,
                "--host",
                "127.0.0.1",
                "--nworkers",
                str(n_workers),
                "--nthreads",
                str(nthreads),
                "--no-dashboard",
            ]
            if resources is not None:
                worker_args += ["--resources", resources]
            self.workers = subprocess.Popen(
                worker_args,
                stdin=subprocess.DEVNULL,
                stdout=self._logs[1],
                stderr=subprocess.STDOUT,
            )
        except BaseException:
            self.close()
            raise

    def _wait_for_address(self, scheduler_file: Path) -> str:
        deadline = time.monotonic() + STARTUP_SECONDS
        while time.monotonic() < deadline:
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"the scheduler exited with {self.scheduler.returncode}")
            try:
                return str(json.loads(scheduler_file.read_text())["address"])
            except (OSError, ValueError, KeyError):
                time.sleep(0.05)
        raise TimeoutError("the scheduler did not start")

    def kill_scheduler(self) -> None:
        """The scheduler dies (SIGKILL): no goodbye to anyone."""
        self.scheduler.kill()
        self.scheduler.wait(30)

    def close(self) -> None:
        """Stop the workers, then the scheduler, and anything either left running."""
        started = [p for p in (self.workers, self.scheduler) if p is not None]
        tree: list[psutil.Process] = []
        for proc in started:
            try:
                tree.extend(psutil.Process(proc.pid).children(recursive=True))
            except psutil.Error:
                continue
        for proc in started:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
        for child in tree:
            try:
                child.kill()
            except psutil.Error:
                continue
        psutil.wait_procs(tree, timeout=30)
        for log in self._logs:
            log.close()
