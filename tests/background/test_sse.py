"""Server-Sent Events of a run's output (prismq_subprocess/_background/_sse.py), checked with a
parser written from the WHATWG HTML spec (9.2.6 "Interpreting an event stream"), and end to end
through uvicorn and httpx when they are installed."""

from __future__ import annotations

import asyncio
import codecs
import json
import random
import socket
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import prismq_subprocess as pq
from prismq_subprocess._background._module_runner import ModuleRunner


# -- a spec-compliant SSE parser ----------------------------------------------------------------
@dataclass
class Event:
    type: str
    data: str
    last_event_id: str


@dataclass
class SSEParser:
    """Feed it text as it arrives; it returns the events dispatched so far."""

    events: list[Event] = field(default_factory=list)
    comments: list[str] = field(default_factory=list)
    retry: int | None = None
    last_event_id: str = ""
    _pending: str = ""
    _started: bool = False
    _data: str = ""
    _type: str = ""
    _id: str = ""

    def feed(self, text: str, *, final: bool = False) -> None:
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")
        buffer = self._pending + text
        start = 0
        while True:
            cr = buffer.find("\r", start)
            lf = buffer.find("\n", start)
            ends = [i for i in (cr, lf) if i >= 0]
            if not ends:
                break
            end = min(ends)
            if end == cr and end + 1 == len(buffer) and not final:
                break  # maybe the CR of a CRLF split across chunks
            self._line(buffer[start:end])
            start = end + (2 if buffer.startswith("\r\n", end) else 1)
        self._pending = buffer[start:]

    def _line(self, line: str) -> None:
        if not line:
            self._dispatch()
            return
        if line.startswith(":"):
            self.comments.append(line[1:].removeprefix(" "))
            return
        name, colon, value = line.partition(":")
        value = value.removeprefix(" ") if colon else ""
        if name == "event":
            self._type = value
        elif name == "data":
            self._data += value + "\n"
        elif name == "id":
            if "\0" not in value:
                self._id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = int(value)

    def _dispatch(self) -> None:
        self.last_event_id = self._id
        if not self._data:
            self._type = ""
            return
        self.events.append(Event(self._type or "message", self._data[:-1], self.last_event_id))
        self._data = ""
        self._type = ""


def parse(chunks: list[str], *, fragment: bool = False, seed: int = 0) -> SSEParser:
    """Parse chunks, optionally re-cut at random byte positions as a network would."""
    parser = SSEParser()
    if not fragment:
        for chunk in chunks:
            parser.feed(chunk)
        return parser
    data = "".join(chunks).encode("utf-8")
    rng = random.Random(seed)
    decoder = codecs.getincrementaldecoder("utf-8")()
    pos = 0
    while pos < len(data):
        step = rng.randint(1, 40)
        parser.feed(decoder.decode(data[pos : pos + step]))
        pos += step
    parser.feed(decoder.decode(b"", final=True), final=True)
    return parser


async def collect(stream: AsyncIterator[str]) -> list[str]:
    return [chunk async for chunk in stream]


TRICKY = [
    "plain",
    "",
    "lone\rcarriage return",
    "progress 50%\r",
    "\r",
    "line\u2028separator and\u2029paragraph",
    "emoji 🎉 and ünïcödé and 中文",
    "data: looks like a field",
    ": looks like a comment",
    "id: 99",
    "event: end",
    "nul\x00byte and tab\t",
    "next line\x85char",
    "\ufeffbom first",
    "lone surrogate \udc80 from a bad decode",
    '"quotes" and \\backslashes\\',
    " leading space",
]


# -- framing --------------------------------------------------------------------------------
@pytest.mark.parametrize("fragment", [False, True])
async def test_tricky_lines_round_trip_through_a_real_parser(fragment: bool) -> None:
    capture = pq.OutputCapture(max_line_bytes=100_000)
    long_line = "x" * 150_000
    await capture.append_lines("r", [*TRICKY, long_line])
    await capture.close_run("r", status=pq.RunStatus.COMPLETED, exit_code=0)
    parser = parse(await collect(pq.sse_events(capture, "r")), fragment=fragment, seed=7)
    assert parser.retry == 3000
    *lines, end = parser.events
    assert [e.type for e in lines] == ["line"] * (len(TRICKY) + 1)
    payloads = [json.loads(e.data) for e in lines]
    assert [p["text"] for p in payloads[:-1]] == TRICKY
    assert [e.last_event_id for e in lines] == [str(i) for i in range(len(TRICKY) + 1)]
    assert [p["seq"] for p in payloads] == list(range(len(TRICKY) + 1))
    cut = payloads[-1]
    assert cut["truncated"] == 50_000 and cut["text"].startswith("x" * 100_000)
    assert "truncated" not in payloads[0]
    assert end.type == "end"
    assert json.loads(end.data) == {"status": "completed", "exit_code": 0}


