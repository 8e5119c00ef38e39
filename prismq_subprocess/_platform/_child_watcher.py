"""Python 3.11 on Linux: asyncio's child watcher, as Python 3.12 chooses it.

Before 3.12 asyncio learns of each child's exit from a thread of its own that waits for that one
child (``ThreadedChildWatcher``). When many children end together (closing a wrapper with a
thousand of them) a thousand threads wake and fight the event loop for the GIL: the loop stalls
for tens of milliseconds. Python 3.12 uses ``PidfdChildWatcher`` by default wherever the kernel
has pidfds: the exit arrives through the event loop's own selector, no thread at all.

:func:`prefer_pidfd_watcher` gives 3.11 hosts the 3.12 choice, but only where asyncio would
otherwise make its default one: the policy is asyncio's own and nobody has chosen or made a
watcher yet. A host that set a watcher keeps it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
import weakref
from typing import Any

__all__ = [  # (and LoopPidfdWatcher before 3.12)
    "pidfds_work",
    "prefer_pidfd_watcher",
    "reap_orphaned",
    "returncode_of",
]

logger = logging.getLogger("prismq_subprocess")

_pidfds_work: bool | None = None


def pidfds_work() -> bool:
    """Whether this process can open a pidfd (Linux 5.3+, not blocked by seccomp); asked once."""
    global _pidfds_work
    if _pidfds_work is None:
        opener = getattr(os, "pidfd_open", None)
        try:
            fd = opener(os.getpid()) if opener is not None else -1
        except OSError:
            fd = -1
        if fd >= 0:
            os.close(fd)
        _pidfds_work = fd >= 0
    return _pidfds_work


# Every LoopPidfdWatcher made, for reap_orphaned().
_watchers: weakref.WeakSet[Any] = weakref.WeakSet()


def reap_orphaned() -> None:
    """Reap children of closed event loops that have exited, and close their pidfds (3.11's
    :class:`LoopPidfdWatcher` hears an exit only in the loop that started the child; a
    ``cleanup()`` after that loop closed kills children nobody would reap). No effect on
    3.12+, where asyncio's own watcher is used."""
    for watcher in list(_watchers):
        watcher.reap_orphaned()


