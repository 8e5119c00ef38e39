"""A real Dask cluster for the tests: ``dask scheduler`` and ``dask worker`` as child processes.

Not a ``LocalCluster`` in the test process: its worker processes are started through
multiprocessing, whose resource tracker then lives as long as the test run does, and tests
elsewhere check that nothing outlives them. Each command runs under a small reaper process (a
child subreaper on Linux): what the cluster leaves behind (the children of a killed worker, a
nanny's resource tracker) is re-parented to it, not to the test process (``helpers.reaped``).
Everything ends with :meth:`SubprocessCluster.close`.

(pytest puts this directory on sys.path for the test modules next to it.)
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
from helpers import reaped

STARTUP_SECONDS = 90.0


def _reaped(argv: list[str], log: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        reaped(*argv),
        stdin=subprocess.DEVNULL,
        stdout=log,  # type: ignore[arg-type]
        stderr=subprocess.STDOUT,
    )


def _descendants(proc: subprocess.Popen[bytes]) -> list[psutil.Process]:
    try:
        return psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        return []


class SubprocessCluster:
    """A scheduler on 127.0.0.1 and ``n_workers`` worker processes (each under a nanny, which
    restarts it if it dies), ``nthreads`` task threads and ``resources`` each.

    The scheduler's HTTP endpoint listens on a free port (the default 8787 may be taken).
    """

    def __init__(
        self, directory: Path, *, n_workers: int, nthreads: int, resources: str | None = None
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        scheduler_file = directory / "scheduler.json"
        self._logs = [open(directory / name, "wb") for name in ("scheduler.log", "workers.log")]  # noqa: SIM115 - closed in close()
        self.scheduler = _reaped(
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
            self._logs[0],
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
            self.workers = _reaped(worker_args, self._logs[1])
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

    def log_tail(self, name: str = "workers.log", size: int = 6000) -> str:
        """The end of one of the cluster's logs (for a failing test's report)."""
        for log in self._logs:
            log.flush()
        data = (self.directory / name).read_bytes()
        return data[-size:].decode(errors="replace")

    def kill_scheduler(self) -> None:
        """The scheduler dies (SIGKILL): no goodbye to anyone."""
        for proc in _descendants(self.scheduler):
            proc.kill()
        self.scheduler.wait(30)

    def close(self) -> None:
        """Stop the workers, then the scheduler; kill what is left under each reaper after
        20 s; each reaper ends once it reaped everything."""
        for reaper in (self.workers, self.scheduler):
            if reaper is None:
                continue
            if reaper.poll() is None:
                reaper.terminate()  # passed on to the command
            try:
                reaper.wait(20)
            except subprocess.TimeoutExpired:
                for proc in _descendants(reaper):
                    try:
                        proc.kill()
                    except psutil.Error:
                        continue
                try:
                    reaper.wait(20)
                except subprocess.TimeoutExpired:
                    reaper.kill()
                    reaper.wait(20)
        for log in self._logs:
            log.close()
