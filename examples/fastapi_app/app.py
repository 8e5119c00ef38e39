"""A FastAPI backend on prismq_subprocess: start modules, follow their output live (SSE), cancel
them and show the run history, from any number of uvicorn workers sharing one SQLite file.

Run it from the repository root (``pip install -e ".[web]"`` there first)::

    python -m prismq_subprocess serve examples.fastapi_app.app:app --workers 2

and open http://127.0.0.1:8000/. ``serve`` is uvicorn with an event loop that can spawn
subprocesses in every worker, also on Windows. ``PRISMQ_APP_DATA`` names the data directory
(default ``./.prismq_app``): ``runs.db`` (the registry) and ``logs/`` (one output log per run).
``PRISMQ_DASK_SCHEDULER`` (a scheduler address, e.g. ``tls://scheduler:8786``) runs the modules
on that Dask cluster instead of this machine (the ``dask`` extra; docs/DISTRIBUTED.md).

Every process serves every request: a run started by one worker is listed, shown, streamed and
cancelled by any other one, through the shared registry and log directory (see
docs/BACKGROUND.md, "Several processes"). Each response says which worker answered in its
``X-Worker-Pid`` header.

The app has no authentication (anyone who can reach it can start and cancel runs); it refuses
only what other sites' pages send (``same_site``). Put it behind your own before exposing it
beyond a trusted network.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

import prismq_subprocess as pq
from prismq_subprocess.exceptions import InvalidSubscriptionError

HERE = Path(__file__).resolve().parent
WORKER_PID = os.getpid()


async def same_site(request: Request) -> None:
    """Refuse a request that changes something (starts or cancels a run) when another site's
    page sent it: a plain HTML form can POST here without a CORS preflight. Browsers say where
    a request comes from: ``Sec-Fetch-Site`` (all current ones), else ``Origin`` (sent on every
    cross-origin POST), compared with the ``Host`` the request was sent to. Requests with
    neither (curl, scripts) are not a browser's and go through.

    This is not authentication: the app has none. Put it behind your own before exposing it
    beyond a trusted network (and ``TrustedHostMiddleware`` with your host names, against DNS
    rebinding).
    """
    site = request.headers.get("sec-fetch-site")
    if site is not None:
        # Set by the browser itself, whatever the proxies in between do to Host.
        if site not in ("same-origin", "none"):
            raise HTTPException(403, f"cross-site request refused (Sec-Fetch-Site: {site})")
        return
    origin = request.headers.get("origin")
    if origin is not None and not _same_host(origin, request.headers.get("host", "")):
        raise HTTPException(403, f"cross-site request refused (Origin: {origin})")


def _same_host(origin: str, host: str) -> bool:
    """Whether ``origin`` names the ``host`` (a ``Host`` header) the request was sent to: the
    same host name and, where ``host`` has a port, the same port (the scheme's default for an
    ``origin`` without one). Without a port in ``host`` the ports are not compared: a proxy
    that ends TLS sends ``Host: name`` over plain HTTP for ``Origin: https://name``."""
    try:
        sent = urlsplit(origin)
        to = urlsplit(f"//{host}")
        wanted_port = to.port
        port = sent.port or {"http": 80, "https": 443}.get(sent.scheme.lower())
    except ValueError:  # a malformed port
        return False
    if not sent.hostname or sent.hostname.lower() != (to.hostname or "").lower():
        return False
    return wanted_port is None or port == wanted_port


# -- the modules this app offers ------------------------------------------------------------------
class CountParameters(BaseModel):
    """Parameters of the ``count`` module (a Python script)."""

    model_config = ConfigDict(extra="forbid")
    lines: int = Field(10, ge=1, le=100_000)
    delay: float = Field(0.1, ge=0, le=10)
    fail: bool = False
    child: bool = False


class TicksParameters(BaseModel):
    """Parameters of the ``ticks`` module (a shell pipeline)."""

    model_config = ConfigDict(extra="forbid")
    count: int = Field(5, ge=1, le=10_000)
    delay: float = Field(0.2, ge=0, le=10)


class NoParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class Module:
    """One entry of the catalog: how to validate its parameters and how to start it."""

    name: str
    description: str
    parameters: type[BaseModel]
    start: Callable[[pq.ModuleRunner, str, BaseModel], Any]
    available: bool = True


