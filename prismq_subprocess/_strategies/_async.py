"""ASYNC mode: the event loop's own subprocess support.

The process object is ``asyncio.subprocess.Process``, built as ``create_subprocess_exec`` builds
it, with one difference: its protocol (:class:`ExitProtocol`) also tells us when the child
itself exits. asyncio's own ``Process.wait()`` (3.11) returns only once every pipe is closed too,
so ``run()`` needs the exit on its own (a grandchild holding the pipes must not keep it waiting).
The loop already learns of the exit (its child watcher calls ``process_exited`` on the
protocol), so listening there costs nothing per run: no pidfd, no descriptor watch, no extra
task (what ``wait_exited`` has to do for a process object it did not make).

The object is a subclass (:class:`AsyncProcess`) whose signals (on POSIX) do not go through
``Popen.send_signal``: that polls the child first, which can reap it behind the loop's child
watcher, and the watcher then reports 255 instead of the exit status (CPython gh-87744, fixed
in 3.13 only).
"""

from __future__ import annotations

import asyncio
import asyncio.subprocess
import contextlib
import errno
import logging
import os
from collections.abc import Callable
from typing import Any

from .._core._cancel_shield import shielded_if_cancelled
from .._core._exceptions import InvalidOptionError
from .._core._exit_wait import reaped_status, wait_exited
from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._run_process import spawn_past_deadline
from .._core._task_start import start_task_eagerly
from .._core._tree_stop import kill_tree_now, register_child, stop_process_tree
from .._core._validation import check_signal
from .._platform import PlatformOps, prefer_pidfd_watcher
from ._base import SpawnRequest, SubprocessStrategy

__all__ = ["AsyncProcess", "AsyncStrategy", "ExitProtocol"]

logger = logging.getLogger(__name__)


class AsyncProcess(asyncio.subprocess.Process):
    """``asyncio.subprocess.Process``, whose signals never reap the child.

    asyncio before 3.13 signals through ``Popen.send_signal``, whose ``poll()`` reaps a child
    that has just exited before the loop's child watcher does: the watcher then finds nothing
    and reports 255, and the exit status is lost (CPython gh-87744). Here (POSIX) the signal
    goes to the pid only while it is still an unreaped child of ours, looked at without reaping:
    never to a pid the watcher has reaped and the system may have reused in the loop turn before
    the status arrives (CPython gh-127049), as long as the watcher reaps on the loop's thread
    (the pidfd watchers this package and Python 3.12+ use by default on Linux). A watcher that
    reaps in a thread of its own (``ThreadedChildWatcher``: macOS, or a host that chose it)
    leaves asyncio's own window: should the pid go to another child of ours in the moment
    before the status reaches the loop, that child would get the signal.
    On Windows asyncio's own route is kept, and so is the loop's own on a loop whose transport
    is not asyncio's (uvloop's signals through libuv, which reaps on the loop's thread; it
    raises ``ProcessLookupError`` as soon as the child has exited).
    """

    def __init__(
        self,
        transport: asyncio.SubprocessTransport,
        protocol: asyncio.subprocess.SubprocessStreamProtocol,
        loop: asyncio.AbstractEventLoop,
        ops: PlatformOps,
    ) -> None:
        super().__init__(transport, protocol, loop)
        self._ops = ops

    @property
    def returncode(self) -> int | None:
        """The exit status, once known (asyncio's); for a child of a loop that closed first and
        could not set it (uvloop's), the one read when it was reaped here (``cleanup()``, the
        stop from the next loop)."""
        code: int | None = self._transport.get_returncode()  # type: ignore[attr-defined]
        return code if code is not None else reaped_status(self)

    def _signalled(self, sig: int | None) -> bool:
        transport: Any = self._transport  # type: ignore[attr-defined]
        check = getattr(transport, "_check_proc", None)
        if check is None:
            # Another loop's transport (uvloop's): its own route, which signals through the
            # loop (no Popen.poll) and refuses once it has reaped the child, as
            # asyncio.create_subprocess_exec on that loop does.
            return False
        # asyncio raises ProcessLookupError once it has let go of the child.
        check()
        # Like Popen: a child known to have exited is not signalled.
        return self.returncode is not None or self._ops.signal_unreaped_child(self.pid, sig)

    def send_signal(self, signal: int) -> None:
        """Send ``signal`` to the child (not to its tree); nothing once it is known to have
        exited.

        Raises:
            ProcessLookupError: the child has exited and asyncio has let go of it.
            InvalidArgumentTypeError: ``signal`` is no signal number (``None`` means "the
                platform's kill" further down: it killed the child).
        """
        check_signal(signal)
        if not self._signalled(signal):
            super().send_signal(signal)

    def terminate(self) -> None:
        """Ask the child to stop (SIGTERM; ``TerminateProcess`` on Windows)."""
        if not self._signalled(int(self._ops.stop_signal(own_group=False))):
            super().terminate()

    def kill(self) -> None:
        """Kill the child (SIGKILL; ``TerminateProcess`` on Windows)."""
        if not self._signalled(None):
            super().kill()


