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
from prismq_subprocess.dask._channel import LINES, OutputForwarder


def forwarder_for(
    capture: OutputCapture, sent: list[dict[str, Any]], **kwargs: Any
) -> OutputForwarder:
    settings = {"max_batch_lines": 100, "max_batch_chars": 10_000, "flush_interval": 0.01}
    settings.update(kwargs)
    return OutputForwarder(
        capture.subscribe("r"), sent.append, {"run": "r", "attempt": "a"}, **settings
    )


def unpack(sent: list[dict[str, Any]]) -> list[tuple[int, str]]:
    numbered = []
    for message in sent:
        assert message["kind"] == LINES and message["run"] == "r" and message["attempt"] == "a"
        numbered.extend(enumerate(message["lines"], start=message["seq"]))
    return numbered


async def test_every_line_goes_out_once_in_order_in_bounded_batches() -> None:
    capture = OutputCapture(max_lines_per_run=1, subscriber_queue_size=10_000)
    sent: list[dict[str, Any]] = []
    forwarder = forwarder_for(capture, sent)
    task = asyncio.create_task(forwarder.run())
    for i in range(2_000):
        await capture.append_line("r", f"line {i}")
        if i % 300 == 0:
            await asyncio.sleep(0)  # let the forwarder run between bursts
    await capture.close_run("r")
    await asyncio.wait_for(task, 30)
    assert unpack(sent) == [(i, f"line {i}") for i in range(2_000)]
    assert all(len(m["lines"]) <= 100 for m in sent)
    assert forwarder.lines_sent == 2_000 and forwarder.dropped == 0


async def test_the_first_line_after_a_quiet_spell_goes_at_once() -> None:
    capture = OutputCapture(max_lines_per_run=1)
    sent: list[dict[str, Any]] = []
    # A long interval: only the "after a quiet spell" rule can send the line before the end.
    task = asyncio.create_task(forwarder_for(capture, sent, flush_interval=3600).run())
    await capture.append_line("r", "hello")
    async with asyncio.timeout(30):
        while not sent:  # noqa: ASYNC110 - the forwarder task appends; polling is the test
            await asyncio.sleep(0.001)
    assert unpack(sent) == [(0, "hello")]
    await capture.close_run("r")
    await asyncio.wait_for(task, 30)


async def test_a_module_printing_faster_than_the_send_rate_loses_its_oldest_lines_counted() -> None:
    # Ten lines may wait on the worker. A burst of 100 lines arrives while the forwarder is
    # busy: the oldest 90 are dropped and counted, and the sequence numbers show the gap.
    capture = OutputCapture(max_lines_per_run=1, subscriber_queue_size=10)
    sent: list[dict[str, Any]] = []
    forwarder = forwarder_for(capture, sent, max_batch_lines=1)
    task = asyncio.create_task(forwarder.run())
    await capture.append_line("r", "line 0")
    async with asyncio.timeout(30):
        while not sent:  # noqa: ASYNC110 - the forwarder task appends; polling is the test
            await asyncio.sleep(0.001)
    for i in range(1, 101):  # append_line never suspends: the forwarder cannot run meanwhile
        await capture.append_line("r", f"line {i}")
    await capture.close_run("r")
    await asyncio.wait_for(task, 30)
    assert unpack(sent) == [(0, "line 0")] + [(i, f"line {i}") for i in range(91, 101)]
    assert forwarder.dropped == 90 and forwarder.lines_sent == 11
