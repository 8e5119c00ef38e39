"""Shared behaviour of our own process classes (THREADED, LOCAL, DRY_RUN).

It reproduces ``asyncio.subprocess.Process``: ``wait()`` can be awaited by many tasks and
cancelling one never stops the child; ``communicate()`` writes the input, ignoring
``BrokenPipeError``/``ConnectionResetError`` as asyncio does, reads both streams concurrently,
then waits; signalling a process that has already exited raises ``ProcessLookupError`` once
asyncio would have let go of it (its output pipes are closed too), and does nothing before that.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
from collections.abc import Callable
from typing import Any

from .._core._validation import check_signal
from .._platform import KILL_SIGNAL

__all__ = ["PopenProcess", "ProcessBase"]


class ProcessBase:
    """Base class implementing the ``asyncio.subprocess.Process`` API around a few hooks."""

    stdin: Any
    stdout: Any
    stderr: Any
    #: Called with the pid once the child has exited (the platform then looks for orphans it
    #: left to this process).
    on_exit: Callable[[int], None] | None = None

    def __init__(self, loop: asyncio.AbstractEventLoop, pid: int) -> None:
        self._loop = loop
        self._pid = pid
        self._returncode: int | None = None
        self._waiters: list[asyncio.Future[int]] = []
        self.stdin = None
        self.stdout = None
        self.stderr = None

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._pid}>"

    @property
    def pid(self) -> int:
        """The child's process id."""
        return self._pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the child exited (negative: the signal that killed it), or None."""
        return self._returncode

    def _set_returncode(self, returncode: int) -> None:
        """Record the exit status and wake every ``wait()``; called on the loop's thread."""
        if self._returncode is not None:
            return
        self._returncode = returncode
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(returncode)
        self._waiters.clear()
        if self.on_exit is not None:
            with contextlib.suppress(Exception):
                self.on_exit(self._pid)

    async def wait(self) -> int:
        """Wait for the child to exit and return its exit status.

        Cancelling this coroutine does not stop the child (asyncio's semantics).
        """
        if self._returncode is not None:
            return self._returncode
        fut: asyncio.Future[int] = self._loop.create_future()
        self._waiters.append(fut)
        self._on_wait()
        try:
            return await fut
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _on_wait(self) -> None:
        """Hook: someone started waiting (LOCAL starts the run then)."""

    def _holds_pipes(self) -> bool:
        """Hook: whether an output pipe of the child is still open (unread output, or something
        it started holds it). asyncio keeps its child until every pipe is closed, and signals
        sent meanwhile to a child that exited are ignored rather than refused."""
        return False

    def _signallable(self) -> bool:
        """Whether a signal should go to the child: not once it has exited (asyncio's rule).

        Raises:
            ProcessLookupError: the child has exited and asyncio would have let go of it.
        """
        if self._returncode is None:
            return True
        if self._holds_pipes():
            return False
        raise ProcessLookupError(f"process {self._pid} has already exited")

    def _release_pipes(self) -> None:
        """Hook: close our ends of the output pipes; readers get what was read, then end of file
        (the run path calls it when something outside the child's tree holds the pipes)."""

    async def _feed_stdin(self, input: bytes | bytearray | memoryview | None) -> None:
        if input is not None:
            self.stdin.write(input)
        # The child may close its stdin early; asyncio's communicate() ignores that too.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            await self.stdin.drain()
        self.stdin.close()

    async def _noop(self) -> None:
        return None

    async def _read_stream(self, stream: Any) -> bytes:
        return bytes(await stream.read())

    async def communicate(
        self, input: bytes | bytearray | memoryview | None = None
    ) -> tuple[bytes | None, bytes | None]:
        """Send ``input`` (if stdin is a pipe), read stdout/stderr to the end, wait for exit.

        Returns ``(stdout, stderr)``; an item is ``None`` when that stream is not a pipe.
        Cancelling does not stop the child (asyncio's semantics).
        """
        feed = self._feed_stdin(input) if self.stdin is not None else self._noop()
        out = self._read_stream(self.stdout) if self.stdout is not None else self._noop()
        err = self._read_stream(self.stderr) if self.stderr is not None else self._noop()
        _, stdout, stderr = await asyncio.gather(feed, out, err)
        await self.wait()
        return stdout, stderr

    def send_signal(self, signal: int) -> None:
        """Send ``signal`` to the child; nothing once it has exited while its output pipes are
        still open (as asyncio).

        Raises:
            ProcessLookupError: the child has exited and its output pipes are closed.
            InvalidArgumentTypeError: ``signal`` is no signal number.
        """
        check_signal(signal)
        if self._signallable():
            self._send_signal(signal)

    def terminate(self) -> None:
        """Ask the child to stop (SIGTERM; ``TerminateProcess`` on Windows)."""
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        """Kill the child (SIGKILL; ``TerminateProcess`` on Windows)."""
        self.send_signal(KILL_SIGNAL)

    def _send_signal(self, sig: int) -> None:
        raise NotImplementedError


class PopenProcess(ProcessBase):
    """A :class:`ProcessBase` whose child is a ``subprocess.Popen`` (THREADED and LOCAL)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, popen: subprocess.Popen[bytes]) -> None:
        super().__init__(loop, popen.pid)
        self._popen = popen

    def _send_signal(self, sig: int) -> None:
        self._popen.send_signal(sig)

    def terminate(self) -> None:
        """Ask the child to stop (``Popen.terminate``: SIGTERM, ``TerminateProcess`` on Windows).

        Raises:
            ProcessLookupError: as :meth:`send_signal`.
        """
        if self._signallable():
            self._popen.terminate()

    def kill(self) -> None:
        """Kill the child (``Popen.kill``: SIGKILL, ``TerminateProcess`` on Windows).

        Raises:
            ProcessLookupError: as :meth:`send_signal`.
        """
        if self._signallable():
            self._popen.kill()
