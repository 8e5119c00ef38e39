"""Runs shared between processes through one SQLite registry and one log directory (issue 12
item 3): cancel a run another process owns, follow its output live and after it ended, notice
its owner's death."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

import prismq_subprocess as pq
from prismq_subprocess import exceptions as errors

OWNER = Path(__file__).with_name("owner_process.py")

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL of the owner")

# Prints its grandchild's pid, then sleeps (as does the grandchild).
TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("pids", child.pid, flush=True)
    time.sleep(60)
    """
)

# Starts a grandchild that prints nothing, prints its pid, then keeps printing: once its owner
# is gone, the next line breaks the pipe and this child dies, the grandchild lives on.
CHATTY_TREE = textwrap.dedent(
    """
    import subprocess, sys, time
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)"], stdout=subprocess.DEVNULL
    )
    print("pids", child.pid, flush=True)
    while True:
        print("tick", flush=True)
        time.sleep(0.02)
    """
)

# --count lines, --delay seconds apart, then exit with --code.
COUNT = textwrap.dedent(
    """
    import argparse, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int)
    p.add_argument("--delay", type=float)
    p.add_argument("--code", type=int, default=0)
    a = p.parse_args()
    for i in range(a.count):
        print(f"line {i} " + "x" * (i % 7), flush=True)
        time.sleep(a.delay)
    sys.exit(a.code)
    """
)


class Owner:
    """The other process (see owner_process.py)."""

    def __init__(self, db: Path, log_dir: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(OWNER), str(db), str(log_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.read() == "READY"

    def read(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    async def start(self, command: str) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        answer = await asyncio.to_thread(self.read)
        assert answer.startswith("RUN "), answer
        return answer.split()[1]

    def close(self) -> None:
        descendants = []
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(self.proc.pid).children(recursive=True)
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            with contextlib.suppress(OSError):
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for child in descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()


@pytest.fixture
def paths(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "tree.py").write_text(TREE)
    (tmp_path / "count.py").write_text(COUNT)
    (tmp_path / "chatty_tree.py").write_text(CHATTY_TREE)
    return tmp_path / "runs.db", tmp_path / "logs"


@pytest.fixture
def owner(paths: tuple[Path, Path]) -> Iterator[Owner]:
    db, log_dir = paths
    # The schema exists before either side opens it, so neither waits for the other's migration.
    asyncio.run(_create(db))
    process = Owner(db, log_dir)
    yield process
    process.close()


async def _create(db: Path) -> None:
    async with pq.SQLiteRunRegistry(db):
        pass


@pytest.fixture
async def here(
    paths: tuple[Path, Path],
) -> AsyncIterator[tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner]]:
    """This process: a worker that owns nothing."""
    db, log_dir = paths
    async with (
        pq.SQLiteRunRegistry(db) as registry,
        pq.OutputCapture(log_dir=log_dir) as capture,
        pq.ModuleRunner(registry, output=capture) as runner,
    ):
        yield registry, capture, runner


async def read_lines(
    capture: pq.OutputCapture,
    registry: pq.SQLiteRunRegistry,
    run_id: str,
    *,
    after: int | None = None,
    stop_after: int | None = None,
) -> tuple[list[tuple[int, str]], pq.OutputEnd | None]:
    seen: list[tuple[int, str]] = []
    async with capture.subscribe(run_id, after=after, registry=registry) as sub:
        async for item in sub:
            assert isinstance(item, pq.OutputLine), item
            seen.append((item.seq, item.text))
            if stop_after is not None and len(seen) == stop_after:
                break
    return seen, sub.end


async def test_cancel_from_another_process_stops_the_owners_tree(
    owner: Owner,
    here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner],
    paths: tuple[Path, Path],
) -> None:
    registry, capture, runner = here
    run_id = await owner.start(f"module {paths[0].parent / 'tree.py'} {{}}")
    lines, _ = await read_lines(capture, registry, run_id, stop_after=1)
    grandchild = int(lines[0][1].split()[1])
    run = await registry.get_run(run_id)
    assert run is not None and run.status is pq.RunStatus.RUNNING and run.pid is not None
    assert run.owner is not None and run.owner.pid == owner.proc.pid
    # Not this process's run: before issue 12 this was NOT_FOUND (False).
    assert await runner.cancel(run_id, "stop from worker B") is pq.CancelResult.CANCELLED
    final = await registry.get_run(run_id)
    assert final is not None
    assert (final.status, final.error_message) == (pq.RunStatus.CANCELLED, "stop from worker B")
    for pid in (run.pid, grandchild):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # The log ends where the run ended, and a late reader on this side gets it all.
    assert await read_lines(capture, registry, run_id) == (
        [(0, f"pids {grandchild}")],
        pq.OutputEnd("cancelled", final.exit_code),
    )
    assert await runner.cancel(run_id) is pq.CancelResult.ALREADY_FINISHED


async def test_task_manager_cancels_a_coroutine_of_another_process(
    owner: Owner, here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner]
) -> None:
    registry, _, _ = here
    run_id = await owner.start("coroutine")
    async with pq.BackgroundTaskManager(registry) as manager:
        assert await manager.cancel_task(run_id, "not needed") is pq.CancelResult.CANCELLED
    run = await registry.get_run(run_id)
    assert run is not None and (run.status, run.error_message) == (
        pq.RunStatus.CANCELLED,
        "not needed",
    )