def _start_count(runner: pq.ModuleRunner, module_id: str, params: BaseModel) -> Any:
    return runner.start_module(
        module_id, "Count", HERE / "modules" / "count.py", params.model_dump(), timeout=3600
    )


def _start_ticks(runner: pq.ModuleRunner, module_id: str, params: BaseModel) -> Any:
    assert isinstance(params, TicksParameters)
    # Any command line, not only Python: a shell pipeline, as a tracked run. The values are
    # validated numbers, so nothing from the request reaches the shell as text.
    command = (
        f"for i in $(seq 1 {params.count}); do echo tick $i; sleep {params.delay}; done"
        " | tr a-z A-Z"
    )
    return runner.start_command(
        module_id, "Ticks", command, params.model_dump(), shell=True, timeout=3600
    )


def _start_pip_list(runner: pq.ModuleRunner, module_id: str, params: BaseModel) -> Any:
    # A program with its arguments (here `python -m pip`; a binary or `node x.js` alike).
    return runner.start_command(
        module_id, "Installed packages", [sys.executable, "-m", "pip", "list"], timeout=120
    )


MODULES: dict[str, Module] = {
    "count": Module(
        "Count", "a Python script printing numbered lines", CountParameters, _start_count
    ),
    "ticks": Module(
        "Ticks",
        "a shell pipeline (for/echo/sleep | tr)",
        TicksParameters,
        _start_ticks,
        available=sys.platform != "win32",
    ),
    "pip-list": Module("Installed packages", "python -m pip list", NoParameters, _start_pip_list),
}


def _backend() -> pq.abc.RunBackend | None:
    """Where the modules run: here, or with ``PRISMQ_DASK_SCHEDULER`` set on that Dask cluster
    (the only switch; every endpoint stays the same)."""
    address = os.environ.get("PRISMQ_DASK_SCHEDULER")
    if not address:
        return None
    from prismq_subprocess.dask import DaskBackend

    return DaskBackend(address)


# -- shutting down while browsers stream ----------------------------------------------------------
def _on_shutdown_signals(
    loop: asyncio.AbstractEventLoop, stopping: asyncio.Event
) -> Callable[[], None]:
    """Set ``stopping`` on SIGINT/SIGTERM, then let the server's own handler run.

    uvicorn waits for open responses to finish before it runs the lifespan shutdown, and a live
    output stream only ends when its run does: the streams must end first (``sse_events(...,
    stop=stopping)``), or the server would wait for them. Returns a function that puts the
    previous handlers back.
    """
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        loop.call_soon_threadsafe(stopping.set)
        before = previous.get(signum)
        if callable(before):
            before(signum, frame)
        elif before == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    for name in ("SIGINT", "SIGTERM", "SIGBREAK"):
        signum = getattr(signal, name, None)
        if signum is None:
            continue
        try:
            previous[signum] = signal.getsignal(signum)
            signal.signal(signum, handler)
        except ValueError:  # not the main thread (e.g. a test client): nothing to chain
            previous.pop(signum, None)

    def restore() -> None:
        for signum, before in previous.items():
            if signal.getsignal(signum) is handler:
                signal.signal(signum, before)

    return restore


class EventStream(StreamingResponse):
    """The response for ``pq.sse_events``: closes the stream when the response ends, however.

    Starlette leaves a response's iterator unclosed when the client disconnects; the stream
    (with the run's subscription and its tasks) then lived until the garbage collector got to
    it, which for a stream caught in a reference cycle may be a long while.
    """

    def __init__(self, events: AsyncGenerator[str, None]) -> None:
        super().__init__(events, headers=dict(pq.SSE_HEADERS))
        self._events = events

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()


