"""A client that leaves a streaming response stops the child the response streams: real uvicorn
on 127.0.0.1 (tests/webapp/stream_host.py through ``python -m prismq_subprocess serve``), a
real httpx client that reads a few lines and disconnects, the child's tree checked with psutil.

Starlette cancels the response through an anyio cancel scope when the client disconnects, so
this is the library's clean-up under anyio's level-triggered cancellation, end to end.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from lifecycle_helpers import marked, survivors_after, wait_for_marked
from webapp_support import AppServer

import prismq_subprocess as pq

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX trees")

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AppServer]:
    app = AppServer(tmp_path_factory.mktemp("stream_host"), app="stream_host:app", app_dir=HERE)
    try:
        yield app
    finally:
        app.close()


def read_then_leave(
    server: AppServer, path: str, params: dict[str, str], lines: int
) -> httpx.Headers:
    """GET ``path`` with ``params``, read ``lines`` lines, wait until the tree marked with
    ``params["mark"]`` is up (a child and its grandchild), drop the connection."""
    mark = params["mark"]
    with (
        httpx.Client(base_url=server.url, timeout=30) as client,
        client.stream("GET", path, params=params) as response,
    ):
        assert response.status_code == 200, response.read()
        # Not a `for ... break`: closing httpx's line iterator closes the connection.
        reader = response.iter_lines()
        for _ in range(lines):
            next(reader)
        wait_for_marked(mark, 2)  # the child and its grandchild
        return response.headers  # leaving the block closes the connection


def problems(server: AppServer) -> list[str]:
    """What the server logged besides uvicorn's start-up lines (errors, warnings, tracebacks,
    "Task exception was never retrieved")."""
    return [line for line in server.logged() if not line.startswith("INFO:")]


def state(server: AppServer) -> dict[str, object]:
    with httpx.Client(base_url=server.url, timeout=30) as client:
        return dict(client.get("/state").json())


def wait_until(check: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.05)


@pytest.mark.parametrize("path", ["/lines", "/result"])
def test_leaving_a_response_that_streams_a_child_stops_its_tree(
    server: AppServer, path: str
) -> None:
    """``wrapper.stream()`` lines, or ``wrapper.run()`` awaited in the body: the client reads
    a few lines and leaves; the child and its grandchild are gone within a few seconds."""
    mark = f"disconnect-{path.strip('/')}-{time.monotonic_ns()}"
    read_then_leave(server, path, {"mark": mark}, 3 if path == "/lines" else 1)
    assert survivors_after(mark, 5.0) == []
    assert marked(mark) == []
    assert problems(server) == []


@pytest.mark.parametrize("path", ["/execute", "/follow"])
def test_leaving_a_run_cancels_it_and_records_it(server: AppServer, path: str) -> None:
    """A ``ModuleRunner`` run awaited in the response's body (``execute_module``), or started
    for the request and its output sent as ``sse_events``, the response's clean-up cancelling
    it: the client leaves, inside Starlette's cancelled scope the tree is stopped and the run
    recorded CANCELLED with the child's exit status; no subscription is left."""
    mark = f"disconnect-{path.strip('/')}-{time.monotonic_ns()}"
    params = {"mark": mark}
    if path == "/execute":
        params["run_id"] = run_id = f"request-{time.monotonic_ns()}"
        read_then_leave(server, path, params, 1)
    else:
        run_id = read_then_leave(server, path, params, 8)["x-run-id"]
    assert survivors_after(mark, 5.0) == []
    wait_until(lambda: state(server) == {"subscribers": 0, "active": []})
    assert state(server) == {"subscribers": 0, "active": []}

    async def recorded() -> pq.Run | None:
        async with pq.SQLiteRunRegistry(server.data_dir / "runs.db") as registry:
            return await registry.get_run(run_id)

    run = asyncio.run(recorded())
    assert run is not None
    assert run.status is pq.RunStatus.CANCELLED, (run.status, run.error_message)
    # The child's own end: it exits on the SIGTERM of the stop.
    assert run.exit_code == -signal.SIGTERM, (run.exit_code, run.error_message)
    assert run.finished_at is not None
    if path == "/follow":
        assert run.error_message == "the client left"
    assert problems(server) == []
