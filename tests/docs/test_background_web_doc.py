"""docs/BACKGROUND.md's small web app (start a module, stream it over SSE, cancel it) does what
its text says, served as the doc serves it: ``python -m prismq_subprocess serve`` with two
workers on 127.0.0.1, driven by httpx.

A reader copies this app as the starting point of their own. Two things it once got wrong were
only visible with a real client against real workers: a malformed ``Last-Event-ID`` header (any
client can send one) answered 500 with a traceback, and a stream answered by the worker that
does not own the run ended at once, with ``"status": null``, while the run went on.
"""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from served_app import ServedApp

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

DOC = Path(__file__).resolve().parents[2] / "docs" / "BACKGROUND.md"
FILE_BLOCK = re.compile(r"```python\n# (?P<name>[\w/]+\.py)\n(?P<body>.*?)```", re.DOTALL)
SERVE = re.compile(r"^\s*(python -m prismq_subprocess serve runs_app:app .*)$", re.M)


def example_files() -> dict[str, str]:
    return {m["name"]: m["body"] for m in FILE_BLOCK.finditer(DOC.read_text(encoding="utf-8"))}


def serve_command() -> list[str]:
    """The command the doc serves the app with (its ``python`` is this interpreter), on a free
    port of 127.0.0.1."""
    [line] = SERVE.findall(DOC.read_text(encoding="utf-8"))
    words = shlex.split(line)
    assert words[:2] == ["python", "-m"]
    return [sys.executable, *words[1:], "--host", "127.0.0.1", "--port", "0", "--no-access-log"]


class Server(ServedApp):
    """The doc's app under the doc's command, in ``folder``; stderr collected."""

    def __init__(self, folder: Path) -> None:
        for name, body in example_files().items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(body, encoding="utf-8")
        self.folder = folder
        super().__init__(serve_command(), cwd=folder, workers=2)

    def stderr(self) -> str:
        return "\n".join(self.logged(quiet=0.0))


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    running = Server(tmp_path)
    try:
        yield running
    finally:
        running.close()


def serving_pid(server: Server, response: Any) -> int:
    """The worker process holding the server end of ``response``'s connection."""
    client_port = response.extensions["network_stream"].get_extra_info("client_addr")[1]
    for worker in server.worker_processes():
        for conn in worker.net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == client_port:
                return worker.pid
    raise AssertionError(f"no worker holds the connection from port {client_port}")


def read_stream(response: Any) -> tuple[list[str], dict[str, Any] | None]:
    """The line texts and the ``end`` payload of an SSE response."""
    texts: list[str] = []
    event: dict[str, str] = {}
    for line in response.iter_lines():
        if line:
            name, _, value = line.partition(": ")
            event[name] = value
            continue
        if event.get("event") == "line":
            texts.append(json.loads(event["data"])["text"])
        elif event.get("event") == "end":
            return texts, json.loads(event["data"])
        event = {}
    return texts, None


def stream_on(
    server: Server, run_id: str, *, owner: bool, headers: dict[str, str] | None = None
) -> tuple[list[str], dict[str, Any] | None]:
    """Read the run's events through a connection answered by its owner worker, or not."""
    owner_pid = server_owner(server, run_id)
    for _ in range(200):
        with (
            httpx.Client(base_url=server.url, timeout=60) as client,
            client.stream("GET", f"/runs/{run_id}/events", headers=headers) as response,
        ):
            assert response.status_code == 200, response.read()
            if (serving_pid(server, response) == owner_pid) == owner:
                return read_stream(response)
    raise AssertionError("no connection reached the wanted worker in 200 tries")


def server_owner(server: Server, run_id: str) -> int:
    run = httpx.get(f"{server.url}/runs/{run_id}", timeout=30).json()
    return int(run["owner"]["pid"])


def test_the_doc_names_its_files_and_command() -> None:
    assert set(example_files()) == {"runs_app.py", "jobs/count.py"}
    assert "--workers" in serve_command()


def test_a_run_streams_whole_from_either_worker_and_bad_input_is_refused(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        started = client.post("/runs", json={"count": 6, "delay": 0.2})
        assert started.status_code == 201, started.text
        run_id = started.json()["run_id"]

        expected = [f"line {i}" for i in range(6)]
        for owner in (False, True):
            texts, end = stream_on(server, run_id, owner=owner)
            assert texts == expected, (owner, texts, end)
            assert end == {"status": "completed", "exit_code": 0}, (owner, end)
        # Resuming after line 3 (a reconnecting EventSource), on the other worker.
        texts, end = stream_on(server, run_id, owner=False, headers={"Last-Event-ID": "3"})
        assert texts == ["line 4", "line 5"] and end is not None

        run = client.get(f"/runs/{run_id}").json()
        assert run["status"] == "completed" and run["output_tail"] == expected

        # Whatever a client sends: a 4xx with the reason, never a 500.
        bad = client.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": "abc"})
        assert bad.status_code == 400, bad.text
        assert "last_event_id" in bad.json()["detail"]
        assert client.get("/runs/nope/events").status_code == 404
        assert client.get("/runs/nope").status_code == 404
        assert client.post("/runs", json={"count": 0}).status_code == 422
    assert "Traceback" not in server.stderr(), server.stderr()


def test_cancel_from_any_worker_stops_the_run(server: Server) -> None:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        run_id = client.post("/runs", json={"count": 1000, "delay": 0.2}).json()["run_id"]
        deadline = time.monotonic() + 30
        # (RUNNING is recorded as the child starts; its pid follows.)
        while (run := client.get(f"/runs/{run_id}").json())["pid"] is None:
            assert time.monotonic() < deadline, run
            time.sleep(0.05)
        child = psutil.Process(run["pid"])
        answers = [client.post(f"/runs/{run_id}/cancel").json() for _ in range(2)]
        assert answers == [{"result": "cancelled"}, {"result": "already_finished"}]
        assert client.post("/runs/nope/cancel").json() == {"result": "not_found"}
        run = client.get(f"/runs/{run_id}").json()
        assert run["status"] == "cancelled"
        assert run["error_message"] == "cancelled by the user"
    # Recorded CANCELLED only once the tree was stopped.
    assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE


def test_sigterm_with_a_stream_open_stops_the_server_and_its_runs(server: Server) -> None:
    """The doc's ``--timeout-graceful-shutdown``: uvicorn would otherwise wait for the open
    stream, which only ends with its run, before it shuts the app down."""
    with httpx.Client(base_url=server.url, timeout=60) as client:
        run_id = client.post("/runs", json={"count": 1000, "delay": 0.2}).json()["run_id"]
        with client.stream("GET", f"/runs/{run_id}/events") as response:
            lines = response.iter_lines()
            while not next(lines).startswith("data:"):
                pass
            pid = int(client.get(f"/runs/{run_id}").json()["pid"])
            server.proc.send_signal(signal.SIGTERM)
            # The server must end while the stream is still open.
            server.proc.wait(timeout=60)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    shown = subprocess.run(
        [
            sys.executable,
            "-m",
            "prismq_subprocess",
            "runs",
            "show",
            run_id,
            "--json",
            "--db",
            str(server.folder / "runs.db"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["status"] == "cancelled", shown.stdout
