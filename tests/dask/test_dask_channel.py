"""The worker-side half of the output channel (no cluster needed): batches, order, bounds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip(
    "distributed",
    reason="the [dask] extra is not installed (pip install 'prismq_subprocess[dask]')",
)

from prismq_subprocess import OutputCapture
from prismq_subprocess.dask._channel import LINES, ForwardedOutput, OutputForwarder


def capture_of(lines: int) -> OutputCapture:
    capture = OutputCapture(max_lines_per_run=lines, retain_ended_seconds=None)
    capture.open_run("r")
    return capture


def forwarder_for(
    capture: OutputCapture, sent: list[dict[str, Any]], **kwargs: Any
) -> OutputForwarder:
    settings = {"max_batch_lines": 100, "max_batch_chars": 10_000, "flush_interval": 0.01}
    settings.update(kwargs)
    return OutputForwarder(
        capture.subscribe("r"), sent.append, {"run": "r", "attempt": "a"}, **settings
    )


def unpack(sent: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """The lines sent, numbered, a line sent in pieces joined again (as the host does)."""
    numbered = []
    pieces: list[str] = []
    for message in sent:
        assert message["kind"] == LINES and message["run"] == "r" and message["attempt"] == "a"
        lines = message["lines"]
        if message.get("more"):
            assert len(lines) == 1 and (not numbered or numbered[-1][0] < message["seq"])
            pieces += lines
            continue
        if pieces:
            lines = ["".join([*pieces, lines[0]]), *lines[1:]]
            pieces = []
        numbered.extend(enumerate(lines, start=message["seq"]))
    assert not pieces
    return numbered


async def first_message(sent: list[dict[str, Any]]) -> None:
    async with asyncio.timeout(30):
        while not sent:  # noqa: ASYNC110 - the forwarder task appends; polling is the test
            await asyncio.sleep(0.001)


async def end(capture: OutputCapture, forwarder: OutputForwarder, task: asyncio.Task[None]) -> None:
    await capture.close_run("r")
    forwarder.finish()
    await asyncio.wait_for(task, 30)
    await capture.aclose()


async def test_every_line_goes_out_once_in_order_in_bounded_batches() -> None:
    capture = capture_of(10_000)
    sent: list[dict[str, Any]] = []
    forwarder = forwarder_for(capture, sent, max_batch_chars=500)
    task = asyncio.create_task(forwarder.run())
    for i in range(2_000):
        await capture.append_line("r", f"line {i}")
        if i % 300 == 0:
            await asyncio.sleep(0.005)  # bursts with pauses, as a module prints
    await end(capture, forwarder, task)
    assert unpack(sent) == [(i, f"line {i}") for i in range(2_000)]
    assert all(len(m["lines"]) <= 100 and sum(map(len, m["lines"])) <= 500 for m in sent)
    assert forwarder.lines_sent == 2_000 and forwarder.dropped == 0


async def test_the_first_line_after_a_quiet_spell_goes_at_once() -> None:
    capture = capture_of(100)
    sent: list[dict[str, Any]] = []
    # A long interval: only the "after a quiet spell" rule can send the line before the end.
    forwarder = forwarder_for(capture, sent, flush_interval=3600)
    task = asyncio.create_task(forwarder.run())
    await capture.append_line("r", "hello")
    await first_message(sent)
    assert unpack(sent) == [(0, "hello")]
    await capture.append_line("r", "bye")
    await end(capture, forwarder, task)  # the end does not wait for the next turn
    assert unpack(sent) == [(0, "hello"), (1, "bye")]


async def test_a_module_printing_faster_than_the_send_rate_loses_its_oldest_lines_counted() -> None:
    # The worker keeps ten lines. While the forwarder waits for its next turn, 100 lines come:
    # the ring keeps the newest ten, the forwarder counts the 90 it never saw, and the sequence
    # numbers show the gap to the host.
    capture = capture_of(10)
    sent: list[dict[str, Any]] = []
    forwarder = forwarder_for(capture, sent, flush_interval=3600)
    task = asyncio.create_task(forwarder.run())
    await capture.append_line("r", "line 0")
    await first_message(sent)
    for i in range(1, 101):
        await capture.append_line("r", f"line {i}")
    await end(capture, forwarder, task)
    assert unpack(sent) == [(0, "line 0")] + [(i, f"line {i}") for i in range(91, 101)]
    assert forwarder.dropped == 90 and forwarder.lines_sent == 11


async def test_the_workers_buffer_sends_long_lines_whole_for_the_hosts_own_bound() -> None:
    # It cut them to its own max_line_bytes (64 KiB by default): the host, whose capture has
    # its own bound and whose log file keeps lines whole, could not get the text back.
    capture = ForwardedOutput(max_lines=100, max_line_bytes=1024)
    capture.open_run("r")
    sent: list[dict[str, Any]] = []
    forwarder = forwarder_for(capture, sent, max_batch_chars=1000)
    task = asyncio.create_task(forwarder.run())
    long = "é" * 100_000
    await capture.append_lines("r", ["short", long, "x" * 5000])
    await capture.append_line("r", long)
    await end(capture, forwarder, task)
    assert unpack(sent) == [(0, "short"), (1, long), (2, "x" * 5000), (3, long)]
    assert forwarder.dropped == 0 and forwarder.lines_sent == 4
    # In pieces: no message is larger than a batch (the scheduler keeps the newest ones).
    assert all(sum(map(len, message["lines"])) <= 1000 for message in sent)
