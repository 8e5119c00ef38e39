"""A host SIGKILLed before it recorded what proves a child its own (from a probe of several
processes on one SQLite file): between the spawn and ``record_child`` (one write, one thread
hop, and the RUNNING record before them) nothing on file could prove the tree the run's, so the
next open marked the run INTERRUPTED and left the tree running; so did a coroutine run whose
coroutine started children of its own. A registry now notes, before an owner's first run, the
cookie variable that owner's children carry; recovery stops what still carries a dead owner's
variable when one of its unfinished runs has no child on record."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from lifecycle_helpers import (
    silent_tree_files,
    survivors_after,
    wait_for_marked,
)

import prismq_subprocess as pq

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="cookies, SIGKILL of the owner")

HOST = Path(__file__).with_name("dying_owner.py")


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[tuple[Path, Path, str, dict[str, str]]]:
    with silent_tree_files(tmp_path) as files:
        yield files


def _start_host(
    db: Path, module: Path, point: str, mode: str, env: dict[str, str]
) -> subprocess.Popen[str]:
    host = subprocess.Popen(
        [sys.executable, str(HOST), str(db), str(module), point, mode],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert host.stdout is not None
    return host


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
    host = _start_host(db, module, point, mode, env)
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
        assert "3 process(es) its owner had started (for this run or another)" in reason, run
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


def detached(argv: list[str], **variables: str) -> psutil.Process:
    """Start ``argv`` with ``variables`` added to its environment, as a leftover of a dead host
    is: not below this process (which a recovery spares), in a session of its own."""
    launcher = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen({argv!r}, start_new_session=True, stdout=subprocess.DEVNULL,"
        " stderr=subprocess.DEVNULL)\n"
        "print(p.pid, flush=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", launcher],
        env=dict(os.environ, **variables),
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    return psutil.Process(int(out))


def gone_within(procs: list[psutil.Process], seconds: float) -> bool:
    _, alive = psutil.wait_procs(procs, timeout=seconds)
    return all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in alive)


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            continue


SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_only_what_holds_the_dead_owners_variable_is_stopped() -> None:
    """Any value of the variable (every run of that owner, and none), with what is below it;
    another host's variable, even with the same value, and a malformed variable are left
    alone."""
    from prismq_subprocess._platform._orphans import stop_left_behind

    # A holder that starts a child in a session of its own, which inherits the variable.
    code = (
        f"import subprocess, time\nsubprocess.Popen({SLEEPER!r}, start_new_session=True)\n"
        "time.sleep(60)\n"
    )
    holders = [
        detached([sys.executable, "-c", code], PRISMQ_RUN_0AB1="3"),
        detached(SLEEPER, PRISMQ_RUN_0AB1="9"),
    ]
    others = [detached(SLEEPER, PRISMQ_RUN_0AB12="3"), detached(SLEEPER, PRISMQ_RUN_0CD2="3")]
    try:
        wait_for_children(holders[0].pid, 1)
        below = holders[0].children()
        stops, counts = stop_left_behind([], ["PRISMQ_RUN_0AB1", "PRISMQ_RUN_", "X=1"], grace=2.0)
        # (At least: a process caught between fork and exec by a look counts apart.)
        assert stops == [] and counts[0] >= 3 and counts[1:] == [0, 0], counts
        assert gone_within([*holders, *below], 5)
        assert all(proc.is_running() for proc in others)
    finally:
        kill_all([*holders, *others])


def wait_for_children(pid: int, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(psutil.Process(pid).children()) < count:
        assert time.monotonic() < deadline, "the holder's child did not start"
        time.sleep(0.02)


def _child_recorded(db: Path, module_id: str) -> bool:
    raw = sqlite3.connect(db, timeout=10)
    try:
        row = raw.execute(
            "SELECT child_started_at FROM runs WHERE module_id = ? AND status = 'running'",
            (module_id,),
        ).fetchone()
    finally:
        raw.close()
    return row is not None and row[0] is not None


def _wait_until(predicate: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_live_host_started_by_the_dead_owner_is_left_alone_with_its_runs(
    tree: tuple[Path, Path, str, dict[str, str]],
) -> None:
    """A nested host (a live owner on the same file, started by the dead one through the
    library) carries the dead owner's variable, and so do its run's processes: the first
    version of the variable stop killed them all and recorded the live host's run
    INTERRUPTED, "crash or restart" (review)."""
    db, module, mark, env = tree
    host = _start_host(db, module, "nested", "async", env)
    assert host.stdout is not None
    try:
        line = host.stdout.readline().split()
        assert line[:1] == ["nested"], line
        nested = psutil.Process(int(line[1]))
        _wait_until(lambda: _child_recorded(db, "tree"), "the nested host's run to start")
        live = wait_for_marked(mark, 5)  # the dead-to-be host, the nested one, its run's three
        host.kill()
        host.wait()
        raw = sqlite3.connect(db, timeout=10)
        ids = dict(raw.execute("SELECT module_id, run_id FROM runs").fetchall())
        raw.close()
        run, recovered = _reopen(db, ids["tree"])
        assert recovered == [ids["queued"]]
        assert run is not None and run.status is pq.RunStatus.RUNNING
        time.sleep(0.5)
        assert nested.is_running()
        assert all(p.is_running() for p in live if p.pid != host.pid)
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        host.stdout.close()


# Holds the dead host's variable (inherited), starts a child that inherits it too, then stops
# every holder of that variable: its own child must survive (and so must it).
SELF_RECOVERY = textwrap.dedent(
    """
    import subprocess, sys, time
    from prismq_subprocess._platform._orphans import stop_left_behind
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    time.sleep(0.5)
    stops, counts = stop_left_behind([], ["PRISMQ_RUN_0DEAD7"], grace=2.0)
    print(counts[0], child.poll(), flush=True)
    child.kill()
    """
)


def test_a_recovering_process_spares_itself_its_ancestors_and_its_children() -> None:
    """A process that recovers a dead host it descends from (a module of that host opening the
    same file) holds the host's variable, as its children and its parent do: it stopped its
    own child (review); only the dead host's other leftovers are stopped."""
    env = dict(os.environ, PRISMQ_RUN_0DEAD7="1")
    stranger = detached(SLEEPER, PRISMQ_RUN_0DEAD7="1")  # a leftover of the dead host
    # The recovering process's parent holds the variable too (a shell between them).
    recovering = [sys.executable, "-c", SELF_RECOVERY]
    shell = f"import subprocess, sys; sys.exit(subprocess.call({recovering!r}))"
    parent = subprocess.Popen(
        [sys.executable, "-c", shell],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        out, _ = parent.communicate(timeout=30)
        assert out.split() == ["1", "None"], out  # one stopped (the stranger); its child alive
        assert gone_within([stranger], 5)
        assert parent.returncode == 0
    finally:
        kill_all([stranger])
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def _store_orphaned(db: Path, owner: pq.RunOwner, variables: list[str]) -> str:
    async def store() -> str:
        async with pq.SQLiteRunRegistry(db) as registry:
            run = pq.Run(module_id="orphan", owner=owner)
            await registry.add_run(run)
            return run.run_id

    run_id = asyncio.run(store())
    raw = sqlite3.connect(db)
    with raw:
        for variable in variables:
            raw.execute(
                "INSERT INTO run_owners VALUES (?, ?, ?, ?)",
                (owner.host, owner.pid, owner.started_at, variable),
            )
    raw.close()
    return run_id


def test_every_variable_an_owner_had_is_used_and_another_hosts_owner_is_left_alone(
    tmp_path: Path,
) -> None:
    """A host that exec()s itself keeps its pid and start time and gets a new variable: both
    are noted and both stopped (review: the second was ignored). An owner recorded under
    another host name may be a live process of this host renamed since: nothing is stopped
    by its variable, and its note stays (review: its live child was killed)."""
    holders = [
        detached(SLEEPER, **{name: "1"})
        for name in ("PRISMQ_RUN_0E1", "PRISMQ_RUN_0E2", "PRISMQ_RUN_0E3")
    ]
    try:
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        here = pq.RunOwner.current().host
        exec_d = ["PRISMQ_RUN_0E1", "PRISMQ_RUN_0E2"]
        _store_orphaned(tmp_path / "a.db", pq.RunOwner(here, dead.pid, 1.0), exec_d)
        renamed = pq.RunOwner("renamed-" + here, dead.pid, 1.0)
        _store_orphaned(tmp_path / "b.db", renamed, ["PRISMQ_RUN_0E3"])
        for db in ("a.db", "b.db"):
            run_id = _only_run_id(tmp_path / db)
            run, recovered = _reopen(tmp_path / db, run_id)
            assert recovered == [run_id]
            assert run is not None and run.status is pq.RunStatus.INTERRUPTED
        assert gone_within(holders[:2], 10)
        assert holders[2].is_running()
        assert [row[3] for row in _owner_rows(tmp_path / "a.db")] == []
        assert [row[3] for row in _owner_rows(tmp_path / "b.db")] == ["PRISMQ_RUN_0E3"]
    finally:
        kill_all(holders)


def test_an_owner_that_dies_during_anothers_recovery_is_left_for_the_next(
    tree: tuple[Path, Path, str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The owner was alive at the look that stops trees and dead by the write that records
    runs: that write marked its run INTERRUPTED and dropped its note, with its tree running,
    and no later recovery could stop it (review). Its run is now the next recovery's."""
    from prismq_subprocess._background import _sqlite_registry as module

    db, script, mark, env = tree
    host = _start_host(db, script, "coroutine", "async", env)
    assert host.stdout is not None
    try:
        assert host.stdout.readline().split()[:1] == ["run"]
        wait_for_marked(mark, 4)
        look = module._Database._stop_orphans

        def look_then_owner_dies(self: Any) -> Any:
            found = look(self)
            host.kill()
            host.wait()
            return found

        monkeypatch.setattr(module._Database, "_stop_orphans", look_then_owner_dies)
        run_id = _only_run_id(db)
        run, recovered = _reopen(db, run_id)
        assert recovered == [] and run is not None and run.status is pq.RunStatus.RUNNING
        assert len(_owner_rows(db)) == 1
        monkeypatch.undo()
        orphans = wait_for_marked(mark, 3)
        run, recovered = _reopen(db, run_id)
        assert recovered == [run_id]
        assert run is not None and "its owner had started" in (run.error_message or "")
        _, alive = psutil.wait_procs(orphans, timeout=10)
        assert alive == []
    finally:
        if host.poll() is None:
            host.kill()
            host.wait()
        host.stdout.close()


LIVE_OWNER = textwrap.dedent(
    """
    import asyncio, sys, prismq_subprocess as pq
    async def main():
        async with (
            pq.SQLiteRunRegistry(sys.argv[1]) as registry,
            pq.OutputCapture(log_dir=sys.argv[3] if len(sys.argv) > 3 else None) as output,
            pq.ModuleRunner(registry, output=output) as runner,
        ):
            run_id = await runner.start_module("m", "M", sys.argv[2])
            while (await registry.get_run(run_id)).pid is None:
                await asyncio.sleep(0.02)
            print(run_id, flush=True)
            await asyncio.sleep(60)
    asyncio.run(main())
    """
)


@contextlib.contextmanager
def live_owner_seen_after_a_clock_step(
    monkeypatch: pytest.MonkeyPatch, step: float, *args: Path
) -> Iterator[tuple[str, list[psutil.Process], pytest.MonkeyPatch]]:
    """A live owner (LIVE_OWNER with ``args``), its running run's id and tree, and the patch
    that moves this process's boot time by ``step`` s (what it reads after a step of the wall
    clock; ``undo()`` it before looking at the tree, whose start times it moves too). The
    owner and its tree are killed afterwards."""
    import psutil._pslinux as pslinux

    owner = subprocess.Popen(
        [sys.executable, "-c", LIVE_OWNER, *map(str, args)], stdout=subprocess.PIPE, text=True
    )
    children: list[psutil.Process] = []
    try:
        assert owner.stdout is not None
        run_id = owner.stdout.readline().strip()
        assert run_id, "the owner did not start its run"
        children += psutil.Process(owner.pid).children(recursive=True)
        pq.RunOwner.current()  # (cached before the step: this process's own record stays true)
        real = pslinux.boot_time()
        with monkeypatch.context() as patched:
            patched.setattr(pslinux, "boot_time", lambda: real + step)
            yield run_id, children, patched
    finally:
        owner.kill()
        owner.communicate()  # (also closes its stdout)
        kill_all(children)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil's Linux boot time")
@pytest.mark.parametrize("step", [5.0, -3.0, 3600.0])
def test_a_clock_step_does_not_make_a_live_owner_look_dead(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: float
) -> None:
    # A probe's find: a step of the wall clock by more than 2 s (a VM resumed, `chronyc
    # makestep`) moves the start time psutil reads for every process, the owner's included;
    # the next worker to open the registry took the live owner for dead, stopped its running
    # module's tree and marked the run INTERRUPTED. Only the checking process sees the step
    # here (its boot time is moved), as it would read after a real one.
    db, module = tmp_path / "runs.db", tmp_path / "module.py"
    module.write_text("import time\ntime.sleep(60)\n")
    with live_owner_seen_after_a_clock_step(monkeypatch, step, db, module) as seen:
        run_id, children, step_patch = seen
        run, recovered = _reopen(db, run_id)
        step_patch.undo()
        assert recovered == []
        assert run is not None and run.status is pq.RunStatus.RUNNING
        assert children and all(child.is_running() for child in children)


PENDING_OWNER = textwrap.dedent(
    """
    import asyncio, sys, prismq_subprocess as pq
    async def main():
        async with pq.SQLiteRunRegistry(sys.argv[1]) as registry:
            run = pq.Run(module_id="m")
            await registry.add_run(run)
            print(run.run_id, flush=True)
            await asyncio.sleep(60)
    asyncio.run(main())
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil's Linux boot time")
def test_a_clock_step_does_not_let_another_manager_take_over_a_live_owners_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The same step seen by BackgroundTaskManager.start_task: a PENDING run of a live process
    # looked abandoned, and was taken over and run here too (one run id, two jobs).
    import psutil._pslinux as pslinux

    db = tmp_path / "runs.db"
    owner = subprocess.Popen(
        [sys.executable, "-c", PENDING_OWNER, str(db)], stdout=subprocess.PIPE, text=True
    )
    ran: list[str] = []

    async def work() -> None:
        ran.append("here")

    async def take_over(run_id: str) -> None:
        async with (
            pq.SQLiteRunRegistry(db) as registry,
            pq.BackgroundTaskManager(registry) as manager,
        ):
            with pytest.raises(pq.exceptions.DuplicateRunError, match="alive"):
                await manager.start_task(pq.Run(module_id="m", run_id=run_id), work())

    try:
        assert owner.stdout is not None
        run_id = owner.stdout.readline().strip()
        assert run_id, "the owner did not add its run"
        pq.RunOwner.current()  # (cached before the step: this process's own record stays true)
        real = pslinux.boot_time()
        monkeypatch.setattr(pslinux, "boot_time", lambda: real + 7.0)
        asyncio.run(take_over(run_id))
        monkeypatch.undo()
        assert ran == []
    finally:
        owner.kill()
        owner.communicate()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil's Linux boot time")
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_a_clock_step_does_not_make_a_process_orphan_its_own_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    # Seen in CI: this VM's boot time moved by more than a minute during a session (the guest
    # paused, then its wall clock stepped), and a test process took its own PENDING run for an
    # orphan (wait_finished's owner check recorded it INTERRUPTED). A process's own record is
    # exact: it judges its own runs by it.
    import psutil._pslinux as pslinux

    pq.RunOwner.current()  # (made before the step, as a long-running host's is)
    registry: pq.BaseRunRegistry = (
        pq.RunRegistry() if kind == "memory" else pq.SQLiteRunRegistry(tmp_path / "r.db")
    )
    async with registry:
        run = pq.Run(module_id="m")
        await registry.add_run(run)
        real = pslinux.boot_time()
        monkeypatch.setattr(pslinux, "boot_time", lambda: real + 4.0)
        with pytest.raises(TimeoutError):
            await registry.wait_finished(run.run_id, timeout=0.3)
        assert await registry.recover_orphans() == []
        monkeypatch.undo()
        stored = await registry.get_run(run.run_id)
        assert stored is not None and stored.status is pq.RunStatus.PENDING


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil's Linux boot time")
@pytest.mark.parametrize("seen_by", ["wait_finished", "follower"])
def test_a_clock_step_does_not_end_a_live_owners_run_for_a_read_only_viewer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seen_by: str
) -> None:
    # A probe's find: after such a step a read-only viewer (what `runs tail -f` and a
    # dashboard use) took the live owner for dead: wait_finished() returned the run
    # INTERRUPTED and a follower of its output ended "interrupted", while a writable open
    # rightly left it running. They asked RunOwner.is_alive(), not the check that allows
    # for a step of the clock and a renamed host.
    db, module, logs = tmp_path / "runs.db", tmp_path / "module.py", tmp_path / "logs"
    module.write_text("import time\nprint('started', flush=True)\ntime.sleep(60)\n")

    async def view(run_id: str) -> None:
        async with pq.SQLiteRunRegistry(db, read_only=True) as viewer:
            if seen_by == "wait_finished":
                with pytest.raises(TimeoutError):  # (more than two owner checks)
                    await viewer.wait_finished(run_id, timeout=2.5)
            else:
                async with pq.OutputCapture(log_dir=logs) as capture:
                    with pytest.raises(TimeoutError):
                        async with (
                            asyncio.timeout(2.5),
                            capture.subscribe(run_id, registry=viewer) as subscription,
                        ):
                            async for _ in subscription:
                                pass
            stored = await viewer.get_run(run_id)
            assert stored is not None and stored.status is pq.RunStatus.RUNNING

    with live_owner_seen_after_a_clock_step(monkeypatch, 5.0, db, module, logs) as seen:
        run_id, children, step_patch = seen
        asyncio.run(view(run_id))
        step_patch.undo()
        assert children and all(child.is_running() for child in children)
