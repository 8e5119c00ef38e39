"""The example scripts run as the README says (``python examples/quickstart.py``), from the
repository root, in a fresh interpreter, and print what they describe. (examples/fastapi_app runs
under real uvicorn in tests/webapp.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run_example(name: str) -> str:
    done = subprocess.run(
        [sys.executable, "-X", "dev", f"examples/{name}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={k: v for k, v in os.environ.items() if k != "PRISMQ_RUN_MODE"},
    )
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_quickstart_runs_as_the_readme_says() -> None:
    out = _run_example("quickstart.py")
    assert "auto-detected mode: async" in out
    assert "[run] exit=0" in out
    assert [line for line in out.splitlines() if line.startswith("[stream] step")] == [
        f"[stream] step {i}" for i in range(5)
    ]
    assert "[stream] exit=0" in out
    # (What the child printed before the limit depends on how fast it started.)
    assert "[timeout] 0.5s limit hit; output so far: " in out
    assert "[dry-run] git push said b'pushed\\n'" in out


def test_fastapi_free_host_runs_as_its_docstring_says() -> None:
    out = _run_example("fastapi_free_host.py")
    assert "started in async mode" in out
    for name, steps in (("alpha", 3), ("gamma", 2)):
        assert f"  [{name}] end : {{'status': 'completed', 'exit_code': 0}}" in out
        assert f"  {name}: completed, exit 0," in out
        assert f"{name}: step {steps}/{steps}" in out
    assert "  [beta] end : {'status': 'cancelled'," in out
    assert "  beta: cancelled," in out and "error=stopped by the user" in out
