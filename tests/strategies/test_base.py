"""Tests of the strategy base (prismq_subprocess/_strategies/_base.py)."""

from __future__ import annotations

import dataclasses
import io
import subprocess

import pytest

from prismq_subprocess._strategies._base import SpawnRequest


@pytest.mark.parametrize("stdin", [subprocess.PIPE, subprocess.DEVNULL])
def test_with_run_pipes_matches_replace(stdin: int) -> None:
    # Every field set to a value other than its default, so a field the method forgot shows.
    defaults = SpawnRequest(("x",), False)
    request = SpawnRequest(
        (b"/bin/echo", "hi"),
        True,
        stdin=io.BytesIO(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        limit=defaults.limit + 1,
        kwargs={"cwd": "/"},
        added=frozenset({"start_new_session"}),
        die_with_host=not defaults.die_with_host,
    )
    for field in dataclasses.fields(SpawnRequest):
        if field.name not in ("stdin", "stdout", "stderr"):
            assert getattr(request, field.name) != getattr(defaults, field.name), field.name
    expected = dataclasses.replace(
        request, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert request.with_run_pipes(stdin) == expected


@dataclasses.dataclass(frozen=True)
class _TaggedRequest(SpawnRequest):
    tag: str = ""


def test_with_run_pipes_keeps_a_subclass_and_its_fields() -> None:
    request = _TaggedRequest(("x",), False, tag="mine")
    piped = request.with_run_pipes(subprocess.DEVNULL)
    assert type(piped) is _TaggedRequest and piped.tag == "mine"
    assert (piped.stdin, piped.stdout, piped.stderr) == (
        subprocess.DEVNULL,
        subprocess.PIPE,
        subprocess.PIPE,
    )
