"""docs/TESTING.md's worked example (a FastAPI app tested with pq_dry_run) runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import HOST_PYTEST_ARGS

pytest_plugins = ["pytester"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "TESTING.md"
# A code block whose first line names the file it is: "# app.py", "# modules/report.py".
# The example's pytest configuration is a block of its own ("# pytest.ini"): the project runs with
# that file and nothing else, so the example cannot lean on a setting the reader is not shown.
FILE_BLOCK = re.compile(
    r"```(?:python|ini)\n# (?P<name>[\w/]+\.(?:py|ini))\n(?P<body>.*?)```", re.DOTALL
)


def example_files() -> dict[str, str]:
    return {m["name"]: m["body"] for m in FILE_BLOCK.finditer(DOC.read_text(encoding="utf-8"))}


def write_project(pytester: pytest.Pytester, files: dict[str, str]) -> None:
    for name, body in files.items():
        path = pytester.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body, encoding="utf-8")


def test_the_doc_names_the_example_files() -> None:
    assert set(example_files()) == {"pytest.ini", "app.py", "modules/report.py", "test_app.py"}


def test_the_worked_example_passes_without_starting_anything(pytester: pytest.Pytester) -> None:
    write_project(pytester, example_files())
    # (The suite's own strictness about unclosed resources on top of what the reader is shown.)
    result = pytester.runpytest(
        *HOST_PYTEST_ARGS, "-W", "error::ResourceWarning", "-v", "test_app.py"
    )
    result.assert_outcomes(passed=3)


def test_the_worked_example_fails_if_the_endpoint_runs_an_unscripted_command(
    pytester: pytest.Pytester,
) -> None:
    files = example_files()
    # The app now also runs a command of its own before starting the module.
    files["app.py"] = (
        files["app.py"]
        .replace(
            '    script = MODULES / f"{body.module}.py"\n',
            '    script = MODULES / f"{body.module}.py"\n'
            "    await pq.run(sys.executable, '-c', 'print(1)')\n",
        )
        .replace("from typing import Any\n", "from typing import Any\nimport sys\n")
    )
    write_project(pytester, files)
    result = pytester.runpytest(*HOST_PYTEST_ARGS, "-k", "streams_its_output", "test_app.py")
    result.assert_outcomes(failed=1)
    assert "nothing is scripted for" in result.stdout.str()


def test_the_worked_example_app_answers_client_errors_with_4xx(pytester: pytest.Pytester) -> None:
    """Any client can send a ``Last-Event-ID`` that is not a line number, or ask for a run whose
    output is no longer kept: the reader's app answers 400 and 410, not a 500 (or a request that
    waits forever)."""
    files = example_files()
    files["test_app.py"] += """

async def test_a_bad_last_event_id_is_a_bad_request(pq_dry_run, client):
    pq_dry_run.register(prefix=(sys.executable,), lines=["x"])
    run_id = (await client.post("/runs", json={"module": "report"})).json()["run_id"]
    response = await client.get(f"/runs/{run_id}/events", headers={"Last-Event-ID": "abc"})
    assert response.status_code == 400, response.text
    assert "last_event_id" in response.json()["detail"]
    await client.get(f"/runs/{run_id}/events")  # the run ends before the lifespan closes


async def test_a_run_whose_output_was_released_is_gone(pq_dry_run, client):
    pq_dry_run.register(prefix=(sys.executable,), lines=["x"])
    run_id = (await client.post("/runs", json={"module": "report"})).json()["run_id"]
    await client.get(f"/runs/{run_id}/events")
    backend.app.state.runner.output.forget(run_id)  # as retention does, later
    response = await client.get(f"/runs/{run_id}/events")
    assert response.status_code == 410, response.text
"""
    write_project(pytester, files)
    result = pytester.runpytest(*HOST_PYTEST_ARGS, "-k", "bad_request or released", "test_app.py")
    result.assert_outcomes(passed=2)