async def test_a_run_nobody_drives_is_only_requested(
    owner: Owner, here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner]
) -> None:
    registry, _, runner = here
    run_id = await owner.start("raw")
    assert await runner.cancel(run_id, "first", timeout=0.2) is pq.CancelResult.REQUESTED
    assert await registry.request_cancel(run_id, "second") is True
    assert await registry.cancel_requests([run_id, "other"]) == {run_id: "first"}
    run = await registry.get_run(run_id)
    assert run is not None and run.status is pq.RunStatus.PENDING
    with pytest.raises(errors.InvalidTimeoutError):
        await runner.cancel(run_id, timeout=-1)


@posix_only
async def test_a_dead_owners_run_becomes_interrupted_when_cancelled(
    owner: Owner, here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner]
) -> None:
    registry, _, runner = here
    run_id = await owner.start("raw")
    owner.proc.send_signal(signal.SIGKILL)
    owner.proc.wait()
    assert await runner.cancel(run_id) is pq.CancelResult.ALREADY_FINISHED
    run = await registry.get_run(run_id)
    assert run is not None and run.status is pq.RunStatus.INTERRUPTED
    assert f"owner process {owner.proc.pid}" in (run.error_message or "")


@posix_only
async def test_a_dead_owners_tree_is_stopped_when_its_child_already_died(
    owner: Owner,
    here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner],
    paths: tuple[Path, Path],
) -> None:
    """The common way a worker's SIGKILL leaves a tree: the module writes to the pipe the dead
    owner read, dies of the broken pipe, and its grandchild (holding the run's cookie) lives on.
    Recovery used to stop a tree only when the recorded child itself was still there."""
    registry, capture, runner = here
    run_id = await owner.start(f"module {paths[0].parent / 'chatty_tree.py'} {{}}")
    lines, _ = await read_lines(capture, registry, run_id, stop_after=1)
    grandchild = psutil.Process(int(lines[0][1].split()[1]))
    recorded = await registry.get_run(run_id)
    assert recorded is not None and recorded.pid is not None
    child = psutil.Process(recorded.pid)
    owner.proc.send_signal(signal.SIGKILL)
    owner.proc.wait()
    try:
        _, alive = await asyncio.to_thread(psutil.wait_procs, [child], 10)
        assert alive == []  # the broken pipe ended it
        assert await runner.cancel(run_id, timeout=30) is pq.CancelResult.ALREADY_FINISHED
        run = await registry.get_run(run_id)
        assert run is not None and run.status is pq.RunStatus.INTERRUPTED
        assert "were still running and were stopped" in (run.error_message or ""), run
        _, alive = await asyncio.to_thread(psutil.wait_procs, [grandchild], 10)
        assert alive == []
    finally:
        with contextlib.suppress(psutil.Error):
            grandchild.kill()


