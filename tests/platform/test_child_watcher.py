"""Python 3.11 on Linux: ASYNC installs a pidfd child watcher as 3.12 chooses it, and only where
asyncio would otherwise make its thread-per-child default (``_platform/_child_watcher.py``)."""

from __future__ import annotations

import asyncio
import sys
import threading
import warnings

import pytest

from prismq_subprocess._platform._child_watcher import pidfds_work, prefer_pidfd_watcher

pytestmark = pytest.mark.skipif(
    sys.version_info >= (3, 12) or not pidfds_work(), reason="Python 3.11 with pidfds only"
)


def fresh_policy() -> asyncio.AbstractEventLoopPolicy:
    return asyncio.DefaultEventLoopPolicy()


def test_an_untouched_default_policy_gets_the_pidfd_watcher_once() -> None:
    from prismq_subprocess._platform._child_watcher import LoopPidfdWatcher

    policy = fresh_policy()
    assert prefer_pidfd_watcher(policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        assert isinstance(policy.get_child_watcher(), LoopPidfdWatcher)  # type: ignore[attr-defined]
    assert not prefer_pidfd_watcher(policy)  # set already: left alone


def test_a_watcher_the_host_chose_or_another_policy_is_left_alone() -> None:
    chosen = fresh_policy()
    threaded = asyncio.ThreadedChildWatcher()
    chosen.set_child_watcher(threaded)  # type: ignore[attr-defined]
    assert not prefer_pidfd_watcher(chosen)
    assert chosen.get_child_watcher() is threaded  # type: ignore[attr-defined]

    class OwnPolicy(asyncio.DefaultEventLoopPolicy):  # type: ignore[misc,valid-type]
        pass

    assert not prefer_pidfd_watcher(OwnPolicy())
    assert not prefer_pidfd_watcher(fresh_policy(), version=(3, 12))


def test_children_of_loops_in_several_threads_report_their_exit() -> None:
    # One watcher for the process, serving whichever loop started the child.
    policy = fresh_policy()
    assert prefer_pidfd_watcher(policy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        watcher = policy.get_child_watcher()  # type: ignore[attr-defined]
    codes: list[int] = []

    def in_thread(code: int) -> None:
        async def main() -> int:
            loop = asyncio.get_running_loop()
            done: asyncio.Future[int] = loop.create_future()
            import subprocess

            # (A plain Popen: the watcher is what is under test, not asyncio's transport.)
            proc = subprocess.Popen(  # noqa: ASYNC220
                [sys.executable, "-c", f"raise SystemExit({code})"]
            )
            watcher.add_child_handler(
                proc.pid, lambda pid, rc: loop.call_soon_threadsafe(done.set_result, rc)
            )
            result = await asyncio.wait_for(done, 30)
            proc.returncode = result  # reaped by the watcher
            return result

        codes.append(asyncio.run(main()))

    threads = [threading.Thread(target=in_thread, args=(n,)) for n in (3, 4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(codes) == [3, 4]
