"""``runs``: list, show and tail a real SQLite registry filled through the public API."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cli_support import CLI, cli, cli_env, start_cli

import prismq_subprocess as pq

# A module (script) for ModuleRunner: prints --n lines; with --wait-for FILE it prints the first
# half, waits until FILE exists, then prints the rest; exits 1 with --fail.
JOB = textwrap.dedent(
    """
    import argparse, os, sys, time
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--fail", action="store_true")
    parser.add_argument("--wait-for")
    args = parser.parse_args()
    for i in range(args.n):
        if args.wait_for and i == args.n // 2:
            while not os.path.exists(args.wait_for):
                time.sleep(0.02)
        print(f"line {i} of {args.n}", flush=True)
    if args.fail:
        print("boom", flush=True)
        sys.exit(1)
    """
)


@dataclass
class Registry:
    db: Path
    logs: Path
    job: Path
    completed: pq.Run
    failed: pq.Run


async def _populate(db: Path, logs: Path, job: Path) -> tuple[pq.Run, pq.Run]:
    async with (
        pq.SQLiteRunRegistry(db) as registry,
        pq.OutputCapture(log_dir=logs) as capture,
        pq.ModuleRunner(registry, output=capture) as runner,
    ):
        completed = await runner.execute_module("greeter", "Greeter", job, {"n": 4})
        failed = await runner.execute_module("breaker", "Breaker", job, {"n": 2, "fail": True})
        # Read back what the registry stored: that is what the command line must show.
        stored = [await registry.get_run(run.run_id) for run in (completed, failed)]
    assert stored[0] is not None and stored[1] is not None
    return stored[0], stored[1]


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Registry:
    root = tmp_path_factory.mktemp("registry")
    job = root / "job.py"
    job.write_text(JOB)
    db, logs = root / "runs.db", root / "logs"
    completed, failed = asyncio.run(_populate(db, logs, job))
    assert completed.status is pq.RunStatus.COMPLETED and failed.status is pq.RunStatus.FAILED
    return Registry(db, logs, job, completed, failed)


# -- list ----------------------------------------------------------------------------------------


def test_list_newest_first(registry: Registry) -> None:
    result = cli("runs", "--db", str(registry.db))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert lines[0].split() == [
        "RUN_ID",
        "STATUS",
        "MODULE",
        "CREATED",
        "(UTC)",
        "DURATION",
        "EXIT",
    ]
    assert lines[1].split()[:3] == [registry.failed.run_id, "failed", "Breaker"]
    assert lines[1].split()[-1] == "1"
    assert lines[2].split()[:3] == [registry.completed.run_id, "completed", "Greeter"]
    assert lines[-1] == "2 of 2 run(s), newest first"


def test_list_filters_and_json(registry: Registry) -> None:
    result = cli("runs", "--db", str(registry.db), "--status", "completed", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["total"] == 1
    assert [run["run_id"] for run in data["runs"]] == [registry.completed.run_id]
    assert data["runs"][0] == registry.completed.to_dict()

    limited = json.loads(cli("runs", "--db", str(registry.db), "--limit", "1", "--json").stdout)
    assert (limited["total"], len(limited["runs"])) == (2, 1)
    by_module = json.loads(
        cli("runs", "--db", str(registry.db), "--module", "breaker", "--json").stdout
    )
    assert [run["run_id"] for run in by_module["runs"]] == [registry.failed.run_id]


# -- show ----------------------------------------------------------------------------------------


def test_show_human_and_json(registry: Registry) -> None:
    run = registry.failed
    result = cli("runs", "show", run.run_id, "--db", str(registry.db))
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert f"run_id     : {run.run_id}" in text
    assert "status     : failed" in text
    assert "exit code  : 1" in text
    assert "error      : exited with status 1: boom" in text
    assert 'parameters : {"n": 2, "fail": true}' in text
    assert text.rstrip().endswith("output tail (3 line(s)):\n  line 0 of 2\n  line 1 of 2\n  boom")

    # Options may also come before the sub-command.
    data = json.loads(cli("runs", "--db", str(registry.db), "--json", "show", run.run_id).stdout)
    assert data == run.to_dict()


def test_show_unknown_run_exits_1(registry: Registry) -> None:
    result = cli("runs", "show", "no-such-run", "--db", str(registry.db))
    assert result.returncode == 1
    assert b"no run 'no-such-run'" in result.stderr


# -- tail ----------------------------------------------------------------------------------------


def test_tail_prints_the_log_file(registry: Registry) -> None:
    run = registry.completed
    result = cli(
        "runs", "tail", run.run_id, "--db", str(registry.db), "--log-dir", str(registry.logs)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"".join(f"line {i} of 4\n".encode() for i in range(4))
    assert (registry.logs / f"{run.run_id}.log").read_bytes() == result.stdout


def test_tail_without_log_dir_prints_the_registry_tail(registry: Registry) -> None:
    result = cli("runs", "tail", registry.failed.run_id, "--db", str(registry.db))
    assert result.returncode == 0
    assert result.stdout == b"line 0 of 2\nline 1 of 2\nboom\n"
    assert b"--log-dir gives the whole log" in result.stderr


def test_tail_errors(registry: Registry, tmp_path: Path) -> None:
    db = str(registry.db)
    unknown = cli("runs", "tail", "no-such-run", "--db", db, "--log-dir", str(registry.logs))
    assert unknown.returncode == 1 and b"no run 'no-such-run'" in unknown.stderr
    no_log = cli("runs", "tail", registry.completed.run_id, "--db", db, "--log-dir", str(tmp_path))
    assert no_log.returncode == 1 and b"no output log" in no_log.stderr
    follow_without_dir = cli("runs", "tail", registry.completed.run_id, "--db", db, "-f")
    assert (
        follow_without_dir.returncode == 2
        and b"--follow needs --log-dir" in follow_without_dir.stderr
    )
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    not_a_dir = cli("runs", "tail", registry.completed.run_id, "--db", db, "--log-dir", str(a_file))
    assert not_a_dir.returncode == 2, not_a_dir.stderr
    assert b"--log-dir: log_dir" in not_a_dir.stderr and b"not a directory" in not_a_dir.stderr
    assert b"Traceback" not in not_a_dir.stderr


def test_tail_follow_until_the_run_finishes(registry: Registry, tmp_path: Path) -> None:
    db, logs, go = tmp_path / "live.db", tmp_path / "logs", tmp_path / "go"
    # Another process owns the run, as a web backend would: it starts the module in the
    # background and stays until the run has finished.
    owner = textwrap.dedent(
        f"""
        import asyncio, prismq_subprocess as pq
        async def main():
            async with (
                pq.SQLiteRunRegistry({str(db)!r}) as registry,
                pq.OutputCapture(log_dir={str(logs)!r}) as capture,
                pq.ModuleRunner(registry, output=capture) as runner,
            ):
                run_id = await runner.start_module(
                    "slow", "Slow", {str(registry.job)!r}, {{"n": 6, "wait-for": {str(go)!r}}}
                )
                print(run_id, flush=True)
                while not (await registry.get_run(run_id)).is_finished:
                    await asyncio.sleep(0.05)
        asyncio.run(main())
        """
    )
    helper = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE)
    tail = None
    try:
        assert helper.stdout is not None
        run_id = helper.stdout.readline().decode().strip()
        log = logs / f"{run_id}.log"
        deadline = time.monotonic() + 30
        while not (log.exists() and b"line 2 of 6" in log.read_bytes()):
            assert time.monotonic() < deadline, "the module never started"
            time.sleep(0.05)
        tail = start_cli("runs", "tail", run_id, "--db", str(db), "--log-dir", str(logs), "-f")
        assert tail.stdout is not None
        # The first half arrives while the run is still RUNNING (it waits for `go`).
        first = [tail.stdout.readline() for _ in range(3)]
        assert first == [f"line {i} of 6\n".encode() for i in range(3)]
        assert tail.poll() is None
        go.touch()
        out, err = tail.communicate(timeout=30)
        assert tail.returncode == 0, err
        assert out == b"".join(f"line {i} of 6\n".encode() for i in range(3, 6))
        assert f"run {run_id} completed, exit code 0".encode() in err
        assert helper.wait(timeout=30) == 0
    finally:
        for proc in (tail, helper):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()  # also closes its pipes


def test_tail_follow_stops_when_the_owner_dies(tmp_path: Path) -> None:
    db = tmp_path / "orphan.db"
    owner = textwrap.dedent(
        f"""
        import asyncio, prismq_subprocess as pq
        async def main():
            async with (
                pq.SQLiteRunRegistry({str(db)!r}) as registry,
                pq.OutputCapture(log_dir={str(tmp_path)!r}) as capture,
            ):
                run = pq.Run(module_id="m", module_name="M")
                await registry.add_run(run)          # owned by this process
                run.mark_running(pid=None)
                await registry.update_run(run)
                await capture.append_line(run.run_id, "started")
                await capture.close_run(run.run_id)  # the line is on disk
                print(run.run_id, flush=True)
                await asyncio.sleep(60)
        asyncio.run(main())
        """
    )
    helper = subprocess.Popen([sys.executable, "-c", owner], stdout=subprocess.PIPE)
    tail = None
    try:
        assert helper.stdout is not None
        run_id = helper.stdout.readline().decode().strip()
        tail = start_cli("runs", "tail", run_id, "--db", str(db), "--log-dir", str(tmp_path), "-f")
        assert tail.stdout is not None
        # The command line has opened the registry (the owner was alive: nothing recovered)
        # and follows the running run.
        assert tail.stdout.readline() == b"started\n"
        assert tail.poll() is None
        helper.send_signal(signal.SIGKILL)
        helper.wait(timeout=10)
        _, err = tail.communicate(timeout=30)
        assert tail.returncode == 1, err
        assert b"owner process" in err and b"is gone" in err
        assert b"when it next opens the registry read-write" in err
    finally:
        for proc in (tail, helper):
            if proc is not None:
                if proc.poll() is None:
                    proc.kill()
                proc.communicate()  # also closes its pipes


# -- read-only: runs whose owner is gone ---------------------------------------------------------


async def _add_live_and_orphaned_runs(db: Path, dead_pid: int) -> None:
    async with pq.SQLiteRunRegistry(db) as registry:
        live = pq.Run(module_id="m", module_name="Live", run_id="live1")
        await registry.add_run(live)  # owned by this (living) test process
        live.mark_running(pid=None)
        await registry.update_run(live)
        gone_owner = pq.RunOwner(socket.gethostname(), dead_pid, time.time() - 10)
        orphan = pq.Run(
            module_id="m",
            module_name="Orphan",
            run_id="orphan1",
            status=pq.RunStatus.RUNNING,
            owner=gone_owner,
        )
        await registry.add_run(orphan)


def test_runs_is_a_read_only_viewer_that_shows_a_gone_owner(tmp_path: Path) -> None:
    db = tmp_path / "orphans.db"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    asyncio.run(_add_live_and_orphaned_runs(db, dead.pid))
    before = _digest(db)
    for _ in range(2):  # nothing is recovered: the second look sees the same
        result = cli("runs", "--db", str(db))
        assert result.returncode == 0, result.stderr
        rows = {line.split()[0]: line for line in result.stdout.decode().splitlines()[1:-1]}
        assert "running (owner gone)  Orphan" in rows["orphan1"]
        assert "running  " in rows["live1"] and "owner gone" not in rows["live1"]
    show = cli("runs", "show", "orphan1", "--db", str(db))
    assert b"status     : running (owner gone)" in show.stdout
    assert _digest(db) == before
    assert (
        cli("runs", "--db", str(db), "--status", "interrupted", "--json").stdout.count(b'"run_id"')
        == 0
    )
    help_text = cli("runs", "--help").stdout.decode()
    assert "read-only" in help_text and "recovers" not in help_text


# -- files that are not ours ---------------------------------------------------------------------


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_missing_file_is_not_created(tmp_path: Path) -> None:
    db = tmp_path / "missing.db"
    for args in (["runs", "--db", str(db)], ["runs", "show", "x", "--db", str(db)]):
        result = cli(*args)
        assert result.returncode == 2
        assert b"no registry file" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_foreign_files_are_left_untouched(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE things (x)")
    conn.execute("INSERT INTO things VALUES (1)")
    conn.commit()
    conn.close()
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all, " * 20)
    empty = tmp_path / "empty.db"
    empty.touch()
    before = {path: _digest(path) for path in (other, text, empty)}
    for path, message in (
        (other, b"not a prismq_subprocess run registry"),
        (text, b"is not a SQLite run registry"),
        (empty, b"not a prismq_subprocess run registry"),
    ):
        result = cli("runs", "--db", str(path))
        assert result.returncode == 2, path
        assert message in result.stderr
    assert {path: _digest(path) for path in before} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.db", "notes.txt", "other.db"]
    assert cli("runs", "--db", str(tmp_path)).returncode == 2  # a directory


def test_a_damaged_registry_is_reported_without_a_traceback(
    registry: Registry, tmp_path: Path
) -> None:
    # A registry whose first page (the schema) is intact but whose other pages are garbage:
    # it passes the read-only check, then SQLite finds the damage when the runs are read.
    db = tmp_path / "damaged.db"
    data = registry.db.read_bytes()
    page = 4096
    assert len(data) > page
    db.write_bytes(data[:page] + bytes([0xA5]) * (len(data) - page))
    before = _digest(db)
    run_id = registry.completed.run_id
    for args in (
        ["runs", "--db", str(db)],
        ["runs", "--db", str(db), "--json"],
        ["runs", "show", run_id, "--db", str(db)],
        ["runs", "tail", run_id, "--db", str(db)],
    ):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert b"Traceback" not in result.stderr, result.stderr
        assert b"damaged.db" in result.stderr and b"malformed" in result.stderr, result.stderr
    assert _digest(db) == before


def test_a_locked_registry_is_reported_as_locked(registry: Registry, tmp_path: Path) -> None:
    db = tmp_path / "locked.db"
    db.write_bytes(registry.db.read_bytes())  # the WAL was checkpointed when it closed
    locker = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sqlite3, sys
                conn = sqlite3.connect({str(db)!r}, isolation_level=None)
                conn.execute("PRAGMA locking_mode = EXCLUSIVE")
                conn.execute("BEGIN EXCLUSIVE")
                conn.execute("UPDATE runs SET module_name = module_name")
                print("locked", flush=True)
                sys.stdin.read()
                """
            ),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline() == b"locked\n"
        result = cli("runs", "--db", str(db))
        assert result.returncode == 1, result.stderr
        assert b"is locked by another process; try again" in result.stderr
        # Ctrl-C while it waits for the lock ends it at once: it took effect only when
        # SQLite's wait (5 s) returned (a probe's find).
        waiting = start_cli("runs", "--db", str(db))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any(  # waiting in SQLite: the file is open
            Path(f.path) == db.resolve() for f in psutil.Process(waiting.pid).open_files()
        ):
            time.sleep(0.05)
        time.sleep(0.5)
        interrupted = time.monotonic()
        waiting.send_signal(signal.SIGINT)
        waiting.communicate(timeout=30)
        assert waiting.returncode == 130
        assert time.monotonic() - interrupted < 2.5
    finally:
        locker.kill()
        locker.communicate()