@posix_only
async def test_a_short_cancel_of_a_dead_owners_run_is_not_only_requested(
    owner: Owner, here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner]
) -> None:
    """A wait shorter than the owner check's second never checked the owner: cancel(timeout=
    0.3) answered REQUESTED ('its owner acts on the request') for a run whose owner was dead,
    every time, and wait_finished(timeout=0.3) raised TimeoutError."""
    registry, _, runner = here
    run_ids = [await owner.start("raw") for _ in range(2)]
    owner.proc.send_signal(signal.SIGKILL)
    owner.proc.wait()
    assert await runner.cancel(run_ids[0], timeout=0.3) is pq.CancelResult.ALREADY_FINISHED
    waited = await registry.wait_finished(run_ids[1], timeout=0.3)
    for run in (await registry.get_run(run_ids[0]), waited):
        assert run is not None and run.status is pq.RunStatus.INTERRUPTED


async def test_output_of_another_process_live_resumed_and_after_the_end(
    owner: Owner,
    here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner],
    paths: tuple[Path, Path],
) -> None:
    registry, capture, _ = here
    params = json.dumps({"count": 300, "delay": 0.002, "code": 3})
    run_id = await owner.start(f"module {paths[0].parent / 'count.py'} {params}")
    expected = [(i, f"line {i} " + "x" * (i % 7)) for i in range(300)]
    live, resumed = await asyncio.gather(
        read_lines(capture, registry, run_id),
        read_lines(capture, registry, run_id, after=149),
    )
    end = pq.OutputEnd("failed", 3)
    assert live == (expected, end)
    assert resumed == (expected[150:], end)
    assert await read_lines(capture, registry, run_id) == (expected, end)


async def follow_killing_the_owner(
    capture: pq.OutputCapture, run_id: str, registry: pq.abc.BaseRunRegistry, owner: Owner
) -> pq.OutputSubscription:
    """Follow ``run_id`` to its end, SIGKILLing its owner after the third line; every line in
    order. Returns the ended subscription."""
    seen = 0
    async with capture.subscribe(run_id, registry=registry) as sub:
        async for item in sub:
            assert isinstance(item, pq.OutputLine) and item.seq == seen
            seen += 1
            if seen == 3:
                owner.proc.send_signal(signal.SIGKILL)
                owner.proc.wait()
    assert seen >= 3
    return sub


@posix_only
async def test_following_ends_interrupted_when_the_owner_dies(
    owner: Owner,
    here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner],
    paths: tuple[Path, Path],
) -> None:
    registry, capture, _ = here
    params = json.dumps({"count": 100000, "delay": 0.01})
    run_id = await owner.start(f"module {paths[0].parent / 'count.py'} {params}")
    sub = await follow_killing_the_owner(capture, run_id, registry, owner)
    assert sub.end is not None and sub.end.status == "interrupted"


@posix_only
async def test_a_follower_woken_more_often_than_the_owner_check_still_ends(
    owner: Owner,
    here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner],
    paths: tuple[Path, Path],
) -> None:
    """The owner is checked once a second; each read restarted the count, so a stream whose
    reads are cut by a shorter heartbeat (sse_events without ``stop``, or wait_for around
    __anext__) never noticed a dead owner: it sent keep-alives for good, the run stayed RUNNING."""
    registry, capture, _ = here
    params = json.dumps({"count": 100000, "delay": 0.01})
    run_id = await owner.start(f"module {paths[0].parent / 'count.py'} {params}")
    await read_lines(capture, registry, run_id, stop_after=3)
    owner.proc.send_signal(signal.SIGKILL)
    owner.proc.wait()

    async def stream() -> str:
        chunks = [
            chunk
            async for chunk in pq.sse_events(capture, run_id, registry=registry, heartbeat=0.2)
        ]
        return chunks[-1]

    async def wait_for_each_item() -> pq.OutputEnd | None:
        async with capture.subscribe(run_id, registry=registry) as sub:
            while True:
                try:
                    await asyncio.wait_for(anext(sub), 0.2)
                except TimeoutError:
                    continue
                except StopAsyncIteration:
                    return sub.end

    async with asyncio.timeout(30):
        last, end = await asyncio.gather(stream(), wait_for_each_item())
    assert last.startswith("event: end\n") and '"status":"interrupted"' in last, last
    assert end == pq.OutputEnd("interrupted", None)


