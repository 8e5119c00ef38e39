"""Running a child to its end: the one path ``run()``, ``stream()`` and ``ModuleRunner`` share.

anyio writes ``run_process`` once, on top of ``open_process``, and no backend re-implements it. We
do the same: a strategy starts the child (``SubprocessStrategy.spawn``) and answers the two
questions only it can (:class:`ChildControl`: when has the child itself exited, and how do we let
go of its pipes); everything else about taking a child to its end is written here, once:

- **The drain rule** (:data:`DRAIN_SECONDS`): what happens to output still arriving after the
  child exited, and to a leftover process holding the pipes (see the constant).
- **Stopping**: on cancellation, timeout or error the child's whole tree is stopped (SIGTERM, the
  grace period, SIGKILL) before the exception propagates; a second cancellation while stopping
  kills what is left at once and still waits for the child (:meth:`ChildRun.stop`).
- **The result**: :func:`run_to_completion` is the only place a :class:`ProcessResult` is made.

A strategy may read the output its own way (LOCAL reads in its worker thread, DRY_RUN answers from
its script): it hands :class:`ChildRun` the futures that finish when the output is read, and the
rules above apply unchanged.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any, Protocol

from .._platform import PlatformOps, after_fork_in_child, platform_ops
from ._cancel_shield import shielded_if_cancelled
from ._event_loop import running_asyncio_loop
from ._exceptions import ProcessTimeoutError
from ._modes import RunMode
from ._process import ProcessLike
from ._result import ProcessResult, TailBuffer
from ._tree_stop import group_members_alive, kill_tree_now, leads_own_group, stop_process_tree

__all__ = [
    "DRAIN_SECONDS",
    "ChildControl",
    "ChildRun",
    "discard_output",
    "run_to_completion",
    "spawn_past_deadline",
    "start_by",
]

logger = logging.getLogger(__name__)

#: How long, after the child itself has exited, we keep reading output that is still arriving.
#:
#: The child's own output is in the pipe when it exits; what can still come is written by a
#: descendant that inherited the pipe (a helper finishing up, or something left running). If the
#: pipes are not at end of file within this time, the rest of the child's tree is stopped
#: (SIGTERM, grace period, SIGKILL: ``KillMode=control-group``) and its output read for up to this
#: long again. A pipe still open after that is held by a process outside the tree (one that left
#: the child's session and was re-parented, e.g. a daemon): we close our end, keep what was read,
#: and end the run once the readers have taken all of it, however slowly they read (as long as
#: each such wait sees some of it read). That process keeps running; its next write to the pipe
#: fails (SIGPIPE/EPIPE).
#:
#: Long enough that a loaded machine delivering the last bytes late does not get a helper stopped;
#: short enough that a child leaving a daemon behind does not keep its caller waiting.
DRAIN_SECONDS = 0.5

_READ_CHUNK = 256 * 1024


class ChildControl(Protocol):
    """What the run path asks of the strategy that started a child (every strategy is one)."""

    @property
    def mode(self) -> RunMode | str:
        """The mode the child runs in (it goes into the result)."""
        ...

    async def wait_exit(self, process: ProcessLike) -> int:
        """Return the child's exit status once it has exited, even while something it started
        still holds its pipes open (asyncio's own ``wait()`` on 3.11 waits for the pipes too)."""
        ...

    def release_pipes(self, process: ProcessLike) -> None:
        """Close our ends of the child's pipes: its readers get what was already read, then end
        of file, and the descriptors are freed. Called once the child has exited or been
        stopped."""
        ...


class ChildRun:
    """A started child and the readers of its output, taken to its end by the rules above.

    The owner starts readers (:meth:`capture`, :meth:`read`, :meth:`feed`), waits with
    :meth:`wait_exit`, ends with :meth:`finish` (the child exited by itself) or :meth:`abort`
    (cancellation, timeout, error), and always calls :meth:`aclose` last.

    ``stop`` replaces the default tree stop (``stop_process_tree`` with ``grace``), e.g. to go
    through a ``ProcessManager`` whose stops are shared. ``readers`` are futures already reading
    the child's output (a strategy that reads it itself passes them).
    """

    def __init__(
        self,
        process: ProcessLike,
        control: ChildControl,
        *,
        grace: float,
        ops: PlatformOps | None = None,
        stop: Callable[[], Awaitable[object]] | None = None,
        readers: Iterable[asyncio.Future[Any]] = (),
    ) -> None:
        self.process = process
        self.control = control
        self.grace = grace
        self._ops = ops or platform_ops()
        self._stop_tree = stop
        self._readers: list[asyncio.Future[Any]] = list(readers)
        self._released = False
        _UNFINISHED.add(self)

    @property
    def mode(self) -> RunMode | str:
        """The mode of the strategy that started the child."""
        return self.control.mode

    # -- readers ------------------------------------------------------------------------------
    def read(
        self, reader: Coroutine[Any, Any, object] | asyncio.Future[Any]
    ) -> asyncio.Future[Any]:
        """Make ``reader`` (a coroutine reading one of the child's pipes to its end, run as a
        task, or a future resolved when such reading is done) part of this run; returns the
        future that is done when it is."""
        future = asyncio.ensure_future(reader)
        self._readers.append(future)
        return future

    def capture(self, stream: Any, sink: TailBuffer) -> asyncio.Future[Any] | None:
        """Read ``stream`` (if piped) into ``sink`` until end of file; the reading's future."""
        if stream is None:
            return None
        return self.read(_copy(stream, sink))

    async def wait_read(self, reader: asyncio.Future[Any]) -> None:
        """The child has exited: wait (up to :data:`DRAIN_SECONDS`, as the drain rule does) for
        ``reader`` to reach the end of its pipe."""
        if not reader.done():
            await asyncio.wait({reader}, timeout=DRAIN_SECONDS)

    def feed(self, stdin: Any, data: bytes) -> None:
        """Write ``data`` to the child's ``stdin``, then close it (a child that stops reading is
        not an error, as in ``communicate()``)."""
        if stdin is not None:
            # Written now, before the owner waits for the exit: a process that hands its input
            # over when it is waited for (LOCAL's) would otherwise start with none of it.
            error: Exception | None = None
            try:
                stdin.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the child does not want input; as communicate() does, ignore it
            except Exception as exc:  # a reader's error, reported as the run's (not here)
                error = exc
            self.read(_finish_feed(stdin, error))

    def reader_error(self) -> BaseException | None:
        """The first error a finished reader raised, if any."""
        for reader in self._readers:
            if reader.done() and not reader.cancelled() and reader.exception() is not None:
                return reader.exception()
        return None

    # -- the run's end ------------------------------------------------------------------------
    async def wait_exit(self) -> int:
        """Wait for the child itself to exit and return its status (pipes may still be open).

        Cancellation: only the wait is abandoned (the owner then calls :meth:`abort`).
        """
        return await self.control.wait_exit(self.process)

    async def finish(self) -> None:
        """The child has exited: read the rest of its output by the drain rule (stopping the rest
        of its tree if that keeps the pipes open)."""
        if await self._drained():
            return
        logger.info(
            "pid %d exited but its pipes are still open after %g s; stopping the rest of its tree",
            self.process.pid,
            DRAIN_SECONDS,
        )
        await self.stop()
        await self.settle()

    async def stop_leftovers(self, deadline: float | None = None) -> None:
        """The child exited and its output ended: stop what it left running in its process
        group (a helper it started in the background with its output elsewhere), as leaving a
        ``stream()`` block does; the run owns its tree. One ``kill(-pgid, 0)`` when the group
        is empty, the usual case. ``deadline`` (loop time; a ``run(timeout=)``'s end): the
        grace period is cut to what is left of it, so a finished command is not held past
        its timeout by what it left."""
        process = self.process
        ops = self._ops
        # signal 0 first: the usual empty group answers ESRCH without a look at the table,
        # which is read in a worker thread, one look for every child asking at once
        # (milliseconds with thousands of processes).
        if (
            leads_own_group(process)
            and ops.signal_group(process.pid, 0)
            and await group_members_alive(process.pid, ops)
        ):
            logger.info(
                "pid %d exited and left members of its process group running; stopping them",
                process.pid,
            )
            grace = self.grace
            if deadline is not None:
                self.grace = min(grace, max(0.0, deadline - asyncio.get_running_loop().time()))
            try:
                await self.stop()
            finally:
                self.grace = grace

    async def abort(self) -> None:
        """Cancellation, timeout or error: stop the tree, then read what is left (drain rule).

        Cancellation: see :meth:`stop`.
        """
        await self.stop()
        await self.settle()

    async def stop(self) -> None:
        """Stop the child and its tree (SIGTERM, grace period, SIGKILL) and wait for the child.

        Safe on a child that already exited (members of its group it left are stopped).

        Cancellation: a cancellation arriving while stopping kills what is left at once, still
        waits for the child, then propagates; the tree is never left half-stopped. Called inside
        an anyio scope that is already cancelled (clean-up after a ``move_on_after``, a
        disconnected client), the stop runs in full, shielded from that scope.
        """
        with shielded_if_cancelled():
            stopper = asyncio.ensure_future(self._stop())
            try:
                await asyncio.shield(stopper)
            except GeneratorExit:
                # Closed mid-stop (see run_to_completion): what the grace period was waiting
                # for is killed now, as no later step of the stop will run.
                kill_tree_now(self.process, self._ops)
                raise
            except asyncio.CancelledError:
                kill_tree_now(self.process, self._ops)
                # Shielded: an anyio scope cancelled meanwhile would cancel this wait too (and
                # the stopper with it), so the child would not be waited for.
                with shielded_if_cancelled(), contextlib.suppress(BaseException):
                    await stopper
                raise

    async def _stop(self) -> None:
        if self._stop_tree is not None:
            await self._stop_tree()
        else:
            await stop_process_tree(self.process, grace=self.grace, ops=self._ops)

    async def settle(self) -> None:
        """After the child ended (and its tree was stopped): read for up to
        :data:`DRAIN_SECONDS`, then let go of pipes something outside the tree still holds."""
        if await self._drained():
            return
        logger.info(
            "pid %d: its output has not ended %g s after its tree was stopped (a process out of "
            "reach holds the pipes, or nobody reads them); letting go of them, keeping what "
            "they hold",
            self.process.pid,
            DRAIN_SECONDS,
        )
        self._release()
        await self._read_what_is_left()

    async def _drained(self) -> bool:
        """Whether every reader reached end of file within :data:`DRAIN_SECONDS`."""
        return (await self._wait_for_readers())[1] == 0

    async def _wait_for_readers(self) -> tuple[int, int]:
        """Wait up to :data:`DRAIN_SECONDS` for the readers still reading to reach end of file:
        how many were reading, and how many still are."""
        pending = [reader for reader in self._readers if not reader.done()]
        if not pending:
            return 0, 0
        _, still = await asyncio.wait(pending, timeout=DRAIN_SECONDS)
        return len(pending), len(still)

    async def _read_what_is_left(self) -> None:
        """The pipes were let go of: nothing more can arrive, and what the readers still hold
        is all there is. Wait while they work through it: a reader slower than the child
        (ModuleRunner's, feeding subscribers) lost the end of the output when it was cut off
        :data:`DRAIN_SECONDS` after the release. Readers that read nothing for that long (a
        consumer that stopped) are stopped."""
        unread = self._unread()
        while True:
            reading, still = await self._wait_for_readers()
            if not still:
                return
            now = self._unread()
            if still < reading or (now is not None and unread is not None and now < unread):
                unread = now
                continue
            self._cancel_readers()
            return

    def _unread(self) -> int | None:
        """Bytes the child's output readers hold that nobody has read yet (``None``: unknown)."""
        total: int | None = None
        for stream in (self.process.stdout, self.process.stderr):
            held = _unread_bytes(stream)
            if held is not None:
                total = held + (total or 0)
        return total

    def _release(self) -> None:
        if not self._released:
            self._released = True
            self.control.release_pipes(self.process)

    def _cancel_readers(self) -> None:
        # Only our own tasks: a future a strategy handed us (LOCAL's worker job) ends by itself
        # once the pipes are let go of, and reports the child's status as it does.
        for reader in self._readers:
            if isinstance(reader, asyncio.Task) and not reader.done():
                reader.cancel()

    def discard(self) -> None:
        """Synchronously kill the tree and drop the readers (a run nobody will supervise)."""
        _UNFINISHED.discard(self)
        kill_tree_now(self.process, self._ops)
        # RuntimeError: the loop is closed (a run abandoned with it): nothing there to let go
        # of or to cancel any more.
        with contextlib.suppress(RuntimeError):
            self._release()
        with contextlib.suppress(RuntimeError):
            self._cancel_readers()

    async def aclose(self) -> None:
        """End of the owner's scope: readers still going are stopped and the pipes let go (the
        owner has already waited for, or stopped, the child). Idempotent."""
        _UNFINISHED.discard(self)
        pending = [reader for reader in self._readers if not reader.done()]
        if pending:
            self._release()
            self._cancel_readers()
            await asyncio.wait(pending)
        for reader in self._readers:  # retrieved, so asyncio does not log them as unhandled
            if not reader.cancelled():
                reader.exception()


#: The runs whose owner has not ended them yet (no aclose() or discard()): what the interpreter's
#: exit finds here was abandoned (its loop closed under it, its task destroyed pending).
_UNFINISHED: weakref.WeakSet[ChildRun] = weakref.WeakSet()


@atexit.register
def _kill_abandoned() -> None:
    """At interpreter exit: kill the trees of runs nobody took to their end, as their own clean-up
    would have (``run()``, ``stream()`` and ``ModuleRunner`` never leave a child behind; a raw
    process of ``create_subprocess_exec`` is not a run and is left alone). A run whose coroutine
    was closed meanwhile did so itself (``GeneratorExit``); the others (THREADED's, whose I/O
    thread keeps them from being collected) are found here."""
    for run in list(_UNFINISHED):
        if run.process.returncode is None:
            with contextlib.suppress(Exception):
                kill_tree_now(run.process, run._ops)


# A forked child must not kill its parent's children when it exits.
after_fork_in_child(_UNFINISHED.clear)


async def run_to_completion(
    start: Callable[[TailBuffer, TailBuffer], Awaitable[ChildRun]],
    *,
    display: tuple[str, ...] | str,
    timeout: float | None,
    max_output_bytes: int | None,
) -> ProcessResult:
    """Start a child with ``start`` and take it to its end; the body of
    ``SubprocessWrapper.run()``.

    ``start(out, err)`` spawns the child and returns its :class:`ChildRun` with readers filling
    ``out``/``err`` (each keeping its last ``max_output_bytes``). ``timeout`` covers everything
    from the start.

    Timeout: the tree is stopped and :class:`ProcessTimeoutError` carries the output read so far.
    A deadline that passes while the child is being started does not cut the spawn short once
    it is under way (see :func:`start_by`): the child is then stopped the same way, and what it
    wrote is in the error. Cancellation: the tree is stopped (see :meth:`ChildRun.stop`) before
    ``CancelledError`` propagates; a spawn cancelled midway kills the child it was starting. A
    cancelled anyio scope gets the same stop (shielded from the scope).

    Raises:
        ProcessTimeoutError: ``timeout`` expired.
    """
    if timeout is not None and timeout <= 0:
        # No time at all: nothing is started for it. (asyncio.timeout(0) would let a child start
        # and then kill it at the first suspension, and a DRY_RUN that never suspends would
        # finish: the modes would disagree.)
        raise ProcessTimeoutError(cmd=display, timeout=0.0, returncode=None)
    out = TailBuffer(max_output_bytes)
    err = TailBuffer(max_output_bytes)
    started = time.perf_counter()
    # (Ours: under another event loop (trio) it raises NoRunningLoopError, as the spawn does.)
    loop = running_asyncio_loop()
    deadline = None if timeout is None else loop.time() + timeout
    run: ChildRun | None = None
    expired = False
    closed = False
    try:
        if deadline is None:
            run = await start(out, err)
        else:
            run = await start_by(functools.partial(start, out, err), deadline)
        # (Checked here too: a spawn handed over after the deadline may not suspend again.)
        expired = run is None or (deadline is not None and loop.time() >= deadline)
        if run is not None and not expired:
            scope = asyncio.timeout_at(deadline)
            try:
                async with scope:
                    await run.wait_exit()
                    await run.finish()
            except TimeoutError:
                if not scope.expired():
                    raise  # a TimeoutError from elsewhere: the tree is stopped all the same
                expired = True
        if run is not None and not expired:
            # Outside the timeout: the command is done, and what it left behind is no reason
            # to report it timed out (its stop takes the grace period when it ignores SIGTERM).
            await run.stop_leftovers(deadline)
    except GeneratorExit:
        # The coroutine is being closed without running to its end: its task was destroyed
        # pending, with its loop closed (a second Ctrl-C in asyncio.run's clean-up, a host that
        # closed its loop without cancelling its tasks). No await can run now, and nobody will
        # supervise the child again: its tree is killed at once.
        closed = True
        if run is not None:
            run.discard()
        raise
    except BaseException:
        if run is not None and not expired:
            # Shielded from a cancelled anyio scope, which would cancel every await of the
            # clean-up (its cancellation is level-triggered, not asyncio's one-shot).
            with shielded_if_cancelled():
                try:
                    await run.abort()
                except GeneratorExit:  # (closed in this stop: as above)
                    closed = True
                    run.discard()
                    raise
        raise
    finally:
        if run is not None and not closed:
            with shielded_if_cancelled():
                try:
                    if expired:
                        await run.abort()  # the tree stopped, what is left read: as for any timeout
                except GeneratorExit:  # (closed in the timeout's stop: as above)
                    closed = True
                    run.discard()
                    raise
                finally:
                    if not closed:
                        await run.aclose()
    if expired:
        raise ProcessTimeoutError(
            cmd=display,
            timeout=timeout or 0.0,
            returncode=None if run is None else run.process.returncode,
            stdout=out.getvalue(),
            stderr=err.getvalue(),
        )
    assert run is not None
    error = run.reader_error()
    if error is not None:
        raise error
    returncode = run.process.returncode
    assert returncode is not None
    return ProcessResult(
        args=display,
        returncode=returncode,
        stdout=out.getvalue(),
        stderr=err.getvalue(),
        pid=run.process.pid,
        duration=time.perf_counter() - started,
        mode=run.mode,
        stdout_truncated=out.truncated,
        stderr_truncated=err.truncated,
        stdout_total_bytes=out.total,
        stderr_total_bytes=err.total,
    )


async def start_by(start: Callable[[], Awaitable[ChildRun]], deadline: float) -> ChildRun | None:
    """Start a child for a run that must end by ``deadline`` (loop time): ``run()``'s and
    ``stream()``'s spawn. Returns its run, or ``None`` when the deadline passed before the child
    was started (nothing runs).

    The deadline does not simply cancel ``start()``, as ``asyncio.timeout`` would: a child
    already running when it passes (a slow or loaded loop still handing it over) has written
    to its pipes, and killing it unread lost that output. It cancels the spawn with a marker
    instead (:func:`spawn_past_deadline` recognises it): a spawn still waiting for a worker is
    dropped, one under way is finished and its run returned, for the caller to stop as for any
    timeout (its output kept by the drain rule). A strategy that does not know the marker
    undoes its spawn as for a cancellation (``None``). Like ``asyncio.timeout``, the marker is
    this task's own cancellation, taken back once handled (``Task.uncancel``): no task or
    future of its own per run.

    Cancellation: as a spawn's (the child being started is killed, and the cancellation
    reaches the caller once it is dead).

    Raises:
        what the spawn raises (e.g. ``CommandNotFoundError``).
    """
    task = asyncio.current_task()
    if task is None:  # (not in a task: nothing to cancel at the deadline)
        return await start()
    loop = asyncio.get_running_loop()
    baseline = task.cancelling()
    fired = False

    def past_deadline() -> None:
        nonlocal fired
        fired = True
        _BASELINES[task] = baseline
        task.cancel(_PAST_DEADLINE)

    alarm = loop.call_at(deadline, past_deadline)
    try:
        return await start()
    except asyncio.CancelledError as exc:
        if not fired:
            raise
        fired = False  # (taken back here)
        if task.uncancel() <= baseline:
            return None  # the spawn was dropped or undone at the deadline: nothing runs
        if exc.args != (_PAST_DEADLINE,):
            raise  # another cancellation's own exception
        # Another cancellation came while the spawn was undone, and the strategy raised the
        # marker's exception it caught first. That one must go through with its own: an anyio
        # scope knows its cancellations by their message (it re-sends its own while it is
        # cancelled, so one checkpoint gets it); asyncio's own cancellers count, not read.
        await asyncio.sleep(0)
        raise asyncio.CancelledError from None
    finally:
        alarm.cancel()
        _BASELINES.pop(task, None)
        if fired:
            # The marker was handled: the spawn finished despite it (the run is the caller's
            # to stop), or failed otherwise (its error goes through).
            task.uncancel()


#: The message of the cancellation :func:`start_by` sends a spawn at its run's deadline.
_PAST_DEADLINE = "prismq: the run's deadline passed while its child was being started"
#: Per task whose spawn got that cancellation: how many cancellations it had before it.
_BASELINES: weakref.WeakKeyDictionary[asyncio.Task[Any], int] = weakref.WeakKeyDictionary()


def spawn_past_deadline(exc: asyncio.CancelledError) -> bool:
    """For a strategy whose spawn was cancelled with ``exc``: whether that is only
    :func:`start_by` saying the run's deadline passed (nothing else cancelled it since). The
    strategy then finishes a spawn already under way and returns its child, and drops one not
    under way yet (raising ``exc``)."""
    task = asyncio.current_task()
    if task is None or exc.args != (_PAST_DEADLINE,):
        return False
    baseline = _BASELINES.get(task)
    return baseline is not None and task.cancelling() == baseline + 1


def _unread_bytes(stream: Any) -> int | None:
    """How many bytes ``stream`` holds that were not read yet, if it can tell: an
    ``asyncio.StreamReader`` (ours are its subclasses) keeps them in its private ``_buffer``;
    a reader of another kind may offer ``_unread_bytes()``."""
    if isinstance(stream, asyncio.StreamReader):
        buffer = getattr(stream, "_buffer", None)
        return len(buffer) if isinstance(buffer, bytearray | bytes) else None
    held = getattr(stream, "_unread_bytes", None)
    return held() if callable(held) else None


async def _copy(stream: Any, sink: TailBuffer) -> None:
    read = stream.read
    append = sink.append
    while chunk := await read(_READ_CHUNK):
        append(chunk)


async def discard_output(stream: Any) -> None:
    """Read ``stream`` to its end, dropping the bytes (so a pipe nobody reads can close)."""
    read = stream.read
    while await read(_READ_CHUNK):
        pass


async def _finish_feed(stdin: Any, error: Exception | None) -> None:
    try:
        if error is not None:
            raise error
        await stdin.drain()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the child does not want more input; as communicate() does, ignore it
    finally:
        stdin.close()
