"""SQLiteRunRegistry's group commit (one transaction for the writes queued together), its
durability against SIGKILL, and ``read_only=True``."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from prismq_subprocess._background._run_record import Run, RunStatus
from prismq_subprocess._background._sqlite_registry import SQLiteRunRegistry, _Database
from prismq_subprocess._core._exceptions import (
    DuplicateRunError,
    PrismQError,
    RegistryReadOnlyError,
    RegistrySchemaError,
    RunNotFoundError,
    RunStateError,
)


def sqlite_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("prismq-sqlite")]


async def test_failing_writes_in_a_group_fail_only_their_caller(tmp_path: Path) -> None:
    path = tmp_path / "group.db"
    async with SQLiteRunRegistry(path) as registry:
        existing = Run(run_id="existing")
        await registry.add_run(existing)
        finished = Run(run_id="finished")
        await registry.add_run(finished)
        back = finished.copy()  # a stale copy: PENDING -> RUNNING, but the store has COMPLETED
        back.mark_running(pid=2)
        finished.mark_running(pid=1)
        finished.mark_completed(0)
        await registry.update_run(finished)
        fresh = [Run(run_id=f"fresh-{i}") for i in range(20)]
        # All queued in one go: the worker takes them as one group.
        results = await asyncio.gather(
            *(registry.add_run(run) for run in fresh[:10]),
            registry.add_run(Run(run_id="existing")),
            registry.update_run(Run(run_id="missing")),
            registry.update_run(back),
            *(registry.add_run(run) for run in fresh[10:]),
            return_exceptions=True,
        )
        assert results[:10] == [None] * 10 and results[13:] == [None] * 10
        assert isinstance(results[10], DuplicateRunError)
        assert isinstance(results[11], RunNotFoundError)
        assert isinstance(results[12], RunStateError)
    # Reopened from the file: every good write is there, the refused ones changed nothing.
    async with SQLiteRunRegistry(path) as again:
        assert await again.count_runs() == 22
        for run in fresh:
            assert await again.get_run(run.run_id) == run
        stored = await again.get_run("finished")
        assert stored is not None and stored.status is RunStatus.COMPLETED
    assert sqlite_threads() == []


async def test_concurrent_writers_all_land(tmp_path: Path) -> None:
    path = tmp_path / "many.db"
    async with SQLiteRunRegistry(path) as registry:

        async def writer(n: int) -> None:
            for i in range(25):
                run = Run(run_id=f"w{n}-{i}")
                await registry.add_run(run)
                run.mark_running(pid=os.getpid())
                await registry.update_run(run)
                run.mark_completed(0)
                await registry.update_run(run)

        await asyncio.gather(*(writer(n) for n in range(8)))
        assert await registry.count_runs(status=RunStatus.COMPLETED) == 200


async def test_a_cancelled_caller_does_not_stop_the_others(tmp_path: Path) -> None:
    async with SQLiteRunRegistry(tmp_path / "c.db") as registry:
        await registry.count_runs()
        runs = [Run() for _ in range(10)]
        tasks = [asyncio.create_task(registry.add_run(run)) for run in runs]
        await asyncio.sleep(0)  # all queued
        tasks[3].cancel()
        done = await asyncio.gather(*tasks, return_exceptions=True)
        assert isinstance(done[3], asyncio.CancelledError)
        # The cancelled caller only stopped waiting: its write was queued and still happens.
        assert await registry.count_runs() == 10


DURABILITY_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from prismq_subprocess import Run, SQLiteRunRegistry

    async def main(path):
        async with SQLiteRunRegistry(path) as registry:
            async def writer(n):
                i = 0
                while True:
                    run = Run(run_id=f"w{n}-{i}")
                    await registry.add_run(run)
                    # Acknowledged: add_run returned, so the commit is done.
                    sys.stdout.write(run.run_id + "\\n")
                    sys.stdout.flush()
                    i += 1
            await asyncio.gather(*(writer(n) for n in range(8)))

    asyncio.run(main(sys.argv[1]))
    """
)


