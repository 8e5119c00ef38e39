"""The test cluster (``dask_support.SubprocessCluster``) leaves nothing to the test process.

With ``PRISMQ_SUBREAPER=1`` the library makes the test process a child subreaper: an orphan of
any process under it (the children of a killed worker, a daemon a task started, what an exiting
nanny leaves) would be re-parented to pytest and, once it exits, stay there as a zombie that
later no-leftover checks (tests/core/test_load.py, tests/platform/test_reaper.py) see. So each
cluster command runs under a small reaper of its own (``helpers.reaped``), which adopts and reaps
them.
"""

from __future__ import annotations

import ctypes
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

distributed = pytest.importorskip(
    "distributed",
    reason="the [dask] extra is not installed (pip install 'prismq_subprocess[dask]')",
)

from dask_support import SubprocessCluster  # noqa: E402
from helpers import PY  # noqa: E402
from lifecycle_helpers import daemonizer, marked_env, wait_for_marked  # noqa: E402

from prismq_subprocess._platform._linux import (  # noqa: E402
    PR_GET_CHILD_SUBREAPER,
    PR_SET_CHILD_SUBREAPER,
    become_subreaper,
    load_prctl,
)


@pytest.fixture
def test_process_is_a_subreaper() -> Iterator[None]:
    """This (pytest) process is a child subreaper for the test, as PRISMQ_SUBREAPER=1 makes it;
    afterwards it is one only if it was before (with PRISMQ_SUBREAPER=1 the library made it one
    and relies on it)."""
    prctl = load_prctl()
    if prctl is None:
        pytest.skip("no prctl here (not Linux)")
    flag = ctypes.c_int(0)
    if prctl(PR_GET_CHILD_SUBREAPER, ctypes.addressof(flag), 0, 0, 0) != 0:
        pytest.skip("no child subreaper here (the kernel refused)")
    was_subreaper = bool(flag.value)
    if not become_subreaper(prctl):
        pytest.skip("no child subreaper here (the kernel refused)")
    try:
        yield
    finally:
        if not was_subreaper:
            prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def gone_or_zombie(proc: psutil.Process) -> bool:
    try:
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_orphans_of_the_cluster_never_come_to_the_test_process(
    tmp_path: Path, test_process_is_a_subreaper: None
) -> None:
    before = {child.pid for child in psutil.Process().children()}
    mark, env = marked_env()
    cluster = SubprocessCluster(tmp_path / "cluster", n_workers=1, nthreads=1)
    try:
        with distributed.Client(cluster.address, set_as_default=False) as client:
            client.wait_for_workers(1, timeout=60)
            # A task whose child daemonizes a helper (it lives 1 s): an orphan at once.
            started = client.submit(
                subprocess.run, [PY, "-c", daemonizer(1.0, "")], env=env, check=True, pure=False
            )
            assert started.result(timeout=60).returncode == 0
            [daemon] = wait_for_marked(mark, 1)
            assert daemon.ppid() != os.getpid(), "the cluster's orphan came to the test process"
            deadline = time.monotonic() + 30
            while not gone_or_zombie(daemon) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gone_or_zombie(daemon)
    finally:
        cluster.close()
    adopted = [child for child in psutil.Process().children() if child.pid not in before]
    assert adopted == [], "the test process was left with the cluster's processes"
