"""The opt-in host shutdown handler (issue 11 A4) in this process: it stops the trees of live
wrappers, chains to the handler that was there before (a ``signal.signal`` one, as uvicorn
installs, or a ``loop.add_signal_handler`` one), restores it, never stacks, stays bounded, and
handles the Windows console events through the platform layer (injected here)."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import pytest
from conftest import skip_on_uvloop
from helpers import PY
from lifecycle_helpers import STUBBORN_CHILD, TREE_CHILD, marked, marked_env, wait_for_marked

import prismq_subprocess as pq
from prismq_subprocess import exceptions as errors
from prismq_subprocess._platform._console import CTRL_C_EVENT, CTRL_CLOSE_EVENT
from prismq_subprocess.testing import ConsoleEvents

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(autouse=True)
def keep_sigterm() -> Iterator[None]:
    original = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        from prismq_subprocess._core._host_shutdown import installed_shutdown_handler

        handler = installed_shutdown_handler()
        if handler is not None:
            handler.uninstall()
        signal.signal(signal.SIGTERM, original)


def record_sigterm() -> tuple[Callable[[int, FrameType | None], None], list[int]]:
    """Make a Python SIGTERM handler the previous one (the fixture restores it); return it and
    the list of the signals it is called with."""
    calls: list[int] = []

    def previous(signum: int, frame: FrameType | None) -> None:
        calls.append(signum)

    signal.signal(signal.SIGTERM, previous)
    return previous, calls


async def _until(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def _tree(wrapper: pq.SubprocessWrapper, code: str = TREE_CHILD) -> tuple[Any, str]:
    mark, env = marked_env()
    proc = await wrapper.create_subprocess_exec(
        PY, "-c", code, stdout=asyncio.subprocess.DEVNULL, env=env
    )
    await asyncio.to_thread(wait_for_marked, mark, 3)
    return proc, mark


@posix_only
async def test_sigterm_stops_the_trees_then_calls_the_previous_handler() -> None:
    previous, calls = record_sigterm()
    async with pq.SubprocessWrapper(grace_period=2.0) as wrapper:
        proc, mark = await _tree(wrapper)
        handler = pq.install_shutdown_handler(grace=2.0)
        assert handler.installed
        assert pq.install_shutdown_handler() is handler  # idempotent: never stacks
        assert handler.install() is handler
        os.kill(os.getpid(), signal.SIGTERM)
        await _until(lambda: calls == [signal.SIGTERM])
        # The trees were stopped before the previous handler ran.
        assert proc.returncode is not None
        assert await asyncio.to_thread(marked, mark) == []
        assert handler.uninstall() == {signal.SIGTERM: previous}
        assert signal.getsignal(signal.SIGTERM) is previous
        assert handler.uninstall() == {}
        assert not handler.installed


@posix_only
@skip_on_uvloop(
    "the loop hands the signal to its handler at once, during the stop (test_uvloop.py)"
)
async def test_a_loop_handler_installed_before_is_chained_and_restored() -> None:
    loop = asyncio.get_running_loop()
    calls: list[str] = []
    loop.add_signal_handler(signal.SIGTERM, calls.append, "uvicorn")
    try:
        async with pq.SubprocessWrapper(grace_period=2.0) as wrapper:
            proc, mark = await _tree(wrapper)
            with pq.ShutdownHandler(grace=2.0) as handler:
                assert handler.installed
                os.kill(os.getpid(), signal.SIGTERM)
                await _until(lambda: calls == ["uvicorn"])
                assert proc.returncode is not None
                assert await asyncio.to_thread(marked, mark) == []
            # Restored: the next SIGTERM goes to the earlier handler alone.
            os.kill(os.getpid(), signal.SIGTERM)
            await _until(lambda: calls == ["uvicorn", "uvicorn"])
    finally:
        loop.remove_signal_handler(signal.SIGTERM)


@posix_only
async def test_the_stop_is_bounded_by_grace_then_kills() -> None:
    async with pq.SubprocessWrapper(grace_period=60.0) as wrapper:
        proc, mark = await _tree(wrapper, STUBBORN_CHILD)
        started = time.monotonic()
        await pq.stop_for_host_shutdown("test", grace=0.5)
        # The wrapper's own 60 s grace is cut short by the shutdown's bound.
        assert time.monotonic() - started < 20
        await _until(lambda: proc.returncode is not None)
        await _until(lambda: marked(mark) == [])


async def test_installing_needs_the_main_thread_and_a_running_loop() -> None:
    with pytest.raises(errors.ShutdownHandlerError, match="coroutine"):
        await asyncio.to_thread(pq.ShutdownHandler().install)

    failures: list[BaseException] = []

    def in_thread() -> None:
        async def install() -> None:
            pq.ShutdownHandler().install()

        try:
            asyncio.run(install())
        except BaseException as exc:
            failures.append(exc)

    thread = threading.Thread(target=in_thread)
    thread.start()
    thread.join()
    assert len(failures) == 1 and isinstance(failures[0], errors.ShutdownHandlerError)
    assert "main thread" in str(failures[0])


@posix_only
async def test_one_handler_per_process() -> None:
    first = pq.install_shutdown_handler(grace=1.0)
    try:
        with pytest.raises(errors.ShutdownHandlerError, match="installed already"):
            pq.ShutdownHandler().install()
    finally:
        first.uninstall()
    second = pq.ShutdownHandler().install()
    second.uninstall()


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(errors.InvalidTimeoutError):
        pq.ShutdownHandler(grace=-1)
    with pytest.raises(errors.InvalidArgumentTypeError):
        pq.ShutdownHandler(signals=["SIGTERM"])  # type: ignore[list-item]
    with pytest.raises(errors.InvalidArgumentTypeError):
        pq.ShutdownHandler(signals=15)  # type: ignore[arg-type]


class _Kernel32:
    """Stand-in for kernel32's SetConsoleCtrlHandler."""

    def __init__(self) -> None:
        self.added: list[Callable[[int], int]] = []
        self.removed: list[Callable[[int], int]] = []

    def SetConsoleCtrlHandler(self, routine: Callable[[int], int], add: bool) -> int:
        (self.added if add else self.removed).append(routine)
        return 1


