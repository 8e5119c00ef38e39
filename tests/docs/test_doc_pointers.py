"""What the issue asks the documents to say where a reader looks first (issue 12 items 7, 9)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _opening(name: str) -> str:
    """The text of a document before its first ``##`` section."""
    return (ROOT / name).read_text(encoding="utf-8").split("\n## ", 1)[0]


def test_windows_page_sends_readers_to_doctor_first() -> None:
    assert "python -m prismq_subprocess doctor" in _opening("docs/WINDOWS.md")


def test_readme_says_windows_paths_have_not_run_on_windows() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## What runs where", 1)[1].split("\n## ", 1)[0]
    assert "unit-tested on Linux" in section
    assert "have not yet run on\n  Windows" in section or "have not yet run on Windows" in section
    assert "python -m prismq_subprocess doctor" in section