def test_usage_errors(registry: Registry) -> None:
    assert cli("runs").returncode == 2  # no --db
    bad_status = cli("runs", "--db", str(registry.db), "--status", "sleeping")
    assert bad_status.returncode == 2 and b"invalid choice" in bad_status.stderr
    assert cli("runs", "--db", str(registry.db), "--limit", "-3").returncode == 2
    assert cli("runs", "show", "--db", str(registry.db)).returncode == 2  # no RUN_ID
    assert cli("runs", "tail", "--help").returncode == 0


@pytest.mark.parametrize("action", ["show", "tail"])
@pytest.mark.parametrize(
    "given", [("--status", "failed"), ("--module", "m"), ("--limit", "5")], ids=lambda g: g[0]
)
def test_list_filters_given_to_show_or_tail_are_refused(
    registry: Registry, action: str, given: tuple[str, str]
) -> None:
    # A probe's find: `runs --status failed show ID` ignored the filter without a word (it
    # filters the list, which show and tail do not print).
    result = cli("runs", "--db", str(registry.db), *given, action, "some-run")
    assert result.returncode == 2, result.stderr
    assert f"{given[0]} filters the list".encode() in result.stderr


async def test_tail_follow_has_the_whole_log_without_a_quiet_wait(
    registry: Registry, tmp_path: Path
) -> None:
    # The run's last lines come right before it finishes (no pause at all): `tail -f` started
    # meanwhile stops when the registry says finished, and still prints every line, because
    # the log is closed before the final status is committed (the 0.5 s settle wait is gone).
    db, logs = tmp_path / "fast.db", tmp_path / "logs"
    async with (
        pq.SQLiteRunRegistry(db) as reg,
        pq.OutputCapture(log_dir=logs) as capture,
        pq.ModuleRunner(reg, output=capture) as runner,
    ):
        for _ in range(3):
            run_id = await runner.start_module("fast", "Fast", registry.job, {"n": 2000})
            result = await asyncio.to_thread(
                cli,
                "runs",
                "tail",
                run_id,
                "--db",
                str(db),
                "--log-dir",
                str(logs),
                "-f",
                "--interval",
                "0.01",
            )
            assert result.returncode == 0, result.stderr
            assert result.stdout == b"".join(f"line {i} of 2000\n".encode() for i in range(2000))
            stored = await reg.get_run(run_id)
            assert stored is not None and stored.status is pq.RunStatus.COMPLETED
    # The viewer opened the file read-only: its header is as the owner left it.
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA user_version").fetchone()[0] >= 4
    raw.close()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
