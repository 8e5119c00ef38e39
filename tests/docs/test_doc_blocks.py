"""Every Python block in README.md and docs/*.md runs as written.

A block runs in a fresh interpreter, in an empty temporary directory, and must exit 0. A block
that only makes sense inside a running server is marked in the Markdown with
``<!-- docs-test: server -->`` right above it and runs in the host-app tests instead; a block that
shows an error on purpose or is a fragment says ``<!-- docs-test: skip (reason) -->``; a block
whose first line is ``# name.py`` is one file of a worked example that its own test runs whole.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(
    r"(?:<!--\s*docs-test:\s*(?P<mark>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S
)


_EXAMPLE_FILE = re.compile(r"# [\w/.-]+\.py\n")


def _blocks() -> list[object]:
    params: list[object] = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for number, match in enumerate(_FENCE.finditer(text), start=1):
            line = text.count("\n", 0, match.start("code")) + 1
            ident = f"{path.relative_to(ROOT)}:{line}"
            mark = (match.group("mark") or "").strip()
            marks = []
            code = match.group("code")
            if mark.startswith(("skip", "server")):
                marks.append(pytest.mark.skip(reason=f"marked in the Markdown: {mark}"))
            elif _EXAMPLE_FILE.match(code):
                # One file of a multi-file worked example (its first line names it); the example
                # runs as a whole in its own test (tests/plugin/ for docs/TESTING.md).
                marks.append(pytest.mark.skip(reason="a file of a worked example, run whole"))
            params.append(pytest.param(code, id=ident, marks=marks))
            del number
    return params


@pytest.mark.parametrize("code", _blocks())
def test_block_runs_as_written(code: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-X", "dev", "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    report = f"exit {done.returncode}\n--- stdout\n{done.stdout}\n--- stderr\n{done.stderr}"
    assert done.returncode == 0, report