# -- the app --------------------------------------------------------------------------------------
def create_app(data_dir: str | os.PathLike[str] | None = None) -> FastAPI:
    """The app, keeping its registry and logs in ``data_dir`` (default: ``$PRISMQ_APP_DATA`` or
    ``./.prismq_app``)."""
    data = Path(data_dir or os.environ.get("PRISMQ_APP_DATA") or ".prismq_app")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(data.mkdir, parents=True, exist_ok=True)
        stopping = asyncio.Event()
        restore = _on_shutdown_signals(asyncio.get_running_loop(), stopping)
        try:
            # Leaving the block (server shutdown, e.g. SIGTERM) stops every run of this worker
            # and records it CANCELLED, closes the output logs, then the registry.
            async with (
                pq.SQLiteRunRegistry(data / "runs.db", max_runs=10_000) as registry,
                pq.OutputCapture(log_dir=data / "logs") as output,
                pq.ModuleRunner(
                    registry,
                    output=output,
                    max_concurrent=8,
                    grace_period=2.0,
                    backend=_backend(),
                ) as runner,
            ):
                app.state.registry = registry
                app.state.output = output
                app.state.runner = runner
                app.state.stopping = stopping
                yield
                stopping.set()
        finally:
            restore()

    app = FastAPI(title="prismq_subprocess example", lifespan=lifespan)

    @app.middleware("http")
    async def worker_header(request: Request, call_next: Any) -> Response:
        response: Response = await call_next(request)
        response.headers["X-Worker-Pid"] = str(WORKER_PID)
        return response

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(HERE / "static" / "index.html")

    @app.get("/api/health")
    async def health() -> dict[str, Any]:
        return {"ok": True, "worker_pid": WORKER_PID}

    @app.get("/api/modules")
    async def modules() -> list[dict[str, Any]]:
        return [
            {
                "id": module_id,
                "name": module.name,
                "description": module.description,
                "available": module.available,
                "parameters": module.parameters.model_json_schema(),
                "defaults": module.parameters().model_dump(),
            }
            for module_id, module in MODULES.items()
        ]

    @app.post("/api/modules/{module_id}/runs", status_code=201, dependencies=[Depends(same_site)])
    async def start_run(
        module_id: str,
        request: Request,
        parameters: Annotated[dict[str, Any] | None, Body()] = None,
    ) -> dict[str, Any]:
        module = MODULES.get(module_id)
        if module is None or not module.available:
            raise HTTPException(404, f"no module {module_id!r} here")
        try:
            params = module.parameters.model_validate(parameters or {})
        except ValidationError as exc:
            raise HTTPException(422, exc.errors(include_url=False)) from None
        run_id = await module.start(request.app.state.runner, module_id, params)
        return {"run_id": run_id, "worker_pid": WORKER_PID}

    @app.get("/api/runs")
    async def list_runs(
        request: Request,
        status: pq.RunStatus | None = None,
        module_id: str | None = None,
        limit: Annotated[int, Query(ge=0, le=1000)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> dict[str, Any]:
        registry: pq.SQLiteRunRegistry = request.app.state.registry
        runs = await registry.list_runs(status, module_id, limit, offset)
        return {
            "total": await registry.count_runs(status, module_id),
            "runs": [run.to_dict() for run in runs],
            "worker_pid": WORKER_PID,
        }

    async def _get(request: Request, run_id: str) -> pq.Run:
        run = await request.app.state.registry.get_run(run_id)
        if run is None:
            raise HTTPException(404, f"no run {run_id!r}")
        assert isinstance(run, pq.Run)
        return run

    @app.get("/api/runs/{run_id}")
    async def show_run(request: Request, run_id: str) -> dict[str, Any]:
        run = await _get(request, run_id)
        return {**run.to_dict(), "worker_pid": WORKER_PID}

    @app.get("/api/runs/{run_id}/events")
    async def run_events(
        request: Request, run_id: str, last_event_id: str | None = None
    ) -> EventStream:
        """Live output as Server-Sent Events, from whichever worker runs it; ``Last-Event-ID``
        (or ``?last_event_id=``) resumes after that line."""
        await _get(request, run_id)
        state = request.app.state
        try:
            stream = pq.sse_events(
                state.output,
                run_id,
                last_event_id=request.headers.get("last-event-id") or last_event_id,
                registry=state.registry,
                stop=state.stopping,
            )
        except InvalidSubscriptionError as exc:
            raise HTTPException(400, str(exc)) from None
        return EventStream(stream)

    @app.post("/api/runs/{run_id}/cancel", dependencies=[Depends(same_site)])
    async def cancel_run(request: Request, run_id: str) -> dict[str, Any]:
        """Cancel from any worker; answers once the run is recorded finished (or after 10 s
        with ``"requested"``)."""
        await _get(request, run_id)
        result = await request.app.state.runner.cancel(
            run_id, "cancelled from the web page", timeout=10
        )
        run = await _get(request, run_id)
        return {"result": result.value, "status": run.status.value, "worker_pid": WORKER_PID}

    return app


app = create_app()
