"""Every Python block in README.md and docs/*.md runs as written.

A block runs in a fresh interpreter, in an empty temporary directory, and must exit 0 with no
traceback or logged error on stderr. A block that starts a server is marked in the Markdown with
``<!-- docs-test: server (...) -->`` right above it and runs as a server here (beside a stand-in
``myapp.py``, on a free port, until it has answered a request that runs a child and been stopped); a
block that shows an error on purpose or is a fragment says ``<!-- docs-test: skip (reason) -->``; a
block that imports the reader's own module says ``<!-- docs-test: stand-in NAME -->`` and runs
beside the stand-in files ``STAND_INS[NAME]`` (a small ``my_app``, say); a block whose first line is
``# name.py`` is one file of a worked example that its own test runs whole.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(
    r"(?:<!--\s*docs-test:\s*(?P<mark>[^>]*?)\s*-->\s*\n)?```python\n(?P<code>.*?)```", re.S
)


_EXAMPLE_FILE = re.compile(r"# [\w/.-]+\.py\n")

#: Files a ``stand-in NAME`` block runs beside, for the reader's own code it imports.
STAND_INS: dict[str, dict[str, str]] = {
    # docs/TESTING.md "Without pytest": an app whose deploy runs `make deploy`, which really runs
    # in the block's THREADED part.
    "my_app": {
        "my_app.py": (
            "import prismq_subprocess as pq\n\n\n"
            "async def deploy() -> None:\n"
            '    await pq.run("make", "deploy", check=True)\n\n\n'
            "async def publish() -> None:\n"
            '    await pq.run("git", "push", "origin", cwd="/srv/repo")\n'
        ),
        "Makefile": "deploy:\n\t@echo deployed\n",
    },
}


def _blocks(*, server: bool = False) -> list[object]:
    params: list[object] = []
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        for number, match in enumerate(_FENCE.finditer(text), start=1):
            line = text.count("\n", 0, match.start("code")) + 1
            ident = f"{path.relative_to(ROOT)}:{line}"
            mark = (match.group("mark") or "").strip()
            marks = []
            code = match.group("code")
            if mark.startswith("server") != server:
                continue
            if mark.startswith("skip"):
                marks.append(pytest.mark.skip(reason=f"marked in the Markdown: {mark}"))
            elif _EXAMPLE_FILE.match(code):
                # One file of a multi-file worked example (its first line names it); the example
                # runs as a whole in its own test (tests/plugin/ for docs/TESTING.md).
                marks.append(pytest.mark.skip(reason="a file of a worked example, run whole"))
            stand_in = mark.removeprefix("stand-in").strip() if mark.startswith("stand-in") else ""
            if stand_in and stand_in not in STAND_INS:
                raise LookupError(f"{ident}: no stand-in named {stand_in!r} in STAND_INS")
            params.append(pytest.param(code, stand_in, id=ident, marks=marks))
            del number
    return params


@pytest.mark.parametrize(("code", "stand_in"), _blocks())
def test_block_runs_as_written(code: str, stand_in: str, tmp_path: Path) -> None:
    for name, text in STAND_INS.get(stand_in, {}).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
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
    # A reader who copies a block must not see a traceback or an error logged on its way to a
    # successful end (the Dask example once printed one from the scheduler as its cluster closed).
    assert "Traceback" not in done.stderr and " - ERROR - " not in done.stderr, report


# The stand-in for the reader's ASGI app: each request runs a child through the library, on the
# loop the block built with subprocess_loop_factory().
MYAPP = """\
import sys
import prismq_subprocess as pq

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    result = await pq.run(sys.executable, "-c", "print('child ran')", check=True)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": result.stdout})
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize(("code", "stand_in"), _blocks(server=True))
def test_server_block_serves_as_written(code: str, stand_in: str, tmp_path: Path) -> None:
    (tmp_path / "myapp.py").write_text(MYAPP, encoding="utf-8")
    port = _free_port()
    # Only the port changes (8000 may be taken on a shared machine).
    code, replaced = re.subn(r"\bport=8000\b", f"port={port}", code)
    assert replaced == 1, "the server block no longer sets port=8000"
    server = subprocess.Popen(
        [sys.executable, "-X", "dev", "-c", code],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as answer:
                    body = answer.read()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        assert body == b"child ran\n"
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit by SIGTERM).
    assert server.returncode in (0, -signal.SIGTERM), err
    assert "Finished server process" in err, err


def test_blocks_type_check(tmp_path: Path) -> None:
    # A reader who type-checks the code they copied must not find a misuse of the API in it
    # (an attribute of a union member, a keyword given twice): every block that runs is checked
    # by mypy (not --strict: the blocks are short scripts without annotations of their own).
    pytest.importorskip("mypy")
    names: dict[str, str] = {}
    for number, param in enumerate([*_blocks(), *_blocks(server=True)]):
        assert isinstance(param, type(pytest.param()))
        if param.marks:
            continue  # a fragment, or a file of a worked example checked whole elsewhere
        code, stand_in = param.values
        assert isinstance(code, str) and isinstance(stand_in, str)
        module = f"block_{number:02d}"
        names[module] = str(param.id)
        (tmp_path / f"{module}.py").write_text(code, encoding="utf-8")
        for name, text in STAND_INS.get(stand_in, {}).items():
            if name.endswith(".py"):
                (tmp_path / name).write_text(text, encoding="utf-8")
    (tmp_path / "myapp.py").write_text(MYAPP, encoding="utf-8")
    (tmp_path / "mypy.ini").write_text("[mypy]\n", encoding="utf-8")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            "mypy.ini",
            "--check-untyped-defs",
            "--cache-dir",
            str(tmp_path / ".mypy_cache"),
            *sorted(f"{module}.py" for module in names),
        ],
        cwd=tmp_path,
        # The package's sources (an editable install's import hook is invisible to mypy).
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
        stdin=subprocess.DEVNULL,
    )
    report = re.sub(
        r"block_(\d\d)\.py", lambda match: names[f"block_{match.group(1)}"], done.stdout
    )
    assert done.returncode == 0, f"{report}\n{done.stderr}"