@posix_only
async def test_windows_console_close_stops_the_trees_then_passes_it_on() -> None:
    kernel32 = _Kernel32()
    console = ConsoleEvents(kernel32, routine_factory=lambda f: f)
    async with pq.SubprocessWrapper(grace_period=2.0) as wrapper:
        proc, mark = await _tree(wrapper)
        handler = pq.ShutdownHandler(signals=(), grace=2.0, console=console).install()
        try:
            [routine] = kernel32.added
            # Ctrl+C is not ours to handle: passed on at once, nothing stopped.
            assert await asyncio.to_thread(routine, CTRL_C_EVENT) == 0
            assert proc.returncode is None
            # Windows calls the routine on a thread of its own; FALSE lets the next one run.
            assert await asyncio.to_thread(routine, CTRL_CLOSE_EVENT) == 0
            assert proc.returncode is not None
            assert await asyncio.to_thread(marked, mark) == []
        finally:
            assert handler.uninstall() == {}
        assert kernel32.removed == [routine]


@posix_only
async def test_without_loop_signal_handlers_a_plain_handler_hands_over_to_the_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As on Windows' loops: add_signal_handler is not there.
    loop = asyncio.get_running_loop()

    def refuse(*args: object) -> None:
        raise NotImplementedError

    monkeypatch.setattr(loop, "add_signal_handler", refuse)
    calls: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: calls.append(signum))
    async with pq.SubprocessWrapper(grace_period=2.0) as wrapper:
        proc, mark = await _tree(wrapper)
        with pq.install_shutdown_handler(grace=2.0):
            assert signal.getsignal(signal.SIGTERM) not in (previous, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            await _until(lambda: calls == [signal.SIGTERM])
            assert proc.returncode is not None
            assert await asyncio.to_thread(marked, mark) == []


@posix_only
async def test_a_second_signal_kills_at_once_and_passes_it_on_once() -> None:
    _, calls = record_sigterm()
    async with pq.SubprocessWrapper(grace_period=60.0) as wrapper:
        proc, mark = await _tree(wrapper, STUBBORN_CHILD)
        with pq.install_shutdown_handler(grace=60.0):
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.5)  # the polite stop is under way; the child ignores it
            assert calls == [] and proc.returncode is None
            os.kill(os.getpid(), signal.SIGTERM)
            await _until(lambda: calls == [signal.SIGTERM])
            await _until(lambda: proc.returncode is not None)
            await _until(lambda: marked(mark) == [])
            await asyncio.sleep(0.3)
            assert calls == [signal.SIGTERM]  # the first stop, now over, did not chain again


