"""What ``OutputNotFoundError`` tells a web developer whose stream endpoint cannot find a run.

Its hint used to be "pass wait=True to wait for the run" whatever the cause. For the two usual
mistakes that is wrong: a ``ModuleRunner`` given no ``output=`` (or another capture) never
writes to this capture, and a capture without a ``log_dir`` cannot follow another process's run
through ``registry=``; waiting, in both, is a request that never ends.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import prismq_subprocess as pq
from prismq_subprocess.exceptions import OutputNotFoundError


async def test_a_run_the_runner_writes_elsewhere_names_output_not_wait(tmp_path: Path) -> None:
    async with (
        pq.SQLiteRunRegistry(tmp_path / "runs.db") as registry,
        pq.ModuleRunner(registry) as runner,  # no output=: the usual slip
        pq.OutputCapture() as capture,
    ):
        run = await runner.execute_command("hi", "Hi", [sys.executable, "-c", "print('hi')"])
        assert run.status is pq.RunStatus.COMPLETED and run.output_tail == ["hi"]
        with pytest.raises(OutputNotFoundError) as caught:
            pq.sse_events(capture, run.run_id)
    message = str(caught.value)
    assert run.run_id in message
    assert "output=" in message  # the capture a ModuleRunner writes to
    assert "registry=" in message  # a run of another process
    assert "wait=True" in message  # still the answer for a run not started yet


async def test_registry_without_a_log_dir_says_the_log_dir_is_missing(tmp_path: Path) -> None:
    """Another worker's run, followed through ``registry=`` by a capture without ``log_dir``:
    ``registry=`` is ignored there, and the message says why."""
    async with (
        pq.SQLiteRunRegistry(tmp_path / "runs.db") as registry,
        pq.OutputCapture(log_dir=tmp_path / "logs") as owner_capture,
        pq.ModuleRunner(registry, output=owner_capture) as runner,
        pq.OutputCapture() as other_capture,  # another worker's, without log_dir
    ):
        run = await runner.execute_command("hi", "Hi", [sys.executable, "-c", "print('hi')"])
        with pytest.raises(OutputNotFoundError) as caught:
            pq.sse_events(other_capture, run.run_id, registry=registry)
        # The same call on a capture with the shared log_dir streams the run.
        async with pq.OutputCapture(log_dir=tmp_path / "logs") as shared:
            text = "".join([c async for c in pq.sse_events(shared, run.run_id, registry=registry)])
        assert '"text":"hi"' in text and '"status":"completed"' in text
    message = str(caught.value)
    assert "log_dir" in message and "registry=" in message
    assert "wait=True" not in message


async def test_a_closed_capture_says_it_is_closed(tmp_path: Path) -> None:
    capture = pq.OutputCapture()
    await capture.aclose()
    with pytest.raises(OutputNotFoundError, match="closed"):
        capture.subscribe("some-run")