@posix_only
async def test_a_read_only_viewer_ends_a_dead_owners_run_as_interrupted(
    owner: Owner,
    here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner],
    paths: tuple[Path, Path],
) -> None:
    """A viewer with a read-only registry cannot record INTERRUPTED: its followers and
    wait_finished raised RegistryReadOnlyError ('cannot be written') when the owner died. They
    now end with the status a writer would record, and store nothing."""
    registry, capture, _ = here
    db, _ = paths
    params = json.dumps({"count": 100000, "delay": 0.01})
    run_id = await owner.start(f"module {paths[0].parent / 'count.py'} {params}")
    async with pq.SQLiteRunRegistry(db, read_only=True) as viewer:
        sub = await follow_killing_the_owner(capture, run_id, viewer, owner)
        assert sub.end == pq.OutputEnd("interrupted", None)
        lines = [
            json.loads(line[len("data: ") :])
            async for chunk in pq.sse_events(capture, run_id, registry=viewer)
            for line in chunk.splitlines()
            if line.startswith("data: ")
        ]
        assert lines[-1] == {"status": "interrupted", "exit_code": None}
        assert [line["seq"] for line in lines[:-1]] == list(range(len(lines) - 1))
        waited = await viewer.wait_finished(run_id, timeout=10)
        assert waited is not None and waited.status is pq.RunStatus.INTERRUPTED
        assert f"owner process {owner.proc.pid}" in (waited.error_message or "")
        stored = await viewer.get_run(run_id)
        assert stored is not None and stored.status is pq.RunStatus.RUNNING  # nothing written
    # A writer records it.
    assert await registry.recover_orphans() == [run_id]


async def test_unknown_run_of_no_process(
    here: tuple[pq.SQLiteRunRegistry, pq.OutputCapture, pq.ModuleRunner],
) -> None:
    registry, capture, runner = here
    with pytest.raises(errors.OutputNotFoundError):
        await read_lines(capture, registry, "nobody")
    with pytest.raises(errors.OutputWaitTimeoutError):
        async with capture.subscribe("nobody", registry=registry, wait=0.1) as sub:
            async for _ in sub:
                pass
    with pytest.raises(errors.InvalidSubscriptionError):
        capture.subscribe("nobody", registry=registry, poll_interval=0)
    assert await runner.cancel("nobody") is pq.CancelResult.NOT_FOUND


