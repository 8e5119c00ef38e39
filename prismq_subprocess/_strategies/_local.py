"""LOCAL mode: ``subprocess.run`` semantics without freezing the event loop.

The child's pipes are moved by a worker thread in one blocking call; its output becomes readable
when it has finished. Trade-offs (see docs/RUN_MODES.md): no real-time output; input written to
``stdin`` is delivered when stdin is closed (or ``communicate``/``wait`` is called), not as it is
written; at most ``max_workers`` ``run()`` children make progress at once. The worker reports the
child's exit as it happens (so the run path's drain rule and tree stops work as in every mode),
and lets go of the pipes when the loop asks it to.

Until the child has finished, a raw process's output waits in a :class:`SpillBuffer` (memory up
to a bound, then a temporary file); its readers then get it a piece at a time as they read, so
the host's memory stays bounded however much the child prints (``ModuleRunner`` reads so).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import subprocess
import threading
from collections.abc import AsyncIterator, Callable

from .._core._cancel_shield import shielded_if_cancelled
from .._core._modes import RunMode
from .._core._process import ProcessLike
from .._core._result import TailBuffer
from .._core._run_process import ChildRun, spawn_past_deadline
from .._core._tree_stop import register_child
from .._core._validation import preexec_failed
from .._io._blocking_io import DrainWatch, drain_blocking, wait_unless_host_exits
from .._platform import Containment, PlatformOps
from ._base import DEFAULT_LIMIT, RunStart, SpawnRequest, SubprocessStrategy
from ._popen import ExecutorOwner, discard_popen, run_off_loop, spawn_in_executor, start_popen
from ._process_base import PopenProcess
from ._spill_buffer import SpillBuffer
from ._stdin_buffer import BufferedStdin

__all__ = ["LocalProcess", "LocalStrategy"]


#: The most bytes of a spilled output read back from its file at a time.
_PIECE = 256 * 1024


class _Handover:
    """The "transport" of a :class:`_DeferredReader`'s inner ``StreamReader``: feeds it the
    child's output a piece at a time as it is read (the reader's flow control asks for more),
    so the output is held once, not copied whole into the reader at the exit; what went to the
    buffer's file is read back in a worker thread."""

    def __init__(self, sink: SpillBuffer, reader: asyncio.StreamReader) -> None:
        self._sink = sink
        # None once everything was fed: the reader keeps us as its transport, and the pair
        # would otherwise be a cycle only a full collection frees, per LOCAL output read.
        self._reader: asyncio.StreamReader | None = reader
        self._paused = False
        self._reading: asyncio.Future[bytes] | None = None
        self._done = False
        self._feed_scheduled = False

    def pause_reading(self) -> None:
        """The reader holds enough: feed it no more until it asks."""
        self._paused = True

    def resume_reading(self) -> None:
        """The reader took most of what it held (or waits for more): feed it again, from a
        loop callback as a real transport would. Fed at once, a reader that resumes us before
        it makes its waiter (``StreamReader._wait_for_data`` does) got its data and paused us
        again past twice its limit with no waiter to wake: ``readexactly`` of more hung."""
        self._paused = False
        if not self._feed_scheduled:
            self._feed_scheduled = True
            asyncio.get_running_loop().call_soon(self._scheduled_feed)

    def _scheduled_feed(self) -> None:
        self._feed_scheduled = False
        self.feed()

    def is_closing(self) -> bool:
        """Whether everything was fed (or the handover was closed)."""
        return self._done

    def close(self) -> None:
        """Feed nothing more and drop what is left of the output. Idempotent."""
        self._done = True
        self._reader = None
        self._sink.close()

    def get_extra_info(self, name: str, default: object = None) -> object:
        """No extra information: ``default``."""
        return default

    def feed(self) -> None:
        """Feed the reader until it has enough (it pauses us), the rest is in the file (read
        in a thread, then fed) or all was fed (then end of file)."""
        reader = self._reader
        while not (self._paused or self._done or self._reading is not None or reader is None):
            piece = self._sink.take_held()
            if piece is None:
                loop = asyncio.get_running_loop()
                try:
                    self._reading = loop.run_in_executor(None, self._sink.take_spilled, _PIECE)
                except RuntimeError:
                    # The loop's default executor is shut down (asyncio.run's end, a host's
                    # own shutdown): the piece is read here, a bounded read of a local file.
                    try:
                        piece = self._sink.take_spilled(_PIECE)
                    except OSError as exc:
                        self._fail(exc)
                        return
                else:
                    self._reading.add_done_callback(self._read_back)
                    return
            if not piece:
                self._end().feed_eof()
                return
            reader.feed_data(piece)

    def _end(self) -> asyncio.StreamReader:
        """Mark everything fed and let go of the reader; return it for its last call."""
        reader = self._reader
        assert reader is not None
        self._done = True
        self._reader = None
        return reader

    def _fail(self, error: Exception) -> None:
        # The file could not be read (a disk error; the read cancelled): the output is
        # incomplete, and its reader is told so rather than left waiting.
        self._sink.close()
        self._end().set_exception(error)

    def _read_back(self, reading: asyncio.Future[bytes]) -> None:
        self._reading = None
        if self._done:
            return
        error = None if reading.cancelled() else reading.exception()
        if reading.cancelled() or error is not None:
            if not isinstance(error, Exception):
                error = OSError("reading the child's output back from its file was cancelled")
            self._fail(error)
            return
        piece = reading.result()
        reader = self._reader
        if reader is None:
            return
        if piece:
            reader.feed_data(piece)
        else:
            self._end().feed_eof()
        self.feed()


