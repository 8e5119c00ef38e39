"""Getting an event loop that can run subprocesses (the Windows Proactor problem), in both the
policy style (Python 3.11-3.13) and the ``loop_factory`` style (3.12+, the only one from 3.14)."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable

from .._platform import is_windows, proactor_loop_class, proactor_policy_class
from ._exceptions import NoRunningLoopError

__all__ = ["install_subprocess_policy", "running_asyncio_loop", "subprocess_loop_factory"]


def running_asyncio_loop() -> asyncio.AbstractEventLoop:
    """The running asyncio event loop; a call made outside asyncio (trio, or anyio's trio
    backend) is refused with :class:`NoRunningLoopError` before anything is spawned (THREADED
    spawned the child, then failed on the foreign loop and left it running, pipes open)."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise NoRunningLoopError(
            "prismq_subprocess needs a running asyncio event loop (asyncio.run, uvicorn, "
            "anyio's asyncio backend); under trio, use anyio's asyncio backend or trio-asyncio"
        ) from None


def subprocess_loop_factory(
    platform: str | None = None,
) -> Callable[[], asyncio.AbstractEventLoop]:
    """Return a loop factory whose loops can spawn subprocesses.

    On Windows that is ``asyncio.ProactorEventLoop``; elsewhere ``asyncio.new_event_loop`` (the
    default loop already can). Use it where the host creates its loop::

        asyncio.run(main(), loop_factory=subprocess_loop_factory())   # Python 3.12+
        with asyncio.Runner(loop_factory=subprocess_loop_factory()) as runner: ...

    Hosts that do not create the loop themselves (uvicorn) are covered in docs/WINDOWS.md; an
    auto-detected wrapper falls back to THREADED on a loop that cannot spawn.
    """
    if is_windows(platform):
        return proactor_loop_class()  # raises for an injected "win32" on a POSIX machine
    return asyncio.new_event_loop


def install_subprocess_policy(platform: str | None = None) -> bool:
    """Make every loop created from now on able to spawn subprocesses (policy API).

    On Windows this installs ``WindowsProactorEventLoopPolicy`` (the default since 3.8, but hosts
    and frameworks sometimes replace it); elsewhere it does nothing. Returns True when it changed
    the policy. Call it before the loop starts. Event-loop policies are deprecated from Python
    3.14: prefer :func:`subprocess_loop_factory` there.
    """
    if not is_windows(platform):
        return False
    policy_class = proactor_policy_class()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        if isinstance(asyncio.get_event_loop_policy(), policy_class):
            return False
        asyncio.set_event_loop_policy(policy_class())
    return True
