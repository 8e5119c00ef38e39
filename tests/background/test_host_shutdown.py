"""A host ended by SIGTERM (issue 11 A4): with the shutdown handler no descendant survives and
the run is recorded; without it the orphaned tree survives, and the next open of the registry
stops it (proven ours by pid, start time and cookie) and marks the run INTERRUPTED. A pid that
now names another process is never touched."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from lifecycle_helpers import marked, silent_tree_files, wait_for_marked

import prismq_subprocess as pq

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals to the host")

HOST = Path(__file__).with_name("shutdown_host.py")
UVICORN_HOST = Path(__file__).with_name("uvicorn_host.py")


def _wait_until(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _child_recorded(db: Path, run_id: str) -> bool:
    raw = sqlite3.connect(db, timeout=10)
    try:
        row = raw.execute(
            "SELECT child_started_at FROM runs WHERE run_id = ? AND status = 'running'", (run_id,)
        ).fetchone()
    finally:
        raw.close()
    return row is not None and row[0] is not None


def _stored(db: Path, run_id: str) -> tuple[pq.Run | None, list[str]]:
    """Open the registry (which recovers), read the run; return it and the ids recovered."""

    async def read() -> tuple[pq.Run | None, list[str]]:
        async with pq.SQLiteRunRegistry(db) as registry:
            return await registry.get_run(run_id), registry.interrupted_run_ids

    return asyncio.run(read())


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path, str, dict[str, str]]]:
    with silent_tree_files(tmp_path) as files:
        yield files


def _start_host(
    db: Path, module: Path, how: str, mode: str, env: dict[str, str]
) -> tuple[subprocess.Popen[str], str]:
    argv = (
        [str(UVICORN_HOST), str(db), str(module), how]
        if mode == "uvicorn"
        else [str(HOST), str(db), str(module), how, mode]
    )
    host = subprocess.Popen(
        [sys.executable, *argv],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert host.stdout is not None
    line = host.stdout.readline().split()
    assert line[:1] == ["run"], line
    run_id = line[1]
    _wait_until(lambda: _child_recorded(db, run_id), 20, "the run's child to be recorded")
    return host, run_id


@pytest.mark.parametrize("mode", ["async", "threaded"])
def test_sigterm_with_the_handler_stops_every_descendant_and_records_the_run(
    tree: tuple[Path, Path, str, dict[str, str]], mode: str
) -> None:
    db, module, mark, env = tree
    host, run_id = _start_host(db, module, "handler", mode, env)
    procs = wait_for_marked(mark, 4)  # the host, the module and its two grandchildren
    host.send_signal(signal.SIGTERM)
    assert host.wait(timeout=30) == -signal.SIGTERM  # the default action still ended it
    assert host.stdout is not None
    host.stdout.close()
    _, alive = psutil.wait_procs(procs, timeout=5)
    assert alive == [] and marked(mark) == []
    run, recovered = _stored(db, run_id)
    assert recovered == [] and run is not None
    assert (run.status, run.error_message) == (pq.RunStatus.CANCELLED, "host received SIGTERM")


def test_without_the_handler_the_next_open_stops_the_orphaned_tree(
    tree: tuple[Path, Path, str, dict[str, str]],
) -> None:
    db, module, mark, env = tree
    host, run_id = _start_host(db, module, "bare", "async", env)
    wait_for_marked(mark, 4)
    host.send_signal(signal.SIGTERM)
    assert host.wait(timeout=30) == -signal.SIGTERM
    assert host.stdout is not None
    host.stdout.close()
    # The bug: the module and both grandchildren outlive the host.
    time.sleep(0.3)
    orphans = marked(mark)
    assert len(orphans) == 3, orphans
    run, recovered = _stored(db, run_id)
    assert recovered == [run_id]
    assert run is not None and run.status is pq.RunStatus.INTERRUPTED
    assert f"owner process {host.pid}" in (run.error_message or "")
    assert "was still running and was stopped" in (run.error_message or "")
    _, alive = psutil.wait_procs(orphans, timeout=5)
    assert alive == [] and marked(mark) == []


def test_a_recorded_pid_that_names_another_process_is_left_alone(tmp_path: Path) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # An unrelated live process at the recorded pid: no cookie, or another start time.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    cookie_env = dict(os.environ, PRISMQ_RUN_ABCDEF123456="7")
    lookalike = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], env=cookie_env
    )
    try:
        owner = pq.RunOwner(pq.RunOwner.current().host, dead.pid, 1.0)
        started = psutil.Process(stranger.pid).create_time()
        cases = {
            "no-cookie": pq.ProcessIdentity(stranger.pid, started, "PRISMQ_RUN_ABCDEF123456=7"),
            "reused": pq.ProcessIdentity(
                lookalike.pid,
                psutil.Process(lookalike.pid).create_time() - 30.0,
                "PRISMQ_RUN_ABCDEF123456=7",
            ),
            "other-run": pq.ProcessIdentity(
                lookalike.pid,
                psutil.Process(lookalike.pid).create_time(),
                "PRISMQ_RUN_ABCDEF123456=8",
            ),
        }
        db = tmp_path / "runs.db"

        async def store() -> None:
            async with pq.SQLiteRunRegistry(db) as registry:
                for run_id, identity in cases.items():
                    run = pq.Run(module_id="m", run_id=run_id, owner=owner)
                    run.mark_running(identity.pid)
                    await registry.add_run(run)
                    assert await registry.record_child(run_id, identity) is True

        asyncio.run(store())
        recovered_by_first_open = _stored(db, "no-cookie")[1]
        assert sorted(recovered_by_first_open) == sorted(cases)
        for run_id in cases:
            run, _ = _stored(db, run_id)
            assert run is not None and run.status is pq.RunStatus.INTERRUPTED
            assert "stopped" not in (run.error_message or "")
        assert stranger.poll() is None and lookalike.poll() is None
    finally:
        for proc in (stranger, lookalike):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("owner_lives", [True, False], ids=["renamed-live", "earlier-dead"])
def test_an_owner_recorded_under_another_host_name(tmp_path: Path, owner_lives: bool) -> None:
    # A probe's find: after the host was renamed, the next worker to open the registry took
    # the live owner for dead (another host's name), stopped its run's recorded child and
    # marked the run INTERRUPTED. A live process here with the owner's pid and start is that
    # owner, renamed: its run is left alone. A dead one's verified child is still stopped.
    cookie_env = dict(os.environ, PRISMQ_RUN_ABCDEF123456="7")
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], env=cookie_env)
    owner_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        if not owner_lives:
            owner_proc.kill()
            owner_proc.wait()
        here = pq.RunOwner.current()
        started = 1.0 if not owner_lives else psutil.Process(owner_proc.pid).create_time()
        owner = pq.RunOwner("renamed-" + here.host, owner_proc.pid, started)
        identity = pq.ProcessIdentity(
            child.pid, psutil.Process(child.pid).create_time(), "PRISMQ_RUN_ABCDEF123456=7"
        )
        db = tmp_path / "runs.db"

        async def store() -> None:
            async with pq.SQLiteRunRegistry(db) as registry:
                run = pq.Run(module_id="m", run_id="r", owner=owner)
                run.mark_running(child.pid)
                await registry.add_run(run)
                assert await registry.record_child("r", identity) is True

        asyncio.run(store())
        run, recovered = _stored(db, "r")
        assert run is not None
        if owner_lives:
            assert (recovered, run.status) == ([], pq.RunStatus.RUNNING)
            assert child.poll() is None, "the child of a live, renamed owner was stopped"
        else:
            assert (recovered, run.status) == (["r"], pq.RunStatus.INTERRUPTED)
            assert child.wait(timeout=10) is not None
    finally:
        for proc in (child, owner_proc):
            proc.kill()
            proc.wait()


def test_verify_and_stop_an_orphan_by_its_cookie(tmp_path: Path) -> None:
    env = dict(os.environ, PRISMQ_RUN_ABCDEF654321="3")
    # The child double-forks a daemon (found by its cookie only), then sleeps.
    code = textwrap.dedent(
        """
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                print(os.getpid(), flush=True)
                time.sleep(60)
            os._exit(0)
        os.wait()
        time.sleep(60)
        """
    )
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None
        daemon = psutil.Process(int(child.stdout.readline()))
        started = psutil.Process(child.pid).create_time()
        right = pq.ProcessIdentity(child.pid, started, "PRISMQ_RUN_ABCDEF654321=3")
        assert (
            pq.stop_orphan_tree(pq.ProcessIdentity(child.pid, started, "PRISMQ_RUN_ABCDEF654321=4"))
            is pq.OrphanCheck.UNPROVEN
        )
        assert (
            pq.stop_orphan_tree(pq.ProcessIdentity(child.pid, started, None))
            is pq.OrphanCheck.UNPROVEN
        )
        assert (
            pq.stop_orphan_tree(pq.ProcessIdentity(child.pid, started + 5, right.cookie))
            is pq.OrphanCheck.REUSED
        )
        assert (
            pq.stop_orphan_tree(pq.ProcessIdentity(child.pid, started + 0.5, right.cookie))
            is pq.OrphanCheck.REUSED
        )
        assert child.poll() is None and daemon.is_running()
        # Recorded under a boot time a second off (NTP slewed the clock across a second since):
        # still the very child (it was REUSED, and never stopped, before).
        moved = pq.ProcessIdentity(child.pid, started - 1.0, right.cookie)
        assert pq.stop_orphan_tree(moved, grace=2.0) is pq.OrphanCheck.VERIFIED
        assert child.wait(timeout=5) == -signal.SIGTERM
        psutil.wait_procs([daemon], timeout=5)
        assert not daemon.is_running() or daemon.status() == psutil.STATUS_ZOMBIE
        assert pq.stop_orphan_tree(right) is pq.OrphanCheck.GONE
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()


@pytest.mark.skipif(sys.platform == "win32", reason="cookies are POSIX environment variables")
def test_the_cookie_holders_of_a_gone_child_are_stopped_and_strangers_left_alone() -> None:
    """A dead owner's child often exits first (the broken pipe): its descendants, which hold
    the run's cookie, must still be stopped; another run's cookie and a REUSED pid are not."""
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    # The child starts a grandchild (inheriting the cookie), prints its pid and exits.
    code = f"import subprocess, sys\np = subprocess.Popen({sleeper!r})\nprint(p.pid, flush=True)\n"
    env = dict(os.environ, PRISMQ_RUN_ABCDEF777777="5")
    child = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE)
    other_run = subprocess.Popen(sleeper, env=dict(os.environ, PRISMQ_RUN_ABCDEF777777="6"))
    reused_at = subprocess.Popen(sleeper, env=dict(os.environ, PRISMQ_RUN_ABCDEF888888="1"))
    grandchild: psutil.Process | None = None
    try:
        assert child.stdout is not None
        grandchild = psutil.Process(int(child.stdout.readline()))
        started = psutil.Process(child.pid).create_time()
        assert child.wait(timeout=10) == 0
        from prismq_subprocess._platform._orphans import OrphanStop, stop_orphans

        reused = pq.ProcessIdentity(
            reused_at.pid,
            psutil.Process(reused_at.pid).create_time() - 30.0,
            "PRISMQ_RUN_ABCDEF888888=1",
        )
        gone = pq.ProcessIdentity(child.pid, started, "PRISMQ_RUN_ABCDEF777777=5")
        assert stop_orphans([gone, reused], grace=2.0) == [
            OrphanStop(pq.OrphanCheck.GONE, 1),
            OrphanStop(pq.OrphanCheck.REUSED, 0),
        ]
        _, alive = psutil.wait_procs([grandchild], timeout=5)
        assert alive == []
        assert other_run.poll() is None and reused_at.poll() is None
        # Nothing left: GONE, nothing signalled.
        assert pq.stop_orphan_tree(gone) is pq.OrphanCheck.GONE
    finally:
        for proc in (other_run, reused_at):
            proc.kill()
            proc.wait()
        if grandchild is not None:
            with contextlib.suppress(psutil.Error):
                grandchild.kill()
        if child.stdout is not None:
            child.stdout.close()


def test_under_uvicorn_the_handler_installed_in_the_lifespan_chains_to_uvicorns(
    tree: tuple[Path, Path, str, dict[str, str]],
) -> None:
    pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    db, module, mark, env = tree
    marker = db.with_name("lifespan-exited")
    host, run_id = _start_host(db, module, str(marker), "uvicorn", env)
    procs = wait_for_marked(mark, 4)
    host.send_signal(signal.SIGTERM)
    # uvicorn's handler ran after ours: a graceful shutdown (the lifespan exited), then uvicorn
    # raised the signal it had caught again, so the process still ended by SIGTERM.
    assert host.wait(timeout=30) == -signal.SIGTERM
    assert host.stdout is not None
    host.stdout.close()
    assert marker.read_text() == "lifespan exited"
    _, alive = psutil.wait_procs(procs, timeout=5)
    assert alive == [] and marked(mark) == []
    run, recovered = _stored(db, run_id)
    assert recovered == [] and run is not None
    assert (run.status, run.error_message) == (pq.RunStatus.CANCELLED, "host received SIGTERM")


def test_many_orphans_are_stopped_together_and_strangers_left_alone() -> None:
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    ours = [
        subprocess.Popen(sleeper, env=dict(os.environ, PRISMQ_RUN_ABCDEF111111=str(n)))
        for n in range(3)
    ]
    stranger = subprocess.Popen(sleeper)
    try:
        identities = [
            pq.ProcessIdentity(
                p.pid, psutil.Process(p.pid).create_time(), f"PRISMQ_RUN_ABCDEF111111={n}"
            )
            for n, p in enumerate(ours)
        ]
        identities.append(
            pq.ProcessIdentity(
                stranger.pid,
                psutil.Process(stranger.pid).create_time(),
                "PRISMQ_RUN_ABCDEF111111=9",
            )
        )
        from prismq_subprocess._platform._orphans import stop_orphan_trees

        checks = stop_orphan_trees(identities, grace=2.0)
        assert checks == [pq.OrphanCheck.VERIFIED] * 3 + [pq.OrphanCheck.UNPROVEN]
        assert [p.wait(timeout=5) for p in ours] == [-signal.SIGTERM] * 3
        assert stranger.poll() is None
    finally:
        for proc in (*ours, stranger):
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("reason", [5, b"bye", None, "lone \udc80"], ids=repr)
async def test_a_shutdown_reason_that_no_run_can_record_is_refused_before_anything_stops(
    reason: object,
) -> None:
    # A probe's find: stop_for_host_shutdown(5) returned at once without a word: each runner's
    # cancel() refused the reason and the gather() collecting them swallowed it; the runs went
    # on and their children lived.
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="reason"):
        await pq.stop_for_host_shutdown(reason, grace=1)  # type: ignore[arg-type]
