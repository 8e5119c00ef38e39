"""docs/API.md lists exactly the public names: one ``- `Name`` entry per name in each public
module's ``__all__``, under that module's heading, and no entry for a name that is not there."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

API_MD = Path(__file__).resolve().parent.parent / "docs" / "API.md"
MODULES = [
    "prismq_subprocess",
    "prismq_subprocess.abc",
    "prismq_subprocess.testing",
    "prismq_subprocess.exceptions",
    # The pytest plugin's module (loaded by pytest through its entry point) and the Dask backend
    # (installed with the `dask` extra) are public too.
    "prismq_subprocess.pytest_plugin",
    "prismq_subprocess.dask",
]


def sections() -> dict[str, str]:
    """The text under each ``## `module` `` heading."""
    parts = re.split(r"^## `([\w.]+)`\s*$", API_MD.read_text(encoding="utf-8"), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def entries(text: str) -> list[str]:
    """The names that start a list entry: ``- `Name`` or ``- `Name(...)``."""
    return re.findall(r"^- `(\w+)", text, flags=re.M)


def test_every_public_module_has_a_section() -> None:
    assert list(sections()) == MODULES


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_has_one_entry(module_name: str) -> None:
    listed = entries(sections()[module_name])
    exported = importlib.import_module(module_name).__all__
    missing = sorted(set(exported) - set(listed))
    assert not missing, f"docs/API.md lacks entries for {module_name}: {missing}"
    stale = sorted(set(listed) - set(exported))
    assert not stale, f"docs/API.md lists names {module_name} does not export: {stale}"
    repeated = sorted({name for name in listed if listed.count(name) > 1})
    assert not repeated, f"docs/API.md lists these twice under {module_name}: {repeated}"


@pytest.mark.parametrize("module_name", MODULES)
def test_every_entry_says_what_it_is(module_name: str) -> None:
    """After the name (and its signature or bases) comes ``:`` and a description."""
    blocks = re.findall(r"^- `.*(?:\n  .*)*", sections()[module_name], flags=re.M)
    assert len(blocks) == len(entries(sections()[module_name]))
    for block in blocks:
        assert re.match(r"- `[^`]+`[^:]*:\s+\S.{15,}", block, flags=re.S), block
