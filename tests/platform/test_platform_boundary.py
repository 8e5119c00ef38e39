"""Platform code lives in one place: no module outside ``_platform/`` asks which OS it runs on.

Asking ``sys.platform`` / ``os.name`` here and there gave three definitions of Windows and two
copies of the pidfd check; now ``_platform`` states the host's facts once (``IS_WINDOWS``,
``PIPES_SELECTABLE``, ``pidfd_open``, ...) and everything else uses them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import prismq_subprocess

PACKAGE = Path(prismq_subprocess.__file__).resolve().parent
PLATFORM = PACKAGE / "_platform"

# ``sys.platform``, ``os.name`` and friends: direct questions about the OS.
_OS_QUESTIONS = {("sys", "platform"), ("os", "name"), ("sys", "getwindowsversion")}
# ``hasattr(os, "pidfd_open")``, ``getattr(signal, "SIGKILL", ...)``: the same question in disguise.
_PROBED_MODULES = {"os", "sys", "signal", "select", "subprocess", "asyncio"}


def platform_questions(source: str) -> Iterator[str]:
    """Every place in ``source`` that asks which platform it runs on."""
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in _OS_QUESTIONS:
                yield f"line {node.lineno}: {node.value.id}.{node.attr}"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            args = node.args
            if (
                node.func.id in {"getattr", "hasattr"}
                and len(args) >= 2
                and isinstance(args[0], ast.Name)
                and args[0].id in _PROBED_MODULES
                and isinstance(args[1], ast.Constant)
            ):
                yield f"line {node.lineno}: {node.func.id}({args[0].id}, {args[1].value!r})"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "platform":
                    yield f"line {node.lineno}: import platform"
        elif isinstance(node, ast.ImportFrom):
            names = {alias.name for alias in node.names}
            if (
                node.module == "platform"
                or (node.module == "sys" and "platform" in names)
                or (node.module == "os" and "name" in names)
            ):
                yield f"line {node.lineno}: from {node.module} import {', '.join(sorted(names))}"


def test_no_module_outside_platform_asks_which_os_it_runs_on() -> None:
    offences = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if PLATFORM in path.parents:
            continue
        for where in platform_questions(path.read_text(encoding="utf-8")):
            offences.append(f"{path.relative_to(PACKAGE)} {where}")
    assert offences == [], "ask prismq_subprocess._platform instead:\n" + "\n".join(offences)


def test_the_check_recognises_every_form() -> None:
    source = (
        "import os, sys, signal, platform\n"
        "from sys import platform as p\n"
        "from os import name\n"
        "a = sys.platform == 'win32'\n"
        "b = os.name == 'nt'\n"
        "c = hasattr(os, 'pidfd_open')\n"
        "d = getattr(signal, 'SIGKILL', 15)\n"
        "e = sys.getwindowsversion()\n"
        "# sys.platform in a comment and 'os.name' in a string are fine\n"
        "f = getattr(obj, 'x', None)\n"
    )
    found = list(platform_questions(source))
    assert len(found) == 8, found
    assert not any("obj" in f for f in found)


def test_the_platform_package_is_where_the_questions_are() -> None:
    # The boundary test above must not pass merely because nothing asks at all.
    asked = [
        where
        for path in PLATFORM.rglob("*.py")
        for where in platform_questions(path.read_text(encoding="utf-8"))
    ]
    assert any("sys.platform" in where for where in asked)
