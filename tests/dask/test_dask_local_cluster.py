"""The issue-15 scenarios on a literal ``distributed.LocalCluster(n_workers=2, processes=True)``.

test_dask_backend.py runs them (and more) on a cluster started from the Dask command line. Here
the cluster is the one the issue names, started in a child interpreter
(local_cluster_scenarios.py, under ``helpers.reaped``): a LocalCluster in the pytest process
would leave multiprocessing's resource tracker alive for the whole test run. The child runs
ModuleRunner with DaskBackend(cluster.scheduler_address) through four scenarios (20 modules over
both workers, a cancel mid-run, the local backend's results, a worker killed mid-run), checks
the worker processes with psutil while they exist, and reports what it saw as JSON; the tests
below assert on it, and that nothing the child started outlives it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

pytest.importorskip(
    "distributed",
    reason="the [dask] extra is not installed (pip install 'prismq_subprocess[dask]')",
)

from helpers import PY, reaped
from test_dask_backend import GATED, LINES, assert_cluster_outcomes

from prismq_subprocess import Run, RunStatus

SCRIPT = Path(__file__).with_name("local_cluster_scenarios.py")
# The child's own bound: its startup plus four scenarios of at most 90 s each would be more, but
# it stops at the first scenario that raises; a healthy run takes well under a minute.
CHILD_SECONDS = 200.0


def tail(path: Path, lines: int = 60) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


@pytest.fixture(scope="module")
def outcome(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Run the child once for the whole file: what it reported, and what it left behind."""
    directory = tmp_path_factory.mktemp("local-cluster")
    (directory / "lines.py").write_text(LINES)
    (directory / "gated.py").write_text(GATED)
    log = directory / "child.log"
    before = {child.pid for child in psutil.Process().children()}
    with log.open("wb") as stderr:
        child = subprocess.Popen(
            reaped(PY, str(SCRIPT), str(directory)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        try:
            stdout, _ = child.communicate(timeout=CHILD_SECONDS)
        except subprocess.TimeoutExpired:
            for proc in psutil.Process(child.pid).children(recursive=True):
                try:
                    proc.kill()
                except psutil.Error:
                    continue
            child.kill()
            child.communicate(timeout=30)
            pytest.fail(f"the LocalCluster child ran over {CHILD_SECONDS} s; its log:\n{tail(log)}")
    reported = [
        line[len("RESULT ") :]
        for line in stdout.decode(errors="replace").splitlines()
        if line.startswith("RESULT ")
    ]
    assert child.returncode == 0 and reported, (
        f"the LocalCluster child exited with {child.returncode} and reported"
        f" {len(reported)} results; its log:\n{tail(log)}"
    )
    result: dict[str, Any] = json.loads(reported[-1])
    result["adopted"] = [c.pid for c in psutil.Process().children() if c.pid not in before]
    result["log"] = tail(log)
    return result


def scenario(outcome: dict[str, Any], name: str) -> dict[str, Any]:
    if name in outcome["errors"]:
        pytest.fail(f"the {name!r} scenario raised in the child:\n{outcome['errors'][name]}")
    if name not in outcome["scenarios"]:
        pytest.fail(f"the {name!r} scenario did not run: an earlier one raised {outcome['errors']}")
    observed: dict[str, Any] = outcome["scenarios"][name]
    return observed


def test_twenty_modules_spread_over_both_workers_stream_whole_and_in_order(
    outcome: dict[str, Any],
) -> None:
    observed = scenario(outcome, "spread")
    runs = [Run.from_dict(data) for data in observed["runs"]]
    assert len(runs) == 20
    assert len(observed["workers"]) == 2, observed["workers"]
    for i, run in enumerate(runs):
        lines = observed["lines"][run.run_id]
        # Subscribed before the start: every line arrived live, whole, in order, none missing.
        assert lines == [f"m{i} {n}" for n in range(40)], (run.run_id, lines)
        assert run.status is RunStatus.COMPLETED and run.exit_code == 0, run
        assert run.output_tail == [f"m{i} {n}" for n in range(35, 40)], run
        assert run.mode == "dask" and run.pid is not None and run.started_at is not None, run
        assert run.worker in observed["workers"], (run.worker, observed["workers"])
    assert {run.worker for run in runs} == set(observed["workers"]), "both workers ran modules"
    assert observed["reopened"] == sorted(observed["runs"], key=lambda r: r["run_id"]), (
        "the SQLite registry, reopened, lists the same runs"
    )


def test_cancel_mid_run_leaves_nothing_of_the_tree_on_the_worker(outcome: dict[str, Any]) -> None:
    observed = scenario(outcome, "cancel")
    running, run = Run.from_dict(observed["running"]), Run.from_dict(observed["run"])
    grandchild = observed["grandchild"]
    assert running.status is RunStatus.RUNNING and running.pid is not None, running
    assert observed["worker_pid"] is not None, f"no worker process for {running.worker}"
    assert {running.pid, grandchild} <= set(observed["tree_before"]), (
        "the module's tree runs under its worker process",
        observed["tree_before"],
    )
    assert observed["cancel_returned"], "cancel() said the run was not running"
    assert run.status is RunStatus.CANCELLED and run.error_message == "stop it", run
    assert run.output_tail[-1] == "ready", run.output_tail
    assert run.exit_code is not None and run.exit_code < 0, run.exit_code
    left = set(observed["tree_after"]) & {running.pid, grandchild}
    assert not left, f"still under the worker process after the cancel: {left}"
    assert observed["alive_after"] == [], f"still alive after the cancel: {observed['alive_after']}"


def test_worker_killed_mid_run_marks_the_run_interrupted_and_never_reruns_it(
    outcome: dict[str, Any],
) -> None:
    observed = scenario(outcome, "kill")
    running, run = Run.from_dict(observed["running"]), Run.from_dict(observed["run"])
    assert running.status is RunStatus.RUNNING and running.pid is not None, running
    assert observed["in_worker_tree"], "the module and its grandchild ran under the killed worker"
    assert not observed["killed_worker_alive"], "the worker process was killed"
    assert run.status is RunStatus.INTERRUPTED, run
    assert run.error_message is not None, run
    assert f"worker {running.worker} died" in run.error_message, run.error_message
    assert "not run again" in run.error_message, run.error_message
    assert run.worker == running.worker and run.pid == running.pid, run
    assert observed["starts"] == 1, f"the module started {observed['starts']} times"
    assert observed["orphans_stopped"], "the dead worker's module tree was stopped"
    assert len(observed["workers_after"]) == 2, "the nanny restarted the worker"
    assert running.worker not in observed["workers_after"], observed["workers_after"]


def test_results_identical_to_the_local_backend(outcome: dict[str, Any]) -> None:
    observed = scenario(outcome, "identical")
    local = {name: Run.from_dict(data) for name, data in observed["local"].items()}
    remote = {name: Run.from_dict(data) for name, data in observed["remote"].items()}
    assert set(local) == set(remote) and len(local) == 9
    for name, a in local.items():
        b = remote[name]
        assert (a.status, a.exit_code) == (b.status, b.exit_code), (name, a, b)
        assert a.output_tail == b.output_tail, (name, a.output_tail, b.output_tail)
        if name == "memory":
            # The message quotes the RSS measured at the time, which differs run to run.
            assert a.error_message and b.error_message, (a, b)
            assert a.error_message.split(":")[0] == b.error_message.split(":")[0], (a, b)
        else:
            assert a.error_message == b.error_message, (name, a, b)
        assert a.mode != "dask" and b.mode == "dask" and a.worker is None and b.worker, (a, b)
    assert_cluster_outcomes(remote)
    assert remote["spread-like"].output_tail == [f"line {n}" for n in range(35, 40)]
    assert remote["env-cwd-args"].output_tail[0].startswith("v1 ")
    assert (
        remote["env-cwd-args"]
        .output_tail[0]
        .endswith("['--tags', 'a', '--tags', 'b', '--flag', '--n', '2', 'raw', '--x=1']")
    )


def test_nothing_the_cluster_started_outlives_its_interpreter(outcome: dict[str, Any]) -> None:
    seen = dict(outcome["processes"])
    # The check covers the cluster itself: both worker processes and the resource tracker.
    workers = set(outcome["worker_pids"].values())
    assert workers <= set(map(int, seen)), (workers, seen)
    assert outcome["tracker_pid"] is not None and outcome["tracker_pid"] in seen
    left = []
    for pid, created in seen.items():
        try:
            proc = psutil.Process(int(pid))
            if proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{pid} {proc.cmdline()}")
        except psutil.NoSuchProcess:
            continue
    assert left == [], "processes the LocalCluster child started outlived it"
    assert outcome["adopted"] == [], "the test process was left with the cluster's processes"