class _DeferredReader:
    """A ``StreamReader`` look-alike whose data appears once the child has finished, handed
    over a piece at a time as it is read (see :class:`_Handover`)."""

    def __init__(self, process: LocalProcess, sink: TailBuffer, limit: int) -> None:
        # None once the child's job succeeded (see LocalProcess._let_go): nothing to wait for.
        self._process: LocalProcess | None = process
        self._sink = sink
        self._inner = asyncio.StreamReader(limit=limit)
        # A run()'s bounded buffers, which the run path reads too, are copied over whole.
        self._handover = _Handover(sink, self._inner) if isinstance(sink, SpillBuffer) else None
        self._filled = False
        self._waiting = False

    async def _ready(self, name: str) -> asyncio.StreamReader:
        if not self._filled:
            if self._waiting:
                # As asyncio's reader: a second reader waiting at once was given nothing (the
                # first took it all), as if the child had printed nothing.
                raise RuntimeError(
                    f"{name}() called while another coroutine is already waiting for incoming data"
                )
            process = self._process
            if process is not None:
                self._waiting = True
                try:
                    await process._finished()
                finally:
                    self._waiting = False
            if not self._filled:
                self._filled = True
                handover = self._handover
                if handover is not None:
                    self._inner.set_transport(handover)  # type: ignore[arg-type]
                    handover.feed()
                else:
                    self._inner.feed_data(self._sink.getvalue())
                    self._inner.feed_eof()
        return self._inner

    def _unread_bytes(self) -> int:
        # What the run path asks while a slow reader works through the output (see
        # _core/_run_process._unread_bytes): before the child finishes, all of it.
        sink = self._sink
        buffered: int = len(self._inner._buffer)  # type: ignore[attr-defined]
        if isinstance(sink, SpillBuffer):
            return buffered + sink.total - sink.taken
        return sink.total - sink.dropped if not self._filled else buffered

    async def read(self, n: int = -1) -> bytes:
        """Read up to ``n`` bytes (all when ``n`` is -1), waiting for the child to finish first."""
        return await (await self._ready("read")).read(n)

    async def readline(self) -> bytes:
        """Read one line, as ``StreamReader.readline``."""
        return await (await self._ready("readline")).readline()

    async def readexactly(self, n: int) -> bytes:
        """Read exactly ``n`` bytes, as ``StreamReader.readexactly``."""
        return await (await self._ready("readexactly")).readexactly(n)

    async def readuntil(self, separator: bytes = b"\n") -> bytes:
        """Read up to and including ``separator``, as ``StreamReader.readuntil``."""
        return await (await self._ready("readuntil")).readuntil(separator)

    def at_eof(self) -> bool:
        """True once the child finished and every byte was read."""
        return self._filled and self._inner.at_eof()

    def exception(self) -> BaseException | None:
        """Always ``None``: a LOCAL stream does not fail on its own."""
        return None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        line = await self.readline()
        if not line:
            raise StopAsyncIteration
        return line


