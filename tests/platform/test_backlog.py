"""Backlog: blocking jobs run in order on one worker thread that lingers briefly when idle."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from prismq_subprocess._platform._backlog import Backlog


def _threads(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == name]


def test_jobs_run_in_order_and_a_failure_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    backlog = Backlog("test-backlog-order", linger=0.05)
    ran: list[int] = []

    def fail() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR):
        for i in range(5):
            backlog.submit(lambda i=i: ran.append(i))
            if i == 2:
                backlog.submit(fail)
        assert backlog.wait_idle(5)
    assert ran == [0, 1, 2, 3, 4]
    assert "a job failed" in caplog.text and "boom" in caplog.text


def test_jobs_in_quick_succession_share_one_thread_which_then_goes() -> None:
    # Starting a thread costs the submitter (the event loop's thread) tens of microseconds and
    # waits for the new thread to run: a job per spawn must not pay that each time.
    name = "test-backlog-linger"
    backlog = Backlog(name, linger=0.5)
    seen: list[int] = []
    for _ in range(20):
        backlog.submit(lambda: seen.append(threading.get_ident()))
        assert backlog.wait_idle(5)
        time.sleep(0.001)
    assert len(set(seen)) == 1
    assert _threads(name)  # still lingering
    deadline = time.monotonic() + 5
    while _threads(name) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _threads(name) == []  # an idle host holds no thread for it
    backlog.submit(lambda: seen.append(threading.get_ident()))
    assert backlog.wait_idle(5)
    assert len(seen) == 21


def test_a_job_submitted_as_the_thread_gives_up_still_runs() -> None:
    backlog = Backlog("test-backlog-race", linger=0.0)
    ran = []
    for i in range(300):
        backlog.submit(lambda i=i: ran.append(i))
        if i % 3 == 0:
            time.sleep(0.0005)
    assert backlog.wait_idle(5)
    assert ran == list(range(300))


def test_where_no_thread_can_start_the_jobs_run_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # Python 3.12+ refuses new threads at interpreter shutdown, where weakref finalizers (a
    # process object's release) still submit jobs: they must run, and quietly.
    backlog = Backlog("test-backlog-shutdown", linger=0.05)
    ran: list[str] = []

    def refuse(self: threading.Thread) -> None:
        raise RuntimeError("can't create new thread at interpreter shutdown")

    with monkeypatch.context() as patched:
        patched.setattr(threading.Thread, "start", refuse)
        backlog.submit(lambda: ran.append("first"))
        backlog.submit(lambda: ran.append("second"))
        assert ran == ["first", "second"]
        assert backlog.wait_idle(0)
    backlog.submit(lambda: ran.append("third"))  # threads again: back to normal
    assert backlog.wait_idle(5)
    assert ran == ["first", "second", "third"]


class _ReenteringEvent(threading.Event):
    """Calls ``reenter`` from inside set()/clear(), as a weakref finalizer run by the cyclic
    GC in the middle of those calls would (one ran Containment's release_soon there)."""

    def __init__(self, reenter: Callable[[], None], on: str) -> None:
        super().__init__()
        super().set()  # idle at first, as the backlog makes it
        self.reenter = reenter
        self.on = on  # "set" (the drain thread going idle) or "clear" (a submit)

    def _fire(self, where: str) -> None:
        if self.on == where:
            self.on = ""
            self.reenter()

    def set(self) -> None:
        with self._cond:  # held, as when the GC strikes inside Event.set
            self._fire("set")
        super().set()

    def clear(self) -> None:
        with self._cond:
            self._fire("clear")
        super().clear()


@pytest.mark.parametrize("where", ["drain", "submit"])
def test_a_job_submitted_from_inside_the_backlog_itself_neither_deadlocks_nor_is_lost(
    where: str,
) -> None:
    # A finalizer may submit on a thread that holds the backlog's lock (the drain thread setting
    # its idle event, or a submit clearing it): the lock is not reentrant, and the whole host
    # hung (CI: test_roundtrip, the drain thread and the main thread both in submit()).
    backlog = Backlog("prismq-test-reenter", linger=0.05)
    ran: list[str] = []
    on = "set" if where == "drain" else "clear"
    backlog._idle = _ReenteringEvent(lambda: backlog.submit(lambda: ran.append("nested")), on)
    submitter = threading.Thread(target=backlog.submit, args=(lambda: ran.append("outer"),))
    submitter.start()
    submitter.join(5)
    assert not submitter.is_alive(), "submit() deadlocked"
    # In a thread of its own: a deadlocked backlog holds the idle event's lock for good.
    idle: list[bool] = []
    waiter = threading.Thread(target=lambda: idle.append(backlog.wait_idle(5)), daemon=True)
    waiter.start()
    waiter.join(10)
    assert idle == [True], "the drain thread deadlocked"
    deadline = time.monotonic() + 5
    while sorted(ran) != ["nested", "outer"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sorted(ran) == ["nested", "outer"]


# A host that forks (gunicorn --preload, a multiprocessing "fork" pool) while the worker thread
# lingers: the child inherits a backlog that believes its thread exists.
_FORK_SCRIPT = """
import os, sys, threading
from prismq_subprocess._platform._backlog import Backlog

class Move:
    def __init__(self, gate):
        self.gate = gate
        self.dropped = False
    def __call__(self):
        self.gate.wait(10)
    def drop(self):
        self.dropped = True

backlog = Backlog("prismq-test-fork", linger=30.0)
gate = threading.Event()
backlog.submit(lambda: gate.wait(10))  # the thread is busy (or lingers) at the fork
queued = Move(gate)
backlog.submit(queued)                   # and a job of the parent's is still queued
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    ran = []
    backlog.submit(lambda: ran.append(1))
    idle = backlog.wait_idle(10)
    os.write(w, f"{idle} {ran} {queued.dropped}".encode())
    os._exit(0)
gate.set()
os.waitpid(pid, 0)
print(os.read(r, 100).decode())
print("parent", backlog.wait_idle(10), queued.dropped)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_runs_its_own_jobs_and_drops_the_parents() -> None:
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", _FORK_SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # The child: its job ran (on a thread of its own), the parent's queued job was dropped
    # (never run there: it concerns the parent's children) and told so (its pidfd closed).
    # The parent: untouched, its queued job ran.
    assert done.stdout.split("\n")[:2] == ["True [1] True", "parent True False"]
