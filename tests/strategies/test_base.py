"""Tests of the strategy base (prismq_subprocess/_strategies/_base.py)."""

from __future__ import annotations

import dataclasses
import io
import subprocess
from typing import Any

import pytest

import prismq_subprocess as pq
from prismq_subprocess._core._validation import check_timeout
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


@pytest.mark.parametrize(
    "make",
    [
        lambda w: pq.abc.ThreadedStrategy(max_workers=w),
        lambda w: pq.abc.LocalStrategy(max_workers=w),
        lambda w: pq.abc.AsyncStrategy(max_workers=w),
        lambda w: pq.testing.DryRunStrategy(max_workers=w),
    ],
    ids=["threaded", "local", "async", "dry-run"],
)
@pytest.mark.parametrize("workers", [0, -1, "2", 1.5, True])
def test_a_strategy_refuses_a_bad_max_workers_when_it_is_made(make: Any, workers: object) -> None:
    # It used to be taken, then fail at the first spawn with a bare ValueError/TypeError from
    # the thread pool.
    with pytest.raises(pq.exceptions.InvalidLimitError, match="max_workers"):
        make(workers)


def test_a_strategy_takes_a_good_max_workers() -> None:
    strategy = pq.abc.ThreadedStrategy(max_workers=1)
    try:
        assert strategy.max_workers == 1
    finally:
        strategy.close()


@pytest.mark.parametrize("value", [10**400, -(10**400)], ids=["huge", "-huge"])
def test_a_timeout_too_large_for_a_float_is_refused_clearly(value: int) -> None:
    # float() of it raised a bare OverflowError from every timeout/grace_period check.
    with pytest.raises(pq.exceptions.InvalidTimeoutError, match="timeout"):
        check_timeout(value)
