"""cgroup v2 sub-groups: finding our cgroup, the file protocol, and the real hierarchy here."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prismq_subprocess._platform._cgroup import Cgroups, find_cgroup_dir


def fake_proc(tmp_path: Path, cgroup: str, mountinfo: str) -> str:
    (tmp_path / "self").mkdir()
    (tmp_path / "self" / "cgroup").write_text(cgroup)
    (tmp_path / "self" / "mountinfo").write_text(mountinfo)
    return str(tmp_path)


def test_finds_the_cgroup_directory_in_a_hybrid_hierarchy(tmp_path: Path) -> None:
    proc = fake_proc(
        tmp_path,
        "4:memory:/x\n0::/user.slice/app.scope\n",
        "30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n"
        "35 25 0:30 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n",
    )
    assert find_cgroup_dir(proc) == "/sys/fs/cgroup/unified/user.slice/app.scope"


def test_finds_the_cgroup_directory_under_a_namespaced_mount(tmp_path: Path) -> None:
    # In a container the mount's root is the container's cgroup.
    proc = fake_proc(
        tmp_path,
        "0::/docker/abc/worker\n",
        "40 30 0:31 /docker/abc /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
    )
    assert find_cgroup_dir(proc) == "/sys/fs/cgroup/worker"


def test_no_cgroup2_means_none(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "1:cpu:/\n", "30 25 0:26 / /sys/fs/cgroup/cpu rw - cgroup cgroup\n")
    assert find_cgroup_dir(proc) is None
    assert find_cgroup_dir(str(tmp_path / "missing")) is None


def test_the_file_protocol(tmp_path: Path) -> None:
    groups = Cgroups(str(tmp_path))
    path = groups.create("run-1")
    assert path is not None and groups.create("run-1") is None  # exists already
    Path(path, "cgroup.procs").write_text("12\n34\n")
    Path(path, "cgroup.events").write_text("populated 1\nfrozen 0\n")
    Path(path, "cgroup.freeze").write_text("0")
    Path(path, "cgroup.kill").write_text("")
    assert groups.members(path) == [12, 34]
    assert groups.populated(path) and not groups.is_frozen(path)
    assert groups.freeze(path, True) and Path(path, "cgroup.freeze").read_text() == "1"
    assert groups.kill(path) and Path(path, "cgroup.kill").read_text() == "1"
    assert not groups.remove(path)  # not empty (here: files; in cgroupfs: EBUSY)
    for f in Path(path).iterdir():
        f.unlink()
    assert groups.remove(path) and groups.remove(path)  # gone is removed
    assert groups.members(path) == [] and not groups.populated(path)
    assert groups.is_frozen(path)  # a sub-group that is gone holds nothing that could run


def real_cgroups() -> Cgroups:
    groups = Cgroups.probe()
    if groups is None:
        pytest.skip("no writable cgroup v2 directory here")
    return groups


def test_a_real_sub_group_holds_freezes_and_kills_a_tree() -> None:
    groups = real_cgroups()
    path = groups.create(f"prismq-test-{time.monotonic_ns()}")
    assert path is not None
    child = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import subprocess, time; subprocess.Popen(['sleep', '30']);"
            "print('ready', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert groups.enter(path, child.pid)
        assert child.stdout is not None and child.stdout.readline() == b"ready\n"
        members = groups.members(path)
        assert child.pid in members and len(members) == 2  # the grandchild was born inside
        assert groups.freeze(path, True)
        deadline = time.monotonic() + 5
        while not groups.is_frozen(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert groups.is_frozen(path)
        assert groups.freeze(path, False)
        if groups.can_kill:
            assert groups.kill(path)
        else:
            for pid in members:
                subprocess.run(["kill", "-9", str(pid)], check=False)
        assert child.wait(10) == -9
        deadline = time.monotonic() + 5
        while groups.populated(path) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not groups.populated(path)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stdout is not None
        child.stdout.close()
        groups.remove(path)


def test_sub_groups_of_dead_hosts_are_removed_and_live_ones_kept(tmp_path: Path) -> None:
    from prismq_subprocess._platform._posix_host import PosixHost

    dead_pid = 4_000_000  # above pid_max: no such process
    names = [
        f"prismq-{dead_pid:x}abcdef-1",  # a dead host's, empty: goes
        f"prismq-{os.getpid():x}abcdef-2",  # ours: kept
        "prismq-1abcdef-3",  # pid 1 lives: kept
        "unrelated",
    ]
    for name in names:
        (tmp_path / name).mkdir()
    # A host that ran inside the dead one's run and died too left its own sub-group in it: the
    # pair was never removed (rmdir of a cgroup with a cgroup inside is EBUSY).
    (tmp_path / names[0] / f"prismq-{dead_pid + 1:x}abcdef-1").mkdir()
    host = PosixHost(use_subreaper=False)
    host.cgroups = Cgroups(str(tmp_path))
    host._remove_stale_cgroups()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[1:])


def test_a_sub_group_with_empty_sub_groups_inside_is_removed_and_a_populated_one_kept() -> None:
    groups = real_cgroups()
    outer = groups.create(f"prismq-test-{os.getpid()}-outer")
    assert outer is not None
    inner = os.path.join(outer, "prismq-test-inner")
    deeper = os.path.join(inner, "prismq-test-deeper")
    os.mkdir(inner)
    os.mkdir(deeper)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert groups.enter(deeper, child.pid)
        assert not groups.remove(outer)  # a process lives in it: everything is kept
        assert os.path.isdir(deeper)
        child.kill()
        child.wait()
        for _ in range(200):  # the kernel updates "populated" once the child is gone
            if not groups.populated(outer):
                break
            time.sleep(0.01)
        assert groups.remove(outer)
        assert not os.path.exists(outer)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        for path in (deeper, inner, outer):
            with contextlib.suppress(OSError):
                os.rmdir(path)


def test_a_host_leaves_no_sub_group_behind() -> None:
    groups = real_cgroups()
    code = (
        "import asyncio, prismq_subprocess as pq\n"
        "async def main():\n"
        "    async with pq.SubprocessWrapper('async') as w:\n"
        "        for _ in range(5):\n"
        "            await w.run('true')\n"
        "        await w.create_subprocess_exec('true')\n"  # ends unseen, no stop
        "    print(pq.containment_report().cookie_variable[11:].lower(), flush=True)\n"
        "asyncio.run(main())\n"
    )
    token = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, check=True, text=True
    ).stdout.strip()
    left = [name for name in os.listdir(groups.base) if name.startswith(f"prismq-{token}-")]
    assert left == []