@pytest.mark.parametrize("source", ["ring", "log file"])
async def test_unicode_line_breaks_are_escaped_for_line_splitting_clients(
    tmp_path: Path, source: str
) -> None:
    """U+2028, U+2029 and U+0085 are no line breaks in SSE, but ``str.splitlines()`` and so
    httpx's ``iter_lines()`` (a Python client's usual SSE reader) split on them: sent raw, they
    cut a ``data:`` field in two for such a client. Escaped in the JSON they decode the same."""
    texts = ["a\u2028b", "c\u2029d", "e\x85f", "\u2028\u2029\x85", "ok ✓"]
    async with pq.OutputCapture(log_dir=tmp_path) as capture:
        await capture.append_lines("r", texts)
        await capture.close_run("r", status=pq.RunStatus.COMPLETED, exit_code=0)
        if source == "log file":
            capture.forget("r")
        body = "".join(await collect(pq.sse_events(capture, "r")))
    assert not set("\u2028\u2029\x85") & set(body)
    # Parsed as a line-splitting client does (httpx's LineDecoder is str.splitlines).
    events: list[dict[str, str]] = [{}]
    for line in body.splitlines():
        if line:
            name, _, value = line.partition(": ")
            events[-1][name] = value
        elif events[-1]:
            events.append({})
    lines = [json.loads(e["data"])["text"] for e in events if e.get("event") == "line"]
    assert lines == texts
    assert parse([body]).events[-1].type == "end"


def test_sse_event_framing() -> None:
    parser = parse(
        [
            pq.SSEEvent("a\r\nb\rc\nd", event="multi", id="7").encode(),
            pq.SSEEvent("").encode(),
            pq.SSEEvent(None, retry=10).encode(),
            pq.SSEEvent("after").encode(),
        ]
    )
    assert parser.events == [
        Event("multi", "a\nb\nc\nd", "7"),  # the spec turns every line break into LF
        Event("message", "", "7"),
        Event("message", "after", "7"),
    ]
    assert parser.retry == 10


@pytest.mark.parametrize(
    "kwargs",
    [
        {"event": "a\nb"},
        {"id": "1\r"},
        {"id": "nul\x00"},
        {"retry": -1},
        {"retry": True},
        {"data": 5},
        {"event": 5},
        {"id": 5},
        {"data": b"x"},
        # Not UTF-8 (a probe's find: framed, then the server failed writing it mid-response).
        {"data": "caf\udce9"},
        {"event": "\ud800"},
        {"id": "x\udfff"},
    ],
)
def test_fields_that_cannot_be_framed(kwargs: dict[str, Any]) -> None:
    with pytest.raises(pq.exceptions.InvalidSSEEventError):
        pq.SSEEvent(**({"data": "x"} | kwargs))