async def test_every_acknowledged_write_survives_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "durable.db"
    script = tmp_path / "writer.py"
    script.write_text(DURABILITY_CHILD)
    child = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True
    )
    acknowledged: list[str] = []
    try:
        assert child.stdout is not None
        # Kill it mid-stream, while its 8 writers keep committing groups.
        while len(acknowledged) < 300:
            line = child.stdout.readline()
            assert line, f"the writer ended early (exit {child.poll()})"
            acknowledged.append(line.strip())
        os.kill(child.pid, signal.SIGKILL)
        acknowledged.extend(line.strip() for line in child.stdout if line.strip())
    finally:
        child.kill()
        child.wait()
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    # Read the file as it was left (no recovery writes): every acknowledged run is in it.
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as raw:
        stored = {row[0] for row in raw.execute("SELECT run_id FROM runs")}
    raw.close()
    missing = [run_id for run_id in acknowledged if run_id not in stored]
    assert missing == [], f"{len(missing)} acknowledged run(s) lost, e.g. {missing[:5]}"
    assert len(stored) >= len(acknowledged) >= 300


# --- read_only=True ---------------------------------------------------------------------------


async def test_read_only_reads_and_refuses_writes(tmp_path: Path) -> None:
    path = tmp_path / "ro.db"
    run = Run(run_id="r1", module_id="m")
    async with SQLiteRunRegistry(path) as writer:
        await writer.add_run(run)
        before = path.read_bytes()
        async with SQLiteRunRegistry(path, read_only=True) as reader:
            assert await reader.get_run("r1") == run
            assert await reader.count_runs() == 1
            assert [r.run_id for r in await reader.list_runs()] == ["r1"]
            assert reader.interrupted_run_ids == []
            other = Run(run_id="r2")
            with pytest.raises(RegistryReadOnlyError) as info:
                await reader.add_run(other)
            assert isinstance(info.value, PrismQError) and isinstance(info.value, PermissionError)
            assert other.owner is None  # refused before the caller's run was touched
            for write in (
                reader.update_run(run),
                reader.request_cancel("r1"),
                reader.recover_orphans(),
                reader.apply_retention(),
                reader.delete_older_than(run.created_at),
            ):
                with pytest.raises(RegistryReadOnlyError):
                    await write
            # It sees the writer's later commits.
            await writer.add_run(Run(run_id="r3"))
            assert await reader.count_runs() == 2
        assert path.read_bytes()[:100] == before[:100]  # header (schema, versions) untouched
    assert sqlite_threads() == []


async def test_read_only_leaves_orphans_and_damaged_rows_alone(tmp_path: Path) -> None:
    path = tmp_path / "orph.db"
    async with SQLiteRunRegistry(path) as writer:
        dead = Run(run_id="dead")
        await writer.add_run(dead)
        good = Run(run_id="good")
        await writer.add_run(good)
    with sqlite3.connect(path) as raw:
        # An owner that cannot be alive, and a damaged row.
        raw.execute("UPDATE runs SET owner_pid = 999999999 WHERE run_id = 'dead'")
        raw.execute("UPDATE runs SET parameters = '{bad' WHERE run_id = 'good'")
    raw.close()
    async with SQLiteRunRegistry(path, read_only=True) as reader:
        assert reader.interrupted_run_ids == []
        assert [r.run_id for r in await reader.list_runs()] == ["dead"]
        assert reader.quarantined_run_ids == []
    with sqlite3.connect(path) as raw:
        rows = dict(raw.execute("SELECT run_id, status FROM runs").fetchall())
    raw.close()
    assert rows == {"dead": "pending", "good": "pending"}