class ExitProtocol(asyncio.subprocess.SubprocessStreamProtocol):
    """asyncio's subprocess protocol, also reporting the child's own exit (pipes may be open).

    ``on_exit(pid)`` runs at the exit (the platform then looks for orphans it left);
    :meth:`wait_exit` waits for it.
    """

    def __init__(
        self, limit: int, loop: asyncio.AbstractEventLoop, on_exit: Callable[[int], None]
    ) -> None:
        super().__init__(limit=limit, loop=loop)
        self._exit_loop = loop
        self._on_exit = on_exit
        self._exited = False
        self._exit_waiters: list[asyncio.Future[None]] = []

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        self._pid: int = transport.get_pid()

    def process_exited(self) -> None:
        # The transport has set the return code before calling us.
        self._exited = True
        waiters, self._exit_waiters = self._exit_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        with contextlib.suppress(Exception):
            self._on_exit(self._pid)
        super().process_exited()

    async def wait_exit(self) -> None:
        """Return once the child itself has exited.

        Cancellation: only the waiting stops.
        """
        if self._exited:
            return
        waiter: asyncio.Future[None] = self._exit_loop.create_future()
        self._exit_waiters.append(waiter)
        try:
            await waiter
        finally:
            if waiter in self._exit_waiters:
                self._exit_waiters.remove(waiter)


