"""A run's Job Object after its child's process object is gone (``WindowsOps.release``), over a
stand-in ``kernel32``: a kill-on-close job (``die_with_host=True``) that still holds processes
is kept, so they die with the host, not when the garbage collector runs."""

from __future__ import annotations

import gc

from platform_fakes import FakeKernel32

from prismq_subprocess._core._tree_stop import register_child
from prismq_subprocess._platform import platform_ops
from prismq_subprocess._platform._job import JobObjects


def _closed(kernel: FakeKernel32) -> list[int]:
    return [call[1] for call in kernel.calls if call[0] == "close" and call[1] < 10_000]


def test_a_kill_on_close_job_with_live_processes_is_kept_until_it_is_empty() -> None:
    kernel = FakeKernel32()
    ops = platform_ops("win32", jobs=JobObjects(kernel))
    _, first = ops.prepare_spawn({}, die_with_host=True)
    _, second = ops.prepare_spawn({}, die_with_host=True)
    _, third = ops.prepare_spawn({}, die_with_host=True)
    assert (first.job, second.job, third.job) == (101, 102, 103)
    # The run left a helper running (``cmd /c start app``): closing the job's only handle would
    # kill it now, while the host lives.
    kernel.active_in = {101: 1, 102: 1, 103: 0}
    ops.release(first)
    ops.release(second)
    assert _closed(kernel) == []
    # An empty job is closed as before; the kept ones are looked at again on the way.
    kernel.active_in[101] = 0
    ops.release(third)
    assert sorted(_closed(kernel)) == [101, 103]
    # The last kept one, once its helper has ended, at the next release.
    kernel.active_in[102] = 0
    _, fourth = ops.prepare_spawn({}, die_with_host=True)
    ops.release(fourth)
    assert sorted(_closed(kernel)) == [101, 102, 103, 104]


def test_a_job_without_kill_on_close_is_closed_at_once() -> None:
    # Closing it kills nothing: its leftovers live on either way.
    kernel = FakeKernel32(active=3)
    ops = platform_ops("win32", jobs=JobObjects(kernel))
    _, containment = ops.prepare_spawn({}, die_with_host=False)
    ops.release(containment)
    assert _closed(kernel) == [101]


def test_collecting_the_process_object_keeps_a_busy_kill_on_close_job() -> None:
    # The route the probe took: register_child's finalizer releases the containment when the
    # child's process object is collected.
    class Child:
        pid = 4242

    kernel = FakeKernel32(active=1)
    ops = platform_ops("win32", jobs=JobObjects(kernel))
    _, containment = ops.prepare_spawn({}, die_with_host=True)
    ops.adopt(4242, containment)
    child = Child()
    register_child(child, True, containment, ops)
    del child
    gc.collect()
    assert _closed(kernel) == []
    kernel.active = 0
    _, other = ops.prepare_spawn({}, die_with_host=True)
    ops.release(other)
    assert sorted(_closed(kernel)) == [101, 102]