def test_a_handler_whose_loop_closed_is_replaced() -> None:
    previous, _ = record_sigterm()

    async def install() -> pq.ShutdownHandler:
        return pq.install_shutdown_handler()

    stale = asyncio.run(install())  # the loop closes without uninstalling it

    async def again() -> pq.ShutdownHandler:
        return pq.install_shutdown_handler()

    fresh = asyncio.run(again())
    try:
        assert fresh is not stale and not stale.installed
    finally:
        fresh.uninstall()
    assert signal.getsignal(signal.SIGTERM) is previous


@posix_only
async def test_uninstalling_off_the_main_thread_is_refused_not_faked() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    handler = pq.ShutdownHandler(grace=1.0).install()
    with pytest.raises(errors.ShutdownHandlerError, match="main thread"):
        await asyncio.to_thread(handler.uninstall)
    assert handler.installed  # still ours, and still restorable from the main thread
    assert handler.uninstall() == {signal.SIGTERM: previous}
    assert signal.getsignal(signal.SIGTERM) == previous


@posix_only
async def test_after_an_escalated_stop_the_next_signal_is_passed_on_again() -> None:
    _, calls = record_sigterm()
    async with pq.SubprocessWrapper(grace_period=60.0) as wrapper:
        proc, _ = await _tree(wrapper, STUBBORN_CHILD)
        with pq.install_shutdown_handler(grace=60.0) as handler:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.5)
            os.kill(os.getpid(), signal.SIGTERM)  # escalates: kills and passes it on at once
            await _until(lambda: calls == [signal.SIGTERM] and proc.returncode is not None)
            await _until(lambda: handler._task is not None and handler._task.done())
            proc, mark = await _tree(wrapper)
            os.kill(os.getpid(), signal.SIGTERM)  # a later shutdown, not escalated
            await _until(lambda: calls == [signal.SIGTERM] * 2)
            assert proc.returncode is not None
            assert await asyncio.to_thread(marked, mark) == []


@posix_only
async def test_a_signal_given_twice_is_handled_once_and_restored() -> None:
    previous, calls = record_sigterm()
    handler = pq.ShutdownHandler([signal.SIGTERM, signal.SIGTERM], grace=1.0)
    assert handler.signals == (signal.SIGTERM,)
    handler.install()
    os.kill(os.getpid(), signal.SIGTERM)
    await _until(lambda: calls == [signal.SIGTERM])  # chained once, not into itself
    assert handler.uninstall() == {signal.SIGTERM: previous}
    assert signal.getsignal(signal.SIGTERM) is previous


def test_signals_that_cannot_be_handled_and_an_endless_grace_are_refused() -> None:
    uncatchable = [
        getattr(signal, name) for name in ("SIGKILL", "SIGSTOP") if hasattr(signal, name)
    ]
    for sig in (*uncatchable, 0, -1, 99999):
        with pytest.raises(errors.ShutdownHandlerError):
            pq.ShutdownHandler([sig])
    with pytest.raises(errors.InvalidTimeoutError):
        pq.ShutdownHandler(grace=float("inf"))


@posix_only
def test_a_previous_handler_that_raises(caplog: pytest.LogCaptureFixture) -> None:
    def failing(signum: int, frame: FrameType | None) -> None:
        raise RuntimeError("previous handler failed")

    def exiting(signum: int, frame: FrameType | None) -> None:
        sys.exit(3)

    async def main(previous: Callable[[int, FrameType | None], None]) -> None:
        signal.signal(signal.SIGTERM, previous)
        with pq.install_shutdown_handler(grace=1.0):
            os.kill(os.getpid(), signal.SIGTERM)
            await _until(lambda: "previous handler failed" in caplog.text)

    # An Exception is logged with its context; the loop goes on.
    asyncio.run(main(failing))
    [record] = [r for r in caplog.records if r.exc_info and r.name.startswith("prismq")]
    assert "SIGTERM" in record.getMessage() and isinstance(record.exc_info[1], RuntimeError)
    # SystemExit ends the loop as before, and is not also left in a task nobody awaited.
    caplog.clear()
    with pytest.raises(SystemExit):
        asyncio.run(main(exiting))
    gc.collect()
    assert "never retrieved" not in caplog.text