class AsyncStrategy(SubprocessStrategy):
    """Spawns with ``asyncio.create_subprocess_exec``/``_shell``; the process object *is*
    ``asyncio.subprocess.Process``.

    On a loop without subprocess support (Windows' ``SelectorEventLoop``) :meth:`spawn` raises
    ``NotImplementedError``, which the wrapper turns into a fallback or a policy error.
    """

    mode: RunMode | str = RunMode.ASYNC

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        # asyncio kills a child whose creation is cancelled, but not what that child may already
        # have started in its group. So the creation runs in a task of its own that our caller's
        # cancellation does not reach: when the caller gives up, we wait for the creation (a few
        # loop iterations, as asyncio's own clean-up waits for the child) and kill the whole tree.
        # The creation hands its result to `created` itself: one loop iteration fewer than
        # awaiting the task through asyncio.shield (whose outer future is resolved by a done
        # callback, itself scheduled), and our caller's cancellation cancels only `created`.
        loop = asyncio.get_running_loop()
        created: asyncio.Future[ProcessLike] = loop.create_future()
        creation = start_task_eagerly(loop, self._create_into(request, created))
        try:
            return await created
        except asyncio.CancelledError as exc:
            # Shielded from a cancelled anyio scope (level-triggered: it would cancel every
            # await of the undo, leaving the child unreaped); asyncio's own cancellations still
            # reach it.
            with shielded_if_cancelled():
                process = await _abandon(creation)
                if process is not None:
                    if spawn_past_deadline(exc):
                        # The run's deadline, not a cancellation: the child runs and may have
                        # written; the run path stops it as for any timeout and keeps that.
                        return process
                    await self._undo(process)
            raise

    async def _undo(self, process: ProcessLike) -> None:
        """Undo the spawn of ``process``, whose caller gave up: its tree stopped with no grace,
        its pipes let go of, the child waited for and its transport closed; the caller's
        cancellation then propagates.

        The stop is the full one (``stop_process_tree``), not one look at the process table:
        asyncio hands the child over only once its pipes are connected, by when it may be
        forking (a daemon's middle process forks it the moment after the look, and the kill
        of the middle would leave it running), or have exited, leaving a daemon behind.

        As asyncio does with the child of a creation it cancels (kill, then wait), the
        cancellation reaches our caller once the child is dead and reaped and its transport
        closed: returning at once left that to a loop which may end right after (a request
        cancelled at shutdown), with the child unreaped and its transport unclosed
        (ResourceWarnings when collected).

        Cancellation (again, meanwhile): what is left is killed at once (``kill_tree_now``)
        and the transport closed without more waiting.
        """
        stopper = asyncio.ensure_future(stop_process_tree(process, grace=0.0, ops=self.ops))
        try:
            await asyncio.shield(stopper)
        except asyncio.CancelledError:
            kill_tree_now(process, self.ops)
        except Exception:  # the child itself is still killed and waited for below
            logger.exception("stopping the tree of the cancelled spawn %d failed", process.pid)
            kill_tree_now(process, self.ops)
        if not stopper.done():
            stopper.add_done_callback(_retrieve)
        self.release_pipes(process)
        try:
            await self.wait_exit(process)
        except asyncio.CancelledError:
            pass  # our caller's cancellation propagates all the same
        finally:
            transport: Any = getattr(process, "_transport", None)
            if transport is not None:
                with contextlib.suppress(Exception):
                    transport.close()

    async def _create_into(
        self, request: SpawnRequest, created: asyncio.Future[ProcessLike]
    ) -> ProcessLike | None:
        try:
            process = await self._create(request)
        except asyncio.CancelledError:
            created.cancel()  # (a no-op when our caller was cancelled first)
            raise
        except BaseException as exc:
            if not created.done():
                created.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return None  # the error reached the caller through `created`
        if not created.done():
            created.set_result(process)
        return process

    async def _create(self, request: SpawnRequest) -> ProcessLike:
        loop = asyncio.get_running_loop()
        kwargs, containment = self.ops.prepare_spawn(
            _options_for(loop, request.kwargs), request.die_with_host, ahead=True
        )
        # Python 3.11: exits through the loop's selector rather than a thread per child (as
        # 3.12 does by default), unless the host chose its watcher.
        prefer_pidfd_watcher()
        limit, on_exit = request.limit, self.ops.child_exited

        def protocol() -> ExitProtocol:
            return ExitProtocol(limit, loop, on_exit)

        # What asyncio.create_subprocess_exec/_shell do, with our protocol.
        try:
            if request.shell:
                transport, proto = await loop.subprocess_shell(
                    protocol,
                    request.command,  # type: ignore[arg-type]
                    stdin=request.stdin,
                    stdout=request.stdout,
                    stderr=request.stderr,
                    **kwargs,
                )
            else:
                assert isinstance(request.command, tuple)
                transport, proto = await loop.subprocess_exec(
                    protocol,
                    *request.command,
                    stdin=request.stdin,
                    stdout=request.stdout,
                    stderr=request.stderr,
                    **kwargs,
                )
        except asyncio.CancelledError:
            # asyncio killed the child it may have started; what the child forked already
            # carries its containment.
            self.ops.kill_contained(containment)
            raise
        except BaseException as exc:
            self.ops.release(containment)
            if isinstance(exc, OSError) and not isinstance(loop, asyncio.BaseEventLoop):
                # (On asyncio's own loops Popen names the program only when its exec failed:
                # no name means a step before it did, e.g. setpgid refused.)
                _name_the_program(exc, request, kwargs)
            raise
        process = AsyncProcess(transport, proto, loop, self.ops)
        # Off the loop: moving the child into its cgroup blocks for milliseconds.
        self.ops.adopt_soon(process.pid, containment)
        register_child(process, self.ops.started_own_group(kwargs), containment, self.ops)
        return process

    async def wait_exit(self, process: ProcessLike) -> int:
        """Return the exit status once the child itself has exited, whoever still holds its
        pipes: our protocol reports the exit (see the module docstring); a process object made
        elsewhere is watched by the default.

        Cancellation: only the waiting stops.
        """
        protocol = getattr(process, "_protocol", None)
        if not isinstance(protocol, ExitProtocol):
            return await super().wait_exit(process)
        if process.returncode is None:
            await protocol.wait_exit()
        returncode = process.returncode
        # Set by the transport before it told the protocol; a loop that did otherwise is
        # covered by the general watch.
        if returncode is None:
            await wait_exited(process)
            returncode = process.returncode
        return returncode if returncode is not None else await process.wait()


