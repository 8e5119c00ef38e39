"""Tests specific to the SQLite run registry (prismq_subprocess/_background/_sqlite_registry.py)."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import psutil
import pytest

from prismq_subprocess._background._run_record import Run, RunOwner, RunStatus
from prismq_subprocess._background._sqlite_registry import SCHEMA_VERSION, SQLiteRunRegistry
from prismq_subprocess._core._exceptions import RegistryClosedError, RegistrySchemaError


def sqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prismq-sqlite")]


async def test_persists_across_reopen_and_uses_wal(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    run = Run(module_id="m", module_name="M", parameters={"x": 1})
    async with SQLiteRunRegistry(path) as registry:
        assert registry.journal_mode == "wal"
        await registry.add_run(run)
        run.mark_running(pid=7)
        run.mark_completed(0)
        run.output_tail = ["done"]
        await registry.update_run(run)
    async with SQLiteRunRegistry(path) as again:
        assert await again.get_run(run.run_id) == run
        assert again.interrupted_run_ids == []
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()


async def test_first_call_opens_lazily_and_close_stops_thread(tmp_path: Path) -> None:
    before = len(sqlite_threads())
    registry = SQLiteRunRegistry(tmp_path / "lazy.db")
    assert registry.journal_mode is None
    await registry.add_run(Run())
    assert len(sqlite_threads()) == before + 1
    await registry.close()
    await registry.close()
    assert len(sqlite_threads()) == before
    with pytest.raises(RegistryClosedError):
        await registry.get_run("x")


async def test_close_without_open_is_fine(tmp_path: Path) -> None:
    registry = SQLiteRunRegistry(tmp_path / "never.db")
    await registry.close()
    assert not (tmp_path / "never.db").exists()


async def test_memory_path(tmp_path: Path) -> None:
    async with SQLiteRunRegistry(":memory:") as registry:
        await registry.add_run(Run())
        assert await registry.count_runs() == 1


async def test_newer_schema_and_foreign_file_rejected(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    raw.close()
    with pytest.raises(RegistrySchemaError):
        await SQLiteRunRegistry(newer).open()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    registry = SQLiteRunRegistry(junk)
    with pytest.raises(RegistrySchemaError):
        await registry.open()
    await registry.close()
    assert sqlite_threads() == []


async def test_two_registries_on_one_file_write_concurrently(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    async with SQLiteRunRegistry(path) as a, SQLiteRunRegistry(path) as b:

        async def life(registry: SQLiteRunRegistry, i: int) -> None:
            run = Run(module_id=f"m{i % 4}")
            await registry.add_run(run)
            run.mark_running()
            await registry.update_run(run)
            run.mark_completed()
            await registry.update_run(run)

        await asyncio.gather(*(life(a if i % 2 else b, i) for i in range(100)))
        assert await a.count_runs(status=RunStatus.COMPLETED) == 100
        assert await b.count_runs(module_id="m3") == 25


async def test_recovery_by_owner_liveness(tmp_path: Path) -> None:
    path = tmp_path / "owners.db"
    me = RunOwner.current()
    # A plain Popen keeps the owner's lifetime independent of the event loop under test.
    sleeper = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-c", "import time; time.sleep(60)"]
    )
    try:
        live_other = RunOwner(me.host, sleeper.pid, psutil.Process(sleeper.pid).create_time())
        async with SQLiteRunRegistry(path) as registry:
            mine = Run(module_id="mine")
            await registry.add_run(mine)  # owned by this live process
            mine.mark_running()
            await registry.update_run(mine)
            other = Run(module_id="other", owner=live_other)
            await registry.add_run(other)
            # Same pid as ours, different start time: a reused pid, so the owner is gone.
            reused = Run(owner=RunOwner(me.host, me.pid, me.started_at - 500.0))
            await registry.add_run(reused)
            other_host = Run(owner=RunOwner(me.host + ".old", me.pid, me.started_at))
            await registry.add_run(other_host)
        async with SQLiteRunRegistry(path) as registry:
            assert set(registry.interrupted_run_ids) == {reused.run_id, other_host.run_id}
            got_reused = await registry.get_run(reused.run_id)
            assert got_reused is not None and got_reused.status is RunStatus.INTERRUPTED
            assert got_reused.error_message and "is gone" in got_reused.error_message
            assert got_reused.finished_at is not None
            for kept, status in ((mine, RunStatus.RUNNING), (other, RunStatus.PENDING)):
                got = await registry.get_run(kept.run_id)
                assert got is not None and got.status is status
    finally:
        sleeper.kill()
        sleeper.wait()
    async with SQLiteRunRegistry(path) as registry:
        assert registry.interrupted_run_ids == [other.run_id]
        got_other = await registry.get_run(other.run_id)
        assert got_other is not None and got_other.status is RunStatus.INTERRUPTED
        got_mine = await registry.get_run(mine.run_id)
        assert got_mine is not None and got_mine.status is RunStatus.RUNNING


CRASH_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys
    from prismq_subprocess._background._run_record import Run
    from prismq_subprocess._background._sqlite_registry import SQLiteRunRegistry

    async def main():
        registry = SQLiteRunRegistry(sys.argv[1])
        await registry.open()
        done = Run(run_id="done", module_id="crash", parameters={"n": 1})
        await registry.add_run(done)
        done.mark_running(pid=123)
        await registry.update_run(done)
        done.mark_completed(0)
        done.output_tail = ["all good"]
        await registry.update_run(done)
        running = Run(run_id="running", module_id="crash")
        await registry.add_run(running)
        running.mark_running(pid=456)
        await registry.update_run(running)
        await registry.add_run(Run(run_id="pending", module_id="crash"))
        print("ready", flush=True)
        await asyncio.sleep(120)

    asyncio.run(main())
    """
)


