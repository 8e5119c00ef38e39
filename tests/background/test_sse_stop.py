"""sse_events(stop=...): a server that begins to shut down ends its open streams at once, without
an ``end`` event, so browsers reconnect elsewhere (issue 12 item 5); and sse_events(registry=)
for a run this process does not hold."""

from __future__ import annotations

import asyncio
import json
import random
import time
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


async def test_a_stream_dropped_unclosed_in_a_cycle_is_closed_quietly() -> None:
    """Starlette drops a disconnected client's stream without closing it; collected in a
    reference cycle, every async generator in it is finalized at once. The stream's inner
    generator was then closed twice at the same time (by its own finalizer and by the outer
    one's ``aclosing``), and the loser failed with "aclose(): asynchronous generator is already
    running", logged as "Task exception was never retrieved" for a mere disconnect."""
    import gc

    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    loop.set_exception_handler(lambda _, context: errors.append(context))
    capture = pq.OutputCapture()
    capture.open_run("r")
    await capture.append_lines("r", ["a", "b"])
    stop = asyncio.Event()
    try:
        for _ in range(5):
            stream = pq.sse_events(capture, "r", stop=stop, heartbeat=None)
            await anext(stream)  # retry
            assert "event: line" in await anext(stream)
            holder: list[object] = [stream]
            holder.append(holder)  # a cycle, as a frame kept by a traceback makes
            del stream, holder
            gc.collect()
            for _ in range(10):
                await asyncio.sleep(0)  # the acloses the finalizers scheduled
            gc.collect()  # what a failed aclose task left behind is reported now
            await asyncio.sleep(0)
            assert errors == []
            assert capture._runs["r"].subscribers == 0
        # No stop.wait() task left behind either.
        assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []
    finally:
        loop.set_exception_handler(None)


async def test_heartbeats_go_on_while_stop_is_not_set() -> None:
    capture = pq.OutputCapture()
    capture.open_run("r")
    stream = pq.sse_events(capture, "r", stop=asyncio.Event(), heartbeat=0.02)
    assert await anext(stream) == "retry: 3000\n\n"
    assert await anext(stream) == ": keep-alive\n\n"
    await capture.close_run("r")
    rest = [chunk async for chunk in stream]
    assert json.loads(rest[-1].split("data: ")[1]) == {"status": None, "exit_code": None}


@pytest.mark.parametrize("with_stop", [False, True])
async def test_lines_arriving_as_heartbeats_fall_due_are_all_sent(with_stop: bool) -> None:
    # Lines appended about one heartbeat apart: with stop=, a heartbeat that fell due in the
    # iteration where the read had just taken a chunk threw that chunk away (its lines never
    # sent, no gap event, and Last-Event-ID moved past them).
    capture = pq.OutputCapture(max_lines_per_run=10_000)
    capture.open_run("r")
    heartbeat = 0.002
    count = 400
    chooser = random.Random(14)

    async def produce() -> None:
        for n in range(count):
            await capture.append_line("r", f"line {n}")
            await asyncio.sleep(chooser.uniform(0.5, 1.5) * heartbeat)
        await capture.close_run("r", status=pq.RunStatus.COMPLETED, exit_code=0)

    async def busy_loop() -> None:
        # A loaded server: each loop iteration takes most of a heartbeat, so a finished read
        # and a due heartbeat often meet in one iteration.
        while True:
            time.sleep(0.7 * heartbeat)  # noqa: ASYNC251 - blocking is the point
            await asyncio.sleep(0)

    producer = asyncio.create_task(produce())
    hog = asyncio.create_task(busy_loop())
    parser = SSEParser()
    stop = asyncio.Event() if with_stop else None
    try:
        async with asyncio.timeout(60):  # it starved before: every heartbeat restarted the read
            async for chunk in pq.sse_events(capture, "r", heartbeat=heartbeat, stop=stop):
                parser.feed(chunk)
            await producer
    finally:
        hog.cancel()
        producer.cancel()
    seqs = [json.loads(e.data)["seq"] for e in parser.events if e.type == "line"]
    assert seqs == list(range(count))
    assert parser.events[-1].type == "end"


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


@pytest.mark.parametrize("with_stop", [False, True])
async def test_a_subscriber_that_keeps_up_gets_every_line_of_a_producer_that_never_waits(
    with_stop: bool,
) -> None:
    # A probe's find: with stop= (what the guides recommend behind uvicorn) and no log_dir, a
    # stream read as fast as it could be got 145 of 10,000 lines and 67 gap events: each chunk
    # went through its own read task and asyncio.wait, three loop turns where the producer
    # gives one (append_line yields once per half buffer), so the ring lapped the reader.
    capture = pq.OutputCapture(max_lines_per_run=100)
    capture.open_run("r")
    parser = SSEParser()
    stop = asyncio.Event() if with_stop else None

    subscribed = asyncio.Event()

    async def consume() -> None:
        async for chunk in pq.sse_events(capture, "r", stop=stop):
            parser.feed(chunk)  # (the first: the opening, sent once subscribed)
            subscribed.set()

    consumer = asyncio.create_task(consume())
    await subscribed.wait()
    count = 10_000
    for n in range(count):
        await capture.append_line("r", f"line {n}")
    await capture.close_run("r", status=pq.RunStatus.COMPLETED, exit_code=0)
    async with asyncio.timeout(60):
        await consumer
    await capture.aclose()
    assert [e.type for e in parser.events if e.type == "gap"] == []
    seqs = [json.loads(e.data)["seq"] for e in parser.events if e.type == "line"]
    assert seqs == list(range(count))
    assert parser.events[-1].type == "end"