def _exit_ignored(returncode: int) -> None:
    """The ``on_exit`` of a drain that is over."""


class _Drains:
    """The blocking drains in progress, so closing the strategy can make them all let go."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watches: set[DrainWatch] = set()
        self._closed = False

    def add(self, watch: DrainWatch) -> None:
        with self._lock:
            if not self._closed:
                self._watches.add(watch)
                return
        watch.abandon()

    def discard(self, watch: DrainWatch) -> None:
        with self._lock:
            self._watches.discard(watch)

    def abandon_all(self) -> None:
        with self._lock:
            self._closed = True
            watches, self._watches = self._watches, set()
        for watch in watches:
            watch.abandon()


class LocalProcess(PopenProcess):
    """An ``asyncio.subprocess.Process`` look-alike whose pipes a worker thread moves in one
    blocking call; see the module docstring for the trade-offs.

    ``returncode`` is set (and ``wait()`` returns) when the child exits, as in the other modes;
    the output streams deliver once the pipes are closed.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        popen: subprocess.Popen[bytes],
        drains: _Drains,
        *,
        limit: int = DEFAULT_LIMIT,
        job: asyncio.Future[int] | None = None,
        buffers: tuple[TailBuffer | None, TailBuffer | None] | None = None,
        watch: DrainWatch | None = None,
    ) -> None:
        super().__init__(loop, popen)
        self._drains = drains
        self._job: asyncio.Future[int] | None = None
        self._watch = watch or DrainWatch(self._exited_in_thread, loop)
        if buffers is None:
            # All of the output, kept until the child has finished: past a bound it waits in a
            # temporary file, not in the host's memory (see SpillBuffer). (run() passes its own
            # bounded buffers, which it reads itself.)
            buffers = (
                SpillBuffer() if popen.stdout is not None else None,
                SpillBuffer() if popen.stderr is not None else None,
            )
        self._out, self._err = buffers
        if self._out is not None:
            self.stdout = _DeferredReader(self, self._out, limit)
        if self._err is not None:
            self.stderr = _DeferredReader(self, self._err, limit)
        if popen.stdin is not None and job is None:
            self.stdin = BufferedStdin(self._start)
        if job is not None:
            self._adopt(job)
        elif popen.stdin is None:
            self._start(None)

    def _start(self, input: bytes | None) -> None:
        if self._job is not None:
            return
        # A thread of its own, not the pool: a child that runs for hours must not hold a worker
        # the next spawn needs (the pool would run dry and spawning would wait forever).
        job: asyncio.Future[int] = self._loop.create_future()
        self._adopt(job)
        threading.Thread(
            target=self._complete_in_thread,
            args=(input, job),
            name=f"prismq-local-{self.pid}",
            daemon=True,
        ).start()

    def _complete_in_thread(self, input: bytes | None, job: asyncio.Future[int]) -> None:
        self._drains.add(self._watch)
        try:
            drain_blocking(self._popen, input, self._out, self._err, self._watch)
            returncode = self._popen.wait()
        except BaseException as exc:
            # The output is incomplete: readers get the error. The child is still ours to
            # reap and its exit still to report, or wait() (and a tree stop) waits for ever.
            self._reap_after_failure()
            _call_soon(self._loop, functools.partial(_settle, job, None, exc))
        else:
            _call_soon(self._loop, functools.partial(_settle, job, returncode, None))
        finally:
            self._drains.discard(self._watch)

    def _exited_in_thread(self, returncode: int) -> None:
        _call_soon(self._loop, functools.partial(self._set_returncode, returncode))

    def _reap_after_failure(self) -> None:
        """After a failed drain: close the pipes (a child still writing gets EPIPE rather than
        blocking on a pipe nobody reads), wait for the child, report its exit (blocking)."""
        popen = self._popen
        _close_pipes(popen)
        with contextlib.suppress(Exception):
            self._exited_in_thread(popen.wait())

    def _adopt(self, job: asyncio.Future[int]) -> None:
        self._job = job
        job.add_done_callback(self._job_done)

    def _job_done(self, job: asyncio.Future[int]) -> None:
        if not job.cancelled() and job.exception() is None:
            self._set_returncode(job.result())
            self._let_go()

    def _let_go(self) -> None:
        # The drain is over: nothing calls back into this process any more. Its watch (through
        # on_exit) and its readers refer back to it, a cycle only the garbage collector would
        # free, and one collection freeing a thousand children's cycles stalls the loop.
        self._watch.on_exit = _exit_ignored
        for reader in (self.stdout, self.stderr):
            if isinstance(reader, _DeferredReader):
                reader._process = None

    def _on_wait(self, why: str | None = None) -> None:
        if self._job is None:
            # Waiting with stdin still open: give the child what was written so far and EOF.
            # (After a wait, writes are ignored as asyncio's are; after a first read, which
            # does not close stdin in asyncio, a write raises rather than being lost.)
            if why is None:
                self.stdin.close()
            else:
                self.stdin.close_for(why)

    def _holds_pipes(self) -> bool:
        # The worker drains the output pipes until they close, then settles the job.
        piped = self._out is not None or self._err is not None
        return piped and (self._job is None or not self._job.done())

    def _release_pipes(self) -> None:
        self._watch.abandon()

    async def _finished(self) -> None:
        self._on_wait("first read of its output")
        assert self._job is not None
        await asyncio.shield(self._job)

    async def communicate(
        self, input: bytes | bytearray | memoryview | None = None
    ) -> tuple[bytes | None, bytes | None]:
        """Hand ``input`` to the child, let it run to completion, return ``(stdout, stderr)``."""
        if self.stdin is not None:
            if input:
                # (After stdin was handed over for the caller, a write raises while the child
                # runs: StdinAlreadySentError; after the caller's own close it is ignored.)
                self.stdin.write(input)
            self.stdin.close()
        return await super().communicate(None)

    async def _feed_stdin(self, input: bytes | bytearray | memoryview | None) -> None:
        self.stdin.close()


