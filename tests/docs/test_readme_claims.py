"""README.md's statements about the test summary hold: the xfailed count it gives for each Python
is the count the suite has, every xfail is strict (so no run ever shows an xpassed), and each
kind of difference behind them is named."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")
COMPAT = ROOT / "tests" / "core" / "test_asyncio_compat.py"


def test_xfail_marks_live_only_in_the_asyncio_compatibility_tests() -> None:
    users = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").rglob("*.py")
        if path != Path(__file__).resolve() and "xfail" in path.read_text(encoding="utf-8")
    )
    assert users == ["tests/core/test_asyncio_compat.py"]


def test_the_readme_gives_the_xfailed_count_and_reasons(pytester: pytest.Pytester) -> None:
    items, _ = pytester.inline_genitems(str(COMPAT), "-p", "no:cacheprovider")
    marks = [mark for item in items for mark in item.iter_markers("xfail")]
    # A mark applies when its condition (positional or keyword, if any) is true on this Python.
    active = [mark for mark in marks if all(mark.args) and mark.kwargs.get("condition", True)]
    assert all(mark.kwargs.get("strict") is True for mark in marks), "a non-strict xfail"
    stated = re.search(r"(\d+) on Python 3\.11, (\d+) on 3\.12 and 3\.13", README)
    assert stated, "README.md no longer states the xfailed count per Python"
    expected = int(stated[1] if sys.version_info < (3, 12) else stated[2])
    assert len(active) == expected
    assert re.search(r"never\s+shows\s+an\s+`xpassed`", README), "README.md: xpassed claim"
    assert all(mark.kwargs.get("reason") for mark in marks), "an xfail without a reason"
    section = README.split("## What runs where")[1].split("## Performance")[0]
    for phrase in ("LOCAL", "own session", "empty shell command", "communicate()"):
        assert phrase in section, f"README.md's 'What runs where' no longer names {phrase!r}"
