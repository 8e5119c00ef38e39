"""``doctor``: the real report, its JSON form, and the containment probe's rules."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_support import cli

from prismq_subprocess._cli import _doctor
from prismq_subprocess._cli._containment import probe_containment

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux host")


def test_doctor_text_report() -> None:
    result = cli("doctor")
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    keys = {line.split(" : ")[0].strip() for line in text.splitlines() if " : " in line}
    for key in (
        "platform",
        "python",
        "event loop",
        "loop can spawn",
        "PRISMQ_RUN_MODE",
        "auto-detected mode",
        "psutil",
        "memory",
        "processes",
        "containment",
    ):
        assert key in keys, text
    assert "loop can spawn     : yes" in text
    assert "PRISMQ_RUN_MODE    : unset (auto-detect)" in text
    # Values are aligned in one column.
    top = [line for line in text.splitlines() if not line.startswith(" ")]
    assert len({line.index(" : ") for line in top}) == 1


def test_doctor_json_report() -> None:
    result = cli("doctor", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["python"]["executable"] == sys.executable
    assert report["platform"]["sys_platform"] == sys.platform
    assert report["event_loop"]["can_spawn"] is True
    assert report["event_loop"]["spawn_error"] is None
    assert report["env_var"] == {
        "name": "PRISMQ_RUN_MODE",
        "value": None,
        "valid": None,
        "error": None,
    }
    detected = report["mode"]["detected"]
    if not sys.platform.startswith("win"):
        assert detected["mode"] == "async"
        assert report["event_loop"]["class"] == "_UnixSelectorEventLoop"
    assert detected["source"] == "auto" and detected["reason"]
    ps = report["psutil"]
    assert ps["cpu_count"] >= 1 and ps["process_count"] > 1
    assert 0 < ps["memory_available_bytes"] <= ps["memory_total_bytes"]
    names = [m["name"] for m in report["containment"]]
    assert names == ["process-groups", "child-subreaper", "cgroup-v2", "job-objects"]


def test_doctor_reports_the_pinned_mode() -> None:
    report = json.loads(cli("doctor", "--json", env={"PRISMQ_RUN_MODE": " Threaded "}).stdout)
    assert report["env_var"]["valid"] is True and report["env_var"]["mode"] == "threaded"
    assert report["mode"]["detected"]["mode"] == "threaded"
    assert report["mode"]["detected"]["source"] == "environment"


def test_doctor_flags_an_invalid_env_var() -> None:
    result = cli("doctor", env={"PRISMQ_RUN_MODE": "turbo"})
    assert result.returncode == 1
    text = result.stdout.decode()
    assert "'turbo' INVALID" in text
    assert "PRISMQ_RUN_MODE is invalid (without it:" in text
    report = json.loads(cli("doctor", "--json", env={"PRISMQ_RUN_MODE": "turbo"}).stdout)
    assert report["env_var"]["valid"] is False and "turbo" in report["env_var"]["error"]
    assert report["mode"]["detected"] is None and "turbo" in report["mode"]["error"]


class _NoSubprocessLoop(asyncio.SelectorEventLoop):
    """What Windows' SelectorEventLoop does when asked to spawn."""

    async def _make_subprocess_transport(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError


class _NoSubprocessPolicy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return _NoSubprocessLoop()


@pytest.fixture
def no_subprocess_policy() -> Iterator[None]:
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_NoSubprocessPolicy())
    try:
        yield
    finally:
        asyncio.set_event_loop_policy(old)


@pytest.mark.usefixtures("no_subprocess_policy")
def test_doctor_reports_a_loop_that_cannot_spawn() -> None:
    report = _doctor.collect()
    loop = report["event_loop"]
    assert loop["class"] == "_NoSubprocessLoop" and loop["policy"] == "_NoSubprocessPolicy"
    assert loop["can_spawn"] is False
    assert "NotImplementedError" in loop["spawn_error"]
    assert "loop can spawn     : no: _NoSubprocessLoop has no subprocess support" in (
        _doctor.render(report)
    )


# -- the containment probe, with an injected /proc and cgroup tree ------------------------------


