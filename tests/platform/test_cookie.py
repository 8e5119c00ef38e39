"""Cookies.look on a fake /proc: telling a process inside an exec from an empty environment."""

from __future__ import annotations

from prismq_subprocess._platform._cookie import (
    _EQUAL_KEPT,
    _LAYOUT_SETTLE,
    _LAYOUT_SETTLE_RUNNABLE,
    Cookies,
)


def _stat(pid: int, start: int, env_start: int, env_end: int, state: str = "S") -> bytes:
    # Fields 3.. of /proc/<pid>/stat: state, then 48 more; index 6 the flags, 19 the start time,
    # 47 and 48 the environment's bounds.
    fields = [state] + ["0"] * 48
    fields[19] = str(start)
    fields[47], fields[48] = str(env_start), str(env_end)
    return f"{pid} (x) ".encode() + " ".join(fields).encode()


class _FakeProc:
    def __init__(self) -> None:
        self.now = 100.0
        self.environ: dict[int, bytes] = {}
        self.stat: dict[int, bytes] = {}

    def read(self, path: str, limit: int | None = None) -> bytes | None:
        _, _, pid, name = path.split("/")  # /proc/<pid>/<name>
        table = self.environ if name == "environ" else self.stat
        return table.get(int(pid))

    def cookies(self) -> Cookies:
        return Cookies(token="T", proc_root="/proc", read_file=self.read, clock=lambda: self.now)


def test_equal_bounds_settle_for_a_moment_then_are_known_as_an_empty_environment() -> None:
    proc = _FakeProc()
    cookies = proc.cookies()
    proc.environ[7] = b""
    proc.stat[7] = _stat(7, 500, 4096, 4096)
    assert cookies.look(7).settling  # maybe an exec laying its environment out
    proc.now += _LAYOUT_SETTLE / 2
    assert cookies.look(7).settling
    proc.now += _LAYOUT_SETTLE
    assert not cookies.look(7).settling  # that long: an empty environment
    proc.now += 60
    assert not cookies.look(7).settling  # known: not waited for again


def test_equal_bounds_of_a_process_waiting_for_a_cpu_settle_longer() -> None:
    # CI on a loaded machine (3.13, four workers on 2 cores): a process laying out its
    # environment lost its CPU for over _LAYOUT_SETTLE, was taken for one with an empty
    # environment, and outlived the stop of its tree. Runnable (R) or in an uninterruptible
    # wait (D), it is still laying out; asleep (S), it has nothing more to lay out.
    proc = _FakeProc()
    cookies = proc.cookies()
    proc.environ[7] = b""
    proc.stat[7] = _stat(7, 500, 4096, 4096, state="R")
    assert cookies.look(7).settling
    proc.now += _LAYOUT_SETTLE * 3
    assert cookies.look(7).settling  # runnable: waiting for a CPU
    proc.stat[7] = _stat(7, 500, 4096, 4096, state="D")
    proc.now += _LAYOUT_SETTLE * 3
    assert cookies.look(7).settling
    proc.stat[7] = _stat(7, 500, 4096, 4096, state="S")
    assert not cookies.look(7).settling  # asleep with nothing laid out: an empty environment
    proc.stat[8] = _stat(8, 600, 4096, 4096, state="R")
    proc.environ[8] = b""
    assert cookies.look(8).settling
    proc.now += _LAYOUT_SETTLE_RUNNABLE + 1
    assert not cookies.look(8).settling  # runnable for that long: a busy empty-env process


def test_a_process_seen_laid_out_is_waited_for_again_at_its_next_exec() -> None:
    # A process that execs again and again (env env env ... sleep) may be caught laying out its
    # environment more than once: an environment read in between forgets the first time.
    proc = _FakeProc()
    cookies = proc.cookies()
    proc.environ[7] = b""
    proc.stat[7] = _stat(7, 500, 4096, 4096)
    assert cookies.look(7).settling
    proc.environ[7] = b"PRISMQ_RUN_T=3\0"
    assert cookies.look(7) == (("3", False, False))
    proc.now += 10
    proc.environ[7] = b""
    assert cookies.look(7).settling


def test_a_reused_pid_with_equal_bounds_is_waited_for_again() -> None:
    proc = _FakeProc()
    cookies = proc.cookies()
    proc.environ[7] = b""
    proc.stat[7] = _stat(7, 500, 4096, 4096)
    cookies.look(7)
    proc.now += 1
    assert not cookies.look(7).settling
    proc.stat[7] = _stat(7, 900, 4096, 4096)  # another process with that pid
    assert cookies.look(7).settling


def test_unset_or_growing_bounds_always_settle_and_the_memory_is_bounded() -> None:
    proc = _FakeProc()
    cookies = proc.cookies()
    proc.environ[1] = b""
    proc.stat[1] = _stat(1, 5, 0, 0)
    proc.now += 60
    assert cookies.look(1).settling  # no environment set up yet: always inside an exec
    for pid in range(100, 100 + _EQUAL_KEPT + 50):
        proc.environ[pid] = b""
        proc.stat[pid] = _stat(pid, 5, 64, 64)
        assert cookies.look(pid).settling
    assert len(cookies._equal) == _EQUAL_KEPT