@pytest.mark.parametrize("command", ["doctor", "runs", "show", "dry-run"])
def test_output_that_cannot_be_written_is_one_line_not_a_traceback(
    registry: Registry, command: str
) -> None:
    # A probe's find: every command but a real `run` ended in a traceback (exit 1) when its
    # output could not be written (a full disk); `run` already said why in one line (125).
    args = {
        "doctor": ["doctor"],
        "runs": ["runs", "--db", str(registry.db)],
        "show": ["runs", "show", registry.completed.run_id, "--db", str(registry.db)],
        "dry-run": ["run", "--mode", "dry-run", "--", "true"],
    }[command]
    with open("/dev/full", "wb") as full:
        result = subprocess.run(
            [*CLI, *args], stdout=full, stderr=subprocess.PIPE, env=cli_env(), timeout=60
        )
    assert result.returncode == (125 if command == "dry-run" else 1), result.stderr
    assert b"Traceback" not in result.stderr
    lines = result.stderr.decode().splitlines()
    assert len(lines) == 1 and "No space left on device" in lines[0], lines


async def _add_non_ascii_run(db: Path) -> str:
    async with pq.SQLiteRunRegistry(db) as store:
        run = pq.Run(module_id="grüße", module_name="Grüße ☃", parameters={"city": "Zürich"})
        await store.add_run(run)
    return run.run_id


