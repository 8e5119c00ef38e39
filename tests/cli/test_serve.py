"""``serve``: uvicorn for real on Linux (one worker and two), the Windows route by injection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cli_support import cli, start_cli

import prismq_subprocess as pq
from prismq_subprocess._cli._common import CliError
from prismq_subprocess._cli._loops import LOOP_FACTORY, subprocess_loop
from prismq_subprocess._cli._serve import (
    LoopPlan,
    plan_loop,
    prepare_loop,
    starts_processes,
    uvicorn_arguments,
)

uvicorn = pytest.importorskip("uvicorn")
pytest.importorskip("fastapi")

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX host")

APP = textwrap.dedent(
    """
    import asyncio, os, sys
    import prismq_subprocess as pq
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/")
    async def info():
        result = await pq.run(sys.executable, "-c", "print('spawned')")
        return {
            "loop": type(asyncio.get_running_loop()).__name__,
            "mode": pq.detect_run_mode().mode.value,
            "pid": os.getpid(),
            "child_output": result.stdout.decode().strip(),
        }
    """
)

# Routes our loop factory's debug line to stderr, next to uvicorn's own messages.
LOG_CONFIG = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(name)s %(levelname)s %(message)s"}},
    "handlers": {
        "stderr": {
            "class": "logging.StreamHandler",
            "formatter": "plain",
            "stream": "ext://sys.stderr",
        }
    },
    "loggers": {"prismq_subprocess._cli._loops": {"level": "DEBUG"}},
    "root": {"handlers": ["stderr"], "level": "INFO"},
}
LOOP_LINE = re.compile(r"prismq_subprocess\._cli\._loops DEBUG pid (\d+) runs the app on (\w+)")


class Server:
    """A running ``prismq-subprocess serve``, its stderr collected line by line."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self._queue.put(raw.decode(errors="replace").rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: re.Pattern[str], count: int = 1, timeout: float = 60) -> list[str]:
        """Wait until ``count`` stderr lines match ``pattern``; return them."""
        deadline = time.monotonic() + timeout
        while sum(1 for line in self.lines if pattern.search(line)) < count:
            remaining = deadline - time.monotonic()
            assert remaining > 0, "\n".join(self.lines)
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            assert line is not None, "server ended:\n" + "\n".join(self.lines)
            self.lines.append(line)
        return [line for line in self.lines if pattern.search(line)]

    def get(self, port: int, timeout: float = 30) -> dict[str, Any]:
        """GET / as JSON. Retries while nothing listens yet: with --workers, uvicorn's parent
        logs "running on" when it binds, before a worker serves the socket."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=30) as response:
                    data: dict[str, Any] = json.loads(response.read())
                return data
            except urllib.error.URLError as exc:
                refused = isinstance(exc.reason, ConnectionRefusedError)
                if not refused or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def kill_tree(self) -> None:
        """Clean-up: kill the server and its workers (which hold stderr too), close the pipes."""
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    child.kill()
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        self._reader.join(timeout=30)  # ends once every writer of the pipe is gone
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=10)
        while (line := self._queue.get_nowait() if not self._queue.empty() else None) is not None:
            self.lines.append(line)
        return code


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    (tmp_path / "probe_app.py").write_text(APP)
    (tmp_path / "log.json").write_text(json.dumps(LOG_CONFIG))
    return tmp_path


@pytest.fixture
def serve(app_dir: Path) -> Iterator[Any]:
    servers: list[Server] = []

    def start(*extra: str) -> Server:
        proc = start_cli(
            "serve",
            "probe_app:app",
            "--app-dir",
            str(app_dir),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-config",
            str(app_dir / "log.json"),
            *extra,
        )
        servers.append(Server(proc))
        return servers[-1]

    yield start
    for server in servers:
        server.kill_tree()


RUNNING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")


@posix_only
def test_one_worker_app_gets_a_spawning_loop_and_async_mode(serve: Any) -> None:
    # --loop asyncio: our factory's loop even where uvloop is installed (auto would pick it:
    # test_auto_serves_on_uvloop_where_it_is_installed).
    server = serve("--loop", "asyncio")
    port = int(RUNNING.search(server.wait_for(RUNNING)[0]).group(1))  # type: ignore[union-attr]
    info = server.get(port)
    assert info == {
        "loop": "_UnixSelectorEventLoop",
        "mode": "async",
        "pid": server.proc.pid,  # one worker: uvicorn serves in the command line's own process
        "child_output": "spawned",
    }
    # uvicorn built that loop with our factory (the --loop import string), in this process.
    made = [LOOP_LINE.search(line) for line in server.wait_for(LOOP_LINE)]
    assert [(int(m.group(1)), m.group(2)) for m in made if m] == [
        (server.proc.pid, "_UnixSelectorEventLoop")
    ]
    assert server.stop() == 0
    assert any("Finished server process" in line for line in server.lines)


@posix_only
def test_worker_processes_get_the_loop_factory_too(serve: Any) -> None:
    server = serve("--workers", "2", "--loop", "asyncio")
    port = int(RUNNING.search(server.wait_for(RUNNING)[0]).group(1))  # type: ignore[union-attr]
    made = [LOOP_LINE.search(line) for line in server.wait_for(LOOP_LINE, count=2)]
    workers = {int(m.group(1)) for m in made if m}
    # Fresh interpreters started by uvicorn ("spawn"), each building its loop with our factory.
    assert len(workers) == 2 and server.proc.pid not in workers
    seen = set()
    for _ in range(6):
        info = server.get(port)
        assert info["loop"] == "_UnixSelectorEventLoop" and info["mode"] == "async"
        assert info["child_output"] == "spawned"
        seen.add(info["pid"])
    assert seen <= workers
    assert server.stop() == 0


@posix_only
@pytest.mark.parametrize("workers", [1, 2])
def test_auto_serves_on_uvloop_where_it_is_installed(serve: Any, workers: int) -> None:
    # What a host with uvicorn[standard] gets: uvloop in every process serving the app, which
    # spawns in ASYNC mode there. (These tests assumed our factory's loop, and failed wherever
    # uvloop was installed.)
    pytest.importorskip("uvloop")
    server = serve("--workers", str(workers))
    port = int(RUNNING.search(server.wait_for(RUNNING)[0]).group(1))  # type: ignore[union-attr]
    seen = set()
    for _ in range(2 * workers):
        info = server.get(port)
        assert (info["loop"], info["mode"], info["child_output"]) == ("Loop", "async", "spawned")
        seen.add(info["pid"])
    serving = {server.proc.pid} if workers == 1 else set(child_pids(server.proc.pid))
    assert seen <= serving
    assert not any(LOOP_LINE.search(line) for line in server.lines)  # not our factory's
    assert server.stop() == 0


def child_pids(pid: int) -> list[int]:
    return [child.pid for child in psutil.Process(pid).children(recursive=True)]


def test_missing_uvicorn_exits_2() -> None:
    code = (
        "import sys; sys.modules['uvicorn'] = None\n"  # makes `import uvicorn` fail
        "from prismq_subprocess._cli import main\n"
        "sys.exit(main(['serve', 'myapp:app']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert b"install the web extra: pip install 'prismq_subprocess[web]'" in result.stderr


def test_usage() -> None:
    assert cli("serve").returncode == 2
    helped = cli("serve", "--help")
    assert helped.returncode == 0 and b"serve APP [uvicorn options...]" in helped.stdout
    # Everything after APP is uvicorn's: its own parser reports a bad option.
    bad = cli("serve", "myapp:app", "--no-such-option")
    assert bad.returncode == 2 and b"No such option" in bad.stderr
    uvicorn_help = cli("serve", "myapp:app", "--help")
    assert uvicorn_help.returncode == 0 and b"--workers" in uvicorn_help.stdout
    # uvicorn's own failure (the app cannot be imported) ends serve with uvicorn's status.
    missing_app = cli("serve", "no_such_module_prismq:app", "--port", "0")
    assert missing_app.returncode == 3  # uvicorn's STARTUP_FAILURE
    assert b"no_such_module_prismq" in missing_app.stderr


# -- the loop plan, and the Windows route by injection ------------------------------------------


@pytest.mark.parametrize(
    ("requested", "platform", "accepts_factory", "has_uvloop", "expected"),
    [
        # uvicorn >= 0.36: our factory, imported by name in every process uvicorn starts.
        (None, "win32", True, False, LoopPlan(LOOP_FACTORY)),
        ("asyncio", "win32", True, True, LoopPlan(LOOP_FACTORY)),
        (None, "linux", True, False, LoopPlan(LOOP_FACTORY)),
        (None, "linux", True, True, LoopPlan("uvloop")),
        ("uvloop", "darwin", True, True, LoopPlan("uvloop")),
        # Older uvicorn: leave the policy alone, and make it the Proactor one here.
        (None, "win32", False, False, LoopPlan("none", install_policy=True)),
        ("asyncio", "linux", False, False, LoopPlan("none", install_policy=True)),
        ("none", "win32", True, False, LoopPlan("none", install_policy=True)),
    ],
)
def test_loop_plan(
    requested: str | None,
    platform: str,
    accepts_factory: bool,
    has_uvloop: bool,
    expected: LoopPlan,
) -> None:
    plan = plan_loop(
        requested, platform=platform, accepts_factory=accepts_factory, has_uvloop=has_uvloop
    )
    assert plan == expected


@pytest.mark.parametrize(
    ("requested", "accepts_factory"),
    [(None, True), ("asyncio", True), (None, False), ("asyncio", False)],
)
def test_windows_started_processes_keep_uvicorns_selector_loop_and_threaded_mode(
    requested: str | None, accepts_factory: bool
) -> None:
    # IOCP: a socket is bound to one completion port, so Proactor loops in the processes that
    # --reload/--workers start cannot accept on the shared listening socket (uvicorn issues #342,
    # #529). There serve leaves uvicorn's own loop ("asyncio": a selector loop on Windows in
    # those processes) and the library spawns in THREADED mode.
    alone = plan_loop(
        requested, platform="win32", accepts_factory=accepts_factory, has_uvloop=False
    )
    started = plan_loop(
        requested,
        platform="win32",
        accepts_factory=accepts_factory,
        has_uvloop=False,
        multi_process=True,
    )
    assert alone.note is None and (alone.loop == LOOP_FACTORY or alone.install_policy)
    assert (started.loop, started.install_policy) == ("asyncio", False)
    assert started.note is not None
    assert "WinError 87" in started.note and "THREADED" in started.note
    # ... which is the mode auto-detection picks on the loop uvicorn gives those processes.
    loop = asyncio.SelectorEventLoop()
    try:
        decision = pq.detect_run_mode(platform="win32", loop=loop, env={})
    finally:
        loop.close()
    assert decision.mode is pq.RunMode.THREADED
    for platform in ("linux", "darwin"):
        plan = plan_loop(
            requested,
            platform=platform,
            accepts_factory=accepts_factory,
            has_uvloop=False,
            multi_process=True,
        )
        assert plan.note is None


def test_windows_loop_none_in_started_processes_is_kept_with_a_warning() -> None:
    plan = plan_loop(
        "none", platform="win32", accepts_factory=True, has_uvloop=False, multi_process=True
    )
    assert (plan.loop, plan.install_policy) == ("none", True)
    assert plan.note is not None and "WinError 87" in plan.note


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["app:app"], {}, False),
        (["app:app", "--reload"], {}, True),
        (["app:app", "--workers", "2"], {}, True),
        (["--workers=4", "app:app"], {}, True),
        (["app:app", "--workers", "1"], {}, False),
        (["app:app", "--workers=1"], {}, False),
        (["app:app"], {"WEB_CONCURRENCY": "3"}, True),
        (["app:app", "--workers", "1"], {"WEB_CONCURRENCY": "3"}, False),
        (["app:app", "--workers", "x"], {}, False),  # uvicorn's own parser reports it
        # uvicorn reads every option from UVICORN_<NAME> too; the command line wins.
        (["app:app"], {"UVICORN_WORKERS": "2"}, True),
        (["app:app", "--workers", "1"], {"UVICORN_WORKERS": "2"}, False),
        (["app:app"], {"UVICORN_WORKERS": "1", "WEB_CONCURRENCY": "3"}, False),
        (["app:app"], {"UVICORN_WORKERS": "", "WEB_CONCURRENCY": "3"}, True),  # empty: unset
        (["app:app"], {"UVICORN_WORKERS": "x"}, False),
        (["app:app"], {"UVICORN_RELOAD": "true"}, True),
        (["app:app"], {"UVICORN_RELOAD": " Yes "}, True),
        (["app:app"], {"UVICORN_RELOAD": "1"}, True),
        (["app:app"], {"UVICORN_RELOAD": "false"}, False),
        (["app:app"], {"UVICORN_RELOAD": "0"}, False),
        (["app:app"], {"UVICORN_RELOAD": ""}, False),
        (["app:app", "--reload"], {"UVICORN_RELOAD": "false"}, True),
    ],
)
def test_which_uvicorn_arguments_start_processes(
    args: list[str], env: dict[str, str], expected: bool
) -> None:
    assert starts_processes(args, env) is expected


def test_uvicorn_workers_variable_gives_the_windows_multi_process_plan() -> None:
    env = {"UVICORN_WORKERS": "2"}
    plan = plan_loop(
        None,
        platform="win32",
        accepts_factory=True,
        has_uvloop=False,
        multi_process=starts_processes(["app:app", "--port", "0"], env),
    )
    assert plan.loop == "asyncio" and plan.note is not None and "WinError 87" in plan.note


def test_a_leading_double_dash_is_not_passed_to_uvicorn() -> None:
    # As `run -- CMD`: everything after `--` is uvicorn's; its options still count as options.
    result = cli("serve", "--", "no_such_module_prismq:app", "--port", "0")
    assert result.returncode == 3, result.stderr  # uvicorn's STARTUP_FAILURE: it parsed them
    assert b"no_such_module_prismq" in result.stderr


def test_custom_loop_is_passed_through_with_a_note() -> None:
    plan = plan_loop("mypkg.loops:make", platform="win32", accepts_factory=True, has_uvloop=False)
    assert plan.loop == "mypkg.loops:make" and not plan.install_policy
    assert plan.note is not None and "Proactor" in plan.note


def test_old_uvicorn_takes_no_custom_loop() -> None:
    with pytest.raises(CliError) as info:
        plan_loop("mypkg.loops:make", platform="linux", accepts_factory=False, has_uvloop=False)
    assert info.value.exit_code == 2 and "before 0.36" in str(info.value)


def test_uvloop_on_windows_is_a_usage_error() -> None:
    with pytest.raises(CliError) as info:
        plan_loop("uvloop", platform="win32", accepts_factory=True, has_uvloop=True)
    assert info.value.exit_code == 2


def test_uvloop_not_installed_is_a_usage_error() -> None:
    with pytest.raises(CliError) as info:
        plan_loop("uvloop", platform="linux", accepts_factory=True, has_uvloop=False)
    assert info.value.exit_code == 2 and "not installed" in str(info.value)


def test_uvloop_not_installed_exits_2_without_a_traceback() -> None:
    # uvicorn itself would fail only when building the loop, with a ModuleNotFoundError traceback.
    code = (
        "import sys; sys.modules['uvloop'] = None\n"  # uvloop not importable, installed or not
        "from prismq_subprocess._cli import main\n"
        "sys.exit(main(['serve', 'probe_app:app', '--loop', 'uvloop', '--port', '0']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, timeout=60, check=False
    )
    assert result.returncode == 2, result.stderr
    assert b"Traceback" not in result.stderr
    assert b"uvloop is not installed" in result.stderr


def test_loop_option_is_taken_out_of_uvicorn_arguments() -> None:
    assert uvicorn_arguments(["app:app", "--loop", "asyncio", "--port", "1"]) == (
        ["app:app", "--port", "1"],
        "asyncio",
    )
    assert uvicorn_arguments(["--loop=uvloop", "app:app", "--loop", "none"]) == (
        ["app:app"],
        "none",
    )
    assert uvicorn_arguments(["app:app", "--reload"]) == (["app:app", "--reload"], None)


def test_installed_uvicorn_resolves_our_factory() -> None:
    if not hasattr(uvicorn.Config, "get_loop_factory"):
        pytest.skip("uvicorn < 0.36 takes no loop factory (the policy route is used)")
    config = uvicorn.Config("probe_app:app", loop=LOOP_FACTORY)
    assert config.get_loop_factory() is subprocess_loop


class ProactorEventLoop(asyncio.SelectorEventLoop):
    """Stands in for Windows' loop; the library recognises Proactor loops by class name."""


class WindowsProactorEventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """Stands in for Windows' default policy."""

    _loop_factory = ProactorEventLoop


def test_windows_factory_route_builds_a_proactor_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    # What uvicorn >= 0.36 calls in each process on Windows.
    monkeypatch.setattr(asyncio, "ProactorEventLoop", ProactorEventLoop, raising=False)
    loop = subprocess_loop(platform="win32")
    try:
        assert type(loop) is ProactorEventLoop
        decision = pq.detect_run_mode(env={}, platform="win32", loop=loop)
        assert decision.mode is pq.RunMode.ASYNC
    finally:
        loop.close()


def test_windows_factory_route_explains_itself_off_windows() -> None:
    if sys.platform == "win32":
        pytest.skip("the real Proactor loop exists here")
    with pytest.raises(RuntimeError, match="only on Windows"):
        subprocess_loop(platform="win32")


def test_windows_policy_route_installs_the_proactor_policy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # What happens with uvicorn < 0.36 (or --loop none) on Windows: we install the Proactor
    # policy, and uvicorn's asyncio.run() builds its loop from it.
    monkeypatch.setattr(
        asyncio, "WindowsProactorEventLoopPolicy", WindowsProactorEventLoopPolicy, raising=False
    )
    plan = plan_loop(None, platform="win32", accepts_factory=False, has_uvloop=False)
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())
    try:
        prepare_loop(plan, platform="win32")
        policy = asyncio.get_event_loop_policy()
        assert isinstance(policy, WindowsProactorEventLoopPolicy)
        decision = pq.detect_run_mode(env={}, platform="win32", loop=None, policy=policy)
        assert decision.mode is pq.RunMode.ASYNC
    finally:
        asyncio.set_event_loop_policy(old)
