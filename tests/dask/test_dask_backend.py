"""ModuleRunner on a real Dask cluster (a scheduler and two worker processes under nannies, as
``dask scheduler`` / ``dask worker`` start them): the DaskBackend end to end.

One cluster is shared by the whole file (starting one takes seconds); each test connects its own
asynchronous client in its own event loop. The worker-killing tests run last: the nanny restarts
the killed worker, and every test waits for two workers before it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import anyio
import psutil
import pytest

distributed = pytest.importorskip(
    "distributed",
    reason="the [dask] extra is not installed (pip install 'prismq_subprocess[dask]')",
)

from dask_support import SubprocessCluster  # noqa: E402
from distributed.comm.addressing import get_address_host  # noqa: E402
from distributed.scheduler import KilledWorker  # noqa: E402

import prismq_subprocess as pq  # noqa: E402
from prismq_subprocess import (  # noqa: E402
    ModuleRunner,
    OutputCapture,
    OutputLine,
    Run,
    RunRegistry,
    RunStatus,
    SQLiteRunRegistry,
    sse_events,
)
from prismq_subprocess.abc import BaseRunRegistry, ModuleJob, RunContext  # noqa: E402
from prismq_subprocess.dask import DaskBackend  # noqa: E402
from prismq_subprocess.dask import _dask_backend as dask_backend_module  # noqa: E402
from prismq_subprocess.dask import _worker as dask_worker_module  # noqa: E402
from prismq_subprocess.dask._worker import WorkerOutcome  # noqa: E402

SLOTS = 4  # each worker offers {"slots": 4}
WAIT = 60.0  # upper bound for anything a test awaits (never reached unless broken)

LINES = textwrap.dedent(
    """
    import argparse, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--count", type=int, default=3)
    p.add_argument("--prefix", default="line")
    p.add_argument("--pause", type=float, default=0.0)
    p.add_argument("--code", type=int, default=0)
    a = p.parse_args()
    for i in range(a.count):
        print(f"{a.prefix} {i}", flush=True)
        if a.pause:
            time.sleep(a.pause)
    if a.code:
        print(f"giving up with {a.code}", file=sys.stderr, flush=True)
    sys.exit(a.code)
    """
)

# Records its start in --marker, optionally starts a grandchild, says "ready", then waits for
# the --gate file before printing --after more lines. Prints nothing while waiting, so a child
# orphaned by a dead worker does not end by itself on a broken pipe.
GATED = textwrap.dedent(
    """
    import argparse, os, subprocess, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--gate", required=True)
    p.add_argument("--marker")
    p.add_argument("--grandchild", action="store_true")
    p.add_argument("--after", type=int, default=0)
    a = p.parse_args()
    if a.marker:
        with open(a.marker, "a") as f:
            f.write(f"{os.getpid()}\\n")
    if a.grandchild:
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
        print(f"grandchild {g.pid}", flush=True)
    print("ready", flush=True)
    while not os.path.exists(a.gate):
        time.sleep(0.02)
    for i in range(a.after):
        print(f"after {i}", flush=True)
    """
)


# Ignores SIGTERM: only a kill stops it.
STUBBORN = (
    "import signal, time\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "print('ready', flush=True)\n"
    "time.sleep(300)\n"
)

# Prints until it dies (of a broken pipe, once nobody reads its output); its child prints nothing.
PRINTER = textwrap.dedent(
    """
    import subprocess, sys, time
    g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print(f"grandchild {g.pid}", flush=True)
    i = 0
    while True:
        print(f"tick {i}", flush=True)
        i += 1
        time.sleep(0.02)
    """
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SubprocessCluster]:
    started = SubprocessCluster(
        tmp_path_factory.mktemp("cluster"), n_workers=2, nthreads=6, resources=f"slots={SLOTS}"
    )
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
async def client(cluster: SubprocessCluster) -> AsyncIterator[Any]:
    async with distributed.Client(cluster.address, asynchronous=True, set_as_default=False) as c:
        await c.wait_for_workers(2, timeout=WAIT)
        yield c


@pytest.fixture
def scripts(tmp_path: Path) -> dict[str, str]:
    paths = {}
    for name, text in {"lines": LINES, "gated": GATED, "printer": PRINTER}.items():
        path = tmp_path / f"{name}.py"
        path.write_text(text)
        paths[name] = str(path)
    return paths


def runner_for(
    backend: DaskBackend | None, registry: BaseRunRegistry | None = None, **kwargs: Any
) -> ModuleRunner:
    return ModuleRunner(
        registry if registry is not None else RunRegistry(),
        output=OutputCapture(),
        backend=backend,
        grace_period=1.0,
        output_tail_lines=5,
        sample_interval=0.1,
        **kwargs,
    )


def out(runner: ModuleRunner) -> OutputCapture:
    assert runner.output is not None
    return runner.output


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def orphan_report(
    cluster: SubprocessCluster, caplog: pytest.LogCaptureFixture, pids: list[int]
) -> str:
    """What a failing orphan-stop test saw: the processes, the backend's log, the workers'."""
    lines = ["the orphaned tree was not stopped"]
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            with proc.oneshot():
                lines.append(
                    f"pid {pid}: {proc.status()} ppid {proc.ppid()} pgid {os.getpgid(pid)}"
                    f" started {proc.create_time()!r} {proc.cmdline()}"
                )
        except (psutil.Error, OSError) as exc:
            lines.append(f"pid {pid}: {exc!r}")
    lines.append("-- backend log --")
    lines += [f"{r.created:.3f} {r.levelname} {r.getMessage()}" for r in caplog.records]
    lines.append("-- workers' log (end) --")
    lines.append(cluster.log_tail())
    return "\n".join(lines)


async def tree_stopped(
    cluster: SubprocessCluster, caplog: pytest.LogCaptureFixture, pids: list[int]
) -> None:
    """Wait until none of ``pids`` runs; else fail with :func:`orphan_report` (and kill them)."""
    try:
        await until(lambda: not any(map(alive, pids)), "the orphaned tree was stopped")
    except TimeoutError:
        report = orphan_report(cluster, caplog, pids)
        for pid in pids:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()
        pytest.fail(report)


async def until(predicate: Any, what: str, timeout: float = WAIT) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110 - process state has no event to wait on
            await asyncio.sleep(0.02)
    assert predicate(), what


async def collect(capture: OutputCapture, run_id: str) -> list[str]:
    """Every item the run's subscription yields, gaps included (as '<gap n>')."""
    items = []
    async with capture.subscribe(run_id, wait=True) as lines:
        async for item in lines:
            items.append(item.text if isinstance(item, OutputLine) else f"<gap {item.dropped}>")
    return items


async def wait_for_line(capture: OutputCapture, run_id: str, prefix: str) -> str:
    async with asyncio.timeout(WAIT), capture.subscribe(run_id, wait=True) as lines:
        async for item in lines:
            if isinstance(item, OutputLine) and item.text.startswith(prefix):
                return item.text
    raise AssertionError(f"no line starting with {prefix!r}")


async def events_left(client: Any, token: str) -> list[str]:
    """The events of the backend with ``token`` that the scheduler still holds."""

    def names(token: str, dask_scheduler: Any = None) -> list[str]:
        # Runs in the scheduler's process (sent by value: it is local to this function).
        return sorted(name for name in dask_scheduler.extensions["events"]._events if token in name)

    return list(await client.run_on_scheduler(names, token))