#: The ``Popen`` options uvloop's ``subprocess_exec``/``_shell`` refuse whatever their value
#: ("unexpected kwargs", uvloop 0.17-0.23), with the values that are ``Popen``'s own defaults
#: (``process_group=-1`` is what ``Popen`` makes of ``None``).
_UVLOOP_REFUSES: dict[str, tuple[object, ...]] = {
    "process_group": (None, -1),
    "umask": (-1,),
    "pipesize": (-1,),
    "user": (None,),
    "group": (None,),
    "extra_groups": (None,),
}


def _options_for(loop: asyncio.AbstractEventLoop, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` as ``loop`` takes them: on uvloop, the options it refuses are dropped where
    they hold ``Popen``'s default (a caller forwarding them, or our own ``process_group=None``
    pass-through), and refused by name otherwise, before anything starts.

    Raises:
        InvalidOptionError: an option uvloop cannot honour has a value of its own.
    """
    if not type(loop).__module__.startswith("uvloop") or kwargs.keys().isdisjoint(_UVLOOP_REFUSES):
        return kwargs
    out = dict(kwargs)
    for name, defaults in _UVLOOP_REFUSES.items():
        if name not in out:
            continue
        value = out[name]
        if any(value is default or value == default for default in defaults):
            del out[name]
            continue
        raise InvalidOptionError(
            f"uvloop's subprocesses do not support {name}= (got {value!r}): start this child "
            "with RunMode.THREADED (SubprocessWrapper(RunMode.THREADED)), or on asyncio's own "
            "event loop"
        )
    return out


#: The spawn errors that concern the program itself (not a descriptor, not memory).
_PROGRAM_ERRORS = frozenset((errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENOEXEC, errno.ENOTDIR))


def _name_the_program(exc: OSError, request: SpawnRequest, kwargs: dict[str, Any]) -> None:
    """Give ``exc`` the file name ``Popen`` would have: libuv's spawn errors (uvloop) carry
    none, and the error then named the command's first word (not ``executable=``) and could not
    say why a file did not run (not executable, a directory)."""
    if exc.filename is not None or exc.errno not in _PROGRAM_ERRORS:
        return
    program = kwargs.get("executable")
    if program is None:
        command = request.command
        # (What uvloop runs for a shell command.)
        program = command[0] if isinstance(command, tuple) and not request.shell else "/bin/sh"
    exc.filename = os.fsdecode(program)


async def _abandon(creation: asyncio.Task[ProcessLike | None]) -> ProcessLike | None:
    """Wait for a creation our caller gave up on and return the child (``None`` if there is
    none to undo).

    When the creation itself was cancelled (``asyncio.run()`` shutting down cancels every task)
    or we are cancelled again meanwhile, the creation is cancelled until it gives up: asyncio's
    clean-up of a cancelled creation kills the child, then waits for pipes a shutting-down loop
    never connects (that shutdown would wait forever). A creation that finished before those
    cancellations reached it still hands its child back, for our caller to kill its tree.
    """
    try:
        if not creation.cancelling():
            await asyncio.shield(creation)
            return creation.result()
    except asyncio.CancelledError:
        pass
    except Exception:
        return None
    for _ in range(100):
        if creation.done():
            break
        creation.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0)
    # Cancelled again after the creation had finished but before the shield handed it over:
    # the child exists, and only our caller (killing its tree) can undo it.
    if creation.done() and not creation.cancelled() and creation.exception() is None:
        return creation.result()
    return None


def _retrieve(future: asyncio.Future[Any]) -> None:
    # A stop left running after a second cancellation: its error is seen, not logged unhandled.
    if not future.cancelled():
        future.exception()
