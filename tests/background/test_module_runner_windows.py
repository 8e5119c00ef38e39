"""ModuleRunner's up-front program check under Windows' rules (``IS_WINDOWS`` injected): it must
agree with what CreateProcess finds, which adds only ``.exe`` to a bare name (no PATHEXT) and
searches this process's PATH, not the child's ``env``. POSIX keeps ``shutil.which``'s rules."""

from __future__ import annotations

from pathlib import Path

import pytest

import prismq_subprocess as pq
from prismq_subprocess._background import _module_runner
from prismq_subprocess._background._module_runner import _find_program
from prismq_subprocess._core import _validation


@pytest.fixture
def bin_dir(tmp_path: Path) -> Path:
    for name in ("npm.cmd", "tool.exe"):
        (tmp_path / name).write_text("@echo off\n")
        (tmp_path / name).chmod(0o755)
    return tmp_path


def test_windows_rules_refuse_what_only_pathext_would_find(
    bin_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_module_runner, "IS_WINDOWS", True)
    monkeypatch.setattr(_validation, "IS_WINDOWS", True)  # the error's wording
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("PATHEXT", ".COM;.EXE;.BAT;.CMD;.com;.exe;.bat;.cmd")
    with pytest.raises(pq.CommandNotFoundError) as info:
        _find_program("npm", None, None)  # CreateProcess looks for npm.exe only
    assert "npm.cmd" in str(info.value) and "shell=True" in str(info.value)
    _find_program("npm.cmd", None, None)
    _find_program("tool", None, None)  # tool.exe: the one suffix Windows adds
    _find_program("tool.exe", None, None)


def test_windows_rules_search_this_process_path_not_the_child_env(
    bin_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> None:
    monkeypatch.setattr(_module_runner, "IS_WINDOWS", True)
    monkeypatch.setenv("PATH", str(tmp_path_factory.mktemp("empty")))
    with pytest.raises(pq.CommandNotFoundError):
        _find_program("tool", None, {"PATH": str(bin_dir)})
    monkeypatch.setenv("PATH", str(bin_dir))
    _find_program("tool", None, {"PATH": str(tmp_path_factory.mktemp("other"))})
    _find_program(str(bin_dir / "tool"), None, None)  # a path: '.exe' added too
    with pytest.raises(pq.CommandNotFoundError):
        _find_program(str(bin_dir / "npm"), None, None)


def test_posix_rules_are_unchanged(bin_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_module_runner, "IS_WINDOWS", False)
    _find_program("npm.cmd", None, {"PATH": str(bin_dir)})  # the child's PATH, as before
    with pytest.raises(pq.CommandNotFoundError):
        _find_program("tool", None, {"PATH": str(bin_dir)})  # no suffix added
