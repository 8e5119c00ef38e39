"""A web-backend-shaped host in plain asyncio (no FastAPI needed): start modules in the background,
stream their output as Server-Sent Events, cancel one, then read the run history.

Run it with ``python examples/fastapi_free_host.py``. In a FastAPI app the three pieces map to:
``start_module`` in a POST handler, ``sse_events`` behind a ``StreamingResponse`` with
``media_type="text/event-stream"``, and ``registry.list_runs`` in a GET handler.
"""

from __future__ import annotations

import asyncio
import tempfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import prismq_subprocess as pq

MODULE = """
import argparse, time
parser = argparse.ArgumentParser()
parser.add_argument("--name")
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--loud", action="store_true")
args = parser.parse_args()
for step in range(args.steps):
    print(f"{args.name}: step {step + 1}/{args.steps}" + ("!" if args.loud else ""))
    time.sleep(0.2)
"""


async def sse_events(output: pq.OutputCapture, run_id: str) -> AsyncIterator[str]:
    """What an SSE endpoint sends: one event per line (its seq as the event id, so a browser
    that reconnects can resume with ``subscribe(run_id, after=last_event_id)``), then "end"."""
    async with output.subscribe(run_id) as items:
        async for item in items:
            if isinstance(item, pq.OutputGap):
                yield f"event: gap\ndata: {item.dropped} lines skipped\n\n"
            else:
                yield f"id: {item.seq}\nevent: line\ndata: {item.text}\n\n"
    yield "event: end\ndata: \n\n"


async def browser(output: pq.OutputCapture, run_id: str, label: str) -> None:
    """Stands in for a browser tab showing one run's live output."""
    async for event in sse_events(output, run_id):
        data = event.split("data: ", 1)[1].strip()
        kind = event.split("event: ", 1)[1].split("\n", 1)[0]
        print(f"  [{label}] {kind}: {data}")


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "count.py"
        script.write_text(textwrap.dedent(MODULE))
        async with (
            pq.SQLiteRunRegistry(Path(tmp) / "runs.db") as registry,
            pq.OutputCapture() as output,
            pq.ModuleRunner(registry, output=output, max_concurrent=2, grace_period=2.0) as runner,
        ):
            # POST /modules/count/run, three times: each returns at once with a run id.
            runs = {
                "alpha": await runner.start_module("count", "Counter", script, {"name": "alpha"}),
                "beta": await runner.start_module(
                    "count", "Counter", script, {"name": "beta", "steps": 10, "loud": True}
                ),
                "gamma": await runner.start_module(
                    "count", "Counter", script, {"name": "gamma", "steps": 2}
                ),
            }
            print(f"started in {runner.mode.value} mode (2 at a time): {runs}")

            async with asyncio.TaskGroup() as tabs:
                for label, run_id in runs.items():
                    tabs.create_task(browser(output, run_id, label))
                # DELETE /runs/{beta}: the user stops the long one after a moment.
                await asyncio.sleep(0.7)
                await runner.cancel(runs["beta"], "stopped by the user")

            # GET /runs: the history, as stored (it survives a restart of the host).
            print("run history:")
            for run in await registry.list_runs():
                print(
                    f"  {run.parameters.get('name')}: {run.status.value}, exit {run.exit_code}, "
                    f"{run.duration or 0:.2f} s, tail={run.output_tail[-1:]}, "
                    f"error={run.error_message}"
                )


if __name__ == "__main__":
    asyncio.run(main())
