"""A FastAPI app for tests/webapp/test_client_disconnect.py: endpoints whose response streams a
child's output while the child is the request's own work, so a client that leaves must stop it.

    PRISMQ_APP_DATA=<dir> python -m prismq_subprocess serve stream_host:app --app-dir tests/webapp

Every child runs ``TICKER`` (a grandchild too, then a line every 50 ms) with
``PRISMQ_TEST_MARK=<mark>`` (the query's ``mark``) in its environment, so the test finds the
whole tree with psutil. Starlette cancels a streaming response through an anyio cancel scope
when its client disconnects.

- ``GET /lines?mark=``: the lines of ``wrapper.stream()``;
- ``GET /result?mark=``: ``"started"``, then the output of ``wrapper.run()`` once it returns;
- ``GET /execute?mark=&run_id=``: ``"started"``, then ``ModuleRunner.execute_module()``
  (SQLite registry in the data dir) awaited in the body, then the run's status;
- ``GET /follow?mark=``: a ``ModuleRunner`` run (SQLite registry in the data dir) started for
  the request, its output as ``sse_events``; the response cancels the run when it ends
  (header ``x-run-id``);
- ``GET /state``: the output capture's subscribers and the runner's active runs.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

import prismq_subprocess as pq

DATA = Path(os.environ["PRISMQ_APP_DATA"])
MARK_VAR = "PRISMQ_TEST_MARK"  # as in tests/lifecycle_helpers.py

TICKER = (
    "import subprocess, sys, time\n"
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
    "for i in range(2400):\n"
    "    print('tick', i, flush=True)\n"
    "    time.sleep(0.05)\n"
)


def _write_script(script: Path) -> None:
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(TICKER)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    script = DATA / "ticker.py"
    await anyio.to_thread.run_sync(_write_script, script)
    async with (
        pq.SubprocessWrapper(grace_period=1.0) as wrapper,
        pq.SQLiteRunRegistry(DATA / "runs.db") as registry,
        pq.OutputCapture(log_dir=DATA / "logs") as output,
        pq.ModuleRunner(registry, output=output, grace_period=1.0) as runner,
    ):
        app.state.wrapper = wrapper
        app.state.output = output
        app.state.runner = runner
        app.state.script = script
        yield


app = FastAPI(lifespan=lifespan)


def _env(mark: str) -> dict[str, str]:
    return {**os.environ, MARK_VAR: mark}


@app.get("/lines")
async def lines(request: Request, mark: str) -> StreamingResponse:
    wrapper: pq.SubprocessWrapper = request.app.state.wrapper

    async def body() -> AsyncGenerator[str, None]:
        command = (sys.executable, "-c", TICKER)
        async with wrapper.stream(*command, env=_env(mark), encoding="utf-8") as output:
            async for line in output:
                yield line

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/result")
async def result(request: Request, mark: str) -> StreamingResponse:
    wrapper: pq.SubprocessWrapper = request.app.state.wrapper

    async def body() -> AsyncGenerator[str, None]:
        yield "started\n"
        done = await wrapper.run(sys.executable, "-c", TICKER, env=_env(mark))
        yield done.stdout_text

    return StreamingResponse(body(), media_type="text/plain")


@app.get("/execute")
async def execute(request: Request, mark: str, run_id: str) -> StreamingResponse:
    state = request.app.state
    runner: pq.ModuleRunner = state.runner

    async def body() -> AsyncGenerator[str, None]:
        yield "started\n"
        run = await runner.execute_module(
            "ticker", "Ticker", state.script, run_id=run_id, env={MARK_VAR: mark}
        )
        yield f"{run.status.value}\n"

    return StreamingResponse(body(), media_type="text/plain")


class ClosingStream(StreamingResponse):
    """Closes its body when the response ends, however (Starlette leaves the body of a
    disconnected client unclosed), as the example app's ``EventStream`` does."""

    def __init__(self, body: AsyncGenerator[str, None], headers: dict[str, str]) -> None:
        super().__init__(body, headers=headers)
        self._body = body

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._body.aclose()


@app.get("/follow")
async def follow(request: Request, mark: str) -> ClosingStream:
    state = request.app.state
    runner: pq.ModuleRunner = state.runner
    run_id = await runner.start_module("ticker", "Ticker", state.script, env={MARK_VAR: mark})
    events = pq.sse_events(state.output, run_id, heartbeat=0.5)

    async def body() -> AsyncGenerator[str, None]:
        try:
            async for chunk in events:
                yield chunk
        finally:
            await events.aclose()
            await runner.cancel(run_id, "the client left")

    return ClosingStream(body(), headers={**pq.SSE_HEADERS, "x-run-id": run_id})


@app.get("/state")
async def state(request: Request) -> dict[str, Any]:
    output: pq.OutputCapture = request.app.state.output
    runner: pq.ModuleRunner = request.app.state.runner
    return {
        "subscribers": sum(ring.subscribers for ring in output._runs.values()),
        "active": runner.active_run_ids(),
    }
