"""Choosing the platform implementation, and what every implementation shares."""

from __future__ import annotations

import signal

import pytest

from prismq_subprocess._platform import (
    CAN_POLL_PIPES,
    IS_WINDOWS,
    KILL_SIGNAL,
    PIPES_SELECTABLE,
    PosixOps,
    WindowsOps,
    is_windows,
    platform_ops,
)


def test_platform_choice() -> None:
    assert isinstance(platform_ops("win32"), WindowsOps)
    assert isinstance(platform_ops("linux"), PosixOps)
    assert isinstance(platform_ops("darwin"), PosixOps)
    assert is_windows("win32") and not is_windows("linux")
    # Cygwin's Python spawns with fork/exec and rejects creationflags; its asyncio is the Unix
    # one: it must get POSIX process groups (it used to get CREATE_NEW_PROCESS_GROUP, which
    # Popen refuses there).
    assert not is_windows("cygwin")
    assert platform_ops("cygwin").group_kwargs({}, new_group=True) == {"start_new_session": True}


@pytest.mark.parametrize("platform", ["linux", "win32"])
def test_signal_descendants_tolerates_vanished(platform: str) -> None:
    import psutil

    class Gone:
        def send_signal(self, sig: int) -> None:
            raise psutil.NoSuchProcess(1)

    platform_ops(platform).signal_descendants([Gone()], signal.SIGTERM)  # type: ignore[list-item]


def test_the_default_is_one_shared_instance_for_this_machine() -> None:
    # Stops through different wrappers share their looks at the process table.
    assert platform_ops() is platform_ops()
    assert platform_ops("linux") is not platform_ops("linux")
    assert isinstance(platform_ops(), WindowsOps if IS_WINDOWS else PosixOps)


def test_host_facts_agree() -> None:
    assert PIPES_SELECTABLE is (not IS_WINDOWS)
    assert not CAN_POLL_PIPES or PIPES_SELECTABLE
    assert (signal.SIGTERM if IS_WINDOWS else signal.SIGKILL) == KILL_SIGNAL
