"""sse_events(stop=...): a server that begins to shut down ends its open streams at once, without
an ``end`` event, so browsers reconnect elsewhere (issue 12 item 5); and sse_events(registry=)
for a run this process does not hold."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_sse import SSEParser

import prismq_subprocess as pq


async def test_setting_stop_ends_a_live_stream_without_an_end_event() -> None:
    capture = pq.OutputCapture()
    capture.open_run("r")
    stop = asyncio.Event()
    stream = pq.sse_events(capture, "r", stop=stop, heartbeat=None)
    parser = SSEParser()
    parser.feed(await anext(stream))  # retry
    await capture.append_lines("r", ["a", "b"])
    parser.feed(await anext(stream))
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    stop.set()
    with pytest.raises(StopAsyncIteration):
        await waiting
    assert [(e.type, e.last_event_id) for e in parser.events] == [("line", "0"), ("line", "1")]
    # The run goes on; a new stream (the reconnecting browser) resumes after the last id.
    await capture.append_line("r", "c")
    await capture.close_run("r", status=pq.RunStatus.COMPLETED, exit_code=0)
    again = SSEParser()
    async for chunk in pq.sse_events(capture, "r", last_event_id="1"):
        again.feed(chunk)
    assert [(e.type, e.data) for e in again.events] == [
        ("line", '{"seq":2,"text":"c"}'),
        ("end", '{"status":"completed","exit_code":0}'),
    ]


async def test_a_stop_already_set_sends_only_the_opening() -> None:
    capture = pq.OutputCapture()
    await capture.append_line("r", "x")
    stop = asyncio.Event()
    stop.set()
    chunks = [chunk async for chunk in pq.sse_events(capture, "r", stop=stop)]
    assert chunks == ["retry: 3000\n\n"]
    with pytest.raises(pq.exceptions.InvalidSubscriptionError):
        pq.sse_events(capture, "r", stop=True)  # type: ignore[arg-type]


async def test_heartbeats_go_on_while_stop_is_not_set() -> None:
    capture = pq.OutputCapture()
    capture.open_run("r")
    stream = pq.sse_events(capture, "r", stop=asyncio.Event(), heartbeat=0.02)
    assert await anext(stream) == "retry: 3000\n\n"
    assert await anext(stream) == ": keep-alive\n\n"
    await capture.close_run("r")
    rest = [chunk async for chunk in stream]
    assert json.loads(rest[-1].split("data: ")[1]) == {"status": None, "exit_code": None}


async def test_registry_streams_a_run_this_capture_never_held(tmp_path: Path) -> None:
    """The other worker's view: a second capture on the same log directory, with the registry."""
    script = tmp_path / "three.py"
    script.write_text("for i in range(3):\n    print('n', i)\n")
    async with (
        pq.SQLiteRunRegistry(tmp_path / "runs.db") as registry,
        pq.OutputCapture(log_dir=tmp_path / "logs") as owner_output,
        pq.OutputCapture(log_dir=tmp_path / "logs") as other_output,
        pq.ModuleRunner(registry, output=owner_output) as runner,
    ):
        run_id = await runner.start_module("t", "Three", script)
        with pytest.raises(pq.OutputNotFoundError):
            pq.sse_events(other_output, run_id)  # without the registry: not known here
        parser = SSEParser()
        async for chunk in pq.sse_events(other_output, run_id, registry=registry):
            parser.feed(chunk)
    assert [e.data for e in parser.events] == [
        '{"seq":0,"text":"n 0"}',
        '{"seq":1,"text":"n 1"}',
        '{"seq":2,"text":"n 2"}',
        '{"status":"completed","exit_code":0}',
    ]