class LocalStrategy(SubprocessStrategy):
    """Blocking ``subprocess.run`` semantics in a pool of ``max_workers`` threads."""

    mode: RunMode | str = RunMode.LOCAL

    def __init__(self, *, max_workers: int | None = None, ops: PlatformOps | None = None) -> None:
        super().__init__(max_workers=max_workers, ops=ops)
        self._pool = ExecutorOwner(max_workers, "prismq-local")
        self._drains = _Drains()

    async def spawn(self, request: SpawnRequest) -> ProcessLike:
        popen, containment = await spawn_in_executor(self._pool.get(), request, self.ops)
        process = LocalProcess(asyncio.get_running_loop(), popen, self._drains, limit=request.limit)
        process.on_exit = self.ops.child_exited
        register_child(process, self.ops.started_own_group(request.kwargs), containment, self.ops)
        return process

    async def _begin_run(self, start: RunStart) -> ChildRun:
        """The fast path: spawn, drain and reap in one worker job (as ``subprocess.run`` does in
        its thread); the loop learns of the child once, and of its exit only if its pipes are
        still held open then.

        Cancellation: a child still being spawned is killed with its tree by whichever thread
        sees it first, even if the event loop is gone by then; as asyncio does for a cancelled
        creation, the cancellation reaches the caller once it is dead and reaped (cancelled
        again meanwhile: at once). A run whose job has not started yet starts nothing. At the
        run's deadline (``spawn_past_deadline``) a job not started yet starts nothing either,
        and one under way is let finish its spawn: the run path stops that child as for any
        timeout, keeping what it wrote.
        """
        request = start.request
        loop = asyncio.get_running_loop()
        launch = _Launch(loop, self, request, start.input, start.out, start.err)
        job = launch.job = loop.run_in_executor(self._pool.get(), launch.run)
        try:
            await asyncio.wait((launch.spawned, job), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError as exc:
            if not (spawn_past_deadline(exc) and await _spawn_under_way(launch, job)):
                # Nobody awaits the job now: an error of its (the spawn failing after all) is
                # seen.
                job.add_done_callback(_retrieved)
                if launch.abort():
                    with shielded_if_cancelled():  # a cancelled anyio scope: still waited for
                        await asyncio.wait((launch.exited,))
                raise
            if not launch.spawned.done():
                job.add_done_callback(_retrieved)  # the spawn failed: nothing runs
                raise
        if not launch.spawned.done():
            try:
                job.result()
            except OSError as exc:
                raise self.spawn_failed(request, exc) from exc
            except subprocess.SubprocessError as exc:
                if preexec_failed(exc):
                    raise self.spawn_failed(request, exc) from exc
                raise
            raise RuntimeError("the LOCAL worker finished without starting the child")
        return ChildRun(
            launch.spawned.result(), self, grace=start.grace, ops=self.ops, readers=[job]
        )

    def close(self) -> None:
        """Make every drain in progress let go of its pipes (their children were stopped by the
        wrapper; only a process outside their trees can still hold them), then shut the worker
        pool down, waiting for its jobs. Idempotent."""
        self._drains.abandon_all()
        self._pool.close()


class _Launch:
    """One ``run()`` in one worker job: spawn, drain, reap.

    The loop learns the child exists through one ``call_soon_threadsafe`` (it then tracks a
    :class:`LocalProcess` for shutdown and stop); an abort before the spawn finished is honoured
    by the worker as soon as the child exists, without the loop's help.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        strategy: LocalStrategy,
        request: SpawnRequest,
        input: bytes | None,
        out: TailBuffer,
        err: TailBuffer,
    ) -> None:
        self._loop = loop
        self._strategy = strategy
        self._request = request
        self._input = input
        self._out = out
        self._err = err
        self._own_group = strategy.ops.started_own_group(request.kwargs)
        self.spawned: asyncio.Future[LocalProcess] = loop.create_future()
        self.job: asyncio.Future[int] | None = None
        # The process's own record of the exit, settled by the worker: ``job`` is the run's
        # reader, which the run path cancels when it discards the run, and a cancelled future
        # would leave ``returncode`` unset (and a tree stop waiting for it) for good.
        self.exited: asyncio.Future[int] = loop.create_future()
        self.exited.add_done_callback(_retrieved)
        self.watch = DrainWatch(self._exited_in_thread, loop)
        self._process: LocalProcess | None = None
        self._popen: subprocess.Popen[bytes] | None = None
        self._containment: Containment | None = None
        self._lock = threading.Lock()
        self._aborted = False
        self._started = False

    def run(self) -> int:
        """The worker's part (blocking)."""
        with self._lock:
            self._started = True
            if self._aborted:  # given up while the job was queued: start nothing
                _call_soon(self._loop, functools.partial(_drop, self.exited))
                return -1
        try:
            returncode = self._run()
        except BaseException as exc:
            _call_soon(self._loop, functools.partial(_settle, self.exited, None, exc))
            raise
        _call_soon(self._loop, functools.partial(_settle, self.exited, returncode, None))
        return returncode

    def _run(self) -> int:
        ops = self._strategy.ops
        popen, containment = start_popen(self._request, ops)
        with self._lock:
            self._popen = popen
            self._containment = containment
            aborted = self._aborted
        if aborted:
            discard_popen(ops, self._request, popen, containment)
            returncode = popen.wait()
            ops.child_exited(popen.pid)
            return returncode
        _call_soon(self._loop, functools.partial(self._on_spawned, popen))
        drains = self._strategy._drains
        drains.add(self.watch)
        try:
            drain_blocking(popen, self._input, self._out, self._err, self.watch)
        except BaseException:
            # As LocalProcess does: the run fails, but its child is reaped and its exit
            # reported (a tree stop of the run waits for it).
            _close_pipes(popen)
            with contextlib.suppress(Exception):
                returncode = popen.wait()
                ops.child_exited(popen.pid)
                self._exited_in_thread(returncode)
            raise
        finally:
            drains.discard(self.watch)
        status = wait_unless_host_exits(popen, self.watch)
        if status is None:
            # A pool worker, which the interpreter's exit joins: it must not wait for a child
            # whose run was abandoned (its loop closed under it). The exit's own clean-up
            # kills that run's tree afterwards (_run_process._kill_abandoned).
            raise RuntimeError(f"interpreter shutdown: pid {popen.pid} was not waited for")
        ops.child_exited(popen.pid)
        return status

    def _on_spawned(self, popen: subprocess.Popen[bytes]) -> None:
        with self._lock:
            if self._aborted:
                return
        process = LocalProcess(
            self._loop,
            popen,
            self._strategy._drains,
            job=self.exited,
            buffers=(self._out, self._err),
            watch=self.watch,
        )
        register_child(process, self._own_group, self._containment, self._strategy.ops)
        self._process = process
        self._strategy._spawned(process)
        self.spawned.set_result(process)

    def _exited_in_thread(self, returncode: int) -> None:
        _call_soon(self._loop, functools.partial(self._report_exit, returncode))

    def _report_exit(self, returncode: int) -> None:
        if self._process is not None:
            self._process._set_returncode(returncode)

    def started_or_dropped(self) -> bool:
        """Whether the worker has started the job; if it has not, it never will (as after
        :meth:`abort`, which is then not needed)."""
        with self._lock:
            if not self._started:
                self._aborted = True
            return self._started

    def abort(self) -> bool:
        """The caller gave up while the child was starting: kill it and its tree now if it
        exists, else let the worker do it the moment it does; and make the drain let go.
        Returns whether the worker had started (then :attr:`exited` tells when it is done;
        otherwise it starts nothing)."""
        with self._lock:
            self._aborted = True
            started = self._started
            popen = self._popen
            containment = self._containment
        self.watch.abandon()
        if popen is not None:
            # In a thread: the kill looks at the process table, which would stall the event
            # loop (the caller's, on whose thread this runs) for tens of milliseconds.
            run_off_loop(
                functools.partial(
                    discard_popen,
                    self._strategy.ops,
                    self._request,
                    popen,
                    containment,
                    close_pipes=False,
                ),
                "prismq-undo",
            )
        return started


async def _spawn_under_way(launch: _Launch, job: asyncio.Future[int]) -> bool:
    """The run's deadline passed while ``launch`` was starting: drop it if its job has not
    started, else wait until its child is spawned (or its spawn failed). False when dropped,
    or when cancelled meanwhile (the caller then undoes it as for any cancellation)."""
    if not launch.started_or_dropped():
        return False
    try:
        await asyncio.wait((launch.spawned, job), return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        return False
    return True


def _close_pipes(popen: subprocess.Popen[bytes]) -> None:
    for pipe in (popen.stdin, popen.stdout, popen.stderr):
        if pipe is not None:
            with contextlib.suppress(Exception):
                pipe.close()


def _settle(job: asyncio.Future[int], result: int | None, exc: BaseException | None) -> None:
    if job.done():
        return
    if exc is not None:
        job.set_exception(exc)
    else:
        assert result is not None
        job.set_result(result)


def _drop(future: asyncio.Future[int]) -> None:
    future.cancel()


def _retrieved(future: asyncio.Future[int]) -> None:
    # The job reports a failure to start too; the exit record must not log it a second time.
    if not future.cancelled():
        future.exception()


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    with contextlib.suppress(RuntimeError):  # loop closed: nobody is waiting any more
        loop.call_soon_threadsafe(callback)
