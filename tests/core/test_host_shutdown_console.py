"""The shutdown handler's Windows console path against Windows' own deadline: a closing
console's process is ended about 5 s after ``CTRL_CLOSE_EVENT``, so whatever grace was
configured, the trees must be killed before that. The console layer is injected."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterable, Iterator

import pytest

import prismq_subprocess as pq
from prismq_subprocess._core import _host_shutdown
from prismq_subprocess._core._host_shutdown import installed_shutdown_handler
from prismq_subprocess._core._process import ProcessLike
from prismq_subprocess._platform._console import CTRL_BREAK_EVENT, CTRL_CLOSE_EVENT
from prismq_subprocess.testing import ConsoleEvents


class _Kernel32:
    """Stand-in for kernel32's SetConsoleCtrlHandler."""

    def __init__(self) -> None:
        self.routines: list[Callable[[int], int]] = []

    def SetConsoleCtrlHandler(self, routine: Callable[[int], int], add: bool) -> int:
        if add:
            self.routines.append(routine)
        return 1


class _Stubborn:
    """A participant whose children ignore the polite request: its stop never ends by itself;
    it notes when it is told to kill."""

    def __init__(self) -> None:
        self.killed_at: list[float] = []

    def _host_claims(self) -> Iterable[ProcessLike]:
        return []

    async def _host_stop(self, reason: str, claimed: frozenset[int]) -> None:
        await asyncio.sleep(3600)

    def _host_kill(self) -> None:
        self.killed_at.append(time.monotonic())


@pytest.fixture(autouse=True)
def _uninstalled() -> Iterator[None]:
    yield
    handler = installed_shutdown_handler()
    if handler is not None:
        handler.uninstall()


async def test_console_close_kills_before_windows_ends_the_host() -> None:
    # With grace=10 the kill came after 10 s: Windows had ended the host (and this routine)
    # 5 s after the event, leaving every stubborn tree running.
    kernel32 = _Kernel32()
    console = ConsoleEvents(kernel32, routine_factory=lambda f: f)
    stubborn = _Stubborn()
    _host_shutdown.take_part_in_host_shutdown(stubborn)
    handler = pq.ShutdownHandler(signals=(), grace=10.0, console=console).install()
    assert handler.grace == 10.0  # the configured grace stays; only the close event is capped
    [routine] = kernel32.routines
    started = time.monotonic()
    returned = await asyncio.to_thread(routine, CTRL_CLOSE_EVENT)
    took = time.monotonic() - started
    assert returned == 0  # the next handler (Windows' default) then ends the host
    assert stubborn.killed_at, "the trees were never killed"
    assert stubborn.killed_at[0] - started <= _host_shutdown.CLOSE_GRACE + 0.5
    assert _host_shutdown.CLOSE_GRACE <= 3.0
    assert took < 5.0  # the routine returns before Windows' deadline


async def test_other_console_events_keep_the_configured_grace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    graces: list[float] = []
    ran = threading.Event()

    async def recorded(reason: str = "", *, grace: float = 0.0) -> None:
        graces.append(grace)
        ran.set()

    monkeypatch.setattr(_host_shutdown, "stop_for_host_shutdown", recorded)
    kernel32 = _Kernel32()
    console = ConsoleEvents(kernel32, routine_factory=lambda f: f)
    pq.ShutdownHandler(signals=(), grace=7.5, console=console).install()
    [routine] = kernel32.routines
    assert await asyncio.to_thread(routine, CTRL_BREAK_EVENT) == 0
    assert await asyncio.to_thread(routine, CTRL_CLOSE_EVENT) == 0
    assert ran.is_set()
    assert graces == [7.5, _host_shutdown.CLOSE_GRACE]