async def test_a_run_that_printed_nothing_ends_with_its_status_after_release(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Such a run has no log file: once its buffer is released, its owner must not call it
    # unknown, and no worker may call its log "gone".
    async with (
        pq.SQLiteRunRegistry(tmp_path / "runs.db") as registry,
        pq.OutputCapture(log_dir=tmp_path / "logs", retain_ended_runs=0) as owner,
        pq.OutputCapture(log_dir=tmp_path / "logs") as other,
    ):
        run = pq.Run(module_id="m")
        await registry.add_run(run)
        await owner.close_run(run.run_id, status="failed", exit_code=3)  # released at once
        run.mark_failed("boom", exit_code=3)
        await registry.update_run(run)
        for capture, shared in ((owner, None), (owner, registry), (other, registry)):
            async with capture.subscribe(run.run_id, registry=shared) as sub:
                assert [item async for item in sub] == []
            assert sub.end == pq.OutputEnd("failed", 3)
    assert "gone" not in caplog.text


async def test_closing_the_capture_ends_its_followers_at_once(tmp_path: Path) -> None:
    async with pq.SQLiteRunRegistry(tmp_path / "runs.db") as registry:
        run = pq.Run(module_id="m")
        run.mark_running()
        await registry.add_run(run)  # another worker's run, still going
        capture = pq.OutputCapture(log_dir=tmp_path / "logs")
        sub = capture.subscribe(run.run_id, registry=registry, poll_interval=60)
        reader = asyncio.create_task(anext(sub, None))
        await asyncio.sleep(0.2)  # it polls, then sleeps
        await capture.aclose()
        assert await asyncio.wait_for(reader, 5) is None  # not at its next poll
        assert sub.end is None  # as for ring subscribers: no end was told


async def test_foreground_run_takes_a_request_from_the_registry(tmp_path: Path) -> None:
    (tmp_path / "tree.py").write_text(TREE)
    async with (
        pq.SQLiteRunRegistry(tmp_path / "runs.db") as registry,
        pq.OutputCapture() as capture,
        pq.ModuleRunner(registry, output=capture) as runner,
    ):
        task = asyncio.create_task(
            runner.execute_module("t", "Tree", tmp_path / "tree.py", run_id="fg")
        )
        async with capture.subscribe("fg", wait=True) as sub:
            first = await anext(sub)
        assert isinstance(first, pq.OutputLine)
        assert await registry.request_cancel("fg", "asked through the file")
        run = await asyncio.wait_for(task, 30)
    assert (run.status, run.error_message) == (pq.RunStatus.CANCELLED, "asked through the file")
    assert not psutil.pid_exists(int(first.text.split()[1])) or (
        psutil.Process(int(first.text.split()[1])).status() == psutil.STATUS_ZOMBIE
    )


@pytest.mark.parametrize("kind", ["memory", "sqlite"])
async def test_request_cancel_only_for_unfinished_runs(tmp_path: Path, kind: str) -> None:
    registry: pq.BaseRunRegistry = (
        pq.RunRegistry() if kind == "memory" else pq.SQLiteRunRegistry(tmp_path / "r.db")
    )
    async with registry:
        active, done = pq.Run(), pq.Run()
        await registry.add_run(active)
        await registry.add_run(done)
        done.mark_running()
        done.mark_completed()
        await registry.update_run(done)
        assert await registry.request_cancel("unknown") is False
        assert await registry.request_cancel(done.run_id) is False
        assert await registry.cancel_requests([done.run_id, active.run_id]) == {}
        assert await registry.request_cancel(active.run_id, "why") is True
        assert await registry.cancel_requests([active.run_id]) == {active.run_id: "why"}
        assert await registry.cancel_requests([]) == {}
        # The owner's own writes keep the request; a finished run has none.
        active.mark_running(pid=os.getpid())
        await registry.update_run(active)
        assert await registry.cancel_requests([active.run_id]) == {active.run_id: "why"}
        active.mark_cancelled("why")
        await registry.update_run(active)
        assert await registry.cancel_requests([active.run_id]) == {}
        assert (await registry.wait_finished(active.run_id)) == active
        assert await registry.wait_finished("unknown") is None
        with pytest.raises(errors.InvalidTimeoutError):
            await registry.wait_finished(active.run_id, timeout=-1)
        with pytest.raises(errors.InvalidIntervalError):
            await registry.wait_finished(active.run_id, poll_interval=0)
        pending = pq.Run()
        await registry.add_run(pending)
        with pytest.raises(TimeoutError):
            await registry.wait_finished(pending.run_id, timeout=0.05)
        assert await registry.recover_orphans() == []  # its owner (this process) is alive


@pytest.mark.parametrize("version", [1, 2])
async def test_an_older_file_is_upgraded_and_keeps_its_runs(tmp_path: Path, version: int) -> None:
    """Schema 3 added the cancel request columns; a file written by an earlier release (schema 1:
    no application id; schema 2: the quarantine table), made here by that release's own
    migration steps, opens, keeps its runs and takes requests."""
    import sqlite3

    from prismq_subprocess._background import _sqlite_registry as sqlite_registry

    path = tmp_path / f"v{version}.db"
    raw = sqlite3.connect(path)
    with raw:
        for step in range(version):
            sqlite_registry._MIGRATIONS[step](raw)
        raw.execute(f"PRAGMA user_version = {version}")
        if version > 1:
            raw.execute(f"PRAGMA application_id = {sqlite_registry.APPLICATION_ID}")
        owner = pq.RunOwner.current()
        raw.execute(
            "INSERT INTO runs (run_id, module_id, module_name, parameters, status, created_at, "
            "started_at, mode, output_tail, owner_host, owner_pid, owner_started_at) "
            "VALUES ('old', 'm', 'Old', ?, 'running', 1, 2, 'async', ?, ?, ?, ?)",
            ('{"n": 1}', '["hi"]', owner.host, owner.pid, owner.started_at),
        )
    raw.close()
    # 4 added the cluster worker column, 5 the child's identity, 6 the owners' cookie variables
    assert sqlite_registry.SCHEMA_VERSION == 6
    async with pq.SQLiteRunRegistry(path) as registry:
        run = await registry.get_run("old")
        assert run is not None
        assert (run.status, run.parameters, run.output_tail) == (
            pq.RunStatus.RUNNING,
            {"n": 1},
            ["hi"],
        )
        assert await registry.request_cancel("old", "after the upgrade") is True
        assert await registry.cancel_requests({"old"}) == {"old": "after the upgrade"}
    raw = sqlite3.connect(path)
    try:
        assert raw.execute("PRAGMA user_version").fetchone()[0] == sqlite_registry.SCHEMA_VERSION
        plan = raw.execute(
            "EXPLAIN QUERY PLAN SELECT run_id FROM runs INDEXED BY runs_cancel_requested "
            "WHERE cancel_requested_at IS NOT NULL AND status IN ('pending', 'running')"
        ).fetchall()
        assert "runs_cancel_requested" in str(plan)
    finally:
        raw.close()


PICKER = textwrap.dedent(
    """
    import asyncio, sys
    import prismq_subprocess as pq

    async def main(db, run_id):
        async with pq.SQLiteRunRegistry(db) as reg, pq.BackgroundTaskManager(reg) as manager:
            run = await reg.get_run(run_id)

            async def job():
                await asyncio.sleep(30)

            await manager.start_task(run, job())
            print("picked", flush=True)
            await manager.wait_all(timeout=60)
            final = await reg.get_run(run_id)
            print("final", final.status.value, flush=True)

    asyncio.run(main(sys.argv[1], sys.argv[2]))
    """
)


def _start_picker(db: Path, run_id: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", PICKER, str(db), run_id], stdout=subprocess.PIPE, text=True
    )


@posix_only
async def test_cancelling_a_queued_run_another_process_picked_up_cancels_it_there(
    tmp_path: Path,
) -> None:
    # A probe's find: cancel_task() of a run queued here (PENDING, no slot yet) that another
    # process had picked up and was running answered CANCELLED, and this process's followers
    # got end=cancelled, while the registry kept it RUNNING and it later COMPLETED there. The
    # run is that process's now: the cancel goes to it through the registry.
    db = tmp_path / "runs.db"
    async with (
        pq.SQLiteRunRegistry(db) as registry,
        pq.BackgroundTaskManager(registry, max_concurrent=1) as manager,
    ):
        hold = asyncio.Event()
        first = await manager.start_task(pq.Run(module_id="first"), hold.wait())
        queued = await manager.start_task(pq.Run(module_id="queued"), asyncio.sleep(0))
        picker = _start_picker(db, queued)
        try:
            assert picker.stdout is not None
            line = await asyncio.wait_for(asyncio.to_thread(picker.stdout.readline), 60)
            assert line.strip() == "picked"
            result = await manager.cancel_task(queued, "cancel from here", timeout=30)
            stored = await registry.get_run(queued)
            assert stored is not None
            assert result is pq.CancelResult.CANCELLED, (result, stored.status)
            assert stored.status is pq.RunStatus.CANCELLED
            assert stored.error_message == "cancel from here"
            line = await asyncio.wait_for(asyncio.to_thread(picker.stdout.readline), 60)
            assert line.strip() == "final cancelled"
        finally:
            hold.set()
            picker.kill()
            picker.wait()
            if picker.stdout is not None:
                picker.stdout.close()
        await manager.wait_all()
        assert first


async def test_a_second_cancel_during_the_look_for_another_owner_still_records_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A review's find on the fix above: the look (a registry read) came before the recording's
    # try/finally, so a second cancellation arriving during it left the run unreleased: its
    # cancel_task() waited for good, and it stayed in the manager.
    async with (
        pq.SQLiteRunRegistry(tmp_path / "runs.db") as registry,
        pq.BackgroundTaskManager(registry, max_concurrent=1) as manager,
    ):
        hold, looking = asyncio.Event(), asyncio.Event()

        async def slow_look(run_id: str) -> bool:
            looking.set()
            await asyncio.Event().wait()  # cancelled by the second cancellation
            return False

        monkeypatch.setattr(manager, "_claimed_elsewhere", slow_look)
        await manager.start_task(pq.Run(module_id="first"), hold.wait())
        queued = await manager.start_task(pq.Run(module_id="queued"), asyncio.sleep(0))
        cancelling = asyncio.create_task(manager.cancel_task(queued, "stop"))
        await asyncio.wait_for(looking.wait(), 10)
        manager.tasks[queued].cancel()  # the second cancellation
        assert await asyncio.wait_for(cancelling, 10) in (
            pq.CancelResult.CANCELLED,
            pq.CancelResult.ALREADY_FINISHED,
        )
        assert queued not in manager.tasks
        stored = await registry.get_run(queued)
        assert stored is not None and stored.status is pq.RunStatus.CANCELLED
        hold.set()
