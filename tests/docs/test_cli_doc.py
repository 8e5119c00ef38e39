"""docs/CLI.md says what the commands print: the keys of ``doctor --json``, the fields of the
``doctor`` sample, and the log file ``runs tail`` reads. These hold against the real commands."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import prismq_subprocess as pq

ROOT = Path(__file__).resolve().parents[2]
CLI_MD = (ROOT / "docs" / "CLI.md").read_text(encoding="utf-8")


def _doctor(*args: str, run_mode: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != pq.ENV_VAR}
    if run_mode is not None:
        env[pq.ENV_VAR] = run_mode
    return subprocess.run(
        [sys.executable, "-m", "prismq_subprocess", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        stdin=subprocess.DEVNULL,
    )


# Names the paragraph quotes that are not keys: "the fields of `ContainmentReport`", "the
# decision without `PRISMQ_RUN_MODE`".
_NOT_KEYS = {"ContainmentReport", pq.ENV_VAR}


def _documented_json_keys() -> dict[str, set[str]]:
    """``{key: its documented sub-keys}`` from the paragraph on ``doctor --json`` (an empty set
    for a key shown without sub-keys)."""
    paragraph = CLI_MD.split("`doctor --json` prints", 1)[1].split("\n\n", 1)[0]
    keys: dict[str, set[str]] = {}
    depth, current = 0, ""
    for token in re.finditer(r"`(\w+)`|[()]", paragraph):
        if token[0] == "(":
            depth += 1
        elif token[0] == ")":
            depth -= 1
        elif depth == 0:
            current = token[1]
            keys[current] = set()
        elif token[1] not in _NOT_KEYS:
            keys[current].add(token[1])
    return keys


@pytest.mark.parametrize("run_mode", [None, "threaded", "turbo"], ids=["unset", "valid", "invalid"])
def test_doctor_json_has_the_documented_keys(run_mode: str | None) -> None:
    documented = _documented_json_keys()
    report: dict[str, Any] = json.loads(_doctor("--json", run_mode=run_mode).stdout)
    assert set(report) == set(documented)
    for key, sub_keys in documented.items():
        if sub_keys:
            assert set(report[key]) == sub_keys, key


def test_the_doctor_sample_shows_the_real_fields_and_version() -> None:
    sample = CLI_MD.split("$ prismq-subprocess doctor\n", 1)[1].split("```", 1)[0]
    real = _doctor().stdout

    def fields(text: str) -> dict[str, str]:
        """The unindented ``label : value`` lines (the indented ones depend on the host)."""
        pairs = (line.split(" : ", 1) for line in text.splitlines() if line[:1].strip())
        return {label.strip(): value for label, value in pairs}

    assert list(fields(sample)) == list(fields(real))
    assert (
        fields(sample)["prismq_subprocess"] == pq.__version__ == fields(real)["prismq_subprocess"]
    )


def test_the_runs_tail_log_name_example_is_run_log_path() -> None:
    section = CLI_MD.split("- `runs tail RUN_ID --log-dir DIR`", 1)[1].split("\n- ", 1)[0]
    examples = re.findall(r"run id `([^`]+)`: `DIR/([^`]+)`", " ".join(section.split()))
    assert examples, "docs/CLI.md no longer shows how a run id becomes its log file's name"
    for run_id, name in examples:
        assert pq.run_log_path("DIR", run_id) == Path("DIR", name)
