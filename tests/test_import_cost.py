"""What importing the package, and loading its pytest plugin, costs: the modules they import.

Counted, not timed (timings belong to benchmarks/): a fresh interpreter imports the package or
the plugin and reports which of the package's modules, and which heavy dependencies, it
loaded. ``import prismq_subprocess`` loads the API on first use of one of its names, and
pytest loads the plugin in every session of every project that has the package installed,
most of which never use it.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

PROBE = textwrap.dedent(
    """
    import json, sys
    before = set(sys.modules)
    {statement}
    loaded = sorted(set(sys.modules) - before)
    print(json.dumps(loaded))
    """
)
HEAVY = ("psutil", "sqlite3", "asyncio", "concurrent.futures")


def loaded_by(statement: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(statement=statement)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded: list[str] = json.loads(done.stdout)
    return loaded


def test_importing_the_package_loads_nothing_until_a_name_is_used() -> None:
    loaded = loaded_by("import prismq_subprocess")
    ours = [name for name in loaded if name.startswith("prismq_subprocess.")]
    assert ours == []
    assert not [name for name in loaded if name.split(".")[0] in HEAVY or name in HEAVY]


def test_the_first_name_used_loads_the_api() -> None:
    loaded = loaded_by("import prismq_subprocess as pq; pq.SubprocessWrapper")
    assert "prismq_subprocess._core._wrapper" in loaded
    assert "prismq_subprocess._background._sqlite_registry" in loaded
    assert "prismq_subprocess.testing" in loaded


@pytest.mark.parametrize(
    "statement",
    [
        "import prismq_subprocess.exceptions",
        "import prismq_subprocess.abc",
        "import prismq_subprocess.testing",
        "from prismq_subprocess import RunMode",
        "from prismq_subprocess import *",
    ],
)
def test_each_way_in_publishes_the_names_as_before(statement: str) -> None:
    # Whatever is imported first, every name ends up shown under the public module that
    # documents it, the top level first (as when the package loaded everything at once).
    check = (
        statement
        + "\nimport prismq_subprocess as pq, prismq_subprocess.testing as t"
        + "\nassert pq.RunMode.__module__ == 'prismq_subprocess', pq.RunMode.__module__"
        + "\nassert pq.PrismQError.__module__ == 'prismq_subprocess'"
        + "\nassert t.DryRunScript.__module__ == 'prismq_subprocess.testing'"
        + "\nimport prismq_subprocess.exceptions as e"
        + "\nassert e.RegistryClosedError.__module__ == 'prismq_subprocess.exceptions'"
    )
    loaded_by(check)


def test_loading_the_pytest_plugin_imports_none_of_the_heavy_parts() -> None:
    loaded = loaded_by("import prismq_subprocess.pytest_plugin")
    heavy = [
        name
        for name in loaded
        if name.split(".")[0] in ("psutil", "sqlite3")
        or name.startswith(
            (
                "prismq_subprocess._background",
                "prismq_subprocess._strategies",
                "prismq_subprocess._platform",
                "prismq_subprocess._resources",
                "prismq_subprocess._core._wrapper",
            )
        )
    ]
    assert heavy == []


def run_fresh(code: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_a_mock_patch_as_the_first_use_leaves_the_name_in_place() -> None:
    # A new user's find: mock.patch("prismq_subprocess.run") as the first use of the API found
    # no "run" in the module's __dict__, so deleted it on exit; the name then raised KeyError
    # (not AttributeError) from __getattr__ for the rest of the process.
    done = run_fresh(
        """
        from unittest import mock
        import prismq_subprocess as pq
        with mock.patch("prismq_subprocess.run") as fake:
            assert pq.run is fake
        from prismq_subprocess._core._dropin import run
        assert pq.run is run, pq.run
        del pq.run
        assert pq.run is run  # (served from the API again)
        assert not hasattr(pq, "no_such_name")
        """
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    "first",
    [
        ("import prismq_subprocess.testing", "pq.SubprocessWrapper"),
        ("import prismq_subprocess.exceptions", "pq.SubprocessWrapper"),
        ("import prismq_subprocess.abc", "pq.SubprocessWrapper"),
        ("import prismq_subprocess.testing", "import prismq_subprocess.exceptions"),
        ("import prismq_subprocess.abc", "import prismq_subprocess.testing"),
    ],
    ids=lambda pair: " + ".join(pair),
)
def test_first_uses_from_two_threads_at_once_do_not_deadlock(first: tuple[str, str]) -> None:
    # The same user's find: a thread importing a public sub-module while another used a
    # top-level name for the first time hung for good (the API's lock and the sub-module's
    # import lock taken in opposite orders). Several rounds, each a fresh interpreter.
    code = """
        import sys, threading
        import prismq_subprocess as pq
        barrier = threading.Barrier(2)
        errors = []

        def use(statement):
            barrier.wait()
            try:
                exec(statement, {"pq": pq})
            except BaseException as exc:
                errors.append(repr(exc))

        threads = [threading.Thread(target=use, args=(s,), daemon=True) for s in sys.argv[1:]]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert not any(thread.is_alive() for thread in threads), "deadlocked"
        assert errors == [], errors
        assert pq.RunMode.__module__ == "prismq_subprocess"
        import prismq_subprocess.testing as t
        assert t.DryRunScript.__module__ == "prismq_subprocess.testing"
        """
    for _ in range(4):
        done = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(code), *first],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr[-2000:]


def test_no_private_module_imports_a_public_sub_module() -> None:
    # Why the first use cannot deadlock: the API's import (under the loading lock) never waits
    # for a public sub-module's import lock, which a thread importing that sub-module holds
    # while it waits for the loading lock. A private module importing one would undo that.
    import ast
    from pathlib import Path

    import prismq_subprocess

    root = Path(prismq_subprocess.__file__).parent
    public = {"abc", "testing", "exceptions"}
    offenders = []
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if relative.parts[0] in {"__init__.py", "abc.py", "testing.py", "exceptions.py"}:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom):
                module = node.module or ""
                if node.level and not module:  # from .. import testing
                    names = [alias.name for alias in node.names]
                else:
                    names = (
                        [module.rsplit(".", 1)[-1]]
                        if module.startswith(("prismq_subprocess.", ".")) or node.level
                        else []
                    )
            elif isinstance(node, ast.Import):
                names = [
                    alias.name.rsplit(".", 1)[-1]
                    for alias in node.names
                    if alias.name.startswith("prismq_subprocess.")
                ]
            if public & set(names):
                offenders.append(f"{relative}:{node.lineno}")
    assert offenders == []