async def test_crash_of_owner_process_marks_runs_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    script = tmp_path / "crasher.py"
    script.write_text(CRASH_SCRIPT)
    child = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"
        # While the owner lives, another process opening the file leaves its runs alone.
        async with SQLiteRunRegistry(path) as registry:
            assert registry.interrupted_run_ids == []
            done_before = await registry.get_run("done")
            running = await registry.get_run("running")
            assert running is not None and running.status is RunStatus.RUNNING
    finally:
        child.kill()  # SIGKILL on POSIX: no cleanup code runs in the child
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    async with SQLiteRunRegistry(path) as registry:
        assert sorted(registry.interrupted_run_ids) == ["pending", "running"]
        assert await registry.get_run("done") == done_before
        assert done_before is not None and done_before.status is RunStatus.COMPLETED
        for run_id in ("running", "pending"):
            run = await registry.get_run(run_id)
            assert run is not None and run.status is RunStatus.INTERRUPTED
            assert run.error_message and str(child.pid) in run.error_message
        assert await registry.count_runs(status=RunStatus.INTERRUPTED) == 2
    async with SQLiteRunRegistry(path) as registry:
        assert registry.interrupted_run_ids == []  # recovery happens once


async def test_cancelled_open_does_not_leak(tmp_path: Path) -> None:
    registry = SQLiteRunRegistry(tmp_path / "cancel.db")
    task = asyncio.create_task(registry.open())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sqlite_threads() == []
    # A later call can still open it.
    await registry.add_run(Run())
    assert await registry.count_runs() == 1
    await registry.close()
    assert sqlite_threads() == []


async def test_the_worker_of_a_cluster_run_is_stored(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    run = Run(module_id="m", module_name="M", mode="dask")
    async with SQLiteRunRegistry(path) as registry:
        await registry.add_run(run)
        run.mark_running(pid=42)
        run.worker = "tls://10.0.0.7:40331"
        await registry.update_run(run)
    async with SQLiteRunRegistry(path) as again:
        stored = await again.get_run(run.run_id)
    assert stored == run and stored is not None and stored.worker == "tls://10.0.0.7:40331"


async def test_a_version_1_file_gains_the_worker_column_and_keeps_its_runs(tmp_path: Path) -> None:
    from prismq_subprocess._background._sqlite_registry import _migrate_0_to_1

    path = tmp_path / "v1.db"
    with sqlite3.connect(path) as raw:
        _migrate_0_to_1(raw)
        raw.execute(
            "INSERT INTO runs (run_id, module_id, module_name, parameters, status, created_at,"
            " mode, output_tail) VALUES ('old', 'm', 'M', '{}', 'completed', 0, 'async', '[]')"
        )
        raw.execute("PRAGMA user_version = 1")
    raw.close()
    async with SQLiteRunRegistry(path) as registry:
        old = await registry.get_run("old")
        assert old is not None and old.worker is None and old.status.value == "completed"
        new = Run(module_id="m", worker="tcp://w:1")
        await registry.add_run(new)
        assert await registry.get_run(new.run_id) == new
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION >= 2
    raw.close()
