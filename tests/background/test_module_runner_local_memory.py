"""ModuleRunner in RunMode.LOCAL keeps its output memory bounded (soak finding 2)."""

from __future__ import annotations

import sys
import tracemalloc

import pytest

import prismq_subprocess as pq
from prismq_subprocess._background._module_runner import ModuleRunner

#: The child's output: far more than the bound below, in 1 KiB lines.
OUTPUT_BYTES = 64 * 2**20
LINE_BYTES = 1024
CHATTY = (
    sys.executable,
    "-c",
    "import sys\n"
    f"line = b'x' * {LINE_BYTES - 1} + b'\\n'\n"
    "block = line * 256\n"
    f"for _ in range({OUTPUT_BYTES} // len(block)):\n"
    "    sys.stdout.buffer.write(block)\n",
)
#: docs/BACKGROUND.md: the host holds a bounded part of a run's output. Well under its size.
MEMORY_BOUND = 16 * 2**20


@pytest.mark.skipif(sys.platform == "win32", reason="the bound is the same; the test is slow")
async def test_a_local_module_run_holds_a_bounded_part_of_its_output() -> None:
    # LOCAL hands output over once the child has exited: it held the whole output in memory
    # until then, and copied it into a reader at the exit (about twice the output).
    async with (
        pq.RunRegistry() as registry,
        pq.OutputCapture(max_lines_per_run=1000) as output,
        ModuleRunner(registry, output=output, run_mode="local", grace_period=1.0) as runner,
    ):
        tracemalloc.start()
        try:
            run = await runner.execute_command("chatty", "Chatty", list(CHATTY))
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert run.status is pq.RunStatus.COMPLETED, run.error_message
        # Every line reached the capture (it keeps the newest, and counts them all).
        assert output.line_count(run.run_id) == OUTPUT_BYTES // LINE_BYTES
    assert peak < MEMORY_BOUND, f"peak {peak / 2**20:.1f} MiB for {OUTPUT_BYTES / 2**20:.0f} MiB"
