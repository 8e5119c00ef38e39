"""The Dask backend is optional: the core never imports dask, and the extra says how to get it."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_importing_the_package_imports_no_dask() -> None:
    result = run_python(
        """
        import sys
        import prismq_subprocess
        from prismq_subprocess import ModuleRunner
        from prismq_subprocess.abc import ModuleJob, RunBackend, RunContext
        loaded = sorted(
            name for name in sys.modules
            if name.split(".")[0] in {"dask", "distributed"} or name == "prismq_subprocess.dask"
        )
        print(loaded)
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_dask_module_without_the_extra_says_how_to_install_it() -> None:
    # None in sys.modules makes "import distributed" fail as if it were not installed.
    result = run_python(
        """
        import sys
        sys.modules["distributed"] = None
        try:
            import prismq_subprocess.dask
        except ImportError as exc:
            print(exc)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "pip install 'prismq_subprocess[dask]'" in result.stdout
