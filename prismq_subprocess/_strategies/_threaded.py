"""THREADED mode: ``subprocess.Popen`` from a thread pool, pipes bridged into asyncio streams.

The event loop never watches a pipe or spawns a process here, which is what lets THREADED run
on loops that cannot (Windows' ``SelectorEventLoop``). Who moves the bytes is a
:class:`~prismq_subprocess._io._pipes.PipeBridge`, chosen by ``io``:

- ``"selector"`` (POSIX default): :class:`~prismq_subprocess._io._io_thread.IOThread`, one thread
  multiplexing every child's pipes, so threads do not grow with the number of children;
- ``"threads"`` (Windows default, where anonymous pipes cannot be polled):
  :class:`~prismq_subprocess._io._pipes.ThreadPerPipe`, a blocking thread per pipe. Forcing it on
  POSIX is how the Windows route is tested on Linux.

``Popen`` itself still runs in the spawn pool. Measured on 2 shared cores (``/bin/true`` through
``run()``, 100 spawns x 7 interleaved rounds), spawning inline on the loop thread took 0.89x the
time of the pool sequentially but 1.08x at 8 in flight (the pool forks on both cores while the
loop keeps serving pipes), and inline would block every other task of the loop for the whole
``fork``/``exec`` (milliseconds for a large parent). With the pool, THREADED ``run()`` already
measured 0.64x-0.95x of raw ``asyncio.create_subprocess_exec`` + ``communicate()`` (which on
3.11 starts a child-watcher thread per child), so the hop is not worth giving up.
"""

from __future__ import annotations

import asyncio
import subprocess
from typing import Literal

from .._core._exceptions import InvalidOptionError
from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._tree_stop import register_child
from .._io._child_exit import release_orphaned_pidfds, watch_exit
from .._io._io_thread import IOThread
from .._io._pipes import BridgedReader, PipeBridge, ThreadPerPipe
from .._platform import PIPES_SELECTABLE, PlatformOps
from ._base import SpawnRequest, SubprocessStrategy
from ._popen import ExecutorOwner, spawn_in_executor
from ._process_base import PopenProcess

__all__ = ["IOMode", "ThreadedProcess", "ThreadedStrategy"]

#: How THREADED moves pipe bytes: ``"auto"`` picks ``"selector"`` on POSIX, ``"threads"`` on
#: Windows.
IOMode = Literal["auto", "selector", "threads"]


