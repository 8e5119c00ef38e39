"""RunMode parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

import prismq_subprocess as pq
from prismq_subprocess import RunMode

VALID = {"async", "threaded", "local", "dry-run"}


def test_values() -> None:
    assert [m.value for m in RunMode] == ["async", "threaded", "local", "dry-run"]
    assert str(RunMode.DRY_RUN) == "dry-run"


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("DRY_RUN", RunMode.DRY_RUN),
        (" Threaded ", RunMode.THREADED),
        ("dry-run", RunMode.DRY_RUN),
        ("ASYNC", RunMode.ASYNC),
        ("\tlocal\n", RunMode.LOCAL),
        (RunMode.LOCAL, RunMode.LOCAL),
    ],
)
def test_forgiving_parse(text: str, mode: RunMode) -> None:
    assert RunMode.parse(text) is mode
    assert RunMode(text) is mode


@pytest.mark.parametrize("bad", ["", "thread", "dry run", "dryrun", "asyncio", 3, None])
def test_bad_values_list_the_valid_ones(bad: object) -> None:
    with pytest.raises(pq.exceptions.InvalidRunModeError) as info:
        RunMode.parse(bad)  # type: ignore[arg-type]
    assert isinstance(info.value, ValueError)
    for value in VALID:
        assert repr(value) in str(info.value)


def _normal(text: str) -> str:
    return text.strip().lower().replace("_", "-")


@given(st.text(alphabet=st.sampled_from("asyncthreadlocdry-_ \tASYNCTHREADLOCDRY"), max_size=12))
def test_parse_accepts_exactly_the_documented_spellings(text: str) -> None:
    if _normal(text) in VALID:
        assert RunMode.parse(text).value == _normal(text)
    else:
        with pytest.raises(pq.exceptions.InvalidRunModeError):
            RunMode.parse(text)


@given(st.sampled_from(sorted(VALID)), st.text(" \t\n", max_size=3), st.text(" \t\n", max_size=3))
def test_case_underscore_and_space_variants(value: str, left: str, right: str) -> None:
    for variant in (value, value.upper(), value.title(), value.replace("-", "_")):
        assert RunMode.parse(left + variant + right).value == value
