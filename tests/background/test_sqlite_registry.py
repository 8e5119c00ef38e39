"""Tests specific to the SQLite run registry (prismq_subprocess/_background/_sqlite_registry.py)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import anyio
import psutil
import pytest

import prismq_subprocess as pq
from prismq_subprocess._background._run_record import Run, RunOwner, RunStatus
from prismq_subprocess._background._sqlite_registry import (
    _V1_COLUMNS,
    APPLICATION_ID,
    SCHEMA_VERSION,
    SQLiteRunRegistry,
    _migrate_0_to_1,
    _migrate_1_to_2,
    _row_values,
)
from prismq_subprocess._core._exceptions import (
    InvalidTimeoutError,
    PrismQError,
    RegistryClosedError,
    RegistryOpenError,
    RegistrySchemaError,
)


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


def db_fds(path: Path) -> list[str]:
    """This process's descriptors open on ``path`` or its -wal / -shm files."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith(str(path)):
                found.append(target)
    return found


def released_within(seconds: float, released: Callable[[], bool]) -> None:
    """Wait for a thread's own work (nothing on the loop to wait for)."""
    deadline = time.monotonic() + seconds
    while not released() and time.monotonic() < deadline:
        time.sleep(0.01)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds through /proc")
@pytest.mark.parametrize("wrote", [True, False], ids=["wrote", "opened"])
async def test_a_registry_dropped_unclosed_warns_and_lets_its_thread_and_file_go(
    tmp_path: Path, wrote: bool
) -> None:
    # As an unclosed file or transport: a ResourceWarning, and the thread and the database's
    # descriptors are released, not kept for the life of the process.
    before = len(sqlite_threads())
    path = tmp_path / "dropped.db"
    registry = SQLiteRunRegistry(path)
    if wrote:
        await registry.add_run(Run())
    else:
        await registry.open()
    assert len(sqlite_threads()) == before + 1
    assert db_fds(path)
    with pytest.warns(ResourceWarning, match="unclosed SQLiteRunRegistry"):
        del registry
        gc.collect()
    released_within(10, lambda: len(sqlite_threads()) == before and not db_fds(path))
    assert len(sqlite_threads()) == before
    assert db_fds(path) == []
    # What it wrote is in the file.
    async with SQLiteRunRegistry(path) as again:
        assert await again.count_runs() == (1 if wrote else 0)


async def test_a_closed_registry_dropped_does_not_warn(tmp_path: Path) -> None:
    registry = SQLiteRunRegistry(tmp_path / "closed.db")
    await registry.add_run(Run())
    await registry.aclose()
    never_opened = SQLiteRunRegistry(tmp_path / "never.db")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        del registry, never_opened
        gc.collect()


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
            # Same pid as ours, different start time: a reused pid, so the owner is gone. (Not
            # a whole number of seconds off: that, with the file held open, is this very
            # process read after a step of the clock; test_owner_death.py.)
            reused = Run(owner=RunOwner(me.host, me.pid, me.started_at - 500.37))
            await registry.add_run(reused)
            # Another host name and another start: an earlier incarnation (a container made
            # again under a new name). (With our own start it is this process, renamed since:
            # test_host_shutdown.py.)
            other_host = Run(owner=RunOwner(me.host + ".old", me.pid, me.started_at - 1000.37))
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


def open_connections() -> int:
    """sqlite3 connections alive and not closed (a closed one refuses total_changes)."""
    gc.collect()
    count = 0
    for obj in gc.get_objects():
        if isinstance(obj, sqlite3.Connection):
            try:
                obj.total_changes  # noqa: B018 - the probe
            except sqlite3.ProgrammingError:
                continue
            count += 1
    return count


async def cancel_an_open(registry: SQLiteRunRegistry, after: float) -> None:
    """Start ``registry.open()``, cancel it ``after`` seconds later (0: at its first step)."""
    task = asyncio.create_task(registry.open())
    await asyncio.sleep(after)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_cancelled_open_does_not_leak(tmp_path: Path) -> None:
    before = open_connections()
    registry = SQLiteRunRegistry(tmp_path / "cancel.db")
    await cancel_an_open(registry, 0)
    assert sqlite_threads() == []
    # The close queued behind the opening may run in the same batch, before the opening's
    # future is resolved: the connection it opened is closed all the same.
    assert open_connections() == before
    # A later call can still open it.
    await registry.add_run(Run())
    assert await registry.count_runs() == 1
    await registry.close()
    assert sqlite_threads() == []


