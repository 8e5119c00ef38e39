"""Helpers for the command-line tests: run ``python -m prismq_subprocess`` for real.

(pytest puts this directory on sys.path for the test modules next to it.)
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence

import psutil

CLI = (sys.executable, "-m", "prismq_subprocess")


def cli_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This environment without PRISMQ_RUN_MODE (so auto-detection is what is tested), plus
    ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "PRISMQ_RUN_MODE"}
    env.update(extra or {})
    return env


def cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    cwd: str | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[bytes]:
    """Run the command line to completion and capture its output."""
    return subprocess.run(
        [*CLI, *args],
        input=input,
        capture_output=True,
        env=cli_env(env),
        cwd=cwd,
        timeout=timeout,
        check=False,
    )


def start_cli(
    *args: str, env: Mapping[str, str] | None = None, **kwargs: object
) -> subprocess.Popen[bytes]:
    """Start the command line with stdout and stderr piped; the caller waits for it."""
    return subprocess.Popen(  # type: ignore[call-overload, no-any-return]
        [*CLI, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=cli_env(env),
        **kwargs,
    )


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie waiting for its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: Sequence[int], timeout: float = 10.0) -> bool:
    """Wait until every pid in ``pids`` is gone; True if they all went within ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return all(gone(pid) for pid in pids)


def kill_quietly(pids: Sequence[int]) -> None:
    """Clean-up after a failed test: kill whatever of ``pids`` still runs."""
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def end_cli(proc: subprocess.Popen[bytes], pids: Sequence[int]) -> None:
    """Clean-up of a test that started the command line: kill it if it still runs, collect
    its output, and kill whatever of ``pids`` (the command's processes) still runs."""
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
    kill_quietly(pids)
