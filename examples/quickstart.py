"""Quick start: run real commands in the auto-detected mode, stream output, then a dry run.

    python examples/quickstart.py          (LOG_LEVEL=INFO shows the library's own logs)
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys

import prismq_subprocess as pq
from prismq_subprocess.testing import DryRunRecorder, DryRunResponse, DryRunStrategy

PY = sys.executable


async def main() -> None:
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING").upper())

    decision = pq.detect_run_mode()
    print(f"auto-detected mode: {decision.mode} -- because {decision.reason}")

    async with pq.SubprocessWrapper() as wrapper:
        # 1. Run a command to completion and look at the result.
        result = await wrapper.run(PY, "-c", "import platform; print(platform.platform())")
        summary = result.stdout_text.strip()
        print(f"[run] exit={result.returncode} in {result.duration:.3f}s: {summary}")

        # 2. Stream a child's output line by line while it runs.
        code = (
            "import time\n"
            "for i in range(5):\n"
            "    print(f'step {i}', flush=True)\n"
            "    time.sleep(0.1)"
        )
        process, stdout, _ = await wrapper.create_subprocess(PY, "-c", code)
        async for line in pq.iter_lines(stdout, encoding="utf-8"):
            print(f"[stream] {line.rstrip()}")
        print(f"[stream] exit={await process.wait()}")

        # 3. A timeout stops the whole process tree and keeps the output so far.
        try:
            await wrapper.run(
                PY, "-c", "print('started', flush=True); import time; time.sleep(60)", timeout=0.5
            )
        except pq.ProcessTimeoutError as exc:
            print(f"[timeout] {exc.timeout}s limit hit; output so far: {exc.stdout!r}")

    # 4. DRY_RUN: nothing starts; commands are recorded and answered from a script.
    recorder = DryRunRecorder({("git", "push"): DryRunResponse(stdout=b"pushed\n")})
    async with pq.SubprocessWrapper(strategy=DryRunStrategy(recorder=recorder)) as dry:
        pushed = await dry.run("git", "push")
        await dry.run("rm", "-rf", "/tmp/something")
    print(f"[dry-run] git push said {pushed.stdout!r}; recorded: {recorder.commands}")


if __name__ == "__main__":
    asyncio.run(main())
