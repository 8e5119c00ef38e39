"""Windows platform operations (``_platform/_windows.py``), run on any OS with the system calls
injected (nothing here has run on real Windows yet; see docs/WINDOWS.md)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from platform_fakes import FakeKernel32, FakeProc, TreeProc, recorder

import prismq_subprocess
from prismq_subprocess._platform import (
    CREATE_NEW_PROCESS_GROUP,
    CTRL_BREAK_EVENT,
    Containment,
    StopTarget,
    is_proactor_loop,
    platform_ops,
    policy_uses_proactor,
)
from prismq_subprocess._platform._job import JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE, JobObjects


def test_windows_group_kwargs() -> None:
    ops = platform_ops("win32")
    # (BELOW_NORMAL_PRIORITY_CLASS: a flag that leaves the child on our console; those that
    # detach it get no group, see test_windows_stop_paths.py.)
    kwargs = ops.group_kwargs({"creationflags": 0x4000}, new_group=True)
    assert kwargs["creationflags"] == 0x4000 | CREATE_NEW_PROCESS_GROUP
    assert ops.started_own_group(kwargs)
    assert ops.group_kwargs({}, new_group=False) == {}
    assert "start_new_session" not in ops.group_kwargs({}, new_group=True)


def test_windows_stop_sends_ctrl_break_then_kills_the_tree() -> None:
    calls, kill = recorder()
    ops = platform_ops("win32", kill=kill)
    assert ops.stop_signal(own_group=True) == CTRL_BREAK_EVENT
    assert ops.stop_signal(own_group=False) == signal.SIGTERM  # TerminateProcess on Windows
    assert ops.signal_group(1234, CTRL_BREAK_EVENT)
    assert calls == [(1234, CTRL_BREAK_EVENT)]
    assert not ops.signal_group(1234, signal.SIGTERM)  # no other group-wide signal
    children = [FakeProc(1), FakeProc(2)]
    ops.kill_tree(1234, True, children)
    assert [c.calls for c in children] == [["kill"], ["kill"]]
    assert calls == [(1234, CTRL_BREAK_EVENT)]
    assert not ops.group_alive(1234, True)


def test_loop_and_policy_detection_by_class_name() -> None:
    class ProactorEventLoop:
        pass

    class Sub(ProactorEventLoop):
        pass

    class WindowsProactorEventLoopPolicy:
        pass

    class Policy:
        _loop_factory = Sub

    assert is_proactor_loop(Sub())  # type: ignore[arg-type]
    assert not is_proactor_loop(None)
    assert policy_uses_proactor(WindowsProactorEventLoopPolicy())
    assert policy_uses_proactor(Policy())
    assert not policy_uses_proactor(object())


def test_windows_finds_what_an_exited_child_left_running() -> None:
    grandchild = TreeProc(3, 2, 100.0)
    left_behind = TreeProc(2, 1234, 100.0, (grandchild,))
    unrelated = TreeProc(5, 999, 100.0)
    stale = TreeProc(6, 1234, 10.0)  # older than our child: a previous owner of that pid
    ops = platform_ops("win32", process_iter=lambda: [left_behind, unrelated, stale])
    assert ops.orphans_of(1234, started_after=50.0) == [left_behind, grandchild]
    assert platform_ops("linux").orphans_of(1234, None) == []


async def test_windows_stop_of_an_exited_child_kills_its_leftovers() -> None:
    from prismq_subprocess._core._tree_stop import register_child, stop_process_tree

    class Exited:
        pid = 1234
        returncode = 0

        async def wait(self) -> int:
            return 0

        def send_signal(self, sig: int) -> None:
            raise ProcessLookupError

        def kill(self) -> None:
            raise ProcessLookupError

    leftover = TreeProc(2, 1234, 10**10)  # created "after" the child
    _, kill = recorder()
    ops = platform_ops("win32", kill=kill, process_iter=lambda: [leftover])
    child = Exited()
    register_child(child, True)
    assert await stop_process_tree(child, grace=0.05, ops=ops) == 0  # type: ignore[arg-type]
    # No group to send CTRL_BREAK to once the child is gone: psutil's SIGTERM (TerminateProcess
    # on Windows) at once, the kill after the grace period for what still shows as running.
    assert leftover.signals == [signal.SIGTERM]
    assert leftover.killed


def test_windows_stop_of_running_children_in_one_batch() -> None:
    # Two running children, looked at together: one leads its console group (CTRL_BREAK), one
    # does not (the caller asks it through its process object: TerminateProcess).
    grandchild = TreeProc(3, 2, 101.0)
    child_of_grouped = TreeProc(2, 1234, 100.0)
    child_of_plain = TreeProc(6, 5678, 100.0)
    stranger = TreeProc(9, 999, 100.0)
    procs = [child_of_grouped, grandchild, child_of_plain, stranger]
    calls, kill = recorder()
    ops = platform_ops("win32", kill=kill, process_iter=lambda: procs)
    grouped, plain = ops.ask_to_stop([StopTarget(1234, True), StopTarget(5678, False)])
    assert calls == [(1234, CTRL_BREAK_EVENT)]
    assert grouped.asked and not plain.asked
    assert sorted(p.pid for p in grouped.descendants) == [2, 3]
    assert [p.pid for p in plain.descendants] == [6]
    # The CTRL_BREAK reaches the group; the plain child's tree has no polite request at all, so
    # its descendant is ended with it (psutil's SIGTERM is TerminateProcess on Windows).
    assert child_of_grouped.signals == grandchild.signals == []
    assert child_of_plain.signals == [signal.SIGTERM]
    assert stranger.signals == []
    ops.kill_trees([grouped, plain])
    assert child_of_grouped.killed and grandchild.killed and child_of_plain.killed
    assert not stranger.killed
    assert ops.lingering([grouped, plain]) == [False, False]


def test_each_run_gets_a_job_object_that_the_stop_kills_in_one_call() -> None:
    kernel = FakeKernel32()
    ops = platform_ops(
        "win32", kill=recorder()[1], process_iter=lambda: [], jobs=JobObjects(kernel)
    )
    report = ops.containment_report()
    assert report.mechanisms == ("job-object", "process-group")
    assert "kill-on-close" in report.die_with_host
    kwargs, containment = ops.prepare_spawn({"cwd": "x"}, die_with_host=False)
    assert kwargs == {"cwd": "x"} and containment.job == 101
    assert 101 not in kernel.limit_flags  # no kill-on-close unless asked
    ops.adopt(4242, containment)
    assert kernel.members[101] == {4242}
    assert ("close", 14242) in kernel.calls  # the process handle, not the job
    [record] = ops.ask_to_stop([StopTarget(4242, True, containment=containment)])
    kernel.active = 2
    assert ops.lingering([record]) == [True]  # the job still has running processes
    ops.kill_trees([record])
    assert ("terminate", 101) in kernel.calls
    kernel.active = 0
    assert ops.lingering([record]) == [False]
    assert ("close", 101) not in kernel.calls  # kept while the child's process object lives
    ops.release(containment)
    assert kernel.calls[-1] == ("close", 101)


def test_die_with_host_marks_the_job_kill_on_close() -> None:
    kernel = FakeKernel32()
    ops = platform_ops("win32", jobs=JobObjects(kernel))
    _, containment = ops.prepare_spawn({}, die_with_host=True)
    assert containment.job is not None
    assert kernel.limit_flags[containment.job] == JOB_OBJECT_LIMIT_KILL_ON_JOB_CLOSE


def test_job_object_failures_fall_back_and_close_exactly_the_handles_they_opened() -> None:
    kernel = FakeKernel32()
    jobs = JobObjects(kernel)
    # No job: nothing to close, the run goes on with process groups.
    kernel.CreateJobObjectW = lambda attributes, name: 0  # type: ignore[method-assign]
    assert jobs.create(kill_on_close=True) is None
    assert kernel.calls == []
    # Kill-on-close refused: the new job is closed, not kept half set up.
    kernel = FakeKernel32()
    jobs = JobObjects(kernel)
    kernel.SetInformationJobObject = lambda *args: 0  # type: ignore[method-assign]
    assert jobs.create(kill_on_close=True) is None
    assert kernel.calls == [("create", 101), ("close", 101)]
    # The child cannot be opened (gone already): nothing to close, the job stays open.
    kernel = FakeKernel32()
    jobs = JobObjects(kernel)
    job = jobs.create(kill_on_close=False)
    assert job == 101
    kernel.OpenProcess = lambda access, inherit, pid: 0  # type: ignore[method-assign]
    assert not jobs.assign(job, 4242)
    assert kernel.calls == [("create", 101)]
    # The assignment refused: the process handle is closed, never the job's.
    kernel = FakeKernel32()
    ops = platform_ops(
        "win32", kill=recorder()[1], process_iter=lambda: [], jobs=JobObjects(kernel)
    )
    _, containment = ops.prepare_spawn({})
    kernel.AssignProcessToJobObject = lambda job, process: 0  # type: ignore[method-assign]
    ops.adopt(4242, containment)  # (no exception: the stop falls back to the process tree)
    assert kernel.calls == [("create", 101), ("open", 4242, 0x0101), ("close", 14242)]
    # A query that fails counts as nothing running (the tree's own check still applies).
    kernel.QueryInformationJobObject = lambda *args: 0  # type: ignore[method-assign]
    [record] = ops.ask_to_stop([StopTarget(4242, True, containment=containment)])
    assert ops.lingering([record]) == [False]


def test_without_job_objects_windows_falls_back_to_the_process_tree() -> None:
    ops = platform_ops("win32", jobs=None)
    assert ops.prepare_spawn({}, die_with_host=True)[1] == Containment()
    assert ops.containment_report().mechanisms == ("process-group",)
    assert JobObjects.load() is None or sys.platform == "win32"


def test_every_module_imports_with_the_names_windows_has() -> None:
    # CPython's Windows build lacks asyncio's child watchers (AbstractChildWatcher & co. come
    # from unix_events), most signals, os.fork/killpg/..., select.poll and, before 3.12,
    # os.set_blocking. A module that touches one of them at import time breaks the whole
    # package on Windows; the helper removes them, says win32, and imports every module.
    script = Path(__file__).with_name("windows_namespace.py")
    env = {**os.environ, "PYTHONPATH": str(Path(prismq_subprocess.__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stdout + done.stderr


def test_windows_ctrl_break_is_not_overtaken_by_terminate_process() -> None:
    # psutil's send_signal(SIGTERM) on Windows is TerminateProcess (psutil/_pswindows.py), not
    # a request. The stop sent it to every descendant together with the group's CTRL_BREAK, so
    # a worker under a shell or launcher was killed outright before it could handle the break
    # it was sent; the grace period meant nothing for it. They are killed after the grace
    # period only, including one that appears between the two looks at the process table.
    worker = TreeProc(2, 1234, 100.0)
    late = TreeProc(3, 2, 101.0)
    looks: list[list[TreeProc]] = [[worker], [worker, late]]
    calls, kill = recorder()
    ops = platform_ops("win32", kill=kill, process_iter=lambda: looks.pop(0) if looks else [])
    (record,) = ops.ask_to_stop([StopTarget(1234, True)])
    assert record.asked and calls == [(1234, CTRL_BREAK_EVENT)]
    assert sorted(p.pid for p in record.descendants) == [2, 3]
    assert worker.signals == late.signals == []
    assert not worker.killed and not late.killed
    ops.kill_trees([record])
    assert worker.killed and late.killed
