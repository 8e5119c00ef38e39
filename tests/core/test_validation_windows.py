"""The not-found error's wording under Windows' rules (``IS_WINDOWS`` injected): ``/`` and ``\\``
both separate a path there, and Windows adds only ``.exe`` to a bare name, so a ``.cmd``/``.bat``
program (npm, yarn) needs its full name or a shell."""

from __future__ import annotations

import errno

import pytest

from prismq_subprocess._core import _validation
from prismq_subprocess._core._validation import not_found_error


def _message(name: str) -> str:
    return str(not_found_error(name, FileNotFoundError(errno.ENOENT, "not found", name)))


@pytest.mark.parametrize("name", ["C:/tools/build.exe", "./build.bat", "C:\\tools\\build.exe"])
def test_a_windows_path_is_no_such_file(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_validation, "IS_WINDOWS", True)
    message = _message(name)
    assert "no such file" in message and "not on PATH" not in message, message


def test_a_bare_name_on_windows_mentions_cmd_and_bat_programs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(_validation, "IS_WINDOWS", True)
    message = _message("npm")
    assert "not on PATH" in message, message
    assert ".cmd" in message and "shell=True" in message, message
    assert ".cmd" not in _message("tool.exe")  # a full name already


def test_posix_wording_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_validation, "IS_WINDOWS", False)
    assert "not on PATH" in _message("npm") and ".cmd" not in _message("npm")
    assert "no such file" in _message("./build.sh")
    assert "no such file" in _message("/usr/bin/nothing-here")