# Subclassing asyncio's watcher base warns from 3.12 on (child watchers are deprecated there;
# gone in 3.14): the class exists only where it is used. Windows' asyncio has no child watchers
# at all (they come from unix_events): there the name must not even be looked up, or the
# package cannot be imported on Windows under 3.11.
_HAS_WATCHERS = sys.version_info < (3, 12) and hasattr(asyncio, "AbstractChildWatcher")
if _HAS_WATCHERS:

    class LoopPidfdWatcher(asyncio.AbstractChildWatcher):
        """Hears each child's exit through a pidfd in the selector of the loop that started it (the
        running loop), so it serves every loop in every thread; where a pidfd cannot be had (no
        descriptor left) that child is waited for by a thread, as asyncio's default does."""

        def __init__(self) -> None:
            self._threads = asyncio.ThreadedChildWatcher()
            # pid -> (its pidfd, the loop watching it), until the exit is heard: a loop that
            # closes first never reads that pidfd (see reap_orphaned()). A weak reference: a
            # closed loop is not kept alive by a child it left behind.
            self._watched: dict[int, tuple[int, weakref.ref[asyncio.AbstractEventLoop]]] = {}
            # The loops watching children (weakly): a closed one is noticed at the next start.
            self._loops: set[weakref.ref[asyncio.AbstractEventLoop]] = set()
            _watchers.add(self)

        def add_child_handler(  # type: ignore[override]  # (typeshed's TypeVarTuple form)
            self, pid: int, callback: Any, *args: Any
        ) -> None:
            loop = asyncio.get_running_loop()
            # A loop that closed before its children exited never hears them: nobody reaped
            # them, zombies for the life of the host (asyncio's own 3.11 watcher, a thread per
            # child, did). Looked for at each start: one look per loop in use.
            if any((gone := ref()) is None or gone.is_closed() for ref in list(self._loops)):
                self._loops = {r for r in self._loops if (alive := r()) and not alive.is_closed()}
                self.reap_orphaned()
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                self._threads.add_child_handler(pid, callback, *args)
                return
            loop_ref = weakref.ref(loop)
            self._loops.add(loop_ref)
            self._watched[pid] = (pidfd, loop_ref)
            loop._add_reader(pidfd, self._exited, loop, pid, pidfd, callback, args)  # type: ignore[attr-defined]

        def reap_orphaned(self) -> None:
            """Reap the children whose loop closed before they exited (their pidfd is then
            closed): now if they have exited, else from a thread once they do. Callable from
            any thread."""
            for pid, (pidfd, loop_ref) in list(self._watched.items()):
                loop = loop_ref()
                if loop is not None and not loop.is_closed():
                    continue  # its own loop hears the exit
                try:
                    # By pidfd, not pid: a pid already reaped elsewhere may be someone else's.
                    exited = os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG) is not None
                except ChildProcessError:
                    exited = True  # reaped elsewhere (its Popen, say)
                except OSError:
                    continue
                if self._watched.pop(pid, None) is None:
                    continue  # taken by another caller meanwhile
                if exited:
                    os.close(pidfd)
                else:
                    threading.Thread(
                        target=_reap_when_exited,
                        args=(pidfd,),
                        name=f"prismq-reap-{pid}",
                        daemon=True,
                    ).start()

        def _exited(
            self,
            loop: asyncio.AbstractEventLoop,
            pid: int,
            pidfd: int,
            callback: Any,
            args: Any,
        ) -> None:
            self._watched.pop(pid, None)
            loop._remove_reader(pidfd)  # type: ignore[attr-defined]
            returncode: int | None
            try:
                # By pidfd, not pid: if another waiter took the status first, the pid may be
                # someone else's by now (a new child of ours, whose status it would steal).
                returncode = returncode_of(os.waitid(os.P_PIDFD, pidfd, os.WEXITED))
            except ChildProcessError:  # reaped by someone else: its status is lost (as in asyncio)
                returncode = None
            except (OSError, AttributeError):  # (a kernel of 5.3 or 5.4: pidfds, no P_PIDFD)
                try:
                    returncode = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                except ChildProcessError:
                    returncode = None
            finally:
                os.close(pidfd)
            if returncode is None:
                returncode = 255
                logger.warning("child %d was reaped elsewhere; its exit status is unknown", pid)
            callback(pid, returncode, *args)

        def remove_child_handler(self, pid: int) -> bool:
            return True  # (asyncio never calls it for this watcher's children)

        def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
            pass  # every child is watched by the loop that is running when it starts

        def is_active(self) -> bool:
            return True

        def close(self) -> None:
            self._threads.close()

        def __enter__(self) -> LoopPidfdWatcher:
            return self

        def __exit__(self, *exc: object) -> None:
            pass


def _reap_when_exited(pidfd: int) -> None:
    """A thread: wait for the child of ``pidfd`` (its loop has closed) to exit, and reap it."""
    try:
        os.waitid(os.P_PIDFD, pidfd, os.WEXITED)
    except OSError:
        pass  # (reaped elsewhere meanwhile)
    finally:
        os.close(pidfd)


def returncode_of(info: Any) -> int:
    """The ``returncode`` (``Popen``'s convention: ``-signal`` when killed) of the
    ``os.waitid_result`` of an exited child."""
    if info.si_code == os.CLD_EXITED:
        return int(info.si_status)
    return -int(info.si_status)  # CLD_KILLED, CLD_DUMPED


def prefer_pidfd_watcher(
    policy: Any = None, *, version: tuple[int, int] = sys.version_info[:2]
) -> bool:
    """Before the first asyncio subprocess of a Python 3.11 process on Linux, install a pidfd
    watcher (:class:`LoopPidfdWatcher`) in ``policy`` (default: the current policy), as Python
    3.12 does by default; True when it did. Nothing happens on 3.12+ (asyncio chooses it
    itself), without pidfds, under another policy class, or when a watcher was already set or
    made."""
    if version >= (3, 12) or not _HAS_WATCHERS:
        return False
    default_policy = getattr(asyncio, "DefaultEventLoopPolicy", None)
    if default_policy is None or not hasattr(asyncio, "ThreadedChildWatcher"):
        return False
    if policy is None:
        policy = asyncio.get_event_loop_policy()
    # The exact class: a policy of the host's own may manage watchers its own way.
    if type(policy) is not default_policy or getattr(policy, "_watcher", False) is not None:
        return False
    if not pidfds_work():
        return False
    policy.set_child_watcher(LoopPidfdWatcher())  # (the version check above: it exists)
    logger.debug("asyncio child watcher: pidfds in the running loop (as Python 3.12 chooses)")
    return True