async def no_events_left(client: Any, token: str, timeout: float = 10.0) -> list[str]:
    """:func:`events_left` once it is empty, or after ``timeout`` s: a worker's last long
    poll (0.5 s) on an event it waits for keeps that event on the scheduler meanwhile, unset;
    an event left set stays for good."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := await events_left(client, token)) and loop.time() < deadline:  # noqa: ASYNC110 - the scheduler's state has no event to wait on
        await asyncio.sleep(0.1)
    return left


async def worker_pids(client: Any) -> dict[str, int]:
    return dict(await client.run(os.getpid))


async def stored(runner: ModuleRunner, run_id: str) -> Run:
    run = await runner.registry.get_run(run_id)
    assert run is not None
    return run


async def start_gated_tree(
    runner: ModuleRunner, scripts: dict[str, str], tmp_path: Path, module_id: str
) -> tuple[str, int, int]:
    """A gated module with a grandchild, running: ``(run_id, its pid, the grandchild's pid)``."""
    run_id = await runner.start_module(
        module_id,
        "gated",
        scripts["gated"],
        {"gate": str(tmp_path / "never"), "grandchild": True},
    )
    grandchild = int((await wait_for_line(out(runner), run_id, "grandchild")).split()[1])
    pid = (await stored(runner, run_id)).pid
    assert pid is not None and alive(pid)
    return run_id, pid, grandchild


async def finished(runner: ModuleRunner, run_id: str) -> Run:
    async with asyncio.timeout(WAIT):
        while True:
            run = await stored(runner, run_id)
            if run.is_finished and run_id not in runner.active_run_ids():
                return run
            await asyncio.sleep(0.02)


# -- streaming, spread, admission ----------------------------------------------------------------


async def test_twenty_modules_spread_over_both_workers_stream_whole_and_in_order(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    registry = SQLiteRunRegistry(tmp_path / "runs.db")
    runner = runner_for(DaskBackend(client), registry)
    async with registry, runner:
        run_ids = [f"spread-{i}" for i in range(20)]
        # Subscribed before the start, so every line must arrive live, none from a replay.
        readers = [asyncio.create_task(collect(out(runner), r)) for r in run_ids]
        for i, run_id in enumerate(run_ids):
            await runner.start_module(
                f"m{i}",
                "lines",
                scripts["lines"],
                {"count": 40, "prefix": f"m{i}", "pause": 0.005},
                run_id=run_id,
            )
        outputs = await asyncio.wait_for(asyncio.gather(*readers), WAIT)
        runs = [await finished(runner, r) for r in run_ids]
    for i, (run, lines) in enumerate(zip(runs, outputs, strict=True)):
        assert lines == [f"m{i} {n}" for n in range(40)], run.run_id
        assert run.status is RunStatus.COMPLETED and run.exit_code == 0
        assert run.output_tail == [f"m{i} {n}" for n in range(35, 40)]
        assert run.mode == "dask" and run.pid is not None and run.started_at is not None
    workers = {run.worker for run in runs}
    assert workers == set(await worker_pids(client)), "both workers ran modules"
    async with SQLiteRunRegistry(tmp_path / "runs.db") as reopened:
        listed = await reopened.list_runs(limit=100)
    assert {r.run_id: r for r in listed} == {r.run_id: r for r in runs}


async def test_output_is_live_and_status_goes_pending_running_final(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    runner = runner_for(DaskBackend(client))
    async with runner:
        run_id = await runner.start_module(
            "g", "gated", scripts["gated"], {"gate": str(gate), "after": 3}
        )
        assert (await stored(runner, run_id)).status is RunStatus.PENDING
        reader = asyncio.create_task(collect(out(runner), run_id))
        # "ready" reaches the host while the module waits for the gate: output is live.
        await wait_for_line(out(runner), run_id, "ready")
        running = await stored(runner, run_id)
        assert running.status is RunStatus.RUNNING
        assert running.worker in await worker_pids(client)
        assert running.pid is not None
        gate.touch()
        run = await finished(runner, run_id)
        assert await asyncio.wait_for(reader, WAIT) == ["ready", "after 0", "after 1", "after 2"]
    assert run.status is RunStatus.COMPLETED
    assert run.worker == running.worker and run.pid == running.pid


class SlowToRecordRunning(RunRegistry):
    """A registry whose write of a RUNNING run takes a while (a busy SQLite file)."""

    async def update_run(self, run: Run) -> None:
        if run.status is RunStatus.RUNNING:
            await asyncio.sleep(0.5)
        await super().update_run(run)


async def test_no_output_shows_before_the_run_is_recorded_running(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    # The worker's start and its first lines travel separately; the host delivered the lines
    # at once but recorded RUNNING in its own time, so a viewer saw output of a PENDING run
    # (CI, once, under load; every time with a registry slow to write).
    gate = tmp_path / "gate"
    runner = runner_for(DaskBackend(client), SlowToRecordRunning())
    async with runner:
        run_id = await runner.start_module(
            "g", "gated", scripts["gated"], {"gate": str(gate), "after": 1}
        )
        await wait_for_line(out(runner), run_id, "ready")
        assert (await stored(runner, run_id)).status is RunStatus.RUNNING
        gate.touch()
        run = await finished(runner, run_id)
    assert run.status is RunStatus.COMPLETED


def sse_payloads(text: str) -> list[tuple[str, dict[str, Any]]]:
    """(event, JSON data) of each event in an SSE stream (retry and comments skipped)."""
    events = []
    for block in text.split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in fields:
            events.append((fields.get("event", "message"), json.loads(fields["data"])))
    return events


async def test_the_sse_helper_streams_a_cluster_run_and_resumes_from_last_event_id(
    client: Any, scripts: dict[str, str]
) -> None:
    runner = runner_for(DaskBackend(client))
    async with runner:
        run_id = await runner.start_module("s", "lines", scripts["lines"], {"count": 4, "code": 2})
        live = "".join([chunk async for chunk in sse_events(out(runner), run_id, heartbeat=None)])
        resumed = "".join(
            [chunk async for chunk in sse_events(out(runner), run_id, last_event_id="2")]
        )
    texts = [f"line {n}" for n in range(4)] + ["giving up with 2"]
    assert sse_payloads(live) == [
        *(("line", {"seq": n, "text": text}) for n, text in enumerate(texts)),
        ("end", {"status": "failed", "exit_code": 2}),
    ]
    assert sse_payloads(resumed) == [
        ("line", {"seq": 3, "text": "line 3"}),
        ("line", {"seq": 4, "text": "giving up with 2"}),
        ("end", {"status": "failed", "exit_code": 2}),
    ]


async def test_resource_hints_never_oversubscribe_a_worker(
    client: Any, scripts: dict[str, str]
) -> None:
    # Each run needs 3 of a worker's 4 slots: a worker runs one at a time, whatever the host
    # submits at once.
    script = textwrap.dedent(
        """
        import time
        print(f"start {time.time()!r}", flush=True)
        time.sleep(0.3)
        print(f"end {time.time()!r}", flush=True)
        """
    )
    path = Path(scripts["lines"]).with_name("timed.py")
    path.write_text(script)
    runner = runner_for(DaskBackend(client))
    async with runner:
        run_ids = [
            await runner.start_module(f"t{i}", "timed", path, resources={"slots": 3})
            for i in range(6)
        ]
        runs = [await finished(runner, r) for r in run_ids]
    spans: dict[str, list[tuple[float, float]]] = {}
    for run in runs:
        assert run.status is RunStatus.COMPLETED, run.error_message
        start, end = (float(line.split()[1]) for line in run.output_tail)
        spans.setdefault(str(run.worker), []).append((start, end))
    for worker, intervals in spans.items():
        intervals.sort()
        for (_, end), (start, _) in itertools.pairwise(intervals):
            assert start >= end, f"two runs overlapped on {worker}"


async def test_lines_dropped_on_the_worker_show_as_one_note_and_the_tail_stays_whole(
    client: Any, scripts: dict[str, str]
) -> None:
    # The worker may buffer 10 lines and send one batch per 5 s: a module printing 1,000 lines
    # at once loses most of them on the way, which the host's subscribers see as one note.
    runner = runner_for(DaskBackend(client, stream_queue_lines=10, flush_interval=5.0))
    async with runner:
        run_id = await runner.start_module("f", "lines", scripts["lines"], {"count": 1000})
        reader = asyncio.create_task(collect(out(runner), run_id))
        run = await finished(runner, run_id)
        lines = await asyncio.wait_for(reader, WAIT)
    assert run.status is RunStatus.COMPLETED
    assert run.output_tail == [f"line {n}" for n in range(995, 1000)]
    note = "lines dropped on the way from the worker]"
    notes = [i for i, text in enumerate(lines) if text.endswith(note)]
    assert len(notes) == 1
    dropped = int(lines[notes[0]].split("[")[1].split()[0])
    kept = lines[: notes[0]] + lines[notes[0] + 1 :]
    assert len(kept) + dropped == 1000
    assert kept == sorted(kept, key=lambda text: int(text.split()[1]))  # in order
    assert kept[-10:] == [f"line {n}" for n in range(990, 1000)]  # the ring's last ten


# -- same results as the local backend ---------------------------------------------------------


@pytest.mark.parametrize("max_line_bytes", [64 * 1024, 1024 * 1024], ids=["64KiB", "1MiB"])
async def test_a_line_longer_than_64_kib_reaches_the_host_whole_as_from_a_local_run(
    client: Any, tmp_path: Path, max_line_bytes: int
) -> None:
    # The worker cut it to its own capture's default bound (64 KiB) before sending it: the
    # host's log file got the cut line, a larger host bound still got it cut, and the host's
    # note counted the bytes cut from the cut line (39), not from the line (234,464). (Longer
    # than a batch of messages, 256 Ki characters: it travels in pieces.)
    script = tmp_path / "long.py"
    script.write_text("import sys\nsys.stdout.write('x' * 300_000 + '\\n')\nprint('after')\n")
    seen: dict[str, tuple[list[str], list[str]]] = {}
    for name, backend in (("local", None), ("dask", DaskBackend(client))):
        capture = OutputCapture(max_line_bytes=max_line_bytes, log_dir=tmp_path / name)
        async with capture, ModuleRunner(RunRegistry(), output=capture, backend=backend) as runner:
            run = await runner.execute_module("l", "long", script)
            assert run.status is RunStatus.COMPLETED, run.error_message
            lines = capture.get_lines(run.run_id)
            log = capture.log_path(run.run_id)
        assert log is not None
        seen[name] = (lines, log.read_text().splitlines())
    assert seen["dask"] == seen["local"]
    lines, logged = seen["dask"]
    assert logged == ["x" * 300_000, "after"]
    if max_line_bytes > 300_000:
        assert lines == ["x" * 300_000, "after"]
    else:
        assert lines[0].endswith("[line truncated: 234464 more bytes]")


def assert_cluster_outcomes(remote: dict[str, Run]) -> None:
    """What the module and command cases shared by both cluster test files must give on the
    cluster (this file's and ``test_dask_local_cluster.py``'s identical-results tests)."""
    assert remote["ok"].status is RunStatus.COMPLETED
    assert remote["fails"].status is RunStatus.FAILED and remote["fails"].exit_code == 3
    assert remote["timeout"].error_message == "timed out after 1 s; process tree stopped"
    assert remote["memory"].status is RunStatus.FAILED
    assert remote["argv"].exit_code == 4 and remote["argv"].output_tail == ["from argv"]
    assert remote["shell"].status is RunStatus.COMPLETED
    assert remote["shell"].output_tail == ["one", "two"]


async def test_results_identical_to_the_local_backend(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    hog = tmp_path / "hog.py"
    hog.write_text(
        # Its one line comes before it grows past the cap: the sampler may stop it at any time
        # after that (mid-allocation too), and both backends must show the same output.
        "import time\nprint('allocating', flush=True)\nb = bytearray(256 * 1024 * 1024)\n"
        "b[::4096] = b'x' * len(b[::4096])\ntime.sleep(60)\n"
    )
    env_echo = tmp_path / "env_echo.py"
    env_echo.write_text(
        "import os, sys\nprint(os.environ['PRISMQ_TEST_VALUE'], os.getcwd(), sys.argv[1:])\n"
    )
    cases: list[tuple[str, dict[str, Any]]] = [
        ("ok", {"script_path": scripts["lines"], "parameters": {"count": 3}}),
        ("many", {"script_path": scripts["lines"], "parameters": {"count": 500}}),
        ("fails", {"script_path": scripts["lines"], "parameters": {"count": 2, "code": 3}}),
        (
            "timeout",
            {"script_path": scripts["gated"], "parameters": {"gate": "/nonexistent"}, "timeout": 1},
        ),
        ("memory", {"script_path": hog, "memory_limit_bytes": 64 * 1024 * 1024}),
        (
            "env-cwd-args",
            {
                "script_path": env_echo,
                "parameters": {"tags": ["a", "b"], "flag": True, "n": 2},
                "args": ["raw", "--x=1"],
                "env": {"PRISMQ_TEST_VALUE": "v1"},
                "cwd": tmp_path,
            },
        ),
    ]

    commands: list[tuple[str, dict[str, Any]]] = [
        ("argv", {"command": [sys.executable, "-c", "print('from argv'); raise SystemExit(4)"]}),
        ("shell", {"command": "echo one; echo two >&2", "shell": True}),
    ]

    async def outcomes(backend: DaskBackend | None) -> dict[str, Run]:
        async with runner_for(backend) as runner:
            runs = await asyncio.gather(
                *(runner.execute_module(name, name, **kw) for name, kw in cases),
                *(runner.execute_command(name, name, **kw) for name, kw in commands),
            )
        return {run.module_id: run for run in runs}

    local = await outcomes(None)
    remote = await outcomes(DaskBackend(client))
    for name, _ in cases + commands:
        a, b = local[name], remote[name]
        assert (a.status, a.exit_code) == (b.status, b.exit_code), name
        assert a.output_tail == b.output_tail, name
        if name == "memory":
            # The message quotes the RSS measured at the time, which differs run to run.
            assert a.error_message and b.error_message
            assert a.error_message.split(":")[0] == b.error_message.split(":")[0]
        else:
            assert a.error_message == b.error_message, name
        assert a.mode != "dask" and b.mode == "dask" and a.worker is None and b.worker
    assert_cluster_outcomes(remote)
    assert remote["env-cwd-args"].output_tail == [
        f"v1 {tmp_path} ['--tags', 'a', '--tags', 'b', '--flag', '--n', '2', 'raw', '--x=1']"
    ]


# -- cancellation ------------------------------------------------------------------------------


async def test_cancel_running_stops_the_whole_tree_on_the_worker(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    runner = runner_for(DaskBackend(client))
    async with runner:
        run_id = await runner.start_module(
            "c", "gated", scripts["gated"], {"gate": str(tmp_path / "never"), "grandchild": True}
        )
        grandchild = int((await wait_for_line(out(runner), run_id, "grandchild")).split()[1])
        # The module prints "ready" right after, but on a loaded machine it may not have yet: a
        # cancel before then ends a tail without it (CI, once).
        await wait_for_line(out(runner), run_id, "ready")
        running = await stored(runner, run_id)
        assert running.status is RunStatus.RUNNING and running.pid is not None
        worker_pid = (await worker_pids(client))[str(running.worker)]
        tree = {p.pid for p in psutil.Process(worker_pid).children(recursive=True)}
        assert {running.pid, grandchild} <= tree, "the module's tree runs under its worker"

        assert await runner.cancel(run_id, "stop it")
        run = await stored(runner, run_id)
    assert run.status is RunStatus.CANCELLED and run.error_message == "stop it"
    assert run.output_tail[-1] == "ready"
    assert run.exit_code is not None and run.exit_code < 0
    left = {p.pid for p in psutil.Process(worker_pid).children(recursive=True) if alive(p.pid)}
    assert running.pid not in left and grandchild not in left
    assert not alive(running.pid) and not alive(grandchild)


async def test_host_shutdown_kills_a_cluster_run_once_the_hosts_grace_is_over(
    client: Any, tmp_path: Path
) -> None:
    # The module ignores SIGTERM and the runner's grace is long: only the host shutdown's
    # kill, after its own shorter grace, stops it within the promised grace + 2 s.
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    runner = ModuleRunner(
        RunRegistry(), output=OutputCapture(), backend=DaskBackend(client), grace_period=30.0
    )
    async with runner:
        run_id = await runner.start_module("t", "stubborn", script)
        await wait_for_line(out(runner), run_id, "ready")
        pid = (await stored(runner, run_id)).pid
        assert pid is not None and alive(pid)
        await pq.stop_for_host_shutdown("host received SIGTERM", grace=0.2)
        run = await stored(runner, run_id)
        assert run.status is RunStatus.CANCELLED, run
        assert run.error_message == "host received SIGTERM"
        assert not alive(pid)


async def occupy_both_workers(runner: ModuleRunner, gated: str, gate: Path) -> list[str]:
    """Start two runs that take every slot of both workers until ``gate`` exists."""
    blockers = [
        await runner.start_module(
            f"b{i}", "gated", gated, {"gate": str(gate)}, resources={"slots": SLOTS}
        )
        for i in range(2)
    ]
    for run_id in blockers:
        await wait_for_line(out(runner), run_id, "ready")
    return blockers


async def test_cancel_while_queued_on_the_cluster_never_starts_it(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    marker = tmp_path / "queued-started"
    backend = DaskBackend(client)
    runner = runner_for(backend)
    async with runner:
        # Two runs that take every slot of both workers, then one that must queue.
        blockers = await occupy_both_workers(runner, scripts["gated"], gate)
        queued = await runner.start_module(
            "q",
            "gated",
            scripts["gated"],
            {"gate": str(gate), "marker": str(marker)},
            resources={"slots": SLOTS},
        )
        assert (await stored(runner, queued)).status is RunStatus.PENDING
        await until(lambda: queued in backend._remotes, "the run reached the backend")
        cancel_name = backend._remotes[queued].cancel_event
        assert await runner.cancel(queued, "not needed")
        run = await stored(runner, queued)
        assert run.status is RunStatus.CANCELLED
        assert run.error_message is not None and run.error_message.startswith("not needed")
        assert run.started_at is None and run.pid is None and run.worker is None
        # The worker the scheduler had placed the task on learns of the cancel a moment later:
        # if slots free up meanwhile it starts the task, which must still find the run's cancel
        # event set, after the host recorded the run and did its housekeeping.
        await until(lambda: not backend._chores, "the backend's housekeeping ended")
        cancel_event = distributed.Event(cancel_name, client=client)
        assert await cancel_event.is_set(), "a late start of the cancelled task runs nothing"
        gate.touch()
        for run_id in blockers:
            assert (await finished(runner, run_id)).status is RunStatus.COMPLETED
        # Both workers are free again: had the cancelled task stayed on the cluster, it would
        # run now. A fresh run on each worker goes first in line after it.
        after = [
            await runner.start_module(
                f"a{i}", "lines", scripts["lines"], resources={"slots": SLOTS}
            )
            for i in range(2)
        ]
        for run_id in after:
            assert (await finished(runner, run_id)).status is RunStatus.COMPLETED
    assert not marker.exists(), "the cancelled run never started"
    assert not await cancel_event.is_set(), "closing the backend releases the event"


@pytest.mark.parametrize("background", [True, False], ids=["start_command", "execute_command"])
async def test_a_run_claimed_elsewhere_while_queued_on_the_cluster_is_stopped_when_it_starts(
    client: Any,
    scripts: dict[str, str],
    tmp_path: Path,
    background: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Another process picked the run up (a deliberate pick-up, ``claim_run``) while its job
    waited in the cluster's queue. When a worker then started it, the host's RUNNING record
    was refused and the command ran on all the same (one run id, two jobs; it never ended
    here). Now the host stops it at once, records nothing more, and none of its lines reach
    the run's output or log file (a log directory shared with the claimer: review)."""
    gate = tmp_path / "gate"
    logs = tmp_path / "logs"
    elsewhere = pq.RunOwner("another-host", 4242, 1_700_000_000.5)
    path = tmp_path / "runs.db"
    command = "echo line-of-the-duplicate-job; sleep 60"
    caplog.set_level(logging.WARNING)
    async with SQLiteRunRegistry(path) as registry, SQLiteRunRegistry(path) as other:
        runner = ModuleRunner(
            registry,
            output=OutputCapture(log_dir=logs),
            backend=DaskBackend(client),
            grace_period=1.0,
            sample_interval=0.1,
        )
        async with runner:
            blockers = await occupy_both_workers(runner, scripts["gated"], gate)
            options: dict[str, Any] = {"shell": True, "resources": {"slots": SLOTS}}
            if background:
                queued = await runner.start_command("q", "chatty", command, **options)
                execution: asyncio.Future[Any] | None = None
            else:
                queued = "q1"
                execution = asyncio.ensure_future(
                    runner.execute_command("q", "chatty", command, run_id=queued, **options)
                )
            async with asyncio.timeout(WAIT):
                while (copy := await other.get_run(queued)) is None:  # noqa: ASYNC110
                    await asyncio.sleep(0.02)  # (a foreground run is stored by its task)
            assert copy.status is RunStatus.PENDING
            read_owner, copy.owner = copy.owner, elsewhere
            assert await other.claim_run(copy, read_owner)
            gate.touch()
            for run_id in blockers:
                assert (await finished(runner, run_id)).status is RunStatus.COMPLETED
            # (It ran for good before: the command sleeps a minute.)
            await until(lambda: queued not in runner.active_run_ids(), "the run to end here")
            if execution is not None:
                with pytest.raises(pq.exceptions.RunClaimedError, match="claimed"):
                    await execution
            assert out(runner).get_lines(queued) == []
        after = await other.get_run(queued)
        assert after is not None
        assert (after.status, after.owner, after.pid) == (RunStatus.PENDING, elsewhere, None)
    log = next(logs.rglob(f"*{queued}*"), None)
    assert log is None or "duplicate" not in log.read_text()
    told = [r for r in caplog.records if queued in r.getMessage()]
    assert len(told) == (1 if background else 0), [r.getMessage() for r in told]


async def test_script_missing_on_the_worker_fails_the_run_with_the_reason(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    doomed = tmp_path / "doomed.py"
    doomed.write_text("print('hi')\n")
    runner = runner_for(DaskBackend(client))
    async with runner:
        await occupy_both_workers(runner, scripts["gated"], gate)
        # Valid on the host when started; gone by the time a worker picks it up.
        run_id = await runner.start_module("d", "doomed", doomed, resources={"slots": SLOTS})
        doomed.unlink()
        gate.touch()
        run = await finished(runner, run_id)
    assert run.status is RunStatus.FAILED
    assert run.error_message is not None
    assert run.error_message.startswith("could not start the module on tcp://")
    assert "ScriptNotFoundError" in run.error_message and run.pid is None


async def test_a_run_that_ended_leaves_no_cancel_wait_pending_on_the_scheduler(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    # The worker's cancel watch long-polls the run's cancel event (after a cancel, its kill
    # event) on the scheduler. A poll still pending once the run ended made a scheduler closed
    # right after it log an ERROR traceback (CancelledError in distributed.event): the
    # LocalCluster example of docs/DISTRIBUTED.md did, on a normal, successful run.
    def pending_waits(token: str, dask_scheduler: Any = None) -> dict[str, Any]:
        # Runs in the scheduler's process (sent by value: it is local to this test). The
        # backend's cancel and kill events: what the workers' cancel watches wait on.
        events = dask_scheduler.extensions["events"]
        prefixes = (f"prismq-cancel-{token}-", f"prismq-kill-{token}-")
        waits = {
            name: count
            for name, count in events._waiter_count.items()
            if count and name.startswith(prefixes)
        }
        return {"waits": waits, "left": [n for n in events._events if n.startswith(prefixes)]}

    backend = DaskBackend(client)
    runner = runner_for(backend)

    async with runner:
        # Several runs, each ending at a different moment of its watch's poll.
        for i in range(5):
            run = await runner.execute_module(
                f"e{i}", "lines", scripts["lines"], {"count": 2, "pause": 0.2 + 0.07 * i}
            )
            assert run.status is RunStatus.COMPLETED
            state = await client.run_on_scheduler(pending_waits, backend._token)
            assert state == {"waits": {}, "left": []}, f"run {i} ended: {state}"
        # A cancelled run's watch waits on its kill event once it cancelled the module.
        run_id, pid, grandchild = await start_gated_tree(runner, scripts, tmp_path, "w")
        assert await runner.cancel(run_id, "stop it")
        assert (await stored(runner, run_id)).status is RunStatus.CANCELLED
        state = await client.run_on_scheduler(pending_waits, backend._token)
        assert state["waits"] == {}, f"the cancelled run ended: {state}"
    assert not alive(pid) and not alive(grandchild)


async def test_a_run_id_used_again_right_after_its_run_ended_runs_the_module_again(
    client: Any, scripts: dict[str, str]
) -> None:
    # The first run's record is gone (retention, another registry): its id is free again. The
    # second task had the first one's key, which the scheduler still held until the backend's
    # housekeeping released it: Dask handed back the first run's result, nothing ran.
    async with runner_for(DaskBackend(client)) as runner:
        first = await runner.execute_module(
            "e", "lines", scripts["lines"], {"count": 1, "prefix": "first"}, run_id="again"
        )
        await runner.registry.delete_older_than(timedelta(0))
        second = await runner.execute_module(
            "e", "lines", scripts["lines"], {"count": 1, "prefix": "second"}, run_id="again"
        )
    assert first.status is RunStatus.COMPLETED and first.output_tail == ["first 0"]
    assert second.status is RunStatus.COMPLETED, second.error_message
    assert second.output_tail == ["second 0"]


async def test_a_run_id_used_again_after_its_run_was_withdrawn_while_queued_runs_the_module(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    # The withdrawn run's cancel event stays set until the backend closes (a late start of its
    # task must run nothing): the next run with that id found it set and ended CANCELLED.
    gate = tmp_path / "gate"
    async with runner_for(DaskBackend(client)) as runner:
        blockers = await occupy_both_workers(runner, scripts["gated"], gate)
        await runner.start_module(
            "q",
            "lines",
            scripts["lines"],
            {"count": 1, "prefix": "withdrawn"},
            run_id="again",
            resources={"slots": SLOTS},
        )
        assert await runner.cancel("again", "not needed")
        assert (await finished(runner, "again")).status is RunStatus.CANCELLED
        gate.touch()
        for run_id in blockers:
            assert (await finished(runner, run_id)).status is RunStatus.COMPLETED
        await runner.registry.delete_older_than(timedelta(0))
        run = await runner.execute_module(
            "q", "lines", scripts["lines"], {"count": 1, "prefix": "second"}, run_id="again"
        )
    assert run.status is RunStatus.COMPLETED, run.error_message
    assert run.output_tail == ["second 0"]


async def test_foreground_run_cancelled_by_its_caller_is_recorded_then_reraised(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    runner = runner_for(DaskBackend(client))
    async with runner:
        task = asyncio.create_task(
            runner.execute_module(
                "f", "gated", scripts["gated"], {"gate": str(tmp_path / "never")}, run_id="fg"
            )
        )
        await wait_for_line(out(runner), "fg", "ready")
        pid = (await stored(runner, "fg")).pid
        assert pid is not None
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        run = await stored(runner, "fg")
    assert run.status is RunStatus.CANCELLED and run.output_tail == ["ready"]
    assert not alive(pid)


async def test_a_host_that_goes_away_leaves_nothing_running_on_the_workers(
    cluster: SubprocessCluster, scripts: dict[str, str], tmp_path: Path
) -> None:
    # The host's client disconnects (its process died, say): the scheduler drops its tasks and
    # each worker stops the module its task started.
    host = await distributed.Client(cluster.address, asynchronous=True, set_as_default=False)
    runner = runner_for(DaskBackend(host))
    run_id, pid, grandchild = await start_gated_tree(runner, scripts, tmp_path, "h")
    await host.close()
    await until(lambda: not alive(pid) and not alive(grandchild), "the module was stopped")
    await runner.aclose()
    run = await stored(runner, run_id)
    assert run.status is RunStatus.FAILED and run.error_message is not None
    assert run.error_message.startswith("the connection to the Dask cluster ended")


async def test_a_lost_scheduler_leaves_nothing_running_on_the_workers(
    scripts: dict[str, str], tmp_path: Path
) -> None:
    # A cluster of its own: its scheduler dies for good.
    small = await asyncio.to_thread(SubprocessCluster, tmp_path / "small", n_workers=1, nthreads=2)
    try:
        host = await distributed.Client(small.address, asynchronous=True, set_as_default=False)
        await host.wait_for_workers(1, timeout=WAIT)
        runner = runner_for(DaskBackend(host, orphan_timeout=1.0))
        run_id, pid, grandchild = await start_gated_tree(runner, scripts, tmp_path, "s")
        await asyncio.to_thread(small.kill_scheduler)
        run = await finished(runner, run_id)
        assert run.status is RunStatus.FAILED and run.error_message is not None
        assert run.error_message.startswith("the connection to the Dask cluster ended")
        await until(lambda: not alive(pid) and not alive(grandchild), "the module was stopped")
        await runner.aclose()
        await host.close(timeout=2)
    finally:
        await asyncio.to_thread(small.close)


async def test_a_worker_that_closes_stops_the_modules_it_runs(
    scripts: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A cluster of its own with one worker, so no other worker of this machine can stop an
    # orphan for the host. `dask worker` closes its worker on SIGTERM (a cluster shut down).
    # The host, seeing the worker gone, looks for another one to stop the tree: not for 30 s.
    monkeypatch.setattr(dask_backend_module, "_REAP_SECONDS", 1.0)
    small = await asyncio.to_thread(SubprocessCluster, tmp_path / "small", n_workers=1, nthreads=2)
    try:
        host = await distributed.Client(small.address, asynchronous=True, set_as_default=False)
        await host.wait_for_workers(1, timeout=WAIT)
        runner = runner_for(DaskBackend(host))
        run_id, pid, grandchild = await start_gated_tree(runner, scripts, tmp_path, "w")
        assert small.workers is not None
        small.workers.terminate()  # the reaper passes it on to `dask worker`
        await until(
            lambda: not alive(pid) and not alive(grandchild), "the module was stopped", 10.0
        )
        run = await finished(runner, run_id)
        assert run.status in (RunStatus.INTERRUPTED, RunStatus.CANCELLED), run
        await runner.aclose()
        await host.close(timeout=2)
    finally:
        await asyncio.to_thread(small.close)


def load_example_app() -> Any:
    """examples/fastapi_app/app.py, imported from its file (the repository root is not a
    package on sys.path)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "examples" / "fastapi_app" / "app.py"
    spec = importlib.util.spec_from_file_location("prismq_example_app", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


async def test_the_example_app_moves_to_the_cluster_by_configuration_only(
    client: Any, cluster: SubprocessCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("fastapi", reason="the [web] extra is not installed")
    import httpx

    monkeypatch.setenv("PRISMQ_DASK_SCHEDULER", cluster.address)
    app = load_example_app().create_app(tmp_path)
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://app") as http,
    ):
        started = await http.post("/api/modules/count/runs", json={"lines": 3, "delay": 0})
        assert started.status_code == 201, started.text
        run_id = started.json()["run_id"]
        stream = (await http.get(f"/api/runs/{run_id}/events")).text  # ends with the run
        # The output is closed just before the final status is recorded.
        async with asyncio.timeout(WAIT):
            while True:  # polling the app is what a client does
                run = (await http.get(f"/api/runs/{run_id}")).json()
                if run["status"] != "running":
                    break
                await asyncio.sleep(0.02)
    assert sse_payloads(stream) == [
        *(("line", {"seq": n, "text": f"line {n + 1} of 3"}) for n in range(3)),
        ("end", {"status": "completed", "exit_code": 0}),
    ]
    assert run["status"] == "completed" and run["mode"] == "dask"
    assert run["worker"] in await worker_pids(client)


# -- bad input -----------------------------------------------------------------------------------


async def test_bad_configuration_raises_before_anything_starts(
    cluster: SubprocessCluster, scripts: dict[str, str]
) -> None:
    with pytest.raises(pq.exceptions.InvalidBackendError):
        DaskBackend("  ")
    with pytest.raises(pq.exceptions.InvalidBackendError):
        DaskBackend(42)
    with pytest.raises(pq.exceptions.InvalidLimitError):
        DaskBackend("tcp://127.0.0.1:1", resources={"slots": 0})
    with pytest.raises(pq.exceptions.InvalidIntervalError):
        DaskBackend("tcp://127.0.0.1:1", worker_check_interval=0)
    sync_client = await asyncio.to_thread(distributed.Client, cluster.address, set_as_default=False)
    try:
        with pytest.raises(pq.exceptions.InvalidBackendError, match="asynchronous"):
            DaskBackend(sync_client)
    finally:
        await asyncio.to_thread(sync_client.close)
    closed = DaskBackend(cluster.address)
    async with closed:
        pass
    await closed.aclose()  # idempotent
    registry = RunRegistry()
    context = RunContext(
        None, registry.update_run, registry.update_run, lambda: None, False, 1.0, 0.5, 5
    )
    with pytest.raises(pq.exceptions.BackendClosedError):
        await closed.execute(Run(), ModuleJob("x", "x", scripts["lines"]), context)
    runner = runner_for(DaskBackend("tcp://127.0.0.1:1"))
    async with runner:
        for hints in ({"slots": -1}, {"": 1}, ["slots"]):
            with pytest.raises(pq.exceptions.InvalidLimitError):
                await runner.start_module("x", "x", scripts["lines"], resources=hints)
        assert await runner.registry.count_runs() == 0


@pytest.mark.parametrize("value", ["no", "false", 0, 1, None])
def test_retry_on_worker_loss_must_be_a_bool(value: object) -> None:
    # bool("no") is True: a module with side effects would have been run a second time.
    with pytest.raises(pq.exceptions.InvalidArgumentTypeError, match="retry_on_worker_loss"):
        DaskBackend("tcp://127.0.0.1:1", retry_on_worker_loss=value)  # type: ignore[arg-type]


async def test_unreachable_scheduler_fails_the_run_with_the_reason(
    scripts: dict[str, str],
) -> None:
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "0.5s"}):
        async with runner_for(DaskBackend("tcp://127.0.0.1:9")) as runner:
            run = await runner.execute_module("u", "unreachable", scripts["lines"])
    assert run.status is RunStatus.FAILED
    assert run.error_message is not None
    assert run.error_message.startswith("could not reach the Dask cluster")


async def test_after_a_scheduler_outage_runs_fail_with_the_reason_then_reconnect(
    scripts: dict[str, str],
) -> None:
    # A scheduler in this process and no workers: every run stays queued, which is enough to
    # see the backend connect. The client gives up on a lost scheduler after the connect
    # timeout and closes itself; the backend made it, so it must make a new one.
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "0.5s"}):
        scheduler = await distributed.Scheduler(
            host="127.0.0.1", port=0, dashboard_address="127.0.0.1:0"
        )
        port = scheduler.port
        backend = DaskBackend(scheduler.address)
        try:
            async with runner_for(backend) as runner:
                first = await runner.start_module("o", "lines", scripts["lines"])
                await until(lambda: backend.client is not None, "the backend connected")
                await scheduler.close()
                assert (await finished(runner, first)).status is RunStatus.FAILED
                await until(lambda: backend.client.status == "closed", "the client gave up")
                queued = await runner.start_module("b", "lines", scripts["lines"])
                background = await finished(runner, queued)
                async with asyncio.timeout(WAIT):
                    foreground = await runner.execute_module("f", "lines", scripts["lines"])
                for run in (background, foreground):
                    assert run.status is RunStatus.FAILED, run
                    assert run.error_message is not None
                    assert run.error_message.startswith("could not reach the Dask cluster")
                scheduler = await distributed.Scheduler(
                    host="127.0.0.1", port=port, dashboard_address="127.0.0.1:0"
                )
                again = await runner.start_module("a", "lines", scripts["lines"])
                await until(
                    lambda: backend.client is not None and backend.client.status == "running",
                    "the backend connected again",
                )
                assert (await stored(runner, again)).status is RunStatus.PENDING
                assert await runner.cancel(again, "done")
                assert (await stored(runner, again)).status is RunStatus.CANCELLED
        finally:
            await scheduler.close()


# -- workers dying mid-run (last: they restart a worker) -------------------------------------


@pytest.mark.parametrize("allowed_failures", [3, 0], ids=["dask-would-retry", "killed-worker"])
async def test_worker_killed_mid_run_interrupts_the_run_without_retrying_it(
    client: Any,
    cluster: SubprocessCluster,
    scripts: dict[str, str],
    tmp_path: Path,
    allowed_failures: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # With Dask's default (3) the scheduler re-runs the task on the other worker, which must
    # refuse; with 0 the task errs at once with KilledWorker. Either way: INTERRUPTED, once.
    marker = tmp_path / "starts"

    def set_allowed_failures(value: int, dask_scheduler: Any = None) -> int:
        # Runs in the scheduler's process (sent by value: it is local to this test).
        previous = int(dask_scheduler.allowed_failures)
        dask_scheduler.allowed_failures = value
        return previous

    caplog.set_level(logging.DEBUG, logger="prismq_subprocess.dask")
    previous = await client.run_on_scheduler(set_allowed_failures, allowed_failures)
    try:
        runner = runner_for(DaskBackend(client))
        async with runner:
            run_id = await runner.start_module(
                "k",
                "gated",
                scripts["gated"],
                {"gate": str(tmp_path / "never"), "marker": str(marker), "grandchild": True},
            )
            grandchild = int((await wait_for_line(out(runner), run_id, "grandchild")).split()[1])
            running = await stored(runner, run_id)
            assert running.pid is not None
            os.kill((await worker_pids(client))[str(running.worker)], signal.SIGKILL)
            run = await finished(runner, run_id)
            await client.wait_for_workers(2, timeout=WAIT)
            # What the dead worker left behind is killed from the other worker of this host.
            await tree_stopped(cluster, caplog, [running.pid, grandchild])
    finally:
        await client.run_on_scheduler(set_allowed_failures, previous)
    assert run.status is RunStatus.INTERRUPTED
    assert run.error_message is not None
    assert f"worker {running.worker} died" in run.error_message
    assert "not run again" in run.error_message
    assert run.worker == running.worker and run.pid == running.pid
    assert len(marker.read_text().split()) == 1, "the module ran once"


async def test_worker_killed_mid_run_stops_the_tree_of_a_module_its_death_ended(
    client: Any,
    cluster: SubprocessCluster,
    scripts: dict[str, str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A module that prints dies of the broken pipe as soon as its worker is gone (the worker
    # read its output); its grandchild prints nothing and runs on. The stop sent to the other
    # worker found no process at the module's pid and stopped nothing (probe; CI, once: the
    # test above, when the kill came before the module's second line).
    caplog.set_level(logging.DEBUG, logger="prismq_subprocess.dask")
    async with runner_for(DaskBackend(client)) as runner:
        run_id = await runner.start_module("p", "printer", scripts["printer"])
        grandchild = int((await wait_for_line(out(runner), run_id, "grandchild")).split()[1])
        running = await stored(runner, run_id)
        assert running.pid is not None
        os.kill((await worker_pids(client))[str(running.worker)], signal.SIGKILL)
        run = await finished(runner, run_id)
        assert run.status is RunStatus.INTERRUPTED, run
        await client.wait_for_workers(2, timeout=WAIT)
        await tree_stopped(cluster, caplog, [running.pid, grandchild])
    # Usually found by its cookie, the module gone; under load the stop may come first (then
    # the module's tree is stopped as it runs). The cookie path alone: the test below.
    assert f"orphaned tree of pid {running.pid} on" in caplog.text


def test_the_stop_of_a_child_recorded_gone_never_takes_a_stranger_at_its_pid() -> None:
    # A review's find: a child gone before its start could be read was first recorded with
    # the time its spawn was noted; a stranger given its pid whose start fell within a tick of
    # a whole second from it was taken for the child by the start-time-only fallback (no
    # cookie to read) and killed. Its start is now 0.0, which is no process's.
    stranger = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        check, stopped = dask_worker_module._stop_orphaned_tree(
            stranger.pid, 0.0, "PRISMQ_RUN_test0gone=1", 0.0
        )
        assert (check, stopped) == ("pid reused", 0)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_the_stop_of_a_child_that_exited_finds_its_descendants_by_the_cookie() -> None:
    # What the other worker does when the module already died of its broken pipe: the child's
    # pid names nobody, and what still holds its cookie is its tree.
    cookie = "PRISMQ_RUN_test0gone=1"
    starter = textwrap.dedent(
        """
        import subprocess, sys
        g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print(g.pid, flush=True)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", starter],
        env={**os.environ, cookie.split("=")[0]: "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    started = psutil.Process(child.pid).create_time()
    grandchild = int(child.stdout.readline())
    child.stdout.close()
    try:
        assert child.wait(10) == 0
        check, stopped = dask_worker_module._stop_orphaned_tree(child.pid, started, cookie, 0.0)
        assert (check, stopped) == ("gone", 1)
        deadline = time.monotonic() + 10
        while alive(grandchild) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(grandchild)
    finally:
        with contextlib.suppress(psutil.Error):
            psutil.Process(grandchild).kill()


async def test_a_run_cancelled_right_after_its_worker_died_has_its_tree_stopped(
    client: Any,
    cluster: SubprocessCluster,
    scripts: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The host cancels (a user's click, a shutdown) just after the worker died: the run ends
    # CANCELLED, and what the dead worker left running is stopped all the same (it was left
    # running: only a run recorded INTERRUPTED had its tree stopped; probe).
    caplog.set_level(logging.DEBUG, logger="prismq_subprocess.dask")
    async with runner_for(DaskBackend(client, cancel_timeout=2.0)) as runner:
        run_id = await runner.start_module(
            "c",
            "gated",
            scripts["gated"],
            {"gate": str(tmp_path / "never"), "grandchild": True},
        )
        grandchild = int((await wait_for_line(out(runner), run_id, "grandchild")).split()[1])
        running = await stored(runner, run_id)
        assert running.pid is not None
        os.kill((await worker_pids(client))[str(running.worker)], signal.SIGKILL)
        assert await runner.cancel(run_id, "the user gave up")
        run = await finished(runner, run_id)
        assert run.status is RunStatus.CANCELLED, run
        await client.wait_for_workers(2, timeout=WAIT)
        await tree_stopped(cluster, caplog, [running.pid, grandchild])


async def test_retry_on_worker_loss_runs_the_module_again_elsewhere(
    client: Any, scripts: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "starts"
    script = tmp_path / "twice.py"
    # The first attempt hangs (until its worker is killed); the second finishes.
    script.write_text(
        textwrap.dedent(
            f"""
            import os, time
            with open({str(marker)!r}, "a") as f:
                f.write(f"{{os.getpid()}}\\n")
            attempt = len(open({str(marker)!r}).read().split())
            print(f"attempt {{attempt}}", flush=True)
            if attempt == 1:
                time.sleep(300)
            """
        )
    )
    runner = runner_for(DaskBackend(client, retry_on_worker_loss=True))
    async with runner:
        run_id = await runner.start_module("r", "twice", script)
        await wait_for_line(out(runner), run_id, "attempt 1")
        first = await stored(runner, run_id)
        assert first.pid is not None
        os.kill((await worker_pids(client))[str(first.worker)], signal.SIGKILL)
        run = await finished(runner, run_id)
        await until(lambda: not alive(first.pid), "the first attempt's tree was stopped")
    assert run.status is RunStatus.COMPLETED, run.error_message
    assert run.output_tail == ["attempt 2"]
    assert run.worker != first.worker and run.pid != first.pid
    assert len(marker.read_text().split()) == 2


async def test_a_lost_run_leaves_no_event_once_the_backend_closed_and_its_id_runs_again(
    client: Any,
    cluster: SubprocessCluster,
    scripts: dict[str, str],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A lost run's events stay set while the backend lives (a Dask retry of its task must run
    # nothing). They made the next run with that id end INTERRUPTED without running, and
    # outlived the backend on the scheduler, one per lost run. (Whether they were set depends
    # on who noticed the loss first: the backend's worker check, or the scheduler.)
    caplog.set_level(logging.DEBUG, logger="prismq_subprocess.dask")
    backend = DaskBackend(client)
    async with runner_for(backend) as runner:
        run_id, pid, grandchild = await start_gated_tree(runner, scripts, tmp_path, "l")
        worker = (await stored(runner, run_id)).worker
        os.kill((await worker_pids(client))[str(worker)], signal.SIGKILL)
        assert (await finished(runner, run_id)).status is RunStatus.INTERRUPTED
        await client.wait_for_workers(2, timeout=WAIT)
        await tree_stopped(cluster, caplog, [pid, grandchild])
        await runner.registry.delete_older_than(timedelta(0))
        again = await runner.execute_module(
            "l", "lines", scripts["lines"], {"count": 1, "prefix": "again"}, run_id=run_id
        )
        assert again.status is RunStatus.COMPLETED, again.error_message
        assert again.output_tail == ["again 0"]
    assert await no_events_left(client, backend._token) == []


ORPHAN_STARTER = (
    "import subprocess, sys; "
    "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
    "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); print(p.pid)"
)


async def test_the_orphan_reaper_skips_the_lost_worker_and_bounds_each_try(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under load the scheduler may still list the dead worker when the reaper first looks: the
    # stop sent there waited for a connection that never answers (distributed's 30 s), which was
    # all of the reaper's time, and the orphaned tree ran on (CI, once: the test above). A
    # listening socket that never answers stands for that worker.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(64)
    dead = f"tcp://127.0.0.1:{silent.getsockname()[1]}"
    real = client.nthreads

    async def nthreads(*args: Any, **kwargs: Any) -> dict[str, int]:
        return {dead: 1, **(await real(*args, **kwargs))}

    monkeypatch.setattr(client, "nthreads", nthreads)
    monkeypatch.setattr(dask_backend_module, "_REAP_TRY_SECONDS", 3.0)
    backend = DaskBackend(client)
    orphans: list[int] = []
    try:
        host = get_address_host(dead)
        for lost in (dead, None):  # tried last as the lost worker; tried first, given up in time
            # A tree whose parent is gone, as a dead worker leaves it (not our child: init
            # reaps it once killed).
            starter = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-c", ORPHAN_STARTER],
                capture_output=True,
                check=True,
            )
            pid = int(starter.stdout)
            orphans.append(pid)
            create_time = psutil.Process(pid).create_time()
            child = dask_backend_module._Child(pid, create_time, host, lost)
            await asyncio.wait_for(backend._reap(child), 20)
            await until(lambda: not alive(pid), "the orphaned tree was stopped", 10)  # noqa: B023
    finally:
        silent.close()
        for pid in orphans:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()


async def test_a_stop_a_live_worker_does_not_confirm_in_time_sends_no_reaper(
    client: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The worker is alive and still inside the run's grace period (the module ignores SIGTERM):
    # the host records the run CANCELLED after cancel_timeout, and leaves the stop to that
    # worker. (A reaper sent then skipped it, found nobody else, and held aclose() 30 s; or,
    # with another worker on the host, cut the module's grace short: review.)
    caplog.set_level(logging.INFO, logger="prismq_subprocess.dask")
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    backend = DaskBackend(client, cancel_timeout=1.0)
    runner = ModuleRunner(RunRegistry(), output=OutputCapture(), backend=backend, grace_period=4.0)
    async with runner:
        run_id = await runner.start_module("s", "stubborn", script)
        await wait_for_line(out(runner), run_id, "ready")
        pid = (await stored(runner, run_id)).pid
        assert pid is not None
        assert await runner.cancel(run_id, "enough")
        run = await finished(runner, run_id)
        assert run.status is RunStatus.CANCELLED
        assert alive(pid), "recorded before the worker confirmed the stop (cancel_timeout)"
        assert not backend._reapers
        # Its own worker kills it once the grace period is over.
        await until(lambda: not alive(pid), "the worker stopped the module", 20)
    assert "orphaned tree" not in caplog.text and "no live worker" not in caplog.text
    # Its events stayed set while the backend lived (a Dask retry must run nothing), not after.
    # (Waited for: a loaded CI run found the worker still in its last poll of the kill event.)
    assert await no_events_left(client, backend._token) == []


def test_what_shows_a_worker_lost_and_which_cookies_are_taken() -> None:
    there = "tcp://127.0.0.1:2"
    killed = KilledWorker(task="t", last_worker=None, allowed_failures=0)  # type: ignore[arg-type]
    assert dask_backend_module.lost_by_outcome(killed)
    for kind, lost in [
        ("not-retried", True),
        ("cancelled-before-start", True),
        ("finished", False),
        ("refused", False),
    ]:
        assert dask_backend_module.lost_by_outcome(WorkerOutcome(kind, there)) is lost, kind
    assert not dask_backend_module.lost_by_outcome(None)
    assert not dask_backend_module.lost_by_outcome(RuntimeError("boom"))
    cookie_or_none = dask_backend_module.cookie_or_none
    assert cookie_or_none("PRISMQ_RUN_ab12=3") == "PRISMQ_RUN_ab12=3"
    for bad in (None, 7, "", "PRISMQ_RUN_=3", "PRISMQ_RUN_ab12=", "HOME=/root", b"PRISMQ_RUN_a=1"):
        assert cookie_or_none(bad) is None, bad


def test_a_child_whose_cookie_was_overwritten_is_still_stopped_on_its_start_time() -> None:
    # A program that sets its process title (setproctitle: gunicorn, celery) writes over its
    # environment, cookie included: the stop found it "not provably the run's" and left it
    # running, where the start time alone had stopped it before cookies were sent (review).
    cookie = "PRISMQ_RUN_test0overwrite=1"
    wiper = textwrap.dedent(
        """
        import ctypes, time
        fields = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
        start, end = int(fields[-3]), int(fields[-2])  # env_start, env_end
        ctypes.memset(start, 0, end - start)
        print("wiped", flush=True)
        time.sleep(60)
        """
    )
    child = subprocess.Popen(
        [sys.executable, "-c", wiper],
        env={**os.environ, cookie.split("=")[0]: "1"},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == "wiped\n"
        with open(f"/proc/{child.pid}/environ", "rb") as f:
            assert cookie.encode() not in f.read()
        started = psutil.Process(child.pid).create_time()
        check, stopped = dask_worker_module._stop_orphaned_tree(child.pid, started, cookie, 0.0)
        assert (check, stopped) == ("verified", 1)
        assert not alive(child.pid)  # (reaped already: it is the test's child)
    finally:
        child.kill()
        child.wait()
        assert child.stdout is not None
        child.stdout.close()


async def test_a_lost_child_without_a_start_time_is_reported_not_silently_left(
    client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A worker that reported the child's pid but could not read its start time: nothing can be
    # stopped safely (the pid alone may name a stranger), and the host says so.
    backend = DaskBackend(client)
    remote = dask_backend_module._Remote(
        pq.Run(module_id="m"),
        cast(RunContext, SimpleNamespace(output=None, grace_period=1.0)),
        backend._token,
        1,
    )
    remote.child = dask_backend_module._Child(4321, None, "127.0.0.1", "tcp://127.0.0.1:1")
    with caplog.at_level(logging.WARNING, logger="prismq_subprocess.dask"):
        backend._reap_later(remote)
    assert not backend._reapers
    assert "did not report the start time of pid 4321" in caplog.text


@pytest.mark.parametrize("how", ["aclose", "async with"])
def test_closed_in_a_cancelled_anyio_scope_the_backend_releases_its_client(
    how: str, scripts: dict[str, str]
) -> None:
    """Closed in the ``finally`` of a cancelled anyio scope (or by leaving ``async with``), as a
    host's shutdown path may: as after asyncio's one-shot cancellation, the worker watch has
    ended and the client the backend made is closed when aclose() returns. Awaited directly,
    aclose() was cut short at its first await and left both running. (An in-process
    ``LocalCluster``: no worker processes, so nothing of multiprocessing outlives the test.)"""
    seen: dict[str, object] = {}

    async def main() -> None:
        async with distributed.LocalCluster(
            n_workers=1, processes=False, asynchronous=True, dashboard_address=":0"
        ) as cluster:
            backend = DaskBackend(cluster.scheduler_address)
            runner = runner_for(backend)
            try:
                run_id = await runner.start_module("m", "lines", scripts["lines"], {"count": 2})
                run = await finished(runner, run_id)
                assert run.status is RunStatus.COMPLETED
                client, watcher = backend.client, backend._watcher
                assert client is not None and watcher is not None
                with anyio.move_on_after(0.1):
                    if how == "async with":
                        async with backend:
                            await anyio.sleep(30)
                    else:
                        try:
                            await anyio.sleep(30)
                        finally:
                            await backend.aclose()
                            seen["returned"] = True
                seen["watcher done"] = watcher.done()
                seen["client"] = client.status
            finally:
                await runner.aclose()

    anyio.run(main, backend="asyncio")
    assert seen["watcher done"] is True
    assert seen["client"] == "closed"
    if how == "aclose":
        assert seen.get("returned") is True