async def test_a_cancelled_open_that_then_fails_leaves_no_unretrieved_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller gave up on the open, which then failed: nobody reads that error, and asyncio
    must not report it as never retrieved."""
    import prismq_subprocess._background._sqlite_registry as module

    def slow_failure(self: object, opened: list[object]) -> object:
        time.sleep(0.3)
        raise OSError("the disk went away")

    monkeypatch.setattr(module.SQLiteRunRegistry, "_open_now", slow_failure)
    reported: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        await cancel_an_open(SQLiteRunRegistry(tmp_path / "r.db"), 0.1)
        for _ in range(50):
            if not sqlite_threads():
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        gc.collect()
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert [c for c in reported if "never retrieved" in str(c.get("message"))] == []


# --- issue 11, D13: bad settings refused at construction ------------------------------------


@pytest.mark.parametrize("bad", [math.nan, math.inf, -1.0, "10", True, None])
def test_bad_busy_timeout_is_refused_at_construction(tmp_path: Path, bad: object) -> None:
    with pytest.raises(InvalidTimeoutError) as info:
        SQLiteRunRegistry(tmp_path / "r.db", busy_timeout=bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError) and isinstance(info.value, PrismQError)
    assert "busy_timeout" in str(info.value)
    assert not (tmp_path / "r.db").exists() and sqlite_threads() == []


async def test_busy_timeout_accepts_zero_and_a_timedelta(tmp_path: Path) -> None:
    async with SQLiteRunRegistry(tmp_path / "a.db", busy_timeout=0) as registry:
        await registry.add_run(Run())
    async with SQLiteRunRegistry(tmp_path / "b.db", busy_timeout=timedelta(seconds=2)) as other:
        assert other.busy_timeout == 2.0


# --- issue 11, D15: foreign files and bad rows ----------------------------------------------


def raw_pragmas(path: Path) -> tuple[int, int, str, list[str]]:
    with contextlib.closing(sqlite3.connect(path)) as raw:
        return (
            raw.execute("PRAGMA application_id").fetchone()[0],
            raw.execute("PRAGMA user_version").fetchone()[0],
            raw.execute("PRAGMA journal_mode").fetchone()[0],
            sorted(r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")),
        )


def make_foreign(path: Path, *, user_version: int = 0, application_id: int = 0) -> None:
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.execute("CREATE TABLE notes (id INTEGER PRIMARY KEY, text TEXT)")
        raw.execute("INSERT INTO notes (text) VALUES ('keep me')")
        raw.execute(f"PRAGMA user_version = {user_version}")
        raw.execute(f"PRAGMA application_id = {application_id}")
        raw.commit()


@pytest.mark.parametrize(
    "foreign",
    [
        {"user_version": 0},
        {"user_version": 1},
        {"user_version": 7},
        {"user_version": 1, "application_id": 0x12345678},
    ],
)
async def test_a_foreign_database_is_refused_and_left_untouched(
    tmp_path: Path, foreign: dict[str, int]
) -> None:
    path = tmp_path / "theirs.db"
    make_foreign(path, **foreign)
    before = raw_pragmas(path)
    registry = SQLiteRunRegistry(path)
    with pytest.raises(RegistrySchemaError, match="not a prismq_subprocess run registry"):
        await registry.open()
    await registry.close()
    assert raw_pragmas(path) == before  # no runs table, no version change, no WAL switch
    assert before[3] == ["notes"] and before[2] == "delete"
    assert sqlite_threads() == []


async def test_a_new_or_empty_file_is_initialised_with_our_application_id(tmp_path: Path) -> None:
    empty = tmp_path / "empty.db"
    empty.touch()
    for path in (empty, tmp_path / "new.db"):
        async with SQLiteRunRegistry(path) as registry:
            await registry.add_run(Run())
        application_id, version, mode, tables = raw_pragmas(path)
        assert (application_id, version, mode) == (APPLICATION_ID, SCHEMA_VERSION, "wal")
        assert "runs" in tables


async def test_our_application_id_with_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "future.db"
    async with SQLiteRunRegistry(path) as registry:
        await registry.add_run(Run())
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(RegistrySchemaError, match="newer"):
        await SQLiteRunRegistry(path).open()


@pytest.mark.parametrize("read_only", [False, True])
async def test_a_newer_registry_is_left_exactly_as_it_was(tmp_path: Path, read_only: bool) -> None:
    # A later version may use another journal mode: the refusal must not switch it to WAL
    # (it did, before the version was looked at), and the read-only refusal must not send
    # the user to open it read-write (which refuses it too).
    path = tmp_path / "future.db"
    async with SQLiteRunRegistry(path) as registry:
        await registry.add_run(Run())
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        assert raw.execute("PRAGMA journal_mode = DELETE").fetchone()[0] == "delete"
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    before = path.read_bytes()
    registry = SQLiteRunRegistry(path, read_only=read_only)
    with pytest.raises(RegistrySchemaError, match="newer") as caught:
        await registry.open()
    await registry.aclose()
    assert str(path) in str(caught.value)
    assert "without read_only" not in str(caught.value)
    assert path.read_bytes() == before
    assert not (tmp_path / "future.db-wal").exists()  # no WAL was started


def write_version_1_file(path: Path, runs: list[Run]) -> None:
    """A registry file as the previous version of this library wrote it: user_version 1 and
    the runs table, no application_id."""
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as raw:
        raw.execute("PRAGMA journal_mode = WAL")
        raw.execute("BEGIN IMMEDIATE")
        _migrate_0_to_1(raw)
        raw.execute("PRAGMA user_version = 1")
        insert = (
            f"INSERT INTO runs ({', '.join(_V1_COLUMNS)}) "
            f"VALUES ({', '.join('?' * len(_V1_COLUMNS))})"
        )
        for run in runs:
            raw.execute(insert, _row_values(run)[: len(_V1_COLUMNS)])
        raw.execute("COMMIT")


async def test_a_file_from_the_previous_version_is_upgraded(tmp_path: Path) -> None:
    path = tmp_path / "v1.db"
    done = Run(module_id="old", owner=RunOwner.current())
    done.mark_running(pid=3)
    done.mark_completed()
    write_version_1_file(path, [done])
    assert raw_pragmas(path)[:2] == (0, 1)
    async with SQLiteRunRegistry(path) as registry:
        assert await registry.get_run(done.run_id) == done
        await registry.add_run(Run(module_id="new"))
        assert await registry.count_runs() == 2
    assert raw_pragmas(path)[:2] == (APPLICATION_ID, SCHEMA_VERSION)
    async with SQLiteRunRegistry(path) as again:
        assert await again.count_runs() == 2


def damage(path: Path, run_id: str, column: str, value: object) -> None:
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.execute(f"UPDATE runs SET {column} = ? WHERE run_id = ?", (value, run_id))
        raw.commit()


async def test_bad_rows_are_quarantined_and_the_good_ones_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "damaged.db"
    good = [Run(module_id=f"good{i}") for i in range(3)]
    bad_json = Run(module_id="bad-json")
    bad_status = Run(module_id="bad-status")
    bad_running = Run(module_id="bad-running")  # an active row: recovery reads it on open
    bad_time = Run(module_id="bad-time")
    async with SQLiteRunRegistry(path) as registry:
        for run in [*good, bad_json, bad_status, bad_running, bad_time]:
            await registry.add_run(run)
    damage(path, bad_json.run_id, "parameters", "{not json")
    damage(path, bad_status.run_id, "status", "sleeping")
    damage(path, bad_running.run_id, "output_tail", "[oops")
    damage(path, bad_time.run_id, "created_at", "yesterday")
    bad_ids = {bad_json.run_id, bad_status.run_id, bad_running.run_id, bad_time.run_id}
    with caplog.at_level(logging.WARNING, logger="prismq_subprocess._background._sqlite_registry"):
        async with SQLiteRunRegistry(path) as registry:
            listed = await registry.list_runs()
            assert {run.run_id for run in listed} == {run.run_id for run in good}
            assert set(registry.quarantined_run_ids) == bad_ids
            assert await registry.get_run(bad_json.run_id) is None
            assert await registry.count_runs() == 3
            assert [run.run_id for run in await registry.list_runs(limit=2)] == [
                good[2].run_id,
                good[1].run_id,
            ]
    assert all(any(i in r.getMessage() for r in caplog.records) for i in bad_ids)
    with contextlib.closing(sqlite3.connect(path)) as raw:
        kept = dict(raw.execute("SELECT run_id, reason FROM runs_quarantine").fetchall())
    assert set(kept) == bad_ids
    assert "JSON" in kept[bad_json.run_id] or "Expecting" in kept[bad_json.run_id]
    assert "sleeping" in kept[bad_status.run_id]


@pytest.mark.parametrize(
    ("column", "value"),
    [
        # An active run's owner is checked on open (recovery): these used to fail the open
        # itself with a bare TypeError, so the registry could not be used at all.
        ("owner_pid", "not a pid"),
        ("owner_started_at", "yesterday"),
        ("owner_host", b"\x00host"),
        # Values of the wrong type were served as they were (a bytes module_id then broke
        # json.dumps(run.to_dict()) in the host).
        ("module_id", b"\x00\x01"),
        ("module_name", b"name"),
        ("mode", b"async"),
        ("error_message", b"\xff"),
        ("worker", b"tcp://x"),
        ("exit_code", "abc"),
        ("pid", "abc"),
        ("pid", 1.5),
        ("peak_rss_bytes", "big"),
        ("cpu_time_seconds", "slow"),
        ("parameters", "[1, 2]"),
        ("parameters", '"text"'),
        ("output_tail", '"hello"'),
        ("output_tail", '{"a": 1}'),
        ("output_tail", "[1, 2]"),
    ],
)
async def test_a_value_of_the_wrong_type_is_quarantined(
    tmp_path: Path, column: str, value: object
) -> None:
    path = tmp_path / "typed.db"
    good = Run(module_id="good", owner=RunOwner.current())
    bad = Run(module_id="bad", owner=RunOwner.current())
    async with SQLiteRunRegistry(path) as registry:
        for run in (good, bad):
            await registry.add_run(run)
            run.mark_running(pid=4242)
            await registry.update_run(run)
    damage(path, bad.run_id, column, value)
    async with SQLiteRunRegistry(path) as registry:
        assert [run.run_id for run in await registry.list_runs()] == [good.run_id]
        assert registry.quarantined_run_ids == [bad.run_id]
        assert await registry.get_run(bad.run_id) is None
        assert registry.interrupted_run_ids == []  # the good run's owner (this process) lives
    with contextlib.closing(sqlite3.connect(path)) as raw:
        (reason,) = raw.execute("SELECT reason FROM runs_quarantine").fetchone()
    assert column in reason


async def test_rows_of_the_types_this_library_writes_are_read_back(tmp_path: Path) -> None:
    # The checks above must not quarantine what the library itself stores: integers in REAL
    # columns, JSON null for parameters/tail, a partial owner, empty strings.
    path = tmp_path / "ok.db"
    run = Run(module_id="", module_name="", mode="", owner=RunOwner("h", 1, 2.0))
    async with SQLiteRunRegistry(path) as registry:
        await registry.add_run(run)
        run.mark_running(pid=3)
        run.mark_failed("", exit_code=-9)
        run.peak_rss_bytes, run.cpu_time_seconds, run.worker = 10, 0.25, "tcp://w"
        await registry.update_run(run)
    damage(path, run.run_id, "parameters", "null")
    damage(path, run.run_id, "output_tail", "null")
    damage(path, run.run_id, "cpu_time_seconds", 3)
    damage(path, run.run_id, "owner_started_at", 2)
    async with SQLiteRunRegistry(path) as registry:
        got = await registry.get_run(run.run_id)
        assert registry.quarantined_run_ids == []
    assert got is not None
    assert (got.parameters, got.output_tail, got.cpu_time_seconds) == ({}, [], 3.0)
    assert got.owner == RunOwner("h", 1, 2.0)


async def test_a_bad_row_found_by_get_run_is_quarantined(tmp_path: Path) -> None:
    path = tmp_path / "one-bad.db"
    async with SQLiteRunRegistry(path) as registry:
        run = Run()
        await registry.add_run(run)
        damage(path, run.run_id, "parameters", "[1, 2")  # damaged while open
        assert await registry.get_run(run.run_id) is None
        assert registry.quarantined_run_ids == [run.run_id]
        assert await registry.count_runs() == 0


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


async def test_older_files_gain_the_worker_column_and_keep_their_runs(tmp_path: Path) -> None:
    # Version 1 (the first release) and version 2 (with the quarantine table) both reach the
    # current schema, where cluster runs record their worker.
    old = Run(module_id="m", module_name="M", owner=RunOwner.current())
    old.mark_running(pid=3)
    old.mark_completed()
    write_version_1_file(tmp_path / "v1.db", [old])
    write_version_1_file(tmp_path / "v2.db", [old])
    with contextlib.closing(sqlite3.connect(tmp_path / "v2.db", isolation_level=None)) as raw:
        _migrate_1_to_2(raw)
        raw.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        raw.execute("PRAGMA user_version = 2")
    for version in (1, 2):
        path = tmp_path / f"v{version}.db"
        async with SQLiteRunRegistry(path) as registry:
            stored = await registry.get_run(old.run_id)
            assert stored == old and stored is not None and stored.worker is None
            new = Run(module_id="m", worker="tcp://w:1")
            await registry.add_run(new)
            assert await registry.get_run(new.run_id) == new
        assert raw_pragmas(path)[:2] == (APPLICATION_ID, SCHEMA_VERSION)


def test_processes_opening_a_new_file_at_once_all_see_a_registry(tmp_path: Path) -> None:
    # Several server workers open the same new file at start-up. A look at the file that read
    # its ids, version and tables in separate statements could see one before and one after
    # another opener's set-up committed, and refuse the file as foreign (seen: `uvicorn
    # --workers 2`, "no prismq_subprocess application_id; user_version 5").
    errors: list[BaseException] = []

    def open_once(path: Path, barrier: threading.Barrier) -> None:
        async def main() -> None:
            async with SQLiteRunRegistry(path) as registry:
                await registry.count_runs()

        barrier.wait()
        try:
            asyncio.run(main())
        except BaseException as exc:  # reported below, with the file it happened on
            errors.append(exc)

    for index in range(40):
        barrier = threading.Barrier(4)
        threads = [
            threading.Thread(target=open_once, args=(tmp_path / f"runs{index}.db", barrier))
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("parameters", {"when": object()}, pq.exceptions.InvalidParametersError),
        ("parameters", {"lock": threading.Lock()}, pq.exceptions.InvalidParametersError),
        # Not JSON either: stored as the bare NaN token, it broke a strict JSON consumer of
        # to_dict() (a browser's JSON.parse) for every later read.
        ("output_tail", [b"bytes, not text"], pq.exceptions.InvalidRunError),
    ],
)
async def test_a_run_that_cannot_be_stored_as_json_is_refused_clearly(
    tmp_path: Path, field: str, value: object, error: type[Exception]
) -> None:
    """Parameters (or a tail) JSON cannot hold raise the documented error, a PrismQError,
    from add_run and update_run alike, and nothing is stored."""
    async with pq.SQLiteRunRegistry(tmp_path / "r.db") as registry:
        bad = pq.Run(module_id="m")
        setattr(bad, field, value)
        with pytest.raises(error, match=field) as caught:
            await registry.add_run(bad)
        assert isinstance(caught.value, pq.exceptions.PrismQError)
        assert await registry.get_run(bad.run_id) is None

        good = pq.Run(module_id="m")
        await registry.add_run(good)
        setattr(good, field, value)
        with pytest.raises(error, match=field):
            await registry.update_run(good)
        stored = await registry.get_run(good.run_id)
        assert stored is not None and getattr(stored, field) in ({}, [])


@pytest.mark.parametrize("value", [float("nan"), [float("-inf")], float("inf")])
async def test_a_new_run_with_nan_parameters_is_refused_an_old_one_still_updates(
    tmp_path: Path, value: object
) -> None:
    # NaN and the infinities were stored as Python's bare JSON tokens, which no strict reader
    # (a browser's JSON.parse of to_dict()) accepts: refused on add. A review found the other
    # side: a run an older release had stored so must still update, and be recovered when its
    # owner is gone (a strict encoder there failed the registry's open).
    import json
    import sqlite3

    path = tmp_path / "r.db"
    async with pq.SQLiteRunRegistry(path) as registry:
        bad = pq.Run(module_id="m", parameters={"x": value})
        with pytest.raises(pq.exceptions.InvalidParametersError, match="parameters"):
            await registry.add_run(bad)
        assert await registry.get_run(bad.run_id) is None
        old = pq.Run(module_id="m")
        await registry.add_run(old)
    raw = sqlite3.connect(path)  # what an older release wrote, its owner gone since
    with raw:
        raw.execute(
            "UPDATE runs SET parameters = ?, status = 'running', owner_pid = 999999999",
            (json.dumps({"x": value}),),
        )
    raw.close()
    async with pq.SQLiteRunRegistry(path) as registry:  # the open recovers it
        run = await registry.get_run(old.run_id)
        assert run is not None and run.status is pq.RunStatus.INTERRUPTED
        run.error_message = "seen"
        await registry.update_run(run)


@pytest.mark.parametrize("how", ["aclose", "async with"])
def test_closed_in_a_cancelled_anyio_scope_the_last_write_is_in_and_the_thread_ended(
    how: str, tmp_path: Path
) -> None:
    """A write in progress when an anyio scope is cancelled (a client that disconnected), the
    registry closed in the scope's ``finally`` (or by leaving ``async with``): the close waits
    for the write, closes the connection and ends the thread before it returns, as after
    asyncio's one-shot cancellation. Awaited directly, aclose() was cut short at its first
    await: it returned with the write still waiting for another writer's lock, the connection
    open (its -wal file still there) and the thread running."""
    path = tmp_path / "runs.db"
    last = Run(module_id="last")
    seen: dict[str, object] = {}

    async def main() -> None:
        before = set(sqlite_threads())
        registry = SQLiteRunRegistry(path, busy_timeout=10.0)
        await registry.add_run(Run(module_id="first"))  # opens: the file and its thread exist
        (thread,) = set(sqlite_threads()) - before
        wal = path.with_name(path.name + "-wal")
        assert wal.exists()
        # Another process's write transaction holds the lock for 0.5 s: the last write waits.
        other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        other.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.5, lambda: (other.execute("COMMIT"), other.close()))
        release.start()
        try:
            with anyio.move_on_after(0.2):
                if how == "aclose":
                    try:
                        await registry.add_run(last)
                    finally:
                        await registry.aclose()
                        seen["returned"] = True
                else:
                    async with registry:
                        await registry.add_run(last)
            seen["thread alive"] = thread.is_alive()
            # The last connection to a WAL database to close checkpoints it and removes the
            # -wal file: gone once ours closed too (the other one closed at 0.5 s).
            seen["wal file"] = wal.exists()
        finally:
            release.join()

    anyio.run(main, backend="asyncio")
    assert seen["thread alive"] is False
    assert seen["wal file"] is False
    with contextlib.closing(sqlite3.connect(path)) as raw:
        stored = {row[0] for row in raw.execute("SELECT module_id FROM runs")}
    assert stored == {"first", "last"}
    if how == "aclose":
        assert seen.get("returned") is True


@pytest.mark.parametrize("read_only", [False, True])
async def test_a_path_that_cannot_be_opened_names_the_reason(
    tmp_path: Path, read_only: bool
) -> None:
    # A new user's first mistake: the data folder not created yet. sqlite3 said only "unable to
    # open database file", without the path, and not as one of our errors.
    missing = tmp_path / "not-made-yet" / "runs.db"
    registry = SQLiteRunRegistry(missing, read_only=read_only)
    with pytest.raises(RegistryOpenError) as info:
        await registry.open()
    assert isinstance(info.value, PrismQError)
    assert isinstance(info.value, OSError)
    assert str(missing) in str(info.value)
    assert "does not exist" in str(info.value)
    await registry.close()
    assert not missing.parent.exists()  # nothing made on the way
    folder = tmp_path / "a-folder.db"
    folder.mkdir()
    registry = SQLiteRunRegistry(folder, read_only=read_only)
    with pytest.raises(RegistryOpenError, match="is a directory"):
        await registry.open()
    await registry.close()
    not_a_folder = tmp_path / "a-file"
    not_a_folder.write_text("")
    registry = SQLiteRunRegistry(not_a_folder / "runs.db", read_only=read_only)
    with pytest.raises(RegistryOpenError, match="is a file, not a folder"):
        await registry.open()
    await registry.close()
    assert sqlite_threads() == []


async def test_read_only_on_a_missing_file_in_a_folder_it_cannot_write_is_not_a_permission_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A review: the read-only open checked that the folder was writable, and called a missing
    # file in a read-only folder "permission denied". A reader needs no write access. (The
    # folder is made unwritable for the check itself: root, as in CI, may write anywhere.)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: not mode & os.W_OK and real_access(p, mode))
    registry = SQLiteRunRegistry(tmp_path / "missing.db", read_only=True)
    with pytest.raises(RegistrySchemaError, match="not an existing registry file"):
        await registry.open()
    await registry.close()


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("module_id", None, pq.exceptions.InvalidRunError),
        ("module_name", None, pq.exceptions.InvalidRunError),
        ("module_id", b"bytes", pq.exceptions.InvalidRunError),
        ("pid", "5", pq.exceptions.InvalidRunError),
        ("peak_rss_bytes", 1.5, pq.exceptions.InvalidRunError),
        ("exit_code", "0", pq.exceptions.InvalidRunError),
        ("parameters", [1, 2], pq.exceptions.InvalidParametersError),
        ("output_tail", "all done\n", pq.exceptions.InvalidRunError),
        # (A probe's find, later: lines that are not str, JSON-storable and then unreadable.)
        ("output_tail", [1, 2], pq.exceptions.InvalidRunError),
        ("output_tail", ["fine", None], pq.exceptions.InvalidRunError),
    ],
)
async def test_a_run_it_could_not_read_back_is_refused_on_write_not_lost_on_read(
    tmp_path: Path, field: str, value: object, error: type[Exception]
) -> None:
    # An adversary's find: such a run was stored without complaint, then quarantined by the
    # first read (gone from get_run and list_runs); a None module_id even gave a false "already
    # registered". Now the write refuses it, naming the field, and nothing is stored.
    async with SQLiteRunRegistry(tmp_path / "runs.db") as registry:
        run = Run(module_id="m")
        setattr(run, field, value)
        with pytest.raises(error, match=field):
            await registry.add_run(run)
        assert await registry.count_runs() == 0
        fine = Run(module_id="m")
        await registry.add_run(fine)
        fine.mark_running(pid=None)
        setattr(fine, field, value)
        with pytest.raises(error, match=field):
            await registry.update_run(fine)
        setattr(fine, field, getattr(Run(module_id="m"), field))
        stored = await registry.get_run(fine.run_id)
        assert stored is not None and stored.status is RunStatus.PENDING
        assert registry.quarantined_run_ids == []


async def test_odd_input_gets_our_errors_not_builtin_ones(tmp_path: Path) -> None:
    # An adversary's find: these raised a bare TypeError, AttributeError or UnicodeEncodeError.
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="path"):
        SQLiteRunRegistry(3)  # type: ignore[arg-type]
    with pytest.raises(pq.exceptions.InvalidRunError, match="needs a mapping"):
        Run.from_dict([1])  # type: ignore[arg-type]
    async with SQLiteRunRegistry(tmp_path / "runs.db") as registry:
        # SQLite keeps text as UTF-8, which a lone surrogate is not: no such run can be there,
        # and none can be stored.
        assert await registry.get_run("\ud800") is None
        with pytest.raises(pq.exceptions.InvalidRunError, match="surrogate"):
            await registry.add_run(Run(run_id="\ud800x", module_id="m"))
        with pytest.raises(pq.exceptions.InvalidRunError, match="surrogate"):
            await registry.add_run(Run(module_id="m", module_name="caf\udce9"))
        assert await registry.count_runs() == 0
        # Nor can such a run be found, asked about or cancelled (a review's find: these
        # said such a run "cannot be stored").
        assert await registry.list_runs(module_id="\ud800") == []
        assert await registry.count_runs(module_id="\ud800") == 0
        assert await registry.request_cancel("\ud800") is False
        # An owner a read would refuse, and an int past SQLite's 64 bits (a review's finds:
        # the first was stored, then quarantined; the second a bare OverflowError).
        odd_owner = Run(module_id="m")
        odd_owner.owner = RunOwner("host", "abc", 1.0)  # type: ignore[arg-type]
        with pytest.raises(pq.exceptions.InvalidRunError, match="owner_pid"):
            await registry.add_run(odd_owner)
        with pytest.raises(pq.exceptions.InvalidRunError, match="64 bits"):
            await registry.add_run(Run(module_id="m", peak_rss_bytes=2**64))
        assert await registry.count_runs() == 0
        await registry.add_run(Run(module_id="m"))  # the registry goes on
        assert await registry.count_runs() == 1


@pytest.mark.parametrize("read_only", [False, True], ids=["read-write", "read-only"])
async def test_a_damaged_file_raises_our_error_naming_it(tmp_path: Path, read_only: bool) -> None:
    # A probe's find: SQLite's "database disk image is malformed" (a plain DatabaseError, not
    # an OperationalError) came out raw, from the open and from every call, where every other
    # failure of the file is a RegistryDatabaseError naming it.
    path = tmp_path / "runs.db"
    async with SQLiteRunRegistry(path) as registry:
        for _ in range(200):
            await registry.add_run(Run(module_id="m", parameters={"pad": "x" * 200}))
    page = 4096
    with path.open("r+b") as f:  # pages 2-4 (the runs table and its indexes) overwritten
        f.seek(page)
        f.write(bytes(range(256)) * (3 * page // 256))
    registry = SQLiteRunRegistry(path, read_only=read_only)
    try:
        with pytest.raises(pq.exceptions.RegistryDatabaseError, match="damaged") as caught:
            await registry.open()
            await registry.list_runs()
            await registry.count_runs()
        assert str(path) in str(caught.value)
        assert isinstance(caught.value, sqlite3.DatabaseError)  # what callers caught before
    finally:
        await registry.aclose()


@pytest.mark.parametrize("started", [math.inf, -math.inf, math.nan])
async def test_an_owner_start_that_is_no_number_does_not_stop_the_file_opening(
    tmp_path: Path, started: float
) -> None:
    # The review's find: the clock-step check of an owner at a live pid (1) with the start
    # inf raised OverflowError from every open of the file, in every process, for good.
    path = tmp_path / "runs.db"
    owner = RunOwner(RunOwner.current().host, 1, started)
    async with SQLiteRunRegistry(path) as registry:
        run = Run(module_id="m", owner=owner)
        if math.isnan(started):
            # Refused since session 36: SQLite stored NaN as NULL, which lost the owner (and
            # the next open marked the run of a live owner INTERRUPTED).
            with pytest.raises(pq.exceptions.InvalidRunError, match="owner_started_at"):
                await registry.add_run(run)
            return
        await registry.add_run(run)
    async with SQLiteRunRegistry(path) as registry:
        assert registry.interrupted_run_ids == [run.run_id]
        got = await registry.get_run(run.run_id)
        assert got is not None and got.status is RunStatus.INTERRUPTED


def test_a_busy_timeout_beyond_sqlites_longest_waits_that_long(tmp_path: Path) -> None:
    # A probe's find: a busy_timeout over 2,147,483.647 s (SQLite's longest: a 32-bit count of
    # milliseconds) overflowed, and SQLite took it as no wait at all: "effectively forever"
    # failed at once with RegistryBusyError.
    path = tmp_path / "runs.db"

    async def main() -> float:
        async with SQLiteRunRegistry(path):
            pass
        locker = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        locker.execute("BEGIN IMMEDIATE")
        release = threading.Timer(1.0, lambda: locker.execute("COMMIT"))
        release.start()
        try:
            started = time.monotonic()
            async with SQLiteRunRegistry(path, busy_timeout=timedelta(days=30)) as registry:
                await registry.add_run(Run(module_id="m"))
            return time.monotonic() - started
        finally:
            release.join()
            locker.close()

    assert asyncio.run(main()) >= 0.5  # it waited for the lock rather than failing at once


def test_a_path_with_a_nul_byte_is_refused_at_construction() -> None:
    # A bare ValueError ("embedded null byte") from the first open, in its thread.
    with pytest.raises(pq.exceptions.RegistryOpenError, match="NUL"):
        SQLiteRunRegistry("runs\0.db")
