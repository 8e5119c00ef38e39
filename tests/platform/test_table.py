"""The process-table snapshot: parsing, the parent map, groups, and the real /proc."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from prismq_subprocess._platform._table import (
    ProcessEntry,
    ProcessTable,
    proc_state,
    psutil_state,
    scan_proc,
    scan_psutil,
)


def table(*entries: tuple[int, int, int, str, float]) -> ProcessTable:
    return ProcessTable(ProcessEntry(*e) for e in entries)


def test_descendants_follow_the_parent_map_parents_first() -> None:
    t = table(
        (10, 1, 10, "S", 100),
        (11, 10, 10, "S", 101),
        (12, 11, 10, "S", 102),
        (13, 10, 13, "R", 103),
        (20, 1, 20, "S", 50),
    )
    found = [e.pid for e in t.descendants(10)]
    assert sorted(found) == [11, 12, 13]
    assert found.index(11) < found.index(12)
    assert t.descendants(20) == []
    assert t.descendants(999) == []  # gone: nothing below it
    assert [e.pid for e in t.children(10)] == [11, 13]


def test_a_child_older_than_the_root_is_a_reused_pid() -> None:
    t = table((10, 1, 10, "S", 100), (11, 10, 11, "S", 99), (12, 11, 11, "S", 150))
    assert t.descendants(10) == []


def test_groups_with_runners_ignores_zombies() -> None:
    t = table((10, 1, 10, "Z", 1), (11, 1, 10, "Z", 1), (20, 1, 20, "Z", 1), (21, 1, 20, "S", 1))
    assert t.groups_with_runners([10, 20, 30]) == {20}


def test_scan_proc_parses_names_with_spaces_and_parentheses(tmp_path: Path) -> None:
    def stat(pid: int, name: str, state: str, ppid: int, pgid: int, start: int) -> None:
        between = " ".join(["0"] * 15)  # fields 7-21 (tty_nr ... itrealvalue)
        after = " ".join(["0"] * 30)
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(
            f"{pid} ({name}) {state} {ppid} {pgid} {pgid + 100} {between} {start} {after}\n"
        )

    stat(5, "a b) (c", "T", 1, 5, 777)
    stat(6, "plain", "S", 5, 5, 778)
    (tmp_path / "self").mkdir()  # not a pid: skipped
    (tmp_path / "7").mkdir()  # vanished meanwhile: no stat file
    t = scan_proc(str(tmp_path))
    assert t.entries == {
        5: ProcessEntry(5, 1, 5, "T", 777.0, sid=105),
        6: ProcessEntry(6, 5, 5, "S", 778.0, sid=105),
    }
    assert proc_state(5, str(tmp_path)) == "T"
    assert proc_state(7, str(tmp_path)) == "X"


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="needs /proc")
def test_scan_proc_sees_a_real_child_in_its_group() -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True
    )
    try:
        t = scan_proc()
        entry = t.entries[child.pid]
        assert entry.ppid == os.getpid() and entry.pgid == child.pid == entry.sid
        assert child.pid in {e.pid for e in t.descendants(os.getpid())}
        assert t.groups_with_runners([child.pid]) == {child.pid}
        assert proc_state(child.pid) in "RSD"  # a starting interpreter may be in disk sleep
        assert [h.pid for h in t.handles([entry])] == [child.pid]
    finally:
        child.kill()
        child.wait()
    assert t.handles([entry]) == []  # gone: no handle


def test_scan_psutil_matches_scan_proc_on_this_machine() -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        t = scan_psutil()
        assert t.entries[child.pid].ppid == os.getpid()
        assert psutil_state(child.pid) in "RSD"
    finally:
        child.kill()
        child.wait()
    assert psutil_state(child.pid) == "X"


def test_same_start_allows_for_the_boot_time_moving_by_whole_seconds() -> None:
    # psutil's create_time() is the kernel's boot time (whole seconds, moved by one when NTP
    # slews the clock across a second) plus the ticks since boot: one process read twice may
    # differ by a whole second. Anything else is another process.
    from prismq_subprocess._platform._start_time import same_start

    start = 1_796_225_845.93
    for moved in (0.0, 1.0, -1.0, 2.0, -2.0, 1.0 + 1e-7):
        assert same_start(start, start + moved), moved
    for other in (0.01, 0.5, 0.99 - 0.005, 1.02, 3.0, 30.0, -0.3):
        assert not same_start(start, start + other), other