def _fake_host(tmp_path: Path, mounts: str, cgroup: str) -> tuple[Path, Path]:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "self" / "mounts").write_text(mounts)
    (proc / "self" / "cgroup").write_text(cgroup)
    root = tmp_path / "cgroup"
    group = root / "user.slice" / "app.scope"
    group.mkdir(parents=True)
    (group / "cgroup.procs").write_text("")
    return proc, root


def _by_name(mechanisms: list[Any]) -> dict[str, Any]:
    return {m.name: m for m in mechanisms}


def test_unified_writable_cgroup_is_available(tmp_path: Path) -> None:
    proc, root = _fake_host(tmp_path, "", "0::/user.slice/app.scope\n")
    (proc / "self" / "mounts").write_text(f"cgroup2 {root} cgroup2 rw,nosuid 0 0\n")
    found = _by_name(
        probe_containment(
            platform="linux", proc_root=proc, cgroup_root=root, get_subreaper=lambda: 0
        )
    )
    cgroup = found["cgroup-v2"]
    assert cgroup.available is True
    assert str(root / "user.slice" / "app.scope") in cgroup.detail
    assert found["child-subreaper"].available is True
    assert found["process-groups"].available is (hasattr(os, "setsid") and hasattr(os, "killpg"))
    assert found["job-objects"].available is None


def test_read_only_cgroup_is_not_available(tmp_path: Path) -> None:
    proc, root = _fake_host(tmp_path, "", "0::/user.slice/app.scope\n")
    (proc / "self" / "mounts").write_text(f"cgroup2 {root} cgroup2 ro 0 0\n")
    cgroup = _by_name(
        probe_containment(
            platform="linux",
            proc_root=proc,
            cgroup_root=root,
            access=lambda path, mode: False,
            get_subreaper=lambda: 0,
        )
    )["cgroup-v2"]
    assert cgroup.available is False and "not writable" in cgroup.detail


def test_hybrid_cgroup_host_is_not_unified(tmp_path: Path) -> None:
    mounts = (
        "tmpfs {root} tmpfs rw 0 0\n"
        "cgroup {root}/memory cgroup rw,memory 0 0\n"
        "cgroup2 {root}/unified cgroup2 rw 0 0\n"
    )
    proc, root = _fake_host(tmp_path, "", "4:memory:/x\n0::/\n")
    (proc / "self" / "mounts").write_text(mounts.format(root=root))
    cgroup = _by_name(
        probe_containment(
            platform="linux", proc_root=proc, cgroup_root=root, get_subreaper=lambda: 0
        )
    )["cgroup-v2"]
    assert cgroup.available is False
    assert f"cgroup2 is mounted at {root}/unified" in cgroup.detail


def test_subreaper_probe_failure_is_reported() -> None:
    def broken() -> int:
        raise OSError(22, "Invalid argument")

    subreaper = _by_name(probe_containment(platform="linux", get_subreaper=broken))[
        "child-subreaper"
    ]
    assert subreaper.available is False and "Invalid argument" in subreaper.detail


@linux_only
def test_subreaper_probe_really_calls_prctl() -> None:
    # In a fresh interpreter: once the library has started a child, this very process may be a
    # subreaper (containment sets it on purpose); the probe itself must never set it.
    code = (
        "from prismq_subprocess._cli._containment import probe_containment\n"
        "m = {x.name: x for x in probe_containment()}['child-subreaper']\n"
        "print(m.available, m.detail)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("True ")
    assert "is not a subreaper" in done.stdout  # looking never sets it


def test_windows_and_macos_rules() -> None:
    windows = _by_name(probe_containment(platform="win32"))
    assert windows["process-groups"].available is None
    assert windows["child-subreaper"].available is None
    assert windows["cgroup-v2"].available is None
    # Off Windows there is no ctypes.windll, so the injected platform finds no kernel32.
    expected = sys.platform == "win32"
    assert windows["job-objects"].available is expected
    mac = _by_name(probe_containment(platform="darwin"))
    assert mac["child-subreaper"].available is None and mac["cgroup-v2"].available is None
    assert mac["job-objects"].available is None