def test_run_data_the_output_encoding_cannot_hold_is_written_escaped(tmp_path: Path) -> None:
    # A probe's find: non-ASCII run data with an ASCII output encoding (PYTHONIOENCODING=ascii,
    # a C locale) ended in a UnicodeEncodeError traceback.
    db = tmp_path / "runs.db"
    run_id = asyncio.run(_add_non_ascii_run(db))
    env = {"PYTHONIOENCODING": "ascii"}
    listed = cli("runs", "--db", str(db), env=env)
    shown = cli("runs", "show", run_id, "--db", str(db), env=env)
    for result in (listed, shown):
        assert result.returncode == 0, result.stderr
        assert b"Traceback" not in result.stderr
    assert b"Gr\\xfc\\xdfe \\u2603" in shown.stdout
    assert b"Gr\\xfc\\xdfe" in listed.stdout


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs mounted at a fresh folder, to be remounted read-only by the test (root only)."""
    folder = tmp_path / "mnt"
    folder.mkdir()
    if sys.platform != "linux" or shutil.which("mount") is None:
        pytest.skip("needs Linux mount")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


async def _one_run(db: Path) -> str:
    async with pq.SQLiteRunRegistry(db) as store:
        run = pq.Run(module_id="snap", module_name="Snapshot")
        await store.add_run(run)
    return run.run_id


async def _read_only_ids(db: Path) -> list[str]:
    async with pq.SQLiteRunRegistry(db, read_only=True) as store:
        return [run.run_id for run in await store.list_runs()]


def test_a_registry_on_read_only_storage_can_be_read(read_only_mount: Path) -> None:
    # A probe's find: a healthy registry on a read-only file system (a snapshot, a read-only
    # mount) was "not a SQLite run registry: unable to open database file": a reader of a WAL
    # file creates its -shm file, which read-only storage refuses.
    db = read_only_mount / "runs.db"
    run_id = asyncio.run(_one_run(db))
    assert not (read_only_mount / "runs.db-shm").exists()  # the last connection removed it
    remounted = subprocess.run(
        ["mount", "-o", "remount,ro", str(read_only_mount)], capture_output=True, check=False
    )
    if remounted.returncode != 0:
        pytest.skip(f"cannot remount read-only: {remounted.stderr.decode().strip()}")
    listed = cli("runs", "--db", str(db))
    assert listed.returncode == 0, listed.stderr
    assert run_id[:8] in listed.stdout.decode()
    shown = cli("runs", "show", run_id, "--db", str(db), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["module_name"] == "Snapshot"
    assert asyncio.run(_read_only_ids(db)) == [run_id]


def test_a_damaged_row_is_reported_not_hidden(registry: Registry, tmp_path: Path) -> None:
    # A probe's find: the list said "0 of 1 run(s)" with no hint, and `show` said there was
    # no such run, for a row the read-only viewer skips as unreadable.
    db = tmp_path / "damaged.db"
    # (closing(): a connection's own `with` commits but does not close it.)
    with closing(sqlite3.connect(registry.db)) as source, closing(sqlite3.connect(db)) as copy:
        source.backup(copy)
    with closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("UPDATE runs SET status = 'bogus' WHERE run_id = ?", (registry.failed.run_id,))
    listed = cli("runs", "--db", str(db))
    assert listed.returncode == 0, listed.stderr
    assert "1 of 2 run(s)" in listed.stdout.decode()
    assert "1 stored run(s) could not be read" in listed.stdout.decode()
    shown = cli("runs", "show", registry.failed.run_id, "--db", str(db))
    assert shown.returncode == 1
    assert b"cannot be read (a damaged row" in shown.stderr
    missing = cli("runs", "show", "nosuchrun", "--db", str(db))
    assert missing.returncode == 1 and b"no run 'nosuchrun'" in missing.stderr


async def _add_run_with_controls(db: Path) -> str:
    async with pq.SQLiteRunRegistry(db) as store:
        run = pq.Run(
            module_id="m\nx",
            module_name="\x1b[2Jname\tx",
            # Bidirectional overrides reorder what the terminal shows (a security probe's find).
            # Joiners stay: emoji sequences and Persian need them (a review's find).
            error_message=(
                "ok \u202egnp.exe\u202c \u2066x\u2069 \u061c\u200b \U0001f468\u200d\U0001f469"
            ),
            parameters={},
            output_tail=["\x1b]0;t\x07"],
        )
        await store.add_run(run)
    return run.run_id


def test_control_characters_in_run_data_are_shown_escaped(tmp_path: Path) -> None:
    # A probe's find: a module name holding ESC [2J cleared the terminal of whoever listed the
    # runs, and a newline or tab broke the table and show's layout.
    db = tmp_path / "runs.db"
    run_id = asyncio.run(_add_run_with_controls(db))
    listed = cli("runs", "--db", str(db))
    shown = cli("runs", "show", run_id, "--db", str(db))
    for result in (listed, shown):
        assert result.returncode == 0, result.stderr
        assert b"\x1b" not in result.stdout and b"\t" not in result.stdout
    assert b"\\x1b[2Jname\\tx" in listed.stdout
    assert b"(id m\\nx)" in shown.stdout and b"\\x1b]0;t\\x07" in shown.stdout
    assert "\u202e" not in shown.stdout.decode() and "\u2066" not in shown.stdout.decode()
    assert b"ok \\u202egnp.exe\\u202c \\u2066x\\u2069 \\u061c\\u200b" in shown.stdout
    assert "\U0001f468\u200d\U0001f469" in shown.stdout.decode()
    assert len(listed.stdout.decode().splitlines()) == 3


def test_a_folder_the_reader_may_not_write_is_not_read_as_immutable(tmp_path: Path) -> None:
    # A review's find: the immutable fallback was taken for any folder the reader could not
    # write, but a writer of another user may be live there; an immutable reader does not see
    # its changes, and read "database disk image is malformed" for good once it checkpointed.
    # Only a file system mounted read-only (no writer possible) is read as immutable.
    setpriv = shutil.which("setpriv")
    if sys.platform != "linux" or setpriv is None or os.geteuid() != 0:
        pytest.skip("needs root and setpriv to read as another user")
    folder = Path(tempfile.mkdtemp(prefix="pq-regdir-", dir="/tmp"))
    try:
        folder.chmod(0o755)
        db = folder / "runs.db"
        asyncio.run(_one_run(db))
        assert not (folder / "runs.db-shm").exists()
        probe = (
            "import sqlite3, sys\n"
            "from prismq_subprocess._background._sqlite_registry import open_read_only\n"
            "try:\n"
            "    open_read_only(sys.argv[1], 1.0)\n"
            "except sqlite3.OperationalError as exc:\n"
            "    print('refused:', exc)\n"
            "else:\n"
            "    print('opened')\n"
        )
        as_nobody = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable]
        usable = subprocess.run(
            [*as_nobody, "-c", "import prismq_subprocess"],
            capture_output=True,
            timeout=60,
            check=False,
        )
        if usable.returncode != 0:
            # (An interpreter or venv under a private home: pyenv's under /root, say.)
            pytest.skip(f"the other user cannot run this Python: {usable.stderr[-200:]!r}")
        result = subprocess.run(
            [*as_nobody, "-c", probe, str(db)], capture_output=True, timeout=60, check=False
        )
        assert result.stdout.startswith(b"refused:"), result
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _unread(fd: int) -> int:
    """How many bytes the pipe ``fd`` reads from holds."""
    import fcntl  # POSIX only
    import termios

    held = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int.from_bytes(held, sys.byteorder)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX pipes and SIGINT")
@pytest.mark.parametrize("follow", [False, True], ids=["tail", "tail-f"])
def test_ctrl_c_ends_a_tail_whose_reader_stalled(tmp_path: Path, follow: bool) -> None:
    # With whoever reads our stdout no longer reading (a paused pager, a hung log shipper), a
    # write of the log blocked in the loop's default executor, which asyncio.run() waits for
    # on its way out: Ctrl-C left `runs tail` hanging until the reader closed its end.
    db, logs, job = tmp_path / "runs.db", tmp_path / "logs", tmp_path / "job.py"
    job.write_text(JOB)

    async def populate() -> str:
        async with (
            pq.SQLiteRunRegistry(db) as registry,
            pq.OutputCapture(log_dir=logs) as capture,
            pq.ModuleRunner(registry, output=capture) as runner,
        ):
            run = await runner.execute_module("big", "Big", job, {"n": 200_000})
        return run.run_id

    run_id = asyncio.run(populate())
    assert (logs / f"{run_id}.log").stat().st_size > 2 * 1024 * 1024  # more than pipes hold
    read_end, write_end = os.pipe()  # never read: a stalled consumer
    try:
        options = ["-f", "--interval", "0.05"] if follow else []
        proc = subprocess.Popen(
            [*CLI, "runs", "tail", run_id, "--db", str(db), "--log-dir", str(logs), *options],
            stdout=write_end,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=cli_env(),
        )
        os.close(write_end)
        write_end = -1
        try:
            # Until the pipe is full and a write waits: what it holds stops growing (64 KiB
            # here; 1 MiB with 64 KiB pages, 16 KiB or more on macOS).
            deadline = time.monotonic() + 30
            held = -1
            while time.monotonic() < deadline:
                time.sleep(0.3)
                now = _unread(read_end)
                if now == held and now > 0:
                    break
                held = now
            assert proc.poll() is None
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=20) == 130
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()
    finally:
        os.close(read_end)
        if write_end >= 0:
            os.close(write_end)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="psutil's Linux boot time")
def test_the_view_judges_owners_as_recovery_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # After a step of the wall clock, `runs` showed a live owner as gone (its start read
    # strictly), where recovery counts it alive (docs/LIFECYCLE.md).
    import psutil._pslinux as pslinux

    from prismq_subprocess._cli import _runs

    db = tmp_path / "runs.db"
    owner_code = textwrap.dedent(
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
    owner = subprocess.Popen(
        [sys.executable, "-c", owner_code, str(db)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        run_id = owner.stdout.readline().strip()

        async def read() -> pq.Run | None:
            async with pq.SQLiteRunRegistry(db, read_only=True) as registry:
                return await registry.get_run(run_id)

        run = asyncio.run(read())
        assert run is not None and not _runs._owner_gone(run, str(db))
        pq.RunOwner.current()  # (cached before the step)
        real = pslinux.boot_time()
        monkeypatch.setattr(pslinux, "boot_time", lambda: real + 5.0)
        assert not _runs._owner_gone(run, str(db))
        monkeypatch.undo()
    finally:
        owner.kill()
        owner.communicate()


# -- odd names: a probe's finds (session 36) --------------------------------------------------
def test_a_registry_in_a_folder_whose_name_is_not_utf8_is_read(
    registry: Registry, tmp_path: Path
) -> None:
    # A Latin-1 folder name: `runs` crashed with a UnicodeEncodeError traceback (the read-only
    # URI was quoted as UTF-8), though the library opened the same file read-write.
    folder = Path(os.fsdecode(bytes(tmp_path) + b"/lat\xe9"))
    folder.mkdir()
    shutil.copy(registry.db, folder / "runs.db")
    for where in (
        {"cwd": str(folder), "db": "runs.db"},
        {"cwd": None, "db": str(folder / "runs.db")},
    ):
        result = cli("runs", "--db", where["db"] or "", cwd=where["cwd"])  # type: ignore[arg-type]
        assert result.returncode == 0, result.stderr
        assert registry.completed.run_id.encode() in result.stdout


def test_a_run_id_that_is_not_utf8_is_an_unknown_run(registry: Registry) -> None:
    # `runs show $'\xff'` crashed with a UnicodeEncodeError traceback.
    for command in ("show", "tail"):
        result = subprocess.run(
            [
                *CLI[:1],
                *[os.fsencode(a) for a in CLI[1:]],
                b"runs",
                command,
                b"\xff",
                b"--db",
                os.fsencode(registry.db),
            ],
            capture_output=True,
            env=cli_env(None),
            timeout=60,
            check=False,
        )
        assert result.returncode == 1, result.stderr
        assert b"no run" in result.stderr and b"Traceback" not in result.stderr


def _store_finished_run(db: Path, run_id: str) -> None:
    async def store() -> None:
        async with pq.SQLiteRunRegistry(db) as registry:
            run = pq.Run(module_id="m", module_name="M", run_id=run_id)
            await registry.add_run(run)
            run.mark_running(pid=None)
            await registry.update_run(run)
            run.mark_completed(0)
            await registry.update_run(run)

    asyncio.run(store())


def test_tail_of_a_run_whose_id_cannot_name_a_log_file_is_a_one_line_error(
    tmp_path: Path,
) -> None:
    # An app that keeps no log files may use long run ids; `runs tail --log-dir` on one
    # crashed with an InvalidRunIdError traceback.
    db, run_id = tmp_path / "runs.db", "a" * 300
    _store_finished_run(db, run_id)
    for follow in ([], ["-f"]):
        result = cli("runs", "tail", run_id, "--db", str(db), "--log-dir", str(tmp_path), *follow)
        assert result.returncode == 1, result.stderr
        assert b"too long" in result.stderr and b"Traceback" not in result.stderr


def test_tail_follow_of_a_finished_run_without_its_log_fails_as_without_follow(
    registry: Registry, tmp_path: Path
) -> None:
    # A mistyped --log-dir: with -f the command printed nothing and exited 0, so a script
    # could not tell that the output was lost; without -f it exits 1.
    run = registry.completed
    for follow in ([], ["-f"]):
        result = cli(
            "runs",
            "tail",
            run.run_id,
            "--db",
            str(registry.db),
            "--log-dir",
            str(tmp_path / "logz"),
            *follow,
        )
        assert result.returncode == 1, (follow, result.stdout, result.stderr)
        assert b"no output log" in result.stderr


def _as_an_ordinary_user() -> list[str]:
    """A prefix that runs a command without the override capabilities (root here: permission
    bits then apply), or without any change for another user."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv: permission bits do not apply")
    return [setpriv, "--bounding-set", "-dac_override,-dac_read_search,-fowner"]


