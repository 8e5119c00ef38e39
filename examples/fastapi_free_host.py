"""A web-backend-shaped host in plain asyncio (no FastAPI needed): start modules in the background,
stream their output as Server-Sent Events, cancel one, then read the run history.

Run it with ``python examples/fastapi_free_host.py``. In a FastAPI app the three pieces map to:
``start_module`` in a POST handler, ``pq.sse_events`` behind a ``StreamingResponse`` with
``headers=pq.SSE_HEADERS``, and ``registry.list_runs`` in a GET handler.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import textwrap
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


async def browser(output: pq.OutputCapture, run_id: str, label: str) -> None:
    """Stands in for a browser tab showing one run's live output through an SSE endpoint."""
    # In FastAPI: StreamingResponse(pq.sse_events(output, run_id), headers=dict(pq.SSE_HEADERS))
    async for chunk in pq.sse_events(output, run_id):
        for event in chunk.split("\n\n"):
            fields = dict(line.split(": ", 1) for line in event.splitlines() if ": " in line)
            if "event" in fields:
                data = json.loads(fields["data"])
                shown = data.get("text", data)
                print(f"  [{label}] {fields['event']} {fields.get('id', '')}: {shown}")


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
            print(f"started in {runner.mode} mode (2 at a time): {runs}")

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
