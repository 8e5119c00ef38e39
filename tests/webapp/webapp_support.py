"""Helpers for the example app's tests: the app under real uvicorn (through ``python -m
prismq_subprocess serve``), clients that pick the worker they talk to, an SSE reader.

(pytest puts this directory on sys.path for the test modules next to it.)
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from served_app import ServedApp

ROOT = Path(__file__).resolve().parents[2]
APP = "examples.fastapi_app.app:app"


class AppServer(ServedApp):
    """``python -m prismq_subprocess serve examples.fastapi_app.app:app`` (or ``app``, found in
    ``app_dir`` if given) on 127.0.0.1, a free port, ``workers`` worker processes, its data in
    ``data_dir`` (``PRISMQ_APP_DATA``); stderr collected."""

    def __init__(
        self, data_dir: Path, workers: int = 1, *, app: str = APP, app_dir: Path | None = None
    ) -> None:
        self.data_dir = data_dir
        args = [
            sys.executable,
            "-m",
            "prismq_subprocess",
            "serve",
            app,
            *(() if app_dir is None else ("--app-dir", str(app_dir))),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--no-access-log",
        ]
        if workers > 1:
            args += ["--workers", str(workers)]
        super().__init__(args, cwd=ROOT, env={"PRISMQ_APP_DATA": str(data_dir)}, workers=workers)

    def client(self) -> httpx.Client:
        """A client with one connection, kept alive: every request goes to one worker."""
        return httpx.Client(base_url=self.url, timeout=30, limits=httpx.Limits(max_connections=1))

    @contextlib.contextmanager
    def on_worker(
        self, *, pid: int | None = None, not_pid: int | None = None, tries: int = 200
    ) -> Iterator[tuple[httpx.Client, int]]:
        """A client connected to the worker with ``pid`` (or any but ``not_pid``): fresh
        connections until uvicorn's shared socket hands one to such a worker."""
        for _ in range(tries):
            client = self.client()
            worker = int(client.get("/api/health").json()["worker_pid"])
            if (pid is None or worker == pid) and worker != not_pid:
                try:
                    yield client, worker
                finally:
                    client.close()
                return
            client.close()
        raise AssertionError(f"no connection reached the wanted worker in {tries} tries")

    def find_workers(self, tries: int = 200) -> set[int]:
        """The pids of the workers that answer (all ``workers`` of them), by fresh connections."""
        seen: set[int] = set()
        for _ in range(tries):
            with self.client() as client:
                seen.add(int(client.get("/api/health").json()["worker_pid"]))
            if len(seen) == self.workers:
                return seen
        raise AssertionError(f"only workers {seen} answered in {tries} tries")


@dataclass
class Stream:
    """What one SSE response delivered."""

    worker: int
    lines: list[tuple[int, str]] = field(default_factory=list)
    end: dict[str, Any] | None = None
    first_line_at: float | None = None


def read_events(
    client: httpx.Client,
    run_id: str,
    *,
    stop_after: int | None = None,
    last_event_id: int | None = None,
    on_first_line: Callable[[], object] | None = None,
) -> Stream:
    """Read ``/api/runs/{run_id}/events`` until its ``end`` event (or ``stop_after`` lines, or
    the server closing the stream), checking that ids are the line seqs. ``on_first_line`` is
    called once the first line has arrived, while the stream stays open (e.g. a barrier's
    ``wait``: the stream is then known to be open and live)."""
    headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
    with client.stream("GET", f"/api/runs/{run_id}/events", headers=headers) as response:
        assert response.status_code == 200, response.read()
        stream = Stream(int(response.headers["x-worker-pid"]))
        event: dict[str, str] = {}
        for line in response.iter_lines():
            if line:
                name, _, value = line.partition(": ")
                event[name] = value
                continue
            kind = event.get("event")
            if kind == "line":
                data = json.loads(event["data"])
                assert event["id"] == str(data["seq"])
                first = stream.first_line_at is None
                if first:
                    stream.first_line_at = time.monotonic()
                stream.lines.append((data["seq"], data["text"]))
                if first and on_first_line is not None:
                    on_first_line()
                if stop_after is not None and len(stream.lines) >= stop_after:
                    return stream
            elif kind == "end":
                stream.end = json.loads(event["data"])
                return stream
            else:
                assert kind is None, event  # retry / keep-alive only: no gaps with a log dir
            event = {}
    return stream


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def wait_gone(pids: list[int], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(gone(pid) for pid in pids):
        time.sleep(0.05)
    return all(gone(pid) for pid in pids)


def count_lines(n: int) -> list[tuple[int, str]]:
    """What the ``count`` module prints with ``lines=n``, as (seq, text)."""
    return [(i, f"line {i + 1} of {n}") for i in range(n)]