def test_permission_problems_are_said_as_such(registry: Registry, tmp_path: Path) -> None:
    # A probe's find: another user's registry, readable in a folder this user may not write,
    # and one this user may not read, were both "not a SQLite run registry"; a folder that
    # may not be searched was exit 1 with a bare errno text.
    prefix = _as_an_ordinary_user()
    nobody = 65534
    cases = {}
    for name, file_mode, folder_mode in (
        ("read_only_folder", 0o644, 0o755),
        ("unreadable_file", 0o000, 0o755),
        ("unsearchable_folder", 0o644, 0o700),
    ):
        folder = tmp_path / name
        folder.mkdir()
        shutil.copy(registry.db, folder / "runs.db")
        os.chmod(folder / "runs.db", file_mode)
        os.chmod(folder, folder_mode)
        if prefix:
            os.chown(folder, nobody, nobody)
            os.chown(folder / "runs.db", nobody, nobody)
        cases[name] = folder / "runs.db"
    os.chmod(tmp_path, 0o755)
    expected = {
        "read_only_folder": b"may not write its folder",
        "unreadable_file": b"permission denied",
        "unsearchable_folder": b"cannot reach",
    }
    for name, db in cases.items():
        result = subprocess.run(
            [*prefix, *CLI, "runs", "--db", str(db)],
            capture_output=True,
            env=cli_env(None),
            timeout=60,
            check=False,
        )
        assert result.returncode == 2, (name, result.stderr)
        assert expected[name] in result.stderr, (name, result.stderr)
        assert b"not a SQLite" not in result.stderr and b"Traceback" not in result.stderr


@pytest.mark.parametrize("interval", ["1e400", "inf", "nan", "0", "-1"])
def test_a_bad_follow_interval_is_refused_saying_what_it_must_be(
    registry: Registry, interval: str
) -> None:
    # "must be a number > 0, got '1e400'" misled: 1e400 is a number above 0 (an infinite one).
    result = cli(
        "runs", "tail", registry.completed.run_id, "--db", str(registry.db),
        "--log-dir", str(registry.logs), "-f", "--interval", interval,
    )  # fmt: skip
    assert result.returncode == 2
    assert b"must be a finite number > 0" in result.stderr
