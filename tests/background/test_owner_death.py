"""A host SIGKILLed before it recorded what proves a child its own (from a probe of several
processes on one SQLite file): between the spawn and ``record_child`` (one write, one thread
hop, and the RUNNING record before them) nothing on file could prove the tree the run's, so the
next open marked the run INTERRUPTED and left the tree running; so did a coroutine run whose
coroutine started children of its own. A registry now notes, before an owner's first run, the
cookie variable that owner's children carry; recovery stops what still carries a dead owner's
variable when one of its unfinished runs has no child on record."""

from __future__ import annotations

import asyncio
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
from lifecycle_helpers import marked, marked_env, survivors_after, wait_for_marked

import prismq_subprocess as pq

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="cookies, SIGKILL of the owner")

HOST = Path(__file__).with_name("dying_owner.py")

# The module: a grandchild in its own session (beyond the group) and one in the module's group;
# it prints nothing, so the dead owner's pipe does not end it.
MODULE = textwrap.dedent(
    """
    import subprocess, sys, time
    sleeper = [sys.executable, "-c", "import time; time.sleep(120)"]
    subprocess.Popen(sleeper)
    subprocess.Popen(sleeper, start_new_session=True)
    time.sleep(120)
    """
)


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path, str, dict[str, str]]]:
    module = tmp_path / "tree_module.py"
    module.write_text(MODULE)
    mark, env = marked_env()
    try:
        yield tmp_path / "runs.db", module, mark, env
    finally:
        for proc in marked(mark):
            try:
                proc.kill()
            except psutil.Error:
                continue


def _only_run_id(db: Path) -> str:
    raw = sqlite3.connect(db, timeout=10)
    try:
        rows = raw.execute("SELECT run_id FROM runs").fetchall()
    finally:
        raw.close()
    assert len(rows) == 1, rows
    return str(rows[0][0])


def _reopen(db: Path, run_id: str) -> tuple[pq.Run | None, list[str]]:
    async def read() -> tuple[pq.Run | None, list[str]]:
        async with pq.SQLiteRunRegistry(db) as registry:
            return await registry.get_run(run_id), registry.interrupted_run_ids

    return asyncio.run(read())


@pytest.mark.parametrize("mode", ["async", "threaded"])
@pytest.mark.parametrize("point", ["running", "record", "coroutine"])
def test_the_next_open_stops_the_tree_of_an_owner_killed_before_it_recorded_its_child(
    tree: tuple[Path, Path, str, dict[str, str]], point: str, mode: str
) -> None:
    db, module, mark, env = tree
    host = subprocess.Popen(
        [sys.executable, str(HOST), str(db), str(module), point, mode],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert host.stdout is not None
    try:
        if point == "coroutine":
            assert host.stdout.readline().split()[:1] == ["run"]
            wait_for_marked(mark, 4)  # the host, the module, its two grandchildren
            host.kill()
        assert host.wait(timeout=30) == -9
        orphans = wait_for_marked(mark, 3)  # the module and its grandchildren, ownerless
        run_id = _only_run_id(db)
        run, recovered = _reopen(db, run_id)
        assert recovered == [run_id]
        assert run is not None and run.status is pq.RunStatus.INTERRUPTED
        assert f"owner process {host.pid}" in (run.error_message or "")
        reason = run.error_message or ""
        assert "3 process(es) its owner had started were still running" in reason, run
        _, alive = psutil.wait_procs(orphans, timeout=10)
        assert alive == [] and survivors_after(mark, 1) == []
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        host.stdout.close()


def _owner_rows(db: Path) -> list[tuple[str, int, float, str]]:
    raw = sqlite3.connect(db, timeout=10)
    try:
        return [tuple(row) for row in raw.execute("SELECT * FROM run_owners")]  # type: ignore[misc]
    finally:
        raw.close()


async def test_an_owners_cookie_variable_is_on_file_before_its_first_run_can_start(
    tmp_path: Path,
) -> None:
    """Noted with the first add_run (and claim_run) of this process, in the same write, so it
    is on file before any child of the run exists; a run of another process's owner notes
    nothing; a live owner's note survives recovery, a dead one's is dropped with its runs."""
    db = tmp_path / "runs.db"
    me = pq.RunOwner.current()
    variable = pq.containment_report().cookie_variable
    assert variable is not None and variable.startswith("PRISMQ_RUN_")
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await dead.wait()
    stranger = pq.RunOwner(me.host, dead.pid, 1.0)
    async with pq.SQLiteRunRegistry(db) as registry:
        await registry.add_run(pq.Run(module_id="theirs", owner=stranger))
        assert _owner_rows(db) == []
        await registry.add_run(pq.Run(module_id="mine"))
        assert _owner_rows(db) == [(me.host, me.pid, me.started_at, variable)]
        await registry.add_run(pq.Run(module_id="mine"))  # once is enough
        assert len(_owner_rows(db)) == 1
    raw = sqlite3.connect(db)
    with raw:
        raw.execute("DELETE FROM run_owners")
        # A dead owner's note, and its run, for recovery to drop.
        raw.execute(
            "INSERT INTO run_owners VALUES (?, ?, ?, ?)",
            (stranger.host, stranger.pid, stranger.started_at, "PRISMQ_RUN_0DEAD0"),
        )
    raw.close()
    async with pq.SQLiteRunRegistry(db) as registry:
        assert len(registry.interrupted_run_ids) == 1  # the stranger's run
        assert _owner_rows(db) == []
        theirs = pq.Run(module_id="picked up", owner=stranger)
        await registry.add_run(theirs)
        claimed = theirs.copy()
        claimed.owner = None  # claimed for this process
        assert await registry.claim_run(claimed, stranger) is True
        assert _owner_rows(db) == [(me.host, me.pid, me.started_at, variable)]
        assert await registry.recover_orphans() == []
        assert _owner_rows(db) == [(me.host, me.pid, me.started_at, variable)]


def test_only_what_holds_the_dead_owners_variable_is_stopped() -> None:
    """Any value of the variable (every run of that owner, and none), with what is below it;
    another host's variable, even with the same value, and a malformed variable are left
    alone."""
    from prismq_subprocess._platform._orphans import stop_left_behind

    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    # A holder that starts a child in a session of its own, which inherits the variable.
    code = (
        f"import subprocess, time\nsubprocess.Popen({sleeper!r}, start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    holders = [
        subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, PRISMQ_RUN_0AB1="3")),
        subprocess.Popen(sleeper, env=dict(os.environ, PRISMQ_RUN_0AB1="9")),
    ]
    others = [
        subprocess.Popen(sleeper, env=dict(os.environ, PRISMQ_RUN_0AB12="3")),
        subprocess.Popen(sleeper, env=dict(os.environ, PRISMQ_RUN_0CD2="3")),
    ]
    try:
        wait_for_children(holders[0].pid, 1)
        below = psutil.Process(holders[0].pid).children()
        stops, counts = stop_left_behind([], ["PRISMQ_RUN_0AB1", "PRISMQ_RUN_", "X=1"], grace=2.0)
        assert (stops, counts) == ([], [3, 0, 0])
        for proc in holders:
            assert proc.wait(timeout=5) == -signal.SIGTERM
        _, alive = psutil.wait_procs(below, timeout=5)
        assert alive == []
        assert all(proc.poll() is None for proc in others)
    finally:
        for proc in (*holders, *others):
            proc.kill()
            proc.wait()


def wait_for_children(pid: int, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(psutil.Process(pid).children()) < count:
        assert time.monotonic() < deadline, "the holder's child did not start"
        time.sleep(0.02)