@pytest.mark.parametrize("kind", ["missing", "foreign", "old"])
async def test_read_only_refuses_what_it_cannot_read(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "x.db"
    if kind == "foreign":
        with sqlite3.connect(path) as raw:
            raw.execute("CREATE TABLE other (x)")
        raw.close()
    elif kind == "old":
        async with SQLiteRunRegistry(path) as writer:
            await writer.count_runs()
        with sqlite3.connect(path) as raw:
            raw.execute("PRAGMA user_version = 3")
        raw.close()
    before = path.read_bytes() if path.exists() else None
    registry = SQLiteRunRegistry(path, read_only=True)
    with pytest.raises(RegistrySchemaError):
        await registry.open()
    await registry.aclose()
    assert (path.read_bytes() if path.exists() else None) == before
    assert sqlite_threads() == []


async def test_a_schema_5_file_is_read_as_it_is_read_only_and_upgraded_by_a_writer(
    tmp_path: Path,
) -> None:
    # Schema 6 only added run_owners, which readers never look at: a viewer is not refused a
    # file that no writer has upgraded yet (review), and the writer's upgrade keeps the runs.
    import prismq_subprocess._background._sqlite_registry as module

    path = tmp_path / "v5.db"
    raw = sqlite3.connect(path)
    with raw:
        for step in range(5):
            module._MIGRATIONS[step](raw)
        raw.execute("PRAGMA user_version = 5")
        raw.execute(f"PRAGMA application_id = {module.APPLICATION_ID}")
        raw.execute(
            "INSERT INTO runs (run_id, module_id, module_name, parameters, status, created_at, "
            "mode, output_tail) VALUES ('old', 'm', 'Old', '{}', 'completed', 1, 'async', '[]')"
        )
    raw.close()
    async with SQLiteRunRegistry(path, read_only=True) as viewer:
        old = await viewer.get_run("old")
        assert old is not None and old.status is RunStatus.COMPLETED
    async with SQLiteRunRegistry(path) as writer:
        assert await writer.get_run("old") == old
        await writer.add_run(Run(run_id="new"))
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == module.SCHEMA_VERSION == 6
        assert raw.execute("SELECT count(*) FROM run_owners").fetchone()[0] == 1
    raw.close()


async def test_an_update_stores_the_fields_that_rarely_change(tmp_path: Path) -> None:
    # update_run skips rewriting the indexed module_id / created_at when they are unchanged;
    # when a caller did change them, the stored row must follow, alone and inside a group.
    path = tmp_path / "rare.db"
    async with SQLiteRunRegistry(path) as registry:
        alone = Run(run_id="alone", module_id="before")
        grouped = [Run(run_id=f"grouped-{i}", module_id="before") for i in range(8)]
        for run in (alone, *grouped):
            await registry.add_run(run)
        for run in (alone, *grouped):
            run.module_id = "after"
            run.module_name = "renamed"
            run.created_at = run.created_at - timedelta(days=1)
            run.mark_running(pid=3)
        await registry.update_run(alone)
        await asyncio.gather(*(registry.update_run(run) for run in grouped))
        assert await registry.count_runs(module_id="before") == 0
        assert await registry.count_runs(module_id="after") == 9
    async with SQLiteRunRegistry(path) as again:
        for run in (alone, *grouped):
            assert await again.get_run(run.run_id) == run
        listed = await again.list_runs(module_id="after", limit=20)
        assert sorted(r.run_id for r in listed) == sorted(r.run_id for r in (alone, *grouped))


# --- review of the group commit (2026-12-01): hangs, a leaked thread, a lock held too long ---


async def test_a_job_raising_stop_iteration_does_not_strand_its_batch() -> None:
    """asyncio refuses StopIteration as a future's exception: the job's caller gets a
    RuntimeError from it, and the other callers woken with it still get their answers."""
    from prismq_subprocess._background._sqlite_worker import SQLiteWorker

    def stops() -> object:
        return next(iter([]))

    worker = SQLiteWorker("prismq-sqlite-test")
    try:
        gate = threading.Event()
        held = asyncio.ensure_future(worker.call(gate.wait, 5.0))  # the next two form a batch
        await asyncio.sleep(0.05)
        bad = asyncio.ensure_future(worker.call(stops))
        good = asyncio.ensure_future(worker.call(lambda: "ok"))
        await asyncio.sleep(0.05)
        gate.set()
        await held
        _, pending = await asyncio.wait([bad, good], timeout=5)
        assert not pending
        assert good.result() == "ok"
        error = bad.exception()
        assert isinstance(error, RuntimeError) and isinstance(error.__cause__, StopIteration)
    finally:
        worker.shutdown()


async def test_a_call_after_the_worker_stopped_raises_instead_of_waiting() -> None:
    from prismq_subprocess._background._sqlite_worker import SQLiteWorker

    worker = SQLiteWorker("prismq-sqlite-test", closed=lambda: LookupError("closed here"))
    assert await worker.call(lambda: 1) == 1
    worker.shutdown()
    worker.shutdown()  # idempotent
    with pytest.raises(LookupError, match="closed here"):
        await asyncio.wait_for(worker.call(lambda: 2), 5)
    with pytest.raises(LookupError):
        worker.submit(lambda: 3)


def test_a_registry_closed_by_another_loop_mid_write_raises_closed(tmp_path: Path) -> None:
    """Loop B is inside add_run (taking the run's row) when loop A, in another thread, closes
    the registry: B gets RegistryClosedError at once, not a wait on a stopped thread."""
    from prismq_subprocess._core._exceptions import RegistryClosedError

    registry = SQLiteRunRegistry(tmp_path / "r.db")
    asyncio.run(registry.open())

    class CloseOnEncode(dict[str, object]):
        # The JSON encoder asks a dict subclass for its items: the moment to close.
        def items(self):  # type: ignore[override]
            closer = threading.Thread(target=asyncio.run, args=(registry.aclose(),))
            closer.start()
            closer.join(10)
            return super().items()

    async def write() -> None:
        parameters = CloseOnEncode(x=1)
        await asyncio.wait_for(registry.add_run(Run(run_id="late", parameters=parameters)), 10)

    with pytest.raises(RegistryClosedError):
        asyncio.run(write())
    assert sqlite_threads() == []


def test_two_loops_opening_at_once_both_proceed(tmp_path: Path) -> None:
    """The lazy open is shared by threads: a loop that finds another loop's open in progress
    waits for it and is woken (an asyncio.Lock is bound to one loop, and was not)."""
    path = tmp_path / "r.db"

    async def make() -> None:
        async with SQLiteRunRegistry(path) as first:
            await first.add_run(Run(run_id="earlier"))

    asyncio.run(make())
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # holds A's open (its recovery) in progress
    registry = SQLiteRunRegistry(path, busy_timeout=10)
    results: dict[str, str] = {}

    def use(name: str) -> None:
        async def main() -> None:
            await asyncio.wait_for(registry.add_run(Run(run_id=name)), 15)
            results[name] = "done"

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported below
            results[name] = repr(exc)

    a = threading.Thread(target=use, args=("a",))
    a.start()
    for _ in range(500):  # A's open has begun (and waits for the write lock)
        if registry._executor is not None:
            break
        time.sleep(0.01)
    b = threading.Thread(target=use, args=("b",))
    b.start()
    time.sleep(0.3)  # B is waiting for the same open
    other.execute("ROLLBACK")
    other.close()
    a.join(20)
    b.join(20)
    assert results == {"a": "done", "b": "done"}

    async def check() -> int:
        count = await registry.count_runs()
        await registry.aclose()
        return count

    assert asyncio.run(check()) == 3  # with the earlier run
    assert sqlite_threads() == []


async def test_aclose_cancelled_while_an_open_waits_still_closes(tmp_path: Path) -> None:
    """aclose() cancelled while open() waits for another connection's write lock: the open
    still ends closed, and no thread or connection is left."""
    from prismq_subprocess._core._exceptions import RegistryClosedError

    path = tmp_path / "r.db"
    async with SQLiteRunRegistry(path) as first:
        await first.add_run(Run(run_id="a"))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process writing: the open's recovery waits
    registry = SQLiteRunRegistry(path, busy_timeout=5)
    opening = asyncio.ensure_future(registry.open())
    await asyncio.sleep(0.2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(registry.aclose(), 0.2)
    other.execute("ROLLBACK")
    other.close()
    with pytest.raises(RegistryClosedError):
        await asyncio.wait_for(opening, 10)
    await registry.aclose()
    for _ in range(50):
        if not sqlite_threads():
            break
        await asyncio.sleep(0.1)
    assert sqlite_threads() == []
    assert registry._db is None


async def test_recover_orphans_stops_trees_outside_the_write_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """recover_orphans() queued beside another write must not stop orphan trees inside the
    group's transaction: a stop takes up to its grace period, and the file's write lock would
    be held (other processes' writers blocked) all that time."""
    import socket

    import prismq_subprocess._background._sqlite_registry as module
    from prismq_subprocess._background._run_record import RunOwner
    from prismq_subprocess._platform._orphans import OrphanCheck, OrphanStop, ProcessIdentity

    path = tmp_path / "r.db"
    seen: list[str] = []

    def probe(
        identities: list[ProcessIdentity], variables: list[str], grace: float, **spare: Any
    ) -> tuple[list[OrphanStop], list[int]]:
        other = sqlite3.connect(path, timeout=0, isolation_level=None)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.execute("ROLLBACK")
            seen.append("free")
        except sqlite3.OperationalError:
            seen.append("held")
        finally:
            other.close()
        return [OrphanStop(OrphanCheck.GONE, 0)] * len(identities), [0] * len(variables)

    monkeypatch.setattr(module, "stop_left_behind", probe)
    dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await dead.wait()
    async with SQLiteRunRegistry(path) as registry:
        run = Run(run_id="orphan")
        run.owner = RunOwner(socket.gethostname(), dead.pid, 1.0)
        await registry.add_run(run)
        run.mark_running(pid=dead.pid)
        await registry.update_run(run)
        assert await registry.record_child("orphan", ProcessIdentity(dead.pid, 1.0, "C"))
        assert registry._executor is not None
        gate = threading.Event()
        busy = asyncio.ensure_future(registry._executor.call(gate.wait, 5.0))
        await asyncio.sleep(0.05)
        both = asyncio.gather(registry.recover_orphans(), registry.add_run(Run(run_id="x")))
        await asyncio.sleep(0.05)
        gate.set()
        await busy
        recovered, _ = await both
        assert recovered == ["orphan"]
    assert seen == ["free"]


def test_a_lone_write_reports_its_own_error_when_the_transaction_already_ended(
    tmp_path: Path,
) -> None:
    """An error that ended the transaction (SQLite does on a full disk) reaches the caller
    as itself, not as 'cannot rollback - no transaction is active'."""
    from prismq_subprocess._background._sqlite_registry import _Database

    db = _Database(str(tmp_path / "r.db"), 1.0)
    try:

        def ends_then_fails(conn: sqlite3.Connection) -> None:
            conn.execute("ROLLBACK")
            raise ZeroDivisionError("the write's own error")

        with pytest.raises(ZeroDivisionError, match="own error"):
            db.write(ends_then_fails)
        assert not db.conn.in_transaction
    finally:
        db.conn.close()


async def test_a_call_racing_a_close_from_another_thread_says_closed(tmp_path: Path) -> None:
    """aclose() from another thread lands right after a call's lazy open returned: the call
    raises RegistryClosedError (it was a bare AssertionError)."""
    from prismq_subprocess._core._exceptions import RegistryClosedError

    class ClosedRightAfterOpen(SQLiteRunRegistry):
        async def open(self) -> None:
            await super().open()
            closer = threading.Thread(target=asyncio.run, args=(self.aclose(),))
            closer.start()
            closer.join(10)

    registry = ClosedRightAfterOpen(tmp_path / "r.db")
    with pytest.raises(RegistryClosedError):
        await registry.get_run("x")
    assert sqlite_threads() == []


@pytest.mark.parametrize("call", ["add_run", "update_run", "get_run", "list_runs"])
async def test_a_call_queued_behind_a_close_from_another_thread_says_closed(
    tmp_path: Path, call: str
) -> None:
    """aclose() from another thread lands between a call taking the worker and queueing its
    job: the job runs after the connection was closed, and the call raises
    RegistryClosedError (it was sqlite3.ProgrammingError: 'Cannot operate on a closed
    database')."""
    from prismq_subprocess._core._exceptions import RegistryClosedError

    registry = SQLiteRunRegistry(tmp_path / "r.db")
    run = Run(run_id="r1")
    await registry.add_run(run)
    worker = registry._executor
    assert worker is not None
    gate, holding = threading.Event(), threading.Event()

    def hold() -> bool:
        holding.set()
        return gate.wait(10)

    held = worker.submit(hold)  # the close job queues up behind it
    assert holding.wait(10)  # (out of the queue: what is queued next is the close job)
    enqueue = worker.enqueue
    closer = threading.Thread(target=asyncio.run, args=(registry.aclose(),))

    def close_then_enqueue(*args: Any, **kwargs: Any) -> Any:
        closer.start()
        deadline = time.monotonic() + 10
        while worker._queue.qsize() < 1:  # the close job is queued
            assert time.monotonic() < deadline
            time.sleep(0.001)
        try:
            return enqueue(*args, **kwargs)
        finally:
            gate.set()

    worker.enqueue = close_then_enqueue  # type: ignore[method-assign]
    try:
        with pytest.raises(RegistryClosedError):
            if call == "add_run":
                await registry.add_run(Run(run_id="r2"))
            elif call == "update_run":
                run.mark_running(pid=1)
                await registry.update_run(run)
            elif call == "get_run":
                await registry.get_run("r1")
            else:
                await registry.list_runs()
    finally:
        gate.set()
        closer.join(10)
    assert held.result(timeout=5) is True
    assert sqlite_threads() == []


def table_on_thread(tmp_path: Path) -> _Database:
    """A registry database with a scratch table, made on the calling (the worker's) thread."""
    db = _Database(str(tmp_path / "r.db"), 1.0)
    db.conn.execute("CREATE TABLE t (v INTEGER)")
    return db


async def test_one_batch_answers_callers_on_two_loops_and_a_submitter(tmp_path: Path) -> None:
    """Writes queued together from two event loops (two threads) and a ``submit`` share one
    batch: each caller gets its own result on its own loop."""
    from prismq_subprocess._background._sqlite_worker import SQLiteWorker

    worker = SQLiteWorker("prismq-sqlite-test")
    db = worker.submit(lambda: table_on_thread(tmp_path)).result(timeout=5)

    def insert(value: int) -> tuple[int, str]:
        db.write(lambda conn: conn.execute("INSERT INTO t VALUES (?)", (value,)), atomic=True)
        return value, threading.current_thread().name

    try:
        gate = threading.Event()
        held = worker.submit(lambda: gate.wait(5.0))  # what follows queues up behind it
        other_loop: list[object] = []

        def on_another_loop() -> None:
            async def write() -> object:
                return await worker.call(insert, 2, group=db)

            other_loop.append(asyncio.run(write()))

        thread = threading.Thread(target=on_another_loop)
        thread.start()
        mine = asyncio.ensure_future(worker.call(insert, 1, group=db))
        submitted = worker.submit(lambda: insert(3))
        await asyncio.sleep(0.1)  # the other loop's job is queued too
        gate.set()
        assert held.result(timeout=5) is True
        assert (await asyncio.wait_for(mine, 5))[0] == 1
        assert submitted.result(timeout=5)[0] == 3
        thread.join(5)
        assert other_loop and other_loop[0] == (2, "prismq-sqlite-test")
        rows = await worker.call(lambda: db.conn.execute("SELECT v FROM t ORDER BY v").fetchall())
        assert rows == [(1,), (2,), (3,)]
    finally:
        worker.submit(db.conn.close).result(timeout=5)
        worker.shutdown()


async def test_a_write_that_ends_the_group_transaction_fails_the_writes_before_it(
    tmp_path: Path,
) -> None:
    """A write inside a group that ends the transaction (as SQLite does on a full disk) takes
    the group's earlier, uncommitted writes with it: their callers get an error, not a success
    that was never stored. The writes after it still run, each on its own."""
    from prismq_subprocess._background._sqlite_worker import SQLiteWorker

    worker = SQLiteWorker("prismq-sqlite-test")
    db = worker.submit(lambda: table_on_thread(tmp_path)).result(timeout=5)

    def insert(value: int) -> int:
        db.write(lambda conn: conn.execute("INSERT INTO t VALUES (?)", (value,)), atomic=True)
        return value

    def ends_the_transaction() -> str:
        db.conn.execute("ROLLBACK")
        raise OSError("disk full, as SQLite reports it")

    try:
        gate = threading.Event()
        held = asyncio.ensure_future(worker.call(gate.wait, 5.0))
        await asyncio.sleep(0.05)
        calls = [
            asyncio.ensure_future(worker.call(insert, 1, group=db)),
            asyncio.ensure_future(worker.call(ends_the_transaction, group=db)),
            asyncio.ensure_future(worker.call(insert, 3, group=db)),
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await held
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
        assert isinstance(results[0], OSError) and "disk full" in str(results[0])
        assert isinstance(results[1], OSError)
        assert results[2] == 3
        assert await worker.call(lambda: db.conn.execute("SELECT v FROM t").fetchall()) == [(3,)]
    finally:
        worker.submit(db.conn.close).result(timeout=5)
        worker.shutdown()
