"""Small helpers shared by the tests (importable because pyproject puts tests/ on sys.path)."""

from __future__ import annotations

import sys

PY = sys.executable


def py(code: str) -> tuple[str, str, str]:
    """The argument tuple that runs ``code`` with this interpreter."""
    return (PY, "-c", code)


#: pytest.ini of the host projects the plugin tests run in a pytester sub-session.
HOST_PYTEST_INI = """
[pytest]
asyncio_mode = auto
asyncio_default_fixture_loop_scope = function
filterwarnings =
    error::ResourceWarning
"""

#: Options of those sub-sessions: no cache files, and no hypothesis plugin, which pytester's
#: in-process runs would otherwise re-import (seconds each) since they unload new modules.
HOST_PYTEST_ARGS = ("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