class ThreadedProcess(PopenProcess):
    """An ``asyncio.subprocess.Process`` look-alike over a ``Popen`` driven by threads.

    ``stdout``/``stderr`` are real ``asyncio.StreamReader`` objects fed by the strategy's pipe
    bridge (with flow control: a slow reader stops the reading, and the child blocks on its
    full pipe); ``stdin`` is ``StreamWriter``-like
    (:class:`~prismq_subprocess._io._pipes.StdinWriterBase`).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        popen: subprocess.Popen[bytes],
        *,
        limit: int,
        bridge: PipeBridge,
        use_pidfd: bool,
    ) -> None:
        super().__init__(loop, popen)
        pid = popen.pid
        if popen.stdin is not None:
            self.stdin = bridge.open_writer(loop, popen.stdin, name=f"prismq-stdin-{pid}")
        if popen.stdout is not None:
            self.stdout = bridge.open_reader(
                loop, popen.stdout, limit=limit, name=f"prismq-stdout-{pid}"
            )
        if popen.stderr is not None:
            self.stderr = bridge.open_reader(
                loop, popen.stderr, limit=limit, name=f"prismq-stderr-{pid}"
            )
        for reader in (self.stdout, self.stderr):
            if reader is not None:
                reader.on_eof = self._close_stdin_when_done
        watch_exit(
            loop,
            popen,
            self._set_returncode,
            use_pidfd=use_pidfd,
            io_thread=bridge if isinstance(bridge, IOThread) else None,
        )

    def _set_returncode(self, returncode: int) -> None:
        super()._set_returncode(returncode)
        self._close_stdin_when_done()

    def _close_stdin_when_done(self) -> None:
        # asyncio's rule: once the child has exited and its output pipes have ended, its
        # transport closes, stdin included (what is queued is still flushed first). Without
        # it a stdin nobody closed kept its descriptor (and, with a thread per pipe, its
        # writer thread) until the strategy closed: one of each per child, without bound.
        if self._returncode is not None and self.stdin is not None and not self._holds_pipes():
            self.stdin.close_gone()

    def _holds_pipes(self) -> bool:
        # A reader has not seen end of file: the pipe is still open (asyncio's rule for letting
        # go of its child). StreamReader has kept ``_eof`` since 3.4; without it, assume closed.
        return any(
            reader is not None and not getattr(reader, "_eof", True)
            for reader in (self.stdout, self.stderr)
        )

    def _release_pipes(self) -> None:
        for reader in (self.stdout, self.stderr):
            if isinstance(reader, BridgedReader):
                reader.release()
        # Our end of its stdin too (as asyncio's transport does): the child is gone or its
        # tree stopped, and the descriptor would otherwise stay open until collected.
        if self.stdin is not None:
            self.stdin.close()


class ThreadedStrategy(SubprocessStrategy):
    """Runs ``Popen`` in a thread pool and bridges the pipes with threads; works on any loop.

    Args:
        max_workers: size of the spawn pool (default ``min(32, cpus + 4)``).
        ops: platform hooks (tests inject them).
        use_pidfd: ``False`` forces a waiter thread per child to learn its exit (the
            Windows/macOS route), even where a pidfd is available.
        io: how pipe bytes move: ``"selector"`` (one I/O thread for all children, POSIX only),
            ``"threads"`` (a thread per pipe: the Windows route, forced here for tests), or
            ``"auto"`` (``"threads"`` on Windows, ``"selector"`` elsewhere).

    Threads this strategy uses, with ``P`` = the spawn pool (at most ``max_workers``; workers
    are created while spawning and then idle until :meth:`close`) and ``N`` = live children:

    - ``io="selector"`` on Linux: ``P + 1`` (the I/O thread, started with the first piped child),
      independent of ``N``: pipes, stdin and (when the loop cannot watch it) the pidfd all go
      through the I/O thread. 500 live ``run()`` children: at most ``1 + 6 + 1`` threads with
      the default pool on 2 cores, counting the main thread.
    - ``io="selector"`` on macOS (no pidfd) or with ``use_pidfd=False``: ``P + 1 + N`` (one
      waiter per live child).
    - ``io="threads"`` (Windows): ``P + N * piped outputs + (children whose stdin was written
      to) + N`` waiters: a reader per live stdout/stderr pipe, a writer per stdin once written
      to, and a waiter per child (none on Linux with ``use_pidfd`` left on).

    :meth:`close` ends all of them (the I/O thread delivers what the pipes still hold and closes
    them); spawns then raise ``RuntimeError``.

    Raises:
        InvalidOptionError: ``io`` is not one of the choices, or ``"selector"`` on Windows.
        InvalidLimitError: ``max_workers`` is not an int >= 1.
    """

    mode: RunMode | str = RunMode.THREADED

    def __init__(
        self,
        *,
        max_workers: int | None = None,
        ops: PlatformOps | None = None,
        use_pidfd: bool = True,
        io: IOMode = "auto",
    ) -> None:
        super().__init__(max_workers=max_workers, ops=ops)
        if io not in ("auto", "selector", "threads"):
            raise InvalidOptionError(f"io must be 'auto', 'selector' or 'threads', not {io!r}")
        if io == "auto":
            io = "selector" if PIPES_SELECTABLE else "threads"
        if io == "selector" and not PIPES_SELECTABLE:
            raise InvalidOptionError("io='selector' needs POSIX pipes; use io='threads' on Windows")
        self.io: IOMode = io
        self._use_pidfd = use_pidfd
        self._bridge: PipeBridge = IOThread("prismq-io") if io == "selector" else ThreadPerPipe()
        self._pool = ExecutorOwner(max_workers, "prismq-spawn")

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        popen, containment = await spawn_in_executor(self._pool.get(), request, self.ops)
        loop = asyncio.get_running_loop()
        process = ThreadedProcess(
            loop, popen, limit=request.limit, bridge=self._bridge, use_pidfd=self._use_pidfd
        )
        process.on_exit = self.ops.child_exited
        register_child(process, self.ops.started_own_group(request.kwargs), containment, self.ops)
        return process

    def close(self) -> None:
        """Shut the spawn pool down (waits for spawns in progress), then end the pipe threads
        and close the exit watches that event loops closed before their children exited.

        Idempotent.
        """
        self._pool.close()
        self._bridge.close()
        # The pidfds of children whose event loop closed before they exited (io="threads":
        # the loop watches them), which that loop will never read.
        release_orphaned_pidfds()

    def __repr__(self) -> str:
        return f"<ThreadedStrategy io={self.io!r} use_pidfd={self._use_pidfd}>"
