"""SQLiteRunRegistry when its database fails under a call: a file locked by another process for
longer than ``busy_timeout``, a full disk. Real files, a real second connection, a real (small)
tmpfs: each must raise one of our errors naming the file and what happened (still a
``sqlite3.OperationalError``, as before), lose nothing acknowledged, and work again once the
cause is gone."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

import prismq_subprocess as pq
from prismq_subprocess._background._record_retry import retry_start, worth_retrying
from prismq_subprocess.exceptions import (
    PrismQError,
    RegistryBusyError,
    RegistryDatabaseError,
    RegistryFullError,
)


@contextlib.contextmanager
def write_locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection (as another worker process would) holding the file's write lock."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
        other.execute("ROLLBACK")
    finally:
        other.close()


async def test_a_lock_held_longer_than_busy_timeout_raises_registry_busy_error(
    tmp_path: Path,
) -> None:
    path = tmp_path / "runs.db"
    async with pq.SQLiteRunRegistry(path, busy_timeout=0.2) as registry:
        first = pq.Run(module_id="first")
        await registry.add_run(first)
        with write_locked(path):
            with pytest.raises(RegistryBusyError) as info:
                await registry.add_run(pq.Run(module_id="one"))
            error = info.value
            assert isinstance(error, RegistryDatabaseError)
            assert isinstance(error, PrismQError)
            # Code that caught sqlite3's errors keeps working, with sqlite's own code.
            assert isinstance(error, sqlite3.OperationalError)
            assert error.sqlite_errorname == "SQLITE_BUSY"
            assert error.sqlite_errorcode == sqlite3.SQLITE_BUSY
            assert str(path) in str(error)
            assert "busy_timeout" in str(error) and "0.2 s" in str(error)
            assert isinstance(error.__cause__, sqlite3.OperationalError)
            # Several writers at once share one group transaction: each learns of the lock.
            results = await asyncio.gather(
                *(registry.add_run(pq.Run(module_id=f"g{i}")) for i in range(8)),
                return_exceptions=True,
            )
            assert all(isinstance(r, RegistryBusyError) for r in results), results
            first.mark_running(pid=None)
            with pytest.raises(RegistryBusyError):
                await registry.update_run(first)
        # The lock is gone: the registry works again, and holds what it acknowledged only.
        await registry.update_run(first)
        await registry.add_run(pq.Run(module_id="after"))
        stored = {run.module_id for run in await registry.list_runs()}
        assert stored == {"first", "after"}


async def test_opening_a_file_locked_too_long_raises_registry_busy_error(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    async with pq.SQLiteRunRegistry(path):
        pass
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")  # (in WAL mode this also keeps writers out)
        registry = pq.SQLiteRunRegistry(path, busy_timeout=0.2)
        with pytest.raises(RegistryBusyError, match="busy_timeout"):
            await registry.open()
        await registry.aclose()
    finally:
        other.close()


def test_a_failed_final_record_on_a_busy_or_full_database_is_retried() -> None:
    # RecordRetry writes a run's final record again after an error of the environment; making
    # these errors ours must not turn them into answers that are never retried.
    run = pq.Run(module_id="m")
    run.mark_running(pid=None)
    run.mark_completed(0)
    for kind in (RegistryBusyError, RegistryFullError, RegistryDatabaseError):
        assert worth_retrying(run, kind("x"))
    assert not worth_retrying(run, pq.RunNotFoundError("gone"))


async def test_a_start_record_is_tried_a_few_times_then_its_error_propagates(
    tmp_path: Path,
) -> None:
    # A database locked for good: the start record is tried four times in all (a bounded
    # hold on the start, about 0.75 s of delays plus each try's busy timeout), then the last
    # error propagates; an answer of ours (the run claimed, the registry closed) at once.
    path = tmp_path / "r.db"
    async with pq.SQLiteRunRegistry(path, busy_timeout=0.05) as registry:
        run = pq.Run(module_id="m", run_id="r1")
        await registry.add_run(run)
        run.mark_running(pid=None)
        tries: list[float] = []

        async def write() -> None:
            tries.append(asyncio.get_running_loop().time())
            await registry.update_run(run)

        with write_locked(path), pytest.raises(RegistryBusyError):
            await retry_start(run, write)
        assert len(tries) == 4
        stored = await registry.get_run("r1")
        assert stored is not None and stored.status is pq.RunStatus.PENDING
        await retry_start(run, write)  # unlocked: the first try works
        assert len(tries) == 5
        stored = await registry.get_run("r1")
        assert stored is not None and stored.status is pq.RunStatus.RUNNING

    async def refused() -> None:
        tries.append(0.0)
        raise pq.RunNotFoundError("gone")

    tries.clear()
    with pytest.raises(pq.RunNotFoundError):
        await retry_start(run, refused)
    assert tries == [0.0]


async def test_a_file_uri_that_cannot_be_opened_raises_registry_open_error(tmp_path: Path) -> None:
    # SQLite reads a path starting "file:" as a URI; one it cannot open gave sqlite3's bare
    # "unable to open database file" (the diagnosis of plain paths does not read URIs).
    uri = f"file:{tmp_path / 'not-made-yet' / 'runs.db'}"
    registry = pq.SQLiteRunRegistry(uri)
    with pytest.raises(pq.exceptions.RegistryOpenError) as info:
        await registry.open()
    assert uri in str(info.value)
    assert "unable to open" in str(info.value)
    await registry.aclose()
    assert not (tmp_path / "not-made-yet").exists()


@pytest.fixture
def tiny_disk() -> Iterator[Path]:
    """A real 512 KiB file system (tmpfs): needs root, as in CI; skipped otherwise."""
    if sys.platform != "linux" or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    where = Path(tempfile.mkdtemp(prefix="prismq-tiny-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(where)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        where.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace')}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
        with contextlib.suppress(OSError):
            where.rmdir()


async def test_a_full_disk_raises_registry_full_error_and_loses_nothing_acknowledged(
    tiny_disk: Path,
) -> None:
    path = tiny_disk / "runs.db"
    stored: list[str] = []
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * 192 * 1024)  # what else is on the disk
    async with pq.SQLiteRunRegistry(path) as registry:
        with pytest.raises(RegistryFullError) as info:
            for _ in range(10_000):
                run = pq.Run(module_id="m", parameters={"blob": "x" * 4000})
                await registry.add_run(run)
                stored.append(run.run_id)
        error = info.value
        assert isinstance(error, RegistryDatabaseError)
        assert isinstance(error, PrismQError)
        assert isinstance(error, sqlite3.OperationalError)
        assert error.sqlite_errorname == "SQLITE_FULL"
        assert str(path) in str(error)
        assert "full" in str(error) and "free" in str(error)
        assert stored, "the disk was full before the first run"
        # Room again (what else was on that disk went): the same registry writes again.
        filler.unlink()
        after = pq.Run(module_id="after")
        await registry.add_run(after)
        stored.append(after.run_id)
        ids = {run.run_id for run in await registry.list_runs(limit=10_000)}
        assert set(stored) <= ids
    # Reopened from the file: every acknowledged run is there.
    async with pq.SQLiteRunRegistry(path) as again:
        ids = {run.run_id for run in await again.list_runs(limit=10_000)}
        assert set(stored) <= ids