# Where str.splitlines() breaks besides CR and LF: no SSE line breaks, but Python clients that
# read an event stream by lines with it (httpx's iter_lines, so httpx-sse) break there.
_SPLITLINES_ONLY_BREAKS = ["\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]


@pytest.mark.parametrize("brk", _SPLITLINES_ONLY_BREAKS)
def test_event_and_id_refuse_every_line_break_a_line_reader_splits_at(brk: str) -> None:
    # A security probe's find: SSEEvent(event="line\x85id: 42") was framed, and an httpx client
    # read a separate "id: 42" field (its reconnect id forged).
    with pytest.raises(pq.exceptions.InvalidSSEEventError):
        pq.SSEEvent("x", event=f"line{brk}id: 42")
    with pytest.raises(pq.exceptions.InvalidSSEEventError):
        pq.SSEEvent("x", id=f"3{brk}retry: 1")


@pytest.mark.parametrize("brk", ["\x85", "\u2028", "\u2029"])
def test_data_keeps_the_breaks_sse_does_not_have(brk: str) -> None:
    # Not cut there (a review's find on a first version that did): JSON made with
    # ensure_ascii=False (pydantic's model_dump_json) keeps U+2028 raw, and a browser joining
    # the cut pieces with LF got JSON that JSON.parse refuses.
    payload = json.dumps({"text": f"a{brk}b"}, ensure_ascii=False)
    framed = pq.SSEEvent(payload, event="line", id="3").encode()
    (event,) = parse([framed]).events
    assert json.loads(event.data) == {"text": f"a{brk}b"}
    # Escaped as json.dumps does by default, every client reads one field.
    escaped = pq.SSEEvent(json.dumps({"text": f"a{brk}b"}), event="line", id="3").encode()
    assert len([line for line in escaped.splitlines() if line]) == 3


# -- behaviour ------------------------------------------------------------------------------
async def test_resume_from_last_event_id_and_bad_arguments() -> None:
    capture = pq.OutputCapture()
    await capture.append_lines("r", [f"l{i}" for i in range(10)])
    await capture.close_run("r")
    for last in ("5", 5):
        parser = parse(await collect(pq.sse_events(capture, "r", last_event_id=last, retry=None)))
        assert parser.retry is None
        assert [e.last_event_id for e in parser.events[:-1]] == [str(i) for i in range(6, 10)]
    assert len(parse(await collect(pq.sse_events(capture, "r", last_event_id=""))).events) == 11
    # More digits than int() takes (its 4300-digit limit) is malformed too, not a ValueError.
    for bad in ("abc", "-1", "٣", "1.5", "9" * 5000):
        with pytest.raises(pq.exceptions.InvalidSubscriptionError) as caught:
            pq.sse_events(capture, "r", last_event_id=bad)
        assert len(str(caught.value)) < 200  # an endpoint may send it back to the client
    with pytest.raises(pq.exceptions.InvalidSubscriptionError):
        pq.sse_events(capture, "r", heartbeat=0)
    with pytest.raises(pq.exceptions.InvalidSubscriptionError):
        pq.sse_events(capture, "r", max_lines_per_chunk=0)
    # An unknown run fails at the call, before any response is started (an endpoint's 404).
    with pytest.raises(pq.OutputNotFoundError):
        pq.sse_events(capture, "unknown")


async def test_heartbeat_comments_keep_an_idle_stream_alive() -> None:
    capture = pq.OutputCapture()
    capture.open_run("r")
    stream = pq.sse_events(capture, "r", heartbeat=0.02)
    parser = SSEParser()
    parser.feed(await anext(stream))  # retry, at once
    parser.feed(await anext(stream))
    parser.feed(await anext(stream))
    assert parser.comments == ["keep-alive", "keep-alive"] and parser.events == []
    await capture.append_line("r", "hello")
    await capture.close_run("r")
    async for chunk in stream:
        parser.feed(chunk)
    assert [(e.type, e.last_event_id) for e in parser.events] == [("line", "0"), ("end", "0")]


async def test_a_client_that_falls_behind_gets_a_gap_event() -> None:
    capture = pq.OutputCapture(max_lines_per_run=4)
    capture.open_run("r")
    stream = pq.sse_events(capture, "r", max_lines_per_chunk=2)
    parser = SSEParser()
    parser.feed(await anext(stream))  # retry
    await capture.append_lines("r", [str(i) for i in range(10)])  # the client reads nothing
    await capture.close_run("r")
    async for chunk in stream:
        parser.feed(chunk)
    gap, *lines, end = parser.events
    assert (gap.type, json.loads(gap.data), gap.last_event_id) == (
        "gap",
        {"dropped": 6, "next_seq": 6},
        "5",
    )
    assert [json.loads(e.data)["text"] for e in lines] == ["6", "7", "8", "9"]
    assert end.type == "end" and end.last_event_id == "9"


async def test_the_end_event_carries_the_status_of_a_module_run(tmp_path: Path) -> None:
    path = tmp_path / "fail.py"
    path.write_text("import sys\nprint('working')\nsys.exit(3)\n")
    async with (
        pq.RunRegistry() as registry,
        pq.OutputCapture() as output,
        ModuleRunner(registry, run_mode="async", output=output) as runner,
    ):
        run_id = await runner.start_module("f", "Fail", path)
        parser = parse(await collect(pq.sse_events(output, run_id)))
    assert [e.type for e in parser.events] == ["line", "end"]
    assert json.loads(parser.events[-1].data) == {"status": "failed", "exit_code": 3}


async def test_closing_the_stream_ends_the_subscription() -> None:
    capture = pq.OutputCapture()
    capture.open_run("r")
    stream = pq.sse_events(capture, "r")
    await anext(stream)
    assert capture._runs["r"].subscribers == 1
    await stream.aclose()
    assert capture._runs["r"].subscribers == 0


# -- end to end through a real ASGI server --------------------------------------------------
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def sse_app(capture: pq.OutputCapture) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """A raw ASGI app: GET /runs/<id>/events streams sse_events; 404 for an unknown run."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        run_id = scope["path"].split("/")[2]
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        try:
            stream = pq.sse_events(
                capture, run_id, last_event_id=headers.get("last-event-id"), heartbeat=0.2
            )
        except pq.OutputNotFoundError:
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b"unknown run"})
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(k.encode(), v.encode()) for k, v in pq.SSE_HEADERS.items()],
            }
        )
        try:
            async for chunk in stream:
                body = chunk.encode()
                await send({"type": "http.response.body", "body": body, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
        finally:
            await stream.aclose()

    return app


async def test_end_to_end_through_uvicorn_and_httpx(tmp_path: Path) -> None:
    await end_to_end_through_uvicorn_and_httpx(tmp_path)


def test_end_to_end_on_the_loop_uvicorn_picks_where_uvloop_is_installed(tmp_path: Path) -> None:
    # What a host with uvicorn[standard] runs: uvicorn's loop="auto" makes uvloop loops. The
    # whole path (ModuleRunner spawning in ASYNC mode, OutputCapture, sse_events, uvicorn's
    # HTTP server, a dropped client and its resume) on such a loop.
    uvicorn = pytest.importorskip("uvicorn")
    uvloop = pytest.importorskip("uvloop")
    config = uvicorn.Config("unused:app", loop="auto")  # the app is not loaded
    if not hasattr(config, "get_loop_factory"):
        pytest.skip("uvicorn before 0.36 sets up its loop without a factory")
    factory = config.get_loop_factory()

    async def main() -> None:
        assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
        await end_to_end_through_uvicorn_and_httpx(tmp_path)

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())


async def end_to_end_through_uvicorn_and_httpx(tmp_path: Path) -> None:
    uvicorn = pytest.importorskip("uvicorn")
    httpx = pytest.importorskip("httpx")
    module = tmp_path / "count.py"
    module.write_text(
        textwrap.dedent(
            """
            import time
            for i in range(30):
                print(f"step {i} \\u2028 ✓\\r", flush=True)
                time.sleep(0.005)
            """
        )
    )
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.listen()  # clients may connect at once; uvicorn accepts them once it runs
    async with (
        pq.RunRegistry() as registry,
        pq.OutputCapture() as output,
        ModuleRunner(registry, run_mode="async", output=output) as runner,
    ):
        config = uvicorn.Config(sse_app(output), log_level="warning", lifespan="off")
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            run_id = await runner.start_module("c", "Count", module)
            url = f"http://127.0.0.1:{port}/runs/{run_id}/events"
            async with httpx.AsyncClient(timeout=30) as client:
                missing = await client.get(f"http://127.0.0.1:{port}/runs/nope/events")
                assert missing.status_code == 404
                # Read a few events, drop the connection, reconnect with Last-Event-ID.
                first = SSEParser()
                async with client.stream("GET", url) as response:
                    assert response.headers["content-type"].startswith("text/event-stream")
                    async for text in response.aiter_text():
                        first.feed(text)
                        if len(first.events) >= 5:
                            break
                rest = SSEParser()
                headers = {"Last-Event-ID": first.last_event_id}
                async with client.stream("GET", url, headers=headers) as response:
                    async for text in response.aiter_text():
                        rest.feed(text)
            # Every event parsed before the drop (one read may carry several), then the resumed
            # stream from the last id the parser saw.
            events = first.events + rest.events
            lines = [json.loads(e.data)["text"] for e in events if e.type == "line"]
            assert lines == [f"step {i} \u2028 ✓" for i in range(30)]  # the trailing CR ends a line
            assert events[-1].type == "end"
            assert json.loads(events[-1].data) == {"status": "completed", "exit_code": 0}
            # The dropped connection's subscription was closed by the server.
            for _ in range(100):
                if output._runs[run_id].subscribers == 0:
                    break
                await asyncio.sleep(0.02)
            assert output._runs[run_id].subscribers == 0
        finally:
            server.should_exit = True
            await serving
