"""docs/API.md lists exactly the public names: one ``- `Name`` entry per name in each public
module's ``__all__``, under that module's heading, and no entry for a name that is not there."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
from collections.abc import Mapping
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


def documented_signatures(module_name: str) -> list[tuple[str, str]]:
    """``(name, parameters)`` of each ``- `Name(parameters)``` entry."""
    return re.findall(r"^- `(\w+)\(([^`]*)\)`", sections()[module_name], flags=re.M)


def _parameters(text: str) -> list[str]:
    """Top-level comma-separated parts of a documented parameter list."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += char
    if current.strip():
        parts.append(current.strip())
    return parts


def _globals_of(obj: object) -> dict[str, object]:
    """The globals of the code that defines ``obj``'s parameters (public names may carry the
    package's ``__module__``, not the defining module's)."""
    function = obj.__init__ if isinstance(obj, type) else obj  # type: ignore[misc]
    found = getattr(function, "__globals__", None)
    if found is None:  # a class whose __init__ is not Python (a dataclass's is)
        found = vars(sys.modules[obj.__module__])  # type: ignore[attr-defined]
    return dict(found)


def _default_of(obj: object, param: str, default: object) -> object:
    """``default``, or what a dataclass field's ``default_factory`` makes."""
    if repr(default) == "<factory>" and dataclasses.is_dataclass(obj):
        field = next(f for f in dataclasses.fields(obj) if f.name == param)
        return field.default_factory()  # type: ignore[misc]
    return default


@pytest.mark.parametrize("module_name", MODULES)
def test_documented_parameters_exist_with_their_defaults(module_name: str) -> None:
    """Each parameter an entry shows exists in the code, and a default it shows is the code's
    (a reader takes `run_immediately=False` at its word)."""
    module = importlib.import_module(module_name)
    checked = 0
    for name, documented in documented_signatures(module_name):
        obj = getattr(module, name)
        try:
            signature = inspect.signature(obj)
        except (TypeError, ValueError):  # no signature to compare (a builtin, say)
            continue
        actual = signature.parameters
        for part in _parameters(documented):
            if part in ("*", "/", "...") or part.startswith("**"):
                continue
            param, _, default = part.lstrip("*").partition("=")
            assert param in actual, f"{name}: docs/API.md shows a parameter {param!r}"
            if default:
                value = _default_of(obj, param, actual[param].default)
                assert value is not inspect.Parameter.empty, (
                    f"{name}: docs/API.md shows a default for {param}, the code has none"
                )
                # Evaluated where the object is defined: a default may be shown by the name of
                # its constant (DEFAULT_GRACE_PERIOD) or as an expression (2**16).
                namespace = {**_globals_of(obj), **vars(module)}
                shown = eval(default, namespace)
                if isinstance(value, Mapping):  # a read-only default shown as {}
                    value = dict(value)
                # 3600 for 3600.0 is fine; True for 1 is not.
                numbers = all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in (shown, value)
                )
                assert shown == value and (numbers or type(shown) is type(value)), (
                    f"{name}: docs/API.md shows {param}={default}, the code's default is {value!r}"
                )
            checked += 1
    assert checked or not documented_signatures(module_name)
